"""Several versions of one worker's ESP data plane, run side by side on the same packets
(``daemon.versions``, ``daemon.compare``; N-version ESP, docs/versions.md).

The worker builds its core :class:`~nfq_ipsec.core.Processor` as always and hands it to
:func:`build`, which returns it unchanged when ``compare`` is off, or a :class:`Versions`
around it: the core first, then the other versions built from the same spec, each with its
own SA state. A ``Versions`` answers ``process`` as the core does (a core ``Result``) and
passes everything else the worker uses (the SAD, the counters, keepalives, events, GSO) to
the core, so the worker needs no other change. Only the compiled core and the independent
implementation are built: the core's Python source can't be imported beside its compiled
build under the same name.

Every version processes every packet, so that their sequence numbers, replay windows and
lifetimes stay in step; ``sample:N`` compares one packet in N (it saves the comparison only,
not the processing). Agreement: the same verdict, drop reason and ICMP error; when not dropped,
the same bytes (outbound the ESP packet, inbound the inner one) and the same packets sent
instead. A version that refuses a packet as unsupported abstains. A disagreement drops the
packet (fail closed) as ``version_mismatch``, counted per SA and per version pair, and is
logged, rate-limited, with what differed and the input packet's SHA-256, never its content.

A version that raises, or disagrees ``MISMATCH_LIMIT`` times in a row, is taken out of
service: it is no longer run, the log says so and the status shows it. The core is the
worker's shell (its SAD carries the status, the state files and GSO) and is never taken out:
with two versions one can't tell which is wrong, so the other one goes. With ``all`` and one
version left, every packet that goes through an SA is dropped (``version_out``) unless
``compare_fallback`` lets the core carry on alone; with ``sample:N`` the core carries on.

Versions run in this process: an exception is caught per version, a hang is not (no thread
can be stopped from outside in Python); the watchdog restarts a worker that stops answering.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, Final, cast

from .core import DropReason, Processor, Result, Verdict
from .independent import Engine, Outcome
from .status import PairCounts, VersionsSnapshot, VersionState

# Disagreements in a row that take a version out. One alone may be a difference in a rare
# corner; once two versions' SA state has drifted apart (a sequence number or a replay
# window), every later packet of that SA disagrees, so a few in a row say the state is gone
# and comparing it further only drops traffic. Three keeps a single odd packet from doing it.
MISMATCH_LIMIT: Final = 3
LOG_INTERVAL: Final = 10.0  # seconds between two log lines about disagreements

log = logging.getLogger("nfq_ipsec.versions")


class _Other:
    """A version beside the core, and its standing."""

    def __init__(self, name: str, engine: Engine) -> None:
        self.name = name
        self.engine = engine
        self.in_service = True
        self.out_reason: str | None = None
        self.errors = 0
        self.abstained = 0
        self.streak = 0
        self.agreed = 0
        self.mismatches = 0


def _engine(spec: Any, core: Processor, now: float, sas: Any = None) -> Engine:
    engine = Engine(spec.policies, spec.sas if sas is None else sas, now, mtu=spec.mtu,
                    max_packet=core.max_packet, ipv6_link=spec.ipv6_link)
    engine.frag_ident = core.frag_ident
    return engine


BUILDERS: Final[dict[str, Callable[[Any, Processor, float], Engine]]] = {
    "independent": _engine,
}


def build(spec: Any, core: Processor, now: float,
          clock: Callable[[], float] | None = None) -> Processor:
    """The worker's data plane for ``spec`` (a WorkerSpec): ``core`` itself when
    ``spec.compare`` is off, else a :class:`Versions` of ``core`` and the others (typed as
    the Processor it stands in for)."""
    if spec.compare == "off":
        return core
    others = [_Other(name, BUILDERS[name](spec, core, now)) for name in spec.versions[1:]]
    return cast(Processor, Versions(core, others, spec.compare, spec.compare_fallback, clock))


def rebuilt(old: Processor, new: Processor, spec: Any, now: float) -> Processor:
    """A reload: ``new`` (the core of the new configuration) with the versions ``old`` had.
    An SA the core kept (same name, same parameters) keeps its state in every version; a new
    or changed one starts fresh (and takes the core's restored state on the first packet)."""
    if not isinstance(old, Versions):
        return new
    kept = {sa.name for sa in new.sad.all() if old.core.sad.by_name(sa.name) is sa}
    others = []
    for prev in old.others:
        engine = _engine(spec, new, now)
        for name in kept:
            sa = prev.engine.db.by_name.get(name)
            if sa is not None and name in engine.db.by_name:
                engine.db.by_name[name] = sa
                if not sa.outbound:
                    engine.db.inbound[sa.spi] = sa
        engine.frag_ident = prev.engine.frag_ident
        other = _Other(prev.name, engine)
        other.__dict__.update({k: v for k, v in prev.__dict__.items() if k != "engine"})
        others.append(other)
    versions = Versions(new, others, old.compare, old.fallback, old._clock)
    versions.counts_from(old)
    return cast(Processor, versions)


def snapshot(processor: Processor, compare: str = "off") -> VersionsSnapshot:
    """The status of a worker's versions (the core alone when ``processor`` is one)."""
    if isinstance(processor, Versions):
        return processor.snapshot()
    return {"compare": compare, "fallback": False, "packets": 0, "compared": 0,
            "versions": [_core_state()], "pairs": [], "sa_mismatches": {}}


def _core_state() -> VersionState:
    return {"name": "core", "in_service": True, "out_reason": None, "errors": 0,
            "abstained": 0, "streak": 0}


_OWN: Final = frozenset(("core", "others", "compare", "fallback", "every", "packets",
                         "compared", "sa_mismatches", "_clock", "_next_log", "_unlogged",
                         "_synced"))


class Versions:
    """The versions of one worker's data plane, answering as its core Processor does."""

    def __init__(self, core: Processor, others: list[_Other], compare: str, fallback: bool,
                 clock: Callable[[], float] | None = None) -> None:
        self.core = core
        self.others = others
        self.compare = compare
        self.fallback = fallback
        self.every = int(compare.removeprefix("sample:")) if compare.startswith("sample:") else 1
        self.packets = 0
        self.compared = 0
        self.sa_mismatches: Counter[str] = Counter()
        self._clock = clock
        self._next_log = 0.0
        self._unlogged = 0
        self._synced = False

    # -- the worker's view: a Processor ---------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        return getattr(self.core, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN:
            object.__setattr__(self, name, value)
            return
        setattr(self.core, name, value)
        if name == "frag_ident":  # the shell's seed: the same in every version
            for other in self.others:
                other.engine.frag_ident = value

    def keepalives(self, now: float) -> list[bytes]:
        """The core's NAT-keepalives (the others keep their own timers in step)."""
        for other in self.in_service():
            try:
                other.engine.keepalives(now)
            except Exception as err:
                self._take_out(other, f"raised {type(err).__name__} in keepalives")
        return list(self.core.keepalives(now))

    def in_service(self) -> list[_Other]:
        return [o for o in self.others if o.in_service]

    # -- a packet through every version ---------------------------------------------------
    def process(self, data: bytes, length: int, where: int, now: float) -> Result:
        if not self._synced:
            self._sync()
        res = self.core.process(data, length, where, now)
        self.packets += 1
        answers: list[tuple[_Other, Outcome]] = []
        for other in self.others:
            if not other.in_service:
                continue
            try:
                answers.append((other, other.engine.process(data, length, where, now)))
            except Exception as err:  # this version only: the others go on
                other.errors += 1
                self._take_out(other, f"raised {type(err).__name__}")
        if self.packets % self.every:
            return self._alone(res)
        self.compared += 1
        failed: list[tuple[_Other, Outcome, str]] = []
        for other, out in answers:
            if out.unsupported:
                other.abstained += 1
                continue
            what = difference(res, out)
            if what is None:
                other.agreed += 1
                other.streak = 0
            else:
                other.mismatches += 1
                other.streak += 1
                failed.append((other, out, what))
        if not failed:
            return self._alone(res)
        return self._mismatch(res, failed, data[:length])

    def _alone(self, res: Result) -> Result:
        """``res`` as it stands, unless the core is the only version left with ``all`` and no
        fallback: then a packet through an SA is dropped (fail closed)."""
        if (self.every == 1 and not self.fallback and res.sa is not None
                and res.verdict is not Verdict.DROP and not any(o.in_service for o in self.others)):
            return self._recount(res, DropReason.VERSION_OUT)
        return res

    def _mismatch(self, res: Result, failed: list[tuple[_Other, Outcome, str]],
                  packet: bytes) -> Result:
        sa_name = res.sa.name if res.sa is not None else next(
            (out.sa_name for _, out, _ in failed if out.sa_name), None)
        if sa_name is not None:
            self.sa_mismatches[sa_name] += 1
        self._log(res, failed, sa_name, packet)
        for other, _, _ in failed:
            if other.streak >= MISMATCH_LIMIT:
                self._take_out(other, f"disagreed {other.streak} times in a row")
        return self._recount(res, DropReason.VERSION_MISMATCH)

    def _recount(self, res: Result, reason: DropReason) -> Result:
        """A drop as ``reason``, counted once: a drop the core counted under its own reason is
        moved to this one, so that every dropped packet stays under one reason."""
        core = self.core
        if res.verdict is Verdict.DROP and res.reason is not None:
            core.drops[res.reason] -= 1
            if res.sa is not None:
                res.sa.drops[res.reason] -= 1
        core.drops[reason] += 1
        if res.sa is not None:
            res.sa.drops[reason] += 1
        return Result(Verdict.DROP, None, reason, res.sa, None, reason.value)

    def _take_out(self, other: _Other, why: str) -> None:
        if not other.in_service:
            return
        other.in_service = False
        other.out_reason = why
        left = 1 + len(self.in_service())
        then = ("the core carries on alone" if self.fallback or self.every > 1
                else "packets through an SA are dropped (compare_fallback is off)")
        log.error("version %s taken out of service: %s; %d version(s) left%s", other.name, why,
                  left, f", {then}" if left == 1 else "")

    def _log(self, res: Result, failed: list[tuple[_Other, Outcome, str]], sa: str | None,
             packet: bytes) -> None:
        now = self._clock() if self._clock is not None else 0.0
        if self._clock is not None and now < self._next_log:
            self._unlogged += 1
            return
        digest = hashlib.sha256(packet).hexdigest()
        more = f" ({self._unlogged} more since the last report)" if self._unlogged else ""
        for other, out, what in failed:
            log.warning(
                "versions core and %s disagree on a packet of SA %s: %s; core %s%s, %s %s%s; "
                "packet sha256 %s, dropped%s", other.name, sa or "-", what,
                res.verdict.value, _why(res.reason.value if res.reason else None),
                other.name, out.verdict, _why(out.reason), digest, more)
        self._unlogged = 0
        self._next_log = now + LOG_INTERVAL

    def _sync(self) -> None:
        """Before the first packet: an SA no version has used yet takes the core's state, as
        the state store restored it (sequence reservations, replay floors; the others keep
        no state files)."""
        self._synced = True
        for sa in self.core.sad.all():
            for other in self.others:
                mine = other.engine.db.by_name.get(sa.name)
                if mine is None or mine.packets:
                    continue
                if sa.outbound:
                    mine.next_seq = sa.next_seq
                elif sa.replay.top and not mine.window.top:
                    mine.window.top = sa.replay.top
                    mine.window.bitmap = (1 << mine.window.size) - 1

    # -- status ---------------------------------------------------------------------------
    def counts_from(self, old: Versions) -> None:
        self.packets, self.compared = old.packets, old.compared
        self.sa_mismatches = old.sa_mismatches
        self._synced = False  # the reload's new SAs take their restored state

    def snapshot(self) -> VersionsSnapshot:
        states = [_core_state()]
        pairs: list[PairCounts] = []
        for o in self.others:
            states.append({"name": o.name, "in_service": o.in_service, "out_reason": o.out_reason,
                           "errors": o.errors, "abstained": o.abstained, "streak": o.streak})
            pairs.append({"versions": ["core", o.name], "agreed": o.agreed,
                          "mismatches": o.mismatches})
        return {"compare": self.compare, "fallback": self.fallback, "packets": self.packets,
                "compared": self.compared, "versions": states, "pairs": pairs,
                "sa_mismatches": dict(self.sa_mismatches)}


def _why(reason: str | None) -> str:
    return f" ({reason})" if reason else ""


def difference(res: Result, out: Outcome) -> str | None:
    """What differs between the core's answer and another version's, in words without the
    packet's content (lengths and the first differing offset); None if they agree."""
    if res.verdict.value != out.verdict:
        return "verdict"
    mine = res.reason.value if res.reason is not None else None
    if mine != out.reason:
        return "drop reason"
    if res.reply != out.reply:
        return "ICMP error: " + _bytes_differ(res.reply, out.reply)
    if res.verdict is Verdict.DROP:
        return None
    if res.packet != out.packet:
        return "packet: " + _bytes_differ(res.packet, out.packet)
    theirs = out.packets or []
    ours = res.packets or []
    if ours != theirs:
        if len(ours) != len(theirs):
            return f"packets sent instead: {len(ours)} and {len(theirs)}"
        i = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
        return f"packet {i} sent instead: " + _bytes_differ(ours[i], theirs[i])
    return None


def _bytes_differ(a: bytes | None, b: bytes | None) -> str:
    if a is None or b is None:
        return f"{'none' if a is None else len(a)} and {'none' if b is None else len(b)} bytes"
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                 min(len(a), len(b)))
    return f"{len(a)} and {len(b)} bytes, first difference at offset {first}"

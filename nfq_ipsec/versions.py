"""Several versions of one worker's ESP data plane, run side by side on the same packets
(``daemon.versions``, ``daemon.compare``; N-version ESP, docs/versions.md).

The worker builds its core :class:`~nfq_ipsec.core.Processor` as always and hands it to
:func:`build`, which returns it unchanged when ``compare`` is off, or a :class:`Versions`
around it: the core first, then the other versions built from the same spec, each with its
own SA state: ``independent`` (:mod:`nfq_ipsec.independent`) and ``core-source`` (the core's
Python source under another package name, :mod:`nfq_ipsec.coresource`). A ``Versions``
answers ``process`` as the core does (a core ``Result``) and passes everything else the
worker uses (the SAD, the counters, keepalives, events, GSO) to the core, so the worker
needs no other change.

Every version processes every packet, so that their sequence numbers, replay windows and
lifetimes stay in step; ``sample:N`` compares one packet in N (it saves the comparison only,
not the processing). Agreement: the same verdict, drop reason and ICMP error; when not dropped,
the same bytes (outbound the ESP packet, inbound the inner one) and the same packets sent
instead. A version that refuses a packet as unsupported abstains. With ``all`` and
``sample:N`` a disagreement drops the packet (fail closed) as ``version_mismatch``. With
``majority`` and at least three answers, the answer more than half of them give leaves (the
core's own when it is among them, else the majority's, as a core ``Result``) and the others
are outvoted; with no such answer (two versions left, or three different answers) it is
``all``. Disagreements are counted per SA and per version pair and logged, rate-limited,
with what differed and the input packet's SHA-256, never its content.

Who is blamed for a disagreement: the versions outside a strict majority of the answers, or,
with no majority (two versions), every version that differs from the core. A version that
raises, or is blamed ``MISMATCH_LIMIT`` times in a row, is taken out of service: it is no
longer run, the log says so and the status shows it. The core is the worker's shell (its
SAD carries the status, the state files and GSO), so it is never stopped: when it is
outvoted that often, its SA state can't be trusted to persist, and every packet through an
SA is dropped (``version_out``) from then on. With one version left in service, a packet
through an SA is dropped (``version_out``) unless ``compare_fallback`` lets the core carry
on alone; with ``sample:N`` the core carries on.

Versions run in this process: an exception is caught per version, a hang is not (no thread
can be stopped from outside in Python); the watchdog restarts a worker that stops answering.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from itertools import combinations
from typing import Any, Final, NamedTuple, cast

from . import coresource
from .core import DropReason, Processor, Result, SecurityAssociation, Verdict
from .independent import Engine, Outcome
from .status import PairCounts, VersionsSnapshot, VersionState

# Disagreements in a row that take a version out. One alone may be a difference in a rare
# corner; once two versions' SA state has drifted apart (a sequence number or a replay
# window), every later packet of that SA disagrees, so a few in a row say the state is gone
# and comparing it further only drops traffic. Three keeps a single odd packet from doing it.
MISMATCH_LIMIT: Final = 3
LOG_INTERVAL: Final = 10.0  # seconds between two log lines about disagreements
NAMES: Final = ("core", "independent", "core-source")  # daemon.versions: what build() makes

log = logging.getLogger("nfq_ipsec.versions")


class Answer(NamedTuple):
    """One version's answer in words every version shares (no class of any of them). A named
    tuple: one is made per packet and version, and it is the cheapest record to make."""

    verdict: str
    reason: str | None
    packet: bytes | None
    packets: tuple[bytes, ...]
    reply: bytes | None
    sa_name: str | None
    seq: int | None
    detail: str = ""

    @property
    def unsupported(self) -> bool:
        return self.reason == "unsupported"

    def key(self) -> tuple[object, ...]:
        """What must be equal for two answers to agree (a drop's bytes don't matter)."""
        if self.verdict == "drop":
            return (self.verdict, self.reason, self.reply)
        return (self.verdict, self.reason, self.reply, self.packet, self.packets)


def of_result(res: Any) -> Answer:
    """The answer of a core ``Result``, of the compiled core or of its source (``_value_``:
    the member's own attribute; ``.value`` is a Python-level descriptor, per packet)."""
    return Answer(res.verdict._value_, None if res.reason is None else res.reason._value_,
                  res.packet, tuple(res.packets or ()), res.reply,
                  None if res.sa is None else res.sa.name, res.seq, res.detail)


def of_outcome(out: Outcome) -> Answer:
    """The answer of the independent implementation."""
    return Answer(out.verdict, out.reason, out.packet, tuple(out.packets or ()), out.reply,
                  out.sa_name, out.seq, out.detail)


class _Standing:
    """A version's standing in the comparison (the core's too)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.in_service = True
        self.out_reason: str | None = None
        self.errors = 0
        self.abstained = 0
        self.streak = 0
        self.outvoted = 0  # packets whose answer left although this version's differed

    def standing_from(self, old: _Standing) -> None:
        for field in ("in_service", "out_reason", "errors", "abstained", "streak", "outvoted"):
            setattr(self, field, getattr(old, field))

    def state(self) -> VersionState:
        return {"name": self.name, "in_service": self.in_service, "out_reason": self.out_reason,
                "errors": self.errors, "abstained": self.abstained, "streak": self.streak,
                "outvoted": self.outvoted}


class _Other(_Standing):
    """A version beside the core: its own engine and SA state."""

    engine: Any

    def run(self, data: bytes, length: int, where: int, now: float) -> Answer:
        raise NotImplementedError

    def keepalives(self, now: float) -> None:
        self.engine.keepalives(now)  # its timers in step; the core's keepalives are sent

    def set_frag_ident(self, value: int) -> None:
        self.engine.frag_ident = value

    def take_state(self, sa: SecurityAssociation) -> None:
        """Before its first packet: the core's restored state of ``sa`` (the state files)."""
        raise NotImplementedError


class _Independent(_Other):
    def __init__(self, spec: Any, core: Processor, now: float, prev: _Other | None = None,
                 kept: Iterable[str] = ()) -> None:
        super().__init__("independent")
        engine = Engine(spec.policies, spec.sas, now, mtu=spec.mtu, max_packet=core.max_packet,
                        ipv6_link=spec.ipv6_link)
        engine.frag_ident = core.frag_ident
        if prev is not None:  # a reload: the SAs it kept go on with their state
            for name in kept:
                sa = prev.engine.db.by_name.get(name)
                if sa is not None and name in engine.db.by_name:
                    engine.db.by_name[name] = sa
                    if not sa.outbound:
                        engine.db.inbound[sa.spi] = sa
            engine.frag_ident = prev.engine.frag_ident
        self.engine = engine

    def run(self, data: bytes, length: int, where: int, now: float) -> Answer:
        return of_outcome(self.engine.process(data, length, where, now))

    def take_state(self, sa: SecurityAssociation) -> None:
        mine = self.engine.db.by_name.get(sa.name)
        if mine is None or mine.packets:
            return
        if sa.outbound:
            mine.next_seq = sa.next_seq
        elif sa.replay.top and not mine.window.top:
            mine.window.top = sa.replay.top
            mine.window.bitmap = (1 << mine.window.size) - 1


class _CoreSource(_Other):
    """The core's Python source, loaded under its own package name (:mod:`.coresource`)."""

    def __init__(self, spec: Any, core: Processor, now: float, prev: _Other | None = None,
                 kept: Iterable[str] = ()) -> None:
        super().__init__("core-source")
        src = coresource.load()
        policies, params = coresource.translate((list(spec.policies), list(spec.sas)))
        items: list[Any] = list(params)
        if prev is not None:  # a reload: the SAs it kept go on with their state
            keep = set(kept)
            items = [prev.engine.sad.by_name(p.name) if p.name in keep
                     and prev.engine.sad.by_name(p.name) is not None else p for p in params]
        self.engine = src.Processor(src.SPD(policies), items, now, mtu=spec.mtu,
                                    max_packet=core.max_packet, ipv6_link=spec.ipv6_link)
        self.engine.frag_ident = prev.engine.frag_ident if prev is not None else core.frag_ident

    def run(self, data: bytes, length: int, where: int, now: float) -> Answer:
        return of_result(self.engine.process(data, length, where, now))

    def take_state(self, sa: SecurityAssociation) -> None:
        mine = self.engine.sad.by_name(sa.name)
        if mine is None or mine.packets:
            return
        if sa.outbound:
            mine.next_seq = sa.next_seq
        elif sa.replay.top and not mine.replay.top:
            mine.replay.restore(sa.replay.top)


BUILDERS: Final[dict[str, Callable[..., _Other]]] = {
    "independent": _Independent,
    "core-source": _CoreSource,
}


def build(spec: Any, core: Processor, now: float,
          clock: Callable[[], float] | None = None) -> Processor:
    """The worker's data plane for ``spec`` (a WorkerSpec): ``core`` itself when
    ``spec.compare`` is off, else a :class:`Versions` of ``core`` and the others (typed as
    the Processor it stands in for)."""
    if spec.compare == "off":
        return core
    others = [BUILDERS[name](spec, core, now) for name in spec.versions[1:]]
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
        other = BUILDERS[prev.name](spec, new, now, prev, kept)
        other.standing_from(prev)
        others.append(other)
    versions = Versions(new, others, old.compare, old.fallback, old._clock)
    versions.counts_from(old)
    return cast(Processor, versions)


def snapshot(processor: Processor, compare: str = "off") -> VersionsSnapshot:
    """The status of a worker's versions (the core alone when ``processor`` is one)."""
    if isinstance(processor, Versions):
        return processor.snapshot()
    return {"compare": compare, "fallback": False, "packets": 0, "compared": 0,
            "versions": [_Standing("core").state()], "pairs": [], "sa_mismatches": {}}


_OWN: Final = frozenset(("core", "main", "others", "compare", "fallback", "every", "packets",
                         "compared", "sa_mismatches", "agreed", "mismatched", "_clock",
                         "_next_log", "_unlogged", "_synced"))


class Versions:
    """The versions of one worker's data plane, answering as its core Processor does."""

    def __init__(self, core: Processor, others: list[_Other], compare: str, fallback: bool,
                 clock: Callable[[], float] | None = None) -> None:
        self.core = core
        self.main = _Standing("core")  # the core's standing
        self.others = others
        self.compare = compare
        self.fallback = fallback
        self.every = int(compare.removeprefix("sample:")) if compare.startswith("sample:") else 1
        self.packets = 0
        self.compared = 0
        self.sa_mismatches: Counter[str] = Counter()
        self.agreed: Counter[tuple[str, str]] = Counter()
        self.mismatched: Counter[tuple[str, str]] = Counter()
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
                other.set_frag_ident(value)

    def keepalives(self, now: float) -> list[bytes]:
        """The core's NAT-keepalives (the others keep their own timers in step)."""
        for other in self.in_service():
            try:
                other.keepalives(now)
            except Exception as err:
                other.errors += 1
                self._take_out(other, f"raised {type(err).__name__} in keepalives")
        return list(self.core.keepalives(now))

    def in_service(self) -> list[_Other]:
        return [o for o in self.others if o.in_service]

    def standings(self) -> list[_Standing]:
        return [self.main, *self.others]

    # -- a packet through every version ---------------------------------------------------
    def process(self, data: bytes, length: int, where: int, now: float) -> Result:
        if not self._synced:
            self._sync()
        res = self.core.process(data, length, where, now)
        self.packets += 1
        answers: list[tuple[_Standing, Answer]] = []
        for other in self.others:
            if not other.in_service:
                continue
            try:
                answers.append((other, other.run(data, length, where, now)))
            except Exception as err:  # this version only: the others go on
                other.errors += 1
                self._take_out(other, f"raised {type(err).__name__}")
        if not self.main.in_service or self.packets % self.every:
            return self._alone(res)
        self.compared += 1
        voters: list[tuple[_Standing, Answer]] = [(self.main, of_result(res))]
        for voter, answer in answers:
            if answer.unsupported:
                voter.abstained += 1
            else:
                voters.append((voter, answer))
        keys = [answer.key() for _, answer in voters]
        for (i, (a, _)), (j, (b, _)) in combinations(enumerate(voters), 2):
            (self.agreed if keys[i] == keys[j] else self.mismatched)[(a.name, b.name)] += 1
        if all(k == keys[0] for k in keys):
            for st, _ in voters:
                st.streak = 0
            return self._alone(res)
        groups: dict[tuple[object, ...], list[tuple[_Standing, Answer]]] = {}
        for key, entry in zip(keys, voters, strict=True):
            groups.setdefault(key, []).append(entry)
        return self._disagreement(res, voters, groups, data[:length])

    def _disagreement(self, res: Result, voters: list[tuple[_Standing, Answer]],
                      groups: dict[tuple[object, ...], list[tuple[_Standing, Answer]]],
                      packet: bytes) -> Result:
        """Who is blamed, and what leaves: the majority's answer with ``majority`` and at
        least three answers, else nothing (``version_mismatch``)."""
        big = max(groups.values(), key=len)
        strict = 2 * len(big) > len(voters)
        core_answer = voters[0][1]
        if strict:  # the versions outside a strict majority
            blamed = [(st, a) for st, a in voters if a.key() != big[0][1].key()]
            reference = big[0]
        else:  # two versions, or no two alike: every version that differs from the core
            blamed = [(st, a) for st, a in voters if a.key() != core_answer.key()]
            reference = voters[0]
        blamed_names = {st.name for st, _ in blamed}
        for st, _ in voters:
            st.streak = st.streak + 1 if st.name in blamed_names else 0
        vote = self.compare == "majority" and strict and len(voters) >= 3
        sa_name = res.sa.name if res.sa is not None else next(
            (a.sa_name for _, a in voters if a.sa_name), None)
        if sa_name is not None:
            self.sa_mismatches[sa_name] += 1
        self._log(reference, blamed, sa_name, packet,
                  ("outvoted, the answer of " + ", ".join(st.name for st, _ in big) + " leaves")
                  if vote else "dropped")
        for st, _ in blamed:
            if vote:
                st.outvoted += 1
            if st.streak >= MISMATCH_LIMIT:
                self._take_out(st, f"disagreed {st.streak} times in a row")
        if not vote:
            return self._recount(res, DropReason.VERSION_MISMATCH)
        if not self.main.in_service:
            return self._alone(res)
        if self.main.name not in blamed_names:
            return res
        return self._majority(res, big[0][1])

    def _majority(self, res: Result, answer: Answer) -> Result:
        """The majority's ``answer`` as the core's ``Result``, where the core was outvoted;
        the core's drop count moves to the majority's reason (each dropped packet counts once,
        under the reason that left)."""
        core = self.core
        sa = res.sa
        if sa is None and answer.sa_name is not None:
            sa = core.sad.by_name(answer.sa_name)
        if res.verdict is Verdict.DROP and res.reason is not None:
            core.drops[res.reason] -= 1
            if res.sa is not None:
                res.sa.drops[res.reason] -= 1
        reason = DropReason(answer.reason) if answer.reason is not None else None
        if reason is not None:
            core.drops[reason] += 1
            if sa is not None:
                sa.drops[reason] += 1
        return Result(Verdict(answer.verdict), answer.packet, reason, sa, answer.seq, answer.detail,
                      answer.reply, list(answer.packets) if answer.packets else None)

    def _alone(self, res: Result) -> Result:
        """``res`` as it stands, unless the worker can't trust it alone: the core was taken
        out (outvoted too often: its SA state is not to be persisted), or it is the only
        version left with ``all`` or ``majority`` and no fallback. Then a packet through an
        SA is dropped (fail closed)."""
        if res.sa is None or res.verdict is Verdict.DROP:
            return res
        if not self.main.in_service:
            return self._recount(res, DropReason.VERSION_OUT)
        if self.every > 1 or self.fallback:
            return res
        for other in self.others:
            if other.in_service:
                return res
        return self._recount(res, DropReason.VERSION_OUT)

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

    def _take_out(self, st: _Standing, why: str) -> None:
        if not st.in_service:
            return
        st.in_service = False
        st.out_reason = why
        if st is self.main:
            log.error("version core taken out of service: %s; it is the worker's shell (its SA "
                      "state is what the state files keep), so packets through an SA are "
                      "dropped from now on", why)
            return
        left = 1 + len(self.in_service())
        then = ("the core carries on alone" if self.fallback or self.every > 1
                else "packets through an SA are dropped (compare_fallback is off)")
        log.error("version %s taken out of service: %s; %d version(s) left%s", st.name, why,
                  left, f", {then}" if left == 1 else "")

    def _log(self, reference: tuple[_Standing, Answer],
             blamed: list[tuple[_Standing, Answer]], sa: str | None, packet: bytes,
             then: str) -> None:
        now = self._clock() if self._clock is not None else 0.0
        if self._clock is not None and now < self._next_log:
            self._unlogged += 1
            return
        digest = hashlib.sha256(packet).hexdigest()
        more = f" ({self._unlogged} more since the last report)" if self._unlogged else ""
        ref, mine = reference
        for st, theirs in blamed:
            log.warning(
                "versions %s and %s disagree on a packet of SA %s: %s; %s %s%s, %s %s%s; "
                "packet sha256 %s, %s%s", ref.name, st.name, sa or "-", difference(mine, theirs),
                ref.name, mine.verdict, _why(mine.reason), st.name, theirs.verdict,
                _why(theirs.reason), digest, then, more)
        self._unlogged = 0
        self._next_log = now + LOG_INTERVAL

    def _sync(self) -> None:
        """Before the first packet: an SA no version has used yet takes the core's state, as
        the state store restored it (sequence reservations, replay floors; the others keep
        no state files)."""
        self._synced = True
        for sa in self.core.sad.all():
            for other in self.others:
                other.take_state(sa)

    # -- status ---------------------------------------------------------------------------
    def counts_from(self, old: Versions) -> None:
        self.packets, self.compared = old.packets, old.compared
        self.sa_mismatches = old.sa_mismatches
        self.agreed, self.mismatched = old.agreed, old.mismatched
        self.main = old.main
        self._synced = False  # the reload's new SAs take their restored state

    def snapshot(self) -> VersionsSnapshot:
        names = [st.name for st in self.standings()]
        pairs: list[PairCounts] = [
            {"versions": [a, b], "agreed": self.agreed[(a, b)],
             "mismatches": self.mismatched[(a, b)]} for a, b in combinations(names, 2)]
        return {"compare": self.compare, "fallback": self.fallback, "packets": self.packets,
                "compared": self.compared, "versions": [st.state() for st in self.standings()],
                "pairs": pairs, "sa_mismatches": dict(self.sa_mismatches)}


def _why(reason: str | None) -> str:
    return f" ({reason})" if reason else ""


def difference(mine: Answer, theirs: Answer) -> str | None:
    """What differs between two answers, in words without the packet's content (lengths and
    the first differing offset); None if they agree."""
    if mine.verdict != theirs.verdict:
        return "verdict"
    if mine.reason != theirs.reason:
        return "drop reason"
    if mine.reply != theirs.reply:
        return "ICMP error: " + _bytes_differ(mine.reply, theirs.reply)
    if mine.verdict == "drop":
        return None
    if mine.packet != theirs.packet:
        return "packet: " + _bytes_differ(mine.packet, theirs.packet)
    ours, others = mine.packets, theirs.packets
    if ours != others:
        if len(ours) != len(others):
            return f"packets sent instead: {len(ours)} and {len(others)}"
        i = next(i for i, (a, b) in enumerate(zip(ours, others, strict=True)) if a != b)
        return f"packet {i} sent instead: " + _bytes_differ(ours[i], others[i])
    return None


def _bytes_differ(a: bytes | None, b: bytes | None) -> str:
    if a is None or b is None:
        return f"{'none' if a is None else len(a)} and {'none' if b is None else len(b)} bytes"
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                 min(len(a), len(b)))
    return f"{len(a)} and {len(b)} bytes, first difference at offset {first}"

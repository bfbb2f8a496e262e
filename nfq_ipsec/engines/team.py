"""The team of crypto engines in one process: what each can do, whether it passed its
known-answer tests, how fast it is, which SAs it carries; and the choice of an SA's engine.

- ``discover`` (the supervisor, at start): probe every engine, run the known-answer tests of
  every suite it claims (``kat``) and a few milliseconds of speed per verified suite.
- ``verify`` (every worker, at start and every ``crypto.verify_interval``): the known-answer
  tests again, each engine in a thread with a deadline; an engine that fails or does not
  finish is excluded and its SAs move.
- ``bind``: an SA's suite, built by the engine the policy picks among the verified, enabled,
  capable ones, fenced by ``core.suites.GuardedSuite``; none: ``NoEngine`` (the SA refuses to
  start). ``move``: an SA changes engine in place: only ``sa.suite`` changes; its sequence
  numbers and replay window are the SA's own and stay.
- Policies: ``fastest`` (the best measured speed for the suite), ``prefer`` (the first usable
  engine of the list, then the fastest), ``balance`` (the engine with the least bound SAs per
  unit of measured speed: (SAs + 1) / speed, when an SA is bound; then, at every
  ``crypto.verify_interval``, ``rebalance`` moves an SA off the engine whose SAs' traffic
  kept it busiest, by the bytes they carried: the seed's ALB by current workload).

Every engine module is imported here, so importing this module at worker start loads every
library an SA may need (workers may run where opening files later is forbidden).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from ..core.errors import DropReason, EspError
from ..core.sa import SAParams, SecurityAssociation
from ..core.suites import GuardedSuite, Suite
from ..status import EngineReport
from . import kat
from .afalg import AfAlgEngine
from .base import DEFAULT_CRYPTO, ENGINE_NAMES, CryptoSettings, Engine, Probe, suite_name
from .offload import OffloadPool
from .openssl import OpenSSLEngine
from .pycryptodome import PycryptodomeEngine
from .sodium import SodiumEngine

log = logging.getLogger("nfq_ipsec.engines")

def default_engines() -> list[Engine]:
    return [OpenSSLEngine(), SodiumEngine(), PycryptodomeEngine(), AfAlgEngine()]


assert tuple(e.name for e in default_engines()) == ENGINE_NAMES


# balance's rebalance moves an SA only if that lowers the busiest engine's load by this share
REBALANCE_GAIN = 0.1


class NoEngine(ValueError):
    """No verified, enabled engine can run this SA's suite: the SA does not start."""


@dataclass(frozen=True)
class Discovered:
    """One engine as the supervisor found it, handed to the workers in their spec."""

    name: str
    claims: tuple[str, ...]
    verified: tuple[str, ...]
    speed: tuple[tuple[str, float], ...]  # bytes per second sealed, per verified suite
    absent: str | None = None
    failed: tuple[tuple[str, str], ...] = ()  # (suite, why) for known-answer tests not passed
    detail: str = ""


@dataclass
class Member:
    engine: Engine
    claims: frozenset[str] = frozenset()
    verified: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    speed: dict[str, float] = field(default_factory=dict)
    absent: str | None = None
    detail: str = ""
    disabled: bool = False
    excluded: str | None = None  # why the whole engine is out until it verifies again
    faults: int = 0  # packets its suites raised on (dropped as engine_failed)
    moved_away: int = 0  # SAs moved off it (fault, exclusion, disable)
    verified_at: float | None = None
    hung: list[threading.Thread] = field(default_factory=list)  # its tests that never returned

    @property
    def name(self) -> str:
        return self.engine.name

    def usable(self, suite: str) -> bool:
        return (self.absent is None and not self.disabled and self.excluded is None
                and suite in self.verified)


def _timed(fn: Callable[[], Any], timeout: float,
           hung: list[threading.Thread] | None = None, threads: bool = True) -> tuple[bool, Any]:
    """Run ``fn`` in a daemon thread; (False, None) if it has not returned within ``timeout``
    (it is left behind, in ``hung``: a hung library call can't be stopped from Python).
    ``threads`` False (a sandboxed worker, which may start none): ``fn`` runs here, with no
    deadline; a hang then holds the worker until the supervisor's watchdog kills it."""
    box: list[Any] = []
    if not threads:
        try:
            return True, ("ok", fn())
        except Exception as err:
            return True, ("err", err)

    def target() -> None:
        try:
            box.append(("ok", fn()))
        except BaseException as err:
            box.append(("err", err))

    t = threading.Thread(target=target, daemon=True, name="engine-kat")
    t.start()
    t.join(timeout)
    if not box:
        if hung is not None:
            hung.append(t)
        return False, None
    return True, box[0]


class Team:
    def __init__(self, engines: Iterable[Engine] | None = None,
                 settings: CryptoSettings = DEFAULT_CRYPTO,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.members = {e.name: Member(e) for e in (default_engines() if engines is None else engines)}
        self.settings = settings
        self.clock = clock
        self.alarms: list[str] = []  # engine names whose suites raised (GuardedSuite)
        self.threads = True  # False: tests run inline, without a deadline (see _timed)
        self.bound: dict[int, tuple[SecurityAssociation, str]] = {}  # id(sa) -> (sa, engine)
        self._bytes_seen: dict[int, int] = {}  # id(sa) -> its bytes at the last rebalance
        # crypto.offload_helpers: the worker's helper pool; an outbound SA's suite goes behind it
        self.offload: OffloadPool | None = None
        for name in settings.disabled:
            if name in self.members:
                self.members[name].disabled = True

    # -- discovery and verification ---------------------------------------------------------
    def discover(self, speed_seconds: float = 0.002) -> None:
        """Probe, verify and measure every engine (the supervisor, at start)."""
        for m in self.members.values():
            ok, res = _timed(m.engine.probe, self.settings.verify_timeout, threads=self.threads)
            if not ok:
                m.absent = f"discovery did not finish in {self.settings.verify_timeout:g} s"
            elif res[0] == "err":
                m.absent = f"discovery failed: {type(res[1]).__name__}: {res[1]}"
            else:
                probe: Probe = res[1]
                m.claims, m.absent, m.detail = probe.suites, probe.absent, probe.detail
        self.verify()
        for m in self.members.values():
            for s in sorted(m.verified):
                try:
                    m.speed[s] = kat.speed(m.engine.build, s, speed_seconds)
                except Exception as err:
                    m.verified.discard(s)
                    m.failed[s] = f"speed run raised {type(err).__name__}"
        for m in self.members.values():
            if m.absent is not None:
                log.info("engine %s absent: %s", m.name, m.absent)
            else:
                log.info("engine %s: %d suite(s) verified%s", m.name, len(m.verified),
                         "".join(f"; {s} FAILED: {why}" for s, why in sorted(m.failed.items())))

    def adopt(self, found: Iterable[Discovered]) -> None:
        """Take the supervisor's discovery (a worker): claims, speeds, absences. The worker
        then verifies for itself (``verify``), in its own process."""
        for d in found:
            m = self.members.get(d.name)
            if m is None:
                continue
            m.claims, m.absent, m.detail = frozenset(d.claims), d.absent, d.detail
            m.speed = dict(d.speed)
            m.failed = dict(d.failed)

    def verify(self) -> list[str]:
        """The known-answer tests of every claimed suite, again. Returns the names of engines
        excluded by this run (their SAs moved already)."""
        newly: list[str] = []
        now = self.clock()
        for m in self.members.values():
            if m.absent is not None or not m.claims:
                continue
            m.hung[:] = [t for t in m.hung if t.is_alive()]
            if m.hung:  # still stuck in the last run: not run again (threads would pile up)
                continue
            ok, res = _timed(lambda m=m: _kat_all(m), self.settings.verify_timeout,  # type: ignore[misc]
                             m.hung, threads=self.threads)
            if not ok:
                why = f"known-answer tests did not finish in {self.settings.verify_timeout:g} s"
            elif res[0] == "err":
                why = f"known-answer tests raised {type(res[1]).__name__}"
            else:
                passed, failed = res[1]
                m.verified, m.failed = passed, failed
                m.verified_at = now
                if not failed:
                    if m.excluded is not None and m.excluded.startswith("known-answer"):
                        log.warning("engine %s verified again: back in the team", m.name)
                        m.excluded = None
                    continue
                # one wrong answer and the member is not trusted with the others either
                why = f"known-answer test failed: {', '.join(sorted(failed))}"
            if m.excluded is None:
                newly.append(m.name)
            self.exclude(m.name, why)
        return newly

    # -- routing ----------------------------------------------------------------------------
    def choose(self, suite: str, avoid: str | None = None) -> Member:
        usable = [m for m in self.members.values() if m.usable(suite) and m.name != avoid]
        if not usable:
            raise NoEngine(f"no verified crypto engine can run {suite} "
                           f"({self._why_not(suite)})")
        fastest = max(usable, key=lambda m: m.speed.get(suite, 0.0))
        policy = self.settings.policy
        if policy == "prefer":
            for name in self.settings.prefer:
                for m in usable:
                    if m.name == name:
                        return m
            return fastest
        if policy == "balance":
            return min(usable, key=lambda m: (self.load(m.name) + 1) / max(m.speed.get(suite, 0.0), 1.0))
        return fastest

    def _why_not(self, suite: str) -> str:
        parts = []
        for m in self.members.values():
            if m.absent is not None:
                parts.append(f"{m.name}: absent")
            elif suite not in m.claims:
                parts.append(f"{m.name}: not offered")
            elif m.disabled:
                parts.append(f"{m.name}: disabled")
            elif m.excluded is not None:
                parts.append(f"{m.name}: excluded, {m.excluded}")
            elif suite not in m.verified:
                parts.append(f"{m.name}: {m.failed.get(suite, 'not verified')}")
        return "; ".join(parts)

    def problems(self, sas: Iterable[SAParams]) -> list[str]:
        """One line per SA that no verified, enabled engine can carry (it would not start)."""
        out = []
        for p in sas:
            try:
                self.choose(suite_name(p.encryption, p.integrity))
            except NoEngine as err:
                out.append(f"SA {p.name}: {err}")
        return out

    def load(self, name: str) -> int:
        return sum(1 for _sa, engine in self.bound.values() if engine == name)

    def build(self, sa: SecurityAssociation, avoid: str | None = None,
              on: Member | None = None) -> tuple[Suite, str]:
        """The SA's suite on the policy's choice of engine (``on``: on that one, or raise
        NoEngine if it can't build it)."""
        p = sa.params
        suite = suite_name(p.encryption, p.integrity)
        while True:
            m = self.choose(suite, avoid) if on is None else on
            if on is not None and not on.usable(suite):
                raise NoEngine(f"{on.name} can't carry {suite}")
            try:
                inner = m.engine.build(p.encryption, p.key.reveal(), p.integrity,
                                       p.integrity_key.reveal())
            except Exception as err:
                self.exclude(m.name, f"building a suite raised {type(err).__name__}", move=False)
                if on is not None:
                    raise NoEngine(f"{on.name}: building a suite raised {type(err).__name__}") from None
                continue
            built: Suite = GuardedSuite(inner, m.name, self.alarms, self._witness(sa, m.name),
                                        self.settings.self_check)
            if self.offload is not None:
                self.offload.alarms = self.alarms  # a helper's engine that raises: its alarm
                built = self.offload.wrap(built, m.name, (p.encryption, p.key.reveal(),
                                                          p.integrity, p.integrity_key.reveal()),
                                          sa)
            return built, m.name

    def _set_suite(self, sa: SecurityAssociation, suite: Suite) -> None:
        """An SA's new suite; the old one's keys leave the offload helpers."""
        if self.offload is not None:
            self.offload.forget(sa.suite)
        sa.suite = suite

    def _witness(self, sa: SecurityAssociation, engine: str) -> Suite | None:
        """``crypto.self_check``: the same SA's suite on the next engine the policy would
        pick, which checks every Nth packet; None when off or there is no other engine."""
        if not self.settings.self_check:
            return None
        p = sa.params
        try:
            m = self.choose(suite_name(p.encryption, p.integrity), avoid=engine)
            return m.engine.build(p.encryption, p.key.reveal(), p.integrity,
                                  p.integrity_key.reveal())
        except Exception:
            return None

    def bind(self, sas: Iterable[SecurityAssociation]) -> None:
        """Give each SA its engine's suite. Raises NoEngine (nothing bound) if any can't."""
        plans = []
        try:
            for sa in sas:
                plans.append((sa, *self.build(sa)))
                self.bound[id(sa)] = (sa, plans[-1][2])  # counted by balance's next choice
        except NoEngine:
            for sa, suite, _name in plans:
                self.bound.pop(id(sa), None)
                if self.offload is not None:
                    self.offload.forget(suite)
            raise
        for sa, suite, _name in plans:
            self._set_suite(sa, suite)

    def release(self, sas: Iterable[SecurityAssociation]) -> None:
        for sa in sas:
            if self.bound.pop(id(sa), None) is not None and self.offload is not None:
                self.offload.forget(sa.suite)

    def engine_of(self, sa: SecurityAssociation) -> str | None:
        got = self.bound.get(id(sa))
        return got[1] if got is not None else None

    def move_off(self, name: str) -> list[tuple[str, str]]:
        """Move every SA bound to ``name`` to the policy's next choice. An SA with nowhere to
        go keeps a suite that drops every packet (fail closed) until an engine comes back.
        Returns (SA name, new engine or "none")."""
        moved = []
        for key, (sa, engine) in list(self.bound.items()):
            if engine != name:
                continue
            self.members[name].moved_away += 1
            try:
                suite, new = self.build(sa, avoid=name)
            except NoEngine as err:
                self._set_suite(sa, cast(Suite, _Refusing(sa.suite, str(err))))
                self.bound[key] = (sa, "none")
                moved.append((sa.name, "none"))
                log.error("SA %s: %s; its packets are dropped", sa.name, err)
                continue
            self._set_suite(sa, suite)
            self.bound[key] = (sa, new)
            moved.append((sa.name, new))
        return moved

    def rebind_all(self) -> list[tuple[str, str]]:
        """Every SA to the policy's choice now (after an engine comes back)."""
        moved = []
        for key, (sa, engine) in list(self.bound.items()):
            try:
                suite, new = self.build(sa)
            except NoEngine:
                continue
            if new == engine:
                if self.offload is not None:
                    self.offload.forget(suite)
                continue
            self._set_suite(sa, suite)
            self.bound[key] = (sa, new)
            moved.append((sa.name, new))
        return moved

    def rebalance(self) -> list[tuple[str, str]]:
        """``balance``: at most one SA moved from the engine its SAs kept busiest since the
        last call to the one that evens the load best, if that lowers the busiest engine's
        load by at least ``REBALANCE_GAIN``. An engine's load: the bytes its SAs carried over
        its measured speed for their suites (seconds of cipher work). One move a call, so a
        load that swings does not send SAs back and forth; the output is the same on either
        engine (they agree byte for byte), so a move loses nothing."""
        if self.settings.policy != "balance":
            return []
        carried: dict[int, int] = {}
        for key, (sa, _engine) in self.bound.items():
            carried[key] = max(sa.bytes - self._bytes_seen.get(key, 0), 0)
            self._bytes_seen[key] = sa.bytes
        for key in list(self._bytes_seen):
            if key not in self.bound:
                del self._bytes_seen[key]

        def cost(key: int, engine: str) -> float:
            sa = self.bound[key][0]
            speed = self.members[engine].speed.get(suite_name(sa.params.encryption,
                                                              sa.params.integrity), 0.0)
            return carried[key] / max(speed, 1.0)

        load: dict[str, float] = {n: 0.0 for n, m in self.members.items() if m.verified}
        for key, (_sa, engine) in self.bound.items():
            if engine in load:
                load[engine] += cost(key, engine)
        if not load:
            return []
        busiest = max(load, key=lambda n: load[n])
        best: tuple[float, int, str] | None = None
        for key, (sa, engine) in self.bound.items():
            if engine != busiest or not carried[key]:
                continue
            suite = suite_name(sa.params.encryption, sa.params.integrity)
            for name, m in self.members.items():
                if (name == busiest or not m.usable(suite) or name not in load
                        or (not self.threads and m.engine.opens_at_build)):
                    continue  # (a sandboxed worker, threads off, may open no socket)
                after = max(load[busiest] - cost(key, busiest), load[name] + cost(key, name))
                if after <= load[busiest] * (1 - REBALANCE_GAIN) and (best is None or after < best[0]):
                    best = (after, key, name)
        if best is None:
            return []
        _after, key, name = best
        sa = self.bound[key][0]
        try:
            built, new = self.build(sa, on=self.members[name])
        except NoEngine:
            return []
        self._set_suite(sa, built)
        self.bound[key] = (sa, new)
        log.info("SA %s moved from engine %s to %s: balance by load", sa.name, busiest, new)
        return [(sa.name, new)]

    # -- fail-over and hot-swap ---------------------------------------------------------------
    def exclude(self, name: str, why: str, move: bool = True) -> list[tuple[str, str]]:
        m = self.members[name]
        if m.excluded is None:
            log.error("engine %s excluded: %s", name, why)
        m.excluded = why
        return self.move_off(name) if move else []

    def on_alarms(self) -> list[tuple[str, str]]:
        """The worker, after a batch in which a suite raised: exclude those engines."""
        names = list(self.alarms)
        self.alarms.clear()
        moved = []
        for name in sorted(set(names)):
            self.members[name].faults += names.count(name)
            moved += self.exclude(name, "raised or gave wrong output on the packet path")
        return moved

    def disable(self, name: str) -> list[tuple[str, str]]:
        if name not in self.members:
            raise KeyError(name)
        self.members[name].disabled = True
        return self.move_off(name)

    def enable(self, name: str) -> list[tuple[str, str]]:
        if name not in self.members:
            raise KeyError(name)
        m = self.members[name]
        m.disabled = False
        m.hung[:] = [t for t in m.hung if t.is_alive()]
        if m.excluded is not None and m.absent is None and not m.hung:
            # its tests first, under the same deadline: back only if it passes them all
            ok, res = _timed(lambda: _kat_all(m), self.settings.verify_timeout, m.hung,
                             threads=self.threads)
            if ok and res[0] == "ok":
                m.verified, m.failed = res[1]
                if not m.failed:
                    log.warning("engine %s enabled and verified: back in the team", name)
                    m.excluded = None
        return self.rebind_all()

    def report(self) -> list[EngineReport]:
        out: list[EngineReport] = []
        for m in self.members.values():
            out.append({
                "name": m.name,
                "state": ("absent" if m.absent is not None else "disabled" if m.disabled
                          else "excluded" if m.excluded is not None else "ready"),
                "reason": m.absent or m.excluded or "",
                "detail": m.detail,
                "claims": sorted(m.claims),
                "verified": sorted(m.verified),
                "failed": dict(sorted(m.failed.items())),
                "speed": {s: float(round(v)) for s, v in sorted(m.speed.items())},
                "sas": self.load(m.name),
                "faults": m.faults,
                "moved_away": m.moved_away,
            })
        return out

    def discovered(self) -> tuple[Discovered, ...]:
        return tuple(Discovered(m.name, tuple(sorted(m.claims)), tuple(sorted(m.verified)),
                                tuple(sorted(m.speed.items())), m.absent,
                                tuple(sorted(m.failed.items())), m.detail)
                     for m in self.members.values())


def _kat_all(m: Member) -> tuple[set[str], dict[str, str]]:
    passed: set[str] = set()
    failed: dict[str, str] = {}
    for s in sorted(m.claims):
        try:
            kat.run(m.engine.build, s)
        except kat.KatFailure as err:
            failed[s] = str(err)
        except Exception as err:
            failed[s] = f"{s}: raised {type(err).__name__}"
        else:
            passed.add(s)
    return passed, failed


class _Refusing:
    """The suite of an SA no engine can carry now: every packet is dropped (engine_failed)."""

    def __init__(self, old: Suite, why: str) -> None:
        self.name, self.iv_size, self.icv_size, self.align = old.name, old.iv_size, old.icv_size, old.align
        self.why = why

    def seal(self, esp_header: bytes, seq_hi: bytes, seq: int, plaintext: bytes) -> bytes:
        raise EspError(DropReason.ENGINE_FAILED, "no engine")

    def open(self, esp_header: object, seq_hi: bytes, body: object) -> bytes:
        raise EspError(DropReason.ENGINE_FAILED, "no engine")

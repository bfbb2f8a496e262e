"""Rates between two status answers: what ``nfq-ipsec top`` shows.

The status answer holds counters since the daemon started (packets and drops across worker
restarts) and ``taken_at_epoch``, the time it was taken; a rate is the difference of two answers
over the time between them. A counter that went down (the daemon restarted between the two, or
a worker's CPU time, which starts from zero with each worker process) or that one of the two
answers lacks gives no rate (``None``), never a negative or made-up one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .status import SaReport, StatusReport, WorkerReport


def _rate(before: float | None, after: float | None, seconds: float) -> float | None:
    if before is None or after is None or seconds <= 0 or after < before:
        return None
    return (after - before) / seconds


def _drops(counts: Mapping[str, int] | None) -> int | None:
    return None if counts is None else sum(counts.values())


@dataclass(frozen=True)
class QueueRates:
    queue: int
    packets_in: float | None  # per second
    packets_out: float | None
    drops: float | None
    drops_by_reason: dict[str, float] = field(default_factory=dict)  # only reasons that grew
    cpu: float | None = None  # share of one CPU, 0..1 (and more for a process with threads)


@dataclass(frozen=True)
class SaRates:
    name: str
    queue: int
    direction: str
    packets: float | None  # per second
    bits: float | None  # inner bits per second (the SA's byte counter, times 8)
    drops: float | None


@dataclass(frozen=True)
class Rates:
    seconds: float  # between the two answers
    queues: dict[int, QueueRates]
    sas: dict[tuple[str, int], SaRates]  # by (name, queue): a name is unique per queue


def _sa_drops(sa: SaReport) -> int | None:
    parts = (sa.get("replay_drops"), sa.get("integrity_drops"), sa.get("other_drops"))
    return None if any(p is None for p in parts) else sum(p for p in parts if p is not None)


def _queue(before: WorkerReport | None, after: WorkerReport, seconds: float) -> QueueRates:
    b: WorkerReport | dict[str, None] = before if before is not None else {}
    by_reason: dict[str, float] = {}
    old, new = b.get("drops"), after.get("drops")
    if old is not None and new is not None:
        for reason, n in new.items():
            r = _rate(old.get(reason, 0), n, seconds)
            if r:
                by_reason[reason] = r
    same_process = before is not None and before.get("pid") == after.get("pid")
    return QueueRates(
        queue=after["queue"],
        packets_in=_rate(b.get("packets_in"), after.get("packets_in"), seconds),
        packets_out=_rate(b.get("packets_out"), after.get("packets_out"), seconds),
        drops=_rate(_drops(old), _drops(new), seconds),
        drops_by_reason=by_reason,
        cpu=_rate(b.get("cpu_seconds"), after.get("cpu_seconds"), seconds) if same_process else None,
    )


def between(before: StatusReport, after: StatusReport) -> Rates:
    """The rates from ``before`` to ``after`` (two answers of one daemon, in that order)."""
    seconds = after.get("taken_at_epoch", 0.0) - before.get("taken_at_epoch", 0.0)
    if before.get("daemon", {}).get("pid") != after.get("daemon", {}).get("pid"):
        seconds = 0.0  # another daemon process: nothing of the first carries over
    old_workers = {w["queue"]: w for w in before.get("workers", [])}
    queues = {w["queue"]: _queue(old_workers.get(w["queue"]), w, seconds)
              for w in after.get("workers", [])}
    old_sas = {(s["name"], s["queue"]): s for s in before.get("sas", [])}
    sas: dict[tuple[str, int], SaRates] = {}
    for s in after.get("sas", []):
        key = (s["name"], s["queue"])
        o = old_sas.get(key)
        bits = _rate(o.get("bytes") if o else None, s.get("bytes"), seconds)
        sas[key] = SaRates(
            name=s["name"], queue=s["queue"], direction=s["direction"],
            packets=_rate(o.get("packets") if o else None, s.get("packets"), seconds),
            bits=None if bits is None else bits * 8,
            drops=_rate(_sa_drops(o) if o else None, _sa_drops(s), seconds),
        )
    return Rates(seconds=max(seconds, 0.0), queues=queues, sas=sas)

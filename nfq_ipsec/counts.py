"""Counter totals of a queue across the worker processes that served it.

A worker counts packets and drops (in all and per SA) from its own start. When it dies and the
supervisor starts another, those counts would start again from zero; the supervisor instead
keeps the last counts each worker reported (with every watchdog ping, and with every status
answer) and adds them to its successor's. What a worker counted after its last report and
before it died is lost, and only that.

The packets the kernel dropped before the worker saw them (its queue full, or the worker's
socket buffer: ``queue_overflow``) are counted by the kernel per bound queue, from zero again
for each worker. A status snapshot has them in its drops; a worker's answer to a ping carries
only its own counters, and the supervisor adds the kernel's to them when the answer comes
(:func:`with_kernel_losses`), so the ones a dead worker had are carried over as well.

Counts are plain JSON-able dicts (they cross the worker's pipe): :class:`nfq_ipsec.status.Counts`.
"""

from __future__ import annotations

from .core.errors import DropReason
from .status import Counts, DropCounts, SaCounts, WorkerSnapshot

QUEUE_OVERFLOW = DropReason.QUEUE_OVERFLOW.value


def empty() -> Counts:
    return {"packets_in": 0, "packets_out": 0, "drops": {}, "sas": {}}


def of_snapshot(snap: WorkerSnapshot) -> Counts:
    """The counts in a worker's status snapshot (``PacketHandler.snapshot``)."""
    return {
        "packets_in": snap["packets_in"],
        "packets_out": snap["packets_out"],
        "drops": dict(snap["drops"]),
        "sas": {sa["name"]: {"packets": sa["packets"], "bytes": sa["bytes"], "drops": dict(sa["drops"])}
                for sa in snap["sas"]},
    }


def with_kernel_losses(c: Counts, lost: int) -> Counts:
    """``c`` with ``lost`` packets more dropped as ``queue_overflow`` (``c`` left as it was)."""
    if not lost:
        return c
    drops = dict(c["drops"])
    drops[QUEUE_OVERFLOW] = drops.get(QUEUE_OVERFLOW, 0) + lost
    return {"packets_in": c["packets_in"], "packets_out": c["packets_out"], "drops": drops,
            "sas": c["sas"]}


def _add_drops(a: DropCounts, b: DropCounts) -> DropCounts:
    out = dict(a)
    for reason, n in b.items():
        out[reason] = out.get(reason, 0) + n
    return out


def _copy(v: SaCounts) -> SaCounts:
    return {"packets": v["packets"], "bytes": v["bytes"], "drops": dict(v["drops"])}


def add(a: Counts, b: Counts) -> Counts:
    """``a`` and ``b`` summed, field by field (SAs by name, drops by reason)."""
    sas = {name: _copy(v) for name, v in a["sas"].items()}
    for name, v in b["sas"].items():
        have = sas.get(name)
        if have is None:
            sas[name] = _copy(v)
        else:
            sas[name] = {"packets": have["packets"] + v["packets"], "bytes": have["bytes"] + v["bytes"],
                         "drops": _add_drops(have["drops"], v["drops"])}
    return {
        "packets_in": a["packets_in"] + b["packets_in"],
        "packets_out": a["packets_out"] + b["packets_out"],
        "drops": _add_drops(a["drops"], b["drops"]),
        "sas": sas,
    }

"""Counter totals of a queue across the worker processes that served it.

A worker counts packets and drops (in all and per SA) from its own start. When it dies and the
supervisor starts another, those counts would start again from zero; the supervisor instead
keeps the last counts each worker reported (with every watchdog ping, and with every status
answer) and adds them to its successor's. What a worker counted after its last report and
before it died is lost, and only that.

Counts are plain JSON-able dicts (they cross the worker's pipe): :class:`nfq_ipsec.status.Counts`.
"""

from __future__ import annotations

from .status import Counts, DropCounts, SaCounts, WorkerSnapshot


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

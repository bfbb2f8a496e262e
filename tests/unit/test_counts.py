"""Counter totals across worker restarts (``nfq_ipsec.counts``): pure merging rules, and what
the supervisor keeps of a worker's answer to a ping. The daemon-level behaviour is tested in
test_resilience_root.py."""

from __future__ import annotations

import pytest
from repo import EXAMPLES

from nfq_ipsec import counts, nfqueue, supervisor
from nfq_ipsec.config import load_config
from nfq_ipsec.status import WorkerSnapshot

SaRow = tuple[str, int, int, dict[str, int]]


def snap(pin: int, pout: int, drops: dict[str, int], sas: list[SaRow]) -> WorkerSnapshot:
    return {"packets_in": pin, "packets_out": pout, "drops": drops, "queue": 100, "cpu": None,
            "pid": 1, "started": 0.0, "overflow_reports": 0, "core": "source", "kernel": None,
            "ike_markers": 0, "crossed_family": 0,
            "superpackets": 0, "segments": 0, "busy_poll_hits": 0, "busy_poll_misses": 0,
            "engines": [],
            "versions": {"compare": "off", "fallback": False, "packets": 0, "compared": 0,
                         "versions": [], "pairs": [], "sa_mismatches": {}},
            "offload": None,
            "sas": [{"name": n, "packets": p, "bytes": b, "drops": d, "spi": 1, "seq": 5,
                     "direction": "out", "path_mtu": None, "saved": None, "state_writes": None,
                     "udp": None, "engine": "openssl",
                     "lifetime_left": {"packets": None, "bytes": None, "seconds": None}}
                    for n, p, b, d in sas]}


def test_of_snapshot_keeps_only_counts() -> None:
    c = counts.of_snapshot(snap(5, 4, {"replay": 1}, [("ab0", 4, 400, {})]))
    assert c == {"packets_in": 5, "packets_out": 4, "drops": {"replay": 1},
                 "sas": {"ab0": {"packets": 4, "bytes": 400, "drops": {}}}}


def test_add_sums_fields_reasons_and_sas_by_name() -> None:
    a = counts.of_snapshot(snap(5, 4, {"replay": 1}, [("ab0", 4, 400, {"integrity": 2})]))
    b = counts.of_snapshot(snap(3, 3, {"replay": 2, "internal": 1},
                                [("ab0", 3, 300, {"integrity": 1, "replay": 1}), ("ba0", 1, 10, {})]))
    total = counts.add(a, b)
    assert total == {
        "packets_in": 8, "packets_out": 7, "drops": {"replay": 3, "internal": 1},
        "sas": {"ab0": {"packets": 7, "bytes": 700, "drops": {"integrity": 3, "replay": 1}},
                "ba0": {"packets": 1, "bytes": 10, "drops": {}}},
    }
    assert counts.add(counts.empty(), a) == a and counts.add(a, counts.empty()) == a
    # the inputs are left as they were (the supervisor keeps adding to its carried total)
    assert a["drops"] == {"replay": 1} and a["sas"]["ab0"]["drops"] == {"integrity": 2}
    total["sas"]["ba0"]["drops"]["x"] = 1
    assert b["sas"]["ba0"]["drops"] == {}


def test_with_kernel_losses_adds_queue_overflow_and_leaves_the_input() -> None:
    c = counts.of_snapshot(snap(5, 4, {"replay": 1}, [("ab0", 4, 400, {})]))
    assert counts.with_kernel_losses(c, 0) == c
    more = counts.with_kernel_losses(counts.with_kernel_losses(c, 2), 3)
    assert more == dict(c, drops={"replay": 1, "queue_overflow": 5})
    assert c["drops"] == {"replay": 1}


def test_a_pong_carries_the_kernels_drops_read_by_the_supervisor(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's answer to a ping has its own counters only; the supervisor adds what the
    kernel dropped on the queue before the worker saw it, and keeps the last value it read once
    the queue's line is gone (the worker dead: the kernel forgets its counters with it)."""
    sup = supervisor.Supervisor(load_config(EXAMPLES / "host-a.toml"), "host-a.toml")
    slot = sup.slots[0]
    lines: dict[int, nfqueue.KernelQueueStats] = {}
    monkeypatch.setattr(supervisor, "kernel_queue_stats", lambda: dict(lines))
    own = counts.of_snapshot(snap(5, 4, {"replay": 1}, [("ab0", 4, 400, {})]))
    sup._on_message(slot, ("pong", own))
    assert slot.last_counts == own
    lines[slot.queue] = nfqueue.KernelQueueStats(slot.queue, 1, 0, 2, 0xFFFF, 6, 1, 9)
    sup._on_message(slot, ("pong", own))
    assert slot.last_counts == dict(own, drops={"replay": 1, "queue_overflow": 7})
    del lines[slot.queue]
    sup._on_message(slot, ("pong", own))
    assert slot.last_counts == dict(own, drops={"replay": 1, "queue_overflow": 7})
    assert own["drops"] == {"replay": 1}

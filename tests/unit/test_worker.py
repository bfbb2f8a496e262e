"""The worker's packet handling and reload, without root: a fake queue stands in for the kernel.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import struct
from typing import Any

import pytest
from configs import cfg_of, host_data, udp_data
from faults.nfq_ipsec_faults import wrap
from packets import ipv4, udp
from repo import EXAMPLES

from nfq_ipsec import corebuild, counts, nfqueue, worker
from nfq_ipsec.config import load_config
from nfq_ipsec.core import DropReason, Processor, Result, Secret, Verdict, pmtu
from nfq_ipsec.core.processor import ARRIVING, FORWARDED, LEAVING
from nfq_ipsec.nfqueue import HOOK_LOCAL_OUT, HOOK_PRE_ROUTING, QueuedPacket
from nfq_ipsec.worker import PacketHandler, WorkerSpec

A, B = "192.168.56.10", "192.168.56.11"
MARK = 0x10000000


# -- helpers ---------------------------------------------------------------------------------
def tcp_syn(src: str, dst: str, sport: int, dport: int) -> bytes:
    return ipv4(src, dst, 6, struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x02, 65535, 0, 0))


class FakeQueue:
    """Records verdicts like the kernel would receive them."""

    def __init__(self) -> None:
        self.verdicts: list[tuple[int, bool, int | None, bytes | None]] = []
        self.flushes = 0
        self.overflows = 0

    def bind(self, queue_num: int) -> None:
        pass

    def fileno(self) -> int:
        return -1

    def receive(self, limit: int) -> list[QueuedPacket]:
        return []

    def verdict(
        self, packet_id: int, accept: bool, mark: int | None = None, payload: bytes | None = None
    ) -> None:
        self.verdicts.append((packet_id, accept, mark, payload))

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        pass


def processor(host: str, queue: int = 100) -> Processor:
    cfg = load_config(EXAMPLES / f"host-{host}.toml", online_cpus=[0, 1])
    return Processor(cfg.spd, cfg.sas_for_queue(queue), 0.0)


IFACES = {1: "lo", 2: "wan0", 3: "lan0"}  # ifindex -> name, for the worker's direction


def ifname(index: int) -> str:
    """socket.if_indextoname over IFACES (OSError for an index that is gone)."""
    if index not in IFACES:
        raise OSError(6, "No such device or address")
    return IFACES[index]


def handler(proc: Any, fault: str | None = None, gateway_interface: str | None = None,
            reply: Any = None) -> tuple[PacketHandler, FakeQueue]:
    """A handler on a fake queue; ``fault``: wrapped as the test suite's fault injection
    wraps a real daemon's workers (tests/faults)."""
    q = FakeQueue()
    h = PacketHandler(proc, q, MARK, clock=lambda: 1.0, gateway_interface=gateway_interface,
                      reply=reply, ifname=ifname)
    return (wrap(h, fault) if fault else h), q


def pkt(data: bytes, hook: int = HOOK_LOCAL_OUT, pid: int = 1, mark: int = 0,
        length: int | None = None, indev: int = 0) -> QueuedPacket:
    return QueuedPacket(pid, hook, data, len(data) if length is None else length, mark, indev)


# -- packet handling -------------------------------------------------------------------------
def test_outbound_protected_is_rewritten_marked_and_accepted() -> None:
    proc = processor("a")
    h, q = handler(proc)
    plain = udp(A, B, 4000, 5000, b"hello")
    h.handle_batch([pkt(plain, mark=0x5)])
    [(pid, accept, mark, payload)] = q.verdicts
    assert (pid, accept, mark) == (1, True, MARK | 0x5)  # existing mark bits are kept
    assert payload is not None and payload[9] == 50 and plain[20:] not in payload
    assert q.flushes == 1
    assert (h.packets_in, h.packets_out) == (1, 1)


def test_bypass_is_accepted_unchanged_with_mark() -> None:
    h, q = handler(processor("a"))
    h.handle_batch([pkt(tcp_syn(A, B, 22, 40000))])  # the ssh-in-clear bypass policy
    assert q.verdicts == [(1, True, MARK, None)]


def test_no_policy_is_dropped_and_counted() -> None:
    proc = processor("a")
    h, q = handler(proc)
    h.handle_batch([pkt(udp("10.0.0.1", "10.0.0.2", 1, 2, b"x"))])
    assert q.verdicts == [(1, False, None, None)]
    assert proc.drops[DropReason.NO_POLICY] == 1
    assert (h.packets_in, h.packets_out) == (1, 0)


def test_inbound_esp_at_prerouting_is_decrypted() -> None:
    sender_h, sender_q = handler(processor("b"))
    plain = udp(B, A, 5000, 4000, b"to host a")
    sender_h.handle_batch([pkt(plain)])
    esp = sender_q.verdicts[0][3]
    assert esp is not None
    proc = processor("a")
    h, q = handler(proc)
    h.handle_batch([pkt(esp, hook=HOOK_PRE_ROUTING, pid=7)])
    assert q.verdicts == [(7, True, MARK, plain)]
    # the same packet again is a replay: dropped and counted on the SA
    h.handle_batch([pkt(esp, hook=HOOK_PRE_ROUTING, pid=8)])
    assert q.verdicts[1] == (8, False, None, None)
    assert proc.drops[DropReason.REPLAY] == 1


class Spy:
    """A processor double that records which direction it was asked for."""

    def __init__(self, raise_on: int | None = None) -> None:
        self.calls: list[str] = []
        self.drops: dict[DropReason, int] = {}
        self.raise_on = raise_on

    def _call(self, name: str) -> Result:
        self.calls.append(name)
        if self.raise_on is not None and len(self.calls) == self.raise_on:
            raise KeyError("boom")
        return Result(Verdict.ACCEPT)

    def process(self, data: bytes, length: int, where: int, now: float) -> Result:
        return self._call({ARRIVING: "in", LEAVING: "out", FORWARDED: "fwd"}[where])

    def outbound(self, data: bytes, now: float, forwarded: bool = False) -> Result:
        return self._call("fwd" if forwarded else "out")

    def inbound(self, data: bytes, now: float) -> Result:
        return self._call("in")

    def count_drop(self, reason: DropReason) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1


@pytest.mark.parametrize(("hook", "proto", "indev", "gateway", "direction"), [
    (HOOK_LOCAL_OUT, 17, 0, None, "out"),  # local outbound
    (HOOK_LOCAL_OUT, 50, 0, None, "out"),  # ESP made locally is still outbound traffic at OUTPUT
    (HOOK_PRE_ROUTING, 50, 2, None, "in"),  # a host: everything in PREROUTING arrives
    (HOOK_PRE_ROUTING, 1, 2, None, "in"),  # (a path MTU report about our ESP, for example)
    (HOOK_PRE_ROUTING, 50, 2, "wan0", "in"),  # a gateway: ESP on the unprotected side
    (HOOK_PRE_ROUTING, 1, 2, "wan0", "in"),
    (HOOK_PRE_ROUTING, 17, 3, "wan0", "fwd"),  # from the LAN: forwarded outbound
    (HOOK_PRE_ROUTING, 6, 3, "wan0", "fwd"),
    (HOOK_PRE_ROUTING, 50, 3, "wan0", "fwd"),  # ESP from a LAN host: outbound too
    (HOOK_PRE_ROUTING, 50, 99, "wan0", "in"),  # an interface gone meanwhile: as from outside
])
def test_hook_and_interface_decide_direction(
    hook: int, proto: int, indev: int, gateway: str | None, direction: str,
) -> None:
    spy = Spy()
    h, q = handler(spy, gateway_interface=gateway)
    h.handle_batch([pkt(ipv4(A, B, proto, b"\0" * 16), hook=hook, indev=indev)])
    assert spy.calls == [direction]
    assert q.verdicts == [(1, True, MARK, None)]


def test_exception_drops_with_internal_and_batch_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    spy = Spy(raise_on=2)
    h, q = handler(spy)
    data = udp(A, B, 1, 2, b"x")
    h.handle_batch([pkt(data, pid=1), pkt(data, pid=2), pkt(data, pid=3)])
    assert q.verdicts == [(1, True, MARK, None), (2, False, None, None), (3, True, MARK, None)]
    assert spy.drops == {DropReason.INTERNAL: 1}
    assert h.internal_errors == 1
    assert "internal error" in caplog.text


def test_fault_injection_drops_everything_as_internal() -> None:
    proc = processor("a")
    h, q = handler(proc, fault="raise-every-packet")
    h.handle_batch([pkt(tcp_syn(A, B, 22, 40000), pid=i) for i in range(5)])
    assert [v[1] for v in q.verdicts] == [False] * 5
    assert proc.drops[DropReason.INTERNAL] == 5


def test_internal_error_logging_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    h, _q = handler(processor("a"), fault="raise-every-packet")
    h.handle_batch([pkt(b"\x45" * 40, pid=i) for i in range(50)])
    assert caplog.text.count("internal error") == 1


def test_payload_shorter_than_ip_total_length_is_truncated() -> None:
    proc = processor("a")
    h, q = handler(proc)
    full = tcp_syn(A, B, 22, 40000)
    h.handle_batch([pkt(full[:-4], pid=1), pkt(full, pid=2, length=len(full) + 100)])
    assert q.verdicts == [(1, False, None, None), (2, False, None, None)]
    assert proc.drops[DropReason.TRUNCATED] == 2


def test_output_too_big_for_a_verdict_is_dropped() -> None:
    """The core is told the most a verdict can carry (an nlattr holds 65,531 bytes): an ESP
    packet between that and the IPv4 maximum is dropped as too big, one byte less passes."""
    cfg = load_config(EXAMPLES / "host-a.toml", online_cpus=[0, 1])
    proc = Processor(cfg.spd, cfg.sas_for_queue(100), 0.0, max_packet=nfqueue.MAX_VERDICT_PAYLOAD)
    sa = next(sa for sa in proc.sad.all() if sa.outbound)
    sizes = {pmtu.esp_size(sa, n, 20): n for n in range(65400, 65500)}
    fits = sizes[max(k for k in sizes if k <= nfqueue.MAX_VERDICT_PAYLOAD)]
    over = sizes[min(k for k in sizes if nfqueue.MAX_VERDICT_PAYLOAD < k <= 65535)]
    h, q = handler(proc)
    h.handle_batch([pkt(udp(A, B, 4000, 5000, b"x" * (fits - 28)), pid=1),
                    pkt(udp(A, B, 4000, 5000, b"x" * (over - 28)), pid=2)])
    assert [(v[0], v[1]) for v in q.verdicts] == [(1, True), (2, False)]
    assert len(q.verdicts[0][3] or b"") <= nfqueue.MAX_VERDICT_PAYLOAD
    assert proc.drops == {DropReason.TOO_BIG: 1}


def test_snapshot_has_counters_and_no_keys() -> None:
    cfg = load_config(EXAMPLES / "host-a.toml", online_cpus=[0, 1])
    proc = Processor(cfg.spd, cfg.sas_for_queue(100), 0.0)
    h, _q = handler(proc)
    h.handle_batch([pkt(udp(A, B, 1, 2, b"x" * 10), pid=i) for i in range(3)])
    h.handle_batch([pkt(udp("10.0.0.1", "10.0.0.2", 1, 2, b"x"), pid=9)])
    snap = h.snapshot(100, 0, 123.0)
    assert (snap["queue"], snap["cpu"], snap["pid"], snap["started"]) == (100, 0, os.getpid(), 123.0)
    assert (snap["packets_in"], snap["packets_out"]) == (4, 3)
    assert snap["core"] == corebuild.running().detail  # which build of the core this worker runs
    assert snap["drops"] == {"no_policy": 1}
    by_name = {s["name"]: s for s in snap["sas"]}
    assert set(by_name) == {"a-to-b-0", "b-to-a-0"}  # this queue's SAs only
    out = by_name["a-to-b-0"]
    assert (out["spi"], out["direction"], out["packets"], out["seq"]) == (0x1000, "out", 3, 3)
    assert by_name["b-to-a-0"]["seq"] == 0
    text = json.dumps(snap)
    for sa in cfg.sas:
        assert sa.key.reveal().hex() not in text


def _counted_handler() -> PacketHandler:
    """A handler on queue 100 of host A that has sent 3 packets and dropped one (no policy)."""
    cfg = load_config(EXAMPLES / "host-a.toml", online_cpus=[0, 1])
    h, _q = handler(Processor(cfg.spd, cfg.sas_for_queue(100), 0.0))
    h.handle_batch([pkt(udp(A, B, 1, 2, b"x" * 10), pid=i) for i in range(3)])
    h.handle_batch([pkt(udp("10.0.0.1", "10.0.0.2", 1, 2, b"x"), pid=9)])
    return h


def _stats(qdropped: int, udropped: int) -> dict[int, nfqueue.KernelQueueStats]:
    return {100: nfqueue.KernelQueueStats(100, 1, 0, 2, 0xFFFF, qdropped, udropped, 7)}


def test_counts_are_the_snapshots_counts_without_proc_or_state(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A ping's answer (``counts``) holds what the snapshot's counts hold, read from the
    handler's and the SAs' counters only: no /proc, no state store. The kernel's drops before
    the worker (in the snapshot as queue_overflow) are the supervisor's to add."""
    h = _counted_handler()
    monkeypatch.setattr(worker, "kernel_queue_stats", lambda: _stats(2, 1))
    snap = h.snapshot(100, 0, 123.0)
    assert snap["drops"] == {"no_policy": 1, "queue_overflow": 3}

    def untouchable(*args: object) -> Any:
        raise AssertionError("read for a ping's answer")

    monkeypatch.setattr(worker, "kernel_queue_stats", untouchable)
    h.store = untouchable  # type: ignore[assignment]  # any use of it raises
    c = h.counts()
    assert c == {"packets_in": 4, "packets_out": 3, "drops": {"no_policy": 1},
                 "sas": {"a-to-b-0": {"packets": 3, "bytes": 3 * 38, "drops": {}},
                         "b-to-a-0": {"packets": 0, "bytes": 0, "drops": {}}}}
    assert counts.with_kernel_losses(c, 3) == counts.of_snapshot(snap)
    h.store = None
    monkeypatch.setattr(worker, "kernel_queue_stats", dict)  # no line for the queue
    assert counts.of_snapshot(h.snapshot(100, 0, 123.0)) == c


class PollableQueue(FakeQueue):
    """A fake queue the worker's loop can poll: one end of a socket pair that stays silent."""

    def __init__(self) -> None:
        super().__init__()
        self.ends = socket.socketpair()

    def fileno(self) -> int:
        return self.ends[0].fileno()

    def close(self) -> None:
        for end in self.ends:
            end.close()


def test_busy_poll_window_adapts(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a batch the worker polls for the window, yielding on every empty look; a poll that
    runs out empty halves the window (down to a sixteenth), one that catches a packet restores
    it; with no traffic, and with polling off, it never polls."""
    yields: list[int] = []
    monkeypatch.setattr(os, "sched_yield", lambda: yields.append(1))
    off = worker.BusyPoll(0.0)
    off.handled(1.0)
    assert not off.active
    bp = worker.BusyPoll(0.001)
    assert not bp.active  # never polls before traffic: zero idle cost
    bp.handled(10.0)
    assert bp.active and bp.until == pytest.approx(10.001)
    bp.idle(10.0005)
    assert bp.active and yields == [1]
    bp.idle(10.001)  # the window is over, nothing came: back to sleeping, a shorter window
    assert not bp.active and (bp.misses, bp.hits) == (1, 0) and bp.window == pytest.approx(0.0005)
    for i in range(10):  # sparse traffic: every poll runs out
        bp.handled(20.0 + i)
        bp.idle(21.0 + i - 0.5)
    assert bp.window == pytest.approx(0.001 / 16) and bp.misses == 11 and len(yields) == 1
    bp.handled(40.0)
    bp.handled(40.00001)  # a packet within the window: a hit, the full window again
    assert bp.hits == 1 and bp.window == pytest.approx(0.001)
    assert bp.until == pytest.approx(40.00101)


def test_a_ping_is_answered_with_counts_without_a_snapshot(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's loop answers ``("ping",)`` with ``counts()`` and ``("stats",)`` with the
    snapshot: a watchdog ping never reads /proc or walks the state store."""
    from multiprocessing import Pipe

    h = _counted_handler()
    snapshots: list[int] = []
    real = PacketHandler.snapshot

    def counted_snapshot(self: PacketHandler, *args: Any) -> Any:
        snapshots.append(1)
        return real(self, *args)

    monkeypatch.setattr(PacketHandler, "snapshot", counted_snapshot)
    monkeypatch.setattr(worker, "kernel_queue_stats", dict)
    sup_end, worker_end = Pipe(duplex=True)
    q = PollableQueue()
    wake_r, wake_w = socket.socketpair()
    try:
        for msg in (("ping",), ("ping",), ("stats",), ("stop",)):
            sup_end.send(msg)
        assert worker._serve(_spec(load_config(EXAMPLES / "host-a.toml", online_cpus=[0, 1])),
                             worker_end, q, h, wake_r, 123.0) == 0
        answers = [sup_end.recv() for _ in range(3)]
    finally:
        q.close()
        for end in (wake_r, wake_w):
            end.close()
    assert answers[0] == answers[1] == ("pong", h.counts())
    assert answers[2][0] == "stats" and answers[2][1]["sas"] and len(snapshots) == 1


def test_sa_events_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    import dataclasses
    import logging

    from nfq_ipsec.core import Lifetime

    cfg = load_config(EXAMPLES / "host-a.toml", online_cpus=[0, 1])
    sas = [dataclasses.replace(sa, lifetime=Lifetime(soft_packets=2, hard_packets=4))
           for sa in cfg.sas_for_queue(100)]
    proc = Processor(cfg.spd, sas, 0.0)
    h, q = handler(proc)
    caplog.set_level(logging.INFO, logger="nfq_ipsec")
    for i in range(6):
        h.handle_batch([pkt(udp(A, B, 1, 2, b"x"), pid=i)])
        h.report_events()
    assert [v[1] for v in q.verdicts] == [True] * 4 + [False] * 2  # hard limit: dropped
    assert proc.drops[DropReason.SA_EXPIRED] == 2
    assert caplog.text.count("SA a-to-b-0 (spi 0x00001000): soft expired") == 1
    assert caplog.text.count("SA a-to-b-0 (spi 0x00001000): hard expired") == 1


# -- reload: the new processor first, the old one for what the old rules still send ------------
def _spec(cfg: Any, queue: int = 100) -> WorkerSpec:
    return WorkerSpec(queue=queue, cpu=None, mark=MARK, policies=tuple(cfg.spd.policies),
                      sas=cfg.sas_for_queue(queue))


def _rekeyed(cfg: Any, name: str, new_spi: int) -> Any:
    """``cfg`` with SA ``name`` replaced by one with a new key and SPI."""
    sas = tuple(dataclasses.replace(sa, spi=new_spi, key=Secret(bytes(reversed(sa.key.reveal()))))
                if sa.name == name else sa for sa in cfg.sas)
    return dataclasses.replace(cfg, sas=sas)


def test_reload_keeps_unchanged_sas_and_hands_back_until_commit() -> None:
    cfg = load_config(EXAMPLES / "host-a.toml", online_cpus=[0, 1])
    h, q = handler(Processor(cfg.spd, cfg.sas_for_queue(100), 0.0))
    old = h.processor
    # a packet before the reload, so the outbound SA has a sequence number to carry on from
    h.handle_batch([pkt(udp(A, B, 4000, 5000, b"one"), pid=1)])
    out_sa = next(sa for sa in old.sad.all() if sa.outbound)
    assert out_sa.next_seq == 2
    inbound_name = next(sa.name for sa in old.sad.all() if not sa.outbound)
    inbound_spi = next(sa.spi for sa in old.sad.all() if not sa.outbound)
    # ESP for the inbound SA that the reload retires, made by host b before the reload
    sender_h, sender_q = handler(processor("b"))
    sender_h.handle_batch([pkt(udp(B, A, 5000, 4000, b"in flight"), pid=9)])
    in_flight = sender_q.verdicts[0][3]
    assert in_flight is not None and int.from_bytes(in_flight[20:24], "big") == inbound_spi

    summary = h.reload(_spec(_rekeyed(cfg, inbound_name, 0x7000)), 2.0)
    assert summary == "1 SA(s) kept, 1 new or changed, 1 retired"
    assert h.processor is not old and h.previous is old
    assert next(sa for sa in h.processor.sad.all() if sa.outbound) is out_sa  # same object
    h.handle_batch([pkt(udp(A, B, 4000, 5000, b"two"), pid=2)])
    assert out_sa.next_seq == 3  # sequence numbers go on, never start again under the key
    # the old rules still send the retired SPI here: the old processor takes it
    out_before = h.packets_out
    h.handle_batch([pkt(in_flight, hook=HOOK_PRE_ROUTING, pid=3)])
    assert q.verdicts[-1][:2] == (3, True) and h.packets_out == out_before + 1
    assert h.counts()["drops"].get("unknown_spi", 0) == 0  # passed: no drop counted
    # an SPI neither configuration knows: handed back, dropped there too, not counted as out
    unknown = in_flight[:20] + (0x7777).to_bytes(4, "big") + in_flight[24:]
    h.handle_batch([pkt(unknown, hook=HOOK_PRE_ROUTING, pid=5)])
    assert q.verdicts[-1] == (5, False, None, None) and h.packets_out == out_before + 1
    assert h.counts()["drops"]["unknown_spi"] == 1  # counted once, by the old processor
    h.commit_reload()
    assert h.previous is None
    h.handle_batch([pkt(in_flight, hook=HOOK_PRE_ROUTING, pid=4)])
    assert q.verdicts[-1] == (4, False, None, None)  # retired for good
    h.reload(_spec(cfg), 3.0)
    with pytest.raises(RuntimeError):  # one reload at a time
        h.reload(_spec(cfg), 3.0)


def test_reload_rollback_and_refusal_change_nothing() -> None:
    cfg = load_config(EXAMPLES / "host-a.toml", online_cpus=[0, 1])
    h, _ = handler(Processor(cfg.spd, cfg.sas_for_queue(100), 0.0))
    old = h.processor
    h.reload(_spec(_rekeyed(cfg, "b-to-a-0", 0x7000)), 1.0)
    h.rollback_reload()
    assert h.processor is old and h.previous is None
    bad = dataclasses.replace(cfg, sas=(*cfg.sas, cfg.sas[0]))  # a duplicate SA name
    with pytest.raises(ValueError):
        h.reload(_spec(bad), 1.0)
    assert h.processor is old and h.previous is None


def test_reload_problems_name_what_needs_a_restart() -> None:
    from nfq_ipsec.supervisor import reload_problems

    cfg = load_config(EXAMPLES / "host-a.toml", online_cpus=[0, 1])
    assert reload_problems(cfg, cfg) == []
    assert reload_problems(cfg, _rekeyed(cfg, "b-to-a-0", 0x7000)) == []  # a new key: fine
    other = dataclasses.replace(cfg, daemon=dataclasses.replace(cfg.daemon, chain_prefix="X",
                                                                    log_level="debug", busy_poll=50,
                                                                    gso=True))
    assert reload_problems(cfg, other) == ["daemon.chain_prefix: a change needs a restart",
                                           "daemon.log_level: a change needs a restart",
                                           "daemon.busy_poll: a change needs a restart",
                                           "daemon.gso: a change needs a restart"]
    moved = dataclasses.replace(cfg, sas=tuple(dataclasses.replace(sa, queue=101)
                                               if sa.name == "b-to-a-0" else sa for sa in cfg.sas))
    [problem] = reload_problems(cfg, moved)
    assert "'b-to-a-0' moves from queue 100 to 101 under the same key" in problem
    crypto = dataclasses.replace(cfg, crypto=dataclasses.replace(cfg.crypto, policy="balance"))
    assert reload_problems(cfg, crypto) == [
        "crypto: a change needs a restart (engine disable|enable work at runtime)"]


def test_a_forwarded_df_packet_too_big_is_answered_with_frag_needed() -> None:
    """A gateway: a DF datagram from the LAN that won't fit the unprotected interface's MTU
    after ESP is dropped, and the ICMP error the core built goes to the reply sender."""
    cfg = load_config(EXAMPLES / "gateway-a.toml", online_cpus=[0, 1])
    queue = cfg.sas_for_queue(cfg.daemon.queues[0].num)
    proc = Processor(cfg.spd, queue, 0.0, mtu=cfg.node.mtu)
    sent: list[bytes] = []
    h, q = handler(proc, gateway_interface="wan0", reply=sent.append)
    pol = next(p for p in cfg.spd.policies if p.sa_names)
    src = str(pol.selector.local.network_address + 10)
    dst = str(pol.selector.remote.network_address + 20)
    big = udp(src, dst, 4000, 5000, b"x" * (cfg.node.mtu - 28))  # DF set, as ipv4() makes it
    h.handle_batch([pkt(big, hook=HOOK_PRE_ROUTING, indev=3)])
    assert q.verdicts == [(1, False, None, None)]
    assert proc.drops[DropReason.PATH_MTU] == 1
    assert len(sent) == 1 and sent[0][9] == 1 and sent[0][20:22] == b"\x03\x04"  # ICMP 3/4
    assert sent[0][16:20] == big[12:16]  # back to the LAN sender
    assert h.replies_sent == 1
def udp_processor() -> Processor:
    cfg = cfg_of(udp_data())
    return Processor(cfg.spd, cfg.sas_for_queue(100), 0.0)


def test_keepalives_go_out_marked_while_idle_and_show_in_status() -> None:
    """The worker that owns an outbound SA of ESP in UDP sends its NAT-keepalives through its
    keepalive sender (a raw socket with the daemon's mark in the daemon); status shows them
    with the SA's peer, and the markers passed."""
    proc = udp_processor()
    sent: list[bytes] = []
    h = PacketHandler(proc, FakeQueue(), MARK, clock=lambda: 1000.0, keepalive=sent.append)
    h.send_keepalives(1000.0)
    h.send_keepalives(1005.0)  # o0's interval is 10 s
    h.send_keepalives(1010.0)
    assert len(sent) == 2
    assert sent[0][-1:] == b"\xff" and sent[0][9] == 17 and len(sent[0]) == 29
    snap = h.snapshot(100, None, 0.0)
    o0 = next(sa for sa in snap["sas"] if sa["name"] == "o0")
    assert o0["udp"] == {"local_port": 4500, "peer": "198.51.100.2:4500", "keepalives_sent": 2,
                         "peer_changes": 0}
    assert next(sa for sa in snap["sas"] if sa["name"] == "plain")["udp"] is None
    assert snap["ike_markers"] == 0
    marker = udp("198.51.100.2", "192.0.2.1", 4500, 4500, b"\0" * 4 + b"ike")
    h.handle_batch([pkt(marker, hook=HOOK_PRE_ROUTING)])
    assert h.snapshot(100, None, 0.0)["ike_markers"] == 1


def test_a_failing_keepalive_sender_is_counted_not_fatal() -> None:
    def refuse(_packet: bytes) -> None:
        raise OSError(1, "Operation not permitted")

    h = PacketHandler(udp_processor(), FakeQueue(), MARK, clock=lambda: 1.0, keepalive=refuse)
    h.send_keepalives(1000.0)
    assert h.keepalive_errors == 1


def test_a_followed_peer_is_logged_with_where_it_went(caplog: pytest.LogCaptureFixture) -> None:
    """udp_data's i0 follows a new peer: the peer sends from port 31000 (a NAT's), the worker
    logs the move once, and o0 (same policy, same queue) sends there."""
    import hashlib
    import logging
    from ipaddress import IPv4Network

    import sas as sa_builder

    from nfq_ipsec.core import SPD, Action, Direction, Policy, SecurityAssociation, Selector
    from nfq_ipsec.core.sa import Encapsulation, SADirection

    key = bytes.fromhex(hashlib.sha256(b"i0").hexdigest()[:40])  # udp_data()'s key of i0
    peer_sa = SecurityAssociation(sa_builder.params(
        "peer", 0x2000, SADirection.OUT, key=key, local="198.51.100.2", remote="192.0.2.1",
        encapsulation=Encapsulation.UDP, udp_source_port=31000), 0.0)
    peer = Processor(SPD([Policy("p", Selector(IPv4Network("10.2.0.0/24"),
                                               IPv4Network("10.1.0.0/24")),
                                 Action.PROTECT, Direction.BOTH, ("peer",))]), [peer_sa], 0.0)
    wire = peer.outbound(udp("10.2.0.7", "10.1.0.5", 1, 2, b"x"), 1.0).packet
    assert wire is not None
    proc = udp_processor()
    h, q = handler(proc)
    caplog.set_level(logging.INFO, logger="nfq_ipsec")
    h.handle_batch([pkt(wire, hook=HOOK_PRE_ROUTING)])
    h.report_events()
    h.report_events()
    assert q.verdicts[0][1] is True
    assert caplog.text.count("SA i0 (spi 0x00002000): peer changed, now 198.51.100.2:31000") == 1
    o0 = next(sa for sa in h.snapshot(100, None, 0.0)["sas"] if sa["name"] == "o0")
    assert o0["udp"] is not None and o0["udp"]["peer"] == "198.51.100.2:31000"


def mixed_processors() -> tuple[Processor, Processor]:
    """host_data's hosts joined by a 4-in-6 tunnel: (host 10.0.0.1, host 10.0.0.2), each the
    other's mirror (its out SA the other's in SA)."""
    def side(me: str, peer: str, out_spi: int, in_spi: int, keys: tuple[str, str]) -> Processor:
        data = host_data()
        data["policy"][0].update(local=f"{me}/32", remote=f"{peer}/32")
        for sa, spi, key in zip(data["sa"], (out_spi, in_spi), keys, strict=True):
            tl, tr = ("2001:db8::a", "2001:db8::b") if me == "10.0.0.1" else ("2001:db8::b",
                                                                            "2001:db8::a")
            sa.update(spi=spi, key=key, mode="tunnel", tunnel_local=tl, tunnel_remote=tr)
        cfg = cfg_of(data)
        return Processor(cfg.spd, cfg.sas_for_queue(7), 0.0)

    k1, k2 = host_data()["sa"][0]["key"], host_data()["sa"][1]["key"]
    return (side("10.0.0.1", "10.0.0.2", 0x1000, 0x2000, (k1, k2)),
            side("10.0.0.2", "10.0.0.1", 0x2000, 0x1000, (k2, k1)))


def test_a_result_of_the_other_family_is_sent_marked_and_its_original_dropped() -> None:
    """4-in-6: the IPv4 packet's ESP (IPv6) can't go back in the IPv4 verdict, nor the
    decrypted IPv4 packet in the IPv6 one: each leaves through the family sender (a marked
    raw socket in the daemon), the queued original is dropped, and both count as carried."""
    proc_a, proc_b = mixed_processors()
    sent_a: list[bytes] = []
    q_a = FakeQueue()
    h_a = PacketHandler(proc_a, q_a, MARK, clock=lambda: 1.0, cross=sent_a.append)
    plain = udp("10.0.0.1", "10.0.0.2", 4000, 5000, b"four in six")
    h_a.handle_batch([pkt(plain, pid=3)])
    assert q_a.verdicts == [(3, False, None, None)]
    [esp] = sent_a
    assert esp[0] >> 4 == 6 and esp[6] == 50 and plain[20:] not in esp
    assert (h_a.packets_out, h_a.crossed_family, dict(proc_a.drops)) == (1, 1, {})
    sent_b: list[bytes] = []
    q_b = FakeQueue()
    h_b = PacketHandler(proc_b, q_b, MARK, clock=lambda: 1.0, cross=sent_b.append)
    h_b.handle_batch([pkt(esp, hook=HOOK_PRE_ROUTING, pid=4)])
    assert q_b.verdicts == [(4, False, None, None)]
    assert sent_b == [plain]
    assert h_b.snapshot(7, None, 0.0)["crossed_family"] == 1
    h_b.handle_batch([pkt(esp, hook=HOOK_PRE_ROUTING, pid=5)])  # a replay: dropped, not sent
    assert q_b.verdicts[1] == (5, False, None, None) and len(sent_b) == 1
    assert proc_b.drops[DropReason.REPLAY] == 1


def test_a_refused_send_to_the_other_family_is_dropped_and_counted() -> None:
    def refuse(_packet: bytes) -> None:
        raise OSError(90, "Message too long")

    proc_a, _ = mixed_processors()
    q = FakeQueue()
    h = PacketHandler(proc_a, q, MARK, clock=lambda: 1.0, cross=refuse)
    h.handle_batch([pkt(udp("10.0.0.1", "10.0.0.2", 4000, 5000, b"x"), pid=9)])
    assert q.verdicts == [(9, False, None, None)]
    assert (h.packets_out, h.crossed_family) == (0, 0)
    assert proc_a.drops[DropReason.FAMILY_SEND] == 1


def test_the_family_sender_sends_whole_packets_of_either_family_with_the_mark(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's sender: one raw socket per family (IPPROTO_RAW: header included), the
    mark on each, every packet to its own destination."""
    made: list[FakeRawSocket] = []

    class FakeRawSocket:
        def __init__(self, family: int, kind: int, proto: int) -> None:
            self.args = (family, kind, proto)
            self.opts: list[tuple[int, int, int]] = []
            self.sent: list[tuple[bytes, tuple[str, int]]] = []
            made.append(self)

        def setblocking(self, flag: bool) -> None:
            assert flag is False

        def setsockopt(self, level: int, opt: int, value: int) -> None:
            self.opts.append((level, opt, value))

        def sendto(self, data: bytes, dest: tuple[str, int]) -> None:
            self.sent.append((data, dest))

    monkeypatch.setattr(socket, "socket", FakeRawSocket)
    send = worker._raw_ip_sender(MARK)
    v4 = udp("10.0.0.1", "10.0.0.2", 1, 2, b"four")
    v6 = bytes.fromhex("6000000000083a40") + bytes(15) + b"\x01" + bytes(15) + b"\x02" + bytes(8)
    send(v4)
    send(v6)
    send(v4)
    assert [m.args for m in made] == [(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW),
                                      (socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)]
    for m in made:
        assert m.opts == [(socket.SOL_SOCKET, socket.SO_MARK, MARK)]
    assert made[0].sent == [(v4, ("10.0.0.2", 0)), (v4, ("10.0.0.2", 0))]
    assert made[1].sent == [(v6, ("::2", 0))]


def test_a_mixed_tunnels_esp_packet_too_big_for_the_path_goes_in_fragments() -> None:
    """4-in-6, an IPv4 datagram without DF that won't fit after ESP: the raw socket would
    refuse it whole, so the worker sends the ESP packet in IPv6 fragments of at most the MTU
    (each its own raw send), and the peer gets the datagram back once they are put together."""
    from scapy.layers.inet6 import IPv6, defragment6

    proc_a, proc_b = mixed_processors()
    sent: list[bytes] = []
    h = PacketHandler(proc_a, FakeQueue(), MARK, clock=lambda: 1.0, cross=sent.append)
    big = ipv4("10.0.0.1", "10.0.0.2", 17, struct.pack("!HHHH", 1, 2, 1480, 0) + bytes(1472),
               frag=0)
    h.handle_batch([pkt(big)])
    assert len(sent) == 2 and all(len(f) <= 1500 and f[6] == 44 for f in sent)
    assert h.crossed_family == 1
    whole = bytes(defragment6([IPv6(f) for f in sent]))  # type: ignore[no-untyped-call]
    got: list[bytes] = []
    PacketHandler(proc_b, FakeQueue(), MARK, clock=lambda: 1.0, cross=got.append).handle_batch(
        [pkt(whole, hook=HOOK_PRE_ROUTING)])
    assert got == [big]


def test_a_local_ipv6_packet_too_big_after_esp_is_sent_as_fragments() -> None:
    """The core's REPLACE: the queued packet is dropped and the fragments of its ESP packet go
    out through the sender (a raw socket with the mark in the daemon), counted as passed; a
    sender that fails is counted and the packet is lost, nothing raised."""
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment
    from scapy.layers.ipsec import ESP

    cfg = load_config(EXAMPLES / "host6-a.toml", online_cpus=[0, 1])
    proc = Processor(cfg.spd, cfg.sas_for_queue(100), 0.0)
    sent: list[bytes] = []
    h = PacketHandler(proc, FakeQueue(), MARK, clock=lambda: 1.0, send=sent.append)
    q = h.queue
    assert isinstance(q, FakeQueue)
    big = bytes(IPv6(src="2001:db8:56::10", dst="2001:db8:56::11", nh=17) / bytes(1460))
    h.handle_batch([pkt(big, pid=7)])
    assert q.verdicts == [(7, False, None, None)]
    assert len(sent) == 2 and all(len(f) <= 1500 for f in sent)
    frags = [IPv6(f) for f in sent]
    assert {f[IPv6ExtHdrFragment].id for f in frags} == {frags[0][IPv6ExtHdrFragment].id}
    assert frags[0][IPv6ExtHdrFragment].nh == 50 and frags[0][ESP].spi == cfg.sa("a-to-b").spi
    assert (h.packets_in, h.packets_out, h.send_errors) == (1, 1, 0)
    assert not any(proc.drops.values())

    def refuse(_packet: bytes) -> None:
        raise OSError(1, "Operation not permitted")

    h2 = PacketHandler(proc, FakeQueue(), MARK, clock=lambda: 1.0, send=refuse)
    h2.handle_batch([pkt(big, pid=8)])
    assert (h2.packets_out, h2.send_errors) == (0, 1)


@pytest.mark.parametrize("enabled", [True, False])
def test_inbound_drops_are_logged_with_spi_and_source(caplog: pytest.LogCaptureFixture,
                                                       enabled: bool) -> None:
    """With daemon.drop_log, each dropped packet's SPI and source; without it (the default),
    no line at all, the drops counted as ever."""
    sender_h, sender_q = handler(processor("b"))
    sender_h.handle_batch([pkt(udp(B, A, 5000, 4000, b"to host a"), pid=n) for n in (1, 2)])
    good, second = sender_q.verdicts[0][3], sender_q.verdicts[1][3]
    assert good is not None and second is not None
    proc = processor("a")
    q = FakeQueue()
    h = PacketHandler(proc, q, MARK, clock=lambda: 1.0, drop_log=enabled)
    spi = good[20:24].hex()
    tampered = second[:-1] + bytes([second[-1] ^ 1])  # a sequence number not seen yet
    unknown = good[:20] + b"\xff\xff\xff\xf0" + good[24:]
    with caplog.at_level("INFO", logger="nfq_ipsec.drops"):
        h.handle_batch([pkt(good, hook=HOOK_PRE_ROUTING, pid=1), pkt(good, hook=HOOK_PRE_ROUTING, pid=2),
                        pkt(tampered, hook=HOOK_PRE_ROUTING, pid=3),
                        pkt(unknown, hook=HOOK_PRE_ROUTING, pid=4)])
    assert [v[1] for v in q.verdicts] == [True, False, False, False]
    assert sum(proc.drops.values()) == 3
    lines = [r.getMessage() for r in caplog.records if r.name == "nfq_ipsec.drops"]
    assert lines == ([f"dropped (replay): SPI 0x{spi} from {B}",
                      f"dropped (integrity): SPI 0x{spi} from {B}",
                      f"dropped (unknown_spi): SPI 0xfffffff0 from {B}"] if enabled else [])


# -- a GSO queue's packets (daemon.gso) --------------------------------------------------------
def _superpacket(payload: int = 8000, sport: int = 40000) -> bytes:
    from scapy.layers.inet import IP, TCP

    return bytes(IP(src=A, dst=B, flags="DF") / TCP(sport=sport, dport=5201, flags="PA",
                                                    chksum=0x4321) / bytes(payload))


def test_a_superpacket_leaves_as_one_batch_of_esp_packets_and_is_dropped() -> None:
    """Its ESP packets go to the batch sender together, in sequence order, each within the
    MTU; the superpacket itself is dropped by verdict and counts as one packet out."""
    from scapy.layers.inet import IP
    from scapy.layers.ipsec import ESP

    batches: list[list[bytes]] = []

    def batch(packets: list[bytes]) -> int:
        batches.append(list(packets))
        return len(packets)

    proc = processor("a")
    h = PacketHandler(proc, FakeQueue(), MARK, clock=lambda: 1.0, batch=batch)
    q = h.queue
    assert isinstance(q, FakeQueue)
    info = nfqueue.NFQA_SKB_GSO | nfqueue.NFQA_SKB_CSUMNOTREADY
    sp = _superpacket()
    h.handle_batch([QueuedPacket(3, HOOK_LOCAL_OUT, sp, len(sp), 0, 0, info)])
    assert q.verdicts == [(3, False, None, None)]
    [sent] = batches
    assert len(sent) == -(-8000 // 536) and all(len(p) <= 1500 for p in sent)  # no SYN seen
    assert [IP(p)[ESP].seq for p in sent] == list(range(1, len(sent) + 1))
    assert (h.packets_in, h.packets_out, h.superpackets_sent) == (1, 1, 1)
    assert not any(proc.drops.values())


def test_a_batch_the_kernel_refuses_counts_gso_send() -> None:
    refused: list[int] = []

    def half(packets: list[bytes]) -> int:
        refused.append(len(packets))
        return len(packets) // 2

    def none(packets: list[bytes]) -> int:
        raise OSError(1, "Operation not permitted")

    for sender in (half, none):
        proc = processor("a")
        h = PacketHandler(proc, FakeQueue(), MARK, clock=lambda: 1.0, batch=sender)
        sp = _superpacket()
        h.handle_batch([QueuedPacket(4, HOOK_LOCAL_OUT, sp, len(sp), 0, 0, nfqueue.NFQA_SKB_GSO)])
        assert (h.packets_out, h.superpackets_sent) == (0, 0)
        assert proc.drops[DropReason.GSO_SEND] == 1
        assert h.queue.verdicts == [(4, False, None, None)]  # type: ignore[attr-defined]
    assert refused


def test_a_packet_whose_checksum_is_not_ready_is_completed_and_sealed_in_the_verdict() -> None:
    """Not a superpacket: its ESP packet goes back in the verdict, as without daemon.gso; the
    peer opens it to the packet with its TCP checksum complete."""
    from scapy.layers.inet import IP, TCP

    proc_a, proc_b = processor("a"), processor("b")
    h, q = handler(proc_a)
    sp = _superpacket(500)
    h.handle_batch([QueuedPacket(5, HOOK_LOCAL_OUT, sp, len(sp), 0, 0,
                                 nfqueue.NFQA_SKB_CSUMNOTREADY)])
    [(pid, accept, _mark, payload)] = q.verdicts
    assert (pid, accept) == (5, True) and payload is not None
    opened = proc_b.process(payload, len(payload), 0, 1.0)
    assert opened.packet is not None
    again = IP(sp)
    del again[TCP].chksum
    assert opened.packet == bytes(IP(bytes(again)))


def test_an_arriving_superpacket_takes_the_per_packet_path() -> None:
    """Inbound stays one packet per queue trip: a cleartext superpacket arriving for a
    protected flow is cleartext where ESP belongs, dropped as ever."""
    proc = processor("b")
    h, q = handler(proc)
    sp = _superpacket()
    h.handle_batch([QueuedPacket(6, HOOK_PRE_ROUTING, sp, len(sp), 0, 0, nfqueue.NFQA_SKB_GSO)])
    assert q.verdicts == [(6, False, None, None)]
    assert proc.drops[DropReason.CLEARTEXT_PROTECTED] == 1


# -- the crypto engines in a worker (engines/team.py) ------------------------------------------
def test_the_worker_binds_its_sas_moves_them_and_binds_a_reload() -> None:
    import json

    from nfq_ipsec.engines.base import CryptoSettings
    from nfq_ipsec.engines.openssl import OpenSSLEngine
    from nfq_ipsec.engines.pycryptodome import PycryptodomeEngine
    from nfq_ipsec.engines.team import Team

    cfg = load_config(EXAMPLES / "host-a.toml", online_cpus=[0, 1])
    h, q = handler(Processor(cfg.spd, cfg.sas_for_queue(100), 0.0))
    flaky = PycryptodomeEngine()
    team = Team([flaky, OpenSSLEngine()], CryptoSettings(policy="prefer", prefer=("pycryptodome",)))
    team.discover(speed_seconds=0.0005)
    h.use_team(team)
    engines = {s["name"]: s["engine"] for s in h.snapshot(100, None, 0.0)["sas"]}
    assert set(engines.values()) == {"pycryptodome"}
    # the engine breaks: the batch's packets on it are dropped, then its SAs move
    flaky.build = lambda *a: (_ for _ in ()).throw(RuntimeError("gone"))  # type: ignore[method-assign]
    for sa in h.processor.sad.all():
        sa.suite._seal = lambda *a: (_ for _ in ()).throw(RuntimeError("gone"))  # type: ignore[attr-defined]
    h.handle_batch([pkt(udp(A, B, 4000, 5000, b"one"), pid=1), pkt(udp(A, B, 4000, 5000, b"two"), pid=2)])
    assert [v[:2] for v in q.verdicts] == [(1, False), (2, False)]
    assert h.processor.drops[DropReason.ENGINE_FAILED] == 2 and not h.alarms
    snap = h.snapshot(100, None, 0.0)
    assert {s["engine"] for s in snap["sas"]} == {"openssl"}
    assert {e["name"]: (e["state"], e["faults"]) for e in snap["engines"]} == {
        "pycryptodome": ("excluded", 2), "openssl": ("ready", 0)}
    h.handle_batch([pkt(udp(A, B, 4000, 5000, b"three"), pid=3)])
    assert q.verdicts[-1][:2] == (3, True)
    # runtime commands, as the supervisor's pipe gives them
    assert h.engine_command("disable", "openssl") == {"moved": [[n, "none"] for n in sorted(engines)]}
    assert json.dumps(h.engine_command("enable", "nope")) == '{"error": "unknown engine \'nope\'"}'
    assert h.engine_command("enable", "openssl") == {"moved": [[n, "openssl"] for n in sorted(engines)]}
    # a reload binds its new SAs; a rollback lets them go
    h.reload(_spec(_rekeyed(cfg, "b-to-a-0", 0x7000)), 2.0)
    new = next(sa for sa in h.processor.sad.all() if sa.spi == 0x7000)
    assert team.engine_of(new) == "openssl"
    h.rollback_reload()
    assert team.engine_of(new) is None

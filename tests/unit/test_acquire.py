"""Trap connections (``start_action = "trap"``): the rules send a trap policy's packets to one
worker while it has no Child SA; the worker drops them as ``acquire`` (not ``no_sa``) and asks,
at most once per connection per interval; the agent initiates on an acquire, only for a trap
connection and only when nothing is up or on its way; once the Child SA is up the rules send
the policy's packets to its SA's owner and the trap rule is gone."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from configs import CPUS, connection_data
from packets import udp

from nfq_ipsec import childsas, rules
from nfq_ipsec.acquire import INTERVAL, Limiter, trap_queue
from nfq_ipsec.agent import Agent, agent_spec
from nfq_ipsec.childsas import Negotiated
from nfq_ipsec.config import parse_config
from nfq_ipsec.config.model import Config
from nfq_ipsec.core import DropReason, Processor
from nfq_ipsec.nfqueue import HOOK_LOCAL_OUT, QueuedPacket
from nfq_ipsec.supervisor import worker_spec
from nfq_ipsec.worker import PacketHandler

MARK = 0x10000000


def trap_config(tmp_path: Path, action: str = "trap") -> Config:
    data = connection_data(tmp_path, start_action=action)
    data["daemon"].update(queues=[7, 8], cpus=[0, 1])
    return parse_config(data, base_dir=tmp_path, online_cpus=CPUS)


class FakeQueue:
    def __init__(self) -> None:
        self.verdicts: list[tuple[int, bool]] = []

    def verdict(self, packet_id: int, accept: bool, mark: int | None = None,
                payload: bytes | None = None) -> None:
        self.verdicts.append((packet_id, accept))

    def flush(self) -> None:
        pass


def lan_packet(pid: int) -> QueuedPacket:
    data = udp("10.1.0.5", "10.2.0.7", 4000, 5000, b"first packet")
    return QueuedPacket(pid, HOOK_LOCAL_OUT, data, len(data), 0, 0)


def test_the_limiter_lets_one_acquire_per_connection_per_interval() -> None:
    lim = Limiter()
    assert lim.due("a", 10.0) and lim.due("b", 10.0)
    assert not lim.due("a", 10.0 + INTERVAL / 2) and not lim.due("b", 10.5)
    assert lim.suppressed == 2
    assert lim.due("a", 10.0 + INTERVAL)
    assert Limiter(5.0).due("x", 0.0)  # the first one always goes
    many = Limiter()
    for i in range(3000):  # bounded: a flood of names does not grow it without end
        assert many.due(f"c{i}", 0.0)
    assert len(many._last) <= 1024


def test_a_trap_policy_without_sa_is_queued_to_its_trap_worker_and_with_one_to_the_sa(
        tmp_path: Path) -> None:
    cfg = trap_config(tmp_path)
    q = trap_queue("site", cfg.queue_numbers)
    assert q in (7, 8) and trap_queue("site", (7, 8)) == q  # stable
    text = rules.render(cfg)
    assert f"-j NFQUEUE --queue-num {q}" in text and "trap: no Child SA of connection 'site'" in text
    # not for a connection that starts or waits: its policy drops (no_sa) as before
    assert "trap:" not in rules.render(trap_config(tmp_path, "start"))
    # with its Child SA up, the policy goes to the SA's owner and the trap rule is gone
    a, b = agents(tmp_path)
    up(a, b)
    child = a.messages[0][2]
    eff = childsas.effective(cfg, {"site": [Negotiated(child)]}, 0.0)
    text = rules.render(eff)
    assert "trap:" not in text
    out = eff.sa(next(p for p in eff.policies if p.name == "lans").sa_names[0])
    assert f"-j NFQUEUE --queue-num {out.queue}" in text


def test_the_worker_drops_trap_packets_as_acquire_and_asks_once_per_interval(tmp_path: Path) -> None:
    cfg = trap_config(tmp_path)
    qc = next(qc for qc in cfg.daemon.queues if qc.num == trap_queue("site", cfg.queue_numbers))
    spec = worker_spec(cfg, qc)
    assert spec.traps == (("lans", "site"),)
    proc = Processor(spec.spd(), spec.sas, 0.0)
    now = [100.0]
    fake = FakeQueue()
    h = PacketHandler(proc, fake, MARK, clock=lambda: now[0])  # type: ignore[arg-type]
    h.traps = dict(spec.traps)
    h.handle_batch([lan_packet(1), lan_packet(2)])
    now[0] += INTERVAL / 2
    h.handle_batch([lan_packet(3)])
    assert fake.verdicts == [(1, False), (2, False), (3, False)]  # never in clear
    assert proc.drops[DropReason.ACQUIRE] == 3 and proc.drops[DropReason.NO_SA] == 0
    assert h.acquires == ["site"]  # one acquire for the three
    h.acquires.clear()
    now[0] += INTERVAL
    h.handle_batch([lan_packet(4)])
    assert h.acquires == ["site"] and proc.drops[DropReason.ACQUIRE] == 4
    # the same policy not trapped (a reload made it "none"): no_sa, no acquire
    h.traps, h.acquires = {}, []
    now[0] += 5 * INTERVAL
    h.handle_batch([lan_packet(5)])
    assert proc.drops[DropReason.NO_SA] == 1 and h.acquires == []
    assert h.counts()["drops"]["acquire"] == 4


def randomness(seed: int) -> Callable[[int], bytes]:
    rng = random.Random(seed)
    return lambda n: bytes(rng.getrandbits(8) for _ in range(n))


def agents(tmp_path: Path) -> tuple[Agent, Agent]:
    a = connection_data(tmp_path, start_action="trap")
    b = connection_data(tmp_path)
    b["connection"][0].update(local="192.0.2.2", remote="192.0.2.1")
    b["policy"][1].update(local="10.2.0.0/24", remote="10.1.0.0/24")
    b["policy"][0].update(local="10.0.0.2/32", remote="10.0.0.1/32")
    b["sa"][0]["key"], b["sa"][1]["key"] = a["sa"][1]["key"], a["sa"][0]["key"]
    out = []
    for seed, data in enumerate((a, b)):
        spec = agent_spec(parse_config(data, base_dir=tmp_path, online_cpus=CPUS))
        assert spec is not None
        out.append(Agent(spec, randomness(seed), 0.0, clock=lambda: 1e9))
    return out[0], out[1]


def up(a: Agent, b: Agent, first: list[Any] | None = None) -> int:
    """Carry the acquire's exchange between a and b; how many datagrams went."""
    queue = [(a, s) for s in (a.acquire("site", 0.0) if first is None else first)]
    n = 0
    while queue:
        sender, (port, _, data) = queue.pop(0)
        to = b if sender is a else a
        src = next(iter(sender.conns.values())).spec.local
        queue += [(to, s) for s in to.receive(data, (src, port), port, 0.0)]
        n += 1
    return n


def test_the_agent_initiates_a_trap_connection_on_an_acquire_only(tmp_path: Path) -> None:
    a, b = agents(tmp_path)
    assert a.start(0.0) == []  # a trap connection does not start by itself
    assert a.tick(30.0) == []  # nor come back by itself
    assert b.acquire("site", 0.0) == []  # b's connection is not a trap: ignored
    assert a.acquire("nosuch", 0.0) == []
    assert up(a, b) == 4  # IKE_SA_INIT and IKE_AUTH
    assert [m[0] for m in a.messages] == ["child_up"]
    assert a.acquire("site", 1.0) == []  # up: a second acquire does nothing
    assert a.report(0.0)[0]["start_action"] == "trap"
    assert a.conns["site"].acquires == 1

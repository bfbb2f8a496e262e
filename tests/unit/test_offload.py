"""Idle members as dedicated engines (``nfq_ipsec/engines/offload.py``): helper processes seal an
outbound SA's packets over shared memory while the worker keeps sequence numbers and verdicts.

- the output is the in-process output byte for byte, in the same order, whatever the suite,
  the batch size, the number of helpers and the mix of offloaded and other packets (property
  test through the worker's own packet handler, against a processor without offload);
- a helper killed mid-batch, or one that hangs past ``offload_timeout``: every packet it held
  is dropped and counted ``engine_failed`` (worker, SA and pool agree), never given with its
  placeholder; the pool stops and the SA seals in process from the next packet, continuing
  the reference's sequence byte for byte;
- an engine that raises in a helper: that packet alone is dropped (``engine_failed``), the
  engine is excluded and the SA moves to the next engine, still offloaded;
- ``crypto.self_check``: a helper whose output differs from the worker's own engine stops the
  offload before a wrong packet is given;
- a placeholder that is not found whole refuses its packet; one spread over the IP fragments
  the core cut after sealing is filled in across them.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from ipaddress import IPv4Network
from typing import Any

import pytest
import sas
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packets import ipv4, udp

from nfq_ipsec.core import (
    SPD,
    Action,
    Direction,
    DropReason,
    Policy,
    Processor,
    SecurityAssociation,
    Selector,
    Verdict,
)
from nfq_ipsec.core.processor import LEAVING
from nfq_ipsec.core.sa import SADirection
from nfq_ipsec.engines.base import CryptoSettings, Engine
from nfq_ipsec.engines.offload import Job, OffloadPool, OffloadSuite
from nfq_ipsec.engines.openssl import OpenSSLEngine
from nfq_ipsec.engines.pycryptodome import PycryptodomeEngine
from nfq_ipsec.engines.sodium import SodiumEngine
from nfq_ipsec.engines.team import Team, default_engines
from nfq_ipsec.nfqueue import HOOK_LOCAL_OUT, QueuedPacket
from nfq_ipsec.worker import PacketHandler

SUITES = [("aes-gcm-128", None), ("aes-gcm-256", None), ("chacha20-poly1305", None),
          ("aes-cbc-128", "hmac-sha256-128"), ("aes-cbc-256", "hmac-sha512-256"),
          ("null", "hmac-sha384-192")]
PROTECTED = "10.0.0.2"
CLEAR = "10.0.0.3"  # bypassed: accepted unchanged, in the same batch
REFUSED = "10.0.0.4"  # discarded
MARK = 0x100
ENGINES = {e.name: e for e in default_engines()}


class FakeQueue:
    """Records verdicts as the kernel would get them."""

    def __init__(self) -> None:
        self.verdicts: list[tuple[int, bool, int | None, bytes | None]] = []
        self.overflows = 0

    def bind(self, queue_num: int) -> None:
        pass

    def fileno(self) -> int:
        return -1

    def receive(self, limit: int) -> list[QueuedPacket]:
        return []

    def verdict(self, packet_id: int, accept: bool, mark: int | None = None,
                payload: bytes | None = None) -> None:
        self.verdicts.append((packet_id, accept, mark, payload))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def pkt(data: bytes, pid: int) -> QueuedPacket:
    return QueuedPacket(pid, HOOK_LOCAL_OUT, data, len(data), 0, 0)


@pytest.fixture(scope="module")
def pool() -> Iterator[OffloadPool]:
    p = OffloadPool(2, batch=8, timeout=2.0)
    p.start(ENGINES)
    yield p
    p.stop()


def _sa(enc: str, integ: str | None, seed: int, esn: bool, next_seq: int) -> SecurityAssociation:
    key = bytes((seed * 7 + i) & 0xFF for i in range(len(sas.key_for(enc))))
    params = sas.params("out", 0x5000 + seed, SADirection.OUT, enc, key=key, integrity=integ,
                        esn=esn)
    return SecurityAssociation(params, 0.0, next_seq=next_seq)


def _processor(sa: SecurityAssociation) -> Processor:
    pols = [Policy("p", Selector(IPv4Network("10.0.0.1/32"), IPv4Network(f"{PROTECTED}/32")),
                   Action.PROTECT, Direction.OUT, (sa.name,)),
            Policy("c", Selector(IPv4Network("10.0.0.1/32"), IPv4Network(f"{CLEAR}/32")),
                   Action.BYPASS, Direction.OUT),
            Policy("d", Selector(IPv4Network("10.0.0.1/32"), IPv4Network(f"{REFUSED}/32")),
                   Action.DISCARD, Direction.OUT)]
    return Processor(SPD(pols), [sa], 0.0)


def _team(engine: str, pool: OffloadPool | None) -> Team:
    engines: dict[str, type[Engine]] = {"openssl": OpenSSLEngine, "pycryptodome": PycryptodomeEngine,
                                        "sodium": SodiumEngine}
    team = Team([engines[engine]()], CryptoSettings())
    team.discover(speed_seconds=0.0002)
    team.offload = pool
    return team


def _packet(dst: str, n: int, i: int) -> bytes:
    return ipv4("10.0.0.1", dst, 17, udp("10.0.0.1", dst, 1000 + i, 2000, bytes([i & 0xFF]) * n))


def _handler(sa: SecurityAssociation, team: Team, pool: OffloadPool | None
             ) -> tuple[PacketHandler, FakeQueue, Processor]:
    proc = _processor(sa)
    q = FakeQueue()
    h = PacketHandler(proc, q, MARK, clock=lambda: 1.0)
    h.offload = pool
    h.use_team(team)
    return h, q, proc


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(suite=st.sampled_from(SUITES), seed=st.integers(0, 255), esn=st.booleans(),
       start=st.integers(1, 2**40), batch=st.sampled_from([1, 3, 8, 32]),
       packets=st.lists(st.tuples(st.sampled_from([PROTECTED, PROTECTED, CLEAR, REFUSED]),
                                  st.integers(0, 1400)), min_size=1, max_size=40),
       engine=st.sampled_from(["openssl", "pycryptodome", "sodium"]))
def test_offloaded_output_is_the_in_process_output(
        pool: OffloadPool, suite: tuple[str, str | None], seed: int, esn: bool, start: int,
        batch: int, packets: list[tuple[str, int]], engine: str) -> None:
    enc, integ = suite
    if (engine == "pycryptodome" and enc == "null") or (
            engine == "sodium" and enc not in SodiumEngine().probe().suites):
        engine = "openssl"
    if not esn:
        start &= 0xFFFFFFF
    sa, ref_sa = _sa(enc, integ, seed, esn, start), _sa(enc, integ, seed, esn, start)
    team = _team(engine, pool)
    pool.batch = batch
    h, q, _ = _handler(sa, team, pool)
    assert isinstance(sa.suite, OffloadSuite)
    ref_h, ref_q, _ = _handler(ref_sa, _team(engine, None), None)
    queued = [pkt(_packet(dst, n, i), pid=i + 1) for i, (dst, n) in enumerate(packets)]
    jobs = pool.jobs
    h.handle_batch(queued)
    ref_h.handle_batch(queued)
    assert q.verdicts == ref_q.verdicts  # same verdicts, same bytes, same (queue) order
    assert [v[0] for v in q.verdicts] == [p.packet_id for p in queued]
    assert pool.jobs - jobs == sum(1 for d, _ in packets if d == PROTECTED)  # all offloaded
    assert pool.active and pool.lost == 0
    team.release([sa])


class _KillingProcessor:
    """A processor that does ``act`` after its ``at``-th packet (mid-batch)."""

    def __init__(self, proc: Processor, at: int, act: Any) -> None:
        self._proc, self._at, self._act, self._n = proc, at, act, 0

    def process(self, *args: Any) -> Any:
        res = self._proc.process(*args)
        self._n += 1
        if self._n == self._at:
            self._act()
        return res

    def __getattr__(self, name: str) -> Any:
        return getattr(self._proc, name)


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_helper_that_dies_or_hangs_mid_batch_drops_its_packets_counted(fault: str) -> None:
    pool = OffloadPool(1, batch=4, timeout=0.3)
    pool.start(ENGINES)
    try:
        sa = _sa("aes-gcm-128", None, 1, False, 1)
        team = _team("openssl", pool)
        h, q, proc = _handler(sa, team, pool)
        [pid] = pool.pids
        ref = _sa("aes-gcm-128", None, 1, False, 1)
        ref_h, ref_q, _ = _handler(ref, _team("openssl", None), None)
        first = [pkt(_packet(PROTECTED, 300, i), pid=i + 1) for i in range(10)]
        then = [pkt(_packet(PROTECTED, 300, i), pid=i + 1) for i in range(10, 14)]
        sig = signal.SIGKILL if fault == "killed" else signal.SIGSTOP
        h.processor = _KillingProcessor(proc, 6, lambda: os.kill(pid, sig))  # type: ignore[assignment]
        h.handle_batch(first)
        h.processor = proc
        h.handle_batch(then)
        ref_h.handle_batch(first + then)
        assert [v[0] for v in q.verdicts] == list(range(1, 15))  # every packet, in order
        lost = [v for v in q.verdicts if not v[1]]
        # every job of the batch the helper held is dropped (an answer it gave for a chunk
        # before it went is not trusted either), none given with a placeholder
        assert [v[0] for v in lost] == list(range(1, 11))
        assert len(lost) == proc.drops[DropReason.ENGINE_FAILED] == sa.drops[DropReason.ENGINE_FAILED]
        assert len(lost) == pool.lost and h.packets_out == 14 - len(lost)
        assert not pool.active and pool.failed and (
            "died" in pool.failed if fault == "killed" else "did not answer" in pool.failed)
        # what did leave is the reference's packet of the same sequence number, byte for byte:
        # the pool is off and the SA sealed in process from the next packet on
        want = dict((v[0], v) for v in ref_q.verdicts)
        for v in q.verdicts:
            if v[1]:
                assert v == want[v[0]]
        assert sa.next_seq == ref.next_seq == 15
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # gone (killed and reaped)
    finally:
        pool.stop()


def test_a_placeholder_not_found_whole_refuses_the_packet() -> None:
    pool = OffloadPool(0)
    job = Job(0, 0, 40, b"T" * 16, None, (b"", b"", 0, b""))  # type: ignore[arg-type]
    job.out = b"x" * 40
    packet = b"h" * 20 + b"T" * 16 + bytes(24)
    assert pool.patch(packet, [job]) == b"h" * 20 + b"x" * 40
    assert pool.patch(packet[:-1], [job]) is None  # cut short
    assert pool.patch(b"h" * 60, [job]) is None  # not there
    job.out = None
    assert pool.patch(packet, [job]) is None  # did not come back
    assert pool.patch_all([b"a" * 10, packet], [Job(0, 0, 40, b"T" * 16, None,  # type: ignore[arg-type]
                                                    (b"", b"", 0, b""))]) is None


def test_offload_off_or_inbound_keeps_the_in_process_suite() -> None:
    pool = OffloadPool(0)
    pool.start(ENGINES)
    team = _team("openssl", pool)
    sa = _sa("aes-gcm-128", None, 1, False, 1)
    inbound = SecurityAssociation(sas.params("in", 0x7000, SADirection.IN), 0.0)
    team.bind([sa, inbound])
    assert not isinstance(sa.suite, OffloadSuite) and not isinstance(inbound.suite, OffloadSuite)
    res = _processor(sa).process(_packet(PROTECTED, 10, 0), 38, LEAVING, 0.0)
    assert res.verdict is Verdict.ACCEPT


class _BoomSuite:
    """OpenSSL's suite of an SA, raising on a plaintext that holds ``BOOM``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name, self.iv_size = inner.name, inner.iv_size
        self.icv_size, self.align = inner.icv_size, inner.align

    def seal(self, esp_header: bytes, seq_hi: bytes, seq: int, plaintext: bytes) -> bytes:
        if b"BOOM" in plaintext:
            raise RuntimeError("device fault")
        out: bytes = self.inner.seal(esp_header, seq_hi, seq, plaintext)
        return out

    def open(self, *args: Any) -> bytes:
        out: bytes = self.inner.open(*args)
        return out


class _BoomEngine(OpenSSLEngine):
    name = "boom"

    def build(self, encryption: str, key: bytes, integrity: str | None, integrity_key: bytes) -> Any:
        return _BoomSuite(super().build(encryption, key, integrity, integrity_key))


def test_an_engine_that_raises_in_a_helper_is_excluded_and_its_sa_moves() -> None:
    engines: list[Engine] = [_BoomEngine(), OpenSSLEngine()]
    pool = OffloadPool(1, batch=4, timeout=2.0)
    pool.start({e.name: e for e in engines})
    try:
        team = Team(engines, CryptoSettings(policy="prefer", prefer=("boom",)))
        team.discover(speed_seconds=0.0002)
        team.offload = pool
        sa = _sa("aes-gcm-128", None, 3, False, 1)
        h, q, proc = _handler(sa, team, pool)
        assert team.engine_of(sa) == "boom" and isinstance(sa.suite, OffloadSuite)
        ref = _sa("aes-gcm-128", None, 3, False, 1)
        ref_h, ref_q, _ = _handler(ref, _team("openssl", None), None)

        def packet(i: int) -> bytes:
            data = b"BOOM" if i == 2 else bytes([i]) * 4
            return ipv4("10.0.0.1", PROTECTED, 17, udp("10.0.0.1", PROTECTED, 1000, 2000, data * 50))

        queued = [pkt(packet(i), pid=i + 1) for i in range(6)]
        h.handle_batch(queued[:3])  # the third raises in the helper
        h.handle_batch(queued[3:])
        ref_h.handle_batch(queued)
        assert [v[:2] for v in q.verdicts] == [(1, True), (2, True), (3, False), (4, True),
                                                (5, True), (6, True)]
        assert proc.drops[DropReason.ENGINE_FAILED] == sa.drops[DropReason.ENGINE_FAILED] == 1
        assert pool.lost == 1 and pool.active  # the helper is fine: its engine was not
        row = {r["name"]: r for r in team.report()}["boom"]
        assert (row["state"], row["faults"], row["moved_away"]) == ("excluded", 1, 1)
        assert team.engine_of(sa) == "openssl" and isinstance(sa.suite, OffloadSuite)
        want = {v[0]: v for v in ref_q.verdicts}
        assert all(v == want[v[0]] for v in q.verdicts if v[1])  # same bytes, same numbers
    finally:
        pool.stop()


class _FlipSuite(_BoomSuite):
    def seal(self, esp_header: bytes, seq_hi: bytes, seq: int, plaintext: bytes) -> bytes:
        out: bytes = self.inner.seal(esp_header, seq_hi, seq, plaintext)
        return out[:-1] + bytes([out[-1] ^ 1])


class _FlipEngine(OpenSSLEngine):
    def build(self, encryption: str, key: bytes, integrity: str | None, integrity_key: bytes) -> Any:
        return _FlipSuite(super().build(encryption, key, integrity, integrity_key))


def test_the_self_check_catches_a_helper_whose_output_is_wrong() -> None:
    """``crypto.self_check = 1``: each helper result is sealed again in the worker; a helper
    whose copy of the engine gives other bytes (injected: its OpenSSL flips the last byte)
    stops the offload, and no wrong packet is given."""
    pool = OffloadPool(1, batch=2, timeout=2.0, check_every=1)
    pool.start({"openssl": _FlipEngine()})
    try:
        sa = _sa("chacha20-poly1305", None, 4, True, 7)
        h, q, proc = _handler(sa, _team("openssl", pool), pool)
        ref = _sa("chacha20-poly1305", None, 4, True, 7)
        ref_h, ref_q, _ = _handler(ref, _team("openssl", None), None)
        queued = [pkt(_packet(PROTECTED, 200, i), pid=i + 1) for i in range(5)]
        h.handle_batch(queued[:3])
        h.handle_batch(queued[3:])
        ref_h.handle_batch(queued)
        assert not pool.active and "differs" in (pool.failed or "") and pool.checked == 1
        assert [v[:2] for v in q.verdicts] == [(1, False), (2, False), (3, False), (4, True),
                                                (5, True)]
        assert proc.drops[DropReason.ENGINE_FAILED] == 3 == pool.lost
        assert q.verdicts[3:] == ref_q.verdicts[3:]  # in process from then on, right
    finally:
        pool.stop()


@pytest.mark.parametrize("family", [4, 6])
def test_a_body_spread_over_fragments_the_worker_made_is_put_in_place(family: int) -> None:
    """A local ESP packet beyond its path MTU (IPv6) or a mixed tunnel's (IPv4 through a raw
    socket) leaves as fragments the core cut after sealing: the placeholder is spread over
    them, and the sealed body goes in across them: the fragments of the sealed packet."""
    from nfq_ipsec.core import ipv6 as core_ipv6
    from nfq_ipsec.core import pmtu

    size = 1200
    token = b"\\xaa" * 8 + (7).to_bytes(8, "little")
    job = Job(0, 0, size, token, None, (b"", b"", 0, b""))  # type: ignore[arg-type]
    job.out = os.urandom(size)
    esp = bytes(range(8))
    if family == 6:
        head = core_ipv6.build_header6(0, 0, 8 + size, 50, 64, 1, 2)
    else:
        head = ipv4("10.0.0.1", "10.0.0.2", 50, b"")[:20]
        total = 20 + 8 + size
        head = head[:2] + total.to_bytes(2, "big") + head[4:]
    sealed = head + esp + job.out
    placeheld = head + esp + token + bytes(size - len(token))

    def cut(packet: bytes) -> list[bytes]:
        return pmtu.fragment_own(packet, 500, 0x1234)

    fragments = cut(placeheld)
    assert len(fragments) == 3
    assert OffloadPool.patch_all(fragments, [job]) == cut(sealed)
    assert OffloadPool.patch_all(fragments[:2], [job]) is None  # one missing: refused
    job.out = None
    assert OffloadPool.patch_all(fragments, [job]) is None

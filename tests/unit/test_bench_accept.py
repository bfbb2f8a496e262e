"""The benchmark's accept-only workers (``nfq_ipsec_lab.bench.accept``): the ceiling and the floors.

What each ``--work`` does per packet decides what the ``accept``, ``accept-payload`` and
``accept-gcm`` rows mean, so it is checked here without root: the verdict each one gives, and
that the floor really runs the ESP core's AES-GCM seal on every packet.
"""

from __future__ import annotations

import pytest

from nfq_ipsec import worker
from nfq_ipsec.core import Processor, Verdict
from nfq_ipsec.core.suites import AeadSuite, make_suite
from nfq_ipsec_lab.bench import accept

SPEC = worker.WorkerSpec(queue=100, cpu=None, mark=0x10000000, policies=(), sas=())
PACKET = bytes(range(256)) * 5


class SpySuite:
    """Records what it is asked to seal, and seals it with a real suite."""

    def __init__(self) -> None:
        self.real = make_suite("aes-gcm-128", bytes(20), None, b"")
        self.calls: list[tuple[bytes, bytes, int, bytes]] = []

    def seal(self, esp_header: bytes, seq_hi: bytes, seq: int, plaintext: bytes) -> bytes:
        self.calls.append((esp_header, seq_hi, seq, plaintext))
        return self.real.seal(esp_header, seq_hi, seq, plaintext)


def test_none_accepts_without_a_payload() -> None:
    proc = accept.accept_all(SPEC)
    for res in (proc.outbound(PACKET, 0.0), proc.inbound(PACKET, 0.0)):
        assert res.verdict is Verdict.ACCEPT and res.packet is None


def test_payload_hands_the_packet_back() -> None:
    proc = accept.accept_all(SPEC, "payload")
    for res in (proc.outbound(PACKET, 0.0), proc.inbound(PACKET, 0.0)):
        assert res.verdict is Verdict.ACCEPT and res.packet == PACKET


def test_gcm_seals_every_packet_then_hands_it_back() -> None:
    spy = SpySuite()
    proc = accept.AcceptAfterSeal(Processor(SPEC.spd(), (), 0.0), spy)  # type: ignore[arg-type]
    results = [proc.outbound(PACKET, 0.0), proc.inbound(PACKET[:60], 0.0), proc.outbound(PACKET, 0.0)]
    assert [r.packet for r in results] == [PACKET, PACKET[:60], PACKET]
    assert all(r.verdict is Verdict.ACCEPT for r in results)
    # one seal per packet, in both directions, a fresh sequence number (nonce) each time,
    # over the whole packet, with an ESP header's worth of AAD
    assert [(c[2], c[3]) for c in spy.calls] == [(1, PACKET), (2, PACKET[:60]), (3, PACKET)]
    assert all(len(c[0]) == 8 and c[1] == b"" for c in spy.calls)


def test_gcm_floor_uses_the_cores_aes_gcm_suite() -> None:
    proc = accept.accept_all(SPEC, "gcm")
    inner = proc._seal.__self__  # type: ignore[attr-defined]
    assert isinstance(inner, AeadSuite) and inner.name == "aes-gcm-128"
    assert proc.outbound(PACKET, 0.0).packet == PACKET
    assert not proc.drops  # the rest comes from the empty processor


def test_unknown_work_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown work 'des'"):
        accept.accept_all(SPEC, "des")
    with pytest.raises(SystemExit):
        accept.main(["--queue", "100", "--mark", "1", "--work", "des"])

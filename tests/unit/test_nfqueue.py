"""The queue binding's netlink messages without a socket: packet messages parsed (payload,
mark, hook, input interface when asked), error replies counted, verdicts encoded and sent
together, the kernel's per-queue counters read from /proc's format."""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from nfq_ipsec import nfqueue
from nfq_ipsec.nfqueue import NetlinkQueue, QueuedPacket

MARK = 0x10000000


# -- queue binding encoding (no socket) -------------------------------------------------------
def _nlattr(atype: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), atype) + value
    return raw + b"\0" * (-len(raw) % 4)


def _packet_msg(
    packet_id: int, hook: int, payload: bytes, mark: int = 0, cap_len: int | None = None,
    indev: int = 0, skb_info: int | None = None,
) -> bytes:
    body = struct.pack("!BBH", 2, 0, 100)
    body += _nlattr(nfqueue.NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, hook) + b"\0")
    if indev:
        body += _nlattr(nfqueue.NFQA_IFINDEX_INDEV, struct.pack("!I", indev))
        body += _nlattr(6, struct.pack("!I", indev + 1))  # NFQA_IFINDEX_OUTDEV: not the input
    if mark:
        body += _nlattr(nfqueue.NFQA_MARK, struct.pack("!I", mark))
    body += _nlattr(nfqueue.NFQA_PAYLOAD, payload)
    if cap_len is not None:
        body += _nlattr(nfqueue.NFQA_CAP_LEN, struct.pack("!I", cap_len))
    if skb_info is not None:
        body += _nlattr(nfqueue.NFQA_SKB_INFO, struct.pack("!I", skb_info))
    return struct.pack("=IHHII", 16 + len(body), nfqueue.NFQNL_MSG_PACKET, 0, 0, 0) + body


def test_packet_message_parsing() -> None:
    payload = bytes(range(256)) * 40 + b"abc"  # 10243 bytes, not a multiple of 4
    msg = _packet_msg(0xDEADBEEF, 3, payload, mark=0x42, cap_len=20000)
    second = _packet_msg(1, 0, b"xy")
    both = msg + second  # one receive can hold several messages
    out: list[QueuedPacket] = []
    nfqueue.NetlinkQueue().parse(memoryview(both), len(both), out)
    assert len(out) == 2
    p, p2 = out
    assert (p.packet_id, p.hook, p.mark, p.length) == (0xDEADBEEF, 3, 0x42, 20000)
    assert p.payload == payload and type(p.payload) is bytes
    assert (p2.length, p2.payload, p2.mark) == (2, b"xy", 0)
    # A message cut short (as MSG_TRUNC reports) yields nothing rather than a partial packet.
    cut: list[QueuedPacket] = []
    nfqueue.NetlinkQueue().parse(memoryview(msg), len(msg) - 1, cut)
    assert cut == []


@pytest.mark.parametrize("want_indev", [True, False])
def test_input_interface_is_read_when_asked(want_indev: bool) -> None:
    """A gateway's worker reads the input interface (it tells inbound from forwarded by it);
    other workers skip it (it costs about 3 % of a packet's instructions)."""
    msg = _packet_msg(9, 0, b"xy", indev=0x01020304)  # an ifindex above 65535 too
    out: list[QueuedPacket] = []
    nfqueue.NetlinkQueue(want_indev=want_indev).parse(memoryview(msg), len(msg), out)
    assert [(p.packet_id, p.indev, p.payload) for p in out] == [
        (9, 0x01020304 if want_indev else 0, b"xy")]


def test_skb_info_is_read() -> None:
    """NFQA_SKB_INFO (a GSO queue's superpacket, its checksum not ready) reaches the packet;
    a packet without the attribute has none of its bits."""
    gso = nfqueue.NFQA_SKB_GSO | nfqueue.NFQA_SKB_CSUMNOTREADY
    both = _packet_msg(5, 3, b"big", skb_info=gso) + _packet_msg(6, 3, b"small")
    out: list[QueuedPacket] = []
    nfqueue.NetlinkQueue(gso=True).parse(memoryview(both), len(both), out)
    assert [(p.packet_id, p.skb_info) for p in out] == [(5, gso), (6, 0)]


def _cfg_attrs(raw: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    off = 0
    while off + 4 <= len(raw):
        alen, atype = struct.unpack_from("=HH", raw, off)
        out[atype] = raw[off + 4:off + alen]
        off += (alen + 3) & ~3
    return out


@pytest.mark.parametrize("gso", [False, True])
def test_bind_sets_gso_as_asked_and_fail_open_off(gso: bool) -> None:
    """Both flags are in the mask, so the kernel sets each as the flags say: fail-open always
    off, GSO on only when asked; the copy range is the largest (a 64 KiB superpacket)."""
    attrs = _cfg_attrs(nfqueue.NetlinkQueue(gso=gso).bind_attributes())
    (mask,) = struct.unpack("!I", attrs[nfqueue.NFQA_CFG_MASK])
    (flags,) = struct.unpack("!I", attrs[nfqueue.NFQA_CFG_FLAGS])
    assert mask == nfqueue.NFQA_CFG_F_FAIL_OPEN | nfqueue.NFQA_CFG_F_GSO
    assert flags == (nfqueue.NFQA_CFG_F_GSO if gso else 0)
    copy_range, mode = struct.unpack("!IB", attrs[nfqueue.NFQA_CFG_PARAMS])
    assert (copy_range, mode) == (0xFFFF, nfqueue.NFQNL_COPY_PACKET)


def test_parse_counts_error_replies() -> None:
    err = struct.pack("=IHHII", 36, nfqueue.NLMSG_ERROR, 0, 0, 0) + struct.pack("=i", -2) + bytes(16)
    q = nfqueue.NetlinkQueue()
    out: list[QueuedPacket] = []
    q.parse(memoryview(err), len(err), out)
    assert out == [] and q.verdict_errors == 1 and q.last_verdict_error == 2


def _decode_verdicts(data: bytes) -> list[dict[str, Any]]:
    out = []
    view = memoryview(data)
    for mtype, off, end in nfqueue._messages(view, len(data)):
        assert mtype == nfqueue.NFQNL_MSG_VERDICT
        _fam, _ver, res_id = struct.unpack_from("!BBH", data, off)
        item: dict[str, Any] = {"queue": res_id}
        pos = off + 4
        while pos + 4 <= end:
            alen, atype = struct.unpack_from("=HH", data, pos)
            value = data[pos + 4:pos + alen]
            if atype == nfqueue.NFQA_VERDICT_HDR:
                item["verdict"], item["id"] = struct.unpack("!II", value)
            elif atype == nfqueue.NFQA_MARK:
                (item["mark"],) = struct.unpack("!I", value)
            elif atype == nfqueue.NFQA_PAYLOAD:
                item["payload"] = bytes(value)
            pos += (alen + 3) & ~3
        out.append(item)
    return out


def test_verdicts_are_encoded_and_sent_together() -> None:
    q = NetlinkQueue()
    q.queue_num = 300
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    q._sock = a
    try:
        q.verdict(1, True, MARK, b"12345")  # odd payload length: padding before the next message
        q.verdict(2, False)
        q.verdict(3, True, None, b"x" * 9000)
        q.verdict(4, True, 0xFFFFFFFF)
        q.flush()
        data = b.recv(65536)
        got = _decode_verdicts(data)
    finally:
        q._sock = None
        a.close()
        b.close()
    assert got == [
        {"queue": 300, "verdict": 1, "id": 1, "mark": MARK, "payload": b"12345"},
        {"queue": 300, "verdict": 0, "id": 2},
        {"queue": 300, "verdict": 1, "id": 3, "payload": b"x" * 9000},
        {"queue": 300, "verdict": 1, "id": 4, "mark": 0xFFFFFFFF},
    ]
    with pytest.raises(ValueError, match="larger than a verdict"):
        q.verdict(5, True, None, b"\0" * (nfqueue.MAX_VERDICT_PAYLOAD + 1))


def test_kernel_queue_stats_parses_proc_format(tmp_path: Path) -> None:
    f = tmp_path / "nfnetlink_queue"
    f.write_text("  100  12345     3 2 65531    17     4      999  1\n"
                 "  101  12346     0 2 65531     0     0        7  1\n")
    stats = nfqueue.kernel_queue_stats(str(f))
    assert stats[100] == nfqueue.KernelQueueStats(100, 12345, 3, 2, 65531, 17, 4, 999)
    assert stats[101].queue_dropped == 0
    assert nfqueue.kernel_queue_stats(str(tmp_path / "missing")) == {}

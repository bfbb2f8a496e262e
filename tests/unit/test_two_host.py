"""Two hosts with mirrored SAs, and the RFC 4301/4303/6040 behaviour around the stream.

Time is a parameter everywhere; nothing here sleeps. Expected counters come from the test's
own bookkeeping of what it sent (a set-based replay model), never from the implementation.
"""

from __future__ import annotations

import random
import struct
from collections import Counter
from ipaddress import IPv4Address, IPv4Network
from itertools import pairwise

import packets
import pytest
import sas
from packets import checksum

from nfq_ipsec.core import (
    SPD,
    Action,
    DfPolicy,
    Direction,
    DropReason,
    Event,
    Lifetime,
    Mode,
    Policy,
    Processor,
    SADirection,
    SAParams,
    SecurityAssociation,
    Selector,
    Verdict,
    esp,
)
from nfq_ipsec.core.sa import SAEvent

A, B = "10.0.0.1", "10.0.0.2"
GW_A, GW_B = "192.0.2.1", "192.0.2.2"
SPI_AB, SPI_BA = 0x1AB, 0x1BA
KEY = bytes(range(1, 21))  # aes-gcm-128: 16 key bytes + 4 salt bytes
CBC_KEY, IKEY = bytes(range(16)), bytes(range(32, 64))
WINDOW = 64


def ipv4(src: str, dst: str, payload: bytes, proto: int = 17, *, tos: int = 0, flags: int = 0,
         ttl: int = 64, ident: int = 1) -> bytes:
    return packets.ipv4(src, dst, proto, payload, ident, flags, tos=tos, ttl=ttl)


def fix_checksum(pkt: bytes) -> bytes:
    hdr = bytearray(pkt[:20])
    hdr[10:12] = b"\0\0"
    hdr[10:12] = checksum(bytes(hdr)).to_bytes(2, "big")
    return bytes(hdr) + pkt[20:]


def datagram(src: str, dst: str, n: int) -> bytes:
    return ipv4(src, dst, struct.pack("!HHHH", 4000, 5000, 8 + 4, 0) + n.to_bytes(4, "big"), ident=n & 0xFFFF)


def sa(name: str, spi: int, direction: SADirection, local: str, remote: str, *, mode: Mode = Mode.TUNNEL,
       enc: str = "aes-gcm-128", key: bytes = KEY, mac: str | None = None, ikey: bytes = b"",
       lifetime: Lifetime | None = None, esn: bool = False, df: DfPolicy = DfPolicy.COPY,
       ttl: int = 64, window: int = WINDOW) -> SAParams:
    return sas.params(name, spi, direction, enc, key, mac, ikey, mode=mode, local=local, remote=remote,
                      replay_window=window, esn=esn, lifetime=lifetime or Lifetime(), df=df, ttl=ttl)


def host(me: str, peer: str, gw_me: str, gw_peer: str, out_spi: int, in_spi: int, *,
         local_net: str | None = None, remote_net: str | None = None, **kw: object) -> Processor:
    out = sa("out", out_spi, SADirection.OUT, gw_me, gw_peer, **kw)  # type: ignore[arg-type]
    inn = sa("in", in_spi, SADirection.IN, gw_me, gw_peer, **kw)  # type: ignore[arg-type]
    sel = Selector(IPv4Network(local_net or f"{me}/32"), IPv4Network(remote_net or f"{peer}/32"))
    return Processor(SPD([Policy("p", sel, Action.PROTECT, Direction.BOTH, ("out", "in"))]), [out, inn], 0.0)


def hosts(**kw: object) -> tuple[Processor, Processor]:
    return (host(A, B, GW_A, GW_B, SPI_AB, SPI_BA, **kw),  # type: ignore[arg-type]
            host(B, A, GW_B, GW_A, SPI_BA, SPI_AB, **kw))  # type: ignore[arg-type]


def in_sa(proc: Processor) -> SecurityAssociation:
    found = proc.sad.by_name("in")
    assert found is not None
    return found


def out_sa(proc: Processor) -> SecurityAssociation:
    found = proc.sad.by_name("out")
    assert found is not None
    return found


# --- a stream with loss, reordering, duplicates, old packets and forgeries ------------------


def schedule(rng: random.Random, count: int) -> list[tuple[str, int]]:
    """What the network delivers, as (kind, index into the sent packets)."""
    order = list(range(count))
    for i in range(0, count - 8, 8):  # reorder inside blocks of 8 (well inside the window)
        block = order[i : i + 8]
        rng.shuffle(block)
        order[i : i + 8] = block
    out: list[tuple[str, int]] = []
    for pos, idx in enumerate(order):
        if rng.random() < 0.1:
            continue  # lost
        if rng.random() < 0.05:
            out.append(("corrupt", idx))  # a forgery first: it must not use up the number
        out.append(("pkt", idx))
        if rng.random() < 0.08:
            out.append(("pkt", idx))  # duplicated right away
        if rng.random() < 0.04:
            out.append(("unknown_spi", idx))
        if pos > 3 * WINDOW and rng.random() < 0.05:
            out.append(("pkt", rng.randrange(0, pos - 2 * WINDOW)))  # very old, or a late replay
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_stream_counters_match_what_was_sent(seed: int) -> None:
    rng = random.Random(seed)
    a, b = hosts()
    count = 400
    sent_ab = [a.outbound(datagram(A, B, n), now=1.0) for n in range(count)]
    sent_ba = [b.outbound(datagram(B, A, n), now=1.0) for n in range(count)]
    for res in sent_ab + sent_ba:
        assert res.verdict is Verdict.ACCEPT and res.packet is not None
    for receiver, sender_dir, src, dst in ((b, sent_ab, A, B), (a, sent_ba, B, A)):
        expected_proc: Counter[DropReason] = Counter()
        expected_sa: Counter[DropReason] = Counter()
        accepted: set[int] = set()
        top = 0
        delivered: list[bytes] = []
        for kind, idx in schedule(rng, count):
            wire = sender_dir[idx].packet
            assert wire is not None
            seq = idx + 1
            if kind == "corrupt":
                bad = bytearray(wire)
                bad[-1] ^= 0x55
                wire = bytes(bad)
            elif kind == "unknown_spi":
                bad = bytearray(wire)
                bad[20:24] = (0xDEAD).to_bytes(4, "big")
                wire = bytes(bad)
            res = receiver.inbound(wire, now=2.0)
            # The model: RFC 4303 3.4.3 with the replay check before the ICV check.
            if kind == "unknown_spi":
                expected_proc[DropReason.UNKNOWN_SPI] += 1
                assert res.reason is DropReason.UNKNOWN_SPI
                continue
            new = seq not in accepted and seq > top - WINDOW
            if not new:
                expected_proc[DropReason.REPLAY] += 1
                expected_sa[DropReason.REPLAY] += 1
                assert res.reason is DropReason.REPLAY, (kind, seq, res)
            elif kind == "corrupt":
                expected_proc[DropReason.INTEGRITY] += 1
                expected_sa[DropReason.INTEGRITY] += 1
                assert res.reason is DropReason.INTEGRITY, (kind, seq, res)
            else:
                assert res.verdict is Verdict.ACCEPT, (kind, seq, res)
                assert res.packet == datagram(src, dst, idx) and res.seq == seq
                accepted.add(seq)
                top = max(top, seq)
                delivered.append(res.packet)
        assert receiver.drops == expected_proc
        assert in_sa(receiver).drops == expected_sa
        assert in_sa(receiver).packets == len(accepted) == len(delivered)
        assert expected_proc[DropReason.REPLAY] > 0 and expected_proc[DropReason.INTEGRITY] > 0
    # Outbound counters: everything sent, nothing dropped.
    for proc in (a, b):
        assert out_sa(proc).packets == count and out_sa(proc).next_seq == count + 1


# --- lifetimes ------------------------------------------------------------------------------


def test_packet_lifetime_soft_then_hard() -> None:
    a, b = hosts(lifetime=Lifetime(soft_packets=3, hard_packets=5))
    results = [a.outbound(datagram(A, B, n), now=0.0) for n in range(8)]
    assert [r.verdict for r in results] == [Verdict.ACCEPT] * 5 + [Verdict.DROP] * 3
    assert all(r.reason is DropReason.SA_EXPIRED for r in results[5:])
    events = a.drain_events()
    assert Event("out", SPI_AB, SAEvent.SOFT_EXPIRED) in events
    assert Event("out", SPI_AB, SAEvent.HARD_EXPIRED) in events
    assert events.index(Event("out", SPI_AB, SAEvent.SOFT_EXPIRED)) < events.index(
        Event("out", SPI_AB, SAEvent.HARD_EXPIRED))
    assert len(events) == 2 and a.drain_events() == []  # each reported once
    assert a.drops[DropReason.SA_EXPIRED] == 3 and out_sa(a).drops[DropReason.SA_EXPIRED] == 3
    # What was sent before the hard limit is good on the receiving side.
    got = [b.inbound(r.packet, now=0.0) for r in results[:5] if r.packet]
    assert all(g.verdict is Verdict.ACCEPT for g in got)


@pytest.mark.parametrize("direction", ["outbound", "inbound"])
def test_time_lifetime_soft_then_hard(direction: str) -> None:
    a, b = hosts(lifetime=Lifetime(soft_seconds=100.0, hard_seconds=200.0))
    sender = a if direction == "outbound" else hosts()[0]
    times = [0.0, 50.0, 99.9, 100.0, 150.0, 199.9, 200.0, 500.0]
    verdicts = []
    for n, t in enumerate(times):
        res = sender.outbound(datagram(A, B, n), now=t)
        if direction == "inbound":
            assert res.packet is not None
            res = b.inbound(res.packet, now=t)
        verdicts.append((res.verdict, res.reason))
    ok, expired = (Verdict.ACCEPT, None), (Verdict.DROP, DropReason.SA_EXPIRED)
    assert verdicts == [ok] * 6 + [expired] * 2
    proc, name = (a, "out") if direction == "outbound" else (b, "in")
    kinds = [e.kind for e in proc.drain_events() if e.sa_name == name]
    assert kinds == [SAEvent.SOFT_EXPIRED, SAEvent.HARD_EXPIRED]


def test_byte_lifetime() -> None:
    a, _ = hosts(lifetime=Lifetime(hard_bytes=3 * len(datagram(A, B, 0))))
    verdicts = [a.outbound(datagram(A, B, n), now=0.0).verdict for n in range(5)]
    assert verdicts == [Verdict.ACCEPT] * 3 + [Verdict.DROP] * 2


# --- sequence number exhaustion -------------------------------------------------------------


@pytest.mark.parametrize("esn,last", [(False, 2**32 - 1), (True, 2**64 - 1)])
def test_sequence_exhaustion_never_wraps(esn: bool, last: int) -> None:
    params = sa("out", SPI_AB, SADirection.OUT, GW_A, GW_B, esn=esn)
    out = SecurityAssociation(params, 0.0, next_seq=last - 1)
    pol = Policy("p", Selector(IPv4Network(f"{A}/32"), IPv4Network(f"{B}/32")), Action.PROTECT,
                 Direction.BOTH, ("out",))
    proc = Processor(SPD([pol]), [out], 0.0)
    results = [proc.outbound(datagram(A, B, n), now=0.0) for n in range(5)]
    assert [r.seq for r in results[:2]] == [last - 1, last]
    for r in results[:2]:
        assert r.packet is not None
        assert struct.unpack("!I", r.packet[24:28])[0] == (r.seq or 0) & 0xFFFFFFFF
    assert all((r.verdict, r.reason) == (Verdict.DROP, DropReason.SEQ_EXHAUSTED) for r in results[2:])
    assert [e.kind for e in proc.drain_events()] == [SAEvent.SEQ_EXHAUSTED]
    assert out.next_seq == last + 1  # stopped, not wrapped to 0 or 1


def test_esn_receiver_at_the_end_of_the_number_space() -> None:
    # A forged low sequence number must not push the inferred number past 2**64 - 1 (it used
    # to raise OverflowError out of Processor.inbound): it is left of the window, a replay.
    a, b = hosts(esn=True)
    out_sa(a).next_seq = 2**64 - 2
    in_sa(b).replay.update(2**64 - 3)
    sent = a.outbound(datagram(A, B, 1), now=0.0).packet
    assert sent is not None and b.inbound(sent, now=0.0).verdict is Verdict.ACCEPT
    forged = bytearray(sent)
    forged[24:28] = (5).to_bytes(4, "big")
    res = b.inbound(bytes(forged), now=0.0)
    assert (res.verdict, res.reason) == (Verdict.DROP, DropReason.REPLAY)


# --- crafted packets: padding, dummy, TFC ---------------------------------------------------


def crafted(receiver: Processor, plaintext: bytes, seq: int, spi: int = SPI_AB) -> bytes:
    """An ESP packet with exactly this plaintext, sealed with the receiver's own SA suite."""
    suite = in_sa(receiver).suite
    esp_header = struct.pack("!II", spi, seq)
    return ipv4(GW_A, GW_B, esp_header + suite.seal(esp_header, b"", seq, plaintext), 50)


def trailer(payload: bytes, next_header: int, pad: bytes | None = None) -> bytes:
    if pad is None:
        pad = bytes(range(1, esp.pad_length(len(payload), 4) + 1))
    return payload + pad + bytes((len(pad), next_header))


def test_bad_padding_is_dropped_after_authentication() -> None:
    _, b = hosts()
    inner = datagram(A, B, 1)
    bad_pad = crafted(b, trailer(inner, 4, b"\x01\x02\x04\x04"), 1)  # not 1, 2, 3, 4
    res = b.inbound(bad_pad, now=0.0)
    assert (res.verdict, res.reason) == (Verdict.DROP, DropReason.BAD_PADDING)
    too_long = crafted(b, b"\x01\x02" + bytes((200, 4)), 2)  # pad length beyond the payload
    assert b.inbound(too_long, now=0.0).reason is DropReason.BAD_PADDING
    # It was authentic, so its sequence number is used up (the window moved before the
    # trailer check, RFC 4303 3.4.3 order): sending it again is a replay.
    assert b.inbound(bad_pad, now=0.0).reason is DropReason.REPLAY
    good = crafted(b, trailer(inner, 4), 3)
    assert b.inbound(good, now=0.0).packet == inner
    # A longer valid padding (allowed by RFC 4303 2.4, up to 255) is accepted too.
    long_pad = crafted(b, trailer(inner, 4, bytes(range(1, 1 + 4 + 32))), 4)
    assert b.inbound(long_pad, now=0.0).packet == inner
    assert b.drops == Counter({DropReason.BAD_PADDING: 2, DropReason.REPLAY: 1})


def test_dummy_packet_next_header_59() -> None:
    _, b = hosts()
    res = b.inbound(crafted(b, trailer(b"\xaa" * 30, 59), 1), now=0.0)
    assert (res.verdict, res.reason) == (Verdict.DROP, DropReason.DUMMY)
    assert in_sa(b).drops == Counter({DropReason.DUMMY: 1})


def test_tunnel_tfc_padding_is_trimmed() -> None:
    _, b = hosts()
    inner = datagram(A, B, 7)
    res = b.inbound(crafted(b, trailer(inner + b"\0" * 37, 4), 1), now=0.0)
    assert res.verdict is Verdict.ACCEPT and res.packet == inner


# --- RFC 6040 ECN, DSCP, TTL, DF ------------------------------------------------------------

NOT_ECT, ECT1, ECT0, CE = 0, 1, 2, 3
# RFC 6040 section 4.2, Figure 4: rows = arriving inner header, columns = arriving outer header
# (Not-ECT, ECT(0), ECT(1), CE); None = drop.
RFC6040_DECAP = {
    NOT_ECT: {NOT_ECT: NOT_ECT, ECT0: NOT_ECT, ECT1: NOT_ECT, CE: None},
    ECT0: {NOT_ECT: ECT0, ECT0: ECT0, ECT1: ECT1, CE: CE},
    ECT1: {NOT_ECT: ECT1, ECT0: ECT1, ECT1: ECT1, CE: CE},
    CE: {NOT_ECT: CE, ECT0: CE, ECT1: CE, CE: CE},
}


@pytest.mark.parametrize("inner_ecn", [NOT_ECT, ECT0, ECT1, CE])
@pytest.mark.parametrize("outer_ecn", [NOT_ECT, ECT0, ECT1, CE])
def test_rfc6040_decapsulation(inner_ecn: int, outer_ecn: int) -> None:
    a, b = hosts()
    dscp = 0x2E << 2  # EF
    inner = ipv4(A, B, b"ecn test", tos=dscp | inner_ecn)
    sent = a.outbound(inner, now=0.0).packet
    assert sent is not None
    assert sent[1] == dscp | inner_ecn  # normal mode: the outer copies DSCP and ECN
    marked = bytearray(sent)
    marked[1] = dscp | outer_ecn  # what the path did to the outer header
    res = b.inbound(fix_checksum(bytes(marked)), now=0.0)
    want = RFC6040_DECAP[inner_ecn][outer_ecn]  # type: ignore[index]
    if want is None:
        assert res.verdict is Verdict.DROP and res.reason is not None
        return
    assert res.verdict is Verdict.ACCEPT and res.packet is not None
    assert res.packet[1] == dscp | want  # DSCP untouched, ECN per the table
    assert checksum(res.packet[:20]) == 0
    assert res.packet[2:10] == inner[2:10] and res.packet[20:] == inner[20:]


@pytest.mark.parametrize("df_policy,inner_df,outer_df", [
    (DfPolicy.COPY, True, True), (DfPolicy.COPY, False, False),
    (DfPolicy.SET, False, True), (DfPolicy.SET, True, True),
    (DfPolicy.CLEAR, True, False), (DfPolicy.CLEAR, False, False),
])
def test_tunnel_outer_header_dscp_ttl_df(df_policy: DfPolicy, inner_df: bool, outer_df: bool) -> None:
    a, b = hosts(df=df_policy, ttl=99)
    inner = ipv4(A, B, b"df", tos=0xB8, ttl=3, flags=0x4000 if inner_df else 0)
    out = a.outbound(inner, now=0.0).packet
    assert out is not None
    assert out[1] == 0xB8  # DSCP copied (RFC 4301 5.1.2.1)
    assert out[8] == 99  # a fresh TTL, not the inner one
    assert bool(out[6] & 0x40) is outer_df
    assert out[12:16] == IPv4Address(GW_A).packed and out[16:20] == IPv4Address(GW_B).packed
    assert checksum(out[:20]) == 0
    assert b.inbound(out, now=0.0).packet == inner  # the inner TTL and DF arrive unchanged


# --- policy checks --------------------------------------------------------------------------


def test_inbound_packet_outside_its_sa_selectors() -> None:
    # A's policy covers the whole 10.0.0.0/24; B only agreed to A <-> B.
    a = host(A, B, GW_A, GW_B, SPI_AB, SPI_BA, local_net="10.0.0.0/24", remote_net="10.0.0.0/24")
    b = host(B, A, GW_B, GW_A, SPI_BA, SPI_AB)
    spoof = a.outbound(datagram("10.0.0.9", B, 1), now=0.0).packet
    assert spoof is not None
    res = b.inbound(spoof, now=0.0)
    assert (res.verdict, res.reason) == (Verdict.DROP, DropReason.POLICY_MISMATCH)
    assert in_sa(b).drops == Counter({DropReason.POLICY_MISMATCH: 1})
    ok = a.outbound(datagram(A, B, 2), now=0.0).packet
    assert ok is not None and b.inbound(ok, now=0.0).verdict is Verdict.ACCEPT


def test_cleartext_no_policy_unknown_spi_no_sa() -> None:
    a, b = hosts()
    res = b.inbound(datagram(A, B, 1), now=0.0)  # cleartext where PROTECT applies
    assert (res.verdict, res.reason) == (Verdict.DROP, DropReason.CLEARTEXT_PROTECTED)
    res = b.inbound(datagram("10.9.9.9", B, 1), now=0.0)  # nothing matches: discard
    assert (res.verdict, res.reason) == (Verdict.DROP, DropReason.NO_POLICY)
    res = b.outbound(datagram(B, "10.9.9.9", 1), now=0.0)
    assert (res.verdict, res.reason) == (Verdict.DROP, DropReason.NO_POLICY)
    sent = a.outbound(datagram(A, B, 1), now=0.0).packet
    assert sent is not None
    wrong = bytearray(sent)
    wrong[20:24] = (0x7777).to_bytes(4, "big")
    res = b.inbound(bytes(wrong), now=0.0)
    assert (res.verdict, res.reason, res.sa) == (Verdict.DROP, DropReason.UNKNOWN_SPI, None)
    # An outbound SA's SPI is not an inbound SPI.
    own = bytearray(sent)
    own[20:24] = SPI_BA.to_bytes(4, "big")
    assert b.inbound(bytes(own), now=0.0).reason is DropReason.UNKNOWN_SPI
    # A PROTECT policy whose SAs this processor doesn't hold.
    elsewhere = Policy("p", Selector(), Action.PROTECT, Direction.BOTH, ("elsewhere",))
    lonely = Processor(SPD([elsewhere]), [], 0.0)
    assert lonely.outbound(datagram(A, B, 1), now=0.0).reason is DropReason.NO_SA
    assert b.drops == Counter({DropReason.CLEARTEXT_PROTECTED: 1, DropReason.NO_POLICY: 2,
                               DropReason.UNKNOWN_SPI: 2})
    assert not in_sa(b).drops


# --- IVs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("enc,key,mac,ikey,iv_len", [
    ("aes-gcm-128", KEY, None, b"", 8),
    ("chacha20-poly1305", bytes(36), None, b"", 8),
    ("aes-cbc-128", CBC_KEY, "hmac-sha256-128", IKEY, 16),
])
def test_ivs_never_repeat(enc: str, key: bytes, mac: str | None, ikey: bytes, iv_len: int) -> None:
    a, b = hosts(enc=enc, key=key, mac=mac, ikey=ikey, mode=Mode.TRANSPORT)
    ivs = []
    for n in range(1000):
        out = a.outbound(datagram(A, B, n), now=0.0).packet
        assert out is not None
        ivs.append(out[28 : 28 + iv_len])
        if n % 97 == 0:
            assert b.inbound(out, now=0.0).verdict is Verdict.ACCEPT
    assert len(set(ivs)) == 1000
    if iv_len == 16:
        # RFC 3602 wants unpredictable CBC IVs: never the plain counter, and no two IVs in a
        # row that differ like a counter does.
        assert all(iv != (n + 1).to_bytes(16, "big") for n, iv in enumerate(ivs))
        steps = {int.from_bytes(y, "big") - int.from_bytes(x, "big") for x, y in pairwise(ivs)}
        assert 1 not in steps

"""The core and the independent implementation (``nfq_ipsec.independent``) against each
other (docs/versions.md): random SAs and policies, then a random run of packets, valid, mutated and
hostile, through both (and the fuzz campaign's ``differential`` target on its seeds).
Outbound the ESP must be byte-identical (same sequence number, IV, padding); inbound the
verdict, the drop reason and the inner packet the same; and the SA state (sequence counter,
replay window top) stays in step. Where the independent version refuses (``unsupported``:
what it deliberately does not cover) the run stops comparing.

A disagreement found here is a bug in one of them: fixed, and the input kept in
``test_independent.py`` as a regression vector.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Address, IPv6Network
from typing import Any

import versions
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packets import checksum, ip4
from repo import fuzz_script

from nfq_ipsec.core import SPD, Action, Direction, Mode, Policy, Processor, SADirection, Selector
from nfq_ipsec.core.ipv6 import V6
from nfq_ipsec.core.processor import ARRIVING, FORWARDED, LEAVING
from nfq_ipsec.core.replay import ReplayWindow
from nfq_ipsec.core.sa import DfPolicy, Encapsulation, Lifetime, PeerChange, SAParams, Secret
from nfq_ipsec.core.suites import ENCRYPTION, HMACS
from nfq_ipsec.independent import Engine, Outcome
from nfq_ipsec.independent.window import Window

SUITES: list[tuple[str, str | None]] = [
    ("aes-gcm-128", None), ("aes-gcm-256", None), ("chacha20-poly1305", None),
    ("aes-cbc-128", "hmac-sha256-128"), ("aes-cbc-256", "hmac-sha384-192"),
    ("aes-cbc-128", "hmac-sha512-256"), ("null", "hmac-sha256-128"),
]
A4, B4, C4 = "10.0.0.1", "10.0.0.2", "10.9.9.9"
GW_A4, GW_B4 = "192.0.2.1", "192.0.2.2"
A6, B6, C6 = "2001:db8:a::1", "2001:db8:b::2", "2001:db8:c::9"
GW_A6, GW_B6 = "2001:db8:f::1", "2001:db8:f::2"
SPI_OUT, SPI_IN = 0x1000A, 0x2000B
# NFQ_IPSEC_FUZZ_EXAMPLES: more for a longer run (as tests/unit/test_config_fuzz.py)
DIFF = settings(max_examples=int(os.environ.get("NFQ_IPSEC_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def v6int(addr: str) -> int:
    return int(IPv6Address(addr)) | V6


# -- packets by hand ------------------------------------------------------------------------


def ipv4(src: str, dst: str, proto: int, payload: bytes, *, tos: int = 0, flags: int = 0,
         ident: int = 1, ttl: int = 64, options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, ihl * 4 + len(payload), ident, flags, ttl,
                      proto, 0, ip4(src).to_bytes(4, "big"), ip4(dst).to_bytes(4, "big")) + options
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:] + payload


def ipv6(src: str, dst: str, next_header: int, payload: bytes, *, tclass: int = 0,
         flow: int = 0, hop: int = 64) -> bytes:
    first = (6 << 28) | (tclass << 20) | flow
    return (struct.pack("!IHBB", first, len(payload), next_header, hop)
            + IPv6Address(src).packed + IPv6Address(dst).packed + payload)


@st.composite
def upper(draw: st.DrawFn, v6: bool) -> tuple[int, bytes]:
    """An upper-layer protocol and its bytes: UDP, TCP, ICMP(v6) echo or error, or other."""
    kind = draw(st.sampled_from(["udp", "tcp", "icmp", "icmp-error", "other", "short", "big"]))
    data = draw(st.binary(max_size=120))
    if kind == "big":  # past 1280 and 1500 bytes with ESP: path MTU and fragments
        kind, data = "udp", data + bytes(draw(st.sampled_from([1200, 1300, 1450])))
    sport, dport = draw(st.integers(0, 65535)), draw(st.sampled_from([53, 80, 443, 4500, 9999]))
    icmp = 58 if v6 else 1
    if kind == "udp":
        return 17, struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    if kind == "tcp":
        return 6, struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x18, 1024, 0, 0) + data
    if kind == "icmp":
        return icmp, bytes((128 if v6 else 8, 0, 0, 0)) + data
    if kind == "icmp-error":
        quoted_src, quoted_dst = (B6, A6) if v6 else (B4, A4)
        if draw(st.booleans()):
            quoted_src, quoted_dst = quoted_dst, quoted_src
        l4 = struct.pack("!HHHH", dport, sport, 8, 0)
        quoted_proto = draw(st.sampled_from([17, 17, 50]))  # 50: an error about ESP
        quote = (ipv6(quoted_src, quoted_dst, quoted_proto, l4) if v6
                 else ipv4(quoted_src, quoted_dst, quoted_proto, l4))
        error_type = draw(st.sampled_from([1, 2, 3] if v6 else [3, 11]))
        return icmp, bytes((error_type, 0, 0, 0, 0, 0, 5, 0x78)) + quote
    if kind == "short":
        return draw(st.sampled_from([6, 17, icmp])), data[:3]
    return draw(st.sampled_from([47, 132, 255, 59])), data


@st.composite
def inner_v4(draw: st.DrawFn, src: str, dst: str) -> bytes:
    proto, payload = draw(upper(False))
    flags = draw(st.sampled_from([0, 0x4000, 0x4000, 0x2000, 0x0005]))
    options = draw(st.sampled_from([b"", b"", b"\x01\x01\x01\x00"]))
    return ipv4(src, dst, proto, payload, tos=draw(st.integers(0, 255)), flags=flags,
                ident=draw(st.integers(0, 0xFFFF)), ttl=draw(st.integers(1, 255)), options=options)


@st.composite
def inner_v6(draw: st.DrawFn, src: str, dst: str) -> bytes:
    proto, payload = draw(upper(True))
    chain = draw(st.lists(st.sampled_from([0, 60, 43, 44]), max_size=3))
    body, nh = payload, proto
    for ext in reversed(chain):
        if ext == 44:
            offset = draw(st.sampled_from([0, 0, 1]))
            body = bytes((nh, 0)) + struct.pack("!HI", offset << 3, 7) + body
        elif ext == 43:
            body = bytes((nh, 0, 0, 0, 0, 0, 0, 0)) + body
        else:
            body = bytes((nh, 0, 1, 4, 0, 0, 0, 0)) + body
        nh = ext
    return ipv6(src, dst, nh, body, tclass=draw(st.integers(0, 255)),
                flow=draw(st.integers(0, 0xFFFFF)))


# -- a scenario: the SAs, the policies, and the peer that makes valid inbound ESP -----------


@dataclass
class Setup:
    v6: bool
    outer_v6: bool  # the tunnel endpoints' family (transport mode: the packets')
    policies: list[Policy]
    ours: list[SAParams]
    peer: Processor
    local: str
    remote: str
    other: str


@st.composite
def setups(draw: st.DrawFn) -> Setup:
    v6 = draw(st.booleans())
    enc, mac = draw(st.sampled_from(SUITES))
    key = draw(st.binary(min_size=ENCRYPTION[enc].keymat_size, max_size=ENCRYPTION[enc].keymat_size))
    ikey = draw(st.binary(min_size=HMACS[mac].key_size, max_size=HMACS[mac].key_size)) if mac else b""
    tunnel = draw(st.booleans())
    outer_v6 = draw(st.sampled_from([v6, v6, not v6])) if tunnel else v6  # mixed tunnels too
    udp = not v6 and not outer_v6 and draw(st.integers(0, 3)) == 0
    esn = draw(st.booleans())
    window = draw(st.sampled_from([32, 64, 128, 1024]))
    hard_packets = draw(st.sampled_from([None, None, None, 3, 12]))
    common: dict[str, Any] = dict(
        esn=esn, replay_window=window, mode=Mode.TUNNEL if tunnel else Mode.TRANSPORT,
        df=draw(st.sampled_from(list(DfPolicy))), ttl=draw(st.integers(1, 255)),
        lifetime=draw(st.sampled_from([
            Lifetime(hard_packets=hard_packets, soft_packets=2 if hard_packets else None),
            Lifetime(soft_bytes=300, hard_bytes=900), Lifetime(hard_seconds=2.0),
            Lifetime(soft_seconds=1.0)])))
    if udp:
        common.update(encapsulation=Encapsulation.UDP,
                      udp_source_port=draw(st.sampled_from([4500, 4501])),
                      udp_destination_port=4500,
                      peer_change=draw(st.sampled_from(list(PeerChange))))
    local, remote, other = (A6, B6, C6) if v6 else (A4, B4, C4)
    gw_local, gw_remote = (GW_A6, GW_B6) if outer_v6 else (GW_A4, GW_B4)
    conv = v6int if outer_v6 else ip4

    def sa(name: str, spi: int, direction: SADirection, mine: bool) -> SAParams:
        ends: dict[str, Any] = {}
        if tunnel:
            near, far = (gw_local, gw_remote) if mine else (gw_remote, gw_local)
            ends = {"tunnel_local": conv(near), "tunnel_remote": conv(far)}
        return SAParams(name, spi, direction, enc, Secret(key), mac, Secret(ikey), **common,
                        **ends)

    net = IPv6Network if v6 else IPv4Network
    bits = 128 if v6 else 32
    selector = draw(st.sampled_from([
        Selector(net(f"{local}/{bits}"), net(f"{remote}/{bits}")),
        Selector(net(f"{local}/{bits}"), net(f"{remote}/{bits}"), 17),
        Selector(net(f"{local}/{bits}"), net(f"{remote}/{bits}"), 6, (0, 32767), (80, 443)),
        Selector(net(f"{local}/{bits}"), net(f"{remote}/{bits}"), None, None, (53, 53)),
        Selector(net(f"{local}/{bits}"), net(f"{remote}/{bits}"), 58 if v6 else 1, None, None,
                 draw(st.sampled_from([None, 3, 8, 128, 1])), draw(st.sampled_from([None, 0]))),
        Selector(net(f"{local}/{bits - 8}", strict=False), net(f"{remote}/{bits - 16}", strict=False))]))
    protect = Policy("protect", selector, Action.PROTECT,
                     draw(st.sampled_from([Direction.BOTH, Direction.BOTH, Direction.OUT])),
                     ("out", "in"))
    others = [Policy("bypass", Selector(net(f"{local}/{bits}"), net(f"{other}/{bits}")),
                     Action.BYPASS, draw(st.sampled_from(list(Direction)))),
              Policy("discard", Selector(net("::/0" if v6 else "0.0.0.0/0"),
                                         net("::/0" if v6 else "0.0.0.0/0"), 6),
                     Action.DISCARD)]
    policies = [protect, *others] if draw(st.booleans()) else [*others, protect]
    ours = [sa("out", SPI_OUT, SADirection.OUT, True), sa("in", SPI_IN, SADirection.IN, True)]
    peer_sas = [sa("out", SPI_IN, SADirection.OUT, False), sa("in", SPI_OUT, SADirection.IN, False)]
    peer_protect = Policy("protect", Selector(net(f"{remote}/{bits}"), net(f"{local}/{bits}")),
                          Action.PROTECT, Direction.BOTH, ("out", "in"))
    peer = Processor(SPD([peer_protect]), peer_sas, 0.0, mtu=65535)
    return Setup(v6, outer_v6, policies, ours, peer, local, remote, other)


def mutate(draw: Any, packet: bytes) -> bytes:
    kind = draw(st.sampled_from(["none", "none", "flip", "cut", "append", "ecn", "frag",
                                 "spi", "sport", "src"]))
    data = bytearray(packet)
    if kind == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        data[at] ^= 1 << draw(st.integers(0, 7))
    elif kind == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif kind == "append":
        data += draw(st.binary(min_size=1, max_size=9))
    elif kind == "ecn" and data[0] >> 4 == 4:
        data[1] = (data[1] & ~3) | draw(st.integers(0, 3))
    elif kind == "ecn" and data[0] >> 4 == 6:
        data[1] = (data[1] & 0xCF) | (draw(st.integers(0, 3)) << 4)
    elif kind == "frag" and data[0] >> 4 == 4:
        data[6:8] = draw(st.sampled_from([0x2000, 0x0001, 0x4000])).to_bytes(2, "big")
    elif kind == "spi":
        at = (20 if data[0] >> 4 == 4 else 40) + (8 if data[9:10] == b"\x11" else 0)
        if len(data) >= at + 4:
            data[at : at + 4] = draw(st.sampled_from([SPI_OUT, 0x77, SPI_IN + 1])).to_bytes(4, "big")
    elif kind == "sport" and data[0] >> 4 == 4 and data[9] == 17 and len(data) >= 22:
        data[20:22] = draw(st.sampled_from([4500, 4501, 31337])).to_bytes(2, "big")
    elif kind == "src" and data[0] >> 4 == 4:
        data[12:16] = ip4(draw(st.sampled_from([GW_B4, "203.0.113.7", B4]))).to_bytes(4, "big")
    return bytes(data)


@st.composite
def crafted(draw: st.DrawFn, setup: Setup) -> bytes:
    """An ESP packet with a valid ICV around any plaintext: a trailer that may lie (padding,
    pad length, next header 4, 41, 59 or another), a payload that may be no packet at all."""
    sa = setup.peer.sad.by_name("out")
    assert sa is not None
    if setup.v6:
        inner = draw(inner_v6(setup.remote, setup.local))
    else:
        inner = draw(inner_v4(setup.remote, setup.local))
    payload = draw(st.sampled_from([inner, inner[20:], inner[: len(inner) // 2], b"", inner + b"\0" * 5]))
    next_header = draw(st.sampled_from([4, 41, 6, 17, 59, 58, 1, 50]))
    pad = draw(st.sampled_from([b"", b"\x01", b"\x01\x02", b"\x01\x03", b"\x00"]))
    pad_len = draw(st.sampled_from([len(pad), len(pad), 200]))
    plaintext = payload + pad + bytes((pad_len, next_header))
    align = sa.suite.align
    if len(plaintext) % align:
        plaintext = bytes(-len(plaintext) % align) + plaintext
    if sa.next_seq > sa.max_seq:
        return b""  # the peer's SA is used up (nothing to craft with)
    seq = sa.take_seq()
    header = struct.pack("!II", sa.spi, seq & 0xFFFFFFFF)
    body = sa.suite.seal(header, struct.pack("!I", seq >> 32) if sa.esn else b"", seq, plaintext)
    esp = header + body
    tunnel = sa.tunnel
    if setup.outer_v6:
        src, dst = (GW_B6, GW_A6) if tunnel else (setup.remote, setup.local)
        return ipv6(src, dst, 50, esp)
    src, dst = (GW_B4, GW_A4) if tunnel else (setup.remote, setup.local)
    if sa.udp is not None:
        udp = struct.pack("!HHHH", sa.udp.local_port, sa.udp.peer_port, 8 + len(esp), 0)
        return ipv4(src, dst, 17, udp + esp, tos=draw(st.integers(0, 3)))
    return ipv4(src, dst, 50, esp, tos=draw(st.integers(0, 3)))


def same(a: versions.Answer, b: versions.Answer) -> bool:
    if a.verdict != b.verdict or a.reason != b.reason or a.reply != b.reply:
        return False
    if a.verdict == "drop":
        return True
    return a.packet == b.packet and a.seq == b.seq and a.packets == b.packets


@given(st.data())
@DIFF
def test_core_and_independent_agree(data: st.DataObject) -> None:
    setup = data.draw(setups())
    first = data.draw(st.sampled_from([1, 1, 2**32 - 3, 2**32 + 5, 2**20]))
    core = versions.build("core", setup.policies, setup.ours, mtu=data.draw(
        st.sampled_from([1500, 1500, 9000, 200, 256])))
    ind = versions.build("independent", setup.policies, setup.ours, mtu=core.processor.mtu)  # type: ignore[attr-defined]
    esn = setup.ours[0].esn
    if first > 2**32 and not esn:
        first = 2**32 - 1
    for runner in (core, ind):
        runner.start_at("out", first)
        if first > 1:
            runner.seen_up_to("in", first - 1)
    peer_out = setup.peer.sad.by_name("out")
    assert peer_out is not None
    peer_out.next_seq = first
    sent: list[bytes] = []
    ours: list[bytes] = []  # the ESP packets we sent, for ICMP errors about them
    now = 0.0
    make_inner = inner_v6 if setup.v6 else inner_v4
    for step in range(data.draw(st.integers(1, 14))):
        now += data.draw(st.sampled_from([0.0, 0.5, 1.5, 700.0]))
        op = data.draw(st.sampled_from(["out", "out", "fwd", "in", "in", "in", "replay", "raw",
                                        "clear", "crafted", "crafted", "icmp"]))
        if op in ("out", "fwd"):
            dst = data.draw(st.sampled_from([setup.remote, setup.remote, setup.other]))
            packet = data.draw(make_inner(setup.local, dst))
            where = LEAVING if op == "out" else FORWARDED
        elif op == "in":
            inner = data.draw(make_inner(setup.remote, setup.local))
            res = setup.peer.process(inner, len(inner), LEAVING, now)
            if res.packet is None:
                continue
            packet = mutate(data.draw, res.packet)
            sent.append(packet)
            where = ARRIVING
        elif op == "icmp" and ours:
            # an ICMP error about an ESP packet we sent ("fragmentation needed" or another)
            esp = data.draw(st.sampled_from(ours))
            if esp[0] >> 4 != 4:
                continue
            kind = data.draw(st.sampled_from([(3, 4), (3, 4), (11, 0)]))
            mtu = data.draw(st.sampled_from([0, 300, 576, 1000, 1400, 9000]))
            quote = esp[: data.draw(st.sampled_from([28, 36, 20, len(esp)]))]
            message = bytes(kind) + b"\0\0\0\0" + mtu.to_bytes(2, "big") + quote
            packet = ipv4(data.draw(st.sampled_from(["198.51.100.1", GW_B4, B4])),
                          GW_A4 if esp[12:16] == bytes(map(int, GW_A4.split("."))) else A4, 1,
                          message)
            where = ARRIVING
        elif op == "crafted":
            packet = data.draw(crafted(setup))
            where = ARRIVING
        elif op == "replay" and sent:
            packet, where = data.draw(st.sampled_from(sent)), ARRIVING
        elif op == "clear":
            packet = data.draw(make_inner(data.draw(st.sampled_from([setup.remote, setup.other])),
                                          setup.local))
            where = ARRIVING
        else:
            packet = data.draw(st.binary(max_size=80))
            if packet and data.draw(st.booleans()):
                packet = (ipv6(setup.remote, setup.local, 50, packet) if setup.v6
                          else ipv4(setup.remote, setup.local, 50, packet))
            where = ARRIVING
        a = core.process(packet, where, now)
        b = ind.process(packet, where, now)
        if b.unsupported:
            return  # the independent version abstains; its state may differ from here on
        assert same(a, b), (step, op, packet.hex(), a, b)
        if where != ARRIVING and a.packet is not None:
            ours.append(a.packet)
        assert core.next_seq("out") == ind.next_seq("out"), step
        assert core.window_top("in") == ind.window_top("in"), step


# -- the fuzz campaign's differential target (scripts/fuzz.py) ------------------------------


class _FlipsOneByte(Engine):
    """A faulty independent version: every packet it hands back has its last byte flipped."""

    def process(self, data: bytes, length: int, where: int, now: float) -> Outcome:
        out = super().process(data, length, where, now)
        if out.packet:
            out.packet = out.packet[:-1] + bytes((out.packet[-1] ^ 1,))
        return out


def test_the_fuzz_target_agrees_on_its_seeds_and_notices_a_fault() -> None:
    fuzz = fuzz_script()
    seeds = fuzz.differential_seeds()
    kinds = {(s[0] >> 2) & 3 for s in seeds}
    assert kinds == {0, 1, 2}  # IPv4, ESP in UDP and IPv6 hosts all seeded
    target = fuzz.differential_target()
    for seed in seeds:
        target(seed)
    faulty = fuzz.differential_target(_FlipsOneByte)
    caught = 0
    for seed in seeds:
        try:
            faulty(seed)
        except AssertionError:
            caught += 1
    assert caught >= len(seeds) // 3, (caught, len(seeds))  # every seed that yields bytes


# -- the two replay windows, operation by operation -------------------------------------------


@given(st.sampled_from([32, 33, 64, 100, 128, 1024, 65536]), st.booleans(),
       st.integers(0, 2**64 - 1), st.lists(st.tuples(st.booleans(), st.integers(-70000, 70000),
                                                   st.integers(0, 2**32 - 1)), max_size=60))
@settings(max_examples=400, deadline=None)
def test_replay_windows_agree(size: int, esn: bool, start: int,
                              steps: list[tuple[bool, int, int]]) -> None:
    """The core's RFC 6479 window and the independent RFC 4303 bitmap: the same full number
    inferred from each low half (ESN), the same check, the same top, after any run of
    authenticated numbers (near the top, or anywhere)."""
    core = ReplayWindow(size, esn)
    mine = Window(size, esn)
    if not esn:
        start %= 2**32
    if start:
        core.update(start)
        mine.record(start)
    for near, offset, low in steps:
        seq_lo = ((core.top + offset) if near else low) % 2**32
        full = core.infer(seq_lo)
        assert mine.full_number(seq_lo) == full, (core.top, seq_lo)
        fresh = core.check(full)
        assert mine.fresh(full) == fresh, (core.top, full)
        if fresh:
            core.update(full)
            mine.record(full)
        assert mine.top == core.top

"""The independent ESP implementation (``nfq_ipsec.independent``) beside the core (through
``versions``) where the differential test reaches only now and then: path MTU (learned from
"fragmentation needed", packets too big sent with DF cleared or dropped with an ICMP error to
their sender, rate-limited), fragments of its own ESP packets, mixed tunnels, NAT keepalives;
and what it refuses as ``unsupported`` (docs/independent.md lists each case).
"""

from __future__ import annotations

import struct
from dataclasses import replace
from ipaddress import IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest
import sas
import versions
from packets import DF, ip4, ipv4, udp

from nfq_ipsec.core import Action, Direction, Mode, Policy, SADirection, SAParams, Selector
from nfq_ipsec.core.ipv6 import V6
from nfq_ipsec.core.processor import FORWARDED, LEAVING
from nfq_ipsec.core.sa import Encapsulation
from nfq_ipsec.independent import Engine

A, B = "10.0.0.1", "10.0.0.2"
GW_A, GW_B = "192.0.2.1", "192.0.2.2"
A6, B6 = "2001:db8::1", "2001:db8::2"


def pair(*, tunnel: tuple[int, int] | None = None, v6: bool = False,
         **more: Any) -> tuple[list[Policy], list[SAParams]]:
    """A protect policy A <-> B (IPv4, or IPv6) with SAs "out" and "in"; ``tunnel``: the
    endpoint ints (either family)."""
    mode = Mode.TUNNEL if tunnel else Mode.TRANSPORT
    sa_list = [sas.params(n, s, d, mode=mode, **more)
               for n, s, d in (("out", 0x301, SADirection.OUT), ("in", 0x302, SADirection.IN))]
    if tunnel is not None:
        sa_list = [replace(p, tunnel_local=tunnel[0], tunnel_remote=tunnel[1]) for p in sa_list]
    if v6:
        sel = Selector(IPv6Network(f"{A6}/128"), IPv6Network(f"{B6}/128"))
    else:
        sel = Selector(IPv4Network(f"{A}/32"), IPv4Network(f"{B}/32"))
    return [Policy("p", sel, Action.PROTECT, Direction.BOTH, ("out", "in"))], sa_list


def both(policies: list[Policy], sa_list: list[SAParams], mtu: int = 1500) -> tuple[
        versions.Runner, versions.Runner]:
    return (versions.build("core", policies, sa_list, mtu=mtu),
            versions.build("independent", policies, sa_list, mtu=mtu))


def v6int(addr: str) -> int:
    return int(IPv6Address(addr)) | V6


def ipv6_udp(src: str, dst: str, size: int) -> bytes:
    body = struct.pack("!HHHH", 1000, 2000, 8 + size, 0) + bytes(size)
    return (struct.pack("!IHBB", 0x60000000, len(body), 17, 64) + IPv6Address(src).packed
            + IPv6Address(dst).packed + body)


def big(size: int) -> bytes:
    return ipv4(A, B, 17, struct.pack("!HHHH", 1, 2, 8 + size, 0) + bytes(size), frag=DF)


def test_a_forwarded_packet_too_big_is_dropped_and_its_sender_told_as_by_the_core() -> None:
    core, ind = both(*pair(tunnel=(ip4(GW_A), ip4(GW_B))), mtu=600)
    packet = big(700)
    a = core.process(packet, FORWARDED)
    b = ind.process(packet, FORWARDED)
    assert (a.verdict, a.reason) == (b.verdict, b.reason) == ("drop", "path_mtu")
    assert a.reply is not None and a.reply == b.reply  # "fragmentation needed", the same bytes
    assert core.next_seq("out") == ind.next_seq("out") == 1
    small = big(100)  # one that fits goes out the same from both, with the first number
    assert core.process(small, FORWARDED).packet == ind.process(small, FORWARDED).packet


def test_replies_are_rate_limited_alike() -> None:
    core, ind = both(*pair(tunnel=(ip4(GW_A), ip4(GW_B))), mtu=600)
    told = []
    for now in (0.0, 0.5, 1.0, 1.2, 2.5):
        answers = [[v.process(big(700), FORWARDED, now).reply is not None for _ in range(120)]
                   for v in (core, ind)]
        assert answers[0] == answers[1]
        told.append(sum(answers[0]))
    assert told == [100, 0, 100, 0, 100]  # 100 in each window of a second


@pytest.mark.parametrize("tunnel", [False, True], ids=["transport", "tunnel-to-its-peer"])
def test_a_local_packet_too_big_leaves_with_df_cleared_as_from_the_core(tunnel: bool) -> None:
    """Local, to the SA's peer itself (transport mode, or a tunnel whose remote end is the
    packet's destination): the ESP packet leaves with DF cleared, for the path to fragment."""
    policies, sa_list = pair(tunnel=(ip4(GW_A), ip4(B)) if tunnel else None)
    core, ind = both(policies, sa_list, mtu=600)
    packet = big(700)
    a = core.process(packet, LEAVING)
    b = ind.process(packet, LEAVING)
    assert a.verdict == b.verdict == "accept" and a.packet is not None
    assert a.packet == b.packet
    assert not struct.unpack_from("!H", a.packet, 6)[0] & DF


@pytest.mark.parametrize("reported", [0, 700, 1400])
def test_fragmentation_needed_about_our_esp_sets_the_path_mtu_as_in_the_core(reported: int) -> None:
    """RFC 1191 through both: the learned MTU (a report of 0 read from the plateaus) then
    decides which packets are too big, until it ages out after ten minutes."""
    core, ind = both(*pair(tunnel=(ip4(GW_A), ip4(GW_B))))
    first = big(1000)
    esp = core.process(first, FORWARDED)
    assert esp.packet is not None and ind.process(first, FORWARDED).packet == esp.packet
    error = ipv4("198.51.100.1", GW_A, 1,
                 bytes((3, 4, 0, 0, 0, 0)) + reported.to_bytes(2, "big") + esp.packet[:28])
    assert core.inbound(error, 1.0).verdict == ind.inbound(error, 1.0).verdict == "accept"
    verdicts = []
    for now in (2.0, 3.0, 700.0, 701.0):  # learned at 1.0, aged out at 601.0
        a, b = core.process(first, FORWARDED, now), ind.process(first, FORWARDED, now)
        assert (a.verdict, a.reason, a.packet, a.reply) == (b.verdict, b.reason, b.packet, b.reply)
        verdicts.append(a.verdict)
    # 700 is below the packet; 0, and 1400 (not below the packet it quotes: no real report)
    # read as the plateau below it, 1006: too small for it either way, until aged out
    assert verdicts == ["drop", "drop", "accept", "accept"]
    smaller = big(400)  # fits the learned MTU (never below 576)
    error_again = ipv4("198.51.100.1", GW_A, 1,
                       bytes((3, 4, 0, 0, 0, 0)) + reported.to_bytes(2, "big") + esp.packet[:28])
    core.inbound(error_again, 702.0)
    ind.inbound(error_again, 702.0)
    a, b = core.process(smaller, FORWARDED, 703.0), ind.process(smaller, FORWARDED, 703.0)
    assert a.verdict == b.verdict == "accept" and a.packet == b.packet
    wrong_peer = ipv4("198.51.100.1", GW_A, 1, bytes((3, 4, 0, 0, 0, 0, 2, 0)) + esp.packet[:16]
                      + ip4("203.0.113.9").to_bytes(4, "big") + esp.packet[20:28])
    assert core.inbound(wrong_peer).reason == ind.inbound(wrong_peer).reason == "policy_mismatch"


@pytest.mark.parametrize("mtu", [1500, 300], ids=["whole", "fragmented"])
def test_mixed_tunnels_outbound_cross_as_from_the_core(mtu: int) -> None:
    """4-in-6 and 6-in-4: the ESP packet of the other family (``cross``), in fragments made
    here when it is too big for the interface (IPv6 ones with the shell's identification)."""
    core, ind = both(*pair(tunnel=(v6int("2001:db8:f::1"), v6int("2001:db8:f::2"))), mtu=mtu)
    packet = ipv4(A, B, 17, struct.pack("!HHHH", 1, 2, 408, 0) + bytes(400), frag=0)  # no DF
    a, b = core.outbound(packet), ind.outbound(packet)
    assert a.verdict == b.verdict == "cross"
    assert a.packets == b.packets and len(a.packets) == (1 if mtu == 1500 else 2)
    core6, ind6 = both(*pair(tunnel=(ip4(GW_A), ip4(GW_B)), v6=True), mtu=mtu)
    packet6 = ipv6_udp(A6, B6, 400)
    a, b = core6.outbound(packet6), ind6.outbound(packet6)
    assert a.verdict == b.verdict == "cross"
    assert a.packets == b.packets and len(a.packets) == (1 if mtu == 1500 else 2)


def test_a_mixed_tunnel_inbound_crosses_as_in_the_core() -> None:
    """4-in-6 arriving: an IPv4 packet out of an IPv6 one, handed back as ``cross``."""
    ends = (v6int("2001:db8:f::1"), v6int("2001:db8:f::2"))
    policies, sa_list = pair(tunnel=ends)
    peer_sas = [replace(sas.params("out", 0x302, SADirection.OUT, mode=Mode.TUNNEL),
                        tunnel_local=ends[1], tunnel_remote=ends[0])]
    sender = versions.build("core", [Policy("p", Selector(IPv4Network(f"{B}/32"), IPv4Network(f"{A}/32")),
                                            Action.PROTECT, Direction.OUT, ("out",))], peer_sas)
    esp = sender.outbound(udp(B, A, 2, 1, b"from the peer"))
    assert esp.verdict == "cross" and esp.packet is not None
    core, ind = both(policies, sa_list)
    a, b = core.inbound(esp.packet), ind.inbound(esp.packet)
    assert a.verdict == b.verdict == "cross"
    assert a.packet == b.packet == udp(B, A, 2, 1, b"from the peer")


def test_a_local_ipv6_packet_too_big_for_the_path_goes_in_the_cores_fragments() -> None:
    core, ind = both(*pair(v6=True), mtu=1280)
    packet = ipv6_udp(A6, B6, 1300)
    a, b = core.outbound(packet), ind.outbound(packet)
    assert a.verdict == b.verdict == "replace"
    assert a.packets == b.packets and len(a.packets) == 2


def test_a_forwarded_ipv6_packet_too_big_goes_on_and_its_sender_is_told() -> None:
    core, ind = both(*pair(v6=True), mtu=1280)
    packet = ipv6_udp(A6, B6, 1300)
    a, b = core.process(packet, FORWARDED), ind.process(packet, FORWARDED)
    assert a.verdict == b.verdict == "accept" and a.packet == b.packet
    assert a.reply is not None and a.reply == b.reply  # "packet too big", the same bytes


def test_no_superpacket_entry() -> None:
    """GSO superpackets (``Processor.process_offloaded``) are the core's alone: a worker with
    ``daemon.gso`` can't run this implementation."""
    assert not hasattr(Engine, "process_offloaded")


def test_nat_keepalives_are_the_cores() -> None:
    policies, sa_list = pair(tunnel=(ip4(GW_A), ip4(GW_B)), encapsulation=Encapsulation.UDP,
                             keepalive=20.0)
    core = versions.build("core", policies, sa_list)
    engine = Engine(policies, sa_list, 0.0)
    processor = core.processor  # type: ignore[attr-defined]
    for now in (0.0, 25.0, 30.0, 50.0):
        assert engine.keepalives(now) == processor.keepalives(now), now
    assert engine.keepalives(100.0)  # one is due, and it is the core's byte for byte


def test_keys_show_nowhere() -> None:
    policies, sa_list = pair()
    engine = Engine(policies, sa_list, 0.0)
    key = sa_list[0].key.reveal()
    for text in (repr(engine.sa("out")), str(engine.sa("out").transform), repr(engine.db.rules)):
        assert key.hex() not in text and str(key) not in text

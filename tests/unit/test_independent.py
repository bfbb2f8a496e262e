"""The independent ESP implementation (``nfq_ipsec.independent``) where it differs from the
core on purpose: what it refuses as ``unsupported`` (docs/independent.md lists each case),
that a refusal leaves its state where the core's is, and the parts the differential test
reaches only now and then (a local packet too big for the path sent with DF cleared,
fragments of its own ESP packets, mixed tunnels, NAT keepalives). Side by side with the core
through ``versions``.
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
from nfq_ipsec.independent import UNSUPPORTED, Engine

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


def test_a_forwarded_packet_too_big_is_refused_and_takes_no_number() -> None:
    core, ind = both(*pair(tunnel=(ip4(GW_A), ip4(GW_B))), mtu=600)
    packet = big(700)
    a = core.process(packet, FORWARDED)
    b = ind.process(packet, FORWARDED)
    assert (a.verdict, a.reason) == ("drop", "path_mtu")  # and the core tells the sender
    assert (b.verdict, b.reason) == ("drop", UNSUPPORTED)
    assert core.next_seq("out") == ind.next_seq("out") == 1
    # one that fits goes out the same from both, with the first number
    small = big(100)
    assert core.process(small, FORWARDED).packet == ind.process(small, FORWARDED).packet


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


def test_an_icmp_error_about_our_esp_is_refused_and_learns_nothing() -> None:
    core, ind = both(*pair(tunnel=(ip4(GW_A), ip4(GW_B))))
    esp = core.outbound(udp(A, B, 1, 2, b"x"))
    assert esp.packet is not None
    ind.outbound(udp(A, B, 1, 2, b"x"))
    quote = esp.packet[:28]
    error = ipv4("198.51.100.1", GW_A, 1, bytes((3, 4, 0, 0, 0, 0, 2, 0x40)) + quote)
    assert ind.inbound(error).reason == UNSUPPORTED
    assert core.inbound(error).verdict == "accept"  # the core learns the path MTU from it


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


def test_a_forwarded_ipv6_packet_too_big_is_refused_with_the_number_taken() -> None:
    """The core sends it on and tells its sender "packet too big"; this version refuses it,
    taking the sequence number the core took."""
    core, ind = both(*pair(v6=True), mtu=1280)
    packet = ipv6_udp(A6, B6, 1300)
    a, b = core.process(packet, FORWARDED), ind.process(packet, FORWARDED)
    assert a.verdict == "accept" and a.packet is not None
    assert b.reason == UNSUPPORTED
    assert core.next_seq("out") == ind.next_seq("out") == 2
    fits = ipv6_udp(A6, B6, 100)
    assert core.process(fits, FORWARDED).packet == ind.process(fits, FORWARDED).packet


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

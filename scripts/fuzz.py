#!/usr/bin/env python3
"""The fuzz campaign behind ``scripts/fuzz``: long runs against the inputs an attacker or a
careless operator controls. Properties (any other exception is a finding):

- ``config``: bytes -> UTF-8 text -> TOML -> ``parse_config``: a Config (which then renders into
  iptables rules) or ConfigError, nothing else. Seeds: the example configurations.
- ``packets``: bytes -> ``Processor.inbound`` and ``Processor.outbound`` of a host holding
  AES-GCM, ChaCha20-Poly1305 and AES-CBC+HMAC SAs in transport and tunnel mode: always a
  Result (ACCEPT or DROP with a reason), never an exception. Seeds: genuine ESP from the peer.
- ``udp``: bytes -> the UDP payload of a datagram to port 4500 -> ``Processor.inbound`` of a
  host holding SAs of ESP in UDP (RFC 3948; tunnel and transport mode, one following a new
  peer): a Result, never an exception; only the non-ESP marker and genuine ESP are accepted.
  Seeds: genuine ESP in UDP from the peer, the marker, a keepalive, runts.
- ``ipv6``: bytes -> ``Processor.process`` of an IPv6 host (transport mode, a 6-in-6 and a
  4-in-6 tunnel), arriving, leaving or forwarded: a Result (a DROP always with a reason), and
  a decrypted packet only from input that holds ESP genuinely sealed by the peer (the outer
  headers, which ESP does not cover, may be anything). Seeds: genuine ESP in transport and
  tunnel mode, behind extension-header chains (up to the bound and past it), in fragments and
  atomic fragments, ICMPv6 errors quoting ESP, cleartext leaving.
- ``differential``: bytes -> the same packet through the core's ``Processor`` and the
  independent implementation's ``Engine`` (``nfq_ipsec.independent``), each fresh and built
  from the same policies and SAs (the hosts of ``packets``, ``udp`` and ``ipv6``), arriving,
  leaving or forwarded: the same verdict, drop reason and bytes, unless the independent one
  refuses the packet as unsupported (what it deliberately does not do). Seeds: those of the
  three packet targets.
- ``ike``: bytes -> the IKE agent's dispatcher (``nfq_ipsec.ike.dispatch``) holding one
  established IKE SA with its Child SA, from the configured peer's address: never an
  exception; nothing new established, rekeyed or deleted, and the SA never failed, unless the
  input is a message the peer genuinely sealed. Seeds: the peer's IKE_SA_INIT, liveness
  checks, a Child SA and an IKE SA rekey, deletes, a COOKIE exchange.

Engines: atheris (coverage-guided libFuzzer, ``pip install atheris``) when it imports, else
hypothesis (random and structured generation). Each target runs in a process of its own for
``--seconds``; findings are written to ``--out`` (default fuzz-results/) and the summary is
printed and saved as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TARGETS = ("config", "packets", "udp", "ipv6", "differential", "ike")


# -- targets ---------------------------------------------------------------------------------------
def config_target() -> Any:
    import tomllib

    from nfq_ipsec import rules
    from nfq_ipsec.config.loader import parse_config
    from nfq_ipsec.core import ConfigError

    def one(data: bytes) -> None:
        try:
            doc = tomllib.loads(data.decode("utf-8", errors="replace"))
        except tomllib.TOMLDecodeError:
            return
        try:
            cfg = parse_config(doc, base_dir=Path("/nonexistent-nfq-fuzz"), online_cpus=[0, 1])
        except ConfigError as err:
            assert err.problems and all(":" in p for p in err.problems)
            return
        rules.render(cfg)

    return one


def config_seeds() -> list[bytes]:
    seeds = [p.read_bytes() for p in sorted((REPO / "nfq_ipsec" / "examples").glob("*.toml"))]
    # the examples name key files; an inline-key variant reaches the SA and policy checks
    key = "0x" + "5a" * 20
    seeds.append(re.sub(rb'key_file = "[^"]*"', f'key = "{key}"'.encode(), seeds[0]))
    return seeds


def _host() -> tuple[Any, Any]:
    """Host A (the fuzz target) and its peer B, with mirrored SAs."""
    from ipaddress import IPv4Address

    from nfq_ipsec.core import (
        SPD,
        Action,
        Direction,
        Mode,
        Policy,
        Processor,
        SADirection,
        SAParams,
        Secret,
        Selector,
    )

    suites = [("aes-gcm-128", None, 20, 0, Mode.TRANSPORT, False),
              ("chacha20-poly1305", None, 36, 0, Mode.TUNNEL, True),
              ("aes-cbc-128", "hmac-sha256-128", 16, 32, Mode.TRANSPORT, True)]
    a, b = int(IPv4Address("10.0.0.1")), int(IPv4Address("10.0.0.2"))

    def host(me: int, peer: int, out_base: int, in_base: int) -> Any:
        sas, pols = [], []
        for i, (enc, mac, klen, ilen, mode, esn) in enumerate(suites):
            for direction, base in ((SADirection.OUT, out_base), (SADirection.IN, in_base)):
                sas.append(SAParams(
                    f"{direction.value}{i}", base + i, direction, enc, Secret(bytes([i + 1]) * klen),
                    mac, Secret(bytes([i + 7]) * ilen), mode=mode, esn=esn, tunnel_local=me,
                    tunnel_remote=peer))
            local = f"10.0.{i}.1/32" if me == a else f"10.0.{i}.2/32"
            remote = f"10.0.{i}.2/32" if me == a else f"10.0.{i}.1/32"
            from ipaddress import IPv4Network
            pols.append(Policy(f"p{i}", Selector(IPv4Network(local), IPv4Network(remote)),
                               Action.PROTECT, Direction.BOTH, (f"out{i}", f"in{i}")))
        pols.append(Policy("rest", Selector(), Action.BYPASS, Direction.BOTH, ()))
        return Processor(SPD(pols), sas, 0.0)

    return host(a, b, 0x1000, 0x2000), host(b, a, 0x2000, 0x1000)


def packets_target() -> Any:
    from nfq_ipsec.core import Result

    proc, _ = _host()

    def one(data: bytes) -> None:
        if not data:
            return
        res = proc.inbound(data[1:], 1.0) if data[0] & 1 else proc.outbound(data[1:], 1.0)
        assert isinstance(res, Result)

    return one


def packets_seeds() -> list[bytes]:
    import struct

    _, peer = _host()
    seeds = []
    for i in range(3):
        for size in (0, 40, 1400):
            body = struct.pack("!HHHH", 1000, 2000, 8 + size, 0) + bytes(size)
            hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 1, 0x4000, 64, 17, 0,
                              bytes([10, 0, i, 2]), bytes([10, 0, i, 1]))
            res = peer.outbound(hdr + body, 1.0)
            if res.packet is not None:
                seeds.append(b"\x01" + res.packet)  # ESP for A's inbound side
            # the same datagram leaving A: protected by A's outbound SA i
            mine = hdr[:12] + bytes([10, 0, i, 1]) + bytes([10, 0, i, 2])
            seeds.append(b"\x00" + mine + body)
    return seeds


def _udp_host() -> tuple[Any, Any]:
    """Host A and its peer B with SAs of ESP in UDP: A's in0 (tunnel) follows a new peer,
    in1 (transport) does not."""
    from ipaddress import IPv4Address, IPv4Network

    from nfq_ipsec.core import (
        SPD,
        Action,
        Direction,
        Mode,
        Policy,
        Processor,
        SADirection,
        SAParams,
        Secret,
        Selector,
    )
    from nfq_ipsec.core.sa import Encapsulation, PeerChange

    a, b = int(IPv4Address("10.0.0.1")), int(IPv4Address("10.0.0.2"))

    def host(me: int, peer: int, out_base: int, in_base: int) -> Any:
        sas, pols = [], []
        for i, mode in enumerate((Mode.TUNNEL, Mode.TRANSPORT)):
            tunnel = {"tunnel_local": me, "tunnel_remote": peer} if mode is Mode.TUNNEL else {}
            for direction, base in ((SADirection.OUT, out_base), (SADirection.IN, in_base)):
                sas.append(SAParams(
                    f"{direction.value}{i}", base + i, direction, "aes-gcm-128",
                    Secret(bytes([base >> 8, i + 1]) * 10), mode=mode,
                    encapsulation=Encapsulation.UDP,
                    peer_change=PeerChange.FOLLOW if i == 0 else PeerChange.DROP,
                    **tunnel))  # type: ignore[arg-type]
            if mode is Mode.TUNNEL:
                local = f"10.9.0.{1 if me == a else 2}/32"
                remote = f"10.9.0.{2 if me == a else 1}/32"
            else:
                local, remote = (f"{IPv4Address(me)}/32", f"{IPv4Address(peer)}/32")
            pols.append(Policy(f"p{i}", Selector(IPv4Network(local), IPv4Network(remote)),
                               Action.PROTECT, Direction.BOTH, (f"out{i}", f"in{i}")))
        return Processor(SPD(pols), sas, 0.0)

    return host(a, b, 0x1000, 0x2000), host(b, a, 0x2000, 0x1000)


def _datagram(payload: bytes, sport: int = 4500) -> bytes:
    """IPv4 10.0.0.2 -> 10.0.0.1, UDP to 4500 (checksum 0) around ``payload``."""
    import struct

    udp = struct.pack("!HHHH", sport, 4500, 8 + len(payload), 0) + payload
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0x4000, 64, 17, 0,
                       bytes([10, 0, 0, 2]), bytes([10, 0, 0, 1])) + udp


def udp_target() -> Any:
    from nfq_ipsec.core import Result, Verdict

    proc, _ = _udp_host()

    def one(data: bytes) -> None:
        res = proc.inbound(_datagram(data[1:], 4500 + (data[0] & 3) if data else 4500), 1.0)
        assert isinstance(res, Result)
        if res.verdict is Verdict.ACCEPT:
            assert res.packet is not None or data[1:5] == b"\0\0\0\0"
        else:
            assert res.reason is not None and res.packet is None

    return one


def udp_seeds() -> list[bytes]:
    import struct

    _, peer = _udp_host()
    seeds = [b"\x00\xff", b"\x00\0\0\0\0ike", b"\x00", b"\x00\0\0\x20\x00\0\0\0"]
    for dst_last, proto in ((1, 1), (1, 17)):
        body = bytes(8) + bytes(40)
        src = bytes([10, 9, 0, 2]) if proto == 1 else bytes([10, 0, 0, 2])
        dst = bytes([10, 9, 0, dst_last]) if proto == 1 else bytes([10, 0, 0, 1])
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 1, 0x4000, 64, proto, 0,
                          src, dst)
        res = peer.outbound(hdr + body, 1.0)
        if res.packet is not None:
            seeds.append(b"\x00" + res.packet[28:])  # the UDP payload: ESP
    return seeds


A6, B6 = "2001:db8::1", "2001:db8::2"  # the IPv6 hosts, and the tunnels' endpoints


def _host6() -> tuple[Any, Any]:
    """IPv6 host A (the fuzz target) and its peer B, with mirrored SAs: transport mode between
    them (AES-GCM), a 6-in-6 tunnel (ChaCha20-Poly1305, ESN) for 2001:db8:1::/48 and
    2001:db8:2::/48 and a 4-in-6 tunnel (AES-CBC with HMAC) for 10.1.0.0/16 and 10.2.0.0/16;
    other IPv6 bypassed."""
    from ipaddress import IPv4Network, IPv6Address, IPv6Network

    from nfq_ipsec.core import (
        SPD,
        Action,
        Direction,
        Mode,
        Policy,
        Processor,
        SADirection,
        SAParams,
        Secret,
        Selector,
        ipv6,
    )

    a, b = (ipv6.V6 | int(IPv6Address(x)) for x in (A6, B6))
    kinds = [("aes-gcm-128", None, 20, 0, Mode.TRANSPORT, False),
             ("chacha20-poly1305", None, 36, 0, Mode.TUNNEL, True),
             ("aes-cbc-128", "hmac-sha256-128", 16, 32, Mode.TUNNEL, False)]

    def host(me: int, peer: int, out_base: int, in_base: int, side: int) -> Any:
        sas, pols = [], []
        for i, (enc, mac, klen, ilen, mode, esn) in enumerate(kinds):
            ends = {"tunnel_local": me, "tunnel_remote": peer} if mode is Mode.TUNNEL else {}
            for direction, base in ((SADirection.OUT, out_base), (SADirection.IN, in_base)):
                sas.append(SAParams(
                    f"{direction.value}{i}", base + i, direction, enc, Secret(bytes([i + 1]) * klen),
                    mac, Secret(bytes([i + 7]) * ilen), mode=mode, esn=esn,
                    **ends))  # type: ignore[arg-type]
        nets: list[tuple[Any, Any]] = [
            (IPv6Network(f"{A6 if side == 1 else B6}/128"), IPv6Network(f"{B6 if side == 1 else A6}/128")),
            (IPv6Network(f"2001:db8:{side}::/48"), IPv6Network(f"2001:db8:{3 - side}::/48")),
            (IPv4Network(f"10.{side}.0.0/16"), IPv4Network(f"10.{3 - side}.0.0/16"))]
        for i, (local, remote) in enumerate(nets):
            pols.append(Policy(f"p{i}", Selector(local, remote), Action.PROTECT, Direction.BOTH,
                               (f"out{i}", f"in{i}")))
        pols.append(Policy("rest", Selector(IPv6Network("::/0"), IPv6Network("::/0")),
                           Action.BYPASS, Direction.BOTH, ()))
        return Processor(SPD(pols), sas, 0.0)

    return host(a, b, 0x1000, 0x2000, 1), host(b, a, 0x2000, 0x1000, 2)


def _v6(src: str, dst: str, nh: int, body: bytes) -> bytes:
    import socket
    import struct

    return (struct.pack("!IHBB", 0x60000000, len(body), nh, 64)
            + socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst) + body)


def _chain(kinds: list[int], last: int) -> bytes:
    """Extension headers of these kinds (8 bytes each; fragment headers atomic), in order."""
    out = b""
    for i, kind in enumerate(kinds):
        nh = kinds[i + 1] if i + 1 < len(kinds) else last
        out += bytes((nh, 0, 0, 0, 0, 0, 0, 1)) if kind == 44 else bytes((nh, 0, 1, 4, 0, 0, 0, 0))
    return out


def ipv6_genuine() -> tuple[list[bytes], list[bytes]]:
    """What the peer sealed for host A, as whole IPv6 ESP packets and as their ESP parts
    (header to ICV: what authenticates them)."""
    import struct

    from nfq_ipsec.core.processor import FORWARDED, LEAVING

    _, peer = _host6()
    packets = []
    for size in (0, 40, 1000):
        udp = struct.pack("!HHHH", 1000, 2000, 8 + size, 0) + bytes(size)
        icmp = bytes((128, 0, 0, 0, 0, 1, 0, 1)) + bytes(size)
        for inner, where in ((_v6(B6, A6, 17, udp), LEAVING), (_v6(B6, A6, 58, icmp), LEAVING),
                             (_v6("2001:db8:2::5", "2001:db8:1::5", 17, udp), FORWARDED)):
            res = peer.process(inner, len(inner), where, 1.0)
            assert res.packet is not None, res
            packets.append(res.packet)
        four = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0x4000, 64, 17, 0,
                           bytes([10, 2, 0, 5]), bytes([10, 1, 0, 5])) + udp
        res = peer.process(four, len(four), FORWARDED, 1.0)
        assert res.packet is not None, res
        packets.append(res.packet)
    return packets, [p[40:] for p in packets]


def ipv6_target() -> Any:
    """One fresh host A per input (its replay windows empty), so any genuine ESP can pass."""
    from nfq_ipsec.core import Result, Verdict
    from nfq_ipsec.core.processor import ARRIVING, FORWARDED, LEAVING

    _, esp_parts = ipv6_genuine()

    def one(data: bytes) -> None:
        if not data:
            return
        proc, _ = _host6()
        where = (ARRIVING, LEAVING, FORWARDED, ARRIVING)[data[0] & 3]
        packet = data[1:]
        res = proc.process(packet, len(packet), where, 1.0)
        assert isinstance(res, Result)
        if res.verdict is Verdict.DROP:
            assert res.reason is not None and res.packet is None
        elif where == ARRIVING and res.packet is not None:  # decrypted: the ESP must be genuine
            assert any(part in packet for part in esp_parts), "a decrypted packet that no one sealed"

    return one


def ipv6_seeds() -> list[bytes]:
    """Genuine ESP in transport and tunnel mode, behind chains, in fragments, quoted in ICMPv6
    errors; cleartext for the outbound side."""
    import struct

    packets, parts = ipv6_genuine()
    seeds = [b"\x00" + p for p in packets]
    esp = parts[0]
    for kinds in ([0, 60], [0, 43, 60], [60] * 8, [60] * 9, [44], [44, 44], [60, 0]):
        seeds.append(b"\x00" + _v6(B6, A6, kinds[0], _chain(kinds, 50) + esp))
    big = parts[8]  # a transport packet of 1000 bytes in two fragments
    for offset, more, piece in ((0, 1, big[:512]), (512, 0, big[512:])):
        seeds.append(b"\x00" + _v6(B6, A6, 44, struct.pack("!BBHI", 50, 0, offset | more, 7) + piece))
    mine, _ = _host6()
    udp = struct.pack("!HHHH", 2000, 1000, 48, 0) + bytes(40)
    out = mine.process(_v6(A6, B6, 17, udp), 88, 1, 1.0).packet
    assert out is not None
    for kind, code in ((2, 0), (1, 4), (3, 0), (4, 0)):  # quoting our ESP: too big, unreachable...
        error = bytes((kind, code, 0, 0)) + struct.pack("!I", 1280) + out[:200]
        seeds.append(b"\x00" + _v6("2001:db8::99", A6, 58, error))
    quoted = bytes((1, 4, 0, 0, 0, 0, 0, 0)) + _v6(A6, B6, 17, udp)
    seeds.append(b"\x00" + _v6(B6, A6, 58, quoted))  # an error about cleartext, in clear
    seeds += [b"\x01" + _v6(A6, B6, 17, udp),
              b"\x01" + _v6(A6, B6, 0, _chain([0, 43, 60], 17) + udp),
              b"\x02" + _v6("2001:db8:1::5", "2001:db8:2::5", 17, udp),
              b"\x01" + _v6("fe80::1", "ff02::1", 58, bytes((135, 0, 0, 0)) + bytes(20))]
    return seeds


def differential_target(make_engine: Any = None) -> Any:
    """One fresh pair per input (replay windows empty). The first byte: bits 0-1 where the
    packet is (arriving, leaving, forwarded, arriving), bits 2-3 which host (IPv4, ESP in UDP
    with the rest the payload of a datagram to port 4500, IPv6, IPv4). ``make_engine``: how
    the independent side is built (a test gives a faulty one, to see the target notice)."""
    from nfq_ipsec.core.processor import ARRIVING, FORWARDED, LEAVING
    from nfq_ipsec.independent import Engine

    build = make_engine or Engine
    hosts = (_host, _udp_host, _host6, _host)

    def one(data: bytes) -> None:
        if not data:
            return
        where = (ARRIVING, LEAVING, FORWARDED, ARRIVING)[data[0] & 3]
        kind = (data[0] >> 2) & 3
        packet = _datagram(data[1:]) if kind == 1 else data[1:]
        core, _ = hosts[kind]()
        engine = build(core.spd.policies, [sa.params for sa in core.sad.all()], 0.0,
                       mtu=core.mtu)
        a = core.process(packet, len(packet), where, 1.0)
        b = engine.process(packet, len(packet), where, 1.0)
        if b.unsupported:
            return
        reason = None if a.reason is None else a.reason.value
        assert (a.verdict.value, reason) == (b.verdict, b.reason), (a, b)
        assert a.packet == b.packet, (a, b)

    return one


def differential_seeds() -> list[bytes]:
    """The seeds of the packet targets, their first byte said this target's way."""
    seeds = [(b"\x00" if s[0] & 1 else b"\x01") + s[1:] for s in packets_seeds() if s]
    seeds += [b"\x04" + s[1:] for s in udp_seeds() if s]
    seeds += [bytes((0x08 | (s[0] & 3),)) + s[1:] for s in ipv6_seeds() if s]
    return seeds


def _ike_pair() -> tuple[Any, Any, bytes, bytes]:
    """A dispatcher ``d`` (at B) holding one established IKE SA with peer A (the initiator
    ``i``), both from fixed randomness; and the packed addresses A and B."""
    import random
    from dataclasses import replace

    from nfq_ipsec.ike import selectors
    from nfq_ipsec.ike.dispatch import Dispatcher
    from nfq_ipsec.ike.message import IdPayload, IdType
    from nfq_ipsec.ike.proposal import Encr, Group, Prf, Proposal, Protocol, SAPayload, Transform
    from nfq_ipsec.ike.session import IkeSession, PeerConfig, Role

    rng = random.Random(7)

    def rand(n: int) -> bytes:
        return bytes(rng.getrandbits(8) for _ in range(n))

    a, b = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])
    ike = SAPayload((Proposal(1, Protocol.IKE, b"", (Transform(1, Encr.AES_GCM_16, 256),
                                                     Transform(2, Prf.HMAC_SHA2_256),
                                                     Transform(4, Group.CURVE25519))),))
    esp = SAPayload((Proposal(1, Protocol.ESP, b"", (Transform(1, Encr.AES_GCM_16, 128),
                                                     Transform(5, 0))),))
    lan_a, lan_b = selectors.from_prefix("10.1.0.0/24"), selectors.from_prefix("10.2.0.0/24")
    base = PeerConfig(IdPayload(IdType.FQDN, b"a"), IdPayload(IdType.FQDN, b"b"), b"fuzz psk",
                      ike, esp, (lan_a,), (lan_b,), local_addr=a, remote_addr=b)
    mirror = replace(base, local_id=base.remote_id, remote_id=base.local_id, local_ts=(lan_b,),
                     remote_ts=(lan_a,), local_addr=b, remote_addr=a)
    d = Dispatcher({a: mirror}, rand, 0.0)
    i = IkeSession(Role.INITIATOR, base, rand)
    queue = list(i.start(0.0).send)
    while queue:
        for data in d.receive(queue.pop(0), (a, 500), 0.0).send:
            queue += i.receive(data, 0.0).send
    assert i.state.value == "established", i.state
    return d, i, a, b


def ike_genuine() -> list[bytes]:
    """Messages the peer genuinely sealed (or sent in clear) for the dispatcher's IKE SA."""
    import copy

    _, i, _, _ = _ike_pair()
    out: list[bytes] = []
    i2 = copy.deepcopy(i)
    out += i2.ping(1.0).send
    i3 = copy.deepcopy(i)
    assert i3.child is not None
    out += i3.rekey_child(i3.child.spi_in, 1.0).send
    out += copy.deepcopy(i).rekey_ike(1.0).send
    out += copy.deepcopy(i).delete(1.0).send
    out += copy.deepcopy(i).delete_child(i.child.spi_in if i.child else 0, 1.0).send
    from nfq_ipsec.ike.session import IkeSession, Role
    fresh = IkeSession(Role.INITIATOR, i.cfg, lambda n: bytes(range(1, n + 1)))
    out += fresh.start(0.0).send
    return out


def ike_target() -> Any:
    """One copy of the established pair per input: only a genuine message may change it."""
    import copy

    from nfq_ipsec.ike.session import Output, State

    d0, _, a, _ = _ike_pair()
    genuine = set(ike_genuine())

    def one(data: bytes) -> None:
        d = copy.deepcopy(d0)
        out = d.receive(data, (a, 500), 1.0)
        assert isinstance(out, Output)
        out.extend(d.tick(2.0))
        if data in genuine:
            return
        kinds = {e.kind for e in out.events}
        assert not kinds & {"established", "rekeyed", "ike_rekeyed", "deleted", "child_deleted"}, kinds
        assert [e.session.state for e in d.sessions.values()].count(State.ESTABLISHED) == 1

    return one


def ike_seeds() -> list[bytes]:
    return ike_genuine()


FACTORIES = {"config": (config_target, config_seeds), "packets": (packets_target, packets_seeds),
             "udp": (udp_target, udp_seeds), "ipv6": (ipv6_target, ipv6_seeds),
             "differential": (differential_target, differential_seeds),
             "ike": (ike_target, ike_seeds)}


# -- engines ------------------------------------------------------------------------------------------
def run_atheris(name: str, seconds: int, out: Path) -> None:
    """In this process (libFuzzer exits when done): coverage-guided, seeded."""
    import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

    # the package first: it settles which build of the core loads (NFQ_IPSEC_PURE=1: its
    # finder for the sources), so atheris's hook, installed next, wraps that finder's loader
    # and instruments the core's source (a compiled core gives it no coverage to follow)
    importlib.import_module("nfq_ipsec")
    with atheris.instrument_imports():
        for module in ("tomllib", "nfq_ipsec.config.loader", "nfq_ipsec.core.esp",
                       "nfq_ipsec.core.esp6", "nfq_ipsec.core.ipv6", "nfq_ipsec.core.packet",
                       "nfq_ipsec.core.processor", "nfq_ipsec.core.replay",
                       "nfq_ipsec.core.spd", "nfq_ipsec.rules", "nfq_ipsec.ike.message",
                       "nfq_ipsec.ike.proposal", "nfq_ipsec.ike.session",
                       "nfq_ipsec.ike.dispatch", "nfq_ipsec.ike.sk", "nfq_ipsec.ike.child",
                       "nfq_ipsec.independent.engine", "nfq_ipsec.independent.framing",
                       "nfq_ipsec.independent.ipwire", "nfq_ipsec.independent.natt",
                       "nfq_ipsec.independent.window"):
            importlib.import_module(module)
    make, seeds = FACTORIES[name]
    target = make()
    corpus = Path(tempfile.mkdtemp(prefix=f"nfq-fuzz-{name}-"))
    for i, seed in enumerate(seeds()):
        (corpus / f"seed{i}").write_bytes(seed)
    crashes = out / f"{name}-crashes"
    crashes.mkdir(parents=True, exist_ok=True)
    atheris.Setup([sys.argv[0], f"-max_total_time={seconds}", f"-artifact_prefix={crashes}/",
                   "-max_len=70000", "-print_final_stats=1", str(corpus)], target)
    atheris.Fuzz()


def run_hypothesis(name: str, seconds: int, out: Path) -> dict[str, Any]:
    """Random bytes and seed mutations, as many as fit in ``seconds``."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    make, seeds = FACTORIES[name]
    target = make()
    seed_list = seeds()
    count = 0
    failures: list[str] = []

    @st.composite
    def mutated(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(seed_list)))
        for _ in range(draw(st.integers(1, 8))):
            op = draw(st.integers(0, 2))
            pos = draw(st.integers(0, max(0, len(data) - 1)))
            if op == 0 and data:
                data[pos] = draw(st.integers(0, 255))
            elif op == 1:
                data[pos:pos] = draw(st.binary(max_size=16))
            else:
                del data[pos:pos + draw(st.integers(1, 64))]
        return bytes(data)

    @settings(max_examples=10**9, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=2048), mutated()))
    def prop(data: bytes) -> None:
        nonlocal count
        count += 1
        if time.monotonic() > deadline:
            raise _Done
        try:
            target(data)
        except Exception as err:
            path = out / f"{name}-crash-{len(failures)}.bin"
            path.write_bytes(data)
            failures.append(f"{type(err).__name__}: {err} ({path})")
            if len(failures) >= 10:
                raise _Done from None

    deadline = time.monotonic() + seconds
    with contextlib.suppress(_Done):
        prop()
    return {"target": name, "engine": "hypothesis", "seconds": seconds, "executions": count,
            "failures": failures}


class _Done(BaseException):
    """Ends a hypothesis run early (a BaseException, so hypothesis does not shrink it)."""


# -- the driver -----------------------------------------------------------------------------------
def have_atheris() -> bool:
    try:
        import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True


def campaign(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if have_atheris() else "hypothesis"
    results = []
    for name in args.targets.split(","):
        print(f"fuzz: {name} with {engine} for {args.seconds} s ...", flush=True)
        started = time.monotonic()
        proc = subprocess.run([sys.executable, __file__, "--run-target", name, "--engine", engine,
                               "--seconds", str(args.seconds), "--out", str(out)],
                              capture_output=True, text=True, cwd=REPO)
        took = round(time.monotonic() - started, 1)
        if engine == "atheris":
            runs = re.findall(r"stat::number_of_executed_units: (\d+)", proc.stderr)
            cov = re.findall(r"cov: (\d+) ft: (\d+)", proc.stderr)
            crashed = "==ERROR" in proc.stderr or "Uncaught Python exception" in proc.stderr
            res = {"target": name, "engine": "atheris", "seconds": took,
                   "executions": int(runs[-1]) if runs else None,
                   "coverage_edges": int(cov[-1][0]) if cov else None,
                   "failures": [proc.stderr[-3000:]] if crashed or proc.returncode not in (0,) else []}
        else:
            try:
                res = json.loads(proc.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                res = {"target": name, "engine": engine, "failures": [proc.stderr[-3000:]]}
            res["seconds"] = took
        results.append(res)
        print(f"fuzz: {name}: {res.get('executions')} executions in {took} s, "
              f"{len(res['failures'])} finding(s)", flush=True)
        for f in res["failures"]:
            print(f"  {f}", flush=True)
    summary = {"machine": {"host": platform.node(), "python": platform.python_version(),
                           "cpus": os.cpu_count(), "platform": platform.platform()},
               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": results}
    (out / "fuzz-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"fuzz: summary in {out / 'fuzz-summary.json'}")
    return 1 if any(r["failures"] for r in results) else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=300, help="per target (default 300)")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help="comma-separated: " + ",".join(TARGETS))
    p.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto")
    p.add_argument("--out", default=str(REPO / "fuzz-results"), help="findings and summary")
    p.add_argument("--run-target", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run_target:
        out = Path(args.out)
        if args.engine == "atheris":
            run_atheris(args.run_target, args.seconds, out)
            return 0
        print(json.dumps(run_hypothesis(args.run_target, args.seconds, out)))
        return 0
    return campaign(args)


if __name__ == "__main__":
    sys.exit(main())

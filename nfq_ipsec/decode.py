"""Offline ESP decoding: what every SA of a configuration makes of captured packets.

A capture holds both directions, so each SA (outbound or inbound) gets a receive-side twin
with its own replay window; duplicates in a capture therefore show up as replays, exactly as
the peer would have seen them.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass

from .config.model import Config
from .core import esp, esp6, ipv6, udpencap
from .core import packet as ip
from .core.errors import DropReason, EspError
from .core.sa import Encapsulation, SADirection, SecurityAssociation
from .core.spd import Policy
from .reassembly import (
    Fragment,
    Overlap,
    Reassembler,
    ipv4_fragment,
    ipv4_whole,
    ipv6_fragment,
    ipv6_whole,
)

_PROTO_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 47: "GRE", 50: "ESP", 58: "ICMPv6", 132: "SCTP"}
_TCP_FLAGS = "FSRPAUEC"
_ICMP_KINDS = {0: "echo-reply", 8: "echo-request", 3: "unreachable", 11: "time-exceeded"}
_ICMPV6_KINDS = {129: "echo-reply", 128: "echo-request", 1: "unreachable", 2: "packet-too-big",
                 3: "time-exceeded"}


@dataclass
class Decoded:
    index: int
    outer: str  # "src > dst"
    esp: bool
    spi: int | None = None
    seq: int | None = None
    sa_name: str | None = None
    verdict: str = ""  # "ok", "drop", "not-esp", "not-ip", "fragment" (held for reassembly)
    reason: DropReason | None = None
    inner: str = ""
    note: str = ""  # e.g. " (reassembled from 3 fragments)"

    def line(self) -> str:
        head = f"#{self.index:<5} {self.outer:<33}"
        if not self.esp:
            return f"{head} {self.verdict:<8} {self.inner}".rstrip()
        if self.spi is None:
            what = (f"DROP  {self.reason.value}" if self.verdict == "drop" and self.reason
                    else self.verdict)
            return f"{head} {what}  {self.inner}".rstrip()
        esp_part = f"spi=0x{self.spi:08x} seq={self.seq}"
        if self.verdict == "ok":
            return f"{head} {esp_part:<28} ok    sa={self.sa_name}  {self.inner}{self.note}"
        reason = self.reason.value if self.reason else "?"
        sa = f" sa={self.sa_name}" if self.sa_name else ""
        return f"{head} {esp_part:<28} DROP  {reason}{sa}{self.note}"


class OfflineDecoder:
    def __init__(self, cfg: Config, now: float = 0.0) -> None:
        self._now = now
        self._policy_of: dict[str, Policy] = {}
        for pol in cfg.policies:
            for name in pol.sa_names:
                self._policy_of.setdefault(name, pol)
        self._by_spi: dict[int, list[tuple[SecurityAssociation, bool]]] = {}
        for params in cfg.sas:
            twin = dataclasses.replace(params, direction=SADirection.IN)
            sa = SecurityAssociation(twin, now)
            was_out = params.direction is SADirection.OUT
            self._by_spi.setdefault(params.spi, []).append((sa, was_out))
        # ESP in UDP (RFC 3948): UDP from or to a port of one of those SAs
        self._udp_ports = frozenset(
            port for params in cfg.sas if params.encapsulation is Encapsulation.UDP
            for port in (params.udp_source_port, params.udp_destination_port))
        self._fragments = Reassembler()

    def decode(self, index: int, data: bytes | None) -> Decoded:
        if data is None:
            return Decoded(index, "-", False, verdict="not-ip")
        hdr: ip.IPv4Header | None = None
        hdr6: ipv6.IPv6Header | None = None
        try:
            if data and data[0] >> 4 == 6:
                hdr6 = ipv6.parse_ipv6(data)
            else:
                hdr = ip.parse_ipv4(data)
        except EspError as err:
            return Decoded(index, "-", False, verdict="not-ip", inner=err.reason.value)
        note = ""
        frag: Fragment | None = None
        if (hdr is not None and hdr.is_fragment
                and (hdr.protocol == ip.PROTO_ESP
                     or (hdr.protocol == ip.PROTO_UDP and self._udp_ports))):
            # RFC 4303 3.4.1: ESP is checked whole (and ESP in UDP is known only once the UDP
            # header is there); the last fragment to come in decodes the packet
            frag = ipv4_fragment(data, hdr)
        elif hdr6 is not None and hdr6.is_fragment and hdr6.protocol == ip.PROTO_ESP:
            frag = ipv6_fragment(data, hdr6)  # the Linux kernel fragments ESP over IPv6 too
        if frag is not None:
            src, dst = (hdr.src, hdr.dst) if hdr is not None else (_known(hdr6).src, _known(hdr6).dst)
            outer = f"{ipv6.addr_str(src)} > {ipv6.addr_str(dst)}"
            try:
                whole = self._fragments.add(frag)
            except Overlap as err:
                return Decoded(index, outer, True, verdict="drop", reason=DropReason.FRAGMENT,
                               inner=str(err))
            if whole is None:
                return Decoded(index, outer, False, verdict="fragment",
                               inner=f"fragment id={frag.key[-1]} offset={frag.offset}: held "
                                     "for reassembly")
            header, payload, count = whole
            if hdr is not None:
                data = ipv4_whole(header, len(payload)) + payload
                hdr = ip.parse_ipv4(data)
            else:
                data = ipv6_whole(header, len(payload)) + payload
                try:
                    hdr6 = ipv6.parse_ipv6(data)
                except EspError as err:
                    return Decoded(index, outer, True, verdict="drop", reason=err.reason,
                                   inner=f"reassembled from {count} fragments: {err}")
            note = f" (reassembled from {count} fragments)"
        src, dst, proto, at, end = (
            (hdr.src, hdr.dst, hdr.protocol, hdr.ihl, hdr.total_length) if hdr is not None
            else _where(hdr6))
        outer = f"{ipv6.addr_str(src)} > {ipv6.addr_str(dst)}"
        in_udp = hdr is not None and proto == ip.PROTO_UDP and self._esp_in_udp(data, hdr)
        if hdr is not None and in_udp:
            try:
                if udpencap.classify(data, hdr) == udpencap.MARKER_PACKET:
                    return Decoded(index, outer, False, verdict="ike",
                                   inner="non-ESP marker: " + summarize(data, hdr))
            except EspError as err:
                if err.reason is DropReason.NAT_KEEPALIVE:
                    return Decoded(index, outer, False, verdict="keepalive",
                                   inner="NAT-keepalive (RFC 3948)")
                return Decoded(index, outer, False, verdict="drop", reason=err.reason,
                               inner=f"{err}: {summarize(data, hdr)}")
            data, hdr = udpencap.strip(data, hdr)
            at, end = hdr.ihl, hdr.total_length
            outer += " udp"
        elif proto != ip.PROTO_ESP:
            return Decoded(index, outer, False, verdict="not-esp",
                           inner=summarize(data, hdr, hdr6) + note)
        if end < at + esp.ESP_HEADER:
            return Decoded(index, outer, True, verdict="drop", reason=DropReason.MALFORMED,
                           note=note)
        spi, seq_lo = struct.unpack_from("!II", data, at)
        result = Decoded(index, outer, True, spi=spi, seq=seq_lo, verdict="drop",
                         reason=DropReason.UNKNOWN_SPI, note=note)
        for sa, was_out in self._by_spi.get(spi, []):
            result.sa_name = sa.name
            if (sa.udp is not None) != in_udp:
                result.reason = DropReason.ENCAP_MISMATCH
                continue
            try:
                dec = (esp.decapsulate(data, hdr, _only(sa), self._now) if hdr is not None
                       else esp6.decapsulate6(data, _known(hdr6), _only(sa), self._now))
            except EspError as err:
                result.reason = err.reason
                continue
            result.seq = dec.seq
            policy = self._policy_of.get(sa.name)
            if dec.header is not None:
                key = ip.packet_key(dec.packet, dec.header)
                fits = policy is not None and policy.selector.matches(key, outbound=was_out)
            else:
                key = ipv6.packet_key6(dec.packet, _known(dec.header6))
                fits = policy is not None and policy.selector.matches6(key, outbound=was_out)
            result.inner = summarize(dec.packet, dec.header, dec.header6)
            if not fits:
                result.reason = DropReason.POLICY_MISMATCH
                return result
            result.verdict = "ok"
            result.reason = None
            return result
        return result


    def _esp_in_udp(self, data: bytes, hdr: ip.IPv4Header) -> bool:
        """UDP from or to the port of an SA of ESP in UDP."""
        port = udpencap.local_port(data, hdr)
        return port >= 0 and (port in self._udp_ports
                              or udpencap.source_port(data, hdr) in self._udp_ports)


def _known(hdr6: ipv6.IPv6Header | None) -> ipv6.IPv6Header:
    """An IPv6 header that the branch taken guarantees."""
    assert hdr6 is not None
    return hdr6


def _where(hdr6: ipv6.IPv6Header | None) -> tuple[int, int, int, int, int]:
    """Source, destination, last next header, where it starts and where the packet ends."""
    h = _known(hdr6)
    return h.src, h.dst, h.protocol, h.offset, h.total_length


def _only(sa: SecurityAssociation) -> esp.SaLookup:
    def lookup(_spi: int) -> SecurityAssociation:
        return sa

    return lookup


def summarize(data: bytes, hdr: ip.IPv4Header | None,
              hdr6: ipv6.IPv6Header | None = None) -> str:
    """One line about an IPv4 or IPv6 packet: protocol, addresses, ports or ICMP type, length."""
    if hdr is not None:
        src, dst, proto, off, total = hdr.src, hdr.dst, hdr.protocol, hdr.ihl, hdr.total_length
        fragment = hdr.is_fragment
    else:
        src, dst, proto, off, total = _where(hdr6)
        fragment = _known(hdr6).is_fragment
    return _describe(ipv6.addr_str(src), ipv6.addr_str(dst), proto, data[off:total], fragment,
                     total)


def _describe(src: str, dst: str, protocol: int, body: bytes, fragment: bool, total: int) -> str:
    name = _PROTO_NAMES.get(protocol, f"proto {protocol}")
    if fragment:
        return f"{name} {src} > {dst} fragment len={total}"
    if protocol == 6 and len(body) >= 14:
        sport, dport, seqn = struct.unpack_from("!HHI", body)
        flags = "".join(c for i, c in enumerate(_TCP_FLAGS) if body[13] >> i & 1)
        doff = (body[12] >> 4) * 4
        return f"TCP {src}:{sport} > {dst}:{dport} [{flags}] seq={seqn} len={max(0, len(body) - doff)}"
    if protocol == 17 and len(body) >= 8:
        sport, dport, ulen = struct.unpack_from("!HHH", body)
        return f"UDP {src}:{sport} > {dst}:{dport} len={ulen - 8}"
    if protocol in (1, ipv6.NH_ICMPV6) and len(body) >= 8:
        itype, code = body[0], body[1]
        ident, seqn = struct.unpack_from("!HH", body, 4)
        kind = (_ICMP_KINDS if protocol == 1 else _ICMPV6_KINDS).get(itype, f"type={itype}")
        echo = kind in ("echo-reply", "echo-request")
        extra = f" id={ident} seq={seqn}" if echo else f" code={code}"
        return f"{name} {src} > {dst} {kind}{extra}"
    return f"{name} {src} > {dst} len={total}"

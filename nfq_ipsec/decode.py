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
from .core import esp, udpencap
from .core import packet as ip
from .core.errors import DropReason, EspError
from .core.sa import Encapsulation, SADirection, SecurityAssociation
from .core.spd import Policy

_PROTO_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 47: "GRE", 50: "ESP", 132: "SCTP"}
_TCP_FLAGS = "FSRPAUEC"


@dataclass
class Decoded:
    index: int
    outer: str  # "src > dst"
    esp: bool
    spi: int | None = None
    seq: int | None = None
    sa_name: str | None = None
    verdict: str = ""  # "ok", "drop", "not-esp", "not-ipv4"
    reason: DropReason | None = None
    inner: str = ""

    def line(self) -> str:
        head = f"#{self.index:<5} {self.outer:<33}"
        if not self.esp:
            return f"{head} {self.verdict:<8} {self.inner}".rstrip()
        esp_part = f"spi=0x{self.spi:08x} seq={self.seq}"
        if self.verdict == "ok":
            return f"{head} {esp_part:<28} ok    sa={self.sa_name}  {self.inner}"
        reason = self.reason.value if self.reason else "?"
        sa = f" sa={self.sa_name}" if self.sa_name else ""
        return f"{head} {esp_part:<28} DROP  {reason}{sa}"


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

    def decode(self, index: int, data: bytes | None) -> Decoded:
        if data is None:
            return Decoded(index, "-", False, verdict="not-ipv4")
        try:
            hdr = ip.parse_ipv4(data)
        except EspError as err:
            return Decoded(index, "-", False, verdict="not-ipv4", inner=err.reason.value)
        outer = f"{ip.ip_to_str(hdr.src)} > {ip.ip_to_str(hdr.dst)}"
        in_udp = hdr.protocol == ip.PROTO_UDP and self._esp_in_udp(data, hdr)
        if in_udp:
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
            outer += " udp"
        elif hdr.protocol != ip.PROTO_ESP:
            return Decoded(index, outer, False, verdict="not-esp", inner=summarize(data, hdr))
        try:
            spi, seq_lo = esp.parse_esp_header(data, hdr)
        except EspError as err:
            return Decoded(index, outer, True, verdict="drop", reason=err.reason)
        result = Decoded(index, outer, True, spi=spi, seq=seq_lo, verdict="drop",
                         reason=DropReason.UNKNOWN_SPI)
        for sa, was_out in self._by_spi.get(spi, []):
            result.sa_name = sa.name
            if (sa.udp is not None) != in_udp:
                result.reason = DropReason.ENCAP_MISMATCH
                continue
            try:
                dec = esp.decapsulate(data, hdr, _only(sa), self._now)
            except EspError as err:
                result.reason = err.reason
                continue
            result.seq = dec.seq
            key = ip.packet_key(dec.packet, dec.header)
            policy = self._policy_of.get(sa.name)
            if policy is None or not policy.selector.matches(key, outbound=was_out):
                result.reason = DropReason.POLICY_MISMATCH
                result.inner = summarize(dec.packet, dec.header)
                return result
            result.verdict = "ok"
            result.reason = None
            result.inner = summarize(dec.packet, dec.header)
            return result
        return result


    def _esp_in_udp(self, data: bytes, hdr: ip.IPv4Header) -> bool:
        """UDP from or to the port of an SA of ESP in UDP."""
        port = udpencap.local_port(data, hdr)
        return port >= 0 and (port in self._udp_ports
                              or udpencap.source_port(data, hdr) in self._udp_ports)


def _only(sa: SecurityAssociation) -> esp.SaLookup:
    def lookup(_spi: int) -> SecurityAssociation:
        return sa

    return lookup


def summarize(data: bytes, hdr: ip.IPv4Header) -> str:
    """One line about an IPv4 packet: protocol, addresses, ports or ICMP type, length."""
    src, dst = ip.ip_to_str(hdr.src), ip.ip_to_str(hdr.dst)
    name = _PROTO_NAMES.get(hdr.protocol, f"proto {hdr.protocol}")
    off = hdr.ihl
    body = data[off : hdr.total_length]
    if hdr.is_fragment:
        return f"{name} {src} > {dst} fragment len={hdr.total_length}"
    if hdr.protocol == 6 and len(body) >= 14:
        sport, dport, seqn = struct.unpack_from("!HHI", body)
        flags = "".join(c for i, c in enumerate(_TCP_FLAGS) if body[13] >> i & 1)
        doff = (body[12] >> 4) * 4
        return f"TCP {src}:{sport} > {dst}:{dport} [{flags}] seq={seqn} len={max(0, len(body) - doff)}"
    if hdr.protocol == 17 and len(body) >= 8:
        sport, dport, ulen = struct.unpack_from("!HHH", body)
        return f"UDP {src}:{sport} > {dst}:{dport} len={ulen - 8}"
    if hdr.protocol == 1 and len(body) >= 8:
        itype, code = body[0], body[1]
        ident, seqn = struct.unpack_from("!HH", body, 4)
        kind = {0: "echo-reply", 8: "echo-request", 3: "unreachable", 11: "time-exceeded"}.get(
            itype, f"type={itype}"
        )
        extra = f" id={ident} seq={seqn}" if itype in (0, 8) else f" code={code}"
        return f"ICMP {src} > {dst} {kind}{extra}"
    return f"{name} {src} > {dst} len={hdr.total_length}"

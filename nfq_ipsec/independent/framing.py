"""ESP packets (RFC 4303): building one around a packet, and taking one apart.

Sections followed, in the order a packet meets them:
- 2.4 and 2.5: padding 1, 2, 3, ... so that payload, padding and the two trailer bytes fill
  the cipher's block (4 bytes for the AEADs and NULL), then pad length and next header;
- 3.1.1: transport mode, ESP after the IP header (IPv6: after the headers routers read);
- 3.1.2: tunnel mode, the whole packet inside an outer header between the tunnel endpoints,
  of their family whatever the inner one's (DSCP and ECN copied outward, RFC 4301 5.1.2.1
  and RFC 6040; DF as the SA says, 8.1);
- 3.4: inbound, in the order that keeps the replay window honest: the SA by SPI, its
  lifetime, the replay check (nothing changes), the ICV, then the window moves, then the
  trailer and the inner packet (RFC 6040 section 4.2 for the ECN field).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from .crypto import IntegrityFailure, TooShort
from .ipwire import ESP as PROTO_ESP
from .ipwire import (
    IPIP,
    IPV6_IN,
    NO_NEXT,
    V4,
    V6,
    Refused,
    new_v4_header,
    new_v6_header,
    parse_v4,
    parse_v6,
    v4_header,
    v6_headers,
    with_tclass,
)
from .state import Association

ESP_HEADER = 8
NOT_ECT, ECT1, CE = 0, 1, 3


def padding(payload_len: int, align: int) -> bytes:
    """RFC 4303 2.4: the fewest bytes 1, 2, 3, ... that align payload plus trailer."""
    count = 0
    while (payload_len + count + 2) % align:
        count += 1
    return bytes(range(1, count + 1))


def esp_length(sa: Association, payload_len: int, outer_len: int) -> int:
    """The exact length of the packet ``seal`` makes of ``payload_len`` bytes of payload under
    ``outer_len`` bytes of IP header (and the UDP header of ESP in UDP)."""
    t = sa.transform
    udp = 8 if sa.udp is not None else 0
    return (outer_len + udp + ESP_HEADER + t.iv_len + payload_len
            + len(padding(payload_len, t.align)) + 2 + t.icv_len)


def seal(sa: Association, payload: bytes, next_header: int) -> bytes:
    """ESP header || IV || ciphertext || ICV for one payload on outbound SA ``sa``."""
    seq = sa.take_seq()
    header = sa.spi.to_bytes(4, "big") + (seq % (1 << 32)).to_bytes(4, "big")
    seq_hi = (seq >> 32).to_bytes(4, "big") if sa.esn else b""
    plaintext = payload + padding(len(payload), sa.transform.align) + bytes(
        (len(padding(len(payload), sa.transform.align)), next_header))
    return header + sa.transform.seal(header, seq_hi, sa.transform.iv_for(seq), plaintext)


def _outer_df(sa: Association, inner_df: bool) -> bool:
    return sa.df == "set" or (sa.df == "copy" and inner_df)


def _outer_v6(sa: Association, tclass: int, flow_label: int, esp: bytes) -> bytes:
    """The IPv6 outer header of a tunnel between IPv6 endpoints (hop limit: the SA's ttl)."""
    if len(esp) > 65535:
        raise Refused("too_big", f"{len(esp)} bytes of payload")
    assert isinstance(sa.local, IPv6Address) and isinstance(sa.remote, IPv6Address)
    return new_v6_header(tclass, flow_label, len(esp), PROTO_ESP, sa.ttl, sa.local,
                         sa.remote) + esp


def protect_v4(sa: Association, packet: V4, full: bytes) -> bytes:
    """An IPv4 packet (``full``: its bytes up to the total length) through ESP on ``sa``."""
    if sa.tunnel:
        esp = seal(sa, full, IPIP)
        if isinstance(sa.remote, IPv6Address):  # IPv4 in IPv6: the flow label 0
            return _outer_v6(sa, packet.tos, 0, esp)
        total = 20 + len(esp)
        if total > 65535:
            raise Refused("too_big", f"{total} bytes")
        assert isinstance(sa.local, IPv4Address) and isinstance(sa.remote, IPv4Address)
        outer = new_v4_header(packet.tos, total, (sa.next_seq - 1) & 0xFFFF,
                              _outer_df(sa, packet.df), sa.ttl, PROTO_ESP, sa.local, sa.remote)
        return outer + esp
    if packet.fragment:
        raise Refused("fragment", "transport mode takes whole datagrams")
    esp = seal(sa, packet.payload, packet.protocol)
    total = len(packet.header) + len(esp)
    if total > 65535:
        raise Refused("too_big", f"{total} bytes")
    return v4_header(packet.header, protocol=PROTO_ESP, total=total) + esp


def protect_v6(sa: Association, packet: V6) -> bytes:
    """An IPv6 packet through ESP on ``sa`` (a tunnel between IPv6 endpoints, or transport)."""
    if sa.tunnel:
        esp = seal(sa, packet.data, IPV6_IN)
        if isinstance(sa.remote, IPv6Address):
            return _outer_v6(sa, packet.tclass, packet.flow_label, esp)
        # IPv6 in IPv4: an IPv6 packet is never fragmented on its way, so DF unless "clear";
        # the identification is the low 16 bits of the next sequence number
        total = 20 + len(esp)
        if total > 65535:
            raise Refused("too_big", f"{total} bytes")
        assert isinstance(sa.local, IPv4Address) and isinstance(sa.remote, IPv4Address)
        return new_v4_header(packet.tclass, total, sa.next_seq & 0xFFFF, sa.df != "clear",
                             sa.ttl, PROTO_ESP, sa.local, sa.remote) + esp
    if packet.fragment_offset is not None:
        raise Refused("fragment", "transport mode takes whole datagrams")
    data = packet.data
    esp = seal(sa, data[packet.esp_at :], data[packet.esp_named_at])
    payload_length = packet.esp_at - 40 + len(esp)
    if payload_length > 65535:
        raise Refused("too_big", f"{payload_length} bytes of payload")
    return v6_headers(data[: packet.esp_at], packet.esp_named_at, PROTO_ESP,
                      payload_length) + esp


# -- inbound ------------------------------------------------------------------------------


@dataclass
class Opened:
    """An authenticated ESP packet: its SA, full sequence number, and the packet inside
    (IPv4 or IPv6, the other of the pair None)."""

    sa: Association
    seq: int
    packet: bytes
    v4: V4 | None
    v6: V6 | None


Lookup = Callable[[int], "Association | None"]


def open_esp(esp: bytes, lookup: Lookup, now: float) -> tuple[Association, int, bytes]:
    """RFC 4303 3.4.2-3.4.4 on the ESP part of a packet: SA, sequence number, plaintext."""
    if len(esp) < ESP_HEADER:
        raise Refused("malformed", "shorter than an ESP header")
    spi = int.from_bytes(esp[0:4], "big")
    sa = lookup(spi)
    if sa is None or sa.outbound:
        raise Refused("unknown_spi", f"SPI 0x{spi:08x}")
    sa.check_lifetime(now)
    seq = sa.window.full_number(int.from_bytes(esp[4:8], "big"))
    if not sa.window.fresh(seq):
        raise Refused("replay", f"seq {seq}")
    seq_hi = (seq >> 32).to_bytes(4, "big") if sa.esn else b""
    try:
        plaintext = sa.transform.open(esp[:ESP_HEADER], seq_hi, esp[ESP_HEADER:])
    except TooShort as err:
        raise Refused("malformed", str(err)) from None
    except IntegrityFailure:
        raise Refused("integrity", "ICV mismatch") from None
    sa.window.record(seq)
    return sa, seq, plaintext


def trailer(plaintext: bytes, seq: int) -> tuple[bytes, int]:
    """RFC 4303 2.4-2.6: the payload and next header; the padding must be 1, 2, 3, ..."""
    if len(plaintext) < 2:
        raise Refused("malformed", "no ESP trailer")
    pad_len, next_header = plaintext[-2], plaintext[-1]
    end = len(plaintext) - 2 - pad_len
    if end < 0:
        raise Refused("bad_padding", "pad length beyond payload")
    if plaintext[end : end + pad_len] != bytes(range(1, pad_len + 1)):
        raise Refused("bad_padding", f"seq {seq}")
    if next_header == NO_NEXT:
        raise Refused("dummy", f"seq {seq}")
    return plaintext[:end], next_header


def ecn_after(inner: int, outer: int) -> int:
    """RFC 6040 section 4.2, normal mode: the inner ECN field after decapsulation."""
    if inner == NOT_ECT:
        if outer == CE:
            raise Refused("malformed", "CE on a Not-ECT inner packet (RFC 6040)")
        return NOT_ECT
    if outer == CE or inner == CE:
        return CE
    if outer == ECT1:
        return ECT1
    return inner


def untunnel(payload: bytes, next_header: int, outer_ecn: int) -> tuple[bytes, V4 | None, V6 | None]:
    """The inner packet of a tunnel SA: IPv4 (next header 4) or IPv6 (41), cut to its own
    length (TFC padding after it goes), its ECN field merged with the outer one."""
    if next_header == IPV6_IN:
        inner6 = parse_v6(payload)
        packet = inner6.data
        ecn = ecn_after(inner6.tclass & 3, outer_ecn)
        if ecn != inner6.tclass & 3:
            packet = with_tclass(packet, (inner6.tclass & ~3) | ecn)
            inner6 = parse_v6(packet)
        return packet, None, inner6
    if next_header != IPIP:
        raise Refused("bad_next_header", f"tunnel SA carries next header {next_header}")
    inner = parse_v4(payload)
    packet = inner.header + inner.payload
    ecn = ecn_after(inner.tos & 3, outer_ecn)
    if ecn != inner.tos & 3:
        packet = v4_header(inner.header, tos=(inner.tos & ~3) | ecn) + inner.payload
        inner = parse_v4(packet)
    return packet, inner, None


def unprotect_v4(packet: V4, lookup: Lookup, now: float) -> Opened:
    """An IPv4 packet carrying ESP, opened (RFC 4303 3.4)."""
    if packet.fragment:
        raise Refused("fragment", "ESP fragment (reassemble before ESP)")
    sa, seq, plaintext = open_esp(packet.payload, lookup, now)
    payload, next_header = trailer(plaintext, seq)
    if sa.tunnel:
        inner, v4, v6 = untunnel(payload, next_header, packet.tos & 3)
    else:
        if next_header in (IPIP, IPV6_IN):
            raise Refused("bad_next_header", "transport SA carries an IP packet")
        total = len(packet.header) + len(payload)
        inner = v4_header(packet.header, protocol=next_header, total=total) + payload
        v4, v6 = parse_v4(inner), None
    sa.count(len(inner))
    return Opened(sa, seq, inner, v4, v6)


def unprotect_v6(packet: V6, lookup: Lookup, now: float) -> Opened:
    """An IPv6 packet whose extension headers lead to ESP, opened."""
    if packet.fragment_offset is not None:
        raise Refused("fragment", "ESP fragment (reassemble before ESP)")
    sa, seq, plaintext = open_esp(packet.data[packet.upper_at :], lookup, now)
    payload, next_header = trailer(plaintext, seq)
    if sa.tunnel:
        inner, v4, v6 = untunnel(payload, next_header, packet.tclass & 3)
    else:
        if next_header in (IPIP, IPV6_IN):
            raise Refused("bad_next_header", "transport SA carries an IP packet")
        head = v6_headers(packet.data[: packet.upper_at], packet.upper_named_at, next_header,
                          packet.upper_at - 40 + len(payload))
        inner = head + payload
        v4, v6 = None, parse_v6(inner)
    sa.count(len(inner))
    return Opened(sa, seq, inner, v4, v6)

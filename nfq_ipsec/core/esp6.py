"""ESP framing (RFC 4303) for IPv6 packets: transport mode, and tunnel mode in either outer family.

Transport mode puts ESP where RFC 4303 section 3.1.1 says: after the hop-by-hop options and
routing headers (and the destination options in front of a routing header), which the routers
on the way read; destination options after them, and the upper layer, are encrypted. The
IPv6 payload length and the next header that now names ESP are rewritten (no checksum).

Tunnel mode carries the whole packet (next header 41) in an outer header of the SA's endpoint
family: IPv6 (traffic class and flow label copied, hop limit the SA's ``ttl``) or IPv4 (6-in-4:
TOS from the traffic class; an IPv6 packet is never fragmented on its way, so ``df = "copy"``
sets DF).

Sealing, opening, the replay window and the trailer are ``esp``'s, shared with IPv4.
"""

from __future__ import annotations

from . import ipv6
from . import packet as ip
from .errors import DropReason, EspError
from .esp import (
    ESP_HEADER,
    Decapsulated,
    SaLookup,
    open_esp,
    outer_header6,
    seal,
    strip_trailer,
    unwrap_tunnel,
)
from .sa import DfPolicy, SecurityAssociation

_ECN_MASK = 0x03


def encapsulate6(sa: SecurityAssociation, data: bytes, hdr: ipv6.IPv6Header) -> bytes:
    """Protect one IPv6 packet (``hdr`` is its parse) on outbound SA ``sa``."""
    total_in = hdr.total_length
    if sa.tunnel:
        inner = data if total_in == len(data) else data[:total_in]
        esp_header, body = seal(sa, inner, ipv6.NH_IPV6)
        if sa.outer_v6:
            outer = outer_header6(sa, hdr.tclass, hdr.flow, ESP_HEADER + len(body))
        else:  # 6-in-4
            total = ip.IPV4_MIN_HEADER + ESP_HEADER + len(body)
            if total > ip.IPV4_MAX_PACKET:
                raise EspError(DropReason.TOO_BIG, f"{total} bytes", sa.spi)
            outer = ip.build_header(
                tos=hdr.tclass, total_length=total, ident=sa.next_seq & 0xFFFF,
                df=sa.params.df is not DfPolicy.CLEAR, ttl=sa.params.ttl, protocol=ip.PROTO_ESP,
                src=sa.params.tunnel_local or 0, dst=sa.params.tunnel_remote or 0,
            )
        return b"".join((outer, esp_header, body))
    if hdr.frag_offset >= 0:
        raise EspError(DropReason.FRAGMENT, "transport mode takes whole datagrams", sa.spi)
    split = hdr.split
    esp_header, body = seal(sa, data[split:total_in], data[hdr.split_nh_at])
    payload = split - ipv6.IPV6_HEADER + ESP_HEADER + len(body)
    if payload > ipv6.IPV6_MAX_PAYLOAD:
        raise EspError(DropReason.TOO_BIG, f"{payload} bytes of payload", sa.spi)
    head = ipv6.rewrite6(data[:split], hdr.split_nh_at, ip.PROTO_ESP, payload)
    return b"".join((head, esp_header, body))


def decapsulate6(
    data: bytes, hdr: ipv6.IPv6Header, lookup: SaLookup, now: float
) -> Decapsulated:
    """Verify and remove ESP from one IPv6 packet (``hdr.protocol`` is ESP, found after the
    extension headers in front of it). Raises EspError with the drop reason."""
    if hdr.frag_offset >= 0:
        raise EspError(DropReason.FRAGMENT, "ESP fragment (reassemble before ESP)")
    at = hdr.offset
    end = hdr.total_length
    if end < at + ESP_HEADER:
        raise EspError(DropReason.MALFORMED, "shorter than an ESP header")
    spi = int.from_bytes(data[at : at + 4], "big")
    seq_lo = int.from_bytes(data[at + 4 : at + 8], "big")
    sa, seq, plaintext = open_esp(data, at, end, spi, seq_lo, lookup, now)
    try:
        stop, next_header = strip_trailer(plaintext, seq)
        if sa.tunnel:
            packet, inner, inner6 = unwrap_tunnel(plaintext, stop, next_header,
                                                  hdr.tclass & _ECN_MASK)
        else:
            if next_header == ip.PROTO_IPIP or next_header == ipv6.NH_IPV6:
                raise EspError(DropReason.BAD_NEXT_HEADER, "transport SA carries an IP packet")
            head = ipv6.rewrite6(data[:at], hdr.nh_at, next_header,
                                 at - ipv6.IPV6_HEADER + stop)
            packet = head + plaintext[:stop]
            inner, inner6 = None, ipv6.parse_ipv6(packet)
    except EspError as err:
        err.spi = spi
        raise
    sa.account(len(packet))
    return Decapsulated(sa, seq, packet, inner, inner6)

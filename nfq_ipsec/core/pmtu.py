"""Path MTU for ESP (RFC 4301 section 8): learn it, apply it, tell the inner sender.

- Learn: an ICMP "fragmentation needed" (type 3 code 4) that quotes ESP of one of our
  outbound SAs gives that SA's path MTU (8.2.1). Reports below 576 bytes are raised to 576,
  so a forged report can't shrink the SA's packets to nothing; a report of 0 (a router older
  than RFC 1191) means the next plateau below the quoted packet's length.
- Age: a learned value holds for ``PMTU_AGE`` seconds, then the SA tries its first MTU again
  (RFC 1191 section 6.3, as Linux does).
- Apply (8.2.2): a packet with DF set that would leave bigger than the path MTU after ESP
  (the interface's MTU until the path says less, for local and forwarded packets alike) is
  dropped, and the sender gets "fragmentation needed" with the largest packet that fits: so
  its TCP and its UDP sockets learn to send smaller packets instead of losing them further on.
  A local packet to the SA's peer itself leaves with DF cleared instead (see
  ``Processor._too_big``: the local kernel has one route for the packet and its ESP, so a
  smaller MTU learned for it would strand the ESP packets too). TCP never gets there: the
  rules clamp the MSS of the SYNs sent and received (``rules.py``).
"""

from __future__ import annotations

from typing import Final

from . import ipv6
from . import packet as ip
from .errors import DropReason, EspError
from .esp import ESP_HEADER, pad_length
from .sa import SecurityAssociation
from .udpencap import UDP_HEADER

MIN_PMTU: Final = 576  # every IPv4 host takes 576-byte datagrams (RFC 791)
PMTU_AGE: Final = 600.0  # seconds a learned path MTU holds (RFC 1191 6.3)
# RFC 1191 section 7: the plateaus to try when a router reports no MTU.
PLATEAUS: Final = (32000, 17914, 8166, 4352, 2002, 1492, 1006, 508, 296, 68)
ICMP_UNREACH: Final = 3
CODE_FRAG_NEEDED: Final = 4
QUOTED_BYTES: Final = 8  # RFC 792: the quoted header and the first 64 bits of its data
REPLY_TTL: Final = 64


class FragNeeded:
    """What an ICMP "fragmentation needed" about ESP says (plain class: compiled core)."""

    __slots__ = ("dst", "mtu", "spi")

    def __init__(self, spi: int, dst: int, mtu: int) -> None:
        self.spi = spi
        self.dst = dst  # the quoted ESP packet's destination (our peer)
        self.mtu = mtu  # the path MTU to use, already checked (>= MIN_PMTU)


def frag_needed(data: bytes, hdr: ip.IPv4Header) -> FragNeeded | None:
    """The SPI, peer and MTU of an ICMP "fragmentation needed" that quotes an ESP packet;
    None for anything else (another ICMP message, a quote too short to hold the SPI)."""
    off = hdr.ihl
    end = hdr.total_length
    if (hdr.protocol != ip.PROTO_ICMP or hdr.flags_frag & ip.FRAG_OFFSET_MASK
            or end < off + ip.ICMP_HEADER or data[off] != ICMP_UNREACH
            or data[off + 1] != CODE_FRAG_NEEDED):
        return None
    q = off + ip.ICMP_HEADER
    if end < q + ip.IPV4_MIN_HEADER or data[q] >> 4 != 4 or data[q + 9] != ip.PROTO_ESP:
        return None
    qihl = (data[q] & 0x0F) * 4
    if qihl < ip.IPV4_MIN_HEADER or end < q + qihl + 4:
        return None
    s = q + qihl
    spi = (data[s] << 24) | (data[s + 1] << 16) | (data[s + 2] << 8) | data[s + 3]
    dst = (data[q + 16] << 24) | (data[q + 17] << 16) | (data[q + 18] << 8) | data[q + 19]
    reported = (data[off + 6] << 8) | data[off + 7]
    quoted_total = (data[q + 2] << 8) | data[q + 3]
    return FragNeeded(spi, dst, usable_mtu(reported, quoted_total))


def usable_mtu(reported: int, quoted_total: int) -> int:
    """The MTU to record for a report: a report of 0 (RFC 1191 section 7) becomes the
    plateau below the packet that did not fit; never below ``MIN_PMTU``."""
    mtu = reported
    if mtu == 0 or mtu >= quoted_total > 0:
        mtu = 0
        for plateau in PLATEAUS:
            if plateau < quoted_total:
                mtu = plateau
                break
    return max(mtu, MIN_PMTU)


def esp_size(sa: SecurityAssociation, inner_total: int, ihl: int) -> int:
    """The exact length of the ESP packet that ``encapsulate`` makes of an inner packet of
    ``inner_total`` bytes with a header of ``ihl`` bytes."""
    suite = sa.suite
    if sa.tunnel:
        payload = inner_total
        outer = _outer(sa)
    else:
        payload = inner_total - ihl
        outer = ihl
    if sa.udp is not None:
        outer += UDP_HEADER
    return (outer + ESP_HEADER + suite.iv_size + payload + pad_length(payload, suite.align) + 2
            + suite.icv_size)


def _outer(sa: SecurityAssociation) -> int:
    """The bytes of a tunnel SA's outer header; 0 in transport mode."""
    if not sa.tunnel:
        return 0
    return ipv6.IPV6_HEADER if sa.outer_v6 else ip.IPV4_MIN_HEADER


def inner_mtu(sa: SecurityAssociation, pmtu: int, ihl: int) -> int:
    """The largest inner packet that still fits ``pmtu`` after ESP on ``sa``: the MTU a
    "fragmentation needed" tells its sender."""
    suite = sa.suite
    size = pmtu - (ESP_HEADER + suite.iv_size + 2 + suite.icv_size
                   + _outer(sa)
                   + (UDP_HEADER if sa.udp is not None else 0))  # the overhead without padding
    while size > ihl and esp_size(sa, size, ihl) > pmtu:
        size -= 1
    return max(size, ihl)


def outer_df(sa: SecurityAssociation, inner_df: bool) -> bool:
    """Whether the ESP packet leaves with DF set: transport mode keeps the packet's own header,
    tunnel mode follows the SA's ``df`` setting (RFC 4301 8.1)."""
    if not sa.tunnel:
        return inner_df
    df = sa.params.df.value
    return df == "set" or (df == "copy" and inner_df)


def clear_df(packet: bytes) -> bytes:
    """``packet`` with DF cleared in its IPv4 header (checksum redone)."""
    ihl = (packet[0] & 0x0F) * 4
    hdr = bytearray(packet[:ihl])
    hdr[6] &= ~(ip.FLAG_DF >> 8) & 0xFF
    hdr[10] = hdr[11] = 0
    csum = ip.checksum(hdr)
    hdr[10] = csum >> 8
    hdr[11] = csum & 0xFF
    return bytes(hdr) + packet[ihl:]


def frag_needed_reply(data: bytes, hdr: ip.IPv4Header, mtu: int) -> bytes:
    """ICMP "fragmentation needed" (RFC 792, next-hop MTU of RFC 1191) for the sender of
    ``data``, quoting its header and first 8 bytes of data. The source address is left 0: the
    kernel that sends it puts in its own address on the route back."""
    quote = data[: min(hdr.total_length, hdr.ihl + QUOTED_BYTES)]
    icmp = bytearray(ip.ICMP_HEADER + len(quote))
    icmp[0] = ICMP_UNREACH
    icmp[1] = CODE_FRAG_NEEDED
    icmp[6] = (mtu >> 8) & 0xFF
    icmp[7] = mtu & 0xFF
    icmp[ip.ICMP_HEADER:] = quote
    csum = ip.checksum(icmp)
    icmp[2] = csum >> 8
    icmp[3] = csum & 0xFF
    total = ip.IPV4_MIN_HEADER + len(icmp)
    outer = ip.build_header(tos=0xC0, total_length=total, ident=0, df=False, ttl=REPLY_TTL,
                            protocol=ip.PROTO_ICMP, src=0, dst=hdr.src)
    return outer + bytes(icmp)


ICMPV6_REPLY_LIMIT: Final = ipv6.MIN_MTU  # an ICMPv6 error fits the minimum MTU (RFC 4443 2.4)


def packet_too_big_reply(data: bytes, hdr: ipv6.IPv6Header, mtu: int) -> bytes:
    """ICMPv6 "packet too big" (RFC 4443 section 3.2) for the sender of ``data``, quoting as
    much of it as fits in 1280 bytes, with the MTU that fits (at least 1280). The source
    address and the checksum are left 0: the ICMPv6 socket that sends it fills them in (the
    checksum covers the source, which the kernel picks on the route back)."""
    icmp_len = min(hdr.total_length + 8, ICMPV6_REPLY_LIMIT - ipv6.IPV6_HEADER)
    icmp = bytearray(icmp_len)
    icmp[0] = ipv6.ICMPV6_PACKET_TOO_BIG
    icmp[4:8] = max(mtu, ipv6.MIN_MTU).to_bytes(4, "big")
    icmp[8:] = data[: icmp_len - 8]
    return ipv6.build_header6(0, 0, icmp_len, ipv6.NH_ICMPV6, 255, 0, hdr.src) + bytes(icmp)


def fragment_own(packet: bytes, mtu: int, ident: int) -> list[bytes]:
    """A packet this node built itself (a mixed tunnel's ESP packet, sent through a raw socket
    that never fragments) as fragments of at most ``mtu`` bytes, as its source may make them:
    IPv4 (RFC 791; ``packet`` is a 20-byte header without options, its own identification
    and DF kept on every fragment) or IPv6 (``ipv6.fragment_packet``, with identification
    ``ident``). The packet itself, alone, if it fits. EspError (TOO_BIG) if ``mtu`` holds no
    fragment."""
    if len(packet) <= mtu:
        return [packet]
    if packet[0] >> 4 == 6:
        return ipv6.fragment_packet(packet, ipv6.parse_ipv6(packet), mtu, ident)
    head_len = ip.IPV4_MIN_HEADER
    head, body = packet[:head_len], packet[head_len:]
    step = (mtu - head_len) & ~7
    if step <= 0:
        raise EspError(DropReason.TOO_BIG, f"an MTU of {mtu} bytes holds no fragment")
    out = []
    for at in range(0, len(body), step):
        piece = body[at : at + step]
        more = at + step < len(body)
        hdr = bytearray(head)
        total = ip.IPV4_MIN_HEADER + len(piece)
        hdr[2:4] = total.to_bytes(2, "big")
        flags = ((hdr[6] << 8) & ip.FLAG_DF) | (ip.FLAG_MF if more else 0) | (at >> 3)
        hdr[6:8] = flags.to_bytes(2, "big")
        hdr[10] = hdr[11] = 0
        hdr[10:12] = ip.checksum(hdr).to_bytes(2, "big")
        out.append(bytes(hdr) + piece)
    return out

"""Path MTU for ESP (RFC 4301 section 8): learning it, and telling a sender what fits.

- RFC 1191: an ICMP "fragmentation needed" (type 3, code 4) quoting one of our ESP packets
  says the next hop's MTU (a report of 0, or one not below the packet that did not fit, is
  read from the plateau table of section 7); never below 576 bytes (RFC 791); a learned
  value holds for ten minutes (6.3);
- RFC 792 / RFC 1191 4: the "fragmentation needed" we send to the sender of a packet too big
  for the path once ESP is added, quoting its header and 8 bytes, with the largest inner
  packet that fits; RFC 4443 3.2: the ICMPv6 "packet too big", quoting what fits in 1280
  bytes. The sources (and the ICMPv6 checksum) are left 0: the socket that sends them fills
  them in.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Final

from .framing import esp_length
from .ipwire import ICMP, ICMPV6, V4, V6, internet_checksum, new_v4_header, new_v6_header
from .state import Association

MIN_PMTU: Final = 576
PMTU_AGE: Final = 600.0
PLATEAUS: Final = (32000, 17914, 8166, 4352, 2002, 1492, 1006, 508, 296, 68)
MIN_MTU6: Final = 1280


@dataclass(frozen=True)
class Report:
    """What a "fragmentation needed" about ESP says: the SPI, the peer the quoted packet
    went to, and the path MTU to use."""

    spi: int
    peer: IPv4Address
    mtu: int


def usable(reported: int, quoted_total: int) -> int:
    if reported == 0 or reported >= quoted_total > 0:
        reported = next((p for p in PLATEAUS if p < quoted_total), 0)
    return max(reported, MIN_PMTU)


def fragmentation_needed(packet: V4) -> Report | None:
    """The report in an ICMP "fragmentation needed" that quotes an ESP packet, else None."""
    p = packet.payload
    if (packet.protocol != ICMP or packet.later_fragment or len(p) < 8 or p[0] != 3
            or p[1] != 4):
        return None
    quote = p[8:]
    if len(quote) < 20 or quote[0] >> 4 != 4 or quote[9] != 50:
        return None
    qlen = (quote[0] & 0x0F) * 4
    if qlen < 20 or len(quote) < qlen + 4:
        return None
    return Report(int.from_bytes(quote[qlen : qlen + 4], "big"), IPv4Address(quote[16:20]),
                  usable(int.from_bytes(p[6:8], "big"), int.from_bytes(quote[2:4], "big")))


def _outer(sa: Association) -> int:
    if not sa.tunnel:
        return 0
    return 40 if isinstance(sa.remote, IPv6Address) else 20


def esp_size(sa: Association, inner_total: int, header_len: int) -> int:
    """The ESP packet's length for an inner packet of ``inner_total`` bytes whose headers
    (those transport mode keeps in front of ESP) are ``header_len`` bytes."""
    if sa.tunnel:
        return esp_length(sa, inner_total, _outer(sa))
    return esp_length(sa, inner_total - header_len, header_len)


def largest_inner(sa: Association, path_mtu: int, header_len: int) -> int:
    """The largest inner packet that still fits ``path_mtu`` once ESP is added."""
    t = sa.transform
    size = path_mtu - (8 + t.iv_len + 2 + t.icv_len + _outer(sa) + (8 if sa.udp else 0))
    while size > header_len and esp_size(sa, size, header_len) > path_mtu:
        size -= 1
    return max(size, header_len)


def fragmentation_needed_reply(packet: V4, mtu: int) -> bytes:
    quote = (packet.header + packet.payload)[: len(packet.header) + 8]
    icmp = bytearray(bytes((3, 4, 0, 0, 0, 0)) + mtu.to_bytes(2, "big") + quote)
    icmp[2:4] = internet_checksum(bytes(icmp)).to_bytes(2, "big")
    return new_v4_header(0xC0, 20 + len(icmp), 0, False, 64, ICMP, IPv4Address(0),
                         packet.src) + bytes(icmp)


def packet_too_big_reply(packet: V6, mtu: int) -> bytes:
    length = min(packet.total + 8, MIN_MTU6 - 40)
    icmp = bytes((2, 0, 0, 0)) + max(mtu, MIN_MTU6).to_bytes(4, "big") + packet.data[: length - 8]
    return new_v6_header(0, 0, length, ICMPV6, 255, IPv6Address(0), packet.src) + icmp

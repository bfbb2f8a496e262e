"""Fragments a source makes of a packet it built itself and can't send whole: an ESP packet
too big for the interface, which only fragmentation at the source gets across (RFC 4303
3.3.4: ESP is fragmented after it is made).

- IPv4 (RFC 791 3.2): a 20-byte header on each fragment, the payload cut at multiples of 8
  bytes, More Fragments on all but the last, the identification and DF of the packet kept;
- IPv6 (RFC 8200 4.5): the headers up to ESP are the unfragmentable part, repeated with a
  fragment header after them naming ESP, the rest cut at multiples of 8 bytes.
"""

from __future__ import annotations

import struct

from .ipwire import DF, FRAGMENT, MF, Refused, parse_v6, v4_header


def fragment_v4(packet: bytes, mtu: int) -> list[bytes]:
    """``packet`` (a header of 20 bytes, ours) in fragments of at most ``mtu`` bytes."""
    if len(packet) <= mtu:
        return [packet]
    header, body = packet[:20], packet[20:]
    step = (mtu - 20) // 8 * 8
    if step <= 0:
        raise Refused("too_big", f"an MTU of {mtu} bytes holds no fragment")
    keep_df = int.from_bytes(header[6:8], "big") & DF
    pieces = []
    for at in range(0, len(body), step):
        piece = body[at : at + step]
        more = MF if at + len(piece) < len(body) else 0
        pieces.append(v4_header(header, total=20 + len(piece), flags=keep_df | more | at // 8)
                      + piece)
    return pieces


def fragment_v6(packet: bytes, mtu: int, ident: int) -> list[bytes]:
    """``packet`` (ours: its headers lead to ESP) in fragments of at most ``mtu`` bytes, each
    with identification ``ident``."""
    walked = parse_v6(packet)
    unfragmentable = bytearray(packet[: walked.upper_at])
    unfragmentable[walked.upper_named_at] = FRAGMENT
    rest = packet[walked.upper_at :]
    step = (mtu - len(unfragmentable) - 8) // 8 * 8
    if step <= 0:
        raise Refused("too_big", f"headers of {len(unfragmentable)} bytes leave no room in {mtu}")
    pieces = []
    for at in range(0, len(rest), step):
        piece = rest[at : at + step]
        more = 1 if at + len(piece) < len(rest) else 0
        unfragmentable[4:6] = (len(unfragmentable) - 40 + 8 + len(piece)).to_bytes(2, "big")
        fragment_header = struct.pack("!BBHI", walked.upper, 0, at | more, ident)
        pieces.append(bytes(unfragmentable) + fragment_header + piece)
    return pieces

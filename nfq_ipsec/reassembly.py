"""Reassembly of IP fragments read from a capture (``decode``), RFC 791 section 3.2 / RFC 815.

A peer such as the Linux kernel encrypts a big packet without DF whole and then fragments the
ESP packet; nothing can be checked about ESP until it is whole (RFC 4303 section 3.4.1). On
the live path the kernel reassembles before our rules (``rules.py``: the rule that turns on
defragmentation); in a capture this module does the same for ``decode``.

The datagram key and the fragment's place come from the caller (:class:`Fragment`):
:func:`ipv4_fragment` reads them from an IPv4 header, :func:`ipv6_fragment` from an IPv6
fragment header, found with the walk the kernel makes, which does not look past it (RFC 8200
section 4.5: the key is source, destination and identification; the headers in front of the
fragment header are the first fragment's, and the reassembled packet has no fragment header, as
the Linux kernel's reassembly leaves it, an atomic fragment's included). Fail closed:
overlapping fragments (RFC 5722's rule, applied to IPv4 too: no legitimate sender makes them) or
a datagram bigger than 65,535 bytes (IPv6: of payload) discard the whole datagram;
:meth:`Reassembler.add` then says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .core import ipv6
from .core import packet as ip

MAX_DATAGRAM = 65535
MAX_PENDING = 1024  # datagrams held at once: more (a capture of a flood) drops the oldest
_BEFORE_FRAGMENT = frozenset((ipv6.NH_HOP_BY_HOP, ipv6.NH_ROUTING, ipv6.NH_DEST_OPTS))


@dataclass(frozen=True)
class Fragment:
    key: tuple[object, ...]  # (family, src, dst, protocol, identification)
    offset: int  # of its payload, in bytes
    more: bool  # more fragments follow (MF)
    payload: bytes  # after the IP header
    header: bytes  # the IP header (the first fragment's is the reassembled packet's)
    limit: int = MAX_DATAGRAM  # the most its header and the whole payload may come to


@dataclass
class _Pending:
    parts: dict[int, bytes] = field(default_factory=dict)
    header: bytes = b""
    total: int | None = None  # payload length, known once the last fragment came
    count: int = 0


class Overlap(Exception):
    """The fragments of one datagram overlap, or it would exceed 65,535 bytes: discarded."""


class Reassembler:
    def __init__(self) -> None:
        self._pending: dict[tuple[object, ...], _Pending] = {}

    def add(self, frag: Fragment) -> tuple[bytes, bytes, int] | None:
        """The first fragment's header, the whole payload and the number of fragments, once
        the datagram is whole; None while it isn't. Raises :class:`Overlap` (the datagram is
        dropped) for overlapping or oversized fragments."""
        p = self._pending.get(frag.key)
        if p is None:
            if len(self._pending) >= MAX_PENDING:
                del self._pending[next(iter(self._pending))]
            p = self._pending[frag.key] = _Pending()
        end = frag.offset + len(frag.payload)
        bad = end + len(frag.header) > frag.limit or (p.total is not None and end > p.total)
        bad = bad or (not frag.more and (p.total is not None or
                                         any(o + len(d) > end for o, d in p.parts.items())))
        for o, d in p.parts.items():
            if o < end and frag.offset < o + len(d):
                bad = True
        if bad:
            del self._pending[frag.key]
            raise Overlap(f"fragment at {frag.offset}..{end} overlaps or overflows its datagram")
        p.parts[frag.offset] = frag.payload
        p.count += 1
        if frag.offset == 0:
            p.header = frag.header
        if not frag.more:
            p.total = end
        if p.total is None or not p.header or sum(map(len, p.parts.values())) != p.total:
            return None
        del self._pending[frag.key]
        payload = b"".join(d for _o, d in sorted(p.parts.items()))
        return p.header, payload, p.count


def ipv4_fragment(data: bytes, hdr: ip.IPv4Header) -> Fragment:
    """The fragment an IPv4 packet is (``hdr.is_fragment``)."""
    offset = (hdr.flags_frag & ip.FRAG_OFFSET_MASK) * 8
    more = bool(hdr.flags_frag & ip.FLAG_MF)
    return Fragment((4, hdr.src, hdr.dst, hdr.protocol, hdr.ident), offset, more,
                    data[hdr.ihl:hdr.total_length], data[:hdr.ihl])


def ipv4_whole(header: bytes, payload_len: int) -> bytes:
    """The first fragment's header made the whole packet's: its length, no MF, no offset,
    checksum redone."""
    h = bytearray(header)
    total = len(h) + payload_len
    h[2], h[3] = total >> 8, total & 0xFF
    h[6] &= 0x40  # keep DF only
    h[7] = 0
    h[10] = h[11] = 0
    csum = ip.checksum(bytes(h))
    h[10], h[11] = csum >> 8, csum & 0xFF
    return bytes(h)


def ipv6_fragment(data: bytes) -> Fragment | None:
    """The fragment an IPv6 packet is, found as the receiving kernel finds it: the fragment
    header in the chain of hop-by-hop, routing and destination options headers in front of
    it, whatever follows it (a first fragment may end inside the rest of the chain). None
    without one, or where the chain runs past the packet. Its header is the headers in front
    of the fragment header, the last of them naming what the fragment header named."""
    n = len(data)
    if n < ipv6.IPV6_HEADER or data[0] >> 4 != 6:
        return None
    end = ipv6.IPV6_HEADER + ((data[4] << 8) | data[5])
    if end > n:
        return None
    nh_at, at = 6, ipv6.IPV6_HEADER
    while data[nh_at] != ipv6.NH_FRAGMENT:
        if data[nh_at] not in _BEFORE_FRAGMENT or at + 8 > end:
            return None
        nh_at, at = at, at + (data[at + 1] + 1) * 8
    if at + ipv6.FRAGMENT_HEADER > end:
        return None
    header = bytearray(data[:at])
    header[nh_at] = data[at]
    field = (data[at + 2] << 8) | data[at + 3]
    src = ipv6.V6 | int.from_bytes(data[8:24], "big")
    dst = ipv6.V6 | int.from_bytes(data[24:40], "big")
    ident = int.from_bytes(data[at + 4 : at + 8], "big")
    return Fragment((6, src, dst, ident), field & 0xFFF8, bool(field & 1),
                    data[at + ipv6.FRAGMENT_HEADER : end], bytes(header),
                    MAX_DATAGRAM + ipv6.IPV6_HEADER)


def ipv6_whole(header: bytes, payload_len: int) -> bytes:
    """The first fragment's headers made the whole packet's: its payload length."""
    plen = len(header) - ipv6.IPV6_HEADER + payload_len
    return header[:4] + bytes((plen >> 8, plen & 0xFF)) + header[6:]

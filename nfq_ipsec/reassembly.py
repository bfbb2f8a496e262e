"""Reassembly of IP fragments read from a capture (``decode``), RFC 791 section 3.2 / RFC 815.

A peer such as the Linux kernel encrypts a big packet without DF whole and then fragments the
ESP packet; nothing can be checked about ESP until it is whole (RFC 4303 section 3.4.1). On
the live path the kernel reassembles before our rules (``rules.py``: the rule that turns on
defragmentation); in a capture this module does the same for ``decode``.

The datagram key and the fragment's place come from the caller (:class:`Fragment`), so IPv4
and IPv6 feed the same :class:`Reassembler`: :func:`ipv4_fragment` reads them from an IPv4
header, :func:`ipv6_fragment` from an IPv6 fragment header (RFC 8200 section 4.5: the
datagram is source, destination and identification; the first fragment's unfragmentable part,
with the fragment header taken out, heads the whole packet). Fail closed: overlapping
fragments (RFC 5722's rule, applied to IPv4 too: no legitimate sender makes them) or a
datagram bigger than 65,535 bytes discard the whole datagram; :meth:`Reassembler.add` then
says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .core import ipv6
from .core import packet as ip

MAX_DATAGRAM = 65535
MAX_PENDING = 1024  # datagrams held at once: more (a capture of a flood) drops the oldest


@dataclass(frozen=True)
class Fragment:
    key: tuple[object, ...]  # (family, src, dst, protocol, identification)
    offset: int  # of its payload, in bytes
    more: bool  # more fragments follow (MF)
    payload: bytes  # after the IP header
    header: bytes  # the IP header (the first fragment's is the reassembled packet's)


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
        bad = end + len(frag.header) > MAX_DATAGRAM or (p.total is not None and end > p.total)
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


def ipv6_fragment(data: bytes, hdr: ipv6.IPv6Header) -> Fragment:
    """The fragment an IPv6 packet is (``hdr.is_fragment``): what follows its fragment header,
    and in front of it the headers before that one, the byte that named the fragment header
    now naming what the fragment header named (the first fragment's is the packet's)."""
    nh, nh_at, off = data[6], 6, ipv6.IPV6_HEADER
    while nh != ipv6.NH_FRAGMENT:  # parse_ipv6 walked this chain already: it is well formed
        nh_at, nh = off, data[off]
        off += (data[off + 1] + 1) * 8
    ident = int.from_bytes(data[off + 4:off + 8], "big")
    header = bytearray(data[:off])
    header[nh_at] = data[off]
    return Fragment((6, hdr.src, hdr.dst, ident), hdr.frag_offset * 8, hdr.more_fragments,
                    data[off + ipv6.FRAGMENT_HEADER:hdr.total_length], bytes(header))


def ipv6_whole(header: bytes, payload_len: int) -> bytes:
    """The first fragment's unfragmentable part made the whole packet's header: its payload
    length."""
    h = bytearray(header)
    plen = len(h) - ipv6.IPV6_HEADER + payload_len
    h[4], h[5] = plen >> 8, plen & 0xFF
    return bytes(h)

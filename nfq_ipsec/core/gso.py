"""TCP segmentation offload in the core: a GSO superpacket cut into the segments the kernel's
own TCP segmentation would make, each with its full IP and TCP checksums.

A queue bound with ``NFQA_CFG_F_GSO`` hands a worker a local TCP superpacket whole (up to
64 KiB of payload behind one IP and one TCP header) and leaves its TCP checksum partial (the
pseudo-header sum only, ``NFQA_SKB_CSUMNOTREADY``). The core cuts it as
``tcp_gso_segment``/``inet_gso_segment``/``ipv6_gso_segment`` do, given the segment size:

- every segment gets the superpacket's IP header and TCP header, options included;
- IPv4: the identification goes up by one per segment, the total length and the header
  checksum are each segment's; IPv6: the payload length is each segment's;
- TCP: the sequence number goes up by the bytes before the segment; CWR stays on the first
  segment only, FIN and PSH on the last only; every other field (ACK, window, urgent pointer,
  options, ECE, ...) is copied; the checksum is computed in full over each segment.

What it can't cut that way it refuses (``GSO_UNSUPPORTED``): not TCP, IPv4 with options or a
fragment, IPv6 with extension headers, a TCP header that doesn't fit. The segment size is not
in the superpacket (netfilter does not export ``gso_size``); the processor chooses it
(``Processor.gso_segment_size``, the reasoning in the README's *Outbound TCP superpackets*).

A packet that is not a superpacket but whose checksum is not ready either (a queue with the
GSO flag leaves it so, where a queue without it has the kernel complete it before the copy)
gets its TCP or UDP checksum completed (``complete_checksum``); any other protocol's partial
checksum (SCTP's CRC32c, for one) is refused (``CHECKSUM_PARTIAL``).

The one's complement sum is taken modulo 0xFFFF (the end-around carry of RFC 1071 is exactly
that, but for telling a sum of 0xFFFF from one of 0: ``_fold``), word by word in compiled
code (``_sum``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from . import ipv6
from . import packet as ip
from .errors import DropReason, EspError

if TYPE_CHECKING:
    from mypy_extensions import i64  # mypyc's native 64-bit integer: types only

TCP_HEADER: Final = 20
UDP_HEADER: Final = 8
_CWR: Final = 0x80
_FIN_PSH: Final = 0x09
_SYN: Final = 0x02
MIN_SEGMENT: Final = 8  # payload bytes: below this a segment size is refused (a broken path)
MSS_OPTION: Final = 2


def _fold(total: int) -> int:
    """The one's complement checksum of data whose word sum is ``total`` (modulo 0xFFFF): the
    sum's complement; a sum of 0 (modulo 0xFFFF) is a nonzero sum of 0xFFFF (the pseudo-header
    is never all zero), whose complement is 0."""
    r = total % 0xFFFF
    return 0xFFFF - r if r else 0


def _sum(data: bytes) -> int:
    """The word sum of ``data`` modulo 0xFFFF (an odd length padded with a zero byte): a loop
    over native 64-bit integers when compiled, about a fifth of the time of the same sum as
    one big integer's remainder (``int.from_bytes(data) % 0xFFFF``, whose division goes
    digit by digit; ``scripts/profile --gso``, the README's *Outbound TCP superpackets*).
    64 KiB of 0xFFFF words sum to well below 2**63."""
    return _sum_range(data, 0, len(data))


def _sum_range(data: bytes, start: int, stop: int) -> int:
    """``_sum(data[start:stop])`` without the copy."""
    n: i64 = stop
    total: i64 = 0
    i: i64 = start
    while i + 1 < n:
        hi: i64 = data[i]
        lo: i64 = data[i + 1]
        total += (hi << 8) | lo
        i += 2
    if i < n:
        last: i64 = data[i]
        total += last << 8
    return total % 0xFFFF


def _pseudo4(src: int, dst: int, protocol: int, length: int) -> int:
    return (src >> 16) + (src & 0xFFFF) + (dst >> 16) + (dst & 0xFFFF) + protocol + length


def _pseudo6(src: int, dst: int, protocol: int, length: int) -> int:
    return (_sum((src & ipv6.ADDR_MASK).to_bytes(16, "big"))
            + _sum((dst & ipv6.ADDR_MASK).to_bytes(16, "big")) + protocol + length)


def _tcp_header_length(data: bytes, at: int, end: int) -> int:
    if end - at < TCP_HEADER:
        raise EspError(DropReason.GSO_UNSUPPORTED, "shorter than a TCP header")
    hlen = (data[at + 12] >> 4) * 4
    if hlen < TCP_HEADER or at + hlen > end:
        raise EspError(DropReason.GSO_UNSUPPORTED, "TCP header length out of the packet")
    return hlen


def _check_size(size: int) -> None:
    if size < MIN_SEGMENT:
        raise EspError(DropReason.GSO_UNSUPPORTED, f"segment size {size} too small")


def _tcp_segment(tcp: bytearray, flags: int, first: bool, last: bool, seq: int, pseudo: int,
                 payload: bytes) -> int:
    """Write one segment's TCP header into ``tcp`` (the superpacket's, reused): its flags as
    the kernel's segmentation sets them (CWR on the first only, FIN and PSH on the last only),
    its sequence number and its checksum (``pseudo``: the pseudo-header's sum without the
    length). Returns the segment's TCP length."""
    seg_flags = flags if first else flags & ~_CWR
    if not last:
        seg_flags &= ~_FIN_PSH
    tcp[13] = seg_flags
    tcp[4] = (seq >> 24) & 0xFF
    tcp[5] = (seq >> 16) & 0xFF
    tcp[6] = (seq >> 8) & 0xFF
    tcp[7] = seq & 0xFF
    tcp[16] = tcp[17] = 0
    tcp_len = len(tcp) + len(payload)
    csum = _fold(pseudo + tcp_len + _sum(bytes(tcp)) + _sum(payload))
    tcp[16] = csum >> 8
    tcp[17] = csum & 0xFF
    return tcp_len


def segment4(data: bytes, hdr: ip.IPv4Header, size: int) -> list[bytes]:
    """The segments of IPv4 TCP superpacket ``data`` (``hdr`` its parse), ``size`` bytes of
    TCP payload each but the last. Raises EspError(GSO_UNSUPPORTED)."""
    if hdr.protocol != ip.PROTO_TCP:
        raise EspError(DropReason.GSO_UNSUPPORTED, f"a superpacket of protocol {hdr.protocol}")
    if hdr.ihl != ip.IPV4_MIN_HEADER:
        raise EspError(DropReason.GSO_UNSUPPORTED, "IPv4 options")
    if hdr.flags_frag & (ip.FLAG_MF | ip.FRAG_OFFSET_MASK):
        raise EspError(DropReason.GSO_UNSUPPORTED, "a fragment")
    _check_size(size)
    at = ip.IPV4_MIN_HEADER
    end = hdr.total_length
    hlen = _tcp_header_length(data, at, end)
    first = at + hlen
    tcp = bytearray(data[at:first])
    tcp[16] = tcp[17] = 0
    flags = tcp[13]
    seq = (tcp[4] << 24) | (tcp[5] << 16) | (tcp[6] << 8) | tcp[7]
    iph = bytearray(data[:at])
    ident = hdr.ident
    pseudo = (hdr.src >> 16) + (hdr.src & 0xFFFF) + (hdr.dst >> 16) + (hdr.dst & 0xFFFF) \
        + ip.PROTO_TCP
    # the IPv4 header's sum without its length, identification and checksum fields
    iph[2] = iph[3] = iph[4] = iph[5] = iph[10] = iph[11] = 0
    head_sum = _sum(bytes(iph))
    out: list[bytes] = []
    pos = first
    while True:
        stop = min(pos + size, end)
        last = stop == end
        payload = data[pos:stop]
        tcp_len = _tcp_segment(tcp, flags, pos == first, last, seq, pseudo, payload)
        total = at + tcp_len
        iph[2] = total >> 8
        iph[3] = total & 0xFF
        iph[4] = (ident >> 8) & 0xFF
        iph[5] = ident & 0xFF
        iph[10] = iph[11] = 0
        hcsum = _fold(head_sum + total + (ident & 0xFFFF))
        iph[10] = hcsum >> 8
        iph[11] = hcsum & 0xFF
        out.append(b"".join((iph, tcp, payload)))
        if last:
            return out
        seq = (seq + stop - pos) & 0xFFFFFFFF
        ident += 1
        pos = stop


def segment6(data: bytes, hdr: ipv6.IPv6Header, size: int) -> list[bytes]:
    """``segment4`` for an IPv6 TCP superpacket (no extension headers). Raises
    EspError(GSO_UNSUPPORTED)."""
    if hdr.offset != ipv6.IPV6_HEADER or hdr.protocol != ip.PROTO_TCP:
        raise EspError(DropReason.GSO_UNSUPPORTED,
                       f"a superpacket of next header {hdr.protocol}"
                       + (" behind extension headers" if hdr.offset != ipv6.IPV6_HEADER else ""))
    _check_size(size)
    at = ipv6.IPV6_HEADER
    end = hdr.total_length
    hlen = _tcp_header_length(data, at, end)
    first = at + hlen
    tcp = bytearray(data[at:first])
    flags = tcp[13]
    seq = (tcp[4] << 24) | (tcp[5] << 16) | (tcp[6] << 8) | tcp[7]
    iph = bytearray(data[:at])
    pseudo = _pseudo6(hdr.src, hdr.dst, ip.PROTO_TCP, 0)
    out: list[bytes] = []
    pos = first
    while True:
        stop = min(pos + size, end)
        last = stop == end
        payload = data[pos:stop]
        tcp_len = _tcp_segment(tcp, flags, pos == first, last, seq, pseudo, payload)
        iph[4] = tcp_len >> 8
        iph[5] = tcp_len & 0xFF
        out.append(b"".join((iph, tcp, payload)))
        if last:
            return out
        seq = (seq + stop - pos) & 0xFFFFFFFF
        pos = stop


def complete_checksum(data: bytes, at: int, end: int, protocol: int, pseudo: int) -> bytes:
    """``data`` with the TCP or UDP checksum of the transport header at ``data[at:end]``
    computed in full (``pseudo``: the pseudo-header's sum without the length). Raises
    EspError(CHECKSUM_PARTIAL) for any other protocol."""
    if protocol == ip.PROTO_TCP:
        field = at + 16
        if end - at < TCP_HEADER:
            raise EspError(DropReason.CHECKSUM_PARTIAL, "shorter than a TCP header")
    elif protocol == ip.PROTO_UDP:
        field = at + 6
        if end - at < UDP_HEADER:
            raise EspError(DropReason.CHECKSUM_PARTIAL, "shorter than a UDP header")
    else:
        raise EspError(DropReason.CHECKSUM_PARTIAL, f"a partial checksum of protocol {protocol}")
    # the sum over the header and payload as they are, less the partial value in the field
    # (at an even offset from ``at``, so one of the summed words)
    partial = (data[field] << 8) | data[field + 1]
    csum = _fold(pseudo + (end - at) + _sum_range(data, at, end) + 0xFFFF - partial)
    if protocol == ip.PROTO_UDP and csum == 0:
        csum = 0xFFFF  # RFC 768: a computed 0 is sent as all ones
    return b"".join((data[:field], bytes((csum >> 8, csum & 0xFF)), data[field + 2:]))


def complete4(data: bytes, hdr: ip.IPv4Header) -> bytes:
    """``complete_checksum`` for an IPv4 packet (not a later fragment: the kernel never leaves
    one's checksum partial)."""
    if hdr.flags_frag & (ip.FLAG_MF | ip.FRAG_OFFSET_MASK):
        raise EspError(DropReason.CHECKSUM_PARTIAL, "a fragment")
    return complete_checksum(data, hdr.ihl, hdr.total_length, hdr.protocol,
                             _pseudo4(hdr.src, hdr.dst, hdr.protocol, 0))


def complete6(data: bytes, hdr: ipv6.IPv6Header) -> bytes:
    """``complete_checksum`` for an IPv6 packet, behind its extension headers."""
    if hdr.frag_offset >= 0:
        raise EspError(DropReason.CHECKSUM_PARTIAL, "a fragment")
    return complete_checksum(data, hdr.offset, hdr.total_length, hdr.protocol,
                             _pseudo6(hdr.src, hdr.dst, hdr.protocol, 0))


def syn_mss(data: bytes, at: int, end: int) -> int:
    """The MSS option of a TCP SYN (or SYN-ACK) whose header is at ``data[at:end]``; 0 if it
    is not a SYN or carries none."""
    if end - at < TCP_HEADER or not data[at + 13] & _SYN:
        return 0
    hlen = (data[at + 12] >> 4) * 4
    stop = min(at + hlen, end)
    pos = at + TCP_HEADER
    while pos < stop:
        kind = data[pos]
        if kind == 0:
            return 0
        if kind == 1:
            pos += 1
            continue
        if pos + 1 >= stop:
            return 0
        olen = data[pos + 1]
        if olen < 2 or pos + olen > stop:
            return 0
        if kind == MSS_OPTION and olen == 4:
            return (data[pos + 2] << 8) | data[pos + 3]
        pos += olen
    return 0

"""Read pcap and pcapng files (what tcpdump and tshark write), no dependencies.

One reader, three views, each built on the one below:

- :func:`read_records`: each frame as captured, with its link type;
- :func:`read_frames`: the network layer of each frame, as (ethertype, bytes): IPv4, IPv6,
  ARP, whatever the link carries (the namespace lab's wire check sorts these);
- :func:`read_packets`: the IP packet (IPv4 or IPv6) of each frame, or None for a frame that
  carries neither, so numbering matches what other tools show (``nfq-ipsec decode``).

Link types: Ethernet with or without VLAN tags, raw IP, Linux cooked v1/v2. A frame of any
other link type comes out whole with ethertype :data:`ETH_UNKNOWN`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_IPV4 = 228
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276
ETH_IPV4, ETH_ARP, ETH_IPV6 = 0x0800, 0x0806, 0x86DD
ETH_UNKNOWN = 0  # a link type (or a frame too short) this reader can't take apart
_ETH_VLAN = (0x8100, 0x88A8)


class PcapError(Exception):
    pass


def read_packets(path: str | Path) -> Iterator[bytes | None]:
    """The IPv4 or IPv6 packet of each frame; None for a frame without one."""
    for etype, payload in read_frames(path):
        yield payload if etype in (ETH_IPV4, ETH_IPV6) else None


def read_frames(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """(ethertype, network-layer bytes) of each frame."""
    for linktype, frame in read_records(path):
        yield network_layer(frame, linktype)


def read_records(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """(link type, frame as captured) of each record, pcap or pcapng."""
    data = Path(path).read_bytes()
    if len(data) < 4:
        raise PcapError(f"{path}: too short to be a capture")
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d"):
        yield from _pcap(data, path)
    elif magic == b"\x0a\x0d\x0d\x0a":
        yield from _pcapng(data, path)
    else:
        raise PcapError(f"{path}: not a pcap or pcapng file")


def _pcap(data: bytes, path: str | Path) -> Iterator[tuple[int, bytes]]:
    endian = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    if len(data) < 24:
        raise PcapError(f"{path}: truncated pcap header")
    linktype = struct.unpack_from(endian + "I", data, 20)[0] & 0x0FFFFFFF
    rec = struct.Struct(endian + "IIII")
    off = 24
    while off + 16 <= len(data):
        _s, _us, caplen, _len = rec.unpack_from(data, off)
        off += 16
        if off + caplen > len(data):
            raise PcapError(f"{path}: truncated record at byte {off - 16}")
        yield linktype, data[off : off + caplen]
        off += caplen


def _pcapng(data: bytes, path: str | Path) -> Iterator[tuple[int, bytes]]:
    endian = "<"
    linktypes: list[int] = []
    off = 0
    while off + 12 <= len(data):
        if data[off : off + 4] == b"\x0a\x0d\x0d\x0a":  # section header: byte order and new IDBs
            bom = data[off + 8 : off + 12]
            endian = "<" if bom == b"\x4d\x3c\x2b\x1a" else ">"
            linktypes = []
        btype, blen = struct.unpack_from(endian + "II", data, off)
        if blen < 12 or off + blen > len(data):
            raise PcapError(f"{path}: bad pcapng block at byte {off}")
        body = data[off + 8 : off + blen - 4]
        if btype == 1:  # interface description
            linktypes.append(struct.unpack_from(endian + "H", body, 0)[0])
        elif btype == 6:  # enhanced packet
            iface, _th, _tl, caplen, _ol = struct.unpack_from(endian + "IIIII", body, 0)
            lt = linktypes[iface] if iface < len(linktypes) else LINKTYPE_ETHERNET
            yield lt, body[20 : 20 + caplen]
        elif btype == 3:  # simple packet
            lt = linktypes[0] if linktypes else LINKTYPE_ETHERNET
            yield lt, body[4:]
        off += blen


def network_layer(frame: bytes, linktype: int) -> tuple[int, bytes]:
    """(ethertype, network-layer bytes) of one captured frame."""
    if linktype in (LINKTYPE_RAW, LINKTYPE_IPV4):
        version = frame[0] >> 4 if frame else 0
        if version == 4:
            return ETH_IPV4, frame
        return (ETH_IPV6 if version == 6 and linktype == LINKTYPE_RAW else ETH_UNKNOWN), frame
    if linktype == LINKTYPE_ETHERNET:
        off, etype = 12, ETH_UNKNOWN
        while off + 2 <= len(frame):
            etype = struct.unpack_from("!H", frame, off)[0]
            if etype in _ETH_VLAN:
                off += 4
                continue
            break
        return etype, frame[off + 2 :]
    if linktype == LINKTYPE_LINUX_SLL and len(frame) >= 16:
        return struct.unpack_from("!H", frame, 14)[0], frame[16:]
    if linktype == LINKTYPE_LINUX_SLL2 and len(frame) >= 20:
        return struct.unpack_from("!H", frame, 0)[0], frame[20:]
    return ETH_UNKNOWN, frame

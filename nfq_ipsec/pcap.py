"""Read packets from pcap and pcapng files (what tcpdump and tshark write), no dependencies.

Yields the IPv4 packet of each frame, whatever the link type (Ethernet with or without VLAN
tags, raw IP, Linux cooked v1/v2); frames that carry no IPv4 yield None so numbering matches
what other tools show.
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
_ETH_IPV4 = 0x0800
_ETH_VLAN = (0x8100, 0x88A8)


class PcapError(Exception):
    pass


def read_packets(path: str | Path) -> Iterator[bytes | None]:
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


def _pcap(data: bytes, path: str | Path) -> Iterator[bytes | None]:
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
        yield ipv4_of_frame(data[off : off + caplen], linktype)
        off += caplen


def _pcapng(data: bytes, path: str | Path) -> Iterator[bytes | None]:
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
            yield ipv4_of_frame(body[20 : 20 + caplen], lt)
        elif btype == 3:  # simple packet
            lt = linktypes[0] if linktypes else LINKTYPE_ETHERNET
            yield ipv4_of_frame(body[4:], lt)
        off += blen


def ipv4_of_frame(frame: bytes, linktype: int) -> bytes | None:
    """The IPv4 packet inside one captured frame, or None."""
    if linktype in (LINKTYPE_RAW, LINKTYPE_IPV4):
        return frame if frame[:1] and frame[0] >> 4 == 4 else None
    if linktype == LINKTYPE_ETHERNET:
        off, etype = 12, None
        while off + 2 <= len(frame):
            etype = struct.unpack_from("!H", frame, off)[0]
            if etype in _ETH_VLAN:
                off += 4
                continue
            break
        return frame[off + 2 :] if etype == _ETH_IPV4 else None
    if linktype == LINKTYPE_LINUX_SLL and len(frame) >= 16:
        return frame[16:] if struct.unpack_from("!H", frame, 14)[0] == _ETH_IPV4 else None
    if linktype == LINKTYPE_LINUX_SLL2 and len(frame) >= 20:
        return frame[20:] if struct.unpack_from("!H", frame, 0)[0] == _ETH_IPV4 else None
    return None

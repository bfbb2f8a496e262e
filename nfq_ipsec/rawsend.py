"""Whole IP packets out through a raw socket, many per system call (``sendmmsg``).

A superpacket's ESP packets (``daemon.gso``) all go to one destination, the SA's peer, and
leave together: one ``sendmmsg`` through a raw ``IPPROTO_RAW`` socket of their family (the
header is the packet's own, as built), with the daemon's mark (``SO_MARK``) on each, so that
our rules let them out as they let out a reinjected ESP packet. The kernel routes each one
and runs it through the OUTPUT and POSTROUTING hooks as it would a packet sent one by one;
the batch saves the per-packet system call and the interpreter's work around it. Why this
and not one ``sendto`` per packet, an AF_PACKET ring or ``UDP_SEGMENT``: the README's
*Outbound TCP superpackets*.

``sendmmsg`` through ``ctypes``: the socket module has no binding for it. The message and
buffer arrays are built once (``BATCH_MAX`` entries) and reused; each call joins the packets
into one buffer and points the array at it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from collections.abc import Sequence

BATCH_MAX = 64  # packets per sendmmsg; a 64 KiB superpacket at the smallest MSS is 123


class _Iovec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


class _Msghdr(ctypes.Structure):
    _fields_ = (
        ("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
        ("iov", ctypes.POINTER(_Iovec)), ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t), ("flags", ctypes.c_int),
    )


class _Mmsghdr(ctypes.Structure):
    _fields_ = (("hdr", _Msghdr), ("len", ctypes.c_uint))


_FAMILY = struct.Struct("=H")  # sa_family_t, host byte order
_libc = ctypes.CDLL(None, use_errno=True)
_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = (ctypes.c_int, ctypes.POINTER(_Mmsghdr), ctypes.c_uint, ctypes.c_int)
_sendmmsg.restype = ctypes.c_int


def _sockaddr(family: int, packet: bytes) -> bytes:
    """The packet's destination as a sockaddr_in or sockaddr_in6 (port 0)."""
    if family == socket.AF_INET6:
        return _FAMILY.pack(socket.AF_INET6) + bytes(6) + packet[24:40] + bytes(4)
    return _FAMILY.pack(socket.AF_INET) + bytes(2) + packet[16:20] + bytes(8)


class BatchSender:
    """Sends lists of whole IP packets of either family with ``mark`` on each; the packets of
    one call go to the first one's destination (one SA's peer). ``send`` returns how many
    left; the kernel's refusal of the first raises OSError.

    Per call the packets are joined into one buffer (one copy) and the buffer array written
    with one ``struct`` pack: per packet, no ctypes object is made and no ctypes field set
    (measured: setting two fields and making a pointer per packet cost more than the system
    calls saved)."""

    def __init__(self, mark: int) -> None:
        self.mark = mark
        self._socks: dict[int, socket.socket] = {}
        self._closed: set[int] = set()  # families open_all could not open
        self._msgs = (_Mmsghdr * BATCH_MAX)()
        self._iovs = (_Iovec * BATCH_MAX)()
        self._name = ctypes.create_string_buffer(28)  # sockaddr_in6 is the larger
        self._family = 0
        for i in range(BATCH_MAX):
            hdr = self._msgs[i].hdr
            hdr.iov = ctypes.pointer(self._iovs[i])
            hdr.iovlen = 1
            hdr.name = ctypes.addressof(self._name)
        self._iov_at = ctypes.addressof(self._iovs)
        self._packs = [struct.Struct(f"={2 * n}Q") for n in range(BATCH_MAX + 1)]
        self.calls = 0  # sendmmsg calls made

    def open_all(self) -> None:
        """Open the sockets of both families now (a sandboxed worker opens none later); a
        family the host lacks stays closed, and a send of it raises OSError."""
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                self._sock(family)
            except OSError:
                self._closed.add(family)

    def _sock(self, family: int) -> socket.socket:
        sock = self._socks.get(family)
        if sock is None:
            if family in self._closed:
                raise OSError(errno.EAFNOSUPPORT, "no raw socket of this family")
            sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            self._socks[family] = sock
        return sock

    def send(self, packets: Sequence[bytes]) -> int:
        total = len(packets)
        if not total:
            return 0
        first = packets[0]
        family = socket.AF_INET6 if first[0] >> 4 == 6 else socket.AF_INET
        fd = self._sock(family).fileno()
        name = _sockaddr(family, first)
        ctypes.memmove(self._name, name, len(name))
        if family != self._family:
            for i in range(BATCH_MAX):
                self._msgs[i].hdr.namelen = len(name)
            self._family = family
        sent = 0
        while sent < total:
            count = min(total - sent, BATCH_MAX)
            chunk = packets[sent:sent + count]
            data = b"".join(chunk)
            base = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
            fields: list[int] = []
            at = base
            for p in chunk:
                n = len(p)
                fields.append(at)
                fields.append(n)
                at += n
            ctypes.memmove(self._iov_at, self._packs[count].pack(*fields), 16 * count)
            done: int = _sendmmsg(fd, self._msgs, count, 0)
            del data  # the kernel has copied it (or refused it)
            self.calls += 1
            if done < 0:
                code = ctypes.get_errno()
                if code == errno.EINTR:
                    continue
                if sent:
                    return sent
                raise OSError(code, os.strerror(code))
            sent += done
            if done < count:
                return sent
        return sent

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()

"""The NFQUEUE adapter: the only module that talks to the kernel's nfnetlink_queue.

Why this is a small netlink binding of our own and not the NetfilterQueue package
---------------------------------------------------------------------------------
NetfilterQueue 1.1.0 (``netfilterqueue/_impl.pyx``) receives into a fixed 4096-byte stack buffer
and clamps the copy range to ``4096 - 80 = 4016`` bytes; it does not expose NFQA_CAP_LEN, so a
caller can't even tell that a packet was cut. Measured on this kernel (6.18) with a 9000-MTU veth
pair and ``-t mangle -A OUTPUT -p udp -j NFQUEUE``: UDP payloads of 64, 1400, 4000, 8000 and 8972
bytes arrived in the callback as 92, 1428, 4016, 4016 and 4016 bytes (``get_payload_len()``).
Accepting without a payload let all five through; ``set_payload(get_payload())`` - what any ESP
rewrite does - let only the 64- and 1400-byte ones arrive: the kernel trimmed the others to 4016
bytes. Its ``run()``/``run_socket()`` also swallow ENOBUFS (queue overflow) silently, and its
verdicts are one syscall each. So we speak nfnetlink_queue directly over
``socket(AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER)``:

- bind the queue with copy mode PACKET and the largest copy range (the kernel caps it at
  65535 - 4 = 65531 bytes, the largest payload a netlink attribute can carry), and switch
  NFQA_CFG_F_FAIL_OPEN off explicitly: a full queue drops, it never passes cleartext;
- NFQA_CFG_F_GSO only when asked (``gso=True``, ``daemon.gso``): then the kernel queues a TCP
  superpacket whole (up to 64 KiB, which the copy range above carries; a bigger one arrives
  cut, NFQA_CAP_LEN, and is dropped as truncated) and no longer completes a partial
  checksum before copying, so each packet carries NFQA_SKB_INFO (GSO, checksum not ready,
  checksum not verified) for the worker to act on; off, the kernel segments and checksums;
- a large receive buffer, and several messages read per wake-up;
- ENOBUFS from ``recv`` (the kernel could not deliver a packet to us and dropped it) is counted,
  not hidden; the exact per-queue numbers come from ``/proc/net/netfilter/nfnetlink_queue``;
- every packet carries its real length (NFQA_CAP_LEN when cut), so the worker can drop a packet
  that arrived incomplete instead of forwarding a truncated one;
- verdicts carry the new payload (NFQA_PAYLOAD) and mark (NFQA_MARK); several verdict messages
  go to the kernel in one ``sendmsg`` (payload verdicts can't use the batch-verdict message).

The worker sees only :class:`QueueBinding` (bind / fileno / receive / verdict / flush / close)
and :class:`QueuedPacket`; tests substitute a fake with the same methods.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

NETLINK_NETFILTER = 12
SOL_NETLINK = 270

# netlink message types and flags (linux/netlink.h)
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4

# nfnetlink (linux/netfilter/nfnetlink.h, nfnetlink_queue.h)
NFNL_SUBSYS_QUEUE = 3
NFNETLINK_V0 = 0
NFQNL_MSG_PACKET = (NFNL_SUBSYS_QUEUE << 8) | 0
NFQNL_MSG_VERDICT = (NFNL_SUBSYS_QUEUE << 8) | 1
NFQNL_MSG_CONFIG = (NFNL_SUBSYS_QUEUE << 8) | 2

NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_PACKET = 2

NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_FAIL_OPEN = 0x1
NFQA_CFG_F_GSO = 0x4  # off: the kernel segments GSO packets before queueing them (each < 64 KiB)

NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_MARK = 3
NFQA_IFINDEX_INDEV = 5
NFQA_PAYLOAD = 10
NFQA_CAP_LEN = 13
NFQA_SKB_INFO = 14
# NFQA_SKB_INFO's bits. The first two only on a queue bound with NFQA_CFG_F_GSO (without it the
# kernel segments and checksums before copying); the third on any queue.
NFQA_SKB_CSUMNOTREADY = 0x1  # CHECKSUM_PARTIAL: the L4 checksum holds the pseudo-header sum
NFQA_SKB_GSO = 0x2  # a GSO superpacket: more than one segment's payload
NFQA_SKB_CSUM_NOTVERIFIED = 0x4  # received, its checksum not verified by the stack or the NIC

NF_DROP = 0
NF_ACCEPT = 1

# netfilter hooks (linux/netfilter.h), as reported in the packet header
HOOK_PRE_ROUTING = 0
HOOK_LOCAL_IN = 1
HOOK_FORWARD = 2
HOOK_LOCAL_OUT = 3
HOOK_POST_ROUTING = 4

MAX_COPY_RANGE = 0xFFFF  # asked for; the kernel caps it at 0xFFFF - NLA_HDRLEN
MAX_VERDICT_PAYLOAD = 0xFFFF - 4  # an nlattr's length is 16 bits and includes its 4-byte header
DEFAULT_MAX_LEN = 2048  # packets the kernel holds for this queue before it drops (queue_dropped)
DEFAULT_RCVBUF = 16 << 20  # socket receive buffer: overflow here counts as user_dropped
DEFAULT_SNDBUF = 4 << 20
RECV_BUFFER = 1 << 18  # one netlink message: a packet of up to 64 KiB plus its attributes
SEND_CHUNK = 1 << 18  # bytes of verdict messages per sendmsg
SEND_IOV_MAX = 512  # buffers per sendmsg (IOV_MAX is 1024)
PROC_QUEUES = "/proc/net/netfilter/nfnetlink_queue"

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid (host byte order)
_NLMSG_LEN_TYPE = struct.Struct("=IH")
_NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (queue number, big endian)
_NLATTR = struct.Struct("=HH")  # len, type
_ERRNO = struct.Struct("=i")
_PACKET_HDR = struct.Struct("!IHB")  # packet_id, hw_protocol, hook
_BE32 = struct.Struct("!I")
_HDRS_LEN = _NLMSGHDR.size + _NFGENMSG.size
# A verdict message: nlmsghdr, nfgenmsg, NFQA_VERDICT_HDR{verdict, id}[, NFQA_MARK{mark}].
# One host-order struct; the fields the kernel reads in network order are passed through
# htons/htonl, so a verdict is a single pack call.
_VERDICT_NOMARK = struct.Struct("=IHHII" "BBH" "HHII")
_VERDICT_MARK = struct.Struct("=IHHII" "BBH" "HHII" "HHI")
_VERDICT_NOMARK_PAYLOAD = struct.Struct("=IHHII" "BBH" "HHII" "HH")
_VERDICT_MARK_PAYLOAD = struct.Struct("=IHHII" "BBH" "HHII" "HHI" "HH")
_htons = socket.htons
_htonl = socket.htonl
_ACCEPT_BE = socket.htonl(NF_ACCEPT)
_DROP_BE = socket.htonl(NF_DROP)
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")


class NfQueueError(OSError):
    """The kernel refused a queue operation (bind, config), with the errno it gave."""


@dataclass(slots=True)
class QueuedPacket:
    """One packet the kernel handed us. ``length`` is its real length (NFQA_CAP_LEN when the
    copy was cut short); ``len(payload) < length`` means the copy is incomplete."""

    packet_id: int
    hook: int
    payload: bytes
    length: int
    mark: int = 0
    indev: int = 0  # the interface it arrived on (ifindex; 0: none, a locally generated packet)
    skb_info: int = 0  # NFQA_SKB_INFO's bits (NFQA_SKB_GSO, ..., see there)


class QueueBinding(Protocol):
    """What the worker needs from a queue binding. ``receive`` never blocks."""

    overflows: int

    def bind(self, queue_num: int) -> None: ...

    def fileno(self) -> int: ...

    def receive(self, limit: int) -> list[QueuedPacket]: ...

    def verdict(
        self, packet_id: int, accept: bool, mark: int | None = None, payload: bytes | None = None
    ) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def _attr(atype: int, value: bytes) -> bytes:
    raw = _NLATTR.pack(_NLATTR.size + len(value), atype) + value
    return raw + _PAD[len(raw) & 3]


class NetlinkQueue:
    """One nfnetlink_queue queue over a raw netlink socket (see the module docstring)."""

    def __init__(
        self, max_len: int = DEFAULT_MAX_LEN, rcvbuf: int = DEFAULT_RCVBUF,
        sndbuf: int = DEFAULT_SNDBUF, want_indev: bool = False, gso: bool = False,
    ) -> None:
        self.max_len = max_len
        # NFQA_CFG_F_GSO: superpackets whole, partial checksums as they are (module docstring)
        self.gso = gso
        # Read each packet's input interface (a gateway tells inbound from forwarded by it).
        # Off elsewhere: reading it costs about 3 % of a packet's instructions.
        self.want_indev = want_indev
        self.rcvbuf = rcvbuf
        self.sndbuf = sndbuf
        self.queue_num: int | None = None
        self.overflows = 0  # ENOBUFS reports: the kernel dropped at least one packet each time
        self.verdict_errors = 0  # error replies to verdicts (unknown id, bad payload)
        self.last_verdict_error = 0
        self.truncated_messages = 0  # netlink messages longer than our buffer (never expected)
        self._sock: socket.socket | None = None
        self._seq = 0
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._backlog: list[QueuedPacket] = []
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    # -- setup ----------------------------------------------------------------------------
    def bind(self, queue_num: int) -> None:
        """Create the socket and bind ``queue_num``: copy whole packets, fail-open off, GSO
        as asked."""
        if self._sock is not None:
            raise RuntimeError("queue already bound")
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                             NETLINK_NETFILTER)
        try:
            _set_buffer(sock, socket.SO_RCVBUF, 33, self.rcvbuf)  # 33 = SO_RCVBUFFORCE
            _set_buffer(sock, socket.SO_SNDBUF, 32, self.sndbuf)  # 32 = SO_SNDBUFFORCE
            sock.bind((0, 0))
            self._sock = sock
            self._request(queue_num, self.bind_attributes(), f"bind queue {queue_num}")
        except BaseException:
            self._sock = None
            sock.close()
            raise
        self.queue_num = queue_num

    def bind_attributes(self) -> bytes:
        """The bind message's attributes: copy whole packets, the queue's length, fail-open
        off and GSO as asked (both in the mask, so both are set as said)."""
        return b"".join((
            _attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET)),
            _attr(NFQA_CFG_PARAMS, struct.pack("!IB", MAX_COPY_RANGE, NFQNL_COPY_PACKET)),
            _attr(NFQA_CFG_QUEUE_MAXLEN, _BE32.pack(self.max_len)),
            _attr(NFQA_CFG_MASK, _BE32.pack(NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO)),
            _attr(NFQA_CFG_FLAGS, _BE32.pack(NFQA_CFG_F_GSO if self.gso else 0)),
        ))

    def _request(self, queue_num: int, attrs: bytes, what: str) -> None:
        """Send one config message with NLM_F_ACK and wait for its answer. Packets that
        arrive meanwhile are kept for the next ``receive``."""
        assert self._sock is not None
        self._seq += 1
        seq = self._seq
        body = _NFGENMSG.pack(socket.AF_UNSPEC, NFNETLINK_V0, queue_num) + attrs
        msg = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), NFQNL_MSG_CONFIG,
                             NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body
        self._sock.send(msg)
        self._sock.settimeout(5.0)
        try:
            while True:
                n = self._sock.recv_into(self._buf)
                for mtype, off, end in _messages(self._view, n):
                    if mtype == NFQNL_MSG_PACKET:
                        self.parse(self._view[off - _NLMSGHDR.size:end], end - off + _NLMSGHDR.size,
                                   self._backlog)
                    elif mtype == NLMSG_ERROR:
                        (err,) = _ERRNO.unpack_from(self._view, off)
                        (_, _, _, eseq, _) = _NLMSGHDR.unpack_from(self._view, off + 4)
                        if eseq != seq:
                            continue
                        if err:
                            code = -err
                            hint = ""
                            if code == errno.EPERM:
                                hint = " (another process holds this queue, or not root)"
                            elif code == errno.EBUSY:
                                hint = " (already bound by this socket)"
                            raise NfQueueError(code, f"{what}: {os.strerror(code)}{hint}")
                        return
        except TimeoutError:
            raise NfQueueError(errno.ETIMEDOUT, f"{what}: no answer from the kernel") from None
        finally:
            self._sock.setblocking(False)

    def fileno(self) -> int:
        if self._sock is None:
            raise RuntimeError("queue not bound")
        return self._sock.fileno()

    def close(self) -> None:
        """Close the socket; the kernel destroys the queue and drops what it still holds."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._pending.clear()
        self._pending_bytes = 0

    # -- data path ------------------------------------------------------------------------
    def receive(self, limit: int = 64) -> list[QueuedPacket]:
        """Up to ``limit`` queued packets, without blocking ([] when none are waiting)."""
        sock = self._sock
        if sock is None:
            raise RuntimeError("queue not bound")
        out = self._backlog
        self._backlog = []
        buf = self._buf
        view = self._view
        recv_into = sock.recv_into
        parse = self.parse
        flags = socket.MSG_DONTWAIT | socket.MSG_TRUNC
        while len(out) < limit:
            try:
                n = recv_into(buf, RECV_BUFFER, flags)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as err:
                if err.errno == errno.ENOBUFS:
                    self.overflows += 1
                    continue
                raise
            if n > RECV_BUFFER:
                self.truncated_messages += 1
                n = RECV_BUFFER
            parse(view, n, out)
        return out

    def parse(self, view: memoryview, n: int, out: list[QueuedPacket]) -> None:
        """Append the packets in ``view[:n]`` (netlink messages as one ``recv`` returns them)
        to ``out``; count error replies. One flat loop: this runs once per packet."""
        unpack_head = _NLMSG_LEN_TYPE.unpack_from
        unpack_attr = _NLATTR.unpack_from
        want_indev = self.want_indev
        off = 0
        while off + 16 <= n:
            length, mtype = unpack_head(view, off)
            end = off + length
            if length < 16 or end > n:
                return
            if mtype == NFQNL_MSG_PACKET:
                pos = off + _HDRS_LEN
                packet_id = hook = mark = indev = info = 0
                payload = b""
                cap_len = -1
                while pos + 4 <= end:
                    alen, atype = unpack_attr(view, pos)
                    if alen < 4:
                        break
                    atype &= 0x3FFF
                    if atype == NFQA_PAYLOAD:
                        payload = view[pos + 4:pos + alen].tobytes()
                    elif atype == NFQA_PACKET_HDR:
                        packet_id, _hw, hook = _PACKET_HDR.unpack_from(view, pos + 4)
                    elif atype == NFQA_MARK:
                        (mark,) = _BE32.unpack_from(view, pos + 4)
                    elif atype == NFQA_CAP_LEN:
                        (cap_len,) = _BE32.unpack_from(view, pos + 4)
                    elif want_indev and atype == NFQA_IFINDEX_INDEV:
                        (indev,) = _BE32.unpack_from(view, pos + 4)
                    elif atype == NFQA_SKB_INFO:
                        (info,) = _BE32.unpack_from(view, pos + 4)
                    pos += (alen + 3) & ~3
                out.append(QueuedPacket(packet_id, hook, payload,
                                        cap_len if cap_len >= 0 else len(payload), mark, indev,
                                        info))
            elif mtype == NLMSG_ERROR:
                (code,) = _ERRNO.unpack_from(view, off + 16)
                if code:
                    self.verdict_errors += 1
                    self.last_verdict_error = -code
            off = (end + 3) & ~3

    def verdict(
        self, packet_id: int, accept: bool, mark: int | None = None, payload: bytes | None = None
    ) -> None:
        """Queue a verdict; ``flush`` sends all queued verdicts in as few syscalls as it can."""
        qnum = _htons(self.queue_num or 0)
        code = _ACCEPT_BE if accept else _DROP_BE
        pending = self._pending
        if payload is None:
            if mark is None:
                total = _VERDICT_NOMARK.size
                pending.append(_VERDICT_NOMARK.pack(
                    total, NFQNL_MSG_VERDICT, NLM_F_REQUEST, 0, 0, 0, 0, qnum,
                    12, NFQA_VERDICT_HDR, code, _htonl(packet_id)))
            else:
                total = _VERDICT_MARK.size
                pending.append(_VERDICT_MARK.pack(
                    total, NFQNL_MSG_VERDICT, NLM_F_REQUEST, 0, 0, 0, 0, qnum,
                    12, NFQA_VERDICT_HDR, code, _htonl(packet_id), 8, NFQA_MARK, _htonl(mark)))
        else:
            plen = len(payload)
            if plen > MAX_VERDICT_PAYLOAD:
                raise ValueError(f"payload of {plen} bytes is larger than a verdict can carry")
            # One pack: the verdict message's header and attributes and the payload's attribute
            # header; then the payload itself (not copied) and its padding.
            if mark is None:
                total = _VERDICT_NOMARK_PAYLOAD.size + plen
                pending.append(_VERDICT_NOMARK_PAYLOAD.pack(
                    total, NFQNL_MSG_VERDICT, NLM_F_REQUEST, 0, 0, 0, 0, qnum,
                    12, NFQA_VERDICT_HDR, code, _htonl(packet_id), 4 + plen, NFQA_PAYLOAD))
            else:
                total = _VERDICT_MARK_PAYLOAD.size + plen
                pending.append(_VERDICT_MARK_PAYLOAD.pack(
                    total, NFQNL_MSG_VERDICT, NLM_F_REQUEST, 0, 0, 0, 0, qnum,
                    12, NFQA_VERDICT_HDR, code, _htonl(packet_id), 8, NFQA_MARK, _htonl(mark),
                    4 + plen, NFQA_PAYLOAD))
            pending.append(payload)
            pad = _PAD[plen & 3]
            if pad:
                pending.append(pad)
        self._pending_bytes += total + 3
        if self._pending_bytes >= SEND_CHUNK or len(pending) >= SEND_IOV_MAX:
            self.flush()

    def flush(self) -> None:
        """Send the queued verdicts (several netlink messages per ``sendmsg``)."""
        if not self._pending:
            return
        pending = self._pending
        self._pending = []
        self._pending_bytes = 0
        if self._sock is None:
            return
        while True:
            try:
                self._sock.sendmsg(pending)
                return
            except InterruptedError:
                continue
            except BlockingIOError:
                # The kernel handles netlink sends synchronously; this only happens under
                # memory pressure. Wait until it can take them rather than lose verdicts.
                import select

                select.select([], [self._sock], [], 0.01)


def _set_buffer(sock: socket.socket, opt: int, force_opt: int, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_opt, size)  # root: above rmem_max/wmem_max
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, opt, size)


def _messages(view: memoryview, n: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload offset, end) of each netlink message in ``view[:n]``."""
    off = 0
    unpack = _NLMSGHDR.unpack_from
    while off + _NLMSGHDR.size <= n:
        length, mtype, _flags, _seq, _pid = unpack(view, off)
        if length < _NLMSGHDR.size or off + length > n:
            return
        yield mtype, off + _NLMSGHDR.size, off + length
        off += (length + 3) & ~3


@dataclass(frozen=True, slots=True)
class KernelQueueStats:
    """One line of /proc/net/netfilter/nfnetlink_queue."""

    queue: int
    portid: int
    queue_total: int  # packets waiting for a verdict now
    copy_mode: int
    copy_range: int
    queue_dropped: int  # dropped because the queue was full (max_len)
    user_dropped: int  # dropped because our socket buffer was full (we saw ENOBUFS)
    id_sequence: int


def kernel_queue_stats(path: str = PROC_QUEUES, fd: int | None = None) -> dict[int, KernelQueueStats]:
    """The kernel's counters for every bound queue in this network namespace; ``fd``: the file
    opened already (a sandboxed worker opens nothing), read again from its start.

    A queue that is not bound has no line: its packets are dropped without being counted here
    (no listener means fail closed)."""
    out: dict[int, KernelQueueStats] = {}
    try:
        if fd is not None:
            lines = os.pread(fd, 1 << 20, 0).decode("ascii", "replace").splitlines()
        else:
            with open(path, encoding="ascii") as f:
                lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            nums = [int(x) for x in fields[:8]]
        except ValueError:
            continue
        out[nums[0]] = KernelQueueStats(*nums)
    return out

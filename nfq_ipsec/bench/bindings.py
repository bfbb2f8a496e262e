"""Which way of talking to NFQUEUE is fastest while it never truncates, counts overflow and
fails closed: the bindings measured against each other (``python -m nfq_ipsec.bench.bindings``).

Results (AMD EPYC, 2 cores, Linux 6.18.44, Python 3.11.7, NetfilterQueue 1.1.0, fnfqueue 1.1.2)
--------------------------------------------------------------------------------------------------
Run 1, the defaults (3 repetitions of 3-second iperf3 runs, all seven bindings, 12 minutes)::

    python -m nfq_ipsec.bench.bindings --json bench-results/bindings.json

    binding                            TCP Mbit/s     /ours  UDP 64 B kpps     /ours  CPU us/pkt  busy
                                       med [min-max]         med [min-max]            udp   tcp   med/max
    ours: NetlinkQueue + worker loop   629 [450-747]  1.00   58.1 [43.8-65.9]  1.00   8.7  11.5   17%/50%
    ours: NetlinkQueue, bare loop      602 [424-648]  0.96   60.5 [45.6-62.5]  1.04   8.7  12.1    0%/50%
    ours: recvmmsg + worker loop       452 [430-719]  0.72   45.1 [45.1-49.6]  0.78   8.9  12.1   50%/50%
    NetfilterQueue run()               517 [413-561]  0.82   48.2 [45.7-54.0]  0.83   9.4  11.6   50%/50%
    NetfilterQueue fd + run(False)     521 [406-664]  0.83   50.5 [49.7-50.9]  0.87   8.2   9.9   50%/51%
    NetfilterQueue run_socket()        405 [361-451]  0.64   46.1 [40.7-51.3]  0.79   8.8  12.2   50%/50%
    fnfqueue (reader thread)           181 [167-205]  0.29   26.1 [16.8-27.4]  0.45  18.5  27.7   50%/50%

Run 2, the same with up to 120 s of waiting for a quiet machine before each repetition
(``--busy-wait 120 --json bench-results/bindings-2.json``, 31 minutes)::

    ours: NetlinkQueue + worker loop   620 [457-647]  1.00   50.6 [41.5-55.3]  1.00   8.5   9.7   50%/51%
    ours: NetlinkQueue, bare loop      497 [470-787]  0.80   47.6 [46.0-60.9]  0.94   8.5  11.1   50%/50%
    ours: recvmmsg + worker loop       433 [410-735]  0.70   43.5 [41.0-45.2]  0.86  10.0  12.1    0%/52%
    NetfilterQueue run()               411 [389-510]  0.66   50.7 [47.2-51.3]  1.00   8.3  11.5    0%/50%
    NetfilterQueue fd + run(False)     476 [337-546]  0.77   43.3 [40.0-54.1]  0.86   9.3  11.9   27%/51%
    NetfilterQueue run_socket()        508 [462-550]  0.82   49.0 [47.3-50.1]  0.97   9.6  10.5    0%/50%
    fnfqueue (reader thread)           188 [153-234]  0.30   23.9 [21.2-34.4]  0.47  20.9  29.1   50%/50%

Both runs, all six repetitions pooled (medians; quiet = busy below 30 % just before)::

    binding       TCP Mbit/s   quiet    busy   UDP kpps   CPU us/pkt (UDP)   of which user   kernel
    ours               625       647     457       53.0         8.6                 4.6          4.0
    ours-bare          549       648     470       54.1         8.6                 4.2          4.3
    ours-mmsg          443       719     433       45.1         9.6                 5.3          4.3
    nfq-run            461       510     413       49.5         8.6                 1.2          7.3
    nfq-fd             499       546     406       50.1         8.6                 1.3          7.3
    nfq-socket         456       529     428       48.2         9.2                 1.7          7.4
    fnfqueue           185       234     181       25.0        20.1                 9.6         10.4

Eligibility (identical in both runs)::

    binding       8028-byte packets   short copies   max copy   stall: leaked   overflow reported   eligible
    ours          625/625 arrived           0          8028          0           yes (1 ENOBUFS)      yes
    ours-bare     625/625                   0          8028          0           yes (1)              yes
    ours-mmsg     625/625                   0          8028          0           yes (1)              yes
    nfq-run       0/625                   625          4016          0           hidden (48 dropped)  no
    nfq-fd        0/625                   625          4016          0           hidden (48 dropped)  no
    nfq-socket    0/625                   625          4016          0           hidden (48 dropped)  no
    fnfqueue      625/625                   0          8028          0           yes (exception)      yes

Decision: keep ours, NetlinkQueue under the worker loop. It is the fastest eligible binding in
both runs, and nothing ineligible beats it either: NetfilterQueue's three loops reach 0.64-0.83
of its TCP and 0.79-1.00 of its UDP at the same ~8.6 us per packet, and they cut every packet
past 4016 bytes (none of the 8028-byte packets arrived once the verdict carried the payload)
and hide ENOBUFS (the kernel counted 48 user_dropped; the program can't know). The cost splits
differently: NetfilterQueue spends 1.2-1.7 us per packet in user space (Cython) and 7.3 us in
the kernel (one recv and one sendmsg per packet), ours 4.6 us in Python and 4.0 us in the
kernel (verdicts batched per sendmsg). fnfqueue is eligible as long as ``fail_open`` is never
assigned, but runs at 0.30 of ours (TCP) and 0.45 (UDP) for 2.3 times the CPU per packet (a
reader thread handing packets over under the GIL, a cffi allocation and a sendmsg per verdict);
that gap is far outside the noise (busy repetitions only: 181 against 457 Mbit/s). recvmmsg
doesn't pay: 0.70 and 0.72 of ours' TCP median, 0.78 and 0.86 of its UDP, kernel time per
packet about the same (4.3 against 4.0 us) and user time up (5.3 against 4.6 us: reading each
message's length and flags through ctypes costs more than the recv_into calls it saves), and
the kernel dropped packets from its full queue in all six of its UDP runs (2442-11993 each;
ours: in three of six); it stays here as a measured variant only. The bare loop shows what the
worker's per-packet checks cost: 4.2 against 4.6 us of user time, within the noise in
throughput.

Noise: the machine was shared with single-threaded test runs that kept one of the two CPUs
busy (the 50 % rows) in about half of the repetitions of both runs; the round-robin order
spreads that over the bindings, but not evenly (fnfqueue and nfq-socket got almost no quiet
repetition), hence the pooled quiet/busy split above. Source measured: run 1 at commit
da71eb3 with bench/accept.py and worker.py changed in the tree, run 2 at 6f29e5c (each JSON
file's ``source`` lists the commit and the changed files).

What runs
---------
For every binding and repetition, a fresh two-namespace lab (the benchmark's accept-only test
bed: :func:`nfq_ipsec.lab.topology.host_to_host`, namespaces ``nfqbb<pid>-<n>a`` / ``...b``
joined by one veth pair created directly inside them, 192.168.56.10 -> .11), one accept-only
worker per peer on queue 100, pinned like the benchmark's ``spread`` layout (peer a on the first
online CPU, peer b on the second), and the benchmark's accept rules
(:func:`nfq_ipsec.bench.beds.accept_rules`: every packet of the link is queued in mangle OUTPUT
and raw PREROUTING, except packets carrying the reinject mark 0x10000000, which every worker
sets in its verdict so that a packet is queued once per host). Then one TCP flow (``iperf3
-t S``) and 64-byte UDP as fast as one sender can (``iperf3 -u -l 64 -b 0``; the datagrams that
arrived per second), with the workers' CPU seconds (user + system, ``/proc/<pid>/stat``) over
each run divided by the packets the kernel queued to them (``/proc/net/netfilter/
nfnetlink_queue``, both peers). Repetitions go round-robin over the bindings (the order rotates
each round), so that a slow phase of the shared machine spreads over the bindings; before each
one the machine's busy fraction is taken (1 s while nothing of ours runs), and while more than
``--busy-max`` (0.3) of it is busy the run looks again every 2 s for up to ``--busy-wait``
seconds (30), then measures anyway and records what it saw. The whole run holds
the benchmark lock (:func:`nfq_ipsec.bench.runner.exclusive`), waiting for it if another
benchmark holds it.

Every worker gets the same queue settings: max_len 2048 (``nfqueue.DEFAULT_MAX_LEN``), a
16 MiB receive buffer (SO_RCVBUFFORCE, as our binding sets), copy mode PACKET with the largest
copy range the binding allows.

The bindings (``--bindings``):

- ``ours``: :class:`nfq_ipsec.nfqueue.NetlinkQueue` under the daemon's worker loop, i.e. the
  existing ``python -m nfq_ipsec.bench.accept`` worker (poll, batches of 64 read with one
  ``recv_into`` each, the PacketHandler's per-packet checks, verdicts sent several per
  ``sendmsg``);
- ``ours-bare``: the same NetlinkQueue under a minimal loop (poll, ``receive(64)``, a verdict
  with the mark for each, ``flush``): the binding without the worker's per-packet checks, the
  same work per packet as the NetfilterQueue callbacks do;
- ``ours-mmsg``: the daemon's worker loop over :class:`MmsgNetlinkQueue`, a NetlinkQueue that
  receives up to 64 netlink messages per system call with ``recvmmsg`` (through ctypes:
  Python's socket module has no recvmmsg);
- ``nfq-run``: NetfilterQueue 1.1.0 ``run()``; the callback does ``pkt.set_mark(mark);
  pkt.accept()``;
- ``nfq-fd``: NetfilterQueue ``get_fd()`` in our own poll loop, ``run(block=False)`` on each
  wake-up (reads until EAGAIN);
- ``nfq-socket``: NetfilterQueue ``run_socket(s)`` (Python's ``socket.recv`` per packet, then
  ``nfq_handle_packet``): a distinct read path;
- ``fnfqueue``: fnfqueue (PyPI, cffi): a reader thread receives with ``recvmmsg`` (chunks of
  64 here), the main thread iterates ``Connection``; ``pkt.mark = mark; pkt.mangle()``, one
  ``sendmsg`` per verdict. Not a dependency of nfq-ipsec: install it by hand to measure it.

Eligibility probes (each binding, once, in a lab of its own, after the throughput runs):

- big packets: MTU 9000 on the veth, workers that verdict every packet *with its payload*
  (what an ESP rewrite does), ``iperf3 -u -l 8000`` (8028-byte IP packets): how many arrive,
  and how many copies the workers saw shorter than the packet's IP total length;
- overflow and fail-open: peer a's worker bound with max_len 8 and the smallest receive buffer,
  stalled for 4 s while 50 datagrams go out (peer b without rules): the kernel's queue_dropped /
  user_dropped, how many overflows the binding reported to the program once it ran, and how
  many datagrams reached b while the worker accepted nothing (anything there passed the queue
  unseen: fail-open).

Facts from the bindings' sources (they decide eligibility together with the probes):

- NetfilterQueue 1.1.0 receives into a 4096-byte stack buffer and clamps the copy range to
  4016 bytes, without exposing NFQA_CAP_LEN; ``run()`` and ``run_socket()`` swallow ENOBUFS
  (``continue``); it never sends NFQA_CFG_FLAGS, so fail-open stays at the kernel's default
  (off) and can't be set; one ``sendmsg`` per verdict (libnetfilter_queue ``nfq_set_verdict2``).
- fnfqueue 1.1.2 copies up to 65531 bytes (``truncated``/``cap_len`` exposed); ENOBUFS
  becomes ``BufferOverflowException`` in the packet loop, and every read raises it until
  ``reset()``; fail-open defaults to off, but its setter is broken: ``Queue.fail_open = False``
  sends the flag *set* (``_set_flag`` passes ``flag, flag`` in both branches), so it turns
  fail-open ON. Measured here: a queue with max_len 1 and no reader passed 0 of 20 datagrams by
  default and 19 of 20 after ``q.fail_open = False``. Its reader thread drains the socket into
  memory whatever the packet loop does, so a slow loop shows as queue_dropped, not ENOBUFS.
- ours: copy range 65531 with the real length (NFQA_CAP_LEN) on every packet, ENOBUFS counted
  (``overflows``), fail-open masked off explicitly at bind, verdicts batched per ``sendmsg``.

Reading the figures: a single core's worth of Python per peer on a 2-core machine that also
runs iperf3 and the kernel's softirq work; the other engineer's microbenchmarks on the same
machine add noise (the busy column). Ratios inside one run compare; absolute numbers from
different runs don't.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import importlib
import json
import os
import re
import select
import signal
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from .. import procs
from ..config.model import DEFAULT_MARK
from ..lab import labconfig, topology, traffic
from ..lab.netns import Lab, LabError, Started, run
from ..nfqueue import DEFAULT_MAX_LEN, DEFAULT_RCVBUF, NetlinkQueue, QueuedPacket
from . import beds, key_list, measure, positive, runner
from .measure import TrafficPath, spread

SCHEMA = "nfq-ipsec-bench-bindings/1"
PREFIX = "nfqbb"  # namespaces nfqbb<pid>-<n><a|b>
_STALE_RE = re.compile(rf"^{PREFIX}(\d+)-\d+[a-z0-9]*$")
QUEUE = labconfig.QUEUE_BASE
LOCK_POLL = 10.0  # seconds between tries for the benchmark lock
LOCK_WAIT = 900.0  # give up after this long
IDLE_CHECK = 1.0  # seconds of watching the machine before each measurement
SETTLE = 0.5  # after the previous lab is gone
BUSY_MAX = 0.3  # wait (up to --busy-wait) while more of the machine than this is busy
BUSY_WAIT = 30.0
BUSY_RETRY = 2.0
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUSY, EXIT_INTERRUPTED = 0, 1, 2, runner.EXIT_BUSY, 130

# probes
BIG_MTU = 9000
BIG_LENGTH = 8000  # UDP payload: 8028-byte IP packets, past NetfilterQueue's 4016-byte copy
BIG_SECONDS = 1.0
BIG_RATE = "40M"
STALL_SECONDS = 4.0
STALL_MAX_LEN = 8
STALL_RCVBUF = 1  # the kernel raises it to its minimum (a few KiB)
STALL_DATAGRAMS = 50
STALL_PORT = 5301


# -- the bindings ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Binding:
    key: str
    label: str
    module: str | None  # what must be importable (None: ours)
    reads: str  # netlink messages per receive system call
    verdicts: str  # verdicts per send system call
    copy_limit: int  # the largest packet it hands over whole
    cap_len: bool  # tells the program when a copy was cut
    overflow: str  # what the program learns of ENOBUFS
    overflow_reported: bool
    fail_open: str
    fail_closed: bool  # fail-open is off (and stays off when used as documented)


_OURS_FACTS: dict[str, Any] = {
    "module": None, "copy_limit": 65531, "cap_len": True,
    "overflow": "ENOBUFS counted (NetlinkQueue.overflows)", "overflow_reported": True,
    "fail_open": "masked off explicitly at bind", "fail_closed": True,
}
_NFQ_FACTS: dict[str, Any] = {
    "module": "netfilterqueue", "verdicts": "1 (nfq_set_verdict2)", "copy_limit": 4016,
    "cap_len": False, "overflow": "swallowed (ENOBUFS: continue)", "overflow_reported": False,
    "fail_open": "kernel default (off); no way to set it", "fail_closed": True,
}

BINDINGS = (
    Binding("ours", "ours: NetlinkQueue + worker loop", reads="1 (recv_into)",
            verdicts="up to 512 buffers (sendmsg)", **_OURS_FACTS),
    Binding("ours-bare", "ours: NetlinkQueue, bare loop", reads="1 (recv_into)",
            verdicts="up to 512 buffers (sendmsg)", **_OURS_FACTS),
    Binding("ours-mmsg", "ours: recvmmsg + worker loop", reads="up to 64 (recvmmsg)",
            verdicts="up to 512 buffers (sendmsg)", **_OURS_FACTS),
    Binding("nfq-run", "NetfilterQueue run()", reads="1 (recv, 4096 B)", **_NFQ_FACTS),
    Binding("nfq-fd", "NetfilterQueue fd + run(False)", reads="1 (recv, 4096 B)", **_NFQ_FACTS),
    Binding("nfq-socket", "NetfilterQueue run_socket()", reads="1 (socket.recv, 4096 B)",
            **_NFQ_FACTS),
    Binding("fnfqueue", "fnfqueue (reader thread)", module="fnfqueue",
            reads="up to 64 (recvmmsg, reader thread)", verdicts="1 (sendmsg)", copy_limit=65531,
            cap_len=True, overflow="BufferOverflowException until reset()", overflow_reported=True,
            fail_open="kernel default (off); the fail_open=False setter turns it ON",
            fail_closed=True),
)
BINDING_KEYS = tuple(b.key for b in BINDINGS)


def binding(key: str) -> Binding:
    for b in BINDINGS:
        if b.key == key:
            return b
    raise KeyError(key)


def availability(b: Binding) -> str | None:
    """None if the binding can run here, else why not (the import error, verbatim)."""
    if b.module is None:
        return None
    try:
        importlib.import_module(b.module)
    except Exception as err:
        return f"import {b.module}: {type(err).__name__}: {err}"
    return None


# -- recvmmsg -------------------------------------------------------------------------------

class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(_IoVec)), ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


MMSG_VLEN = 64  # messages per recvmmsg
MMSG_SLOT = 0x10000 + 4096  # one netlink message: a packet of up to 65531 bytes and its attributes
_MSG_TRUNC = 0x20


def _recvmmsg() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.recvmmsg
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_MMsgHdr), ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


class MmsgNetlinkQueue(NetlinkQueue):
    """NetlinkQueue whose ``receive`` reads up to 64 netlink messages per system call
    (``recvmmsg``). Same bind, verdicts, ENOBUFS counting and truncation report."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._mbuf = bytearray(MMSG_VLEN * MMSG_SLOT)
        self._mview = memoryview(self._mbuf)
        self._cbuf = (ctypes.c_char * len(self._mbuf)).from_buffer(self._mbuf)
        base = ctypes.addressof(self._cbuf)
        self._iov = (_IoVec * MMSG_VLEN)()
        self._msgs = (_MMsgHdr * MMSG_VLEN)()
        for i in range(MMSG_VLEN):
            self._iov[i].iov_base = base + i * MMSG_SLOT
            self._iov[i].iov_len = MMSG_SLOT
            hdr = self._msgs[i].msg_hdr
            hdr.msg_iov = ctypes.pointer(self._iov[i])
            hdr.msg_iovlen = 1
        self._recvmmsg = _recvmmsg()

    def receive(self, limit: int = 64) -> list[QueuedPacket]:
        sock = self._sock
        if sock is None:
            raise RuntimeError("queue not bound")
        out = self._backlog
        self._backlog = []
        fd = sock.fileno()
        msgs = self._msgs
        mview = self._mview
        recvmmsg = self._recvmmsg
        parse = self.parse
        while len(out) < limit:
            vlen = min(MMSG_VLEN, limit - len(out))
            got = recvmmsg(fd, msgs, vlen, socket.MSG_DONTWAIT, None)
            if got < 0:
                code = ctypes.get_errno()
                if code in (errno.EAGAIN, errno.EWOULDBLOCK):
                    break
                if code == errno.EINTR:
                    continue
                if code == errno.ENOBUFS:
                    self.overflows += 1
                    continue
                raise OSError(code, os.strerror(code))
            for i in range(got):
                m = msgs[i]
                n = m.msg_len
                if m.msg_hdr.msg_flags & _MSG_TRUNC:
                    self.truncated_messages += 1
                    n = min(n, MMSG_SLOT)
                parse(mview[i * MMSG_SLOT:i * MMSG_SLOT + n], n, out)
            if got < vlen:
                break  # drained: no extra call that would only say EAGAIN
        return out


# -- the workers (run inside a lab namespace) -----------------------------------------------

@dataclass
class WorkerStats:
    """What a worker saw, printed as one ``stats {json}`` line when it stops (SIGTERM)."""

    binding: str
    packets: int = 0
    short: int = 0  # copies shorter than the packet's IP total length
    max_copy: int = 0
    overflows: int | None = None  # ENOBUFS the binding told us about; None: it can't tell
    overflow_source: Callable[[], int] | None = field(default=None, repr=False)

    def see(self, data: bytes) -> None:
        self.packets += 1
        n = len(data)
        self.max_copy = max(self.max_copy, n)
        if n < 4 or (data[0] >> 4 == 4 and n < ((data[2] << 8) | data[3])):
            self.short += 1

    def line(self) -> str:
        overflows = self.overflow_source() if self.overflow_source is not None else self.overflows
        return "stats " + json.dumps({"binding": self.binding, "packets": self.packets,
                                      "short": self.short, "max_copy": self.max_copy,
                                      "overflows": overflows})


def worker_main(argv: Sequence[str]) -> int:
    """``python -m nfq_ipsec.bench.bindings worker BINDING --queue Q --mark M [...]``."""
    parser = argparse.ArgumentParser(prog="python -m nfq_ipsec.bench.bindings worker",
                                     description="one accept-only worker on one binding")
    parser.add_argument("binding", choices=BINDING_KEYS)
    parser.add_argument("--queue", type=int, required=True)
    parser.add_argument("--cpu", type=int, default=None)
    parser.add_argument("--mark", type=lambda t: int(t, 0), required=True)
    parser.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN)
    parser.add_argument("--rcvbuf", type=int, default=DEFAULT_RCVBUF)
    parser.add_argument("--probe", action="store_true",
                        help="verdicts carry the payload back; count short copies")
    parser.add_argument("--stall", type=float, default=0.0, help="seconds to wait after binding")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    if args.binding in ("ours", "ours-mmsg") and not args.probe and not args.stall:
        return _ours_worker_loop(args.binding, args.queue, args.cpu, args.mark, args.max_len)
    stats = WorkerStats(args.binding)

    def stop(_sig: int, _frame: Any) -> None:
        print(stats.line(), flush=True)
        os._exit(0)  # whatever the binding is blocked in; the kernel unbinds on close

    signal.signal(signal.SIGTERM, stop)
    if args.binding.startswith("ours"):
        cls = MmsgNetlinkQueue if args.binding == "ours-mmsg" else NetlinkQueue
        _bare_loop(cls(max_len=args.max_len, rcvbuf=args.rcvbuf), args, stats)
    elif args.binding.startswith("nfq-"):
        _nfq_loop(args, stats)
    elif args.binding == "fnfqueue":
        _fnfqueue_loop(args, stats)
    return 0


def _ours_worker_loop(key: str, queue: int, cpu: int | None, mark: int, max_len: int) -> int:
    """The daemon's worker loop with the accept-all processor (as ``bench.accept``) over the
    recvmmsg queue. ``ours`` itself is started as ``python -m nfq_ipsec.bench.accept``."""
    import multiprocessing

    from .. import worker
    from .accept import accept_all
    from .accept import main as accept_main

    if key == "ours":
        return accept_main(["--queue", str(queue), "--mark", hex(mark), "--max-len", str(max_len)]
                           + (["--cpu", str(cpu)] if cpu is not None else []))
    spec = worker.WorkerSpec(queue=queue, cpu=cpu, mark=mark, policies=(), sas=(), max_len=max_len)
    ours, theirs = multiprocessing.Pipe()
    try:
        return worker.run(spec, theirs, queue=MmsgNetlinkQueue(max_len=max_len),
                          processor=accept_all(spec))
    finally:
        ours.close()
        theirs.close()


def _bound(stall: float) -> None:
    print("bound", flush=True)
    if stall > 0:
        time.sleep(stall)


def _bare_loop(queue: NetlinkQueue, args: argparse.Namespace, stats: WorkerStats) -> None:
    queue.bind(args.queue)
    stats.overflow_source = lambda: queue.overflows
    _bound(args.stall)
    poller = select.poll()
    poller.register(queue.fileno(), select.POLLIN)
    receive, verdict, flush, mark, probe = queue.receive, queue.verdict, queue.flush, args.mark, args.probe
    while True:
        poller.poll()
        while True:
            packets = receive(64)
            if not packets:
                break
            if probe:
                for p in packets:
                    stats.see(p.payload)
                    verdict(p.packet_id, True, mark, p.payload)
            else:
                for p in packets:
                    verdict(p.packet_id, True, mark)
            flush()
            if len(packets) < 64:
                break


def _nfq_loop(args: argparse.Namespace, stats: WorkerStats) -> None:
    from netfilterqueue import COPY_PACKET, NetfilterQueue, Packet

    mark = args.mark

    def accept(pkt: Packet) -> None:
        pkt.set_mark(mark)
        pkt.accept()

    def echo(pkt: Packet) -> None:
        data = pkt.get_payload()
        stats.see(data)
        pkt.set_payload(data)
        pkt.set_mark(mark)
        pkt.accept()

    nfq = NetfilterQueue()
    nfq.bind(args.queue, echo if args.probe else accept, max_len=args.max_len, mode=COPY_PACKET,
             range=0xFFFF, sock_len=args.rcvbuf)
    _bound(args.stall)
    if args.binding == "nfq-run":
        nfq.run()
    elif args.binding == "nfq-fd":
        poller = select.poll()
        poller.register(nfq.get_fd(), select.POLLIN)
        while True:
            poller.poll()
            nfq.run(block=False)
    else:
        sock = socket.fromfd(nfq.get_fd(), socket.AF_NETLINK, socket.SOCK_RAW)
        while True:
            nfq.run_socket(sock)


def _fnfqueue_loop(args: argparse.Namespace, stats: WorkerStats) -> None:
    fnf: Any = importlib.import_module("fnfqueue")
    conn = fnf.Connection(alloc_size=64, chunk_size=64)
    q = conn.bind(args.queue)
    q.set_mode(fnf.MAX_PAYLOAD, fnf.COPY_PACKET)
    q.set_maxlen(args.max_len)
    # fail-open stays at the kernel default (off): never touch q.fail_open (see the docstring).
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12, fileno=os.dup(conn._conn.fd)) as s:
        try:
            s.setsockopt(socket.SOL_SOCKET, 33, args.rcvbuf)  # SO_RCVBUFFORCE
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
    stats.overflows = 0
    _bound(args.stall)
    mark, probe = args.mark, args.probe
    while True:
        try:
            for pkt in conn:
                if probe:
                    data = pkt.payload
                    stats.see(data)
                    pkt.payload = data
                pkt.mark = mark
                pkt.mangle()
        except fnf.BufferOverflowException:
            stats.overflows += 1
            conn.reset()


# -- test beds ------------------------------------------------------------------------------

def worker_argv(key: str, cpu: int | None, *, probe: bool = False, stall: float = 0.0,
                max_len: int | None = None, rcvbuf: int | None = None) -> list[str]:
    mark = f"0x{DEFAULT_MARK:x}"
    cpu_args = ["--cpu", str(cpu)] if cpu is not None else []
    if key == "ours" and not probe and not stall and max_len is None and rcvbuf is None:
        # exactly the benchmark's accept-only worker (beds._accept_bed starts the same)
        return [sys.executable, "-m", "nfq_ipsec.bench.accept", "--queue", str(QUEUE), *cpu_args,
                "--mark", mark]
    argv = [sys.executable, "-m", "nfq_ipsec.bench.bindings", "worker", key, "--queue", str(QUEUE),
            *cpu_args, "--mark", mark]
    if probe:
        argv.append("--probe")
    if stall:
        argv += ["--stall", str(stall)]
    if max_len is not None:
        argv += ["--max-len", str(max_len)]
    if rcvbuf is not None:
        argv += ["--rcvbuf", str(rcvbuf)]
    return argv


def start_workers(
    lab: Lab, topo: topology.Topology, key: str, peers: Sequence[topology.Peer] | None = None,
    **options: Any,
) -> list[Started]:
    """One worker per peer (pinned like the benchmark's spread layout); returns once the
    kernel shows each one's queue bound."""
    procs = []
    chosen = list(peers) if peers is not None else list(topo.peers)
    for i, peer in enumerate(topo.peers):
        if peer not in chosen:
            continue
        cpu = beds.cpus_for(i, 1, "spread")[0]
        procs.append(lab.start(f"{key}-{peer.name}", peer.host, worker_argv(key, cpu, **options)))
    deadline = time.monotonic() + beds.READY_TIMEOUT
    for peer in chosen:
        while QUEUE not in beds.bound_queues(peer.host):
            for p in procs:
                if p.popen.poll() is not None:
                    raise LabError(f"{p.name} exited with {p.popen.returncode}: {p.output()[-600:]}")
            if time.monotonic() > deadline:
                raise LabError(f"{key} worker on {peer.host.name} did not bind queue {QUEUE} "
                               f"within {beds.READY_TIMEOUT:g} s")
            time.sleep(0.05)
    return procs


def install_rules(peers: Sequence[topology.Peer]) -> None:
    for peer in peers:
        peer.host.run(["iptables-restore"], input=beds.accept_rules(peer.spec.interface, [QUEUE]))


def build_bed(lab: Lab, key: str) -> beds.Bed:
    topo = topology.host_to_host(lab)
    procs = start_workers(lab, topo, key)
    install_rules(topo.peers)  # rules only once every queue has its worker, as the daemon does
    return beds.Bed(TrafficPath(lab, topo.client, topo.server, topo.server_addr), dataplane=procs,
                    queue_hosts=[p.host for p in topo.peers], info={"queue": QUEUE})


# -- measuring ------------------------------------------------------------------------------

def measure_once(bed: beds.Bed, seconds: float) -> dict[str, Any]:
    """One TCP flow, then 64-byte UDP; each with the workers' CPU time and the queue counters."""
    meter = measure.CpuMeter(bed.dataplane_pids)
    out: dict[str, Any] = {}
    for name in ("tcp1", "udp64"):
        before = measure.queue_counters(bed.queue_hosts)
        if name == "tcp1":
            res = measure.measure_tcp(bed.path, meter, seconds, 1)
        else:
            res = measure.measure_udp64(bed.path, meter, seconds)
        res["queues"] = measure.counters_delta(before, measure.queue_counters(bed.queue_hosts))
        queued = res["queues"]["queued"]
        res["cpu_us_per_packet"] = res["cpu_s"] / queued * 1e6 if queued else None
        out[name] = res
        bed.check_alive()
        time.sleep(measure.PAUSE)
    tcp = out["tcp1"]
    tcp["cpu_s_per_gb"] = tcp["cpu_s"] / (tcp["bytes"] / 1e9) if tcp["bytes"] else None
    return out


def _stats_of(proc: Started) -> dict[str, Any] | None:
    lines = [line for line in proc.output().splitlines() if line.startswith("stats ")]
    if not lines:
        return None
    data: dict[str, Any] = json.loads(lines[-1][len("stats "):])
    return data


def probe(key: str) -> dict[str, Any]:
    """The eligibility probes (module docstring): big packets, then overflow and fail-open."""
    out: dict[str, Any] = {}
    with Lab(prefix=PREFIX) as lab:
        topo = topology.host_to_host(lab)
        a, b = topo.peers
        for peer in topo.peers:
            peer.host.run(["ip", "link", "set", peer.spec.interface, "mtu", str(BIG_MTU)])
        procs = start_workers(lab, topo, key, probe=True)
        install_rules(topo.peers)
        path = TrafficPath(lab, topo.client, topo.server, topo.server_addr)
        measure.check_path(path)
        r = traffic.iperf3_udp(lab, path.client, path.server, path.server_addr, seconds=BIG_SECONDS,
                               bitrate=BIG_RATE, length=BIG_LENGTH, port=measure.IPERF_PORT)
        for p in procs:
            lab.stop(p)
        seen = [_stats_of(p) for p in procs]
        out["big"] = {
            "ip_length": BIG_LENGTH + 28, "mtu": BIG_MTU, "sent": r.packets,
            "delivered": max(0, r.packets - r.lost_packets),
            "short_copies": sum(s["short"] for s in seen if s) if all(seen) else None,
            "max_copy": max((s["max_copy"] for s in seen if s), default=None),
            "workers": seen,
        }
        # overflow and fail-open: only a queues (b's rules go), a's worker stalls
        for table in ("raw", "mangle"):
            b.host.run(["iptables", "-t", table, "-F"])
        (stalled,) = start_workers(lab, topo, key, peers=[a], probe=True, stall=STALL_SECONDS,
                                   max_len=STALL_MAX_LEN, rcvbuf=STALL_RCVBUF)
        t0 = time.monotonic()
        res = traffic.udp_probe(lab, a.host, b.host, topology.HOST_B, STALL_PORT,
                                count=STALL_DATAGRAMS, wait=0.5)
        during = time.monotonic() - t0
        kstats = measure.queue_counters([a.host])[a.host.name]
        time.sleep(max(0.0, STALL_SECONDS - during) + 1.5)  # let it run and read what is left
        lab.stop(stalled)
        stats = _stats_of(stalled)
        out["stall"] = {
            "datagrams": res.sent, "max_len": STALL_MAX_LEN, "stall_s": STALL_SECONDS,
            "probe_s": round(during, 2),
            "leaked": res.received if during < STALL_SECONDS else None,
            "queue_dropped": kstats["queue_dropped"], "user_dropped": kstats["user_dropped"],
            "reported_overflows": stats["overflows"] if stats else None,
            "worker": stats,
        }
    return out


def judge(b: Binding, probes: dict[str, Any] | None) -> dict[str, Any]:
    """never truncates / counts overflow / fails closed: the binding's facts, overruled by
    what the probes measured when they ran (a probe that did not run changes nothing)."""
    big = (probes or {}).get("big") or {}
    stall = (probes or {}).get("stall") or {}
    intact: bool | None = None
    if big.get("sent") and big.get("short_copies") is not None:
        intact = big["short_copies"] == 0 and big["delivered"] >= 0.5 * big["sent"]  # cut: none arrive
    never_truncates = b.copy_limit >= 65531 and b.cap_len and intact is not False
    counts = b.overflow_reported
    if stall.get("user_dropped") and stall.get("reported_overflows") is not None:
        counts = counts and stall["reported_overflows"] > 0
    leaked = stall.get("leaked")
    closed = b.fail_closed and not leaked
    return {"never_truncates": never_truncates, "big_packets_intact": intact,
            "counts_overflow": counts, "fails_closed": closed, "probed": bool(big and stall),
            "eligible": bool(never_truncates and counts and closed)}


# -- the run --------------------------------------------------------------------------------

def _say(out: IO[str]) -> Callable[[str], None]:
    def say(text: str = "") -> None:
        print(text, file=out, flush=True)
    return say


def remove_stale(say: Callable[[str], None]) -> None:
    """Namespaces of an earlier run of this module that was killed with SIGKILL."""
    res = run(["ip", "netns", "list"], check=False)
    for line in res.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _STALE_RE.match(name)
        if not m or procs.alive(int(m.group(1))):
            continue
        if run(["ip", "netns", "pids", name], check=False).stdout.strip():
            continue
        run(["ip", "netns", "del", name], check=False)
        say(f"removed namespace {name} left behind by an earlier run")


def source_state() -> dict[str, Any]:
    """The commit measured, and which files differed from it (uncommitted work counts too)."""
    root = Path(__file__).resolve().parents[2]
    head = run(["git", "-C", str(root), "rev-parse", "HEAD"], check=False).stdout.strip()
    dirty = run(["git", "-C", str(root), "status", "--porcelain"], check=False).stdout.splitlines()
    return {"head": head or None, "changed": [line[3:] for line in dirty]}


def quiet_moment(busy_max: float, busy_wait: float) -> tuple[float, float]:
    """The machine's busy fraction (1 s while nothing of ours runs); while it is above
    ``busy_max``, look again for up to ``busy_wait`` seconds. (busy fraction, seconds waited)"""
    t0 = time.monotonic()
    busy = measure.busy_fraction(IDLE_CHECK)
    while busy > busy_max and time.monotonic() - t0 < busy_wait:
        time.sleep(BUSY_RETRY)
        busy = measure.busy_fraction(IDLE_CHECK)
    return busy, round(time.monotonic() - t0 - IDLE_CHECK, 1)


def measure_one(key: str, seconds: float, busy_max: float = 1.0, busy_wait: float = 0.0) -> dict[str, Any]:
    rep: dict[str, Any] = {"status": "ok", "error": None}
    time.sleep(SETTLE)
    rep["busy_before"], rep["waited_for_quiet_s"] = quiet_moment(busy_max, busy_wait)
    rep["load_before"] = measure.loadavg()[0]
    t0 = time.monotonic()
    try:
        with Lab(prefix=PREFIX) as lab:
            bed = build_bed(lab, key)
            measure.check_path(bed.path)
            rep["setup_s"] = round(time.monotonic() - t0, 2)
            rep.update(measure_once(bed, seconds))
    except (LabError, OSError, ValueError, KeyError) as err:
        rep.update(status="failed", error=str(err) or type(err).__name__,
                   traceback=traceback.format_exc(limit=6))
    return rep


def summarise(reps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in reps if r["status"] == "ok"]
    return {
        "tcp1_mbit": spread(r["tcp1"]["mbit"] for r in ok),
        "udp64_pps": spread(r["udp64"]["pps"] for r in ok),
        "udp64_sent_pps": spread(r["udp64"]["sent_pps"] for r in ok),
        "udp_cpu_us_per_packet": spread(r["udp64"]["cpu_us_per_packet"] for r in ok),
        "tcp_cpu_us_per_packet": spread(r["tcp1"]["cpu_us_per_packet"] for r in ok),
        "tcp_cpu_s_per_gb": spread(r["tcp1"]["cpu_s_per_gb"] for r in ok),
        "busy_before": spread(r["busy_before"] for r in reps),
        "udp_queue_drops": sum(r["udp64"]["queues"]["queue_dropped"] + r["udp64"]["queues"]["user_dropped"]
                               for r in ok),
    }


def _median(s: dict[str, float] | None) -> float | None:
    return s["median"] if s else None


def add_ratios(rows: list[dict[str, Any]]) -> None:
    base = next((r for r in rows if r["key"] == "ours" and r.get("summary")), None)
    for row in rows:
        summary = row.get("summary")
        if base is None or not summary:
            row["vs_ours"] = None
            continue
        row["vs_ours"] = {}
        for metric in ("tcp1_mbit", "udp64_pps", "udp_cpu_us_per_packet", "tcp_cpu_s_per_gb"):
            mine, theirs = _median(summary[metric]), _median(base["summary"][metric])
            row["vs_ours"][metric] = mine / theirs if mine is not None and theirs else None


def decide(rows: Sequence[dict[str, Any]]) -> str:
    measured = [r for r in rows if r.get("summary") and _median(r["summary"]["tcp1_mbit"])]
    if not measured:
        return "nothing was measured"

    def speed(r: dict[str, Any]) -> tuple[float, float]:
        s = r["summary"]
        return (_median(s["tcp1_mbit"]) or 0.0, _median(s["udp64_pps"]) or 0.0)

    eligible = sorted((r for r in measured if r["judgement"]["eligible"]), key=speed, reverse=True)
    fastest = max(measured, key=speed)
    if not eligible:
        return (f"no measured binding is eligible; the fastest was {fastest['key']} "
                f"({speed(fastest)[0]:.0f} Mbit/s)")
    best = eligible[0]
    text = (f"fastest eligible: {best['key']} ({speed(best)[0]:.0f} Mbit/s one TCP flow, "
            f"{speed(best)[1] / 1e3:.1f} kpps 64 B UDP)")
    faster = [r for r in measured if speed(r)[0] > speed(best)[0] and not r["judgement"]["eligible"]]
    if faster:
        why = []
        for r in faster:
            j = r["judgement"]
            reasons = [n for n, ok in (("truncates", j["never_truncates"]),
                                       ("hides overflow", j["counts_overflow"]),
                                       ("fails open", j["fails_closed"])) if not ok]
            why.append(f"{r['key']} {speed(r)[0]:.0f} Mbit/s ({', '.join(reasons) or 'unprobed'})")
        text += "; faster but not eligible: " + "; ".join(why)
    return text


def _num(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _cell(s: dict[str, float] | None, scale: float = 1.0, digits: int = 0) -> str:
    if not s:
        return "-"
    return (f"{s['median'] / scale:.{digits}f} [{s['min'] / scale:.{digits}f}-"
            f"{s['max'] / scale:.{digits}f}]")


def table(result: dict[str, Any]) -> str:
    rows = result["bindings"]
    head = (f"{'binding':<34} {'TCP Mbit/s med [min-max]':<25} {'/ours':>5}  "
            f"{'UDP 64B kpps med [min-max]':<27} {'/ours':>5}  {'CPU us/pkt udp':>14} "
            f"{'tcp':>5} {'CPU s/GB':>8} {'busy':>9}")
    lines = [f"{result['settings']['repetitions']} repetition(s), {result['settings']['seconds']:g} s "
             f"per iperf3 run; {result['machine']['cpu_model']}, {result['machine']['cores']} cores, "
             f"{result['machine']['kernel'].split(' #')[0]}", "", head, "-" * len(head)]
    for r in rows:
        label = r["label"]
        if r["status"] != "ok":
            lines.append(f"{label:<34} {r['status'].upper()}: {(r['error'] or '').splitlines()[0][:100]}")
            continue
        s, v = r["summary"], r["vs_ours"] or {}
        busy = s["busy_before"]
        busy_text = f"{busy['median']:.0%}/{busy['max']:.0%}" if busy else "-"
        lines.append(
            f"{label:<34} {_cell(s['tcp1_mbit']):<25} {_num(v.get('tcp1_mbit'), 2):>5}  "
            f"{_cell(s['udp64_pps'], 1e3, 1):<27} {_num(v.get('udp64_pps'), 2):>5}  "
            f"{_num(_median(s['udp_cpu_us_per_packet']), 1):>14} "
            f"{_num(_median(s['tcp_cpu_us_per_packet']), 1):>5} "
            f"{_num(_median(s['tcp_cpu_s_per_gb']), 1):>8} "
            f"{busy_text:>9}")
    lines += ["", "CPU: the two workers' user+system seconds per packet queued to them (both peers); "
              "busy: median/max share of both CPUs busy outside this run just before each repetition.",
              "", f"{'binding':<34} {'big 8028 B: arrived':>20} {'short':>6} {'max copy':>9}  "
              f"{'stall: leaked':>13} {'q/user dropped':>15} {'reported':>9}  eligible"]
    for r in rows:
        if r["status"] == "skipped":
            continue
        p, j = r.get("probes") or {}, r.get("judgement") or {}
        big, st = p.get("big") or {}, p.get("stall") or {}
        arrived = f"{big['delivered']}/{big['sent']}" if big else "-"
        dropped = f"{st['queue_dropped']}/{st['user_dropped']}" if st else "-"
        reported = st.get("reported_overflows") if st else None
        lines.append(
            f"{r['label']:<34} {arrived:>20} {_num(big.get('short_copies')):>6} "
            f"{_num(big.get('max_copy')):>9}  {_num(st.get('leaked')):>13} {dropped:>15} "
            f"{('hidden' if st and reported is None else _num(reported)):>9}  "
            f"{'yes' if j.get('eligible') else 'no'}")
    lines += ["", "big: 8028-byte packets (MTU 9000) whose verdict carries the payload back; short: copies "
              "the workers got shorter than the packet.",
              "stall: a's worker waits 4 s (max_len 8, smallest receive buffer) while 50 datagrams go out; "
              "leaked: arrived meanwhile (fail-open); reported: overflows the binding told the program of.",
              "", "decision: " + result["decision"]]
    for r in rows:
        if r["status"] == "skipped":
            lines.append(f"not measured: {r['key']}: {r['error']}")
    for w in result["warnings"]:
        lines.append(f"WARNING: {w}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nfq_ipsec.bench.bindings",
        description="measure the NFQUEUE bindings against each other (accept-only, two namespaces)",
        epilog=f"bindings: {', '.join(BINDING_KEYS)}. Needs root. Holds the benchmark lock; waits "
               "for it (--lock-wait) if another benchmark holds it. Exit status: 0 all measured, "
               "1 a binding failed, 2 usage, 75 lock not obtained, 130 Ctrl-C.")
    p.add_argument("--bindings", type=key_list(BINDING_KEYS, "binding"), default=list(BINDING_KEYS),
                   help="comma-separated; run in table order (default: all)")
    p.add_argument("--repetitions", type=positive(int), default=3)
    p.add_argument("--seconds", type=positive(float), default=3.0, help="per iperf3 run")
    p.add_argument("--busy-max", type=float, default=BUSY_MAX,
                   help="before each repetition, wait while more than this share of the CPUs is busy "
                        f"outside this run (default {BUSY_MAX:g}) ...")
    p.add_argument("--busy-wait", type=float, default=BUSY_WAIT,
                   help=f"... for up to this many seconds, then measure anyway (default {BUSY_WAIT:g})")
    p.add_argument("--no-probes", dest="probes", action="store_false",
                   help="skip the big-packet and overflow/fail-open probes")
    p.add_argument("--json", type=Path, default=None, help="write raw figures and machine info here")
    p.add_argument("--lock-wait", type=float, default=LOCK_WAIT,
                   help=f"seconds to wait for the benchmark lock (default {LOCK_WAIT:g})")
    return p


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["worker"]:
        return worker_main(args_list[1:])
    args = build_parser().parse_args(args_list)
    say = _say(out or sys.stdout)
    problems = runner.check_environment()
    if problems:
        for p in problems:
            say(f"bindings benchmark: {p}")
        return EXIT_USAGE
    deadline = time.monotonic() + args.lock_wait
    while True:
        with runner.exclusive() as mine:
            if mine:
                return _run_locked(args, args_list, say)
        left = deadline - time.monotonic()
        if left <= 0:
            say(f"bindings benchmark: another benchmark still holds the lock (pid {runner.lock_holder()})")
            return EXIT_BUSY
        say(f"another benchmark holds the lock (pid {runner.lock_holder()}); retrying in "
            f"{min(LOCK_POLL, left):.0f} s")
        time.sleep(min(LOCK_POLL, left))


def _run_locked(args: argparse.Namespace, argv: list[str], say: Callable[[str], None]) -> int:
    remove_stale(say)
    machine = measure.machine_info()
    machine["versions"]["netfilterqueue"] = measure.package_version("NetfilterQueue")
    machine["versions"]["fnfqueue"] = measure.package_version("fnfqueue")
    result: dict[str, Any] = {
        "schema": SCHEMA, "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "finished": None, "interrupted": False,
        "command": ["python", "-m", "nfq_ipsec.bench.bindings", *argv], "source": source_state(),
        "settings": {"bindings": args.bindings, "repetitions": args.repetitions, "seconds": args.seconds,
                     "probes": args.probes, "busy_max": args.busy_max, "busy_wait": args.busy_wait,
                     "queue": QUEUE, "mark": DEFAULT_MARK,
                     "max_len": DEFAULT_MAX_LEN, "rcvbuf": DEFAULT_RCVBUF},
        "machine": machine, "bindings": [], "warnings": [], "decision": "",
    }
    rows: list[dict[str, Any]] = []
    for key in args.bindings:
        b = binding(key)
        why = availability(b)
        rows.append({"key": key, "label": b.label, "status": "skipped" if why else "ok", "error": why,
                     "facts": {k: v for k, v in vars(b).items() if k not in ("key", "label")},
                     "repetitions": [], "probes": None})
    result["bindings"] = rows
    live = [r for r in rows if r["status"] == "ok"]
    code = EXIT_OK
    t0 = time.monotonic()
    say(f"bindings benchmark: {', '.join(r['key'] for r in live)}; {args.repetitions} repetition(s) "
        f"of {args.seconds:g}-second iperf3 runs, round-robin")
    for r in rows:
        if r["status"] == "skipped":
            say(f"  {r['key']}: not measured: {r['error']}")
    try:
        for rep in range(args.repetitions):
            shift = rep % len(live) if live else 0
            for row in live[shift:] + live[:shift]:
                m = measure_one(row["key"], args.seconds, args.busy_max, args.busy_wait)
                m["round"] = rep + 1
                row["repetitions"].append(m)
                if m["status"] == "ok":
                    say(f"  [{rep + 1}/{args.repetitions}] {row['key']:<11} busy {m['busy_before']:.0%}: "
                        f"TCP {m['tcp1']['mbit']:.0f} Mbit/s, UDP 64 B {m['udp64']['pps'] / 1e3:.1f} kpps "
                        f"of {m['udp64']['sent_pps'] / 1e3:.1f} sent, "
                        f"{_num(m['udp64']['cpu_us_per_packet'], 1)} us/pkt")
                else:
                    say(f"  [{rep + 1}/{args.repetitions}] {row['key']}: FAILED: {m['error']}")
        if args.probes:
            for row in live:
                try:
                    row["probes"] = probe(row["key"])
                except (LabError, OSError, ValueError, KeyError) as err:
                    row["probes"] = {"error": str(err)}
                    result["warnings"].append(f"{row['key']}: probe failed: {err}")
                p = row["probes"]
                if "big" in p:
                    say(f"  probe {row['key']:<11} big: {p['big']['delivered']}/{p['big']['sent']} arrived, "
                        f"{p['big']['short_copies']} short copies; stall: leaked {p['stall']['leaked']}, "
                        f"dropped {p['stall']['queue_dropped']}/{p['stall']['user_dropped']}, "
                        f"reported {p['stall']['reported_overflows']}")
    except KeyboardInterrupt:
        result["interrupted"] = True
        result["warnings"].append("interrupted: the figures cover only what ran before Ctrl-C")
        code = EXIT_INTERRUPTED
    for row in live:
        ok = [m for m in row["repetitions"] if m["status"] == "ok"]
        failed = [m for m in row["repetitions"] if m["status"] != "ok"]
        if failed or not ok:
            code = code if code != EXIT_OK else EXIT_FAILED
            row["error"] = failed[0]["error"] if failed else "no repetition was measured"
            if not ok:
                row["status"] = "failed"
        row["summary"] = summarise(row["repetitions"]) if ok else None
        row["judgement"] = judge(binding(row["key"]), row["probes"])
    for row in rows:
        row.setdefault("summary", None)
        row.setdefault("judgement", None)
    add_ratios(rows)
    busy = [m["busy_before"] for r in live for m in r["repetitions"]]
    if busy and statistics.median(busy) > 0.25:
        result["warnings"].append(f"the machine was busy outside this run: median "
                                  f"{statistics.median(busy):.0%} of both CPUs before the repetitions; "
                                  "figures are noisy")
    result["decision"] = decide(rows)
    result["finished"] = datetime.now().astimezone().isoformat(timespec="seconds")
    result["duration_s"] = round(time.monotonic() - t0, 1)
    text = table(result)
    say("")
    say(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
        say(f"\nraw figures and machine info: {args.json}")
    return code


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())

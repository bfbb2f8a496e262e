"""Idle members as dedicated engines: a worker hands the sealing of its outbound SAs' packets to
helper processes over shared memory, in batches, while it keeps everything that decides order
(the kernel's pcrypt shape; ``crypto.offload_helpers``, off by default, docs/engines.md).

- **Who does what.** The owner (the worker that owns the SA) takes the sequence number, builds
  the ESP header and trailer and the outer headers, exactly as in process: only the call to
  the SA's suite differs. While a batch of queued packets is handled (``deferring``) an
  offloaded SA's ``seal`` writes (SA, sequence number, header, plaintext) into a helper's
  shared memory region and returns a **placeholder** of the sealed body's exact length, which
  begins with a token unique to the job; every ``batch`` jobs the owner rings the helper's
  doorbell (a socket pair) and goes on with the next packet while the helper seals.
- **Verdicts in order.** The worker records the batch's verdicts instead of giving them
  (``Recorder``); at the end of the batch it waits for the helpers (``collect``), puts each
  helper's sealed body in place of its placeholder (found by its token; across the fragments
  when the core cut the sealed packet into IP fragments) and gives the verdicts in queue
  order. A packet whose body did not come back is dropped as
  ``engine_failed``: never sent with its placeholder.
- **Same bytes.** A helper builds the SA's suite with the same engine the team bound it to;
  a suite is a pure function of key, sequence number and bytes, so the output is the
  in-process output byte for byte (``tests/unit/test_offload.py`` proves it).
- **Fail closed.** A helper that dies (its socket closes) or does not answer within
  ``crypto.offload_timeout`` is killed; every job not back is dropped and counted
  ``engine_failed``; the pool is stopped and every SA seals in process from the next packet
  (helpers are started before the worker's sandbox, which forbids making processes, so they
  are not replaced until the worker restarts). A job a helper's engine raised on is dropped
  the same way and raises the engine's alarm, as an in-process fault does.
- **Keys.** A helper is a fork of its worker before the sandbox (the same keys, the same user
  and filter), and gets an SA's keys over its socket when the SA is bound, never a log line.

Inbound packets are opened in process: the core needs the plaintext to decide the verdict
(inner policy, replay window), so opening can't be deferred without splitting the core.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import pickle
import select
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from ..core.sa import SecurityAssociation
from ..core.suites import Buffer, Suite
from .base import DEFAULT_OFFLOAD_BATCH, DEFAULT_OFFLOAD_TIMEOUT, Engine

log = logging.getLogger("nfq_ipsec.engines")

REGION: Final = 4 << 20  # bytes of shared memory per helper: jobs of one queue batch
TOKEN: Final = 16  # bytes of a placeholder's unique beginning

# A job's record in a helper's region: the helper's status, the SA, the sequence number, the
# ESP header, seq_hi (ESN) and the plaintext's length; the plaintext follows, then room for
# the sealed body (plaintext + IV + ICV, at most 64 bytes more).
_REC: Final = struct.Struct("<BBxxIQ8s4sII")  # status, seq_hi length, sa, seq, header, hi, n, out
_STATUS_NEW, _STATUS_OK, _STATUS_RAISED, _STATUS_NO_SA = 0, 1, 2, 3
_SLACK: Final = 64
_DOORBELL: Final = struct.Struct("<cII")  # kind, offset, count
_PR_SET_PDEATHSIG: Final = 1

SealMany = Callable[[list[tuple[bytes, bytes, int, bytes]]], list[bytes]]


def seal_many(suite: Suite, items: list[tuple[bytes, bytes, int, bytes]]) -> list[bytes]:
    """Seal a batch of one SA's packets: the suite's own batch call where it has one
    (``seal_batch``: one context for many packets), else one call per packet."""
    batch: SealMany | None = getattr(suite, "seal_batch", None)
    if batch is not None:
        return batch(items)
    seal = suite.seal
    return [seal(h, hi, seq, pt) for h, hi, seq, pt in items]


class Job:
    """One deferred seal: where its record is and what its placeholder looks like."""

    __slots__ = ("args", "helper", "offset", "out", "size", "suite", "token")

    def __init__(self, helper: int, offset: int, size: int, token: bytes, suite: OffloadSuite,
                 args: tuple[bytes, bytes, int, bytes]) -> None:
        self.helper = helper
        self.offset = offset
        self.size = size  # the sealed body's length: the placeholder's
        self.token = token
        self.suite = suite
        self.args = args  # kept for crypto.self_check's in-process comparison
        self.out: bytes | None = None  # the sealed body, once back; None: failed

    def __repr__(self) -> str:
        return f"<Job helper {self.helper} at {self.offset}>"


class _Helper:
    def __init__(self, pid: int, sock: socket.socket, region: Any) -> None:
        self.pid = pid
        self.sock = sock
        self.region = region  # mmap, shared with the helper
        self.view = memoryview(region)
        self.used = 0  # bytes of the region written in this batch
        self.chunk_start = 0  # the first record not rung for yet
        self.chunk_count = 0
        self.outstanding = 0  # chunks rung for and not answered


class OffloadPool:
    """The helpers of one worker, the jobs of the batch in hand and their outcome."""

    def __init__(self, helpers: int, batch: int = DEFAULT_OFFLOAD_BATCH,
                 timeout: float = DEFAULT_OFFLOAD_TIMEOUT, check_every: int = 0,
                 region: int = REGION, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = helpers
        self.batch = batch
        self.timeout = timeout
        self.check_every = check_every  # crypto.self_check: every Nth result sealed again here
        self.region_size = region
        self.clock = clock
        self.helpers: list[_Helper] = []
        self.active = False
        self.deferring = False  # set by the worker while it handles a queue batch
        self.failed: str | None = None  # why the pool stopped
        self.alarms: list[str] | None = None  # the team's: an engine that raised in a helper
        self._prefix = os.urandom(8)
        self._counter = 0
        self._next = 0  # round robin over the helpers
        self._fresh: list[Job] = []  # jobs since the last take()
        self._jobs: list[Job] = []  # every job of the batch in hand
        self._ids = 0
        self._left = check_every
        # what status shows
        self.jobs = 0
        self.chunks = 0
        self.inline = 0  # seals done in process while deferring (no room in a region)
        self.lost = 0  # jobs that did not come back (their packets dropped)
        self.checked = 0

    # -- life -------------------------------------------------------------------------------
    def start(self, engines: Mapping[str, Engine],
              in_child: Callable[[], None] = lambda: None) -> list[int]:
        """Fork the helpers (before the sandbox: afterwards no process can be made).
        ``engines``: the team's, by name (a helper builds an SA's suite with the engine the
        team bound it to). ``in_child`` runs first in each helper (drops privileges, enters
        the filter). Returns their pids."""
        libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the helper forks no loader
        owner = os.getpid()
        for _ in range(self.size):
            region = mmap.mmap(-1, self.region_size, flags=mmap.MAP_SHARED)
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            pid = os.fork()
            if pid == 0:  # the helper
                code = 1
                try:
                    mine.close()
                    for h in self.helpers:  # its siblings' ends are not its business
                        h.sock.close()
                    # killed with its worker (a helper stuck in a call would outlive it,
                    # holding keys); gone already: nothing to serve
                    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
                    if os.getppid() != owner:
                        return []
                    _helper_setup(theirs.fileno())
                    in_child()
                    _helper_main(theirs, region, engines)
                    code = 0
                finally:
                    os._exit(code)
            theirs.close()
            self.helpers.append(_Helper(pid, mine, region))
        self.active = bool(self.helpers)
        return [h.pid for h in self.helpers]

    def stop(self, why: str | None = None) -> None:
        """Stop every helper (killed if it does not go at once); no more offload."""
        if why is not None and self.failed is None:
            self.failed = why
            log.error("crypto offload stopped, every SA seals in process: %s", why)
        self.active = False
        for h in self.helpers:
            h.sock.close()
            with contextlib.suppress(OSError):
                os.kill(h.pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.waitpid(h.pid, 0)
        self.helpers = []

    @property
    def pids(self) -> list[int]:
        return [h.pid for h in self.helpers]

    # -- SAs --------------------------------------------------------------------------------
    def wrap(self, suite: Suite, engine: str, keys: tuple[str, bytes, str | None, bytes],
             sa: SecurityAssociation) -> Suite:
        """The suite an outbound SA uses: ``suite`` (the team's, in process) behind the pool,
        once every helper has built the same engine's suite of the SA; ``suite`` itself if
        the pool is off or a helper can't (an engine a sandboxed helper can't open)."""
        if not self.active or not sa.outbound:
            return suite
        self._ids += 1
        sa_id = self._ids
        msg = b"K" + pickle.dumps((sa_id, engine, *keys))
        for h in self.helpers:
            if not self._ask(h, msg):
                return suite
        return OffloadSuite(self, sa_id, suite, engine, sa)

    def forget(self, suite: object) -> None:
        """An SA retired or moved: its keys leave the helpers."""
        if isinstance(suite, OffloadSuite) and self.active:
            msg = _DOORBELL.pack(b"X", suite.sa_id, 0)
            for h in self.helpers:
                with contextlib.suppress(OSError):
                    h.sock.send(msg)

    def _ask(self, h: _Helper, msg: bytes) -> bool:
        try:
            h.sock.send(msg)
            if not select.select([h.sock], [], [], self.timeout * 4)[0]:
                self.stop(f"helper {h.pid} did not answer a new SA")
                return False
            answer = h.sock.recv(64)
        except OSError as err:
            self.stop(f"helper {h.pid}: {err.strerror}")
            return False
        if answer != b"k":
            log.warning("crypto offload: helper %d can't build an SA's suite (%s): the SA "
                        "seals in process", h.pid, answer[1:].decode(errors="replace"))
            return False
        return True

    # -- the batch --------------------------------------------------------------------------
    def defer(self, suite: OffloadSuite, esp_header: bytes, seq_hi: bytes, seq: int,
              plaintext: bytes) -> bytes | None:
        """Write one seal into a helper's region; its placeholder, or None (no room: the
        caller seals in process)."""
        n = len(plaintext)
        need = (_REC.size + n + n + _SLACK + 7) & ~7
        for _ in range(len(self.helpers)):
            i = self._next
            self._next = (i + 1) % len(self.helpers)
            h = self.helpers[i]
            at = h.used
            if at + need > self.region_size:
                continue
            h.used = at + need
            _REC.pack_into(h.region, at, _STATUS_NEW, len(seq_hi), suite.sa_id, seq,
                           esp_header, seq_hi.ljust(4, b"\0"), n, 0)
            h.view[at + _REC.size: at + _REC.size + n] = plaintext
            self._counter += 1
            token = self._prefix + self._counter.to_bytes(8, "little")
            size = suite.iv_size + n + suite.icv_size
            job = Job(i, at, size, token, suite, (esp_header, seq_hi, seq, plaintext))
            self._fresh.append(job)
            self._jobs.append(job)
            self.jobs += 1
            if h.chunk_count == 0:
                h.chunk_start = at
            h.chunk_count += 1
            if h.chunk_count >= self.batch:
                self._ring(h)
            return token + bytes(size - TOKEN)
        self.inline += 1
        return None

    def take(self) -> list[Job]:
        """The jobs made since the last call: those of the packet just handled."""
        fresh, self._fresh = self._fresh, []
        return fresh

    def _ring(self, h: _Helper) -> None:
        if not h.chunk_count:
            return
        with contextlib.suppress(OSError):  # a dead helper: collect() finds it
            h.sock.send(_DOORBELL.pack(b"B", h.chunk_start, h.chunk_count))
        h.outstanding += 1
        h.chunk_count = 0
        self.chunks += 1

    def collect(self) -> None:
        """Wait for every job of the batch (each job's ``out`` set, or left None if it did
        not come back) and make room for the next batch. A helper that died or did not answer
        in time stops the pool."""
        if not self._jobs:
            return
        for h in self.helpers:
            self._ring(h)
        deadline = self.clock() + self.timeout
        waiting = {h.sock.fileno(): h for h in self.helpers if h.outstanding}
        broken: str | None = None
        while waiting and broken is None:
            left = deadline - self.clock()
            if left <= 0:
                broken = "helper(s) " + ", ".join(str(h.pid) for h in waiting.values()) + \
                         f" did not answer within {self.timeout:g} s"
                break
            ready = select.select(list(waiting), [], [], left)[0]
            for fd in ready:
                h = waiting[fd]
                try:
                    msg = h.sock.recv(64)
                except OSError:
                    msg = b""
                if not msg:
                    broken = f"helper {h.pid} died"
                    break
                h.outstanding -= 1
                if h.outstanding <= 0:
                    del waiting[fd]
        done = {i for i, h in enumerate(self.helpers) if h.outstanding <= 0}
        for job in self._jobs:
            if job.helper in done and broken is None:
                broken = self._read(job)
            if job.out is None:
                self.lost += 1
        for h in self.helpers:
            h.used = 0
            h.chunk_count = 0
            h.outstanding = 0
        if broken is not None:
            self.stop(broken)

    def _read(self, job: Job) -> str | None:
        """The job's sealed body into ``job.out`` if it came back right; a reason to stop
        the pool if the self-check found it wrong."""
        h = self.helpers[job.helper]
        status, _, _, _, _, _, n, out_len = _REC.unpack_from(h.region, job.offset)
        if status == _STATUS_RAISED and self.alarms is not None:
            self.alarms.append(job.suite.engine)
        if status != _STATUS_OK or out_len != job.size:
            return None
        at = job.offset + _REC.size + n
        out = bytes(h.view[at: at + out_len])
        if self.check_every:
            self._left -= 1
            if self._left <= 0:
                self._left = self.check_every
                self.checked += 1
                try:
                    mine = job.suite.inner.seal(*job.args)
                except Exception:
                    mine = b""
                if mine != out:
                    return "a helper's output differs from the in-process engine's"
        job.out = out
        return None

    def finish(self) -> None:
        """After the batch's verdicts: forget its jobs."""
        self._jobs = []
        self._fresh = []

    # -- putting the bodies in place ----------------------------------------------------------
    @staticmethod
    def patch(packet: bytes, jobs: Iterable[Job]) -> bytes | None:
        """``packet`` with each job's sealed body in place of its placeholder; None if a job
        failed or its placeholder is not there whole (the packet must then be dropped)."""
        for job in jobs:
            out = job.out
            if out is None:
                return None
            at = len(packet) - job.size
            if at < 0 or packet[at: at + TOKEN] != job.token:
                at = packet.find(job.token)
                if at < 0 or len(packet) - at < job.size:
                    return None
            packet = b"".join((packet[:at], out, packet[at + job.size:]))
        return packet

    @staticmethod
    def patch_all(packets: list[bytes], jobs: list[Job]) -> list[bytes] | None:
        """The same over several packets: a superpacket's segments (each job's placeholder
        whole in one of them), or the IP fragments of one ESP packet the worker cut itself
        (the placeholder, the packet's tail, spread over the fragments' data: put in place
        across them). None: refused."""
        out = list(packets)
        for job in jobs:
            for i, p in enumerate(out):
                if job.token in p:
                    got = OffloadPool.patch(p, (job,))
                    if got is None:
                        break
                    out[i] = got
                    break
            else:
                return _patch_fragments(packets, jobs)
            if got is None:
                return _patch_fragments(packets, jobs)
        return out

    def report(self) -> dict[str, Any]:
        return {"helpers": len(self.helpers), "batch": self.batch, "active": self.active,
                "failed": self.failed or "", "jobs": self.jobs, "chunks": self.chunks,
                "inline": self.inline, "lost": self.lost, "checked": self.checked}


_IPV6_EXTENSIONS: Final = (0, 43, 60)  # hop-by-hop, routing, destination options
_NH_FRAGMENT: Final = 44


def _fragment_data(packet: bytes) -> int | None:
    """Where an IP fragment's data begins (after an IPv4 header, or after an IPv6 fragment
    header and the extension headers before it); None if ``packet`` is neither."""
    if len(packet) < 20:
        return None
    if packet[0] >> 4 == 4:
        return (packet[0] & 0x0F) * 4
    if packet[0] >> 4 != 6 or len(packet) < 48:
        return None
    nh, at = packet[6], 40
    while nh != _NH_FRAGMENT:
        if nh not in _IPV6_EXTENSIONS or len(packet) < at + 8:
            return None
        nh, at = packet[at], at + 8 + packet[at + 1] * 8
    return at + 8 if len(packet) >= at + 8 else None


def _patch_fragments(packets: list[bytes], jobs: list[Job]) -> list[bytes] | None:
    """``packets``, the fragments of one packet in order (as the core makes them), with the
    jobs' bodies put in place across their data; None if they are not that."""
    starts = [_fragment_data(p) for p in packets]
    if len(packets) < 2 or any(s is None for s in starts):
        return None
    data = b"".join(p[s:] for p, s in zip(packets, starts, strict=True))
    patched = OffloadPool.patch(data, jobs)
    if patched is None or len(patched) != len(data):
        return None
    out, at = [], 0
    for p, s in zip(packets, starts, strict=True):
        assert s is not None
        n = len(p) - s
        out.append(p[:s] + patched[at:at + n])
        at += n
    return out


class OffloadSuite:
    """An outbound SA's suite while offload is on: while the worker defers, a seal becomes a
    job and a placeholder; otherwise (and for opening) the in-process suite, ``inner``."""

    def __init__(self, pool: OffloadPool, sa_id: int, inner: Suite, engine: str,
                 sa: SecurityAssociation) -> None:
        self.pool = pool
        self.sa = sa  # its drops count the packets whose bodies did not come back
        self.sa_id = sa_id
        self.inner = inner
        self.engine = engine
        self.name = inner.name
        self.iv_size = inner.iv_size
        self.icv_size = inner.icv_size
        self.align = inner.align

    def seal(self, esp_header: bytes, seq_hi: bytes, seq: int, plaintext: bytes) -> bytes:
        pool = self.pool
        if pool.deferring and pool.active:
            got = pool.defer(self, esp_header, seq_hi, seq, plaintext)
            if got is not None:
                return got
        return self.inner.seal(esp_header, seq_hi, seq, plaintext)

    def open(self, esp_header: Buffer, seq_hi: bytes, body: Buffer) -> bytes:
        return self.inner.open(esp_header, seq_hi, body)

    def __repr__(self) -> str:
        return f"<OffloadSuite {self.name} on {self.engine}>"


# -- the helper process --------------------------------------------------------------------

def _helper_setup(keep: int) -> None:
    """A fresh helper: no descriptor but its socket (and stdio), default signals."""
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    os.closerange(3, keep)
    os.closerange(keep + 1, 65536)


def _helper_main(sock: socket.socket, region: Any, engines: Mapping[str, Engine]) -> None:
    """Serve the owner: ``K`` builds an SA's suite (answers ``k`` or ``e``+why), ``X`` forgets
    one, ``B`` seals a chunk of records and answers ``D``. Returns when the owner is gone."""
    suites: dict[int, Suite] = {}
    view = memoryview(region)
    while True:
        try:
            msg = sock.recv(1 << 16)
        except OSError:
            return
        if not msg:
            return
        kind = msg[:1]
        if kind == b"K":
            sa_id, engine, enc, key, integ, ikey = pickle.loads(msg[1:])
            try:
                suites[sa_id] = engines[engine].build(enc, key, integ, ikey)
            except Exception as err:
                sock.send(b"e" + type(err).__name__.encode())
            else:
                sock.send(b"k")
            del key, ikey
        elif kind == b"X":
            suites.pop(_DOORBELL.unpack(msg)[1], None)
        elif kind == b"B":
            _, start, count = _DOORBELL.unpack(msg)
            _seal_chunk(view, start, count, suites)
            sock.send(b"D")


def _seal_chunk(view: memoryview, at: int, count: int, suites: dict[int, Suite]) -> None:
    """Seal ``count`` records from offset ``at``, one SA's run at a time (``seal_many``)."""
    recs: list[tuple[int, int, int, tuple[bytes, bytes, int, bytes]]] = []
    for _ in range(count):
        _st, hi_len, sa_id, seq, header, hi, n, _ = _REC.unpack_from(view, at)
        pt = bytes(view[at + _REC.size: at + _REC.size + n])
        recs.append((at, sa_id, n, (header, hi[:hi_len], seq, pt)))
        at += (_REC.size + n + n + _SLACK + 7) & ~7
    i = 0
    while i < len(recs):
        j = i
        sa_id = recs[i][1]
        while j < len(recs) and recs[j][1] == sa_id:
            j += 1
        run = recs[i:j]
        suite = suites.get(sa_id)
        if suite is None:
            for rec_at, _, _, _ in run:
                view[rec_at] = _STATUS_NO_SA
        else:
            try:
                outs: list[bytes | None] = list(seal_many(suite, [r[3] for r in run]))
            except Exception:  # which one? each again alone: only that packet is lost
                outs = [_seal_one(suite, r[3]) for r in run]
            for (rec_at, _, n, _), out in zip(run, outs, strict=True):
                if out is None:
                    view[rec_at] = _STATUS_RAISED
                    continue
                body = rec_at + _REC.size + n
                view[body: body + len(out)] = out
                struct.pack_into("<I", view, rec_at + _REC.size - 4, len(out))
                view[rec_at] = _STATUS_OK
        i = j


def _seal_one(suite: Suite, args: tuple[bytes, bytes, int, bytes]) -> bytes | None:
    try:
        return suite.seal(*args)
    except Exception:
        return None


class Recorder:
    """The queue a worker gives its verdicts to while offload defers seals: each verdict is
    kept, in order, with the jobs of the packet it is for (those made since the previous
    verdict: one packet's), until ``OffloadPool.collect`` has the sealed bodies."""

    overflows = 0

    def __init__(self, pool: OffloadPool, real: Any) -> None:
        self.pool = pool
        self.real = real
        self.entries: list[tuple[int, bool, int | None, bytes | None, list[Job]]] = []

    def verdict(self, packet_id: int, accept: bool, mark: int | None = None,
                payload: bytes | None = None) -> None:
        jobs = self.pool.take()  # a dropped packet's jobs are let go with it
        self.entries.append((packet_id, accept, mark, payload, jobs if accept else []))

    def flush(self) -> None:
        """Nothing: the worker gives the recorded verdicts after ``collect``."""

    # the rest of QueueBinding is the real queue's
    def bind(self, queue_num: int) -> None:
        self.real.bind(queue_num)

    def fileno(self) -> int:
        return int(self.real.fileno())

    def receive(self, limit: int) -> list[Any]:
        return list(self.real.receive(limit))

    def close(self) -> None:
        self.real.close()

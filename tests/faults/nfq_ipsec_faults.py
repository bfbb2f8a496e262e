"""Faults for the test suite, injected into the real daemon's workers from outside the product.

A test that wants a misbehaving worker starts the daemon with ``NFQ_IPSEC_TEST_FAULT`` set and
this directory on ``PYTHONPATH`` (``env_with_fault``): every interpreter of the daemon, the
spawned workers included, then runs ``sitecustomize.py`` from here, which wraps each
``PacketHandler``'s ``handle_batch``. The product has no fault code.

- ``raise-every-packet``: handling every packet raises (the fail-closed path end to end);
- ``slow`` or ``slow:SECONDS``: sleep that long (default 0.001 s) per packet, so that a test
  can overflow the queue with modest traffic;
- ``hang-once:PATH``: the first worker to get a packet writes ``hung`` into PATH and then hangs
  for good (alive, answering nothing, as a worker stuck in a loop would); workers that find it
  written work normally. For the supervisor's watchdog. Each worker opens PATH as it makes its
  packet handler, before a sandboxed worker can open nothing more, and claims it under flock.
- ``compromised``: the worker acts as one someone took over: a packet whose payload holds
  ``NFQ-ATTACK:<what>`` makes it try ``<what>`` first (:data:`ATTACKS`: open a file, write
  one, exec a shell, ptrace or kill a sibling, open a raw socket), then handle the packet as
  usual. It logs ``test fault: attack <what>: refused (<error>)`` or ``... SUCCEEDED``; an
  attempt the sandbox's seccomp filter forbids kills it (SIGSYS) before it can log.
- ``engine-raise:NAME:N``: in each worker, once the SAs are bound, the suites of crypto engine
  NAME raise on every call after the first N (a device that fails for good); the worker's
  start-up known-answer tests have run by then. For the engines' fail-over.
- ``engine-corrupt:NAME:N``: the same, but the suites return wrong bytes (the last one
  flipped) instead of raising: what only the self-check (``crypto.self_check``) or the
  known-answer tests can see.
- ``kat-fail:NAME:PATH``: once PATH exists, every known-answer test of engine NAME fails
  (the packets it seals stay right): the periodic check must exclude it.

Faults of one ESP version (``daemon.versions``; ``version:KIND``), injected into the
independent implementation (``Engine.process``, its replay window), or with
``version:KIND@core-source`` into the core's source loaded as the version ``core-source``
(its ``Processor.process``, its replay window); the compiled core is never touched:

- ``version:flip-byte``: a byte of every ESP packet it seals is flipped (in the ciphertext);
- ``version:wrong-seq``: every packet it seals carries the next sequence number but one;
- ``version:accept-drop``: a packet arriving that it would drop it accepts unchanged;
- ``version:skip-replay``: its replay check passes everything (a replay is opened again);
- ``version:raise``: it raises on every packet;
- ``version:hang-once:PATH``: the first worker whose independent version gets a packet writes
  ``hung`` into PATH (opened at the start, as ``hang-once`` does) and hangs in it for good (a
  version stuck in a loop: in-process, nothing cuts it off); workers that find it written work
  normally. For the watchdog.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FAULT_ENV = "NFQ_IPSEC_TEST_FAULT"
HERE = Path(__file__).resolve().parent

log = logging.getLogger("nfq_ipsec.worker")


def env_with_fault(env: dict[str, str], fault: str) -> dict[str, str]:
    """``env`` for a daemon whose workers get ``fault``."""
    out = dict(env)
    out[FAULT_ENV] = fault
    # HERE for sitecustomize.py, its parent (tests/) for this module as faults.nfq_ipsec_faults
    out["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")) if p)
    return out


def wrap(handler: Any, fault: str) -> Any:
    """Make ``handler`` (a PacketHandler) misbehave as ``fault`` says; returns it."""
    original: Callable[[list[Any]], None] = handler.handle_batch
    state: dict[str, str] = {"fault": fault, "logged": ""}
    claim_fd = -1
    if fault.startswith("hang-once:"):
        claim_fd = os.open(fault.partition(":")[2], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def handle_batch(packets: list[Any]) -> None:
        if not state["logged"]:
            log.warning("test fault injection active: %s=%s", FAULT_ENV, fault)
            state["logged"] = "yes"
        current = state["fault"]
        if current == "compromised":
            for pkt in packets:
                at = bytes(pkt.payload).find(ATTACK)
                if at >= 0:
                    what = bytes(pkt.payload)[at + len(ATTACK):].split(b"\0")[0].decode()
                    attack(handler, what.strip())
            original(packets)
            return
        if current == "raise-every-packet":
            for pkt in packets:
                handler.packets_in += 1
                try:
                    raise RuntimeError(f"test fault injection ({FAULT_ENV})")
                except Exception:
                    handler._internal_error(pkt)
            handler.queue.flush()
            return
        if current.startswith("hang-once:"):
            if _claim(claim_fd):
                log.warning("test fault injection: hanging for good")
                while True:
                    time.sleep(3600)
            state["fault"] = "none"  # another worker hung already: this one works normally
            original(packets)
            return
        delay = _slow_delay(current)
        if not delay:
            original(packets)
            return
        for pkt in packets:
            time.sleep(delay)
            original([pkt])

    handler.handle_batch = handle_batch
    return handler


ATTACK = b"NFQ-ATTACK:"
PTRACE_ATTACH = 16
_libc = ctypes.CDLL(None, use_errno=True)


def _open(path: str, flags: int, dir_fd: int | None = None) -> str:
    fd = os.open(path, flags, 0o600, dir_fd=dir_fd)
    os.close(fd)
    return f"opened {path}"


def _ptrace(pid: str) -> str:
    if _libc.ptrace(PTRACE_ATTACH, int(pid), None, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return f"attached to {pid}"


def _exec(_arg: str) -> str:
    os.execv("/bin/sh", ["sh", "-c", "true"])


def _raw_socket(_arg: str) -> str:
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).close()
    return "opened a raw socket"


def _kill(pid: str) -> str:
    os.kill(int(pid), 0)
    return f"may signal {pid}"


# what -> (how, the argument's meaning); ``state-*`` work relative to the worker's own state
# directory (the descriptor it holds), the rest on absolute paths or pids
ATTACKS: dict[str, Callable[[Any, str], str]] = {
    "read": lambda _h, arg: _open(arg, os.O_RDONLY),
    "write": lambda _h, arg: _open(arg, os.O_WRONLY | os.O_CREAT),
    "state-read": lambda h, arg: _open(arg, os.O_RDONLY, h.store.dir_fd),
    "state-write": lambda h, arg: _open(arg, os.O_WRONLY | os.O_CREAT, h.store.dir_fd),
    "exec": lambda _h, arg: _exec(arg),
    "ptrace": lambda _h, arg: _ptrace(arg),
    "kill": lambda _h, arg: _kill(arg),
    "raw-socket": lambda _h, arg: _raw_socket(arg),
}


def attack(handler: Any, what: str) -> None:
    """Try ``what`` (``NAME`` or ``NAME:ARG``) and log how it went."""
    name, _, arg = what.partition(":")
    try:
        done = ATTACKS[name](handler, arg)
    except (OSError, KeyError) as err:
        log.warning("test fault: attack %s: refused (%s)", what, err)
    else:
        log.warning("test fault: attack %s: SUCCEEDED (%s)", what, done)


class _Failing:
    """A suite that raises after the engine's first ``limit`` calls (counted per worker)."""

    def __init__(self, inner: Any, calls: list[int], limit: int, corrupt: bool = False) -> None:
        self.inner, self.calls, self.limit, self.corrupt = inner, calls, limit, corrupt
        self.name, self.iv_size = inner.name, inner.iv_size
        self.icv_size, self.align = inner.icv_size, inner.align

    def _count(self) -> bool:
        """True: this call's output is to be corrupted."""
        self.calls[0] += 1
        if self.calls[0] <= self.limit:
            return False
        if not self.corrupt:
            raise RuntimeError(f"test fault injection ({FAULT_ENV}): engine failed")
        return True

    def seal(self, *args: Any) -> bytes:
        bad = self._count()
        out: bytes = self.inner.seal(*args)
        return out[:-1] + bytes([out[-1] ^ 1]) if bad and out else out

    def open(self, *args: Any) -> bytes:
        bad = self._count()
        out: bytes = self.inner.open(*args)
        return out[:-1] + bytes([out[-1] ^ 1]) if bad and out else out


def _engine_raise(worker: Any, fault: str) -> None:
    kind, name, limit = fault.split(":")
    corrupt = kind == "engine-corrupt"
    use_team = worker.PacketHandler.use_team

    def patched(self: Any, team: Any) -> None:
        engine = team.members[name].engine
        build = engine.build
        calls = [0]
        engine.build = lambda *a: _Failing(build(*a), calls, int(limit), corrupt)
        log.warning("test fault injection active: engine %s fails after %s calls", name, limit)
        use_team(self, team)

    worker.PacketHandler.use_team = patched


def _kat_fail(fault: str) -> None:
    from nfq_ipsec.engines import kat

    _, name, path = fault.split(":", 2)
    run = kat.run

    def patched(build: Any, suite: str) -> None:
        owner = getattr(build, "__self__", None)
        if getattr(owner, "name", None) == name and os.path.exists(path):
            raise kat.KatFailure(f"{suite}: test fault injection ({FAULT_ENV}): wrong output")
        run(build, suite)

    kat.run = patched


VERSION_FAULTS = ("flip-byte", "wrong-seq", "accept-drop", "skip-replay", "raise")
FAULTY_VERSIONS = ("independent", "core-source")  # what ``version:KIND@NAME`` may name


def patch_version(kind: str, target: str = "independent") -> Callable[[], None]:
    """Make one ESP version (``target``: the independent implementation, or the core's source
    loaded as ``core-source``) misbehave as ``kind`` (one of ``VERSION_FAULTS``, or
    ``hang-once:PATH``) says, in this interpreter; returns what undoes it. The compiled core
    is never touched."""
    hang = kind.partition(":")[2] if kind.startswith("hang-once:") else ""
    if kind not in VERSION_FAULTS and not hang:
        raise ValueError(f"unknown version fault {kind!r}")
    if target not in FAULTY_VERSIONS:
        raise ValueError(f"unknown version {target!r} to make faulty")
    # opened now, at the interpreter's start: a sandboxed worker can open nothing later
    hang_fd = os.open(hang, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600) if hang else -1
    if target == "core-source":
        return _patch_core_source(kind, hang_fd)
    from nfq_ipsec.independent import Engine, Outcome, window

    process = Engine.process
    fresh = window.Window.fresh
    arriving = 0

    def faulty(self: Engine, data: bytes, length: int, where: int, now: float) -> Outcome:
        if kind == "raise":
            raise RuntimeError(f"test fault injection ({FAULT_ENV}=version:raise)")
        if hang and _claim(hang_fd):
            log.warning("test fault injection: the independent version hangs for good")
            while True:
                time.sleep(3600)
        if kind == "wrong-seq" and where != arriving:
            bumped = [sa for sa in self.db.by_name.values() if sa.outbound]
            for sa in bumped:
                sa.next_seq += 1
            try:
                return process(self, data, length, where, now)
            finally:  # its own count goes on as it would have: only the packet is wrong
                for sa in bumped:
                    sa.next_seq -= 1
        out = process(self, data, length, where, now)
        if kind == "flip-byte" and where != arriving and out.packet and out.sa_name:
            at = len(out.packet) - 20  # in the ciphertext, before a 16-byte ICV and the trailer
            out.packet = out.packet[:at] + bytes((out.packet[at] ^ 0x01,)) + out.packet[at + 1:]
        if kind == "accept-drop" and where == arriving and out.verdict == "drop":
            return Outcome("accept")
        return out

    def always_fresh(self: Any, seq: int) -> bool:
        return True

    Engine.process = faulty  # type: ignore[method-assign]
    if kind == "skip-replay":
        window.Window.fresh = always_fresh  # type: ignore[method-assign]

    def undo() -> None:
        Engine.process = process  # type: ignore[method-assign]
        window.Window.fresh = fresh  # type: ignore[method-assign]

    return undo


def _patch_core_source(kind: str, hang_fd: int) -> Callable[[], None]:
    """``patch_version`` for the core's source loaded as its own package (plain Python, so
    its classes can be patched where the compiled core's can't)."""
    from nfq_ipsec import coresource

    src = coresource.load()
    processor = sys.modules[f"{coresource.PACKAGE}.processor"]
    replay = sys.modules[f"{coresource.PACKAGE}.replay"]
    process = processor.Processor.process
    check = replay.ReplayWindow.check
    arriving = processor.ARRIVING

    def faulty(self: Any, data: bytes, length: int, where: int, now: float) -> Any:
        if kind == "raise":
            raise RuntimeError(f"test fault injection ({FAULT_ENV}=version:raise@core-source)")
        if hang_fd >= 0 and _claim(hang_fd):
            log.warning("test fault injection: the core-source version hangs for good")
            while True:
                time.sleep(3600)
        if kind == "wrong-seq" and where != arriving:
            bumped = [sa for sa in self.sad.all() if sa.outbound]
            for sa in bumped:
                sa.next_seq += 1
            try:
                return process(self, data, length, where, now)
            finally:
                for sa in bumped:
                    sa.next_seq -= 1
        res = process(self, data, length, where, now)
        if kind == "flip-byte" and where != arriving and res.packet and res.sa is not None:
            at = len(res.packet) - 20
            res.packet = res.packet[:at] + bytes((res.packet[at] ^ 0x01,)) + res.packet[at + 1:]
        if kind == "accept-drop" and where == arriving and res.verdict is src.Verdict.DROP:
            return src.Result(src.Verdict.ACCEPT)
        return res

    def always_fresh(self: Any, seq: int) -> bool:
        return True

    processor.Processor.process = faulty
    if kind == "skip-replay":
        replay.ReplayWindow.check = always_fresh

    def undo() -> None:
        processor.Processor.process = process
        replay.ReplayWindow.check = check

    return undo


def install(fault: str) -> None:
    """Wrap every PacketHandler this interpreter makes (sitecustomize calls this), or, for
    ``version:KIND``, make the independent ESP implementation misbehave."""
    from nfq_ipsec import worker

    if fault.startswith(("engine-raise:", "engine-corrupt:")):
        _engine_raise(worker, fault)
        return
    if fault.startswith("kat-fail:"):
        _kat_fail(fault)
        return
    if fault.startswith("version:"):
        kind, _, target = fault.removeprefix("version:").partition("@")
        patch_version(kind, target or "independent")
        log.warning("test fault injection active: %s=%s", FAULT_ENV, fault)
        return

    init = worker.PacketHandler.__init__

    def patched(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        wrap(self, fault)

    worker.PacketHandler.__init__ = patched  # type: ignore[method-assign]


def _claim(fd: int) -> bool:
    """Write ``hung`` into the file open as ``fd`` (under its flock); False if it was already."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        if os.fstat(fd).st_size:
            return False
        os.pwrite(fd, b"hung", 0)
        return True
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _slow_delay(fault: str) -> float:
    if not (fault == "slow" or fault.startswith("slow:")):
        return 0.0
    _, _, arg = fault.partition(":")
    try:
        return max(0.0, float(arg)) if arg else 0.001
    except ValueError:
        return 0.001

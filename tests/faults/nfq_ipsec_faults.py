"""Faults for the test suite, injected into the real daemon's workers from outside the product.

A test that wants a misbehaving worker starts the daemon with ``NFQ_IPSEC_TEST_FAULT`` set and
this directory on ``PYTHONPATH`` (``env_with_fault``): every interpreter of the daemon, the
spawned workers included, then runs ``sitecustomize.py`` from here, which wraps each
``PacketHandler``'s ``handle_batch``. The product has no fault code.

- ``raise-every-packet``: handling every packet raises (the fail-closed path end to end);
- ``slow`` or ``slow:SECONDS``: sleep that long (default 0.001 s) per packet, so that a test
  can overflow the queue with modest traffic;
- ``hang-once:PATH``: the first worker to get a packet creates PATH and then hangs for good
  (alive, answering nothing, as a worker stuck in a loop would); workers that find PATH already
  there work normally. For the supervisor's watchdog.

Faults of one ESP version (``daemon.versions``; ``version:KIND``), injected into the
independent implementation only (``Engine.process``, its replay window), the core untouched:

- ``version:flip-byte``: a byte of every ESP packet it seals is flipped (in the ciphertext);
- ``version:wrong-seq``: every packet it seals carries the next sequence number but one;
- ``version:accept-drop``: a packet arriving that it would drop it accepts unchanged;
- ``version:skip-replay``: its replay check passes everything (a replay is opened again);
- ``version:raise``: it raises on every packet;
- ``version:hang-once:PATH``: the first worker whose independent version gets a packet creates
  PATH and hangs in it for good (a version stuck in a loop: in-process, nothing cuts it off);
  workers that find PATH already there work normally. For the watchdog.
"""

from __future__ import annotations

import logging
import os
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

    def handle_batch(packets: list[Any]) -> None:
        if not state["logged"]:
            log.warning("test fault injection active: %s=%s", FAULT_ENV, fault)
            state["logged"] = "yes"
        current = state["fault"]
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
            if _claim(current.partition(":")[2]):
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


VERSION_FAULTS = ("flip-byte", "wrong-seq", "accept-drop", "skip-replay", "raise")


def patch_version(kind: str) -> Callable[[], None]:
    """Make the independent ESP implementation misbehave as ``kind`` (one of
    ``VERSION_FAULTS``) says, in this interpreter; returns what undoes it."""
    from nfq_ipsec.independent import Engine, Outcome, window

    hang = kind.partition(":")[2] if kind.startswith("hang-once:") else ""
    if kind not in VERSION_FAULTS and not hang:
        raise ValueError(f"unknown version fault {kind!r}")
    process = Engine.process
    fresh = window.Window.fresh
    arriving = 0

    def faulty(self: Engine, data: bytes, length: int, where: int, now: float) -> Outcome:
        if kind == "raise":
            raise RuntimeError(f"test fault injection ({FAULT_ENV}=version:raise)")
        if hang and _claim(hang):
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


def install(fault: str) -> None:
    """Wrap every PacketHandler this interpreter makes (sitecustomize calls this), or, for
    ``version:KIND``, make the independent ESP implementation misbehave."""
    from nfq_ipsec import worker

    if fault.startswith("version:"):
        patch_version(fault.removeprefix("version:"))
        log.warning("test fault injection active: %s=%s", FAULT_ENV, fault)
        return

    init = worker.PacketHandler.__init__

    def patched(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        wrap(self, fault)

    worker.PacketHandler.__init__ = patched  # type: ignore[method-assign]


def _claim(path: str) -> bool:
    """Create ``path``; False if it exists already."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    return True


def _slow_delay(fault: str) -> float:
    if not (fault == "slow" or fault.startswith("slow:")):
        return 0.0
    _, _, arg = fault.partition(":")
    try:
        return max(0.0, float(arg)) if arg else 0.001
    except ValueError:
        return 0.001

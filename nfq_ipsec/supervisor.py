"""The supervisor: ``nfq-ipsec run``. Starts one worker per queue, installs the rules once every
worker is listening, serves the control socket and keeps the workers alive.

Order of things (fail closed at every step):

1. turn core dumps off (this process is about to hold keys; exit 1 if it can't); load and
   validate the configuration (every problem printed, exit 2, nothing touched); find
   the iptables commands (missing: exit 1) and refuse queues that rules of someone else already
   feed (exit 2); check the SA state files (``state.py``: unusable or corrupt, exit 5);
2. open the control socket (directory 0700 if created, socket 0600; exit 1 if another daemon
   answers on it);
3. start one worker per queue with the ``spawn`` context; each gets only its own queue's SAs;
4. wait until every worker has bound its queue and said "ready" (timeout: stop, exit 1);
5. only then install the iptables rules (failure: stop the workers, exit 1, nothing installed);
6. serve: a worker that dies is restarted after a backoff (0.1 s doubling to 5 s); meanwhile
   its queue has no listener and the kernel drops that queue's packets. A worker that is alive
   but stuck (it has not answered a ping for ``daemon.watchdog`` seconds, default 10) is killed
   and restarted the same way, so a hung worker costs its queue an outage, not its traffic
   for good. Control clients are served in the same loop without ever being waited on
   (``control.py``), so nothing a client does delays a restart or the watchdog; nor does a
   status answer, whose rule counters (``iptables-save -c``, a subprocess) are read by a
   thread (``RuleCounters``). A worker that
   dies before becoming ready 3 times in a row stops the daemon (exit 1) and leaves the rules
   in place if they were installed, so its traffic stays dropped rather than sent in clear;
7. SIGHUP or a ``reload`` request: the configuration is re-read and applied without a restart
   (``reload``);
8. SIGTERM/SIGINT: close the rules (every rule that queues to a worker becomes a DROP, in one
   transaction per table), then stop the workers, remove the socket, exit 0. The rules stay:
   protected traffic is dropped while the daemon is down, never sent in clear, and the next
   ``run`` replaces the closed rules with live ones in one transaction (a restart drops
   protected traffic only for the gap between the two processes). Only ``nfq-ipsec rules
   remove`` (or ``nfq-ipsec stop --remove-rules``) takes them out.

If the supervisor itself fails unexpectedly it leaves the rules in place: with no workers the
queues have no listener, so protected traffic is dropped, never sent in clear.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from . import __version__, childsas, corebuild, counts, exitcodes, journal, rules, sandbox, usage
from .agent import AgentSpec, agent_main, agent_spec
from .config import Config, QueueConfig
from .config.fields import DEFAULT_COMPARTMENT
from .control import ControlError, ControlServer, Deferred
from .core import SADirection
from .engines.team import Discovered, Team
from .ike.child import ChildSA
from .liveness import SaActivity
from .metricsserver import MetricsError, MetricsServer
from .nfqueue import kernel_queue_stats
from .sandbox import Identity
from .sdnotify import Notifier
from .status import (
    CompartmentReport,
    ConnectionReport,
    Counts,
    DaemonReport,
    EngineReport,
    IkeReport,
    SaCounts,
    SaReport,
    StatusReport,
    VersionsSnapshot,
    WorkerReport,
    WorkerSnapshot,
)
from .worker import PACKETS_BETWEEN_LOOKS, WorkerSpec, worker_main

READY_TIMEOUT = 30.0  # seconds for a worker to bind its queue and say ready
BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
STABLE_AFTER = 10.0  # a worker up this long before dying restarts with the shortest backoff
MAX_EARLY_FAILURES = 3  # deaths before "ready", in a row, that stop the daemon
STATS_TIMEOUT = 2.0  # seconds to wait for the workers' counters for a status answer
STOP_GRACE = 5.0  # seconds a worker has to exit after "stop" before SIGTERM, then SIGKILL
PINGS_PER_WATCHDOG = 4  # pings to a ready worker per watchdog period
# Seconds a busy but healthy worker may take to answer a ping: the packets it handles between
# two looks at its pipe, at a generous 0.5 ms each (a 64 KiB AES-CBC packet in the source
# build; a typical packet takes 10 to 50 us). The shortest watchdog must stay above it
# (config.model.WATCHDOG_RANGE), or the watchdog would kill busy workers.
SLOWEST_PACKET = 0.0005
BUSY_ANSWER_BOUND = PACKETS_BETWEEN_LOOKS * SLOWEST_PACKET
COUNTS_INTERVAL = 2.5  # seconds between pings (for the counts) when the watchdog is off
COUNTERS_MAX_AGE = 60.0  # seconds: rule counters read longer ago than this are not shown

log = logging.getLogger("nfq_ipsec.supervisor")


class Fatal(Exception):
    """The daemon must stop with exit code 1; the message says why."""


class RuleCounters:
    """The rule counters behind a status answer's ``kernel_drops``, read by a thread of their
    own: ``iptables-save -c`` is a subprocess that may take seconds (up to
    ``iptables.COUNTERS_TIMEOUT`` per address family), and the supervisor's loop must not wait
    for it. ``refresh`` asks for a read that starts now (with one under way, the next starts
    when it ends) and returns its number; the loop calls ``collect`` every round (``wake``
    rouses it when a read ends) and ``done`` tells whether that read has ended. ``value`` is
    from the last read that succeeded, ``read_at`` when it started (monotonic)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._ended: queue.SimpleQueue[tuple[int, float, dict[str, int] | None, str | None]] = (
            queue.SimpleQueue())
        self._running = False
        self._again: Config | None = None
        self.started = 0  # reads started so far; each has this number
        self.finished = 0  # the number of the last read that ended
        self.value: dict[str, int] | None = None
        self.read_at: float | None = None
        self.error: str | None = None  # why the last read failed (None: it did not)

    def refresh(self, cfg: Config) -> int:
        if self._running:
            self._again = cfg
            return self.started + 1
        self._start(cfg)
        return self.started

    def done(self, number: int) -> bool:
        return self.finished >= number

    def collect(self) -> None:
        while True:
            try:
                number, at, value, error = self._ended.get_nowait()
            except queue.Empty:
                break
            self.finished = number
            self._running = False
            self.error = error
            if value is not None:
                self.value, self.read_at = value, at
        if not self._running and self._again is not None:
            cfg, self._again = self._again, None
            self._start(cfg)

    def _start(self, cfg: Config) -> None:
        self.started += 1
        self._running = True
        try:
            threading.Thread(target=self._read, args=(self.started, cfg), daemon=True,
                             name="rule-counters").start()
        except RuntimeError as err:  # no thread to be had: this read ends at once
            self._ended.put((self.started, time.monotonic(), None, f"cannot start a thread: {err}"))

    def _read(self, number: int, cfg: Config) -> None:
        from . import iptables

        at = time.monotonic()
        value: dict[str, int] | None = None
        error: str | None = None
        try:
            value = iptables.kernel_drops(cfg)
        except iptables.RulesError as err:
            error = err.message
        except Exception as err:  # never lose the end of a read: the status answer waits on it
            error = f"{type(err).__name__}: {err}"
        self._ended.put((number, at, value, error))
        self._wake()


@dataclass
class Slot:
    """One queue and the worker process serving it (if any)."""

    qc: QueueConfig
    spec: WorkerSpec
    proc: BaseProcess | None = None
    conn: Connection | None = None
    state: str = "stopped"  # starting, ready, down (waiting to restart), stopped
    pid: int | None = None
    started_at: float = 0.0  # monotonic, of the current process
    ready_at: float | None = None
    restarts: int = 0
    early_failures: int = 0
    backoff: float = BACKOFF_MIN
    restart_at: float | None = None
    last_error: str | None = None
    last_exit: str | None = None  # how the last process ended: "exit code 1", "killed by SIGSYS..."
    last_signal: str | None = None  # the signal that killed it ("SIGSYS": its sandbox did)
    last_syscall: int | None = None  # with SIGSYS: the system call, from the kernel's audit line
    died_at: float | None = None  # monotonic, when the last ready process died (see _reap)
    last_outage: float | None = None  # seconds from that death to the replacement being ready
    pipe_closed_at: float | None = None  # monotonic, when the current process's pipe hit EOF
    last_heard: float = 0.0  # monotonic, of the last message from the current process
    pinged_at: float = 0.0  # monotonic, of the last watchdog ping sent to it
    hung: bool = False  # the watchdog killed the current process
    last_counts: Counts | None = field(default=None, repr=False)  # this process's last
    carried: Counts = field(default_factory=counts.empty, repr=False)  # earlier ones
    kernel_lost: int = 0  # the kernel's drops on the queue before this process saw them (last read)
    stats: WorkerSnapshot | None = field(default=None, repr=False)
    activity: SaActivity = field(default_factory=SaActivity, repr=False)  # SAs' last packets

    @property
    def queue(self) -> int:
        return self.qc.num


@dataclass
class AgentSlot:
    """The keying agent's process (``agent``): started once the rules are in place, restarted
    alone after a backoff if it dies (the workers go on; its Child SAs are taken out, so their
    traffic is dropped until it negotiates new ones)."""

    spec: AgentSpec
    proc: BaseProcess | None = None
    conn: Connection | None = None
    state: str = "stopped"  # starting, ready, down, stopped
    pid: int | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_MIN
    restart_at: float | None = None
    last_error: str | None = None
    stats: list[ConnectionReport] | None = field(default=None, repr=False)


class Supervisor:
    def __init__(self, cfg: Config, config_path: str, team: Team | None = None) -> None:
        self.base = cfg  # the file's configuration; self.cfg adds the negotiated Child SAs
        self.cfg = cfg
        self.up: dict[str, list[childsas.Negotiated]] = {}  # by connection, oldest first
        self.apply_due = False  # the negotiated SAs changed and are not applied yet
        self.apply_retry_at = 0.0
        self._applied_at = 0.0  # monotonic: the negotiated SAs as they stood then are applied
        spec = agent_spec(cfg)
        self.agent = AgentSlot(spec) if spec is not None else None
        self.config_path = config_path
        self.ctx = multiprocessing.get_context("spawn")
        self.meter = usage.Meter()  # CPU and memory of the supervisor and workers, for status
        self.identity = worker_identity(cfg)  # the workers' user; None: sandbox off (root)
        self.identities = worker_identities(cfg)  # by compartment (its own user, or that one)
        # The crypto engines: discovered and verified here once, handed to every worker in its
        # spec; runtime disable/enable is kept here too, so a restarted worker follows it.
        self.team = team if team is not None else discover_engines(cfg)
        self.engines_disabled = set(cfg.crypto.disabled)
        self.slots = [Slot(qc, self.worker_spec(cfg, qc)) for qc in cfg.daemon.queues]
        self.control = ControlServer(cfg.daemon.control_socket)
        self.metrics = (MetricsServer(cfg.daemon.metrics, cfg.daemon.control_socket)
                        if cfg.daemon.metrics else None)
        self.state = "starting"
        self.rules_installed = False
        self.started = time.monotonic()
        self.stop_signal: int | None = None
        self.reload_requested = False  # SIGHUP
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._status_waiters: list[Deferred] = []  # status answers waiting for the counters
        self._stats_asked: list[Slot] = []
        self._agent_asked = False  # the agent was asked for the waiting status answers
        self._stats_deadline = 0.0
        self.counters = RuleCounters(self._wake)
        self._counters_wanted = 0  # the rule counter read the waiting status answers want
        self.notify = Notifier()  # systemd's READY=1, WATCHDOG=1... (none without systemd)

    # -- entry point ----------------------------------------------------------------------
    def run(self) -> int:

        self._install_signal_handlers()
        try:
            self.control.open()
        except (ControlError, OSError) as err:
            log.error("%s", err)
            return exitcodes.FAILURE
        try:
            if self.metrics is not None:
                self.metrics.open()
                self.metrics.start()
        except MetricsError as err:
            log.error("%s", err)
            self.control.close()
            return exitcodes.FAILURE
        code = exitcodes.OK
        try:
            log.info("starting %d worker(s) for queue(s) %s", len(self.slots),
                     ", ".join(str(s.queue) for s in self.slots))
            for slot in self.slots:
                self._start(slot)
            if self._wait_ready():
                self._install_rules()
                self.state = "running"
                if self.agent is not None:
                    self._start_agent(self.agent)
                log.info("running: %d worker(s) ready, rules installed, control socket %s",
                         len(self.slots), self.control.path)
                self.notify.ready(self._running_status())
                self._loop()
            if self.stop_signal is not None:
                log.info("stopping on %s", signal.Signals(self.stop_signal).name)
        except Fatal as err:
            log.error("%s", err)
            if self.rules_installed:
                # Fail closed: with the rules in place and no workers, protected traffic is
                # dropped. Removing them here would let it leave in clear.
                log.error("rules left in place, so protected traffic is dropped, not sent in "
                          "clear; `nfq-ipsec rules remove --config %s` removes them", self.cfg.path)
                self.rules_installed = False
            code = exitcodes.FAILURE
        except Exception:
            # Unexpected: leave the rules (their queues now have no listener: fail closed).
            log.critical("supervisor failed; rules left in place, so the queues drop their traffic",
                         exc_info=True)
            self.rules_installed = False
            code = exitcodes.FAILURE
        self.state = "stopping"
        self.notify.stopping()
        if self.rules_installed and not self._close_rules():
            code = exitcodes.FAILURE
        self._stop_agent()
        self._stop_workers()
        if self.metrics is not None:
            self.metrics.close()
        self.control.close()
        self.notify.close()
        log.info("stopped")
        return code

    def _wake(self) -> None:
        """Rouse the loop from another thread (it waits on ``_wake_r``)."""
        with contextlib.suppress(OSError):  # full: the loop wakes anyway
            self._wake_w.send(b"\0")

    def _install_signal_handlers(self) -> None:
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

        def on_stop(signum: int, _frame: object) -> None:
            if self.stop_signal is None:
                self.stop_signal = signum

        def on_hup(_signum: int, _frame: object) -> None:
            self.reload_requested = True

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    # -- workers --------------------------------------------------------------------------
    def _start(self, slot: Slot) -> None:
        parent, child = self.ctx.Pipe(duplex=True)
        proc = self.ctx.Process(target=worker_main, args=(slot.spec, child),
                                name=f"nfq-ipsec-q{slot.queue}")
        proc.start()
        child.close()
        slot.proc, slot.conn = proc, parent
        slot.pid = proc.pid
        slot.state = "starting"
        slot.started_at = time.monotonic()
        slot.ready_at = None
        slot.restart_at = None
        slot.stats = None
        slot.last_counts = None
        slot.kernel_lost = 0
        slot.activity.restart()
        slot.last_heard = slot.pinged_at = slot.started_at
        slot.hung = False
        slot.pipe_closed_at = None
        log.debug("worker for queue %d started, pid %s", slot.queue, proc.pid,
                  extra=journal.fields(queue=slot.queue))

    def _on_message(self, slot: Slot, msg: Any) -> None:
        slot.last_heard = time.monotonic()  # any message, "pong" included, feeds the watchdog
        kind = msg[0] if isinstance(msg, tuple) and msg else None
        if kind == "ready":
            slot.state = "ready"
            slot.ready_at = time.monotonic()
            down = ""
            if slot.died_at is not None:
                slot.last_outage = slot.ready_at - slot.died_at
                slot.died_at = None
                down = f", queue was down {slot.last_outage:.2f} s"
            slot.early_failures = 0
            slot.last_error = None
            slot.pid = int(msg[1])
            if self._status_waiters:  # a status answer is being collected: count it in
                self._ask_stats(slot)
            cpu = f"cpu {slot.qc.cpu}" if slot.qc.cpu is not None else "not pinned"
            again = f" (restart {slot.restarts})" if slot.restarts else ""
            comp = (f", compartment {slot.spec.compartment}"
                    if slot.spec.compartment != DEFAULT_COMPARTMENT else "")
            log.info("worker for queue %d ready%s: pid %d, %s, %d SA(s)%s%s", slot.queue, again,
                     slot.pid, cpu, len(slot.spec.sas), comp, down,
                     extra=journal.fields(queue=slot.queue))
        elif kind == "error":
            slot.last_error = str(msg[1])
        elif kind == "stats":
            slot.stats = msg[1]
            slot.last_counts = counts.of_snapshot(msg[1])
            slot.activity.update(slot.last_counts, slot.last_heard)
        elif kind == "pong" and len(msg) > 1:
            # the worker's own counters, and what the kernel dropped before it saw them
            slot.last_counts = counts.with_kernel_losses(msg[1], self._kernel_lost(slot))
            slot.activity.update(slot.last_counts, slot.last_heard)
        elif kind == "acquire" and len(msg) == 2:
            self._acquire(str(msg[1]))

    def _acquire(self, name: str) -> None:
        """A trap connection's packet found no Child SA (a worker dropped it as ``acquire``):
        the agent initiates, unless it is not running (then the packets keep being dropped,
        and the next acquire after its start asks again)."""
        agent = self.agent
        if agent is None or agent.conn is None or agent.state != "ready":
            return
        log.debug("acquire for connection %s: asking the agent", name)
        with contextlib.suppress(OSError):
            agent.conn.send(("acquire", name))

    @staticmethod
    def _kernel_lost(slot: Slot) -> int:
        """The packets the kernel dropped on the slot's queue before its current worker saw
        them (queue full, socket buffer full). The kernel counts them per bound queue, from
        zero for each worker, and forgets them when the worker is gone: then the last value
        read stands."""
        k = kernel_queue_stats().get(slot.queue)
        if k is not None:
            slot.kernel_lost = k.queue_dropped + k.user_dropped
        return slot.kernel_lost

    def _read(self, slot: Slot) -> None:
        conn = slot.conn
        if conn is None:
            return
        try:
            while conn.poll():
                self._on_message(slot, conn.recv())
        except (EOFError, OSError):
            self._pipe_closed(slot)

    def _pipe_closed(self, slot: Slot) -> None:
        """The worker's end of the pipe closed: it is exiting (its sentinel tells us when)."""
        if slot.pipe_closed_at is None:
            slot.pipe_closed_at = time.monotonic()
        if slot.conn is not None:
            slot.conn.close()
            slot.conn = None

    def _reap(self, slot: Slot, noticed: float | None = None) -> None:
        """The slot's process has exited: log it, then schedule a restart or give up.

        ``noticed``: when its sentinel was seen readable. The death is timed from that or from
        its pipe's end of file, whichever came first: both happen as the process exits, and
        the loop notices them at once (nothing in it waits on a client)."""
        proc = slot.proc
        assert proc is not None
        self._read(slot)  # an error message it sent before dying
        seen = [t for t in (noticed, slot.pipe_closed_at) if t is not None]
        died = min(seen) if seen else time.monotonic()
        # The sentinel fires when the child's files close, a moment before it can be reaped.
        proc.join(2.0)
        if proc.exitcode is None:
            proc.kill()
            proc.join(2.0)
        code = proc.exitcode
        how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
               else f"exit code {code}")
        slot.last_signal = signal.Signals(-code).name if code is not None and code < 0 else None
        slot.last_syscall = None
        if code == -signal.SIGSYS and slot.pid is not None:  # its seccomp filter killed it
            slot.last_syscall = sandbox.seccomp_syscall(slot.pid)
            if slot.last_syscall is None:
                how += " (seccomp: a system call outside the workers' allow-list; which one the " \
                       "kernel log did not say)"
            else:
                name = sandbox.syscall_name(slot.last_syscall)
                how += (f" (seccomp: system call {slot.last_syscall}"
                        f"{f', {name}' if name else ''}, outside the workers' allow-list)")
        slot.last_exit = how
        if slot.conn is not None:
            slot.conn.close()
        slot.proc = slot.conn = None
        if slot.last_counts is not None:  # its last report goes on into its successor's counts
            slot.carried = counts.add(slot.carried, slot.last_counts)
            slot.last_counts = None
        was_ready = slot.state == "ready"
        uptime = time.monotonic() - slot.started_at
        if was_ready:
            slot.died_at = died
        slot.state = "down"
        slot.stats = None
        if self.state == "stopping":
            slot.state = "stopped"
            return
        if not was_ready:
            slot.early_failures += 1
            why = f": {slot.last_error}" if slot.last_error else ""
            if slot.early_failures >= MAX_EARLY_FAILURES:
                raise Fatal(f"worker for queue {slot.queue} died before becoming ready "
                             f"{slot.early_failures} times in a row ({how}){why}; stopping")
        if was_ready and uptime >= STABLE_AFTER:
            slot.backoff = BACKOFF_MIN
        delay = slot.backoff
        slot.backoff = min(BACKOFF_MAX, slot.backoff * 2)
        slot.restart_at = time.monotonic() + delay
        phase = "" if was_ready else " before becoming ready"
        log.warning("worker for queue %d (pid %s) died%s, %s; queue %d drops its traffic until "
                    "it is back; restarting in %.1f s", slot.queue, slot.pid, phase, how,
                    slot.queue, delay, extra=journal.fields(queue=slot.queue, reason="worker_died"))

    def _tick(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.state == "down" and slot.restart_at is not None and now >= slot.restart_at:
                slot.restarts += 1
                self._start(slot)
            elif (slot.state == "starting" and slot.proc is not None
                  and now - slot.started_at > READY_TIMEOUT):
                log.warning("worker for queue %d (pid %s) not ready after %.0f s: killing it",
                            slot.queue, slot.pid, READY_TIMEOUT,
                            extra=journal.fields(queue=slot.queue, reason="not_ready"))
                slot.last_error = f"not ready after {READY_TIMEOUT:.0f} s"
                slot.proc.kill()
            elif slot.state == "ready" and slot.proc is not None:
                self._watch(slot, now)

    def _watch(self, slot: Slot, now: float) -> None:
        """The watchdog: ping a ready worker a few times per period; kill one that stayed silent
        for a whole period (its reaping restarts it). A busy worker still answers: it reads its
        pipe after at most PACKETS_BETWEEN_LOOKS packets, within BUSY_ANSWER_BOUND seconds.
        Each answer carries the worker's counts; with the watchdog off the pings still go out,
        for those."""
        watchdog = self.cfg.daemon.watchdog
        if slot.proc is None:
            return
        silent = now - slot.last_heard
        if 0 < watchdog <= silent:
            if not slot.hung:
                slot.hung = True
                slot.last_error = f"did not answer for {silent:.1f} s: killed by the watchdog"
                log.warning("worker for queue %d (pid %s) has not answered for %.1f s "
                            "(daemon.watchdog = %g s): killing it", slot.queue, slot.pid, silent,
                            watchdog, extra=journal.fields(queue=slot.queue, reason="watchdog"))
                slot.proc.kill()
        elif now - slot.pinged_at >= self._ping_interval() and slot.conn is not None:
            slot.pinged_at = now
            with contextlib.suppress(OSError):
                slot.conn.send(("ping",))

    def _ping_interval(self) -> float:
        watchdog = self.cfg.daemon.watchdog
        return watchdog / PINGS_PER_WATCHDOG if watchdog > 0 else COUNTS_INTERVAL

    def _next_timeout(self) -> float:
        now = time.monotonic()
        timeout = min(1.0, self._ping_interval())
        for slot in self.slots:
            if slot.state == "down" and slot.restart_at is not None:
                timeout = min(timeout, max(0.0, slot.restart_at - now))
        if self.agent is not None and self.agent.restart_at is not None:
            timeout = min(timeout, max(0.0, self.agent.restart_at - now))
        if self.apply_due:
            timeout = min(timeout, 0.5)
        due = childsas.next_change(self.up, self._applied_at)
        if due is not None:
            timeout = min(timeout, max(0.0, due - now))
        clients = self.control.next_timeout(now)
        if clients is not None:
            timeout = min(timeout, clients)
        if self._status_waiters:
            timeout = min(timeout, max(0.0, self._stats_deadline - now))
        due = self.notify.next_watchdog(now)
        if due is not None:
            timeout = min(timeout, due)
        return timeout

    def _wait_once(self) -> None:
        """Wait for and handle one round of events: messages, deaths, clients, signals.

        Nothing here blocks on a control client: ``ControlServer.serve`` only does what its
        clients are ready for, so deaths are seen and restarts start on time."""
        objs: dict[Any, tuple[str, Slot | None]] = {self._wake_r: ("wake", None)}
        for waitable in self.control.waitables():
            objs[waitable] = ("control", None)
        for slot in self.slots:
            if slot.conn is not None:
                objs[slot.conn] = ("conn", slot)
            if slot.proc is not None:
                objs[slot.proc.sentinel] = ("dead", slot)
        agent = self.agent
        if agent is not None and agent.conn is not None:
            objs[agent.conn] = ("agent", None)
        if agent is not None and agent.proc is not None:
            objs[agent.proc.sentinel] = ("agent_dead", None)
        ready = wait(list(objs), timeout=self._next_timeout())
        noticed = time.monotonic()
        dead: list[Slot] = []
        agent_died = False
        for obj in ready:
            what, owner = objs[obj]
            if what == "wake":
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(256)
            elif what == "conn" and owner is not None:
                self._read(owner)
            elif what == "dead" and owner is not None:
                dead.append(owner)
            elif what == "agent":
                self._read_agent()
            elif what == "agent_dead":
                agent_died = True
        for slot in dead:
            self._reap(slot, noticed)
        if agent_died:
            self._reap_agent()
        self._tick()
        self._tick_agent()
        self.counters.collect()
        self._answer_status()
        self.notify.watchdog()  # the loop turns: systemd's watchdog is fed from here only
        self.control.serve(self.handle_request)  # every round: clients' deadlines are due too

    def _wait_ready(self) -> bool:
        """Until every worker is ready (True), or a stop signal (False). Raises Fatal."""
        deadline = time.monotonic() + READY_TIMEOUT
        while self.stop_signal is None:
            if all(s.state == "ready" for s in self.slots):
                return True
            if time.monotonic() > deadline:
                late = [str(s.queue) for s in self.slots if s.state != "ready"]
                raise Fatal(f"worker(s) for queue(s) {', '.join(late)} not ready after "
                            f"{READY_TIMEOUT:.0f} s; stopping")
            self._wait_once()
        return False

    def _loop(self) -> None:
        while self.stop_signal is None:
            self._wait_once()
            if self.reload_requested and self.stop_signal is None:
                self.reload_requested = False
                log.info("SIGHUP: reloading %s", self.config_path)
                self.reload()

    def _stop_workers(self) -> None:
        live = [s for s in self.slots if s.proc is not None]
        for slot in live:
            if slot.conn is not None:
                with contextlib.suppress(OSError):
                    slot.conn.send(("stop",))
        deadline = time.monotonic() + STOP_GRACE
        for slot in live:
            assert slot.proc is not None
            slot.proc.join(max(0.0, deadline - time.monotonic()))
            if slot.proc.exitcode is None:
                log.warning("worker for queue %d (pid %s) did not stop; sending SIGTERM",
                            slot.queue, slot.pid, extra=journal.fields(queue=slot.queue))
                _end(slot.proc)
            if slot.conn is not None:
                slot.conn.close()
            slot.proc = slot.conn = None
            slot.state = "stopped"

    # -- the keying agent -------------------------------------------------------------------
    def _start_agent(self, agent: AgentSlot) -> None:
        parent, child = self.ctx.Pipe(duplex=True)
        proc = self.ctx.Process(target=agent_main, args=(agent.spec, child), name="nfq-ipsec-agent")
        proc.start()
        child.close()
        agent.proc, agent.conn, agent.pid = proc, parent, proc.pid
        agent.state = "starting"
        agent.started_at = time.monotonic()
        agent.restart_at = None
        agent.stats = None
        log.debug("agent started, pid %s", proc.pid)

    def _read_agent(self) -> None:
        agent = self.agent
        if agent is None or agent.conn is None:
            return
        try:
            while agent.conn.poll():
                self._on_agent_message(agent.conn.recv())
        except (EOFError, OSError):
            agent.conn.close()
            agent.conn = None

    def _on_agent_message(self, msg: Any) -> None:
        agent = self.agent
        assert agent is not None
        kind = msg[0] if isinstance(msg, tuple) and msg else None
        if kind == "ready":
            agent.state = "ready"
            agent.pid = int(msg[1])
            agent.last_error = None
            again = f" (restart {agent.restarts})" if agent.restarts else ""
            log.info("agent ready%s: pid %d, %d connection(s)", again, agent.pid,
                     len(agent.spec.connections))
        elif kind == "error":
            agent.last_error = str(msg[1])
        elif kind == "ike_stats":
            agent.stats = msg[1]
        elif kind == "reconfigured":
            log.info("agent runs %s connection(s) after the reload", msg[1] if len(msg) > 1 else "?")
        elif (kind == "child_up" and len(msg) == 3 and isinstance(msg[2], ChildSA)
              and str(msg[1]) in {c.name for c in self.base.connections}):
            now = time.monotonic()
            entries = childsas.current(self.up.get(str(msg[1]), []), now)
            live = [n for n in entries if n.retire_at is None and n.child.spi_in != msg[2].spi_in]
            # a successor takes over sending once the peer has surely installed its twin
            start = now + childsas.SWITCH_AFTER if live else 0.0
            self.up[str(msg[1])] = [n for n in entries if n.child.spi_in != msg[2].spi_in] + [
                childsas.Negotiated(msg[2], start)]
            self.apply_due = True
        elif kind == "child_down" and len(msg) == 4:
            now = time.monotonic()
            entries = childsas.current(self.up.get(str(msg[1]), []), now)
            if msg[3]:  # its inbound twin stays a moment for what the peer still sends
                self.up[str(msg[1])] = [
                    dataclasses.replace(n, retire_at=now + childsas.LINGER)
                    if n.child.spi_in == msg[2] else n for n in entries]
            else:
                self.up[str(msg[1])] = [n for n in entries if n.child.spi_in != msg[2]]
            self.apply_due = True

    def _reap_agent(self) -> None:
        agent = self.agent
        assert agent is not None and agent.proc is not None
        self._read_agent()
        agent.proc.join(2.0)
        if agent.proc.exitcode is None:
            agent.proc.kill()
            agent.proc.join(2.0)
        code = agent.proc.exitcode
        how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
               else f"exit code {code}")
        if agent.conn is not None:
            agent.conn.close()
        agent.proc = agent.conn = None
        agent.stats = None
        if self.state == "stopping":
            agent.state = "stopped"
            return
        uptime = time.monotonic() - agent.started_at
        if agent.state == "ready" and uptime >= STABLE_AFTER:
            agent.backoff = BACKOFF_MIN
        agent.state = "down"
        delay = agent.backoff
        agent.backoff = min(BACKOFF_MAX, agent.backoff * 2)
        agent.restart_at = time.monotonic() + delay
        why = f": {agent.last_error}" if agent.last_error else ""
        log.warning("agent (pid %s) died, %s%s; its Child SAs are taken out (their traffic is "
                    "dropped) and it restarts in %.1f s", agent.pid, how, why, delay)
        if any(self.up.values()):
            self.up = {}
            self.apply_due = True

    def _tick_agent(self) -> None:
        agent = self.agent
        if (agent is not None and agent.state == "down" and agent.restart_at is not None
                and time.monotonic() >= agent.restart_at and self.state == "running"):
            agent.restarts += 1
            self._start_agent(agent)
        due = childsas.next_change(self.up, self._applied_at)
        if due is not None and time.monotonic() >= due:
            self.apply_due = True  # a successor takes over sending, or a deleted SA retires
        if self.apply_due and self.state == "running":
            self._apply_negotiated()

    def _apply_negotiated(self) -> None:
        """Give the workers the Child SAs the agent has up (and take the gone ones away)."""
        now = time.monotonic()
        if now < self.apply_retry_at:
            return
        result = self.apply(childsas.effective(self.base, self.up, now), "negotiated SAs")
        if result.get("changed"):
            self.apply_due = False
            self._applied_at = now
            self.up = {name: childsas.current(entries, now) for name, entries in self.up.items()}
            agent = self.agent
            if agent is not None and agent.conn is not None:  # its held answers may go now
                with contextlib.suppress(OSError):
                    agent.conn.send(("installed", [n.child.spi_in for entries in self.up.values()
                                                   for n in entries]))
        else:  # tried again in a second (a worker restarting, say); until then the policy of
            # a new Child SA drops its traffic, and a gone one's SAs stay
            self.apply_retry_at = time.monotonic() + 1.0

    def _stop_agent(self) -> None:
        agent = self.agent
        if agent is None or agent.proc is None:
            return
        if agent.conn is not None:
            with contextlib.suppress(OSError):
                agent.conn.send(("stop",))
        agent.proc.join(STOP_GRACE)
        if agent.proc.exitcode is None:
            log.warning("agent (pid %s) did not stop; sending SIGTERM", agent.pid)
            _end(agent.proc)
        if agent.conn is not None:
            agent.conn.close()
        agent.proc = agent.conn = None
        agent.state = "stopped"

    def _ask_agent(self, message: tuple[Any, ...], timeout: float = 5.0) -> dict[str, Any]:
        """An ``ike`` request to the agent, answered ``("ike_done", ok, text)``; the agent's
        other messages meanwhile are handled as usual."""
        agent = self.agent
        if agent is None:
            return {"error": "no connection in the configuration names a policy: no agent runs"}
        if agent.conn is None or agent.state != "ready":
            return {"error": f"the agent is {agent.state}; try again once it is ready"}
        try:
            agent.conn.send(message)
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not agent.conn.poll(left):
                    return {"error": "the agent did not answer"}
                msg = agent.conn.recv()
                if isinstance(msg, tuple) and msg and msg[0] == "ike_done":
                    return {"ike": str(msg[2])} if msg[1] else {"error": str(msg[2])}
                self._on_agent_message(msg)
        except (EOFError, OSError):
            return {"error": "the agent died"}

    # -- rules ----------------------------------------------------------------------------
    def _install_rules(self) -> None:
        from . import iptables

        try:
            found = iptables.status(self.cfg)
            if found.closed:
                log.info("closed rules of a stopped run found; replacing them with live ones")
            elif found.matches:
                # Our workers hold every queue, so no other daemon serves them: these rules
                # were left by a run that did not stop cleanly.
                log.warning("rules left by an earlier run found; replacing them")
            iptables.install(self.cfg)  # replaces whatever was there, table by table, atomically
        except iptables.RulesError as err:
            # Never remove rules here: whatever is installed still drops protected traffic.
            # Try to leave at least the closed rules in place.
            try:
                iptables.install(self.cfg, closed=True)
                left = "the closed rules are in place (protected traffic is dropped)"
            except iptables.RulesError as err2:
                left = (f"installing the closed rules instead failed too ({err2.message}): "
                        f"{iptables.outcome(err2, 'closed')}")
            raise Fatal(f"cannot install the iptables rules: {err}; {left}") from None
        self.rules_installed = True

    def _close_rules(self) -> bool:
        """Swap the live rules for the closed ones (the NFQUEUE targets become DROP in the same
        transaction), so nothing protected leaves in clear while the daemon is down."""
        from . import iptables

        try:
            iptables.install(self.cfg, closed=True)
        except iptables.RulesError as err:
            if 4 in err.applied:
                # The IPv6 rules are the same whether the daemon runs or not: those it
                # installed at start are still there, unless someone changed them since.
                log.error("the IPv4 rules are closed (protected traffic is dropped), but "
                          "rewriting the IPv6 rules failed: %s; the IPv6 rules are left as "
                          "they were (they do not change when the daemon stops: `nfq-ipsec "
                          "rules show --ipv6`)", err)
            else:
                log.error("cannot close the iptables rules: %s; %s. Where the live IPv4 rules "
                          "remain, their queues have no worker and drop the traffic", err,
                          iptables.outcome(err, "closed"))
            return False
        self.rules_installed = False
        log.info("rules closed: protected traffic is dropped until the daemon runs again "
                 "(`nfq-ipsec rules remove` takes them out)")
        return True

    # -- status ---------------------------------------------------------------------------
    def handle_request(self, req: dict[str, Any]) -> StatusReport | dict[str, Any] | Deferred:
        """A control request. ``status`` is answered once the workers have sent their counters
        and the rule counters have been read (or in ``STATS_TIMEOUT``), by ``_answer_status`` in
        a later round of the loop."""
        command = req.get("command")
        if command == "status":
            if not self._status_waiters:
                self._stats_asked = []
                self._stats_deadline = time.monotonic() + STATS_TIMEOUT
                for slot in self.slots:
                    slot.stats = None
                    self._ask_stats(slot)
                self._ask_agent_stats()
                # the rule counters are read by a thread: the answer waits for it, not the loop
                self._counters_wanted = self.counters.refresh(self.cfg) if self.rules_installed else 0
                if (not self._stats_asked and not self._agent_asked
                        and self.counters.done(self._counters_wanted)):
                    return self.status()  # nothing to wait for
            waiter = Deferred(STATS_TIMEOUT)
            self._status_waiters.append(waiter)
            return waiter
        if command == "reload":
            asked = req.get("config")
            if asked is not None and os.path.realpath(str(asked)) != os.path.realpath(self.config_path):
                return {"error": f"this daemon runs {self.config_path}, not the given file",
                        "changed": False}
            if self.state != "running":
                return {"error": f"the daemon is {self.state}; reload once it runs", "changed": False}
            return self.reload()
        if command == "ike":
            action, name = req.get("action"), req.get("name")
            if action not in ("initiate", "terminate") or not isinstance(name, str):
                return {"error": "ike needs action initiate or terminate and a connection name"}
            if self.state != "running":
                return {"error": f"the daemon is {self.state}; try again once it runs"}
            return self._ask_agent((action, name[:200]))
        if command == "engine":
            return self.engine(req.get("action"), req.get("name"))
        # never echo what a client sent beyond a short string
        what = repr(command[:40]) if isinstance(command, str) else f"of type {type(command).__name__}"
        return {"error": f"unknown command {what} (known: status, reload, ike, engine)"}

    # -- crypto engines -------------------------------------------------------------------
    def worker_spec(self, cfg: Config, qc: QueueConfig) -> WorkerSpec:
        identity = self.identities.get(cfg.compartment_of_queue(qc.num).name, self.identity)
        return worker_spec(cfg, qc, identity, self.team.discovered(),
                           tuple(sorted(self.engines_disabled)))

    def engine(self, action: object, name: object) -> dict[str, Any]:
        """``engine disable|enable NAME``: every worker moves the SAs at once, no restart."""
        if action not in ("disable", "enable") or not isinstance(name, str):
            return {"error": "engine needs action disable or enable and an engine name"}
        if name not in self.team.members:
            return {"error": f"unknown engine {name[:40]!r} (known: {', '.join(self.team.members)})"}
        if self.state != "running":
            return {"error": f"the daemon is {self.state}; try again once it runs"}
        if action == "disable":
            self.engines_disabled.add(name)
            self.team.members[name].disabled = True
        else:
            self.engines_disabled.discard(name)
            self.team.members[name].disabled = False
        for slot in self.slots:  # a worker started from now on follows it
            slot.spec = dataclasses.replace(slot.spec, crypto=dataclasses.replace(
                slot.spec.crypto, disabled=tuple(sorted(self.engines_disabled))))
        answers = self._ask([s for s in self.slots if s.state == "ready"],
                            lambda _slot: ("engine", action, name), "engine")
        moved: dict[str, Any] = {}
        errors = []
        for num, (done, text) in sorted(answers.items()):
            if not done:
                errors.append(f"queue {num}: {text}")
                continue
            got = json.loads(text)
            if "error" in got:
                errors.append(f"queue {num}: {got['error']}")
            else:
                moved[str(num)] = got["moved"]
        log.info("engine %s %sd at runtime: %d SA(s) moved", name, action,
                 sum(len(v) for v in moved.values()))
        out: dict[str, Any] = {"engine": name, "action": action, "moved": moved}
        if errors:
            out["error"] = "; ".join(errors)
        return out

    def engines_report(self) -> list[EngineReport]:
        """The supervisor's discovery with every worker's state, load and faults summed."""
        rows = self.team.report()
        for row in rows:
            row["sas"] = 0
            if row["name"] in self.engines_disabled and row["state"] != "absent":
                row["state"] = "disabled"
            for slot in self.slots:
                for w in slot.stats.get("engines", []) if slot.stats else []:
                    if w["name"] != row["name"]:
                        continue
                    row["sas"] += w["sas"]
                    row["faults"] += w["faults"]
                    row["moved_away"] += w["moved_away"]
                    if w["state"] == "excluded" and row["state"] == "ready":
                        row["state"], row["reason"] = "excluded", f"queue {slot.queue}: {w['reason']}"
                        row["failed"] = dict(w["failed"])
        return rows

    # -- reload ---------------------------------------------------------------------------
    def _running_status(self) -> str:
        return f"running: {len(self.slots)} worker(s) ready, rules installed"

    def reload(self) -> dict[str, Any]:
        """``_reload`` with systemd told: RELOADING=1, then READY=1 whatever the outcome (a
        refused reload leaves the old configuration running). The reload holds the loop until
        it ends, so the watchdog is fed as it begins."""
        self.notify.reloading()
        self.notify.watchdog(force=True)
        try:
            return self._reload()
        finally:
            self.notify.ready(self._running_status())

    def _reload(self) -> dict[str, Any]:
        """Re-read the configuration file and apply it without a restart: the workers that stay
        build their new processors first (SAs whose parameters did not change go on with their
        sequence numbers and replay windows), workers for new queues start and bind, then the
        rules move over in one transaction per table, then the retired SAs and queues go. Any
        problem before the rules move changes nothing: the old configuration keeps running.
        Returns ``{"reloaded": summary, "changed": True}`` or ``{"error": ..., "problems":
        [...], "changed": False}``."""
        from .config import load_config
        from .core.errors import ConfigError

        try:
            new = load_config(self.config_path)
        except ConfigError as err:
            return self._refuse("invalid configuration", err.problems)
        # A connection that is gone or changed loses its Child SAs now (its policy, if it stays,
        # drops until the agent has negotiated new ones); the unchanged ones keep theirs.
        before = self.base.connections
        old = {c.name: c for c in before}
        kept = {c.name for c in new.connections if old.get(c.name) == c}
        up = {name: entries for name, entries in self.up.items() if name in kept}
        result = self.apply(childsas.effective(new, up, time.monotonic()), "configuration")
        if result.get("changed"):
            self.base, self.up = new, up
            if new.connections != before:
                result["reloaded"] += "; " + self._reload_agent(new, kept, set(old))
        return result

    def _reload_agent(self, new: Config, kept: set[str], before: set[str]) -> str:
        """The keying agent after a reload that changed the connections: told the new ones
        (it drops, adds or keeps each; an unchanged connection keeps its IKE and Child SAs),
        started if there was none, stopped if none is left. Returns what it did."""
        spec = agent_spec(new)
        names = {c.name for c in new.connections}
        if spec is None:
            self._stop_agent()
            self.agent = None
            return "keying agent stopped (no connection left)"
        if self.agent is None:
            self.agent = AgentSlot(spec)
            self._start_agent(self.agent)
            return f"keying agent started for {', '.join(sorted(names))}"
        self.agent.spec = spec  # what a restart of the agent will run too
        changed = sorted(names - kept)
        dropped = sorted(before - names)
        what = (f"connections: {', '.join(changed) or 'none'} (re)started, "
                f"{', '.join(dropped) or 'none'} removed, {len(kept)} kept")
        if self.agent.state == "ready" and self.agent.conn is not None:
            try:
                self.agent.conn.send(("reconfigure", spec))
            except OSError as err:
                return f"{what}; the agent could not be told ({err}): it gets them when it restarts"
        return what

    def apply(self, new: Config, what: str) -> dict[str, Any]:
        """Run ``new`` without a restart (a reloaded file, or the file with the negotiated Child
        SAs): the workers that stay build their new processors first (SAs whose parameters did
        not change go on with their sequence numbers and replay windows), workers for new
        queues start and bind, then the rules move over in one transaction per table, then the
        retired SAs and queues go. Any problem before the rules move changes nothing."""
        from . import iptables, state

        doing = "reload" if what == "configuration" else f"installing {what}"
        problems = reload_problems(self.cfg, new)
        fresh = [sa for sa in new.sas if sa not in self.cfg.sas]
        try:
            identities = worker_identities(new)
        except sandbox.SandboxError as err:
            return self._refuse("configuration not applied", [str(err)], doing)
        owners = queue_owners(new, identities)
        old_nums = {s.queue for s in self.slots}
        try:  # a new queue's directory, before anything reads it (the others' workers run)
            for qc in new.daemon.queues:
                if qc.num not in old_nums:
                    state.prepare_worker_dir(new.daemon.state_dir, qc.num,
                                             new.sas_for_queue(qc.num), owners[qc.num],
                                             others=False)
        except state.StateError as err:
            problems.append(f"SA state: {err}")
        for owner, queues in by_owner(owners).items():
            problems += [f"SA state: {p}" for p in state.check(
                new.daemon.state_dir, [sa for sa in fresh if sa.queue in queues], owner)]
        try:
            problems += iptables.foreign_queue_users(new, iptables.read_tables(iptables.backend_for(new)))
        except iptables.RulesError as err:
            problems.append(str(err))
        problems += [f"worker for queue {s.queue} is {s.state}: reload once it is ready"
                     for s in self.slots if s.state != "ready"]
        if problems:
            return self._refuse("configuration not applied", problems, doing)
        new_nums = [qc.num for qc in new.daemon.queues]
        self.identities = {**self.identities, **identities}  # a new compartment's, for its specs
        kept = [s for s in self.slots if s.queue in new_nums]
        removed = [s for s in self.slots if s.queue not in new_nums]
        added = [Slot(qc, self.worker_spec(new, qc)) for qc in new.daemon.queues
                 if qc.num not in old_nums]
        specs = {qc.num: self.worker_spec(new, qc) for qc in new.daemon.queues}
        # 1. the workers that stay build their new processors (nothing moves yet)
        answers = self._ask(kept, lambda s: ("reload", specs[s.queue]), "reloaded")
        failed = [f"queue {q}: {why}" for q, (ok, why) in answers.items() if not ok]
        # 2. workers for new queues bind them
        if not failed and added:
            failed += self._start_added(added)
        if failed:
            self._undo_reload([s for s in kept if answers[s.queue][0]], added)
            return self._refuse("configuration not applied", failed, doing)
        # 3. the rules move over
        try:
            iptables.install(new)
        except iptables.RulesError as err:
            self._undo_reload(kept, added)
            try:
                iptables.install(self.cfg)
                left = "the old rules are back in place"
            except iptables.RulesError:
                left = "the old rules could not be restored: check `nfq-ipsec rules show`"
            return self._refuse("configuration not applied", [f"installing the rules: {err}", left],
                                doing)
        # 4. the retired SAs and queues go
        self._ask(kept, lambda s: ("commit",), "committed")
        by_num = {qc.num: qc for qc in new.daemon.queues}
        for slot in kept:
            slot.qc, slot.spec = by_num[slot.queue], specs[slot.queue]
        self._stop_slots(removed)
        self.slots = sorted(kept + added, key=lambda s: new_nums.index(s.queue))
        self._prune_negotiated(new)
        summary = "; ".join(f"queue {q}: {why}" for q, (_, why) in answers.items())
        if added:
            summary += f"; new queue(s) {', '.join(str(s.queue) for s in added)}"
        if removed:
            summary += f"; queue(s) {', '.join(str(s.queue) for s in removed)} stopped"
        self.cfg = new
        log.info("%s applied: %s", what, summary or "nothing changed")
        return {"reloaded": summary, "changed": True}

    def _prune_negotiated(self, new: Config) -> None:
        """The state files of the negotiated SAs this change retired (their workers let them
        go at the commit): a Child SA's key never comes back, so its file only piles up."""
        from . import state

        names = {c.name for c in self.cfg.connections} | {c.name for c in new.connections}
        keep = {state.state_path(new.daemon.state_dir, sa) for sa in new.sas}
        gone = 0
        for sa in self.cfg.sas:
            if (sa not in new.sas and sa not in self.base.sas
                    and childsas.is_negotiated(sa.name, names)
                    and state.state_path(new.daemon.state_dir, sa) not in keep):
                try:
                    gone += state.remove(new.daemon.state_dir, sa)
                except OSError as err:
                    log.warning("SA %s: cannot remove its state file: %s", sa.name, err)
        if gone:
            log.debug("removed %d state file(s) of retired negotiated SAs", gone)

    def _refuse(self, what: str, problems: list[str], doing: str = "reload") -> dict[str, Any]:
        log.error("%s refused, the running configuration stays: %s", doing, "; ".join(problems))
        return {"error": f"{what}; the running configuration stays", "problems": problems,
                "changed": False}

    def _ask(self, slots: list[Slot], message: Any, want: str,
             timeout: float = READY_TIMEOUT) -> dict[int, tuple[bool, str]]:
        """Send each worker ``message(slot)`` and wait for its answer ``(want, text)`` or
        ``("reload_failed", why)``; other messages are handled as usual meanwhile. By queue:
        (done, text)."""
        out: dict[int, tuple[bool, str]] = {}
        for slot in slots:
            if slot.conn is None:
                out[slot.queue] = (False, "no pipe to the worker")
                continue
            try:
                slot.conn.send(message(slot))
            except OSError as err:
                out[slot.queue] = (False, f"cannot reach the worker: {err}")
        deadline = time.monotonic() + timeout
        for slot in slots:
            while slot.queue not in out:
                left = deadline - time.monotonic()
                try:
                    if slot.conn is None or left <= 0 or not slot.conn.poll(left):
                        out[slot.queue] = (False, "no answer")
                        break
                    msg = slot.conn.recv()
                except (EOFError, OSError):
                    out[slot.queue] = (False, "the worker died")
                    break
                kind = msg[0] if isinstance(msg, tuple) and msg else None
                if kind == want:
                    slot.last_heard = time.monotonic()
                    out[slot.queue] = (True, str(msg[1]) if len(msg) > 1 else "")
                elif kind == "reload_failed":
                    out[slot.queue] = (False, str(msg[1]))
                else:
                    self._on_message(slot, msg)
        return out

    def _start_added(self, added: list[Slot]) -> list[str]:
        """Start the workers of new queues and wait until they listen; the problems."""
        for slot in added:
            self._start(slot)
        deadline = time.monotonic() + READY_TIMEOUT
        while any(s.state != "ready" for s in added) and time.monotonic() < deadline:
            for slot in added:
                if slot.conn is not None and slot.state != "ready":
                    try:
                        if slot.conn.poll(0.05):
                            self._on_message(slot, slot.conn.recv())
                    except (EOFError, OSError):
                        slot.state = "down"
            if any(s.proc is not None and s.proc.exitcode is not None for s in added):
                break
        return [f"new queue {s.queue}: worker not ready ({s.last_error or s.state})"
                for s in added if s.state != "ready"]

    def _undo_reload(self, reloaded: list[Slot], added: list[Slot]) -> None:
        self._ask(reloaded, lambda s: ("rollback",), "rolled_back")
        self._stop_slots(added)

    def _stop_slots(self, slots: list[Slot]) -> None:
        """Stop these workers (queues leaving with a reload, or new ones it took back)."""
        keep, self.slots = self.slots, slots
        try:
            self._stop_workers()
        finally:
            self.slots = keep

    def _ask_stats(self, slot: Slot) -> None:
        if slot.state == "ready" and slot.conn is not None:
            try:
                slot.conn.send(("stats",))
                self._stats_asked.append(slot)
            except OSError:
                pass

    def _ask_agent_stats(self) -> None:
        agent = self.agent
        self._agent_asked = False
        if agent is None:
            return
        agent.stats = None
        if agent.state == "ready" and agent.conn is not None:
            try:
                agent.conn.send(("stats",))
                self._agent_asked = True
            except OSError:
                pass

    def _ike_report(self) -> IkeReport | None:
        agent = self.agent
        if agent is None:
            return None
        running = agent.state in ("starting", "ready")
        return {"state": agent.state, "pid": agent.pid if running else None,
                "restarts": agent.restarts, "last_error": agent.last_error,
                "key_log": agent.spec.key_log, "connections": agent.stats}

    def _answer_status(self) -> None:
        """Give the waiting status requests their answer once every worker asked has sent its
        counters (or died), or at the deadline: one slow worker must not make the others look
        unresponsive, nor hold the answer longer than ``STATS_TIMEOUT``."""
        if not self._status_waiters:
            return
        waiting: list[object] = [s for s in self._stats_asked if s.stats is None and s.conn is not None]
        agent = self.agent
        if (self._agent_asked and agent is not None and agent.stats is None
                and agent.conn is not None):
            waiting.append(agent)
        if ((waiting or not self.counters.done(self._counters_wanted))
                and time.monotonic() < self._stats_deadline):
            return
        answer = self.status()
        for waiter in self._status_waiters:
            waiter.response = answer
        self._status_waiters = []
        self._stats_asked = []
        self._agent_asked = False

    def _kernel_drops(self, now: float) -> tuple[dict[str, int] | None, float | None, list[str]]:
        """What our own DROP rules dropped (cleartext where ESP is required, no policy...), as
        last read by ``RuleCounters``; how many seconds ago that read started; and a warning
        if the read this answer asked for did not end in time or failed."""
        if not self.rules_installed:
            return None, None, []
        c = self.counters
        age = now - c.read_at if c.read_at is not None else None
        fresh = c.done(self._counters_wanted)
        value = c.value if age is not None and age <= COUNTERS_MAX_AGE else None
        shown = (f"kernel_drops are from a read {age:.1f} s ago" if value is not None
                 else "kernel_drops are not shown")
        if not fresh:
            return value, age, [f"the rule counters were not read within {STATS_TIMEOUT:g} s; "
                                f"{shown}"]
        if c.error is not None:
            return value, age, [f"cannot read the rule counters ({c.error}); {shown}"]
        return value, age, []

    def status(self) -> StatusReport:
        """The status answer from the counters the workers last sent (``slot.stats``)."""
        now = time.monotonic()
        taken = round(time.time(), 3)  # to the millisecond, as taken_at says it
        kernel = kernel_queue_stats()
        workers: list[WorkerReport] = []
        sas: list[SaReport] = []
        for slot in self.slots:
            st = slot.stats
            use = self.meter.read(slot.pid if slot.state in ("starting", "ready") else None)
            # packets and drops since the daemon started: this worker's plus its predecessors'
            total = counts.add(slot.carried, counts.of_snapshot(st)) if st else None
            k = kernel.get(slot.queue)
            running = slot.state in ("starting", "ready")
            workers.append({
                "queue": slot.queue,
                "cpu": slot.qc.cpu,
                "pid": slot.pid if running else None,
                "uptime": round(now - slot.started_at, 3) if running else None,
                "restarts": slot.restarts,
                "state": slot.state if st is not None or slot.state != "ready" else "unresponsive",
                "packets_in": total["packets_in"] if total else None,
                "packets_out": total["packets_out"] if total else None,
                "drops": total["drops"] if total else None,
                "kernel_queue_dropped": k.queue_dropped if k else None,
                "user_dropped": k.user_dropped if k else None,
                "last_error": slot.last_error,
                "last_exit": slot.last_exit,
                "last_signal": slot.last_signal,
                "last_syscall": slot.last_syscall,
                "last_outage": round(slot.last_outage, 3) if slot.last_outage is not None else None,
                "core": st.get("core") if st else None,
                "ike_markers": st.get("ike_markers") if st else None,
                "crossed_family": st.get("crossed_family") if st else None,
                "superpackets": st.get("superpackets") if st else None,
                "segments": st.get("segments") if st else None,
                "busy_poll_hits": st.get("busy_poll_hits") if st else None,
                "busy_poll_misses": st.get("busy_poll_misses") if st else None,
                "cpu_seconds": use.cpu_seconds if use else None,
                "memory_bytes": use.memory_bytes if use else None,
                "versions": st.get("versions") if st else None,
                "compartment": self.cfg.compartment_of_queue(slot.queue).name,
                "offload": st.get("offload") if st else None,
            })
            by_name = {s["name"]: s for s in st["sas"]} if st else {}
            sa_totals = total["sas"] if total else {}
            for params in slot.spec.sas:
                s = by_name.get(params.name)
                # packets, bytes and drops across restarts (the worker's own if it has no total)
                c: SaCounts | None = None if s is None else sa_totals.get(params.name, s)
                drops = c["drops"] if c else {}
                udp = s.get("udp") if s else None
                age = slot.activity.age(params.name, now)
                sas.append({
                    "name": params.name,
                    "spi": f"0x{params.spi:08x}",
                    "direction": params.direction.value,
                    "queue": slot.queue,
                    "packets": c["packets"] if c else None,
                    "bytes": c["bytes"] if c else None,
                    "replay_drops": drops.get("replay", 0) if s else None,
                    "integrity_drops": drops.get("integrity", 0) if s else None,
                    "other_drops": (sum(v for k2, v in drops.items() if k2 not in ("replay", "integrity"))
                                    if s else None),
                    "seq": s["seq"] if s else None,
                    "lifetime_left": s["lifetime_left"] if s else None,
                    "saved": s.get("saved") if s else None,
                    "path_mtu": s.get("path_mtu") if s else None,
                    "encapsulation": params.encapsulation.value,
                    "udp_peer": udp["peer"] if udp else None,
                    "keepalives_sent": udp["keepalives_sent"] if udp else None,
                    "peer_changes": udp["peer_changes"] if udp else None,
                    "last_packet_age": round(age, 3) if age is not None else None,
                    "engine": s.get("engine") if s else None,
                })
        sas.sort(key=lambda s: (s["queue"], s["direction"] != SADirection.OUT.value, s["name"]))
        kdrops, kage, kwarn = self._kernel_drops(now)
        me = self.meter.read(os.getpid())
        self.meter.forget_others({os.getpid(), *(s.pid for s in self.slots if s.pid is not None)})
        daemon: DaemonReport = {
            "pid": os.getpid(),
            "uptime": round(now - self.started, 3),
            "config": self.config_path,
            "state": self.state,
            "rules_installed": self.rules_installed,
            "ipv6": rules.ipv6_summary(self.cfg),
            "version": __version__,
            "core": corebuild.running().detail,
            "control_errors": self.control.errors,
            "control_clients": self.control.clients,
            "cpu_seconds": me.cpu_seconds if me else None,
            "memory_bytes": me.memory_bytes if me else None,
        }
        ike = self._ike_report()
        return {
            "taken_at": datetime.fromtimestamp(taken, UTC).isoformat(timespec="milliseconds"),
            "taken_at_epoch": taken,
            "kernel_drops": kdrops,
            "kernel_drops_age": round(kage, 3) if kdrops is not None and kage is not None else None,
            "warnings": warnings(workers) + kwarn + ike_warnings(ike),
            "daemon": daemon,
            "workers": workers,
            "compartments": compartment_reports(self.cfg, workers),
            "sas": sas,
            "ike": ike,
            "engines": self.engines_report(),
        }


def compartment_reports(cfg: Config, workers: list[WorkerReport]) -> list[CompartmentReport]:
    """Each compartment's workers, packets and drops: its workers' added up."""
    out: list[CompartmentReport] = []
    for comp in cfg.all_compartments:
        mine = [w for w in workers if w["compartment"] == comp.name]
        answered = [w for w in mine if w["packets_in"] is not None]
        drops: dict[str, int] = {}
        for w in answered:
            for reason, n in (w["drops"] or {}).items():
                drops[reason] = drops.get(reason, 0) + n
        out.append({
            "name": comp.name, "id": comp.id, "selector": comp.selector_text(),
            "user": comp.user, "workers": len(mine),
            "workers_ready": sum(w["state"] == "ready" for w in mine),
            "restarts": sum(w["restarts"] for w in mine),
            "packets_in": sum(w["packets_in"] or 0 for w in answered) if answered else None,
            "packets_out": sum(w["packets_out"] or 0 for w in answered) if answered else None,
            "drops": drops if answered else None,
        })
    return out


def _end(proc: BaseProcess) -> None:
    """A process that did not stop when asked: SIGTERM, then SIGKILL, 2 s for each."""
    proc.terminate()
    proc.join(2.0)
    if proc.exitcode is None:
        proc.kill()
        proc.join(2.0)


def worker_identity(cfg: Config, user: str | None = None) -> Identity | None:
    """The user the workers run as (``user``, else ``daemon.worker_user``); None with
    ``daemon.sandbox`` off (they run as root). Raises SandboxError if the user is missing,
    naming the fix."""
    if cfg.daemon.sandbox == "off":
        return None
    return sandbox.lookup(user or cfg.daemon.worker_user)


def worker_identities(cfg: Config) -> dict[str, Identity | None]:
    """Each compartment's workers' user, by compartment name: its own ``user``, else
    ``daemon.worker_user``. Raises SandboxError."""
    out: dict[str, Identity | None] = {}
    for comp in cfg.all_compartments:
        try:
            out[comp.name] = worker_identity(cfg, comp.user)
        except sandbox.SandboxError as err:
            if comp.user is None:
                raise
            raise sandbox.SandboxError(f"compartment {comp.name!r}, user {comp.user!r}: {err}") from None
    return out


def by_owner(owners: dict[int, int | None]) -> dict[int | None, set[int]]:
    """The queues of each owner (one state check each)."""
    out: dict[int | None, set[int]] = {}
    for q, owner in owners.items():
        out.setdefault(owner, set()).add(q)
    return out


def queue_owners(cfg: Config, identities: dict[str, Identity | None]) -> dict[int, int | None]:
    """The uid each queue's state directory belongs to (None: the supervisor's own)."""
    out: dict[int, int | None] = {}
    for comp in cfg.all_compartments:
        who = identities.get(comp.name)
        for q in comp.queues:
            out[q] = who.uid if who is not None else None
    return out


def worker_spec(cfg: Config, qc: QueueConfig, identity: Identity | None = None,
                engines: tuple[Discovered, ...] = (),
                disabled: tuple[str, ...] | None = None) -> WorkerSpec:
    """What the worker of queue ``qc`` gets: its compartment's SPD and mark (the daemon's with
    the compartment's bits), and its own SAs only; with ``identity``, the sandbox
    (``daemon.sandbox``) and the user to run as; the supervisor's discovery of the crypto
    engines and the engines disabled now."""
    crypto = cfg.crypto if disabled is None else dataclasses.replace(cfg.crypto, disabled=disabled)
    comp = cfg.compartment_of_queue(qc.num)
    return WorkerSpec(
        sandbox=cfg.daemon.sandbox if identity is not None else "off",
        worker_user=identity, compartment=comp.name,
        queue=qc.num, cpu=qc.cpu, mark=cfg.daemon.mark | comp.mark,
        policies=cfg.policies_of(comp),
        sas=cfg.sas_for_queue(qc.num), log_level=cfg.daemon.log_level,
        state_dir=cfg.daemon.state_dir, mtu=cfg.node.mtu,
        ipv6_link=cfg.node.ipv6_neighbour_discovery,
        gateway_interface=cfg.node.interface if cfg.node.role == "gateway" else None,
        busy_poll=cfg.daemon.busy_poll / 1e6,
        drop_log=cfg.daemon.drop_log,
        gso=cfg.daemon.gso,
        crypto=crypto,
        engines=engines,
        versions=cfg.daemon.versions,
        compare=cfg.daemon.compare,
        compare_fallback=cfg.daemon.compare_fallback,
        traps=tuple((c.policy, c.name) for c in cfg.connections
                    if c.start_action == "trap" and c.policy),
    )


def _worker_of(cfg: Config, queue: int) -> tuple[str, int, str | None]:
    """What a queue's running worker can't change: its compartment, id (mark) and user."""
    comp = cfg.compartment_of_queue(queue)
    return comp.name, comp.id, comp.user


_RESTART_ONLY = ("control_socket", "state_dir", "chain_prefix", "mark", "iptables", "log_level",
                 "busy_poll", "metrics", "gso", "drop_log", "sandbox", "worker_user", "versions",
                 "compare", "compare_fallback", "key_log")


def reload_problems(old: Config, new: Config) -> list[str]:
    """What a reload can't change in a running daemon (each needs a restart)."""
    out = [f"daemon.{name}: a change needs a restart" for name in _RESTART_ONLY
           if getattr(old.daemon, name) != getattr(new.daemon, name)]
    out += [f"node.{name}: a change needs a restart (the workers tell inbound from forwarded "
            "traffic by it)" for name in ("role", "interface")
            if getattr(old.node, name) != getattr(new.node, name)]
    out += [f"queue {q}: moves from compartment {old.compartment_of_queue(q).name!r} to "
            f"{new.compartment_of_queue(q).name!r} (or its id or user changes): a change needs "
            "a restart (its worker's mark and user are its own)"
            for q in sorted(set(old.queue_numbers) & set(new.queue_numbers))
            if _worker_of(old, q) != _worker_of(new, q)]
    old_cpu = {q.num: q.cpu for q in old.daemon.queues}
    out += [f"daemon.cpus: queue {q.num} moves from CPU {old_cpu[q.num]} to {q.cpu}: a change "
            "needs a restart" for q in new.daemon.queues if q.num in old_cpu and old_cpu[q.num] != q.cpu]
    before = {(sa.key, sa.integrity_key): sa for sa in old.sas}
    for sa in new.sas:
        was = before.get((sa.key, sa.integrity_key))
        if was is None or was == sa:
            continue
        what = (f"moves from queue {was.queue} to {sa.queue}" if was.queue != sa.queue
                else "changes its settings")
        out.append(f"SA {sa.name!r} {what} under the same key: its sequence numbers and state "
                   "belong to the running SA; restart, or give it a new key (and SPI)")
    if old.crypto != new.crypto:
        out.append("crypto: a change needs a restart (engine disable|enable work at runtime)")
    return out


def warnings(workers: list[WorkerReport]) -> list[str]:
    """One line per thing an operator should look at, from the worker entries of a status."""
    out = []
    for w in workers:
        q = w["queue"]
        if w["state"] in ("down", "starting", "stopped"):
            out.append(f"queue {q}: worker {w['state']}; its traffic is dropped until it is ready")
        elif w["state"] == "unresponsive":
            out.append(f"queue {q}: worker did not answer within {STATS_TIMEOUT:g} s (busy or stuck)")
        drops = w.get("drops") or {}
        if drops.get("internal"):
            out.append(f"queue {q}: {drops['internal']} packet(s) dropped after an internal error "
                       "(an unexpected exception; the log has the traceback)")
        if drops.get("state_unavailable"):
            out.append(f"queue {q}: {drops['state_unavailable']} packet(s) dropped because SA state "
                       f"could not be saved (state_dir full or read-only?)")
        versions = w.get("versions")
        for v in versions["versions"] if versions else []:
            if not v["in_service"] and versions:
                out.append(f"queue {q}: ESP version {v['name']} out of service ({v['out_reason']})"
                           f"; {_versions_left(versions)} until the worker restarts")
        kq, ku = w.get("kernel_queue_dropped") or 0, w.get("user_dropped") or 0
        if kq or ku:
            out.append(f"queue {q}: the kernel dropped {kq} packet(s) with the queue full and {ku} "
                       "with the socket buffer full: the worker can't keep up")
    return out


def _versions_left(versions: VersionsSnapshot) -> str:
    """What a worker's traffic does with some of its ESP versions out (nfq_ipsec.versions)."""
    states = versions["versions"]
    left = [v["name"] for v in states if v["in_service"]]
    if not states[0]["in_service"] or (len(left) == 1 and versions["compare"] in ("all", "majority")
                                       and not versions["fallback"]):
        return "its SAs' traffic is dropped"
    if len(left) == 1:
        return "the core carries on"
    return f"{' and '.join(left)} carry on"


def ike_warnings(ike: IkeReport | None) -> list[str]:
    """The agent down, and each connection without a Child SA (its traffic is dropped)."""
    if ike is None:
        return []
    out = []
    if ike["key_log"]:
        out.append(f"KEY LOG ON: every IKE and ESP key is written to {ike['key_log']} "
                   "(daemon.key_log): whoever reads it can decrypt the traffic")
    if ike["state"] != "ready":
        return [*out, f"keying agent {ike['state']}: no connection carries traffic until it is "
                "ready" + (f" ({ike['last_error']})" if ike["last_error"] else "")]
    for conn in ike["connections"] or []:
        if not any(sa["children"] for sa in conn["ike_sas"]):
            out.append(f"connection {conn['name']}: no Child SA up; its policy's traffic is "
                       "dropped" + (f" (last: {conn['last']})" if conn["last"] else ""))
    return out


def discover_engines(cfg: Config) -> Team:
    """The crypto engines: probed, verified by their known-answer tests, measured (a few
    milliseconds per suite). Once, at start; the workers get the result in their spec."""
    team = Team(settings=cfg.crypto)
    team.discover()
    return team


def engine_preflight(cfg: Config) -> tuple[Team, int | None]:
    """Discovery, and an exit code if an SA of the configuration has no verified, enabled
    engine (fail closed: nothing started, nothing installed)."""
    team = discover_engines(cfg)
    problems = team.problems(cfg.sas)
    for line in problems:
        log.error("crypto engines: %s", line)
    if problems:
        log.error("nothing started, nothing installed: enable an engine that offers the suite "
                  "([crypto] disabled) or see nfq-ipsec engines")
        return team, exitcodes.CONFIG
    return team, None


def preflight(cfg: Config) -> int | None:
    """Checks before anything starts; an exit code if one fails (nothing changed), else None."""
    from . import iptables, state

    try:
        clashes = iptables.preflight(cfg)
    except iptables.RulesError as err:
        log.error("%s", err)
        log.error("nothing started, nothing installed")
        return exitcodes.FAILURE
    if clashes:
        for line in clashes:
            log.error("%s", line)
        log.error("nothing started, nothing installed: choose other daemon.queues or remove "
                  "those rules")
        return exitcodes.CONFIG
    try:
        owners = queue_owners(cfg, worker_identities(cfg))
    except sandbox.SandboxError as err:
        log.error("%s", err)
        log.error("nothing started, nothing installed")
        return exitcodes.CONFIG
    try:  # each queue's directory, its user's, with its SAs' files (moved in if elsewhere)
        for qc in cfg.daemon.queues:
            state.prepare_worker_dir(cfg.daemon.state_dir, qc.num, cfg.sas_for_queue(qc.num),
                                     owners[qc.num])
    except state.StateError as err:
        problems = [str(err)]
    else:
        problems = [p for owner, queues in by_owner(owners).items() for p in state.check(
            cfg.daemon.state_dir, [sa for sa in cfg.sas if sa.queue in queues], owner)]
        names = [c.name for c in cfg.connections]
        if names:  # what a previous run's negotiated SAs left: their keys never come back
            gone = state.prune_negotiated(
                cfg.daemon.state_dir, cfg.queue_numbers,
                lambda n: childsas.is_negotiated(n, names),
                [state.state_path(cfg.daemon.state_dir, sa) for sa in cfg.sas])
            if gone:
                log.info("removed %d state file(s) negotiated SAs of a previous run left", gone)
    if problems:
        for line in problems:
            log.error("SA state: %s", line)
        log.error("nothing started, nothing installed. A corrupt state file means the SA's "
                  "sequence numbers are unknown: give the SA a new key (a new key starts fresh), "
                  "or set its state with `nfq-ipsec state reset --config %s --sa NAME --seq N` "
                  "(see `nfq-ipsec state reset --help`)", cfg.path)
        return exitcodes.STATE
    return None

"""A worker: one process per NFQUEUE queue, pinned to one CPU, holding only its own SAs.

The supervisor starts it with the ``spawn`` multiprocessing context (a fresh interpreter, not a
fork of the supervisor), so the only key material in a worker is what its :class:`WorkerSpec`
carries: the SAs of its own queue. The worker pins itself, builds its :class:`Processor`, binds
its queue, says ``("ready", pid, queue)`` on its pipe and then serves packets and the pipe.

Pipe protocol (pickled tuples over a ``multiprocessing.Pipe``):

- supervisor -> worker: ``("stats",)``, ``("ping",)`` (the watchdog), ``("stop",)``, and for a
  reload ``("reload", WorkerSpec)``, ``("commit",)``, ``("rollback",)`` (answered by
  ``("reloaded", summary)``, ``("committed", "")``, ``("rolled_back", "")`` or
  ``("reload_failed", why)``), ``("engine", "disable"|"enable", name)`` (answered by
  ``("engine", json)``: the SAs that moved, or an error)
- worker -> supervisor: ``("ready", pid, queue)``, ``("error", text)`` (then it exits 1),
  ``("stats", snapshot)`` (:class:`nfq_ipsec.status.WorkerSnapshot`, for a status answer),
  ``("pong", counts)`` (:class:`nfq_ipsec.status.Counts`, :mod:`nfq_ipsec.counts`: what the
  supervisor carries over to the next worker if this one dies; the worker's own counters only,
  read without a system call, so a ping costs the packets next in line next to nothing)

Mixed tunnels (4-in-6, 6-in-4): a verdict cannot change a packet's family (the kernel would
reinject the new bytes into the hook of the family the packet was queued in), so a result of
the other family (an IPv4 packet's ESP in IPv6, or the IPv4 packet an IPv6 ESP packet
carried) leaves through a raw socket of its own family with the daemon's mark, and the queued
original is dropped by verdict (counted as ``crossed_family``; a send the kernel refuses is
dropped and counted as ``family_send``).

Fail closed: an exception while handling a packet drops that packet and counts reason INTERNAL;
a packet the kernel delivered incomplete is dropped as TRUNCATED; a worker that dies leaves its
queue without a listener, and the kernel then drops that queue's packets.

SA state: with ``WorkerSpec.state_dir`` set, the worker locks, restores and persists its SAs'
state (outbound sequence reservations, inbound replay floors) through :mod:`nfq_ipsec.state`
before it binds its queue; a corrupt state file, one its SA's key did not authenticate or one
not owned by the daemon's user stops it with an error (fail closed). On a clean stop it stores
the exact values. It turns core dumps off before anything else (it holds keys).

Sandbox (``daemon.sandbox``, :mod:`nfq_ipsec.sandbox`): as root the worker opens its state
directory (``state_dir/q<queue>``, its user's), binds its queue, opens every raw socket it may
send through, the kernel's queue counters and a socket for interface names, and imports every
crypto engine its SAs may use (:func:`preload`); then it becomes ``daemon.worker_user`` with
``CAP_NET_ADMIN`` only, attaches its state store as that user and installs the seccomp filter.
Nothing may be imported or opened lazily on the packet path after that: an ``import`` of a
module not loaded yet fails, and a new socket kills the worker (SIGSYS).

Crypto engines (:mod:`nfq_ipsec.engines`, docs/engines.md): importing this module imports
every engine module and its library (OpenSSL, libsodium, pycryptodome) and reads the
known-answer vectors, so nothing is loaded lazily later: a worker may run where opening files
after start-up is forbidden (the sandbox). The worker verifies its engines before it binds its queue (the
supervisor's discovery in its spec), binds each SA to one (an SA none can carry stops it),
looks at the engines' alarms after each batch (a suite that raised: its engine is excluded and
its SAs move) and runs the known-answer tests again every ``crypto.verify_interval``. AF_ALG
sockets are opened when an SA is bound (at start, on a reload or when it moves), not per packet.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, cast

from . import acquire, corebuild, hardening, journal, sandbox, state, versions
from .config.fields import DEFAULT_LOG_LEVEL
from .core import SPD, DropReason, Policy, Processor, Result, SAParams, SecurityAssociation, Verdict
from .core.ipv6 import IPV6_HEADER
from .core.packet import ip_to_str
from .core.processor import ARRIVING, FORWARDED, LEAVING
from .core.sa import SAEvent
from .droplog import LOGGED, DropLog
from .engines.base import DEFAULT_CRYPTO, CryptoSettings
from .engines.offload import Job, OffloadPool, Recorder
from .engines.team import Discovered, Team
from .nfqueue import (
    DEFAULT_MAX_LEN,
    HOOK_PRE_ROUTING,
    MAX_VERDICT_PAYLOAD,
    NFQA_SKB_CSUMNOTREADY,
    NFQA_SKB_GSO,
    PROC_QUEUES,
    NetlinkQueue,
    QueueBinding,
    QueuedPacket,
    kernel_queue_stats,
)
from .rawsend import BatchSender
from .sandbox import Identity
from .state import StateStore
from .status import (
    Counts,
    DropCounts,
    KernelQueueCounts,
    LifetimeLeft,
    OffloadReport,
    SaSnapshot,
    UdpSnapshot,
    WorkerSnapshot,
)

BATCH = 64  # packets read per receive call
BATCHES_PER_WAKEUP = 16  # then look at the pipe again, so stats and stop stay responsive
# The most packets a busy worker handles between two looks at its pipe: how long it takes to
# answer a ping (the supervisor's watchdog counts on it, see supervisor.BUSY_ANSWER_BOUND).
PACKETS_BETWEEN_LOOKS = BATCH * BATCHES_PER_WAKEUP
EVENT_INTERVAL = 0.25  # seconds between checks for SA events (expiry) to report
ERROR_LOG_INTERVAL = 10.0  # at most one log line per this many seconds about internal errors
# Drops that, during a reload, mean "the old rules sent this for the old configuration": the
# old processor handles them until the new rules are in place.
_HANDED_BACK = frozenset((DropReason.UNKNOWN_SPI, DropReason.NO_SA))
# A GSO queue's packets the core must see as such: a superpacket, or a checksum not ready.
_OFFLOADED = NFQA_SKB_GSO | NFQA_SKB_CSUMNOTREADY

log = logging.getLogger("nfq_ipsec.worker")


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker gets from the supervisor. ``sas`` are this queue's SAs only."""

    queue: int
    cpu: int | None
    mark: int
    policies: tuple[Policy, ...]
    sas: tuple[SAParams, ...]
    log_level: str = DEFAULT_LOG_LEVEL
    max_len: int = DEFAULT_MAX_LEN
    state_dir: str | None = None  # None: nothing persisted (tests of the packet path only)
    mtu: int = 1500  # node.mtu: the first path MTU of every outbound SA
    ipv6_link: bool = True  # node.ipv6_neighbour_discovery: ND and MLD pass in clear
    # A gateway's unprotected interface: what arrives in PREROUTING on it is inbound, what
    # arrives on any other interface is forwarded outbound. None (a host): all of it inbound.
    gateway_interface: str | None = None
    drop_log: bool = False  # daemon.drop_log: the rate-limited drop log
    busy_poll: float = 0.0  # daemon.busy_poll in seconds: how long to poll after a batch; 0: off
    gso: bool = False  # daemon.gso: the queue hands over TCP superpackets whole
    crypto: CryptoSettings = DEFAULT_CRYPTO  # [crypto], disabled as the daemon has it now
    # the supervisor's discovery of the engines (claims, speeds); () makes the worker discover
    engines: tuple[Discovered, ...] = ()
    versions: tuple[str, ...] = ("core",)  # daemon.versions (nfq_ipsec.versions)
    compare: str = "off"  # daemon.compare: "off", "all" or "sample:N"
    compare_fallback: bool = False  # daemon.compare_fallback
    sandbox: str = "off"  # daemon.sandbox: "enforce", "log" or "off" (the supervisor's choice)
    worker_user: Identity | None = None  # daemon.worker_user, looked up by the supervisor
    compartment: str = "default"  # the compartment whose queue, policies and SAs these are
    # (policy, connection) of each trap connection's policy (start_action = "trap"): a packet
    # of it with no SA is dropped as acquire and the agent asked for one (acquire.py)
    traps: tuple[tuple[str, str], ...] = ()

    @property
    def sandboxed(self) -> bool:
        return self.sandbox != "off" and self.worker_user is not None

    def spd(self) -> SPD:
        return SPD(list(self.policies))


class PacketHandler:
    """The per-packet part of a worker, free of processes and pipes (tests drive it directly
    with a fake queue).

    Direction: a packet queued at OUTPUT is outbound. One queued at PREROUTING is inbound if it
    arrived on the unprotected side: on a host every interface, on a gateway its unprotected
    interface (``gateway_interface``); any other (a gateway's LAN) is forwarded outbound, ESP
    from a LAN host included (it goes through the outbound SPD like any other packet).

    ``reply``: sends what the core asks to send back (ICMP "fragmentation needed"); None opens
    a raw socket the first time. ``keepalive``: sends the core's NAT-keepalives (RFC 3948),
    with the mark so that our rules let them out; None opens a marked raw socket the first time.
    ``cross``: sends a result whose IP family is not the queued packet's (a mixed tunnel), with
    the mark; None opens marked raw sockets (header included) the first time.
    ``send``: sends whole packets the core made in place of a queued one (the fragments of a
    local IPv6 ESP packet), with the mark; None opens a marked raw socket the first time.
    ``batch``: sends the ESP packets of one superpacket (``daemon.gso``) together and says how
    many left; None opens a :class:`~nfq_ipsec.rawsend.BatchSender` the first time.

    A GSO queue's packet (``daemon.gso``) leaving whose ``skb_info`` says superpacket or
    checksum not ready goes to ``Processor.process_offloaded``; a superpacket's ESP packets
    leave in one batch and the superpacket is dropped by verdict; if the kernel refuses any of
    them the rest are not sent and the superpacket counts as ``gso_send``.
    """

    def __init__(
        self, processor: Processor, queue: QueueBinding, mark: int,
        clock: Callable[[], float] = time.monotonic,
        gateway_interface: str | None = None,
        reply: Callable[[bytes], None] | None = None,
        ifname: Callable[[int], str] = socket.if_indextoname,
        keepalive: Callable[[bytes], None] | None = None,
        cross: Callable[[bytes], None] | None = None,
        send: Callable[[bytes], None] | None = None,
        batch: Callable[[list[bytes]], int] | None = None,
        drop_log: bool = False,
    ) -> None:
        self.processor = processor
        processor.frag_ident = int.from_bytes(os.urandom(4), "big")  # RFC 7739
        self.queue = queue
        self.mark = mark
        self.clock = clock
        self.gateway_interface = gateway_interface
        self._unprotected: dict[int, bool] = {}  # ifindex -> is the gateway's unprotected side
        self._ifname = ifname
        self._reply = reply
        self.replies_sent = 0
        self.reply_errors = 0
        self._keepalive = keepalive
        self.keepalive_errors = 0
        self._cross = cross
        self.crossed_family = 0  # results sent through the other family's raw socket
        self._send = send
        self.send_errors = 0
        self._batch = batch
        self.superpackets_sent = 0  # superpackets whose ESP packets all left
        self.segments_sent = 0  # the ESP packets they left as
        self.store: StateStore | None = None
        self.previous: Processor | None = None  # during a reload, until its rules have moved
        self._added: list[SecurityAssociation] = []  # SAs the pending reload attached
        self.packets_in = 0
        self.packets_out = 0
        # daemon.drop_log: unknown_spi, integrity, replay, policy_mismatch with SPI and source
        self.drop_log = DropLog() if drop_log else None
        self.internal_errors = 0
        self._errors_unlogged = 0
        self._next_error_log = 0.0
        # the kernel's queue counters; None: read /proc each time (a sandboxed worker reads a
        # file it opened before)
        self.kernel_stats: Callable[[], dict[int, Any]] | None = None
        # The crypto engines the SAs are bound to (engines/team.py). ``alarms`` is the team's
        # list that an engine's suite appends to when it raises: looked at after each batch.
        self.team: Team | None = None
        self.alarms: list[str] = []
        # crypto.offload_helpers: the helpers that seal outbound packets (engines/offload.py)
        self.offload: OffloadPool | None = None
        # start_action = "trap": policy name -> connection; the connections to acquire for
        self.traps: dict[str, str] = {}
        self.acquires: list[str] = []
        self.acquire_limit = acquire.Limiter()

    def use_team(self, team: Team) -> None:
        """Bind every SA of the processor to an engine (raises NoEngine: the worker does not
        start) and watch the team's alarms from now on."""
        team.bind(self.processor.sad.all())
        self.team = team
        self.alarms = team.alarms

    def engine_alarms(self) -> None:
        """A suite raised in the last batch (its packet was dropped as engine_failed): its
        engine leaves the team and its SAs move to the next capable one."""
        if self.team is None:
            self.alarms.clear()
            return
        for sa_name, engine in self.team.on_alarms():
            log.warning("SA %s moved to engine %s", sa_name, engine)

    def engine_command(self, action: str, name: str) -> dict[str, Any]:
        """``engine disable|enable NAME`` from the supervisor: the SAs that moved."""
        if self.team is None:
            return {"error": "no engines in this worker"}
        try:
            moved = self.team.disable(name) if action == "disable" else self.team.enable(name)
        except KeyError:
            return {"error": f"unknown engine {name!r}"}
        for sa_name, engine in moved:
            log.info("SA %s moved to engine %s (%s %s)", sa_name, engine, action, name)
        return {"moved": [list(m) for m in moved]}

    def verify_engines(self) -> None:
        """The periodic known-answer tests (``crypto.verify_interval``), and with ``balance``
        an SA moved to even the engines' load."""
        if self.team is not None:
            self.team.verify()
            self.team.rebalance()

    def handle_batch(self, packets: list[QueuedPacket]) -> None:
        """Give every packet a verdict and send the verdicts.

        With offload on (``crypto.offload_helpers``) the outbound SAs' seals go to helpers
        while the batch is handled: the verdicts are recorded in order and given once the
        sealed bodies are back (``_give_recorded``), a packet whose body did not come back
        dropped as ``engine_failed``."""
        pool = self.offload
        if pool is None or not pool.active:
            self._handle(packets)
        else:
            real = self.queue
            rec = Recorder(pool, real)
            self.queue = rec
            pool.deferring = True
            try:
                self._handle(packets)
            finally:
                pool.deferring = False
                self._give_recorded(rec)
                self.queue = real
        self.queue.flush()
        if self.alarms:  # an engine raised: its SAs move before the next batch
            self.engine_alarms()

    def _give_recorded(self, rec: Recorder) -> None:
        """Wait for the helpers, put each sealed body in its packet, give the recorded
        verdicts in order; a packet whose body is missing is dropped (``engine_failed``)."""
        pool = rec.pool
        pool.collect()
        verdict = rec.real.verdict
        for packet_id, accept, mark, payload, jobs in rec.entries:
            if jobs and payload is not None:
                payload = pool.patch(payload, jobs)
                if payload is None:
                    verdict(packet_id, False)
                    self._offload_lost(jobs)
                    continue
            verdict(packet_id, accept, mark, payload)
        rec.entries = []
        pool.finish()

    def _offload_lost(self, jobs: list[Job]) -> None:
        self.packets_out -= 1
        self.processor.count_drop(DropReason.ENGINE_FAILED)
        jobs[0].suite.sa.drops[DropReason.ENGINE_FAILED] += 1

    def _settled(self, packets: list[bytes]) -> list[bytes] | None:
        """Before packets leave by a raw socket while offload defers: every verdict recorded
        so far given (order), and the sealed bodies put into ``packets``; None if one is
        missing (the caller drops the queued packet; counted ``engine_failed`` here)."""
        rec = self.queue
        if not isinstance(rec, Recorder):
            return packets
        jobs = rec.pool.take()
        self._give_recorded(rec)
        if not jobs:
            return packets
        got = rec.pool.patch_all(packets, jobs)
        if got is None:
            self.processor.count_drop(DropReason.ENGINE_FAILED)
            jobs[0].suite.sa.drops[DropReason.ENGINE_FAILED] += 1
        return got

    def _handle(self, packets: list[QueuedPacket]) -> None:
        now = self.clock()
        process = self.processor.process
        verdict = self.queue.verdict
        mark = self.mark
        accept = Verdict.ACCEPT
        replace = Verdict.REPLACE
        cross = Verdict.CROSS
        host = self.gateway_interface is None
        accepted = 0
        self.packets_in += len(packets)
        for pkt in packets:
            try:
                # Where the packet is, for the core: queued at OUTPUT it is leaving; at
                # PREROUTING arriving, unless a gateway got it on its protected side.
                if pkt.hook != HOOK_PRE_ROUTING:
                    where = LEAVING
                elif host or self._arrived_unprotected(pkt.indev):
                    where = ARRIVING
                else:
                    where = FORWARDED
                if pkt.skb_info & _OFFLOADED and where != ARRIVING:
                    res = self.processor.process_offloaded(pkt.payload, pkt.length, where, now,
                                                           bool(pkt.skb_info & NFQA_SKB_GSO))
                    if res.verdict is replace and pkt.skb_info & NFQA_SKB_GSO:
                        accepted += self._send_segments(pkt, res)
                        continue
                else:
                    res = process(pkt.payload, pkt.length, where, now)
                if res.verdict is accept:
                    verdict(pkt.packet_id, True, pkt.mark | mark, res.packet)
                    accepted += 1
                    if res.reply is not None:  # a forwarded IPv6 packet too big: passed, told
                        self.send_reply(res.reply)
                elif res.verdict is cross:
                    accepted += self._cross_family(pkt, res)
                elif res.verdict is replace:
                    accepted += self._replace(pkt, res)
                elif self.previous is not None and res.reason in _HANDED_BACK:
                    # not a drop of the new processor's after all: the old one decides, and
                    # counts it if it drops it
                    self.processor.drops[res.reason] -= 1
                    accepted += self._previous_verdict(pkt, where, now)
                elif res.reason is DropReason.NO_SA and res.detail in self.traps:
                    verdict(pkt.packet_id, False)
                    self._acquire(res, now)
                else:
                    verdict(pkt.packet_id, False)
                    if res.reply is not None:
                        self.send_reply(res.reply)
                    if self.drop_log is not None and res.reason in LOGGED:
                        self.drop_log.note(res.reason, pkt.payload, now)
            except Exception:  # fail closed: whatever went wrong, this packet is dropped
                self._internal_error(pkt)
        self.packets_out += accepted

    def _acquire(self, res: Result, now: float) -> None:
        """A trap connection's packet with no SA: counted ``acquire`` instead of ``no_sa``, and
        the agent asked for the SA (at most once per connection per ``acquire.INTERVAL``)."""
        self.processor.drops[DropReason.NO_SA] -= 1
        self.processor.count_drop(DropReason.ACQUIRE)
        name = self.traps[res.detail]
        if self.acquire_limit.due(name, now):
            self.acquires.append(name)

    def _arrived_unprotected(self, indev: int) -> bool:
        """Whether ifindex ``indev`` is the gateway's unprotected interface, looked up by name
        once per ifindex (an interface made again under the same name gets a new one)."""
        known = self._unprotected.get(indev)
        if known is None:
            try:
                known = self._ifname(indev) == self.gateway_interface
            except OSError:  # gone already, or no interface: treat it as arriving from outside
                known = True
            if len(self._unprotected) >= 1024:
                self._unprotected.clear()
            self._unprotected[indev] = known
        return known

    def _cross_family(self, pkt: QueuedPacket, res: Result) -> int:
        """A result of the other IP family (a mixed tunnel): ``res.packets`` (the packet, or
        the core's fragments of it) sent through a raw socket of their family with the mark,
        the queued original dropped. The rules let them out as they let out a reinjected
        packet (marked ESP of one of our outbound SAs), and an inner packet takes the host's
        routes from here (a gateway's LAN, or this host itself). Returns 1 if sent, 0 if the
        kernel refused (dropped, ``family_send``)."""
        if self._cross is None:
            self._cross = _raw_ip_sender(self.mark)
        if not self._send_instead(pkt, res.packets, self._cross):
            self.processor.count_drop(DropReason.FAMILY_SEND)
            return 0
        self.crossed_family += 1
        return 1

    def _replace(self, pkt: QueuedPacket, res: Result) -> int:
        """Drop the queued packet and send ``res.packets`` in its place, with the mark (the
        fragments of a local IPv6 ESP packet too big for its path). Returns 1 if all left."""
        if self._send is None:
            self._send = _raw_ip_sender(self.mark)
        if not self._send_instead(pkt, res.packets, self._send):
            self.send_errors += 1
            return 0
        return 1

    def _send_segments(self, pkt: QueuedPacket, res: Result) -> int:
        """A superpacket's ESP packets sent in one batch, the superpacket dropped by verdict.
        Returns 1 if all left; otherwise the superpacket counts as ``gso_send`` (TCP sends
        what is missing again)."""
        got = self._settled(res.packets or [])
        self.queue.verdict(pkt.packet_id, False)
        if got is None:
            return 0
        packets = got
        if self._batch is None:
            self._batch = BatchSender(self.mark).send
        try:
            sent = self._batch(packets)
        except OSError:
            sent = -1
        if sent != len(packets):
            self.processor.count_drop(DropReason.GSO_SEND)
            if res.sa is not None:
                res.sa.drops[DropReason.GSO_SEND] += 1
            return 0
        self.superpackets_sent += 1
        self.segments_sent += len(packets)
        return 1

    def _send_instead(self, pkt: QueuedPacket, packets: list[bytes] | None,
                      send: Callable[[bytes], None]) -> bool:
        """The queued packet dropped by verdict, ``packets`` sent in its place: whether all
        left (a refused send stops the rest: fragments without the one before are useless).
        With offload on, a packet whose sealed body did not come back is not sent (counted
        ``engine_failed``, and as not sent by the caller)."""
        got = self._settled(packets or [])
        self.queue.verdict(pkt.packet_id, False)
        if got is None:
            return False
        try:
            for packet in got:
                send(packet)
        except OSError:
            return False
        return True

    def send_reply(self, packet: bytes) -> None:
        """Send an ICMP error the core built (its source address 0: the kernel fills it in)."""
        try:
            if self._reply is None:
                self._reply = _raw_sender()
            self._reply(packet)
            self.replies_sent += 1
        except OSError:
            self.reply_errors += 1

    def send_keepalives(self, now: float) -> None:
        """The NAT-keepalives of this worker's idle outbound SAs of ESP in UDP."""
        for packet in self.processor.keepalives(now):
            try:
                if self._keepalive is None:
                    self._keepalive = _raw_sender(self.mark)
                self._keepalive(packet)
            except OSError:
                self.keepalive_errors += 1

    def _previous_verdict(self, pkt: QueuedPacket, where: int, now: float) -> int:
        """During a reload, until the rules have moved: a packet the old rules sent here for an
        SA the new configuration retired (or holds on another queue) is handled as before.
        Returns 1 if it was accepted, 0 if dropped (counted, as on the main path)."""
        prev = self.previous
        assert prev is not None
        if pkt.skb_info & _OFFLOADED and where != ARRIVING:
            res = prev.process_offloaded(pkt.payload, pkt.length, where, now,
                                         bool(pkt.skb_info & NFQA_SKB_GSO))
            if res.verdict is Verdict.REPLACE and pkt.skb_info & NFQA_SKB_GSO:
                return self._send_segments(pkt, res)
        else:
            res = prev.process(pkt.payload, pkt.length, where, now)
        if res.verdict is Verdict.REPLACE:
            return self._replace(pkt, res)
        if res.verdict is Verdict.CROSS:
            return self._cross_family(pkt, res)
        if res.verdict is not Verdict.ACCEPT:
            self.queue.verdict(pkt.packet_id, False)  # counted by the processor
            return 0
        self.queue.verdict(pkt.packet_id, True, pkt.mark | self.mark, res.packet)
        return 1

    # -- reload: build the new processor first, commit once the rules have moved ------------
    def reload(self, spec: WorkerSpec, now: float) -> str:
        """Build the processor of a new configuration and use it from the next batch on. An SA
        whose parameters did not change is the same object in both, so its sequence numbers
        and replay window go on; a new or changed one is attached to the state store first.
        The old processor stays for packets the old rules still send (``previous``). Raises
        on any problem, with nothing changed."""
        if self.previous is not None:
            raise RuntimeError("a reload is already pending")
        old = self.processor
        kept = {sa.name: sa for sa in old.sad.all()}
        items: list[SAParams | SecurityAssociation] = []
        fresh: list[SAParams] = []
        for params in spec.sas:
            same = kept.get(params.name)
            if same is not None and same.params == params:
                items.append(same)
            else:
                items.append(params)
                fresh.append(params)
        new = Processor(spec.spd(), items, now, old.flow_cache_size, spec.mtu, old.max_packet,
                        spec.ipv6_link)
        new = versions.rebuilt(old, new, spec, now)
        added = [sa for sa in new.sad.all() if sa.params in fresh]
        if self.team is not None:
            self.team.bind(added)  # NoEngine: the reload is refused, nothing changed
        if self.store is not None:
            try:
                self.store.attach(added)
            except Exception:
                if self.team is not None:
                    self.team.release(added)
                raise
        new.drops = old.drops  # one set of counters across the reload
        new.frag_ident = old.frag_ident
        new.learn_mss = old.learn_mss
        new.peer_mss = old.peer_mss  # the flows go on
        self.previous, self.processor = old, new
        self._added = added
        self.traps = dict(spec.traps)
        retired = len(kept) - (len(items) - len(added))
        return (f"{len(items) - len(added)} SA(s) kept, {len(added)} new or changed, "
                f"{retired} retired")

    def commit_reload(self) -> None:
        """The rules have moved: let the retired SAs go (their exact state stored)."""
        prev, self.previous = self.previous, None
        if prev is not None:
            self._release_retired(prev)
        if prev is None or self.store is None:
            return
        current = {id(sa) for sa in self.processor.sad.all()}
        self.store.detach([sa for sa in prev.sad.all() if id(sa) not in current])
        self._added = []

    def _release_retired(self, prev: Processor) -> None:
        if self.team is not None:
            current = {id(sa) for sa in self.processor.sad.all()}
            self.team.release([sa for sa in prev.sad.all() if id(sa) not in current])

    def rollback_reload(self) -> None:
        """The reload failed elsewhere: back to the old processor, the new SAs let go."""
        prev, self.previous = self.previous, None
        if prev is None:
            return
        if self.store is not None:
            self.store.detach(self._added, exact=False)
        if self.team is not None:
            self.team.release(self._added)
        self.processor = prev
        self._added = []

    def _internal_error(self, pkt: QueuedPacket) -> None:
        self.internal_errors += 1
        self.processor.count_drop(DropReason.INTERNAL)
        # If even the drop verdict fails, the kernel drops the packet when the queue goes away.
        with contextlib.suppress(Exception):
            self.queue.verdict(pkt.packet_id, False)
        now = self.clock()
        if now >= self._next_error_log:
            more = f" ({self._errors_unlogged} more since the last report)" if self._errors_unlogged else ""
            log.error("internal error handling a packet, dropped it%s", more, exc_info=True,
                      extra=journal.fields(reason=DropReason.INTERNAL.value))
            self._errors_unlogged = 0
            self._next_error_log = now + ERROR_LOG_INTERVAL
        else:
            self._errors_unlogged += 1

    def report_events(self) -> None:
        """Log SA events (soft/hard expiry, sequence exhaustion, a peer followed) once each."""
        for ev in self.processor.drain_events():
            kind = ev.kind.value
            if ev.kind is SAEvent.PEER_CHANGED:  # NAT rebinding, followed: where to now
                sa = self.processor.sad.by_name(ev.sa_name)
                snap = _udp_snapshot(sa) if sa is not None else None
                log.info("SA %s (spi 0x%08x): peer changed, now %s", ev.sa_name, ev.spi,
                         snap["peer"] if snap is not None else "?",
                         extra=journal.fields(sa=ev.sa_name, spi=ev.spi, reason=kind))
                continue
            level = logging.INFO if kind == "soft_expired" else logging.WARNING
            log.log(level, "SA %s (spi 0x%08x): %s", ev.sa_name, ev.spi, kind.replace("_", " "),
                    extra=journal.fields(sa=ev.sa_name, spi=ev.spi, reason=kind))

    def counts(self) -> Counts:
        """Packets and drops since this worker started, in all and per SA: the answer to a
        watchdog ping, which the supervisor carries over to the queue's next worker if this
        one dies. Only the handler's and the SAs' own counters: no /proc read, no state store.
        What the kernel dropped before the worker saw it (``queue_overflow`` in the snapshot)
        is not in them; the supervisor reads that itself (``counts.with_kernel_losses``)."""
        proc = self.processor
        return {
            "packets_in": self.packets_in,
            "packets_out": self.packets_out,
            "drops": _by_reason(proc.drops),
            "sas": {sa.name: {"packets": sa.packets, "bytes": sa.bytes, "drops": _by_reason(sa.drops)}
                    for sa in proc.sad.all()},
        }

    def snapshot(self, queue_num: int, cpu: int | None, started: float,
                 polls: tuple[int, int] = (0, 0)) -> WorkerSnapshot:
        """Counters for the status command. Names, SPIs and numbers only, never keys.
        ``polls``: the adaptive polling's hits and misses (``BusyPoll``)."""
        now = self.clock()
        proc = self.processor
        drops = _by_reason(proc.drops)
        kstats = (self.kernel_stats or kernel_queue_stats)().get(queue_num)
        kernel: KernelQueueCounts | None = None
        if kstats is not None:
            kernel = {
                "queue_total": kstats.queue_total,
                "queue_dropped": kstats.queue_dropped,
                "user_dropped": kstats.user_dropped,
            }
            lost = kstats.queue_dropped + kstats.user_dropped
            if lost:
                drops[DropReason.QUEUE_OVERFLOW.value] = drops.get(DropReason.QUEUE_OVERFLOW.value, 0) + lost
        sas: list[SaSnapshot] = []
        for sa in proc.sad.all():
            saved = self.store.snapshot(sa) if self.store is not None else None
            sas.append({
                "name": sa.name,
                "spi": sa.spi,
                "direction": sa.params.direction.value,
                "packets": sa.packets,
                "bytes": sa.bytes,
                "drops": _by_reason(sa.drops),
                "seq": sa.next_seq - 1 if sa.outbound else sa.replay.top,
                # the core's plain dict: packets and bytes ints, seconds a float, or None each
                "lifetime_left": cast(LifetimeLeft, sa.lifetime_left(now)),
                "path_mtu": (sa.pmtu or None) if sa.outbound else None,
                "udp": _udp_snapshot(sa),
                "saved": saved["saved"] if saved is not None else None,
                "state_writes": saved["state_writes"] if saved is not None else None,
                "engine": self.team.engine_of(sa) if self.team is not None else None,
            })
        return {
            "queue": queue_num,
            "cpu": cpu,
            "pid": os.getpid(),
            "started": started,
            "packets_in": self.packets_in,
            "packets_out": self.packets_out,
            "drops": drops,
            "overflow_reports": getattr(self.queue, "overflows", 0),
            "ike_markers": proc.udp_markers,
            "crossed_family": self.crossed_family,
            "superpackets": self.superpackets_sent,
            "segments": self.segments_sent,
            "busy_poll_hits": polls[0],
            "busy_poll_misses": polls[1],
            "core": corebuild.running().detail,
            "kernel": kernel,
            "sas": sas,
            "engines": self.team.report() if self.team is not None else [],
            "versions": versions.snapshot(proc),
            "offload": cast(OffloadReport, self.offload.report()) if self.offload is not None else None,
        }


def _udp_snapshot(sa: SecurityAssociation) -> UdpSnapshot | None:
    """An SA of ESP in UDP: where its peer is now and what it did; None for plain ESP."""
    udp = sa.udp
    if udp is None:
        return None
    peer = f"{ip_to_str(udp.peer_addr)}:{udp.peer_port}" if udp.peer_addr else f"*:{udp.peer_port}"
    return {"local_port": udp.local_port, "peer": peer, "keepalives_sent": udp.keepalives_sent,
            "peer_changes": udp.peer_changes}


def _by_reason(drops: Counter[DropReason]) -> DropCounts:
    """Drops by reason as the status shows them: the reasons' names, those never seen left out."""
    return {reason.value: count for reason, count in drops.items() if count}


def run(
    spec: WorkerSpec, conn: Connection, queue: QueueBinding | None = None,
    processor: Processor | None = None,
) -> int:
    """The worker's life: pin, build, bind, say ready, serve until stopped. Returns an exit code.

    ``queue`` and ``processor`` replace the ones built from ``spec`` (tests; the benchmark's
    accept-only worker)."""
    from . import logsetup

    logsetup.setup(f"q{spec.queue}" if spec.compartment == "default"
                   else f"{spec.compartment}/q{spec.queue}", spec.log_level)
    started = time.time()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, lambda _sig, _frame: None)  # wakes the poll via the fd
    # So that ps and top show which queue a process serves.
    with contextlib.suppress(OSError), open("/proc/self/comm", "w", encoding="ascii") as comm:
        comm.write(f"nfq-ipsec-q{spec.queue}"[:15])
    store: StateStore | None = None
    pool: OffloadPool | None = None
    handler: PacketHandler | None = None
    try:
        if spec.cpu is not None:
            os.sched_setaffinity(0, {spec.cpu})
        if processor is None:
            now = time.monotonic()
            processor = versions.build(spec, Processor(spec.spd(), spec.sas, now, mtu=spec.mtu,
                                       max_packet=MAX_VERDICT_PAYLOAD, ipv6_link=spec.ipv6_link),
                                       now, time.monotonic)
            processor.learn_mss = spec.gso  # a superpacket's segments fit its peer's MSS
        ident = spec.worker_user if spec.sandboxed else None
        state_fd: int | None = None
        if spec.state_dir is not None:
            state_fd = state.open_worker_dir(spec.state_dir, spec.queue,
                                             ident.uid if ident is not None else None)
            store = StateStore(spec.state_dir, queue=spec.queue, dir_fd=state_fd)
            if ident is None:
                store.attach(processor.sad.all())  # before the queue: no packet without its state
        team = Team(settings=spec.crypto)
        if spec.engines:
            team.adopt(spec.engines)
            team.verify()  # in this process: its own copies of the libraries
        else:
            team.discover()
        if queue is None:
            queue = NetlinkQueue(max_len=spec.max_len,
                                 want_indev=spec.gateway_interface is not None, gso=spec.gso)
        queue.bind(spec.queue)
        if ident is not None:
            os.umask(0o027)  # its files readable by their directory's group (root), as made
            handler = _sandboxed_handler(spec, processor, queue)
        else:
            handler = PacketHandler(processor, queue, spec.mark,
                                    gateway_interface=spec.gateway_interface, drop_log=spec.drop_log)
        if ident is not None:
            preload()
        if spec.crypto.offload_helpers:  # forked now: the sandbox allows no new process
            pool = start_offload(spec.crypto, team, spec.sandbox, ident, spec.queue)
            handler.offload = pool
        handler.traps = dict(spec.traps)
        # NoEngine: an SA no verified engine can carry. Before the sandbox: an AF_ALG engine's
        # sockets are opened as its SAs are bound.
        handler.use_team(team)
        if ident is not None:
            sandbox.drop_user(ident)
            if store is not None:  # as the worker's user: the files it makes are its own
                store.attach(processor.sad.all())
            sandbox.enter_filter(state_fd, spec.sandbox,
                                 tuple(pool.pids) if pool is not None else ())
            # no new thread from here (the filter allows no clone): the periodic known-answer
            # tests run inline, and a hung engine is the watchdog's (docs/engines.md)
            team.threads = False
    except Exception as err:
        if pool is not None:
            pool.stop()
        if store is not None:
            store.close(exact=False)
        if queue is not None:
            with contextlib.suppress(Exception):
                queue.close()
        text = f"queue {spec.queue}: {err}"
        log.error("cannot start: %s", text)
        with contextlib.suppress(OSError):
            conn.send(("error", text))
        return 1
    handler.store = store
    conn.send(("ready", os.getpid(), spec.queue))
    pinned = f"cpu {spec.cpu}" if spec.cpu is not None else "not pinned"
    log.debug("ready: queue %d, %s, %d SA(s), pid %d", spec.queue, pinned, len(spec.sas), os.getpid())
    clean = False
    try:
        code = _serve(spec, conn, queue, handler, wake_r, started)
        clean = True
        return code
    finally:
        if pool is not None:
            pool.stop()
        if store is not None:
            # Exact values only after a clean stop: no packet is handled after this point.
            store.close(exact=clean)
        queue.close()


def start_offload(crypto: CryptoSettings, team: Team, mode: str,
                  ident: Identity | None, queue: int = 0) -> OffloadPool:
    """Fork the crypto offload helpers (``crypto.offload_helpers``) and put the team's
    outbound SAs behind them from their binding on. A sandboxed worker's helpers become its
    user, with no capability, under the same filter (no state directory) before they read a
    key."""
    pool = OffloadPool(crypto.offload_helpers, crypto.offload_batch, crypto.offload_timeout,
                       crypto.self_check)

    def in_child() -> None:
        with contextlib.suppress(OSError), open("/proc/self/comm", "w", encoding="ascii") as comm:
            comm.write(f"nfq-ipsec-o{queue}"[:15])  # ps and top: queue's offload helper
        if ident is not None:
            sandbox.drop_user(ident, keep=())
            sandbox.enter_filter(None, mode)

    pids = pool.start({m.name: m.engine for m in team.members.values()}, in_child)
    log.debug("crypto offload: helper(s) %s", ", ".join(map(str, pids)))
    team.offload = pool
    return pool


def _sandboxed_handler(spec: WorkerSpec, processor: Processor, queue: QueueBinding) -> PacketHandler:
    """The handler of a worker about to enter its sandbox: every socket it may send through
    opened now (as root: raw sockets need CAP_NET_RAW, which it is about to give up), the
    kernel's queue counters open, interface names by ioctl on a socket held."""
    batch = BatchSender(spec.mark)
    batch.open_all()
    handler = PacketHandler(
        processor, queue, spec.mark, gateway_interface=spec.gateway_interface,
        reply=_raw_sender(eager=True), keepalive=_raw_sender(spec.mark, eager=True),
        cross=_raw_ip_sender(spec.mark, eager=True), send=_raw_ip_sender(spec.mark, eager=True),
        batch=batch.send, ifname=_ifname_by_ioctl(), drop_log=spec.drop_log)
    try:
        stats_fd = os.open(PROC_QUEUES, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        handler.kernel_stats = dict  # no counters from the kernel: none shown
    else:
        handler.kernel_stats = lambda: kernel_queue_stats(fd=stats_fd)
    return handler


def _ifname_by_ioctl() -> Callable[[int], str]:
    """``socket.if_indextoname`` without opening a socket per call (glibc's does): the
    ``SIOCGIFNAME`` ioctl on one datagram socket opened now."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def ifname(index: int) -> str:
        req = struct.pack("16si", b"", index) + bytes(20)
        got = fcntl.ioctl(sock.fileno(), sandbox.SIOCGIFNAME, req)
        return got[:16].split(b"\0", 1)[0].decode()

    return ifname


def preload() -> None:
    """Load every crypto engine an SA may use, now: a worker about to enter its sandbox opens
    no file afterwards, so a module (or a library's lazily loaded part) first needed by an SA a
    reload brings in would fail. Each suite seals and opens one packet under a zero key (not a
    secret: thrown away at once). Engines added to the core must be added here too: nothing
    may be imported lazily on the packet path."""
    from .core.suites import ENCRYPTION, HMACS, make_suite

    header = bytes(8)
    for name, enc in ENCRYPTION.items():
        for integrity in ([None] if enc.aead else list(HMACS)):
            mac_len = HMACS[integrity].key_size if integrity is not None else 0
            suite = make_suite(name, bytes(enc.keymat_size), integrity, bytes(mac_len))
            sealed = suite.seal(header, b"", 1, bytes(2 * max(suite.align, 4)))
            suite.open(header, b"", sealed)


def _raw_sender(mark: int = 0, eager: bool = False) -> Callable[[bytes], None]:
    """Sends what the core builds to its destination: IPv4 whole (header included) through a
    raw IPv4 socket; IPv6 (ICMPv6 errors) as its ICMPv6 message through an ICMPv6 socket, whose
    kernel picks the source address and computes the checksum over it. ``mark`` (SO_MARK) goes
    on every packet if not 0. Whole packets of either family: ``_raw_ip_sender``. ``eager``:
    both sockets opened now (a family the host lacks: its sends raise OSError)."""
    socks: dict[int, socket.socket] = {}
    closed: set[int] = set()

    def sock_for(version: int) -> socket.socket:
        sock = socks.get(version)
        if sock is None:
            if version in closed:
                raise OSError(errno.EAFNOSUPPORT, "no raw socket of this family")
            sock = (socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
                    if version == 6
                    else socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW))
            sock.setblocking(False)
            if mark:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            socks[version] = sock
        return sock

    def send(packet: bytes) -> None:
        if packet[0] >> 4 == 6:
            sock_for(6).sendto(packet[IPV6_HEADER:], (socket.inet_ntop(socket.AF_INET6,
                                                                     packet[24:40]), 0))
        else:
            sock_for(4).sendto(packet, (socket.inet_ntoa(packet[16:20]), 0))

    if eager:
        for version in (4, 6):
            try:
                sock_for(version)
            except OSError:
                closed.add(version)
    return send


def _raw_ip_sender(mark: int, eager: bool = False) -> Callable[[bytes], None]:
    """Sends whole IP packets of either family, header included as built (``IPPROTO_RAW``
    implies it for both), with ``mark`` (SO_MARK) on each, to the packet's own destination.
    The kernel neither fragments nor changes what it sends (IPv4: it redoes the header
    checksum): a packet bigger than the route's interface raises EMSGSIZE. ``eager``: both
    sockets opened now (a family the host lacks: its sends raise OSError)."""
    socks: dict[int, socket.socket] = {}
    closed: set[int] = set()

    def sock_for(family: int) -> socket.socket:
        sock = socks.get(family)
        if sock is None:
            if family in closed:
                raise OSError(errno.EAFNOSUPPORT, "no raw socket of this family")
            sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            socks[family] = sock
        return sock

    def send(packet: bytes) -> None:
        if packet[0] >> 4 == 6:
            sock_for(socket.AF_INET6).sendto(packet, (socket.inet_ntop(socket.AF_INET6,
                                                                       packet[24:40]), 0))
        else:
            sock_for(socket.AF_INET).sendto(packet, (socket.inet_ntoa(packet[16:20]), 0))

    if eager:
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock_for(family)
            except OSError:
                closed.add(family)
    return send


def _serve(
    spec: WorkerSpec, conn: Connection, queue: QueueBinding, handler: PacketHandler,
    wake: socket.socket, started: float,
) -> int:
    qfd = queue.fileno()
    cfd = conn.fileno()
    wfd = wake.fileno()
    poller = select.poll()
    poller.register(qfd, select.POLLIN)
    poller.register(cfd, select.POLLIN)
    poller.register(wfd, select.POLLIN)
    receive = queue.receive
    handle = handler.handle_batch
    polling = BusyPoll(spec.busy_poll)
    next_events = 0.0
    interval = spec.crypto.verify_interval
    next_verify = time.monotonic() + interval if interval else float("inf")
    while True:
        events = poller.poll(0 if polling.active else EVENT_INTERVAL * 1000)
        if not events and polling.active:
            polling.idle(time.monotonic())
        for fd, _ev in events:
            if fd == qfd:
                got = False
                for _ in range(BATCHES_PER_WAKEUP):
                    packets = receive(BATCH)
                    if not packets:
                        break
                    got = True
                    handle(packets)
                    if len(packets) < BATCH:
                        break
                if got and spec.busy_poll:  # no clock read per batch when it is off
                    polling.handled(time.monotonic())
            elif fd == cfd:
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    log.warning("supervisor gone (control pipe closed): stopping")
                    return 0
                if msg[0] == "ping":
                    conn.send(("pong", handler.counts()))
                elif msg[0] == "stats":
                    conn.send(("stats", handler.snapshot(spec.queue, spec.cpu, started,
                                                         (polling.hits, polling.misses))))
                elif msg[0] == "stop":
                    log.debug("stopping on request")
                    return 0
                elif msg[0] in ("reload", "commit", "rollback"):
                    conn.send(_reload_step(handler, msg))
                elif msg[0] == "engine":
                    conn.send(("engine", json.dumps(handler.engine_command(msg[1], msg[2]))))
            elif fd == wfd:
                try:
                    signals = wake.recv(64)
                except BlockingIOError:
                    signals = b""
                if signal.SIGTERM in signals:
                    log.info("stopping on SIGTERM")
                    return 0
        while handler.acquires:  # a trap connection's packet found no SA: ask for one
            conn.send(("acquire", handler.acquires.pop(0)))
        now = time.monotonic()
        if now >= next_events:
            handler.report_events()
            handler.send_keepalives(now)
            if handler.drop_log is not None:
                handler.drop_log.flush(now)
            next_events = now + EVENT_INTERVAL
        if now >= next_verify:
            handler.verify_engines()
            next_verify = time.monotonic() + interval


class BusyPoll:
    """Adaptive polling (``daemon.busy_poll``): after a batch the worker keeps polling its
    queue without sleeping for up to ``window`` seconds, so that a packet arriving within it
    (the reply to what it just sent, the next packet of a burst) is read without a wake-up.

    The window adapts, as NAPI's busy polling and DPDK's adaptive polling do: a poll that
    catches a packet restores the full window; one that runs out empty halves it, down to a
    sixteenth, so a worker whose traffic never comes back within the window (sparse traffic)
    spends little. With no traffic it never polls: the idle cost is zero. While polling it
    yields the CPU to any other runnable task (``sched_yield``) on every empty look."""

    SHRINK_FLOOR = 16  # the window never shrinks below the full one divided by this

    def __init__(self, window: float) -> None:
        self.full = window
        self.window = window
        self.until = 0.0  # polling while time < until; 0: sleeping in poll()
        self.hits = 0  # polls that caught a packet
        self.misses = 0  # polls that ran out empty

    @property
    def active(self) -> bool:
        return self.until > 0.0

    def handled(self, now: float) -> None:
        """A batch was handled at ``now``: poll for the window from here."""
        if not self.full:
            return
        if self.active:
            self.hits += 1
            self.window = self.full
        self.until = now + self.window

    def idle(self, now: float) -> None:
        """An empty look while polling: yield the CPU, or stop polling when the window is over."""
        if now < self.until:
            os.sched_yield()
            return
        self.misses += 1
        self.window = max(self.window / 2, self.full / self.SHRINK_FLOOR)
        self.until = 0.0


def _reload_step(handler: PacketHandler, msg: tuple[Any, ...]) -> tuple[str, str]:
    """One step of a reload, asked by the supervisor: ``("reload", spec)``, ``("commit",)``
    or ``("rollback",)``. The answer: ``("reloaded", summary)``, ``("committed", "")``,
    ``("rolled_back", "")``, or ``("reload_failed", why)`` (nothing changed)."""
    try:
        if msg[0] == "reload":
            summary = handler.reload(msg[1], time.monotonic())
            log.info("reloaded: %s", summary)
            return ("reloaded", summary)
        if msg[0] == "commit":
            handler.commit_reload()
            return ("committed", "")
        handler.rollback_reload()
        return ("rolled_back", "")
    except Exception as err:  # the old configuration keeps running
        log.error("reload refused: %s", err)
        return ("reload_failed", str(err))


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """The ``multiprocessing`` target (module-level, so ``spawn`` can import it)."""
    code = 1
    try:
        try:
            hardening.disable_core_dumps()  # first: this process holds its SAs' keys
        except OSError as err:
            with contextlib.suppress(OSError):
                conn.send(("error", f"queue {spec.queue}: cannot turn core dumps off: {err}"))
        else:
            code = run(spec, conn)
    finally:
        conn.close()
    sys.exit(code)

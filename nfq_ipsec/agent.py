"""The IKEv2 keying agent: one process under the supervisor, running the sans-IO IKE core
(``nfq_ipsec.ike``) for the configured connections over UDP sockets on ports 500 and 4500.

Its sockets carry the daemon's mark (SO_MARK), so the rules let its IKE leave (``rules``:
UDP 500, and 4500 with the non-ESP marker, between a connection's endpoints). On 4500 every
IKE message goes with the non-ESP marker (RFC 3948 section 2.2) in front; a datagram there
without it is not ours (the workers take ESP in UDP before it reaches a socket) and is dropped.

Each connection has a ``Dispatcher`` of its own (its peer's datagrams go to it by source
address): what its IKE SAs report belongs to that connection. A Child SA that comes up or is
rekeyed goes to the supervisor as ``("child_up", connection, ChildSA)`` over the pipe, one
that is gone as ``("child_down", connection, inbound SPI, linger)``; the supervisor installs and
removes them in the workers. Keys travel only in those pipe messages: nothing here logs or
writes them (a ``ChildSA``'s repr has none).

The supervisor's messages: ``("ping",)`` (answered ``("pong",)``), ``("stats",)`` (answered
``("ike_stats", [...])``, what ``status`` shows), ``("initiate", name)``, ``("terminate",
name)`` (answered ``("ike_done", text)``), ``("acquire", name)`` (a trap connection's packet
found no Child SA: initiate), ``("installed", [inbound SPIs])`` (after each change of the
workers' SAs: the answers held for those Child SAs go) and ``("stop",)``.

Make before break as the responder: an answer of ours that makes a Child SA (IKE_AUTH, a
CREATE_CHILD_SA new or rekey) is held until the supervisor says its inbound SA is installed
(at most ``HOLD_MAX``), because the peer may send with the new SA the moment it has the answer.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from . import hardening, logsetup
from .config.model import Config, ConnectionConfig
from .core.ipv6 import addr_str
from .core.sa import Mode
from .ike import selectors
from .ike.child import ChildSA
from .ike.dispatch import Dispatcher
from .ike.errors import IkeError
from .ike.message import Exchange, IdPayload, IdType, decode_header
from .ike.proposal import Proposal
from .ike.session import IKE_PORT, NAT_T_PORT, Event, IkeSession, Output, PeerConfig, State
from .keylog import KeyLog
from .status import ConnectionReport, IkeSaReport

MARKER = bytes(4)  # the non-ESP marker on port 4500
TICK = 0.2  # seconds between timer checks when nothing arrives
# A `start` connection whose IKE SA failed or was deleted is initiated again after RETRY_MIN
# seconds, then twice as long after each failure up to RETRY_MAX, as strongSwan's
# close_action/dpd_action = restart do (and back to RETRY_MIN once it is up).
RETRY_MIN, RETRY_MAX = 5.0, 120.0
# As the responder of an exchange that makes a Child SA (IKE_AUTH, CREATE_CHILD_SA), the
# answer waits until the supervisor says the new inbound SA is installed, for at most HOLD_MAX
# seconds: the peer may send with it as soon as it has the answer (strongSwan does).
HOLD_MAX = 2.0
log = logging.getLogger("nfq_ipsec.agent")

Send = tuple[int, tuple[str, int], bytes]  # (our port, (peer address, port), datagram)


@dataclass(frozen=True)
class AgentConnection:
    """One connection as the agent runs it; ``peer`` holds the PSK (never in a repr)."""

    name: str
    local: str
    remote: str
    peer: PeerConfig
    start: bool
    trap: bool = False  # start_action = "trap": initiated by an acquire from the data plane


@dataclass(frozen=True)
class AgentSpec:
    connections: tuple[AgentConnection, ...]
    mark: int
    log_level: str = "info"
    key_log: str | None = None  # daemon.key_log: the directory of the Wireshark key log


def identity(text: str) -> IdPayload:
    """An IKE identity: an IP address (ID_IPV4_ADDR, ID_IPV6_ADDR) or else a name (ID_FQDN)."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return IdPayload(IdType.FQDN, text.encode())
    return IdPayload(IdType.IPV4_ADDR if ip.version == 4 else IdType.IPV6_ADDR, ip.packed)


def _packed(addr: int) -> bytes:
    return ipaddress.ip_address(addr_str(addr)).packed


def peer_config(conn: ConnectionConfig, cfg: Config) -> PeerConfig:
    """What the IKE core needs of ``conn``: its policy's prefixes are the traffic selectors."""
    pol = next(p for p in cfg.policies if p.name == conn.policy)
    return PeerConfig(
        local_id=identity(conn.local_id), remote_id=identity(conn.remote_id),
        psk=conn.psk.reveal(), ike_proposals=conn.ike_proposal, esp_proposals=conn.esp_proposal,
        local_ts=(selectors.from_prefix(str(pol.selector.local)),),
        remote_ts=(selectors.from_prefix(str(pol.selector.remote)),),
        transport=conn.mode is Mode.TRANSPORT,
        local_addr=_packed(conn.local), remote_addr=_packed(conn.remote),
        force_encap=conn.encap, rekey_time=conn.ike_rekey_time,
        child_rekey_time=conn.rekey_time, dpd_delay=conn.dpd_delay,
        life_time=conn.ike_life_time, child_life_time=conn.life_time,
    )


def agent_spec(cfg: Config) -> AgentSpec | None:
    """The agent's part of ``cfg``: its connections that carry a policy (None: no agent)."""
    conns = tuple(
        AgentConnection(c.name, addr_str(c.local), addr_str(c.remote), peer_config(c, cfg),
                        c.start_action == "start", c.start_action == "trap")
        for c in cfg.connections if c.policy)
    if not conns:
        return None
    return AgentSpec(conns, cfg.daemon.mark, cfg.daemon.log_level, cfg.daemon.key_log)


def describe_proposal(prop: Proposal) -> str:
    return "/".join(t.describe() for t in prop.transforms)


@dataclass
class _Conn:
    spec: AgentConnection
    dispatcher: Dispatcher
    children: dict[int, ChildSA] = field(default_factory=dict)  # by inbound SPI
    established_at: dict[bytes, float] = field(default_factory=dict)  # by IKE SPIi, wall clock
    last_outcome: str = ""
    held: bool = False  # terminated by the operator: not started again until `ike initiate`
    retry_at: float | None = None  # a `start` connection that is down: initiate again then
    backoff: float = 0.0  # the wait before the next retry (RETRY_MIN doubling to RETRY_MAX)
    acquired_at: float | None = None  # wall clock: a trap connection's acquire initiated then
    acquires: int = 0  # acquires that initiated


class Agent:
    """The agent's state, without sockets: datagrams and time in; datagrams to send and
    messages for the supervisor (``messages``) out."""

    def __init__(self, spec: AgentSpec, rand: Callable[[int], bytes], now: float,
                 clock: Callable[[], float] = time.time, key_log: KeyLog | None = None,
                 hold: bool = False) -> None:
        """``hold``: answers that make a Child SA wait for ``installed`` (the process does;
        tests that carry datagrams between two agents alone do not)."""
        self.spec, self.rand, self.clock = spec, rand, clock
        self.hold = hold
        # answers held until their Child SAs' inbound SPIs are installed, or the deadline
        self.held: list[tuple[frozenset[int], float, list[Send]]] = []
        self.key_log = key_log  # daemon.key_log: every IKE and Child SA's keys go there
        self.conns: dict[str, _Conn] = {}
        self.by_remote: dict[str, str] = {}
        for c in spec.connections:
            peers = {c.peer.remote_addr: c.peer}
            self.conns[c.name] = _Conn(c, Dispatcher(peers, rand, now))
            self.by_remote[c.remote] = c.name
        self.messages: list[tuple[Any, ...]] = []

    # -- requests --------------------------------------------------------------------------
    def start(self, now: float) -> list[Send]:
        """The connections with ``start_action = "start"``."""
        out: list[Send] = []
        for name, conn in self.conns.items():
            if conn.spec.start:
                out += self.initiate(name, now)
        return out

    def initiate(self, name: str, now: float) -> list[Send]:
        conn = self.conns[name]
        conn.held = False
        if any(e.session.state not in (State.FAILED, State.DELETED)
               for e in conn.dispatcher.sessions.values()):
            return []  # up or on its way
        session, output = conn.dispatcher.initiate(conn.spec.peer.remote_addr, now)
        log.info("connection %s: initiating IKE SA %s with %s", name, session.spi_i.hex(),
                 conn.spec.remote)
        return self._handle(conn, output, IKE_PORT)

    def acquire(self, name: str, now: float) -> list[Send]:
        """A packet of a trap connection's policy found no Child SA (``acquire``): initiate,
        unless its IKE SA is up or on its way."""
        conn = self.conns.get(name)
        if conn is None or not conn.spec.trap or self.active(name):
            return []
        conn.acquired_at, conn.acquires = self.clock(), conn.acquires + 1
        log.info("connection %s: acquire (a packet of its policy found no Child SA)", name)
        return self.initiate(name, now)

    def terminate(self, name: str, now: float) -> list[Send]:
        """Delete the connection's IKE SAs (and with them its Child SAs, which stop carrying
        traffic at once: its policy drops until a new one is up)."""
        conn = self.conns[name]
        conn.held, conn.retry_at = True, None
        for spi in list(conn.children):
            self._child_down(conn, spi, "terminated")
        out: list[Send] = []
        for session in self._sessions(conn):
            if session.state is State.ESTABLISHED:
                out += self._handle(conn, session.delete(now), session.port)
        log.info("connection %s: terminated", name)
        return out

    def reconfigure(self, spec: AgentSpec, now: float) -> tuple[list[Send], list[Send]]:
        """Run ``spec`` from now on (a reloaded configuration): a connection that is gone or
        changed is terminated (its Child SAs reported down, its IKE SAs deleted) and dropped;
        a new or changed one is added, and initiated if it starts. The unchanged ones go on
        with their IKE and Child SAs. Returns (the Deletes of the dropped connections, to send
        before their addresses are forgotten; the new connections' first messages)."""
        wanted = {c.name: c for c in spec.connections}
        goodbye: list[Send] = []
        for name in list(self.conns):
            if wanted.get(name) != self.conns[name].spec:
                goodbye += self.terminate(name, now)
        for name in [n for n in self.conns if wanted.get(n) != self.conns[n].spec]:
            del self.conns[name]
            log.info("connection %s: removed by a reload", name)
        self.by_remote = {c.spec.remote: name for name, c in self.conns.items()}
        hello: list[Send] = []
        for name, c in wanted.items():
            if name in self.conns:
                continue
            self.conns[name] = _Conn(c, Dispatcher({c.peer.remote_addr: c.peer}, self.rand, now))
            self.by_remote[c.remote] = name
            log.info("connection %s: added by a reload", name)
            if c.start:
                hello += self.initiate(name, now)
        self.spec = spec
        return goodbye, hello

    def active(self, name: str) -> bool:
        return any(s.state not in (State.FAILED, State.DELETED) for s in self._sessions(self.conns[name]))

    # -- input -----------------------------------------------------------------------------
    def receive(self, data: bytes, source: tuple[str, int], port: int, now: float) -> list[Send]:
        """A datagram that arrived on our ``port`` (the marker already taken off on 4500)."""
        name = self.by_remote.get(source[0])
        if name is None:
            return []
        conn = self.conns[name]
        packed = ipaddress.ip_address(source[0]).packed
        output = conn.dispatcher.receive(data, (packed, source[1]), now)
        made = frozenset(e.child.spi_in for e in output.events
                         if e.kind in ("established", "rekeyed") and e.child is not None)
        if self.hold and made and output.send and not _is_response(data):
            # our answer makes these Child SAs: it leaves once they are installed
            self.held.append((made, now + HOLD_MAX, self._handle(conn, output, port, source)))
            return []
        if port == IKE_PORT and _init_response(data):
            mine = conn.dispatcher.sessions.get(data[:8])  # our SPI: we began this one
            if mine is not None and mine.session.port == NAT_T_PORT:
                # a NAT found by IKE_SA_INIT: what follows goes from and to port 4500 (RFC
                # 7296 section 2.23), the IKE_AUTH request first
                port, source = NAT_T_PORT, (source[0], NAT_T_PORT)
        return self._handle(conn, output, port, source)

    def installed(self, spis: set[int]) -> list[Send]:
        """The supervisor installed these inbound SPIs: the answers that waited for them go."""
        out: list[Send] = []
        for entry in list(self.held):
            if entry[0] <= spis:
                self.held.remove(entry)
                out += entry[2]
        return out

    def tick(self, now: float) -> list[Send]:
        out: list[Send] = []
        for entry in list(self.held):
            if now >= entry[1]:  # not installed in time (a worker restarting?): answer anyway
                self.held.remove(entry)
                log.warning("Child SA(s) %s not installed after %.0f s: answering anyway",
                            ", ".join(f"0x{s:08x}" for s in sorted(entry[0])), HOLD_MAX)
                out += entry[2]
        for name, conn in self.conns.items():
            sessions = self._sessions(conn)
            port = NAT_T_PORT if any(s.port == NAT_T_PORT for s in sessions) else IKE_PORT
            out += self._handle(conn, conn.dispatcher.tick(now), port)
            out += self._keep_up(name, conn, now)
        return out

    def _keep_up(self, name: str, conn: _Conn, now: float) -> list[Send]:
        """A `start` connection with no IKE SA up or on its way (failed, deleted by the peer,
        its peer dead) is initiated again after a backoff; not one the operator terminated."""
        if not conn.spec.start or conn.held or self.active(name):
            if self.active(name) and any(s.state is State.ESTABLISHED for s in self._sessions(conn)):
                conn.backoff = 0.0
            conn.retry_at = None
            return []
        if conn.retry_at is None:
            conn.backoff = min(RETRY_MAX, conn.backoff * 2) if conn.backoff else RETRY_MIN
            conn.retry_at = now + conn.backoff
            log.info("connection %s: down; initiating again in %.0f s", name, conn.backoff)
            return []
        if now < conn.retry_at:
            return []
        conn.retry_at = None
        return self.initiate(name, now)

    # -- output ----------------------------------------------------------------------------
    def _sessions(self, conn: _Conn) -> list[IkeSession]:
        seen: list[IkeSession] = []
        for entry in conn.dispatcher.sessions.values():
            if entry.session not in seen:
                seen.append(entry.session)
        return seen

    def _handle(self, conn: _Conn, output: Output, port: int,
                to: tuple[str, int] | None = None) -> list[Send]:
        dest = to if to is not None else (conn.spec.remote, port)
        sends: list[Send] = [(port, dest, data) for data in output.send]
        if self.key_log is not None:  # as soon as an IKE SA has keys: IKE_AUTH on decrypts
            for session in self._sessions(conn):
                if session.keys is not None and any(session.spi_r):
                    self.key_log.ike_sa(session.spi_i, session.spi_r, session.keys)
        for event in output.events:
            self._event(conn, event)
        return sends

    def _event(self, conn: _Conn, e: Event) -> None:
        name = conn.spec.name
        if e.kind in ("established", "rekeyed") and e.child is not None:
            c = e.child
            conn.children[c.spi_in] = c
            if self.key_log is not None:
                self.key_log.child_sa(conn.spec.local, conn.spec.remote, c)
            what = "Child SA rekeyed" if e.kind == "rekeyed" else "Child SA established"
            old = f" (replaces 0x{e.old_spi:08x})" if e.kind == "rekeyed" else ""
            conn.last_outcome = f"{what}: in 0x{c.spi_in:08x} out 0x{c.spi_out:08x}"
            log.info("connection %s: %s, SPIs in 0x%08x out 0x%08x%s, %s%s%s", name, what,
                     c.spi_in, c.spi_out, old, describe_proposal(c.proposal),
                     ", ESP in UDP" if c.udp_encap else "", ", transport" if c.transport else "")
            for session in self._sessions(conn):
                if session.state is State.ESTABLISHED:
                    conn.established_at.setdefault(session.spi_i, self.clock())
            if conn.acquired_at is not None:
                log.info("connection %s: Child SA negotiated %.3f s after the acquire", name,
                         self.clock() - conn.acquired_at)
                conn.acquired_at = None
            self.messages.append(("child_up", name, c))
        elif e.kind == "child_deleted":
            self._child_down(conn, e.old_spi, "deleted", linger=True)
        elif e.kind == "child_expired":  # its traffic is dropped from now on (fail closed)
            conn.last_outcome = f"Child SA 0x{e.old_spi:08x} expired: {e.detail}"
            log.warning("connection %s: Child SA 0x%08x expired: %s", name, e.old_spi, e.detail)
            self._child_down(conn, e.old_spi, "expired")
        elif e.kind == "ike_rekeyed":
            conn.last_outcome = "IKE SA rekeyed"
            log.info("connection %s: IKE SA rekeyed", name)
        elif e.kind in ("failed", "deleted"):
            conn.last_outcome = f"IKE SA {e.kind}" + (f": {e.detail}" if e.detail else "")
            (log.warning if e.kind == "failed" else log.info)(
                "connection %s: IKE SA %s%s", name, e.kind, f": {e.detail}" if e.detail else "")
            live = {spi for s in self._sessions(conn) if s.state is State.ESTABLISHED
                    for spi in s.children}
            for spi in [spi for spi in conn.children if spi not in live]:
                self._child_down(conn, spi, f"its IKE SA {e.kind}")
        else:
            log.debug("connection %s: %s %s", name, e.kind, e.detail)

    def _child_down(self, conn: _Conn, spi_in: int, why: str, linger: bool = False) -> None:
        """``linger``: deleted by an exchange (a rekey's old pair, say), so its inbound SA may
        stay a moment for what the peer still sends with it; otherwise it goes at once."""
        if conn.children.pop(spi_in, None) is None:
            return
        log.info("connection %s: Child SA 0x%08x removed (%s)", conn.spec.name, spi_in, why)
        self.messages.append(("child_down", conn.spec.name, spi_in, linger))

    # -- status ----------------------------------------------------------------------------
    def report(self, now: float) -> list[ConnectionReport]:
        """Each connection's IKE SAs as ``status`` shows them (no key, no PSK)."""
        out: list[ConnectionReport] = []
        for name, conn in self.conns.items():
            sas: list[IkeSaReport] = []
            for s in self._sessions(conn):
                due, ends = s.child_rekeys_due, s.child_expiries
                sas.append({
                    "spi_i": s.spi_i.hex(), "spi_r": s.spi_r.hex(), "role": s.role.value,
                    "state": s.state.value,
                    "ike": describe_proposal(s.chosen) if s.chosen is not None else None,
                    "nat": s.nat, "port": s.port,
                    "established": conn.established_at.get(s.spi_i),
                    "rekey_in": _left(s.rekey_due, now),
                    "expires_in": _left(s.expires, now),
                    "children": [{
                        "spi_in": f"0x{c.spi_in:08x}", "spi_out": f"0x{c.spi_out:08x}",
                        "esp": describe_proposal(c.proposal), "udp_encap": c.udp_encap,
                        "rekey_in": _left(due.get(spi, 0.0), now),
                        "expires_in": _left(ends.get(spi, 0.0), now),
                    } for spi, c in s.children.items()],
                })
            out.append({"name": name, "local": conn.spec.local, "remote": conn.spec.remote,
                        "start_action": ("start" if conn.spec.start else
                                         "trap" if conn.spec.trap else "none"), "ike_sas": sas,
                        "last": conn.last_outcome or None})
        return out


def _is_response(data: bytes) -> bool:
    try:
        return decode_header(data).is_response
    except IkeError:
        return False


def _init_response(data: bytes) -> bool:
    """An IKE_SA_INIT response (which the shell needs to know to follow a move to 4500)."""
    try:
        header = decode_header(data)
    except IkeError:
        return False
    return header.exchange == Exchange.IKE_SA_INIT and header.is_response


def _left(due: float, now: float) -> float | None:
    return round(max(0.0, due - now), 1) if due else None


# -- the process ----------------------------------------------------------------------------

def _sockets(spec: AgentSpec, socks: dict[tuple[str, int], socket.socket] | None = None,
             ) -> dict[tuple[str, int], socket.socket]:
    """UDP 500 and 4500 on each local address, with the mark (those not in ``socks`` yet)."""
    socks = {} if socks is None else socks
    for c in spec.connections:
        for port in (IKE_PORT, NAT_T_PORT):
            if (c.local, port) in socks:
                continue
            family = socket.AF_INET6 if ":" in c.local else socket.AF_INET
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, spec.mark)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((c.local, port))
            s.setblocking(False)
            socks[(c.local, port)] = s
    return socks


def run(spec: AgentSpec, conn: Connection) -> int:
    logsetup.setup("agent", spec.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor stops us over the pipe
    try:
        socks = _sockets(spec)
    except OSError as err:
        conn.send(("error", f"cannot open the IKE sockets: {err}"))
        log.error("cannot open the IKE sockets: %s", err)
        return 1
    by_fd = {s.fileno(): (key, s) for key, s in socks.items()}
    local_of = {c.name: c.local for c in spec.connections}
    key_log = None
    if spec.key_log is not None:
        try:
            key_log = KeyLog(Path(spec.key_log))
        except OSError as err:
            conn.send(("error", f"cannot write the key log in {spec.key_log}: {err}"))
            log.error("cannot write the key log in %s: %s", spec.key_log, err)
            return 1
        log.warning("KEY LOG ON: every IKE and ESP key this agent negotiates is written to %s "
                    "(daemon.key_log); whoever reads it can decrypt that traffic. For debugging "
                    "only: turn it off and delete the files", spec.key_log)
    agent = Agent(spec, os.urandom, time.monotonic(), key_log=key_log, hold=True)
    conn.send(("ready", os.getpid()))
    log.info("ready: %d connection(s) (%s), IKE on UDP 500 and 4500", len(spec.connections),
             ", ".join(c.name for c in spec.connections))

    def send(sends: list[Send], local: str | None = None) -> None:
        for port, dest, data in sends:
            name = agent.by_remote.get(dest[0])
            here = local or (local_of[name] if name else None)
            sock = socks.get((here, port)) if here is not None else None
            if sock is None:
                continue
            payload = MARKER + data if port == NAT_T_PORT else data
            with contextlib.suppress(OSError):  # a full buffer: IKE retransmits
                sock.sendto(payload, dest)

    def flush() -> None:
        while agent.messages:
            conn.send(agent.messages.pop(0))

    send(agent.start(time.monotonic()))
    flush()
    while True:
        ready, _, _ = select.select([conn.fileno(), *by_fd], [], [], TICK)
        now = time.monotonic()
        for fd in ready:
            if fd == conn.fileno():
                try:
                    while conn.poll():
                        msg = conn.recv()
                        if (isinstance(msg, tuple) and len(msg) == 2 and msg[0] == "reconfigure"
                                and isinstance(msg[1], AgentSpec)):
                            old_local = {c.remote: c.local for c in agent.spec.connections}
                            goodbye, hello = agent.reconfigure(msg[1], now)
                            for port, dest, data in goodbye:  # from the old local addresses
                                send([(port, dest, data)], old_local.get(dest[0]))
                            local_of = {c.name: c.local for c in msg[1].connections}
                            try:
                                _sockets(msg[1], socks)
                            except OSError as err:
                                log.error("reload: cannot open the IKE sockets: %s", err)
                            by_fd = {s.fileno(): (key, s) for key, s in socks.items()}
                            send(hello)
                            conn.send(("reconfigured", len(msg[1].connections)))
                        elif _on_request(agent, msg, conn, send, now):
                            return 0
                except (EOFError, OSError):
                    return 0  # the supervisor is gone
                continue
            (local, port), sock = by_fd[fd]
            for _ in range(64):
                try:
                    data, src = sock.recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                if port == NAT_T_PORT:
                    if data[:4] != MARKER:
                        continue  # ESP in UDP is the workers'
                    data = data[4:]
                send(agent.receive(data, (src[0], src[1]), port, now), local)
        send(agent.tick(now))
        flush()


def _on_request(agent: Agent, msg: Any, conn: Connection,
                send: Callable[[list[Send]], None], now: float) -> bool:
    """One message of the supervisor's; True: stop."""
    kind = msg[0] if isinstance(msg, tuple) and msg else None
    if kind == "stop":
        return True
    if kind == "ping":
        conn.send(("pong",))
    elif kind == "stats":
        conn.send(("ike_stats", agent.report(now)))
    elif kind == "installed" and len(msg) == 2:
        send(agent.installed({int(s) for s in msg[1]}))
    elif kind == "acquire" and len(msg) == 2:
        send(agent.acquire(str(msg[1]), now))
    elif kind in ("initiate", "terminate") and len(msg) == 2:
        name = msg[1]
        if name not in agent.conns:
            conn.send(("ike_done", False, f"no connection {str(name)[:40]!r}"))
        elif kind == "initiate":
            if agent.active(name):
                conn.send(("ike_done", True, f"connection {name}: already up or on its way"))
            else:
                send(agent.initiate(name, now))
                conn.send(("ike_done", True, f"connection {name}: initiating"))
        else:
            send(agent.terminate(name, now))
            conn.send(("ike_done", True, f"connection {name}: terminated"))
    return False


def agent_main(spec: AgentSpec, conn: Connection) -> None:
    """The ``multiprocessing`` target (module-level, so ``spawn`` can import it)."""
    code = 1
    try:
        try:
            hardening.disable_core_dumps()  # first: this process holds the PSKs and keys
        except OSError as err:
            with contextlib.suppress(OSError):
                conn.send(("error", f"agent: cannot turn core dumps off: {err}"))
        else:
            code = run(spec, conn)
    finally:
        conn.close()
    sys.exit(code)



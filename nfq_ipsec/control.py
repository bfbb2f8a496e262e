"""The control socket: a unix stream socket, mode 0600, one JSON request line, one JSON answer line.

Requests: ``{"command": "status"}`` or ``{"command": "reload", "config": PATH}`` (the answer:
``{"reloaded": summary, "changed": true}`` or ``{"error", "problems", "changed": false}``), a
UTF-8 JSON object on one line of at most ``MAX_REQUEST`` bytes (end of file also ends it). The
answer to ``status`` is a :class:`nfq_ipsec.status.StatusReport`: per worker and per SA
counters, the daemon's state, the drops of our own iptables rules and warnings, built from
names, SPIs and counters only, never key material. ``docs/status.md`` is its JSON schema, every
field with its type and meaning. An error answer is ``{"error": "text"}``.

No client can stall the daemon. The server never blocks on a client: the supervisor's loop
waits on the listening socket and on one epoll descriptor for all clients, and ``serve`` does
only what is ready. A client has ``CLIENT_TIMEOUT`` seconds to send its request and then as
long again to take its answer, or it is dropped; at most ``MAX_CLIENTS`` are served at once
(the next ones get ``{"error": "busy: ..."}`` and are closed). Whatever a request holds (invalid
UTF-8, no JSON object, nesting deep enough to exhaust ``json``'s recursion, more than
``MAX_REQUEST`` bytes) it gets an error answer. These failures and every error answer count in
``control_errors``; ``control_clients`` is the number of clients connected. They are logged at
DEBUG only, so a hostile client can't fill the log.

If ``accept`` fails for a reason that does not go away by itself (the process is out of file
descriptors, ``EMFILE``, or the system is, ``ENFILE``), the waiting connection stays in the
listening socket's queue and the socket stays readable: polling it again at once would spin the
loop at full CPU. So the server stops polling the listening socket for ``ACCEPT_BACKOFF_MIN``
seconds, doubling up to ``ACCEPT_BACKOFF_MAX`` while accept keeps failing, then tries again;
the clients already connected are served meanwhile. Each failure counts in ``control_errors``
and is logged as a warning at most once per ``FAILURE_LOG_INTERVAL``.

This module has the server half (used by the supervisor), the client half and the text
rendering behind ``nfq-ipsec status``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import socket
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import hardening
from .status import IkeReport, StatusReport

MAX_REQUEST = 64 * 1024  # bytes of one request line
CLIENT_TIMEOUT = 2.0  # seconds a client has to send its request, and then to take its answer
MAX_CLIENTS = 16  # clients served at once; more are answered "busy" and closed
ACCEPTS_PER_ROUND = 64
RECV_SIZE = 4096
FAILURE_LOG_INTERVAL = 60.0  # seconds between two logged handler (or accept) failures
ACCEPT_BACKOFF_MIN = 0.1  # seconds the listening socket is left alone after accept failed
ACCEPT_BACKOFF_MAX = 2.0
STATUS_TIMEOUT = 10.0  # seconds ``nfq-ipsec status`` waits for the answer

log = logging.getLogger("nfq_ipsec.control")



# An answer: one JSON object (a StatusReport, a reload's answer, {"error": text}...).
Answer = Mapping[str, object]


class Deferred:
    """An answer a handler gives later instead of blocking (``status`` waits for the workers'
    counters): the handler returns it, sets ``response`` within ``timeout`` seconds, and the
    server sends it on its next round."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.response: Answer | None = None


Handler = Callable[[dict[str, Any]], "Answer | Deferred"]


class ControlError(Exception):
    """The control socket can't be set up (another daemon owns it, bad path...)."""


class NotRunning(Exception):
    """No daemon answers at the socket."""


# -- server ---------------------------------------------------------------------------------
@dataclass(eq=False)
class _Client:
    """One accepted connection: its request so far, then its answer until it is sent."""

    sock: socket.socket
    deadline: float  # monotonic: drop the client if it is not done by then
    request: bytearray = field(default_factory=bytearray)
    pending: Deferred | None = None  # the handler answers later
    answer: memoryview | None = None  # what is left to send, once the request was answered


class ControlServer:
    """The listening socket and the clients being served, none of them ever waited on.

    The supervisor waits on ``waitables()`` (with ``multiprocessing.connection.wait``, along
    with its workers) and calls ``serve`` after every wait: it accepts, reads, answers and
    drops what is ready or due, and returns without blocking. So a client that is slow, silent,
    malformed or never reads its answer costs the daemon nothing but its own connection."""

    def __init__(self, path: str, max_clients: int = MAX_CLIENTS,
                 client_timeout: float = CLIENT_TIMEOUT) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.max_clients = max_clients
        self.client_timeout = client_timeout
        self.errors = 0  # bad requests, error answers, clients refused or dropped
        self._clients: dict[socket.socket, _Client] = {}
        self._sel: selectors.EpollSelector | None = None
        self._failure_logged = -FAILURE_LOG_INTERVAL
        self._accept_failure_logged = -FAILURE_LOG_INTERVAL
        self._accept_backoff = ACCEPT_BACKOFF_MIN
        self._accept_paused_until: float | None = None  # monotonic: accept failed, wait till then

    def open(self) -> None:
        """Make the directory (0700 if we create it), refuse if a daemon already answers,
        replace a stale socket, bind with mode 0600."""
        p = Path(self.path)
        _make_dir(p.parent)
        _check_dir(p.parent)
        if p.exists() or p.is_symlink():
            mode = p.lstat().st_mode
            if not stat.S_ISSOCK(mode):
                raise ControlError(f"control socket path {p} exists and is not a socket")
            if _answers(self.path):
                raise ControlError(
                    f"another nfq-ipsec daemon is running (it answers on {p}); a second daemon "
                    "on this host needs its own daemon.control_socket (the default is "
                    "/run/nfq-ipsec/NAME.sock, NAME its configuration file's name), and its own "
                    "daemon.queues and daemon.chain_prefix")
            p.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        except OSError as err:
            sock.close()
            raise ControlError(f"cannot bind control socket {p}: {err.strerror}") from None
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        sock.setblocking(False)
        self.sock = sock
        self._sel = selectors.EpollSelector()

    def fileno(self) -> int:
        if self.sock is None:
            raise RuntimeError("control socket not open")
        return self.sock.fileno()

    def waitables(self) -> list[socket.socket | selectors.EpollSelector]:
        """What to wait on for readability: the listening socket (unless accepting is paused
        after a failure), and one epoll descriptor that is readable when any client can be read
        from or written to."""
        if self.sock is None or self._sel is None:
            return []
        if self._accept_paused_until is not None:
            return [self._sel]
        return [self.sock, self._sel]

    @property
    def clients(self) -> int:
        return len(self._clients)

    def next_timeout(self, now: float | None = None) -> float | None:
        """Seconds until the earliest client deadline or the end of a pause in accepting
        (``None``: neither)."""
        due = [c.deadline for c in self._clients.values()]
        if self._accept_paused_until is not None:
            due.append(self._accept_paused_until)
        if not due:
            return None
        now = time.monotonic() if now is None else now
        return max(0.0, min(due) - now)

    def serve(self, handler: Handler) -> None:
        """Accept waiting clients, read and answer those that have sent something, go on
        sending answers, drop clients past their deadline. Never blocks, never raises for a
        client's sake (a failing handler is answered with an error)."""
        if self.sock is None or self._sel is None:
            return
        paused = self._accept_paused_until
        if paused is None or time.monotonic() >= paused:
            self._accept_paused_until = None
            self._accept()
        for key, events in self._sel.select(0):
            client: _Client = key.data
            if client.answer is None:
                if events & selectors.EVENT_READ:
                    self._read(client, handler)
            elif events & selectors.EVENT_WRITE:
                self._send(client)
        for client in [c for c in self._clients.values() if c.pending is not None]:
            assert client.pending is not None
            if client.pending.response is not None:
                self._answer(client, self._counted(client.pending.response))
        now = time.monotonic()
        for client in [c for c in self._clients.values() if now >= c.deadline]:
            what = ("send its request" if client.answer is None and client.pending is None
                    else "get its answer" if client.answer is None else "read its answer")
            self._drop(client, f"did not {what} in time")

    def close(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client)
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    # -- one client at a time ---------------------------------------------------------------
    def _accept(self) -> None:
        assert self.sock is not None and self._sel is not None
        for _ in range(ACCEPTS_PER_ROUND):  # the rest on the next round: no starving the loop
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # the client left before we took it
                continue
            except OSError as err:  # out of file descriptors, for example
                self._accept_failed(err)
                return
            self._accept_backoff = ACCEPT_BACKOFF_MIN
            conn.setblocking(False)
            if len(self._clients) >= self.max_clients:
                self.errors += 1
                log.debug("control socket: %d clients already, refusing one", len(self._clients))
                with contextlib.suppress(OSError):
                    conn.send(_encode({"error": f"busy: {self.max_clients} control clients "
                                                "already connected; try again"}))
                _close(conn)
                continue
            client = _Client(conn, time.monotonic() + self.client_timeout)
            self._clients[conn] = client
            self._sel.register(conn, selectors.EVENT_READ, client)

    def _accept_failed(self, err: OSError) -> None:
        """Leave the listening socket alone for a while: it stays readable while the
        connection waits, and taking it fails again until descriptors are free."""
        self.errors += 1
        now = time.monotonic()
        pause = self._accept_backoff
        self._accept_paused_until = now + pause
        self._accept_backoff = min(ACCEPT_BACKOFF_MAX, pause * 2)
        if now - self._accept_failure_logged >= FAILURE_LOG_INTERVAL:
            self._accept_failure_logged = now
            log.warning("control socket: cannot accept a connection: %s; trying again in %.1f s "
                        "(logged at most once per %g s)", err.strerror or err, pause,
                        FAILURE_LOG_INTERVAL)
        else:
            log.debug("control socket: cannot accept a connection: %s; trying again in %.1f s",
                      err.strerror or err, pause)

    def _read(self, client: _Client, handler: Handler) -> None:
        while True:
            try:
                chunk = client.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                self._drop(client, f"lost while reading its request: {err.strerror}")
                return
            if not chunk:  # end of file: what came before it is the request, if anything
                if client.request:
                    self._reply(client, self._respond(bytes(client.request), handler))
                else:
                    self._drop(client)  # connected and left: a liveness probe, no error
                return
            start = len(client.request)
            client.request += chunk
            end = client.request.find(b"\n", start)
            if 0 <= end <= MAX_REQUEST:
                self._reply(client, self._respond(bytes(client.request[:end]), handler))
                return
            if len(client.request) > MAX_REQUEST:
                self._answer(client, self._refuse(f"request longer than {MAX_REQUEST} bytes"))
                return

    def _respond(self, line: bytes, handler: Handler) -> Answer | Deferred:
        try:
            request = json.loads(line.decode("utf-8"))
        except RecursionError:  # json recurses per nesting level: [[[[... exhausts the stack
            return self._refuse("nested too deeply")
        except ValueError as err:  # invalid UTF-8 (UnicodeDecodeError) or invalid JSON
            return self._refuse(str(err))
        if not isinstance(request, dict):
            return self._refuse("request is not a JSON object")
        try:
            response = handler(request)
        except Exception:
            return self._failed()
        return response if isinstance(response, Deferred) else self._counted(response)

    def _counted(self, response: Answer) -> Answer:
        """The handler's answer, checked and counted."""
        try:
            _encode(response)  # fails here, not half-way through sending
        except Exception:
            return self._failed()
        if "error" in response:
            self.errors += 1
        return response

    def _failed(self) -> dict[str, Any]:
        """The handler raised, or answered what can't be sent: a bug in our own code."""
        self.errors += 1
        now = time.monotonic()
        if now - self._failure_logged >= FAILURE_LOG_INTERVAL:
            self._failure_logged = now
            log.exception("control request failed (logged at most once per %g s)",
                          FAILURE_LOG_INTERVAL)
        return {"error": "internal error answering the request (the daemon's log has it)"}

    def _refuse(self, why: str) -> dict[str, Any]:
        self.errors += 1
        log.debug("control socket: bad request: %s", why)
        return {"error": f"bad request: {why}"}

    def _reply(self, client: _Client, response: Answer | Deferred) -> None:
        assert self._sel is not None
        client.request.clear()
        if isinstance(response, Deferred):
            # nothing to read from it meanwhile; a second of slack past the handler's own limit
            client.pending = response
            client.deadline = time.monotonic() + response.timeout + 1.0
            self._sel.unregister(client.sock)
        else:
            self._answer(client, response)

    def _answer(self, client: _Client, response: Answer) -> None:
        """Send the answer as far as the socket takes it now; the rest when it is writable."""
        assert self._sel is not None
        client.pending = None
        client.answer = memoryview(_encode(response))
        client.deadline = time.monotonic() + self.client_timeout
        try:
            self._sel.modify(client.sock, selectors.EVENT_WRITE, client)
        except KeyError:  # it waited for a deferred answer, unwatched
            self._sel.register(client.sock, selectors.EVENT_WRITE, client)
        self._send(client)

    def _send(self, client: _Client) -> None:
        assert client.answer is not None
        try:
            while client.answer:
                sent = client.sock.send(client.answer)
                client.answer = client.answer[sent:]
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._drop(client, f"lost while sending its answer: {err.strerror}")
            return
        self._drop(client)  # all sent

    def _drop(self, client: _Client, why: str | None = None) -> None:
        """Close a client; ``why`` when it failed (counted, logged at DEBUG only: a hostile
        client must not be able to fill the log)."""
        if why is not None:
            self.errors += 1
            log.debug("control socket: client dropped: %s", why)
        self._clients.pop(client.sock, None)
        if self._sel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(client.sock)
        _close(client.sock)


def _encode(response: Answer) -> bytes:
    return json.dumps(response, sort_keys=True).encode() + b"\n"


def _close(sock: socket.socket) -> None:
    """Close a non-blocking client socket after discarding what it sent that we did not read
    (a little of it at most): closing a unix socket with unread data resets the connection, and
    the client would lose its answer."""
    with contextlib.suppress(OSError):
        for _ in range(4):
            if not sock.recv(MAX_REQUEST):
                break
    sock.close()


def _make_dir(directory: Path) -> None:
    missing = []
    d = directory
    while not d.exists():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        d.mkdir(mode=0o700)
        os.chmod(d, 0o700)


def _check_dir(directory: Path) -> None:
    """The socket's directory, and every directory on the way to it, must be ours (or root's)
    and not writable by others: whoever can write it can put their own socket in ours' place
    and answer ``status`` and ``stop`` instead of the daemon."""
    try:
        hardening.check_parents(directory / "control")
        fd, _ = hardening.open_checked(directory, directory=True, forbid=0o022,
                                       fix=f"run chmod 700 {directory}")
        os.close(fd)
    except hardening.UnsafeFileError as err:
        raise ControlError(f"control socket directory: {err}") from None


def _answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
    except OSError:
        return False
    finally:
        s.close()
    return True


# -- client ---------------------------------------------------------------------------------
def request(path: str, req: dict[str, Any], timeout: float = STATUS_TIMEOUT) -> dict[str, Any]:
    """Send one request, return the answer. Raises NotRunning if nobody answers."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunning(f"nfq-ipsec is not running (no daemon at {path})") from None
        except PermissionError:
            raise NotRunning(f"cannot reach {path}: permission denied (run as root)") from None
        except OSError as err:
            raise NotRunning(f"cannot reach {path}: {err.strerror}") from None
        try:
            s.sendall(json.dumps(req).encode() + b"\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
                if data.endswith(b"\n"):
                    break
        except TimeoutError:
            raise NotRunning(f"the daemon at {path} did not answer within {timeout:g} s") from None
        except OSError as err:
            raise NotRunning(f"lost the connection to {path}: {err.strerror}") from None
    finally:
        s.close()
    if not data:
        raise NotRunning(f"the daemon at {path} closed the connection without an answer")
    answer = json.loads(data)
    if not isinstance(answer, dict):
        raise NotRunning(f"the daemon at {path} sent a malformed answer")
    return answer


# -- rendering ------------------------------------------------------------------------------
def render_status(status: StatusReport) -> str:
    """A status answer as readable tables (one from another version of the daemon may lack
    fields: they show as ``-``)."""
    d = status.get("daemon", {})
    rules = "rules installed" if d.get("rules_installed") else "rules NOT installed"
    out = [
        f"nfq-ipsec {d.get('state', '?')}: pid {d.get('pid')}, up {fmt_duration(d.get('uptime'))}, "
        f"{rules}, config {d.get('config')}",
    ]
    if status.get("taken_at"):
        out.append(f"at: {status['taken_at']}")
    if d.get("core"):
        out.append(f"core: {d['core']}")
    if d.get("ipv6"):
        out.append(f"IPv6: {d['ipv6']}")
    out += [f"WARNING: {w}" for w in status.get("warnings", [])]
    out.append("")
    wrows = [["QUEUE", "CPU", "PID", "STATE", "UPTIME", "RESTARTS", "PKTS IN", "PKTS OUT",
              "DROPS", "KERNEL DROPS (queue/user)", "CPU TIME", "MEM"]]
    notes = []
    for w in status.get("workers", []):
        drops = w.get("drops")
        wrows.append([
            str(w.get("queue")), _dash(w.get("cpu")), _dash(w.get("pid")), str(w.get("state")),
            fmt_duration(w.get("uptime")), str(w.get("restarts", 0)), _dash(w.get("packets_in")),
            _dash(w.get("packets_out")), _dash(None if drops is None else sum(drops.values())),
            f"{_dash(w.get('kernel_queue_dropped'))}/{_dash(w.get('user_dropped'))}",
            fmt_cpu(w.get("cpu_seconds")), fmt_bytes(w.get("memory_bytes")),
        ])
        if drops:
            detail = " ".join(f"{k}={v}" for k, v in sorted(drops.items()))
            notes.append(f"  q{w.get('queue')} drops: {detail}")
        if w.get("last_error"):
            notes.append(f"  q{w.get('queue')} last error: {w['last_error']}")
        if w.get("ike_markers"):
            notes.append(f"  q{w.get('queue')} IKE (non-ESP marker) passed: {w['ike_markers']}")
        if w.get("crossed_family"):
            notes.append(f"  q{w.get('queue')} sent on in the other IP family (mixed tunnel): "
                         f"{w['crossed_family']}")
        hits, misses = w.get("busy_poll_hits"), w.get("busy_poll_misses")
        if hits or misses:
            notes.append(f"  q{w.get('queue')} busy polling: {hits} poll(s) caught a packet, "
                         f"{misses} ran out empty")
        versions = w.get("versions")
        if versions and versions.get("compare", "off") != "off":
            states = ", ".join(v["name"] + (" in service" if v["in_service"]
                                            else f" OUT ({v['out_reason']})")
                               + (f" outvoted {v['outvoted']}" if v.get("outvoted") else "")
                               for v in versions["versions"])
            pairs = "; ".join(f"{'+'.join(p['versions'])} agreed {p['agreed']}, "
                              f"mismatches {p['mismatches']}" for p in versions["pairs"])
            notes.append(f"  q{w.get('queue')} versions (compare {versions['compare']}): {states}; "
                         f"{pairs}")
        if w.get("superpackets"):
            notes.append(f"  q{w.get('queue')} TCP superpackets cut and sealed: "
                         f"{w['superpackets']} (as {w['segments']} ESP packets)")
    out.extend(_table(wrows))
    out.extend(notes)
    comps = status.get("compartments", [])
    if len(comps) > 1:  # the default one alone is the workers' table again
        crows = [["COMPARTMENT", "ID", "SELECTS", "WORKERS (ready)", "RESTARTS", "PKTS IN",
                  "PKTS OUT", "DROPS"]]
        for c in comps:
            cdrops = c.get("drops")
            crows.append([str(c.get("name")), str(c.get("id")), str(c.get("selector")),
                          f"{c.get('workers')} ({c.get('workers_ready')})",
                          str(c.get("restarts", 0)), _dash(c.get("packets_in")),
                          _dash(c.get("packets_out")),
                          _dash(None if cdrops is None else sum(cdrops.values()))])
        out.append("")
        out.extend(_table(crows))
    kdrops = status.get("kernel_drops")
    if kdrops:
        detail = " ".join(f"{k}={v}" for k, v in sorted(kdrops.items()))
        age = status.get("kernel_drops_age")
        when = f", read {fmt_duration(age)} ago" if isinstance(age, int | float) and age >= 1 else ""
        out.append(f"  dropped by our iptables rules (never queued{when}): {detail}")
    out.append("")
    srows = [["SA", "SPI", "DIR", "QUEUE", "PACKETS", "BYTES", "SEQ", "SAVED", "REPLAY", "INTEGRITY",
              "OTHER", "LIFETIME LEFT", "LAST PACKET"]]
    for sa in status.get("sas", []):
        srows.append([
            str(sa.get("name")), str(sa.get("spi")), str(sa.get("direction")), str(sa.get("queue")),
            _dash(sa.get("packets")), _dash(sa.get("bytes")), _dash(sa.get("seq")),
            _dash(sa.get("saved")), _dash(sa.get("replay_drops")), _dash(sa.get("integrity_drops")),
            _dash(sa.get("other_drops")), fmt_lifetime(sa.get("lifetime_left")),
            fmt_ago(sa.get("last_packet_age")),
        ])
    out.extend(_table(srows))
    learned = [f"{sa.get('name')} {sa['path_mtu']}" for sa in status.get("sas", [])
               if sa.get("path_mtu")]
    if learned:
        out.append(f"  path MTU reported by the path (RFC 4301 8.2): {', '.join(learned)}")
    for sa in status.get("sas", []):
        if sa.get("encapsulation") == "udp":
            out.append(f"  {sa.get('name')}: ESP in UDP, peer {_dash(sa.get('udp_peer'))}, "
                       f"keepalives sent {_dash(sa.get('keepalives_sent'))}, peer changes "
                       f"{_dash(sa.get('peer_changes'))}")
    engines = status.get("engines") or []
    if engines:
        out.append("  crypto engines (nfq-ipsec engines): " + ", ".join(
            f"{e['name']} {e['state']}" + (f" ({e['sas']} SAs)" if e["state"] != "absent" else "")
            for e in engines))
    out += _render_ike(status.get("ike"))
    return "\n".join(out) + "\n"


def _render_ike(ike: IkeReport | None) -> list[str]:
    """The keying agent and its IKE SAs, one line each, and their Child SAs by SPI."""
    if not ike:
        return []
    out = ["", f"IKE agent {ike.get('state')}: pid {_dash(ike.get('pid'))}, restarts "
           f"{ike.get('restarts', 0)}" + (f", last error: {ike['last_error']}"
                                          if ike.get("last_error") else "")]
    for conn in ike.get("connections") or []:
        out.append(f"  connection {conn['name']}: {conn['local']} <-> {conn['remote']} "
                   f"(start {conn['start_action']})" + (f"; last: {conn['last']}" if conn["last"]
                                                         else ""))
        if not conn["ike_sas"]:
            out.append("    no IKE SA")
        for sa in conn["ike_sas"]:
            since = sa.get("established")
            when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
                    if isinstance(since, int | float) else "-")
            out.append(f"    IKE SA {sa['spi_i']}/{sa['spi_r']} {sa['state']} ({sa['role']}), "
                       f"{_dash(sa['ike'])}, UDP {sa['port']}{', NAT' if sa['nat'] else ''}, "
                       f"established {when}, rekey in {fmt_duration(sa['rekey_in'])}"
                       + (f", expires in {fmt_duration(sa['expires_in'])}"
                          if sa.get("expires_in") is not None else ""))
            for c in sa["children"]:
                out.append(f"      Child SA in {c['spi_in']} out {c['spi_out']} {c['esp']}"
                           f"{' in UDP' if c['udp_encap'] else ''}, rekey in "
                           f"{fmt_duration(c['rekey_in'])}"
                           + (f", expires in {fmt_duration(c['expires_in'])}"
                              if c.get("expires_in") is not None else ""))
    return out


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def fmt_duration(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if s < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def fmt_cpu(seconds: object) -> str:
    """CPU time to the hundredth of a second: ``3.25s``; ``-`` for unknown."""
    return f"{seconds:.2f}s" if isinstance(seconds, int | float) else "-"


def fmt_bytes(n: object) -> str:
    """A size in binary units, one decimal: ``31.5 MiB``; ``-`` for unknown."""
    if not isinstance(n, int | float):
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def fmt_ago(seconds: object) -> str:
    """``last_packet_age`` as the table shows it: ``5.0s ago``; ``-`` for none yet."""
    return f"{fmt_duration(seconds)} ago" if isinstance(seconds, int | float) else "-"


def fmt_lifetime(left: object) -> str:
    if not isinstance(left, dict):
        return "-"
    parts = []
    if left.get("seconds") is not None:
        parts.append(fmt_duration(left["seconds"]))
    if left.get("packets") is not None:
        parts.append(f"{left['packets']} pkts")
    if left.get("bytes") is not None:
        parts.append(f"{left['bytes']} B")
    return ", ".join(parts) if parts else "unlimited"

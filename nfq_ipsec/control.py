"""The control socket: a unix stream socket, mode 0600, one JSON request line, one JSON answer line.

Requests: ``{"command": "status"}``. The answer to ``status``::

    {"daemon":  {"pid", "uptime", "config", "state", "rules_installed", "ipv6", "version"},
     "kernel_drops": {reason: n},  (dropped by our own iptables DROP rules, never queued:
                                    cleartext_protected, policy_discard, no_policy, leak_guard)
     "warnings": ["text", ...],   (internal errors, kernel queue drops, workers down)
     "workers": [{"queue", "cpu", "pid", "uptime", "restarts", "state", "packets_in",
                  "packets_out", "drops": {reason: n}, "kernel_queue_dropped", "user_dropped",
                  "last_error", "last_outage"}],
     "sas":     [{"name", "spi" ("0x%08x"), "direction", "queue", "packets", "bytes",
                  "replay_drops", "integrity_drops", "other_drops", "seq", "lifetime_left",
                  "saved"}]}

``saved`` is what the SA's state file covers (``state.py``): outbound the last sequence number
reserved on disk, inbound the number up to which a restarted worker treats packets as seen.

Counters of a worker that is down are ``null``. ``last_outage``: seconds from the last death of
the queue's worker to its replacement being ready (``null`` if it never died). Nothing in a
status answer is key material: it is built from names, SPIs and counters only. An error
answer is ``{"error": "text"}``.

This module has the server half (used by the supervisor), the client half and the text
rendering behind ``nfq-ipsec status``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

MAX_REQUEST = 64 * 1024
CLIENT_TIMEOUT = 2.0  # seconds a client has to send its request
STATUS_TIMEOUT = 10.0  # seconds ``nfq-ipsec status`` waits for the answer

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlError(Exception):
    """The control socket can't be set up (another daemon owns it, bad path...)."""


class NotRunning(Exception):
    """No daemon answers at the socket."""


# -- server ---------------------------------------------------------------------------------
class ControlServer:
    """The listening socket. The supervisor waits on it and calls ``serve_one`` when readable."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock: socket.socket | None = None

    def open(self) -> None:
        """Make the directory (0700 if we create it), refuse if a daemon already answers,
        replace a stale socket, bind with mode 0600."""
        p = Path(self.path)
        _make_dir(p.parent)
        if p.exists() or p.is_symlink():
            mode = p.lstat().st_mode
            if not stat.S_ISSOCK(mode):
                raise ControlError(f"control socket path {p} exists and is not a socket")
            if _answers(self.path):
                raise ControlError(f"another nfq-ipsec daemon is running (it answers on {p})")
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

    def fileno(self) -> int:
        if self.sock is None:
            raise RuntimeError("control socket not open")
        return self.sock.fileno()

    def serve_one(self, handler: Handler) -> None:
        """Accept one waiting client, answer its request, close it."""
        if self.sock is None:
            return
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        with conn:
            conn.settimeout(CLIENT_TIMEOUT)
            try:
                line = _read_line(conn)
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("request is not a JSON object")
                except ValueError as err:
                    response: dict[str, Any] = {"error": f"bad request: {err}"}
                else:
                    response = handler(request)
                conn.sendall(json.dumps(response, sort_keys=True).encode() + b"\n")
            except OSError:
                pass  # the client went away or was too slow; nothing to clean up

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _make_dir(directory: Path) -> None:
    missing = []
    d = directory
    while not d.exists():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        d.mkdir(mode=0o700)
        os.chmod(d, 0o700)


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


def _read_line(conn: socket.socket) -> bytes:
    chunks = []
    total = 0
    while True:
        chunk = conn.recv(4096)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if b"\n" in chunk or total > MAX_REQUEST:
            break
    return b"".join(chunks).split(b"\n", 1)[0]


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


def cli_status(args: argparse.Namespace) -> int:
    """``nfq-ipsec status``: exit 0 with the status, 2 on a bad config, 3 if not running."""
    from .cli import EXIT_CONFIG, EXIT_FAILURE, EXIT_NOT_RUNNING, EXIT_OK

    path: str
    if getattr(args, "socket", None):
        path = args.socket
    else:
        from .tools import load_or_report

        cfg = load_or_report(args.config, show_warnings=False)
        if cfg is None:
            return EXIT_CONFIG
        path = cfg.daemon.control_socket
    try:
        answer = request(path, {"command": "status"})
    except NotRunning as err:
        print(f"nfq-ipsec: {err}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    if "error" in answer:
        print(f"nfq-ipsec: the daemon answered: {answer['error']}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        print(render_status(answer), end="")
    return EXIT_OK


# -- rendering ------------------------------------------------------------------------------
def render_status(status: dict[str, Any]) -> str:
    """A status answer as readable tables."""
    d = status.get("daemon", {})
    rules = "rules installed" if d.get("rules_installed") else "rules NOT installed"
    out = [
        f"nfq-ipsec {d.get('state', '?')}: pid {d.get('pid')}, up {fmt_duration(d.get('uptime'))}, "
        f"{rules}, config {d.get('config')}",
    ]
    if d.get("core"):
        out.append(f"core: {d['core']}")
    if d.get("ipv6"):
        out.append(f"IPv6: {d['ipv6']}")
    out += [f"WARNING: {w}" for w in status.get("warnings", [])]
    out.append("")
    wrows = [["QUEUE", "CPU", "PID", "STATE", "UPTIME", "RESTARTS", "PKTS IN", "PKTS OUT",
              "DROPS", "KERNEL DROPS (queue/user)"]]
    notes = []
    for w in status.get("workers", []):
        drops = w.get("drops")
        wrows.append([
            str(w.get("queue")), _dash(w.get("cpu")), _dash(w.get("pid")), str(w.get("state")),
            fmt_duration(w.get("uptime")), str(w.get("restarts", 0)), _dash(w.get("packets_in")),
            _dash(w.get("packets_out")), _dash(None if drops is None else sum(drops.values())),
            f"{_dash(w.get('kernel_queue_dropped'))}/{_dash(w.get('user_dropped'))}",
        ])
        if drops:
            detail = " ".join(f"{k}={v}" for k, v in sorted(drops.items()))
            notes.append(f"  q{w.get('queue')} drops: {detail}")
        if w.get("last_error"):
            notes.append(f"  q{w.get('queue')} last error: {w['last_error']}")
    out.extend(_table(wrows))
    out.extend(notes)
    kdrops = status.get("kernel_drops")
    if kdrops:
        detail = " ".join(f"{k}={v}" for k, v in sorted(kdrops.items()))
        out.append(f"  dropped by our iptables rules (never queued): {detail}")
    out.append("")
    srows = [["SA", "SPI", "DIR", "QUEUE", "PACKETS", "BYTES", "SEQ", "SAVED", "REPLAY", "INTEGRITY",
              "OTHER", "LIFETIME LEFT"]]
    for sa in status.get("sas", []):
        srows.append([
            str(sa.get("name")), str(sa.get("spi")), str(sa.get("direction")), str(sa.get("queue")),
            _dash(sa.get("packets")), _dash(sa.get("bytes")), _dash(sa.get("seq")),
            _dash(sa.get("saved")), _dash(sa.get("replay_drops")), _dash(sa.get("integrity_drops")),
            _dash(sa.get("other_drops")), fmt_lifetime(sa.get("lifetime_left")),
        ])
    out.extend(_table(srows))
    return "\n".join(out) + "\n"


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

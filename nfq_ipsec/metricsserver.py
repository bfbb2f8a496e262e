"""The metrics listener: ``daemon.metrics = "ADDRESS:PORT"`` serves ``GET /metrics`` over HTTP,
the status answer in Prometheus's text format (``metrics.py``).

It runs in a thread of its own in the supervisor's process and takes the status the way
``nfq-ipsec status`` does: one request on the control socket (``control.request``), which the
supervisor's loop answers without ever waiting on a client. So neither a scraper nor this
thread can hold up the supervisor's loop, and nothing of it touches the data path (the
workers).

A scraper can't hold the listener for long either: one connection is served at a time, and it
has ``CLIENT_TIMEOUT`` seconds in all to send its request (at most ``MAX_REQUEST`` bytes of
request line and headers) and take its answer, or it is dropped. The status is fetched at most
once per ``MIN_FETCH_INTERVAL`` seconds, whatever the number of scrapers; if the daemon does
not answer within ``STATUS_TIMEOUT`` seconds the scrape gets ``503``. Anything but ``GET`` or
``HEAD`` of ``/metrics`` gets ``404`` or ``405``. Nothing a client sends is logged or echoed.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import cast

from . import metrics
from .config.parsers import listen_address
from .control import NotRunning, request
from .status import StatusReport

CLIENT_TIMEOUT = 5.0  # seconds a scraper has to send its request and take its answer
MAX_REQUEST = 8192  # bytes of request line and headers
STATUS_TIMEOUT = 5.0  # seconds to wait for the daemon's status answer
MIN_FETCH_INTERVAL = 1.0  # seconds: scrapes closer than this share one status answer
ACCEPT_POLL = 0.5  # seconds between two looks at the stop flag while idle
PATH = "/metrics"

log = logging.getLogger("nfq_ipsec.metrics")


class MetricsError(Exception):
    """The listener can't be set up (address in use, not an address of this host...)."""


class MetricsServer:
    """``open`` binds (in the caller, so a bad address fails the start), ``start`` serves in a
    daemon thread, ``close`` stops it."""

    def __init__(self, address: str, control_path: str, client_timeout: float = CLIENT_TIMEOUT,
                 status_timeout: float = STATUS_TIMEOUT) -> None:
        self.address = address
        self.control_path = control_path
        self.client_timeout = client_timeout
        self.status_timeout = status_timeout
        self.sock: socket.socket | None = None
        self.scrapes = 0  # answered 200
        self.errors = 0  # clients dropped, refused or answered with an error
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cached: tuple[float, bytes] | None = None  # (monotonic, body) of the last fetch

    @property
    def port(self) -> int:
        """The port bound (the configured one, or the kernel's choice for port 0)."""
        if self.sock is None:
            raise RuntimeError("metrics listener not open")
        return int(self.sock.getsockname()[1])

    def open(self) -> None:
        host, port = listen_address(self.address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(8)
        except OSError as err:
            sock.close()
            raise MetricsError(f"cannot listen for metrics on {self.address} "
                               f"(daemon.metrics): {err.strerror or err}") from None
        sock.settimeout(ACCEPT_POLL)
        self.sock = sock

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop listening. A scrape under way is not waited for beyond ``ACCEPT_POLL``: the
        thread is a daemon thread, its connection ends with its own time limit or the
        process, so a stop is never held up by a scraper."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(ACCEPT_POLL * 2)
            self._thread = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    # -- the thread --------------------------------------------------------------------------
    def _run(self) -> None:
        sock = self.sock
        assert sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError as err:  # out of descriptors, for one: wait, don't spin
                self.errors += 1
                log.debug("metrics: cannot accept a connection: %s", err)
                self._stop.wait(ACCEPT_POLL)
                continue
            try:
                self._serve(conn)
            except Exception:  # a bug here must not end the listener
                self.errors += 1
                log.debug("metrics: serving a scrape failed", exc_info=True)
            finally:
                conn.close()

    def _serve(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + self.client_timeout
        head = _read_head(conn, deadline)
        if head is None:
            self.errors += 1
            return
        status, body = self._respond(head)
        if status != 200:
            self.errors += 1
        method = head.split(b" ", 1)[0]
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  503: "Service Unavailable"}[status]
        ctype = metrics.CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8"
        header = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        if status == 200:
            self.scrapes += 1
        _send_all(conn, header + (b"" if method == b"HEAD" else body), deadline)

    def _respond(self, head: bytes) -> tuple[int, bytes]:
        line = head.split(b"\r\n", 1)[0].split(b" ")
        if len(line) != 3 or not line[2].startswith(b"HTTP/"):
            return 400, b"bad request\n"
        method, target = line[0], line[1]
        if target.split(b"?", 1)[0] != PATH.encode():
            return 404, b"not found: the metrics are at /metrics\n"
        if method not in (b"GET", b"HEAD"):
            return 405, b"only GET and HEAD\n"
        return self._metrics()

    def _metrics(self) -> tuple[int, bytes]:
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < MIN_FETCH_INTERVAL:
            return 200, self._cached[1]
        try:
            answer = request(self.control_path, {"command": "status"}, timeout=self.status_timeout)
        except (NotRunning, ValueError) as err:
            return 503, f"no status from the daemon: {err}\n".encode()
        if "error" in answer or "daemon" not in answer:
            return 503, b"the daemon answered the status request with an error\n"
        body = metrics.render(cast(StatusReport, answer)).encode()
        self._cached = (now, body)
        return 200, body


def _read_head(conn: socket.socket, deadline: float) -> bytes | None:
    """The request line and headers, up to the blank line; None if the client is too slow,
    sends too much or leaves."""
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or len(data) > MAX_REQUEST:
            return None
        conn.settimeout(left)
        try:
            chunk = conn.recv(4096)
        except OSError:  # TimeoutError included
            return None
        if not chunk:
            return None
        data += chunk
    return data[:MAX_REQUEST]


def _send_all(conn: socket.socket, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    with contextlib.suppress(OSError):
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            conn.settimeout(left)
            sent = conn.send(view)
            view = view[sent:]

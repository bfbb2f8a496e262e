"""Persistent SA state: outbound sequence-number reservations and inbound replay floors.

Why
---
An outbound SA must never send two packets with the same sequence number under one key: the
sequence number is the IV (AES-GCM and ChaCha20-Poly1305 nonces, RFC 4106/7634; AES-CBC IVs are
AES_K(counter)), and a repeated GCM nonce gives away the authentication key. A worker that is
killed (SIGKILL, OOM, power loss) loses its counter, so the counter lives on disk too. An
inbound SA must keep refusing a packet it accepted before a crash (replay), so its window's
floor lives on disk too.

What is stored, where
---------------------
One small file per SA key and direction in ``daemon.state_dir`` (directory 0700, files 0600)::

    <state_dir>/out-<key id>.json   {"next_seq": N, ...}    no number >= N was ever sent
    <state_dir>/in-<key id>.json    {"seen_up_to": P, ...}  no number > P was ever accepted
    <state_dir>/<same>.lock         held (flock) by the worker that owns the SA

The key id is a hash of the SA's algorithms and keys (SHA-256 with a domain label, 128 bits
shown); it names the key without revealing it. Files are named by key, not by SA name or SPI,
because what must never repeat is a (key, sequence number) pair: renaming an SA or changing its
SPI keeps its counter; a new key is a new SA and starts at 1. Each file also records the SA's
name and SPI (for people) and a checksum; a file that does not parse, fails its checksum or
belongs to another key is *corrupt*.

The write-ahead rule and why it is safe
---------------------------------------
A write is: write a temporary file, fsync it, rename it over the old one, fsync the directory.
A reader after any crash sees either the old or the new file, complete.

Outbound. Invariant: every sequence number ever sent on the key is below the stored
``next_seq``. The worker sends numbers up to ``seq_limit`` without asking, and
``seq_limit < stored next_seq`` always holds:

- start: ``next_seq`` = stored value (1 if there is no file: a key never used); ``seq_limit`` =
  ``next_seq - 1``, so nothing may be sent before a reservation;
- reservation, when ``seq`` (the next number) passes ``seq_limit``: store ``next_seq = seq +
  OUT_BLOCK`` (durably, as above) and only then set ``seq_limit = seq + OUT_BLOCK - 1`` and
  send ``seq``. If the write fails, the packet is dropped (``state_unavailable``) and nothing
  is sent;
- a crash at any moment leaves a file whose ``next_seq`` is above every number sent, because
  every number sent was covered by a write that had completed before it was handed out; the
  next start resumes from it and skips at most ``OUT_BLOCK - 1`` unused numbers;
- a clean stop (``stop``/SIGTERM, after the last packet) stores the exact next number, so a
  planned restart skips nothing. Lowering the stored value is safe then: the process sends
  nothing after it.

Inbound. Invariant: every sequence number ever accepted is at most the stored ``seen_up_to``.
An authenticated packet whose number would move the window's top past ``replay_limit`` first
stores ``seen_up_to = seq + margin`` (durably), and only then updates the window and gets its
ACCEPT verdict (``core/esp.py``: ICV, then this, then the window update). A crash therefore
leaves ``seen_up_to`` >= every accepted number, and the next start treats everything up to it
as seen (``ReplayWindow.restore``): a packet accepted before the crash is refused after it.
The check runs after the ICV, so a sender without the key can't make us write. The cost is
that after a crash up to ``margin`` numbers above the real top are refused too; usually the
sender has moved past them while the worker was down. ``margin`` adapts so that an SA writes
about once per ``IN_TARGET_INTERVAL`` (doubling when writes come faster, halving when they come
slower than twice that), between ``IN_MARGIN_MIN`` and ``IN_MARGIN_MAX``: a slow SA loses at
most a few packets, a fast one does not fsync per packet.

Missing and corrupt files. No file means the key was never used here: a fresh SA (sequence 1,
empty window). If the file was *lost* (state_dir deleted, restored from an old backup), this
can't be told apart, and the SA would repeat sequence numbers: give the SA a new key (a new key
starts a new file) or reset its state above anything it sent. A corrupt file stops the SA:
the worker refuses to start and ``nfq-ipsec run`` refuses (exit 5) until the user runs
``nfq-ipsec state reset --config FILE --sa NAME --seq N`` or gives the SA a new key.

This module is the shell half; the core only sees ``SecurityAssociation.reserve`` and its
limits (``core/sa.py``), and stays free of I/O.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .core.errors import DropReason, EspError
from .core.sa import MAX_SEQ_32, MAX_SEQ_64, SADirection, SAParams, SecurityAssociation

STATE_VERSION = 1
OUT_BLOCK = 1 << 16  # outbound numbers reserved per write
IN_MARGIN_MIN = 1
IN_MARGIN_START = 64
IN_MARGIN_MAX = 1 << 16
IN_TARGET_INTERVAL = 1.0  # seconds: aim for about one inbound write per SA per this interval
LOCK_WAIT = 5.0  # seconds to wait for a lock (an old worker may still be exiting)
ERROR_LOG_INTERVAL = 10.0

log = logging.getLogger("nfq_ipsec.state")


class StateError(Exception):
    """A state file or the state directory can't be used: the SA must not start."""


# -- identity and paths ------------------------------------------------------------------------
def key_id(params: SAParams) -> str:
    """A stable name for the SA's key material that does not reveal it (32 hex digits)."""
    h = hashlib.sha256(b"nfq-ipsec sa-state key id v1\0")
    for part in (params.encryption.encode(), params.key.reveal(),
                 (params.integrity or "").encode(), params.integrity_key.reveal()):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.hexdigest()[:32]


def state_path(state_dir: str | os.PathLike[str], params: SAParams) -> Path:
    return Path(state_dir) / f"{params.direction.value}-{key_id(params)}.json"


def _max_seq(params: SAParams) -> int:
    return MAX_SEQ_64 if params.esn else MAX_SEQ_32


def _field(params: SAParams) -> str:
    return "next_seq" if params.direction is SADirection.OUT else "seen_up_to"


# -- one file ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Saved:
    """What a state file says. ``value``: outbound next_seq, inbound seen_up_to."""

    value: int
    sa: str
    spi: int
    written: str


def _checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def render(params: SAParams, value: int, now: float | None = None) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now if now is not None else time.time()))
    body: dict[str, Any] = {
        "version": STATE_VERSION, "direction": params.direction.value, "key_id": key_id(params),
        "sa": params.name, "spi": f"0x{params.spi:08x}", _field(params): value, "written": stamp,
    }
    body["check"] = _checksum({k: v for k, v in body.items()})
    return json.dumps(body, sort_keys=True) + "\n"


def parse(params: SAParams, text: bytes, where: str = "state file") -> Saved:
    """Validate a state file's content for ``params``. Raises StateError("... corrupt ...")."""
    def bad(why: str) -> StateError:
        return StateError(f"{where} is corrupt: {why}")

    try:
        body = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise bad("not JSON") from None
    if not isinstance(body, dict):
        raise bad("not a JSON object")
    check = body.pop("check", None)
    if not isinstance(check, str) or check != _checksum(body):
        raise bad("checksum mismatch")
    if body.get("version") != STATE_VERSION:
        raise bad(f"unknown version {body.get('version')!r}")
    if body.get("direction") != params.direction.value:
        raise bad(f"direction {body.get('direction')!r}, expected {params.direction.value!r}")
    if body.get("key_id") != key_id(params):
        raise bad("it belongs to another key")
    value = body.get(_field(params))
    low = 1 if params.direction is SADirection.OUT else 0
    high = _max_seq(params) + 1 if params.direction is SADirection.OUT else _max_seq(params)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise bad(f"{_field(params)} {value!r} out of range {low}..{high}")
    spi_text = body.get("spi")
    try:
        spi = int(spi_text, 16) if isinstance(spi_text, str) else -1
    except ValueError:
        spi = -1
    return Saved(value, str(body.get("sa")), spi, str(body.get("written")))


def read(path: Path, params: SAParams) -> Saved | None:
    """The state stored for ``params`` at ``path``; None if there is no file (a fresh key)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise StateError(f"state file {path} is a symbolic link") from None
        raise StateError(f"cannot read state file {path}: {err.strerror}") from None
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise StateError(f"state file {path} is not a regular file")
            text = f.read(65536)
    except OSError as err:
        raise StateError(f"cannot read state file {path}: {err.strerror}") from None
    return parse(params, text, f"state file {path}")


def write(path: Path, text: str, dir_fd: int | None = None) -> None:
    """Replace ``path`` atomically and durably: temp file, fsync, rename, fsync directory."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        data = text.encode()
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    own = dir_fd is None
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if own else dir_fd
    assert dfd is not None
    try:
        os.fsync(dfd)
    finally:
        if own:
            os.close(dfd)


def prepare_dir(state_dir: str | os.PathLike[str]) -> Path:
    """Create ``state_dir`` (and missing parents) with mode 0700; refuse one that others can
    use. Raises StateError."""
    d = Path(state_dir)
    if not d.is_absolute():
        raise StateError(f"daemon.state_dir {d} must be an absolute path")
    missing = []
    p = d
    while not p.exists() and not p.is_symlink():
        missing.append(p)
        p = p.parent
    try:
        for m in reversed(missing):
            m.mkdir(mode=0o700)
            os.chmod(m, 0o700)
        st = d.stat()
    except OSError as err:
        raise StateError(f"cannot create state directory {d}: {err.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StateError(f"daemon.state_dir {d} exists and is not a directory")
    if st.st_mode & 0o077:
        raise StateError(f"state directory {d} is accessible by others (mode "
                         f"{stat.S_IMODE(st.st_mode):04o}); make it private: chmod 700 {d}")
    return d


class _Lock:
    """An flock on ``<file>.lock``, held for the owner's lifetime (the kernel drops it when the
    process dies, however it dies)."""

    def __init__(self, path: Path, wait: float) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as err:
            raise StateError(f"cannot open lock file {path}: {err.strerror}") from None
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = b""
                    with contextlib.suppress(OSError):
                        holder = os.pread(fd, 32, 0).strip()
                    os.close(fd)
                    who = f" (pid {holder.decode(errors='replace')})" if holder else ""
                    raise StateError(f"{path} is held by another process{who}: is another "
                                     "nfq-ipsec daemon using the same key?") from None
                time.sleep(0.05)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# -- the worker's side ------------------------------------------------------------------------
class _Entry:
    """One SA's persistence: its file, its lock and (inbound) its adaptive margin."""

    def __init__(self, store: StateStore, sa: SecurityAssociation, path: Path, lock: _Lock) -> None:
        self.store = store
        self.sa = sa
        self.path = path
        self.lock = lock
        self.stored: int | None = None
        self.margin = IN_MARGIN_START
        self.last_write: float | None = None
        self.writes = 0
        self.failures = 0
        self._next_error_log = 0.0

    def _store(self, value: int) -> None:
        write(self.path, render(self.sa.params, value), self.store.dir_fd)
        self.stored = value
        self.writes += 1

    def reserve(self, sa: SecurityAssociation, seq: int) -> int:
        """The ``SecurityAssociation.reserve`` hook: write ahead, then allow."""
        try:
            if sa.outbound:
                nxt = min(seq + OUT_BLOCK, sa.max_seq + 1)
                self._store(nxt)
                return nxt - 1
            now = self.store.clock()
            if self.last_write is not None:
                since = now - self.last_write
                if since < IN_TARGET_INTERVAL:
                    self.margin = min(IN_MARGIN_MAX, self.margin * 2)
                elif since > 2 * IN_TARGET_INTERVAL:
                    self.margin = max(IN_MARGIN_MIN, self.margin // 2)
            floor = min(seq + self.margin, sa.max_seq)
            self._store(floor)
            self.last_write = now
            return floor
        except OSError as err:
            self.failures += 1
            now = self.store.clock()
            if now >= self._next_error_log:
                self._next_error_log = now + ERROR_LOG_INTERVAL
                log.error("SA %s (spi 0x%08x): cannot save its state to %s: %s; its packets are "
                          "dropped until it can (fail closed)", sa.name, sa.spi, self.path,
                          err.strerror or err)
            raise EspError(DropReason.STATE_UNAVAILABLE, f"SA {sa.name}: {err.strerror or err}",
                           sa.spi) from None


class StateStore:
    """A worker's persisted SA state. ``attach`` restores and hooks every SA; ``close`` (on a
    clean stop) stores the exact values and lets the locks go."""

    def __init__(self, state_dir: str | os.PathLike[str],
                 clock: Callable[[], float] = time.monotonic, lock_wait: float = LOCK_WAIT) -> None:
        self.state_dir = Path(state_dir)
        self.clock = clock
        self.lock_wait = lock_wait
        self.dir_fd: int | None = None
        # by SA object: during a reload an SA's old and new keys (same name) are both held
        self.entries: dict[int, _Entry] = {}

    def attach(self, sas: Iterable[SecurityAssociation]) -> None:
        """Lock, read and restore each SA's state, and install the hooks. Raises StateError
        if any SA can't start; then it holds none of these SAs (an SA attached earlier, as
        before a reload, stays attached)."""
        added: list[SecurityAssociation] = []
        try:
            d = prepare_dir(self.state_dir)
            if self.dir_fd is None:
                try:
                    self.dir_fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError as err:
                    raise StateError(f"cannot open state directory {d}: {err.strerror}") from None
            seen: dict[str, str] = {e.path.name: e.sa.name for e in self.entries.values()}
            for sa in sas:
                path = state_path(d, sa.params)
                if path.name in seen:
                    raise StateError(f"SAs {seen[path.name]} and {sa.name} share a key: sequence "
                                     "numbers would repeat under it; give each SA its own key")
                seen[path.name] = sa.name
                lock = _Lock(path.with_suffix(".lock"), self.lock_wait)
                try:
                    saved = read(path, sa.params)
                except BaseException:
                    lock.release()
                    raise
                entry = _Entry(self, sa, path, lock)
                self.entries[id(sa)] = entry
                added.append(sa)
                self._restore(sa, saved)
                entry.stored = saved.value if saved else None
                sa.reserve = entry.reserve
        except BaseException:
            self.detach(added, exact=False)
            if not self.entries:
                self.close(exact=False)
            raise

    def detach(self, sas: Iterable[SecurityAssociation], exact: bool = True) -> None:
        """Let these SAs go (a reload retired them, or took back its new ones): with ``exact``,
        store their exact values first (no packet of theirs will follow), then release."""
        for sa in list(sas):
            e = self.entries.pop(id(sa), None)
            if e is not None:
                self._let_go(e, exact)

    @staticmethod
    def _restore(sa: SecurityAssociation, saved: Saved | None) -> None:
        if sa.outbound:
            sa.next_seq = saved.value if saved else 1
            sa.seq_limit = sa.next_seq - 1  # nothing is sent before a reservation
            how = f"resuming at sequence {sa.next_seq}" if saved else "new key: sequence starts at 1"
        else:
            floor = saved.value if saved else 0
            if floor:
                sa.replay.restore(floor)
            sa.replay_limit = floor
            how = (f"numbers up to {floor} treated as already received" if saved
                   else "new key: empty replay window")
        log.info("SA %s (spi 0x%08x, %s): %s", sa.name, sa.spi, sa.params.direction.value, how)

    def snapshot(self, sa: SecurityAssociation) -> dict[str, int | None] | None:
        """For status: ``saved`` is the highest number the state on disk covers (outbound: the
        last one reserved, i.e. next_seq - 1; inbound: seen_up_to), None without a file."""
        e = self.entries.get(id(sa))
        if e is None:
            return None
        saved = e.stored
        if saved is not None and sa.outbound:
            saved -= 1
        return {"saved": saved, "state_writes": e.writes, "state_failures": e.failures}

    @staticmethod
    def _let_go(e: _Entry, exact: bool) -> None:
        if exact:
            sa = e.sa
            value = sa.next_seq if sa.outbound else sa.replay.top
            if value != e.stored:
                try:
                    e._store(value)
                except OSError as err:
                    log.warning("SA %s: could not store its exact state on stop (%s); the "
                                "reservation on disk stays valid", sa.name, err.strerror or err)
        e.lock.release()

    def close(self, exact: bool = True) -> None:
        """Store the exact next number / window top (only when no packet will follow: a
        clean stop), then release the locks."""
        for e in self.entries.values():
            self._let_go(e, exact)
        self.entries.clear()
        if self.dir_fd is not None:
            os.close(self.dir_fd)
            self.dir_fd = None


# -- checks before start, and the `nfq-ipsec state` command ------------------------------------
def check(state_dir: str, sas: Iterable[SAParams]) -> list[str]:
    """Everything that would stop an SA's worker, found before anything starts: the state
    directory, shared keys, unreadable or corrupt files."""
    try:
        d = prepare_dir(state_dir)
    except StateError as err:
        return [str(err)]
    problems = []
    seen: dict[Path, str] = {}
    for params in sas:
        path = state_path(d, params)
        if path in seen:
            problems.append(f"sa {params.name}: shares its key with sa {seen[path]} (same "
                            "direction): sequence numbers would repeat under it; give each SA its "
                            "own key")
            continue
        seen[path] = params.name
        try:
            read(path, params)
        except StateError as err:
            problems.append(f"sa {params.name} (spi 0x{params.spi:08x}, {params.direction.value}): "
                            f"{err}")
    return problems


def describe(state_dir: str, params: SAParams) -> dict[str, Any]:
    path = state_path(state_dir, params)
    out: dict[str, Any] = {"sa": params.name, "spi": f"0x{params.spi:08x}",
                           "direction": params.direction.value, "file": str(path)}
    try:
        saved = read(path, params)
    except StateError as err:
        out.update(state="unusable", error=str(err))
        return out
    if saved is None:
        out.update(state="fresh")
    else:
        out.update(state="saved", **{_field(params): saved.value}, written=saved.written)
    return out


RESET_HELP = """\
Sets SA NAME's stored state. Outbound: --seq N is the next sequence number it sends. Resetting
an outbound SA to a number it already used repeats IVs under its key: use a number above
anything it sent (the peer's `nfq-ipsec status` shows the highest it received, in the SEQ
column of its inbound SA; add a margin for packets lost on the way), or give the SA a new key
instead (a new key starts fresh at 1 by itself). Inbound: numbers up to --seq N count as
already received (0: an empty window). The daemon must be stopped."""


def cli_state(args: argparse.Namespace) -> int:
    """``nfq-ipsec state show|reset``. Exit 0, 1 (cannot write, daemon running), 2 (bad
    config, unknown SA, bad number)."""
    from .cli import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK
    from .tools import load_or_report

    cfg = load_or_report(args.config)
    if cfg is None:
        return EXIT_CONFIG
    state_dir = cfg.daemon.state_dir
    if args.action == "show":
        rows = [describe(state_dir, p) for p in cfg.sas]
        if getattr(args, "json", False):
            print(json.dumps({"state_dir": state_dir, "sas": rows}, indent=2, sort_keys=True))
        else:
            print(f"state_dir {state_dir}")
            for r in rows:
                if r["state"] == "saved":
                    what = f"next_seq {r['next_seq']}" if "next_seq" in r else f"seen_up_to {r['seen_up_to']}"
                    what += f" (written {r['written']})"
                elif r["state"] == "fresh":
                    what = "no state file: a fresh key (" + (
                        "starts at 1)" if r["direction"] == "out" else "empty replay window)")
                else:
                    what = f"UNUSABLE: {r['error']}"
                print(f"  {r['sa']:<16} {r['spi']} {r['direction']:<3} {what}")
        return EXIT_OK if all(r["state"] != "unusable" for r in rows) else EXIT_FAILURE
    # reset
    if args.sa is None or args.seq is None:
        print("nfq-ipsec: state reset needs --sa NAME and --seq N\n" + RESET_HELP, file=sys.stderr)
        return EXIT_CONFIG
    try:
        params = cfg.sa(args.sa)
    except KeyError:
        print(f"nfq-ipsec: no SA named {args.sa!r} in {args.config} (known: "
              f"{', '.join(p.name for p in cfg.sas)})", file=sys.stderr)
        return EXIT_CONFIG
    low = 1 if params.direction is SADirection.OUT else 0
    high = _max_seq(params) + 1 if params.direction is SADirection.OUT else _max_seq(params)
    if not low <= args.seq <= high:
        print(f"nfq-ipsec: --seq must be {low}..{high} for {params.direction.value}bound SA "
              f"{params.name}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        d = prepare_dir(state_dir)
        path = state_path(d, params)
        lock = _Lock(path.with_suffix(".lock"), wait=0.0)
    except StateError as err:
        print(f"nfq-ipsec: {err}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        write(path, render(params, args.seq))
    except OSError as err:
        print(f"nfq-ipsec: cannot write {path}: {err.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        lock.release()
    what = "next sequence number" if params.direction is SADirection.OUT else "seen up to"
    print(f"nfq-ipsec: SA {params.name} (spi 0x{params.spi:08x}): state reset, {what} {args.seq} "
          f"({path})")
    return EXIT_OK

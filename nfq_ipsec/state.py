"""Persistent SA state: outbound sequence-number reservations and inbound replay floors, so
that no restart or crash ever repeats a (key, sequence number) pair or re-accepts a packet.

One authenticated file per SA key and direction in ``daemon.state_dir`` (``out-<key id>.json``:
``next_seq``; ``in-<key id>.json``: ``seen_up_to``; a ``.lock`` held by the owning worker),
written ahead of use: a number is sent (or a window top accepted) only once a file covering it
is durably on disk. docs/sa-state.md has the invariants, the file checks and why they hold.

This module is the shell half; the core only sees ``SecurityAssociation.reserve`` and its
limits (``core/sa.py``), and stays free of I/O.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import hardening
from .core.errors import DropReason, EspError
from .core.sa import MAX_SEQ_32, MAX_SEQ_64, SADirection, SAParams, SecurityAssociation

STATE_VERSION = 2  # 1: an unkeyed checksum (refused: anyone could have written it)
OUT_BLOCK = 1 << 16  # outbound numbers reserved per write
IN_MARGIN_MIN = 1
IN_MARGIN_START = 64
IN_MARGIN_MAX = 1 << 16
IN_TARGET_INTERVAL = 1.0  # seconds: aim for about one inbound write per SA per this interval
LOCK_WAIT = 5.0  # seconds to wait for a lock (an old worker may still be exiting)
ERROR_LOG_INTERVAL = 10.0
MAX_STATE_FILE = 65536
_MAC_INFO = b"nfq-ipsec sa-state mac v2"
FILE_MODE = 0o640  # state and lock files: the worker's; its directory's group (root) reads them

log = logging.getLogger("nfq_ipsec.state")


class StateError(Exception):
    """A state file or the state directory can't be used: the SA must not start."""


# -- identity and paths ------------------------------------------------------------------------
def _key_material(params: SAParams) -> bytes:
    """The SA's algorithms and keys, each length-prefixed (unambiguous)."""
    out = bytearray()
    for part in (params.encryption.encode(), params.key.reveal(),
                 (params.integrity or "").encode(), params.integrity_key.reveal()):
        out += len(part).to_bytes(4, "big") + part
    return bytes(out)


def key_id(params: SAParams) -> str:
    """A stable name for the SA's key material that does not reveal it (32 hex digits)."""
    return hashlib.sha256(b"nfq-ipsec sa-state key id v1\0" + _key_material(params)).hexdigest()[:32]


def mac_key(params: SAParams) -> bytes:
    """The key that authenticates the SA's state file: HKDF-SHA-256 (RFC 5869) of the SA's key
    material with a fixed label. One-way: neither the file nor this key reveals the SA's keys,
    and only a holder of the SA's keys can write a file it accepts."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=_MAC_INFO).derive(_key_material(params))


def worker_dir_name(queue: int) -> str:
    """The directory of one queue's worker under ``state_dir``: its own user's, mode 0700 (a
    compartment, with a user of its own, will have its queues' directories the same way)."""
    return f"q{queue}"


def state_path(state_dir: str | os.PathLike[str], params: SAParams) -> Path:
    """The SA's state file: in the directory of the queue (worker) that owns the SA."""
    return (Path(state_dir) / worker_dir_name(params.queue)
            / f"{params.direction.value}-{key_id(params)}.json")


def remove(state_dir: str | os.PathLike[str], params: SAParams) -> int:
    """Delete the SA's state file and its lock; how many went. Only for a negotiated SA that
    is gone: its key is never used again (a new Child SA has new keys), so its file protects
    nothing any more; a static SA's file stays, in case its key is configured again."""
    path = state_path(state_dir, params)
    gone = 0
    for p in (path, path.with_suffix(".lock")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()  # the name itself, never what a symbolic link there points to
            gone += 1
    return gone


def prune_negotiated(state_dir: str | os.PathLike[str], queues: Iterable[int],
                     is_negotiated: Callable[[str], bool], keep: Iterable[Path]) -> int:
    """At the start: delete the state files (and locks) a previous run left for negotiated SAs
    (``is_negotiated`` of the file's SA name), except those in ``keep`` (the paths of the SAs
    configured now); how many files went. A file that can't be read is left alone."""
    kept = {Path(p) for p in keep}
    gone = 0
    for queue in queues:
        qdir = Path(state_dir) / worker_dir_name(queue)
        try:
            names = [p for p in qdir.iterdir() if p.suffix == ".json" and p not in kept]
        except OSError:
            continue
        for path in names:
            try:
                if path.is_symlink() or path.stat().st_size > MAX_STATE_FILE:
                    continue
                name = json.loads(path.read_bytes()).get("sa")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(name, str) and is_negotiated(name):
                for p in (path, path.with_suffix(".lock")):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                        gone += 1
    return gone


def _max_seq(params: SAParams) -> int:
    return MAX_SEQ_64 if params.esn else MAX_SEQ_32


def _field(params: SAParams) -> str:
    return "next_seq" if params.direction is SADirection.OUT else "seen_up_to"


# -- one file ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Usage:
    """An SA's use of its lifetime: packets and bytes so far, and when (wall clock, seconds
    since the epoch) its key was first installed here."""

    packets: int
    bytes: int
    installed: float


@dataclass(frozen=True)
class Saved:
    """What a state file says. ``value``: outbound next_seq, inbound seen_up_to."""

    value: int
    sa: str
    spi: int
    written: str
    usage: Usage


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _mac(key: bytes, body: dict[str, Any]) -> str:
    return hmac.new(key, _canonical(body), hashlib.sha256).hexdigest()


def render(params: SAParams, value: int, usage: Usage | None = None, now: float | None = None,
           key: bytes | None = None) -> str:
    """A state file's text. ``key``: :func:`mac_key` of ``params`` (derived if not given)."""
    wall = now if now is not None else time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))
    use = usage if usage is not None else Usage(0, 0, wall)
    body: dict[str, Any] = {
        "version": STATE_VERSION, "direction": params.direction.value, "key_id": key_id(params),
        "sa": params.name, "spi": f"0x{params.spi:08x}", _field(params): value, "written": stamp,
        "lifetime": {"packets": use.packets, "bytes": use.bytes, "installed": use.installed},
    }
    body["mac"] = _mac(key if key is not None else mac_key(params), body)
    return json.dumps(body, sort_keys=True) + "\n"


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse(params: SAParams, text: bytes, where: str = "state file",
          key: bytes | None = None) -> Saved:
    """Validate a state file's content for ``params``: its MAC under the SA's key first.
    Raises StateError("... corrupt ..." or "... old format ...")."""
    def bad(why: str) -> StateError:
        return StateError(f"{where} is corrupt: {why}")

    try:
        body = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise bad("not JSON") from None
    if not isinstance(body, dict):
        raise bad("not a JSON object")
    mac = body.pop("mac", None)
    if mac is None and (body.get("version") == 1 or "check" in body):
        old = body.get(_field(params))
        said = f" (it says {_field(params)} {old})" if _count(old) else ""
        raise StateError(
            f"{where} is in the old format (version 1){said}, which is not authenticated by the "
            f"SA's key, so it can't be trusted. Give SA {params.name} a new key on both peers, "
            f"or, with the daemon stopped, run `nfq-ipsec state reset --config FILE --sa "
            f"{params.name} --seq N` (see `nfq-ipsec state reset --help` for N)")
    if body.get("version") != STATE_VERSION:
        raise bad(f"unknown version {body.get('version')!r}")
    if body.get("direction") != params.direction.value:
        raise bad(f"direction {body.get('direction')!r}, expected {params.direction.value!r}")
    if body.get("key_id") != key_id(params):
        raise bad("it belongs to another key")
    want = _mac(key if key is not None else mac_key(params), body)
    if not isinstance(mac, str) or not hmac.compare_digest(mac, want):
        raise bad("its MAC does not match: it was not written under this SA's key, or was "
                  "altered")
    value = body.get(_field(params))
    low = 1 if params.direction is SADirection.OUT else 0
    high = _max_seq(params) + 1 if params.direction is SADirection.OUT else _max_seq(params)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise bad(f"{_field(params)} {value!r} out of range {low}..{high}")
    life = body.get("lifetime")
    if not (isinstance(life, dict) and _count(life.get("packets")) and _count(life.get("bytes"))
            and isinstance(life.get("installed"), (int, float))
            and not isinstance(life.get("installed"), bool)):
        raise bad("no valid lifetime record")
    spi_text = body.get("spi")
    try:
        spi = int(spi_text, 16) if isinstance(spi_text, str) else -1
    except ValueError:
        spi = -1
    usage = Usage(life["packets"], life["bytes"], float(life["installed"]))
    return Saved(value, str(body.get("sa")), spi, str(body.get("written")), usage)


def read(path: Path, params: SAParams, dir_fd: int | None = None,
         key: bytes | None = None, owner: int | None = None) -> Saved | None:
    """The state stored for ``params`` at ``path`` (with ``dir_fd``: its name in that
    directory); None if there is no file (a fresh key). The file must be a regular file owned
    by the daemon's user (``owner``: the workers' user) and not writable by group or others
    (checked on the opened file)."""
    try:
        fd, _ = hardening.open_checked(path, dir_fd=dir_fd, fix=f"run chmod 600 {path}",
                                       owner=owner)
    except FileNotFoundError:
        return None
    except hardening.UnsafePathError as err:
        raise StateError(f"state file {path} refused: {err}") from None
    except hardening.UnsafeFileError as err:
        raise StateError(f"state file {err}") from None
    except OSError as err:
        raise StateError(f"cannot read state file {path}: {err.strerror}") from None
    try:
        with os.fdopen(fd, "rb") as f:
            text = f.read(MAX_STATE_FILE)
    except OSError as err:
        raise StateError(f"cannot read state file {path}: {err.strerror}") from None
    return parse(params, text, f"state file {path}", key)


def write(path: Path, text: str, dir_fd: int | None = None,
          owner: tuple[int, int] | None = None) -> None:
    """Replace ``path`` atomically and durably: temp file, fsync, rename, fsync directory.

    The temp file is created with O_EXCL and O_NOFOLLOW, so nothing already there (a link, a
    file someone else prepared) is ever written through. One left by a crash is removed first:
    unlink removes the entry itself, never what a link points to. ``owner`` (uid, gid): give
    the new file to the workers' user (root writing for them: ``state reset``)."""
    name, tmp = path.name, path.name + ".tmp"
    own = dir_fd is None
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if own else dir_fd
    assert dfd is not None
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(tmp, flags, FILE_MODE, dir_fd=dfd)
        except FileExistsError:
            os.unlink(tmp, dir_fd=dfd)
            fd = os.open(tmp, flags, FILE_MODE, dir_fd=dfd)
        try:
            if owner is not None:
                os.fchown(fd, *owner)
            data = text.encode()
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)
    finally:
        if own:
            os.close(dfd)


def open_dir(state_dir: str | os.PathLike[str]) -> int:
    """Create ``state_dir`` (and missing parents) with mode 0700 and open it. Refuses one that
    others own or can use, or a symbolic link. Returns the descriptor. Raises StateError."""
    d = Path(state_dir)
    if not d.is_absolute():
        raise StateError(f"daemon.state_dir {d} must be an absolute path")
    missing = []
    p = d
    while not p.exists() and not p.is_symlink():
        missing.append(p)
        p = p.parent
    try:
        hardening.check_parents(d)  # before anything is made under a directory others control
        for m in reversed(missing):
            m.mkdir(mode=0o700)
            os.chmod(m, 0o700)
        fd, _ = hardening.open_checked(d, directory=True, forbid=0o077,
                                       fix=f"make it private: chmod 700 {d}")
    except hardening.UnsafePathError as err:
        raise StateError(f"state directory {d} refused: {err}") from None
    except hardening.UnsafeFileError as err:
        raise StateError(f"state directory {err}") from None
    except OSError as err:
        raise StateError(f"cannot create state directory {d}: {err.strerror}") from None
    return fd


def open_worker_dir(state_dir: str | os.PathLike[str], queue: int, owner: int | None = None,
                    base_fd: int | None = None) -> int:
    """Create (if missing) and open the state directory of queue ``queue``'s worker under
    ``state_dir`` (:func:`open_dir`): owned by ``owner`` (the workers' uid; None: the effective
    user), its group the effective one (root's), mode 2750 (0700 for the effective user's own):
    the worker writes in it, the supervisor reads it through the group (no capability to
    override file permissions needed), and the files made in it take that group (setgid).
    Refuses one that someone else owns, that others can use or group members can write, or a
    link. ``base_fd``: ``state_dir`` opened already. Returns the descriptor. Raises StateError."""
    name = worker_dir_name(queue)
    path = Path(state_dir) / name
    base = open_dir(state_dir) if base_fd is None else base_fd
    try:
        try:
            os.mkdir(name, 0o700, dir_fd=base)
            _hand_over_dir(base, name, owner)
        except FileExistsError:
            pass
        fd, _ = hardening.open_checked(path, directory=True, forbid=0o027, dir_fd=base,
                                       owner=owner, fix=f"run chmod 2750 {path}")
    except hardening.UnsafeFileError as err:
        raise StateError(f"state directory {err}") from None
    except OSError as err:
        raise StateError(f"cannot create state directory {path}: {err.strerror}") from None
    finally:
        if base_fd is None:
            os.close(base)
    return fd


def _hand_over_dir(base: int, name: str, owner: int | None) -> None:
    """A queue's directory in ``base`` given to ``owner`` (None: the effective user) with the
    effective group and its mode (:func:`open_worker_dir`), if root or ``owner`` has it now
    (the sandbox was turned on: root's; never another user's); never through a link."""
    st = os.lstat(name, dir_fd=base)
    if not stat.S_ISDIR(st.st_mode):
        return  # open_worker_dir refuses it
    uid = os.geteuid() if owner is None else owner
    if st.st_uid not in (0, os.geteuid(), uid):
        return  # someone else's: open_worker_dir refuses it, naming the owner
    mode = 0o700 if uid == os.geteuid() else 0o2750
    if (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, os.getegid(), mode):
        return
    # By name: only root can change ``base`` (0700), so it is the directory just checked. The
    # mode first, while it is ours (no capability to override its owner's rights needed).
    if st.st_uid != os.geteuid():
        os.chown(name, os.geteuid(), os.getegid(), dir_fd=base, follow_symlinks=False)
    os.chmod(name, mode, dir_fd=base)
    os.chown(name, uid, os.getegid(), dir_fd=base, follow_symlinks=False)


def prepare_worker_dir(state_dir: str | os.PathLike[str], queue: int, sas: Iterable[SAParams],
                       owner: int | None, others: bool = True) -> None:
    """The supervisor's part, before it starts queue ``queue``'s worker: its directory made
    or handed over (:func:`open_worker_dir`) for ``owner`` (the workers' uid; None: the
    effective user), and each of ``sas``'s files (state and lock) that is not in it yet moved in
    from where an earlier layout or queue left it (``state_dir`` itself; with ``others``,
    another queue's directory: only while no worker runs), so that no SA ever starts afresh
    under a key it used. Files root left there (the sandbox was off, or they were moved in)
    are given to ``owner``: only plain files with one link, through a descriptor (never a
    link). Raises StateError."""
    base = open_dir(state_dir)
    name = worker_dir_name(queue)
    try:
        with contextlib.suppress(FileNotFoundError):
            _hand_over_dir(base, name, owner)  # the sandbox turned on or off since
        os.close(open_worker_dir(state_dir, queue, owner, base))
        sources: list[str | None] = [None]
        if others:
            sources += sorted(e.name for e in os.scandir(base) if e.name != name
                              and e.name.startswith("q") and e.is_dir(follow_symlinks=False))
        for params in sas:
            leaf = state_path(state_dir, params).name
            for file in (leaf, leaf[:-len(".json")] + ".lock"):
                _move_in(base, sources, file, name, owner)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=base)
        try:
            for entry in os.scandir(fd):
                _give(fd, entry.name, owner)
        finally:
            os.close(fd)
    except OSError as err:
        raise StateError(f"cannot prepare the state directory of queue {queue} in {state_dir}: "
                         f"{err.strerror or err}") from None
    finally:
        os.close(base)


def _move_in(base: int, sources: list[str | None], file: str, dest: str, owner: int | None) -> None:
    """``file`` into queue directory ``dest`` from ``base`` itself (None) or one of the
    directories ``sources``, if it is not there yet. The directories it moves between are the
    effective user's for the moment (it needs to write in both without overriding their
    permissions), then handed back."""
    try:
        os.lstat(os.path.join(dest, file), dir_fd=base)
        return
    except FileNotFoundError:
        pass
    for where in sources:
        src = file if where is None else os.path.join(where, file)
        try:
            st = os.lstat(src, dir_fd=base)
        except (FileNotFoundError, PermissionError):
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        taken = [d for d in (dest, where) if d is not None]
        before = {d: os.lstat(d, dir_fd=base).st_uid for d in taken}
        for d in taken:
            os.chown(d, os.geteuid(), os.getegid(), dir_fd=base, follow_symlinks=False)
        try:
            os.rename(src, os.path.join(dest, file), src_dir_fd=base, dst_dir_fd=base)
        finally:
            for d in taken:
                _hand_over_dir(base, d, owner if d == dest else
                               (None if before[d] == os.geteuid() else before[d]))
        log.info("state file %s moved into %s", file, dest)
        return


def _give(dir_fd: int, name: str, owner: int | None) -> None:
    """A plain file of a queue's directory that root owns (written with the sandbox off,
    or moved in) given to ``owner`` with the group and mode the workers' files have."""
    uid = os.geteuid() if owner is None else owner
    st = os.lstat(name, dir_fd=dir_fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid == uid or st.st_uid != os.geteuid():
        return
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid():
            os.fchown(fd, uid, os.getegid())
            os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def prepare_dir(state_dir: str | os.PathLike[str]) -> Path:
    """:func:`open_dir`, for callers that want the checked path. Raises StateError."""
    os.close(open_dir(state_dir))
    return Path(state_dir)


class _Lock:
    """An flock on ``<file>.lock``, held for the owner's lifetime (the kernel drops it when the
    process dies, however it dies)."""

    def __init__(self, path: Path, wait: float, dir_fd: int | None = None,
                 owner: int | None = None) -> None:
        self.path = path
        name = path.name if dir_fd is not None else path
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK,
                         FILE_MODE, dir_fd=dir_fd)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise StateError(f"lock file {path} is a symbolic link") from None
            raise StateError(f"cannot open lock file {path}: {err.strerror}") from None
        st = os.fstat(fd)
        if owner is not None and st.st_uid != owner and st.st_uid == os.geteuid() == 0 \
                and stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            os.fchown(fd, owner, -1)  # root made it for the workers' user (state reset)
            st = os.fstat(fd)
        bad = (f"{path} is not a regular file" if not stat.S_ISREG(st.st_mode)
               else hardening.problem(st, path, 0o022, f"run chmod 600 {path}", owner))
        if bad is not None:
            os.close(fd)
            raise StateError(f"lock file {bad}")
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
    """One SA's persistence: its file, its lock, its MAC key, when its key was first installed
    and (inbound) its adaptive margin."""

    def __init__(self, store: StateStore, sa: SecurityAssociation, path: Path, lock: _Lock,
                 key: bytes, installed: float) -> None:
        self.store = store
        self.sa = sa
        self.path = path
        self.lock = lock
        self.key = key
        self.installed = installed
        self.stored: int | None = None
        self.stored_use: tuple[int, int] | None = None  # packets, bytes in the file
        self.margin = IN_MARGIN_START
        self.last_write: float | None = None
        self.writes = 0
        self.failures = 0
        self._next_error_log = 0.0

    def __repr__(self) -> str:
        return f"<state entry {self.sa.name} {self.path}>"

    def _store(self, value: int) -> None:
        sa = self.sa
        use = (sa.packets + sa.packets_before, sa.bytes + sa.bytes_before)
        usage = Usage(use[0], use[1], self.installed)
        write(self.path, render(sa.params, value, usage, key=self.key), self.store.dir_fd)
        self.stored = value
        self.stored_use = use
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


def _has_age_limit(params: SAParams) -> bool:
    lt = params.lifetime
    return lt.soft_seconds is not None or lt.hard_seconds is not None


class StateStore:
    """A worker's persisted SA state. ``attach`` restores and hooks every SA; ``close`` (on a
    clean stop) stores the exact values and lets the locks go. ``wallclock`` dates a key's
    first installation (its age survives restarts and downtime)."""

    def __init__(self, state_dir: str | os.PathLike[str],
                 clock: Callable[[], float] = time.monotonic, lock_wait: float = LOCK_WAIT,
                 wallclock: Callable[[], float] = time.time, queue: int = 0,
                 dir_fd: int | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.queue = queue  # the worker's: its directory holds its SAs' files
        self.clock = clock
        self.wallclock = wallclock
        self.lock_wait = lock_wait
        # the queue's directory (:func:`open_worker_dir`), opened by the caller before it gave
        # up root (a sandboxed worker: every file is opened relative to it), or on first use
        self.dir_fd: int | None = dir_fd
        # by SA object: during a reload an SA's old and new keys (same name) are both held
        self.entries: dict[int, _Entry] = {}

    def attach(self, sas: Iterable[SecurityAssociation]) -> None:
        """Lock, read and restore each SA's state, and install the hooks. Raises StateError
        if any SA can't start; then it holds none of these SAs (an SA attached earlier, as
        before a reload, stays attached)."""
        added: list[SecurityAssociation] = []
        try:
            d = self.state_dir
            if self.dir_fd is None:
                self.dir_fd = open_worker_dir(d, self.queue)
            seen: dict[str, str] = {e.path.name: e.sa.name for e in self.entries.values()}
            for sa in sas:
                path = state_path(d, sa.params)
                if path.name in seen:
                    raise StateError(f"SAs {seen[path.name]} and {sa.name} share a key: sequence "
                                     "numbers would repeat under it; give each SA its own key")
                seen[path.name] = sa.name
                lock = _Lock(path.with_suffix(".lock"), self.lock_wait, self.dir_fd)
                key = mac_key(sa.params)
                try:
                    saved = read(path, sa.params, self.dir_fd, key)
                except BaseException:
                    lock.release()
                    raise
                now = self.wallclock()
                entry = _Entry(self, sa, path, lock, key, saved.usage.installed if saved else now)
                self.entries[id(sa)] = entry
                added.append(sa)
                self._restore(sa, saved, now)
                if saved is not None:
                    entry.stored = saved.value
                    entry.stored_use = (saved.usage.packets, saved.usage.bytes)
                elif _has_age_limit(sa.params):
                    # Date the key now, so that its age counts across restarts even if no
                    # packet comes before the next one (nothing reserved: 1 / 0).
                    try:
                        entry._store(1 if sa.outbound else 0)
                    except OSError as err:
                        raise StateError(f"cannot write state file {path}: "
                                         f"{err.strerror or err}") from None
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
    def _restore(sa: SecurityAssociation, saved: Saved | None, now: float) -> None:
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
        if saved is not None:
            use = saved.usage
            age = max(0.0, now - use.installed)
            sa.restore_usage(use.packets, use.bytes, age)
            how += (f"; lifetime used so far: {use.packets} packets, {use.bytes} bytes, "
                    f"{age:.0f} s")
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
        """Store the exact next number / window top and lifetime use (only when no packet of
        the SA will follow), then release its lock."""
        sa = e.sa
        if exact and e.lock.fd >= 0:
            value = sa.next_seq if sa.outbound else sa.replay.top
            use = (sa.packets + sa.packets_before, sa.bytes + sa.bytes_before)
            if value != e.stored or (e.stored is not None and use != e.stored_use):
                try:
                    e._store(value)
                except OSError as err:
                    log.warning("SA %s: could not store its exact state on stop (%s); the "
                                "reservation on disk stays valid", sa.name, err.strerror or err)
        e.lock.release()

    def close(self, exact: bool = True) -> None:
        """Store the exact next number / window top and lifetime use (only when no packet will
        follow: a clean stop), then release the locks."""
        for e in self.entries.values():
            self._let_go(e, exact)
        self.entries.clear()
        if self.dir_fd is not None:
            os.close(self.dir_fd)
            self.dir_fd = None


# -- checks before start, and the `nfq-ipsec state` command ------------------------------------
def check(state_dir: str, sas: Iterable[SAParams], owner: int | None = None) -> list[str]:
    """Everything that would stop an SA's worker, found before anything starts: the state
    directory, shared keys, unreadable, foreign, unauthenticated or corrupt files. ``owner``:
    the workers' user, whose the queues' directories and files are (None: the effective)."""
    try:
        base = open_dir(state_dir)
    except StateError as err:
        return [str(err)]
    d = Path(state_dir)
    problems = []
    seen: dict[Path, str] = {}
    dirs: dict[int, int | None] = {}
    try:
        for params in sas:
            if params.queue not in dirs:
                qdir = d / worker_dir_name(params.queue)
                try:
                    dirs[params.queue] = hardening.open_checked(
                        qdir, directory=True, forbid=0o027, dir_fd=base, owner=owner,
                        fix=f"run chmod 2750 {qdir}")[0]
                except FileNotFoundError:
                    dirs[params.queue] = None  # made when its worker starts: all fresh
                except hardening.UnsafeFileError as err:
                    problems.append(f"state directory {err}")
                    dirs[params.queue] = None
                except OSError as err:
                    problems.append(f"cannot open state directory {qdir}: {err.strerror}")
                    dirs[params.queue] = None
            dfd = dirs[params.queue]
            path = state_path(d, params)
            if path in seen:
                problems.append(f"sa {params.name}: shares its key with sa {seen[path]} (same "
                                "direction): sequence numbers would repeat under it; give each SA "
                                "its own key")
                continue
            seen[path] = params.name
            where = f"sa {params.name} (spi 0x{params.spi:08x}, {params.direction.value}): "
            if dfd is None:
                continue
            try:
                read(path, params, dfd, owner=owner)
            except StateError as err:
                problems.append(where + str(err))
            lock = path.with_suffix(".lock")
            try:
                os.close(hardening.open_checked(lock, dir_fd=dfd, fix=f"run chmod 600 {lock}",
                                                owner=owner)[0])
            except FileNotFoundError:
                pass
            except hardening.UnsafeFileError as err:
                problems.append(f"{where}lock file {err}")
            except OSError as err:
                problems.append(f"{where}cannot open lock file {lock}: {err.strerror}")
    finally:
        os.close(base)
        for fd in dirs.values():
            if fd is not None:
                os.close(fd)
    return problems


def describe(state_dir: str, params: SAParams, owner: int | None = None) -> dict[str, Any]:
    path = state_path(state_dir, params)
    out: dict[str, Any] = {"sa": params.name, "spi": f"0x{params.spi:08x}",
                           "direction": params.direction.value, "file": str(path)}
    try:
        saved = read(path, params, owner=owner)
    except StateError as err:
        out.update(state="unusable", error=str(err))
        return out
    if saved is None:
        out.update(state="fresh")
    else:
        u = saved.usage
        out.update(state="saved", **{_field(params): saved.value}, written=saved.written,
                   lifetime_used={"packets": u.packets, "bytes": u.bytes,
                                  "installed": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                             time.gmtime(u.installed))})
    return out


RESET_HELP = """\
Sets SA NAME's stored state. Outbound: --seq N is the next sequence number it sends. Resetting
an outbound SA to a number it already used repeats IVs under its key: use a number above
anything it sent (the peer's `nfq-ipsec status` shows the highest it received, in the SEQ
column of its inbound SA; add a margin for packets lost on the way), or give the SA a new key
instead (a new key starts fresh at 1 by itself). Inbound: numbers up to --seq N count as
already received (0: an empty window). The daemon must be stopped."""


def seq_range(params: SAParams) -> tuple[int, int]:
    """The numbers ``reset`` takes for this SA: outbound the next sequence number to send
    (1 .. the largest + 1), inbound the highest number treated as received (0 .. the largest)."""
    if params.direction is SADirection.OUT:
        return 1, _max_seq(params) + 1
    return 0, _max_seq(params)


@dataclass(frozen=True)
class ResetResult:
    path: Path
    usage_lost: bool  # the old file could not be trusted: the lifetime use starts from zero


def reset(state_dir: str, params: SAParams, seq: int, owner: int | None = None) -> ResetResult:
    """Store ``seq`` as SA ``params``' state (the daemon must be stopped: the SA's lock is
    taken, without waiting). Keeps the lifetime use of a readable old file. ``owner``: the
    workers' uid, whose the file is. Raises StateError (the directory, the lock) or OSError
    (the write)."""
    d = prepare_dir(state_dir)
    path = state_path(d, params)
    dfd = open_worker_dir(d, params.queue, owner)
    uid = owner
    try:
        lock = _Lock(path.with_suffix(".lock"), 0.0, dfd, uid)
        try:
            try:
                old = read(path, params, dfd, owner=uid)
            except StateError:
                old = None
            usage = old.usage if old is not None else None  # unknown: the lifetime starts again
            lost = old is None and path.exists()
            write(path, render(params, seq, usage), dfd,
                  None if owner is None else (owner, os.getegid()))
        finally:
            lock.release()
    finally:
        os.close(dfd)
    return ResetResult(path, lost)

"""Protecting the keys: files that only the daemon's user controls, and no core dumps.

Files. The configuration, key files, ``state_dir`` and the state files decide which keys are
used and which sequence numbers are safe to send. Whoever can write them can make us repeat
nonces, so they must belong to the user that runs nfq-ipsec (the effective uid) and must not be
writable by group or others. :func:`open_checked` opens a file without following a symbolic
link in its last component (``O_NOFOLLOW``) and checks the *opened* file's own ``fstat``, so a
link, or a file swapped in between a check and the open, is never used.

Core dumps. A core dump of a process that holds keys writes the keys to disk (or hands them to
a crash handler). :func:`disable_core_dumps` sets ``RLIMIT_CORE`` to 0 (inherited by children)
and clears the process's dumpable flag (``PR_SET_DUMPABLE``, which also keeps other processes
of the same uid without CAP_SYS_PTRACE from attaching to it or reading its memory through
/proc). The flag is reset by ``execve``, so every process (the supervisor and each worker)
calls it itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import resource
import stat
from typing import Any

PR_SET_DUMPABLE = 4  # <linux/prctl.h>
PR_GET_DUMPABLE = 3


class UnsafeFileError(Exception):
    """A file or directory that someone other than the daemon's user could have controlled."""


def problem(st: os.stat_result, path: object, forbid: int, fix: str | None = None) -> str | None:
    """What is wrong with a file whose ``fstat`` is ``st`` (None: nothing): not owned by the
    effective uid, or mode bits in ``forbid`` set. ``fix``: the chmod advice for the mode."""
    euid = os.geteuid()
    if st.st_uid != euid:
        return (f"{path} is owned by uid {st.st_uid}, not by uid {euid} that runs nfq-ipsec; "
                f"only that user may control it (chown {euid} {path})")
    mode = stat.S_IMODE(st.st_mode)
    if mode & forbid:
        what = "writable" if mode & forbid & 0o022 else "readable"
        return f"{path} is {what} by group or others (mode {mode:04o}); {fix or f'run chmod go-w {path}'}"
    return None


def open_checked(path: str | os.PathLike[str], *, forbid: int = 0o022, directory: bool = False,
                 dir_fd: int | None = None, fix: str | None = None) -> tuple[int, os.stat_result]:
    """Open ``path`` read-only without following a final symbolic link and check the opened
    file: a regular file (a directory with ``directory``), owned by the effective uid, no mode
    bits of ``forbid``. With ``dir_fd``, ``path``'s last component is opened relative to it.
    Returns the descriptor and its stat. Raises UnsafeFileError (the message names the path and
    what is wrong) or OSError (for example FileNotFoundError)."""
    name = os.path.basename(os.fspath(path)) if dir_fd is not None else os.fspath(path)
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK  # no hang on a FIFO
    if directory:
        flags |= os.O_DIRECTORY
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            try:
                link = stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
            except OSError:
                link = False
            if link:
                raise UnsafeFileError(f"{path} is a symbolic link; name the file itself") from None
            if directory and err.errno == errno.ENOTDIR:
                raise UnsafeFileError(f"{path} is not a directory") from None
        raise
    try:
        st = os.fstat(fd)
        kind_ok = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
        if not kind_ok:
            raise UnsafeFileError(f"{path} is not a {'directory' if directory else 'regular file'}")
        bad = problem(st, path, forbid, fix)
        if bad is not None:
            raise UnsafeFileError(bad)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_checked(path: str | os.PathLike[str], limit: int, *, forbid: int = 0o022,
                 fix: str | None = None) -> bytes:
    """The content of a file :func:`open_checked` accepts, refusing one over ``limit`` bytes
    (UnsafeFileError)."""
    fd, st = open_checked(path, forbid=forbid, fix=fix)
    try:
        if st.st_size > limit:
            raise UnsafeFileError(f"{path} is over {limit} bytes")
        chunks = []
        total = 0
        while total <= limit:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise UnsafeFileError(f"{path} is over {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


# -- core dumps --------------------------------------------------------------------------------
def _prctl() -> Any:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = libc.prctl
    fn.restype = ctypes.c_int
    return fn


def disable_core_dumps() -> None:
    """No core dump of this process (or of children it starts, for RLIMIT_CORE). Raises
    OSError if the kernel refuses: a process holding keys must not go on dumpable."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    prctl = _prctl()
    if prctl(PR_SET_DUMPABLE, ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0),
             ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_DUMPABLE, 0): {os.strerror(err)}")


def dumpable() -> bool:
    """Whether this process may dump core (``PR_GET_DUMPABLE``)."""
    prctl = _prctl()
    return bool(prctl(PR_GET_DUMPABLE, ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0),
                      ctypes.c_ulong(0)))

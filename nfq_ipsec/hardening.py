"""Protecting the keys: files that only the daemon's user controls, and no core dumps.

Files. The configuration, key files, ``state_dir`` and the state files decide which keys are
used and which sequence numbers are safe to send. Whoever can write them can make us repeat
nonces, so they must belong to the user that runs nfq-ipsec (the effective uid) and must not be
writable by group or others. :func:`open_checked` opens a file without following a symbolic
link in its last component (``O_NOFOLLOW``) and checks the *opened* file's own ``fstat``, so a
link, or a file swapped in between a check and the open, is never used.

A file is only as safe as the directories on its path: whoever can write one of them can
rename the file away and put another in its place (or replace a directory or link further
down). So :func:`check_parents` walks the path from ``/`` the way the kernel resolves it,
following symbolic links in the directories on the way, and refuses a directory that another
user owns (root and the effective uid may) or that group or others may write without the
sticky bit, and, in a directory others may write (``/tmp``: sticky, so they can't touch an
entry that is not theirs), a link or directory that another user owns. Since only root and the
daemon's user can change these directories, the path still leads to the same file when it is
opened.

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
from collections.abc import Iterator
from typing import Any

PR_SET_DUMPABLE = 4  # <linux/prctl.h>
PR_GET_DUMPABLE = 3
MAX_LINKS = 40  # symbolic links followed on one path, as the kernel allows


class UnsafeFileError(Exception):
    """A file or directory that someone other than the daemon's user could have controlled."""


class UnsafePathError(UnsafeFileError):
    """A directory or link on the way to a file that someone else could change; the message
    names that directory or link and the fix."""


def problem(st: os.stat_result, path: object, forbid: int, fix: str | None = None,
            owner: int | None = None) -> str | None:
    """What is wrong with a file whose ``fstat`` is ``st`` (None: nothing): not owned by the
    effective uid (by ``owner`` if given: the workers' user, for their state files), or mode
    bits in ``forbid`` set. ``fix``: the chmod advice for the mode."""
    euid = os.geteuid() if owner is None else owner
    if st.st_uid != euid:
        who = "that runs nfq-ipsec" if owner is None else "that runs nfq-ipsec's workers"
        return (f"{path} is owned by uid {st.st_uid}, not by uid {euid} {who}; "
                f"only that user may control it (chown {euid} {path})")
    mode = stat.S_IMODE(st.st_mode)
    if mode & forbid:
        what = "writable" if mode & forbid & 0o022 else "readable"
        return f"{path} is {what} by group or others (mode {mode:04o}); {fix or f'run chmod go-w {path}'}"
    return None


def _trusted_owner(uid: int, owner: int | None = None) -> bool:
    return uid in (0, os.geteuid()) or (owner is not None and uid == owner)


def _owners() -> str:
    euid = os.geteuid()
    return "root that runs nfq-ipsec" if euid == 0 else f"root or uid {euid} that runs nfq-ipsec"


def _on_the_way(path: str) -> Iterator[tuple[str, os.stat_result, bool]]:
    """Each directory and symbolic link the kernel passes through to reach the last component
    of ``path`` (which is not included), from ``/``: its resolved path, its ``lstat``, and
    whether the directory holding it may be written by group or others. Stops at a component
    that does not exist (or is not a directory): there is nothing more to check."""
    start = path if path.startswith("/") else os.path.join(os.getcwd(), path)
    todo = [c for c in os.path.dirname(start.rstrip("/") or "/").split("/") if c]
    todo.reverse()  # a stack: the next component last
    current = "/"
    st = os.lstat(current)
    yield current, st, False
    open_dirs = {current: bool(stat.S_IMODE(st.st_mode) & 0o022)}
    links = 0
    while todo:
        name = todo.pop()
        if name == ".":
            continue
        if name == "..":
            current = os.path.dirname(current)
            continue
        nxt = os.path.join(current, name)
        try:
            st = os.lstat(nxt)
        except (FileNotFoundError, NotADirectoryError):
            return
        yield nxt, st, open_dirs[current]
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_LINKS:
                raise UnsafePathError(f"{path}: too many symbolic links on the way")
            target = os.readlink(nxt)
            if target.startswith("/"):
                current = "/"
            todo.extend(reversed([c for c in target.split("/") if c]))
            continue
        if not stat.S_ISDIR(st.st_mode):
            return
        current = nxt
        open_dirs[current] = bool(stat.S_IMODE(st.st_mode) & 0o022)


def check_parents(path: str | os.PathLike[str], owner: int | None = None) -> None:
    """Refuse ``path`` if someone other than root and the effective uid (and ``owner``, the
    workers' user, whose state directory holds their files) could replace it through a
    directory or link on its way from ``/`` (see the module's docstring). Raises
    UnsafePathError naming the directory or link and the fix. A missing part of the path ends
    the check (the caller's open or mkdir meets it)."""
    name = os.fspath(path)
    for where, st, in_open_dir in _on_the_way(name):
        link = stat.S_ISLNK(st.st_mode)
        if not _trusted_owner(st.st_uid, owner) and (not link or in_open_dir):
            fix = ("can replace the link; name the file by a path without it" if link
                   else f"can put another file in its place; run chown root {where}")
            raise UnsafePathError(
                f"{where} (a {'symbolic link' if link else 'directory'} on the path to {name}) is "
                f"owned by uid {st.st_uid}, not by {_owners()}: that user {fix}")
        mode = stat.S_IMODE(st.st_mode)
        if not link and mode & 0o022 and not mode & stat.S_ISVTX:
            raise UnsafePathError(
                f"{where} (a directory on the path to {name}) is writable by group or others "
                f"(mode {mode:04o}) and not sticky: they can put another file in its place; run "
                f"chmod go-w {where}")


def open_checked(path: str | os.PathLike[str], *, forbid: int = 0o022, directory: bool = False,
                 dir_fd: int | None = None, fix: str | None = None,
                 owner: int | None = None) -> tuple[int, os.stat_result]:
    """Open ``path`` read-only without following a final symbolic link and check the opened
    file: a regular file (a directory with ``directory``), owned by the effective uid (by
    ``owner`` if given, :func:`problem`), no mode
    bits of ``forbid``; and, without ``dir_fd``, every directory and link on its path
    (:func:`check_parents`). With ``dir_fd`` (a directory checked when it was opened),
    ``path``'s last component is opened relative to it. Returns the descriptor and its stat.
    Raises UnsafeFileError (the message names the path and what is wrong) or OSError (for
    example FileNotFoundError)."""
    if dir_fd is None:
        check_parents(path, owner)
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
        bad = problem(st, path, forbid, fix, owner)
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

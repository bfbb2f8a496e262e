"""A worker's sandbox: an unprivileged user, one capability, no new privileges, a seccomp
allow-list.

A worker holds its own queue's keys and nothing else; the sandbox makes sure that a worker
someone took over (a bug in a parser, in a crypto library) can do no more than a running worker
does. The worker enters it (:func:`enter`) once it has bound its queue, opened every socket and
file it will use and imported every module it will run; from then on:

- it runs as ``daemon.worker_user`` (a system user of its own, ``nfq-ipsec`` by default), with
  no supplementary groups, so the key files (the supervisor's user's, mode 0600), the
  configuration, other queues' state directories and other processes are not its own;
- of root's capabilities it keeps ``CAP_NET_ADMIN`` only (in its effective and permitted sets;
  the bounding set is emptied of the rest): nfnetlink checks it on every message the worker
  sends, verdicts included, not only when it binds;
- ``no_new_privs`` is set and the process is not dumpable (so no sibling can ptrace it or read
  its memory through /proc, even under the same user);
- a seccomp filter (libseccomp through ``pyseccomp``) allows the system calls a running worker
  makes (:data:`ALLOWED`) and kills the process (``SCMP_ACT_KILL_PROCESS``: a SIGSYS death the
  supervisor reports) on any other: ``execve``, ``ptrace``, ``mount``, ``socket``, ``connect``,
  ``kill``... ``openat`` is allowed only relative to the worker's own state directory (the
  descriptor opened before); any other open fails with ``EACCES`` instead of killing, so that
  a traceback's source lines, which Python reads lazily, cost a line of the log and not the
  worker. A path such as ``../q1/...`` from its own directory fails too: the state directory
  above it belongs to root with mode 0700.

``daemon.sandbox = "log"`` installs the same filter with ``SCMP_ACT_LOG`` as its default: a
system call outside the list is allowed and the kernel logs it (audit type 1326, with its
number), the way to find one a new code path needs. ``"off"`` leaves the worker root.

What the worker needs after :func:`enter` must be there before: nothing may be imported
lazily on the packet path (an ``import`` then fails), and no socket opened lazily.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import pwd
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

DEFAULT_USER = "nfq-ipsec"
MODES = ("enforce", "log", "off")
DEFAULT_MODE = "enforce"

CAP_NET_ADMIN = 12  # <linux/capability.h>
_CAPS_VERSION_3 = 0x20080522
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SIOCGIFNAME = 0x8910  # an interface's name from its index, on a socket opened before
AUDIT_SECCOMP = 1326  # the audit record type of a seccomp action the kernel logged

# What a running worker does: its queue and pipe (poll, recv, send), verdicts and raw sends on
# sockets it holds (sendto, sendmsg, sendmmsg), its state files through its directory's
# descriptor (openat below, fstat, flock, pwrite, ftruncate, fsync, renameat, unlinkat),
# memory, time, signals (the wake-up descriptor), randomness and exit. Found by running the
# lab's tests with ``daemon.sandbox = "log"`` and reading the kernel's audit lines.
ALLOWED = (
    "read", "readv", "write", "writev", "pread64", "pwrite64", "lseek", "close",
    "fstat", "newfstatat", "statx", "fcntl", "flock", "fsync", "fdatasync", "ftruncate",
    "renameat", "renameat2", "unlinkat", "getdents64",
    "poll", "ppoll", "select", "pselect6", "epoll_wait", "epoll_pwait",
    "recvfrom", "recvmsg", "recvmmsg", "sendto", "sendmsg", "sendmmsg", "getsockopt",
    "getsockname", "getpeername",
    "mmap", "munmap", "mremap", "brk", "madvise", "mprotect",
    "futex", "sched_yield", "clock_gettime", "clock_nanosleep", "nanosleep", "gettimeofday",
    "getrandom", "getpid", "gettid", "getuid", "geteuid", "getgid", "getegid",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "restart_syscall",
    "exit", "exit_group",
)
OPENS = ("open", "creat", "openat2")  # never (openat: relative to the state directory only)


class SandboxError(Exception):
    """The sandbox can't be entered (a missing user, a refused system call); the message names
    the setting and the fix. A worker that can't enter it does not start (fail closed)."""


@dataclass(frozen=True)
class Identity:
    """The user a worker runs as."""

    name: str
    uid: int
    gid: int


def lookup(user: str) -> Identity:
    """The system user ``user`` (``daemon.worker_user``). Raises SandboxError with the fix."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise SandboxError(
            f"daemon.worker_user: no user {user!r} on this host; create it with `useradd "
            f"--system --no-create-home --shell /usr/sbin/nologin {user}` (scripts/install-deps "
            f"and scripts/install-service do), or set daemon.sandbox = \"off\"") from None
    if pw.pw_uid == 0:
        raise SandboxError(f"daemon.worker_user: {user!r} is root (uid 0): name an unprivileged "
                           "user, or set daemon.sandbox = \"off\"")
    return Identity(user, pw.pw_uid, pw.pw_gid)


def worker_owner(mode: str, user: str) -> int | None:
    """The uid that owns the workers' state directories and files: the worker user's when the
    sandbox is on, None (the daemon's own, root) when it is off. Raises SandboxError."""
    return None if mode == "off" else lookup(user).uid


# -- the steps ----------------------------------------------------------------------------------
_libc: Any = None


def _c() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _prctl(option: int, arg: int = 0) -> None:
    if _c().prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                  ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _capset(keep: Iterable[int]) -> None:
    """Effective and permitted capabilities: ``keep`` only; inheritable: none."""
    bits = 0
    for cap in keep:
        bits |= 1 << cap
    header = _CapHeader(_CAPS_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        word = (bits >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = word
        data[i].inheritable = 0
    if _c().capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def drop_user(identity: Identity, keep: Iterable[int] = (CAP_NET_ADMIN,)) -> None:
    """Become ``identity`` (no supplementary groups) keeping the capabilities ``keep`` only,
    also out of the bounding set and the ambient set. Raises SandboxError."""
    try:
        _drop_user(identity, tuple(keep))
    except OSError as err:
        raise SandboxError(f"cannot become {identity.name} (uid {identity.uid}): {err}") from None


def _drop_user(identity: Identity, keep: tuple[int, ...]) -> None:
    for cap in range(_last_cap() + 1):
        if cap not in keep:
            with contextlib.suppress(OSError):  # EINVAL: a capability this kernel lacks
                _prctl(PR_CAPBSET_DROP, cap)
    with contextlib.suppress(OSError):
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    _prctl(PR_SET_KEEPCAPS, 1)  # the permitted set survives the change of uid...
    os.setgroups([])
    os.setresgid(identity.gid, identity.gid, identity.gid)
    os.setresuid(identity.uid, identity.uid, identity.uid)
    _prctl(PR_SET_KEEPCAPS, 0)
    _capset(keep)  # ...and the effective set is made again from it


def no_new_privs() -> None:
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def install_filter(state_fd: int | None, mode: str = DEFAULT_MODE,
                   children: tuple[int, ...] = ()) -> None:
    """The seccomp allow-list (see the module's docstring); ``state_fd``: the one directory
    ``openat`` may open in (None: none). ``mode`` "log": log instead of killing.
    ``children``: the worker's crypto offload helpers (``crypto.offload_helpers``), forked
    before the filter: the worker may kill these pids, and only these (a helper that hangs is
    cut off), and reap its children (``wait4``)."""
    import pyseccomp as seccomp  # loads libseccomp: only a worker that enters the sandbox

    default = seccomp.LOG if mode == "log" else seccomp.KILL_PROCESS
    f = seccomp.SyscallFilter(default)
    for name in ALLOWED:
        f.add_rule(seccomp.ALLOW, name)
    denied = seccomp.ERRNO(errno.EACCES)
    for name in OPENS:
        f.add_rule(denied, name)
    if state_fd is None:
        f.add_rule(denied, "openat")
    else:
        f.add_rule(seccomp.ALLOW, "openat", seccomp.Arg(0, seccomp.EQ, state_fd))
        f.add_rule(denied, "openat", seccomp.Arg(0, seccomp.NE, state_fd))
    f.add_rule(seccomp.ALLOW, "ioctl", seccomp.Arg(1, seccomp.EQ, SIOCGIFNAME))
    for pid in children:
        f.add_rule(seccomp.ALLOW, "kill", seccomp.Arg(0, seccomp.EQ, pid))
    if children:
        f.add_rule(seccomp.ALLOW, "wait4")
    f.load()


def enter_filter(state_fd: int | None, mode: str = DEFAULT_MODE,
                 children: tuple[int, ...] = ()) -> None:
    """After :func:`drop_user`: ``no_new_privs``, not dumpable (a change of uid makes the
    process dumpable again as ``fs.suid_dumpable`` says), the filter. Raises SandboxError."""
    from . import hardening

    try:
        no_new_privs()
        hardening.disable_core_dumps()
        install_filter(state_fd, mode, children)
    except OSError as err:
        raise SandboxError(f"cannot enter the sandbox: {err}; daemon.sandbox = \"off\" runs the "
                           "workers as root") from None


def enter(identity: Identity, state_fd: int | None, mode: str = DEFAULT_MODE) -> None:
    """All of it, in order: :func:`drop_user`, :func:`enter_filter`. Raises SandboxError."""
    drop_user(identity)
    enter_filter(state_fd, mode)


# -- what the supervisor and the tests read ----------------------------------------------------
def proc_status(pid: int) -> dict[str, str]:
    """The fields of /proc/PID/status (Uid, CapEff, NoNewPrivs, Seccomp...)."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


_AUDIT = re.compile(r"type=1326 .*? pid=(\d+) .*? syscall=(\d+)")


def seccomp_syscall(pid: int, kmsg: str = "/dev/kmsg") -> int | None:
    """The system call seccomp killed process ``pid`` for, from the kernel's audit line
    (``type=1326 ... pid=PID ... syscall=N``) in the kernel log; None if it is not there (an
    audit daemon took it, the log's rate limit dropped it, or no permission to read it)."""
    try:
        fd = os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    found: int | None = None
    try:
        for _ in range(100_000):  # the ring buffer holds far fewer records
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno == errno.EPIPE:  # overwritten while reading: go on
                    continue
                break
            if not record:
                break
            for m in _AUDIT.finditer(record.decode(errors="replace")):
                if int(m.group(1)) == pid:
                    found = int(m.group(2))  # the last one: the one that killed it
    finally:
        os.close(fd)
    return found


def syscall_name(number: int) -> str | None:
    """The name of system call ``number`` on this machine's architecture, if libseccomp knows
    it."""
    try:
        import pyseccomp as seccomp

        name = seccomp.resolve_syscall(seccomp.Arch.NATIVE, number)
    except Exception:  # an unknown number, or no libseccomp
        return None
    return name.decode() if isinstance(name, bytes) else str(name)

"""Hosts for the lab: network namespaces, veth pairs, addresses, routes, sysctls, processes.

Everything the lab creates is recorded in a :class:`Lab` and removed on every exit path: the
``with`` block's end, an exception, Ctrl-C (SIGINT), SIGTERM/SIGHUP (turned into SystemExit so
``finally`` blocks run) and interpreter exit (atexit). Processes are stopped first (SIGTERM,
then SIGKILL, each by its pid: only processes this lab started, or their descendants still
inside one of this lab's namespaces), then the namespaces are deleted.

Namespace names are unique per run: ``nfql<pid>-<counter><suffix>``, so two runs never
collide, and a lab left behind by a run that was killed with SIGKILL can be recognised (its pid
is gone) and removed by the next run (:func:`remove_stale`).

A :class:`Host` is "somewhere commands run": the base class runs them here, :class:`Netns`
prefixes ``ip netns exec NAME``. The traffic and capture helpers only use ``Host.argv``, so a
two-VM lab can reuse them with a host class that prefixes ``ssh`` (or ``vagrant ssh -c``).

The root tests build their namespace pairs with the same :class:`Lab` (``tests/labutil.py``),
with another name prefix and IPv6 left on.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from nfq_ipsec import procs

PREFIX = "nfql"
# Set, it replaces every lab's name prefix (two test runs on one machine keep apart by it).
PREFIX_ENV = "NFQ_IPSEC_LAB_PREFIX"


def _name_re(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(prefix)}(\d+)-\d+[a-z0-9]*$")


_NAME_RE = _name_re(PREFIX)
_counter = 0


class LabError(Exception):
    """A lab step failed. The message names the command, its exit status and stderr."""


def run(
    argv: Sequence[str], *, check: bool = True, timeout: float = 60.0, input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, capturing text output. Raises LabError on failure.
    ``env``: its environment (default: ours), always with ``LC_ALL=C``."""
    try:
        res = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, input=input,
            env={**(os.environ if env is None else env), "LC_ALL": "C"},
        )
    except FileNotFoundError as err:
        raise LabError(f"{shlex.join(argv)}: {err.strerror}: {err.filename}") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{shlex.join(argv)}: no answer within {timeout:g} s") from None
    if check and res.returncode != 0:
        raise LabError(
            f"{shlex.join(argv)} failed (exit {res.returncode}): {res.stderr.strip() or res.stdout.strip()}"
        )
    return res


class Host:
    """A place to run commands. This base class is the local machine itself."""

    local = True  # commands run on this machine (its tools, its files)

    def __init__(self, name: str = "localhost", python: str = sys.executable) -> None:
        self.name = name
        self.python = python  # a Python 3 on that host (for the small traffic programs)

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """The local argv that runs ``cmd`` on this host."""
        return list(cmd)

    def run(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return run(self.argv(cmd), **kwargs)

    def sysctl(self, key: str, value: int | str) -> None:
        self.run(["sysctl", "-q", "-w", f"{key}={value}"])

    def read_sysctl(self, key: str) -> str:
        return self.run(["sysctl", "-n", key]).stdout.strip()

    # Files and background processes. Here (and in a namespace) the lab's work directory is
    # this machine's, and a process is signalled by its pid. A remote host (lab/vagrant.py)
    # maps the work directory onto its own disk, copies files across and signals its
    # processes there.
    def path(self, local: Path) -> str:
        """Where a file of the lab's work directory is on this host."""
        return str(local)

    def push(self, local: Path) -> None:
        """Make the local file available on this host at ``path(local)``."""

    def fetch(self, local: Path) -> None:
        """Copy ``path(local)`` on this host to the local file."""

    def background_argv(self, cmd: Sequence[str], tag: str) -> list[str]:
        """The local argv that runs ``cmd`` on this host as a background process of the lab
        (``tag``: unique among the lab's processes)."""
        return self.argv(cmd)

    def signal(self, proc: Started, signum: int) -> None:
        """Send ``signum`` to a background process started on this host."""
        os.kill(proc.pid, signum)

    def pid_of(self, proc: Started) -> int | None:
        """A background process's pid as this host sees it."""
        return proc.pid

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class Netns(Host):
    """A network namespace (``ip netns``)."""

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def ip(self, *args: str) -> None:
        run(["ip", "-n", self.name, *args])

    def addr(self, ifname: str, cidr: str) -> None:
        self.ip("addr", "add", cidr, "dev", ifname)

    def up(self, ifname: str) -> None:
        self.ip("link", "set", ifname, "up")

    def route(self, dest: str, via: str) -> None:
        self.ip("route", "add", dest, "via", via)

    def mac(self, ifname: str) -> str:
        res = run(["ip", "-n", self.name, "-br", "link", "show", ifname])
        return res.stdout.split()[2]

    def pids(self) -> list[int]:
        res = run(["ip", "netns", "pids", self.name], check=False)
        return [int(p) for p in res.stdout.split()]


@dataclass
class Started:
    """A process the lab started (by pid), with where its output goes."""

    name: str
    host: Host
    popen: subprocess.Popen[str]
    log: Path | None = None
    stop_signal: int = signal.SIGTERM

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    # What a Popen offers, for the process on its host.
    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def send_signal(self, signum: int) -> None:
        self.host.signal(self, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


@dataclass
class Lab:
    """Owns what a lab run creates: namespaces, processes, a private work directory."""

    keep: bool = False  # leave everything in place at close (for --keep)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="nfq-ipsec-lab-")))
    namespaces: list[Netns] = field(default_factory=list)
    processes: list[Started] = field(default_factory=list)
    closed: bool = False
    tag: str = ""
    prefix: str = PREFIX  # namespace names: <prefix><pid>-<n><suffix>

    def __post_init__(self) -> None:
        global _counter
        _counter += 1
        self.prefix = os.environ.get(PREFIX_ENV) or self.prefix
        self.tag = f"{self.prefix}{os.getpid()}-{_counter}"
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)
        self._old_handlers: dict[int, Any] = {}
        atexit.register(self.close)

    # -- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        self.install_signal_handlers()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGHUP become SystemExit, so ``finally`` blocks and close() run."""
        if self._old_handlers:
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(ValueError):  # not the main thread: leave handlers alone
                self._old_handlers[sig] = signal.signal(sig, _exit_on_signal)

    def close(self) -> None:
        """Stop our processes, delete our namespaces, remove the work directory. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for sig, old in self._old_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, old)
        self._old_handlers.clear()
        atexit.unregister(self.close)
        if self.keep:
            return
        # Ignore Ctrl-C while tearing down: a half-removed lab is worse than a slow one.
        with _signals_deferred():
            errors = []
            for proc in reversed(self.processes):
                try:
                    self.stop(proc)
                except Exception as err:  # keep going: the namespaces must still go
                    errors.append(f"stopping {proc.name}: {err}")
            for ns in reversed(self.namespaces):
                try:
                    self._kill_leftovers(ns)
                    run(["ip", "netns", "del", ns.name], check=False)
                except Exception as err:
                    errors.append(f"deleting {ns.name}: {err}")
            self.namespaces.clear()
            _rmtree(self.workdir)
            for e in errors:
                print(f"lab cleanup: {e}", file=sys.stderr)

    def removal_commands(self) -> list[str]:
        """Shell commands that remove what --keep left in place."""
        cmds = [f"kill {p.pid}" for p in self.processes if p.popen.poll() is None]
        cmds += [f"ip netns del {ns.name}" for ns in self.namespaces]
        cmds.append(f"rm -rf {shlex.quote(str(self.workdir))}")
        return cmds

    # -- namespaces and links -------------------------------------------------------------
    def netns(self, suffix: str, ipv6: bool = False) -> Netns:
        """Create a namespace ``<tag><suffix>`` with loopback up and, unless ``ipv6``, IPv6 off.

        IPv6 is switched off because the daemon protects IPv4 only: link-local IPv6 chatter
        (router solicitations, MLD) would otherwise cross the wire in clear and blur the
        "only ESP on the wire" check. (The leak tests keep it on: they check what the daemon's
        rules do with IPv6.)
        """
        ns = Netns(f"{self.tag}{suffix}")
        run(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)
        ns.up("lo")
        for key in () if ipv6 else ("net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6"):
            with contextlib.suppress(LabError):  # a kernel without IPv6 has nothing to switch off
                ns.sysctl(key, 1)
        return ns

    def veth(self, a: Netns, a_if: str, b: Netns, b_if: str) -> None:
        """A veth pair with one end in each namespace, both ends up."""
        run(["ip", "link", "add", a_if, "netns", a.name, "type", "veth", "peer", "name", b_if,
             "netns", b.name])
        a.up(a_if)
        b.up(b_if)

    # -- processes ------------------------------------------------------------------------
    def start(
        self, name: str, host: Host, cmd: Sequence[str], *, stop_signal: int = signal.SIGTERM,
        env: Mapping[str, str] | None = None, log: Path | None = None,
    ) -> Started:
        """Start ``cmd`` on ``host`` in the background. Its output goes to ``log`` (appended:
        a restart continues the same file) or else to a new log in workdir. ``env``: its
        environment (default: ours), always with ``LC_ALL=C`` and ``PYTHONUNBUFFERED=1``."""
        logpath = log
        if logpath is None:
            logpath = self.workdir / f"{name}.log"
            n = 1
            while logpath.exists():
                n += 1
                logpath = self.workdir / f"{name}-{n}.log"
        out = logpath.open("a")
        argv = host.background_argv(cmd, logpath.stem)
        try:
            popen = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, text=True, start_new_session=True,
                env={**(os.environ if env is None else env), "LC_ALL": "C", "PYTHONUNBUFFERED": "1"},
            )
        except FileNotFoundError as err:
            raise LabError(f"{shlex.join(argv)}: {err.strerror}") from None
        finally:
            out.close()
        started = Started(name, host, popen, logpath, stop_signal)
        self.processes.append(started)
        return started

    def stop(self, proc: Started, timeout: float = 10.0) -> int | None:
        """Stop one process we started: its stop signal, then SIGKILL. Returns its exit code."""
        p = proc.popen
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError, LabError):
                proc.host.signal(proc, proc.stop_signal)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, LabError):
                    proc.host.signal(proc, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.wait(5)
        if p.stdout is not None:
            p.stdout.close()
        return p.returncode

    def _kill_leftovers(self, ns: Netns) -> None:
        """Descendants of our processes still in our namespace (a worker whose supervisor was
        killed): SIGKILL each by pid, or the namespace would live on after ``ip netns del``."""
        for pid in ns.pids():
            if pid == os.getpid():
                continue
            print(f"lab cleanup: process {pid} still in {ns.name}, killing it", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while ns.pids() and time.monotonic() < deadline:
            time.sleep(0.05)


def remove_stale(log: IO[str] | None = None, prefix: str = PREFIX, what: str = "lab run") -> list[str]:
    """Delete namespaces of labs named ``<prefix><pid>-...`` whose run is gone (killed with
    SIGKILL). ``what``: the kind of run, for the message."""
    pattern = _name_re(prefix)
    res = run(["ip", "netns", "list"], check=False)
    removed = []
    for line in res.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = pattern.match(name)
        if not m or procs.alive(int(m.group(1))):
            continue
        ns = Netns(name)
        if ns.pids():  # something still runs in it: not ours to kill
            continue
        run(["ip", "netns", "del", name], check=False)
        removed.append(name)
        if log is not None:
            print(f"removed namespace {name} left behind by an earlier {what}", file=log)
    return removed


def lab_namespaces() -> list[str]:
    """Every lab namespace on this machine (any run)."""
    res = run(["ip", "netns", "list"], check=False)
    return [n for n in (line.split()[0] for line in res.stdout.splitlines() if line.split())
            if _NAME_RE.match(n)]


def wait_gone(pids: Iterable[int], timeout: float = 30.0) -> None:
    """Until none of ``pids`` is alive; LabError after ``timeout``."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while any(procs.alive(p) for p in pids):
        if time.monotonic() > deadline:
            raise LabError(f"still alive after {timeout:g} s: {[p for p in pids if procs.alive(p)]}")
        time.sleep(0.05)


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP off during cleanup; re-raise the first one after it."""
    got: list[int] = []
    old: dict[int, Any] = {}

    def note(signum: int, frame: FrameType | None) -> None:
        got.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):
            old[sig] = signal.signal(sig, note)
    try:
        yield
    finally:
        for num, handler in old.items():
            signal.signal(num, handler)
        if got:
            if got[0] == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + got[0])


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)

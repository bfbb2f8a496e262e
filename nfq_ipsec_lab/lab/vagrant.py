"""Hosts reached through a remote shell: the two VMs of the Vagrant lab.

The lab's traffic, capture and daemon helpers (``traffic``, ``daemon``, ``checks``) only ever
call a :class:`~nfq_ipsec_lab.lab.netns.Host`: ``argv``/``run`` for commands, ``path``/``push``/
``fetch`` for files of the lab's work directory, ``background_argv``/``signal`` for processes
the lab starts and stops. :class:`RemoteHost` implements those over a *transport*, an argv
that takes one shell command line as its last argument and runs it on the other machine:

- a command becomes one command line, ``sudo -n env LC_ALL=C [prefix] cmd...``, quoted once
  with :func:`shlex.join` (ssh joins its remote arguments with spaces and the login shell
  parses the result, so quoting each argument for that shell is the only correct way);
  ``prefix`` is, for example, ``ip netns exec nfq-lan`` for the LAN namespace inside a VM;
- the lab's local work directory maps onto ``remote_root`` there (mode 0700): ``push`` copies a
  local file over (``cat >``), ``fetch`` copies one back (``cat``), both as raw bytes;
- a background process is wrapped in ``sh -c 'echo $$ > PIDFILE; exec env
  NFQ_IPSEC_LAB_PROC=PIDFILE cmd...'``: ``signal`` sends the lab's stop signal to *that* pid on
  the remote machine (killing the local ssh would only orphan it, and tcpdump must get SIGINT
  to print its counters), so the remote process ends the way it would here and its output
  still comes back through the transport, which ends with it. Only a process whose
  environment carries its own pidfile's name is signalled, so a recycled pid is never hit;
- :meth:`RemoteHost.cleanup` kills what is still running (the same way) and removes
  ``remote_root``.

:func:`vagrant_host` builds the transport for a VM from ``vagrant ssh-config`` (written once to a
file): ``ssh -F FILE -T -o BatchMode=yes -- NAME COMMAND-LINE``. That is what ``vagrant ssh``
runs underneath; calling ``vagrant ssh NAME -c`` for every command instead would start Ruby and
load the Vagrantfile each time (about a second; a check runs a few hundred commands, most of
them short polls) and allocate a terminal by default, which turns the binary capture into text
and folds stderr into stdout.

The namespace test (``tests/lab/test_vagrant.py``) uses the same class with the transport
``nsenter --net=/run/netns/NS sh -c``: one command line for a shell on the "other machine",
exactly what sshd does with it, so everything but ssh itself runs as it does on the VMs.
"""

from __future__ import annotations

import os
import shlex
import signal as _signal
import subprocess
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from .netns import Host, LabError, Started

REMOTE_PYTHON = "/usr/bin/python3"
SUDO = ("sudo", "-n")
PROC_ENV = "NFQ_IPSEC_LAB_PROC"

# Signal the processes whose pidfiles are given, if the process is still the one the pidfile
# names (its environment carries the pidfile's path); used for stop signals and for cleanup.
# Arguments: $0 (a name, unused), the signal's name, the pidfiles.
KILL_SH = r"""sig=$1; shift
for f in "$@"; do
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qxF "NFQ_IPSEC_LAB_PROC=$f"; then
    kill -s "$sig" "$pid" 2>/dev/null || true
  fi
done"""

WRAP_SH = 'echo $$ > "$0" && exec env NFQ_IPSEC_LAB_PROC="$0" "$@"'


class RemoteHost(Host):
    """A machine (or a namespace on it) reached through a remote-shell transport."""

    local = False

    def __init__(
        self, name: str, transport: Sequence[str], local_root: Path, remote_root: str,
        prefix: Sequence[str] = (), sudo: Sequence[str] = SUDO, python: str = REMOTE_PYTHON,
    ) -> None:
        super().__init__(name, python)
        if not remote_root.startswith("/") or remote_root.rstrip("/") in ("", "/tmp", "/var/tmp"):
            raise ValueError(f"remote_root must be a private absolute directory, not {remote_root!r}")
        self.transport = list(transport)
        self.local_root = local_root
        self.remote_root = remote_root.rstrip("/")
        self.prefix = list(prefix)
        self.sudo = list(sudo)

    def within(self, name: str, prefix: Sequence[str]) -> RemoteHost:
        """The same machine with a command prefix (``ip netns exec NS``): same files, same pids."""
        return RemoteHost(name, self.transport, self.local_root, self.remote_root,
                          [*self.prefix, *prefix], self.sudo, self.python)

    # -- commands -------------------------------------------------------------------------
    def command_line(self, cmd: Sequence[str], *, prefix: bool = True) -> str:
        """The shell command line the other machine runs for ``cmd``."""
        return shlex.join([*self.sudo, "env", "LC_ALL=C", *(self.prefix if prefix else []), *cmd])

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return [*self.transport, self.command_line(cmd)]

    def _raw(self, script: str, *args: str, stdin: bytes | None = None,
             timeout: float = 120.0) -> subprocess.CompletedProcess[bytes]:
        """``sh -c script args`` on the machine itself (no prefix), bytes in and out."""
        argv = [*self.transport, self.command_line(["sh", "-c", script, *args], prefix=False)]
        try:
            return subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout,
                                  env={**os.environ, "LC_ALL": "C"})
        except FileNotFoundError as err:
            raise LabError(f"{shlex.join(argv[:1])}: {err.strerror}") from None
        except subprocess.TimeoutExpired:
            raise LabError(f"{self.name}: no answer within {timeout:g} s") from None

    # -- files ----------------------------------------------------------------------------
    def path(self, local: Path) -> str:
        try:
            rel = local.resolve().relative_to(self.local_root.resolve())
        except ValueError:
            raise LabError(f"{local} is not in the lab's work directory {self.local_root}") from None
        return str(PurePosixPath(self.remote_root, *rel.parts))

    def prepare(self) -> None:
        """Create ``remote_root`` (mode 0700) and its pidfile directory."""
        res = self._raw('umask 077 && mkdir -p "$0/pids" && chmod 700 "$0"', self.remote_root)
        if res.returncode != 0:
            raise LabError(f"{self.name}: cannot create {self.remote_root}: {_text(res.stderr)}")

    def push(self, local: Path) -> None:
        res = self._raw('umask 077 && mkdir -p "$(dirname "$0")" && cat > "$0"', self.path(local),
                        stdin=local.read_bytes())
        if res.returncode != 0:
            raise LabError(f"copying {local} to {self.name}: {_text(res.stderr)}")

    def fetch(self, local: Path) -> None:
        res = self._raw('cat "$0"', self.path(local), timeout=600)
        if res.returncode != 0:
            raise LabError(f"copying {self.path(local)} from {self.name}: {_text(res.stderr)}")
        fd = os.open(local, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(res.stdout)

    # -- background processes -------------------------------------------------------------
    def pidfile(self, tag: str) -> str:
        return f"{self.remote_root}/pids/{tag}.pid"

    def background_argv(self, cmd: Sequence[str], tag: str) -> list[str]:
        line = shlex.join([*self.sudo, "sh", "-c", WRAP_SH, self.pidfile(tag), "env", "LC_ALL=C",
                           *self.prefix, *cmd])
        return [*self.transport, line]

    def signal(self, proc: Started, signum: int) -> None:
        if proc.log is None:
            raise LabError(f"{proc.name}: not started by the lab")
        self._raw(KILL_SH, "nfq-ipsec-lab-kill", _signal.Signals(signum).name.removeprefix("SIG"),
                  self.pidfile(proc.log.stem))

    def pid_of(self, proc: Started) -> int | None:
        """The process's pid on the remote machine (None until it has started)."""
        if proc.log is None:
            return None
        res = self._raw('cat "$0" 2>/dev/null', self.pidfile(proc.log.stem))
        text = _text(res.stdout)
        return int(text) if text.isdigit() else None

    def cleanup(self) -> None:
        """SIGKILL every lab process still running there, then remove ``remote_root``."""
        script = KILL_SH + '\nrm -rf "$ROOT"'
        self._raw(f'ROOT=$0; {script}', self.remote_root, "KILL",
                  *[self.pidfile(t) for t in self._tags()])

    def _tags(self) -> list[str]:
        res = self._raw('ls "$0/pids" 2>/dev/null || true', self.remote_root)
        return [n.removesuffix(".pid") for n in _text(res.stdout).split() if n.endswith(".pid")]


def _text(data: bytes) -> str:
    return data.decode(errors="replace").strip()


# -- Vagrant -------------------------------------------------------------------------------------

def ssh_transport(ssh_config: Path, name: str) -> list[str]:
    """How to reach machine ``name`` of a ``vagrant ssh-config`` file."""
    return ["ssh", "-F", str(ssh_config), "-T", "-o", "BatchMode=yes", "-o", "ConnectTimeout=30",
            "-o", "ServerAliveInterval=15", "--", name]


def vagrant_host(name: str, ssh_config: Path, local_root: Path, remote_root: str) -> RemoteHost:
    return RemoteHost(name, ssh_transport(ssh_config, name), local_root, remote_root)


class Vagrant:
    """``vagrant`` in the lab's directory, with the lab's settings in its environment."""

    def __init__(self, directory: Path, env: dict[str, str] | None = None, echo: Any = None) -> None:
        self.directory = directory
        self.env = dict(env or {})
        self.echo = echo  # a text stream that sees the long commands' output (up, provision)

    def argv(self, args: Sequence[str]) -> list[str]:
        return ["vagrant", *args]

    def run(self, args: Sequence[str], *, stream: bool = False, timeout: float = 3600) -> str:
        """Run ``vagrant ARGS``; its output (``stream``: shown as it comes, for up/provision)."""
        env = {**os.environ, **self.env, "VAGRANT_CWD": str(self.directory)}
        argv = self.argv(args)
        if not (stream and self.echo is not None):
            try:
                res = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=self.directory,
                                     timeout=timeout)
            except FileNotFoundError:
                raise LabError("vagrant is not installed (Debian package 'vagrant')") from None
            if res.returncode != 0:
                raise LabError(f"{shlex.join(argv)} failed (exit {res.returncode}): "
                               f"{res.stderr.strip() or res.stdout.strip()}")
            return res.stdout
        print(f"$ {shlex.join(argv)}", file=self.echo, flush=True)
        try:
            proc = subprocess.Popen(argv, cwd=self.directory, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
        except FileNotFoundError:
            raise LabError("vagrant is not installed (Debian package 'vagrant')") from None
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            print(f"  {line.rstrip()}", file=self.echo, flush=True)
            tail = [*tail[-40:], line]
        code = proc.wait(timeout)
        if code != 0:
            raise LabError(f"{shlex.join(argv)} failed (exit {code}); its last lines:\n{''.join(tail)}")
        return "".join(tail)

    def ssh_config(self, machines: Sequence[str], path: Path) -> Path:
        text = self.run(["ssh-config", *machines])
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path


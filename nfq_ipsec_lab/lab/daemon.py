"""Running the real daemon on a lab host: ``nfq-ipsec run``, ``status --json``, SIGTERM.

One :class:`Daemon` for every caller: the lab session and its demo, the benchmark's test
beds, the two-VM check (on a remote host) and the root tests (``tests/labutil.py``), which
also crash it, restart it into the same log and put a wrapper such as ``setpriv`` in front.

The command is ``<python> -m nfq_ipsec.cli`` of this interpreter (the checkout or installed
package that runs the lab), or whatever ``NFQ_IPSEC_LAB_COMMAND`` says (split like a shell
would), for example an installed ``/opt/nfq-ipsec/bin/nfq-ipsec``.

:func:`iptables_snapshot` is how the lab proves that ``rules remove`` after a stop leaves the
host's firewall exactly as the daemon found it: every table of every iptables flavour present (legacy and
nf_tables), comments and packet counters removed, tables that hold nothing (built-in chains,
policy ACCEPT, no rules) left out, since a table that merely exists filters nothing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .labconfig import PeerConfig
from .netns import Host, Lab, LabError, Started, wait_gone

READY_TIMEOUT = 30.0
RUNNING_TIMEOUT = 60.0


def command() -> list[str]:
    env = os.environ.get("NFQ_IPSEC_LAB_COMMAND")
    return shlex.split(env) if env else [sys.executable, "-m", "nfq_ipsec.cli"]


@dataclass
class Daemon:
    """One daemon: started by a lab, asked for status, stopped with SIGTERM (or crashed)."""

    name: str
    host: Host
    config: Path
    cmd: list[str] = field(default_factory=command)
    env: dict[str, str] | None = None  # its environment and its commands' (default: ours)
    log: Path | None = None  # where its output goes, across restarts (default: the lab's workdir)
    lab: Lab | None = None  # the lab that starts and stops it (or the one given to start)
    proc: Started | None = None
    exit_code: int | None = None
    worker_pids: set[int] = field(default_factory=set)  # every worker pid status has shown

    @classmethod
    def of_peer(cls, peer: PeerConfig, host: Host, cmd: list[str] | None = None) -> Daemon:
        """A lab peer's daemon (its configuration from :mod:`labconfig`)."""
        return cls(peer.spec.name, host, peer.path, cmd if cmd is not None else command())

    def start(self, lab: Lab | None = None, prefix: Sequence[str] = ()) -> Started:
        """``nfq-ipsec run`` in the background; ``prefix``: a command to run it under."""
        self.lab = lab or self.lab
        if self.lab is None:
            raise LabError(f"daemon {self.name}: no lab to start it in")
        self.proc = self.lab.start(f"daemon-{self.name}", self.host,
                                   [*prefix, *self.cmd, "run", "--config", str(self.config)],
                                   env=self.env, log=self.log)
        return self.proc

    def ask(self, *args: str, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
        """``nfq-ipsec ARGS --config CONFIG`` on the daemon's host; whatever its exit status."""
        return self.host.run([*self.cmd, *args, "--config", str(self.config)], check=False,
                             timeout=timeout, env=self.env)

    def try_status(self) -> tuple[dict[str, Any] | None, str]:
        """``status --json``, or None and why not (not running yet, not answering...)."""
        res = self.ask("status", "--json")
        if res.returncode != 0:
            return None, (res.stderr or res.stdout).strip()[-200:] or f"exit {res.returncode}"
        try:
            status: dict[str, Any] = json.loads(res.stdout)
        except json.JSONDecodeError:
            return None, f"not JSON: {res.stdout.strip()[:200]!r}"
        self.worker_pids.update(w["pid"] for w in status.get("workers") or [] if w.get("pid"))
        return status, ""

    def status(self) -> dict[str, Any]:
        status, why = self.try_status()
        if status is None:
            raise LabError(f"nfq-ipsec status of daemon {self.name}: {why}")
        return status

    def status_text(self) -> str:
        res = self.ask("status")
        if res.returncode != 0:
            raise LabError(f"nfq-ipsec status of daemon {self.name} failed (exit {res.returncode}): "
                           f"{res.stderr.strip()}")
        return res.stdout

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = READY_TIMEOUT,
                 what: str = "") -> dict[str, Any]:
        """Until the daemon's status satisfies ``pred``; LabError if it exits or time runs out."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise LabError(f"daemon {self.name} exited with {self.proc.returncode} while waiting "
                               f"for {what or 'it'}; its log:\n{_tail(self.output())}")
            status, why = self.try_status()
            if status is not None:
                if pred(status):
                    return status
                last = f"answers, not yet: {_readiness(status)}"
            else:
                last = why
            time.sleep(0.2)
        raise LabError(f"daemon {self.name}: {what or 'condition'} not reached after {timeout:g} s "
                       f"({last}); its log:\n{_tail(self.output())}")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        """Until it answers status with its rules installed and every worker up."""
        return self.wait_for(_ready, timeout, "ready")

    def wait_running(self, timeout: float = RUNNING_TIMEOUT) -> dict[str, Any]:
        """Until its state is running and every worker's ready (again, after a restart)."""
        return self.wait_for(_running, timeout, "running")

    @staticmethod
    def worker_pid(status: dict[str, Any], index: int) -> int:
        pid = status["workers"][index]["pid"]
        if not isinstance(pid, int):
            raise LabError(f"worker {index} has no pid: {status['workers'][index]}")
        return pid

    @staticmethod
    def sa(status: dict[str, Any], name: str) -> dict[str, Any]:
        for sa in status["sas"]:
            if sa["name"] == name:
                return dict(sa)
        raise LabError(f"no SA {name!r} in the status")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (a clean stop: the daemon closes its rules), SIGKILL after ``timeout``.
        Its exit status (None if it never started)."""
        if self.proc is None or self.lab is None:
            return None
        self.exit_code = self.lab.stop(self.proc, timeout)
        return self.exit_code

    def crash(self, workers: bool = True) -> None:
        """SIGKILL the workers (if asked) and the supervisor, as a machine crash would; returns
        once they are gone. Local hosts (here or a namespace) only."""
        status = self.status()
        if self.proc is None:
            raise LabError(f"daemon {self.name} was not started")
        pids = [w["pid"] for w in status["workers"] if w["pid"]] if workers else []
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait(30)
        wait_gone(pids)

    def cleanup(self) -> None:
        """However things went: the daemon stopped and every worker of it that status ever
        showed and that still runs killed, each by pid (local hosts)."""
        if self.proc is not None and self.proc.poll() is None and self.lab is not None:
            self.lab.stop(self.proc, 15)
        for pid in self.worker_pids:
            if _is_worker(pid):
                os.kill(pid, signal.SIGKILL)

    def remove_rules(self) -> str:
        """``nfq-ipsec rules remove``: the deliberate act that takes a stopped daemon's closed
        rules out. Returns what it printed."""
        res = self.ask("rules", "remove", timeout=60)
        if res.returncode != 0:
            raise LabError(f"nfq-ipsec rules remove for daemon {self.name} failed "
                           f"(exit {res.returncode}): {res.stderr.strip()}")
        return res.stdout

    def output(self) -> str:
        """What it printed (its log), across restarts when it has a log of its own."""
        return self.proc.output() if self.proc else ""

    def log_text(self) -> str:
        """Its own log file, every start appended ("" before the first, or with no log)."""
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text()


def _ready(status: dict[str, Any]) -> bool:
    workers = status.get("workers") or []
    return bool(status.get("daemon", {}).get("rules_installed") and workers
                and all(w.get("pid") and w.get("packets_in") is not None for w in workers))


def _running(status: dict[str, Any]) -> bool:
    return bool(status["daemon"]["state"] == "running"
                and all(w["state"] == "ready" for w in status["workers"]))


def _is_worker(pid: int) -> bool:
    """Whether ``pid`` is still one of nfq-ipsec's worker processes."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return comm.startswith("nfq-ipsec-q") or b"multiprocessing" in cmdline


def _readiness(status: dict[str, Any]) -> str:
    d = status.get("daemon", {})
    ws = [f"q{w.get('queue')}:{w.get('state')}" for w in status.get("workers", [])]
    return f"state {d.get('state')}, rules_installed {d.get('rules_installed')}, workers {' '.join(ws)}"


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


# -- iptables snapshot ----------------------------------------------------------------------

_COUNTERS = re.compile(r"\s*\[\d+:\d+\]")
_BUILTIN = {"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"}
SAVE_TOOLS = ("iptables-legacy-save", "iptables-nft-save", "ip6tables-legacy-save",
              "ip6tables-nft-save")


def iptables_snapshot(host: Host) -> str:
    """The normalised ruleset of every iptables flavour on ``host``, IPv4 and IPv6."""
    tools = [t for t in SAVE_TOOLS if shutil.which(t)] or ["iptables-save", "ip6tables-save"]
    parts = []
    for tool in tools:
        res = host.run([tool], check=False)
        if res.returncode != 0:  # e.g. a kernel without legacy x_tables
            parts.append(f"## {tool}: unavailable ({res.stderr.strip()[:100]})")
            continue
        parts.append(f"## {tool}")
        parts.append(normalise_iptables_save(res.stdout))
    return "\n".join(parts) + "\n"


def normalise_iptables_save(text: str, keep_empty_tables: bool = False) -> str:
    """``iptables-save`` output without comments and counters; without the tables that hold
    nothing unless ``keep_empty_tables`` (a comparison of one iptables flavour as it is)."""
    tables: list[list[str]] = []
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            tables.append([line])
            continue
        if not tables:
            continue
        if line.startswith(":"):
            line = _COUNTERS.sub("", line)
        tables[-1].append(line)
    kept = []
    for table in tables:
        body = [line for line in table[1:] if line != "COMMIT"]
        empty = all(
            line.startswith(":") and line.split()[0][1:] in _BUILTIN and line.split()[1] == "ACCEPT"
            for line in body
        )
        if keep_empty_tables or not empty:
            kept.extend(table)
    return "\n".join(kept)

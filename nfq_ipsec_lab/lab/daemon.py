"""Running the real daemon on a lab host: ``nfq-ipsec run``, ``status --json``, SIGTERM.

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
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from .labconfig import PeerConfig
from .netns import Host, Lab, LabError, Started

READY_TIMEOUT = 30.0


def command() -> list[str]:
    env = os.environ.get("NFQ_IPSEC_LAB_COMMAND")
    return shlex.split(env) if env else [sys.executable, "-m", "nfq_ipsec.cli"]


@dataclass
class Daemon:
    """One peer's daemon: started by the lab, asked for status, stopped with SIGTERM."""

    peer: PeerConfig
    host: Host
    cmd: list[str] = field(default_factory=command)
    proc: Started | None = None
    exit_code: int | None = None

    @property
    def name(self) -> str:
        return self.peer.spec.name

    def start(self, lab: Lab) -> None:
        self.proc = lab.start(f"daemon-{self.name}", self.host,
                              [*self.cmd, "run", "--config", str(self.peer.path)])

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        """Until the daemon answers status with its rules installed and every worker up."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.popen.poll() is not None:
                raise LabError(f"daemon {self.name} exited with {self.proc.popen.returncode} while "
                               f"starting; its log:\n{_tail(self.proc.output())}")
            res = self.host.run([*self.cmd, "status", "--config", str(self.peer.path), "--json"],
                                check=False, timeout=15)
            if res.returncode == 0:
                try:
                    status: dict[str, Any] = json.loads(res.stdout)
                except json.JSONDecodeError:
                    status = {}
                workers = status.get("workers") or []
                if (status.get("daemon", {}).get("rules_installed") and workers
                        and all(w.get("pid") and w.get("packets_in") is not None for w in workers)):
                    return status
                last = f"answers, not ready: {_readiness(status)}"
            else:
                last = (res.stderr or res.stdout).strip()[-200:]
            time.sleep(0.2)
        log = _tail(self.proc.output()) if self.proc else ""
        raise LabError(f"daemon {self.name} not ready after {timeout:g} s ({last}); its log:\n{log}")

    def status(self) -> dict[str, Any]:
        res = self.host.run([*self.cmd, "status", "--config", str(self.peer.path), "--json"],
                            timeout=15)
        data: dict[str, Any] = json.loads(res.stdout)
        return data

    def status_text(self) -> str:
        return self.host.run([*self.cmd, "status", "--config", str(self.peer.path)], timeout=15).stdout

    def stop(self, lab: Lab, timeout: float = 20.0) -> int | None:
        """SIGTERM (a clean stop: the daemon closes its rules), SIGKILL after ``timeout``."""
        if self.proc is None:
            return None
        self.exit_code = lab.stop(self.proc, timeout)
        return self.exit_code

    def remove_rules(self) -> str:
        """``nfq-ipsec rules remove``: the deliberate act that takes a stopped daemon's closed
        rules out. Returns what it printed."""
        res = self.host.run([*self.cmd, "rules", "remove", "--config", str(self.peer.path)],
                            timeout=60)
        return res.stdout

    def log(self) -> str:
        return self.proc.output() if self.proc else ""


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


def normalise_iptables_save(text: str) -> str:
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
        if not empty:
            kept.extend(table)
    return "\n".join(kept)

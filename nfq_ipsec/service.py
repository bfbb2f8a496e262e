"""Running the daemon as a systemd service (``nfq-ipsec@.service``, ``scripts/install-service``).

``python -m nfq_ipsec.service wait-ready --config FILE [--pid PID] [--timeout S]`` is the unit's
ExecStartPost: it returns 0 once the daemon answers on its control socket with every worker
listening and the rules installed (so ``systemctl start`` returns only when traffic is
protected), 1 if that does not happen within the timeout or the daemon answering is not
``--pid`` (``$MAINPID``), 2 for an invalid configuration.

:class:`UnitFile` reads a unit file the way the tests and the namespace lab need it: the
commands of ``ExecStart=`` and friends with ``%i`` and ``$VAR`` expanded, so they can run the
very argv systemd would run.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

from . import exitcodes
from .status import StatusReport

POLL = 0.2


def ready(status: StatusReport) -> bool:
    """Every worker has a pid and counters, and the rules are installed (an answer that is
    not a status, an error for one, has none of that: not ready)."""
    workers = status.get("workers") or []
    daemon = status.get("daemon") or {}
    return bool(daemon.get("rules_installed") and workers
                and all(w.get("pid") and w.get("packets_in") is not None for w in workers))


def wait_ready(socket_path: str, timeout: float, pid: int | None = None) -> tuple[bool, str]:
    """Poll the control socket until :func:`ready`. Returns (ready, what was seen last)."""
    from .control import NotRunning, request

    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        try:
            status = request(socket_path, {"command": "status"}, timeout=5)
        except NotRunning as err:
            last = str(err)
        except ValueError as err:  # a malformed answer
            last = f"unreadable answer: {err}"
        else:
            daemon = status.get("daemon") or {}
            if pid is not None and daemon.get("pid") not in (None, pid):
                return False, (f"the daemon answering on {socket_path} is pid {daemon.get('pid')}, "
                               f"not {pid}")
            if ready(cast(StatusReport, status)):
                return True, "ready"
            last = f"state {daemon.get('state')}, rules_installed {daemon.get('rules_installed')}"
        if time.monotonic() >= deadline:
            return False, last
        time.sleep(POLL)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nfq_ipsec.service")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("wait-ready", help="wait until the daemon of a config is up, rules installed")
    p.add_argument("--config", required=True)
    p.add_argument("--pid", type=int, help="the daemon's pid ($MAINPID)")
    p.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)

    from . import hardening
    from .config import load_config
    from .core import ConfigError

    try:
        hardening.disable_core_dumps()  # the configuration names keys: no core dump with them
    except OSError as err:
        print(f"nfq-ipsec: cannot turn core dumps off, so no key is read: {err}", file=sys.stderr)
        return exitcodes.FAILURE
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"nfq-ipsec: invalid configuration {args.config}:", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return exitcodes.CONFIG
    ok, last = wait_ready(cfg.daemon.control_socket, args.timeout, args.pid)
    if ok:
        print(f"nfq-ipsec: ready: workers listening, rules installed ({args.config})")
        return exitcodes.OK
    print(f"nfq-ipsec: not ready after {args.timeout:g} s: {last}", file=sys.stderr)
    return exitcodes.FAILURE


# -- unit files ----------------------------------------------------------------------------------

_VAR = re.compile(r"\$(\w+)|\$\{(\w+)\}")


@dataclass
class UnitFile:
    """A systemd unit file: sections of (key, value) in order (continuation lines joined)."""

    sections: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> UnitFile:
        unit = cls()
        section: list[tuple[str, str]] | None = None
        pending = ""
        for raw in text.splitlines():
            line = pending + raw.strip()
            pending = ""
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                section = unit.sections.setdefault(line[1:-1], [])
                continue
            if section is None or "=" not in line:
                raise ValueError(f"not a unit file line: {line!r}")
            key, _, value = line.partition("=")
            section.append((key.strip(), value.strip()))
        return unit

    def values(self, section: str, key: str) -> list[str]:
        """Every value of ``key`` (an empty assignment resets the list, as systemd does)."""
        out: list[str] = []
        for k, v in self.sections.get(section, []):
            if k == key:
                out = [] if v == "" else [*out, v]
        return out

    def get(self, section: str, key: str) -> str | None:
        vals = self.values(section, key)
        return vals[-1] if vals else None

    def commands(self, key: str, instance: str, env: Mapping[str, str] | None = None) -> list[list[str]]:
        """The argvs of ``[Service] key`` (ExecStart, ExecStartPost, ...) with ``%i``/``%I``/``%%``
        and ``$VAR``/``${VAR}`` expanded; the ``-@:+!`` prefixes are dropped."""
        env = env or {}
        out = []
        for value in self.values("Service", key):
            text = value.lstrip("-@:+!")
            text = text.replace("%%", "\0").replace("%i", instance).replace("%I", instance)
            if "%" in text:
                raise ValueError(f"{key}: unsupported specifier in {value!r}")
            text = text.replace("\0", "%")
            argv = []
            for word in shlex.split(text):
                whole = _VAR.fullmatch(word)
                if whole:  # "$VAR" alone is split into words by systemd; "${VAR}" is one word
                    name = whole.group(1) or whole.group(2)
                    argv += env[name].split() if whole.group(1) else [env[name]]
                else:
                    argv.append(_VAR.sub(lambda m: env[m.group(1) or m.group(2)], word))
            out.append(argv)
        return out


if __name__ == "__main__":
    sys.exit(main())

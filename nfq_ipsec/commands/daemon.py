"""``nfq-ipsec run``, ``stop`` and ``reload``: the daemon (``nfq_ipsec.supervisor``), started
here, or asked over its control socket (``nfq_ipsec.control``)."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time

from .. import control, exitcodes, hardening, iptables, logsetup, procs, supervisor
from ..config import Config
from .common import load_or_report


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run the daemon: workers, rules, control socket",
                       description="Run the daemon: its workers, its rules, its control socket, "
                       "until SIGTERM (which leaves the rules closed).")
    p.add_argument("-c", "--config", required=True, help="TOML configuration file")

    p = sub.add_parser(
        "reload", help="apply a changed configuration to the running daemon, without a restart",
        description="Ask the daemon to re-read its configuration file (as SIGHUP and systemctl "
        "reload do) and wait for the result. New and changed SAs, keys and policies are applied "
        "without stopping established flows: the workers build their new state first, then the "
        "rules move over in one transaction. A configuration that fails validation, or changes "
        "what only a restart can (control_socket, state_dir, chain_prefix, mark, iptables, "
        "log_level, node.role, node.interface, a queue's CPU, an SA's settings under the same "
        "key), changes nothing.",
    )
    p.add_argument("-c", "--config", required=True, help="the configuration the daemon runs")
    p.add_argument("--timeout", type=float, default=90.0,
                   help="seconds to wait for the result (default 90)")

    p = sub.add_parser(
        "stop", help="stop the running daemon (its rules stay, closed)",
        description="Ask the daemon to stop (SIGTERM) and wait until it has. It leaves its rules "
        "in place, closed: protected traffic is dropped until it runs again, never sent in clear. "
        "--remove-rules then removes them, after which traffic is no longer checked at all.",
    )
    p.add_argument("-c", "--config", required=True, help="TOML configuration file")
    p.add_argument("--remove-rules", action="store_true",
                   help="after the daemon has stopped, remove its iptables rules as well")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for the daemon to exit (default 30)")


def run(args: argparse.Namespace) -> int:
    """``nfq-ipsec run --config X``. Exit codes: 0 clean stop, 1 failure, 2 invalid config."""
    path = str(args.config)
    try:
        hardening.disable_core_dumps()  # before the keys are loaded; workers do it too
    except OSError as err:
        print(f"nfq-ipsec: cannot turn core dumps off, not starting: {err}", file=sys.stderr)
        return exitcodes.FAILURE
    cfg = load_or_report(path, show_warnings=False)  # warnings go to the log below
    if cfg is None:
        return exitcodes.CONFIG
    logsetup.setup("supervisor", cfg.daemon.log_level)
    for warning in cfg.warnings:
        supervisor.log.warning("configuration: %s", warning)
    code = supervisor.preflight(cfg)
    if code is not None:
        return code
    team, code = supervisor.engine_preflight(cfg)
    if code is not None:
        return code
    return supervisor.Supervisor(cfg, os.path.abspath(path), team).run()


def stop(args: argparse.Namespace) -> int:
    """``nfq-ipsec stop --config X [--remove-rules]``: SIGTERM to the daemon that answers on the
    configured control socket, wait for it to exit; then, if asked, remove the rules.
    Exit codes: 0 stopped (and removed), 1 it did not stop in time, a command failed, or its
    rules, read back after the stop, are neither closed nor live (protected traffic may pass),
    2 invalid config, 3 no daemon answered (with --remove-rules the rules are still removed)."""
    cfg = load_or_report(args.config)
    if cfg is None:
        return exitcodes.CONFIG
    code = exitcodes.OK
    try:
        st = control.request(cfg.daemon.control_socket, {"command": "status"})
        pid = int(st["daemon"]["pid"])
    except (control.NotRunning, KeyError, TypeError, ValueError) as err:
        print(f"nfq-ipsec: no daemon answers on {cfg.daemon.control_socket} ({err})",
              file=sys.stderr)
        code = exitcodes.NOT_RUNNING
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + args.timeout
        while procs.alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if procs.alive(pid):
            print(f"nfq-ipsec: the daemon (pid {pid}) did not stop within {args.timeout:g} s",
                  file=sys.stderr)
            return exitcodes.FAILURE
        if not args.remove_rules:
            return _check_rules_after_stop(cfg, pid)
        print(f"nfq-ipsec: daemon (pid {pid}) stopped")
    if args.remove_rules:
        try:
            iptables.remove(cfg)
        except iptables.RulesError as err:
            print(f"nfq-ipsec: {err}\nnfq-ipsec: {iptables.outcome(err, 'removed')}",
                  file=sys.stderr)
            return exitcodes.FAILURE
        print("nfq-ipsec: rules removed: traffic is no longer checked against the policies")
    return code


def _check_rules_after_stop(cfg: Config, pid: int) -> int:
    """The daemon is gone: say what its rules now do, read back from the kernel, rather than
    what they should do. Exit 1 unless protected traffic is dropped."""
    try:
        st = iptables.status(cfg)
    except iptables.RulesError as err:
        print(f"nfq-ipsec: daemon (pid {pid}) stopped, but its rules could not be read: {err}",
              file=sys.stderr)
        return exitcodes.FAILURE
    if st.closed:
        print(f"nfq-ipsec: daemon (pid {pid}) stopped; its rules are closed (protected traffic "
              "is dropped)")
        return exitcodes.OK
    if st.matches:
        print(f"nfq-ipsec: daemon (pid {pid}) stopped; its live rules are still in place, and "
              "with no worker on their queues protected traffic is dropped")
        return exitcodes.OK
    print(f"nfq-ipsec: daemon (pid {pid}) stopped, but its rules are {st.describe()}\n"
          "nfq-ipsec: protected traffic may not be dropped; `nfq-ipsec rules install --closed` "
          "or a new `nfq-ipsec run` puts the rules back", file=sys.stderr)
    return exitcodes.FAILURE


def reload(args: argparse.Namespace) -> int:
    """``nfq-ipsec reload --config X``: the daemon answering on X's control socket re-reads X.
    Exit codes: 0 applied, 1 not applied (the daemon's reasons are printed; it keeps running
    the old configuration), 2 X itself is invalid (checked here first: nothing sent),
    3 no daemon answered."""
    cfg = load_or_report(args.config)
    if cfg is None:
        print("nfq-ipsec: nothing sent; the daemon keeps its configuration", file=sys.stderr)
        return exitcodes.CONFIG
    try:
        answer = control.request(cfg.daemon.control_socket,
                                 {"command": "reload", "config": os.path.abspath(args.config)},
                                 timeout=args.timeout)
    except control.NotRunning as err:
        print(f"nfq-ipsec: {err}", file=sys.stderr)
        return exitcodes.NOT_RUNNING
    if answer.get("changed"):
        print(f"nfq-ipsec: reloaded: {answer.get('reloaded') or 'nothing changed'}")
        return exitcodes.OK
    print(f"nfq-ipsec: reload refused: {answer.get('error')}", file=sys.stderr)
    for problem in answer.get("problems") or []:
        print(f"  {problem}", file=sys.stderr)
    return exitcodes.FAILURE

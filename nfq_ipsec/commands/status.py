"""``nfq-ipsec status``: ask the running daemon (``nfq_ipsec.control``) and print its answer."""

from __future__ import annotations

import argparse
import json
import sys
from typing import cast

from .. import control, exitcodes
from ..status import StatusReport
from .common import load_or_report


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="show the running daemon's workers, SAs and counters",
                       description="Ask the running daemon for its workers, SAs and counters.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("-c", "--config", help="configuration of the daemon to ask")
    g.add_argument("--socket", help="control socket of the daemon to ask")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    """``nfq-ipsec status``: exit 0 with the status, 2 on a bad config, 3 if not running."""
    path: str
    if getattr(args, "socket", None):
        path = args.socket
    else:
        cfg = load_or_report(args.config, show_warnings=False)
        if cfg is None:
            return exitcodes.CONFIG
        path = cfg.daemon.control_socket
    try:
        answer = control.request(path, {"command": "status"})
    except control.NotRunning as err:
        print(f"nfq-ipsec: {err}", file=sys.stderr)
        return exitcodes.NOT_RUNNING
    if "error" in answer:
        print(f"nfq-ipsec: the daemon answered: {answer['error']}", file=sys.stderr)
        return exitcodes.FAILURE
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        print(control.render_status(cast(StatusReport, answer)), end="")
    return exitcodes.OK

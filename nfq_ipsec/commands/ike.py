"""``nfq-ipsec ike initiate NAME`` and ``nfq-ipsec ike terminate NAME``: the keying agent of the
running daemon, asked over its control socket to bring a connection up or take it down."""

from __future__ import annotations

import argparse
import sys

from .. import control, exitcodes
from .common import load_or_report


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("ike", help="bring an IKEv2 connection up or take it down",
                       description="Ask the running daemon's keying agent to initiate a "
                       "connection (IKE_SA_INIT, IKE_AUTH: its Child SA then carries the "
                       "connection's policy) or to terminate it (its IKE SA and Child SAs are "
                       "deleted; the policy's traffic is dropped until it is up again).")
    p.add_argument("action", choices=("initiate", "terminate"))
    p.add_argument("name", help="the connection's name ([[connection]] name)")
    p.add_argument("-c", "--config", required=True, help="the configuration the daemon runs")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for the answer (default 10)")


def run(args: argparse.Namespace) -> int:
    """Exit codes: 0 done (initiating, or terminated), 1 refused (the reason is printed),
    2 the configuration is invalid or names no such connection, 3 no daemon answered."""
    cfg = load_or_report(args.config)
    if cfg is None:
        return exitcodes.CONFIG
    names = [c.name for c in cfg.connections]
    if args.name not in names:
        print(f"nfq-ipsec: no connection {args.name!r} in {args.config} (connections: "
              f"{', '.join(names) or 'none'})", file=sys.stderr)
        return exitcodes.CONFIG
    try:
        answer = control.request(cfg.daemon.control_socket,
                                 {"command": "ike", "action": args.action, "name": args.name},
                                 timeout=args.timeout)
    except control.NotRunning as err:
        print(f"nfq-ipsec: {err}", file=sys.stderr)
        return exitcodes.NOT_RUNNING
    if "ike" in answer:
        print(f"nfq-ipsec: {answer['ike']}")
        return exitcodes.OK
    print(f"nfq-ipsec: ike {args.action} refused: {answer.get('error')}", file=sys.stderr)
    return exitcodes.FAILURE

"""``nfq-ipsec state show|reset``: the SAs' saved state (``nfq_ipsec.state`` does the work)."""

from __future__ import annotations

import argparse
import json
import sys

from .. import exitcodes, sandbox, state
from ..core.sa import SADirection
from .common import load_or_report


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "state", help="show or reset the SAs' saved state (sequence numbers, replay)",
        description="The SAs' saved state: what each state file holds, and setting it.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = actions.add_parser("show", help="each SA's state file and what it holds",
                           description="Each SA's state file and what it holds.")
    add_config(s)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    r = actions.add_parser(
        "reset", help="set one SA's state (the daemon must be stopped)",
        description="reset --sa NAME --seq N: set it (the daemon must be stopped). Outbound, N "
        "is the next sequence number to send: it must be above every number the SA ever sent "
        "under its key, or IVs repeat; a new key needs no reset. Inbound, numbers up to N "
        "count as already received.\n\n" + state.RESET_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config(r)
    r.add_argument("--sa", help="the SA's name (required)")
    r.add_argument("--seq", type=lambda t: int(t, 0),
                   help="(required) outbound, the next sequence number to send; inbound, the "
                   "highest number treated as already received")


def add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", required=True, help="TOML configuration file")


def run(args: argparse.Namespace) -> int:
    """Exit 0, 1 (cannot write, daemon running, a state file unusable), 2 (bad config,
    unknown SA, bad number)."""
    cfg = load_or_report(args.config)
    if cfg is None:
        return exitcodes.CONFIG
    state_dir = cfg.daemon.state_dir
    try:  # the workers' state files are their user's (daemon.sandbox)
        ident = (None if cfg.daemon.sandbox == "off"
                 else sandbox.lookup(cfg.daemon.worker_user))
    except sandbox.SandboxError as err:
        print(f"nfq-ipsec: {err}", file=sys.stderr)
        return exitcodes.CONFIG
    uid = ident.uid if ident is not None else None
    if args.action == "show":
        rows = [state.describe(state_dir, p, uid) for p in cfg.sas]
        if getattr(args, "json", False):
            print(json.dumps({"state_dir": state_dir, "sas": rows}, indent=2, sort_keys=True))
        else:
            print(f"state_dir {state_dir}")
            for r in rows:
                if r["state"] == "saved":
                    what = f"next_seq {r['next_seq']}" if "next_seq" in r else f"seen_up_to {r['seen_up_to']}"
                    used = r["lifetime_used"]
                    what += (f" (written {r['written']}); lifetime used {used['packets']} packets, "
                             f"{used['bytes']} bytes since {used['installed']}")
                elif r["state"] == "fresh":
                    what = "no state file: a fresh key (" + (
                        "starts at 1)" if r["direction"] == "out" else "empty replay window)")
                else:
                    what = f"UNUSABLE: {r['error']}"
                print(f"  {r['sa']:<16} {r['spi']} {r['direction']:<3} {what}")
        return exitcodes.OK if all(r["state"] != "unusable" for r in rows) else exitcodes.FAILURE
    # reset
    if args.sa is None or args.seq is None:
        print("nfq-ipsec: state reset needs --sa NAME and --seq N\n" + state.RESET_HELP,
              file=sys.stderr)
        return exitcodes.CONFIG
    try:
        params = cfg.sa(args.sa)
    except KeyError:
        print(f"nfq-ipsec: no SA named {args.sa!r} in {args.config} (known: "
              f"{', '.join(p.name for p in cfg.sas)})", file=sys.stderr)
        return exitcodes.CONFIG
    low, high = state.seq_range(params)
    if not low <= args.seq <= high:
        print(f"nfq-ipsec: --seq must be {low}..{high} for {params.direction.value}bound SA "
              f"{params.name}", file=sys.stderr)
        return exitcodes.CONFIG
    try:
        done = state.reset(state_dir, params, args.seq, uid)
    except state.StateError as err:
        print(f"nfq-ipsec: {err}", file=sys.stderr)
        return exitcodes.FAILURE
    except OSError as err:
        print(f"nfq-ipsec: cannot write the state of SA {params.name}: {err.strerror}",
              file=sys.stderr)
        return exitcodes.FAILURE
    if done.usage_lost:
        print(f"nfq-ipsec: SA {params.name}: the old state file can't be trusted, so its "
              "lifetime use (packets, bytes, age) starts again from zero", file=sys.stderr)
    what = "next sequence number" if params.direction is SADirection.OUT else "seen up to"
    print(f"nfq-ipsec: SA {params.name} (spi 0x{params.spi:08x}): state reset, {what} {args.seq} "
          f"({done.path})")
    return exitcodes.OK

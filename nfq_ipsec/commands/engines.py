"""``nfq-ipsec engines`` (the crypto engines of the running daemon: what each offers, whether
it passed its known-answer tests, its measured speed and the SAs it carries; each worker's
crypto offload helpers, if any) and
``nfq-ipsec engine disable|enable NAME`` (a member out or back at runtime, no restart)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .. import control, exitcodes
from ..engines.base import ENGINE_NAMES
from .common import load_or_report


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("engines", help="the crypto engines: capabilities, verification, speed, load",
                       description="The running daemon's crypto engines: the suites each offers, "
                       "whether it passed its known-answer tests, its speed per suite, the SAs "
                       "bound to it and its faults (from the status answer).")
    p.add_argument("-c", "--config", required=True, help="the configuration the daemon runs")
    p.add_argument("--json", action="store_true", help="the status answer's engines, as JSON")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
    p = sub.add_parser("engine", help="take a crypto engine out or put it back, at runtime",
                       description="Disable an engine (its SAs move to the next capable engine "
                       "at once, their sequence numbers and replay windows kept) or enable it "
                       "again (SAs are bound by crypto.policy again). No restart; a restarted "
                       "worker follows it; a restart of the daemon goes back to the file.")
    p.add_argument("action", choices=("disable", "enable"))
    p.add_argument("name", choices=ENGINE_NAMES)
    p.add_argument("-c", "--config", required=True, help="the configuration the daemon runs")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default 10)")


def _ask(args: argparse.Namespace, request: dict[str, Any]) -> dict[str, Any] | int:
    cfg = load_or_report(args.config)
    if cfg is None:
        return exitcodes.CONFIG
    try:
        answer: dict[str, Any] = control.request(cfg.daemon.control_socket, request,
                                                 timeout=args.timeout)
    except control.NotRunning as err:
        print(f"nfq-ipsec: {err}", file=sys.stderr)
        return exitcodes.NOT_RUNNING
    return answer


def _mb(rate: float) -> str:
    return f"{rate / 1e6:.0f}"


def render(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        head = f"{r['name']}: {r['state']}"
        if r["reason"]:
            head += f" ({r['reason']})"
        out.append(head)
        if r["detail"]:
            out.append(f"  {r['detail']}")
        if r["state"] == "absent":
            continue
        out.append(f"  SAs {r['sas']}, faults {r['faults']}, SAs moved away {r['moved_away']}")
        for suite in r["claims"]:
            ok = "verified" if suite in r["verified"] else f"FAILED: {r['failed'].get(suite, '?')}"
            speed = r["speed"].get(suite)
            out.append(f"  {suite:<30} {ok:<9} {_mb(speed) + ' MB/s' if speed else ''}")
    return "\n".join(out)


def run_engines(args: argparse.Namespace) -> int:
    """Exit codes: 0, 2 the configuration is invalid, 3 no daemon answered, 1 an error answer."""
    answer = _ask(args, {"command": "status"})
    if isinstance(answer, int):
        return answer
    if "engines" not in answer:
        print(f"nfq-ipsec: {answer.get('error', 'no engines in the answer')}", file=sys.stderr)
        return exitcodes.FAILURE
    if args.json:
        print(json.dumps(answer["engines"], indent=2, sort_keys=True))
        return exitcodes.OK
    print(render(answer["engines"]))
    offload = render_offload(answer.get("workers", []))
    if offload:
        print(offload)
    return exitcodes.OK


def render_offload(workers: list[dict[str, Any]]) -> str:
    """One line per worker with crypto offload helpers (``crypto.offload_helpers``)."""
    out = []
    for w in workers:
        o = w.get("offload")
        if not o:
            continue
        state = "active" if o["active"] else f"stopped ({o['failed']})"
        out.append(f"offload, queue {w['queue']}: {o['helpers']} helper(s), {state}; "
                   f"{o['jobs']} seals in {o['chunks']} chunks (batch {o['batch']}), "
                   f"{o['inline']} in the worker, {o['lost']} lost (engine_failed)")
    return "\n".join(out)


def run_engine(args: argparse.Namespace) -> int:
    """Exit codes: 0 done (the SAs that moved are printed), 1 refused, 2, 3 as above."""
    answer = _ask(args, {"command": "engine", "action": args.action, "name": args.name})
    if isinstance(answer, int):
        return answer
    if "error" in answer:
        print(f"nfq-ipsec: engine {args.action} {args.name}: {answer['error']}", file=sys.stderr)
        return exitcodes.FAILURE
    moved = [(q, sa, to) for q, items in sorted(answer["moved"].items()) for sa, to in items]
    print(f"nfq-ipsec: engine {args.name} {args.action}d; {len(moved)} SA(s) moved")
    for q, sa, to in moved:
        print(f"  queue {q}: SA {sa} -> {to}")
    return exitcodes.OK

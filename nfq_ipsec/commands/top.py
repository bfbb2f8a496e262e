"""``nfq-ipsec top``: the running daemon's status, refreshed live, with rates.

It asks the control socket for the status every ``--interval`` seconds, as ``nfq-ipsec status``
does, and shows per queue and per SA the packet, byte and drop rates between the last two
answers (:mod:`nfq_ipsec.rates`), drops by reason, CPU and memory per worker, and how long ago
each SA last carried a packet. Drawn with rich (a maintained library for terminal tables and
live redrawing, which handles the terminal's size and a pipe alike): in place on a terminal;
on anything else (a pipe, a file) one frame after another, so ``top --iterations 1`` is a
one-shot snapshot a script can read.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import cast

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .. import control, exitcodes, rates
from ..control import fmt_ago, fmt_bytes, fmt_cpu, fmt_duration
from ..status import StatusReport
from .common import load_or_report


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("top", help="live view of the running daemon: rates per queue and SA",
                       description="Show the running daemon's queues and SAs with packet, byte "
                       "and drop rates, refreshed live (Ctrl-C to quit).")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("-c", "--config", help="configuration of the daemon to watch")
    g.add_argument("--socket", help="control socket of the daemon to watch")
    p.add_argument("-i", "--interval", type=float, default=1.0,
                   help="seconds between refreshes (default 1; at least 0.2)")
    p.add_argument("-n", "--iterations", type=int, default=0,
                   help="stop after this many refreshes (default 0: until Ctrl-C)")


def _per_s(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "bit":
        for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if value >= scale:
                return f"{value / scale:.1f} {prefix}bit/s"
        return f"{value:.0f} bit/s"
    return f"{value:.1f}"


def _num(value: object) -> str:
    return "-" if value is None else str(value)


def frame(status: StatusReport, r: rates.Rates | None, interval: float, note: str = "") -> RenderableType:
    """One screen: the daemon's line, the queues, the SAs, the drops by reason."""
    d = status.get("daemon", {})
    rules = "rules installed" if d.get("rules_installed") else "rules NOT installed"
    head = Text(f"nfq-ipsec {d.get('state', '?')}: pid {d.get('pid')}, up "
                f"{fmt_duration(d.get('uptime'))}, {rules}, at {status.get('taken_at', '-')}, "
                f"rates over {r.seconds:.1f}s" if r else f"nfq-ipsec {d.get('state', '?')}: pid "
                f"{d.get('pid')}, {rules}, at {status.get('taken_at', '-')}, rates from the next "
                f"refresh (every {interval:g}s)")
    parts: list[RenderableType] = [head]
    if note:
        parts.append(Text(note, style="bold red"))
    parts += [Text(f"WARNING: {w}", style="yellow") for w in status.get("warnings", [])]

    queues = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("QUEUE", "STATE", "PID", "IN/s", "OUT/s", "DROPS/s", "PKTS IN", "PKTS OUT",
                "DROPS", "CPU %", "CPU TIME", "MEM"):
        queues.add_column(col, justify="left" if col in ("STATE",) else "right", no_wrap=True)
    reasons: list[tuple[str, str, str, str]] = []
    for w in status.get("workers", []):
        q = r.queues.get(w["queue"]) if r else None
        drops = w.get("drops")
        queues.add_row(
            str(w["queue"]), str(w.get("state")), _num(w.get("pid")),
            _per_s(q.packets_in if q else None), _per_s(q.packets_out if q else None),
            _per_s(q.drops if q else None), _num(w.get("packets_in")), _num(w.get("packets_out")),
            _num(None if drops is None else sum(drops.values())),
            "-" if q is None or q.cpu is None else f"{q.cpu * 100:.1f}",
            fmt_cpu(w.get("cpu_seconds")), fmt_bytes(w.get("memory_bytes")))
        for reason, n in sorted((drops or {}).items()):
            rate = q.drops_by_reason.get(reason) if q else None
            reasons.append((f"q{w['queue']}", reason, str(n), _per_s(rate or 0.0 if q else None)))
    parts += [Text(""), queues]

    sas = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("SA", "SPI", "DIR", "QUEUE", "PKTS/s", "RATE", "DROPS/s", "PACKETS", "BYTES",
                "REPLAY", "INTEGRITY", "OTHER", "LAST PACKET"):
        sas.add_column(col, justify="left" if col in ("SA", "SPI", "DIR", "LAST PACKET") else "right",
                       no_wrap=True)
    for s in status.get("sas", []):
        sr = r.sas.get((s["name"], s["queue"])) if r else None
        sas.add_row(
            s["name"], s["spi"], s["direction"], str(s["queue"]),
            _per_s(sr.packets if sr else None), _per_s(sr.bits if sr else None, "bit"),
            _per_s(sr.drops if sr else None), _num(s.get("packets")), _num(s.get("bytes")),
            _num(s.get("replay_drops")), _num(s.get("integrity_drops")), _num(s.get("other_drops")),
            fmt_ago(s.get("last_packet_age")))
    parts += [Text(""), sas]

    if reasons:
        table = Table(box=None, pad_edge=False, header_style="bold")
        for col in ("QUEUE", "DROP REASON", "TOTAL", "PER SECOND"):
            table.add_column(col, justify="left" if col != "TOTAL" and col != "PER SECOND" else "right")
        for row in reasons:
            table.add_row(*row)
        parts += [Text(""), table]
    kdrops = status.get("kernel_drops")
    if kdrops:
        detail = " ".join(f"{k}={v}" for k, v in sorted(kdrops.items()))
        parts.append(Text(f"dropped by our iptables rules (never queued): {detail}"))
    return Group(*parts)


def _socket_path(args: argparse.Namespace) -> str | None:
    if getattr(args, "socket", None):
        return str(args.socket)
    cfg = load_or_report(args.config, show_warnings=False)
    return None if cfg is None else cfg.daemon.control_socket


def _ask(path: str) -> StatusReport:
    answer = control.request(path, {"command": "status"})
    if "error" in answer:
        raise control.ControlError(f"the daemon answered: {answer['error']}")
    return cast(StatusReport, answer)


def run(args: argparse.Namespace) -> int:
    """``nfq-ipsec top``: 0 after ``--iterations`` refreshes or Ctrl-C, 2 on a bad config or
    interval, 3 if the daemon is not running at the start."""
    if not args.interval >= 0.2 or args.iterations < 0:
        print("nfq-ipsec: top: --interval must be at least 0.2 and --iterations 0 or more",
              file=sys.stderr)
        return exitcodes.CONFIG
    path = _socket_path(args)
    if path is None:
        return exitcodes.CONFIG
    try:
        last = _ask(path)
    except (control.NotRunning, control.ControlError) as err:
        print(f"nfq-ipsec: {err}", file=sys.stderr)
        return exitcodes.NOT_RUNNING
    console = Console()
    shown = 1
    live = Live(frame(last, None, args.interval), console=console, auto_refresh=False,
                transient=False) if console.is_terminal else None
    try:
        if live is None:
            console.print(frame(last, None, args.interval))
        else:
            live.start(refresh=True)
        while args.iterations == 0 or shown < args.iterations:
            time.sleep(args.interval)
            note = ""
            try:
                now = _ask(path)
                view = frame(now, rates.between(last, now), args.interval)
                last = now
            except (control.NotRunning, control.ControlError) as err:
                note = f"no answer from the daemon ({err}); showing the last answer"
                view = frame(last, None, args.interval, note)
            shown += 1
            if live is None:
                console.print()
                console.print(view)
            else:
                live.update(view, refresh=True)
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.stop()
    return exitcodes.OK

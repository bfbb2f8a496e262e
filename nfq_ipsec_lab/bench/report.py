"""Turning raw repetitions into figures: summaries, ratios, the table, the JSON file, the chart.

Every figure is the median over the repetitions with its min-max range. Ratios compare medians
inside this one run: to the plain veth row, and to the accept-only row with the same number of
queues (the redirect ceiling; rows without queues compare with its one-queue variant). A row
that is a variant of another (``base``: the gcm row over IPv6, in UDP, from source) also gets
its ratio to that row (the same number of queues, else one queue), printed under the table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .measure import percentile, spread

SCHEMA = "nfq-ipsec-bench/1"
RATIO_METRICS = ("tcp1_mbit", "tcp8_mbit", "udp64_pps")
GB = 1e9


# -- summaries ------------------------------------------------------------------------------

def _per_gb(reps: Sequence[dict[str, Any]], key: str) -> list[float | None]:
    out: list[float | None] = []
    for rep in reps:
        moved = (rep["tcp1"]["bytes"] + rep["tcp8"]["bytes"]) / GB
        cpu = rep["tcp1"][key] + rep["tcp8"][key]
        out.append(cpu / moved if moved > 0 else None)
    return out


def summarise(row: dict[str, Any]) -> dict[str, Any]:
    """Median/min/max of every figure of a row over its repetitions."""
    reps: list[dict[str, Any]] = row.get("repetitions") or []
    has_dataplane = bool(row.get("dataplane"))
    rtts = [r for rep in reps for r in rep["ping"]["rtt_ms"]]
    udp_per_packet: list[float | None] = []
    udp_per_queued: list[float | None] = []
    udp_user_per_queued: list[float | None] = []
    for rep in reps:
        u = rep["udp64"]
        udp_per_packet.append(u["cpu_s"] / u["delivered"] * 1e6 if has_dataplane and u["delivered"] else None)
        # queued: packets the kernel handed to a worker (both peers); each is one worker visit
        queued = (u.get("queues") or {}).get("queued")
        udp_per_queued.append(u["cpu_s"] / queued * 1e6 if has_dataplane and queued else None)
        user = u.get("cpu_user_s")
        udp_user_per_queued.append(user / queued * 1e6 if has_dataplane and queued and user is not None
                                   else None)
    return {
        "tcp1_mbit": spread(rep["tcp1"]["mbit"] for rep in reps),
        "tcp8_mbit": spread(rep["tcp8"]["mbit"] for rep in reps),
        "udp64_pps": spread(rep["udp64"]["pps"] for rep in reps),
        "udp64_sent_pps": spread(rep["udp64"]["sent_pps"] for rep in reps),
        "rtt_p50_ms": spread(rep["ping"]["p50_ms"] for rep in reps),
        "rtt_p99_ms": spread(rep["ping"]["p99_ms"] for rep in reps),
        "rtt_burst_p50_ms": spread((rep.get("ping_warm") or {}).get("p50_ms") for rep in reps),
        "rtt_burst_p99_ms": spread((rep.get("ping_warm") or {}).get("p99_ms") for rep in reps),
        "idle_cpu_share": spread((rep.get("idle") or {}).get("cpu_share") for rep in reps)
        if has_dataplane else None,
        "idle_cpu_share_per_worker": spread((rep.get("idle") or {}).get("cpu_share_per_worker")
                                            for rep in reps) if has_dataplane else None,
        "rtt_pooled_ms": ({"p50": percentile(rtts, 50), "p99": percentile(rtts, 99), "n": len(rtts)}
                          if rtts else None),
        "cpu_s_per_gb": spread(_per_gb(reps, "cpu_s")) if has_dataplane else None,
        "system_cpu_s_per_gb": spread(_per_gb(reps, "system_cpu_s")),
        "udp64_cpu_us_per_delivered": spread(udp_per_packet),
        "udp64_cpu_us_per_queued": spread(udp_per_queued),
        "udp64_user_cpu_us_per_queued": spread(udp_user_per_queued),
    }


def _median(row: dict[str, Any] | None, metric: str) -> float | None:
    if row is None or row.get("status") != "ok":
        return None
    s = (row.get("summary") or {}).get(metric)
    return float(s["median"]) if s else None


def _same_queues(rows: list[dict[str, Any]], key: str, queues: int | None) -> dict[str, Any] | None:
    """The measured row ``key`` with ``queues`` queues, else with one, else with the fewest."""
    found = {r["queues"]: r for r in rows if r["key"] == key and r["status"] == "ok"}
    if not found:
        return None
    return found.get(queues) or found.get(1) or found[min(found, key=lambda q: q or 0)]


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``ratios.plain`` and ``ratios.accept`` (medians over medians) on every measured row, and
    ``ratios.base`` (with ``ratios.base_queues``) on a variant whose base row was measured."""
    plain = next((r for r in rows if r["key"] == "plain" and r["status"] == "ok"), None)
    for row in rows:
        if row["status"] != "ok":
            row["ratios"] = None
            continue
        acc = _same_queues(rows, "accept", row["queues"])
        base = _same_queues(rows, row["base"], row["queues"]) if row.get("base") else None
        row["ratios"] = {}
        for name, ref in (("plain", plain), ("accept", acc), ("base", base)):
            if name == "base" and not row.get("base"):
                continue
            ratios: dict[str, float | None] = {}
            for m in RATIO_METRICS:
                mine, theirs = _median(row, m), _median(ref, m)
                ratios[m] = mine / theirs if mine is not None and theirs else None
            row["ratios"][name] = ratios if ref is not None else None
            if ref is not None and name in ("accept", "base"):
                row["ratios"][f"{name}_queues"] = ref["queues"]
        if base is not None:  # CPU per GB moved: steadier than throughput on a loaded machine
            mine, theirs = _median(row, "cpu_s_per_gb"), _median(base, "cpu_s_per_gb")
            row["ratios"]["base_cpu_s_per_gb"] = mine / theirs if mine is not None and theirs else None


# -- the table ------------------------------------------------------------------------------

def num(v: float | None) -> str:
    if v is None:
        return "-"
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def cell(s: dict[str, float] | None, scale: float = 1.0) -> str:
    if not s:
        return "-"
    med = num(s["median"] * scale)
    if s.get("n", 2) < 2:
        return med
    return f"{med} ({num(s['min'] * scale)}-{num(s['max'] * scale)})"


def _ratio_cell(r: dict[str, float | None] | None) -> str:
    if not r:
        return "-"
    return "/".join("-" if r[m] is None else f"{r[m]:.3g}" for m in RATIO_METRICS)


COLUMNS = (
    ("row", 31), ("q", 2), ("TCP 1 flow Mbit/s", 22), ("TCP 8 flows Mbit/s", 22),
    ("UDP 64B kpps", 19), ("RTT p50/p99 ms", 15), ("burst RTT", 10), ("idle CPU", 8),
    ("CPU s/GB dp/all", 16),
    ("vs plain 1/8/udp", 18), ("vs accept 1/8/udp", 18),
)


def _line(cells: Iterable[str]) -> str:
    parts = [f"{c:<{w}}" for c, (_, w) in zip(cells, COLUMNS, strict=False)]
    return "  ".join(parts).rstrip()


def table(result: dict[str, Any]) -> str:
    s = result["settings"]
    m = result["machine"]
    out = [
        f"nfq-ipsec bench: {s['repetitions']} repetition(s) ({s.get('order', 'rows')}), "
        f"{s['seconds']:g} s per iperf3 run, "
        f"{s['pings']} pings per repetition; median (min-max)",
        f"machine: {m['cpu_model']}, {m['cores']} CPUs, {m['kernel'].split()[1]}; "
        f"CPU layout {s['cpu_layout']}",
        f"python: {m.get('python_build') or m.get('python', 'unknown')}",
        "",
        _line(c for c, _ in COLUMNS),
        _line("-" * w for _, w in COLUMNS),
    ]
    notes: list[str] = []
    for row in result["rows"]:
        q = "-" if row["queues"] is None else str(row["queues"])
        label = row["label"]
        if row["status"] == "skipped":
            out.append(_line([label, q, row["error"] or "skipped"]))
            continue
        if row["status"] == "failed":
            err = (row["error"] or "").strip().splitlines()
            out.append(_line([label, q, f"FAILED: {err[0][:140] if err else '?'}"]))
            continue
        sm = row["summary"]
        rtt = "-"
        if sm["rtt_p50_ms"]:
            rtt = f"{num(sm['rtt_p50_ms']['median'])}/{num(sm['rtt_p99_ms']['median'])}"
        burst = num((sm.get("rtt_burst_p50_ms") or {}).get("median"))
        idle = sm.get("idle_cpu_share")
        idle_cell = f"{idle['median'] * 100:.2f}%" if idle else "-"
        cpu = f"{num((sm['cpu_s_per_gb'] or {}).get('median'))}/" \
              f"{num((sm['system_cpu_s_per_gb'] or {}).get('median'))}"
        ratios = row["ratios"] or {}
        out.append(_line([
            label, q, cell(sm["tcp1_mbit"]), cell(sm["tcp8_mbit"]), cell(sm["udp64_pps"], 1e-3), rtt,
            burst, idle_cell, cpu, _ratio_cell(ratios.get("plain")), _ratio_cell(ratios.get("accept")),
        ]))
        if row["key"] == "strongswan" and row["note"] not in notes:
            notes.append(row["note"])
    out += [
        "",
        "q: NFQUEUE queues (workers) per peer. UDP 64B: datagrams delivered per second, one iperf3 "
        "sender at full speed (-b 0).",
        "RTT: p50/p99 of each repetition's pings 0.1 s apart (workers asleep), median of those; "
        "burst RTT: p50 of pings 2 ms apart (workers awake).",
        "idle CPU: the data-plane processes' CPU time over 1 s without traffic, % of one CPU, "
        "all of them together (the JSON has it per worker too).",
        "CPU s/GB: CPU seconds per GB received over both TCP runs; dp = the data-plane processes "
        "(daemons and workers,",
        "  accept-only workers, charon; /proc/<pid>/stat), all = every CPU of the machine busy "
        "(/proc/stat: iperf3, kernel, other load).",
        "vs plain / vs accept: median ratios for TCP 1 flow / TCP 8 flows / UDP 64 B, to the plain "
        "row and to the accept-only row with the same q.",
    ]
    out += variants(result["rows"])
    for note in notes:
        out.append(f"strongSwan: {note}.")
    for w in result.get("warnings", []):
        out.append(f"WARNING: {w}")
    return "\n".join(out)


def variants(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Lines under the table: each variant row's ratio to its base row of the same run."""
    out = []
    for row in rows:
        r = (row.get("ratios") or {}).get("base")
        if not r:
            continue
        base = next((b["label"] for b in rows if b["key"] == row["base"]), row["base"])
        q = row["ratios"].get("base_queues")
        cpu = row["ratios"].get("base_cpu_s_per_gb")
        out.append(f"  {row['label']} / {base}{'' if q is None else f' q{q}'}: {_ratio_cell(r)}, "
                   f"dp CPU s/GB {'-' if cpu is None else f'{cpu:.3g}'}")
    if out:
        out.insert(0, "Variants, median ratio to the row they vary (TCP 1 flow/8 flows/UDP 64 B, and "
                      "data-plane CPU per GB):")
    return out


# -- files ----------------------------------------------------------------------------------

def write_json(result: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")


def write_png(result: dict[str, Any], path: Path) -> str | None:
    """The same figures as a chart. Returns why there is none (matplotlib missing, no rows)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (it comes with the lab extra: pip install 'nfq-ipsec[lab]')"
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    if not rows:
        return "no row was measured"
    labels = [r["label"] + ("" if r["queues"] is None else f"  [q{r['queues']}]") for r in rows]
    colors = [_QUEUE_COLORS.get(r["queues"], "#2ca02c") for r in rows]
    panels = (
        ("tcp1_mbit", "TCP, 1 flow (Mbit/s, log)", 1.0, True),
        ("tcp8_mbit", "TCP, 8 flows (Mbit/s, log)", 1.0, True),
        ("udp64_pps", "UDP 64 B delivered (kpps, log)", 1e-3, True),
        ("rtt_p50_ms", "ping RTT p50 (ms; dot: p99)", 1.0, False),
        ("cpu_s_per_gb", "data-plane CPU seconds per GB", 1.0, False),
    )
    fig, grid = plt.subplots(2, 3, figsize=(18, 2 * (0.33 * len(rows) + 1.4) + 0.6), sharey=True)
    axes = list(grid.flat)
    ys = list(range(len(rows)))
    for ax, (metric, title, scale, log) in zip(axes, panels, strict=False):
        med, lo, hi = [], [], []
        for r in rows:
            sm = r["summary"].get(metric)
            med.append(sm["median"] * scale if sm else 0.0)
            lo.append((sm["median"] - sm["min"]) * scale if sm else 0.0)
            hi.append((sm["max"] - sm["median"]) * scale if sm else 0.0)
        ax.barh(ys, med, color=colors, xerr=[lo, hi], capsize=3, ecolor="#333333")
        for y, v, up in zip(ys, med, hi, strict=True):
            if v > 0:
                ax.text(v + up, y, f" {num(v)}", va="center", fontsize=7)
        if metric == "rtt_p50_ms":
            p99 = [(r["summary"].get("rtt_p99_ms") or {}).get("median") for r in rows]
            ax.plot([v if v is not None else float("nan") for v in p99], ys, "k.", markersize=6)
        positive = [v for v in med if v > 0]
        if log and positive:
            ax.set_xscale("log")
            ax.set_xlim(left=10 ** math.floor(math.log10(min(positive) / 2)), right=max(positive) * 3)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=7)
    _ratio_panel(axes[5], rows, ys)
    for ax in (grid[0][0], grid[1][0]):
        ax.set_yticks(ys)
        ax.set_yticklabels(labels, fontsize=8)
    grid[0][0].invert_yaxis()
    s = result["settings"]
    m = result["machine"]
    fig.suptitle(f"nfq-ipsec bench {result['started']}: {m['cpu_model']}, {m['cores']} CPUs, "
                 f"{m['kernel'].split()[1]}; {s['repetitions']} repetition(s) of {s['seconds']:g} s; "
                 f"bars: median, whiskers: min-max; blue: 1 queue, orange: 2 queues, grey: none",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


_QUEUE_COLORS = {None: "#7f7f7f", 1: "#1f77b4", 2: "#ff7f0e"}


def _ratio_panel(ax: Any, rows: list[dict[str, Any]], ys: list[int]) -> None:
    """Median ratio to the accept-only ceiling: TCP 1 flow, TCP 8 flows, UDP 64 B."""
    h = 0.26
    for k, (metric, color, name) in enumerate((("tcp1_mbit", "#4c72b0", "TCP 1"),
                                               ("tcp8_mbit", "#55a868", "TCP 8"),
                                               ("udp64_pps", "#c44e52", "UDP 64 B"))):
        vals = [((r.get("ratios") or {}).get("accept") or {}).get(metric) for r in rows]
        ax.barh([y + (k - 1) * h for y in ys], [v if v is not None else 0.0 for v in vals], height=h,
                color=color, label=name)
    ax.axvline(1.0, color="#333333", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_title("ratio to accept-only with the same q (log)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    ax.tick_params(axis="x", labelsize=7)

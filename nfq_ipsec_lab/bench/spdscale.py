"""SPD lookup cost against the number of policies: ``python -m nfq_ipsec_lab.bench.spdscale``.

No root, no network: SPDs of a realistic shape are built in this process and looked up many
times (``time.perf_counter_ns``, the garbage collector off while timing, after a warm-up of ten
times ``--min-ms``). For each size N:

  bypass  UDP, local port 500 (IKE), any addresses        \\ the broad rules at the top
  bypass  UDP, local port 4500 (IKE and ESP in UDP)        /
  N protect policies: this host's /32 to a distinct remote, alternately a /32 (10.0.0.0 on)
          and a /24 (100.64.0.0 on), so every one has its own prefixes
  discard everything else (any addresses)

and four outbound TCP cases: ``first`` hits the first protect policy, ``last`` the last one,
``miss`` matches no protect policy and falls to the discard, ``mix`` is a fixed pseudo-random
mix (80 % hits on random protect policies, 10 % IKE, 10 % misses). Each case is timed for the
SPD's own lookup (``indexed``: ``SPD.lookup``) and for the first-match scan it replaced
(``linear``: :func:`linear_lookup`, one ``Selector.matches`` call per policy until one
matches). A figure is nanoseconds per lookup including the call, as the median and min-max of
``--repeat`` timings; the empty call's own cost is printed with the table.

``--crossover`` adds the small SPDs (1 to 16 policies of the same shape: protect; bypass,
protect; bypass, protects, discard) timed three ways: the old scan, the SPD's scan and its
index, whatever the SPD would choose: where the scan stops being cheaper is
``spd.LINEAR_SCAN_MAX``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from nfq_ipsec.core import spd as spd_module
from nfq_ipsec.core.packet import PacketKey
from nfq_ipsec.core.spd import SPD, Action, Direction, Network, Policy, Selector

SCHEMA = "nfq-ipsec-spdscale/1"
CASES = ("first", "last", "miss", "mix")
IMPLS = ("indexed", "linear")
LOCAL = "192.0.2.1"
MISS_PEER = "198.51.100.77"
MIX_KEYS = 256
CROSSOVER_SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16)
TCP, UDP = 6, 17

Lookup = Callable[[Any, PacketKey, bool], "Policy | None"]


def linear_lookup(view: Sequence[Policy], key: PacketKey, outbound: bool) -> Policy | None:
    """The SPD lookup as it was before the index: first match over the direction's policies."""
    for policy in view:
        if policy.selector.matches(key, outbound):
            return policy
    return None


def _noop(_view: object, _key: PacketKey, _outbound: bool) -> None:
    return None


# -- the SPDs and keys -----------------------------------------------------------------------

def _ip(text: str) -> int:
    return int(IPv4Address(text))


def remote_net(i: int) -> IPv4Network:
    """The i-th protect policy's remote: /32 hosts for even i, /24 networks for odd i."""
    if i % 2 == 0:
        return IPv4Network((_ip("10.0.0.0") + i // 2, 32))
    return IPv4Network((_ip("100.64.0.0") + (i // 2 << 8), 24))


def build_policies(n: int) -> list[Policy]:
    """Bypass IKE, ``n`` protect policies for distinct remotes, discard the rest."""
    local = IPv4Network(f"{LOCAL}/32")
    return [
        Policy("ike", Selector(protocol=UDP, local_ports=(500, 500)), Action.BYPASS),
        Policy("ike-nat-t", Selector(protocol=UDP, local_ports=(4500, 4500)), Action.BYPASS),
        *(Policy(f"protect-{i}", Selector(local, remote_net(i)), Action.PROTECT, Direction.BOTH,
                 (f"out-{i}", f"in-{i}")) for i in range(n)),
        Policy("discard", Selector(), Action.DISCARD),
    ]


def small_policies(size: int) -> list[Policy]:
    """``size`` policies of the same shape: protect; bypass, protect; bypass, protects, discard."""
    full = build_policies(max(size - 2, 1))
    if size == 1:
        return [full[2]]
    if size == 2:
        return [full[0], full[2]]
    return [full[0], *full[2:-1], full[-1]]


def _tcp_to(peer_net: Network, sport: int = 40000, dport: int = 443) -> PacketKey:
    host = int(peer_net.network_address) + (7 if peer_net.prefixlen < 32 else 0)
    return PacketKey(_ip(LOCAL), host, TCP, sport, dport)


def case_keys(policies: list[Policy], case: str, rng: random.Random) -> list[PacketKey]:
    """The keys one pass of a case looks up (one key, or the mix)."""
    protects = [p for p in policies if p.action is Action.PROTECT]
    miss = PacketKey(_ip(LOCAL), _ip(MISS_PEER), TCP, 40000, 443)
    if case == "first":
        return [_tcp_to(protects[0].selector.remote)]
    if case == "last":
        return [_tcp_to(protects[-1].selector.remote)]
    if case == "miss":
        return [miss]
    keys = []
    for _ in range(MIX_KEYS):
        draw = rng.random()
        peer = rng.choice(protects).selector.remote
        if draw < 0.8:
            keys.append(_tcp_to(peer, rng.randrange(1024, 65536)))
        elif draw < 0.9:
            keys.append(PacketKey(_ip(LOCAL), _tcp_to(peer).dst, UDP, rng.choice((500, 4500)), 500))
        else:
            keys.append(miss)
    return keys


# -- timing ----------------------------------------------------------------------------------

def time_lookups(
    variants: Sequence[tuple[Lookup, Any]], keys: list[PacketKey], repeat: int, min_ns: int,
) -> list[list[float]]:
    """Nanoseconds per ``fn(target, key, True)`` for each (fn, target): ``repeat`` timings each,
    every one looping over ``keys`` for at least ``min_ns``. The variants take turns within each
    repeat, so that a slow moment of a shared machine falls on all of them alike."""
    def one_pass(fn: Lookup, target: Any, passes: int) -> int:
        t0 = time.perf_counter_ns()
        for _ in range(passes):
            for key in keys:
                fn(target, key, True)
        return time.perf_counter_ns() - t0

    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        passes = []
        for fn, target in variants:
            one_pass(fn, target, 1)  # warm up
            passes.append(max(1, -(-min_ns // max(one_pass(fn, target, 1), 1))))
        timings: list[list[float]] = [[] for _ in variants]
        for _ in range(repeat):
            for (fn, target), n, out in zip(variants, passes, timings, strict=True):
                out.append(one_pass(fn, target, n) / (n * len(keys)))
        return timings
    finally:
        if gc_was_on:
            gc.enable()


def warm_up(duration_ns: int) -> None:
    """Look up for a while before timing: the first timings of a fresh process on a virtual
    machine run slower (clock ramp, caches), which would land on the first size alone."""
    policies = build_policies(10)
    spd, keys = SPD(policies), case_keys(policies, "mix", random.Random(0))
    end = time.perf_counter_ns() + duration_ns
    while time.perf_counter_ns() < end:
        for key in keys:
            spd.lookup(key, True)
            linear_lookup(policies, key, True)


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _check_same(spd: SPD, view: Sequence[Policy], keys: list[PacketKey]) -> None:
    for key in keys:
        if spd.lookup(key, True) is not linear_lookup(view, key, True):
            raise AssertionError(f"SPD.lookup and the scan disagree on {key}")


def measure_size(n: int, repeat: int, min_ns: int, seed: int) -> list[dict[str, Any]]:
    policies = build_policies(n)
    spd = SPD(policies)
    view = [p for p in policies if p.direction.covers(True)]
    rows = []
    for case in CASES:
        keys = case_keys(policies, case, random.Random(seed))
        _check_same(spd, view, keys)
        timings = time_lookups([(SPD.lookup, spd), (linear_lookup, view)], keys, repeat, min_ns)
        for impl, ns in zip(IMPLS, timings, strict=True):
            rows.append({"size": n, "policies": len(policies), "case": case, "impl": impl, "ns": ns,
                         **spread(ns)})
    return rows


def measure_crossover(repeat: int, min_ns: int) -> list[dict[str, Any]]:
    """Small SPDs: the old scan, and the SPD forced to its scan and to its index."""
    rows = []
    for size in CROSSOVER_SIZES:
        policies = small_policies(size)
        view = [p for p in policies if p.direction.covers(True)]
        scan = SPD(policies, index=False)
        index = SPD(policies, index=True)
        chosen = "index" if SPD(policies)._out_groups else "scan"
        for case in ("first", "last", "miss"):
            keys = case_keys(policies, case, random.Random(0))
            _check_same(scan, view, keys)
            _check_same(index, view, keys)
            before, by_scan, by_index = time_lookups(
                [(linear_lookup, view), (SPD.lookup, scan), (SPD.lookup, index)], keys, repeat, min_ns)
            rows.append({"size": size, "case": case, "chosen": chosen, "before": spread(before),
                         "scan": spread(by_scan), "index": spread(by_index)})
    return rows


# -- report ----------------------------------------------------------------------------------

def ratios(rows: list[dict[str, Any]], sizes: Sequence[int]) -> dict[str, dict[str, float]]:
    """Median cost at the largest size over the median at the smallest, per case and lookup."""
    med = {(r["size"], r["case"], r["impl"]): r["median"] for r in rows}
    lo, hi = min(sizes), max(sizes)
    return {case: {impl: med[hi, case, impl] / med[lo, case, impl] for impl in IMPLS} for case in CASES}


def _fig(s: dict[str, float]) -> str:
    return f"{s['median']:,.0f} ({s['min']:,.0f}-{s['max']:,.0f})"


def format_table(result: dict[str, Any]) -> str:
    rows = result["results"]
    sizes = result["settings"]["sizes"]
    out = [f"SPD lookup, ns per lookup: median (min-max) of {result['settings']['repeat']} timings; "
           f"outbound TCP; an empty call costs {result['call_overhead_ns']:.0f} ns",
           "size = protect policies; the SPD holds size + 3 (2 IKE bypasses, discard all)", ""]
    head = (f"{'size':>6}  {'case':<6} {'indexed (SPD.lookup)':>24} {'linear (old scan)':>26} "
            f"{'linear/indexed':>15}")
    out += [head, "-" * len(head)]
    by = {(r["size"], r["case"], r["impl"]): r for r in rows}
    for n in sizes:
        for case in CASES:
            ix, ln = by[n, case, "indexed"], by[n, case, "linear"]
            times = ln["median"] / ix["median"]
            out.append(f"{n:>6,}  {case:<6} {_fig(ix):>24} {_fig(ln):>26} {times:>14.1f}x")
    if len(sizes) > 1:
        lo, hi = min(sizes), max(sizes)
        out += ["", f"ratio {hi:,} / {lo:,} (median cost at {hi:,} protect policies over {lo:,}):"]
        for case, r in result["ratios"].items():
            out.append(f"  {case:<6} indexed {r['indexed']:>7.2f}x   linear {r['linear']:>9.2f}x")
    if result.get("crossover"):
        out += ["", "small SPDs (--crossover): before = old scan, scan/index = the SPD forced to each; "
                "* = what the SPD uses", ""]
        head = f"{'policies':>8}  {'case':<6} {'before':>20} {'scan':>20} {'index':>20}"
        out += [head, "-" * len(head)]
        for r in result["crossover"]:
            scan, index = _fig(r["scan"]), _fig(r["index"])
            scan, index = (scan + "*", index + " ") if r["chosen"] == "scan" else (scan + " ", index + "*")
            out.append(f"{r['size']:>8}  {r['case']:<6} {_fig(r['before']):>20} {scan:>21} {index:>21}")
    return "\n".join(out)


def _size_list(text: str) -> list[int]:
    try:
        sizes = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not sizes or sizes[0] < 1 or sizes[-1] > 100_000:
        raise argparse.ArgumentTypeError("sizes are 1..100000")
    return sizes


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nfq_ipsec_lab.bench.spdscale",
                                description=__doc__.split("\n\n")[0] if __doc__ else None,
                                epilog="A script, not a test: figures from one run compare with each other.")
    p.add_argument("--sizes", type=_size_list, default=[10, 1000, 10000], metavar="LIST",
                   help="protect policies per SPD, comma-separated (default 10,1000,10000)")
    p.add_argument("--repeat", type=_positive_int, default=7, metavar="N",
                   help="timings per figure; the median and min-max are reported (default 7)")
    p.add_argument("--min-ms", type=_positive_int, default=50, metavar="MS",
                   help="each timing loops over its keys for at least this long (default 50)")
    p.add_argument("--seed", type=int, default=1, help="seed of the mix case's keys (default 1)")
    p.add_argument("--crossover", action="store_true",
                   help="also time SPDs of 1..16 policies: old scan, the SPD's scan, its index")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures here")
    args = p.parse_args(argv)
    min_ns = args.min_ms * 1_000_000
    warm_up(10 * min_ns)
    rows = [row for n in args.sizes for row in measure_size(n, args.repeat, min_ns, args.seed)]
    overhead = spread(time_lookups([(_noop, None)], [PacketKey(0, 0, TCP, 1, 2)], args.repeat, min_ns)[0])
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "settings": {"sizes": args.sizes, "repeat": args.repeat, "min_ms": args.min_ms, "seed": args.seed,
                     "linear_scan_max": spd_module.LINEAR_SCAN_MAX},
        "python": platform.python_implementation() + " " + platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "call_overhead_ns": overhead["median"],
        "results": rows,
        "ratios": ratios(rows, args.sizes),
    }
    if args.crossover:
        result["crossover"] = measure_crossover(args.repeat, min_ns)
    print(format_table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

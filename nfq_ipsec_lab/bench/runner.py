"""One benchmark run: every (row, queues) test bed in turn, then the table, JSON and chart.

Rows run one after the other, each in a fresh lab that is gone before the next one starts; a
row that fails is reported as failed and the run goes on. Before each row the machine is
watched for a second while the benchmark does nothing: if it is busy then (other tests,
other users), the table says so. The 1-minute load average before and after each row is
recorded too, but it is no warning sign by itself: it still holds the benchmark's own previous
row (iperf3 -P 8 alone is eight runnable threads). Only one benchmark runs at a time (a lock
file); a second one exits with status 75 at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from ..lab import netns
from ..lab.netns import Lab
from . import beds, measure, report, strongswan

PREFIX = "nfqb"  # namespace names nfqb<pid>-<n><role>
LOCK_PATH = "/run/nfq-ipsec-bench.lock"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUSY, EXIT_INTERRUPTED = 0, 1, 2, 75, 130
SETTLE = 0.5  # seconds after the previous row's lab is gone (the kernel frees namespaces lazily)
IDLE_CHECK = 1.0  # then seconds of watching the machine while the benchmark does nothing


@dataclass
class Settings:
    rows: list[str]
    queues: list[int]
    repetitions: int = 3
    seconds: float = 2.0
    pings: int = 20
    cpu_layout: str = "spread"
    out: Path = Path("bench-results")
    name: str | None = None
    busy_warn: float = 0.25  # fraction of all CPUs busy outside the benchmark
    load_warn: float | None = None  # 1-minute load average; None: the number of CPUs
    quick: bool = False
    order: str = "interleaved"  # or "rows" (see schedule)
    argv: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows, "queues": self.queues, "repetitions": self.repetitions,
            "seconds": self.seconds, "pings": self.pings, "cpu_layout": self.cpu_layout,
            "busy_warn": self.busy_warn, "load_warn": self.load_warn, "quick": self.quick,
            "order": self.order,
        }


def check_environment() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("the benchmark needs root (network namespaces, iptables)")
    for tool in ("ip", "iptables", "iptables-restore", "iperf3", "ss", "sysctl"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} is not installed (run scripts/install-deps)")
    return problems


@contextlib.contextmanager
def exclusive(path: str = LOCK_PATH) -> Iterator[bool]:
    """True while we hold the benchmark lock; False if another benchmark holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield True
    finally:
        os.close(fd)


def lock_holder(path: str = LOCK_PATH) -> str:
    with contextlib.suppress(OSError):
        return Path(path).read_text().strip()
    return "?"


def remove_stale(out: IO[str]) -> None:
    """Benchmark namespaces left by a run that was killed with SIGKILL (its pid is gone)."""
    netns.remove_stale(out, PREFIX, "benchmark")


def plan(settings: Settings) -> list[tuple[beds.RowSpec, int | None]]:
    out: list[tuple[beds.RowSpec, int | None]] = []
    for key in settings.rows:
        spec = beds.row_spec(key)
        if spec.per_queue:
            out += [(spec, q) for q in settings.queues]
        else:
            out.append((spec, None))
    return out


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def new_row(spec: beds.RowSpec, queues: int | None) -> dict[str, Any]:
    return {
        "key": spec.key, "label": spec.label, "kind": spec.kind, "topology": spec.topology,
        "encryption": spec.encryption, "encapsulation": spec.encapsulation, "base": spec.base,
        "queues": queues, "note": spec.note, "status": "ok",
        "error": None, "dataplane": [], "info": {}, "repetitions": [], "seconds": 0.0,
        "builds": 0,
    }


def schedule(beds_count: int, repetitions: int, order: str) -> list[tuple[int, int]]:
    """(test bed index, repetitions to run on one build of it), in running order. ``rows``:
    each bed once with all its repetitions. ``interleaved``: round after round, one repetition
    of every bed per round, so a machine whose speed drifts over minutes (shared VMs do)
    weighs on every row alike and the ratios between rows stay fair."""
    if order == "rows":
        return [(i, repetitions) for i in range(beds_count)]
    return [(i, 1) for _ in range(repetitions) for i in range(beds_count)]


def engine_absent(name: str) -> str | None:
    """Why this machine has no engine ``name`` (its probe's reason), or None."""
    from nfq_ipsec.engines.team import default_engines

    for engine in default_engines():
        if engine.name == name:
            return engine.probe().absent
    return f"no engine named {name!r}"


def measure_row(
    spec: beds.RowSpec, queues: int | None, settings: Settings, say: Any,
    repetitions: int | None = None, row: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the row's test bed, run ``repetitions`` (default: all) on it, tear it down. The
    row's record: ``row`` carried on from an earlier build, or a new one."""
    row = row if row is not None else new_row(spec, queues)
    if row["status"] != "ok":  # failed or skipped on an earlier build: not tried again
        return row
    if spec.kind == "strongswan":
        why = strongswan.missing()
        if why is not None:
            row.update(status="skipped", error=f"strongSwan: {why}")
            return row
    if spec.engine is not None:
        why = engine_absent(spec.engine)
        if why is not None:  # AF_ALG on a kernel without it: nothing to measure, not a failure
            row.update(status="skipped", error=f"engine {spec.engine} absent here: {why}")
            return row
    time.sleep(SETTLE)
    busy, load = measure.busy_fraction(IDLE_CHECK), measure.loadavg()[0]
    if row["builds"] == 0 or busy > row["busy_before"]:  # the busiest moment before a build
        row["busy_before"], row["load_before"] = busy, load
    row["builds"] += 1
    t0 = time.monotonic()
    try:
        with Lab(prefix=PREFIX) as lab:
            bed = beds.build(lab, spec, queues or 1, settings.cpu_layout)
            measure.check_path(bed.path)
            row.setdefault("setup_seconds", round(time.monotonic() - t0, 2))
            row["dataplane"] = [p.name for p in bed.dataplane]
            row["info"] = bed.info
            meter = measure.CpuMeter(bed.dataplane_pids)
            for _ in range(repetitions or settings.repetitions):
                rep = measure.repetition(bed.path, meter, bed.queue_hosts, settings.seconds,
                                         settings.pings, bed.workers)
                bed.check_alive()
                row["repetitions"].append(rep)
                say(f"    rep {len(row['repetitions'])}/{settings.repetitions}: "
                    f"TCP x1 {rep['tcp1']['mbit']:.0f} Mbit/s, x8 {rep['tcp8']['mbit']:.0f} Mbit/s, "
                    f"UDP 64 B {rep['udp64']['pps'] / 1e3:.1f} kpps of {rep['udp64']['sent_pps'] / 1e3:.1f} "
                    f"sent, ping p50 {report.num(rep['ping']['p50_ms'])} ms "
                    f"({rep['ping']['received']}/{rep['ping']['sent']})")
            if bed.daemons:
                row["dataplane_status"], row["dataplane_sas"] = bed.daemon_status()
    except Exception as err:  # one broken row must not cost the figures of the others
        row.update(status="failed", error=str(err) or type(err).__name__)
        row["traceback"] = traceback.format_exc(limit=6)
    row["seconds"] = round(row["seconds"] + time.monotonic() - t0, 1)
    row["load_after"] = measure.loadavg()[0]
    if row["status"] == "ok" and not row["repetitions"]:
        row.update(status="failed", error="no repetition was measured")
    return row


def run_bench(settings: Settings, out: IO[str] | None = None) -> int:
    out = out or sys.stdout

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    problems = check_environment()
    if problems:
        for p in problems:
            say(f"nfq-ipsec bench: {p}")
        return EXIT_USAGE
    with exclusive() as mine:
        if not mine:
            say(f"nfq-ipsec bench: another benchmark is running (pid {lock_holder()}); "
                "benchmarks never run at the same time")
            return EXIT_BUSY
        return _run_locked(settings, say)


def _run_locked(settings: Settings, say: Any) -> int:
    remove_stale(sys.stderr)
    started = _now()
    stamp = settings.name or "bench-" + datetime.now().strftime("%Y%m%d-%H%M%S")
    settings.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path, txt_path = (settings.out / f"{stamp}.{ext}" for ext in ("json", "png", "txt"))
    machine = measure.machine_info()
    cores = machine["cores"] or 1
    load_warn = settings.load_warn if settings.load_warn is not None else float(cores)
    result: dict[str, Any] = {
        "schema": report.SCHEMA, "started": started, "finished": None, "interrupted": False,
        "command": settings.argv, "settings": settings.as_json(), "machine": machine,
        "load": {"start": measure.loadavg(), "end": None}, "rows": [], "warnings": [],
        "files": {"json": str(json_path), "png": str(png_path), "table": str(txt_path)},
    }
    warnings: list[str] = result["warnings"]
    start_busy = measure.busy_fraction(1.0)
    result["load"]["start_busy"] = start_busy
    if result["load"]["start"][0] > load_warn or start_busy > settings.busy_warn:
        warnings.append(f"the machine was busy at the start: load {result['load']['start'][0]:.2f}, "
                        f"{start_busy:.0%} of the CPUs busy outside the benchmark; figures are noisy")
        say(f"WARNING: {warnings[-1]}")
    todo = plan(settings)
    say(f"nfq-ipsec bench: {len(todo)} test beds, {settings.repetitions} repetition(s) each "
        f"({settings.order}), {settings.seconds:g} s per iperf3 run; results in {settings.out}/")
    code = EXIT_OK
    t0 = time.monotonic()
    rows: dict[int, dict[str, Any]] = {}
    warned: set[int] = set()
    steps = schedule(len(todo), settings.repetitions, settings.order)
    try:
        for step, (i, reps) in enumerate(steps):
            spec, queues = todo[i]
            q = "" if queues is None else f", {queues} queue(s)"
            rounds = settings.repetitions // reps
            rnd = f", round {step // len(todo) + 1}/{rounds}" if rounds > 1 else ""
            previous = rows.get(i)
            if previous is not None and previous["status"] != "ok":
                continue
            say(f"[{i + 1}/{len(todo)}] {spec.label}{q}{rnd}")
            row = rows[i] = measure_row(spec, queues, settings, say, reps, previous)
            if row["status"] == "failed":
                code = EXIT_FAILED
                say(f"    FAILED: {row['error']}")
            elif row["status"] == "skipped":
                say(f"    {row['error']}")
            else:
                busy, load = row["busy_before"], row["load_before"]
                if busy > settings.busy_warn and i not in warned:
                    warned.add(i)
                    warnings.append(f"{spec.label}{q}: {busy:.0%} of the CPUs were busy outside the "
                                    f"benchmark just before it (load {load:.2f})")
                    say(f"    WARNING: {warnings[-1]}")
                say(f"    done in {row['seconds']:.0f} s (load {row['load_before']:.2f} -> "
                    f"{row['load_after']:.2f})")
    except KeyboardInterrupt:
        result["interrupted"] = True
        code = EXIT_INTERRUPTED
        warnings.append("interrupted: the figures cover only the repetitions before Ctrl-C")
        say("\ninterrupted; writing what was measured")
    result["rows"] = [rows[i] for i in sorted(rows)]
    result["finished"] = _now()
    result["duration_s"] = round(time.monotonic() - t0, 1)
    result["load"]["end"] = measure.loadavg()
    for row in result["rows"]:
        row["summary"] = report.summarise(row) if row["status"] == "ok" else None
    report.add_ratios(result["rows"])
    report.write_json(result, json_path)
    why = report.write_png(result, png_path)
    if why is not None:
        warnings.append(f"no chart: {why}")
        result["files"]["png"] = None
        report.write_json(result, json_path)
    text = report.table(result)
    txt_path.write_text(text + "\n")
    say("")
    say(text)
    say("")
    say(f"raw figures and machine info: {json_path}")
    if result["files"]["png"]:
        say(f"chart: {png_path}")
    say(f"table: {txt_path}")
    return code

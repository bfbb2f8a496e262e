"""What the benchmark measures and how: traffic through a test bed, CPU time, load, machine info.

One repetition on a test bed (:class:`~nfq_ipsec_lab.bench.beds.Bed`) runs, in this order, with a
short pause between them so that queues drain:

0. idle: the data-plane processes' CPU time over one second without traffic (what a daemon
   costs while nothing happens: its timers, and polling if it polled while idle), from
   ``/proc/<pid>/task/*/schedstat`` (nanoseconds);
1. ping: the lab's raw-socket ICMP echo (``traffic.ping``), N pings 0.1 s apart, on an idle
   path (every packet meets workers that went to sleep: the round trip interactive traffic
   sees); then 5N pings 2 ms apart (the workers still awake from the last packet: the round
   trip within a burst); each reply's round-trip time in ms;
2. TCP, one flow: ``iperf3 -t S`` (``traffic.iperf3_tcp``), Mbit/s as received;
3. TCP, eight flows: ``iperf3 -t S -P 8``;
4. UDP, 64-byte datagrams as fast as one iperf3 sender can: ``iperf3 -u -l 64 -b 0``; the
   datagrams that arrived (sent minus lost, iperf3's server count) per second.

CPU: around each traffic run, the utime and stime (``/proc/<pid>/stat``) of the data-plane processes
(the daemons and every process below them, the accept-only workers, charon) and the busy time
of the whole machine (``/proc/stat``: everything but idle and iowait, over all CPUs; that one
includes iperf3, the kernel's softirq work and whatever else runs on the machine).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sysconfig
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from nfq_ipsec import corebuild
from nfq_ipsec.nfqueue import PROC_QUEUES, KernelQueueStats

from ..lab import traffic
from ..lab.netns import Host, Lab, LabError, run

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAUSE = 0.3  # seconds between traffic runs: let queues and sockets drain
IDLE_SECONDS = 1.0  # how long the idle CPU is measured
PING_INTERVAL = 0.1  # seconds between pings: sleeping workers
WARM_PING_INTERVAL = 0.002  # seconds between pings within a burst: workers awake
WARM_PINGS = 5  # warm pings per cold ping
IPERF_PORT = 5201


# -- CPU time -------------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def process_cpu_seconds(pid: int) -> tuple[float, float] | None:
    """(utime, stime) of a process (all its threads) in seconds, or None if it is gone."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 13:
        return None
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # fields 14 and 15 of proc(5)


def with_descendants(roots: Iterable[int]) -> set[int]:
    """The given pids and every process below them (walks /proc once)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None or len(fields) < 2:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: set[int] = set()
    todo = [p for p in roots if p > 0]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, ()))
    return found


def system_busy_seconds() -> float:
    """CPU seconds the whole machine was busy since boot (all CPUs; not idle, not iowait)."""
    with open("/proc/stat", encoding="ascii") as f:
        first = f.readline().split()
    values = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(values) - values[3] - values[4]) / CLK_TCK


@dataclass(frozen=True)
class CpuTime:
    """CPU seconds over one interval: the data-plane processes (user and kernel mode; kernel
    mode includes what the kernel does on their behalf in a syscall, for a worker the rest of
    a reinjected packet's way through the stack) and the whole machine."""

    user: float
    kernel: float
    machine: float

    @property
    def dataplane(self) -> float:
        return self.user + self.kernel

    def as_json(self) -> dict[str, float]:
        return {"cpu_s": round(self.dataplane, 3), "cpu_user_s": round(self.user, 3),
                "cpu_kernel_s": round(self.kernel, 3), "system_cpu_s": round(self.machine, 3)}


class CpuMeter:
    """CPU seconds of the data-plane processes and of the whole machine over one interval."""

    def __init__(self, roots: Callable[[], Sequence[int]]) -> None:
        self.roots = roots
        self._start: dict[int, tuple[float, float]] = {}
        self._machine = 0.0

    def start(self) -> None:
        self._start = self._sample()
        self._machine = system_busy_seconds()

    def stop(self) -> CpuTime:
        machine = system_busy_seconds() - self._machine
        user = kernel = 0.0
        for pid, (u, k) in self._sample().items():
            u0, k0 = self._start.get(pid, (0.0, 0.0))
            user += max(0.0, u - u0)
            kernel += max(0.0, k - k0)
        return CpuTime(user, kernel, machine)

    def _sample(self) -> dict[int, tuple[float, float]]:
        out = {}
        for pid in with_descendants(self.roots()):
            t = process_cpu_seconds(pid)
            if t is not None:
                out[pid] = t
        return out


# -- load -----------------------------------------------------------------------------------

def loadavg() -> tuple[float, float, float]:
    with open("/proc/loadavg", encoding="ascii") as f:
        a, b, c = f.read().split()[:3]
    return float(a), float(b), float(c)


def busy_fraction(seconds: float = 0.5) -> float:
    """How busy the machine is while the benchmark itself does nothing: 0.0 (idle) .. 1.0."""
    t0, b0 = time.monotonic(), system_busy_seconds()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    cores = os.cpu_count() or 1
    return max(0.0, min(1.0, (system_busy_seconds() - b0) / (elapsed * cores)))


# -- statistics -----------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty sequence."""
    if not values:
        raise ValueError("percentile of nothing")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def spread(values: Iterable[float | None]) -> dict[str, float] | None:
    """Median, min and max of the values that exist; None if none do."""
    got = [v for v in values if v is not None]
    if not got:
        return None
    return {"median": statistics.median(got), "min": min(got), "max": max(got), "n": len(got)}


# -- traffic --------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrafficPath:
    """Where the traffic goes: client, server and the server's address, and the lab."""

    lab: Lab
    client: Host
    server: Host
    server_addr: str


def check_path(path: TrafficPath) -> None:
    """A few pings before measuring: ARP resolved, and a test bed that passes nothing fails
    here with a clear message instead of in an iperf3 run that hangs."""
    res = traffic.ping(path.client, path.server_addr, count=3, wait=1.0)
    if res.received == 0:
        raise LabError(f"no ping reply from {path.server_addr} through this test bed: it passes nothing")


def measure_ping(path: TrafficPath, count: int, interval: float = PING_INTERVAL) -> dict[str, Any]:
    res = traffic.ping(path.client, path.server_addr, count=count, wait=2.0, interval=interval)
    rtts = [float(m.group(1)) for m in re.finditer(r"time=([0-9.]+) ms", res.output)]
    return {
        "interval_s": interval,
        "sent": res.sent,
        "received": res.received,
        "rtt_ms": rtts,
        "p50_ms": percentile(rtts, 50) if rtts else None,
        "p99_ms": percentile(rtts, 99) if rtts else None,
    }


def measure_tcp(path: TrafficPath, meter: CpuMeter, seconds: float, flows: int) -> dict[str, Any]:
    meter.start()
    r = traffic.iperf3_tcp(path.lab, path.client, path.server, path.server_addr, seconds=seconds,
                           parallel=flows, port=IPERF_PORT)
    cpu = meter.stop()
    return {
        "flows": flows,
        "mbit": r.mbit,
        "bytes": r.bytes_received,
        "bytes_sent": r.bytes_sent,
        "seconds": r.seconds,
        "retransmits": r.retransmits,
        **cpu.as_json(),
    }


def measure_udp64(path: TrafficPath, meter: CpuMeter, seconds: float) -> dict[str, Any]:
    meter.start()
    r = traffic.iperf3_udp(path.lab, path.client, path.server, path.server_addr, seconds=seconds,
                           bitrate="0", length=64, port=IPERF_PORT)
    cpu = meter.stop()
    delivered = max(0, r.packets - r.lost_packets)
    return {
        "length": 64,
        "sent": r.packets,
        "delivered": delivered,
        "seconds": r.seconds,
        "pps": delivered / r.seconds if r.seconds > 0 else 0.0,
        "sent_pps": r.packets / r.seconds if r.seconds > 0 else 0.0,
        **cpu.as_json(),
    }


def queue_counters(hosts: Iterable[Host]) -> dict[str, dict[str, int]]:
    """The kernel's NFQUEUE counters, summed over the queues of each host (namespace)."""
    out: dict[str, dict[str, int]] = {}
    for host in hosts:
        res = host.run(["cat", PROC_QUEUES], check=False)
        total = {"queued": 0, "queue_dropped": 0, "user_dropped": 0}
        for line in res.stdout.splitlines():
            with contextlib.suppress(ValueError, TypeError):
                st = KernelQueueStats(*(int(x) for x in line.split()[:8]))
                total["queued"] += st.id_sequence
                total["queue_dropped"] += st.queue_dropped
                total["user_dropped"] += st.user_dropped
        out[host.name] = total
    return out


def counters_delta(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]],
) -> dict[str, int]:
    """What the queues of all hosts together counted between two snapshots."""
    total = {"queued": 0, "queue_dropped": 0, "user_dropped": 0}
    for host, counts in after.items():
        for key in total:
            total[key] += counts[key] - before.get(host, {}).get(key, 0)
    return total


def run_ns(roots: Iterable[int]) -> dict[int, int]:
    """Nanoseconds each of the given processes and all below them has run on a CPU, its
    threads included (``/proc/<pid>/task/<tid>/schedstat``: finer than the clock ticks of
    ``stat``, which would round a second's idle CPU to 1 %)."""
    out = {}
    for pid in with_descendants(roots):
        total, seen = 0, False
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError), \
                        open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                    total += int(f.read().split()[0])
                    seen = True
        if seen:
            out[pid] = total
    return out


def measure_idle(roots: Callable[[], Sequence[int]], workers: int) -> dict[str, Any]:
    """The data plane's CPU time over IDLE_SECONDS without traffic, as a share of one CPU:
    all its processes together, and per worker (``workers``: the processes that carry
    packets; 0 for a row without any)."""
    before = run_ns(roots())
    t0 = time.monotonic()
    time.sleep(IDLE_SECONDS)
    elapsed = time.monotonic() - t0
    after = run_ns(roots())
    cpu_s = sum(max(0, ns - before.get(pid, 0)) for pid, ns in after.items()) / 1e9
    share = cpu_s / elapsed
    return {"seconds": round(elapsed, 3), "cpu_s": round(cpu_s, 6),
            "cpu_share": round(share, 5), "workers": workers,
            "cpu_share_per_worker": round(share / workers, 5) if workers else None}


def repetition(
    path: TrafficPath, meter: CpuMeter, queue_hosts: Sequence[Host], seconds: float, pings: int,
    workers: int = 0,
) -> dict[str, Any]:
    """One repetition: idle CPU, ping (apart, then in a burst), TCP x1, TCP x8, UDP 64 B (see
    the module docstring)."""
    rep: dict[str, Any] = {"load_before": loadavg()[0]}
    rep["idle"] = measure_idle(meter.roots, workers)
    rep["ping"] = measure_ping(path, pings)
    rep["ping_warm"] = measure_ping(path, pings * WARM_PINGS, WARM_PING_INTERVAL)
    time.sleep(PAUSE)
    rep["tcp1"] = measure_tcp(path, meter, seconds, 1)
    time.sleep(PAUSE)
    rep["tcp8"] = measure_tcp(path, meter, seconds, 8)
    time.sleep(PAUSE)
    before = queue_counters(queue_hosts)
    rep["udp64"] = measure_udp64(path, meter, seconds)
    rep["udp64"]["queues"] = counters_delta(before, queue_counters(queue_hosts)) if queue_hosts else None
    time.sleep(PAUSE)
    rep["load_after"] = loadavg()[0]
    return rep


# -- the machine ----------------------------------------------------------------------------

def _first_line(argv: Sequence[str]) -> str:
    try:
        res = run(argv, check=False, timeout=10)
    except LabError:
        return ""
    return (res.stdout or res.stderr).strip().splitlines()[0] if (res.stdout or res.stderr).strip() else ""


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def dpkg_version(package: str) -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    res = subprocess.run(["dpkg-query", "-W", "-f", "${Status} ${Version}", package],
                         capture_output=True, text=True, check=False)
    words = res.stdout.split()
    if res.returncode != 0 or "installed" not in words[:3] or len(words) < 4:
        return None
    return words[-1]


def python_build() -> str:
    """Which build of the interpreter runs the data path: the figures depend on it (a
    shared-library build without PGO is markedly slower than a distribution's static one)."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            shared = "libpython" in maps.read()
    except OSError:
        shared = bool(sysconfig.get_config_var("Py_ENABLE_SHARED"))
    linked = "libpython shared library" if shared else "statically linked"
    return f"{platform.python_implementation()} {platform.python_version()}, {linked}, " \
        f"{platform.python_compiler()}"


def machine_info() -> dict[str, Any]:
    from cryptography.hazmat.backends.openssl.backend import backend

    uname = os.uname()
    return {
        "hostname": uname.nodename,
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "online_cpus": sorted(os.sched_getaffinity(0)),
        "kernel": f"{uname.sysname} {uname.release} {uname.version}",
        "machine": uname.machine,
        "python": platform.python_version(),
        "python_build": python_build(),
        "core_build": corebuild.running().detail,
        "versions": {
            "nfq_ipsec": package_version("nfq-ipsec"),
            "cryptography": package_version("cryptography"),
            "openssl": backend.openssl_version_text(),
            "matplotlib": package_version("matplotlib"),
            "iperf3": _first_line(["iperf3", "--version"]),
            "iptables": _first_line(["iptables", "--version"]),
            "strongswan": dpkg_version("strongswan-charon"),
        },
    }

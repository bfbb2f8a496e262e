"""ESP in UDP, several datagrams per system call: does ``UDP_SEGMENT`` or ``UDP_GRO`` pay?

A standalone measurement, not a benchmark row: two lab namespaces joined by a veth pair (the
benchmark's host topology, 192.168.56.10 -> .11); in ``a`` a sender sends ``--count``
ESP-in-UDP datagrams of one flow (port 4500 to 4500, each the ESP packet of a TCP segment of
``--size`` bytes, AES-GCM-128 transport, sealed by the ESP core); in ``b`` a receiver counts
them. Scenarios, each run once per round, rounds interleaved (``--rounds``)::

    send      one sendmsg per datagram, or UDP_SEGMENT: one sendmsg of --batch datagrams
              (gso_size = the datagram's size; the kernel cuts them apart, or hands the whole
              superpacket to a receiver that asked for it)
    receive   one recvmsg per datagram, or UDP_GRO: one recvmsg of a coalesced superpacket
    crypto    none: the sender cycles through 256 datagrams sealed beforehand and the receiver
              only counts (the system calls alone); core: the sender seals every datagram
              with the core (``Processor.process``, as a worker does) and the receiver opens
              every one with the core; gso: core, but the sender first cuts each batch out of
              one TCP superpacket of --batch segments, as a worker given GSO packets by its
              queue (NFQA_CFG_F_GSO) would have to: headers and the full TCP checksum of every
              segment in Python (the kernel's GSO would have done that), then seals each
    veth GRO  GRO on the receiving veth (and TSO off on the sending one, which makes a veth
              hand its packets to GRO): what a NIC's GRO does to datagrams sent one by one

Figures per scenario (median, min-max over the rounds): datagrams per second and Gbit/s
(UDP payload bytes) as the receiver saw them (first to last datagram), the sender's rate, the
CPU microseconds per datagram of the sender and of the receiver (their own user + system time;
the veth's softirq work partly lands there), and the ratio of each to the per-datagram
scenario (``sendmsg`` + ``recvmsg``) with the same crypto, taken round by round. Needs root;
the namespaces are ``<--prefix><pid>-<n>a``/``b`` and go on every exit path::

    .venv/bin/python -m nfq_ipsec_lab.bench.udpgso --count 100000 --rounds 5
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import resource
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from nfq_ipsec.core import Verdict, udpencap
from nfq_ipsec.core import packet as ip
from nfq_ipsec.core.processor import ARRIVING, LEAVING, Processor

from ..lab import topology
from ..lab.netns import Lab, LabError
from . import beds, profile

SOL_UDP = 17
UDP_SEGMENT = 103  # linux/udp.h: gso_size for sends
UDP_GRO = 104  # linux/udp.h: coalesced receives, gso_size in a cmsg
SIOCETHTOOL = 0x8946
ETHTOOL_SGRO = 0x2C
ETHTOOL_STSO = 0x1F
PORT = 4500
OUTER = 28  # IPv4 and UDP header in front of the ESP packet
RING = 256
NOW = 1.0  # the processors' clock: no lifetimes here
RCVBUF = 64 << 20
SO_RCVBUFFORCE = 33  # asm-generic/socket.h (root: above rmem_max)
READY_TIMEOUT = 15.0
PREFIX = "nfqg"  # namespace names nfqg<pid>-<n>a / b (--prefix)


@dataclass(frozen=True)
class Scenario:
    batch: int  # datagrams per sendmsg; 1: no UDP_SEGMENT
    gro: bool  # the receiving socket sets UDP_GRO
    crypto: str  # "none", "core" or "gso"
    veth_gro: bool = False  # GRO on the receiving veth (NAPI): what a NIC's GRO would do

    @property
    def name(self) -> str:
        send = "sendmsg x1" if self.batch == 1 else f"UDP_SEGMENT x{self.batch}"
        recv = "UDP_GRO" if self.gro else "recvmsg x1"
        return f"{send} -> {recv}{' +veth GRO' if self.veth_gro else ''}, crypto {self.crypto}"

    @property
    def baseline(self) -> Scenario:
        """What the ratios compare with: one system call per datagram each way, the same
        cipher work (gso: core)."""
        return Scenario(1, False, "none" if self.crypto == "none" else "core")


def scenarios(batch: int) -> list[Scenario]:
    out = []
    for crypto in ("none", "core"):
        out += [Scenario(1, False, crypto), Scenario(batch, False, crypto),
                Scenario(1, True, crypto), Scenario(batch, True, crypto)]
    out += [Scenario(batch, False, "gso"), Scenario(batch, True, "gso"),
            Scenario(1, True, "none", veth_gro=True)]
    return out


# -- the core's side ---------------------------------------------------------------------

def make_configs(workdir: Path) -> tuple[Path, Path]:
    """Both peers' configurations (AES-GCM-128 transport, every SA ESP in UDP, 4500)."""
    a, b = profile._peers("aes-gcm-128", "transport", workdir)
    for path in (a, b):
        beds.encapsulate_udp(path)
    return a, b


def _processor(config: Path) -> Processor:
    proc = profile.processor(config)
    for sa in proc.sad.all():  # no state store here: numbers without reservations
        sa.seq_limit = sa.max_seq
        sa.replay_limit = 1 << 62
    return proc


def sealer(config: Path) -> Callable[[bytes], bytes]:
    """An inner packet's ESP-in-UDP payload, sealed by the core (a worker's outbound call)."""
    proc = _processor(config)
    process = proc.process

    def seal(inner: bytes) -> bytes:
        res = process(inner, len(inner), LEAVING, NOW)
        out = res.packet
        if res.verdict is not Verdict.ACCEPT or out is None or out[9] != ip.PROTO_UDP:
            raise RuntimeError(f"the core did not seal an ESP-in-UDP packet: {res!r}")
        return out[OUTER:]

    return seal


def segmenter(size: int, batch: int) -> Callable[[], list[bytes]]:
    """The next ``batch`` TCP segments of ``size`` bytes, cut out of one superpacket of a flow
    as software segmentation must: each its slice of the payload, its own IPv4 header (length,
    identification, checksum) and TCP header (sequence number, flags, the full checksum)."""
    mss = size - 40
    payload = (bytes(range(256)) * (mss * batch // 256 + 1))[:mss * batch]
    src, dst = int(IPv4Address(profile.A_ADDR)), int(IPv4Address(profile.B_ADDR))
    tcp_hdr = struct.Struct("!HHIIBBHHH")
    state = {"seq": 1, "id": 0}

    def cut() -> list[bytes]:
        out = []
        seq, ident = state["seq"], state["id"]
        for i in range(batch):
            body = payload[i * mss:(i + 1) * mss]
            flags = 0x18 if i == batch - 1 else 0x10  # PSH on the last one, as GSO does
            tcp = tcp_hdr.pack(40000, 5201, seq, 1, 0x50, flags, 65535, 0, 0) + body
            csum = udpencap.l4_checksum(src, dst, ip.PROTO_TCP, tcp)
            hdr = struct.pack("!BBHHHBBHII", 0x45, 0, 40 + len(body), ident, 0x4000, 64,
                              ip.PROTO_TCP, 0, src, dst)
            out.append(ip.rewrite_header(hdr, ip.PROTO_TCP, 40 + len(body))
                       + tcp[:16] + csum.to_bytes(2, "big") + tcp[18:])
            seq += len(body)
            ident = (ident + 1) & 0xFFFF
        state["seq"], state["id"] = seq, ident
        return out

    return cut


def opener(config: Path) -> Callable[[bytes], bool]:
    """Open one ESP-in-UDP payload with the core, as it would arrive (IPv4 and UDP header)."""
    proc = _processor(config)
    process = proc.process
    src, dst = int(IPv4Address(profile.A_ADDR)), int(IPv4Address(profile.B_ADDR))
    headers: dict[int, bytes] = {}

    def open_one(payload: bytes) -> bool:
        n = len(payload)
        head = headers.get(n)
        if head is None:
            hdr = struct.pack("!BBHHHBBHII", 0x45, 0, OUTER + n, 0, 0x4000, 64, ip.PROTO_UDP, 0, src, dst)
            head = headers[n] = ip.rewrite_header(hdr, ip.PROTO_UDP, OUTER + n) + struct.pack(
                "!HHHH", PORT, PORT, 8 + n, 0)
        data = head + payload
        return process(data, len(data), ARRIVING, NOW).verdict is Verdict.ACCEPT

    return open_one


# -- the two ends (run inside the namespaces) --------------------------------------------

def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def set_feature(interface: str, command: int, on: bool) -> None:
    """An offload on or off (ethtool's legacy ioctls, ETHTOOL_SGRO or ETHTOOL_STSO: no ethtool
    needed). GRO on a veth switches its NAPI on; a veth hands locally sent UDP to GRO only when
    its sending end does no TSO."""
    value = ctypes.create_string_buffer(struct.pack("II", command, int(on)))
    ifreq = struct.pack("16sP", interface.encode(), ctypes.addressof(value)) + bytes(16)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifreq)


def send(args: argparse.Namespace) -> dict[str, Any]:
    set_feature(args.interface, ETHTOOL_STSO, not args.veth_gro)
    seal = sealer(Path(args.config))
    inner = profile.tcp_packet(profile.A_ADDR, profile.B_ADDR, args.size)
    ring = [seal(inner) for _ in range(RING)] if args.crypto == "none" else []
    cut = segmenter(args.size, args.batch) if args.crypto == "gso" else None
    size = len(seal(inner))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    s.bind(("", PORT))
    s.connect((args.to, PORT))
    if args.batch > 1:
        s.setsockopt(SOL_UDP, UDP_SEGMENT, size)
    sendmsg, count, batch = s.sendmsg, args.count, args.batch
    calls = sent = 0
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    while sent < count:
        k = min(batch, count - sent)
        if ring:
            i = sent % RING
            parts = ring[i:i + k] if i + k <= RING else (ring[i:] + ring[:i + k - RING])
        elif cut is not None:
            parts = [seal(p) for p in cut()[:k]]
        else:
            parts = [seal(inner) for _ in range(k)]
        sendmsg(parts)
        calls += 1
        sent += k
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    s.close()
    return {"sent": sent, "calls": calls, "seconds": seconds, "cpu_s": cpu, "datagram": size}


def receive(args: argparse.Namespace) -> dict[str, Any]:
    open_one = opener(Path(args.config)) if args.crypto != "none" else None
    set_feature(args.interface, ETHTOOL_SGRO, args.veth_gro)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    if args.gro:
        s.setsockopt(SOL_UDP, UDP_GRO, 1)
    s.bind(("", PORT))
    print("ready", flush=True)
    buf = bytearray(65536)
    view = memoryview(buf)
    anc = socket.CMSG_SPACE(4)
    received = nbytes = calls = opened = 0
    s.settimeout(args.wait)
    try:
        n, ancdata, _, _ = s.recvmsg_into([buf], anc)
    except TimeoutError:
        return {"received": 0, "bytes": 0, "calls": 0, "seconds": 0.0, "cpu_s": 0.0, "opened": 0}
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    t_last = t0
    s.settimeout(args.idle)
    recvmsg_into = s.recvmsg_into
    while True:
        calls += 1
        seg = n
        for level, kind, data in ancdata:
            if level == SOL_UDP and kind == UDP_GRO:
                seg = struct.unpack("i", data[:4])[0]
        for off in range(0, n, seg):
            received += 1
            if open_one is not None:
                opened += open_one(bytes(view[off:min(off + seg, n)]))
        nbytes += n
        t_last = time.perf_counter()
        if received >= args.count:
            break
        try:
            n, ancdata, _, _ = recvmsg_into([buf], anc)
        except TimeoutError:
            break
    cpu = _cpu_seconds() - cpu0
    s.close()
    return {"received": received, "bytes": nbytes, "calls": calls, "seconds": t_last - t0,
            "cpu_s": cpu, "opened": opened}


# -- the run -----------------------------------------------------------------------------

def _child(role: str, cpu: int, extra: Sequence[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), sys.executable, "-m", "nfq_ipsec_lab.bench.udpgso",
            "--role", role, *extra]


def run_once(lab: Lab, topo: topology.Topology, sc: Scenario, args: argparse.Namespace,
             configs: tuple[Path, Path], cpus: tuple[int, int]) -> dict[str, Any]:
    common = ["--count", str(args.count), "--size", str(args.size), "--crypto", sc.crypto]
    rx = lab.start("udpgso-recv", topo.b.host, _child("recv", cpus[1], [
        *common, "--config", str(configs[1]), "--interface", topo.b.spec.interface,
        *(["--gro"] if sc.gro else []), *(["--veth-gro"] if sc.veth_gro else [])]))
    deadline = time.monotonic() + READY_TIMEOUT
    while "ready" not in rx.output():
        if rx.poll() is not None or time.monotonic() > deadline:
            raise LabError(f"the receiver did not get ready: {rx.output()[-600:]}")
        time.sleep(0.02)
    tx = topo.a.host.run(_child("send", cpus[0], [
        *common, "--config", str(configs[0]), "--to", topo.server_addr, "--batch", str(sc.batch),
        "--interface", topo.a.spec.interface, *(["--veth-gro"] if sc.veth_gro else [])]),
        timeout=600)
    rx.wait(args.idle + 60)
    got_tx = json.loads(tx.stdout.strip().splitlines()[-1])
    got_rx = json.loads(rx.output().strip().splitlines()[-1])
    if sc.crypto != "none" and got_rx["opened"] != got_rx["received"]:
        raise LabError(f"{sc.name}: the core opened {got_rx['opened']} of {got_rx['received']}")
    return {"send": got_tx, "recv": got_rx, **figures(got_tx, got_rx)}


def figures(tx: dict[str, Any], rx: dict[str, Any]) -> dict[str, float | None]:
    def div(a: float, b: float) -> float | None:
        return a / b if b > 0 else None

    return {
        "pps": div(rx["received"], rx["seconds"]),
        "gbit": div(rx["bytes"] * 8 / 1e9, rx["seconds"]),
        "send_pps": div(tx["sent"], tx["seconds"]),
        "delivered": div(rx["received"], tx["sent"]),
        "send_cpu_us": div(tx["cpu_s"] * 1e6, tx["sent"]),
        "recv_cpu_us": div(rx["cpu_s"] * 1e6, rx["received"]),
        "per_recv": div(rx["received"], rx["calls"]),
    }


METRICS = ("pps", "gbit", "send_pps", "delivered", "send_cpu_us", "recv_cpu_us", "per_recv")


def summarise(runs: dict[Scenario, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per scenario and metric: median, min, max; and the median of the round-by-round ratios
    to the scenario's baseline."""
    out: dict[str, Any] = {}
    for sc, reps in runs.items():
        entry: dict[str, Any] = {}
        base = runs.get(sc.baseline, [])
        for m in METRICS:
            vals = [r[m] for r in reps if r.get(m) is not None]
            ratios = [r[m] / b[m] for r, b in zip(reps, base, strict=False)
                      if r.get(m) is not None and b.get(m)]
            entry[m] = ({"median": statistics.median(vals), "min": min(vals), "max": max(vals),
                         "ratio": statistics.median(ratios) if ratios else None} if vals else None)
        out[sc.name] = entry
    return out


def table(summary: dict[str, Any]) -> str:
    def cell(e: dict[str, Any] | None, scale: float = 1.0, digits: int = 1) -> str:
        if not e:
            return "-"
        ratio = f" x{e['ratio']:.2f}" if e["ratio"] is not None else ""
        return f"{e['median'] * scale:.{digits}f}{ratio}"

    cols = (("scenario", 46), ("recv kpps", 15), ("Gbit/s", 13), ("send kpps", 15),
            ("delivered", 9), ("send us/pkt", 13), ("recv us/pkt", 13), ("pkts/recv", 9))
    lines = ["  ".join(f"{c:<{w}}" for c, w in cols).rstrip(), "  ".join("-" * w for _, w in cols)]
    for name, e in summary.items():
        cells = (name, cell(e["pps"], 1e-3), cell(e["gbit"], 1, 2), cell(e["send_pps"], 1e-3),
                 f"{e['delivered']['median']:.3f}" if e["delivered"] else "-",
                 cell(e["send_cpu_us"], 1, 2), cell(e["recv_cpu_us"], 1, 2),
                 f"{e['per_recv']['median']:.1f}" if e["per_recv"] else "-")
        lines.append("  ".join(f"{c:<{w}}" for c, (_, w) in zip(cells, cols, strict=True)).rstrip())
    lines.append("median over the rounds; xN: median of the round-by-round ratios to "
                 "'sendmsg x1 -> recvmsg x1' with the same crypto (gso: core); us/pkt: CPU "
                 "microseconds per datagram; pkts/recv: datagrams per recvmsg")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("udpgso: needs root (network namespaces)", file=sys.stderr)
        return 2
    online = sorted(os.sched_getaffinity(0))
    cpus = (online[0], online[1 % len(online)])
    todo = scenarios(args.batch)
    runs: dict[Scenario, list[dict[str, Any]]] = {sc: [] for sc in todo}
    raw: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="nfq-ipsec-udpgso-") as tmp, \
            Lab(prefix=args.prefix) as lab:
        configs = make_configs(Path(tmp))
        topo = topology.host_to_host(lab)
        for rnd in range(args.rounds):
            for sc in todo:
                res = run_once(lab, topo, sc, args, configs, cpus)
                runs[sc].append(res)
                raw.append({"round": rnd + 1, "scenario": sc.name, **res})
                print(f"round {rnd + 1}/{args.rounds} {sc.name}: {(res['pps'] or 0) / 1e3:.1f} kpps, "
                      f"{res['gbit'] or 0:.2f} Gbit/s, sent {(res['send_pps'] or 0) / 1e3:.1f} kpps, "
                      f"delivered {res['delivered'] or 0:.3f}", flush=True)
    summary = summarise(runs)
    print()
    print(f"udpgso: {args.count} datagrams per scenario, {args.size}-byte inner packets, "
          f"UDP_SEGMENT batches of {args.batch}, {args.rounds} interleaved rounds; "
          f"load {os.getloadavg()[0]:.2f}")
    print(table(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "summary": summary,
                                               "runs": raw}, indent=1, default=str) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nfq_ipsec_lab.bench.udpgso",
                                description="ESP in UDP: sendmsg per datagram vs UDP_SEGMENT, "
                                "recvmsg per datagram vs UDP_GRO, in two namespaces")
    p.add_argument("--role", choices=("run", "send", "recv"), default="run", help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=100_000, help="datagrams per scenario (default 100000)")
    p.add_argument("--size", type=int, default=1400, help="inner packet bytes (default 1400)")
    p.add_argument("--batch", type=int, default=44,
                   help="datagrams per UDP_SEGMENT sendmsg (default 44: 64 KiB of 1,400-byte packets)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prefix", default=PREFIX, help=f"namespace name prefix (default {PREFIX})")
    p.add_argument("--json", default=None, metavar="FILE", help="write every figure here")
    # the ends' own arguments
    p.add_argument("--crypto", choices=("none", "core", "gso"), default="none", help=argparse.SUPPRESS)
    p.add_argument("--config", default="", help=argparse.SUPPRESS)
    p.add_argument("--to", default="", help=argparse.SUPPRESS)
    p.add_argument("--interface", default="", help=argparse.SUPPRESS)
    p.add_argument("--gro", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--veth-gro", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--idle", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--wait", type=float, default=60.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "send":
        print(json.dumps(send(args)))
        return 0
    if args.role == "recv":
        print(json.dumps(receive(args)), flush=True)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

"""How a superpacket's ESP packets leave a worker (``daemon.gso``): one ``sendto`` per packet
through a marked raw socket (the worker's REPLACE path, ``worker._raw_ip_sender``) against
``sendmmsg`` batches through the same kind of socket (``rawsend.BatchSender``).

Two namespaces joined by a veth pair (the lab's host topology); in one, a sender pinned to one
CPU sends ``--count`` ESP packets of ``--size`` bytes (IPv4, DF, made up: they are dropped in
the other namespace's raw PREROUTING, unanswered) in batches of ``--batch`` (a 64 KiB
superpacket at a 1,448-byte MSS is 46 segments, 44 at 1,400); each method once per round,
``--rounds`` rounds interleaved. Figures: packets per second and the sender's CPU time
(user and system) per packet. Root; about a minute::

    flock -n /run/nfq-ipsec-bench.lock .venv/bin/python -m nfq_ipsec_lab.bench.gsosend

An AF_PACKET ring and ``UDP_SEGMENT`` are not among the methods: the README's *Outbound TCP
superpackets* says why.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from nfq_ipsec.config.model import DEFAULT_MARK
from nfq_ipsec.core import packet as ip
from nfq_ipsec.rawsend import BatchSender
from nfq_ipsec.worker import _raw_ip_sender

from ..lab import topology
from ..lab.netns import Lab

METHODS = ("sendto", "sendmmsg")
PREFIX = "nfqs"  # namespace names nfqs<pid>-<n>a / b (--prefix)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def packets(src: str, dst: str, size: int, batch: int) -> list[bytes]:
    """``batch`` ESP packets of ``size`` bytes from ``src`` to ``dst``, sequence 1, 2, ..."""
    s, d = _addr(src), _addr(dst)
    out = []
    for seq in range(1, batch + 1):
        body = (0x100).to_bytes(4, "big") + seq.to_bytes(4, "big") + bytes(size - 28)
        out.append(ip.build_header(tos=0, total_length=size, ident=seq, df=True, ttl=64,
                                   protocol=ip.PROTO_ESP, src=s, dst=d) + body)
    return out


def _addr(text: str) -> int:
    a, b, c, d = (int(x) for x in text.split("."))
    return (a << 24) | (b << 16) | (c << 8) | d


def send(args: argparse.Namespace) -> dict[str, Any]:
    batch = packets(args.source, args.to, args.size, args.batch)
    rounds = max(1, args.count // args.batch)
    calls = 0
    if args.method == "sendto":
        one = _raw_ip_sender(DEFAULT_MARK)
        t0, c0 = time.monotonic(), _cpu()
        for _ in range(rounds):
            for p in batch:
                one(p)
        calls = rounds * len(batch)
    else:
        sender = BatchSender(DEFAULT_MARK)
        t0, c0 = time.monotonic(), _cpu()
        for _ in range(rounds):
            if sender.send(batch) != len(batch):
                raise OSError("a batch was cut short")
        calls = sender.calls
    seconds, cpu = time.monotonic() - t0, _cpu() - c0
    sent = rounds * len(batch)
    return {"method": args.method, "sent": sent, "seconds": seconds, "cpu_s": cpu, "calls": calls,
            "pps": sent / seconds, "cpu_us": cpu * 1e6 / sent}


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("gsosend: needs root (network namespaces)", file=sys.stderr)
        return 2
    cpu = sorted(os.sched_getaffinity(0))[0]
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    with Lab(prefix=args.prefix) as lab:
        topo = topology.host_to_host(lab)
        topo.b.host.run(["iptables", "-t", "raw", "-A", "PREROUTING", "-p", "esp", "-j", "DROP"])
        for rnd in range(args.rounds):
            for m in METHODS:
                res = topo.a.host.run([
                    "taskset", "-c", str(cpu), sys.executable, "-m", "nfq_ipsec_lab.bench.gsosend",
                    "--role", "send", "--method", m, "--count", str(args.count), "--size",
                    str(args.size), "--batch", str(args.batch), "--source", topo.client_addr,
                    "--to", topo.server_addr], timeout=600)
                got = json.loads(res.stdout.strip().splitlines()[-1])
                results[m].append(got)
                print(f"round {rnd + 1}/{args.rounds} {m}: {got['pps'] / 1e3:.0f} kpps, "
                      f"{got['cpu_us']:.2f} CPU us/packet, {got['calls']} calls", flush=True)
    print(f"\ngsosend: {args.count} packets of {args.size} bytes per method and round, batches "
          f"of {args.batch}, {args.rounds} rounds; load {os.getloadavg()[0]:.2f}")
    base = results["sendto"]
    for m in METHODS:
        pps = [r["pps"] for r in results[m]]
        cpu_us = [r["cpu_us"] for r in results[m]]
        ratio = statistics.median(r["cpu_us"] / b["cpu_us"] for r, b in zip(results[m], base,
                                                                            strict=True))
        print(f"{m:<9} {statistics.median(pps) / 1e3:7.0f} kpps ({min(pps) / 1e3:.0f}-"
              f"{max(pps) / 1e3:.0f})  {statistics.median(cpu_us):5.2f} CPU us/packet "
              f"({min(cpu_us):.2f}-{max(cpu_us):.2f}, x{ratio:.2f} of sendto)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nfq_ipsec_lab.bench.gsosend",
                                description="a superpacket's ESP packets: sendto per packet vs "
                                "sendmmsg batches, through a marked raw socket")
    p.add_argument("--role", choices=("run", "send"), default="run", help=argparse.SUPPRESS)
    p.add_argument("--method", choices=METHODS, default="sendto", help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=200_000, help="packets per method and round")
    p.add_argument("--size", type=int, default=1500, help="ESP packet bytes (default 1500)")
    p.add_argument("--batch", type=int, default=44, help="packets per batch (default 44)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prefix", default=PREFIX, help=f"namespace name prefix (default {PREFIX})")
    p.add_argument("--source", default="", help=argparse.SUPPRESS)
    p.add_argument("--to", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "send":
        print(json.dumps(send(args)))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

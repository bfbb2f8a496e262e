"""Per-packet cost breakdown of the data path, in microseconds, from one command::

    scripts/profile                        # AES-GCM-128, transport, 1400-byte packets
    scripts/profile --encryption aes-cbc-128 --mode tunnel --cprofile

No root, no kernel queue: the two peers of the benchmark's lab (the same generated
configuration: SPD bypass, discard, protect; one SA per direction) are built in this process
and fed the bytes the kernel would hand a worker. Each stage is the project's own function
timed alone over many packets (``time.perf_counter_ns``; median and min-max of several
rounds), so the stages add up to the whole, and the whole is timed too:

outbound (peer a sends a TCP segment)
  receive   one NFQNL_MSG_PACKET netlink message parsed into a QueuedPacket (nfqueue)
  parse     IPv4 header and selector fields (packet.parse_ipv4, packet.packet_key)
  spd       the SPD lookup (spd.SPD.lookup)
  sa        the policy's SA, lifetime check, sequence number
  crypto    the suite's seal (the cipher call and its nonce/AAD)
  framing   the rest of esp.encapsulate: padding, ESP header, new IP header and checksum
  verdict   encoding the verdict with the new payload (nfqueue.NetlinkQueue.verdict)
inbound (peer b receives it)
  receive, parse as above; sa (SPI lookup, lifetime, replay check); crypto (the suite's open);
  framing (replay update, trailer, new IP header); policy (the inner packet against the SA's
  policy); verdict.

superpacket (``--gso``: peer a's worker with ``daemon.gso``), per segment of a 64 KiB TCP
superpacket cut to the flow's MSS (1,460 announced)
  cut       the segmentation and its checksums (gso.segment4)
  seal      each segment parsed and sealed (esp.encapsulate)
  whole     Processor.process_offloaded on the superpacket (SPD, SA, cut, seal)
  per-packet  for comparison: Processor.process on the same segments, one by one (what the
            worker's per-packet path calls; without its receive and verdict)
The batch's system call is not in it: ``python -m nfq_ipsec_lab.bench.gsosend`` measures it.

``whole`` is the worker's own ``PacketHandler.handle_batch`` on batches of 64 packets, plus
the receive parse; ``other`` is whole minus the stages (the loop, result objects, counters).
What this leaves out is the kernel's side and the system calls (a recv per packet and a
sendmsg per batch): the benchmark's CPU column shows those (``nfq-ipsec bench``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from nfq_ipsec.config import load_config
from nfq_ipsec.core import Processor, esp, gso
from nfq_ipsec.core import packet as ip
from nfq_ipsec.core.processor import LEAVING
from nfq_ipsec.nfqueue import (
    HOOK_LOCAL_OUT,
    HOOK_PRE_ROUTING,
    NFQA_PACKET_HDR,
    NFQA_PAYLOAD,
    NFQNL_MSG_PACKET,
    NetlinkQueue,
    QueuedPacket,
)
from nfq_ipsec.worker import PacketHandler

from ..lab import labconfig

STAGES_OUT = ("receive", "parse", "spd", "sa", "crypto", "framing", "verdict")
STAGES_IN = ("receive", "parse", "sa", "crypto", "framing", "policy", "verdict")
A_ADDR, B_ADDR = "10.0.0.1", "10.0.0.2"
BATCH = 64
MARK = 0x10000000


def tcp_packet(src: str, dst: str, size: int, ident: int = 1) -> bytes:
    """An IPv4 TCP segment of ``size`` bytes in all (20-byte IP, 20-byte TCP header)."""
    payload = bytes(range(256)) * (size // 256 + 1)
    body = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 1, 0x50, 0x10, 65535, 0, 0)
    body += payload[: size - 40]
    hdr = struct.pack("!BBHHHBBHII", 0x45, 0, size, ident, 0x4000, 64, ip.PROTO_TCP, 0,
                      int(IPv4Address(src)), int(IPv4Address(dst)))
    return ip.rewrite_header(hdr, ip.PROTO_TCP, size) + body


def netlink_message(packet_id: int, hook: int, payload: bytes) -> bytes:
    """An NFQNL_MSG_PACKET as the kernel sends it: nfgenmsg, packet header, devices, payload."""
    def attr(atype: int, value: bytes) -> bytes:
        raw = struct.pack("=HH", 4 + len(value), atype) + value
        return raw + b"\0" * (-len(raw) % 4)

    attrs = b"".join((
        attr(NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, hook) + b"\0"),
        attr(5, struct.pack("!I", 2)),  # NFQA_IFINDEX_OUTDEV (or INDEV)
        attr(NFQA_PAYLOAD, payload),
    ))
    body = struct.pack("!BBH", 2, 0, 100) + attrs
    return struct.pack("=IHHII", 16 + len(body), NFQNL_MSG_PACKET, 0, 0, 0) + body


def _peers(encryption: str, mode: str, workdir: Path) -> tuple[Path, Path]:
    role = "gateway" if mode == "tunnel" else "host"
    prefix = 24 if mode == "tunnel" else 32
    a = labconfig.PeerSpec("a", "eth0", IPv4Address(A_ADDR), IPv4Network(f"{A_ADDR}/{prefix}", False), role)
    b = labconfig.PeerSpec("b", "eth0", IPv4Address(B_ADDR), IPv4Network(f"{B_ADDR}/{prefix}", False), role)
    if mode == "tunnel":
        a = labconfig.PeerSpec("a", "eth0", IPv4Address("192.0.2.1"), IPv4Network("10.1.0.0/24"), role)
        b = labconfig.PeerSpec("b", "eth0", IPv4Address("192.0.2.2"), IPv4Network("10.2.0.0/24"), role)
    cfg = labconfig.generate(workdir, a, b, encryption=encryption, queues=1, mode=mode)
    return cfg.peer("a").path, cfg.peer("b").path


def processor(config: Path) -> Processor:
    """A fresh processor for the one queue of a lab peer's configuration."""
    conf = load_config(config)
    return Processor(conf.spd, conf.sas_for_queue(labconfig.QUEUE_BASE), 0.0)


def _time(fn: Callable[[], object], n: int) -> float:
    """Nanoseconds per call of ``fn`` over ``n`` calls."""
    clock = time.perf_counter_ns
    t0 = clock()
    for _ in range(n):
        fn()
    return (clock() - t0) / n


class Profile:
    """Stage timers for one direction: name -> callable of one packet (or one batch)."""

    def __init__(self, encryption: str, mode: str, size: int) -> None:
        self.encryption = encryption
        self.mode = mode
        self.size = size
        self._tmp = tempfile.TemporaryDirectory(prefix="nfq-ipsec-profile-")
        self.config_a, self.config_b = _peers(encryption, mode, Path(self._tmp.name))
        self.a, self.b = processor(self.config_a), processor(self.config_b)
        if mode == "tunnel":
            self.inner = tcp_packet("10.1.0.5", "10.2.0.5", size)
        else:
            self.inner = tcp_packet(A_ADDR, B_ADDR, size)

    def close(self) -> None:
        self._tmp.cleanup()

    # -- outbound ---------------------------------------------------------------------------
    def outbound_stages(self) -> dict[str, tuple[Callable[[], object], int]]:
        """name -> (one call, packets per call)."""
        proc, data = self.a, self.inner
        hdr = ip.parse_ipv4(data)
        key = ip.packet_key(data, hdr)
        policy = proc.spd.lookup(key, outbound=True)
        assert policy is not None and policy.sa_names, "the profile packet must hit the protect policy"
        sa = proc.sad.outbound_sa(policy)
        assert sa is not None
        sa.seq_limit = sa.max_seq  # no state store here: hand out numbers without reservations
        suite = sa.suite
        inner = data if sa.tunnel else data[hdr.ihl:]
        next_header = ip.PROTO_IPIP if sa.tunnel else hdr.protocol
        plaintext = inner + esp.trailer(esp.pad_length(len(inner), suite.align), next_header)
        esp_header = sa.spi_bytes + b"\0\0\0\1"
        msg = netlink_message(1, HOOK_LOCAL_OUT, data)
        out = esp.encapsulate(sa, data, hdr)
        queue = NetlinkQueue()  # never bound: verdicts are encoded, flush drops them

        receive = _receive_stage(msg)

        def parse() -> object:
            h = ip.parse_ipv4(data)
            return ip.packet_key(data, h)

        def sa_stage() -> object:
            s = proc.sad.outbound_sa(policy)
            assert s is not None
            s.check_lifetime(1.0)
            return s.take_seq()

        def crypto() -> object:
            return suite.seal(esp_header, b"", 1, plaintext)

        def encapsulate() -> object:
            return esp.encapsulate(sa, data, hdr)

        def verdict() -> object:
            queue.verdict(1, True, MARK, out)
            queue._pending.clear()
            return None

        return {
            "receive": (receive, 1),
            "parse": (parse, 1),
            "spd": (lambda: proc.spd.lookup(key, True), 1),
            "sa": (sa_stage, 1),
            "crypto": (crypto, 1),
            "encapsulate": (encapsulate, 1),
            "verdict": (verdict, 1),
            "whole": (self._whole(proc, [(HOOK_LOCAL_OUT, data)] * BATCH), BATCH),
        }

    # -- a superpacket (daemon.gso) -----------------------------------------------------------
    def gso_stages(self) -> tuple[dict[str, tuple[Callable[[], object], int]], int]:
        """name -> (one call, segments per call), and the segments of one superpacket."""
        proc = self.a
        sp = tcp_packet(A_ADDR, B_ADDR, 40 + 65000) if self.mode == "transport" else \
            tcp_packet("10.1.0.5", "10.2.0.5", 40 + 65000)
        hdr = ip.parse_ipv4(sp)
        key = ip.packet_key(sp, hdr)
        policy = proc.spd.lookup(key, outbound=True)
        assert policy is not None
        sa = proc.sad.outbound_sa(policy)
        assert sa is not None
        sa.seq_limit = sa.max_seq
        proc.peer_mss[(key.src, key.dst, key.sport or 0, key.dport or 0)] = 1460  # its SYN seen
        size = proc.gso_segment_size(sa, key, sp, hdr.ihl, hdr.total_length, 1.0)
        segments = gso.segment4(sp, hdr, size)
        n = len(segments)

        def seal() -> object:
            for seg in segments:
                esp.encapsulate(sa, seg, ip.parse_ipv4(seg))
            return None

        def per_packet() -> object:
            for seg in segments:
                proc.process(seg, len(seg), LEAVING, 1.0)
            return None

        return {
            "cut": (lambda: gso.segment4(sp, hdr, size), n),
            "seal": (seal, n),
            "whole": (lambda: proc.process_offloaded(sp, len(sp), LEAVING, 1.0, True), n),
            "per-packet": (per_packet, n),
        }, n

    # -- inbound ----------------------------------------------------------------------------
    def inbound_stages(self) -> dict[str, tuple[Callable[[], object], int]]:
        sender, proc = self.a, self.b
        # Enough distinct ESP packets (in order) for every timed call of the whole handler.
        data = self.inner
        hdr = ip.parse_ipv4(data)
        key = ip.packet_key(data, hdr)
        policy = sender.spd.lookup(key, outbound=True)
        assert policy is not None
        out_sa = sender.sad.outbound_sa(policy)
        assert out_sa is not None
        out_sa.seq_limit = out_sa.max_seq
        packet = esp.encapsulate(out_sa, data, hdr)
        phdr = ip.parse_ipv4(packet)
        spi, _ = esp.parse_esp_header(packet, phdr)
        sa = proc.sad.by_spi(spi)
        assert sa is not None
        sa.replay_limit = 1 << 62  # no state store: no floor reservations
        # as esp.decapsulate hands them to the suite: bytes slices of the packet
        body = packet[phdr.ihl + esp.ESP_HEADER:phdr.total_length]
        esp_header = packet[phdr.ihl:phdr.ihl + esp.ESP_HEADER]
        seq = 1
        dec = esp.decapsulate(packet, phdr, proc.sad.by_spi, 1.0)  # takes seq 1
        msg = netlink_message(1, HOOK_PRE_ROUTING, packet)
        queue = NetlinkQueue()
        assert dec.header is not None  # an IPv4 packet in
        inner_key = ip.packet_key(dec.packet, dec.header)

        receive = _receive_stage(msg)

        def parse() -> object:
            h = ip.parse_ipv4(packet)
            return esp.parse_esp_header(packet, h)

        def sa_stage() -> object:
            s = proc.sad.by_spi(spi)
            assert s is not None
            s.check_lifetime(1.0)
            n = s.replay.infer(seq)
            return s.replay.check(n)

        def crypto() -> object:
            return sa.suite.open(esp_header, b"", body)

        def policy_check() -> object:
            p = proc.sad.policy_of(sa)
            assert p is not None
            return p.selector.matches(inner_key, False)

        def verdict() -> object:
            queue.verdict(1, True, MARK, dec.packet)
            queue._pending.clear()
            return None

        # decapsulate needs fresh sequence numbers: a long in-order stream from the sender.
        stream = [esp.encapsulate(out_sa, data, hdr) for _ in range(BATCH * 64)]
        state = {"i": 0}

        def decapsulate() -> object:
            i = state["i"]
            state["i"] = i + 1
            p = stream[i % len(stream)]
            if i and i % len(stream) == 0:
                _reset_replay(proc)
            return esp.decapsulate(p, ip.parse_ipv4(p), proc.sad.by_spi, 1.0)

        return {
            "receive": (receive, 1),
            "parse": (parse, 1),
            "sa": (sa_stage, 1),
            "crypto": (crypto, 1),
            "decapsulate": (decapsulate, 1),
            "policy": (policy_check, 1),
            "verdict": (verdict, 1),
            "whole": (self._whole_stream(processor(self.config_b), stream), BATCH),
        }

    def _whole(self, proc: Processor, items: list[tuple[int, bytes]]) -> Callable[[], object]:
        buf = b"".join(netlink_message(i + 1, hook, d) for i, (hook, d) in enumerate(items))
        return self._handler_call(proc, lambda: buf)

    def _whole_stream(self, proc: Processor, stream: list[bytes]) -> Callable[[], object]:
        batches = [
            b"".join(netlink_message(i + 1, HOOK_PRE_ROUTING, d) for i, d in enumerate(stream[s:s + BATCH]))
            for s in range(0, len(stream), BATCH)
        ]
        state = {"i": 0}

        def next_batch() -> bytes:
            i = state["i"]
            state["i"] = i + 1
            if i and i % len(batches) == 0:
                _reset_replay(proc)
            return batches[i % len(batches)]

        return self._handler_call(proc, next_batch)

    def _handler_call(self, proc: Processor, buffers: Callable[[], bytes]) -> Callable[[], object]:
        queue = NetlinkQueue()
        handler = PacketHandler(proc, queue, MARK, clock=lambda: 1.0)
        for sa in proc.sad.all():
            sa.seq_limit = sa.max_seq
            sa.replay_limit = 1 << 62

        def call() -> object:
            buf = buffers()
            packets: list[QueuedPacket] = []
            queue.parse(memoryview(buf), len(buf), packets)
            handler.handle_batch(packets)
            return None

        return call


def _receive_stage(msg: bytes) -> Callable[[], object]:
    """The receive step: one netlink message parsed as the worker's queue does it."""
    parser = NetlinkQueue().parse

    def receive() -> object:
        out: list[QueuedPacket] = []
        parser(memoryview(msg), len(msg), out)
        return out

    return receive


def _reset_replay(proc: Processor) -> None:
    """Start inbound SAs over, so a recorded stream can be replayed (profiling only)."""
    from nfq_ipsec.core.replay import ReplayWindow

    for sa in proc.sad.all():
        if not sa.outbound:
            sa.replay = ReplayWindow(sa.replay.size, esn=sa.replay.esn)


def measure(
    stages: dict[str, tuple[Callable[[], object], int]], iterations: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Median and min-max nanoseconds per packet of each stage over ``rounds`` rounds."""
    samples: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(rounds):
        for name, (fn, per_call) in stages.items():
            calls = max(1, iterations // per_call)
            _time(fn, max(1, calls // 20))  # warm up
            samples[name].append(_time(fn, calls) / per_call)
    return {
        name: {"median": statistics.median(v), "min": min(v), "max": max(v)}
        for name, v in samples.items()
    }


def breakdown(raw: dict[str, dict[str, float]], outbound: bool) -> dict[str, float]:
    """Stage medians in microseconds, with the derived ``framing`` and ``other`` rows."""
    us = {k: v["median"] / 1000 for k, v in raw.items()}
    if outbound:
        rows = {
            "receive": us["receive"], "parse": us["parse"], "spd": us["spd"], "sa": us["sa"],
            "crypto": us["crypto"], "framing": max(0.0, us["encapsulate"] - us["crypto"] - us["sa"]),
            "verdict": us["verdict"],
        }
    else:
        rows = {
            "receive": us["receive"], "parse": us["parse"], "sa": us["sa"], "crypto": us["crypto"],
            "framing": max(0.0, us["decapsulate"] - us["crypto"] - us["sa"] - us["parse"]),
            "policy": us["policy"], "verdict": us["verdict"],
        }
    rows["other"] = max(0.0, us["whole"] - sum(rows.values()))
    rows["whole"] = us["whole"]
    return rows


def _cprofile(prof: Profile, iterations: int) -> str:
    stages_out = prof.outbound_stages()
    stages_in = prof.inbound_stages()
    whole_out, n_out = stages_out["whole"]
    whole_in, n_in = stages_in["whole"]
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(max(1, iterations // n_out)):
        whole_out()
    for _ in range(max(1, iterations // n_in)):
        whole_in()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
    return text.getvalue()


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"per-packet cost, {result['encryption']} {result['mode']} mode, {result['size']}-byte packets "
        f"(median of {result['rounds']} rounds x {result['iterations']} packets; microseconds)",
    ]
    for direction in ("outbound", "inbound"):
        rows = result[direction]["breakdown"]
        whole = rows["whole"]
        lines.append(f"  {direction}:")
        for name, value in rows.items():
            share = "" if name == "whole" else f"  {100 * value / whole:4.0f} %"
            lines.append(f"    {name:<9} {value:7.2f}{share}")
        lines.append(f"    => {1e6 / whole / 1000:.0f} k packets/s per core, "
                     f"{1e6 / whole * result['size'] * 8 / 1e9:.2f} Gbit/s of {result['size']}-byte packets "
                     f"(user space only)")
    sp = result.get("superpacket")
    if sp is not None:
        lines.append(f"  superpacket (daemon.gso), per segment of {sp['segments']}:")
        for name, value in sp["us"].items():
            lines.append(f"    {name:<10} {value:6.2f}")
    return "\n".join(lines)


def run_profile(
    encryption: str, mode: str, size: int, iterations: int, rounds: int, superpacket: bool = False,
) -> dict[str, Any]:
    prof = Profile(encryption, mode, size)
    try:
        out_raw = measure(prof.outbound_stages(), iterations, rounds)
        in_raw = measure(prof.inbound_stages(), iterations, rounds)
        if superpacket:
            stages, segments = prof.gso_stages()
            gso_raw = measure(stages, iterations, rounds)
    finally:
        prof.close()
    result: dict[str, Any] = {
        "encryption": encryption, "mode": mode, "size": size, "iterations": iterations,
        "rounds": rounds, "python": sys.version.split()[0],
        "outbound": {"raw_ns": out_raw, "breakdown": breakdown(out_raw, True)},
        "inbound": {"raw_ns": in_raw, "breakdown": breakdown(in_raw, False)},
    }
    if superpacket:
        result["superpacket"] = {"segments": segments, "raw_ns": gso_raw,
                                 "us": {k: v["median"] / 1000 for k, v in gso_raw.items()}}
    return result


def drive(encryption: str, mode: str, size: int, direction: str, batches: int) -> int:
    """Run the whole handler ``batches`` times, untimed; return the packets handled. Under an
    instruction counter, a run with 0 batches measures the setup to subtract."""
    prof = Profile(encryption, mode, size)
    try:
        stages = prof.outbound_stages() if direction == "outbound" else prof.inbound_stages()
        whole, per_call = stages["whole"]
        for _ in range(batches):
            whole()
    finally:
        prof.close()
    return batches * per_call


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nfq-ipsec-profile", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encryption", default="aes-gcm-128",
                   help="aes-gcm-128 (default), chacha20-poly1305, aes-cbc-128 (+hmac-sha256-128), ...")
    p.add_argument("--mode", choices=("transport", "tunnel"), default="transport")
    p.add_argument("--size", type=int, default=1400, help="IPv4 packet size in bytes (default 1400)")
    p.add_argument("--iterations", type=int, default=20000, help="packets per stage and round")
    p.add_argument("--rounds", type=int, default=5, help="rounds (the median is reported)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures here")
    p.add_argument("--gso", action="store_true",
                   help="also the per-segment cost of a 64 KiB TCP superpacket (daemon.gso)")
    p.add_argument("--cprofile", action="store_true",
                   help="also run the whole handler under cProfile and print the top functions")
    p.add_argument("--drive", choices=("outbound", "inbound"), default=None,
                   help="no timing: run only the whole handler for --batches batches of "
                   f"{BATCH} packets, for an instruction counter such as valgrind's callgrind")
    p.add_argument("--batches", type=int, default=300, help="with --drive (default 300)")
    args = p.parse_args(argv)
    if not 60 <= args.size <= 8000:
        p.error("--size must be 60..8000")
    if args.iterations < 1 or args.rounds < 1:
        p.error("--iterations and --rounds must be at least 1")
    try:
        labconfig.parse_encryption(args.encryption)
    except ValueError as err:
        print(f"nfq-ipsec-profile: {err}", file=sys.stderr)
        return 2
    if args.drive is not None:
        if args.batches < 0:
            p.error("--batches must be 0 or more")
        print(f"{drive(args.encryption, args.mode, args.size, args.drive, args.batches)} packets")
        return 0
    result = run_profile(args.encryption, args.mode, args.size, args.iterations, args.rounds,
                         args.gso)
    print(format_table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.cprofile:
        prof = Profile(args.encryption, args.mode, args.size)
        try:
            print(_cprofile(prof, args.iterations))
        finally:
            prof.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

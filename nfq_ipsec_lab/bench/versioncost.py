"""What N-version ESP costs per packet, and where its versions may run:
``python -m nfq_ipsec_lab.bench.versioncost``.

No root, no network, not the benchmark: the example host pair's SAs (``host-a.toml`` and
``host-b.toml``, transport, AES-GCM-128), one 1,400-byte UDP packet sealed ``--packets``
times, and as many of the peer's ESP packets opened, through each data path in this process
(``time.perf_counter_ns``, the garbage collector off while timing). A figure is microseconds
per packet, the median of ``--repeat`` runs.

In one process (how the daemon runs its versions, nfq_ipsec.versions): each version alone,
then ``compare`` over two and three versions. In a sibling process (the alternative, not
built in the daemon): the worker sends each batch of packets over a socket pair to a process
running the core's source (``NFQ_IPSEC_PURE=1``, as a sandboxed worker could have spawned it
before its sandbox), seals or opens its own batch meanwhile, and reads the sibling's answers
back and compares them; one packet at a time, and in batches of 64 (the worker's batch).
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parents[2] / "nfq_ipsec" / "examples"
A, B = "192.168.56.10", "192.168.56.11"
PAYLOAD = 1400 - 28
_FRAME = struct.Struct("!I")
_ITEM = struct.Struct("!BI")  # where, length
_ANSWER = struct.Struct("!BI")  # verdict code, length


def udp(src: str, dst: str, sport: int, dport: int, data: bytes) -> bytes:
    total = 28 + len(data)
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, 17, 0,
                       socket.inet_aton(src), socket.inet_aton(dst))
    csum = sum(struct.unpack("!10H", head))
    csum = (csum & 0xFFFF) + (csum >> 16)
    csum = ~((csum & 0xFFFF) + (csum >> 16)) & 0xFFFF
    head = head[:10] + struct.pack("!H", csum) + head[12:]
    return head + struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def _spec(host: str, names: tuple[str, ...] = ("core",), compare: str = "off") -> Any:
    from nfq_ipsec.config import load_config
    from nfq_ipsec.supervisor import worker_spec

    cfg = load_config(EXAMPLES / f"{host}.toml", online_cpus=[0, 1])
    return replace(worker_spec(cfg, cfg.daemon.queues[0]), versions=names, compare=compare)


def _core(spec: Any) -> Any:
    from nfq_ipsec.core import Processor

    return Processor(spec.spd(), spec.sas, 0.0, mtu=spec.mtu)


def inputs(count: int) -> tuple[bytes, list[bytes]]:
    """The packet host A seals, and ``count`` ESP packets host B sealed for A."""
    from nfq_ipsec.core.processor import LEAVING

    peer = _core(_spec("host-b"))
    back = udp(B, A, 5000, 4000, b"b" * PAYLOAD)
    esp = [peer.process(back, len(back), LEAVING, 0.0).packet for _ in range(count)]
    assert all(p is not None for p in esp)
    return udp(A, B, 4000, 5000, b"a" * PAYLOAD), [p for p in esp if p is not None]


# -- in this process ----------------------------------------------------------------------------

Figures = tuple[float, float, float, float]  # seal wall, open wall, seal CPU, open CPU


def _medians(runs: list[list[float]]) -> Figures:
    a, b, c, d = (statistics.median(col) for col in zip(*runs, strict=True))
    return a, b, c, d


def in_process(make: Callable[[], Any], count: int, repeat: int) -> Figures:
    """Seal and open, microseconds per packet (medians), through ``make()``'s ``process``."""
    from nfq_ipsec.core.processor import ARRIVING, LEAVING

    plain, esp = inputs(count)
    runs = []
    for _ in range(repeat):
        proc = make()
        gc.disable()
        t0, c0 = time.perf_counter_ns(), time.process_time_ns()
        for _ in range(count):
            proc.process(plain, len(plain), LEAVING, 0.0)
        t1, c1 = time.perf_counter_ns(), time.process_time_ns()
        for p in esp:
            proc.process(p, len(p), ARRIVING, 0.0)
        t2, c2 = time.perf_counter_ns(), time.process_time_ns()
        gc.enable()
        runs.append([(t1 - t0) / count / 1000, (t2 - t1) / count / 1000,
                     (c1 - c0) / count / 1000, (c2 - c1) / count / 1000])
    return _medians(runs)


def paths() -> dict[str, Callable[[], Any]]:
    from nfq_ipsec import coresource, versions
    from nfq_ipsec.independent import Engine

    def source() -> Any:
        src = coresource.load()
        spec = _spec("host-a")
        policies, sas = coresource.translate((list(spec.policies), list(spec.sas)))
        return src.Processor(src.SPD(policies), sas, 0.0, mtu=spec.mtu)

    def independent() -> Any:
        spec = _spec("host-a")
        return Engine(spec.policies, spec.sas, 0.0, mtu=spec.mtu)

    def compared(names: tuple[str, ...], compare: str) -> Callable[[], Any]:
        def make() -> Any:
            spec = _spec("host-a", names, compare)
            return versions.build(spec, _core(spec), 0.0)
        return make

    two, three = ("core", "independent"), ("core", "independent", "core-source")
    return {
        "core (compiled) alone": lambda: _core(_spec("host-a")),
        "core-source alone (in process)": source,
        "independent alone": independent,
        "core + core-source, all": compared(("core", "core-source"), "all"),
        "core + independent, all": compared(two, "all"),
        "core + independent, sample:100": compared(two, "sample:100"),
        "three versions, all": compared(three, "all"),
        "three versions, majority": compared(three, "majority"),
    }


# -- a sibling process --------------------------------------------------------------------------

def _send(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_FRAME.pack(len(data)) + data)


def _recv(sock: socket.socket) -> bytes:
    head = _exactly(sock, _FRAME.size)
    return _exactly(sock, _FRAME.unpack(head)[0])


def _exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        got = sock.recv(size - len(buf))
        if not got:
            raise EOFError("the sibling closed its end")
        buf += got
    return bytes(buf)


def child(fd: int) -> None:
    """The sibling: the core (its source, NFQ_IPSEC_PURE=1) answering batches over ``fd``."""
    from nfq_ipsec.core.processor import Verdict

    codes = {v: i for i, v in enumerate(Verdict)}
    sock = socket.socket(fileno=fd)
    proc = None
    while True:
        try:
            frame = _recv(sock)
        except EOFError:
            return
        if frame == b"reset":
            proc = _core(_spec("host-a"))
            _send(sock, b"ok")
            continue
        if frame == b"cpu":
            _send(sock, str(time.process_time_ns()).encode())
            continue
        assert proc is not None
        out = []
        at = 0
        while at < len(frame):
            where, length = _ITEM.unpack_from(frame, at)
            at += _ITEM.size
            res = proc.process(frame[at:at + length], length, where, 0.0)
            at += length
            data = res.packet or b""
            out.append(_ANSWER.pack(codes[res.verdict], len(data)) + data)
        _send(sock, b"".join(out))


def sibling(count: int, repeat: int, batch: int) -> Figures:
    """Seal and open through the compiled core here and the source core in a sibling process,
    batches of ``batch`` packets, the answers compared; microseconds per packet."""
    from nfq_ipsec.core.processor import ARRIVING, LEAVING

    plain, esp = inputs(count)
    mine, theirs = socket.socketpair()
    env = dict(os.environ, NFQ_IPSEC_PURE="1")
    proc = subprocess.Popen([sys.executable, "-m", "nfq_ipsec_lab.bench.versioncost", "--child",
                             str(theirs.fileno())], env=env, pass_fds=(theirs.fileno(),))
    theirs.close()
    try:
        runs = []
        for _ in range(repeat):
            _send(mine, b"reset")
            assert _recv(mine) == b"ok"
            core = _core(_spec("host-a"))
            timed: list[float] = []
            cpu: list[float] = []
            for where, packets in ((LEAVING, [plain] * count), (ARRIVING, esp)):
                _send(mine, b"cpu")
                theirs0 = int(_recv(mine))
                gc.disable()
                t0, c0 = time.perf_counter_ns(), time.process_time_ns()
                for i in range(0, len(packets), batch):
                    chunk = packets[i:i + batch]
                    _send(mine, b"".join(_ITEM.pack(where, len(p)) + p for p in chunk))
                    ours = [core.process(p, len(p), where, 0.0).packet or b"" for p in chunk]
                    answer = _recv(mine)
                    at = 0
                    for own in ours:
                        _, length = _ANSWER.unpack_from(answer, at)
                        at += _ANSWER.size
                        if answer[at:at + length] != own:
                            raise AssertionError("the sibling's answer differs")
                        at += length
                t1, c1 = time.perf_counter_ns(), time.process_time_ns()
                gc.enable()
                _send(mine, b"cpu")
                used = int(_recv(mine)) - theirs0
                timed.append((t1 - t0) / len(packets) / 1000)
                cpu.append((c1 - c0 + used) / len(packets) / 1000)
            runs.append(timed + cpu)
        return _medians(runs)
    finally:
        mine.close()
        proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--packets", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        child(args.child)
        return 0
    from nfq_ipsec import corebuild

    print(f"core: {corebuild.running()}; {args.packets} packets of 1400 bytes, "
          f"median of {args.repeat}; us per packet, seal / open")
    print(f"  {'':<38} {'wall':>17}   {'CPU':>17}")
    for name, make in paths().items():
        _line(name, in_process(make, args.packets, args.repeat))
    for batch in (1, 64):
        _line(f"core + core-source sibling, batch {batch}",
              sibling(args.packets, args.repeat, batch))
    return 0


def _line(name: str, f: Figures) -> None:
    print(f"  {name:<38} {f[0]:7.1f} / {f[1]:7.1f}   {f[2]:7.1f} / {f[3]:7.1f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())

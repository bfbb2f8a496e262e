"""Helpers for the root tests that run the real daemon in a pair of namespaces of their own.

The namespaces, the processes and the daemon are the lab's (``nfq_ipsec_lab.lab``: ``netns.Lab``
and ``netns.Netns``, ``daemon.Daemon``), the same code the demo and the benchmark run, with its
cleanup on every exit path. What is here is the tests' own: two namespaces
``nfqx<pid>-<n><tag>a``/``...b`` joined by a veth pair (MTU 9000, IPv6 on, static neighbours, a
foreign rule in each table we touch), each of which may run an ``nfq-ipsec run`` daemon with two
queues. The configuration steers traffic by destination port: UDP to ``PORTS[i]`` is protected
by SAs owned by queue ``QUEUES[i]`` (one SA per queue and direction, RFC 9611), so a test knows
which worker carries which flow.

Small programs run inside the namespaces (``python -c``): a UDP receiver and senders, an
AF_PACKET sniffer that writes a pcap, and an AF_PACKET injector that puts crafted frames on
the wire from the peer's side (below the peer's netfilter).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gate
import pytest
from faults.nfq_ipsec_faults import env_with_fault

from nfq_ipsec.procs import alive
from nfq_ipsec_lab.lab.checks import CheckRun
from nfq_ipsec_lab.lab.daemon import Daemon, normalise_iptables_save
from nfq_ipsec_lab.lab.daemon import command as nfq_ipsec
from nfq_ipsec_lab.lab.netns import Lab, Netns, wait_gone

__all__ = ["Daemon", "alive", "nfq_ipsec", "wait_gone"]  # the lab's, as the tests name them

ROOT = Path(__file__).resolve().parent.parent
ADDR_A, ADDR_B = "10.81.0.1", "10.81.0.2"
ADDR6_A, ADDR6_B = "fd81::1", "fd81::2"  # the same hosts over IPv6 (``write_config(v6=True)``)
QUEUES = (220, 221)
PORTS = (7100, 7200)  # UDP to PORTS[i] goes through QUEUES[i]
SPI_AB, SPI_BA = 0x3000, 0x4000  # + queue index
MARK = 0x10000000
PREFIX = "nfqx"  # namespace names: nfqx<pid>-<n><tag>a / b


def env(**extra: str) -> dict[str, str]:
    """The environment of what the tests start: this checkout first, no fault injection but
    what a test asks for."""
    e = dict(os.environ, PYTHONPATH=str(ROOT))
    e.pop("NFQ_IPSEC_TEST_FAULT", None)
    fault = extra.pop("NFQ_IPSEC_TEST_FAULT", None)
    e.update(extra)
    return env_with_fault(e, fault) if fault else e


# -- configuration --------------------------------------------------------------------------------
def make_keys() -> dict[str, str]:
    return {f"{d}{i}": os.urandom(20).hex() for d in ("ab", "ba") for i in range(len(QUEUES))}


def write_config(directory: Path, a_side: bool, iface: str, keys: dict[str, str],
                 iptables: str = "auto", per_port: bool = True, v6: bool = False) -> Path:
    """One host's config: per queue i a policy for UDP to PORTS[i] with SAs ab{i}/ba{i}; or,
    not ``per_port``, one policy for everything between the two hosts with all the SAs (the
    rules spread flows over the queues, one SA per queue and direction as in RFC 9611).
    ``v6``: the same between ``ADDR6_A`` and ``ADDR6_B`` (transport mode over IPv6).
    ``node.mtu`` is 1500, not the veth's 9000: the tests' MSS and path MTU figures are for it,
    and a configuration loaded outside the namespace (the tests read rule counters so) then
    builds the same rules as the daemon inside it."""
    directory.mkdir(parents=True, exist_ok=True)
    a, b, bits = (ADDR6_A, ADDR6_B, 128) if v6 else (ADDR_A, ADDR_B, 32)
    me, peer = (a, b) if a_side else (b, a)
    out_d, in_d = ("ab", "ba") if a_side else ("ba", "ab")
    ports = "remote_ports" if a_side else "local_ports"
    text = textwrap.dedent(f"""
        [node]
        interface = "{iface}"
        role = "host"
        mtu = 1500

        [daemon]
        queues = [{", ".join(map(str, QUEUES))}]
        control_socket = "{directory / 'run' / 'ctl.sock'}"
        state_dir = "{directory / 'state'}"
        iptables = "{iptables}"
        log_level = "info"
    """)
    if not per_port:
        names = [f"{d}{i}" for d in (out_d, in_d) for i in range(len(QUEUES))]
        text += textwrap.dedent(f"""
            [[policy]]
            name = "pair"
            action = "protect"
            local = "{me}/{bits}"
            remote = "{peer}/{bits}"
            sa = [{", ".join(f'"{n}"' for n in names)}]
        """)
    for i, port in enumerate(PORTS if per_port else ()):
        text += textwrap.dedent(f"""
            [[policy]]
            name = "port{port}"
            action = "protect"
            local = "{me}/{bits}"
            remote = "{peer}/{bits}"
            protocol = "udp"
            {ports} = {port}
            sa = ["{out_d}{i}", "{in_d}{i}"]
        """)
    for d, direction in ((out_d, "out"), (in_d, "in")):
        for i, q in enumerate(QUEUES):
            spi = (SPI_AB if d == "ab" else SPI_BA) + i
            text += textwrap.dedent(f"""
                [[sa]]
                name = "{d}{i}"
                direction = "{direction}"
                spi = {spi}
                queue = {q}
                encryption = "aes-gcm-128"
                key = "0x{keys[f'{d}{i}']}"
            """)
    path = directory / "nfq.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


# -- namespaces -----------------------------------------------------------------------------------
@dataclass
class Pair:
    """Two namespaces of one lab, named ``a`` and ``b`` (their names), and their interfaces."""

    lab: Lab
    hosts: dict[str, Netns]
    a: str
    b: str
    va: str
    vb: str
    mac_a: str = ""
    mac_b: str = ""

    def host(self, ns: str) -> Netns:
        return self.hosts[ns]

    def run(self, ns: str, *argv: str, check: bool = True, timeout: float = 60,
            environ: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return self.host(ns).run(list(argv), check=check, timeout=timeout, env=environ or env())

    def python(self, ns: str, code: str, *args: str, stdin: bool = False) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.host(ns).argv([sys.executable, "-c", code, *args]),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
        )

    def iptables_save(self, ns: str) -> list[str]:
        """This namespace's iptables, as it is (every table), without comments and counters."""
        return normalise_iptables_save(self.run(ns, "iptables-save").stdout,
                                       keep_empty_tables=True).splitlines()


@contextlib.contextmanager
def make_pair(tag: str, prefix: str = PREFIX) -> Iterator[Pair]:
    """Two namespaces and a veth pair (MTU 9000), removed on every exit path. Both get a
    foreign ACCEPT rule in the tables we touch: it must survive everything we do. ``prefix``
    starts the namespaces' names (and, when it is not the default, the veths')."""
    with Lab(prefix=prefix) as lab:
        a, b = lab.netns(f"{tag}a", ipv6=True), lab.netns(f"{tag}b", ipv6=True)
        v = "v" if prefix == PREFIX else f"{prefix}{os.getpid() % 100000}"
        va, vb = f"{v}{tag}a", f"{v}{tag}b"
        lab.veth(a, va, b, vb)
        for ns, ifname, addr in ((a, va, ADDR_A), (b, vb, ADDR_B)):
            ns.ip("link", "set", ifname, "mtu", "9000")
            ns.addr(ifname, f"{addr}/24")
        p = Pair(lab, {a.name: a, b.name: b}, a.name, b.name, va, vb, a.mac(va), b.mac(vb))
        # static neighbours: no ARP resolution in the way of the first packets after a restart
        a.ip("neigh", "replace", ADDR_B, "lladdr", p.mac_b, "dev", va, "nud", "permanent")
        b.ip("neigh", "replace", ADDR_A, "lladdr", p.mac_a, "dev", vb, "nud", "permanent")
        for ns in (a, b):
            for table, chain in (("raw", "PREROUTING"), ("mangle", "OUTPUT"), ("filter", "INPUT")):
                ns.run(["iptables", "-t", table, "-A", chain, "-p", "udp", "--dport", "9",
                        "-j", "ACCEPT"])
        yield p


# -- the daemon -----------------------------------------------------------------------------------
def daemon(pair: Pair, tmp: Path, a_side: bool, keys: dict[str, str], started: list[Daemon],
           **extra_env: str) -> Daemon:
    return daemon_of(pair, tmp, a_side, keys, started, False, env(**extra_env))


def daemon_of(pair: Pair, tmp: Path, a_side: bool, keys: dict[str, str], started: list[Daemon],
              v6: bool, environ: dict[str, str]) -> Daemon:
    """``daemon``, over IPv6 if ``v6`` (``write_config``), in the environment given."""
    name = "a" if a_side else "b"
    cfg = write_config(tmp / name, a_side, pair.va if a_side else pair.vb, keys, v6=v6)
    d = Daemon(name, pair.host(pair.a if a_side else pair.b), cfg, env=environ,
               log=tmp / name / "daemon.log", lab=pair.lab)
    started.append(d)
    return d


def running_pair(pair: Pair, tmp: Path, keys: dict[str, str], started: list[Daemon],
                 **extra_env: str) -> tuple[Daemon, Daemon]:
    """Both hosts' daemons, started and running (A's environment gets ``extra_env``)."""
    a = daemon(pair, tmp, True, keys, started, **extra_env)
    b = daemon(pair, tmp, False, keys, started)
    for d in (a, b):
        d.start()
    for d in (a, b):
        d.wait_running()
    return a, b


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    from nfq_ipsec_lab.bench.measure import process_cpu_seconds

    times = process_cpu_seconds(pid)
    assert times is not None, f"no process {pid}"
    return sum(times)


# -- programs run inside the namespaces ----------------------------------------------------------
RECEIVER = textwrap.dedent("""
    import json, select, socket, sys, time
    # UDP (IPv4 or IPv6) on the given ports; stops after `idle` s without data, or (idle <= 0)
    # when stdin closes
    addr, ports, idle = sys.argv[1], [int(p) for p in sys.argv[2].split(",")], float(sys.argv[3])
    socks = []
    for p in ports:
        s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, 33, 1 << 23)  # SO_RCVBUFFORCE
        s.bind((addr, p))
        s.setblocking(False)
        socks.append(s)
    by_stdin = idle <= 0
    fds = socks + ([sys.stdin] if by_stdin else [])
    got, last, done = [], time.monotonic(), False
    print("READY", flush=True)
    while not done:
        wait = 0.5 if by_stdin else last + idle - time.monotonic()
        r, _, _ = select.select(fds, [], [], max(0.0, wait))
        if not r and not by_stdin:
            break
        for s in r:
            if s is sys.stdin:
                sys.stdin.read()
                done = True
                continue
            while True:
                try:
                    data = s.recv(65535)
                except BlockingIOError:
                    break
                last = time.monotonic()
                got.append([last, data.decode(errors="replace")])
    # what is still queued when told to stop
    for s in socks:
        while True:
            try:
                got.append([time.monotonic(), s.recv(65535).decode(errors="replace")])
            except BlockingIOError:
                break
    print(json.dumps(got), flush=True)
""")

SENDER = textwrap.dedent("""
    import json, socket, sys, time
    dst, gap = sys.argv[1], float(sys.argv[2])
    for port, msg in json.loads(sys.argv[3]):
        t = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a new source port: a new flow
        t.sendto(msg.encode(), (dst, port))
        t.close()
        if gap:
            time.sleep(gap)
""")

PACED = textwrap.dedent("""
    import json, socket, sys, time
    # flows per port with fixed source ports; one round = one datagram per flow, every `gap` s
    dst, ports, flows, gap, seconds, marker = (sys.argv[1], [int(p) for p in sys.argv[2].split(",")],
        int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), sys.argv[6])
    socks = []
    for port in ports:
        for f in range(flows):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("0.0.0.0", 0))
            socks.append((port, f, s))
    sent = {}
    start = time.monotonic()
    n = 0
    print("READY", flush=True)
    while time.monotonic() - start < seconds:
        for port, f, s in socks:
            try:  # offered, whatever happens to it: a DROP rule in OUTPUT answers EPERM
                s.sendto(f"{marker}:{port}:{f}:{n}".encode(), (dst, port))
            except PermissionError:
                pass
            sent[f"{port}:{f}"] = n + 1
        n += 1
        time.sleep(max(0.0, start + n * gap - time.monotonic()))
    print(json.dumps(sent), flush=True)
""")

FLOOD = textwrap.dedent("""
    import socket, sys
    dst, port, count, marker = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # a queued packet stays charged to our send buffer until its verdict: make room for many
    s.setsockopt(socket.SOL_SOCKET, 32, 1 << 26)  # SO_SNDBUFFORCE
    sent = 0
    for i in range(count):
        try:
            s.sendto(f"{marker}:{i}".encode(), (dst, port))
            sent += 1
        except OSError:
            pass
    print(sent, flush=True)
""")

SNIFFER = textwrap.dedent("""
    import socket, struct, sys
    # every frame on the interface into a pcap (Ethernet), until stdin closes
    iface, path = sys.argv[1], sys.argv[2]
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.setsockopt(socket.SOL_SOCKET, 33, 1 << 24)  # SO_RCVBUFFORCE
    s.bind((iface, 0))
    s.setblocking(False)
    import select, time
    out = open(path, "wb")
    out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    print("READY", flush=True)
    while True:
        r, _, _ = select.select([s, sys.stdin], [], [], 0.5)
        if s in r:
            while True:
                try:
                    frame = s.recv(65535, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                t = time.time()
                out.write(struct.pack("<IIII", int(t), int((t % 1) * 1e6), len(frame), len(frame)))
                out.write(frame)
        if sys.stdin in r:
            break
    # drain what is left, then report the kernel's drop count for this socket
    while True:
        try:
            frame = s.recv(65535, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        out.write(struct.pack("<IIII", 0, 0, len(frame), len(frame)))
        out.write(frame)
    out.close()
    packets, drops = struct.unpack("II", s.getsockopt(263, 6, 8))  # SOL_PACKET, PACKET_STATISTICS
    print(drops, flush=True)
""")

INJECTOR = textwrap.dedent("""
    import json, socket, sys, time
    # put IP packets (hex) on the wire as Ethernet frames, below this namespace's netfilter
    iface, src, dst, gap = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    head = bytes.fromhex(dst.replace(":", "")) + bytes.fromhex(src.replace(":", ""))
    for pkt in json.loads(sys.stdin.read()):
        data = bytes.fromhex(pkt)
        s.send(head + (b"\\x86\\xdd" if data[0] >> 4 == 6 else b"\\x08\\x00") + data)
        time.sleep(gap)
    print("SENT", flush=True)
""")


def ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        raise AssertionError(f"helper did not start: {line!r} {proc.communicate()[1]}")


def result(proc: subprocess.Popen[str], stdin: str | None = None, timeout: float = 120) -> Any:
    out, err = proc.communicate(stdin, timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def end(*procs: subprocess.Popen[str] | None) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()


class Sniffer:
    """Capture every frame on one interface into ``path`` until ``stop``."""

    def __init__(self, pair: Pair, ns: str, iface: str, path: Path) -> None:
        self.path = path
        self.proc = pair.python(ns, SNIFFER, iface, str(path), stdin=True)
        ready(self.proc)

    def stop(self) -> int:
        """Stop; returns how many frames the kernel dropped for us (0 for a complete capture)."""
        drops = result(self.proc, stdin="")
        assert isinstance(drops, int)
        return drops

    def packets(self) -> list[bytes]:
        from nfq_ipsec.pcap import read_packets

        return [p for p in read_packets(self.path) if p is not None]

    def frames(self) -> list[bytes]:
        """Every captured Ethernet frame, whatever it carries (IPv4, IPv6, ARP...)."""
        from nfq_ipsec.pcap import read_records

        return [frame for _, frame in read_records(self.path)]


def esp_ids(packets: list[bytes]) -> list[tuple[int, int]]:
    """(SPI, sequence number) of every ESP packet."""
    out = []
    for p in packets:
        if len(p) >= 28 and p[9] == 50:
            ihl = (p[0] & 0x0F) * 4
            out.append(struct.unpack_from("!II", p, ihl))
    return out


def inject(pair: Pair, packets: list[bytes], gap: float = 0.002) -> None:
    """Send IPv4 or IPv6 packets from A's interface to B (Ethernet framed, not through A's
    netfilter)."""
    proc = pair.python(pair.a, INJECTOR, pair.va, pair.mac_a, pair.mac_b, str(gap), stdin=True)
    out, err = proc.communicate(json.dumps([p.hex() for p in packets]), timeout=60)
    assert proc.returncode == 0 and "SENT" in out, err


def send(pair: Pair, messages: list[tuple[int, str]], gap: float = 0.005, settle: float = 0.5) -> list[str]:
    """Send ``(port, text)`` datagrams from A to B, one flow each; what B received, in order."""
    receiver = pair.python(pair.b, RECEIVER, ADDR_B, ",".join(map(str, PORTS)), "0", stdin=True)
    try:
        ready(receiver)
        sender = pair.python(pair.a, SENDER, ADDR_B, str(gap), json.dumps(messages))
        _, err = sender.communicate(timeout=120)
        assert sender.returncode == 0, err
        time.sleep(settle)
        got = result(receiver, stdin="")
    finally:
        end(receiver)
    return [text for _, text in got]


def bench_environment_or_skip() -> None:
    """The benchmark's own needs (the lab's are checked by the folder's gate, tests/gate.py)."""
    from nfq_ipsec_lab.bench import runner

    gate.require(runner.check_environment(), "the benchmark")


class StepRun(CheckRun):
    """A lab run's steps for its tests: ``get`` hands a test its step's value, or fails it
    with what went wrong (the daemons did not start, the step failed, or never ran)."""

    def get(self, name: str) -> Any:
        if "start" in self.errors:
            pytest.fail(f"the daemons did not start: {self.errors['start']}")
        if name in self.errors:
            pytest.fail(f"step {name!r} failed: {self.errors[name]}")
        if name not in self.values:
            pytest.fail(f"step {name!r} did not run ({'; '.join(self.failed()) or 'no errors'})")
        return self.values[name]

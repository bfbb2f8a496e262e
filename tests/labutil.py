"""Helpers for the root tests that run the real daemon in a pair of namespaces of their own.

Two namespaces ``nfqx<pid><tag>a``/``...b`` joined by a veth pair; each may run an
``nfq-ipsec run`` daemon with two queues. The configuration steers traffic by destination port:
UDP to ``PORTS[i]`` is protected by SAs owned by queue ``QUEUES[i]`` (one SA per queue and
direction, RFC 9611), so a test knows which worker carries which flow. Everything a test starts
is ended by pid; the namespaces are deleted on every exit path (``make_pair`` is a context
manager).

Small programs run inside the namespaces (``python -c``): a UDP receiver and senders, an
AF_PACKET sniffer that writes a pcap, and an AF_PACKET injector that puts crafted frames on
the wire from the peer's side (below the peer's netfilter).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
ADDR_A, ADDR_B = "10.81.0.1", "10.81.0.2"
QUEUES = (220, 221)
PORTS = (7100, 7200)  # UDP to PORTS[i] goes through QUEUES[i]
SPI_AB, SPI_BA = 0x3000, 0x4000  # + queue index
MARK = 0x10000000

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables-save") is None,
    reason="needs root, iproute2 and iptables (network namespaces)",
)


def nfq_ipsec() -> list[str]:
    script = Path(sys.executable).parent / "nfq-ipsec"
    return [str(script)] if script.exists() else [sys.executable, "-m", "nfq_ipsec.cli"]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, PYTHONPATH=str(ROOT))
    e.pop("NFQ_IPSEC_TEST_FAULT", None)
    e.update(extra)
    return e


# -- configuration --------------------------------------------------------------------------------
def make_keys() -> dict[str, str]:
    return {f"{d}{i}": os.urandom(20).hex() for d in ("ab", "ba") for i in range(len(QUEUES))}


def write_config(directory: Path, a_side: bool, iface: str, keys: dict[str, str],
                 iptables: str = "auto") -> Path:
    """One host's config: per queue i a policy for UDP to PORTS[i] with SAs ab{i}/ba{i}."""
    directory.mkdir(parents=True, exist_ok=True)
    me, peer = (ADDR_A, ADDR_B) if a_side else (ADDR_B, ADDR_A)
    out_d, in_d = ("ab", "ba") if a_side else ("ba", "ab")
    ports = "remote_ports" if a_side else "local_ports"
    text = textwrap.dedent(f"""
        [node]
        interface = "{iface}"
        role = "host"

        [daemon]
        queues = [{", ".join(map(str, QUEUES))}]
        control_socket = "{directory / 'run' / 'ctl.sock'}"
        state_dir = "{directory / 'state'}"
        iptables = "{iptables}"
        log_level = "info"
    """)
    for i, port in enumerate(PORTS):
        text += textwrap.dedent(f"""
            [[policy]]
            name = "port{port}"
            action = "protect"
            local = "{me}/32"
            remote = "{peer}/32"
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
    a: str
    b: str
    va: str
    vb: str
    mac_a: str = ""
    mac_b: str = ""

    def run(self, ns: str, *argv: str, check: bool = True, timeout: float = 60,
            environ: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                             timeout=timeout, env=environ or env())
        if check and res.returncode != 0:
            raise AssertionError(f"{argv} in {ns} failed ({res.returncode}): {res.stderr}")
        return res

    def python(self, ns: str, code: str, *args: str, stdin: bool = False) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", code, *args],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
        )

    def iptables_save(self, ns: str) -> list[str]:
        out = self.run(ns, "iptables-save").stdout
        return [re.sub(r"\[\d+:\d+\]", "", line) for line in out.splitlines()
                if line and not line.startswith("#")]


def _mac(ns: str, iface: str) -> str:
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", iface], capture_output=True,
                         text=True, check=True).stdout
    return str(json.loads(out)[0]["address"])


@contextlib.contextmanager
def make_pair(tag: str) -> Iterator[Pair]:
    """Two namespaces and a veth pair (MTU 9000), removed on every exit path. Both get a
    foreign ACCEPT rule in the tables we touch: it must survive everything we do."""
    base = f"nfqx{os.getpid()}{tag}"
    p = Pair(f"{base}a", f"{base}b", f"{base}va"[:15], f"{base}vb"[:15])
    try:
        for cmd in (
            ["ip", "netns", "add", p.a], ["ip", "netns", "add", p.b],
            ["ip", "link", "add", p.va, "netns", p.a, "type", "veth", "peer", "name", p.vb,
             "netns", p.b],
            ["ip", "-n", p.a, "link", "set", p.va, "mtu", "9000", "up"],
            ["ip", "-n", p.b, "link", "set", p.vb, "mtu", "9000", "up"],
            ["ip", "-n", p.a, "addr", "add", f"{ADDR_A}/24", "dev", p.va],
            ["ip", "-n", p.b, "addr", "add", f"{ADDR_B}/24", "dev", p.vb],
            ["ip", "-n", p.a, "link", "set", "lo", "up"],
            ["ip", "-n", p.b, "link", "set", "lo", "up"],
        ):
            subprocess.run(cmd, check=True, capture_output=True)
        p.mac_a, p.mac_b = _mac(p.a, p.va), _mac(p.b, p.vb)
        # static neighbours: no ARP resolution in the way of the first packets after a restart
        subprocess.run(["ip", "-n", p.a, "neigh", "replace", ADDR_B, "lladdr", p.mac_b, "dev", p.va,
                        "nud", "permanent"], check=True, capture_output=True)
        subprocess.run(["ip", "-n", p.b, "neigh", "replace", ADDR_A, "lladdr", p.mac_a, "dev", p.vb,
                        "nud", "permanent"], check=True, capture_output=True)
        for ns in (p.a, p.b):
            for table, chain in (("raw", "PREROUTING"), ("mangle", "OUTPUT"), ("filter", "INPUT")):
                p.run(ns, "iptables", "-t", table, "-A", chain, "-p", "udp", "--dport", "9",
                      "-j", "ACCEPT")
        yield p
    finally:
        for ns in (p.a, p.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# -- the daemon -----------------------------------------------------------------------------------
@dataclass
class Daemon:
    pair: Pair
    ns: str
    config: Path
    log: Path
    environ: dict[str, str] = field(default_factory=env)
    proc: subprocess.Popen[bytes] | None = None
    pids: set[int] = field(default_factory=set)  # every worker pid seen, for the cleanup

    def start(self) -> None:
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, *nfq_ipsec(), "run", "--config", str(self.config)],
                stdout=logf, stderr=subprocess.STDOUT, env=self.environ,
            )

    def status(self) -> dict[str, Any] | None:
        res = self.pair.run(self.ns, *nfq_ipsec(), "status", "--config", str(self.config), "--json",
                            check=False, environ=self.environ)
        if res.returncode == 3:
            return None
        assert res.returncode == 0, res.stderr
        st: dict[str, Any] = json.loads(res.stdout)
        self.pids.update(w["pid"] for w in st["workers"] if w["pid"])
        return st

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 60.0,
                 what: str = "") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        st = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.log.read_text()}")
            st = self.status()
            if st is not None and pred(st):
                return st
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}: {st}\n{self.log.read_text()}")

    def wait_running(self) -> dict[str, Any]:
        return self.wait_for(lambda st: st["daemon"]["state"] == "running"
                             and all(w["state"] == "ready" for w in st["workers"]), what="running")

    def worker_pid(self, st: dict[str, Any], index: int) -> int:
        pid = st["workers"][index]["pid"]
        assert isinstance(pid, int)
        return pid

    def sa(self, st: dict[str, Any], name: str) -> dict[str, Any]:
        return next(s for s in st["sas"] if s["name"] == name)

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def crash(self, workers: bool = True) -> None:
        """SIGKILL the workers (if asked) and the supervisor, as a machine crash would."""
        st = self.status()
        assert self.proc is not None and st is not None
        pids = [w["pid"] for w in st["workers"] if w["pid"]] if workers else []
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait(30)
        wait_gone(pids)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.pids:
            if _is_our_worker(pid):
                os.kill(pid, signal.SIGKILL)


def _is_our_worker(pid: int) -> bool:
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return comm.startswith("nfq-ipsec-q") or b"multiprocessing" in cmdline


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def wait_gone(pids: list[int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still alive: {[p for p in pids if alive(p)]}"
        time.sleep(0.05)


def daemon(pair: Pair, tmp: Path, a_side: bool, keys: dict[str, str], started: list[Daemon],
           **extra_env: str) -> Daemon:
    name = "a" if a_side else "b"
    cfg = write_config(tmp / name, a_side, pair.va if a_side else pair.vb, keys)
    d = Daemon(pair, pair.a if a_side else pair.b, cfg, tmp / name / "daemon.log", env(**extra_env))
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
    """utime + stime of a process, from /proc (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- programs run inside the namespaces ----------------------------------------------------------
RECEIVER = textwrap.dedent("""
    import json, select, socket, sys, time
    # UDP on the given ports; stops after `idle` s without data, or (idle <= 0) when stdin closes
    addr, ports, idle = sys.argv[1], [int(p) for p in sys.argv[2].split(",")], float(sys.argv[3])
    socks = []
    for p in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
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
    # put IPv4 packets (hex) on the wire as Ethernet frames, below this namespace's netfilter
    iface, src, dst, gap = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    head = bytes.fromhex(dst.replace(":", "")) + bytes.fromhex(src.replace(":", "")) + b"\\x08\\x00"
    for pkt in json.loads(sys.stdin.read()):
        s.send(head + bytes.fromhex(pkt))
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
    """Send IPv4 packets from A's interface to B (Ethernet framed, not through A's netfilter)."""
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


# -- crafting packets ------------------------------------------------------------------------------
def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4(src: str, dst: str, proto: int, payload: bytes, ident: int = 1, frag: int = 0x4000,
         total: int | None = None) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total if total is not None else 20 + len(payload),
                      ident, frag, 64, proto, 0, socket.inet_aton(src), socket.inet_aton(dst))
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:] + payload


def udp(src: str, dst: str, sport: int, dport: int, data: bytes) -> bytes:
    return ipv4(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data)


def fragments(packet: bytes, size: int = 8000) -> list[bytes]:
    """Split an IPv4 packet (20-byte header) into fragments of ``size`` payload bytes."""
    src, dst = socket.inet_ntoa(packet[12:16]), socket.inet_ntoa(packet[16:20])
    proto, ident = packet[9], struct.unpack_from("!H", packet, 4)[0]
    body = packet[20:]
    out = []
    for off in range(0, len(body), size):
        more = 0x2000 if off + size < len(body) else 0
        out.append(ipv4(src, dst, proto, body[off:off + size], ident, more | (off // 8)))
    return out


def bench_environment_or_skip() -> None:
    """Skip a benchmark smoke test where the benchmark can't run, but fail as root on CI, so
    that CI never passes without running it."""
    from nfq_ipsec_lab.bench import runner

    problems = runner.check_environment()
    if not problems:
        return
    if os.geteuid() == 0 and os.environ.get("CI", "").lower() == "true":
        pytest.fail("the benchmark can't run here: " + "; ".join(problems))
    pytest.skip("the benchmark can't run here: " + "; ".join(problems))

"""Compartments on the wire (root; one namespace pair for the module, as in test_sandbox).

Host A runs three compartments that protect the same flow to B (UDP to B's echo port) with SAs
of their own: ``alice`` selects uid 40001 (its workers run as ``nobody``), ``bob`` a cgroup v2
group, and the default one the rest. B, without compartments, tells the flows apart by A's
source port and echoes every datagram back. Proven:

- each flow leaves sealed with its own compartment's SA: tshark decrypts every ESP packet with
  the SAs' keys, finds every ICV good, and finds under each SPI only the source port of that
  compartment's process;
- the echoes come back to the worker of the compartment that owns their SPI: packets counted
  per compartment in status, and the connection carries the compartment's mark (``CONNMARK``),
  which a host rule (``-m connmark``) counts;
- an unlabelled process gets the default compartment's policy;
- a labelled packet never falls through: UDP to a port the default compartment bypasses in
  clear leaves in clear from the unlabelled process, and not at all from alice's;
- a process that moves to bob's cgroup mid-flow: its packets on a socket it opens after the move
  get bob's SA; those on the socket it held get the old label's (the kernel labels a socket by
  its creator's cgroup when it is made);
- alice's state directory is its user's, which the other compartments' workers can't read.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, NamedTuple

import gate
import pytest
from labutil import ADDR_A, ADDR_B, Daemon, Pair, Sniffer, end, env, make_pair, ready, result

from nfq_ipsec import sandbox
from nfq_ipsec.config.parsers import cgroup2_mount
from nfq_ipsec_lab.lab.labconfig import LabSA
from nfq_ipsec_lab.lab.traffic import tshark_uat_entries

ALICE_UID = 40001
N = 5  # datagrams per flow (each echoed)
# B's echo; the default compartment bypasses UDP to CLEAR_PORT (no port a tshark dissector
# claims: one that throws on our text leaves the packet's ICV fields out)
ECHO_PORT, CLEAR_PORT = 9000, 40123
PORTS = {"default": 7300, "alice": 7301, "bob": 7302}  # A's source port of each flow
QUEUES = {"default": 220, "alice": 230, "bob": 240}
SPI_OUT = {"default": 0x3000, "alice": 0x3100, "bob": 0x3200}  # A -> B
SPI_IN = {"default": 0x4000, "alice": 0x4100, "bob": 0x4200}  # B -> A
IDS = {"default": 0, "alice": 1, "bob": 2}
TCP_PORT = 9001  # B's TCP echo; alice's TCP flow has SAs of its own
SPI_TCP_OUT, SPI_TCP_IN = 0x3110, 0x4110

CLIENT = textwrap.dedent("""
    import json, os, socket, sys
    # uid (-1: stay root), B's address, echo port, count, first port, second port (0: none),
    # clear port, TCP echo port (0: none). Sends `count` datagrams on a socket bound to the
    # first port and waits for each echo (then one TCP exchange from that port); with a
    # second port, waits for a line on stdin (the test moves this process to
    # another cgroup), sends again on the first socket, then on a new one bound to the second.
    uid, dst, echo, n, p1, p2, clear, tcp = int(sys.argv[1]), sys.argv[2], *map(int, sys.argv[3:])
    if uid >= 0:
        os.setgroups([]); os.setgid(uid); os.setuid(uid)
    def sock(port):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port)); s.settimeout(1.0)
        return s
    def exchange(s, tag):
        got = 0
        for i in range(n):
            s.sendto(f"{tag}-{i}".encode(), (dst, echo))
            try:
                got += s.recv(2048) == f"{tag}-{i}".encode()
            except TimeoutError:
                pass
        return got
    s1 = sock(p1)
    out = {"pid": os.getpid(), "first": exchange(s1, "first")}
    if tcp:  # one TCP exchange from the first port; closed first here
        t = socket.create_connection((dst, tcp), timeout=2, source_address=("0.0.0.0", p1))
        t.sendall(b"tcp-hello")
        out["tcp"] = t.recv(2048).decode()
        t.close()
    for i in range(n):  # to the port the default compartment bypasses in clear
        s1.sendto(b"clear-%d" % i, (dst, clear))
    if p2:
        print(json.dumps(out), flush=True)
        sys.stdin.readline()
        out["old_socket"] = exchange(s1, "old")
        out["new_socket"] = exchange(sock(p2), "new")
    print(json.dumps(out), flush=True)
""")

ECHO = textwrap.dedent("""
    import select, socket, sys
    # UDP echo on the port given, TCP echo on the next argument's (each connection closed
    # after the peer's); UDP to the third is taken in silence (no ICMP error goes back)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], int(sys.argv[2])))
    quiet = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    quiet.bind((sys.argv[1], int(sys.argv[4])))
    l = socket.create_server((sys.argv[1], int(sys.argv[3])))
    print("READY", flush=True)
    n, conns = 0, []
    while True:
        r, _, _ = select.select([s, l, sys.stdin, *conns], [], [])
        if sys.stdin in r:
            break
        if s in r:
            data, peer = s.recvfrom(2048)
            s.sendto(data, peer)
            n += 1
        if l in r:
            conns.append(l.accept()[0])
        for c in [c for c in conns if c in r]:
            data = c.recv(2048)
            if data:
                c.sendall(data)
            else:
                c.close()
                conns.remove(c)
    print(n)
""")


def _keys() -> dict[str, str]:
    return {f"{d}-{c}": os.urandom(20).hex() for d in ("ab", "ba") for c in [*QUEUES, "alice-tcp"]}


def _sa(name: str, direction: str, spi: int, queue: int, key: str, comp: str | None) -> str:
    line = f'compartment = "{comp}"\n' if comp else ""
    return textwrap.dedent(f"""
        [[sa]]
        name = "{name}"
        direction = "{direction}"
        spi = 0x{spi:x}
        queue = {queue}
        encryption = "aes-gcm-128"
        key = "{key}"
    """) + line


def _head(d: Path, iface: str, queues: list[int]) -> str:
    return textwrap.dedent(f"""
        [node]
        interface = "{iface}"
        mtu = 1500

        [daemon]
        queues = [{", ".join(map(str, queues))}]
        control_socket = "{d / 'run' / 'ctl.sock'}"
        state_dir = "{d / 'state'}"
        log_level = "info"
    """)


def config_a(d: Path, iface: str, keys: dict[str, str], cgroup: str | None) -> Path:
    """A: the default compartment (queue 220) bypasses UDP to CLEAR_PORT and protects UDP to B;
    alice (uid) and bob (cgroup, or uid 40002 without cgroup v2) protect UDP to B too."""
    bob = f'cgroup = "{cgroup}"' if cgroup else f"uid = {ALICE_UID + 1}"
    text = _head(d, iface, [QUEUES["default"]]) + textwrap.dedent(f"""
        [[compartment]]
        name = "alice"
        uid = {ALICE_UID}
        queues = [{QUEUES["alice"]}]
        user = "nobody"

        [[compartment]]
        name = "bob"
        {bob}
        queues = [{QUEUES["bob"]}]

        [[policy]]
        name = "clear"
        action = "bypass"
        local = "{ADDR_A}/32"
        remote = "{ADDR_B}/32"
        protocol = "udp"
        remote_ports = {CLEAR_PORT}
    """)
    for comp, proto in (("alice-tcp", "tcp"), *((c, "udp") for c in QUEUES)):
        named = f'compartment = "{comp.removesuffix("-tcp")}"' if comp != "default" else ""
        # the default compartment's protects everything else: a packet of alice's that fell
        # through to it would leave sealed with the default SA, not dropped unseen
        protocol = f'protocol = "{proto}"' if comp != "default" else ""
        text += textwrap.dedent(f"""
            [[policy]]
            name = "to-b-{comp}"
            action = "protect"
            {named}
            local = "{ADDR_A}/32"
            remote = "{ADDR_B}/32"
            {protocol}
            sa = ["ab-{comp}", "ba-{comp}"]
        """)
    for comp, q in QUEUES.items():
        c = None if comp == "default" else comp
        text += _sa(f"ab-{comp}", "out", SPI_OUT[comp], q, keys[f"ab-{comp}"], c)
        text += _sa(f"ba-{comp}", "in", SPI_IN[comp], q, keys[f"ba-{comp}"], c)
    text += _sa("ab-alice-tcp", "out", SPI_TCP_OUT, QUEUES["alice"], keys["ab-alice-tcp"], "alice")
    text += _sa("ba-alice-tcp", "in", SPI_TCP_IN, QUEUES["alice"], keys["ba-alice-tcp"], "alice")
    return _write(d, text)


def config_b(d: Path, iface: str, keys: dict[str, str]) -> Path:
    """B: no compartments; A's flows told apart by A's port (bob's by the new socket's)."""
    text = _head(d, iface, list(QUEUES.values())) + textwrap.dedent(f"""
        [[policy]]
        name = "clear"
        action = "bypass"
        local = "{ADDR_B}/32"
        remote = "{ADDR_A}/32"
        protocol = "udp"
        local_ports = {CLEAR_PORT}
    """)
    # the default's last: any other port or protocol
    for comp, proto in (("alice", "udp"), ("bob", "udp"), ("alice-tcp", "tcp"), ("default", "")):
        ports = (f'protocol = "{proto}"\nremote_ports = {PORTS[comp.removesuffix("-tcp")]}'
                 if proto else "")
        text += textwrap.dedent(f"""
            [[policy]]
            name = "to-a-{comp}"
            action = "protect"
            local = "{ADDR_B}/32"
            remote = "{ADDR_A}/32"
        """) + ports + textwrap.dedent(f"""
            sa = ["ba-{comp}", "ab-{comp}"]
        """)
    for comp, q in QUEUES.items():
        text += _sa(f"ba-{comp}", "out", SPI_IN[comp], q, keys[f"ba-{comp}"], None)
        text += _sa(f"ab-{comp}", "in", SPI_OUT[comp], q, keys[f"ab-{comp}"], None)
    text += _sa("ba-alice-tcp", "out", SPI_TCP_IN, QUEUES["alice"], keys["ba-alice-tcp"], None)
    text += _sa("ab-alice-tcp", "in", SPI_TCP_OUT, QUEUES["alice"], keys["ab-alice-tcp"], None)
    return _write(d, text)


def _write(d: Path, text: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    path = d / "nfq-ipsec.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


@dataclass
class Run:
    pair: Pair
    a: Daemon
    keys: dict[str, str]
    pcap: Path
    cgroup: str | None
    tshark: str
    clients: dict[str, Any] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)
    connmark_counts: dict[int, int] = field(default_factory=dict)
    state_dirs: dict[str, os.stat_result] = field(default_factory=dict)
    worker_uids: dict[int, int] = field(default_factory=dict)  # by queue
    log: str = ""  # A's daemon log


def _client(pair: Pair, uid: int, p1: int, p2: int = 0, tcp: int = 0) -> subprocess.Popen[str]:
    return pair.python(pair.a, CLIENT, str(uid), ADDR_B, str(ECHO_PORT), str(N), str(p1),
                       str(p2), str(CLEAR_PORT), str(tcp), stdin=True)


def _connmark_counts(pair: Pair) -> dict[int, int]:
    """Packets A's filter INPUT counted per compartment mark on their connection."""
    out = pair.run(pair.a, "iptables", "-t", "filter", "-L", "INPUT", "-n", "-v", "-x").stdout
    counts = {}
    for line in out.splitlines():
        if "connmark match" in line:
            mark = int(line.split("connmark match")[1].split()[0].split("/")[0], 16)
            counts[mark] = int(line.split()[0])
    return counts


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tshark = gate.tool("tshark", "tshark")
    tmp = tmp_path_factory.mktemp("compartments")
    keys = _keys()
    mount = cgroup2_mount()
    group = f"/nfq-ipsec-test-{os.getpid()}-bob"
    cgroup_dir = Path(mount + group) if mount else None
    started: list[Daemon] = []
    procs: list[subprocess.Popen[str]] = []
    with make_pair("c") as pair:
        try:
            if cgroup_dir is not None:
                cgroup_dir.mkdir()
            a_cfg = config_a(tmp / "a", pair.va, keys, group if cgroup_dir else None)
            b_cfg = config_b(tmp / "b", pair.vb, keys)
            a = Daemon("a", pair.host(pair.a), a_cfg, env=env(), log=tmp / "a" / "daemon.log",
                       lab=pair.lab)
            b = Daemon("b", pair.host(pair.b), b_cfg, env=env(), log=tmp / "b" / "daemon.log",
                       lab=pair.lab)
            started += [a, b]
            for d in (a, b):
                d.start()
            for d in (a, b):
                d.wait_running()
            for mark in (0x100, 0x200):  # a host rule that keeps the label
                pair.run(pair.a, "iptables", "-t", "filter", "-A", "INPUT", "-m", "connmark",
                         "--mark", f"0x{mark:x}/0xff00", "-j", "ACCEPT")
            r = Run(pair, a, keys, tmp / "a.pcap", group if cgroup_dir else None, tshark)
            sniffer = Sniffer(pair, pair.a, pair.va, r.pcap)
            echo = pair.python(pair.b, ECHO, ADDR_B, str(ECHO_PORT), str(TCP_PORT),
                               str(CLEAR_PORT), stdin=True)
            procs.append(echo)
            ready(echo)
            r.clients["alice"] = result(_client(pair, ALICE_UID, PORTS["alice"], tcp=TCP_PORT),
                                        timeout=60)
            r.clients["default"] = result(_client(pair, -1, PORTS["default"]), timeout=60)
            mover = _client(pair, -1, PORTS["default"], PORTS["bob"])
            procs.append(mover)
            assert mover.stdout is not None
            first = json.loads(mover.stdout.readline())
            if cgroup_dir is not None:
                (cgroup_dir / "cgroup.procs").write_text(str(first["pid"]))
            r.clients["mover"] = {**first, **result(mover, stdin="moved\n", timeout=60)}
            time.sleep(0.3)
            assert sniffer.stop() == 0
            r.status = a.status()
            r.connmark_counts = _connmark_counts(pair)
            state = Path(a.config).parent / "state"
            r.state_dirs = {q.name: q.stat() for q in state.iterdir() if q.name.startswith("q")}
            r.log = a.log_text()
            r.worker_uids = {w["queue"]: int(sandbox.proc_status(w["pid"])["Uid"].split()[0])
                             for w in r.status["workers"]}
            yield r
        finally:
            end(*procs)
            for d in started:
                d.cleanup()
            if cgroup_dir is not None and cgroup_dir.exists():
                cgroup_dir.rmdir()


class Esp(NamedTuple):
    spi: int
    good: bool  # tshark found its ICV good
    port: int | None  # A's port of the decrypted UDP or TCP packet
    tcp_flags: int | None  # None: not TCP


def _wire(r: Run) -> list[Esp]:
    """Every ESP packet A sent or received, decrypted and authenticated by tshark with the
    SAs' keys."""
    sas = []
    a, b = IPv4Address(ADDR_A), IPv4Address(ADDR_B)
    spis = [(c, SPI_OUT[c], SPI_IN[c]) for c in QUEUES] + [("alice-tcp", SPI_TCP_OUT, SPI_TCP_IN)]
    for comp, spi_ab, spi_ba in spis:
        sas.append(LabSA(f"ab-{comp}", spi_ab, "a", "b", a, b, "aes-gcm-128", None,
                         bytes.fromhex(r.keys[f"ab-{comp}"])))
        sas.append(LabSA(f"ba-{comp}", spi_ba, "b", "a", b, a, "aes-gcm-128", None,
                         bytes.fromhex(r.keys[f"ba-{comp}"])))
    argv = [r.tshark, "-n", "-r", str(r.pcap), "-o", "esp.enable_encryption_decode:TRUE",
            "-o", "esp.enable_authentication_check:TRUE"]
    for entry in tshark_uat_entries(sas):
        argv += ["-o", entry]
    argv += ["-Y", "esp", "-T", "fields", "-E", "separator=|", "-E", "occurrence=l",
             "-e", "esp.spi", "-e", "esp.icv_good", "-e", "udp.srcport", "-e", "udp.dstport",
             "-e", "tcp.srcport", "-e", "tcp.dstport", "-e", "tcp.flags"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-500:]  # tshark names no key in its errors
    outbound = {SPI_TCP_OUT, *SPI_OUT.values()}
    out = []
    for line in res.stdout.splitlines():
        spi, good, usport, udport, tsport, tdport, flags = [*line.split("|"), *[""] * 7][:7]
        sport, dport = (usport, udport) if usport else (tsport, tdport)
        port = sport if int(spi, 16) in outbound else dport
        out.append(Esp(int(spi, 16), good == "1", int(port) if port else None,
                       int(flags, 16) if flags else None))
    return out


def test_each_flow_is_sealed_with_its_own_compartments_sa(run: Run) -> None:
    wire = _wire(run)
    bad = [(f"0x{e.spi:x}", e.port) for e in wire if not e.good]
    assert wire and not bad, f"ICVs tshark could not verify: {bad}"
    ports_by_spi: dict[int, set[int | None]] = {}
    for e in wire:
        if e.tcp_flags is None:
            ports_by_spi.setdefault(e.spi, set()).add(e.port)
    print("A's ESP by SPI and inner port:", {f"0x{k:x}": v for k, v in ports_by_spi.items()})
    assert ports_by_spi[SPI_OUT["alice"]] == {PORTS["alice"]}
    assert ports_by_spi[SPI_IN["alice"]] == {PORTS["alice"]}
    assert ports_by_spi[SPI_OUT["default"]] == {PORTS["default"]}  # the unlabelled process
    assert run.clients["alice"]["first"] == N and run.clients["default"]["first"] == N
    count = {spi: sum(1 for e in wire if e.spi == spi) for spi in ports_by_spi}
    # alice's N datagrams to the echo and N to CLEAR_PORT (its own policy protects them: the
    # default compartment's bypass is not alice's), and the N echoes
    assert (count[SPI_OUT["alice"]], count[SPI_IN["alice"]]) == (2 * N, N)


def test_a_tcp_connection_stays_in_its_compartment_to_its_last_ack(run: Run) -> None:
    """Alice's TCP connection, closed by alice first: the last ACK leaves after the socket
    is closed, with no owner the uid selector could match; it follows its connection's mark
    to alice's SA (the default compartment, which protects all the rest, would seal it with
    its own)."""
    assert run.clients["alice"]["tcp"] == "tcp-hello"
    wire = _wire(run)
    tcp = [e for e in wire if e.tcp_flags is not None]
    assert {e.spi for e in tcp} == {SPI_TCP_OUT, SPI_TCP_IN}
    assert {e.port for e in tcp} == {PORTS["alice"]}
    sent = [e.tcp_flags for e in tcp if e.spi == SPI_TCP_OUT]
    fin, ack = 0x01, 0x10
    first_fin = next(i for i, f in enumerate(sent) if f is not None and f & fin)
    assert sent[first_fin + 1:] == [ack], f"A's packets after its FIN: {sent[first_fin + 1:]}"


def test_inbound_goes_to_the_compartment_that_owns_the_spi(run: Run) -> None:
    comps = {c["name"]: c for c in run.status["compartments"]}
    print("A's compartments:", json.dumps(run.status["compartments"]))
    assert [c["name"] for c in run.status["compartments"]] == ["default", "alice", "bob"]
    sas = {s["name"]: s for s in run.status["sas"]}
    assert sas["ba-alice"]["packets"] == N and sas["ab-alice"]["packets"] == 2 * N
    # alice's worker saw alice's packets only: 2N out, N echoes in
    workers = {w["queue"]: w for w in run.status["workers"]}
    assert workers[QUEUES["alice"]]["compartment"] == "alice"
    wire = _wire(run)
    tcp = sum(1 for e in wire if e.tcp_flags is not None)
    assert comps["alice"]["packets_in"] == workers[QUEUES["alice"]]["packets_in"] == 3 * N + tcp
    assert comps["alice"]["workers"] == comps["alice"]["workers_ready"] == 1
    # and the logs say whose each worker is
    assert f"worker for queue {QUEUES['alice']} ready: " in run.log
    assert "compartment alice" in run.log and f"nfq-ipsec[alice/q{QUEUES['alice']}]" in run.log
    total = sum(c["packets_in"] for c in comps.values())
    assert total == sum(w["packets_in"] for w in run.status["workers"])
    # what alice's connections received carries its compartment's mark for host rules
    assert run.connmark_counts[IDS["alice"] << 8] == sum(
        1 for e in wire if e.spi in (SPI_IN["alice"], SPI_TCP_IN))


def test_a_labelled_packet_never_falls_through_to_another_compartment(run: Run) -> None:
    """UDP to CLEAR_PORT: the default compartment bypasses it in clear; alice's packets to it
    meet alice's policies only (which protect them: above), never the default's bypass."""
    from nfq_ipsec.pcap import read_packets

    clear = [p for p in read_packets(run.pcap) if p is not None and len(p) >= 28 and p[9] == 17
             and int.from_bytes(p[22:24], "big") == CLEAR_PORT]
    sources = sorted({int.from_bytes(p[20:22], "big") for p in clear})
    assert sources == [PORTS["default"]], sources
    assert len([p for p in clear if int.from_bytes(p[20:22], "big") == PORTS["default"]]) >= N


def test_a_process_that_moves_cgroup_gets_the_new_labels_sa(run: Run) -> None:
    if run.cgroup is None:
        pytest.skip("cgroup v2 is not mounted here (neither /sys/fs/cgroup nor "
                    "/sys/fs/cgroup/unified): the cgroup selector and a move between cgroups "
                    "can't be tested; the uid selector is")
    wire = _wire(run)
    mover = run.clients["mover"]
    assert (mover["first"], mover["old_socket"], mover["new_socket"]) == (N, N, N)
    bob = {e.port for e in wire if e.spi == SPI_OUT["bob"]}
    assert bob == {PORTS["bob"]}, "the new socket's packets are bob's"
    assert sum(1 for e in wire if e.spi == SPI_OUT["bob"]) == N
    # the socket made before the move keeps its label: the default SA, 2N datagrams of the
    # mover and N of the unlabelled client, all from the default port
    assert sum(1 for e in wire if e.spi == SPI_OUT["default"]) == 3 * N
    comps = {c["name"]: c for c in run.status["compartments"]}
    assert comps["bob"]["packets_in"] == 2 * N
    assert run.connmark_counts[IDS["bob"] << 8] == N


def test_a_compartments_state_is_its_own_users(run: Run) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody").pw_uid
    alice_dir = run.state_dirs[f"q{QUEUES['alice']}"]
    bob_dir = run.state_dirs[f"q{QUEUES['bob']}"]
    assert alice_dir.st_uid == nobody != bob_dir.st_uid
    assert alice_dir.st_mode & 0o007 == 0  # nothing for others: bob's workers' user
    worker_user = pwd.getpwnam("nfq-ipsec").pw_uid  # daemon.worker_user's default
    assert run.worker_uids == {QUEUES["alice"]: nobody, QUEUES["bob"]: worker_user,
                               QUEUES["default"]: worker_user}
    assert {c["name"]: c["user"] for c in run.status["compartments"]}["alice"] == "nobody"

"""ESP in UDP through a NAT (RFC 3948), with the real daemon on both sides.

The lab: a client host behind a NAT router (MASQUERADE with port translation: UDP leaves from
ports 20000-20099, never from 4500) talking to a server in front of it::

    client 10.77.0.2 --- lan0 10.77.0.1 [router, NAT] wan0 192.168.56.1 --- 192.168.56.2 server

The client's SAs send to the server's port 4500 and keep the NAT mapping with keepalives (every
second); the server's SAs follow the authenticated source the NAT gave the client
(``peer_change = "follow"``). Both modes: tunnel (inner 10.77.0.2 <-> 192.168.56.2) and
transport (the server sees the client as the NAT's address; RFC 3948 3.1.2 checksums).

One run per mode, while tcpdump records the NAT's public side:

1. ping and a TCP file transfer from the client, a TCP transfer and UDP back from the server,
   UDP both ways, and datagrams bigger than the MTU (ESP in UDP fragmented through the NAT);
2. the router's UDP conntrack timeout shortened to 2 s, the pair left idle for 7 s while the
   client's keepalives run, then the *server* starts: its traffic reaches the client only if
   the mapping stayed up;
3. a forced port change: the MASQUERADE range moved to 20100-20199 and the mapping deleted
   (conntrack -D); the client's next packets leave from a new port; its keepalives from there
   move nothing (the server's ping still goes to the old port and is lost), the server
   follows once the client's ESP authenticates, and traffic passes both ways;
4. hostile input from the public side to the server's port 4500: runts, markers, a keepalive
   flood, random SPIs, and a captured packet of the client's replayed from another port;
5. tshark checks the ICV of every ESP-in-UDP packet of the capture with the SAs' keys.

Needs root, tcpdump, tshark, conntrack; runs in CI (folder ``lab``).
"""

from __future__ import annotations

import hashlib
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gate
import pytest
from labutil import StepRun

from nfq_ipsec_lab.lab import traffic
from nfq_ipsec_lab.lab.daemon import Daemon
from nfq_ipsec_lab.lab.netns import Lab, Netns
from nfq_ipsec_lab.lab.traffic import (
    TSHARK_ENCRYPTION,
    TSHARK_INTEGRITY,
    Capture,
    TransferResult,
    UdpProbeResult,
    ping,
    random_file,
)

CLIENT, ROUTER_LAN, ROUTER_WAN, SERVER = "10.77.0.2", "10.77.0.1", "192.168.56.1", "192.168.56.2"
PORTS_BEFORE, PORTS_AFTER = (20000, 20099), (20100, 20199)
SPI_C2S, SPI_S2C = 0x1000, 0x2000
MODES = ["tunnel", "transport"]
UDP_TIMEOUT = 2  # the router's conntrack timeout for UDP, seconds, during the idle step
IDLE = 7.0  # seconds without traffic: over three UDP timeouts
KEEPALIVE = 1  # the client's keepalive interval, seconds
FLOOD = 5000  # keepalives in the hostile step


@dataclass
class NatRun(StepRun):
    mode: str = "tunnel"
    keys: dict[str, str] = field(default_factory=dict)


def config(workdir: Path, side: str, mode: str, keys: dict[str, str]) -> Path:
    """The client's or the server's configuration (keys inline, the file 0600)."""
    client = side == "client"
    me, iface = (CLIENT, "eth0") if client else (SERVER, "eth0")
    # the client's peer is the server; the server's is the client as the NAT shows it
    peer_outer = SERVER if client else ROUTER_WAN
    peer_inner = SERVER if client else (CLIENT if mode == "tunnel" else ROUTER_WAN)
    tunnel = (f'mode = "tunnel"\ntunnel_local = "{me}"\ntunnel_remote = "{peer_outer}"\n'
              if mode == "tunnel" else "")
    out_spi, in_spi = (SPI_C2S, SPI_S2C) if client else (SPI_S2C, SPI_C2S)
    out_extra = f"keepalive = {KEEPALIVE}" if client else 'keepalive = 0\npeer_change = "follow"'
    in_extra = "" if client else 'peer_change = "follow"'
    text = f"""
[node]
interface = "{iface}"
[daemon]
queues = [100]
cpus = [0]
control_socket = "{workdir / side}.sock"
state_dir = "{workdir / side}-state"
[[policy]]
name = "peer"
action = "protect"
local = "{me}/32"
remote = "{peer_inner}/32"
sa = ["out", "in"]
[[sa]]
name = "out"
direction = "out"
spi = {out_spi}
encryption = "aes-gcm-128"
key = "{keys[f'{side}-out']}"
encapsulation = "udp"
{tunnel}{out_extra}
[[sa]]
name = "in"
direction = "in"
spi = {in_spi}
encryption = "aes-gcm-128"
key = "{keys['server-out' if client else 'client-out']}"
encapsulation = "udp"
{tunnel}{in_extra}
"""
    path = workdir / f"{side}.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def masquerade(router: Netns, ports: tuple[int, int], op: str = "-A") -> None:
    router.run(["iptables", "-t", "nat", op, "POSTROUTING", "-s", "10.77.0.0/24", "-o", "wan0",
                "-p", "udp", "-j", "MASQUERADE", "--to-ports", f"{ports[0]}-{ports[1]}"])


def build(lab: Lab) -> tuple[Netns, Netns, Netns]:
    c, r, s = lab.netns("c"), lab.netns("r"), lab.netns("s")
    lab.veth(c, "eth0", r, "lan0")
    lab.veth(r, "wan0", s, "eth0")
    c.addr("eth0", f"{CLIENT}/24")
    r.addr("lan0", f"{ROUTER_LAN}/24")
    r.addr("wan0", f"{ROUTER_WAN}/24")
    s.addr("eth0", f"{SERVER}/24")
    c.route("default", ROUTER_LAN)
    s.route("10.77.0.0/24", ROUTER_WAN)  # tunnel mode: the inner replies' route (then ESP)
    r.sysctl("net.ipv4.ip_forward", 1)
    masquerade(r, PORTS_BEFORE)
    # nothing but UDP crosses the NAT: anything else from the client would be a leak
    r.run(["iptables", "-A", "FORWARD", "-i", "lan0", "!", "-p", "udp", "-j", "DROP"])
    return c, r, s


def conntrack_entries(router: Netns) -> str:
    return router.run(["conntrack", "-L", "-p", "udp"], check=False).stdout


def public_port(router: Netns) -> int:
    """The port the NAT gave the client's 4500 (its mapping's reply direction)."""
    for line in conntrack_entries(router).splitlines():
        if f"src={CLIENT}" in line and "sport=4500" in line:
            # the reply tuple: src=server dst=NAT sport=4500 dport=<public port>
            return int(line.rsplit("dport=", 1)[1].split()[0])
    raise AssertionError(f"no mapping for {CLIENT}:4500: {conntrack_entries(router)!r}")


def hostile(router: Netns, replay: bytes | None) -> None:
    """From the public side to the server's 4500: runts (three bytes of the marker and two of a
    keepalive among them), markers (one with nothing after it), a keepalive flood, keepalive
    bytes as long as ESP, random SPIs, and ``replay`` (a genuine packet of the client's) from
    another port."""
    src = f"""
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{ROUTER_WAN}", 31337))
dst = ("{SERVER}", 4500)
for n in range(8):
    s.sendto(os.urandom(n) if n != 1 else b"\\x00", dst)  # runts (one byte 0: not a keepalive)
s.sendto(b"\\0\\0\\0", dst)  # three bytes of the marker: a runt
for _ in range(5):
    s.sendto(b"\\0\\0\\0\\0" + os.urandom(40), dst)  # the marker, IKE
s.sendto(b"\\0\\0\\0\\0", dst)  # the marker and nothing after it: still the marker
for _ in range({FLOOD}):
    s.sendto(b"\\xff", dst)
s.sendto(b"\\xff\\xff", dst)  # two keepalive bytes: a runt
s.sendto(b"\\xff" * 44, dst)  # keepalive bytes as far as ESP goes: SPI 0xffffffff, unknown
for _ in range(50):
    s.sendto(os.urandom(4) + os.urandom(60), dst)
replay = bytes.fromhex(sys.argv[1])
if replay:
    s.sendto(replay, dst)
"""
    router.run([router.python, "-c", src, replay.hex() if replay else ""])


def esp_payloads(pcap: Path) -> list[tuple[int, bytes]]:
    """(source port, UDP payload) of each ESP-in-UDP packet of the client's in the capture."""
    from scapy.layers.inet import IP, UDP
    from scapy.utils import PcapReader

    out = []
    with PcapReader(str(pcap)) as reader:
        for pkt in reader:
            if IP in pkt and UDP in pkt and pkt[IP].dst == SERVER and pkt[UDP].dport == 4500:
                payload = bytes(pkt[UDP].payload)
                if len(payload) > 8 and payload[:4] == SPI_C2S.to_bytes(4, "big"):
                    out.append((pkt[UDP].sport, payload))
    return out


@dataclass(frozen=True)
class Wire:
    ipv4: int
    esp_in_udp: int
    keepalives: int
    unreachable: int  # the NAT's port unreachables for the server's ESP to a mapping gone
    other: list[str]  # anything else: cleartext or plain ESP


def read_wire(pcap: Path) -> Wire:
    from scapy.layers.inet import ICMP, IP, UDP, UDPerror
    from scapy.utils import PcapReader

    ipv4 = esp = ka = unreachable = 0
    other: list[str] = []
    fragmented: set[tuple[str, str, int]] = set()  # ESP in UDP whose first fragment we saw
    with PcapReader(str(pcap)) as reader:
        for n, pkt in enumerate(reader, 1):
            if IP not in pkt:
                continue
            ipv4 += 1
            ip = pkt[IP]
            if ip.frag and (ip.src, ip.dst, ip.id) in fragmented:
                continue  # the rest of an ESP-in-UDP packet counted below
            if UDP in pkt and 4500 in (pkt[UDP].sport, pkt[UDP].dport) and {ip.src, ip.dst} == {
                    ROUTER_WAN, SERVER}:
                payload = bytes(pkt[UDP].payload)
                if payload == b"\xff":
                    ka += 1
                    continue
                if len(payload) > 8 and payload[:4] in (SPI_C2S.to_bytes(4, "big"),
                                                        SPI_S2C.to_bytes(4, "big")):
                    esp += 1
                    if ip.flags.MF:
                        fragmented.add((ip.src, ip.dst, ip.id))
                    continue
                if pkt[UDP].sport == 31337:  # the hostile step's own datagrams
                    continue
            if (ICMP in pkt and (ip.src, ip.dst) == (ROUTER_WAN, SERVER) and pkt[ICMP].type == 3
                    and UDPerror in pkt and pkt[UDPerror].sport == 4500):
                unreachable += 1
                continue
            other.append(f"frame {n}: {pkt.summary()}")
    return Wire(ipv4, esp, ka, unreachable, other)


def tshark_icv(pcap: Path, keys: dict[str, str]) -> tuple[int, int, int]:
    """(ESP packets of our SPIs, ICV good, ICV bad) as tshark's ESP-in-UDP dissector sees the
    capture (the hostile step's random SPIs are no SA's, and the ESP that ICMP errors quote is
    no packet of its own: left out)."""
    tshark = gate.tool("tshark", "tshark")
    argv = [tshark, "-n", "-r", str(pcap), "--disable-protocol", "tcp",
            "-o", "esp.enable_encryption_decode:TRUE", "-o", "esp.enable_authentication_check:TRUE"]
    for spi, key in ((SPI_C2S, keys["client-out"]), (SPI_S2C, keys["server-out"])):
        fields = ["IPv4", "*", "*", f"0x{spi:08x}", TSHARK_ENCRYPTION["aes-gcm-128"], f"0x{key}",
                  TSHARK_INTEGRITY[None], ""]
        argv += ["-o", "uat:esp_sa:" + ",".join(f'"{f}"' for f in fields)]
    # our SPIs, in packets whose outermost IP header carries UDP (not an ICMP error's quote)
    argv += ["-Y", f"(esp.spi == 0x{SPI_C2S:x} || esp.spi == 0x{SPI_S2C:x}) && ip.proto#1 == 17",
             "-T", "fields", "-E", "separator=|", "-e", "esp.spi", "-e", "esp.icv_good", "-e", "esp.icv_bad"]
    res = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=300)
    assert res.returncode == 0, res.stderr[-500:]
    lines = [ln.split("|") for ln in res.stdout.splitlines() if ln.strip()]
    return (len(lines), sum(1 for ln in lines if ln[1] == "1"),
            sum(1 for ln in lines if ln[2] == "1"))


@pytest.fixture(scope="module", params=MODES)
def nat(request: pytest.FixtureRequest) -> Iterator[NatRun]:
    gate.tool("tcpdump", "tcpdump")
    gate.tool("conntrack", "conntrack")
    mode: str = request.param
    r = NatRun(mode=mode, keys={k: secrets.token_hex(20) for k in ("client-out", "server-out")})
    with Lab(prefix="nfu") as lab:
        c, router, s = build(lab)
        daemons = {side: Daemon(side, host, config(lab.workdir, side, mode, r.keys))
                   for side, host in (("client", c), ("server", s))}
        client_addr = CLIENT if mode == "tunnel" else ROUTER_WAN  # as the server reaches it
        cap = Capture(lab, router, "wan0", lab.workdir / "wan.pcap")
        try:
            def start() -> None:
                for d in daemons.values():
                    d.start(lab)
                for d in daemons.values():
                    d.wait_ready()
                cap.start()

            r.step("start", start)
            if "start" in r.errors:
                yield r
                return
            file = random_file(lab.workdir / "file", 256 << 10)
            r.step("ping", lambda: ping(c, SERVER, count=3))
            r.step("tcp_up", lambda: transfer(lab, c, s, SERVER, SERVER, file, 5001))
            # the server starts, to the client as it sees it: in transport mode the NAT's
            # address, the packets arriving with the client's own after the NAT
            r.step("tcp_down", lambda: transfer(lab, s, c, CLIENT, client_addr, file, 5002))
            r.step("udp_down", lambda: datagrams(lab, s, c, CLIENT, client_addr, 9000, 10))
            r.step("udp_up", lambda: datagrams(lab, c, s, SERVER, SERVER, 9001, 10))
            r.step("big_udp", lambda: big_datagrams(lab, c, s))
            r.step("server_peer", lambda: Daemon.sa(daemons["server"].status(), "in"))
            r.step("port_before", lambda: public_port(router))

            def idle() -> dict[str, Any]:
                router.sysctl("net.netfilter.nf_conntrack_udp_timeout", UDP_TIMEOUT)
                router.sysctl("net.netfilter.nf_conntrack_udp_timeout_stream", UDP_TIMEOUT)
                before = Daemon.sa(daemons["client"].status(), "out")["keepalives_sent"]
                time.sleep(IDLE)
                after = Daemon.sa(daemons["client"].status(), "out")["keepalives_sent"]
                return {"keepalives": after - before, "port": public_port(router),
                        "ping": ping(s, client_addr, count=3)}

            r.step("idle", idle)

            def port_change() -> dict[str, Any]:
                masquerade(router, PORTS_BEFORE, "-D")
                masquerade(router, PORTS_AFTER)
                router.run(["conntrack", "-D", "-p", "udp", "--orig-src", CLIENT])
                time.sleep(KEEPALIVE * 2)  # a keepalive makes the new mapping (not authenticated)
                port = public_port(router)
                stale = ping(s, client_addr, count=2)  # still to the old port: nothing there
                result = ping(c, SERVER, count=3)  # authenticated: the server follows
                back = ping(s, client_addr, count=3)
                return {"port": port, "stale": stale, "ping": result, "back": back,
                        "server": Daemon.sa(daemons["server"].status(), "in"),
                        "server_out": Daemon.sa(daemons["server"].status(), "out")}

            r.step("port_change", port_change)

            def attack() -> dict[str, Any]:
                pcap_now = lab.workdir / "wan.pcap"
                seen = esp_payloads(pcap_now)
                replay = seen[0][1] if seen else None
                before = daemons["server"].status()
                log_before = daemons["server"].log_text().splitlines()
                hostile(router, replay)
                time.sleep(1.0)
                after = daemons["server"].status()
                log = daemons["server"].log_text().splitlines()[len(log_before):]
                return {"before": before, "after": after, "replayed": replay is not None,
                        "ping": ping(c, SERVER, count=3), "log": log}

            r.step("hostile", attack)
            r.step("status_text", lambda: daemons["server"].status_text())
        finally:
            if cap.proc is not None:
                r.step("pcap", cap.stop)
            for name, d in daemons.items():
                r.step(f"stop_{name}", d.stop)
                d.cleanup()
            if "pcap" in r.values:
                r.step("wire", lambda: read_wire(r.values["pcap"]))
                r.step("tshark", lambda: tshark_icv(r.values["pcap"], r.keys))
        yield r


def transfer(lab: Lab, sender: Netns, receiver: Netns, bind: str, target: str, file: Path,
             port: int) -> TransferResult:
    """A TCP transfer from ``sender`` to ``target``, received by ``receiver`` on its own
    address ``bind`` (the client behind the NAT: 10.77.0.2 whatever the server sent to)."""
    data = file.read_bytes()
    sender.push(file)
    recv = lab.start(f"tcp-recv-{port}", receiver, [receiver.python, "-c", traffic.TCP_RECV_SRC,
                                                    bind, str(port), "-", "30"])
    try:
        traffic.wait_listening(receiver, "tcp", port)
        t0 = time.monotonic()
        res = sender.run([sender.python, "-c", traffic.TCP_SEND_SRC, target, str(port),
                          sender.path(file), "30"], check=False, timeout=40)
        seconds = time.monotonic() - t0
    finally:
        recv.popen.wait(15)
        log = recv.output()
    got = [line.split() for line in log.splitlines() if line.startswith("received ")]
    assert got, f"sender said {(res.stdout + res.stderr)[-300:]!r}; receiver said {log[-300:]!r}"
    return TransferResult(len(data), hashlib.sha256(data).hexdigest(), got[-1][2],
                          int(got[-1][1]), seconds)


BIG_SIZES = (3000, 8000)  # bytes of UDP payload: ESP in UDP fragmented on both links


def big_datagrams(lab: Lab, client: Netns, server: Netns) -> list[int]:
    """Datagrams bigger than the links' MTU from the client: the kernel fragments its ESP in
    UDP, the NAT reassembles and translates it, the server's kernel reassembles it before
    our rules. The sizes that arrived whole."""
    recv_src = f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{SERVER}", 9002)); s.settimeout(5)
try:
    while True:
        data = s.recv(65536)
        if data == bytes([len(data) % 251]) * len(data):
            print("got", len(data), flush=True)
except socket.timeout:
    pass
"""
    send_src = f"""
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for n in {BIG_SIZES!r}:
    s.sendto(bytes([n % 251]) * n, ("{SERVER}", 9002)); time.sleep(0.2)
"""
    recv = lab.start("udp-big", server, [server.python, "-c", recv_src])
    try:
        traffic.wait_listening(server, "udp", 9002)
        client.run([client.python, "-c", send_src], timeout=20)
    finally:
        recv.popen.wait(15)
    return [int(line.split()[1]) for line in recv.output().splitlines() if line.startswith("got ")]


def datagrams(lab: Lab, sender: Netns, receiver: Netns, bind: str, target: str, port: int,
              count: int) -> UdpProbeResult:
    """``count`` UDP datagrams to ``target``, received (and echoed) on the receiver's own
    address ``bind``, as :func:`transfer` does for TCP."""
    recv = lab.start(f"udp-recv-{port}", receiver, [receiver.python, "-c", traffic.UDP_RECV_SRC,
                                                    bind, str(port), "3"])
    try:
        traffic.wait_listening(receiver, "udp", port)
        res = sender.run([sender.python, "-c", traffic.UDP_SEND_SRC, target, str(port),
                          str(count)], timeout=30)
    finally:
        recv.popen.wait(15)
        log = recv.output()
    got = [line.split() for line in log.splitlines() if line.startswith("received ")]
    sent = [line.split() for line in res.stdout.splitlines() if line.startswith("sent ")]
    assert got and sent, (res.stdout, log)
    return UdpProbeResult(int(sent[-1][1]), int(sent[-1][3]), int(got[-1][1]))


# -- the results --------------------------------------------------------------------------------

def test_traffic_passes_both_ways(nat: NatRun) -> None:
    assert nat.get("ping").ok, nat.get("ping").output
    for name in ("tcp_up", "tcp_down"):
        assert nat.get(name).ok, (name, nat.get(name))
    for name in ("udp_up", "udp_down"):
        probe = nat.get(name)
        assert probe.received == probe.sent == 10, (name, probe)


def test_datagrams_bigger_than_the_mtu_pass(nat: NatRun) -> None:
    assert nat.get("big_udp") == list(BIG_SIZES)


def test_the_server_follows_the_nat_mapping(nat: NatRun) -> None:
    port = nat.get("port_before")
    assert PORTS_BEFORE[0] <= port <= PORTS_BEFORE[1]
    sa = nat.get("server_peer")
    assert sa["encapsulation"] == "udp" and sa["peer_changes"] >= 1
    want = ROUTER_WAN if nat.mode == "tunnel" else "*"
    assert sa["udp_peer"] == f"{want}:{port}"


def test_keepalives_hold_the_mapping_while_idle(nat: NatRun) -> None:
    idle = nat.get("idle")
    assert idle["keepalives"] >= IDLE / KEEPALIVE - 2, idle
    assert idle["port"] == nat.get("port_before")  # the same mapping, over three timeouts
    assert idle["ping"].ok, idle["ping"].output  # the server's traffic found the client


def test_a_forced_port_change_is_followed(nat: NatRun) -> None:
    change = nat.get("port_change")
    assert PORTS_AFTER[0] <= change["port"] <= PORTS_AFTER[1]
    # the keepalives from the new port moved nothing: the server's traffic went to the old
    # one, where the NAT has nothing any more, until the client's ESP authenticated
    assert change["stale"].received == 0, change["stale"].output
    assert change["ping"].ok and change["back"].ok, (change["ping"].output, change["back"].output)
    assert change["server"]["udp_peer"].endswith(f":{change['port']}")
    assert change["server_out"]["udp_peer"].endswith(f":{change['port']}")
    assert change["server"]["peer_changes"] >= 2


def test_hostile_input_is_dropped_with_reasons(nat: NatRun) -> None:
    h = nat.get("hostile")
    before, after = h["before"], h["after"]
    assert h["replayed"]
    worker_before, worker = before["workers"][0], after["workers"][0]
    assert worker["restarts"] == 0 and worker["pid"] == worker_before["pid"]
    drops = worker["drops"]
    old = worker_before["drops"] or {}
    # 0-7 bytes (not a lone 0xff), three bytes of the marker, two of a keepalive
    assert drops.get("udp_runt", 0) - old.get("udp_runt", 0) >= 8, drops
    assert drops.get("replay", 0) - old.get("replay", 0) == 1, drops
    assert (worker["ike_markers"] or 0) - (worker_before["ike_markers"] or 0) == 6
    kdrops, kold = after["kernel_drops"], before["kernel_drops"] or {}
    assert kdrops["nat_keepalive"] - kold.get("nat_keepalive", 0) >= FLOOD
    # 50 random SPIs (a few may be cut) and keepalive bytes as long as ESP
    assert kdrops["unknown_spi"] - kold.get("unknown_spi", 0) >= 46
    # the flood is counted, not logged: the log grows by a few lines at most, whatever its size
    assert len(h["log"]) <= 5, h["log"]
    # the replay from another port moved nothing, and traffic still passes
    sa_before, sa_after = (Daemon.sa(before, "in"), Daemon.sa(after, "in"))
    assert sa_after["udp_peer"] == sa_before["udp_peer"]
    assert sa_after["peer_changes"] == sa_before["peer_changes"]
    assert h["ping"].ok


def test_status_shows_the_encapsulation(nat: NatRun) -> None:
    text = nat.get("status_text")
    assert "out: ESP in UDP, peer" in text and "in: ESP in UDP, peer" in text
    assert "IKE (non-ESP marker) passed: 6" in text


def test_the_wire_holds_only_esp_in_udp(nat: NatRun) -> None:
    wire: Wire = nat.get("wire")
    assert wire.esp_in_udp > 50 and wire.keepalives > 0
    assert 1 <= wire.unreachable <= 2  # the stale pings of the port change (the kernel may
    # rate-limit its port unreachables)
    assert wire.other == [], wire.other[:10]


def test_tshark_authenticates_every_packet(nat: NatRun) -> None:
    esp, good, bad = nat.get("tshark")
    assert esp == good == nat.get("wire").esp_in_udp and bad == 0


def test_the_daemons_stopped_cleanly(nat: NatRun) -> None:
    assert nat.get("stop_client") == 0 and nat.get("stop_server") == 0

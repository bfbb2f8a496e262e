"""Path MTU and forwarded ESP, end to end in namespace labs (RFC 4301 section 8).

- Host to host: a router on the path (simulated: frames put on the wire below the peer's
  netfilter) reports "fragmentation needed, MTU 1200" about host a's ESP. Host a's worker
  records it on its SAs (status shows it). An application on a then sends datagrams with DF
  of 1,300 and 1,100 bytes: all arrive whole at b; the ESP packets too big for the reported
  path leave with DF cleared (for the path to fragment), the others keep the sender's DF, and
  a's route to b keeps its MTU (telling a's kernel would strand the bigger ESP packet).
- Gateway to gateway: a LAN client sends a 1,500-byte datagram with DF; after ESP it can't
  leave the 1,500-byte wire, so gateway a drops it and tells the client the MTU that fits; a
  datagram of that size arrives at the server. ESP that the client itself sends (a LAN host
  with its own IPsec) is protected like any other packet from the LAN: it arrives at the
  server, and on the wire only the gateways' SPIs show.

Needs root; runs in CI (marks ``lab`` and ``root``).
"""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.ipsec import ESP
from scapy.layers.l2 import Ether
from scapy.utils import rdpcap

from nfq_ipsec_lab.lab.netns import Host
from nfq_ipsec_lab.lab.session import LabSession

PORT = 7301  # a protected UDP port (every port but the lab's bypass and discard ports is)
ROUTER = "10.99.0.254"  # the simulated router that reports the smaller MTU
PATH_MTU = 1200

PROBE_SRC = textwrap.dedent("""
    import errno, json, socket, sys, time
    dst, port, big = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO: DF, no fragments
    s.connect((dst, port))
    out = {"sent": 0, "emsgsize": False}
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            s.send(b"B" * (big - 28))
            out["sent"] += 1
        except OSError as e:
            if e.errno != errno.EMSGSIZE:
                raise
            out["emsgsize"] = True
            break
        time.sleep(0.2)
    out["mtu"] = s.getsockopt(socket.IPPROTO_IP, 14)  # IP_MTU: what the kernel learned
    out["pending"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # the ICMP's, now read
    s.send(b"F" * (out["mtu"] - 28))  # one that fits what it was told
    print(json.dumps(out), flush=True)
""")

SEND_DF_SRC = textwrap.dedent("""
    import json, socket, sys, time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO: DF, no fragments
    s.connect((sys.argv[1], int(sys.argv[2])))
    errors = []
    for size in sys.argv[3:]:
        try:
            s.send(b"D" * (int(size) - 28))
        except OSError as e:
            errors.append(e.errno)
        time.sleep(0.1)
    time.sleep(0.3)
    errors += [e for e in [s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)] if e]
    print(json.dumps({"errors": errors, "mtu": s.getsockopt(socket.IPPROTO_IP, 14)}), flush=True)
""")

RECEIVE_SRC = textwrap.dedent("""
    import json, socket, sys, time
    proto, addr, port, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    if proto == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((addr, port))
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)  # ESP, as a raw IP socket sees it
    s.settimeout(0.2)
    print("ready", flush=True)
    got, end = [], time.time() + seconds
    while time.time() < end:
        try:
            data = s.recv(65535)
        except socket.timeout:
            continue
        got.append(data.hex())
    print(json.dumps(got), flush=True)
""")

ESP_SEND_SRC = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)
    for i in range(5):
        s.sendto(bytes.fromhex(sys.argv[2]), (sys.argv[1], 0))
        time.sleep(0.1)
""")

INJECT_SRC = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((sys.argv[1], 0))
    for frame in sys.argv[2:]:
        s.send(bytes.fromhex(frame))
""")


def _lab(kind: str) -> Iterator[LabSession]:
    with LabSession(kind, "aes-gcm-128", queues=2) as session:
        session.start_daemons()
        try:
            yield session
        finally:
            session.stop_daemons()


@pytest.fixture(scope="module")
def host_lab() -> Iterator[LabSession]:
    yield from _lab("host")


@pytest.fixture(scope="module")
def gateway_lab() -> Iterator[LabSession]:
    yield from _lab("gateway")


def _python(host: Host, src: str, *args: str, timeout: float = 60) -> str:
    return host.run([host.python, "-c", src, *args], timeout=timeout).stdout


def _receiver(session: LabSession, host: Host, proto: str, addr: str, seconds: float) -> Any:
    proc = session.lab.start(f"recv-{proto}", host, [host.python, "-c", RECEIVE_SRC, proto, addr,
                                                    str(PORT), str(seconds)])
    return proc


def _received(proc: Any, timeout: float = 30) -> list[bytes]:
    proc.popen.wait(timeout=timeout)
    lines = [line for line in proc.output().splitlines() if line.startswith("[")]
    assert lines, proc.output()
    return [bytes.fromhex(h) for h in json.loads(lines[-1])]


def _wait_ready(proc: Any) -> None:
    deadline = time.monotonic() + 10
    while "ready" not in proc.output():
        assert time.monotonic() < deadline and proc.popen.poll() is None, proc.output()
        time.sleep(0.05)


def _path_mtu_drops(session: LabSession, peer: str) -> int:
    st = session.daemons[peer].status()
    return sum((w.get("drops") or {}).get("path_mtu", 0) for w in st["workers"])


def _sa_path_mtus(session: LabSession, peer: str) -> list[int | None]:
    st = session.daemons[peer].status()
    return [sa.get("path_mtu") for sa in st["sas"] if sa["direction"] == "out"]


def test_a_router_report_sets_the_path_mtu_and_nothing_is_lost(host_lab: LabSession) -> None:
    lab = host_lab
    topo = lab.topology
    a, b = topo.a, topo.b
    mac_a = a.host.run(["cat", f"/sys/class/net/{a.spec.interface}/address"]).stdout.strip()
    mac_b = b.host.run(["cat", f"/sys/class/net/{b.spec.interface}/address"]).stdout.strip()
    frames = []
    for sa in lab.config.sas:
        if sa.sender != "a":
            continue
        quoted = bytes(IP(src=str(sa.src), dst=str(sa.dst), len=1400, proto=50)
                       / ESP(spi=sa.spi, seq=1))[:28]
        report = IP(src=ROUTER, dst=str(sa.src)) / ICMP(type=3, code=4, nexthopmtu=PATH_MTU) / quoted
        frames.append(bytes(Ether(src=mac_b, dst=mac_a) / report).hex())
    _python(b.host, INJECT_SRC, b.spec.interface, *frames)
    learned = _sa_path_mtus(lab, "a")
    assert learned and all(m == PATH_MTU for m in learned), learned

    cap = lab.capture("host-pmtu")
    recv = _receiver(lab, b.host, "udp", str(b.spec.address), 4)
    _wait_ready(recv)
    out = json.loads(_python(a.host, SEND_DF_SRC, str(b.spec.address), str(PORT),
                             "1300", "1100", "1300", "1100").splitlines()[-1])
    got = _received(recv)
    captured = rdpcap(str(cap.stop()))
    assert out == {"errors": [], "mtu": 1500}, out  # nothing refused, the route left alone
    assert sorted(len(d) for d in got) == [1072, 1072, 1272, 1272]  # every datagram, whole
    esp = [pkt[IP] for pkt in captured if ESP in pkt and pkt[IP].src == str(a.spec.address)]
    big = [p for p in esp if p.len > PATH_MTU]
    small = [p for p in esp if p.len <= PATH_MTU]
    assert len(big) == 2 and all(p.flags == 0 for p in big), [(p.len, p.flags) for p in esp]
    assert len(small) == 2 and all(p.flags == "DF" for p in small), [(p.len, p.flags) for p in esp]
    assert _path_mtu_drops(lab, "a") == 0


def test_a_forwarded_df_packet_too_big_gets_frag_needed(gateway_lab: LabSession) -> None:
    lab = gateway_lab
    topo = lab.topology
    recv = _receiver(lab, topo.server, "udp", topo.server_addr, 15)
    _wait_ready(recv)
    before = _path_mtu_drops(lab, "a")
    out = json.loads(_python(topo.client, PROBE_SRC, topo.server_addr, str(PORT), "1500").splitlines()[-1])
    got = _received(recv)
    assert out["emsgsize"], out
    assert 1400 < out["mtu"] < 1500 - 20, out  # the wire's 1,500 minus the tunnel's overhead
    assert _path_mtu_drops(lab, "a") > before
    assert [len(d) for d in got if d[:1] == b"F"] == [out["mtu"] - 28]
    assert all(d[:1] != b"B" for d in got)


def test_esp_from_a_lan_host_is_protected_not_dropped(gateway_lab: LabSession) -> None:
    lab = gateway_lab
    topo = lab.topology
    inner = bytes(ESP(spi=0x0BADC0DE, seq=1) / (b"lan-esp-canary" * 4))
    cap = lab.capture("lan-esp")
    recv = _receiver(lab, topo.server, "esp", topo.server_addr, 4)
    _wait_ready(recv)
    _python(topo.client, ESP_SEND_SRC, topo.server_addr, inner.hex())
    got = _received(recv)
    path = cap.stop()
    payloads = [IP(d)[IP].payload for d in got]
    assert any(bytes(p) == inner for p in payloads), [bytes(p)[:8].hex() for p in payloads]
    ours = {sa.spi for sa in lab.config.sas}
    outer_spis = {pkt[ESP].spi for pkt in rdpcap(str(path)) if ESP in pkt}  # scapy reads the wire
    assert outer_spis and outer_spis <= ours, outer_spis
    wire = b"".join(bytes(pkt) for pkt in rdpcap(str(path)))
    assert b"lan-esp-canary" not in wire and bytes.fromhex("0badc0de") not in wire


def test_transit_esp_not_for_us_follows_the_policy(gateway_lab: LabSession) -> None:
    """ESP in transit (to a LAN host, not to the gateway) with an SPI that is not ours is not an
    unknown SPI: the inbound SPD decides. From a wire address no policy covers, the default
    (discard) drops it, counted as no_policy, and the LAN host never sees it."""
    lab = gateway_lab
    topo = lab.topology
    a, b = topo.a, topo.b
    mac_a = a.host.run(["cat", f"/sys/class/net/{a.spec.interface}/address"]).stdout.strip()
    mac_b = b.host.run(["cat", f"/sys/class/net/{b.spec.interface}/address"]).stdout.strip()
    before = lab.daemons["a"].status()["kernel_drops"]
    transit = IP(src=str(b.spec.address), dst=topo.client_addr) / ESP(spi=0x0BADF00D, seq=1) / (
        b"transit" * 8)
    recv = _receiver(lab, topo.client, "esp", topo.client_addr, 3)
    _wait_ready(recv)
    _python(b.host, INJECT_SRC, b.spec.interface,
            *[bytes(Ether(src=mac_b, dst=mac_a) / transit).hex()] * 5)
    got = _received(recv)
    after = lab.daemons["a"].status()["kernel_drops"]
    assert got == []
    assert after["no_policy"] - before["no_policy"] >= 5, (before, after)
    assert after["unknown_spi"] == before["unknown_spi"], (before, after)

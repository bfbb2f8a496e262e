"""nfq-ipsec against the Linux kernel's own ESP, the most common IPsec peer.

The peer is Debian's kernel in QEMU (TCG; nfq_ipsec_lab/lab/kernelpeer.py), booted once for
the module, behind a tap in a namespace where nfq-ipsec runs. Each case gives the guest static
SAs (``ip xfrm``) mirrored from the lab's configuration generator, and checks, with the wire
captured: pings both ways, small and large (the kernel sends a big ping without DF whole and
fragments its ESP), and a DF ping from this side that fits the link but not after ESP; a
file of a few MB downloaded by each side from the other over TCP (the kernel offers MSS
1460: without clamping in both directions this side's segments don't fit after ESP), SHA-256
compared; tshark checking every ICV; the two sides' counters agreeing packet for packet
(``nfq-ipsec status --json`` and the guest's ``ip -s xfrm state``); and ``nfq-ipsec decode``
reassembling and decoding the capture. Last, a local socket whose DF packets no longer fit
after ESP learns its path MTU (tunnel mode, to an address behind the guest).

The same checks run over IPv6 (outer and inner addresses IPv6, on the same link beside the
IPv4 pair: the kernel fragments its big ESP packets with a fragment header, which this side
reassembles), and with ESP in UDP (RFC 3948, IPv4: the guest's states ``encap espinudp 4500
4500`` and its encapsulation socket held on port 4500; our SAs ``encapsulation = "udp"``; the
wire must carry ESP in UDP only). Each family and encapsulation in transport and tunnel mode,
with AES-GCM-128 and AES-CBC-128 + HMAC-SHA-256-128, on the one guest booted for the module.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from pathlib import Path

import gate
import pytest

from nfq_ipsec.pcap import ETH_IPV4, ETH_IPV6, read_frames
from nfq_ipsec_lab.lab import labconfig
from nfq_ipsec_lab.lab.daemon import Daemon
from nfq_ipsec_lab.lab.kernelpeer import IP, GuestLink, KernelPeer, UdpEncap, kernel_peer_problems
from nfq_ipsec_lab.lab.labconfig import LabConfig, PeerSpec
from nfq_ipsec_lab.lab.netns import Lab, Netns
from nfq_ipsec_lab.lab.traffic import Capture, ping, tshark_verify

HOST = IPv4Address("10.231.0.1")
GUEST = IPv4Address("10.231.0.2")
HOST6 = IPv6Address("fd00:231::1")  # on the same link, beside the IPv4 pair
GUEST6 = IPv6Address("fd00:231::2")
BEHIND = IPv4Address("10.232.0.2")  # an address of the guest's behind its tunnel end
FILE_SIZE = 3 << 20
HTTP_PORT = 8080
BIG_PING = 3000
CBC = "aes-cbc-128+hmac-sha256-128"
ESP, UDP = 50, 17
NAT_T_PORT = 4500


@dataclass(frozen=True)
class Case:
    family: str  # "v4", "v6", or "udp": IPv4 with ESP in UDP
    mode: str
    encryption: str

    @property
    def id(self) -> str:
        name = f"{self.mode}-{self.encryption.split('+')[0]}"
        return name if self.family == "v4" else f"{self.family}-{name}"

    @property
    def addresses(self) -> tuple[IPv4Address | IPv6Address, IPv4Address | IPv6Address]:
        """(ours, the guest's)."""
        return (HOST6, GUEST6) if self.family == "v6" else (HOST, GUEST)


CASES = [Case(family, mode, enc) for family in ("v4", "v6", "udp")
         for mode, enc in (("transport", "aes-gcm-128"), ("tunnel", CBC), ("transport", CBC),
                           ("tunnel", "aes-gcm-128"))]

SERVE_SRC = r"""
import http.server, sys
class H(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a): pass
import functools, socket
class S(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
handler = functools.partial(H, directory=sys.argv[2])
with S((sys.argv[1], int(sys.argv[3])), handler) as s:
    print("serving", flush=True)
    s.serve_forever()
"""

# A UDP socket with DF (IP_PMTUDISC_DO) sends a datagram that fits its route but not after
# ESP, until the socket's path MTU (IP_MTU) says less.
LEARN_SRC = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER: IP_PMTUDISC_DO
s.connect((sys.argv[1], 9))
mtu = 0
for _ in range(50):
    try:
        s.send(b"m" * 1472)
    except OSError:  # EMSGSIZE: the socket knows the path MTU now
        pass
    mtu = s.getsockopt(socket.IPPROTO_IP, 14)  # IP_MTU
    if mtu < 1500:
        break
    time.sleep(0.1)
print(mtu)
"""

FETCH_SRC = r"""
import hashlib, sys, urllib.request
data = urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).read()
print(len(data), hashlib.sha256(data).hexdigest())
"""


def esp_fragments(pcap: Path, proto: int = ESP) -> Counter[str]:
    """Fragments of ESP packets (``proto`` 17: of ESP in UDP) on the wire, by source address:
    IPv4 fragments, and IPv6 packets whose fixed header is followed by a fragment header."""
    out: Counter[str] = Counter()
    for ethertype, ip in read_frames(pcap):
        if ethertype == ETH_IPV4 and ip[9] == proto and int.from_bytes(ip[6:8], "big") & 0x3FFF:
            out[str(IPv4Address(ip[12:16]))] += 1
        elif ethertype == ETH_IPV6 and len(ip) > 48 and ip[6] == 44 and ip[40] == proto:
            out[str(IPv6Address(ip[8:24]))] += 1
    return out


def outer_protocols(pcap: Path, a: IPv4Address | IPv6Address,
                    b: IPv4Address | IPv6Address) -> Counter[str]:
    """What the packets between ``a`` and ``b`` carry, by their outer header: "esp",
    "udp-4500" (ESP in UDP, either port 4500), "fragment" (IPv4 fragments after the first),
    or the protocol number."""
    out: Counter[str] = Counter()
    pair = {a.packed, b.packed}
    for ethertype, ip in read_frames(pcap):
        if ethertype == ETH_IPV4 and {ip[12:16], ip[16:20]} == pair:
            proto, l4 = ip[9], ip[(ip[0] & 15) * 4:]
            if int.from_bytes(ip[6:8], "big") & 0x1FFF:
                out["fragment"] += 1
            elif proto == UDP and NAT_T_PORT in (int.from_bytes(l4[0:2], "big"),
                                                 int.from_bytes(l4[2:4], "big")):
                out["udp-4500"] += 1
            else:
                out["esp" if proto == ESP else str(proto)] += 1
    return out


def url_host(addr: IPv4Address | IPv6Address) -> str:
    return f"[{addr}]" if addr.version == 6 else str(addr)


@dataclass
class Guest:
    lab: Lab
    ns: Netns
    peer: KernelPeer


@pytest.fixture(scope="module")
def guest() -> Iterator[Guest]:
    gate.require(kernel_peer_problems(), "the kernel peer (QEMU)")
    with Lab(prefix="nfk") as lab:
        ns = lab.netns("a", ipv6=True)
        peer = KernelPeer(lab, ns, GuestLink(HOST, GUEST))
        seconds = peer.start()
        print(f"kernel peer booted in {seconds:.1f} s")
        peer.add_address(HOST6, GUEST6, 64)
        peer.check(f"dd if=/dev/urandom of=/www/guest.bin bs=1024 count={FILE_SIZE >> 10} "
                   "2>/dev/null")
        peer.check(f"httpd -p {HTTP_PORT} -h /www")  # every address, IPv4 and IPv6
        yield Guest(lab, ns, peer)


@dataclass
class Setup:
    guest: Guest
    cfg: LabConfig
    daemon: Daemon
    case: Case


@contextlib.contextmanager
def ipsec(guest: Guest, case: Case,
          theirs: IPv4Network | IPv6Network | None = None) -> Iterator[Setup]:
    """nfq-ipsec here and the guest's xfrm, for one configuration; ``theirs``: what the guest
    protects (its own address, the default, or one behind it in tunnel mode)."""
    lab = guest.lab
    host, addr = case.addresses
    theirs = theirs or ip_network(addr)
    here = PeerSpec("a", guest.peer.tap, host, ip_network(host))
    there = PeerSpec("b", "eth0", addr, theirs)
    udp = case.family == "udp"
    directory = Path(tempfile.mkdtemp(prefix=f"cfg-{case.id}-", dir=lab.workdir))
    cfg = labconfig.plan(here, there, case.encryption, queues=1, mode=case.mode,
                         directory=directory, encapsulation="udp" if udp else "none")
    cfg.peers["a"] = labconfig.write_peer(cfg, here, there, directory / "nfq-ipsec.toml",
                                          directory / "ctl.sock", directory / "state")
    guest.peer.xfrm_setup(cfg.sas, case.mode, encap=UdpEncap(NAT_T_PORT, NAT_T_PORT) if udp else None,
                          protected=(theirs, here.protected))
    daemon = Daemon.of_peer(cfg.peers["a"], guest.ns)
    daemon.start(lab)
    try:
        daemon.wait_ready()
        yield Setup(guest, cfg, daemon, case)
    finally:
        daemon.cleanup()
        guest.peer.xfrm_flush()


@pytest.fixture(params=CASES, ids=[c.id for c in CASES])
def setup(request: pytest.FixtureRequest, guest: Guest) -> Iterator[Setup]:
    with ipsec(guest, request.param) as s:
        yield s


def test_kernel_peer(setup: Setup) -> None:
    g, cfg, case = setup.guest, setup.cfg, setup.case
    peer, ns, lab = g.peer, g.ns, g.lab
    host, addr = case.addresses
    udp = case.family == "udp"
    cap = Capture(lab, ns, peer.tap, lab.workdir / f"wire-{case.id}.pcap")
    cap.start()
    # pings, both ways, small and large
    for size in (64, BIG_PING, 5000):
        mine = ping(ns, str(addr), count=2, wait=5, size=size)
        assert mine.ok, f"ping -s {size} to the kernel peer: {mine.output}"
        theirs = peer.sh(f"ping -c 2 -W 5 -s {size} {host}")
        assert theirs.status == 0 and " 0% packet loss" in theirs.output, theirs.output
    # a local DF packet that fits the interface but not after ESP: never lost (DF cleared,
    # the ESP fragmented), where the kernel would drop it without telling the sender
    # (IPv6: a socket with IPV6_PMTUDISC_DO, which the local kernel never fragments for: the
    # worker sends the ESP packet in fragments itself)
    df = ping(ns, str(addr), count=2, wait=5, size=1500 - (40 if host.version == 6 else 20), df=True)
    assert df.ok, f"a DF ping of 1500 bytes to the kernel peer: {df.output}"
    # TCP both ways: each side downloads the other's file
    served = lab.workdir / "served"
    served.mkdir(exist_ok=True)
    data = os.urandom(FILE_SIZE)
    (served / "host.bin").write_bytes(data)
    server = lab.start("http-host", ns, [ns.python, "-c", SERVE_SRC, str(host), str(served),
                                         str(HTTP_PORT)])
    try:
        deadline = time.monotonic() + 10
        while "serving" not in server.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        out = peer.check(f"wget -q -O /tmp/host.bin http://{url_host(host)}:{HTTP_PORT}/host.bin && "
                         "sha256sum /tmp/host.bin && rm /tmp/host.bin", timeout=180)
        assert out.split()[0] == hashlib.sha256(data).hexdigest()
    finally:
        lab.stop(server)
    res = ns.run([ns.python, "-c", FETCH_SRC, f"http://{url_host(addr)}:{HTTP_PORT}/guest.bin", "120"],
                 timeout=180)
    got, digest = res.stdout.split()
    assert int(got) == FILE_SIZE and digest == peer.sha256("/www/guest.bin")
    pcap = cap.stop()
    ts = tshark_verify(pcap, cfg.sas)
    assert ts.ok and ts.unchecked == 0, ts.summary()
    # the kernel fragmented the ESP of its big pings, and this side reassembled them; over
    # IPv6 in tunnel mode the kernel fragments the inner packet instead, each fragment its own
    # ESP packet (decode shows them below)
    frags = esp_fragments(pcap, UDP if udp else ESP)
    v6_tunnel = case.family == "v6" and case.mode == "tunnel"
    assert frags[str(host)] > 0 and (frags[str(addr)] > 0 or v6_tunnel), frags
    # ESP in UDP, and nothing else, between the two (the pings' ESP fragmented too)
    if udp:
        wire = outer_protocols(pcap, host, addr)
        assert wire["udp-4500"] > 0 and set(wire) <= {"udp-4500", "fragment"}, wire
    # and so does `nfq-ipsec decode` on the capture: every ESP packet whole and good
    decoded = setup.daemon.host.run([*setup.daemon.cmd, "decode", "--config",
                                     str(setup.daemon.config), str(pcap)], check=False, timeout=300)
    assert decoded.returncode == 0, decoded.stdout[-2000:]
    assert "reassembled from" in decoded.stdout and "unknown_spi" not in decoded.stdout
    if v6_tunnel:
        assert f"ICMPv6 {addr} > {host} fragment" in decoded.stdout, decoded.stdout[-2000:]
    # counters, packet for packet
    status = setup.daemon.status()
    theirs_counters = peer.xfrm_counters()
    for sa in cfg.sas:
        ours = Daemon.sa(status, sa.name)
        assert sa.spi in theirs_counters, f"the guest has no state for SPI 0x{sa.spi:x}"
        assert ours["packets"] == theirs_counters[sa.spi].packets, (sa.name, ours,
                                                                   theirs_counters[sa.spi])
    assert status["kernel_drops"] is not None and not any(status["kernel_drops"].values()), \
        status["kernel_drops"]
    for w in status["workers"]:
        assert not any(w["drops"].values()), w["drops"]
    print(ts.summary(), frags, {sa.name: Daemon.sa(status, sa.name)["packets"] for sa in cfg.sas})


def test_a_local_sender_learns_the_path_mtu(guest: Guest) -> None:
    """Tunnel mode to an address behind the kernel peer (not the tunnel's end): a local DF
    packet too big after ESP is dropped (path_mtu) and its socket is told the MTU that fits,
    by a "fragmentation needed" from the worker; the next packet of that size passes."""
    peer, ns = guest.peer, guest.ns
    peer.check(f"{IP} addr replace {BEHIND}/32 dev lo")
    ns.ip("route", "replace", f"{BEHIND}/32", "via", str(GUEST))
    with ipsec(guest, Case("v4", "tunnel", "aes-gcm-128"), IPv4Network(f"{BEHIND}/32")) as setup:
        out_sa = next(sa for sa in setup.cfg.sas if sa.sender == "a")
        learned = int(ns.run([ns.python, "-c", LEARN_SRC, str(BEHIND)]).stdout)
        # 1500 - 20 (outer header) - 8 (ESP header) - 8 (IV) - 2 (trailer) - 16 (ICV): the
        # inner packet and its trailer already 4-byte aligned, no padding
        assert learned == 1446, learned
        assert ping(ns, str(BEHIND), count=2, wait=5, size=learned - 20, df=True).ok
        status = setup.daemon.status()
        drops = status["workers"][0]["drops"]
        assert drops.get("path_mtu", 0) >= 1 and not any(
            n for reason, n in drops.items() if reason != "path_mtu"), drops
        counters = peer.xfrm_counters()
        assert Daemon.sa(status, out_sa.name)["packets"] == counters[out_sa.spi].packets

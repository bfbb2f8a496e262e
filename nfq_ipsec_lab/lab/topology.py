"""The lab topologies, built from network namespaces.

host-to-host (transport mode)::

    [ a: eth1 192.168.56.10/24 ] ====== veth (the wire) ====== [ b: eth1 192.168.56.11/24 ]

gateway-to-gateway (tunnel mode for 10.1.0.0/24 <-> 10.2.0.0/24)::

    client 10.1.0.2 --- lan0 10.1.0.1 [gw a] wan0 192.168.56.10 ====== the wire ======
        192.168.56.11 wan0 [gw b] lan0 10.2.0.1 --- server 10.2.0.2

host-to-host over IPv6 (``host6``, transport mode)::

    [ a: eth1 2001:db8:56::10/64 ] ====== veth (the wire) ====== [ b: eth1 2001:db8:56::11/64 ]

The IPsec peers are ``a`` and ``b``; in the host topology they are also the traffic's client
and server. The capture point is the peer a's end of the wire (``tcpdump -i`` on it sees
every frame after the sender's last hook and before the receiver's first one).

Kernel settings, and why (checked on this kernel with a probe: NetfilterQueue plus the ESP
core in the gateway namespaces, see README "Hooks"):

- gateways: ``net.ipv4.ip_forward=1``.
- gateways: ``net.ipv4.conf.<lan>.accept_local=1``. Forwarded cleartext is queued in mangle
  PREROUTING and comes back as an ESP packet whose *source is the gateway's own WAN address*,
  still "arriving" on the LAN interface. The route lookup after PREROUTING validates the
  source (fib_validate_source) and drops a local source as a martian (``in_martian_src`` in
  /proc/net/stat/rt_cache counts it) unless accept_local is set on that incoming interface (or
  on ``all``). Without it no tunnel-mode packet ever leaves a gateway.
- gateways: the LAN interface must not use strict reverse-path filtering (``rp_filter=1``,
  the default on several distributions): the reverse route to the gateway's own address does
  not point back at the LAN interface, so the same ESP packet fails the strict check. Loose
  mode (2) and off (0) both work; the effective value is max(all, interface), so ``all`` has to
  be lowered too. We set all=0, lan=2 (loose) and wan=1 (strict works there: decrypted inner
  packets arrive on the WAN with sources routed via the WAN).
- hosts: nothing is needed for transport mode; we set rp_filter=1 (strict) to show that.
- everywhere but ``host6``: IPv6 off (see netns.Lab.netns). ``host6`` has IPv6 on (IPv4 is
  unaddressed), its addresses without duplicate address detection (``nodad``: usable at once).
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from .labconfig import PeerSpec
from .netns import Host, Lab

WIRE_NET = "192.168.56.0/24"
HOST_A, HOST_B = "192.168.56.10", "192.168.56.11"
LAN_A, LAN_B = "10.1.0.0/24", "10.2.0.0/24"
GW_LAN_A, GW_LAN_B = "10.1.0.1", "10.2.0.1"
CLIENT, SERVER = "10.1.0.2", "10.2.0.2"
WIRE_NET6 = "2001:db8:56::/64"
HOST6_A, HOST6_B = "2001:db8:56::10", "2001:db8:56::11"

# The sysctls each kind of node gets; the README and the module docstring say why.
GATEWAY_SYSCTLS = (
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv4.conf.all.rp_filter", "0"),
    ("net.ipv4.conf.{lan}.rp_filter", "2"),
    ("net.ipv4.conf.{lan}.accept_local", "1"),
    ("net.ipv4.conf.{wan}.rp_filter", "1"),
)
HOST_SYSCTLS = (
    ("net.ipv4.conf.all.rp_filter", "1"),
)


@dataclass(frozen=True)
class Peer:
    """An IPsec node of the lab: where it runs and what its configuration says about it."""

    spec: PeerSpec
    host: Host

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class Topology:
    kind: str  # "host", "gateway" or "host6"
    a: Peer
    b: Peer
    client: Host  # the traffic source (behind a) and its address
    client_addr: str
    server: Host  # the traffic sink (behind b) and its address
    server_addr: str
    wire_host: Host  # where to capture the wire between a and b
    wire_if: str
    hosts: tuple[Host, ...]  # every namespace, for listings

    @property
    def peers(self) -> tuple[Peer, Peer]:
        return self.a, self.b

    @property
    def mode(self) -> str:
        return "tunnel" if self.kind == "gateway" else "transport"

    @property
    def plen(self) -> int:
        """The prefix length of the wire's addresses."""
        return 64 if self.kind == "host6" else 24

    def describe(self) -> list[str]:
        if self.kind in ("host", "host6"):
            return [
                f"host a  {self.a.host.name}: {self.a.spec.interface} {self.a.spec.address}/{self.plen}",
                f"host b  {self.b.host.name}: {self.b.spec.interface} {self.b.spec.address}/{self.plen}",
                "joined by one veth pair; transport-mode ESP between a and b",
            ]
        return [
            f"client  {self.client.name}: {self.client_addr}/24, default via {GW_LAN_A}",
            f"gw a    {self.a.host.name}: lan0 {GW_LAN_A}/24, wan0 {self.a.spec.address}/24",
            f"gw b    {self.b.host.name}: wan0 {self.b.spec.address}/24, lan0 {GW_LAN_B}/24",
            f"server  {self.server.name}: {self.server_addr}/24, default via {GW_LAN_B}",
            f"tunnel-mode ESP between the gateways for {LAN_A} <-> {LAN_B}",
        ]


def build(lab: Lab, kind: str) -> Topology:
    if kind == "host":
        return host_to_host(lab)
    if kind == "gateway":
        return gateway_to_gateway(lab)
    if kind == "host6":
        return host_to_host6(lab)
    raise ValueError(f"unknown topology {kind!r} (host, gateway or host6)")


def host_to_host(lab: Lab) -> Topology:
    a, b = lab.netns("a"), lab.netns("b")
    lab.veth(a, "eth1", b, "eth1")
    a.addr("eth1", f"{HOST_A}/24")
    b.addr("eth1", f"{HOST_B}/24")
    for ns in (a, b):
        apply_sysctls(ns, HOST_SYSCTLS)
    pa = Peer(PeerSpec("a", "eth1", IPv4Address(HOST_A), IPv4Network(f"{HOST_A}/32"), "host"), a)
    pb = Peer(PeerSpec("b", "eth1", IPv4Address(HOST_B), IPv4Network(f"{HOST_B}/32"), "host"), b)
    return Topology("host", pa, pb, a, HOST_A, b, HOST_B, a, "eth1", (a, b))


def host_to_host6(lab: Lab) -> Topology:
    a, b = lab.netns("a", ipv6=True), lab.netns("b", ipv6=True)
    lab.veth(a, "eth1", b, "eth1")
    a.ip("addr", "add", f"{HOST6_A}/64", "dev", "eth1", "nodad")
    b.ip("addr", "add", f"{HOST6_B}/64", "dev", "eth1", "nodad")
    pa = Peer(PeerSpec("a", "eth1", IPv6Address(HOST6_A), IPv6Network(f"{HOST6_A}/128"), "host"), a)
    pb = Peer(PeerSpec("b", "eth1", IPv6Address(HOST6_B), IPv6Network(f"{HOST6_B}/128"), "host"), b)
    return Topology("host6", pa, pb, a, HOST6_A, b, HOST6_B, a, "eth1", (a, b))


def gateway_to_gateway(lab: Lab) -> Topology:
    client, gwa, gwb, server = lab.netns("c"), lab.netns("gwa"), lab.netns("gwb"), lab.netns("s")
    lab.veth(client, "eth0", gwa, "lan0")
    lab.veth(gwa, "wan0", gwb, "wan0")
    lab.veth(gwb, "lan0", server, "eth0")
    client.addr("eth0", f"{CLIENT}/24")
    gwa.addr("lan0", f"{GW_LAN_A}/24")
    gwa.addr("wan0", f"{HOST_A}/24")
    gwb.addr("wan0", f"{HOST_B}/24")
    gwb.addr("lan0", f"{GW_LAN_B}/24")
    server.addr("eth0", f"{SERVER}/24")
    client.route("default", GW_LAN_A)
    server.route("default", GW_LAN_B)
    gwa.route(LAN_B, HOST_B)
    gwb.route(LAN_A, HOST_A)
    for gw in (gwa, gwb):
        apply_sysctls(gw, GATEWAY_SYSCTLS, lan="lan0", wan="wan0")
    pa = Peer(PeerSpec("a", "wan0", IPv4Address(HOST_A), IPv4Network(LAN_A), "gateway"), gwa)
    pb = Peer(PeerSpec("b", "wan0", IPv4Address(HOST_B), IPv4Network(LAN_B), "gateway"), gwb)
    return Topology("gateway", pa, pb, client, CLIENT, server, SERVER, gwa, "wan0",
                    (client, gwa, gwb, server))


def apply_sysctls(host: Host, settings: tuple[tuple[str, str], ...], **names: str) -> None:
    for key, value in settings:
        host.sysctl(key.format(**names), value)

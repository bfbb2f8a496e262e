"""The lab topologies, built from network namespaces.

host-to-host (transport mode)::

    [ a: eth1 192.168.56.10/24 ] ====== veth (the wire) ====== [ b: eth1 192.168.56.11/24 ]

gateway-to-gateway (tunnel mode for 10.1.0.0/24 <-> 10.2.0.0/24)::

    client 10.1.0.2 --- lan0 10.1.0.1 [gw a] wan0 192.168.56.10 ====== the wire ======
        192.168.56.11 wan0 [gw b] lan0 10.2.0.1 --- server 10.2.0.2

host-to-host over IPv6 (``host6``, transport mode)::

    [ a: eth1 2001:db8:56::10/64 ] ====== veth (the wire) ====== [ b: eth1 2001:db8:56::11/64 ]

gateway-to-gateway over IPv6 (``gateway6``, tunnel mode for 2001:db8:1::/64 <-> 2001:db8:2::/64)::

    client 2001:db8:1::2 --- lan0 2001:db8:1::1 [gw a] wan0 2001:db8:56::10 ====== the wire ======
        2001:db8:56::11 wan0 [gw b] lan0 2001:db8:2::1 --- server 2001:db8:2::2

host-to-host 4-in-6 (``host4in6``, tunnel mode between the hosts' own IPv4 addresses)::

    [ a: eth1 2001:db8:56::10/64, 10.9.0.1/24 ] ====== the wire ====== [ b: eth1 ...::11/64, 10.9.0.2/24 ]

mixed tunnels between gateways, the same four namespaces: ``gateway4in6`` (the IPv4 LANs of ``gateway``, the
IPv6 wire of ``gateway6``) and ``gateway6in4`` (the IPv6 LANs of ``gateway6``, the IPv4 wire of
``gateway``). Each LAN has a route only in its own family: what crosses to the other family
does so only through the daemon.

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
- gateways with an IPv6 LAN: ``net.ipv6.conf.all.forwarding=1``, and nothing else: IPv6 has
  no reverse-path filter and no martian-source check in its input routing, so the ESP packet
  with the gateway's own source "arriving" on the LAN is forwarded as it is. ``forwarding``
  also makes the gateway a router for neighbour discovery (it answers as one on the LAN).
- everywhere but the IPv6 topologies: IPv6 off (see netns.Lab.netns). Where IPv6 is on, its
  addresses skip duplicate address detection (``nodad``: usable at once); an IPv6 topology
  leaves IPv4 unaddressed, and ``gateway6in4`` switches IPv6 off on the wire's interfaces, so
  the wire carries IPv4 only, as ``gateway4in6``'s carries IPv6 only.
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
LAN6_A, LAN6_B = "2001:db8:1::/64", "2001:db8:2::/64"
GW_LAN6_A, GW_LAN6_B = "2001:db8:1::1", "2001:db8:2::1"
CLIENT6, SERVER6 = "2001:db8:1::2", "2001:db8:2::2"
# The gateway topologies by (LAN family, wire family).
GATEWAY_KINDS = {"gateway": (4, 4), "gateway6": (6, 6), "gateway4in6": (4, 6),
                 "gateway6in4": (6, 4)}
HOST4_A, HOST4_B = "10.9.0.1", "10.9.0.2"  # host4in6: the hosts' own IPv4, inside the tunnel
KINDS = ("host", "host6", "host4in6", *GATEWAY_KINDS)

# The sysctls each kind of node gets; the README and the module docstring say why.
GATEWAY_SYSCTLS = (
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv4.conf.all.rp_filter", "0"),
    ("net.ipv4.conf.{lan}.rp_filter", "2"),
    ("net.ipv4.conf.{lan}.accept_local", "1"),
    ("net.ipv4.conf.{wan}.rp_filter", "1"),
)
GATEWAY6_SYSCTLS = (
    ("net.ipv6.conf.all.forwarding", "1"),
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
    kind: str  # one of KINDS
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
        return "tunnel" if self.kind in GATEWAY_KINDS or self.kind == "host4in6" else "transport"

    @property
    def plen(self) -> int:
        """The prefix length of the wire's addresses."""
        return 64 if self.a.spec.address.version == 6 else 24

    def describe(self) -> list[str]:
        if self.kind in ("host", "host6", "host4in6"):
            inner = (f", {self.client_addr} and {self.server_addr} inside a tunnel"
                     if self.kind == "host4in6" else "")
            return [
                f"host a  {self.a.host.name}: {self.a.spec.interface} {self.a.spec.address}/{self.plen}",
                f"host b  {self.b.host.name}: {self.b.spec.interface} {self.b.spec.address}/{self.plen}",
                f"joined by one veth pair; {self.mode}-mode ESP between a and b{inner}",
            ]
        lan6 = self.a.spec.protected.version == 6
        lp = 64 if lan6 else 24
        gw_a, gw_b = (GW_LAN6_A, GW_LAN6_B) if lan6 else (GW_LAN_A, GW_LAN_B)
        return [
            f"client  {self.client.name}: {self.client_addr}/{lp}, default via {gw_a}",
            f"gw a    {self.a.host.name}: lan0 {gw_a}/{lp}, wan0 {self.a.spec.address}/{self.plen}",
            f"gw b    {self.b.host.name}: wan0 {self.b.spec.address}/{self.plen}, lan0 {gw_b}/{lp}",
            f"server  {self.server.name}: {self.server_addr}/{lp}, default via {gw_b}",
            f"tunnel-mode ESP (IPv{self.a.spec.address.version}) between the gateways for "
            f"{self.a.spec.protected} <-> {self.b.spec.protected}",
        ]


def build(lab: Lab, kind: str) -> Topology:
    if kind == "host":
        return host_to_host(lab)
    if kind in GATEWAY_KINDS:
        lan, wire = GATEWAY_KINDS[kind]
        return gateway_to_gateway(lab, kind, lan, wire)
    if kind == "host6":
        return host_to_host6(lab)
    if kind == "host4in6":
        return host_to_host4in6(lab)
    raise ValueError(f"unknown topology {kind!r} ({', '.join(KINDS)})")


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


def host_to_host4in6(lab: Lab) -> Topology:
    """``host6``'s wire, and on it each host's own IPv4 address, which the hosts reach only
    through a 4-in-6 tunnel between their IPv6 addresses (the decrypted packets go to the
    host itself, through lo)."""
    a, b = lab.netns("a", ipv6=True), lab.netns("b", ipv6=True)
    lab.veth(a, "eth1", b, "eth1")
    for ns, six, four in ((a, HOST6_A, HOST4_A), (b, HOST6_B, HOST4_B)):
        ns.ip("addr", "add", f"{six}/64", "dev", "eth1", "nodad")
        ns.addr("eth1", f"{four}/24")
    pa = Peer(PeerSpec("a", "eth1", IPv6Address(HOST6_A), IPv4Network(f"{HOST4_A}/32"), "host"), a)
    pb = Peer(PeerSpec("b", "eth1", IPv6Address(HOST6_B), IPv4Network(f"{HOST4_B}/32"), "host"), b)
    return Topology("host4in6", pa, pb, a, HOST4_A, b, HOST4_B, a, "eth1", (a, b))


def gateway_to_gateway(lab: Lab, kind: str = "gateway", lan: int = 4, wire: int = 4) -> Topology:
    """Two gateways and a host behind each: the LANs of family ``lan``, the wire between the
    gateways of family ``wire`` (both 4: ``gateway``; both 6: ``gateway6``; mixed: 4-in-6 or
    6-in-4, the tunnel's outer family differing from the packets it carries)."""
    v6 = 6 in (lan, wire)
    client, server = lab.netns("c", ipv6=lan == 6), lab.netns("s", ipv6=lan == 6)
    gwa, gwb = lab.netns("gwa", ipv6=v6), lab.netns("gwb", ipv6=v6)
    lab.veth(client, "eth0", gwa, "lan0")
    lab.veth(gwa, "wan0", gwb, "wan0")
    lab.veth(gwb, "lan0", server, "eth0")
    if wire == 4:
        wan_a, wan_b = HOST_A, HOST_B
        gwa.addr("wan0", f"{HOST_A}/24")
        gwb.addr("wan0", f"{HOST_B}/24")
        if v6:  # the wire carries IPv4 only
            for gw in (gwa, gwb):
                gw.sysctl("net.ipv6.conf.wan0.disable_ipv6", 1)
    else:
        wan_a, wan_b = HOST6_A, HOST6_B
        gwa.ip("addr", "add", f"{HOST6_A}/64", "dev", "wan0", "nodad")
        gwb.ip("addr", "add", f"{HOST6_B}/64", "dev", "wan0", "nodad")
    if lan == 4:
        lan_a, lan_b, c_addr, s_addr = LAN_A, LAN_B, CLIENT, SERVER
        client.addr("eth0", f"{CLIENT}/24")
        gwa.addr("lan0", f"{GW_LAN_A}/24")
        gwb.addr("lan0", f"{GW_LAN_B}/24")
        server.addr("eth0", f"{SERVER}/24")
        client.route("default", GW_LAN_A)
        server.route("default", GW_LAN_B)
    else:
        lan_a, lan_b, c_addr, s_addr = LAN6_A, LAN6_B, CLIENT6, SERVER6
        for host, ifname, own in ((client, "eth0", CLIENT6), (gwa, "lan0", GW_LAN6_A),
                                  (gwb, "lan0", GW_LAN6_B), (server, "eth0", SERVER6)):
            host.ip("addr", "add", f"{own}/64", "dev", ifname, "nodad")
        client.ip("-6", "route", "add", "default", "via", GW_LAN6_A)
        server.ip("-6", "route", "add", "default", "via", GW_LAN6_B)
    if lan == wire:  # a mixed tunnel has no route in the LANs' family across the wire
        gwa.route(lan_b, wan_b)
        gwb.route(lan_a, wan_a)
    for gw in (gwa, gwb):
        if lan == 4:
            apply_sysctls(gw, GATEWAY_SYSCTLS, lan="lan0", wan="wan0")
        else:
            apply_sysctls(gw, GATEWAY6_SYSCTLS)
    net: type[IPv4Network] | type[IPv6Network] = IPv4Network if lan == 4 else IPv6Network
    addr: type[IPv4Address] | type[IPv6Address] = IPv4Address if wire == 4 else IPv6Address
    pa = Peer(PeerSpec("a", "wan0", addr(wan_a), net(lan_a), "gateway"), gwa)
    pb = Peer(PeerSpec("b", "wan0", addr(wan_b), net(lan_b), "gateway"), gwb)
    return Topology(kind, pa, pb, client, c_addr, server, s_addr, gwa, "wan0",
                    (client, gwa, gwb, server))


def apply_sysctls(host: Host, settings: tuple[tuple[str, str], ...], **names: str) -> None:
    for key, value in settings:
        host.sysctl(key.format(**names), value)

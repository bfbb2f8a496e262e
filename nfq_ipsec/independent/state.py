"""The databases of RFC 4301 section 4.4: the security policies and the security
associations with their live state (sequence counter, replay window, lifetime, UDP peer).

Built from the configuration model's policies and SA parameters, which are read by their
attributes (names and enum values) into this package's own plain records, so nothing of
the other implementation comes along.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, Final

from .crypto import Transform
from .ipwire import ICMP, ICMPV6, Address, Flow, Refused
from .window import Window

V6_MARK: Final = 1 << 128  # how the configuration model marks an IPv6 address int
NAT_T: Final = 4500

Network = IPv4Network | IPv6Network


def address(value: int | None) -> Address | None:
    if value is None:
        return None
    if value >= V6_MARK:
        return IPv6Address(value - V6_MARK)
    return IPv4Address(value)


# -- policies -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One SPD entry, from this host's point of view (local and remote)."""

    name: str
    action: str  # "protect", "bypass" or "discard"
    direction: str  # "out", "in" or "both"
    local: Network
    remote: Network
    protocol: int | None
    local_ports: tuple[int, int] | None
    remote_ports: tuple[int, int] | None
    icmp_type: int | None
    icmp_code: int | None
    sa_names: tuple[str, ...]

    @classmethod
    def of(cls, policy: Any) -> Rule:
        s = policy.selector
        return cls(policy.name, policy.action.value, policy.direction.value, s.local, s.remote,
                   s.protocol, s.local_ports, s.remote_ports, s.icmp_type, s.icmp_code,
                   tuple(policy.sa_names))

    def covers(self, flow: Flow, outbound: bool) -> bool:
        """RFC 4301 4.4.1.1: does the packet's flow fall under this rule's selector? Outbound
        the packet's source is local; inbound its destination. For ICMP the selector's type
        and code take the place of ports."""
        if flow.src.version != self.local.version:
            return False
        local, remote = (flow.src, flow.dst) if outbound else (flow.dst, flow.src)
        lport, rport = (flow.sport, flow.dport) if outbound else (flow.dport, flow.sport)
        if local not in self.local or remote not in self.remote:
            return False
        if self.protocol is not None:
            if flow.protocol != self.protocol:
                return False
            if self.protocol in (ICMP, ICMPV6):
                return ((self.icmp_type is None or flow.sport == self.icmp_type)
                        and (self.icmp_code is None or flow.dport == self.icmp_code))
        return _within(lport, self.local_ports) and _within(rport, self.remote_ports)


def _within(port: int | None, span: tuple[int, int] | None) -> bool:
    return span is None or (port is not None and span[0] <= port <= span[1])


def first_match(rules: list[Rule], flow: Flow, outbound: bool) -> Rule | None:
    """The SPD's answer: the first rule in order whose direction and selector cover the flow."""
    for rule in rules:
        if rule.direction in ("both", "out" if outbound else "in") and rule.covers(flow, outbound):
            return rule
    return None


# -- security associations ----------------------------------------------------------------


@dataclass
class UdpPeer:
    """ESP in UDP (RFC 3948): this SA's port, its peer's port and address (None: any, an
    inbound transport SA), whether an inbound SA follows a peer that moved, and the
    NAT-keepalive interval of an outbound one."""

    port: int
    peer_port: int
    peer: Address | None
    follow: bool
    keepalive: float
    local: Address | None = None
    last_sent: float = 0.0


@dataclass
class Limits:
    soft_packets: int | None = None
    hard_packets: int | None = None
    soft_bytes: int | None = None
    hard_bytes: int | None = None
    soft_seconds: float | None = None
    hard_seconds: float | None = None


@dataclass
class Association:
    """One SA and its state. Outbound: ``next_seq``; inbound: ``window``."""

    name: str
    spi: int
    outbound: bool
    tunnel: bool
    esn: bool
    transform: Transform
    window: Window
    limits: Limits
    installed: float
    local: Address | None = None  # tunnel endpoints
    remote: Address | None = None
    df: str = "copy"
    ttl: int = 64
    udp: UdpPeer | None = None
    next_seq: int = 1
    pmtu: int = 0  # outbound: the path MTU learned (0: none), and when (RFC 4301 8.2)
    pmtu_at: float = 0.0
    packets: int = 0
    octets: int = 0
    soft_expired: bool = False
    hard_expired: bool = False
    events: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, params: Any, now: float) -> Association:
        outbound = params.direction.value == "out"
        udp = None
        if params.encapsulation.value == "udp":
            mine, theirs = params.udp_source_port, params.udp_destination_port
            if not outbound:
                mine, theirs = theirs, mine
            udp = UdpPeer(mine, theirs, address(params.tunnel_remote),
                          params.peer_change.value == "follow", params.keepalive,
                          address(params.tunnel_local))
        lt = params.lifetime
        return cls(
            params.name, params.spi, outbound, params.mode.value == "tunnel", params.esn,
            Transform(params.encryption, params.key.reveal(), params.integrity,
                      params.integrity_key.reveal()),
            Window(params.replay_window, params.esn),
            Limits(lt.soft_packets, lt.hard_packets, lt.soft_bytes, lt.hard_bytes,
                   lt.soft_seconds, lt.hard_seconds),
            now, address(params.tunnel_local), address(params.tunnel_remote), params.df.value,
            params.ttl, udp,
        )

    @property
    def max_overhead(self) -> int:
        """The most bytes ESP adds to a packet on this SA (the padding at its longest)."""
        t = self.transform
        outer = (40 if isinstance(self.remote, IPv6Address) else 20) if self.tunnel else 0
        return 8 + t.iv_len + t.icv_len + 2 + t.align - 1 + outer + (8 if self.udp else 0)

    @property
    def max_seq(self) -> int:
        return (1 << 64) - 1 if self.esn else (1 << 32) - 1

    def take_seq(self) -> int:
        """RFC 4303 3.3.3: the next number; the counter never cycles."""
        seq = self.next_seq
        if seq > self.max_seq:
            if "seq_exhausted" not in self.events:
                self.events.append("seq_exhausted")
            raise Refused("seq_exhausted", f"SA {self.name}")
        self.next_seq = seq + 1
        return seq

    def check_lifetime(self, now: float) -> None:
        """RFC 4301 4.4.2.1: past a hard limit the SA is dead; a soft limit is noted once."""
        lim = self.limits
        age = now - self.installed
        if not self.hard_expired and (_reached(self.packets, lim.hard_packets)
                                      or _reached(self.octets, lim.hard_bytes)
                                      or _reached(age, lim.hard_seconds)):
            self.hard_expired = True
            self.events.append("hard_expired")
        if self.hard_expired:
            raise Refused("sa_expired", f"SA {self.name}")
        if not self.soft_expired and (_reached(self.packets, lim.soft_packets)
                                      or _reached(self.octets, lim.soft_bytes)
                                      or _reached(age, lim.soft_seconds)):
            self.soft_expired = True
            self.events.append("soft_expired")

    def count(self, octets: int) -> None:
        self.packets += 1
        self.octets += octets

    def __repr__(self) -> str:
        return f"<Association {self.name} spi=0x{self.spi:08x} {'out' if self.outbound else 'in'}>"


def _reached(value: float, limit: float | None) -> bool:
    return limit is not None and value >= limit


class Databases:
    """The SPD (rules in order) and the SAD (by name, inbound by SPI, outbound by rule)."""

    def __init__(self, policies: Any, sas: Any, now: float) -> None:
        self.rules = [Rule.of(p) for p in policies]
        self.by_name: dict[str, Association] = {}
        self.inbound: dict[int, Association] = {}
        for params in sas:
            sa = Association.of(params, now)
            if sa.name in self.by_name:
                raise ValueError(f"duplicate SA name {sa.name!r}")
            if not sa.outbound and sa.spi in self.inbound:
                raise ValueError(f"duplicate inbound SPI 0x{sa.spi:08x}")
            self.by_name[sa.name] = sa
            if not sa.outbound:
                self.inbound[sa.spi] = sa

    def rule_of(self, sa: Association) -> Rule | None:
        """The first protect rule that lists the SA."""
        for rule in self.rules:
            if rule.action == "protect" and sa.name in rule.sa_names:
                return rule
        return None

    def outbound_sa(self, rule: Rule) -> Association | None:
        """The first SA the rule lists that this compartment holds and that is outbound."""
        for name in rule.sa_names:
            sa = self.by_name.get(name)
            if sa is not None and sa.outbound:
                return sa
        return None

    def udp_ports(self) -> set[int]:
        return {sa.udp.port for sa in self.inbound.values() if sa.udp is not None}

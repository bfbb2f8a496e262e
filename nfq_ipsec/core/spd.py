"""Security Policy Database (RFC 4301 section 4.4.1): ordered policies, first match wins.

Selectors are written from this host's point of view (local/remote). Outbound packets are
matched with source=local, destination=remote; inbound packets the other way round.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from ipaddress import IPv4Network

from .packet import PacketKey

PROTO_ICMP = 1


class Action(enum.Enum):
    PROTECT = "protect"
    BYPASS = "bypass"
    DISCARD = "discard"


class Direction(enum.Enum):
    OUT = "out"
    IN = "in"
    BOTH = "both"

    def covers(self, outbound: bool) -> bool:
        if self is Direction.BOTH:
            return True
        return (self is Direction.OUT) == outbound


PortRange = tuple[int, int]
ANY = IPv4Network("0.0.0.0/0")


@dataclass(frozen=True)
class Selector:
    """Traffic selector. ``None`` means "any" for every field."""

    local: IPv4Network = ANY
    remote: IPv4Network = ANY
    protocol: int | None = None
    local_ports: PortRange | None = None
    remote_ports: PortRange | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None

    # Precomputed integer forms so matching never builds address objects per packet.
    _lnet: int = field(init=False, repr=False, compare=False)
    _lmask: int = field(init=False, repr=False, compare=False)
    _rnet: int = field(init=False, repr=False, compare=False)
    _rmask: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_lnet", int(self.local.network_address))
        object.__setattr__(self, "_lmask", int(self.local.netmask))
        object.__setattr__(self, "_rnet", int(self.remote.network_address))
        object.__setattr__(self, "_rmask", int(self.remote.netmask))

    def matches(self, key: PacketKey, outbound: bool) -> bool:
        if outbound:
            local_addr, remote_addr = key.src, key.dst
            local_port, remote_port = key.sport, key.dport
        else:
            local_addr, remote_addr = key.dst, key.src
            local_port, remote_port = key.dport, key.sport
        if (local_addr & self._lmask) != self._lnet or (remote_addr & self._rmask) != self._rnet:
            return False
        if self.protocol is not None:
            if key.protocol != self.protocol:
                return False
            if self.protocol == PROTO_ICMP:
                # For ICMP the "ports" of a PacketKey carry type and code.
                if self.icmp_type is not None and key.sport != self.icmp_type:
                    return False
                return self.icmp_code is None or key.dport == self.icmp_code
        if self.local_ports is not None and not _in_range(local_port, self.local_ports):
            return False
        return self.remote_ports is None or _in_range(remote_port, self.remote_ports)

    def describe(self) -> str:
        parts = [f"{self.local} <-> {self.remote}"]
        if self.protocol is not None:
            parts.append(f"proto {self.protocol}")
        if self.local_ports is not None:
            parts.append(f"lport {_fmt_range(self.local_ports)}")
        if self.remote_ports is not None:
            parts.append(f"rport {_fmt_range(self.remote_ports)}")
        if self.icmp_type is not None:
            parts.append(f"icmp-type {self.icmp_type}")
        if self.icmp_code is not None:
            parts.append(f"icmp-code {self.icmp_code}")
        return " ".join(parts)


def _in_range(port: int | None, rng: PortRange) -> bool:
    return port is not None and rng[0] <= port <= rng[1]


def _fmt_range(rng: PortRange) -> str:
    return str(rng[0]) if rng[0] == rng[1] else f"{rng[0]}-{rng[1]}"


@dataclass(frozen=True)
class Policy:
    """One SPD entry. ``sa_names`` lists the SAs a PROTECT policy uses (several: RFC 9611)."""

    name: str
    selector: Selector
    action: Action
    direction: Direction = Direction.BOTH
    sa_names: tuple[str, ...] = ()


class SPD:
    """Ordered policy list with separate outbound and inbound views; first match wins."""

    def __init__(self, policies: list[Policy]) -> None:
        self.policies = tuple(policies)
        self._out = tuple(p for p in self.policies if p.direction.covers(True))
        self._in = tuple(p for p in self.policies if p.direction.covers(False))

    def lookup(self, key: PacketKey, outbound: bool) -> Policy | None:
        """The first policy whose selector matches, or None (which means discard)."""
        for policy in self._out if outbound else self._in:
            if policy.selector.matches(key, outbound):
                return policy
        return None

    def __len__(self) -> int:
        return len(self.policies)

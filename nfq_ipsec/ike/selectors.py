"""Traffic selectors (RFC 7296 section 2.9): from prefixes, contained in, and narrowed.

A selector is an address range, an IP protocol (0: any) and a port range, all inclusive.
Addresses are compared as big-endian bytes of one length, so byte order is numeric order.
"""

from __future__ import annotations

import ipaddress

from .message import TrafficSelector, TsType

ANY_PORTS = (0, 65535)


def from_prefix(prefix: str, protocol: int = 0, ports: tuple[int, int] = ANY_PORTS) -> TrafficSelector:
    net = ipaddress.ip_network(prefix, strict=False)
    kind = TsType.IPV4_ADDR_RANGE if net.version == 4 else TsType.IPV6_ADDR_RANGE
    return TrafficSelector(kind, protocol, ports[0], ports[1], net.network_address.packed,
                           net.broadcast_address.packed)


def contains(outer: TrafficSelector, inner: TrafficSelector) -> bool:
    """Every packet ``inner`` selects, ``outer`` selects too."""
    return (outer.ts_type == inner.ts_type
            and outer.ip_protocol in (0, inner.ip_protocol)
            and outer.start_port <= inner.start_port and inner.end_port <= outer.end_port
            and outer.start <= inner.start and inner.end <= outer.end)


def all_within(offered: tuple[TrafficSelector, ...], allowed: tuple[TrafficSelector, ...]) -> bool:
    """Each selector of ``offered`` lies inside one of ``allowed``."""
    return bool(offered) and all(any(contains(a, o) for a in allowed) for o in offered)


def narrow(offered: tuple[TrafficSelector, ...],
           ours: tuple[TrafficSelector, ...]) -> tuple[TrafficSelector, ...]:
    """The responder's narrowing (section 2.9): the parts of ``ours`` that the peer offered,
    that is, each of our selectors that one offered selector contains. Empty: nothing in
    common (TS_UNACCEPTABLE). Partial overlaps are not cut into pieces: a selector of ours is
    kept whole or not at all."""
    return tuple(s for s in ours if any(contains(o, s) for o in offered))


def describe(ts: TrafficSelector) -> str:
    lo, hi = ipaddress.ip_address(ts.start), ipaddress.ip_address(ts.end)
    proto = f" proto {ts.ip_protocol}" if ts.ip_protocol else ""
    ports = f" ports {ts.start_port}-{ts.end_port}" if (ts.start_port, ts.end_port) != ANY_PORTS else ""
    return f"{lo}-{hi}{proto}{ports}"

"""Security Policy Database (RFC 4301 section 4.4.1): ordered policies, first match wins.

Selectors are written from this host's point of view (local/remote). Outbound packets are
matched with source=local, destination=remote; inbound packets the other way round.

Lookup cost does not grow with the number of policies in the shapes SPDs have (many protect
policies for distinct local/remote prefixes, a few broad bypass/discard rules), while the
answer stays exactly the first match in list order. Each direction view (OUT, IN) is built
once, in ``__init__`` (an SPD never changes), in one of two forms:

* Tuple-space index (views of more than ``LINEAR_SCAN_MAX`` policies). Policies are grouped by
  their pair of netmasks (local, remote); in a group, a dict maps the pair of networks, packed
  as ``local << 32 | remote`` (IPv6: ``local << 129 | remote``), to that bucket's policies in
  list order. A lookup packs the key's addresses the same way once, masks them with each
  group's two masks in one ``&`` and scans only the bucket found. Groups are visited in the
  order of their earliest policy, and the search stops at the first group whose earliest
  policy comes after the best match so far
  (and a bucket scan at the first entry after it), so the first match in the list still wins.
  The cost is a dict probe per group visited plus a short bucket: SPDs have a handful of
  prefix-length pairs however many policies they hold. Policies with the same two prefixes
  (say many port rules for one pair of hosts) remain a scan within their bucket, and a view
  with more than half as many prefix-length pairs as policies is not indexed at all, since a
  probe per group would cost more than the scan.
* Linear scan (smaller views, including the common one to three policies): a few policies are
  cheaper to scan than even two dict probes. ``LINEAR_SCAN_MAX`` is where the two cost the same
  on CPython (``python -m nfq_ipsec_lab.bench.spdscale --crossover`` measures it).

Either way a selector is compiled into plain ints (masks and networks; protocol, -1 for any;
two ranges over the key's sport and dport for that view: ports, or ICMP type and code) checked
inline, without a :meth:`Selector.matches` call per policy, which was most of the cost of the
old scan; a selector of addresses only, the usual protect policy, has no ranges to check. An
absent key port (non-first fragment, truncated header) becomes -1, which a selector's range
never holds and "any" does. The compiled check is exactly :meth:`Selector.matches` for keys as
:func:`~nfq_ipsec.core.packet.packet_key` makes them (32-bit addresses, ports None or
0..65535) and :func:`~nfq_ipsec.core.ipv6.packet_key6` (addresses with the marker bit
``ipv6.V6``); tests/unit/test_spd_index.py compares the lookup with a first-match scan over
:meth:`Selector.matches` on random policy lists.

A policy has one address family, that of its selector's networks. Each family has its own
views: an IPv4 key is looked up among IPv4 policies only, an IPv6 key (its addresses carry
``ipv6.V6``) among IPv6 ones. :meth:`Selector.matches` keeps the families apart too: an IPv6
selector's networks and masks hold the marker bit, which no IPv4 address has; an IPv6 key is
checked with :meth:`Selector.matches6`, which refuses IPv4 selectors first.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Final

from .ipv6 import NH_ICMPV6, V6
from .packet import PacketKey
from .pickling import reduce_dataclass

PROTO_ICMP: Final = 1


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
ANY6 = IPv6Network("::/0")
Network = IPv4Network | IPv6Network


@dataclass(frozen=True)
class Selector:
    """Traffic selector. ``None`` means "any" for every field. ``local`` and ``remote`` are of
    one family; for IPv6, ``protocol`` is the last next header and ICMP means ICMPv6 (58)."""

    local: Network = ANY
    remote: Network = ANY
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
        if self.local.version != self.remote.version:
            raise ValueError(f"one address family per selector: {self.local}, {self.remote}")
        mark = V6 if self.local.version == 6 else 0
        object.__setattr__(self, "_lnet", int(self.local.network_address) | mark)
        object.__setattr__(self, "_lmask", int(self.local.netmask) | mark)
        object.__setattr__(self, "_rnet", int(self.remote.network_address) | mark)
        object.__setattr__(self, "_rmask", int(self.remote.netmask) | mark)

    @property
    def v6(self) -> bool:
        return self.local.version == 6

    def matches6(self, key: PacketKey, outbound: bool) -> bool:
        """:meth:`matches` for an IPv6 key (an IPv4 selector's masks can't tell it apart)."""
        return self.local.version == 6 and self.matches(key, outbound)

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
            if self.protocol == PROTO_ICMP or self.protocol == NH_ICMPV6:
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

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return reduce_dataclass(self)


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

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return reduce_dataclass(self)


# A direction view of at most this many policies is scanned, a larger one indexed. Measured on
# CPython 3.11 (nfq_ipsec_lab.bench.spdscale --crossover): with six policies, a hit on the last or
# a miss costs the scan about what the index costs (two groups), a hit on the first half as much.
LINEAR_SCAN_MAX: Final = 6

_NO_PORT: Final = -1  # a key's absent port; no selector range holds it, the "any" range does
_ANY_RANGE: Final = (_NO_PORT, 0xFFFF)  # 0xFFFF: the largest port, ICMP type or code a PacketKey carries
_ANY_PROTO: Final = -1
_NO_MATCH: Final = 1 << 62  # a position after every policy
_V4_TOP: Final = 0xFFFFFFFF  # above it, an address is IPv6 (it has the marker bit)
_SHIFT6: Final = 129  # an IPv6 address's width with its marker bit

# (protocol or -1, sport low, sport high, dport low, dport high), in the key's port order; None
# when the selector is addresses only (the common protect policy), so the lookup can skip it.
_Rest = tuple[int, int, int, int, int]
# Linear scan: local mask, local network, remote mask, remote network, rest, policy.
_LinearEntry = tuple[int, int, int, int, _Rest | None, Policy]
# Index bucket: position in the SPD, rest, policy.
_BucketEntry = tuple[int, _Rest | None, Policy]
# Index group: earliest position in it, the group's netmasks as one 64-bit mask over
# local << 32 | remote (IPv6: << 129), and the ``get`` of its dict from masked addresses to bucket.
_Group = tuple[int, int, Callable[[int], tuple[_BucketEntry, ...] | None]]


def _exact(value: int | None) -> tuple[int, int]:
    if value is None:
        return _ANY_RANGE
    return (value, value) if value >= 0 else (1, 0)  # a negative value matches no key


def _span(rng: PortRange | None) -> tuple[int, int]:
    if rng is None:
        return _ANY_RANGE
    return max(rng[0], 0), rng[1]  # a low end of 0 or more keeps absent ports (-1) out


def _compile_rest(sel: Selector, outbound: bool) -> _Rest | None:
    """Everything but the addresses of ``sel.matches(key, outbound)``, as ranges over key fields.

    For ICMP the key's sport/dport are type and code in either direction; for everything else
    they are the local ports outbound and the remote ports inbound.
    """
    if sel.protocol is not None and sel.protocol < 0:
        return _ANY_PROTO, 1, 0, 1, 0  # a negative protocol matches no key: empty port ranges
    proto = _ANY_PROTO if sel.protocol is None else sel.protocol
    if sel.protocol == PROTO_ICMP or sel.protocol == NH_ICMPV6:
        sport, dport = _exact(sel.icmp_type), _exact(sel.icmp_code)
    elif outbound:
        sport, dport = _span(sel.local_ports), _span(sel.remote_ports)
    else:
        sport, dport = _span(sel.remote_ports), _span(sel.local_ports)
    if proto == _ANY_PROTO and sport == _ANY_RANGE and dport == _ANY_RANGE:
        return None
    return proto, sport[0], sport[1], dport[0], dport[1]


def _indexed(policies: int, mask_pairs: int) -> bool:
    """Whether a view of ``policies`` in ``mask_pairs`` (local, remote) netmask groups is indexed."""
    return policies > LINEAR_SCAN_MAX and 2 * mask_pairs <= policies


def _build_view(
    view: list[tuple[int, Policy]], outbound: bool, index: bool | None, shift: int = 32,
) -> tuple[tuple[_LinearEntry, ...], tuple[_Group, ...]]:
    """The linear entries or the index groups of one direction view (the other one is empty);
    ``shift``: how far the local address moves left to pack an address pair (its width)."""
    if index is None:
        index = _indexed(len(view), len({(p.selector._lmask, p.selector._rmask) for _, p in view}))
    if not index:
        linear = tuple(
            (p.selector._lmask, p.selector._lnet, p.selector._rmask, p.selector._rnet,
             _compile_rest(p.selector, outbound), p)
            for _, p in view
        )
        return linear, ()
    tables: dict[tuple[int, int], dict[int, list[_BucketEntry]]] = {}
    for pos, p in view:
        sel = p.selector
        table = tables.setdefault((sel._lmask, sel._rmask), {})
        table.setdefault(sel._lnet << shift | sel._rnet, []).append(
            (pos, _compile_rest(sel, outbound), p))
    groups: list[_Group] = []
    for (lmask, rmask), table in tables.items():
        buckets = {nets: tuple(entries) for nets, entries in table.items()}
        first = min(entries[0][0] for entries in buckets.values())
        groups.append((first, lmask << shift | rmask, buckets.get))
    groups.sort(key=lambda g: g[0])
    return (), tuple(groups)


class SPD:
    """Ordered policy list with separate outbound and inbound views; first match wins."""

    def __init__(self, policies: list[Policy], index: bool | None = None) -> None:
        """``index``: None chooses scan or index per view by its size (``_indexed``); True or
        False forces one (tests and the lookup benchmark compare them)."""
        self.policies = tuple(policies)
        v4 = [(i, p) for i, p in enumerate(self.policies) if not p.selector.v6]
        v6 = [(i, p) for i, p in enumerate(self.policies) if p.selector.v6]
        self._out_linear, self._out_groups = _build_view(
            [(i, p) for i, p in v4 if p.direction.covers(True)], True, index)
        self._in_linear, self._in_groups = _build_view(
            [(i, p) for i, p in v4 if p.direction.covers(False)], False, index)
        self._out6_linear, self._out6_groups = _build_view(
            [(i, p) for i, p in v6 if p.direction.covers(True)], True, index, _SHIFT6)
        self._in6_linear, self._in6_groups = _build_view(
            [(i, p) for i, p in v6 if p.direction.covers(False)], False, index, _SHIFT6)

    def lookup(self, key: PacketKey, outbound: bool) -> Policy | None:
        """The first policy whose selector matches, or None (which means discard)."""
        # The per-packet path: locals, no call per policy. A view is either
        # scanned (``linear``) or indexed (``groups``); the other of the two is empty.
        shift = 32
        if outbound:
            local = key.src
            remote = key.dst
            linear = self._out_linear
            groups = self._out_groups
            if local > _V4_TOP:
                linear = self._out6_linear
                groups = self._out6_groups
                shift = _SHIFT6
        else:
            local = key.dst
            remote = key.src
            linear = self._in_linear
            groups = self._in_groups
            if local > _V4_TOP:
                linear = self._in6_linear
                groups = self._in6_groups
                shift = _SHIFT6
        for lmask, lnet, rmask, rnet, rest, policy in linear:
            if local & lmask == lnet and remote & rmask == rnet:
                if rest is None:
                    return policy
                proto, slo, shi, dlo, dhi = rest
                if proto >= 0 and proto != key.protocol:
                    continue
                sport = key.sport
                dport = key.dport
                if (slo <= (_NO_PORT if sport is None else sport) <= shi
                        and dlo <= (_NO_PORT if dport is None else dport) <= dhi):
                    return policy
        if not groups:
            return None
        best: Policy | None = None
        best_pos = _NO_MATCH
        addrs = local << shift | remote
        for first, mask, get in groups:
            if first > best_pos:
                break  # groups come in order of their first policy: no later one can win
            bucket = get(addrs & mask)
            if bucket is None:
                continue
            for pos, rest, policy in bucket:
                if pos > best_pos:
                    break
                if rest is not None:
                    proto, slo, shi, dlo, dhi = rest
                    if proto >= 0 and proto != key.protocol:
                        continue
                    sport = key.sport
                    dport = key.dport
                    if not (slo <= (_NO_PORT if sport is None else sport) <= shi
                            and dlo <= (_NO_PORT if dport is None else dport) <= dhi):
                        continue
                best = policy
                best_pos = pos
                break
        return best

    def __len__(self) -> int:
        return len(self.policies)

"""Security Policy Database (RFC 4301 section 4.4.1): ordered policies, first match wins.

Selectors are written from this host's point of view (local/remote). Outbound packets are
matched with source=local, destination=remote; inbound packets the other way round.

Lookup cost does not grow with the number of policies in the shapes SPDs have (many protect
policies for distinct local/remote prefixes, a few broad bypass/discard rules), while the
result stays exactly the first match in list order. Each direction view (OUT, IN) is built
once, since an SPD never changes, in one of two forms:

* Tuple-space index (views of more than ``LINEAR_SCAN_MAX`` policies). Policies are grouped by
  the pair (local netmask, remote netmask); a group is a dict from (local network, remote
  network) to that bucket's policies in list order. A lookup masks the key's addresses with
  each group's masks and scans only the one bucket that can match. Groups are visited in the
  order of their earliest policy and the search stops at the first group whose earliest policy
  comes after the best match found so far, so that the first match still wins across groups.
  The cost is one dict probe per group visited plus the bucket; SPDs have a handful of
  prefix-length pairs however many policies they hold. Policies sharing the same pair of
  prefixes (e.g. many port rules for one host pair) stay a linear scan inside their bucket.
  A view with many distinct prefix-length pairs (more than half as many as policies) gets no
  index, since probing nearly one group per policy costs more than scanning them.
* Linear scan (small views: the common one to three policies). With a handful of policies a
  scan is cheaper than hashing a key per group; ``LINEAR_SCAN_MAX`` is where the two cross
  on CPython (``python -m nfq_ipsec.bench.spdscale`` measures both).

Either way a selector is compiled into plain ints (masks, networks, protocol or -1 for any,
and two ranges in the key's sport/dport order for that view: ports, or ICMP type and code) and
checked inline, without calling :meth:`Selector.matches` per policy: a Python call per policy
was most of the cost of a lookup. Absent key ports (non-first fragments, truncated headers)
become -1, which a selector range never contains and the "any" range does. The compiled check
is exactly :meth:`Selector.matches` for keys whose ports are ``None`` or 0..65535, which is
what :func:`~nfq_ipsec.core.packet.packet_key` produces; tests/test_spd_index.py compares the
two on random policy lists.
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


# A lookup scans linearly when a direction view has at most this many policies, and uses the
# tuple-space index above it: where the two cross on CPython 3.11 (nfq_ipsec.bench.spdscale
# --crossover measures it).
LINEAR_SCAN_MAX = 6

_NO_PORT = -1  # a key's absent port; no selector range holds it, the "any" range does
_ANY_RANGE = (_NO_PORT, 0xFFFF)  # 0xFFFF: the largest port, ICMP type or code a PacketKey carries
_ANY_PROTO = -1
_NO_MATCH = 1 << 62  # a position after every policy

# (protocol or -1, sport low, sport high, dport low, dport high), in the key's port order; None
# when the selector is addresses only (the common protect policy), so the lookup can skip it.
_Rest = tuple[int, int, int, int, int]
# Linear scan: local mask, local network, remote mask, remote network, rest, policy.
_LinearEntry = tuple[int, int, int, int, _Rest | None, Policy]
# Index bucket: position in the SPD, rest, policy.
_BucketEntry = tuple[int, _Rest | None, Policy]
# Index group: earliest position in it, local mask, remote mask, buckets by masked addresses.
_Group = tuple[int, int, int, dict[int, tuple[_BucketEntry, ...]]]


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
    if sel.protocol == PROTO_ICMP:
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
    view: list[tuple[int, Policy]], outbound: bool,
) -> tuple[tuple[_LinearEntry, ...], tuple[_Group, ...]]:
    """The linear entries or the index groups of one direction view (the other one is empty)."""
    if not _indexed(len(view), len({(p.selector._lmask, p.selector._rmask) for _, p in view})):
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
        table.setdefault(sel._lnet << 32 | sel._rnet, []).append((pos, _compile_rest(sel, outbound), p))
    groups: list[_Group] = []
    for (lmask, rmask), table in tables.items():
        buckets = {nets: tuple(entries) for nets, entries in table.items()}
        first = min(entries[0][0] for entries in buckets.values())
        groups.append((first, lmask, rmask, buckets))
    groups.sort(key=lambda g: g[0])
    return (), tuple(groups)


class SPD:
    """Ordered policy list with separate outbound and inbound views; first match wins."""

    def __init__(self, policies: list[Policy]) -> None:
        self.policies = tuple(policies)
        numbered = list(enumerate(self.policies))
        self._out_linear, self._out_groups = _build_view(
            [(i, p) for i, p in numbered if p.direction.covers(True)], True)
        self._in_linear, self._in_groups = _build_view(
            [(i, p) for i, p in numbered if p.direction.covers(False)], False)

    def lookup(self, key: PacketKey, outbound: bool) -> Policy | None:
        """The first policy whose selector matches, or None (which means discard)."""
        # The per-packet path: locals and tuple indexing only, no call per policy. A view is
        # either linear or indexed; the other loop runs over an empty tuple.
        if outbound:
            local = key[0]
            remote = key[1]
            linear = self._out_linear
            groups = self._out_groups
        else:
            local = key[1]
            remote = key[0]
            linear = self._in_linear
            groups = self._in_groups
        for lmask, lnet, rmask, rnet, rest, policy in linear:
            if local & lmask == lnet and remote & rmask == rnet:
                if rest is None:
                    return policy
                proto, slo, shi, dlo, dhi = rest
                if proto >= 0 and proto != key[2]:
                    continue
                sport = key[3]
                dport = key[4]
                if (slo <= (_NO_PORT if sport is None else sport) <= shi
                        and dlo <= (_NO_PORT if dport is None else dport) <= dhi):
                    return policy
        best: Policy | None = None
        best_pos = _NO_MATCH
        for first, lmask, rmask, buckets in groups:
            if first > best_pos:
                break  # groups come in order of their first policy: no later one can win
            bucket = buckets.get((local & lmask) << 32 | remote & rmask)
            if bucket is None:
                continue
            for pos, rest, policy in bucket:
                if pos > best_pos:
                    break
                if rest is not None:
                    proto, slo, shi, dlo, dhi = rest
                    if proto >= 0 and proto != key[2]:
                        continue
                    sport = key[3]
                    dport = key[4]
                    if not (slo <= (_NO_PORT if sport is None else sport) <= shi
                            and dlo <= (_NO_PORT if dport is None else dport) <= dhi):
                        continue
                best = policy
                best_pos = pos
                break
        return best

    def __len__(self) -> int:
        return len(self.policies)

"""Checks across entries: unique SA names and SPIs, one key per SA, policies and their SAs,
and policies that an earlier one hides."""

from __future__ import annotations

import hashlib
from typing import Any

from ..core.ipv6 import is_v6
from ..core.sa import Encapsulation, Mode, PeerChange, SADirection, SAParams
from ..core.spd import Action, Direction, Network, Policy
from .reading import Problems


def check_sa_uniqueness(raw_sas: list[dict[str, Any]], probs: Problems) -> None:
    names: dict[str, int] = {}
    spis: dict[tuple[str, int], int] = {}
    for i, raw in enumerate(raw_sas):
        name = raw.get("name")
        if isinstance(name, str):
            if name in names:
                probs.add(f"sa[{i}].name", f"duplicate name {name!r} (also sa[{names[name]}])")
            names.setdefault(name, i)
        spi = raw.get("spi")
        direction = raw.get("direction")
        if isinstance(spi, int) and isinstance(direction, str):
            k = (direction, spi)
            if k in spis:
                probs.add(f"sa[{i}].spi", f"duplicate {direction}bound SPI 0x{spi:08x} (also sa[{spis[k]}])")
            spis.setdefault(k, i)


def check_shared_keys(keys: list[tuple[str, bytes]], probs: Problems) -> None:
    """Refuse a key given twice (two SAs, either direction, or one SA's two keys): under a
    shared key both users draw nonces/IVs from the same sequence numbers. Keys are compared
    by a hash, never shown."""
    first: dict[bytes, str] = {}
    for where, key in keys:
        digest = hashlib.sha256(b"nfq-ipsec config key compare\0" + key).digest()
        if digest in first:
            probs.add(where, f"the same key as {first[digest]}; every SA needs keys of its own "
                             "(two SAs under one key repeat each other's nonces); make another "
                             "with `nfq-ipsec genkey`")
        else:
            first[digest] = where


def check_policies(
    raw_policies: list[dict[str, Any]], policies: list[Policy], sas: list[SAParams],
    defined: set[Any], probs: Problems, compartment: dict[str, str] | None = None,
) -> None:
    """Cross-checks. SAs that are defined but invalid were reported already: skip them here.
    ``compartment``: each policy's compartment by name (a policy can only hide another of its
    own compartment)."""
    by_name = {sa.name: sa for sa in sas}
    raw_sa_names = set()
    seen_names: dict[str, int] = {}
    served_by: dict[str, str] = {}
    for i, raw in enumerate(raw_policies):
        name = raw.get("name")
        if isinstance(name, str):
            if name in seen_names:
                probs.add(f"policy[{i}].name", f"duplicate name {name!r} (also policy[{seen_names[name]}])")
            seen_names.setdefault(name, i)
        for n in raw.get("sa", []) if isinstance(raw.get("sa"), list) else []:
            if isinstance(n, str):  # anything else was reported by read_policy
                raw_sa_names.add(n)
    pos = {p["name"]: i for i, p in enumerate(raw_policies) if isinstance(p.get("name"), str)}
    for pol in policies:
        where = f"policy[{pos[pol.name]}]"
        out_queues: list[int] = []
        for n in pol.sa_names:
            sa = by_name.get(n)
            if sa is None:
                if n not in defined:
                    probs.add(f"{where}.sa", f"unknown SA {n!r}")
                continue
            if n in served_by and served_by[n] != pol.name:
                probs.add(
                    f"{where}.sa",
                    f"SA {n!r} already serves policy {served_by[n]!r}; an SA serves one policy",
                )
            served_by[n] = pol.name
            if not pol.direction.covers(sa.direction is SADirection.OUT):
                probs.add(
                    f"{where}.sa",
                    f"SA {n!r} is {sa.direction.value}bound but the policy is {pol.direction.value}",
                )
            if sa.direction is SADirection.OUT:
                if sa.queue in out_queues:
                    probs.add(f"{where}.sa", f"two outbound SAs on queue {sa.queue}; use one per queue")
                out_queues.append(sa.queue)
        _check_following(pol, [by_name[n] for n in pol.sa_names if n in by_name], where, probs)
        _check_udp_family(pol, [by_name[n] for n in pol.sa_names if n in by_name], where, probs)
        if pol.action is Action.PROTECT and pol.sa_names and all(n in by_name for n in pol.sa_names):
            dirs = {by_name[n].direction for n in pol.sa_names if n in by_name}
            if pol.direction.covers(True) and SADirection.OUT not in dirs:
                probs.add(f"{where}.sa", "protects outbound traffic but lists no outbound SA")
            if pol.direction.covers(False) and SADirection.IN not in dirs:
                probs.add(f"{where}.sa", "protects inbound traffic but lists no inbound SA")
    for sa in sas:
        if sa.name not in raw_sa_names:
            probs.warnings.append(f"sa {sa.name!r}: no policy uses it; it will never carry traffic")
    check_shadowing(policies, probs, compartment)


def _check_udp_family(pol: Policy, sas: list[SAParams], where: str, probs: Problems) -> None:
    """ESP in UDP is IPv4 only (RFC 3948; over IPv6 a UDP checksum of 0 is not allowed): its
    ESP must travel in IPv4, so a tunnel's endpoints are IPv4 and a transport SA serves an
    IPv4 policy."""
    for sa in sas:
        if sa.encapsulation is not Encapsulation.UDP:
            continue
        v6 = is_v6(sa.tunnel_remote) if sa.mode is Mode.TUNNEL else pol.selector.v6
        if v6:
            probs.add(f"{where}.sa", f'SA {sa.name!r} is ESP in UDP (encapsulation = "udp"), '
                      "which is IPv4 only; its ESP would travel in IPv6")


def _check_following(pol: Policy, sas: list[SAParams], where: str, probs: Problems) -> None:
    """ESP in UDP: an outbound SA that follows a new peer learns it from an inbound SA of its
    policy that follows, in its own worker (queue); without one it never learns (a warning:
    it still sends, to its configured peer)."""
    learners = {sa.queue for sa in sas if sa.direction is SADirection.IN
                and sa.encapsulation is Encapsulation.UDP and sa.peer_change is PeerChange.FOLLOW}
    for sa in sas:
        if (sa.direction is SADirection.OUT and sa.encapsulation is Encapsulation.UDP
                and sa.peer_change is PeerChange.FOLLOW and sa.queue not in learners):
            probs.warnings.append(
                f"sa {sa.name!r}: follows a new peer, but no inbound SA of policy {pol.name!r} "
                f'on its queue {sa.queue} does (peer_change = "follow", encapsulation = '
                '"udp"): it will keep sending to its configured peer')


def check_idle_queues(queues: list[int], sas: list[SAParams], probs: Problems) -> None:
    """A queue that no SA lives on runs a worker that has nothing to do: say so."""
    if not sas:
        return
    busy = {sa.queue for sa in sas}
    for q in queues:
        if q not in busy:
            probs.warnings.append(
                f"daemon.queues: no SA lives on queue {q}; its worker will idle (give it SAs "
                f"with queue = {q}, or leave it out of daemon.queues)")


def check_shadowing(policies: list[Policy], probs: Problems,
                    compartment: dict[str, str] | None = None) -> None:
    """A policy that an earlier one of its compartment covers entirely can never match: almost
    surely a mistake."""
    comp = compartment or {}
    for j, later in enumerate(policies):
        for i in range(j):
            earlier = policies[i]
            if comp.get(earlier.name) != comp.get(later.name):
                continue
            if _covers(earlier, later):
                probs.add(
                    f"policy[{j}]",
                    f"unreachable: policy[{i}] ({earlier.name!r}) matches everything it would",
                )
                break


def _covers(a: Policy, b: Policy) -> bool:
    if not (a.direction is Direction.BOTH or a.direction is b.direction):
        return False
    sa, sb = a.selector, b.selector
    if sa.v6 != sb.v6:
        return False  # one family never covers the other
    if not (_within(sb.local, sa.local) and _within(sb.remote, sa.remote)):
        return False
    if sa.protocol is not None and sa.protocol != sb.protocol:
        return False
    for ra, rb in ((sa.local_ports, sb.local_ports), (sa.remote_ports, sb.remote_ports)):
        if ra is not None and (rb is None or not (ra[0] <= rb[0] and rb[1] <= ra[1])):
            return False
    for fa, fb in ((sa.icmp_type, sb.icmp_type), (sa.icmp_code, sb.icmp_code)):
        if fa is not None and fa != fb:
            return False
    return True


def _within(inner: Network, outer: Network) -> bool:
    """``inner.subnet_of(outer)`` for two networks of one family (checked by the caller)."""
    return (inner.version == outer.version and inner.prefixlen >= outer.prefixlen
            and int(inner.network_address) & int(outer.netmask) == int(outer.network_address))

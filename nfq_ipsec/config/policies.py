"""The ``[[policy]]`` sections: the SPD entries, in order."""

from __future__ import annotations

from typing import Any

from ..core.spd import ANY, ANY6, Action, Network, Policy, Selector
from . import parsers
from .fields import POLICY
from .reading import Problems


def read_policy(raw: dict[str, Any], where: str, probs: Problems) -> Policy | None:
    """The policy, or None if anything about it is wrong. Whether its SAs exist and fit is a
    cross-check (``checks.py``)."""
    before = len(probs.items)
    POLICY.check_unknown(raw, where, probs)
    name = POLICY["name"].read(raw, where, probs)
    if not name:
        probs.add(f"{where}.name", "required")
    if "action" not in raw:
        probs.add(f"{where}.action", "required: protect, bypass or discard")
    action = POLICY["action"].read(raw, where, probs)
    direction = POLICY["direction"].read(raw, where, probs)
    local = parsers.network(raw, "local", where, probs)
    remote = parsers.network(raw, "remote", where, probs)
    proto = parsers.protocol(raw, where, probs)
    family = _family(local, remote, proto, where, probs)
    icmp = parsers.ICMP_BY_FAMILY[family]
    lports = parsers.ports(raw, "local_ports", where, proto, probs)
    rports = parsers.ports(raw, "remote_ports", where, proto, probs)
    icmp_type = POLICY["icmp_type"].read(raw, where, probs)
    icmp_code = POLICY["icmp_code"].read(raw, where, probs)
    if (icmp_type is not None or icmp_code is not None) and proto != icmp:
        probs.add(f"{where}.icmp_type", "icmp_type/icmp_code need protocol = \"icmp\" (IPv4) "
                  "or \"ipv6-icmp\" (IPv6)")
    sa_names = parsers.sa_names(raw, where, probs)
    connection = POLICY["connection"].read(raw, where, probs)
    if connection is not None and not connection:
        probs.add(f"{where}.connection", "must name a [[connection]]")
    if action is Action.PROTECT and sa_names and connection:
        probs.add(f"{where}.connection", "give sa or connection, not both (a connection's "
                  "policy is carried by the Child SAs it negotiates)")
    elif action is Action.PROTECT and not sa_names and connection is None:
        probs.add(f"{where}.sa", "a protect policy needs at least one SA, or a connection")
    if action is not None and action is not Action.PROTECT and sa_names:
        probs.add(f"{where}.sa", f"a {action.value} policy takes no SAs")
    if action is not None and action is not Action.PROTECT and connection is not None:
        probs.add(f"{where}.connection", f"a {action.value} policy takes no connection")
    if len(probs.items) != before:
        return None
    assert name is not None
    anywhere = ANY6 if family == 6 else ANY
    for side in ("local", "remote"):
        if side not in raw:
            probs.warnings.append(
                f"{where} {name!r}: no {side} given, so it covers every IPv{family} address on "
                f"that side ({anywhere}); write {side} = \"any\" to mean it")
    sel = Selector(local or anywhere, remote or anywhere, proto, lports, rports, icmp_type,
                   icmp_code)
    return Policy(name, sel, action, direction, tuple(sa_names))


def _family(local: Network | None, remote: Network | None, proto: int | None, where: str,
            probs: Problems) -> int:
    """A policy's one address family: its prefixes', or IPv6 for ``protocol = "ipv6-icmp"``
    without any, else IPv4. ``"any"`` is "any address of that family"."""
    given = {net.version for net in (local, remote) if net is not None}
    if len(given) > 1:
        probs.add(f"{where}.remote", "local and remote must be of one family (IPv4 or IPv6)")
    family = given.pop() if given else (6 if proto == parsers.ICMP_BY_FAMILY[6] else 4)
    wrong = parsers.ICMP_BY_FAMILY[10 - family]
    if proto == wrong:
        right = "icmp" if family == 4 else "ipv6-icmp"
        probs.add(f"{where}.protocol", f"an IPv{family} policy's ICMP is protocol = \"{right}\"")
    return family

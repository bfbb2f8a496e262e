"""The ``[[policy]]`` sections: the SPD entries, in order."""

from __future__ import annotations

from typing import Any

from ..core.spd import Action, Policy, Selector
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
    lports = parsers.ports(raw, "local_ports", where, proto, probs)
    rports = parsers.ports(raw, "remote_ports", where, proto, probs)
    icmp_type = POLICY["icmp_type"].read(raw, where, probs)
    icmp_code = POLICY["icmp_code"].read(raw, where, probs)
    if (icmp_type is not None or icmp_code is not None) and proto != 1:
        probs.add(f"{where}.icmp_type", "icmp_type/icmp_code need protocol = \"icmp\"")
    sa_names = parsers.sa_names(raw, where, probs)
    if action is Action.PROTECT and not sa_names:
        probs.add(f"{where}.sa", "a protect policy needs at least one SA")
    if action is not None and action is not Action.PROTECT and sa_names:
        probs.add(f"{where}.sa", f"a {action.value} policy takes no SAs")
    if len(probs.items) != before:
        return None
    assert name is not None
    sel = Selector(local, remote, proto, lports, rports, icmp_type, icmp_code)
    return Policy(name, sel, action, direction, tuple(sa_names))

"""The ``[[compartment]]`` sections, and which compartment each policy and SA belongs to.

A compartment is a label selector over who sent a packet (the local process's uid, gid or
cgroup v2; a forwarded packet's input interface or source) with its own queues (workers), its
own policies and its own SAs. Everything no compartment claims is the implicit default one's
(``daemon.queues``, the policies and SAs that name none). SELinux labels are not matched:
``secmark`` is refused with the reason.
"""

from __future__ import annotations

from typing import Any

from ..core.sa import SAParams
from ..core.spd import Policy
from . import parsers
from .fields import COMPARTMENT, COMPARTMENT_MARK_MASK, DEFAULT_COMPARTMENT, POLICY, SA
from .model import CompartmentConfig, DaemonConfig, NodeConfig
from .reading import Problems

_SELINUX = ("secmark", "connsecmark", "selinux")


def read_compartments(
    raw_list: list[dict[str, Any]], node: NodeConfig, daemon: DaemonConfig, cpus: list[int],
    probs: Problems,
) -> tuple[list[CompartmentConfig], list[tuple[int, int | None]]]:
    """The compartments (without their policies yet) and their (queue, CPU) pairs, checked
    against each other and ``daemon.queues``."""
    comps: list[CompartmentConfig] = []
    pairs: list[tuple[int, int | None]] = []
    owner = {q.num: "daemon.queues" for q in daemon.queues}
    names: dict[str, int] = {}
    ids: dict[int, int] = {}
    selectors: dict[tuple[Any, ...], int] = {}
    for i, raw in enumerate(raw_list):
        where = f"compartment[{i}]"
        raw = dict(raw)
        for key in _SELINUX:
            if raw.pop(key, None) is not None:
                probs.add(f"{where}.{key}", "SELinux labels are not matched (this build selects "
                          "by uid, gid, cgroup, interface or source)")
        before = len(probs.items)
        COMPARTMENT.check_unknown(raw, where, probs)
        name = COMPARTMENT["name"].read(raw, where, probs)
        if name is None:
            probs.add(f"{where}.name", "required")
        elif name in names:
            probs.add(f"{where}.name", f"duplicate name {name!r} (also compartment[{names[name]}])")
        else:
            names[name] = i
        cid = COMPARTMENT["id"].read(raw, where, probs)
        cid = i + 1 if cid is None else cid
        if cid in ids:
            probs.add(f"{where}.id", f"id {cid} is compartment[{ids[cid]}]'s too")
        ids.setdefault(cid, i)
        uid = parsers.owner_id(raw, "uid", where, probs)
        gid = parsers.owner_id(raw, "gid", where, probs)
        cgroup = COMPARTMENT["cgroup"].read(raw, where, probs)
        if cgroup is not None and parsers.cgroup_problem(cgroup) is None:
            problem, warning = parsers.cgroup_missing(cgroup)
            if problem is not None:
                probs.add(f"{where}.cgroup", problem)
            if warning is not None:
                probs.warnings.append(f"{where}.cgroup: {warning}")
        interface = COMPARTMENT["interface"].read(raw, where, probs)
        source = parsers.network(raw, "source", where, probs) if "source" in raw else None
        user = COMPARTMENT["user"].read(raw, where, probs)
        if "queues" not in raw:
            probs.add(f"{where}.queues", "required: a compartment's own queues (workers)")
            mine: list[tuple[int, int | None]] = []
        else:
            mine = parsers.queues(raw, cpus, 0, probs, where, default_pinned=False)
        for k, (q, _) in enumerate(mine):
            if q in owner:
                probs.add(f"{where}.queues[{k}]", f"queue {q} is in {owner[q]} too; a queue "
                          "belongs to one compartment")
            else:
                owner[q] = f"compartment[{i}]"
        local = (uid, gid, cgroup)
        forwarded = (interface, source)
        if local == (None, None, None) and forwarded == (None, None):
            probs.add(where, "selects nothing: give uid, gid or cgroup (locally sent traffic), "
                      "or interface or source (forwarded traffic on a gateway)")
        if forwarded != (None, None) and node.role != "gateway":
            probs.add(f"{where}.{'interface' if interface is not None else 'source'}",
                      'selects forwarded traffic, which only a gateway has (node.role = "gateway")')
        for sel in (("local", *local), ("forwarded", *forwarded)):
            if any(v is not None for v in sel[1:]):
                if sel in selectors:
                    probs.add(where, f"selects the same {sel[0]} traffic as "
                              f"compartment[{selectors[sel]}], which comes first: it would "
                              "never match")
                selectors.setdefault(sel, i)
        if len(probs.items) != before or name is None:
            continue
        comps.append(CompartmentConfig(name, tuple(q for q, _ in mine), cid, uid, gid, cgroup,
                                       interface, source, user))
        pairs += mine
    if raw_list and daemon.mark & COMPARTMENT_MARK_MASK:
        probs.add("daemon.mark", f"0x{daemon.mark:x} is within the compartments' mark bits "
                  f"(0x{COMPARTMENT_MARK_MASK:x}); choose a bit outside them")
    return comps, pairs


def _named(raw: dict[str, Any], section: Any, where: str, known: dict[str, CompartmentConfig],
           probs: Problems) -> str | None:
    """The compartment an entry names (``default`` when none); None if it is unknown."""
    name = section["compartment"].read(raw, where, probs)
    if name is None:
        return DEFAULT_COMPARTMENT
    if name != DEFAULT_COMPARTMENT and name not in known:
        listing = ", ".join([DEFAULT_COMPARTMENT, *known])
        probs.add(f"{where}.compartment", f"unknown compartment {name!r} (known: {listing})")
        return None
    return str(name)


def sa_with_default_queue(raw: dict[str, Any], comps: list[CompartmentConfig]) -> dict[str, Any]:
    """An ``[[sa]]`` of a compartment without ``queue`` gets its compartment's first queue."""
    name = raw.get("compartment")
    if "queue" in raw or not isinstance(name, str):
        return raw
    for comp in comps:
        if comp.name == name and comp.queues:
            return {**raw, "queue": comp.queues[0]}
    return raw


def assign(
    raw_policies: list[dict[str, Any]], policies: list[Policy], raw_sas: list[dict[str, Any]],
    sas: list[SAParams], comps: list[CompartmentConfig], default_queues: tuple[int, ...],
    probs: Problems,
) -> tuple[list[CompartmentConfig], dict[str, str]]:
    """Each policy and SA to its compartment: the compartments with their policies, and each
    policy's compartment by name. An SA lives on one of its compartment's queues, and a policy
    uses its own compartment's SAs only."""
    known = {c.name: c for c in comps}
    queues = {DEFAULT_COMPARTMENT: default_queues, **{c.name: c.queues for c in comps}}
    sa_comp: dict[str, str] = {}
    by_name = {sa.name: sa for sa in sas}
    for j, raw in enumerate(raw_sas):
        where = f"sa[{j}]"
        comp = _named(raw, SA, where, known, probs)
        name = raw.get("name")
        if comp is None or not isinstance(name, str) or name not in by_name:
            continue
        sa_comp[name] = comp
        q = by_name[name].queue
        if q not in queues[comp]:
            probs.add(f"{where}.queue", f"queue {q} is not one of compartment {comp!r} "
                      f"(queues {', '.join(map(str, queues[comp])) or 'none'}); an SA lives on a "
                      "queue of its own compartment")
    pol_comp: dict[str, str] = {}
    for i, raw in enumerate(raw_policies):
        where = f"policy[{i}]"
        comp = _named(raw, POLICY, where, known, probs)
        name = raw.get("name")
        if comp is None or not isinstance(name, str):
            continue
        pol_comp.setdefault(name, comp)
        for n in raw.get("sa", []) if isinstance(raw.get("sa"), list) else []:
            other = sa_comp.get(n) if isinstance(n, str) else None
            if other is not None and other != comp:
                probs.add(f"{where}.sa", f"SA {n!r} belongs to compartment {other!r} and "
                          f"policy {name!r} to compartment {comp!r}: a policy uses its own "
                          "compartment's SAs only")
    out = [CompartmentConfig(c.name, c.queues, c.id, c.uid, c.gid, c.cgroup, c.interface,
                             c.source, c.user,
                             tuple(p.name for p in policies if pol_comp.get(p.name) == c.name))
           for c in comps]
    return out, pol_comp

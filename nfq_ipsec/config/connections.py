"""The ``[[connection]]`` sections: IKEv2 peers, their pre-shared key and proposals.

The pre-shared key is read from ``psk_file`` (``parsers.psk``: like a key file) and kept in a
``Secret``; messages name the file and lengths, never the key.
"""

from __future__ import annotations

import dataclasses
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from ..core.ipv6 import V6, is_v6
from ..core.sa import Mode
from ..core.spd import Direction, Network, Policy
from ..ike import proposal_text
from ..ike.proposal import Protocol, SAPayload
from . import parsers
from .fields import CONNECTION
from .model import ConnectionConfig
from .reading import Problems, get


def read_connection(
    raw: dict[str, Any], where: str, base_dir: Path | None, probs: Problems,
) -> ConnectionConfig | None:
    """The connection (None if anything about it is wrong); which policy it carries is set by
    :func:`link_policies`."""
    before = len(probs.items)
    CONNECTION.check_unknown({k: v for k, v in raw.items() if k != "psk"}, where, probs)
    name = CONNECTION["name"].read(raw, where, probs)
    if not name:
        probs.add(f"{where}.name", "required")
    addrs: dict[str, int | None] = {}
    for side in ("local", "remote"):
        if side not in raw:
            probs.add(f"{where}.{side}", "required: an IPv4 or IPv6 address")
        addrs[side] = parsers.address(raw, side, where, probs)
    local, remote = addrs["local"], addrs["remote"]
    if local is not None and remote is not None:
        if is_v6(local) != is_v6(remote):
            probs.add(f"{where}.remote", "local and remote must be of one family")
        elif local == remote:
            probs.add(f"{where}.remote", "the peer's address is this end's own")
    ids = {side: _identity(raw, f"{side}_id", where, probs) for side in ("local", "remote")}
    auth = CONNECTION["auth"].read(raw, where, probs)
    psk = parsers.psk(raw, where, base_dir, probs)
    proposals: dict[str, tuple[str, SAPayload | None]] = {}
    for key, protocol in (("ike", Protocol.IKE), ("esp", Protocol.ESP)):
        text = CONNECTION[key].read(raw, where, probs)
        try:
            proposals[key] = (text, proposal_text.parse(text, protocol))
        except proposal_text.ProposalTextError as err:
            probs.add(f"{where}.{key}", str(err))
            proposals[key] = (text, None)
    mode = CONNECTION["mode"].read(raw, where, probs)
    start_action = _start_action(raw, where, probs)
    rekey = parsers.seconds_or_off(CONNECTION["rekey_time"], raw, where, probs)
    ike_rekey = parsers.seconds_or_off(CONNECTION["ike_rekey_time"], raw, where, probs)
    life = _life_time(raw, "life_time", rekey, where, probs)
    ike_life = _life_time(raw, "ike_life_time", ike_rekey, where, probs)
    dpd = parsers.seconds_or_off(CONNECTION["dpd_delay"], raw, where, probs)
    encap = CONNECTION["encap"].read(raw, where, probs)
    if encap and local is not None and is_v6(local):
        probs.add(f"{where}.encap", "ESP in UDP is IPv4 only (RFC 3948)")
    if len(probs.items) != before:
        return None
    assert name and local is not None and remote is not None and psk is not None
    ike_text, ike_p = proposals["ike"]
    esp_text, esp_p = proposals["esp"]
    assert ike_p is not None and esp_p is not None
    return ConnectionConfig(
        name=name, local=local, remote=remote,
        local_id=ids["local"] or _address_text(local), remote_id=ids["remote"] or _address_text(remote),
        psk=psk, auth=auth, ike=ike_text, esp=esp_text, ike_proposal=ike_p, esp_proposal=esp_p, mode=mode,
        start_action=start_action, rekey_time=rekey, ike_rekey_time=ike_rekey, dpd_delay=dpd,
        encap=encap, life_time=life, ike_life_time=ike_life,
    )


def _address_text(addr: int) -> str:
    return str(ip_address(addr & ((1 << 128) - 1)) if is_v6(addr) else ip_address(addr))


def _identity(raw: dict[str, Any], key: str, where: str, probs: Problems) -> str | None:
    value: str | None = get(raw, key, where, str, probs)
    if value is None:
        return None
    if not value or len(value) > 255 or any(c.isspace() or not c.isprintable() for c in value):
        probs.add(f"{where}.{key}", "must be an IP address or a name of 1..255 printable "
                  "characters without spaces")
        return None
    return value


def _life_time(raw: dict[str, Any], key: str, rekey: float, where: str, probs: Problems) -> float:
    """A hard lifetime: as given, or the rekey time + 10 % (strongSwan's default), none without
    rekeys; given, it must come after the rekey (else the SA would die before it is rekeyed)."""
    default = round(rekey * 1.1, 3)
    if key not in raw:
        return default
    value = parsers.seconds_or_off(dataclasses.replace(CONNECTION[key], default=default), raw,
                                   where, probs)
    if value and rekey and value <= rekey:
        probs.add(f"{where}.{key}", f"must be more than the rekey time ({rekey:g} s), got {value:g}")
    return value


def _start_action(raw: dict[str, Any], where: str, probs: Problems) -> str:
    value: str = CONNECTION["start_action"].read(raw, where, probs)
    return value


def check_connections(raw_conns: list[dict[str, Any]], probs: Problems) -> None:
    """Unique names."""
    names: dict[str, int] = {}
    for i, raw in enumerate(raw_conns):
        name = raw.get("name")
        if isinstance(name, str):
            if name in names:
                probs.add(f"connection[{i}].name",
                          f"duplicate name {name!r} (also connection[{names[name]}])")
            names.setdefault(name, i)


def _named(raw_conns: list[dict[str, Any]]) -> set[str]:
    return {raw["name"] for raw in raw_conns if isinstance(raw.get("name"), str)}


def link_policies(
    raw_policies: list[dict[str, Any]], policies: list[Policy], raw_conns: list[dict[str, Any]],
    conns: list[ConnectionConfig], probs: Problems,
) -> list[ConnectionConfig]:
    """Each connection with the protect policy that names it. A policy names a known
    connection, carries both directions, and selects by addresses only (traffic selectors of
    prefixes); a connection carries one policy; one no policy names is a warning."""
    defined = _named(raw_conns)
    by_name = {c.name: c for c in conns}
    pos = {p["name"]: i for i, p in enumerate(raw_policies) if isinstance(p.get("name"), str)}
    carried: dict[str, str] = {}
    for i, raw in enumerate(raw_policies):
        name = raw.get("connection")
        if not isinstance(name, str):
            continue
        if name not in defined:
            probs.add(f"policy[{i}].connection", f"unknown connection {name!r}"
                      + (f" (known: {', '.join(sorted(defined))})" if defined else ""))
    for pol in policies:
        cname = _policy_connection(raw_policies[pos[pol.name]])
        if cname is None:
            continue
        where = f"policy[{pos[pol.name]}]"
        if cname in carried:
            probs.add(f"{where}.connection", f"connection {cname!r} already carries policy "
                      f"{carried[cname]!r}; a connection carries one policy")
            continue
        carried[cname] = pol.name
        if pol.direction is not Direction.BOTH:
            probs.add(f"{where}.direction", "a policy carried by a connection protects both "
                      "directions (its Child SAs come in pairs)")
        sel = pol.selector
        if (sel.protocol is not None or sel.local_ports is not None or sel.remote_ports is not None
                or sel.icmp_type is not None or sel.icmp_code is not None):
            probs.add(f"{where}.connection", "a connection's policy selects by local and remote "
                      "only: protocols and ports in traffic selectors are not supported yet")
        conn = by_name.get(cname)
        if conn is not None and conn.mode is Mode.TRANSPORT:
            for side, addr in (("local", conn.local), ("remote", conn.remote)):
                net = getattr(sel, side)
                if net.prefixlen != net.max_prefixlen or _net_addr(net) != addr:
                    probs.add(f"{where}.{side}", f"connection {cname!r} is transport mode: the "
                              f"policy's {side} must be the connection's {side} address alone")
    out = []
    for conn in conns:
        pol_name = carried.get(conn.name, "")
        if not pol_name:
            probs.warnings.append(f"connection {conn.name!r}: no policy names it; its Child "
                                  "SAs would carry no traffic")
        out.append(_with_policy(conn, pol_name))
    return out


def _net_addr(net: Network) -> int:
    return int(net.network_address) | (V6 if net.version == 6 else 0)


def _policy_connection(raw: dict[str, Any]) -> str | None:
    name = raw.get("connection")
    return name if isinstance(name, str) else None


def _with_policy(conn: ConnectionConfig, policy: str) -> ConnectionConfig:
    return dataclasses.replace(conn, policy=policy)

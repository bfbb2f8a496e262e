"""The ``[[sa]]`` sections (and each one's ``[sa.lifetime]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.ipv6 import is_v6
from ..core.sa import Encapsulation, Mode, SADirection, SAParams, Secret
from ..core.suites import ENCRYPTION, HMACS, suite_problems
from . import parsers
from .fields import LIFETIME, SA
from .model import DaemonConfig
from .reading import Problems

_UDP_FIELDS = ("udp_source_port", "udp_destination_port", "peer_change", "keepalive")


def read_sa(
    raw: dict[str, Any], where: str, base_dir: Path | None, daemon: DaemonConfig,
    probs: Problems, keys: list[tuple[str, bytes]],
) -> tuple[SAParams | None, bool]:
    """The SA (None if anything about it is wrong) and whether it holds a key inline. Each key
    read is added to ``keys`` with where it was given (no two SAs may share one)."""
    before = len(probs.items)
    SA.check_unknown(raw, where, probs)
    name = SA["name"].read(raw, where, probs)
    if not name:
        probs.add(f"{where}.name", "required")
    spi = SA["spi"].get(raw, where, probs)
    if spi is None:
        probs.add(f"{where}.spi", "required")
    elif (problem := SA["spi"].bounds_problem(spi)) is not None:
        probs.add(f"{where}.spi", problem)
    if "direction" not in raw:
        probs.add(f"{where}.direction", "required: \"out\" or \"in\"")
    direction = SA["direction"].read(raw, where, probs)
    mode = SA["mode"].read(raw, where, probs)
    tunnel_local = parsers.address(raw, "tunnel_local", where, probs)
    tunnel_remote = parsers.address(raw, "tunnel_remote", where, probs)
    if mode is Mode.TUNNEL:
        for fname, val in (("tunnel_local", tunnel_local), ("tunnel_remote", tunnel_remote)):
            if val is None and fname not in raw:
                probs.add(f"{where}.{fname}", "required in tunnel mode")
    elif "tunnel_local" in raw or "tunnel_remote" in raw:
        probs.add(f"{where}.mode", "tunnel_local/tunnel_remote given but mode is transport")
    if (tunnel_local is not None and tunnel_remote is not None
            and is_v6(tunnel_local) != is_v6(tunnel_remote)):
        probs.add(f"{where}.tunnel_remote", "tunnel_local and tunnel_remote must be of one family "
                  "(the inner packets may be of either)")
    encryption = SA["encryption"].read(raw, where, probs)
    integrity = SA["integrity"].read(raw, where, probs)
    key = b""
    ikey = b""
    inline = "key" in raw or "integrity_key" in raw
    if encryption is None:
        probs.add(f"{where}.encryption", f"required (one of {', '.join(ENCRYPTION)})")
    else:
        suite_probs = suite_problems(encryption, integrity)
        for msg in suite_probs:
            field = "integrity" if integrity and integrity in msg and encryption not in msg else "encryption"
            probs.add(f"{where}.{field}", msg)
        if not suite_probs:
            alg = ENCRYPTION[encryption]
            if alg.keymat_size:
                got = parsers.key(raw, "key", where, base_dir, probs)
                if got is not None:
                    key = got
                    if len(key) != alg.keymat_size:
                        msg = parsers.key_len_msg(encryption, alg.key_size, alg.salt_size, len(key))
                        probs.add(f"{where}.key", msg)
                    else:
                        keys.append((parsers.key_field(raw, where, "key"), key))
            elif "key" in raw or "key_file" in raw:
                probs.add(f"{where}.key", "null encryption takes no key")
            if integrity is not None:
                mac = HMACS[integrity]
                got = parsers.key(raw, "integrity_key", where, base_dir, probs)
                if got is not None:
                    ikey = got
                    if len(ikey) != mac.key_size:
                        probs.add(f"{where}.integrity_key",
                                  f"{integrity} needs {mac.key_size} bytes, got {len(ikey)}")
                    else:
                        keys.append((parsers.key_field(raw, where, "integrity_key"), ikey))
            elif "integrity_key" in raw or "integrity_key_file" in raw:
                probs.add(f"{where}.integrity_key", f"{encryption} takes no integrity key")
    window = SA["replay_window"].read(raw, where, probs)
    esn = SA["esn"].read(raw, where, probs)
    queue = parsers.sa_queue(raw, where, [q.num for q in daemon.queues], probs)
    df = SA["df"].read(raw, where, probs)
    ttl = SA["ttl"].read(raw, where, probs)
    lifetime = parsers.lifetime(raw, where, LIFETIME, probs)
    encapsulation = SA["encapsulation"].read(raw, where, probs)
    sport = SA["udp_source_port"].read(raw, where, probs)
    dport = SA["udp_destination_port"].read(raw, where, probs)
    peer_change = SA["peer_change"].read(raw, where, probs)
    keepalive = parsers.seconds_or_off(SA["keepalive"], raw, where, probs)
    if encapsulation is not Encapsulation.UDP:
        for fname in _UDP_FIELDS:
            if fname in raw:
                probs.add(f"{where}.{fname}", 'for ESP in UDP only: needs encapsulation = "udp"')
    elif "keepalive" in raw and direction is SADirection.IN:
        probs.add(f"{where}.keepalive", "outbound SAs only: the side that sends keeps the NAT "
                  "mapping")
    if len(probs.items) != before:
        return None, inline
    assert name is not None and spi is not None and encryption is not None
    return (
        SAParams(
            name=name, spi=spi, direction=direction, encryption=encryption, key=Secret(key),
            integrity=integrity, integrity_key=Secret(ikey), mode=mode,
            tunnel_local=tunnel_local, tunnel_remote=tunnel_remote, replay_window=window,
            esn=esn, lifetime=lifetime, queue=queue, df=df, ttl=ttl,
            encapsulation=encapsulation, udp_source_port=sport, udp_destination_port=dport,
            peer_change=peer_change, keepalive=keepalive,
        ),
        inline,
    )

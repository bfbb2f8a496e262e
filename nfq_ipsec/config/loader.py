"""Read and validate a TOML configuration, reporting every problem at once with its location.

The fields are declared in ``fields.py`` (README "Configuration" is rendered from it); each
section is read by its own module (``node.py``, ``sas.py``, ``policies.py``), then the checks
across entries run (``checks.py``). The config file and the key files must belong to the user
that runs nfq-ipsec and must not be writable by group or others; both are opened without
following a symbolic link and checked as opened, and so is every directory on their paths
(``hardening.open_checked``). Each key may serve one SA only. Error messages name lengths and
locations, never key bytes.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .. import hardening
from ..core.errors import ConfigError
from ..core.sa import SAParams
from ..core.spd import Policy
from . import checks
from .compartments import assign, read_compartments, sa_with_default_queue
from .connections import check_connections, link_policies, read_connection
from .crypto import read_crypto
from .fields import TOP_LEVEL
from .model import Config, ConnectionConfig, QueueConfig
from .node import read_daemon, read_node
from .policies import read_policy
from .reading import Problems, array, table
from .sas import read_sa

MAX_CONFIG_FILE = 16 << 20


def load_config(path: str | os.PathLike[str], online_cpus: Iterable[int] | None = None) -> Config:
    """Load and validate ``path``. Raises ConfigError listing every problem found."""
    p = Path(path)
    try:
        text = hardening.read_checked(p, MAX_CONFIG_FILE)
    except hardening.UnsafeFileError as err:
        raise ConfigError([f"{p}: refused: {err}"]) from None
    except OSError as err:
        raise ConfigError([f"{p}: cannot read: {err.strerror}"]) from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError([f"{p}: not valid TOML: {err}"]) from None
    cfg = parse_config(data, base_dir=p.parent, online_cpus=online_cpus, path=p)
    return cfg


def parse_config(
    data: dict[str, Any],
    base_dir: Path | None = None,
    online_cpus: Iterable[int] | None = None,
    path: Path | None = None,
) -> Config:
    """Validate an already-parsed TOML document."""
    probs = Problems()
    cpus = sorted(online_cpus) if online_cpus is not None else sorted(os.sched_getaffinity(0))
    known_top = {section.key for section in TOP_LEVEL}
    for key in data:
        if key not in known_top:
            probs.add(key, f"unknown section (known: {', '.join(sorted(known_top))})")
    node = read_node(table(data, "node", probs), probs)
    name = path.name.removesuffix(".toml") if path is not None else None
    daemon = read_daemon(table(data, "daemon", probs), cpus, probs, name)
    crypto = read_crypto(table(data, "crypto", probs), probs)
    default_queues = tuple(qc.num for qc in daemon.queues)
    comps, comp_queues = read_compartments(array(data, "compartment", probs), node, daemon, cpus,
                                           probs)
    if comp_queues:  # every worker's queue, the default compartment's first
        daemon = dataclasses.replace(daemon, queues=daemon.queues + tuple(
            QueueConfig(num, cpu) for num, cpu in comp_queues))
    raw_sas = array(data, "sa", probs)
    raw_policies = array(data, "policy", probs)
    inline_keys = False
    sas: list[SAParams] = []
    keys: list[tuple[str, bytes]] = []
    for i, raw in enumerate(raw_sas):
        sa, inline = read_sa(sa_with_default_queue(raw, comps), f"sa[{i}]", base_dir, daemon,
                             probs, keys)
        inline_keys = inline_keys or inline
        if sa is not None:
            sas.append(sa)
    checks.check_sa_uniqueness(raw_sas, probs)
    checks.check_shared_keys(keys, probs)
    policies: list[Policy] = []
    for i, raw in enumerate(raw_policies):
        pol = read_policy(raw, f"policy[{i}]", probs)
        if pol is not None:
            policies.append(pol)
    raw_sa_names = {raw["name"] for raw in raw_sas if isinstance(raw.get("name"), str)}
    comps, policy_compartment = assign(raw_policies, policies, raw_sas, sas, comps,
                                       default_queues, probs)
    checks.check_policies(raw_policies, policies, sas, raw_sa_names, probs, policy_compartment)
    raw_conns = array(data, "connection", probs)
    conns: list[ConnectionConfig] = []
    for i, raw in enumerate(raw_conns):
        conn = read_connection(raw, f"connection[{i}]", base_dir, probs)
        if conn is not None:
            conns.append(conn)
    check_connections(raw_conns, probs)
    conns = link_policies(raw_policies, policies, raw_conns, conns, probs)
    checks.check_idle_queues([qc.num for qc in daemon.queues] if daemon else [], sas, probs)
    if inline_keys and path is not None:
        try:
            mode = path.stat().st_mode
        except OSError:
            mode = 0
        if mode & 0o077:
            probs.warnings.append(
                f"{path}: holds inline keys and is readable by group or others "
                f"(mode {stat.S_IMODE(mode):04o}); use key_file or chmod 600"
            )
    if probs.items:
        raise ConfigError(probs.items)
    return Config(node, daemon, tuple(policies), tuple(sas), path, tuple(probs.warnings),
                  tuple(conns), crypto, tuple(comps))

"""The peer's configuration, mirrored from one side's (``nfq-ipsec peer-config``).

Both ends of a pair of SAs hold the same SPI, algorithms and keys; what one sends with (``out``)
the other receives with (``in``). A policy's selectors are written from the host's own point
of view, so the peer's are the same ones seen from the other end. The mirror therefore:

- swaps every SA's ``direction`` and its ``tunnel_local``/``tunnel_remote``; SPIs, keys (inline
  or ``key_file``), algorithms, lifetimes and queues stay. The UDP ports of ESP in UDP stay
  too: ``udp_source_port`` is the source port of the SA's packets seen from either end;
- swaps every policy's ``local``/``remote`` and ``local_ports``/``remote_ports``, and its
  ``direction`` (``out``/``in``; ``both`` stays); names and SA lists stay;
- swaps every connection's ``local``/``remote`` and ``local_id``/``remote_id``; a connection
  that starts (``start_action = "start"``) waits on the peer (``none``), so that one end
  initiates;
- keeps ``[node]`` and ``[daemon]`` (``interface`` may be given for the peer), but a
  ``control_socket`` or ``state_dir`` that names this configuration (its file name without
  ``.toml``) names the peer's configuration instead;
- keeps the ``[[compartment]]``s (and each policy's and SA's ``compartment``): the peer
  separates the same flows by its own processes' labels, which it is told to check;
- rewrites relative ``key_file``, ``integrity_key_file`` and ``psk_file`` paths so that they
  still name the same files from where the peer's configuration is written.

What it can't know is listed in ``notes`` for the header of the written file: an ICMP type
is the same in both directions (an echo request stays a request), and the peer's interface.
Pure: paths are computed, no file is read or written here.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

_SWAP_POLICY = (("local", "remote"), ("local_ports", "remote_ports"))
_SWAP_SA = (("tunnel_local", "tunnel_remote"),)
_SWAP_CONNECTION = (("local", "remote"), ("local_id", "remote_id"))
_FLIP = {"out": "in", "in": "out"}
_FILES = {"sa": ("key_file", "integrity_key_file"), "connection": ("psk_file",)}


@dataclass
class Mirrored:
    document: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def _swap(table: dict[str, Any], pairs: tuple[tuple[str, str], ...]) -> None:
    """Swap the values of each pair of keys, keeping the table's order (a key alone takes
    the other's name in its place)."""
    for a, b in pairs:
        if a in table and b in table:
            table[a], table[b] = table[b], table[a]
        elif a in table or b in table:
            old, new = (a, b) if a in table else (b, a)
            items = [(new if k == old else k, v) for k, v in table.items()]
            table.clear()
            table.update(items)


def _moved(path: str, source_dir: PurePath, out_dir: PurePath | None) -> str:
    """``path`` (relative to ``source_dir`` unless absolute) as the file at ``out_dir`` names it."""
    if os.path.isabs(path) or out_dir is None:
        return path
    return os.path.relpath(os.path.normpath(source_dir / path), out_dir)


def mirror(data: dict[str, Any], source: PurePath, out: PurePath | None = None,
           interface: str | None = None) -> Mirrored:
    """The peer's document from ``data`` (read from ``source``); ``out``: where it will be
    written (None: printed, its relative paths left as they are, relative to ``source``'s
    directory); ``interface``: the peer's unprotected interface."""
    doc = copy.deepcopy(data)
    notes: list[str] = []
    source_dir, out_dir = source.parent, (out.parent if out is not None else None)

    node = doc.get("node")
    if isinstance(node, dict) and interface is not None:
        node["interface"] = interface
    elif isinstance(node, dict) and "interface" in node:
        notes.append(f"node.interface is this side's ({node['interface']}): give the peer's "
                     "with --interface if it differs")

    daemon = doc.get("daemon")
    name, peer_name = source.name.removesuffix(".toml"), (out.name.removesuffix(".toml") if out else None)
    if isinstance(daemon, dict):
        for key in ("control_socket", "state_dir"):
            v = daemon.get(key)
            if not isinstance(v, str):
                continue
            parts = PurePath(v).parts
            stems = [p.removesuffix(".sock") for p in parts]
            if peer_name is not None and name in stems:
                i = stems.index(name)
                parts = (*parts[:i], parts[i].replace(name, peer_name, 1), *parts[i + 1:])
                daemon[key] = str(PurePath(*parts))
            else:
                notes.append(f"daemon.{key} is this side's ({v}): two daemons on one host need "
                             "their own")

    icmp = False
    for pol in doc.get("policy", []) or []:
        if not isinstance(pol, dict):
            continue
        _swap(pol, _SWAP_POLICY)
        if pol.get("direction") in _FLIP:
            pol["direction"] = _FLIP[pol["direction"]]
        icmp = icmp or "icmp_type" in pol
    if icmp:
        notes.append("icmp_type is the same in both directions (an echo request stays a "
                     "request): check the policies that name one")

    for sa in doc.get("sa", []) or []:
        if not isinstance(sa, dict):
            continue
        if sa.get("direction") in _FLIP:
            sa["direction"] = _FLIP[sa["direction"]]
        _swap(sa, _SWAP_SA)

    for conn in doc.get("connection", []) or []:
        if not isinstance(conn, dict):
            continue
        _swap(conn, _SWAP_CONNECTION)
        if conn.get("start_action") == "start":
            conn["start_action"] = "none"
            notes.append(f"connection {conn.get('name')}: this side starts it, so the peer's "
                         "waits (start_action = \"none\")")

    if doc.get("compartment"):
        notes.append("the compartments stay as they are, each with its own SAs: their selectors "
                     "(uid, gid, cgroup, interface, source) now pick the peer's processes and "
                     "traffic: check that they mean the same there")

    for section, keys in _FILES.items():
        for entry in doc.get(section, []) or []:
            if not isinstance(entry, dict):
                continue
            for key in keys:
                if isinstance(entry.get(key), str):
                    entry[key] = _moved(entry[key], source_dir, out_dir)
    return Mirrored(doc, notes)

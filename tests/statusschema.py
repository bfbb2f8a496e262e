"""The status answer's schema in brief (``GOLDEN``) and the readers that hold the TypedDicts,
docs/status.md and real answers of ``nfq-ipsec status --json`` to it.

A level's path is "" for the top level, then keys joined by "." with "[]" for each element of
an array. Types are named as docs/status.md names them.
"""

from __future__ import annotations

import types
import typing
from typing import Any

# A level's path: "" for the top level, then keys joined by "." with "[]" for each element of
# an array. Types as docs/status.md names them.
GOLDEN: dict[str, dict[str, str]] = {
    "": {
        "taken_at": "string",
        "taken_at_epoch": "number",
        "daemon": "object",
        "kernel_drops": "drop counts or null",
        "kernel_drops_age": "number or null",
        "warnings": "array of strings",
        "workers": "array of objects",
        "compartments": "array of objects",
        "sas": "array of objects",
        "ike": "object or null",
        "engines": "array of objects",
    },
    "daemon": {
        "pid": "integer",
        "uptime": "number",
        "config": "string",
        "state": "string",
        "rules_installed": "boolean",
        "ipv6": "string",
        "version": "string",
        "core": "string",
        "control_errors": "integer",
        "control_clients": "integer",
        "cpu_seconds": "number or null",
        "memory_bytes": "integer or null",
    },
    "workers[]": {
        "queue": "integer",
        "cpu": "integer or null",
        "pid": "integer or null",
        "uptime": "number or null",
        "restarts": "integer",
        "state": "string",
        "packets_in": "integer or null",
        "packets_out": "integer or null",
        "drops": "drop counts or null",
        "kernel_queue_dropped": "integer or null",
        "user_dropped": "integer or null",
        "last_error": "string or null",
        "last_exit": "string or null",
        "last_signal": "string or null",
        "last_syscall": "integer or null",
        "last_outage": "number or null",
        "core": "string or null",
        "ike_markers": "integer or null",
        "crossed_family": "integer or null",
        "superpackets": "integer or null",
        "segments": "integer or null",
        "busy_poll_hits": "integer or null",
        "busy_poll_misses": "integer or null",
        "cpu_seconds": "number or null",
        "memory_bytes": "integer or null",
        "versions": "object or null",
        "compartment": "string",
        "offload": "object or null",
    },
    "compartments[]": {
        "name": "string",
        "id": "integer",
        "selector": "string",
        "user": "string or null",
        "workers": "integer",
        "workers_ready": "integer",
        "restarts": "integer",
        "packets_in": "integer or null",
        "packets_out": "integer or null",
        "drops": "drop counts or null",
    },
    "workers[].offload": {
        "helpers": "integer",
        "batch": "integer",
        "active": "boolean",
        "failed": "string",
        "jobs": "integer",
        "chunks": "integer",
        "inline": "integer",
        "lost": "integer",
        "checked": "integer",
    },
    "workers[].versions": {
        "compare": "string",
        "fallback": "boolean",
        "packets": "integer",
        "compared": "integer",
        "versions": "array of objects",
        "pairs": "array of objects",
        "sa_mismatches": "drop counts",
    },
    "workers[].versions.versions[]": {
        "name": "string",
        "in_service": "boolean",
        "out_reason": "string or null",
        "errors": "integer",
        "abstained": "integer",
        "streak": "integer",
        "outvoted": "integer",
    },
    "workers[].versions.pairs[]": {
        "versions": "array of strings",
        "agreed": "integer",
        "mismatches": "integer",
    },
    "sas[]": {
        "name": "string",
        "spi": "string",
        "direction": "string",
        "queue": "integer",
        "packets": "integer or null",
        "bytes": "integer or null",
        "replay_drops": "integer or null",
        "integrity_drops": "integer or null",
        "other_drops": "integer or null",
        "seq": "integer or null",
        "lifetime_left": "object or null",
        "saved": "integer or null",
        "path_mtu": "integer or null",
        "encapsulation": "string",
        "udp_peer": "string or null",
        "keepalives_sent": "integer or null",
        "peer_changes": "integer or null",
        "last_packet_age": "number or null",
        "engine": "string or null",
    },
    "sas[].lifetime_left": {
        "packets": "integer or null",
        "bytes": "integer or null",
        "seconds": "number or null",
    },
    "engines[]": {
        "name": "string",
        "state": "string",
        "reason": "string",
        "detail": "string",
        "claims": "array of strings",
        "verified": "array of strings",
        "failed": "object of strings",
        "speed": "object of numbers",
        "sas": "integer",
        "faults": "integer",
        "moved_away": "integer",
    },
    "ike": {
        "state": "string",
        "pid": "integer or null",
        "restarts": "integer",
        "last_error": "string or null",
        "key_log": "string or null",
        "connections": "array of objects or null",
    },
    "ike.connections[]": {
        "name": "string",
        "local": "string",
        "remote": "string",
        "start_action": "string",
        "last": "string or null",
        "ike_sas": "array of objects",
    },
    "ike.connections[].ike_sas[]": {
        "spi_i": "string",
        "spi_r": "string",
        "role": "string",
        "state": "string",
        "ike": "string or null",
        "nat": "boolean",
        "port": "integer",
        "established": "number or null",
        "rekey_in": "number or null",
        "expires_in": "number or null",
        "children": "array of objects",
    },
    "ike.connections[].ike_sas[].children[]": {
        "spi_in": "string",
        "spi_out": "string",
        "esp": "string",
        "udp_encap": "boolean",
        "rekey_in": "number or null",
        "expires_in": "number or null",
    },
}

# The levels of a daemon without a [[connection]] (its ``ike`` is null).
WITHOUT_IKE = frozenset(path for path in GOLDEN if path != "ike" and not path.startswith("ike."))
# The levels only a worker that compares versions fills (daemon.compare on: its pairs).
COMPARING = frozenset({"workers[].versions.pairs[]"})
# The level only a worker with crypto offload helpers fills (crypto.offload_helpers).
OFFLOADING = frozenset({"workers[].offload"})


NULL = " or null"


SCALARS: dict[str, type] = {"integer": int, "number": float, "string": str, "boolean": bool}


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# -- the schema of the TypedDicts --------------------------------------------------------------
def describe_types(td: type, path: str = "",
                   into: dict[str, dict[str, str]] | None = None) -> dict[str, dict[str, str]]:
    """``GOLDEN``'s description of TypedDict ``td`` and the TypedDicts in it."""
    out: dict[str, dict[str, str]] = {} if into is None else into
    level = out.setdefault(path, {})
    for key, hint in typing.get_type_hints(td).items():
        level[key] = _type_name(hint, _child(path, key), out)
    return out


def _type_name(hint: Any, path: str, out: dict[str, dict[str, str]]) -> str:
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        rest = [a for a in args if a is not type(None)]
        assert len(rest) == 1 and len(args) == 2, f"{path}: {hint} is not one type or None"
        return _type_name(rest[0], path, out) + NULL
    for name, t in SCALARS.items():
        if hint is t:
            return name
    if typing.is_typeddict(hint):
        describe_types(hint, path, out)
        return "object"
    origin = typing.get_origin(hint)
    if origin is dict and args == (str, int):
        return "drop counts"
    if origin is dict and args == (str, str):
        return "object of strings"
    if origin is dict and args == (str, float):
        return "object of numbers"
    if origin is list and args == (str,):
        return "array of strings"
    if origin is list and typing.is_typeddict(args[0]):
        describe_types(args[0], f"{path}[]", out)
        return "array of objects"
    raise AssertionError(f"{path}: {hint} has no name in docs/status.md")


# -- the schema of the page --------------------------------------------------------------------
def describe_docs(text: str) -> dict[str, dict[str, str]]:
    """The tables of docs/status.md: under a heading "Top level" or one that starts with a
    level's path in backticks, one row per key: | `key` | type | meaning |."""
    out: dict[str, dict[str, str]] = {}
    path: str | None = None
    for line in text.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip()
            named = title.split("`")
            path = "" if title == "Top level" else named[1] if title.startswith("`") else None
        elif path is not None and line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            key = cells[0].strip("`")
            level = out.setdefault(path, {})
            assert key not in level, f"{path or 'top level'}: {key} twice"
            level[key] = cells[1]
    return out


# -- a real answer -------------------------------------------------------------------------------
def check_answer(answer: Any) -> set[str]:
    """Assert that a status answer (parsed JSON) has ``GOLDEN``'s keys and value types at every
    level; return the levels it holds a value of (a level whose values are all null or empty
    arrays is not checked)."""
    seen: set[str] = set()
    check_level(answer, "", seen)
    return seen


def check_level(value: Any, path: str, seen: set[str]) -> None:
    where = path or "top level"
    level = GOLDEN[path]
    assert isinstance(value, dict), f"{where}: {value!r} is not an object"
    assert sorted(value) == sorted(level), f"{where}: keys {sorted(value)}, schema {sorted(level)}"
    seen.add(path)
    for key, typ in level.items():
        v, child = value[key], _child(path, key)
        base = typ.removesuffix(NULL)
        if v is None:
            assert typ.endswith(NULL), f"{child}: null, schema {typ}"
        elif base == "object":
            check_level(v, child, seen)
        elif base == "array of objects":
            assert isinstance(v, list), f"{child}: {v!r} is not an array"
            for item in v:
                check_level(item, f"{child}[]", seen)
        elif base == "array of strings":
            assert isinstance(v, list) and all(type(x) is str for x in v), f"{child}: {v!r}"
        elif base == "drop counts":
            assert isinstance(v, dict) and all(
                type(k) is str and type(n) is int for k, n in v.items()), f"{child}: {v!r}"
        elif base in ("object of strings", "object of numbers"):
            want = str if base == "object of strings" else float
            assert isinstance(v, dict) and all(
                type(k) is str and type(n) is want for k, n in v.items()), f"{child}: {v!r}"
        else:
            assert type(v) is SCALARS[base], f"{child}: {v!r} is not {typ}"


# -- a whole answer ------------------------------------------------------------------------------
def sample_answer() -> dict[str, Any]:
    """A status answer with every field, as a running daemon with two queues sends it: queue
    100's worker ready with counters, queue 101's down (its counters null). Its SA names need
    escaping in some formats (a quote, a backslash)."""
    return {
        "taken_at": "2026-12-03T10:13:00.125+00:00",
        "taken_at_epoch": 1796292780.125,
        "daemon": {"pid": 10, "uptime": 3725.5, "config": "/etc/nfq-ipsec/x.toml",
                   "state": "running", "rules_installed": True, "ipv6": "dropped",
                   "version": "0.1.0", "core": "compiled", "control_errors": 4,
                   "control_clients": 1, "cpu_seconds": 12.5, "memory_bytes": 41943040},
        "kernel_drops": {"no_policy": 4, "cleartext_protected": 0},
        "kernel_drops_age": 0.25,
        "ike": None,
        "warnings": ["queue 101: worker down; its traffic is dropped until it is ready"],
        "workers": [
            {"queue": 100, "cpu": 0, "pid": 11, "uptime": 12.5, "restarts": 1, "state": "ready",
             "packets_in": 10, "packets_out": 8, "drops": {"replay": 2, "integrity": 1},
             "kernel_queue_dropped": 3, "user_dropped": 0, "last_error": None,
             "last_exit": "killed by SIGSYS", "last_signal": "SIGSYS", "last_syscall": 59,
             "last_outage": 0.5, "core": "compiled", "ike_markers": 0, "crossed_family": 0,
             "superpackets": 12, "segments": 96, "busy_poll_hits": 40, "busy_poll_misses": 7,
             "cpu_seconds": 3.25,
             "memory_bytes": 33554432,
             "versions": {"compare": "all", "fallback": False, "packets": 10, "compared": 10,
                          "versions": [{"name": "core", "in_service": True, "out_reason": None,
                                        "errors": 0, "abstained": 0, "streak": 0,
                                        "outvoted": 0},
                                       {"name": "independent", "in_service": False,
                                        "out_reason": "disagreed 3 times in a row",
                                        "errors": 0, "abstained": 1, "streak": 3,
                                        "outvoted": 0}],
                          "pairs": [{"versions": ["core", "independent"], "agreed": 6,
                                     "mismatches": 3}],
                          "sa_mismatches": {"a-to-b": 3}},
             "compartment": "default",
             "offload": {"helpers": 1, "batch": 8, "active": True, "failed": "", "jobs": 500,
                         "chunks": 70, "inline": 0, "lost": 0, "checked": 0}},
            {"queue": 101, "cpu": 1, "pid": None, "uptime": None, "restarts": 3, "state": "down",
             "packets_in": None, "packets_out": None, "drops": None,
             "kernel_queue_dropped": None, "user_dropped": None,
             "last_error": "bind failed", "last_exit": "exit code 1", "last_signal": None,
             "last_syscall": None, "last_outage": None, "core": None,
             "ike_markers": None, "crossed_family": None, "superpackets": None,
             "segments": None, "busy_poll_hits": None, "busy_poll_misses": None,
             "cpu_seconds": None, "memory_bytes": None, "versions": None,
             "compartment": "web", "offload": None},
        ],
        "compartments": [
            {"name": "default", "id": 0, "selector": "unlabelled traffic", "user": None,
             "workers": 1, "workers_ready": 1, "restarts": 1, "packets_in": 10,
             "packets_out": 8, "drops": {"replay": 2, "integrity": 1}},
            {"name": "web", "id": 1, "selector": "uid 1000", "user": "nfq-web", "workers": 1,
             "workers_ready": 0, "restarts": 3, "packets_in": None, "packets_out": None,
             "drops": None},
        ],
        "sas": [
            {"name": "a-to-b", "spi": "0x00001000", "direction": "out", "queue": 100,
             "packets": 8, "bytes": 800, "replay_drops": 0, "integrity_drops": 0,
             "other_drops": 0, "seq": 8,
             "lifetime_left": {"packets": None, "bytes": 1000000, "seconds": 3500.25},
             "saved": 1032, "path_mtu": 1400, "encapsulation": "none", "udp_peer": None,
             "keepalives_sent": None, "peer_changes": None, "last_packet_age": 2.5,
             "engine": "openssl"},
            {"name": 'b-to-a "\\in"', "spi": "0x00002000", "direction": "in", "queue": 100,
             "packets": 7, "bytes": 700, "replay_drops": 2, "integrity_drops": 1,
             "other_drops": 0, "seq": 9,
             "lifetime_left": {"packets": None, "bytes": None, "seconds": None},
             "saved": 1024, "path_mtu": None, "encapsulation": "udp",
             "udp_peer": "192.0.2.1:4500", "keepalives_sent": 0, "peer_changes": 1,
             "last_packet_age": 75.0, "engine": "pycryptodome"},
            {"name": "c-to-d", "spi": "0x00003000", "direction": "out", "queue": 101,
             "packets": None, "bytes": None, "replay_drops": None, "integrity_drops": None,
             "other_drops": None, "seq": None, "lifetime_left": None, "saved": None,
             "path_mtu": None, "encapsulation": "none", "udp_peer": None,
             "keepalives_sent": None, "peer_changes": None, "last_packet_age": None,
             "engine": None},
        ],
        "engines": [
            {"name": "openssl", "state": "ready", "reason": "", "detail": "OpenSSL 3",
             "claims": ["aes-gcm-128"], "verified": ["aes-gcm-128"], "failed": {},
             "speed": {"aes-gcm-128": 1.9e9}, "sas": 1, "faults": 0, "moved_away": 0},
            {"name": "afalg", "state": "absent", "reason": "kernel has no AF_ALG: EAFNOSUPPORT",
             "detail": "", "claims": [], "verified": [], "failed": {"x": "y"}, "speed": {},
             "sas": 0, "faults": 2, "moved_away": 1},
        ],
    }

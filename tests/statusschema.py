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
        "daemon": "object",
        "kernel_drops": "drop counts or null",
        "kernel_drops_age": "number or null",
        "warnings": "array of strings",
        "workers": "array of objects",
        "sas": "array of objects",
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
        "last_outage": "number or null",
        "core": "string or null",
        "ike_markers": "integer or null",
        "crossed_family": "integer or null",
        "superpackets": "integer or null",
        "segments": "integer or null",
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
    },
    "sas[].lifetime_left": {
        "packets": "integer or null",
        "bytes": "integer or null",
        "seconds": "number or null",
    },
}


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
        else:
            assert type(v) is SCALARS[base], f"{child}: {v!r} is not {typ}"

"""A configuration document written back as TOML (what ``peer-config`` writes).

Only what a configuration holds: tables (``[node]``, ``[daemon]``), arrays of tables
(``[[policy]]``, ``[[sa]]``, ``[[connection]]``) with sub-tables (``[sa.lifetime]``), and
strings, integers, floats, booleans and arrays of them. Field order is kept. SPIs and the mark
are written in hex, as people write them. ``tomllib`` reads the output back to the same document
(a test checks that for every example configuration).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

HEX_FIELDS = frozenset({"spi", "mark"})


def value(key: str, v: Any) -> str:
    """One value in TOML's spelling."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"0x{v:08x}" if key in HEX_FIELDS and v >= 0 else str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            raise ValueError(f"{key}: {v} has no place in a configuration")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a TOML basic string: the same escapes
    if isinstance(v, Sequence):
        return "[" + ", ".join(value(key, item) for item in v) + "]"
    raise ValueError(f"{key}: cannot write a {type(v).__name__}")


def _table(lines: list[str], header: str, table: Mapping[str, Any]) -> None:
    lines.append(header)
    subtables: list[tuple[str, Mapping[str, Any]]] = []
    for key, v in table.items():
        if isinstance(v, Mapping):
            subtables.append((key, v))
        else:
            lines.append(f"{key} = {value(key, v)}")
    name = header.strip("[]")
    for key, sub in subtables:
        _table(lines, f"[{name}.{key}]", sub)


def dumps(document: Mapping[str, Any], header: Sequence[str] = ()) -> str:
    """``document`` as TOML, after ``header`` (comment lines, without the ``#``)."""
    lines = [f"# {line}".rstrip() for line in header]
    for key, v in document.items():
        if isinstance(v, Mapping):
            if lines:
                lines.append("")
            _table(lines, f"[{key}]", v)
        elif isinstance(v, Sequence) and not isinstance(v, str) and all(isinstance(t, Mapping) for t in v):
            for item in v:
                if lines:
                    lines.append("")
                _table(lines, f"[[{key}]]", item)
        else:
            raise ValueError(f"{key}: a configuration's top level holds tables only")
    return "\n".join(lines) + "\n"

"""Reading values out of a parsed TOML document: the problems list and the generic readers.

Every reader reports what is wrong at its location (``sa[2].spi``) and returns a default, so
that one pass finds every problem.
"""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


class Problems:
    """Every problem found (``where: what``), and the warnings that do not stop a load."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.warnings: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")


def table(data: dict[str, Any], key: str, probs: Problems) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        probs.add(key, "must be a table")
        return {}
    return value


def array(data: dict[str, Any], key: str, probs: Problems) -> list[dict[str, Any]]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        probs.add(key, f"must be an array of tables ([[{key}]])")
        return []
    return value


def unknown(raw: dict[str, Any], where: str, known: frozenset[str], probs: Problems) -> None:
    for key in raw:
        if key not in known:
            probs.add(f"{where}.{key}", f"unknown field (known: {', '.join(sorted(known))})")


def get(
    raw: dict[str, Any], key: str, where: str, kind: type[T] | tuple[type, ...],
    probs: Problems, default: T | None = None,
) -> Any:
    if key not in raw:
        return default
    value = raw[key]
    if kind is int and isinstance(value, bool):
        probs.add(f"{where}.{key}", "must be an integer, not a boolean")
        return default
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        probs.add(f"{where}.{key}", f"must be {names}, got {type(value).__name__}")
        return default
    return value


def choice(
    raw: dict[str, Any], key: str, where: str, choices: dict[str, T], probs: Problems, default: T
) -> T:
    value = get(raw, key, where, str, probs)
    if value is None:
        return default
    if value not in choices:
        probs.add(f"{where}.{key}", f"must be one of {', '.join(choices)}, got {value!r}")
        return default
    return choices[value]

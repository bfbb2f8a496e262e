"""What the field tables (``fields.py``) are made of: a Field (one key, its TOML type, default,
allowed values, check or parser, and description) and a Section (a table and its fields), and
how a simple field is read from its declaration alone."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Any

from .reading import Problems, choice, get, unknown

# TOML types as the reference names them, and what a simple field of each type must be.
STRING, INTEGER, BOOLEAN, NUMBER = "string", "integer", "boolean", "number"
_KINDS: dict[str, type | tuple[type, ...]] = {
    STRING: str, INTEGER: int, BOOLEAN: bool, NUMBER: (int, float),
}


@dataclasses.dataclass(frozen=True)
class Field:
    """One key of a section."""

    name: str
    toml: str  # its TOML type, as the reference shows it
    doc: str  # one line
    default: Any = None  # what an absent field means (None: nothing, no limit)
    default_text: str | None = None  # the default in words, where it is not a TOML value
    required: bool = False
    choices: Mapping[str, Any] | None = None  # TOML spelling -> the model's value
    bounds: tuple[Any, Any] | None = None  # inclusive
    allowed: str | None = None  # the allowed values in words, where choices or bounds don't say
    check: Callable[[Any], str | None] | None = None  # a problem with an accepted value, or None
    parser: Callable[..., Any] | None = None  # reads a field that needs more (parsers.py)
    hex: bool = False  # the reference shows the default and bounds in hex

    @property
    def kind(self) -> type | tuple[type, ...]:
        """What a simple field's value must be (KeyError for a parser's free-form type)."""
        return _KINDS[self.toml]

    @property
    def allowed_text(self) -> str:
        """The allowed values, as error messages and the reference say them."""
        if self.allowed is not None:
            return self.allowed
        if self.choices is not None:
            return ", ".join(self.choices)
        if self.bounds is not None:
            return f"{self.bounds[0]}..{self.bounds[1]}"
        return ""

    def get(self, raw: dict[str, Any], where: str, probs: Problems) -> Any:
        """The value if it has the field's type; None (and a problem) if not; None if absent."""
        return get(raw, self.name, where, self.kind, probs)

    def bounds_problem(self, value: Any) -> str | None:
        if self.bounds is None or self.bounds[0] <= value <= self.bounds[1]:
            return None
        return f"must be {self.allowed_text}, got {value}"

    def read(self, raw: dict[str, Any], where: str, probs: Problems) -> Any:
        """A simple field of ``raw`` (the section at ``where``): its value, or its default
        when it is absent or not allowed (with a problem). A value its check refuses is
        reported and kept, so that later checks see what was given."""
        assert self.parser is None, f"{self.name} is read by {self.parser}"
        if self.choices is not None:
            return choice(raw, self.name, where, dict(self.choices), probs, self.default)
        value = self.get(raw, where, probs)
        if value is None:
            return self.default
        problem = self.bounds_problem(value)
        if problem is not None:
            probs.add(f"{where}.{self.name}", problem)
            return self.default
        if self.check is not None and (problem := self.check(value)) is not None:
            probs.add(f"{where}.{self.name}", problem)
        return value


@dataclasses.dataclass(frozen=True)
class Section:
    """One table (``[node]``) or array of tables (``[[sa]]``) and its fields, in the order the
    reference lists them."""

    key: str  # the TOML key: node, daemon, policy, sa, lifetime
    header: str  # as a TOML file writes it: [node], [[sa]], [sa.lifetime]
    doc: str
    fields: tuple[Field, ...]

    @cached_property
    def _by_name(self) -> dict[str, Field]:
        return {f.name: f for f in self.fields}

    def __getitem__(self, name: str) -> Field:
        return self._by_name[name]

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._by_name)

    def check_unknown(self, raw: dict[str, Any], where: str, probs: Problems) -> None:
        """A problem for each key of ``raw`` the table does not know."""
        unknown(raw, where, self.names, probs)

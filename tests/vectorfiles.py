"""The published test vectors' files (tests/vectors/) read into fields: the one parser the
vector tests of each ESP implementation share."""

from __future__ import annotations

import re
from dataclasses import dataclass

from repo import VECTORS

_FIELD = re.compile(r"^\s*([a-z+_]+)\s*=\s*(.*?)\s*$")
_OCTETS = re.compile(r"^\((\d+) octets\)$")


@dataclass
class Vector:
    fields: dict[str, str]

    def __getitem__(self, name: str) -> str:
        return self.fields[name]

    def hex(self, name: str) -> bytes:
        return bytes.fromhex(self.fields[name])


def load_vectors(filename: str, first_field: str) -> list[Vector]:
    """Blocks of fields; a block starts at ``first_field``. Octet counts are verified."""
    blocks: list[Vector] = []
    last: str | None = None
    for lineno, raw in enumerate((VECTORS / filename).read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{filename}:{lineno}"
        field = _FIELD.match(raw)
        if field:
            name, value = field.groups()
            if name == first_field:
                blocks.append(Vector({}))
            assert blocks, f"{where}: field before the first {first_field}"
            octets = _OCTETS.match(value)
            if octets:  # no hex, only a length: "plaintext = (0 octets)" (and the GMAC tag)
                value = ""
            blocks[-1].fields[name] = value
            last = name
            continue
        assert last is not None, where
        octets = _OCTETS.match(line)
        if octets:
            got = len(bytes.fromhex(blocks[-1].fields[last]))
            assert got == int(octets.group(1)), f"{where}: {last} has {got} octets"
        else:
            assert re.fullmatch(r"[0-9a-f]+", line), f"{where}: not hex: {line!r}"
            blocks[-1].fields[last] += line
    return blocks

"""The configuration reference of README.md, rendered from the field tables (``fields.py``).

    python -m nfq_ipsec.config.reference --markdown           # print it
    python -m nfq_ipsec.config.reference --update README.md   # rewrite it between the markers
    python -m nfq_ipsec.config.reference --check README.md    # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .fields import SECTIONS
from .schema import Field, Section

BEGIN = ("<!-- BEGIN configuration reference: rendered from nfq_ipsec/config/fields.py by "
         "`python -m nfq_ipsec.config.reference --update README.md`; edit the tables, not this -->")
END = "<!-- END configuration reference -->"


def markdown() -> str:
    """Each section: its header, what it is for, and a table of its fields."""
    return "\n".join(_section(section) for section in SECTIONS)


def _section(section: Section) -> str:
    lines = [
        f"### `{section.header}`", "", section.doc, "",
        "| Field | Type | Default | Values | Meaning |", "|---|---|---|---|---|",
    ]
    for f in section.fields:
        cells = (f"`{f.name}`", f.toml, default_text(f), values_text(f), f.doc)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def default_text(field: Field) -> str:
    if field.required:
        return "required"
    if field.default_text is not None:
        return field.default_text
    if field.default is None:
        return "none"
    return f"`{toml_value(field, field.default)}`"


def values_text(field: Field) -> str:
    if field.allowed is not None:
        return field.allowed
    if field.choices is not None:
        return ", ".join(f"`{name}`" for name in field.choices)
    if field.bounds is not None:
        lo, hi = field.bounds
        return f"{lo:#x}..{hi:#x}" if field.hex else f"{lo}..{hi}"
    return ""


def toml_value(field: Field, value: Any) -> str:
    """``value`` as a TOML file would write it."""
    if field.choices is not None:
        for name, choice in field.choices.items():
            if choice == value:
                return f'"{name}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:#x}" if field.hex else str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(field, v) for v in value) + "]"
    return f'"{value}"'


def replace_block(text: str, block: str) -> str:
    """``text`` with what lies between the BEGIN and END lines replaced by ``block``."""
    start, end = _block_span(text)
    return text[:start] + block + text[end:]


def current_block(text: str) -> str:
    """What lies between the BEGIN and END lines of ``text``."""
    start, end = _block_span(text)
    return text[start:end]


def _block_span(text: str) -> tuple[int, int]:
    begin = text.find(BEGIN + "\n")
    end = text.find("\n" + END, begin)
    if begin < 0 or end < 0:
        raise ValueError(f"no block between {BEGIN!r} and {END!r}")
    return begin + len(BEGIN) + 1, end + 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nfq_ipsec.config.reference", description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--markdown", action="store_true", help="print the reference")
    what.add_argument("--update", metavar="FILE", type=Path,
                      help="rewrite the reference between the markers in FILE")
    what.add_argument("--check", metavar="FILE", type=Path,
                      help="exit 1 if the reference in FILE is not the rendered one")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown())
        return 0
    path: Path = args.update or args.check
    text = path.read_text()
    try:
        current = current_block(text)
    except ValueError as err:
        print(f"{path}: {err}", file=sys.stderr)
        return 2
    if current == markdown():
        return 0
    if args.check:
        print(f"{path}: the configuration reference is out of date; run "
              f"python -m nfq_ipsec.config.reference --update {path}", file=sys.stderr)
        return 1
    path.write_text(replace_block(text, markdown()))
    print(f"{path}: configuration reference updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())

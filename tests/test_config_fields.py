"""README.md's configuration reference is the one the field tables (``nfq_ipsec/config/fields.py``)
render."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from nfq_ipsec.config import reference
from nfq_ipsec.config.fields import SECTIONS

ROOT = Path(__file__).resolve().parent.parent


def test_readme_reference_is_rendered_from_the_tables() -> None:
    text = (ROOT / "README.md").read_text()
    assert reference.current_block(text) == reference.markdown(), (
        "README.md's configuration reference differs from nfq_ipsec/config/fields.py; "
        "render it again: .venv/bin/python -m nfq_ipsec.config.reference --update README.md"
    )


def test_the_reference_names_every_field() -> None:
    text = reference.markdown()
    for section in SECTIONS:
        assert f"### `{section.header}`" in text
        for field in section.fields:
            assert f"| `{field.name}` |" in text


def test_reference_command_checks_and_updates(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{reference.BEGIN}\nold\n{reference.END}\n\nafter\n")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "nfq_ipsec.config.reference", *args],
                              capture_output=True, text=True, cwd=ROOT)

    res = run("--check", str(readme))
    assert res.returncode == 1 and "--update" in res.stderr
    assert run("--update", str(readme)).returncode == 0
    assert readme.read_text() == (
        f"# x\n\n{reference.BEGIN}\n{reference.markdown()}{reference.END}\n\nafter\n")
    assert run("--check", str(readme)).returncode == 0
    assert run("--markdown").stdout == reference.markdown()

"""``nfq-ipsec lab`` and ``nfq-ipsec bench`` come with the optional extra ``lab``.

With the extra (as the suite runs: scripts/install-deps installs it) the runtime's command
line hands them to the package nfq_ipsec_lab, found through its entry points; without it they
say what to install and exit 1 (README, exit codes), whether the extra's requirements are
missing or its commands are not registered at all.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

import pytest

from nfq_ipsec import cli, commands, exitcodes


def test_the_installed_distribution_declares_the_extra_and_its_commands() -> None:
    found = {ep.name: ep.value for ep in metadata.entry_points(group=commands.EXTRA_GROUP)}
    assert found == {"lab": "nfq_ipsec_lab.cli:lab", "bench": "nfq_ipsec_lab.cli:bench"}
    requires = metadata.requires(commands.DISTRIBUTION) or []
    assert any(r.startswith("matplotlib") and 'extra == "lab"' in r for r in requires), requires
    assert commands.missing_extra_requirements() == []


def test_with_the_extra_the_commands_run(capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("lab", "bench"):
        with pytest.raises(SystemExit) as stop:
            cli.main([name, "--help"])
        assert stop.value.code == 0
        assert f"usage: nfq-ipsec {name}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        cli.main(["bench", "--rows", "des"])
    assert stop.value.code == exitcodes.CONFIG  # usage error, as for every command


def test_both_are_listed_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "lab" in out and "bench" in out and "the lab extra" in out


@pytest.mark.parametrize("name", ["lab", "bench"])
def test_without_the_extras_requirements_they_say_what_to_install(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(commands, "missing_extra_requirements", lambda: ["matplotlib"])
    loaded: list[str] = []
    monkeypatch.setattr(metadata.EntryPoint, "load", lambda ep: loaded.append(ep.name))
    assert cli.main([name, "demo"] if name == "lab" else [name, "--quick"]) == exitcodes.FAILURE
    err = capsys.readouterr().err
    assert f"nfq-ipsec {name}: needs the optional extra 'lab', which is not installed" in err
    assert "missing matplotlib" in err
    assert "pip install 'nfq-ipsec[lab]'" in err
    assert loaded == []  # nothing of the extra was imported


@pytest.mark.parametrize("name", ["lab", "bench"])
def test_without_the_extras_commands_they_say_what_to_install(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    def none(**kwargs: Any) -> list[metadata.EntryPoint]:
        return []

    monkeypatch.setattr(metadata, "entry_points", none)
    assert cli.main([name]) == exitcodes.FAILURE
    err = capsys.readouterr().err
    assert f"needs the optional extra 'lab', which is not installed (no {name!r} command" in err
    assert "pip install 'nfq-ipsec[lab]'" in err


def test_a_broken_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    def fail(ep: metadata.EntryPoint) -> None:
        raise ModuleNotFoundError("No module named 'nfq_ipsec_lab'")

    monkeypatch.setattr(metadata.EntryPoint, "load", fail)
    assert cli.main(["bench"]) == exitcodes.FAILURE
    err = capsys.readouterr().err
    assert "(No module named 'nfq_ipsec_lab')" in err and "pip install 'nfq-ipsec[lab]'" in err


def test_the_extras_requirements_are_read_from_the_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    declared = ['matplotlib; extra == "lab"', "cryptography>=41",
                "pytest>=7; extra == 'test'", "no-such-distribution-here>=1; extra == 'lab'"]
    monkeypatch.setattr(metadata, "requires", lambda name: declared)
    assert commands.missing_extra_requirements() == ["no-such-distribution-here"]
    assert commands.missing_extra_requirements("test") == []

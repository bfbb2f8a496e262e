"""The IKE setup script (``python -m nfq_ipsec_lab.bench.ikesetup``) completes its handshakes
and reports every figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nfq_ipsec_lab.bench import ikesetup


def test_a_short_run_reports_every_group(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ike.json"
    assert ikesetup.main(["--handshakes", "2", "--repeat", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["schema"] == ikesetup.SCHEMA
    assert [r["group"] for r in result["results"]] == list(ikesetup.GROUPS)
    for row in result["results"]:
        r, b = row["responder_ms"], row["handshake_ms"]
        assert 0 < r["min"] <= r["median"] <= r["max"] < b["max"] + 1e-9
        assert row["responder_per_s"] == pytest.approx(1000 / r["median"], rel=0.01)
    assert "x25519" in capsys.readouterr().out


def test_one_handshake_times_the_responder_within_the_whole() -> None:
    responder, total = ikesetup.handshake(ikesetup.GROUPS["x25519"])
    assert 0 < responder < total


def test_an_unknown_group_is_refused() -> None:
    with pytest.raises(SystemExit):
        ikesetup.main(["--groups", "modp1024"])

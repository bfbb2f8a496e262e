"""The SPD scaling script (``python -m nfq_ipsec_lab.bench.spdscale``) runs and reports every figure.

A smoke run with tiny sizes and repeat counts: the table and the JSON are well formed, every
size, case and lookup is there with positive numbers. Nothing here checks a speed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from nfq_ipsec.core import SPD
from nfq_ipsec.core.spd import LINEAR_SCAN_MAX
from nfq_ipsec_lab.bench import spdscale


def test_smoke_run_reports_every_size_and_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "spd.json"
    assert spdscale.main(["--sizes", "10,100", "--repeat", "2", "--min-ms", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())

    assert result["schema"] == spdscale.SCHEMA
    assert result["settings"]["sizes"] == [10, 100] and result["settings"]["repeat"] == 2
    assert result["call_overhead_ns"] > 0
    rows = {(r["size"], r["case"], r["impl"]): r for r in result["results"]}
    assert set(rows) == {(n, c, i) for n in (10, 100) for c in spdscale.CASES for i in spdscale.IMPLS}
    for (n, _, _), r in rows.items():
        assert r["policies"] == n + 3
        assert len(r["ns"]) == 2 and all(v > 0 for v in r["ns"])
        assert 0 < r["min"] <= r["median"] <= r["max"]
    assert set(result["ratios"]) == set(spdscale.CASES)
    assert all(v > 0 for r in result["ratios"].values() for v in r.values())
    assert "crossover" not in result

    lines = table.splitlines()
    for n in (10, 100):
        for case in spdscale.CASES:
            assert sum(1 for ln in lines if ln.split()[:2] == [str(n), case]) == 1, (n, case)
    assert "ratio 100 / 10" in table


def test_crossover_rows(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "spd.json"
    assert spdscale.main(["--sizes", "10", "--repeat", "1", "--min-ms", "1", "--crossover",
                          "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    got = {(r["size"], r["case"]) for r in result["crossover"]}
    assert got == {(n, c) for n in spdscale.CROSSOVER_SIZES for c in ("first", "last", "miss")}
    for r in result["crossover"]:
        assert r["chosen"] == ("index" if r["size"] > LINEAR_SCAN_MAX else "scan")
        assert all(r[k]["median"] > 0 for k in ("before", "scan", "index"))
    assert "small SPDs" in capsys.readouterr().out


def test_shapes_and_reference_scan() -> None:
    policies = spdscale.build_policies(6)
    assert [p.name for p in policies[:2]] == ["ike", "ike-nat-t"] and policies[-1].name == "discard"
    assert {p.selector.remote.prefixlen for p in policies[2:-1]} == {24, 32}
    assert len({p.selector.remote for p in policies[2:-1]}) == 6
    sizes = spdscale.CROSSOVER_SIZES
    assert [len(spdscale.small_policies(n)) for n in sizes] == list(sizes)
    spd = SPD(policies)
    for case in spdscale.CASES:
        for key in spdscale.case_keys(policies, case, random.Random(3)):
            assert spd.lookup(key, True) is spdscale.linear_lookup(policies, key, True)


@pytest.mark.parametrize("argv", [["--sizes", "0"], ["--sizes", "x"], ["--repeat", "0"]])
def test_bad_arguments_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        spdscale.main(argv)
    assert exc.value.code == 2

"""rates.between and the top command's frame: rates from two status answers, never negative
or made up, and the frame carries them."""

from __future__ import annotations

import copy
import io
from typing import Any, cast

import pytest
from rich.console import Console
from statusschema import sample_answer

from nfq_ipsec import rates
from nfq_ipsec.commands import top
from nfq_ipsec.status import StatusReport


def _later(answer: dict[str, Any], seconds: float) -> dict[str, Any]:
    later = copy.deepcopy(answer)
    later["taken_at_epoch"] += seconds
    return later


def test_rates_are_differences_over_the_time_between() -> None:
    before = sample_answer()
    after = _later(before, 2.0)
    w = after["workers"][0]
    w["packets_in"] += 200
    w["packets_out"] += 100
    w["drops"]["replay"] += 4
    w["drops"]["integrity"] += 0
    w["cpu_seconds"] += 0.5
    sa = after["sas"][0]
    sa["packets"] += 100
    sa["bytes"] += 150_000
    sa["other_drops"] += 2
    r = rates.between(cast(StatusReport, before), cast(StatusReport, after))
    assert r.seconds == 2.0
    q = r.queues[100]
    assert (q.packets_in, q.packets_out, q.drops, q.cpu) == (100.0, 50.0, 2.0, 0.25)
    assert q.drops_by_reason == {"replay": 2.0}  # integrity did not grow: not listed
    s = r.sas[(sa["name"], 100)]
    assert (s.packets, s.bits, s.drops) == (50.0, 600_000.0, 1.0)
    # the down queue (counters null) and an SA with null counters have no rates
    assert r.queues[101].packets_in is None and r.queues[101].cpu is None


def test_no_rate_from_a_counter_that_went_down_or_another_daemon() -> None:
    before = sample_answer()
    after = _later(before, 1.0)
    after["workers"][0]["packets_in"] = 3  # fewer than before (10)
    after["workers"][0]["cpu_seconds"] = 9.0  # more CPU ...
    after["workers"][0]["pid"] = 99  # ... but another worker process: its CPU time started anew
    r = rates.between(cast(StatusReport, before), cast(StatusReport, after))
    assert r.queues[100].packets_in is None and r.queues[100].cpu is None
    assert r.queues[100].packets_out == 0.0
    other = _later(before, 1.0)
    other["daemon"]["pid"] = 4242
    other["workers"][0]["packets_in"] += 50
    r2 = rates.between(cast(StatusReport, before), cast(StatusReport, other))
    assert r2.seconds == 0.0 and r2.queues[100].packets_in is None


def test_a_new_sa_has_no_rate_until_its_second_answer() -> None:
    before = sample_answer()
    after = _later(before, 1.0)
    after["sas"].append({**after["sas"][0], "name": "new", "packets": 5, "bytes": 500})
    r = rates.between(cast(StatusReport, before), cast(StatusReport, after))
    assert r.sas[("new", 100)].packets is None


def _render(status: dict[str, Any], r: rates.Rates | None) -> str:
    out = io.StringIO()
    Console(file=out, width=220, force_terminal=False).print(
        top.frame(cast(StatusReport, status), r, 1.0))
    return out.getvalue()


def test_the_frame_shows_queues_sas_rates_and_drops() -> None:
    before = sample_answer()
    after = _later(before, 2.0)
    after["workers"][0]["packets_in"] += 200
    after["sas"][0]["packets"] += 100
    after["sas"][0]["bytes"] += 250_000
    text = _render(after, rates.between(cast(StatusReport, before), cast(StatusReport, after)))
    lines = text.splitlines()
    assert "rates over 2.0s" in lines[0]
    q100 = next(line.split() for line in lines if line.split()[:2] == ["100", "ready"])
    assert q100[2:4] == ["11", "100.0"]  # pid, IN/s
    sa = next(line.split() for line in lines if line.startswith(after["sas"][0]["name"]))
    assert sa[4:7] == ["50.0", "1.0", "Mbit/s"]  # 125,000 B/s = 1.0 Mbit/s
    assert any(line.split()[:3] == ["q100", "replay", "2"] for line in lines)
    first = _render(before, None)
    assert "rates from the next refresh" in first.splitlines()[0]


@pytest.mark.parametrize("argv", [["top", "--socket", "/nonexistent", "-i", "0.1"],
                                  ["top", "--socket", "/nonexistent", "-n", "-1"]])
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from nfq_ipsec.commands import main

    assert main(argv) == 2
    assert "--interval must be at least 0.2" in capsys.readouterr().err


def test_no_daemon_exit_3(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from nfq_ipsec.commands import main

    assert main(["top", "--socket", str(tmp_path / "none.sock"), "-n", "1"]) == 3
    assert "not running" in capsys.readouterr().err

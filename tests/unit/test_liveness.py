"""Status timestamps and SA liveness: when the answer was taken, and how long ago each SA
last carried a packet (``liveness.py``, ``Supervisor.status``, the text of ``nfq-ipsec
status``)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import cast

from configs import cfg_of, host_data
from statusschema import sample_answer

from nfq_ipsec import control, supervisor
from nfq_ipsec.liveness import SaActivity
from nfq_ipsec.status import Counts, StatusReport


def counted(**packets: int) -> Counts:
    return {"packets_in": 0, "packets_out": 0, "drops": {},
            "sas": {name: {"packets": n, "bytes": 100 * n, "drops": {}} for name, n in packets.items()}}


def test_an_sa_is_active_when_its_count_grows() -> None:
    a = SaActivity()
    assert a.age("out0", 5.0) is None
    a.update(counted(out0=0, in0=0), 1.0)
    assert a.age("out0", 5.0) is None  # reported, but never a packet
    a.update(counted(out0=3, in0=0), 2.0)
    a.update(counted(out0=3, in0=0), 4.0)  # no packet since
    assert a.age("out0", 5.0) == 3.0 and a.age("in0", 5.0) is None
    a.update(counted(out0=4, in0=1), 6.0)
    assert a.age("out0", 6.5) == 0.5 and a.age("in0", 6.5) == 0.5


def test_a_restarted_worker_counts_from_zero_and_the_times_stay() -> None:
    a = SaActivity()
    a.update(counted(out0=50), 1.0)
    a.restart()
    assert a.age("out0", 3.0) == 2.0  # the time survives the restart
    a.update(counted(out0=0), 4.0)
    assert a.age("out0", 5.0) == 4.0
    a.update(counted(out0=2), 5.0)  # below the old worker's 50, yet new packets
    assert a.age("out0", 5.0) == 0.0


def test_the_status_answer_is_dated_and_ages_each_sa() -> None:
    sup = supervisor.Supervisor(cfg_of(host_data()), "x.toml")
    slot = sup.slots[0]
    sup._on_message(slot, ("pong", counted(out0=2, in0=0)))
    time.sleep(0.2)
    before = time.time()
    answer = sup.status()
    after = time.time()
    assert before - 0.001 <= answer["taken_at_epoch"] <= after + 0.001  # rounded to ms
    taken = datetime.fromisoformat(answer["taken_at"])
    assert taken.tzinfo is not None and taken.utcoffset() == UTC.utcoffset(None)
    assert abs(taken.timestamp() - answer["taken_at_epoch"]) < 0.0001  # one instant
    ages = {sa["name"]: sa["last_packet_age"] for sa in answer["sas"]}
    assert ages["in0"] is None
    assert ages["out0"] is not None and 0.2 <= ages["out0"] < 2.0
    sup._on_message(slot, ("pong", counted(out0=2, in0=1)))  # in0 now, out0 idle
    ages = {sa["name"]: sa["last_packet_age"] for sa in sup.status()["sas"]}
    assert ages["in0"] is not None and ages["in0"] < 0.2
    assert ages["out0"] is not None and ages["out0"] >= 0.2


def test_status_text_shows_when_and_how_long_ago() -> None:
    text = control.render_status(cast(StatusReport, sample_answer()))
    assert "at: 2026-12-03T10:13:00.125+00:00" in text.splitlines()
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith(("a-to-b", "c-to-d"))}
    assert rows["a-to-b"].endswith("2.5s ago") and rows["c-to-d"].endswith(" -")
    assert "1m15s ago" in text

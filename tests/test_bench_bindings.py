"""The bindings benchmark (``python -m nfq_ipsec.bench.bindings``): a smoke run and its pure parts.

A script, not a timed test: nothing here checks a speed. The smoke run (marks ``root`` and
``lab``) runs ``main()`` with the smallest settings (one repetition of 1-second iperf3 runs, the
bindings ``ours`` and ``nfq-run``) and checks the exit status and the JSON file: every requested
binding with positive figures, and the eligibility probes' facts (our binding hands over an
8028-byte packet whole, NetfilterQueue cuts it to 4016 bytes). The other tests need no root:
the command line, the recvmmsg receive path over a socket pair, the judgement and the table.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
from typing import Any

import pytest
from labutil import bench_environment_or_skip

from nfq_ipsec.bench import bindings, runner
from nfq_ipsec.nfqueue import NFQA_PACKET_HDR, NFQA_PAYLOAD, NFQNL_MSG_PACKET

SMOKE_BINDINGS = ["ours", "nfq-run"]


# -- the smoke run ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    bench_environment_or_skip()
    path = tmp_path_factory.mktemp("bindings") / "smoke.json"
    out = io.StringIO()
    code = bindings.main(["--bindings", ",".join(SMOKE_BINDINGS), "--repetitions", "1",
                          "--seconds", "1", "--busy-wait", "0", "--lock-wait", "120",
                          "--json", str(path)], out=out)
    if code == runner.EXIT_BUSY:
        pytest.skip(f"another benchmark holds the lock: {out.getvalue().strip()[-300:]}")
    assert code == 0, out.getvalue()
    return {"stdout": out.getvalue(), "json": json.loads(path.read_text()), "path": path}


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


@pytest.mark.root
@pytest.mark.lab
def test_smoke_json(smoke: dict[str, Any]) -> None:
    data = smoke["json"]
    assert data["schema"] == bindings.SCHEMA and data["interrupted"] is False
    assert data["settings"]["bindings"] == SMOKE_BINDINGS and data["settings"]["repetitions"] == 1
    machine = data["machine"]
    assert machine["kernel"].startswith("Linux ") and machine["cores"] >= 1
    assert machine["versions"]["netfilterqueue"]
    assert [r["key"] for r in data["bindings"]] == SMOKE_BINDINGS
    for row in data["bindings"]:
        assert row["status"] == "ok", row["error"]
        (rep,) = row["repetitions"]
        assert 0.0 <= rep["busy_before"] <= 1.0
        assert _positive(rep["tcp1"]["mbit"]) and _positive(rep["tcp1"]["bytes"])
        assert _positive(rep["udp64"]["pps"]) and 0 < rep["udp64"]["delivered"] <= rep["udp64"]["sent"]
        for test in ("tcp1", "udp64"):
            assert rep[test]["queues"]["queued"] > 0  # the traffic really went through the queues
            assert _positive(rep[test]["cpu_s"]) and _positive(rep[test]["cpu_us_per_packet"])
        for metric in ("tcp1_mbit", "udp64_pps", "udp_cpu_us_per_packet", "tcp_cpu_s_per_gb"):
            s = row["summary"][metric]
            assert _positive(s["median"]) and s["min"] <= s["median"] <= s["max"] and s["n"] == 1
            assert _positive(row["vs_ours"][metric])
    ours, nfq = data["bindings"]
    assert ours["vs_ours"]["tcp1_mbit"] == 1.0
    # the eligibility probes: facts, not speeds
    assert ours["probes"]["big"]["short_copies"] == 0 and ours["probes"]["big"]["max_copy"] == 8028
    assert nfq["probes"]["big"]["max_copy"] == 4016 and nfq["probes"]["big"]["short_copies"] > 0
    for row in (ours, nfq):
        assert row["probes"]["stall"]["leaked"] in (0, None)  # fail-open off
    assert nfq["probes"]["stall"]["reported_overflows"] is None  # NetfilterQueue can't tell
    assert ours["judgement"]["eligible"] and not nfq["judgement"]["eligible"]
    assert data["decision"].startswith("fastest eligible: ours")


@pytest.mark.root
@pytest.mark.lab
def test_smoke_prints_the_tables(smoke: dict[str, Any]) -> None:
    out = smoke["stdout"]
    assert "TCP Mbit/s med [min-max]" in out and "UDP 64B kpps" in out and "CPU us/pkt" in out
    for key in SMOKE_BINDINGS:
        label = bindings.binding(key).label
        lines = [line for line in out.splitlines() if line.startswith(label)]
        assert len(lines) == 2, out  # throughput and eligibility
        assert "FAILED" not in lines[0]
    assert "decision: fastest eligible: ours" in out
    assert f"raw figures and machine info: {smoke['path']}" in out


@pytest.mark.root
@pytest.mark.lab
def test_smoke_leaves_nothing_behind(smoke: dict[str, Any]) -> None:
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    mine = [line.split()[0] for line in res.stdout.splitlines()
            if line.startswith(f"{bindings.PREFIX}{os.getpid()}-")]
    assert mine == []


# -- pure parts ------------------------------------------------------------------------------

def test_command_line() -> None:
    args = bindings.build_parser().parse_args(["--bindings", "nfq-run,ours,nfq-run", "--repetitions", "2"])
    # table order (that of BINDING_KEYS), each once
    assert args.bindings == ["ours", "nfq-run"] and args.repetitions == 2 and args.seconds == 3.0
    assert bindings.build_parser().parse_args([]).bindings == list(bindings.BINDING_KEYS)
    for bad in (["--bindings", "libnfq"], ["--repetitions", "0"], ["--seconds", "x"]):
        with pytest.raises(SystemExit):
            bindings.build_parser().parse_args(bad)


def test_worker_argv_reuses_the_accept_worker() -> None:
    argv = bindings.worker_argv("ours", 1)
    assert argv[1:4] == ["-m", "nfq_ipsec.bench.accept", "--queue"]
    assert "--mark" in argv and "0x10000000" in argv
    argv = bindings.worker_argv("nfq-fd", None, probe=True, stall=2.0, max_len=8, rcvbuf=1)
    assert argv[1:5] == ["-m", "nfq_ipsec.bench.bindings", "worker", "nfq-fd"]
    assert argv[-7:] == ["--probe", "--stall", "2.0", "--max-len", "8", "--rcvbuf", "1"]


def _packet_message(packet_id: int, payload: bytes, queue: int = 100) -> bytes:
    def attr(atype: int, value: bytes) -> bytes:
        raw = struct.pack("=HH", 4 + len(value), atype) + value
        return raw + b"\0" * (-len(raw) % 4)

    body = struct.pack("!BBH", socket.AF_INET, 0, queue)
    body += attr(NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, 3) + b"\0")
    body += attr(NFQA_PAYLOAD, payload)
    return struct.pack("=IHHII", 16 + len(body), NFQNL_MSG_PACKET, 0, 0, 0) + body


def test_recvmmsg_queue_reads_several_messages_per_call() -> None:
    queue = bindings.MmsgNetlinkQueue()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        queue._sock = ours  # receive() only needs a datagram socket to read from
        queue.queue_num = 100
        sizes = [20, 1500, 8028, 65531 - 100, 3]
        for i, n in enumerate(sizes):
            theirs.send(_packet_message(i + 1, bytes([i]) * n))
        got = queue.receive(3)
        assert [(p.packet_id, len(p.payload), p.hook) for p in got] == [
            (1, 20, 3), (2, 1500, 3), (3, 8028, 3)]
        rest = queue.receive(64)
        assert [(p.packet_id, p.payload, p.length) for p in rest] == [
            (4, bytes([3]) * (65531 - 100), 65531 - 100), (5, b"\x04" * 3, 3)]
        assert queue.receive(64) == [] and queue.truncated_messages == 0
    finally:
        queue._sock = None
        ours.close()
        theirs.close()


def _row(
    key: str, mbit: float, *, big_short: int = 0, leaked: int = 0, reported: int | None = 1,
) -> dict[str, Any]:
    b = bindings.binding(key)
    probes = {"big": {"sent": 100, "delivered": 100 if not big_short else 0, "short_copies": big_short,
                      "max_copy": 8028 if not big_short else 4016},
              "stall": {"leaked": leaked, "queue_dropped": 0, "user_dropped": 48,
                        "reported_overflows": reported}}
    spread = {"median": mbit, "min": mbit * 0.9, "max": mbit * 1.1, "n": 3}
    return {"key": key, "label": b.label, "status": "ok", "error": None, "probes": probes,
            "judgement": bindings.judge(b, probes),
            "summary": {"tcp1_mbit": spread, "udp64_pps": {**spread, "median": mbit * 100},
                        "udp_cpu_us_per_packet": spread, "tcp_cpu_us_per_packet": spread,
                        "tcp_cpu_s_per_gb": spread, "busy_before": {"median": 0.1, "max": 0.2},
                        "udp64_sent_pps": spread, "udp_queue_drops": 0}}


def test_judgement_and_decision() -> None:
    ours = _row("ours", 300)
    nfq = _row("nfq-run", 360, big_short=100, reported=None)
    leaky = _row("fnfqueue", 400, leaked=19)
    assert ours["judgement"]["eligible"]
    assert nfq["judgement"] == {"never_truncates": False, "big_packets_intact": False,
                                "counts_overflow": False, "fails_closed": True, "probed": True,
                                "eligible": False}
    assert not leaky["judgement"]["fails_closed"] and not leaky["judgement"]["eligible"]
    rows = [ours, nfq, leaky]
    bindings.add_ratios(rows)
    assert nfq["vs_ours"]["tcp1_mbit"] == pytest.approx(1.2)
    text = bindings.decide(rows)
    assert text.startswith("fastest eligible: ours (300 Mbit/s")
    assert "nfq-run 360 Mbit/s (truncates, hides overflow)" in text
    assert "fnfqueue 400 Mbit/s (fails open)" in text
    # without probes, the facts alone decide
    assert bindings.judge(bindings.binding("ours-mmsg"), None)["eligible"]
    assert not bindings.judge(bindings.binding("nfq-fd"), None)["eligible"]


def test_table() -> None:
    rows = [_row("ours", 300), _row("nfq-run", 360, big_short=100, reported=None),
            {"key": "fnfqueue", "label": "fnfqueue (reader thread)", "status": "skipped",
             "error": "import fnfqueue: ModuleNotFoundError: No module named 'fnfqueue'",
             "probes": None, "judgement": None, "summary": None}]
    bindings.add_ratios(rows)
    result = {"settings": {"repetitions": 3, "seconds": 3.0},
              "machine": {"cpu_model": "cpu", "cores": 2, "kernel": "Linux 6.1 #1 SMP"},
              "bindings": rows, "decision": bindings.decide(rows), "warnings": ["busy"]}
    text = bindings.table(result)
    assert "300 [270-330]" in text and "1.20" in text
    assert "0/100" in text and "hidden" in text and "4016" in text
    assert "not measured: fnfqueue: import fnfqueue: ModuleNotFoundError" in text
    assert "WARNING: busy" in text and "decision: fastest eligible: ours" in text


def test_source_state_names_the_commit() -> None:
    state = bindings.source_state()
    assert state["head"] is None or len(state["head"]) == 40
    assert isinstance(state["changed"], list)

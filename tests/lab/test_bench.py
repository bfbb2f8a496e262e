"""The benchmark (``nfq-ipsec bench``): a smoke run and its pure parts.

The benchmark is a script, not a timed test: nothing here checks a speed. The smoke run (marks
``root`` and ``lab``) runs it with the smallest settings (two interleaved rounds of 1-second
iperf3 runs, five pings, one queue, the rows plain, accept-only, the AES-GCM floor and
AES-GCM-128 transport over IPv4, over IPv6, in UDP, with adaptive polling and with unpinned
workers) and checks that it produced well-formed
output: the table on stdout, the JSON file with its schema, raw figures and machine info, and a
valid PNG. The other tests need no root: statistics, ratios, the table, the accept-only rules and
CPU pinning of the lab's configurations.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from labutil import bench_environment_or_skip
from repo import ROOT

from nfq_ipsec import procs
from nfq_ipsec.config.loader import load_config
from nfq_ipsec_lab import bench
from nfq_ipsec_lab.bench import beds, report, runner
from nfq_ipsec_lab.bench.measure import percentile, spread
from nfq_ipsec_lab.cli import bench_parser
from nfq_ipsec_lab.lab import labconfig
from nfq_ipsec_lab.lab.netns import LabError
from nfq_ipsec_lab.lab.topology import HOST_A, HOST_B

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMOKE_ROWS = ["plain", "accept", "accept-gcm", "gcm", "gcm6", "gcm-udp", "gcm-poll", "gcm-float"]


# -- the smoke run ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    bench_environment_or_skip()
    out = tmp_path_factory.mktemp("bench")
    argv = [sys.executable, "-m", "nfq_ipsec.cli", "bench", "--repetitions", "2", "--seconds", "1",
            "--pings", "5", "--queues", "1", "--rows", ",".join(SMOKE_ROWS), "--out", str(out),
            "--name", "smoke"]
    t0 = time.monotonic()
    res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=420)
    seconds = time.monotonic() - t0
    if res.returncode == runner.EXIT_BUSY:
        pytest.skip(f"another benchmark is running: {res.stdout.strip()}")
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return {"stdout": res.stdout, "stderr": res.stderr, "out": out, "seconds": seconds,
            "json": json.loads((out / "smoke.json").read_text())}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def test_smoke_prints_the_table(smoke: dict[str, Any]) -> None:
    out = smoke["stdout"]
    for header in ("TCP 1 flow Mbit/s", "TCP 8 flows Mbit/s", "UDP 64B kpps", "RTT p50/p99 ms",
                   "burst RTT", "idle CPU", "CPU s/GB dp/all", "vs plain 1/8/udp", "vs accept 1/8/udp"):
        assert header in out
    for key in SMOKE_ROWS:
        label = beds.row_spec(key).label
        lines = [line for line in out.splitlines() if line.startswith(label)]
        assert lines, f"no table line for {label!r} in:\n{out}"
        assert "FAILED" not in lines[-1]
    assert f"raw figures and machine info: {smoke['out'] / 'smoke.json'}" in out
    assert f"python: {smoke['json']['machine']['python_build']}" in out
    assert (smoke["out"] / "smoke.txt").read_text().strip() in out


def test_smoke_json_schema(smoke: dict[str, Any]) -> None:
    data = smoke["json"]
    assert data["schema"] == report.SCHEMA
    assert data["interrupted"] is False
    assert data["settings"]["repetitions"] == 2 and data["settings"]["rows"] == SMOKE_ROWS
    assert data["settings"]["order"] == "interleaved"
    machine = data["machine"]
    assert isinstance(machine["cpu_model"], str) and machine["cpu_model"]
    assert isinstance(machine["cores"], int) and machine["cores"] >= 1
    assert machine["kernel"].startswith("Linux ")
    assert machine["python_build"].startswith("CPython 3.")
    assert ("statically linked" in machine["python_build"]) != ("libpython" in machine["python_build"])
    for tool in ("nfq_ipsec", "cryptography", "openssl", "iperf3", "iptables"):
        assert machine["versions"][tool], tool
    assert len(data["load"]["start"]) == 3 and len(data["load"]["end"]) == 3
    assert [(r["key"], r["queues"]) for r in data["rows"]] == [
        ("plain", None), ("accept", 1), ("accept-gcm", None), ("gcm", 1), ("gcm6", None),
        ("gcm-udp", None), ("gcm-poll", None), ("gcm-float", None)]
    for row in data["rows"]:
        assert row["status"] == "ok", row.get("error")
        assert _number(row["load_before"]) and _number(row["load_after"]) and _number(row["busy_before"])
        assert row["builds"] == 2  # interleaved: the test bed was built once per round
        assert len(row["repetitions"]) == 2
        rep = row["repetitions"][1]
        for test in ("tcp1", "tcp8"):
            assert rep[test]["mbit"] > 0 and rep[test]["bytes"] > 0 and _number(rep[test]["cpu_s"])
        assert rep["tcp8"]["flows"] == 8
        assert rep["udp64"]["length"] == 64 and 0 < rep["udp64"]["delivered"] <= rep["udp64"]["sent"]
        assert rep["ping"]["sent"] == 5 and rep["ping"]["received"] >= 1
        assert all(_number(v) and v > 0 for v in rep["ping"]["rtt_ms"])
        assert rep["ping"]["interval_s"] == 0.1 and rep["ping_warm"]["interval_s"] == 0.002
        assert rep["ping_warm"]["sent"] == 25 and rep["ping_warm"]["received"] >= 1
        idle = rep["idle"]
        assert idle["seconds"] >= 1.0 and _number(idle["cpu_share"]) and idle["cpu_share"] >= 0
        assert idle["workers"] == (0 if row["key"] == "plain" else 2)
        summary = row["summary"]
        for metric in ("tcp1_mbit", "tcp8_mbit", "udp64_pps", "rtt_p50_ms", "rtt_p99_ms",
                       "rtt_burst_p50_ms", "system_cpu_s_per_gb"):
            s = summary[metric]
            assert s["min"] <= s["median"] <= s["max"] and s["n"] == 2, metric
        assert set(row["ratios"]) >= {"plain", "accept"}
    plain, accept, floor, gcm, gcm6, udp, poll, unpinned = data["rows"]
    assert plain["summary"]["cpu_s_per_gb"] is None  # no data-plane process
    assert plain["summary"]["idle_cpu_share"] is None
    assert plain["ratios"]["plain"] == {m: 1.0 for m in report.RATIO_METRICS}
    assert accept["ratios"]["accept"] == {m: 1.0 for m in report.RATIO_METRICS}
    assert accept["info"]["work"] == "none" and floor["info"]["work"] == "gcm"
    assert floor["ratios"]["accept_queues"] == 1
    for row in (accept, floor, gcm, gcm6, udp, poll, unpinned):
        assert row["summary"]["cpu_s_per_gb"]["median"] > 0
        assert row["summary"]["idle_cpu_share_per_worker"]["median"] >= 0
        assert row["dataplane"]
        # the traffic really went through NFQUEUE: the kernel queued packets on both hosts
        assert all(rep["udp64"]["queues"]["queued"] > 0 for rep in row["repetitions"])
    assert gcm["dataplane_status"]["a"][0]["packets_out"] > 0
    assert gcm["dataplane_status"]["a"][0]["core"] == machine["core_build"]  # the workers' build
    assert 0 < gcm["ratios"]["plain"]["tcp1_mbit"] < 1
    assert "base" not in gcm["ratios"]


def test_smoke_has_the_ipv6_and_udp_rows(smoke: dict[str, Any]) -> None:
    """The gcm row's variants ran what their names say, and the report compares them with it."""
    rows = {r["key"]: r for r in smoke["json"]["rows"]}
    gcm6, udp = rows["gcm6"], rows["gcm-udp"]
    assert (gcm6["topology"], gcm6["info"]["topology"], gcm6["encapsulation"]) == ("host6", "host6", "none")
    assert (udp["topology"], udp["info"]["topology"], udp["encapsulation"]) == ("host", "host", "udp")
    for row in (gcm6, udp):
        assert row["base"] == "gcm" and row["ratios"]["base_queues"] == 1
        assert all(_number(v) and v > 0 for v in row["ratios"]["base"].values())
        assert row["ratios"]["base_cpu_s_per_gb"] > 0
        # every SA of both peers carried packets, in the encapsulation the row names
        for peer in ("a", "b"):
            sas = row["dataplane_sas"][peer]
            assert len(sas) == 2 and all(sa["packets"] > 0 for sa in sas), sas
            assert {sa["encapsulation"] for sa in sas} == {row["encapsulation"]}
    assert all(sa["udp_peer"] for sa in udp["dataplane_sas"]["a"])
    lines = smoke["stdout"].splitlines()
    start = lines.index("Variants, median ratio to the row they vary (TCP 1 flow/8 flows/UDP 64 B, and "
                        "data-plane CPU per GB):")
    gcm = beds.row_spec("gcm").label
    for key in ("gcm6", "gcm-udp"):
        assert any(line.startswith(f"  {beds.row_spec(key).label} / {gcm} q1: ") for line in lines[start:])


def test_smoke_has_the_latency_rows(smoke: dict[str, Any]) -> None:
    """The polling row's daemons polled (their configs say so) and the unpinned row's workers
    were not pinned: the daemons' own status says where each worker runs."""
    rows = {r["key"]: r for r in smoke["json"]["rows"]}
    poll, unpinned, gcm = rows["gcm-poll"], rows["gcm-float"], rows["gcm"]
    assert poll["info"]["busy_poll_us"] == 200 and gcm["info"]["busy_poll_us"] == 0
    assert unpinned["info"]["cpus"] == {"a": [], "b": []}
    for peer in ("a", "b"):
        assert [w["cpu"] for w in unpinned["dataplane_status"][peer]] == [None]
        assert all(w["cpu"] is not None for w in gcm["dataplane_status"][peer])
        assert all(w["packets_out"] > 0 for w in poll["dataplane_status"][peer])
    for row in (poll, unpinned):
        assert row["base"] == "gcm" and row["ratios"]["base_queues"] == 1
    # Polling stops when the traffic does: a worker that kept polling while idle would show
    # close to a whole CPU here.
    assert all(rep["idle"]["cpu_share_per_worker"] < 0.2 for rep in poll["repetitions"])


def test_smoke_png_is_valid(smoke: dict[str, Any]) -> None:
    png = smoke["out"] / "smoke.png"
    assert smoke["json"]["files"]["png"] == str(png)
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 600 and height >= 200
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"


def test_smoke_leaves_nothing_behind(smoke: dict[str, Any]) -> None:
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    mine = [line for line in res.stdout.splitlines() if line.startswith(runner.PREFIX)]
    # other benchmark runs may exist; none of them is the smoke run's (whose pid is gone)
    assert all(procs.alive(int(line[len(runner.PREFIX):].split("-")[0])) for line in mine), mine


# -- pure parts ------------------------------------------------------------------------------

def test_row_labels_fit_the_table() -> None:
    assert all(len(r.label) <= report.COLUMNS[0][1] and "," not in r.label for r in beds.ROWS)
    source = beds.row_spec("gcm-source")
    assert source.source_core and not beds.row_spec("gcm").source_core
    assert (source.kind, source.encryption) == ("esp", beds.row_spec("gcm").encryption)


def test_an_engine_row_measures_its_engine_or_fails_naming_why() -> None:
    sas = [{"engine": "openssl"}, {"engine": "openssl"}]
    engines = [{"name": "afalg", "state": "absent", "reason": "kernel has no AF_ALG: EAFNOSUPPORT"}]
    with pytest.raises(LabError, match="run on openssl, not afalg: afalg kernel has no AF_ALG"):
        beds.engine_check({"sas": sas, "engines": engines}, "afalg")
    beds.engine_check({"sas": sas, "engines": []}, "openssl")


def test_schedule_interleaves_rounds() -> None:
    assert runner.schedule(3, 2, "interleaved") == [(0, 1), (1, 1), (2, 1), (0, 1), (1, 1), (2, 1)]
    assert runner.schedule(3, 2, "rows") == [(0, 2), (1, 2), (2, 2)]
    assert runner.schedule(2, 1, "interleaved") == runner.schedule(2, 1, "rows")


def test_stdout_order_is_interleaved(smoke: dict[str, Any]) -> None:
    starts = [line.split("]", 1)[1].split(",")[0].strip() for line in smoke["stdout"].splitlines()
              if line.startswith("[")]
    labels = [beds.row_spec(key).label for key in SMOKE_ROWS]
    assert starts == labels + labels

def test_percentile_and_spread() -> None:
    assert percentile([3.0], 99) == 3.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert spread([None, 2.0, 1.0, 4.0]) == {"median": 2.0, "min": 1.0, "max": 4.0, "n": 3}
    assert spread([None]) is None


def _rep(mbit: float, pps: float, cpu: float) -> dict[str, Any]:
    tcp = {"mbit": mbit, "bytes": int(mbit * 1e6 / 8), "cpu_s": cpu, "system_cpu_s": 2 * cpu}
    return {
        "ping": {"rtt_ms": [0.5, 1.0], "p50_ms": 0.5, "p99_ms": 1.0, "sent": 2, "received": 2},
        "tcp1": tcp, "tcp8": tcp,
        "udp64": {"pps": pps, "sent_pps": pps, "delivered": int(pps), "cpu_s": cpu,
                  "system_cpu_s": cpu, "queues": {"queued": int(2 * pps)}},
    }


def _row(key: str, queues: int | None, mbit: float, dataplane: bool = True) -> dict[str, Any]:
    spec = beds.row_spec(key)
    return {"key": key, "label": spec.label, "queues": queues, "status": "ok", "error": None,
            "note": spec.note, "dataplane": ["x"] if dataplane else [],
            "repetitions": [_rep(mbit, mbit * 100, 1.0), _rep(mbit * 2, mbit * 200, 1.0)]}


def test_summaries_ratios_and_table() -> None:
    rows = [_row("plain", None, 1000, dataplane=False), _row("accept", 1, 100), _row("gcm", 1, 50),
            _row("accept", 2, 200), _row("gcm", 2, 50), _row("strongswan", None, 25),
            {"key": "chacha", "label": "transport chacha20-poly1305", "queues": 1, "status": "failed",
             "error": "boom\nmore", "note": ""}]
    for row in rows:
        row["summary"] = report.summarise(row) if row["status"] == "ok" else None
    report.add_ratios(rows)
    gcm1 = rows[2]
    assert gcm1["summary"]["tcp1_mbit"] == {"median": 75.0, "min": 50.0, "max": 100.0, "n": 2}
    assert gcm1["ratios"]["plain"]["tcp1_mbit"] == pytest.approx(0.05)
    assert gcm1["ratios"]["accept"]["tcp1_mbit"] == pytest.approx(0.5)
    assert rows[4]["ratios"]["accept"]["tcp8_mbit"] == pytest.approx(0.25)  # vs accept with 2 queues
    assert rows[5]["ratios"]["accept_queues"] == 1  # no queues: compared with accept-only q1
    assert rows[0]["summary"]["cpu_s_per_gb"] is None
    assert rows[6]["ratios"] is None
    result = {"settings": {"repetitions": 2, "seconds": 1.0, "pings": 2, "cpu_layout": "spread"},
              "machine": {"cpu_model": "cpu", "cores": 2, "kernel": "Linux 6.1 #1"},
              "rows": rows, "warnings": ["something was busy"]}
    text = report.table(result)
    assert "75.0 (50.0-100)" in text
    assert "FAILED: boom" in text
    assert "WARNING: something was busy" in text
    assert "strongSwan: " + beds.row_spec("strongswan").note in text


def test_accept_rules_mirror_the_daemon_hooks() -> None:
    one = beds.accept_rules("eth1", [100], mark=0x10000000)
    assert "*raw" in one and "*mangle" in one and one.count("COMMIT") == 2
    assert "-A PREROUTING -i eth1 -m mark --mark 0x10000000/0x10000000 -j RETURN" in one
    assert "-A OUTPUT -o eth1 -m mark --mark 0x10000000/0x10000000 -j RETURN" in one
    assert "-A OUTPUT -o eth1 -j NFQUEUE --queue-num 100" in one
    assert "--queue-bypass" not in one
    two = beds.accept_rules("eth1", [100, 101], mark=0x10000000)
    assert two.count("-j HMARK") == 2 and two.count("--hmark-mod 2") == 2
    assert "-j NFQUEUE --queue-num 101" in two


def test_pinned_lab_config_loads(tmp_path: Path) -> None:
    a = labconfig.PeerSpec("a", "eth1", IPv4Address(HOST_A), IPv4Network(f"{HOST_A}/32"))
    b = labconfig.PeerSpec("b", "eth1", IPv4Address(HOST_B), IPv4Network(f"{HOST_B}/32"))
    cfg = labconfig.generate(tmp_path / "cfg", a, b, "aes-gcm-128", queues=2)
    beds.pin_config(cfg.peer("b").path, [1, 0])
    loaded = load_config(cfg.peer("b").path, online_cpus=[0, 1])
    assert [(q.num, q.cpu) for q in loaded.daemon.queues] == [(100, 1), (101, 0)]
    assert beds.cpus_for(1, 1, "spread") != beds.cpus_for(0, 1, "spread") or len(os.sched_getaffinity(0)) == 1
    assert beds.cpus_for(1, 2, "same") == beds.cpus_for(0, 2, "same")


def test_udp_rows_config_loads(tmp_path: Path) -> None:
    a = labconfig.PeerSpec("a", "eth1", IPv4Address(HOST_A), IPv4Network(f"{HOST_A}/32"))
    b = labconfig.PeerSpec("b", "eth1", IPv4Address(HOST_B), IPv4Network(f"{HOST_B}/32"))
    cfg = labconfig.generate(tmp_path / "cfg", a, b, "aes-gcm-128", queues=2)
    beds.encapsulate_udp(cfg.peer("a").path)
    loaded = load_config(cfg.peer("a").path, online_cpus=[0, 1])
    assert len(loaded.sas) == 4
    assert all((sa.encapsulation.value, sa.udp_source_port, sa.udp_destination_port) == ("udp", 4500, 4500)
               for sa in loaded.sas)
    assert all(sa.encapsulation.value == "none"
               for sa in load_config(cfg.peer("b").path, online_cpus=[0, 1]).sas)
    with pytest.raises(LabError):
        beds.encapsulate_udp(tmp_path / "cfg" / "a" / "keys" / "a-to-b-0.key")  # no SA in it


def test_engine_rows_config_loads(tmp_path: Path) -> None:
    a = labconfig.PeerSpec("a", "eth1", IPv4Address(HOST_A), IPv4Network(f"{HOST_A}/32"))
    b = labconfig.PeerSpec("b", "eth1", IPv4Address(HOST_B), IPv4Network(f"{HOST_B}/32"))
    rows = [r for r in beds.ROWS if r.engine or r.policy or r.offload]
    assert {r.key for r in rows} == {"gcm-pycryptodome", "chacha-sodium", "chacha-pycryptodome",
                                     "cbc-pycryptodome", "gcm-balance", "gcm-afalg",
                                     "gcm256-sodium", "gcm256-pycryptodome", "chacha-afalg",
                                     "chacha-balance", "gcm-offload", "cbc-offload"}
    for r in rows:
        assert r.encryption is not None
        cfg = labconfig.generate(tmp_path / r.key, a, b, r.encryption, queues=1)
        beds.crypto_config(cfg.peer("a").path, r)
        crypto = load_config(cfg.peer("a").path, online_cpus=[0, 1]).crypto
        want = ("prefer", (r.engine,)) if r.engine else (r.policy or "fastest", ())
        assert (crypto.policy, crypto.prefer, crypto.offload_helpers) == (*want, r.offload)
        assert r.base is not None and beds.row_spec(r.base).encryption == r.encryption


def test_gso_rows_bind_their_queues_with_the_gso_flag(tmp_path: Path) -> None:
    """gcm-gso's daemons run with daemon.gso, accept-gso's workers bind with the GSO flag;
    the rows they vary do neither."""
    a = labconfig.PeerSpec("a", "eth1", IPv4Address(HOST_A), IPv4Network(f"{HOST_A}/32"))
    b = labconfig.PeerSpec("b", "eth1", IPv4Address(HOST_B), IPv4Network(f"{HOST_B}/32"))
    for gso in (False, True):
        cfg = labconfig.generate(tmp_path / f"cfg{gso}", a, b, "aes-gcm-128", queues=1, gso=gso)
        for peer in ("a", "b"):
            assert load_config(cfg.peer(peer).path, online_cpus=[0, 1]).daemon.gso is gso
    assert [(k, beds.row_spec(k).gso, beds.row_spec(k).base) for k in ("accept-gso", "gcm-gso")] == [
        ("accept-gso", True, "accept"), ("gcm-gso", True, "gcm")]
    assert not beds.row_spec("gcm").gso and not beds.row_spec("accept").gso
    from nfq_ipsec_lab.bench import accept

    with pytest.raises(SystemExit):  # a payload verdict can't carry a superpacket
        accept.main(["--queue", "1", "--mark", "1", "--work", "payload", "--gso"])


def test_variant_ratios() -> None:
    rows = [_row("gcm", 1, 100), _row("gcm", 2, 200), _row("gcm6", None, 50), _row("gcm-udp", None, 25),
            _row("gcm-source", None, 10)]
    rows[4]["status"] = "failed"
    for row in rows:
        row["base"] = beds.row_spec(row["key"]).base
        row["summary"] = report.summarise(row) if row["status"] == "ok" else None
    report.add_ratios(rows)
    assert "base" not in rows[0]["ratios"]
    assert rows[2]["ratios"]["base"]["tcp1_mbit"] == pytest.approx(0.5)  # vs gcm with 1 queue
    assert rows[2]["ratios"]["base_queues"] == 1
    assert rows[3]["ratios"]["base"]["udp64_pps"] == pytest.approx(0.25)
    assert rows[2]["ratios"]["accept"] is None  # no accept-only row in this run
    text = "\n".join(report.variants(rows))
    # the same CPU seconds for half the bytes: twice the CPU per GB
    assert "transport aes-gcm-128 IPv6 / transport aes-gcm-128 q1: 0.5/0.5/0.5, dp CPU s/GB 2" in text
    assert "transport aes-gcm-128 in UDP / transport aes-gcm-128 q1: 0.25/0.25/0.25, dp CPU s/GB 4" in text
    assert "uncompiled" not in text  # a failed variant has no ratio
    assert report.variants(rows[:2]) == []


def test_command_line() -> None:
    assert bench.ROW_KEYS == beds.ROW_KEYS
    args = bench_parser().parse_args(["--quick", "--rows", "gcm,plain", "--queues", "2,1"])
    assert args.rows == ["plain", "gcm"] and args.queues == [1, 2] and args.quick
    with pytest.raises(SystemExit):
        bench_parser().parse_args(["--rows", "des"])
    assert shutil.which("bash") is None or (ROOT / "scripts" / "bench").stat().st_mode & 0o111


def test_an_absent_engine_skips_its_row_naming_why() -> None:
    """An engine row on a machine without that engine (AF_ALG on a kernel without it) is
    skipped with the engine's own reason, before any lab is built: not a failed run."""
    assert runner.engine_absent("openssl") is None
    assert runner.engine_absent("nope") == "no engine named 'nope'"
    spec = next(r for r in beds.ROWS if r.key == "gcm-afalg")
    why = runner.engine_absent("afalg")
    if why is None:  # a kernel with AF_ALG: the row would be measured, not skipped
        spec = beds.RowSpec("x-absent", "x", "esp", engine="nope")
        why = "no engine named 'nope'"
    settings = runner.Settings(rows=[spec.key], queues=[1])
    row = runner.measure_row(spec, 1, settings, say=lambda _line: None)
    assert row["status"] == "skipped" and row["builds"] == 0, row
    assert row["error"] == f"engine {spec.engine} absent here: {why}"

"""The ESP-in-UDP batching measurement (``python -m nfq_ipsec_lab.bench.udpgso``): its pure
parts, and a short run in namespaces (marks ``root`` and ``lab``) that checks the output is
well formed and that each scenario did what its name says (UDP_GRO with UDP_SEGMENT really got
several datagrams per recvmsg, the core opened every datagram it received). No timing is
checked: the figures are for the README, not for assertions.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from labutil import bench_environment_or_skip
from packets import checksum  # the tests' own, independent of the core's
from repo import ROOT

from nfq_ipsec import procs
from nfq_ipsec_lab.bench import profile, udpgso

SMOKE_COUNT = 2000


def test_scenarios_and_their_baselines() -> None:
    todo = udpgso.scenarios(44)
    names = [sc.name for sc in todo]
    assert len(set(names)) == len(names)
    assert all(sc.baseline in todo for sc in todo)
    assert udpgso.Scenario(44, True, "gso").baseline == udpgso.Scenario(1, False, "core")
    assert {sc.crypto for sc in todo} == {"none", "core", "gso"}
    assert "UDP_SEGMENT x44 -> UDP_GRO, crypto core" in names


def test_segments_are_whole_tcp_packets() -> None:
    cut = udpgso.segmenter(1400, 5)
    first, second = cut(), cut()
    src, dst = IPv4Address(profile.A_ADDR).packed, IPv4Address(profile.B_ADDR).packed
    seqs = []
    payload = b""
    for pkt in first + second:
        assert len(pkt) == 1400 and pkt[0] == 0x45 and pkt[9] == 6
        assert checksum(pkt[:20]) == 0  # IPv4 header checksum
        assert pkt[12:16] == src and pkt[16:20] == dst
        tcp = pkt[20:]
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
        assert checksum(pseudo + tcp) == 0  # the full TCP checksum
        seqs.append(struct.unpack("!I", tcp[4:8])[0])
        payload += tcp[20:]
    assert seqs == [1 + 1360 * i for i in range(10)]  # contiguous
    assert [p[20 + 13] for p in first] == [0x10] * 4 + [0x18]
    assert payload[:1360 * 5] == payload[1360 * 5:]  # the same superpacket's bytes, cut alike


def test_core_seals_and_opens_esp_in_udp(tmp_path: Path) -> None:
    a, b = udpgso.make_configs(tmp_path)
    seal, open_one = udpgso.sealer(a), udpgso.opener(b)
    inner = profile.tcp_packet(profile.A_ADDR, profile.B_ADDR, 1400)
    payloads = [seal(inner) for _ in range(3)]
    assert payloads[0][:4] != bytes(4)  # an SPI, not the non-ESP marker
    assert len({len(p) for p in payloads}) == 1 and len(set(payloads)) == 3
    assert all(open_one(p) for p in payloads)
    assert not open_one(payloads[0])  # a replay
    forged = bytearray(seal(inner))
    forged[-1] ^= 1
    assert not open_one(bytes(forged))


def _run(sent: int, received: int, seconds: float) -> dict[str, Any]:
    return udpgso.figures({"sent": sent, "seconds": seconds, "cpu_s": 1.0},
                          {"received": received, "bytes": received * 100, "seconds": seconds,
                           "cpu_s": 2.0, "calls": received // 2})


def test_summary_ratios_round_by_round() -> None:
    base, batched = udpgso.Scenario(1, False, "core"), udpgso.Scenario(44, True, "core")
    runs = {base: [_run(100, 100, 1.0), _run(100, 100, 2.0)],
            batched: [_run(100, 100, 0.5), _run(100, 50, 0.5)]}
    summary = udpgso.summarise(runs)
    pps = summary[batched.name]["pps"]
    assert (pps["median"], pps["min"], pps["max"]) == (150.0, 100.0, 200.0)
    assert pps["ratio"] == pytest.approx((2.0 + 2.0) / 2)  # 200/100 and 100/50
    assert summary[base.name]["pps"]["ratio"] == 1.0
    assert summary[batched.name]["delivered"]["min"] == 0.5
    text = udpgso.table(summary)
    assert batched.name in text and "x2.00" in text


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    bench_environment_or_skip()
    out = tmp_path_factory.mktemp("udpgso") / "udpgso.json"
    res = subprocess.run([sys.executable, "-m", "nfq_ipsec_lab.bench.udpgso", "--count", str(SMOKE_COUNT),
                          "--rounds", "1", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    return {"stdout": res.stdout, "json": json.loads(out.read_text())}


def test_smoke_every_scenario_measured(smoke: dict[str, Any]) -> None:
    summary = smoke["json"]["summary"]
    assert list(summary) == [sc.name for sc in udpgso.scenarios(44)]
    for name, entry in summary.items():
        assert entry["pps"]["median"] > 0 and entry["send_cpu_us"]["median"] > 0, name
        assert 0 < entry["delivered"]["median"] <= 1, name
        assert entry["pps"]["ratio"] is not None, name
        assert name in smoke["stdout"]
    runs = {r["scenario"]: r for r in smoke["json"]["runs"]}
    for name, r in runs.items():
        assert r["send"]["sent"] == SMOKE_COUNT
        segment, gro = name.startswith("UDP_SEGMENT"), "-> UDP_GRO" in name
        assert r["send"]["calls"] == (-(-SMOKE_COUNT // 44) if segment else SMOKE_COUNT), name
        if segment and gro:
            assert r["per_recv"] > 10, name  # superpackets arrived whole
        elif not gro:
            assert r["per_recv"] == 1.0, name
        if "crypto none" not in name:
            assert r["recv"]["opened"] == r["recv"]["received"] > 0, name


def test_smoke_leaves_no_namespace(smoke: dict[str, Any]) -> None:
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    mine = [line for line in res.stdout.splitlines() if line.startswith(udpgso.PREFIX)]
    # other runs may exist; none of them is the smoke run's (whose pid is gone)
    assert all(procs.alive(int(line[len(udpgso.PREFIX):].split("-")[0])) for line in mine), mine

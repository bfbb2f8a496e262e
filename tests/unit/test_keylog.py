"""The key log for Wireshark (``daemon.key_log``, ``nfq_ipsec.keylog``): two agents in memory,
one with the key log on; its files are 0600 in a 0700 directory and hold the IKE SA's and the
Child SA pair's keys, and tshark, given the directory as its configuration, decrypts the
IKE_AUTH exchange they carried (the identities readable, and for AES-CBC the ICV correct). No
key reaches the log."""

from __future__ import annotations

import logging
import os
import random
import re
import stat
import struct
import subprocess
from pathlib import Path
from typing import Any

import gate
import pytest
from configs import CPUS, connection_data

from nfq_ipsec.agent import Agent, Send, agent_spec
from nfq_ipsec.config import parse_config
from nfq_ipsec.config.model import Config
from nfq_ipsec.keylog import ESP_FILE, IKE_FILE, KeyLog


def mirrored(tmp_path: Path, **conn: Any) -> tuple[Config, Config]:
    """Gateway a (192.0.2.1, starts) and b (192.0.2.2, waits), as in test_agent.py."""
    a = connection_data(tmp_path, start_action="start", **conn)
    b = connection_data(tmp_path, **conn)
    b["connection"][0].update(local="192.0.2.2", remote="192.0.2.1")
    b["policy"][1].update(local="10.2.0.0/24", remote="10.1.0.0/24")
    b["policy"][0].update(local="10.0.0.2/32", remote="10.0.0.1/32")
    b["sa"][0]["key"], b["sa"][1]["key"] = a["sa"][1]["key"], a["sa"][0]["key"]
    return (parse_config(a, base_dir=tmp_path, online_cpus=CPUS),
            parse_config(b, base_dir=tmp_path, online_cpus=CPUS))


def shuttle(a: Agent, b: Agent, sends: list[Send], now: float) -> None:
    """Carry datagrams between a and b (a sends first) until nobody sends."""
    queue = [(a, s) for s in sends]
    while queue:
        sender, (port, _, data) = queue.pop(0)
        to = b if sender is a else a
        src = next(iter(sender.conns.values())).spec.local
        queue += [(to, s) for s in to.receive(data, (src, port), port, now)]


def write_pcap(path: Path, messages: list[bytes]) -> None:
    """IKE messages in UDP port 500 between 192.0.2.1 and 192.0.2.2, LINKTYPE_RAW."""
    with path.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101))
        for i, msg in enumerate(messages):
            udp = struct.pack("!HHHH", 500, 500, 8 + len(msg), 0) + msg
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i, 0, 64, 17, 0,
                             bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])) + udp
            f.write(struct.pack("<IIII", 1_700_000_000 + i, 0, len(ip), len(ip)) + ip)


def make(cfg: Config, seed: int, key_log: KeyLog | None = None) -> Agent:
    spec = agent_spec(cfg)
    assert spec is not None
    rng = random.Random(seed)
    return Agent(spec, lambda n: bytes(rng.getrandbits(8) for _ in range(n)), 0.0,
                 clock=lambda: 1e9, key_log=key_log)


def up(tmp_path: Path, ike: str) -> tuple[Agent, Agent, Path, list[bytes]]:
    cfg_a, cfg_b = mirrored(tmp_path, ike=ike)
    directory = tmp_path / "keys"
    a, b = make(cfg_a, 1, KeyLog(directory)), make(cfg_b, 2)
    wire: list[bytes] = []

    def record(sends: list[Send]) -> list[Send]:
        wire.extend(data for _, _, data in sends)
        return sends

    # every datagram A sends and receives, in order, for the capture
    receive_a, receive_b = a.receive, b.receive
    a.receive = lambda data, src, port, now: record(receive_a(data, src, port, now))  # type: ignore[method-assign,assignment]
    b.receive = lambda data, src, port, now: record(receive_b(data, src, port, now))  # type: ignore[method-assign,assignment]
    shuttle(a, b, record(a.start(0.0)), 0.0)
    return a, b, directory, wire


@pytest.mark.parametrize("ike", ["aes256gcm16-prfsha256-x25519", "aes128-sha256-prfsha256-ecp256"])
def test_the_key_log_holds_the_negotiated_keys_and_tshark_decrypts_ike_auth_with_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, ike: str) -> None:
    caplog.set_level(logging.DEBUG, logger="nfq_ipsec")
    a, _, directory, wire = up(tmp_path, ike)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for name in (IKE_FILE, ESP_FILE):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600
    session = next(iter(a.conns["site"].dispatcher.sessions.values())).session
    keys = session.keys
    assert keys is not None
    (ike_line,) = (directory / IKE_FILE).read_text().splitlines()
    assert ike_line.startswith(f"{session.spi_i.hex()},{session.spi_r.hex()},{keys.sk_ei.hex()},"
                               f"{keys.sk_er.hex()},")
    child = a.messages[0][2]
    esp = (directory / ESP_FILE).read_text().splitlines()
    assert esp == [
        f'"IPv4","192.0.2.2","192.0.2.1","0x{child.spi_in:08x}","AES-GCM with 16 octet ICV [RFC4106]",'
        f'"0x{child.keys_in[0].hex()}","NULL",""',
        f'"IPv4","192.0.2.1","192.0.2.2","0x{child.spi_out:08x}","AES-GCM with 16 octet ICV [RFC4106]",'
        f'"0x{child.keys_out[0].hex()}","NULL",""']
    for secret in (keys.sk_ei, keys.sk_er, child.keys_in[0], child.keys_out[0]):
        assert secret.hex() not in caplog.text

    tshark = gate.tool("tshark", "tshark")
    pcap = tmp_path / "ike.pcap"
    write_pcap(pcap, wire)
    res = subprocess.run([tshark, "-n", "-r", str(pcap), "-V"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "LC_ALL": "C",
                                          "WIRESHARK_CONFIG_DIR": str(directory)})
    assert res.returncode == 0, res.stderr
    # both IKE_AUTH messages decrypted: each side's ID payload (ID_IPV4_ADDR) readable
    assert res.stdout.count("ID_IPV4_ADDR") >= 2, res.stdout[-3000:]
    assert "192.0.2.1" in res.stdout and "Traffic Selector" in res.stdout
    if "gcm" not in ike:
        assert len(re.findall(r"Integrity Checksum Data: [0-9a-f]+ .*\[correct\]", res.stdout)) >= 2
    # and without the key log tshark reads none of it
    res = subprocess.run([tshark, "-n", "-r", str(pcap), "-V"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "LC_ALL": "C",
                                          "WIRESHARK_CONFIG_DIR": str(tmp_path / "empty")})
    assert "ID_IPV4_ADDR" not in res.stdout


def test_the_key_log_is_written_only_when_asked_and_warned_about(tmp_path: Path) -> None:
    cfg_a, _ = mirrored(tmp_path)
    assert agent_spec(cfg_a).key_log is None  # type: ignore[union-attr]
    from nfq_ipsec.supervisor import ike_warnings

    report = {"state": "ready", "pid": 1, "restarts": 0, "last_error": None,
              "key_log": "/var/lib/keys", "connections": []}
    assert any("KEY LOG ON" in w and "/var/lib/keys" in w for w in ike_warnings(report))  # type: ignore[arg-type]
    report["key_log"] = None
    assert ike_warnings(report) == []  # type: ignore[arg-type]
    # an existing, looser directory and file are made 0700 and 0600
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    (loose / IKE_FILE).write_text("")
    os.chmod(loose / IKE_FILE, 0o644)
    KeyLog(loose)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700
    assert stat.S_IMODE((loose / IKE_FILE).stat().st_mode) == 0o600

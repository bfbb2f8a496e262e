"""peer-config: the mirror of one side's configuration is the other side's, checked and
written 0600; TOML written back reads as the same document."""

from __future__ import annotations

import os
import shutil
import stat
import tomllib
from pathlib import Path, PurePath
from typing import Any

import pytest

from nfq_ipsec.commands import main
from nfq_ipsec.config import Config, load_config, parse_config
from nfq_ipsec.config.mirror import mirror
from nfq_ipsec.config.tomlout import dumps

EXAMPLES = Path(__file__).resolve().parents[2] / "nfq_ipsec" / "examples"
PAIRS = ["host", "gateway", "host6"]


def _copy(tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copy(EXAMPLES / name, dst)
    dst.chmod(0o600)
    return dst


def _what_it_does(cfg: Config) -> tuple[object, ...]:
    """A configuration without its names and orders: each SA's parameters (keys revealed, for
    the comparison only) by SPI and direction, each policy's action and selector in order."""
    sas = sorted((sa.spi, sa.direction.value, sa.key.reveal(), sa.encryption, sa.mode.value,
                  sa.tunnel_local, sa.tunnel_remote, sa.queue, sa.esn) for sa in cfg.sas)
    pols = tuple((p.action.value, p.direction.value, p.selector) for p in cfg.policies)
    return (tuple(sas), pols, cfg.node.role, cfg.node.default_action)


@pytest.mark.parametrize("pair", PAIRS)
def test_the_mirror_of_a_is_b(pair: str, tmp_path: Path) -> None:
    """Each example pair: the mirror of side A does what side B does (same SAs with in and out
    swapped, the same selectors seen from B), and the mirror of the mirror is A again."""
    a = _copy(tmp_path, f"{pair}-a.toml")
    b = load_config(_copy(tmp_path, f"{pair}-b.toml"))
    out = tmp_path / f"{pair}-b-mirrored.toml"
    assert main(["peer-config", "-c", str(a), "-o", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    mirrored = load_config(out)
    assert _what_it_does(mirrored) == _what_it_does(b)
    back = mirror(tomllib.loads(out.read_text()), PurePath(out)).document
    assert _what_it_does(parse_config(back, base_dir=tmp_path)) == _what_it_does(load_config(a))


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_written_toml_reads_back_as_the_same_document(name: str) -> None:
    doc = tomllib.loads((EXAMPLES / name).read_text())
    text = dumps(doc, ["a header"])
    assert text.startswith("# a header\n")
    assert tomllib.loads(text) == doc
    assert "spi = 0x0000" in text  # SPIs in hex, as people write them


def test_what_swaps_and_what_stays() -> None:
    doc: dict[str, Any] = {
        "node": {"interface": "eth1"},
        "daemon": {"control_socket": "/run/nfq-ipsec/site-a.sock", "state_dir": "/var/lib/x/site-a"},
        "policy": [{"name": "p", "action": "protect", "direction": "out", "local": "10.0.0.1/32",
                    "remote": "10.0.0.2/32", "local_ports": 22, "protocol": "tcp", "sa": ["o"]}],
        "sa": [{"name": "o", "direction": "out", "spi": 0x1000, "mode": "tunnel",
                "tunnel_local": "192.0.2.1", "tunnel_remote": "192.0.2.2", "key_file": "keys/o.key",
                "encapsulation": "udp", "udp_source_port": 4500, "udp_destination_port": 4501}],
        "connection": [{"name": "c", "local": "192.0.2.1", "remote": "192.0.2.2",
                        "local_id": "a.example", "start_action": "start", "psk_file": "/etc/psk"}],
    }
    m = mirror(doc, PurePath("/etc/nfq/site-a.toml"), PurePath("/etc/nfq/peer/site-b.toml"), "eth9")
    d = m.document
    assert d["node"]["interface"] == "eth9"
    assert d["daemon"] == {"control_socket": "/run/nfq-ipsec/site-b.sock", "state_dir": "/var/lib/x/site-b"}
    pol = d["policy"][0]
    assert (pol["direction"], pol["local"], pol["remote"], pol["remote_ports"]) == (
        "in", "10.0.0.2/32", "10.0.0.1/32", 22)
    assert "local_ports" not in pol and pol["protocol"] == "tcp" and pol["sa"] == ["o"]
    sa = d["sa"][0]
    assert (sa["direction"], sa["tunnel_local"], sa["tunnel_remote"], sa["spi"]) == (
        "in", "192.0.2.2", "192.0.2.1", 0x1000)
    assert (sa["udp_source_port"], sa["udp_destination_port"]) == (4500, 4501)  # the packets' ports
    assert sa["key_file"] == "../keys/o.key"  # the same file, from where the mirror is written
    conn = d["connection"][0]
    assert (conn["local"], conn["remote"], conn["remote_id"], conn["start_action"]) == (
        "192.0.2.2", "192.0.2.1", "a.example", "none")
    assert "local_id" not in conn and conn["psk_file"] == "/etc/psk"
    assert any("start_action" in n for n in m.notes)
    assert doc["sa"][0]["direction"] == "out"  # the original is untouched


def test_key_files_still_load_from_another_directory(tmp_path: Path) -> None:
    (tmp_path / "a" / "keys").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    for d in (tmp_path, tmp_path / "a", tmp_path / "a" / "keys", tmp_path / "b"):
        d.chmod(0o700)
    text = (EXAMPLES / "host-a.toml").read_text()
    for name in ("a-to-b-0", "a-to-b-1", "b-to-a-0", "b-to-a-1"):
        start = text.index(f'name = "{name}"')
        key_at = text.index("key = ", start)
        end = text.index("\n", key_at)
        key = text[key_at + 7:end - 1]
        kf = tmp_path / "a" / "keys" / f"{name}.key"
        kf.write_text(key + "\n")
        kf.chmod(0o600)
        text = text[:key_at] + f'key_file = "keys/{name}.key"' + text[end:]
    a = tmp_path / "a" / "host-a.toml"
    a.write_text(text)
    a.chmod(0o600)
    out = tmp_path / "b" / "host-b.toml"
    assert main(["peer-config", "-c", str(a), "-o", str(out)]) == 0
    assert 'key_file = "../a/keys/a-to-b-0.key"' in out.read_text()
    b = load_config(out)
    assert {sa.name: sa.direction.value for sa in b.sas}["a-to-b-0"] == "in"


def test_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _copy(tmp_path, "host-a.toml")
    out = tmp_path / "exists.toml"
    out.write_text("keep me")
    assert main(["peer-config", "-c", str(a), "-o", str(out)]) == 1
    assert out.read_text() == "keep me" and "never overwritten" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nrole = 'moon'\n")
    bad.chmod(0o600)
    assert main(["peer-config", "-c", str(bad)]) == 2
    assert not (tmp_path / "bad-peer.toml").exists()


def test_printed_when_no_file_is_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _copy(tmp_path, "host-a.toml")
    assert main(["peer-config", "-c", str(a), "--interface", "eth7"]) == 0
    text = capsys.readouterr().out
    doc = tomllib.loads(text)
    assert doc["node"]["interface"] == "eth7"
    assert {sa["name"]: sa["direction"] for sa in doc["sa"]}["a-to-b-0"] == "in"
    assert "The peer of host-a.toml" in text.splitlines()[0]


def test_a_mirror_the_peer_would_refuse_is_not_written(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A key file this side reads through a path the mirror can't reach (its directory not
    ours to check) stops peer-config with the peer's problems, and nothing is written."""
    a = _copy(tmp_path, "host-a.toml")
    out = tmp_path / "elsewhere" / "host-b.toml"
    out.parent.mkdir(mode=0o777)
    os.chmod(out.parent, 0o777)  # writable by others: the peer's loader refuses key paths here
    text = a.read_text()
    kf = tmp_path / "k.key"
    kf.write_text("3f2b0a5c7e1d9f8a6b4c2e0d1a3b5c7d01020304\n")
    kf.chmod(0o600)
    a.write_text(text.replace('key = "0x3f2b0a5c7e1d9f8a6b4c2e0d1a3b5c7d01020304"', 'key_file = "k.key"'))
    assert load_config(a).sas[0].name == "a-to-b-0"  # this side reads it
    assert main(["peer-config", "-c", str(a), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "nothing written" in err and "elsewhere" in err and not out.exists()

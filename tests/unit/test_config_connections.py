"""``[[connection]]``: IKEv2 connections in the configuration, the policies that name them, and
every mistake reported at its location; the pre-shared key never shown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from configs import CPUS, PSK, connection_data, toml_text, write_psk

from nfq_ipsec.commands.offline import summary
from nfq_ipsec.config import load_config, parse_config
from nfq_ipsec.core.errors import ConfigError
from nfq_ipsec.core.sa import Mode
from nfq_ipsec.ike import proposal_text
from nfq_ipsec.ike.proposal import Encr, Group, Prf, Protocol, TransformType


def problems(data: dict[str, Any], base_dir: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, base_dir=base_dir, online_cpus=CPUS)
    return info.value.problems


def test_a_connection_loads_with_its_defaults(tmp_path: Path) -> None:
    cfg = parse_config(connection_data(tmp_path), base_dir=tmp_path, online_cpus=CPUS)
    (conn,) = cfg.connections
    assert (conn.name, conn.local_id, conn.remote_id, conn.policy) == (
        "site", "192.0.2.1", "192.0.2.2", "lans")
    assert conn.psk.reveal() == PSK.encode()  # the trailing newline is not part of it
    assert (conn.ike, conn.esp, conn.mode, conn.start_action) == (
        "aes128gcm16-prfsha256-x25519", "aes128gcm16", Mode.TUNNEL, "none")
    assert (conn.rekey_time, conn.ike_rekey_time, conn.dpd_delay, conn.encap) == (
        3600.0, 14400.0, 30.0, False)
    lans = next(p for p in cfg.policies if p.name == "lans")
    assert lans.sa_names == () and cfg.policy_connection(lans) is conn
    assert cfg.policy_connection(cfg.policies[0]) is None  # the static policy keeps its SAs
    assert [sa.name for sa in cfg.sas] == ["out0", "in0"]


def test_every_field_given(tmp_path: Path) -> None:
    data = connection_data(tmp_path, local_id="gw-a.example", remote_id="gw-b.example",
                           auth="psk", ike="aes256-sha384-ecp384", esp="aes256gcm16-x25519-esn",
                           start_action="start", rekey_time=60, ike_rekey_time=0, dpd_delay=5,
                           encap=True)
    conn = parse_config(data, base_dir=tmp_path, online_cpus=CPUS).connections[0]
    assert (conn.local_id, conn.remote_id, conn.start_action, conn.encap) == (
        "gw-a.example", "gw-b.example", "start", True)
    assert (conn.rekey_time, conn.ike_rekey_time, conn.dpd_delay) == (60.0, 0.0, 5.0)
    ike = conn.ike_proposal.proposals[0]
    assert ike.protocol is Protocol.IKE
    assert {(t.type, t.id) for t in ike.transforms} == {
        (TransformType.ENCR, Encr.AES_CBC), (TransformType.PRF, Prf.HMAC_SHA2_384),
        (TransformType.INTEG, 13), (TransformType.DH, Group.ECP_384)}
    esp = conn.esp_proposal.proposals[0]
    assert {(t.type, t.id) for t in esp.transforms} == {
        (TransformType.ENCR, Encr.AES_GCM_16), (TransformType.DH, Group.CURVE25519),
        (TransformType.ESN, 1)}


def test_the_psk_never_shows(tmp_path: Path) -> None:
    cfg = parse_config(connection_data(tmp_path), base_dir=tmp_path, online_cpus=CPUS)
    assert PSK not in repr(cfg) and PSK not in str(cfg.connections[0])
    data = connection_data(tmp_path, ike="aes128gcm16-md5-x25519")
    write_psk(tmp_path, text="tiny-secret")
    data["connection"][0]["dpd_delay"] = "x"
    found = problems(data, tmp_path)
    assert len(found) == 3, found
    assert not any("tiny-secret" in p for p in found)


def test_psk_file_must_be_private_and_long_enough(tmp_path: Path) -> None:
    data = connection_data(tmp_path)
    path = write_psk(tmp_path, mode=0o640)
    assert problems(data, tmp_path) == [
        f"connection[0].psk_file: {path} is readable by group or others (mode 0640); run chmod "
        "600 on it"]
    write_psk(tmp_path, text="0123456789abcde")
    assert problems(data, tmp_path) == [
        f"connection[0].psk_file: {path}: the key is 15 bytes; at least 16 (a short pre-shared "
        "key can be guessed offline from one exchange)"]
    write_psk(tmp_path, text="0x00112233445566778899aabbccddeeff")
    conn = parse_config(data, base_dir=tmp_path, online_cpus=CPUS).connections[0]
    assert conn.psk.reveal() == bytes.fromhex("00112233445566778899aabbccddeeff")
    write_psk(tmp_path, text="0xnothexnothexnothex")
    assert problems(data, tmp_path) == [f"connection[0].psk_file: {path}: starts with 0x but is not hex"]
    data["connection"][0]["psk_file"] = "missing.psk"
    (found,) = problems(data, tmp_path)
    assert found.startswith("connection[0].psk_file: ") and "No such file" in found
    del data["connection"][0]["psk_file"]
    assert problems(data, tmp_path) == ['connection[0].psk_file: required (auth = "psk")']


def test_an_inline_psk_is_refused(tmp_path: Path) -> None:
    data = connection_data(tmp_path, psk="an inline pre-shared key")
    found = problems(data, tmp_path)
    assert found[0].startswith("connection[0].psk: a pre-shared key is never written in the "
                               "configuration"), found
    assert not any("an inline pre-shared key" in p for p in found)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("ike", "aes128gcm16-prfsha256-modp1024", "connection[0].ike: modp1024 is refused: MODP "
     "groups below 3072 bits are SHOULD NOT or MUST NOT in RFC 8247; use x25519"),
    ("ike", "3des-sha256-x25519", "connection[0].ike: 3des is refused: 3DES is MAY in RFC 8247 "
     "only for old peers (64-bit block); use aes128gcm16"),
    ("esp", "aes128-sha1", "connection[0].esp: sha1 is refused: HMAC-SHA1 is MUST- in RFC 8247 "
     "and refused here; use sha256"),
    ("esp", "aes128gcm8", "connection[0].esp: aes128gcm8 is refused: AES-GCM with an 8-octet ICV "
     "is SHOULD NOT in RFC 8247; use aes128gcm16"),
    ("ike", "aes128gcm16-prfsha256", "connection[0].ike: 'aes128gcm16-prfsha256': an IKE proposal "
     "needs a DH group (x25519, curve25519, ecp256, ecp384)"),
    ("ike", "aes128gcm16-x25519", "connection[0].ike: 'aes128gcm16-x25519': an AEAD IKE proposal "
     "needs a PRF (prfsha256, prfsha384, prfsha512)"),
    ("esp", "aes256", "connection[0].esp: 'aes256': AES-CBC needs one integrity algorithm "
     "(sha256, sha384, sha512)"),
    ("esp", "aes256gcm16-sha256", "connection[0].esp: 'aes256gcm16-sha256': an AEAD "
     "(aes256gcm16) takes no separate integrity algorithm"),
    ("esp", "aes128gcm16-prfsha256", "connection[0].esp: 'aes128gcm16-prfsha256': an ESP "
     "proposal takes no PRF"),
    ("esp", "sha256", "connection[0].esp: 'sha256' needs exactly one encryption algorithm "
     "(aes128gcm16, aes192gcm16, aes256gcm16, chacha20poly1305, aes128, aes192, aes256), got 0"),
    ("esp", "aes128gcm16--x25519", "connection[0].esp: 'aes128gcm16--x25519' is not a proposal "
     "(words joined by '-', for example aes128gcm16-prfsha256-x25519)"),
    ("ike", "aes128gcm16-prfsha256-x448", "connection[0].ike: unknown word 'x448' in "
     "'aes128gcm16-prfsha256-x448' (known: aes128gcm16, aes192gcm16, aes256gcm16, "
     "chacha20poly1305, aes128, aes192, aes256, sha256, sha384, sha512, x25519, curve25519, "
     "ecp256, ecp384, prfsha256, prfsha384, prfsha512)"),
    ("start_action", "restart", "connection[0].start_action: must be one of start, trap, none, "
     "got 'restart'"),
    ("auth", "pubkey", "connection[0].auth: must be one of psk, got 'pubkey'"),
    ("mode", "beet", "connection[0].mode: must be one of transport, tunnel, got 'beet'"),
    ("rekey_time", 5, "connection[0].rekey_time: must be 0 (never) or 10..604800 seconds, got 5"),
    ("ike_rekey_time", True, "connection[0].ike_rekey_time: must be a number of seconds, not a "
     "boolean"),
    ("dpd_delay", 7200, "connection[0].dpd_delay: must be 0 (none) or 1..3600 seconds, got 7200"),
    ("encap", "yes", "connection[0].encap: must be bool, got str"),
    ("local", "192.0.2.300", "connection[0].local: not an IPv4 or IPv6 address: '192.0.2.300'"),
    ("remote", "2001:db8::2", "connection[0].remote: local and remote must be of one family"),
    ("remote", "192.0.2.1", "connection[0].remote: the peer's address is this end's own"),
    ("local_id", "two words", "connection[0].local_id: must be an IP address or a name of 1..255 "
     "printable characters without spaces"),
    ("remote_id", "", "connection[0].remote_id: must be an IP address or a name of 1..255 "
     "printable characters without spaces"),
    ("rekey", 60, "connection[0].rekey: unknown field (known: auth, dpd_delay, encap, esp, ike, "
     "ike_life_time, ike_rekey_time, life_time, local, local_id, mode, name, psk_file, "
     "rekey_time, remote, remote_id, start_action)"),
    ("life_time", 3600, "connection[0].life_time: must be more than the rekey time (3600 s), "
     "got 3600"),
    ("ike_life_time", 5, "connection[0].ike_life_time: must be 0 (none) or 10..604800 seconds, "
     "more than `ike_rekey_time`, got 5"),
])
def test_field_errors(tmp_path: Path, field: str, value: Any, message: str) -> None:
    assert problems(connection_data(tmp_path, **{field: value}), tmp_path) == [message]


def test_hard_lifetimes_default_to_the_rekey_times_and_ten_percent(tmp_path: Path) -> None:
    from nfq_ipsec.config import parse_config

    conn = parse_config(connection_data(tmp_path, rekey_time=100, ike_rekey_time=0),
                        base_dir=tmp_path, online_cpus=[0]).connections[0]
    assert (conn.life_time, conn.ike_life_time) == (110.0, 0.0)  # none without rekeys
    conn = parse_config(connection_data(tmp_path, rekey_time=100, life_time=0, start_action="trap"),
                        base_dir=tmp_path, online_cpus=[0]).connections[0]
    assert (conn.life_time, conn.start_action) == (0.0, "trap")


def test_required_fields(tmp_path: Path) -> None:
    data = connection_data(tmp_path)
    for key in ("name", "local", "remote"):
        del data["connection"][0][key]
    data["policy"][1]["connection"] = "site"
    found = problems(data, tmp_path)
    assert "connection[0].name: required" in found
    assert "connection[0].local: required: an IPv4 or IPv6 address" in found
    assert "connection[0].remote: required: an IPv4 or IPv6 address" in found
    assert "policy[1].connection: unknown connection 'site'" in found


def test_encap_is_ipv4_only(tmp_path: Path) -> None:
    data = connection_data(tmp_path, local="2001:db8::1", remote="2001:db8::2", encap=True)
    assert problems(data, tmp_path) == ["connection[0].encap: ESP in UDP is IPv4 only (RFC 3948)"]


def test_duplicate_names(tmp_path: Path) -> None:
    data = connection_data(tmp_path)
    data["connection"].append(dict(data["connection"][0], remote="192.0.2.3"))
    assert "connection[1].name: duplicate name 'site' (also connection[0])" in problems(data, tmp_path)


def test_policy_names_a_connection(tmp_path: Path) -> None:
    data = connection_data(tmp_path)
    data["policy"][1]["connection"] = "elsewhere"
    assert problems(data, tmp_path) == [
        "policy[1].connection: unknown connection 'elsewhere' (known: site)"]
    data = connection_data(tmp_path)
    data["policy"][1]["sa"] = ["out0"]
    found = problems(data, tmp_path)
    assert found[0] == ("policy[1].connection: give sa or connection, not both (a connection's "
                        "policy is carried by the Child SAs it negotiates)"), found
    data = connection_data(tmp_path)
    data["policy"][1].update(action="bypass")
    assert problems(data, tmp_path) == ["policy[1].connection: a bypass policy takes no connection"]
    data = connection_data(tmp_path)
    del data["policy"][1]["connection"]
    assert problems(data, tmp_path) == [
        "policy[1].sa: a protect policy needs at least one SA, or a connection"]
    data = connection_data(tmp_path)
    data["policy"][1]["connection"] = ""
    assert "policy[1].connection: must name a [[connection]]" in problems(data, tmp_path)


def test_a_connections_policy(tmp_path: Path) -> None:
    data = connection_data(tmp_path)
    data["policy"][1]["direction"] = "out"
    assert problems(data, tmp_path) == [
        "policy[1].direction: a policy carried by a connection protects both directions (its "
        "Child SAs come in pairs)"]
    data = connection_data(tmp_path)
    data["policy"][1].update(protocol="tcp", remote_ports=443)
    assert problems(data, tmp_path) == [
        "policy[1].connection: a connection's policy selects by local and remote only: protocols "
        "and ports in traffic selectors are not supported yet"]
    data = connection_data(tmp_path)
    data["policy"].append(dict(data["policy"][1], name="more", remote="10.3.0.0/24"))
    assert problems(data, tmp_path) == [
        "policy[2].connection: connection 'site' already carries policy 'lans'; a connection "
        "carries one policy"]
    data = connection_data(tmp_path, mode="transport")
    assert problems(data, tmp_path) == [
        "policy[1].local: connection 'site' is transport mode: the policy's local must be the "
        "connection's local address alone",
        "policy[1].remote: connection 'site' is transport mode: the policy's remote must be the "
        "connection's remote address alone"]
    data["policy"][1].update(local="192.0.2.1/32", remote="192.0.2.2/32")
    conn = parse_config(data, base_dir=tmp_path, online_cpus=CPUS).connections[0]
    assert conn.mode is Mode.TRANSPORT and conn.policy == "lans"


def test_a_connection_no_policy_names_is_a_warning(tmp_path: Path) -> None:
    data = connection_data(tmp_path)
    data["policy"].pop()
    cfg = parse_config(data, base_dir=tmp_path, online_cpus=CPUS)
    assert cfg.connections[0].policy == ""
    assert ("connection 'site': no policy names it; its Child SAs would carry no traffic"
            in cfg.warnings)


def test_a_file_with_connections_loads(tmp_path: Path) -> None:
    conf = tmp_path / "gw.toml"
    conf.write_text(toml_text(connection_data(tmp_path)))
    conf.chmod(0o600)
    cfg = load_config(conf, online_cpus=CPUS)
    assert [c.name for c in cfg.connections] == ["site"]


@pytest.mark.parametrize(("text", "protocol", "transforms"), [
    ("aes128gcm16-prfsha256-x25519", Protocol.IKE, [(1, 20, 128), (2, 5, None), (4, 31, None)]),
    ("aes256-sha512-ecp256", Protocol.IKE, [(1, 12, 256), (2, 7, None), (3, 14, None),
                                            (4, 19, None)]),
    ("chacha20poly1305-prfsha512-ecp384", Protocol.IKE, [(1, 28, None), (2, 7, None),
                                                         (4, 20, None)]),
    ("aes128-sha256", Protocol.ESP, [(1, 12, 128), (3, 12, None), (5, 0, None)]),
    ("AES256GCM16-ESN", Protocol.ESP, [(1, 20, 256), (5, 1, None)]),
])
def test_proposal_strings(text: str, protocol: Protocol,
                          transforms: list[tuple[int, int, int | None]]) -> None:
    (prop,) = proposal_text.parse(text, protocol).proposals
    assert prop.protocol is protocol
    assert [(t.type, t.id, t.key_length) for t in prop.transforms] == transforms


def test_check_config_shows_connections(tmp_path: Path) -> None:
    cfg = parse_config(connection_data(tmp_path, rekey_time=60, dpd_delay=0), base_dir=tmp_path,
                       online_cpus=CPUS)
    text = summary(cfg)
    assert "both via connection site (negotiated Child SAs; dropped until one is up)" in text
    assert ("  site             192.0.2.1 (192.0.2.1) <-> 192.0.2.2 (192.0.2.2) ike "
            "aes128gcm16-prfsha256-x25519 esp aes128gcm16 tunnel; start none; rekey 60 s, "
            "IKE rekey 14400 s, no dpd") in text
    assert PSK not in text

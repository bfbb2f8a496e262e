"""Configuration loading: every mistake reported at once, with its location; keys stay secret."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from repo import EXAMPLES

from nfq_ipsec.config import load_config, parse_config
from nfq_ipsec.core import ipv6
from nfq_ipsec.core.errors import ConfigError
from nfq_ipsec.core.sa import Mode, SADirection
from nfq_ipsec.core.spd import Action

KEY20 = "00112233445566778899aabbccddeeff01020304"
KEY20B = "0f1e2d3c4b5a69788796a5b4c3d2e1f0a1a2a3a4"
CPUS = [0, 1]


def base() -> dict[str, Any]:
    return {
        "node": {"interface": "eth1"},
        "daemon": {"queues": [100, 101], "cpus": [0, 1]},
        "policy": [
            {"name": "p", "action": "protect", "local": "10.0.0.1/32", "remote": "10.0.0.2/32",
             "sa": ["out0", "in0"]},
        ],
        "sa": [
            {"name": "out0", "direction": "out", "spi": 0x1000, "encryption": "aes-gcm-128",
             "key": KEY20, "queue": 100},
            {"name": "in0", "direction": "in", "spi": 0x2000, "encryption": "aes-gcm-128",
             "key": KEY20B, "queue": 100},
        ],
    }


def problems(data: dict[str, Any], base_dir: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, base_dir=base_dir, online_cpus=CPUS)
    return info.value.problems


@pytest.mark.parametrize("name", ["host-a", "host-b", "gateway-a", "gateway-b", "host6-a", "host6-b"])
def test_examples_load(name: str) -> None:
    cfg = load_config(EXAMPLES / f"{name}.toml", online_cpus=CPUS)
    assert cfg.policies and cfg.sas
    for sa in cfg.sas:
        assert sa.queue in cfg.queue_numbers


def test_example_pairs_mirror_each_other() -> None:
    for a_name, b_name in (("host-a", "host-b"), ("gateway-a", "gateway-b"), ("host6-a", "host6-b")):
        a = load_config(EXAMPLES / f"{a_name}.toml", online_cpus=CPUS)
        b = load_config(EXAMPLES / f"{b_name}.toml", online_cpus=CPUS)
        for sa in a.sas:
            twin = b.sa(sa.name)
            assert twin.spi == sa.spi and twin.key == sa.key and twin.direction != sa.direction
            assert (twin.tunnel_local, twin.tunnel_remote) == (sa.tunnel_remote, sa.tunnel_local)
        for pa, pb in zip(a.policies, b.policies, strict=True):
            assert (pa.selector.local, pa.selector.remote) == (pb.selector.remote, pb.selector.local)


def test_an_ipv6_policy_takes_its_family_from_what_it_names() -> None:
    data = base()
    data["policy"][0].update(local="any", remote="2001:db8::/32")
    data["policy"].insert(0, {"name": "echo6", "action": "bypass", "protocol": "ipv6-icmp",
                              "icmp_type": 128})
    data["policy"].insert(0, {"name": "icmp4", "action": "bypass", "protocol": "icmp"})
    cfg = parse_config(data, online_cpus=CPUS)
    icmp4, echo6, p = (pol.selector for pol in cfg.policies)
    assert (str(icmp4.local), icmp4.v6) == ("0.0.0.0/0", False)
    assert (str(echo6.local), str(echo6.remote), echo6.protocol, echo6.v6) == ("::/0", "::/0", 58, True)
    assert (str(p.local), str(p.remote), p.v6) == ("::/0", "2001:db8::/32", True)


def test_ipv6_tunnel_endpoints_are_marked_ints() -> None:
    data = base()
    for sa in data["sa"]:
        sa.update(mode="tunnel", tunnel_local="2001:db8::1", tunnel_remote="2001:db8::2")
    cfg = parse_config(data, online_cpus=CPUS)
    assert cfg.sa("out0").tunnel_local == ipv6.V6 | 0x20010DB8000000000000000000000001


def test_valid_base_parses() -> None:
    cfg = parse_config(base(), online_cpus=CPUS)
    assert [p.action for p in cfg.policies] == [Action.PROTECT]
    assert cfg.sa("out0").direction is SADirection.OUT and cfg.sa("out0").mode is Mode.TRANSPORT
    assert cfg.sas_for_queue(101) == ()
    assert [s.name for s in cfg.sas_for_queue(100)] == ["out0", "in0"]


def test_key_length_message_names_location_and_sizes() -> None:
    data = base()
    data["sa"][1]["key"] = "00" * 16
    assert problems(data) == ["sa[1].key: aes-gcm-128 needs 20 bytes (16 key + 4 salt), got 16"]


def test_every_problem_reported_at_once() -> None:
    data = base()
    data["sa"][0]["spi"] = 100
    data["sa"][1]["encryption"] = "3des"
    data["policy"][0]["protocol"] = "bogus"
    data["daemon"]["cpus"] = [0, 7]
    data["node"]["mtu"] = 10
    found = problems(data)
    expect = ["sa[0].spi", "sa[1].encryption", "policy[0].protocol", "daemon.cpus[1]", "node.mtu"]
    for where in expect:
        assert any(p.startswith(where + ":") for p in found), (where, found)
    assert any("RFC 8221" in p for p in found)
    assert any("CPU 7 is not online" in p for p in found)


@pytest.mark.parametrize(
    ("edit", "where", "text"),
    [
        (lambda d: d["sa"].append(dict(d["sa"][1], name="in1")), "sa[2].spi", "duplicate inbound SPI"),
        (lambda d: d["sa"].append(dict(d["sa"][1])), "sa[2].name", "duplicate name"),
        (lambda d: d["sa"][0].update(encryption="des"), "sa[0].encryption", "MUST NOT"),
        (lambda d: d["sa"][0].update(encryption="aes-cbc-128", key="00" * 16), "sa[0].encryption",
         "needs an integrity algorithm"),
        (lambda d: d["sa"][0].update(encryption="null", integrity="hmac-sha256-128",
                                     integrity_key="00" * 32, key=None) or d["sa"][0].pop("key"),
         None, None),
        (lambda d: d["sa"][0].update(integrity="hmac-md5-96"), "sa[0].integrity", "MUST NOT"),
        (lambda d: d["sa"][0].update(mode="tunnel"), "sa[0].tunnel_local", "required in tunnel mode"),
        (lambda d: d["sa"][0].update(queue=5), "sa[0].queue", "not in daemon.queues"),
        (lambda d: d["sa"][0].update(replay_window=16), "sa[0].replay_window", "32..4096"),
        (lambda d: d["sa"][0].update(key="zz"), "sa[0].key", "not a hex string"),
        (lambda d: d["sa"][0].update(colour="blue"), "sa[0].colour", "unknown field"),
        (lambda d: d["policy"][0].update(sa=["nope", "in0"]), "policy[0].sa", "unknown SA 'nope'"),
        (lambda d: d["policy"][0].update(local_ports=80), "policy[0].local_ports", "need protocol"),
        (lambda d: d["policy"][0].update(local="10.0.0.1/8"), "policy[0].local",
             "IPv4 or IPv6 prefix"),
            (lambda d: d["policy"][0].update(local="2001:db8::1/128"), "policy[0].remote",
             "one family"),
            (lambda d: d["policy"][0].update(protocol="ipv6-icmp"), "policy[0].protocol",
             'ICMP is protocol = "icmp"'),
            (lambda d: d["policy"][0].update(local="2001:db8::1/128", remote="any",
                                             protocol="icmp"),
             "policy[0].protocol", 'ICMP is protocol = "ipv6-icmp"'),
            (lambda d: d["policy"][0].update(protocol="ipv6-icmp", local="any", remote="any",
                                             icmp_type=128), None, None),
            (lambda d: d["sa"][0].update(mode="tunnel", tunnel_local="192.0.2.1",
                                         tunnel_remote="2001:db8::2"),
             "sa[0].tunnel_remote", "one family"),
            (lambda d: d["sa"][0].update(tunnel_local="2001:db8::1::2", mode="tunnel",
                                         tunnel_remote="2001:db8::2"),
             "sa[0].tunnel_local", "IPv4 or IPv6 address"),
        (lambda d: d["policy"][0].update(action="encrypt"), "policy[0].action", "must be one of"),
        (lambda d: d["policy"][0].update(sa=["in0"]), "policy[0].sa", "no outbound SA"),
        (lambda d: d["policy"].append(dict(d["policy"][0], name="q", sa=[])) or
         d["policy"][1].update(action="bypass"), "policy[1]", "unreachable"),
        (lambda d: d["daemon"].update(queues=[1, 1]), "daemon.queues[1]", "listed twice"),
        (lambda d: d["daemon"].update(mark=3), "daemon.mark", "single bit"),
        (lambda d: d["node"].update(role="gateway", interface=None) or d["node"].pop("interface"),
         "node.interface", "gateway must name"),
        (lambda d: d.update(extra={}), "extra", "unknown section"),
    ],
)
def test_single_mistakes(edit: Any, where: str | None, text: str | None) -> None:
    data = base()
    edit(data)
    if where is None:
        parse_config(data, online_cpus=CPUS)  # valid variant: must not raise
        return
    found = problems(data)
    assert any(p.startswith(where + ":") and text in p for p in found), found  # type: ignore[operator]


def test_errors_never_show_key_material() -> None:
    data = base()
    secret_hex = "ab" * 19  # wrong length: 19 bytes
    data["sa"][0]["key"] = secret_hex
    found = problems(data)
    assert found and all(secret_hex not in p and secret_hex[:8] not in p for p in found)
    cfg = parse_config(base(), online_cpus=CPUS)
    assert KEY20 not in repr(cfg) and KEY20[:8] not in str(cfg)


def test_key_file_must_be_private(tmp_path: Path) -> None:
    key = tmp_path / "k.key"
    key.write_text(KEY20 + "\n")
    data = base()
    data["sa"][0].pop("key")
    data["sa"][0]["key_file"] = "k.key"
    os.chmod(key, 0o644)
    found = problems(data, base_dir=tmp_path)
    assert found == [f"sa[0].key_file: {key} is readable by group or others (mode 0644); run chmod 600 on it"]
    os.chmod(key, 0o600)
    cfg = parse_config(data, base_dir=tmp_path, online_cpus=CPUS)
    assert cfg.sa("out0").key.reveal() == bytes.fromhex(KEY20)


def test_missing_key_file_and_both_forms(tmp_path: Path) -> None:
    data = base()
    data["sa"][0]["key_file"] = "missing.key"
    data["sa"][1].pop("key")
    data["sa"][1]["key_file"] = "missing.key"
    found = problems(data, base_dir=tmp_path)
    assert any(p.startswith("sa[0].key:") and "not both" in p for p in found)
    assert any(p.startswith("sa[1].key_file:") and "No such file" in p for p in found)


def test_load_config_reports_bad_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[node\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, online_cpus=CPUS)
    assert "not valid TOML" in info.value.problems[0]


def test_inline_keys_in_readable_file_warn(tmp_path: Path) -> None:
    src = (EXAMPLES / "host-a.toml").read_text()
    path = tmp_path / "c.toml"
    path.write_text(src)
    os.chmod(path, 0o644)
    assert any("inline keys" in w for w in load_config(path, online_cpus=CPUS).warnings)
    os.chmod(path, 0o600)
    assert not any("inline keys" in w for w in load_config(path, online_cpus=CPUS).warnings)


def test_default_queues_follow_online_cpus() -> None:
    data = base()
    data["daemon"] = {}
    for sa in data["sa"]:
        sa.pop("queue")
    cfg = parse_config(data, online_cpus=[0, 1, 2])
    assert [(q.num, q.cpu) for q in cfg.daemon.queues] == [(100, 0), (101, 1), (102, 2)]
    assert {sa.queue for sa in cfg.sas} == {100}


def test_watchdog_default_value_and_off() -> None:
    assert parse_config(base(), online_cpus=CPUS).daemon.watchdog == 10.0
    for given, want in ((2, 2.0), (2.5, 2.5), (0, 0.0), (3600, 3600.0)):
        data = base()
        data["daemon"]["watchdog"] = given
        assert parse_config(data, online_cpus=CPUS).daemon.watchdog == want


@pytest.mark.parametrize("value,message", [
    (-1, "must be 0 (off) or 1..3600 seconds, got -1"),
    (0.5, "must be 0 (off) or 1..3600 seconds, got 0.5"),
    (5000, "must be 0 (off) or 1..3600 seconds, got 5000"),
    (True, "must be a number of seconds, not a boolean"),
    ("10", "must be int or float, got str"),
])
def test_watchdog_rejects(value: object, message: str) -> None:
    data = base()
    data["daemon"]["watchdog"] = value
    assert f"daemon.watchdog: {message}" in problems(data)


def test_busy_poll_default_and_values() -> None:
    assert parse_config(base(), online_cpus=CPUS).daemon.busy_poll == 0
    for given in (0, 1, 200, 10_000):
        data = base()
        data["daemon"]["busy_poll"] = given
        assert parse_config(data, online_cpus=CPUS).daemon.busy_poll == given


@pytest.mark.parametrize("value,message", [
    (-1, "must be 0 (off) or up to 10000 microseconds, got -1"),
    (10_001, "must be 0 (off) or up to 10000 microseconds, got 10001"),
    (0.5, "must be int, got float"),
    ("200", "must be int, got str"),
])
def test_busy_poll_rejects(value: object, message: str) -> None:
    data = base()
    data["daemon"]["busy_poll"] = value
    assert f"daemon.busy_poll: {message}" in problems(data)


# -- one key, one SA ---------------------------------------------------------------------------
KEY32 = "11" * 32
KEY32B = "22" * 32


def cbc(sa: dict[str, Any], key: str, ikey: str) -> None:
    sa.update(encryption="aes-cbc-256", key=key, integrity="hmac-sha256-128", integrity_key=ikey)


@pytest.mark.parametrize(("edit", "where", "other"), [
    # an inbound and an outbound SA (the peers would both use the same nonces)
    (lambda d: d["sa"][1].update(key=KEY20), "sa[1].key", "sa[0].key"),
    # two SAs of the same direction
    (lambda d: d["sa"].append(dict(d["sa"][0], name="out1", spi=0x1001, queue=101))
     or d["policy"][0]["sa"].append("out1"), "sa[2].key", "sa[0].key"),
    # integrity keys shared
    (lambda d: cbc(d["sa"][0], KEY32, "33" * 32) or cbc(d["sa"][1], KEY32B, "33" * 32),  # type: ignore[func-returns-value]
     "sa[1].integrity_key", "sa[0].integrity_key"),
    # one SA's encryption key as another's integrity key
    (lambda d: cbc(d["sa"][0], KEY32, "33" * 32) or cbc(d["sa"][1], "44" * 32, KEY32),  # type: ignore[func-returns-value]
     "sa[1].integrity_key", "sa[0].key"),
    # one SA's own two keys
    (lambda d: cbc(d["sa"][0], KEY32, KEY32), "sa[0].integrity_key", "sa[0].key"),
])
def test_a_key_shared_by_two_sas_is_refused(edit: Any, where: str, other: str) -> None:
    data = base()
    edit(data)
    found = problems(data)
    assert f"{where}: the same key as {other}; every SA needs keys of its own" in found[0], found
    for p in found:
        for secret in (KEY20, KEY32, KEY32B, "33" * 32):
            assert secret not in p and secret[:8] not in p


def test_shared_key_reported_with_every_other_problem_and_key_files(tmp_path: Path) -> None:
    (tmp_path / "k1.key").write_text(KEY20 + "\n")
    (tmp_path / "k1.key").chmod(0o600)
    data = base()
    data["sa"][0].pop("key")
    data["sa"][0]["key_file"] = "k1.key"  # the same bytes as ...
    data["sa"][1]["key"] = "0x" + KEY20.upper()  # ... this inline key, spelled otherwise
    data["sa"][1]["replay_window"] = 16
    data["sa"].append(dict(data["sa"][1], name="in1", spi=0x2001, replay_window=128))
    data["policy"][0]["sa"].append("in1")
    data["node"]["mtu"] = 10
    found = problems(data, base_dir=tmp_path)
    assert "sa[1].key: the same key as sa[0].key_file;" in " ".join(found), found
    assert any(p.startswith("sa[2].key: the same key as sa[0].key_file;") for p in found)
    assert any(p.startswith("sa[1].replay_window:") for p in found)
    assert any(p.startswith("node.mtu:") for p in found)


def test_distinct_keys_and_null_encryption_pass() -> None:
    data = base()
    cbc(data["sa"][0], KEY32, "33" * 32)
    data["sa"][1].update(encryption="null", integrity="hmac-sha256-128", integrity_key="44" * 32)
    data["sa"][1].pop("key")
    parse_config(data, online_cpus=CPUS)


# -- files only the daemon's user controls ---------------------------------------------------------
OTHER_UID = 65534


def key_file_config(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    key = tmp_path / "k.key"
    key.write_text(KEY20 + "\n")
    key.chmod(0o600)
    data = base()
    data["sa"][0].pop("key")
    data["sa"][0]["key_file"] = "k.key"
    return data, key


@pytest.mark.root
@pytest.mark.parametrize(("damage", "text"), [
    ("owner", f"is owned by uid {OTHER_UID}, not by uid 0 that runs nfq-ipsec"),
    ("group-write", "is writable by group or others (mode 0620)"),
    ("symlink", "is a symbolic link"),
    ("fifo", "is not a regular file"),
])
def test_key_file_others_control_is_refused(tmp_path: Path, damage: str, text: str) -> None:
    data, key = key_file_config(tmp_path)
    if damage == "owner":
        os.chown(key, OTHER_UID, OTHER_UID)
    elif damage == "group-write":
        key.chmod(0o620)
    elif damage == "symlink":
        key.rename(tmp_path / "real.key")
        key.symlink_to(tmp_path / "real.key")
    else:
        key.unlink()
        os.mkfifo(key, 0o600)  # would block a plain open for reading
    found = problems(data, base_dir=tmp_path)
    assert len(found) == 1 and found[0].startswith(f"sa[0].key_file: {key} {text}"), found


@pytest.mark.root
@pytest.mark.parametrize(("damage", "text"), [
    ("owner", f"is owned by uid {OTHER_UID}, not by uid 0 that runs nfq-ipsec"),
    ("group-write", "is writable by group or others (mode 0664)"),
    ("other-write", "is writable by group or others (mode 0602)"),
    ("symlink", "is a symbolic link"),
])
def test_config_file_others_control_is_refused(tmp_path: Path, damage: str, text: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text((EXAMPLES / "host-a.toml").read_text())
    path.chmod(0o600)
    load_config(path, online_cpus=CPUS)  # as written: accepted
    if damage == "owner":
        os.chown(path, OTHER_UID, OTHER_UID)
    elif damage == "group-write":
        path.chmod(0o664)
    elif damage == "other-write":
        path.chmod(0o602)
    else:
        path.rename(tmp_path / "real.toml")
        path.symlink_to(tmp_path / "real.toml")
    with pytest.raises(ConfigError) as info:
        load_config(path, online_cpus=CPUS)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}: refused: {path} {text}"), problem


def test_config_readable_by_others_is_still_accepted(tmp_path: Path) -> None:
    """Readable is a warning for inline keys (as before); only writable is refused."""
    path = tmp_path / "c.toml"
    path.write_text((EXAMPLES / "host-a.toml").read_text())
    path.chmod(0o644)
    assert any("inline keys" in w for w in load_config(path, online_cpus=CPUS).warnings)


def test_an_idle_queue_and_an_implicit_selector_are_warned_about() -> None:
    data = base()  # queue 101 has no SA
    cfg = parse_config(data, online_cpus=CPUS)
    assert cfg.warnings == ("daemon.queues: no SA lives on queue 101; its worker will idle (give "
                            "it SAs with queue = 101, or leave it out of daemon.queues)",)
    data["sa"][1]["queue"] = 101
    del data["policy"][0]["remote"]
    data["policy"].append({"name": "dns", "action": "bypass", "remote": "any", "local": "any",
                           "protocol": "udp", "remote_ports": "53"})
    cfg = parse_config(data, online_cpus=CPUS)
    assert cfg.warnings == ("policy[0] 'p': no remote given, so it covers every IPv4 address on "
                            "that side (0.0.0.0/0); write remote = \"any\" to mean it",)
    assert cfg.policies[0].selector.remote.prefixlen == 0  # the behaviour is unchanged


def _file_without_socket(tmp_path: Path, name: str, socket_line: str = "") -> Path:
    from configs import host_data, toml_text

    data = host_data()
    text = toml_text(data).replace("[daemon]\n", f"[daemon]\n{socket_line}", 1)
    p = tmp_path / name
    p.write_text(text)
    p.chmod(0o600)
    return p


def test_the_default_control_socket_is_named_after_the_file(tmp_path: Path) -> None:
    """Two daemons of two files don't share a control socket unless told to."""
    site = load_config(_file_without_socket(tmp_path, "site.toml"), online_cpus=[0])
    lab = load_config(_file_without_socket(tmp_path, "lab2.toml"), online_cpus=[0])
    assert site.daemon.control_socket == "/run/nfq-ipsec/site.sock"
    assert lab.daemon.control_socket == "/run/nfq-ipsec/lab2.sock"
    given = _file_without_socket(tmp_path, "x.toml", 'control_socket = "/run/other/x.sock"\n')
    assert load_config(given, online_cpus=[0]).daemon.control_socket == "/run/other/x.sock"
    from configs import cfg_of, host_data

    from nfq_ipsec.config.fields import DEFAULT_SOCKET

    assert cfg_of(host_data()).daemon.control_socket == DEFAULT_SOCKET  # no file, no name


def test_a_file_name_that_cannot_name_a_socket_asks_for_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_file_without_socket(tmp_path, "my site.toml"), online_cpus=[0])
    assert any(p.startswith("daemon.control_socket:") and "set control_socket" in p
               for p in err.value.problems), err.value.problems
    named = _file_without_socket(tmp_path, "my site2.toml", 'control_socket = "/run/x/a.sock"\n')
    assert load_config(named, online_cpus=[0]).daemon.control_socket == "/run/x/a.sock"

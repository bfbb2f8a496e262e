"""Fuzzing the configuration loader (hypothesis): whatever the TOML holds, loading it gives a
Config or a ConfigError listing located problems, never another exception; a Config that
loads also renders into rules; problems never echo key bytes.

Three generators: random TOML-ish documents over the known section and field names; a valid
configuration with one to four random mutations (replace, delete or add a value anywhere);
and random text through ``load_config`` (TOML syntax errors). ``scripts/fuzz`` runs the same
properties for longer (and with atheris when it is installed).
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nfq_ipsec import rules
from nfq_ipsec.config import load_config
from nfq_ipsec.config.loader import parse_config
from nfq_ipsec.config.model import Config
from nfq_ipsec.core import ConfigError

EXAMPLES = int(os.environ.get("NFQ_IPSEC_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
KEY = "0x" + "5a" * 20
IKEY = "0x" + "a5" * 32

FIELDS = [
    # sections and their fields, so that random documents reach the validators
    "node", "daemon", "policy", "sa", "lifetime", "interface", "role", "default", "mtu", "queues",
    "cpus", "mark", "control_socket", "state_dir", "mss_clamp", "gso", "chain_prefix", "log_level",
    "iptables", "name", "action", "direction", "local", "remote", "protocol", "local_ports",
    "remote_ports", "icmp_type", "icmp_code", "spi", "queue", "mode", "tunnel_local",
    "tunnel_remote", "encryption", "key", "key_file", "integrity", "integrity_key",
    "integrity_key_file", "replay_window", "esn", "df", "ttl", "soft_packets", "hard_packets",
    "soft_bytes", "hard_bytes", "soft_seconds", "hard_seconds",
]
WORDS = [
    "protect", "bypass", "discard", "out", "in", "both", "host", "gateway", "transport", "tunnel",
    "aes-gcm-128", "aes-gcm-256", "chacha20-poly1305", "aes-cbc-128", "aes-cbc-256", "null",
    "hmac-sha256-128", "hmac-sha384-192", "hmac-sha512-256", "des", "3des", "hmac-md5", "any",
    "tcp", "udp", "icmp", "10.0.0.1/32", "10.0.0.0/8", "0.0.0.0/0", "10.0.0.1", "1000-2000",
    "22", "eth1", "lo", "copy", "set", "clear", "auto", "nft", "legacy", "debug", KEY, IKEY,
    "", "key.hex", "/dev/null", "/", "\x00", "../x",
]

names = st.one_of(st.sampled_from(FIELDS), st.text(max_size=10))
scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.sampled_from([0, 1, -1, 255, 256, 65535, 65536, 0xFFFFFFFF, 1 << 32, 1 << 64, 0x10000000]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(WORDS),
    st.text(max_size=24),
    st.datetimes(min_value=datetime.datetime(1, 1, 2), max_value=datetime.datetime(9999, 12, 30)),
    st.dates(),
    st.times(),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=5),
    max_leaves=25,
)


def base() -> dict[str, Any]:
    return {
        "node": {"interface": "eth1", "role": "host", "default": "discard", "mtu": 1500},
        "daemon": {"queues": [100, 101], "cpus": [0, 1], "state_dir": "/var/lib/x"},
        "policy": [
            {"name": "p", "action": "protect", "local": "10.0.0.1/32", "remote": "10.0.0.2/32",
             "protocol": "udp", "remote_ports": "1000-2000", "sa": ["o0", "o1", "i0"]},
            {"name": "b", "action": "bypass", "protocol": "icmp", "icmp_type": 8},
        ],
        "sa": [
            {"name": "o0", "direction": "out", "spi": 0x1000, "encryption": "aes-gcm-128",
             "key": KEY, "queue": 100, "lifetime": {"soft_packets": 10, "hard_packets": 20}},
            {"name": "o1", "direction": "out", "spi": 0x1001, "encryption": "aes-cbc-128",
             "key": "0x" + "11" * 16, "integrity": "hmac-sha256-128", "integrity_key": IKEY,
             "queue": 101, "mode": "tunnel", "tunnel_local": "192.0.2.1",
             "tunnel_remote": "192.0.2.2", "esn": True},
            {"name": "i0", "direction": "in", "spi": 0x2000, "encryption": "chacha20-poly1305",
             "key": "0x" + "22" * 36, "replay_window": 256},
        ],
    }


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    """The valid base with 1..4 random edits at random places."""
    doc = base()
    for _ in range(draw(st.integers(1, 4))):
        node: Any = doc
        # walk down a random path
        while True:
            if isinstance(node, dict) and node:
                key = draw(st.sampled_from(sorted(node, key=str)))
                child = node[key]
            elif isinstance(node, list) and node:
                key = draw(st.integers(0, len(node) - 1))
                child = node[key]
            else:
                break
            if not isinstance(child, dict | list) or draw(st.booleans()):
                break
            node = child
        op = draw(st.sampled_from(["replace", "delete", "add"]))
        if isinstance(node, dict):
            if op == "add" or not node:
                node[draw(names)] = draw(values)
            else:
                k = draw(st.sampled_from(sorted(node, key=str)))
                if op == "delete":
                    del node[k]
                else:
                    node[k] = draw(values)
        elif isinstance(node, list):
            if op == "add" or not node:
                node.append(draw(values))
            else:
                i = draw(st.integers(0, len(node) - 1))
                if op == "delete":
                    del node[i]
                else:
                    node[i] = draw(values)
    return doc


def _strings_outside_keys(node: Any, field: str = "") -> list[str]:
    if isinstance(node, dict):
        return [t for k, v in node.items() for t in _strings_outside_keys(v, str(k))]
    if isinstance(node, list):
        return [t for v in node for t in _strings_outside_keys(v, field)]
    return [str(node)] if field not in ("key", "integrity_key") else []


def check(doc: dict[str, Any], base_dir: Path) -> None:
    """The property: a Config (that renders) or a ConfigError of located problems."""
    try:
        cfg = parse_config(doc, base_dir=base_dir, online_cpus=[0, 1])
    except ConfigError as err:
        assert err.problems and all(isinstance(p, str) and p for p in err.problems)
        elsewhere = " ".join(_strings_outside_keys(doc)).lower()
        for p in err.problems:
            assert ":" in p, p  # "where: what"
            for secret in (KEY[2:], IKEY[2:], "11" * 16, "22" * 36):
                # a key in a key field is never echoed (one pasted into another field may be)
                assert secret in elsewhere or secret not in p.lower()
        return
    assert isinstance(cfg, Config)
    rules.render(cfg)
    rules.build(cfg)


@FUZZ
@given(st.dictionaries(names, values, max_size=6))
def test_random_documents_load_or_fail_cleanly(doc: dict[str, Any]) -> None:
    check(doc, Path("/nonexistent-nfqx"))


@FUZZ
@given(st.fixed_dictionaries({}, optional={
    "node": st.dictionaries(names, values, max_size=5),
    "daemon": st.dictionaries(names, values, max_size=5),
    "policy": st.lists(st.dictionaries(names, values, max_size=8), max_size=3),
    "sa": st.lists(st.dictionaries(names, values, max_size=10), max_size=3),
}))
def test_random_sections_load_or_fail_cleanly(doc: dict[str, Any]) -> None:
    check(doc, Path("/nonexistent-nfqx"))


@FUZZ
@given(mutated())
def test_mutated_valid_config_loads_or_fails_cleanly(doc: dict[str, Any]) -> None:
    check(doc, Path("/nonexistent-nfqx"))


FILE_NAMES = st.one_of(st.sampled_from(["\x00", "/dev/zero", "/dev/null", "/", ".", "..", "key",
                                        "/proc/self/status", "/etc/hostname", "x\x00y"]),
                       st.text(max_size=30))


@FUZZ
@given(st.integers(0, 2), st.sampled_from(["key", "integrity_key"]), FILE_NAMES)
def test_key_file_names_load_or_fail_cleanly(index: int, field: str, name: str) -> None:
    """key_file/integrity_key_file with odd names: NUL bytes, devices, directories, /proc."""
    doc = base()
    doc["sa"][index].pop(field, None)
    doc["sa"][index][f"{field}_file"] = name
    check(doc, Path("/"))


def test_the_base_is_valid() -> None:
    cfg = parse_config(base(), online_cpus=[0, 1])
    assert len(cfg.sas) == 3


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1"))))
def test_random_text_loads_or_fails_cleanly(tmp_path: Path, text: str) -> None:
    p = tmp_path / "fuzz.toml"
    p.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        load_config(p, online_cpus=[0, 1])
    except ConfigError as err:
        assert err.problems

"""The field tables (``nfq_ipsec/config/fields.py``) against the loader, the model and the
README: the loader reads, refuses and defaults every field as its table says, knows exactly
the table's keys, the defaults are the model's, and README.md's configuration reference is the
one the tables render."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from repo import ROOT

from nfq_ipsec.config import Config, DaemonConfig, NodeConfig, parse_config, reference
from nfq_ipsec.config.fields import DAEMON, LIFETIME, SA, SECTIONS
from nfq_ipsec.config.model import CompartmentConfig, ConnectionConfig
from nfq_ipsec.config.schema import Field, Section
from nfq_ipsec.core.errors import ConfigError
from nfq_ipsec.core.sa import Lifetime, SAParams
from nfq_ipsec.core.spd import Policy, Selector
from nfq_ipsec.engines.base import CryptoSettings
from nfq_ipsec.worker import WorkerSpec

CPUS = [0, 1]
KEY20 = "00112233445566778899aabbccddeeff01020304"
KEY20B = "0f1e2d3c4b5a69788796a5b4c3d2e1f0a1a2a3a4"
DELETE = object()  # in an edit: remove this key

# Where each section sits in the document base() makes, and the model class(es) it fills.
WHERE = {"node": "node", "daemon": "daemon", "crypto": "crypto", "policy": "policy[0]", "sa": "sa[0]",
         "lifetime": "sa[0].lifetime", "connection": "connection[0]",
         "compartment": "compartment[0]"}
MODELS: dict[str, tuple[type, ...]] = {
    "node": (NodeConfig,), "daemon": (DaemonConfig,), "crypto": (CryptoSettings,),
    "policy": (Policy, Selector),
    "sa": (SAParams,), "lifetime": (Lifetime,), "connection": (ConnectionConfig,),
    "compartment": (CompartmentConfig,),
}
ATTR = {("node", "default"): "default_action", ("policy", "sa"): "sa_names",
        ("connection", "psk_file"): "psk"}  # else the name
# Policy.selector: the selector fields themselves are the fields; a connection's proposals are
# its ike and esp parsed, its policy the one whose connection field names it
NOT_FIELDS = {("policy", "selector"), ("connection", "ike_proposal"),
              ("connection", "esp_proposal"), ("connection", "policy"), ("node", "mtu_source"),
              ("compartment", "policies")}
# compartment: which one a policy or SA belongs to is the compartment's (its policies, queues)
READ_INTO_OTHERS = {("daemon", "cpus"), ("sa", "key_file"), ("sa", "integrity_key_file"),
                    ("policy", "connection"), ("policy", "compartment"), ("sa", "compartment"),
                    ("compartment", "cpus")}
# Defaults that the loader works out (the reference says how); the model has a placeholder.
COMPUTED = {("node", "mtu"), ("daemon", "queues"), ("sa", "queue"), ("sa", "key"), ("sa", "integrity_key"),
            ("sa", "lifetime"), ("connection", "local_id"), ("connection", "remote_id"),
            ("compartment", "id"),
            ("connection", "life_time"), ("connection", "ike_life_time")}
PSK_FILE: list[Path] = []  # the base's connection's pre-shared key, made once


@pytest.fixture(autouse=True, scope="module")
def _psk_file(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("psk") / "base.psk"
    path.write_text("the base's pre-shared key\n")
    path.chmod(0o600)
    PSK_FILE[:] = [path]


def base() -> dict[str, Any]:
    return {
        "node": {},
        "daemon": {"queues": [100, 101]},
        "crypto": {},
        "policy": [{"name": "p", "action": "protect", "sa": ["out0", "in0"]}],
        "sa": [
            {"name": "out0", "direction": "out", "spi": 0x1000, "encryption": "aes-gcm-128",
             "key": KEY20, "lifetime": {}},
            {"name": "in0", "direction": "in", "spi": 0x2000, "encryption": "aes-gcm-128",
             "key": KEY20B},
        ],
        "connection": [{"name": "c", "local": "192.0.2.1", "remote": "192.0.2.2",
                        "psk_file": str(PSK_FILE[0])}],
        "compartment": [{"name": "web", "uid": 1000, "queues": [102]}],
    }


def entry(doc: dict[str, Any], section: str) -> dict[str, Any]:
    """The table of ``doc`` that WHERE names for ``section``."""
    if section in ("node", "daemon", "crypto"):
        table: dict[str, Any] = doc[section]
    elif section == "lifetime":
        table = doc["sa"][0]["lifetime"]
    else:
        table = doc[section][0]
    return table


def model_value(cfg: Config, section: str, attr: str) -> Any:
    obj: Any = {
        "node": cfg.node, "daemon": cfg.daemon, "crypto": cfg.crypto, "sa": cfg.sas[0] if cfg.sas else None,
        "lifetime": cfg.sas[0].lifetime if cfg.sas else None,
        "policy": cfg.policies[0] if cfg.policies else None,
        "connection": cfg.connections[0] if cfg.connections else None,
        "compartment": cfg.compartments[0] if cfg.compartments else None,
    }[section]
    if section == "policy" and not hasattr(obj, attr):
        obj = obj.selector
    return getattr(obj, attr)


def problems(doc: dict[str, Any], base_dir: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, base_dir=base_dir, online_cpus=CPUS)
    return info.value.problems


def simple_fields() -> list[tuple[Section, Field]]:
    return [(s, f) for s in SECTIONS for f in s.fields if f.parser is None and s is not LIFETIME]


def ids(pairs: list[tuple[Section, Field]]) -> list[str]:
    return [f"{s.key}.{f.name}" for s, f in pairs]


def test_the_base_is_valid() -> None:
    parse_config(base(), online_cpus=CPUS)


# -- the tables themselves --------------------------------------------------------------------------

@pytest.mark.parametrize(("section", "field"), [(s, f) for s in SECTIONS for f in s.fields],
                         ids=ids([(s, f) for s in SECTIONS for f in s.fields]))
def test_every_field_is_declared_whole(section: Section, field: Field) -> None:
    assert field.doc and "\n" not in field.doc and field.toml
    if field.parser is None:
        assert field.kind  # a simple field has a TOML type the generic reader knows
    if field.required:
        assert field.default is None and field.default_text is None
    if field.choices is not None and field.default is not None:
        assert field.default in field.choices.values()
    if field.bounds is not None and field.default is not None:
        assert field.bounds[0] <= field.default <= field.bounds[1]


@pytest.mark.parametrize("section", SECTIONS, ids=[s.key for s in SECTIONS])
def test_table_defaults_are_the_models(section: Section) -> None:
    """Each default is written once: the table's and the dataclass's are the same value."""
    model_fields = {f.name: f for cls in MODELS[section.key] for f in dataclasses.fields(cls)
                    if f.init and (section.key, f.name) not in NOT_FIELDS}
    attrs = {ATTR.get((section.key, f.name), f.name): f for f in section.fields
             if (section.key, f.name) not in READ_INTO_OTHERS}
    assert set(model_fields) == set(attrs)  # every model field is a table field, and back
    for name, mf in model_fields.items():
        field = attrs[name]
        if (section.key, field.name) in COMPUTED:
            assert field.default is None and field.default_text, field.name
        elif mf.default is dataclasses.MISSING:
            assert field.default is None and mf.default_factory is dataclasses.MISSING, field.name
        else:
            assert field.default == mf.default, field.name


def test_crypto_names_known_engines_once() -> None:
    doc = base()
    doc["crypto"] = {"policy": "prefer", "prefer": ["openssl", "qat", "openssl"], "disabled": [1]}
    found = problems(doc)
    assert "crypto.prefer: unknown engine 'qat' (known: openssl, sodium, pycryptodome, afalg)" in found
    assert "crypto.prefer: names an engine twice" in found
    assert "crypto.disabled: must be a list of engine names" in found
    doc["crypto"] = {"policy": "prefer"}
    assert problems(doc) == ["crypto.prefer: policy prefer needs a list of engines"]


def test_the_workers_log_level_default_is_the_tables() -> None:
    (spec_field,) = [f for f in dataclasses.fields(WorkerSpec) if f.name == "log_level"]
    assert spec_field.default == DAEMON["log_level"].default == DaemonConfig(queues=()).log_level


# -- the loader as the tables say ----------------------------------------------------------------

def test_an_absent_field_gets_its_table_default() -> None:
    cfg = parse_config(base(), online_cpus=CPUS)
    given = {(s, k) for s in WHERE for k in entry(base(), s)}
    checked = 0
    for section in SECTIONS:
        for field in section.fields:
            if (section.key, field.name) in given | COMPUTED | READ_INTO_OTHERS or field.required:
                continue
            attr = ATTR.get((section.key, field.name), field.name)
            assert model_value(cfg, section.key, attr) == field.default, (section.key, field.name)
            checked += 1
    assert checked >= 20


# Edits of the base, each valid, that between them give every field of every table.
ACCEPTED: dict[str, list[dict[str, Any]]] = {
    "node": [
        {"interface": "eth1"}, {"role": "gateway", "interface": "wan0"}, {"default": "bypass"},
        {"mtu": 9000}, {"ipv6_neighbour_discovery": True},
    ],
    "daemon": [
        {"queues": [7, 8], "cpus": [1, 0]}, {"mark": 0x20000000},
        {"control_socket": "/run/x/x.sock"}, {"state_dir": "/var/lib/x"}, {"mss_clamp": False},
        {"iptables": "legacy"}, {"chain_prefix": "NQ_1-a"}, {"log_level": "debug"},
        {"watchdog": 0}, {"watchdog": 2.5}, {"busy_poll": 0}, {"busy_poll": 200}, {"drop_log": True},
        {"metrics": "127.0.0.1:9477"}, {"metrics": "[::1]:1"}, {"gso": True},
        {"key_log": "/var/lib/nfq-ipsec/keys"},
        {"sandbox": "off"}, {"sandbox": "log"}, {"worker_user": "nobody"},
        {"versions": ["core", "independent"], "compare": "all"},
        {"versions": ["core", "independent"], "compare": "sample:100", "compare_fallback": True},
        {"versions": ["core"], "compare": "off"},
    ],
    "crypto": [
        {"policy": "balance"}, {"policy": "prefer", "prefer": ["pycryptodome", "openssl"]},
        {"verify_interval": 0}, {"verify_interval": 30}, {"verify_timeout": 0.5},
        {"disabled": ["afalg", "sodium"]}, {"self_check": 1}, {"self_check": 0},
        {"offload_helpers": 2, "offload_batch": 32, "offload_timeout": 0.5},
        {"offload_helpers": 0},
    ],
    "policy": [
        {"name": "other"}, {"action": "protect"}, {"direction": "both"},
        {"local": "10.0.0.0/24", "remote": "any"},
        {"protocol": "tcp", "local_ports": 22, "remote_ports": "1024-65535"},
        {"protocol": 132, "remote_ports": "5000"},
        {"protocol": "icmp", "icmp_type": 8, "icmp_code": 0}, {"sa": ["in0", "out0"]},
        {"connection": "c"}, {"compartment": "default"},
    ],
    "sa": [
        {"name": "o"}, {"spi": 0xFFFFFFFF}, {"direction": "out"}, {"queue": 101},
        {"mode": "tunnel", "tunnel_local": "192.0.2.1", "tunnel_remote": "192.0.2.2",
         "df": "clear", "ttl": 255},
        {"encryption": "aes-cbc-256", "key": "11" * 32, "integrity": "hmac-sha512-256",
         "integrity_key": "22" * 64},
        {"key": DELETE, "key_file": "k.key"},
        {"encryption": "null", "key": DELETE, "integrity": "hmac-sha256-128",
         "integrity_key_file": "ik.key"},
        {"replay_window": 4096}, {"esn": True},
        {"encapsulation": "udp", "udp_source_port": 4501, "udp_destination_port": 1024,
         "peer_change": "follow", "keepalive": 5.0},
        {"encapsulation": "udp", "keepalive": 0.0}, {"compartment": "default", "queue": 100},
    ],
    "connection": [
        {"name": "other"}, {"local": "2001:db8::1", "remote": "2001:db8::2"},
        {"local_id": "a.example", "remote_id": "192.0.2.9"}, {"auth": "psk"},
        {"psk_file": "k.psk"}, {"ike": "aes256-sha512-ecp384"}, {"esp": "chacha20poly1305-esn"},
        {"mode": "transport"}, {"start_action": "start"}, {"rekey_time": 0, "dpd_delay": 0},
        {"ike_rekey_time": 60.5, "dpd_delay": 1}, {"encap": True},
        {"life_time": 4000, "ike_life_time": 0}, {"start_action": "trap"},
    ],
    "compartment": [
        {"name": "db", "id": 7}, {"uid": "nobody", "gid": 0}, {"gid": "nogroup", "uid": DELETE},
        {"cgroup": "/", "uid": DELETE}, {"user": "nobody"}, {"queues": [102, 103], "cpus": [1]},
        {"interface": "lan0", "source": "10.1.0.0/16", "uid": DELETE},
    ],
    "lifetime": [
        {"soft_packets": 1, "hard_packets": 2}, {"soft_bytes": 1000, "hard_bytes": 2000},
        {"soft_seconds": 0.5, "hard_seconds": 60},
    ],
}
EDITS = [(s, e) for s, edits in ACCEPTED.items() for e in edits]


def test_the_accepted_edits_cover_every_field() -> None:
    for section in SECTIONS:
        edited = {k for e in ACCEPTED[section.key] for k in e}
        covered = edited | ({"lifetime"} if section is SA else set())  # its own table, below
        assert covered == set(section.names), section.key


@pytest.mark.parametrize(("section", "edit"), EDITS, ids=[f"{s}-{'-'.join(e)}" for s, e in EDITS])
def test_every_field_is_accepted(tmp_path: Path, section: str, edit: dict[str, Any]) -> None:
    (tmp_path / "k.key").write_text(KEY20.replace("0", "9") + "\n")
    (tmp_path / "ik.key").write_text("33" * 32 + "\n")
    for name in ("k.key", "ik.key"):
        (tmp_path / name).chmod(0o600)
    doc = base()
    target = entry(doc, section)
    for key, value in edit.items():
        if value is DELETE:
            target.pop(key)
        else:
            target[key] = value
    if section == "sa" and "name" in edit:
        doc["policy"][0]["sa"] = [edit["name"], "in0"]
    if section == "policy" and "connection" in edit:
        doc["policy"][0].pop("sa")
    if section == "compartment" and "interface" in edit:  # forwarded traffic: a gateway's
        doc["node"] = {"role": "gateway", "interface": "wan0"}
    (tmp_path / "k.psk").write_text("another pre-shared key")
    (tmp_path / "k.psk").chmod(0o600)
    cfg = parse_config(doc, base_dir=tmp_path, online_cpus=CPUS)
    table = {s.key: s for s in SECTIONS}[section]
    for key, value in edit.items():
        field = table[key]
        if field.parser is None and value is not DELETE and (section, key) not in READ_INTO_OTHERS:
            want = field.choices[value] if field.choices is not None else value
            attr = ATTR.get((section, key), key)
            assert model_value(cfg, section, attr) == want, key


@pytest.mark.parametrize("section", SECTIONS, ids=[s.key for s in SECTIONS])
def test_unknown_fields_are_refused(section: Section) -> None:
    doc = base()
    stranger = next(f.name for s in SECTIONS for f in s.fields if f.name not in section.names)
    entry(doc, section.key).update({"colour": "blue", stranger: 1})
    found = problems(doc)
    known = ", ".join(sorted(section.names))
    for key in ("colour", stranger):
        assert f"{WHERE[section.key]}.{key}: unknown field (known: {known})" in found, found


def test_unknown_sections_are_refused() -> None:
    doc = base()
    doc["lifetime"] = {}
    assert problems(doc) == [
        "lifetime: unknown section (known: compartment, connection, crypto, daemon, node, policy, "
        "sa)"]


WRONG_TYPE = {"string": (5, "must be str, got int"), "integer": ("5", "must be int, got str"),
              "boolean": ("yes", "must be bool, got str"),
              "number": ("5", "must be int or float, got str")}


@pytest.mark.parametrize(("section", "field"), simple_fields(), ids=ids(simple_fields()))
def test_simple_fields_refuse_what_their_table_refuses(section: Section, field: Field) -> None:
    where = f"{WHERE[section.key]}.{field.name}"
    value, message = WRONG_TYPE[field.toml]
    wrong: list[tuple[Any, str]] = [(value, message)]
    if field.toml == "integer":
        wrong.append((True, "must be an integer, not a boolean"))
    if field.choices is not None:
        wrong.append(("nope", f"must be one of {', '.join(field.choices)}, got 'nope'"))
    if field.bounds is not None:
        lo, hi = field.bounds
        wrong += [(v, f"must be {field.allowed_text}, got {v}") for v in (lo - 1, hi + 1)]
    for value, message in wrong:
        doc = base()
        entry(doc, section.key)[field.name] = value
        assert f"{where}: {message}" in problems(doc), (value, message)


@pytest.mark.parametrize("field", LIFETIME.fields, ids=[f.name for f in LIFETIME.fields])
def test_lifetime_limits_are_positive_and_soft_below_hard(field: Field) -> None:
    where = f"sa[0].lifetime.{field.name}"
    for value, message in ((0, "must be positive"), (-1, "must be positive"),
                           (True, "must be positive" if field.toml == "number"
                            else "must be an integer, not a boolean"),
                           ("1", f"must be {'int or float' if field.toml == 'number' else 'int'}, "
                                 "got str")):
        doc = base()
        doc["sa"][0]["lifetime"] = {field.name: value}
        assert f"{where}: {message}" in problems(doc), (value, message)
    if field.name.startswith("soft_"):
        hard = "hard_" + field.name.removeprefix("soft_")
        doc = base()
        doc["sa"][0]["lifetime"] = {field.name: 5, hard: 5}
        assert problems(doc) == [f"{where}: must be below {hard} (5)"]


@pytest.mark.parametrize(("section", "field"),
                         [(s, f) for s in SECTIONS for f in s.fields if f.required],
                         ids=ids([(s, f) for s in SECTIONS for f in s.fields if f.required]))
def test_required_fields_are_required(section: Section, field: Field) -> None:
    doc = base()
    entry(doc, section.key).pop(field.name)
    where = f"{WHERE[section.key]}.{field.name}"
    assert any(p.startswith(f"{where}: required") for p in problems(doc))


COMPARE_REFUSED = [
    ({"compare": "majority", "versions": ["core", "independent"]},
     "daemon.compare: majority needs three versions that can outvote one (core, independent, "
     "core-source), got 2: use all or sample:N"),
    ({"compare": "sample:1", "versions": ["core", "independent"]},
     "daemon.compare: sample:N needs N in 2..1000000, got 'sample:1'"),
    ({"compare": "sample:x", "versions": ["core", "independent"]},
     "daemon.compare: sample:N needs N in 2..1000000, got 'sample:x'"),
    ({"compare": "some"}, "daemon.compare: must be off, all, sample:N or majority, got 'some'"),
    ({"compare": "all"}, "daemon.compare: all needs at least two daemon.versions"),
    ({"versions": ["core", "independent"]},
     "daemon.versions: more than one version needs daemon.compare (all, sample:N or "
     "majority): with off one version runs"),
    ({"versions": ["core", "independent"], "compare": "all", "gso": True},
     "daemon.compare: can't be used with daemon.gso: only the core segments superpackets"),
    ({"versions": ["independent", "core"], "compare": "all"},
     "daemon.versions: must start with core: the other versions run beside it (the independent "
     "one alone as the data plane is not built)"),
    ({"versions": ["core", "source"], "compare": "all"},
     "daemon.versions[1]: must be one of core, independent, core-source, got 'source'"),
    ({"versions": ["core", "core"]}, "daemon.versions[1]: core listed twice"),
    ({"versions": []}, "daemon.versions: needs at least one version"),
    ({"versions": ["core", "independent", "core-source"], "compare": "majority", "gso": True},
     "daemon.compare: can't be used with daemon.gso: only the core segments superpackets"),
]


@pytest.mark.parametrize(("edit", "message"), COMPARE_REFUSED,
                         ids=[m.split(": ")[1][:30] for _, m in COMPARE_REFUSED])
def test_versions_and_compare_refuse_what_is_not_built(edit: dict[str, Any], message: str) -> None:
    doc = base()
    doc["daemon"].update(edit)
    assert message in problems(doc)


def test_versions_and_compare_are_read() -> None:
    doc = base()
    doc["daemon"].update({"versions": ["core", "independent"], "compare": "sample:007",
                          "compare_fallback": True})
    daemon = parse_config(doc, online_cpus=CPUS).daemon
    assert (daemon.versions, daemon.compare, daemon.compare_fallback) == (
        ("core", "independent"), "sample:7", True)
    doc["daemon"].update({"versions": ["core", "core-source", "independent"],
                          "compare": "majority"})
    daemon = parse_config(doc, online_cpus=CPUS).daemon
    assert (daemon.versions, daemon.compare) == (("core", "core-source", "independent"),
                                                 "majority")


# -- the README's reference -------------------------------------------------------------------------

def test_readme_reference_is_rendered_from_the_tables() -> None:
    text = (ROOT / "README.md").read_text()
    assert reference.current_block(text) == reference.markdown(), (
        "README.md's configuration reference differs from nfq_ipsec/config/fields.py; "
        "render it again: .venv/bin/python -m nfq_ipsec.config.reference --update README.md"
    )


def test_the_reference_names_every_field() -> None:
    text = reference.markdown()
    for section in SECTIONS:
        assert f"### `{section.header}`" in text
        for field in section.fields:
            assert f"| `{field.name}` |" in text


def test_reference_command_checks_and_updates(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{reference.BEGIN}\nold\n{reference.END}\n\nafter\n")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "nfq_ipsec.config.reference", *args],
                              capture_output=True, text=True, cwd=ROOT)

    res = run("--check", str(readme))
    assert res.returncode == 1 and "--update" in res.stderr
    assert run("--update", str(readme)).returncode == 0
    assert readme.read_text() == (
        f"# x\n\n{reference.BEGIN}\n{reference.markdown()}{reference.END}\n\nafter\n")
    assert run("--check", str(readme)).returncode == 0
    assert run("--markdown").stdout == reference.markdown()

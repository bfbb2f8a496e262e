"""Compartments (``config/compartments.py``): what the loader accepts and refuses with its
location, the rules that send a labelled packet to its own compartment's SPD and nowhere else
(``rules.py``), what each worker gets (``supervisor.worker_spec``), what a reload can't change,
and the status answer's sums per compartment."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from nfq_ipsec import rules, supervisor
from nfq_ipsec.config import Config, parse_config
from nfq_ipsec.core.errors import ConfigError
from nfq_ipsec.status import WorkerReport

CPUS = [0, 1]
KEYS = [f"{i:02x}" + "112233445566778899aabbccddeeff01020304" for i in range(8)]


def _sa(name: str, direction: str, spi: int, key: int, comp: str | None = None,
        **more: Any) -> dict[str, Any]:
    sa = {"name": name, "direction": direction, "spi": spi, "encryption": "aes-gcm-128",
          "key": KEYS[key], **more}
    if comp is not None:
        sa["compartment"] = comp
    return sa


def doc() -> dict[str, Any]:
    """Two compartments (uid 1000; gid 2000) and the default one, each protecting the same
    flow with SAs of its own."""
    pols = []
    for comp in ("web", "db", None):
        tag = comp or "default"
        pol = {"name": f"p-{tag}", "action": "protect", "local": "10.0.0.1/32",
               "remote": "10.0.0.2/32", "sa": [f"o-{tag}", f"i-{tag}"]}
        if comp is not None:
            pol["compartment"] = comp
        pols.append(pol)
    return {
        "daemon": {"queues": [100]},
        "compartment": [{"name": "web", "uid": 1000, "queues": [110, 111], "cpus": [1]},
                        {"name": "db", "gid": 2000, "queues": [120], "id": 9}],
        "policy": pols,
        "sa": [_sa("o-web", "out", 0x1100, 0, "web"), _sa("i-web", "in", 0x2100, 1, "web"),
               _sa("o-db", "out", 0x1200, 2, "db"), _sa("i-db", "in", 0x2200, 3, "db"),
               _sa("o-default", "out", 0x1000, 4), _sa("i-default", "in", 0x2000, 5)],
    }


def load(d: dict[str, Any]) -> Config:
    return parse_config(d, online_cpus=CPUS)


def problems(d: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(d)
    return info.value.problems


def test_each_policy_and_sa_belongs_to_one_compartment() -> None:
    cfg = load(doc())
    assert [c.name for c in cfg.all_compartments] == ["default", "web", "db"]
    web, db = cfg.compartments
    assert (web.id, web.uid, web.queues, web.policies) == (1, 1000, (110, 111), ("p-web",))
    assert (db.id, db.gid, db.queues, db.mark) == (9, 2000, (120,), 0x900)
    assert cfg.default_compartment.queues == (100,)
    assert cfg.default_compartment.policies == ("p-default",)
    # every worker's queue, the default compartment's first; an SA without queue: its
    # compartment's first
    assert cfg.queue_numbers == (100, 110, 111, 120)
    assert {sa.name: sa.queue for sa in cfg.sas} == {
        "o-web": 110, "i-web": 110, "o-db": 120, "i-db": 120, "o-default": 100, "i-default": 100}
    assert [q.cpu for q in cfg.daemon.queues[1:]] == [1, None, None]


def test_no_compartment_is_one_implicit_compartment() -> None:
    d = doc()
    del d["compartment"]
    d["policy"], d["sa"] = d["policy"][2:], d["sa"][4:]
    cfg = load(d)
    assert cfg.compartments == ()
    assert cfg.default_compartment.policies == ("p-default",)
    assert cfg.default_compartment.queues == (100,)
    # and the rules are those of a configuration without compartments: no chain of one
    assert not any(name.split("-")[-1][0] in "CFL" for _, name in rules.build(cfg).chains
                   if name.split("-")[-1] not in ("LEAK",))


REFUSED: list[tuple[str, Any, str]] = [
    ("compartment.1.name", "web", "compartment[1].name: duplicate name 'web' (also compartment[0])"),
    ("compartment.1.name", "default", "compartment[1].name: 'default' is the implicit "
     "compartment's name (daemon.queues); choose another"),
    ("compartment.1.queues", [111], "compartment[1].queues[0]: queue 111 is in compartment[0] "
     "too; a queue belongs to one compartment"),
    ("compartment.1.queues", [100], "compartment[1].queues[0]: queue 100 is in daemon.queues "
     "too; a queue belongs to one compartment"),
    ("compartment.1.id", 1, "compartment[1].id: id 1 is compartment[0]'s too"),
    ("compartment.1.cgroup", "web/../x", "compartment[1].cgroup: not an absolute cgroup path "
     "without '.' or '..': 'web/../x'"),
    ("compartment.1.uid", "no-such-user-here", "compartment[1].uid: no user "
     "'no-such-user-here' here"),
    ("compartment.1.secmark", "system_u:object_r:web_t", "compartment[1].secmark: SELinux "
     "labels are not matched (this build selects by uid, gid, cgroup, interface or source)"),
    ("compartment.1.interface", "lan0", "compartment[1].interface: selects forwarded traffic, "
     'which only a gateway has (node.role = "gateway")'),
    ("policy.0.compartment", "www", "policy[0].compartment: unknown compartment 'www' (known: "
     "default, web, db)"),
    ("sa.0.compartment", "db", "policy[0].sa: SA 'o-web' belongs to compartment 'db' and policy "
     "'p-web' to compartment 'web': a policy uses its own compartment's SAs only"),
    ("sa.2.queue", 110, "sa[2].queue: queue 110 is not one of compartment 'db' (queues 120); an "
     "SA lives on a queue of its own compartment"),
    ("policy.2.sa", ["o-default", "i-web"], "policy[2].sa: SA 'i-web' belongs to compartment "
     "'web' and policy 'p-default' to compartment 'default': a policy uses its own "
     "compartment's SAs only"),
]


@pytest.mark.parametrize(("path", "value", "message"), REFUSED, ids=[m.split(":")[0] + "-" +
                                                                     str(i) for i, (_, _, m) in
                                                                     enumerate(REFUSED)])
def test_check_config_refuses_with_the_location(path: str, value: Any, message: str) -> None:
    d = copy.deepcopy(doc())
    section, index, key = path.split(".")
    d[section][int(index)][key] = value
    assert message in problems(d)


def test_a_compartment_needs_a_selector_and_queues() -> None:
    d = doc()
    d["compartment"][1] = {"name": "db"}
    found = problems(d)
    assert "compartment[1].queues: required: a compartment's own queues (workers)" in found
    assert ("compartment[1]: selects nothing: give uid, gid or cgroup (locally sent traffic), "
            "or interface or source (forwarded traffic on a gateway)") in found


def test_the_same_selector_twice_is_refused() -> None:
    d = doc()
    d["compartment"][1].update({"gid": None, "uid": 1000})
    del d["compartment"][1]["gid"]
    assert ("compartment[1]: selects the same local traffic as compartment[0], which comes "
            "first: it would never match") in problems(d)


def test_the_reinject_mark_must_stay_out_of_the_compartment_bits() -> None:
    d = doc()
    d["daemon"]["mark"] = 0x100
    assert ("daemon.mark: 0x100 is within the compartments' mark bits (0xff00); choose a bit "
            "outside them") in problems(d)


def test_a_policy_hides_only_its_own_compartments_policies() -> None:
    """The three policies have one selector: in three compartments none hides another."""
    load(doc())
    d = doc()
    d["policy"][1]["compartment"] = "web"
    d["policy"][1]["sa"] = []
    d["policy"][1]["action"] = "bypass"
    d["sa"] = [s for s in d["sa"] if "db" not in s["name"]]
    d["compartment"][1]["queues"] = [120]
    assert "policy[1]: unreachable: policy[0] ('p-web') matches everything it would" in problems(d)


# -- rules -----------------------------------------------------------------------------------------

def _specs(rs: rules.Ruleset, table: str, chain: str) -> list[str]:
    t = rs.table(table)
    assert t is not None
    return [r.spec() for r in t.rules_of(chain)]


def test_a_labelled_packet_goes_to_its_compartments_spd_only() -> None:
    cfg = load(doc())
    rs = rules.build(cfg)
    out = _specs(rs, "mangle", "NFQIPSEC-OUT")
    gotos = [s for s in out if " -g " in s]
    assert gotos == ["-m owner --uid-owner 1000 -g NFQIPSEC-C1",
                     "-m owner --gid-owner 2000 -g NFQIPSEC-C9",
                     # a packet without a socket owner follows its connection's compartment
                     "-m owner ! --socket-exists -m connmark --mark 0x100/0xff00 -g NFQIPSEC-C1",
                     "-m owner ! --socket-exists -m connmark --mark 0x900/0xff00 -g NFQIPSEC-C9"]
    # the gotos come before the default compartment's policies, which are its own only
    first_policy = next(i for i, s in enumerate(out)
                        if s.endswith("-j NFQIPSEC-P2") and "u32" not in s)
    assert all(out.index(g) < first_policy for g in gotos)
    assert not any(s.endswith(("-j NFQIPSEC-P0", "-j NFQIPSEC-P1")) for s in out
                   if "u32" not in s)
    # each compartment's chain: the connection marked its, its own policy to its own queue,
    # then the default (drop)
    assert _specs(rs, "mangle", "NFQIPSEC-C1") == [
        "-j CONNMARK --set-xmark 0x100/0xff00", "-s 10.0.0.1/32 -d 10.0.0.2/32 -j NFQIPSEC-P0",
        "-j DROP"]
    assert _specs(rs, "mangle", "NFQIPSEC-C9") == [
        "-j CONNMARK --set-xmark 0x900/0xff00", "-s 10.0.0.1/32 -d 10.0.0.2/32 -j NFQIPSEC-P1",
        "-j DROP"]
    assert "-j NFQUEUE --queue-num 110" in _specs(rs, "mangle", "NFQIPSEC-P0")
    assert "-j NFQUEUE --queue-num 120" in _specs(rs, "mangle", "NFQIPSEC-P1")
    assert "-j NFQUEUE --queue-num 100" in _specs(rs, "mangle", "NFQIPSEC-P2")


def test_a_compartments_bypass_returns_from_the_whole_spd() -> None:
    """Entered by goto, a RETURN in a compartment's chain leaves P-OUT too: it never falls
    through to the default compartment's policies. With node.default = bypass the chain ends
    in RETURN, the same way out."""
    d = doc()
    d["node"] = {"default": "bypass"}
    rs = rules.build(load(d))
    assert _specs(rs, "mangle", "NFQIPSEC-C1")[-1] == "-j RETURN"
    assert all(" -j NFQIPSEC-C" not in s for s in _specs(rs, "mangle", "NFQIPSEC-OUT"))


def test_inbound_esp_goes_to_the_queue_of_its_spis_compartment() -> None:
    rs = rules.build(load(doc()))
    inbound = _specs(rs, "raw", "NFQIPSEC-IN")
    for spi, queue in ((0x2100, 110), (0x2200, 120), (0x2000, 100)):
        assert f"-p esp -m esp --espspi {spi} -j NFQUEUE --queue-num {queue}" in inbound


def test_decrypted_packets_label_their_connection() -> None:
    rs = rules.build(load(doc()))
    mss = _specs(rs, "mangle", "NFQIPSEC-MSS")
    assert mss[:3] == [
        "-m mark --mark 0x10000000/0x1000ff00 -j CONNMARK --set-xmark 0x0/0xff00",
        "-m mark --mark 0x10000100/0x1000ff00 -j CONNMARK --set-xmark 0x100/0xff00",
        "-m mark --mark 0x10000900/0x1000ff00 -j CONNMARK --set-xmark 0x900/0xff00"]
    assert all(rules.is_our_chain("NFQIPSEC", c) for _, c in rs.chains)


def test_cgroup_and_forwarded_selectors_on_a_gateway() -> None:
    d = doc()
    d["node"] = {"role": "gateway", "interface": "wan0"}
    d["compartment"][0] = {"name": "web", "cgroup": "/", "queues": [110, 111]}
    d["compartment"][1] = {"name": "db", "interface": "lan1", "source": "10.9.0.0/24",
                           "queues": [120], "id": 9}
    rs = rules.build(load(d))
    assert "-m cgroup --path / -g NFQIPSEC-C1" in _specs(rs, "mangle", "NFQIPSEC-OUT")
    assert "-s 10.9.0.0/24 -i lan1 -g NFQIPSEC-F9" in _specs(rs, "mangle", "NFQIPSEC-FWD")
    assert "-s 10.9.0.0/24 -i lan1 -g NFQIPSEC-L9" in _specs(rs, "filter", "NFQIPSEC-LEAK")
    # forwarded cleartext of the compartment that escaped its queue never leaves
    assert _specs(rs, "filter", "NFQIPSEC-L9") == ["-s 10.0.0.1/32 -d 10.0.0.2/32 -j DROP",
                                                  "-j DROP"]
    assert rules.build6(load(d)) is not None  # an IPv4 source selects no IPv6 traffic
    assert not any("-g NFQIPSEC-F9" in s for s in _specs(rules.build(load(d), v6=True),
                                                         "mangle", "NFQIPSEC-FWD"))


# -- workers ---------------------------------------------------------------------------------------

def test_each_worker_gets_its_compartments_spd_sas_and_mark() -> None:
    cfg = load(doc())
    by_queue = {qc.num: supervisor.worker_spec(cfg, qc) for qc in cfg.daemon.queues}
    assert [p.name for p in by_queue[110].policies] == ["p-web"]
    assert [s.name for s in by_queue[110].sas] == ["o-web", "i-web"]
    assert by_queue[111].sas == ()
    assert [p.name for p in by_queue[120].policies] == ["p-db"]
    assert [p.name for p in by_queue[100].policies] == ["p-default"]
    assert {q: (s.compartment, s.mark) for q, s in by_queue.items()} == {
        100: ("default", 0x10000000), 110: ("web", 0x10000100), 111: ("web", 0x10000100),
        120: ("db", 0x10000900)}


def test_a_queue_that_changes_compartment_needs_a_restart() -> None:
    old = load(doc())
    d = doc()
    d["compartment"][1]["id"] = 8
    found = supervisor.reload_problems(old, load(d))
    assert ("queue 120: moves from compartment 'db' to 'db' (or its id or user changes): a "
            "change needs a restart (its worker's mark and user are its own)") in found
    assert supervisor.reload_problems(old, load(doc())) == []


def test_status_adds_up_each_compartments_workers() -> None:
    cfg = load(doc())

    def worker(queue: int, comp: str, state: str, pin: int | None,
               drops: dict[str, int] | None) -> WorkerReport:
        return {"queue": queue, "compartment": comp, "state": state, "restarts": 1,  # type: ignore[typeddict-item]
                "packets_in": pin, "packets_out": pin, "drops": drops}

    workers = [worker(100, "default", "ready", 5, {"replay": 1}),
               worker(110, "web", "ready", 7, {"replay": 2, "integrity": 1}),
               worker(111, "web", "ready", 3, {"replay": 1}),
               worker(120, "db", "down", None, None)]
    reports = {r["name"]: r for r in supervisor.compartment_reports(cfg, workers)}
    assert reports["web"]["packets_in"] == 10 and reports["web"]["workers"] == 2
    assert reports["web"]["drops"] == {"replay": 3, "integrity": 1}
    assert reports["db"]["packets_in"] is None and reports["db"]["workers_ready"] == 0
    assert reports["default"]["selector"] == "unlabelled traffic"
    assert reports["db"]["selector"] == "gid 2000" and reports["db"]["id"] == 9


def test_the_peers_configuration_keeps_the_compartments_and_says_so() -> None:
    from pathlib import PurePath

    from nfq_ipsec.config.mirror import mirror

    done = mirror(doc(), PurePath("/etc/nfq-ipsec/a.toml"))
    peer = load(done.document)
    assert [(c.name, c.queues) for c in peer.compartments] == [("web", (110, 111)), ("db", (120,))]
    assert {sa.name: sa.direction.value for sa in peer.sas}["o-web"] == "in"
    assert any("compartments stay" in n for n in done.notes)


def test_a_compartments_missing_user_is_named() -> None:
    from nfq_ipsec import sandbox

    d = doc()
    d["compartment"][0]["user"] = "no-such-user-here"
    with pytest.raises(sandbox.SandboxError, match="compartment 'web', user 'no-such-user-here'"):
        supervisor.worker_identities(load(d))


def test_the_status_table_shows_the_compartments() -> None:
    from typing import cast

    from statusschema import sample_answer

    from nfq_ipsec.control import render_status
    from nfq_ipsec.status import StatusReport

    text = render_status(cast(StatusReport, sample_answer()))
    rows = [line.split() for line in text.splitlines() if line.startswith(("COMPARTMENT", "web "))]
    assert rows[0][:2] == ["COMPARTMENT", "ID"]
    assert rows[1][:5] == ["web", "1", "uid", "1000", "1"] and rows[1][-3:] == ["-", "-", "-"]
    one = sample_answer()
    one["compartments"] = one["compartments"][:1]  # the default alone: no table
    assert "COMPARTMENT" not in render_status(cast(StatusReport, one))

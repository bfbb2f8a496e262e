"""Installing and removing the rules for real, on iptables-nft and iptables-legacy (root).

Every test runs in a network namespace of its own (``nfqr<pid><n>``), deleted afterwards, so
the host's ruleset is never touched.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gate
import pytest
from configs import cfg_of, everything6_data, everything_data, host6_data, host_data, toml_text, udp_data
from repo import EXAMPLES, ROOT

from nfq_ipsec import iptables, rules
from nfq_ipsec.config import load_config
from nfq_ipsec.config.model import Config

_names = itertools.count()


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"nfqr{os.getpid()}{next(_names)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


@pytest.fixture(params=["nft", "legacy"])
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    missing = [c for c in (f"iptables-{name}", f"iptables-{name}-save", f"iptables-{name}-restore")
               if iptables.find_command(c) is None]
    if missing:
        gate.require([f"{', '.join(missing)} not installed"], f"!!! iptables-{name} NOT TESTED")
    return name


def with_backend(data: dict[str, Any], backend: str) -> Config:
    data["daemon"]["iptables"] = backend
    return cfg_of(data)


def example(name: str, backend: str) -> Config:
    cfg = load_config(EXAMPLES / name, online_cpus=[0, 1])
    return dataclasses.replace(cfg, daemon=dataclasses.replace(cfg.daemon, iptables=backend))


def ipt(ns: str, backend: str, *args: str) -> str:
    proc = subprocess.run(["ip", "netns", "exec", ns, f"iptables-{backend}", "-w", *args],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"iptables {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def save(ns: str, backend: str) -> str:
    """iptables-save output without the comment lines and with counters zeroed."""
    proc = subprocess.run(["ip", "netns", "exec", ns, f"iptables-{backend}-save"],
                          capture_output=True, text=True, check=True)
    lines = [re.sub(r"\[\d+:\d+\]$", "[0:0]", line) for line in proc.stdout.splitlines()
             if not line.startswith("#")]
    return "\n".join(lines) + "\n"


def without_empty_tables(text: str) -> str:
    """Drop tables that hold nothing but built-in chains with policy ACCEPT and no rules.

    Installing creates the raw/mangle/filter tables when they did not exist: iptables-legacy
    instantiates a table on first use and never removes it, iptables-nft creates the table and
    its base chains. Remove deletes everything of ours but can't delete tables (and shouldn't
    delete base chains it didn't create), so a freshly created namespace ends up with empty
    tables. Such a table does nothing to packets; everything else must be as before.
    """
    out: list[str] = []
    block: list[str] = []
    for line in text.splitlines():
        if line.startswith("*"):
            block = [line]
        elif block:
            block.append(line)
            if line == "COMMIT":
                empty = all(re.fullmatch(r":\S+ ACCEPT \[0:0\]", x) for x in block[1:-1])
                if not empty:
                    out += block
                block = []
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def jumps_in(text: str, chain: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines()
            if line.startswith(f"-A {chain} ") and re.search(rf"-j {re.escape(prefix)}-\w+$", line)]


def everything(backend: str) -> Config:
    return with_backend(everything_data(), backend)


def host_no_iface(backend: str) -> Config:
    data = host_data(default="bypass")
    del data["node"]["interface"]
    data["daemon"]["mss_clamp"] = False
    return with_backend(data, backend)


CONFIGS = {
    "host-a": lambda b: example("host-a.toml", b),
    "gateway-a": lambda b: example("gateway-a.toml", b),
    "everything": everything,
    "host-no-iface": host_no_iface,
}


@pytest.mark.parametrize("which", sorted(CONFIGS))
def test_every_rule_is_accepted_and_installed_verbatim(netns: str, backend: str, which: str) -> None:
    """iptables accepts every rule and iptables-save prints back exactly what we rendered."""
    cfg = CONFIGS[which](backend)
    assert not iptables.is_installed(cfg, netns=netns)
    iptables.install(cfg, netns=netns)
    st = iptables.status(cfg, netns=netns)
    assert st.matches, st.describe()
    assert iptables.is_installed(cfg, netns=netns)
    text = save(netns, backend)
    saved = rules.parse_save(text)
    for table in rules.build(cfg).tables:
        t = saved[table.name]
        for jump in table.jumps:
            assert next(r.spec for r in t.rules if r.chain == jump.chain) == jump.spec()
        for c in table.chains:
            have = [f"-A {c} {r.spec}" for r in t.rules if r.chain == c]
            want = [r.line() for r in table.rules_of(c)]
            # literally the same text, but for protocol numbers iptables prints by name
            assert [line.replace("-p gre", "-p 47") for line in have] == want
    assert "queue-bypass" not in text


@pytest.fixture
def netns6() -> Iterator[str]:
    name = f"nf6r{os.getpid()}{next(_names)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def save6(ns: str, backend: str) -> str:
    proc = subprocess.run(["ip", "netns", "exec", ns, f"ip6tables-{backend}-save"],
                          capture_output=True, text=True, check=True)
    return proc.stdout


@pytest.mark.parametrize("which", ["host6", "everything6"])
def test_every_ipv6_rule_is_accepted_and_installed_verbatim(
        netns6: str, backend: str, which: str) -> None:
    """ip6tables accepts every rule of the IPv6 policies (ICMPv6 errors by their quote in
    several u32 matches, HMARK over /128, the MSS clamp) and prints back what we rendered;
    stopped, the closed IPv6 rules are told from the running ones."""
    cfg = with_backend(host6_data() if which == "host6" else everything6_data(), backend)
    v6 = rules.build6(cfg)
    assert v6 is not None
    iptables.install(cfg, netns=netns6)
    try:
        st = iptables.status(cfg, netns=netns6)
        assert st.matches, st.describe()
        saved = rules.parse_save(save6(netns6, backend))
        for table in v6.tables:
            t = saved[table.name]
            for c in table.chains:
                have = [f"-A {c} {r.spec}" for r in t.rules if r.chain == c]
                assert [line.replace("-p gre", "-p 47") for line in have] == [
                    r.line() for r in table.rules_of(c)]
        iptables.install(cfg, netns=netns6, closed=True)
        st = iptables.status(cfg, netns=netns6)
        assert st.closed and not st.matches, st.describe()
        assert "NFQUEUE" not in save6(netns6, backend)
    finally:
        iptables.remove(cfg, netns=netns6)
    assert "NFQIPSEC" not in save6(netns6, backend) and "NQ6" not in save6(netns6, backend)


def test_remove_restores_a_fresh_namespace(netns: str, backend: str) -> None:
    before = save(netns, backend)
    cfg = everything(backend)
    iptables.install(cfg, netns=netns)
    assert save(netns, backend) != before
    iptables.remove(cfg, netns=netns)
    after = save(netns, backend)
    assert without_empty_tables(after) == without_empty_tables(before) == "\n"
    assert "NQT" not in after
    assert not iptables.status(cfg, netns=netns).present


FOREIGN = [
    ("raw", "-A PREROUTING -i eth9 -j CT --notrack"),
    ("raw", "-A PREROUTING -p udp -m udp --dport 53 -j ACCEPT"),
    ("raw", "-A OUTPUT -o eth9 -j CT --notrack"),
    ("mangle", "-N MYMARK"),
    ("mangle", "-A MYMARK -j MARK --set-xmark 0x7/0xff"),
    ("mangle", "-A PREROUTING -i eth9 -j MYMARK"),
    ("mangle", '-A PREROUTING -m comment --comment "keep me, in order" -j ACCEPT'),
    ("mangle", "-A OUTPUT -p tcp -m tcp --dport 25 -j DSCP --set-dscp 0x08"),
    ("mangle", "-A OUTPUT -j MYMARK"),
    ("filter", "-P FORWARD DROP"),
    ("filter", "-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"),
    ("filter", "-A FORWARD -i lan0 -o wan0 -j ACCEPT"),
    ("filter", "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT"),
    ("nat", "-A POSTROUTING -o wan0 -j MASQUERADE"),
]


def add_foreign(ns: str, backend: str) -> None:
    for table, rule in FOREIGN:
        ipt(ns, backend, "-t", table, *rules.split_spec(rule))


def test_foreign_rules_kept_in_order_and_exact_restore(netns: str, backend: str) -> None:
    add_foreign(netns, backend)
    before = save(netns, backend)
    cfg = everything(backend)
    iptables.install(cfg, netns=netns)
    during = save(netns, backend)
    # each built-in chain: our jump first, then the foreign rules exactly as they were
    old_tables, new_tables = rules.parse_save(before), rules.parse_save(during)
    for name, new_t in new_tables.items():
        old_t = old_tables[name]
        for builtin in [c for c in new_t.chains if new_t.builtin(c)]:
            old = [r.spec for r in old_t.rules if r.chain == builtin]
            new = [r.spec for r in new_t.rules if r.chain == builtin]
            ours = [j for t, j in rules.build(cfg).jumps if t == name and j.chain == builtin]
            assert new == [j.spec() for j in ours] + old, (name, builtin)
    for line in (":FORWARD DROP [0:0]", ":MYMARK - [0:0]", "-A MYMARK -j MARK --set-xmark 0x7/0xff"):
        assert line in during
    assert iptables.is_installed(cfg, netns=netns)
    iptables.remove(cfg, netns=netns)
    assert save(netns, backend) == before  # exactly, tables and all: they existed before


def test_double_install_leaves_one_jump(netns: str, backend: str) -> None:
    add_foreign(netns, backend)
    cfg = everything(backend)
    iptables.install(cfg, netns=netns)
    first = save(netns, backend)
    iptables.install(cfg, netns=netns)
    second = save(netns, backend)
    assert first == second
    for builtin in ("PREROUTING", "OUTPUT", "FORWARD"):
        per_table = [t for t in second.split("COMMIT") if jumps_in(t, builtin, "NQT")]
        for t in per_table:
            assert len(jumps_in(t, builtin, "NQT")) == 1
    assert second.count("-j NQT-IN") == 1 and second.count("-j NQT-LEAK") == 1
    assert second.count("-j NQT-OUT") == 1 and second.count("-j NQT-FWD") == 1
    assert iptables.is_installed(cfg, netns=netns)


def test_install_takes_over_after_a_crash(netns: str, backend: str) -> None:
    cfg = everything(backend)
    iptables.install(cfg, netns=netns)
    clean = save(netns, backend)
    # what a crash in the middle of things, or a manual mistake, might leave behind
    ipt(netns, backend, "-t", "raw", "-A", "PREROUTING", "-i", "wan0", "-j", "NQT-IN")
    ipt(netns, backend, "-t", "mangle", "-I", "OUTPUT", "1", "-o", "wan0", "-j", "NQT-OUT")
    ipt(netns, backend, "-t", "mangle", "-N", "NQT-P42")
    ipt(netns, backend, "-t", "mangle", "-A", "NQT-P42", "-j", "ACCEPT")
    ipt(netns, backend, "-t", "mangle", "-I", "NQT-OUT", "2", "-j", "NQT-P42")
    ipt(netns, backend, "-t", "raw", "-I", "NQT-IN", "1", "-j", "ACCEPT")
    ipt(netns, backend, "-t", "filter", "-D", "FORWARD", "-o", "wan0", "-j", "NQT-LEAK")
    st = iptables.status(cfg, netns=netns)
    assert st.present and not st.matches
    text = st.describe()
    assert "2 copies" in text and "stale chain NQT-P42" in text and "0 copies" in text
    iptables.install(cfg, netns=netns)
    assert save(netns, backend) == clean
    assert iptables.is_installed(cfg, netns=netns)


def test_configuration_change_replaces_everything(netns: str, backend: str) -> None:
    before = save(netns, backend)
    gateway = everything(backend)
    iptables.install(gateway, netns=netns)
    data = everything_data()
    data["node"]["role"] = "host"
    data["policy"] = [p for p in data["policy"] if p["name"] != "web"]
    data["sa"] = [s for s in data["sa"] if s["name"] != "web-out"]
    host = with_backend(data, backend)
    assert not iptables.is_installed(host, netns=netns)
    iptables.install(host, netns=netns)
    assert iptables.is_installed(host, netns=netns)
    assert not iptables.is_installed(gateway, netns=netns)
    text = save(netns, backend)
    for gone in ("NQT-FWD", "NQT-LEAK", "NQT-P11"):
        assert gone not in text
    assert "NQT-P10" in text  # "lans" is policy 10 now
    iptables.remove(gateway, netns=netns)  # remove needs only the prefix: any config will do
    assert without_empty_tables(save(netns, backend)) == without_empty_tables(before)


def test_remove_is_idempotent_and_creates_nothing(netns: str, backend: str) -> None:
    cfg = everything(backend)
    before = save(netns, backend)
    iptables.remove(cfg, netns=netns)
    assert save(netns, backend) == before  # not even an empty table
    add_foreign(netns, backend)
    before = save(netns, backend)
    iptables.install(cfg, netns=netns)
    iptables.remove(cfg, netns=netns)
    iptables.remove(cfg, netns=netns)
    assert save(netns, backend) == before


def test_other_prefixes_are_left_alone(netns: str, backend: str) -> None:
    """Two daemons, prefixes "NQT" and "NQT-B": removing one never touches the other."""
    first = everything(backend)
    data = everything_data()
    data["daemon"]["chain_prefix"] = "NQT-B"
    second = with_backend(data, backend)
    iptables.install(first, netns=netns)
    iptables.install(second, netns=netns)
    assert iptables.is_installed(second, netns=netns)
    st = iptables.status(first, netns=netns)
    assert st.complete and "our jump is rule 2, not 1" in st.describe()  # the second went first
    iptables.remove(first, netns=netns)
    assert iptables.is_installed(second, netns=netns)
    assert not iptables.status(first, netns=netns).present
    iptables.remove(second, netns=netns)
    assert "NQT" not in save(netns, backend)


def test_foreign_reference_blocks_remove(netns: str, backend: str) -> None:
    cfg = everything(backend)
    iptables.install(cfg, netns=netns)
    ipt(netns, backend, "-t", "raw", "-N", "THEIRS")
    ipt(netns, backend, "-t", "raw", "-A", "THEIRS", "-j", "NQT-IN")
    before = save(netns, backend)
    with pytest.raises(iptables.RulesError, match="THEIRS"):
        iptables.remove(cfg, netns=netns)
    assert save(netns, backend) == before


def test_restore_failure_is_reported(netns: str, backend: str) -> None:
    be = iptables.BACKENDS[backend]
    script = "*raw\n:NQT-IN - [0:0]\n-A NQT-IN -j NO-SUCH-CHAIN\nCOMMIT\n"
    with pytest.raises(iptables.RulesError) as info:
        iptables.apply(be, script, netns=netns)
    err = info.value
    assert err.argv[:4] == (iptables.find_command("ip"), "netns", "exec", netns)
    assert err.argv[4].endswith(f"iptables-{backend}-restore") and "--noflush" in err.argv
    assert err.returncode not in (None, 0) and err.stderr
    assert "NO-SUCH-CHAIN" in str(err) and "command:" in str(err)
    assert "NQT" not in save(netns, backend)  # the failed transaction left nothing


def test_cli_and_setup_script(netns: str, backend: str, tmp_path: Path) -> None:
    data = everything_data()
    del data["daemon"]["cpus"]  # the loader pins the queues to this machine's CPUs
    data["daemon"]["iptables"] = backend
    conf = tmp_path / "gw.toml"
    conf.write_text(toml_text(data))
    conf.chmod(0o600)
    before = save(netns, backend)

    def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True,
                              check=False, env=env)

    cli = [sys.executable, "-m", "nfq_ipsec.cli", "rules"]
    done = run(*cli, "install", "--config", str(conf))
    assert done.returncode == 0, done.stderr
    assert "rules installed" in done.stdout
    shown = run(*cli, "show", "--config", str(conf))
    assert shown.returncode == 0
    assert "installed (matches this configuration)" in shown.stderr
    assert shown.stdout == rules.render(load_config(conf))

    nfq = Path(sys.executable).parent / "nfq-ipsec"
    env = {**os.environ, "NFQ_IPSEC": str(nfq if nfq.exists() else "nfq-ipsec")}
    script = str(ROOT / "scripts" / "nfq-ipsec-rules")
    done = run(script, "install", str(conf), env=env)
    assert done.returncode == 0, done.stderr
    done = run(script, "remove", str(conf), env=env)
    assert done.returncode == 0, done.stderr
    assert "rules removed" in done.stdout
    assert without_empty_tables(save(netns, backend)) == without_empty_tables(before)
    again = run(script, "remove", str(conf), env=env)
    assert again.returncode == 0 and "no rules to remove" in again.stdout
    shown = run(*cli, "show", "--config", str(conf))
    assert "rules not installed" in shown.stderr


# -- packets follow the rules (no workers: queued packets are dropped, fail closed) ------------

@pytest.fixture
def peer_pair(netns: str) -> Iterator[tuple[str, str]]:
    """Two namespaces joined by a veth pair: a0 10.0.0.1/24 <-> b0 10.0.0.2/24."""
    other = f"{netns}b"
    subprocess.run(["ip", "netns", "add", other], check=True, capture_output=True)
    try:
        cmds = [
            ["ip", "link", "add", "a0", "netns", netns, "type", "veth", "peer", "b0", "netns", other],
            ["ip", "-n", netns, "addr", "add", "10.0.0.1/24", "dev", "a0"],
            ["ip", "-n", other, "addr", "add", "10.0.0.2/24", "dev", "b0"],
            ["ip", "-n", netns, "link", "set", "a0", "up"],
            ["ip", "-n", other, "link", "set", "b0", "up"],
            ["ip", "-n", netns, "link", "set", "lo", "up"],
            ["ip", "-n", other, "link", "set", "lo", "up"],
        ]
        for cmd in cmds:
            subprocess.run(cmd, check=True, capture_output=True)
        yield netns, other
    finally:
        subprocess.run(["ip", "netns", "del", other], check=False, capture_output=True)


SEND = """
import socket, struct, sys
kind, src, dst = sys.argv[1], sys.argv[2], sys.argv[3]
if kind == "esp":
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)
    for spi in map(int, sys.argv[4:]):
        s.sendto(struct.pack("!II", spi, 1) + bytes(32), (dst, 0))
else:
    dport, sports, count = int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
    lo, hi = map(int, sports.split("-"))
    for sport in range(lo, hi + 1):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((src, sport))
        for _ in range(count):
            try:
                s.sendto(b"x" * 20, (dst, dport))
            except OSError:
                pass  # dropped in OUTPUT: sendto reports it
        s.close()
"""


def send(ns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", SEND, *args], check=True)


def counters(ns: str, backend: str) -> dict[str, int]:
    """Packet counter of every rule, by "-A CHAIN spec" line (first occurrence)."""
    out = subprocess.run(["ip", "netns", "exec", ns, f"iptables-{backend}-save", "-c"],
                         capture_output=True, text=True, check=True).stdout
    result: dict[str, int] = {}
    for line in out.splitlines():
        m = re.match(r"\[(\d+):\d+\] (-A .*)$", line)
        if m:
            result.setdefault(m.group(2), int(m.group(1)))
    return result


def test_packets_take_the_designed_paths(peer_pair: tuple[str, str], backend: str) -> None:
    a, b = peer_pair
    data = {
        "node": {"interface": "a0"},
        "daemon": {"queues": [100, 101], "cpus": [0, 1], "iptables": backend},
        "policy": [
            {"name": "discard-6", "action": "discard", "local": "10.0.0.1/32",
             "remote": "10.0.0.2/32", "protocol": "udp", "remote_ports": 6},
            {"name": "echo", "action": "bypass", "local": "10.0.0.1/32", "remote": "10.0.0.2/32",
             "protocol": "udp", "remote_ports": 9},
            {"name": "a-b", "action": "protect", "local": "10.0.0.1/32", "remote": "10.0.0.2/32",
             "sa": ["o0", "o1", "i0", "i1"]},
        ],
        "sa": [
            {"name": n, "direction": d, "spi": spi, "queue": q, "encryption": "aes-gcm-128",
             "key": f"{spi:08x}" * 5}  # one key per SA
            for n, d, spi, q in (("o0", "out", 0x1000, 100), ("o1", "out", 0x1001, 101),
                                 ("i0", "in", 0x2000, 100), ("i1", "in", 0x2001, 101))
        ],
    }
    cfg = cfg_of(data)
    iptables.install(cfg, netns=a)
    # the peer counts what arrives in cleartext on each port
    for port in ("5000", "9", "6"):
        ipt(b, backend, "-t", "raw", "-A", "PREROUTING", "-i", "b0", "-p", "udp", "--dport", port)
    base = rules.hmark_base(cfg.daemon.mark)
    q0 = f"-A NFQIPSEC-P2 -m mark --mark 0x{base:x} -j NFQUEUE --queue-num 100"
    q1 = f"-A NFQIPSEC-P2 -m mark --mark 0x{base + 1:x} -j NFQUEUE --queue-num 101"
    drop = "-A NFQIPSEC-P2 -j DROP"

    # 64 flows, one packet each: HMARK spreads them over both SAs' queues, none gets through
    send(a, "udp", "10.0.0.1", "10.0.0.2", "5000", "40000-40063", "1")
    c = counters(a, backend)
    assert c[q0] + c[q1] == 64 and c[q0] > 0 and c[q1] > 0, (c[q0], c[q1])
    assert c[drop] == 0  # every hash value has its queue rule
    # one flow, 20 packets: all to the same queue
    send(a, "udp", "10.0.0.1", "10.0.0.2", "5000", "41000-41000", "20")
    c2 = counters(a, backend)
    assert sorted((c2[q0] - c[q0], c2[q1] - c[q1])) == [0, 20]
    # bypass leaves in cleartext, discard doesn't
    send(a, "udp", "10.0.0.1", "10.0.0.2", "9", "42000-42002", "1")
    send(a, "udp", "10.0.0.1", "10.0.0.2", "6", "42000-42002", "1")
    peer = counters(b, backend)
    assert peer["-A PREROUTING -i b0 -p udp -m udp --dport 9"] == 3
    assert peer["-A PREROUTING -i b0 -p udp -m udp --dport 5000"] == 0  # nothing protected leaked
    assert peer["-A PREROUTING -i b0 -p udp -m udp --dport 6"] == 0

    # inbound: ESP by SPI to its owner's queue, unknown SPIs dropped in the kernel, cleartext of a
    # protected flow dropped, bypass returned
    # (the ICMP port-unreachable errors B sent for the bypassed packets were dropped already:
    # ICMP between the two is part of the protected traffic)
    before = counters(a, backend)
    send(b, "esp", "10.0.0.2", "10.0.0.1", str(0x2001), str(0x2001), str(0x2000), str(0x9999))
    send(b, "udp", "10.0.0.2", "10.0.0.1", "5000", "43000-43004", "1")
    send(b, "udp", "10.0.0.2", "10.0.0.1", "7", "9-9", "2")
    after = counters(a, backend)
    delta = {k: after[k] - before[k] for k in after}
    assert delta["-A NFQIPSEC-IN -p esp -m esp --espspi 8193 -j NFQUEUE --queue-num 101"] == 2
    assert delta["-A NFQIPSEC-IN -p esp -m esp --espspi 8192 -j NFQUEUE --queue-num 100"] == 1
    assert delta["-A NFQIPSEC-IN -p esp -m addrtype --dst-type LOCAL -j DROP"] == 1
    assert iptables.kernel_drops(cfg, netns=a)["unknown_spi"] == 1
    assert delta["-A NFQIPSEC-IN -s 10.0.0.2/32 -d 10.0.0.1/32 -j DROP"] == 5
    assert delta["-A NFQIPSEC-IN -s 10.0.0.2/32 -d 10.0.0.1/32 -p udp -m udp --sport 9 -j RETURN"] == 2


@pytest.fixture
def gateway_lab(netns: str) -> Iterator[tuple[str, str, str]]:
    """lan host L 10.1.0.5 -- [lan0 10.1.0.1] gateway G [wan0 192.0.2.1] -- 192.0.2.2 R (10.2.0.7)."""
    lan, remote = f"{netns}l", f"{netns}r"
    for ns in (lan, remote):
        subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    try:
        cmds = [
            ["ip", "link", "add", "l0", "netns", lan, "type", "veth", "peer", "lan0", "netns", netns],
            ["ip", "link", "add", "wan0", "netns", netns, "type", "veth", "peer", "r0", "netns", remote],
            ["ip", "-n", lan, "addr", "add", "10.1.0.5/24", "dev", "l0"],
            ["ip", "-n", netns, "addr", "add", "10.1.0.1/24", "dev", "lan0"],
            ["ip", "-n", netns, "addr", "add", "192.0.2.1/24", "dev", "wan0"],
            ["ip", "-n", remote, "addr", "add", "192.0.2.2/24", "dev", "r0"],
            ["ip", "-n", remote, "addr", "add", "10.2.0.7/24", "dev", "r0"],
        ]
        cmds += [["ip", "-n", ns, "link", "set", dev, "up"]
                 for ns, dev in ((lan, "l0"), (netns, "lan0"), (netns, "wan0"), (remote, "r0"))]
        cmds += [
            ["ip", "-n", lan, "route", "add", "default", "via", "10.1.0.1"],
            ["ip", "-n", netns, "route", "add", "10.2.0.0/24", "via", "192.0.2.2"],
            ["ip", "-n", remote, "route", "add", "10.1.0.0/24", "via", "192.0.2.1"],
            ["ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
        ]
        for cmd in cmds:
            subprocess.run(cmd, check=True, capture_output=True)
        yield lan, netns, remote
    finally:
        for ns in (lan, remote):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def test_gateway_packets_take_the_designed_paths(
    gateway_lab: tuple[str, str, str], backend: str
) -> None:
    lan, gw, remote = gateway_lab
    data = {
        "node": {"interface": "wan0", "role": "gateway"},
        "daemon": {"queues": [100], "cpus": [0], "iptables": backend},
        "policy": [
            {"name": "echo", "action": "bypass", "local": "10.1.0.0/24", "remote": "192.0.2.2/32",
             "protocol": "udp", "remote_ports": 9},
            {"name": "lans", "action": "protect", "local": "10.1.0.0/24", "remote": "10.2.0.0/24",
             "sa": ["out", "in"]},
        ],
        "sa": [
            {"name": n, "direction": d, "spi": spi, "mode": "tunnel", "tunnel_local": "192.0.2.1",
             "tunnel_remote": "192.0.2.2", "encryption": "aes-gcm-128",
             "key": f"{spi:08x}" * 5}  # one key per SA
            for n, d, spi in (("out", "out", 0x1000), ("in", "in", 0x2000))
        ],
    }
    iptables.install(cfg_of(data), netns=gw)
    for port in ("5000", "9"):
        ipt(remote, backend, "-t", "raw", "-A", "PREROUTING", "-i", "r0", "-p", "udp", "--dport", port)
    send(lan, "udp", "10.1.0.5", "10.2.0.7", "5000", "40000-40009", "1")  # protected: queued
    send(lan, "udp", "10.1.0.5", "192.0.2.2", "9", "40000-40002", "1")  # bypass: forwarded
    send(lan, "udp", "10.1.0.5", "192.0.2.2", "5000", "40000-40003", "1")  # no policy: leak guard
    g = counters(gw, backend)
    assert g["-A NFQIPSEC-FWD -s 10.1.0.0/24 -d 10.2.0.0/24 -j NFQIPSEC-P1"] == 10
    assert g["-A NFQIPSEC-P1 -j NFQUEUE --queue-num 100"] == 10
    assert g["-A NFQIPSEC-LEAK -s 10.1.0.0/24 -d 192.0.2.2/32 -p udp -m udp --dport 9 -j RETURN"] == 3
    assert g["-A NFQIPSEC-LEAK -j DROP"] == 4
    r = counters(remote, backend)
    assert r["-A PREROUTING -i r0 -p udp -m udp --dport 9"] == 3
    assert r["-A PREROUTING -i r0 -p udp -m udp --dport 5000"] == 0  # no cleartext leaked


FAKE_WORKER = """
# Rewrites every queued packet into a tunnel-mode ESP packet 192.0.2.1 -> 192.0.2.2, SPI 0x1000,
# sequence 1, marked like a real worker's, and accepts it.
import socket, struct, sys
from netfilterqueue import NetfilterQueue
mark = int(sys.argv[1])
def cb(pkt):
    body = struct.pack("!II", 0x1000, 1) + pkt.get_payload()
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 1, 0, 64, 50, 0,
                                socket.inet_aton("192.0.2.1"), socket.inet_aton("192.0.2.2")))
    s = sum(struct.unpack("!10H", bytes(hdr)))
    s = (s >> 16) + (s & 0xFFFF)
    struct.pack_into("!H", hdr, 10, ~(s + (s >> 16)) & 0xFFFF)
    pkt.set_payload(bytes(hdr) + body)
    pkt.set_mark(pkt.get_mark() | mark)
    pkt.accept()
q = NetfilterQueue()
q.bind(100, cb)
print("bound", flush=True)
q.run()
"""

ESP_RECEIVER = """
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)
s.settimeout(5)
print("ready", flush=True)
for _ in range(2):
    data = s.recv(2048)
    spi, seq = struct.unpack_from("!II", data, (data[0] & 0xF) * 4)
    print(f"{spi:08x} {seq}", flush=True)
"""


def test_nat_exemption_keeps_worker_esp_intact(
    gateway_lab: tuple[str, str, str], backend: str
) -> None:
    """A gateway that masquerades its WAN side (the usual setup) must not rewrite our ESP.

    Without the NAT exemption the kernel applies the plaintext flow's masquerade binding to the
    ESP packet (it still carries that conntrack entry) and writes the UDP source port over the
    first half of the SPI: SPI 0x00001000 arrives as 0x9c401000.
    """
    try:
        import netfilterqueue  # noqa: F401
    except ImportError:
        gate.require(["NetfilterQueue is not installed"])
    lan, gw, remote = gateway_lab
    for sysctl in ("net.ipv4.conf.lan0.accept_local=1", "net.ipv4.conf.all.rp_filter=0",
                   "net.ipv4.conf.lan0.rp_filter=0"):
        subprocess.run(["ip", "netns", "exec", gw, "sysctl", "-qw", sysctl], check=True)
    ipt(gw, backend, "-t", "nat", "-A", "POSTROUTING", "-o", "wan0", "-j", "MASQUERADE")
    data = {
        "node": {"interface": "wan0", "role": "gateway"},
        "daemon": {"queues": [100], "cpus": [0], "iptables": backend},
        "policy": [{"name": "lans", "action": "protect", "local": "10.1.0.0/24",
                    "remote": "10.2.0.0/24", "sa": ["out", "in"]}],
        "sa": [
            {"name": n, "direction": d, "spi": spi, "mode": "tunnel", "tunnel_local": "192.0.2.1",
             "tunnel_remote": "192.0.2.2", "encryption": "aes-gcm-128",
             "key": f"{spi:08x}" * 5}  # one key per SA
            for n, d, spi in (("out", "out", 0x1000), ("in", "in", 0x2000))
        ],
    }
    cfg = cfg_of(data)
    iptables.install(cfg, netns=gw)
    worker = subprocess.Popen(["ip", "netns", "exec", gw, sys.executable, "-c", FAKE_WORKER,
                               str(cfg.daemon.mark)], stdout=subprocess.PIPE, text=True)
    receiver = subprocess.Popen(["ip", "netns", "exec", remote, sys.executable, "-c", ESP_RECEIVER],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None and receiver.stdout is not None
        assert worker.stdout.readline().strip() == "bound"
        assert receiver.stdout.readline().strip() == "ready"
        send(lan, "udp", "10.1.0.5", "10.2.0.7", "5000", "40000-40001", "1")
        out, _ = receiver.communicate(timeout=10)
    finally:
        worker.kill()
        worker.wait()
        receiver.kill()
    assert out.split("\n")[:2] == ["00001000 1", "00001000 1"]


# -- ESP in UDP (RFC 3948) ----------------------------------------------------------------------

@pytest.fixture
def udp_pair() -> Iterator[tuple[str, str]]:
    """Two namespaces of this run joined by a veth pair: a0 10.0.0.1/24 <-> b0 10.0.0.2/24."""
    a, b = f"nfu{os.getpid()}{next(_names)}a", f"nfu{os.getpid()}{next(_names)}b"
    made: list[str] = []
    try:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
            made.append(ns)
        for cmd in (
            ["ip", "link", "add", "a0", "netns", a, "type", "veth", "peer", "b0", "netns", b],
            ["ip", "-n", a, "addr", "add", "10.0.0.1/24", "dev", "a0"],
            ["ip", "-n", b, "addr", "add", "10.0.0.2/24", "dev", "b0"],
            ["ip", "-n", a, "link", "set", "a0", "up"], ["ip", "-n", b, "link", "set", "b0", "up"],
            ["ip", "-n", a, "link", "set", "lo", "up"], ["ip", "-n", b, "link", "set", "lo", "up"],
        ):
            subprocess.run(cmd, check=True, capture_output=True)
        yield a, b
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def udp_host(backend: str) -> Config:
    """Host 10.0.0.1 (a0) with udp_data()'s SAs, in transport mode to 10.0.0.2."""
    data = udp_data()
    data["node"] = {"interface": "a0"}
    data["daemon"]["iptables"] = backend
    data["policy"][0].update(local="10.0.0.1/32", remote="10.0.0.2/32")
    for sa in data["sa"]:
        for key in ("mode", "tunnel_local", "tunnel_remote"):
            sa.pop(key)
    return cfg_of(data)


def test_esp_in_udp_rules_are_installed_verbatim(udp_pair: tuple[str, str], backend: str) -> None:
    a, _ = udp_pair
    for cfg in (with_backend(udp_data(), backend), udp_host(backend)):
        iptables.install(cfg, netns=a)
        saved = rules.parse_save(save(a, backend))
        for table in rules.build(cfg).tables:
            for c in table.chains:
                have = [f"-A {c} {r.spec}" for r in saved[table.name].rules if r.chain == c]
                assert have == [r.line() for r in table.rules_of(c)]
        iptables.remove(cfg, netns=a)


UDP_SEND = """
import socket, struct, sys
dst, mark = sys.argv[1], int(sys.argv[2])
for item in sys.argv[3:]:
    kind, _, hexdata = item.partition(":")
    payload = bytes.fromhex(hexdata)
    if kind == "esp":
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 50)
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("", int(kind)))
    if mark:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    try:
        s.sendto(payload, (dst, 0 if kind == "esp" else 4500))
    except OSError:
        pass  # dropped in OUTPUT
    s.close()
"""


def udp_send(ns: str, dst: str, mark: int, *items: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", UDP_SEND, dst, str(mark),
                    *items], check=True)


def udp_rule(port: int, u32: str, target: str) -> str:
    return (f"-p udp -m udp --dport {port} -m addrtype --dst-type LOCAL -m u32 --u32 "
            f'"0x0>>0x16&0x3c@{u32}" -j {target}')


def test_esp_in_udp_packets_take_the_designed_paths(udp_pair: tuple[str, str],
                                                    backend: str) -> None:
    """Inbound: ESP in UDP by SPI to its owner's queue; the marker and runts to the port's
    worker; keepalives, unknown SPIs and the other encapsulation's SPIs dropped in the kernel
    with their reasons. Outbound: marked ESP in UDP of our SPI and marked keepalives leave, a
    marked datagram from the port with another SPI does not (the mark is no proof)."""
    a, b = udp_pair
    cfg = udp_host(backend)
    iptables.install(cfg, netns=a)
    seq = "00000001" + "00" * 24
    before = counters(a, backend)
    udp_send(b, "10.0.0.1", 0,
             f"4500:00002000{seq}", f"4500:00002001{seq}", f"4500:00002001{seq}",
             f"4500:00003000{seq}",  # the plain SA's SPI in UDP
             "4500:ff", "4500:ff", "4500:ff",  # keepalives
             f"4500:00009999{seq}",  # unknown SPI
             "4500:00000000" + "ab" * 40,  # the non-ESP marker (IKE)
             "4500:000020",  # a runt
             f"esp:00002000{seq}")  # plain ESP with the SPI of an SA of ESP in UDP
    delta = {k: v - before.get(k, 0) for k, v in counters(a, backend).items()}

    def to(u32: str, target: str) -> str:
        return "-A NFQIPSEC-IN " + udp_rule(4500, u32, target)

    assert delta[to("0x8=0x2000", "NFQUEUE --queue-num 100")] == 1
    assert delta[to("0x8=0x2001", "NFQUEUE --queue-num 101")] == 2
    rest = "-A NFQIPSEC-IN -p udp -m udp --dport 4500 -m addrtype --dst-type LOCAL -j NFQUEUE --queue-num 100"
    assert delta[rest] == 2
    drops = iptables.kernel_drops(cfg, netns=a)
    assert drops["encap_mismatch"] == 2 and drops["nat_keepalive"] == 3
    assert drops["unknown_spi"] == 1

    # outbound, from a: what a worker sends (marked) to the peer, counted at the peer
    ipt(b, backend, "-t", "raw", "-A", "PREROUTING", "-i", "b0", "-p", "udp", "--dport", "4500")
    mark = cfg.daemon.mark
    udp_send(a, "10.0.0.2", mark, f"4500:00001000{seq}", "4500:ff", f"4500:00001001{seq}",
             f"4501:00001001{seq}")
    udp_send(a, "10.0.0.2", 0, f"4500:00001000{seq}", "4500:ff")  # not marked: the SPD's
    peer = counters(b, backend)
    # o0's ESP from 4500, a keepalive from 4500 and o1's ESP from 4501 left; o1's SPI from
    # 4500 and everything unmarked was queued to a worker (none runs: dropped)
    assert peer["-A PREROUTING -i b0 -p udp -m udp --dport 4500"] == 3

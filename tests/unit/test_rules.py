"""Rule rendering and planning (no root): the IPsec boundary as iptables-restore text."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any

import gate
import pytest
from configs import CPUS, cfg_of, everything_data, host6_data, host_data, toml_text, udp_data
from repo import EXAMPLES, ROOT

from nfq_ipsec import iptables, rules
from nfq_ipsec.cli import main as cli_main
from nfq_ipsec.commands import rules as rules_command
from nfq_ipsec.config import load_config
from nfq_ipsec.config.model import Config
from nfq_ipsec.core.errors import ConfigError
from nfq_ipsec.core.esp import overhead_for

RULE_EXAMPLES = ROOT / "iptables"


def example(name: str) -> Config:
    return load_config(EXAMPLES / name, online_cpus=CPUS)








def rule_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


ICMP_ERROR_MARK = "=0x3,0x4,0x5,0xb,0xc"  # in the u32 match of every ICMP-error rule
ICMP6_ERROR_MARK = "0x28>>0x18=0x1:0x4"  # and of every ICMPv6-error rule
FRAG_NEEDED_MARK = "@0x0>>0x10=0x304&&"  # ... and of a path MTU report (type 3 code 4)
DEFRAG_RULE = "-p esp -m esp --espspi 0 -m socket -j RETURN"  # turns reassembly on, matches nothing


def chain(text: str, name: str, icmp_errors: bool = False) -> list[str]:
    """The -A lines of one chain, without the "-A NAME " part; the rules for ICMP errors and
    the reassembly switch only with ``icmp_errors`` (tests of the SPD proper leave them out;
    they have their own tests)."""
    prefix = f"-A {name} "
    return [line[len(prefix):] for line in rule_lines(text) if line.startswith(prefix)
            and (icmp_errors or (ICMP_ERROR_MARK not in line and FRAG_NEEDED_MARK not in line
                                 and ICMP6_ERROR_MARK not in line and DEFRAG_RULE not in line))]


def table_of(text: str, name: str) -> list[str]:
    lines = rule_lines(text)
    if f"*{name}" not in lines:
        return []
    start = lines.index(f"*{name}")
    end = lines.index("COMMIT", start)
    return lines[start + 1:end]


# -- the host example -------------------------------------------------------------------------

def test_host_example_layout() -> None:
    text = rules.render(example("host-a.toml"), comments=False)
    assert [line for line in rule_lines(text) if line.startswith("*")] == ["*raw", "*mangle"]  # no nat
    assert table_of(text, "raw")[:2] == [":NFQIPSEC-IN - [0:0]", "-I PREROUTING 1 -i eth1 -j NFQIPSEC-IN"]
    assert chain(text, "NFQIPSEC-IN") == [
        "-m mark --mark 0x10000000/0x10000000 -j RETURN",
        "-p esp -m esp --espspi 8192 -j NFQUEUE --queue-num 100",
        "-p esp -m esp --espspi 8193 -j NFQUEUE --queue-num 101",
        "-p esp -f -m addrtype --dst-type LOCAL -j DROP",  # non-first fragments: no SPI
        "-p esp -m addrtype --dst-type LOCAL -j DROP",  # unknown SPI: dropped in the kernel
        "-s 192.168.56.11/32 -d 192.168.56.10/32 -p tcp -m tcp --dport 22 -j RETURN",
        "-s 192.168.56.11/32 -d 192.168.56.10/32 -j DROP",
        "-j DROP",
    ]
    mangle = table_of(text, "mangle")
    assert mangle[:5] == [":NFQIPSEC-OUT - [0:0]", ":NFQIPSEC-P1 - [0:0]", ":NFQIPSEC-MSS - [0:0]",
                          "-I OUTPUT 1 -o eth1 -j NFQIPSEC-OUT",
                          "-I INPUT 1 -i eth1 -m mark --mark 0x10000000/0x10000000 -j NFQIPSEC-MSS"]
    assert chain(text, "NFQIPSEC-OUT") == [
        # only ESP of our own outbound SAs, with the mark, skips the SPD
        "-p esp -m esp --espspi 4096 -m mark --mark 0x10000000/0x10000000 -j RETURN",
        "-p esp -m esp --espspi 4097 -m mark --mark 0x10000000/0x10000000 -j RETURN",
        "-s 192.168.56.10/32 -d 192.168.56.11/32 -p tcp -m tcp --sport 22 -j RETURN",
        "-s 192.168.56.10/32 -d 192.168.56.11/32 -j NFQIPSEC-P1",
        "-j DROP",
    ]
    assert chain(text, "NFQIPSEC-P1") == [
        "-p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss 1423",
        "-j HMARK --hmark-src-prefix 32 --hmark-dst-prefix 32 --hmark-sport-mask 0xffff "
        "--hmark-dport-mask 0xffff --hmark-proto-mask 0xffff --hmark-rnd 0x6e667169 "
        f"--hmark-mod 2 --hmark-offset {0x4E510000}",
        "-m mark --mark 0x4e510000 -j NFQUEUE --queue-num 100",
        "-m mark --mark 0x4e510001 -j NFQUEUE --queue-num 101",
        "-j DROP",
    ]


def test_host_b_mirrors_host_a() -> None:
    a = rules.render(example("host-a.toml"), comments=False)
    b = rules.render(example("host-b.toml"), comments=False)
    assert chain(b, "NFQIPSEC-IN")[1:3] == [
        "-p esp -m esp --espspi 4096 -j NFQUEUE --queue-num 100",
        "-p esp -m esp --espspi 4097 -j NFQUEUE --queue-num 101",
    ]
    # host B is the ssh client: its bypass is the other way round
    assert "-s 192.168.56.11/32 -d 192.168.56.10/32 -p tcp -m tcp --dport 22 -j RETURN" in chain(
        b, "NFQIPSEC-OUT")
    assert len(rule_lines(a)) == len(rule_lines(b))


def test_only_jumps_touch_builtin_chains() -> None:
    for cfg in (example("host-a.toml"), example("gateway-a.toml"), cfg_of(everything_data())):
        prefix = cfg.daemon.chain_prefix
        for line in rule_lines(rules.render(cfg)):
            if line.startswith("-A "):
                assert line.split()[1].startswith(prefix + "-"), line
            elif line.startswith("-I "):
                assert line.split()[2] == "1" and line.split()[-2:][0] == "-j", line
                assert rules.is_our_chain(prefix, line.split()[-1]), line
            elif line.startswith(":"):
                assert rules.is_our_chain(prefix, line[1:].split()[0]), line
            else:
                assert line.startswith("*") or line == "COMMIT", line
        for _table, name in rules.build(cfg).chains:
            assert len(name) <= rules.MAX_CHAIN_NAME


@pytest.mark.parametrize("name", ["host-a.toml", "host-b.toml", "gateway-a.toml", "gateway-b.toml"])
def test_fail_closed_everywhere(name: str) -> None:
    cfgs = [example(name), cfg_of(everything_data()), cfg_of(host_data(default="bypass"))]
    for cfg in cfgs:
        text = "\n".join(rule_lines(rules.render(cfg)))
        assert "queue-bypass" not in text
        assert "--queue-balance" not in text and "fanout" not in text
        for line in rule_lines(text):
            if "NFQUEUE" in line:
                assert int(line.split("--queue-num ")[1]) in cfg.queue_numbers
        rs = rules.build(cfg)
        for table in rs.tables:
            for c in table.chains:
                if re.fullmatch(r".*-P\d+", c):
                    assert table.rules_of(c)[-1].args == ("-j", "DROP"), c


def test_unknown_spi_rule_after_known_spis_and_before_spd() -> None:
    text = rules.render(cfg_of(everything_data()), comments=False)
    p_in = chain(text, "NQT-IN")
    esp = [i for i, r in enumerate(p_in) if r.startswith("-p esp")]
    assert esp == [1, 2, 3, 4, 5]
    assert [p_in[i] for i in esp] == [
        "-p esp -m esp --espspi 8192 -j NFQUEUE --queue-num 100",
        "-p esp -m esp --espspi 8193 -j NFQUEUE --queue-num 101",
        "-p esp -m esp --espspi 8196 -j NFQUEUE --queue-num 102",
        "-p esp -f -m addrtype --dst-type LOCAL -j DROP",  # non-first fragments: no SPI
        "-p esp -m addrtype --dst-type LOCAL -j DROP",  # unknown SPI: dropped in the kernel, no queue
    ]
    unknown = [r for r in rules.build(cfg_of(everything_data())).tables[0].rules
               if r.args[-1] == "DROP" and "esp" in r.args]
    assert [r.reason for r in unknown] == ["fragment", "unknown_spi"]
    assert p_in[0] == "-m mark --mark 0x40000000/0x40000000 -j RETURN"


def test_inbound_without_inbound_sas_drops_esp_to_us() -> None:
    data = host_data()
    data["policy"][0]["direction"] = "out"
    data["policy"][0]["sa"] = ["out0"]
    data["sa"] = data["sa"][:1]
    text = rules.render(cfg_of(data), comments=False)
    assert chain(text, "NFQIPSEC-IN") == [
        "-m mark --mark 0x10000000/0x10000000 -j RETURN",
        "-p esp -f -m addrtype --dst-type LOCAL -j DROP",
        "-p esp -m addrtype --dst-type LOCAL -j DROP",
        "-j DROP",
    ]


# -- gateways ---------------------------------------------------------------------------------

def test_gateway_example() -> None:
    text = rules.render(example("gateway-a.toml"), comments=False)
    assert [line for line in rule_lines(text) if line.startswith("*")] == [
        "*raw", "*mangle", "*nat", "*filter"]
    mangle = table_of(text, "mangle")
    assert "-I OUTPUT 1 -o wan0 -j NFQIPSEC-OUT" in mangle
    assert "-I PREROUTING 1 ! -i wan0 -j NFQIPSEC-FWD" in mangle
    esp_return = "-p esp -m esp --espspi 12288 -m mark --mark 0x10000000/0x10000000 -j RETURN"
    assert chain(text, "NFQIPSEC-FWD") == [
        esp_return,
        "-i lo -j RETURN",
        "-s 10.1.0.0/24 -d 10.2.0.0/24 -j NFQIPSEC-P0",  # no default: the rest is not ours
    ]
    # tunnel mode, AES-GCM-256: 20 + 8 + 8 + 16 + 2 + 3 = 57 bytes of ESP
    assert chain(text, "NFQIPSEC-P0") == [
        "-p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss 1403",
        "-j NFQUEUE --queue-num 100",
        "-j DROP",
    ]
    # NAT exemption: the ESP a worker sends still carries the plaintext flow's conntrack entry
    assert table_of(text, "nat") == [
        ":NFQIPSEC-NAT - [0:0]",
        "-I POSTROUTING 1 -o wan0 -j NFQIPSEC-NAT",
        "-A NFQIPSEC-NAT -p esp -m mark --mark 0x10000000/0x10000000 -j ACCEPT",
    ]
    assert table_of(text, "filter")[:2] == [":NFQIPSEC-LEAK - [0:0]",
                                            "-I FORWARD 1 -o wan0 -j NFQIPSEC-LEAK"]
    assert chain(text, "NFQIPSEC-LEAK") == [
        esp_return,
        "-s 10.1.0.0/24 -d 10.2.0.0/24 -j DROP",
        "-j DROP",
    ]
    assert chain(text, "NFQIPSEC-IN")[-2:] == ["-s 10.2.0.0/24 -d 10.1.0.0/24 -j DROP", "-j DROP"]


def test_gateway_everything() -> None:
    cfg = cfg_of(everything_data())
    text = rules.render(cfg, comments=False)
    # ESP of each outbound SA, with the mark, skips the SPD; nothing else does
    returns = [f"-p esp -m esp --espspi {sa.spi} -m mark --mark 0x40000000/0x40000000 -j RETURN"
               for sa in cfg.sas if sa.direction.value == "out"]
    n = len(returns)
    assert n == 4
    assert chain(text, "NQT-LEAK")[:n] == chain(text, "NQT-OUT")[:n] == returns
    assert chain(text, "NQT-FWD") == [
        *returns,
        "-i lo -j RETURN",
        "-p icmp -m icmp --icmp-type 8/0 -j RETURN",
        "-p icmp -m icmp --icmp-type 3 -j RETURN",
        '-p icmp ! -f -m u32 --u32 "0x0>>0x16&0x3c@0x0>>0x10&0xff=0x4" -j DROP',
        '-p icmp ! -f -m u32 --u32 "0x0>>0x16&0x3c@0x0>>0x10=0xff01" -j RETURN',
        '-m u32 --u32 "0x6&0xff=0x0" -j RETURN',
        "-p udp -m udp --dport 5000:5100 -j DROP",
        "-p sctp -m sctp --sport 9 --dport 1000:2000 -j RETURN",
        "-d 198.51.100.0/24 -p 47 -j RETURN",
        "-d 203.0.113.0/24 -p udp -j RETURN",
        "-s 10.1.0.0/24 -d 10.3.0.0/16 -p tcp -m tcp --dport 443 -j NQT-P10",
        "-s 10.1.0.0/24 -d 10.2.0.0/24 -j NQT-P11",
    ]
    assert chain(text, "NQT-OUT")[n:] == [*chain(text, "NQT-FWD")[n + 1:], "-j DROP"]
    assert chain(text, "NQT-OUT")[n] == "-p icmp -m icmp --icmp-type 8/0 -j RETURN"  # interface given
    # inbound: direction "in"/"both" only, reversed orientation; PROTECT and DISCARD drop
    assert chain(text, "NQT-IN")[6:] == [
        "-p icmp -m icmp --icmp-type 8/0 -j RETURN",
        "-p icmp -m icmp --icmp-type 3 -j RETURN",
        '-p icmp ! -f -m u32 --u32 "0x0>>0x16&0x3c@0x0>>0x10&0xff=0x4" -j DROP',
        '-p icmp ! -f -m u32 --u32 "0x0>>0x16&0x3c@0x0>>0x10=0xff01" -j RETURN',
        '-m u32 --u32 "0x6&0xff=0x0" -j RETURN',
        "-d 192.0.2.1/32 -p tcp -m tcp --dport 22 -j RETURN",
        "-p sctp -m sctp --sport 1000:2000 --dport 9 -j RETURN",
        "-s 198.51.100.0/24 -p 47 -j RETURN",
        "-s 203.0.113.0/24 -p udp -j RETURN",
        "-s 10.2.0.0/24 -d 10.1.0.0/24 -j DROP",
        "-s 10.4.0.0/24 -d 10.1.0.0/24 -j DROP",
        "-j DROP",
    ]
    # leak guard: the whole outbound SPD in order, so a later bypass can't open a protected flow
    assert chain(text, "NQT-LEAK")[n:] == [
        r.replace("-j NQT-P10", "-j DROP").replace("-j NQT-P11", "-j DROP")
        for r in chain(text, "NQT-FWD")[n + 1:]
    ] + ["-j DROP"]
    # one sub-chain per outbound PROTECT policy, named by policy index; none for "in-only"
    assert [c for _t, c in rules.build(cfg).chains] == [
        "NQT-IN", "NQT-OUT", "NQT-FWD", "NQT-P10", "NQT-P11", "NQT-MSS", "NQT-NAT", "NQT-LEAK"]


def test_mss_clamp_both_directions() -> None:
    """SYNs received (decrypted: the worker's mark) are clamped like the SYNs sent: a peer that
    doesn't clamp (the Linux kernel) offers its interface's MSS, too big after ESP."""
    host = rules.render(example("host-a.toml"), comments=False)
    sent = [r for r in chain(host, "NFQIPSEC-P1") if "TCPMSS" in r]
    assert sent == ["-p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss 1423"]
    assert "-I INPUT 1 -i eth1 -m mark --mark 0x10000000/0x10000000 -j NFQIPSEC-MSS" in host
    assert chain(host, "NFQIPSEC-MSS") == [
        "-s 192.168.56.11/32 -d 192.168.56.10/32 -p tcp -m tcp --tcp-flags SYN,RST SYN "
        "-j TCPMSS --set-mss 1423"]
    # gateways: forwarded SYNs too; only policies that let traffic in (not "out" only)
    gw = rules.render(cfg_of(everything_data()), comments=False)
    assert "-I FORWARD 1 -i wan0 -m mark --mark 0x40000000/0x40000000 -j NQT-MSS" in gw
    assert "-I INPUT 1 -i wan0 -m mark --mark 0x40000000/0x40000000 -j NQT-MSS" in gw
    assert chain(gw, "NQT-MSS") == [
        "-s 10.2.0.0/24 -d 10.1.0.0/24 -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS "
        "--set-mss 1267"]
    data = host_data()
    data["daemon"]["mss_clamp"] = False
    assert "MSS" not in rules.render(cfg_of(data), comments=False)


def test_multi_sa_hmark() -> None:
    cfg = cfg_of(everything_data())
    text = rules.render(cfg, comments=False)
    base = 0x4E510000 & ~0x40000000
    assert base == 0x0E510000 and rules.hmark_base(cfg.daemon.mark) == base
    lans = chain(text, "NQT-P11")
    # tunnel AES-CBC-256 + HMAC-SHA-512-256 is the worst of the three SAs: 20+8+16+32+2+15 = 93
    worst = max(overhead_for(cfg.sa(n)) for n in ("o0", "o1", "o2"))
    assert worst == 93
    assert lans == [
        f"-p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss {1400 - 40 - 93}",
        "-j HMARK --hmark-src-prefix 32 --hmark-dst-prefix 32 --hmark-sport-mask 0xffff "
        "--hmark-dport-mask 0xffff --hmark-proto-mask 0xffff --hmark-rnd 0x6e667169 "
        f"--hmark-mod 3 --hmark-offset {base}",
        "-m mark --mark 0xe510000 -j NFQUEUE --queue-num 100",
        "-m mark --mark 0xe510001 -j NFQUEUE --queue-num 101",
        "-m mark --mark 0xe510002 -j NFQUEUE --queue-num 102",
        "-j DROP",
    ]
    assert chain(text, "NQT-P10") == [
        f"-p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss {1400 - 40 - 93}",
        "-j NFQUEUE --queue-num 102",
        "-j DROP",
    ]
    for k in range(3):
        assert (base + k) & cfg.daemon.mark == 0


def test_default_bypass_and_no_interface() -> None:
    data = host_data(default="bypass")
    del data["node"]["interface"]
    cfg = cfg_of(data)
    text = rules.render(cfg, comments=False)
    assert "-I PREROUTING 1 -j NFQIPSEC-IN" in rule_lines(text)
    assert "-I OUTPUT 1 -j NFQIPSEC-OUT" in rule_lines(text)
    assert chain(text, "NFQIPSEC-IN")[1] == "-i lo -j RETURN"
    assert chain(text, "NFQIPSEC-OUT")[1] == "-o lo -j RETURN"
    assert chain(text, "NFQIPSEC-IN")[-1] == "-j RETURN"
    assert chain(text, "NFQIPSEC-OUT")[-1] == "-j RETURN"
    assert chain(text, "NFQIPSEC-P0")[-1] == "-j DROP"  # protected traffic still fails closed

    data = everything_data()
    data["node"]["default"] = "bypass"
    text = rules.render(cfg_of(data), comments=False)
    assert chain(text, "NQT-LEAK")[-1] == "-j RETURN"
    assert "-s 10.1.0.0/24 -d 10.2.0.0/24 -j DROP" in chain(text, "NQT-LEAK")


def test_no_mss_clamp_and_mtu() -> None:
    data = host_data(mtu=9000)
    assert chain(rules.render(cfg_of(data), comments=False), "NFQIPSEC-P0")[0].endswith(
        f"--set-mss {9000 - 40 - 37}")
    data["daemon"]["mss_clamp"] = False
    text = rules.render(cfg_of(data))
    assert "TCPMSS" not in text
    assert chain(text, "NFQIPSEC-P0") == ["-j NFQUEUE --queue-num 7", "-j DROP"]


def test_chain_names_and_prefix() -> None:
    data = host_data()
    data["daemon"]["chain_prefix"] = "my_fw-1"
    rs = rules.build(cfg_of(data))
    assert [c for _t, c in rs.chains] == ["my_fw-1-IN", "my_fw-1-OUT", "my_fw-1-P0", "my_fw-1-MSS"]
    assert rules.is_our_chain("my_fw-1", "my_fw-1-P12")
    assert rules.is_our_chain("my_fw-1", "my_fw-1-LEAK")
    assert rules.is_our_chain("my_fw-1", "my_fw-1-NAT")
    assert rules.is_our_chain("my_fw-1", "my_fw-1-MSS")
    for other in ("my_fw-1-X", "my_fw-1-P", "my_fw-1-Px", "my_fw-1-IN-2", "my_fw-1-B-IN", "my_fw-1",
                  "MY_FW-1-IN", "xmy_fw-1-IN"):
        assert not rules.is_our_chain("my_fw-1", other), other
    assert not rules.is_our_chain("A", "A-B-IN")  # another instance with prefix "A-B"


@pytest.mark.parametrize(
    ("policy", "outbound", "inbound"),
    [
        ({}, "", ""),
        ({"local": "10.9.0.1/32", "remote": "10.9.0.2"}, "-s 10.9.0.1/32 -d 10.9.0.2/32",
         "-s 10.9.0.2/32 -d 10.9.0.1/32"),
        ({"local": "any", "remote": "10.9.0.0/16"}, "-d 10.9.0.0/16", "-s 10.9.0.0/16"),
        ({"local": "10.0.0.0/8"}, "-s 10.0.0.0/8", "-d 10.0.0.0/8"),
        ({"protocol": "tcp"}, "-p tcp", "-p tcp"),
        ({"protocol": "udp", "local_ports": 53}, "-p udp -m udp --sport 53", "-p udp -m udp --dport 53"),
        ({"protocol": "tcp", "local_ports": "1024-65535", "remote_ports": 80},
         "-p tcp -m tcp --sport 1024:65535 --dport 80", "-p tcp -m tcp --sport 80 --dport 1024:65535"),
        ({"protocol": "tcp", "remote_ports": "0-1023"}, "-p tcp -m tcp --dport 0:1023",
         "-p tcp -m tcp --sport 0:1023"),
        ({"protocol": "udp", "remote_ports": "0-65535"}, "-p udp", "-p udp"),
        ({"protocol": "sctp", "remote_ports": 5}, "-p sctp -m sctp --dport 5", "-p sctp -m sctp --sport 5"),
        ({"protocol": "icmp"}, "-p icmp", "-p icmp"),
        ({"protocol": "icmp", "icmp_type": 0}, "-p icmp -m icmp --icmp-type 0",
         "-p icmp -m icmp --icmp-type 0"),
        ({"protocol": "icmp", "icmp_type": 3, "icmp_code": 4}, "-p icmp -m icmp --icmp-type 3/4",
         "-p icmp -m icmp --icmp-type 3/4"),
        ({"protocol": "icmp", "icmp_code": 0},
         '-p icmp ! -f -m u32 --u32 "0x0>>0x16&0x3c@0x0>>0x10&0xff=0x0"',
         '-p icmp ! -f -m u32 --u32 "0x0>>0x16&0x3c@0x0>>0x10&0xff=0x0"'),
        ({"protocol": "icmp", "icmp_type": 255},
         '-p icmp ! -f -m u32 --u32 "0x0>>0x16&0x3c@0x0>>0x18=0xff"',
         '-p icmp ! -f -m u32 --u32 "0x0>>0x16&0x3c@0x0>>0x18=0xff"'),
        ({"protocol": 0}, '-m u32 --u32 "0x6&0xff=0x0"', '-m u32 --u32 "0x6&0xff=0x0"'),
        ({"protocol": "gre"}, "-p 47", "-p 47"),
        ({"protocol": 200}, "-p 200", "-p 200"),
    ],
)
def test_each_selector_type(policy: dict[str, Any], outbound: str, inbound: str) -> None:
    data = host_data()
    data["policy"].append({"name": "b", "action": "bypass", **policy})  # after the protect policy
    text = rules.render(cfg_of(data), comments=False)
    assert chain(text, "NFQIPSEC-OUT")[2] == " ".join(filter(None, [outbound, "-j RETURN"]))
    assert chain(text, "NFQIPSEC-IN")[5] == " ".join(filter(None, [inbound, "-j RETURN"]))


def test_direction_filters_the_views() -> None:
    data = host_data()
    data["policy"][:0] = [
        {"name": "in-only", "action": "discard", "direction": "in", "protocol": "udp"},
        {"name": "out-only", "action": "bypass", "direction": "out", "protocol": "tcp"},
    ]
    text = rules.render(cfg_of(data), comments=False)
    assert "-p udp -j DROP" in chain(text, "NFQIPSEC-IN")
    assert not any("-p tcp" in r for r in chain(text, "NFQIPSEC-IN"))
    assert "-p tcp -j RETURN" in chain(text, "NFQIPSEC-OUT")
    assert not any("-p udp" in r for r in chain(text, "NFQIPSEC-OUT"))
    assert chain(text, "NFQIPSEC-OUT")[2] == "-s 10.0.0.1/32 -d 10.0.0.2/32 -j NFQIPSEC-P2"


def test_comments_are_only_comments() -> None:
    data = host_data()
    data["policy"][0]["name"] = "evil\n-A INPUT -j ACCEPT\r\n#"
    text = rules.render(cfg_of(data))
    assert rule_lines(text) == rule_lines(rules.render(cfg_of(data), comments=False))
    assert all(len(line) <= 100 for line in text.splitlines() if line.startswith("#"))
    assert "-A INPUT" not in rule_lines(text)


@pytest.mark.parametrize("name", ["host-a", "host-b", "gateway-a", "gateway-b"])
def test_annotated_examples_are_current(name: str) -> None:
    """iptables/NAME.rules is `nfq-ipsec rules show --config nfq_ipsec/examples/NAME.toml`."""
    want = rules.render(example(f"{name}.toml"))
    have = (RULE_EXAMPLES / f"{name}.rules").read_text()
    assert have == want, f"regenerate iptables/{name}.rules (see iptables/README.md)"


# -- planning install and remove --------------------------------------------------------------

SAVE_WITH_LEFTOVERS = """\
# Generated by iptables-save v1.8.9
*raw
:PREROUTING ACCEPT [10:600]
:OUTPUT ACCEPT [0:0]
:NFQIPSEC-IN - [0:0]
-A PREROUTING -i eth0 -j CT --notrack
-A PREROUTING -i eth1 -j NFQIPSEC-IN
-A PREROUTING -i eth1 -j NFQIPSEC-IN
-A NFQIPSEC-IN -j DROP
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:NFQIPSEC-OUT - [0:0]
:NFQIPSEC-P1 - [0:0]
:NFQIPSEC-P9 - [0:0]
:NFQIPSEC-FWD - [0:0]
:OTHER-IN - [0:0]
-A PREROUTING ! -i eth1 -j NFQIPSEC-FWD
-A OUTPUT -m comment --comment "keep me" -j MARK --set-xmark 0x1/0xffffffff
-A OUTPUT -o eth1 -j NFQIPSEC-OUT
-A NFQIPSEC-OUT -j NFQIPSEC-P9
-A NFQIPSEC-P9 -j DROP
COMMIT
"""


def test_plan_install_takes_over_leftovers() -> None:
    rs = rules.build(example("host-a.toml"))
    script = rules.plan_install(rs, rules.parse_save(SAVE_WITH_LEFTOVERS))
    lines = script.splitlines()
    raw = lines[lines.index("*raw"):lines.index("COMMIT") + 1]
    assert raw[:5] == [
        "*raw",
        ":NFQIPSEC-IN - [0:0]",  # exists: this flushes it
        "-D PREROUTING -i eth1 -j NFQIPSEC-IN",  # both duplicates go ...
        "-D PREROUTING -i eth1 -j NFQIPSEC-IN",
        "-I PREROUTING 1 -i eth1 -j NFQIPSEC-IN",  # ... and one comes back, first
    ]
    assert raw[5:] == [f"-A NFQIPSEC-IN {r}" for r in chain(rules.render(example("host-a.toml")),
                                                            "NFQIPSEC-IN", icmp_errors=True)] + ["COMMIT"]
    mangle = lines[lines.index("*mangle"):]
    # stale chains (P9 from an older config, FWD from when this was a gateway) are flushed,
    # their jumps deleted, then the chains deleted, all before the new rules go in
    for stale in ("NFQIPSEC-P9", "NFQIPSEC-FWD"):
        assert f":{stale} - [0:0]" in mangle
        assert mangle.index(f"-X {stale}") > mangle.index("-D PREROUTING ! -i eth1 -j NFQIPSEC-FWD")
    assert mangle.index("-X NFQIPSEC-P9") < mangle.index("-I OUTPUT 1 -o eth1 -j NFQIPSEC-OUT")
    assert "-D OUTPUT -o eth1 -j NFQIPSEC-OUT" in mangle
    assert not any("OTHER-IN" in line or "keep me" in line or "-i eth0 -j CT --notrack" in line
                   for line in lines)
    assert "*filter" not in lines  # nothing of ours there and nothing needed


def test_plan_remove() -> None:
    script = rules.plan_remove("NFQIPSEC", rules.parse_save(SAVE_WITH_LEFTOVERS))
    assert script.splitlines() == [
        "*raw",
        ":NFQIPSEC-IN - [0:0]",
        "-D PREROUTING -i eth1 -j NFQIPSEC-IN",
        "-D PREROUTING -i eth1 -j NFQIPSEC-IN",
        "-X NFQIPSEC-IN",
        "COMMIT",
        "*mangle",
        ":NFQIPSEC-OUT - [0:0]",
        ":NFQIPSEC-P1 - [0:0]",
        ":NFQIPSEC-P9 - [0:0]",
        ":NFQIPSEC-FWD - [0:0]",
        "-D PREROUTING ! -i eth1 -j NFQIPSEC-FWD",
        "-D OUTPUT -o eth1 -j NFQIPSEC-OUT",
        "-X NFQIPSEC-OUT",
        "-X NFQIPSEC-P1",
        "-X NFQIPSEC-P9",
        "-X NFQIPSEC-FWD",
        "COMMIT",
    ]
    assert rules.plan_remove("NOPE", rules.parse_save(SAVE_WITH_LEFTOVERS)) == ""
    assert rules.plan_remove("NFQIPSEC", {}) == ""


def test_plan_refuses_foreign_references() -> None:
    save = SAVE_WITH_LEFTOVERS.replace("-A NFQIPSEC-P9 -j DROP", "-A OTHER-IN -j NFQIPSEC-P1")
    with pytest.raises(rules.PlanError, match="OTHER-IN"):
        rules.plan_remove("NFQIPSEC", rules.parse_save(save))
    with pytest.raises(rules.PlanError, match="OTHER-IN"):
        rules.plan_install(rules.build(example("host-a.toml")), rules.parse_save(save))


def test_parse_save_quotes_and_targets() -> None:
    tables = rules.parse_save(SAVE_WITH_LEFTOVERS)
    out = [r for r in tables["mangle"].rules if r.chain == "OUTPUT"]
    assert out[0].tokens()[3] == "keep me"
    assert out[0].target() == "MARK" and out[1].target() == "NFQIPSEC-OUT"
    assert tables["raw"].builtin("PREROUTING") and not tables["raw"].builtin("NFQIPSEC-IN")
    assert rules.quote("a b") == '"a b"' and rules.quote("0x1/0x2") == "0x1/0x2"


def as_save(cfg: Config, closed: bool = False) -> str:
    """What iptables-save would print after installing ``cfg`` (``closed``: its closed rules)
    on an empty ruleset."""
    rs = rules.close(rules.build(cfg)) if closed else rules.build(cfg)
    out = []
    for t in rs.tables:
        out.append(f"*{t.name}")
        out += [f":{b} ACCEPT [0:0]" for b in ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")]
        out += [f":{c} - [0:0]" for c in t.chains]
        out += [j.line("-A") for j in t.jumps] + [r.line() for r in t.rules] + ["COMMIT"]
    return "\n".join(out) + "\n"


def test_compare_status() -> None:
    cfg = cfg_of(everything_data())
    rs = rules.build(cfg)
    saved = as_save(cfg).replace("-p 47", "-p gre")  # iptables-save prints protocol names
    st = iptables.compare(rs, rules.parse_save(saved))
    assert st.matches and st.complete and st.present and st.problems == ()
    assert st.describe() == "installed (matches this configuration)"

    none = iptables.compare(rs, {})
    assert not none.present and not none.matches and none.describe() == "not installed"

    dup = saved.replace("-A FORWARD -o wan0 -j NQT-LEAK", "-A FORWARD -o wan0 -j NQT-LEAK\n" * 2)
    st = iptables.compare(rs, rules.parse_save(dup))
    assert not st.complete and "2 copies" in st.describe()

    changed = saved.replace("--set-mss 1267", "--set-mss 1300")
    st = iptables.compare(rs, rules.parse_save(changed))
    assert st.complete and not st.matches and "NQT-P10 holds 3 rules that differ" in st.describe()

    second = saved.replace("-A FORWARD -o wan0", "-A FORWARD -j ACCEPT\n-A FORWARD -o wan0")
    st = iptables.compare(rs, rules.parse_save(second))
    assert not st.matches and "our jump is rule 2, not 1" in st.describe()

    stale = saved.replace(":NQT-LEAK - [0:0]", ":NQT-LEAK - [0:0]\n:NQT-P99 - [0:0]")
    st = iptables.compare(rs, rules.parse_save(stale))
    assert not st.matches and "stale chain NQT-P99" in st.describe()

    missing = saved.replace(":NQT-P10 - [0:0]\n", "")
    st = iptables.compare(rs, rules.parse_save(missing))
    assert not st.complete and "partly installed" in st.describe()


# -- the shell, without root ------------------------------------------------------------------

def test_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(iptables, "find_command", lambda name: None)
    with pytest.raises(iptables.RulesError) as info:
        iptables.install(example("host-a.toml"))
    assert "iptables-save not found" in str(info.value)
    assert info.value.argv == ("iptables-save",)


def fake_iptables(tmp_path: Path, save_output: str, restore_rc: int) -> Path:
    """Stand-ins for iptables-save (prints ``save_output``) and iptables-restore (fails)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (tmp_path / "save.txt").write_text(save_output)
    for fam in ("", "6"):
        for name in ("iptables-save", "iptables-nft-save", "iptables-legacy-save"):
            (bindir / f"ip{fam}{name[2:]}").write_text(f"#!/bin/sh\ncat {tmp_path / 'save.txt'}\n")
        for name in ("iptables-restore", "iptables-nft-restore", "iptables-legacy-restore"):
            (bindir / f"ip{fam}{name[2:]}").write_text(
                f"#!/bin/sh\ncat > {tmp_path / f'restored{fam}.txt'}\n"
                f"echo 'iptables-restore: line 3 failed' >&2\nexit {restore_rc}\n"
            )
    for f in bindir.iterdir():
        f.chmod(0o755)
    return bindir


def test_failing_restore_reports_argv_stderr_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir = fake_iptables(tmp_path, "", 2)
    monkeypatch.setattr(iptables, "find_command", lambda name: str(bindir / name))
    with pytest.raises(iptables.RulesError) as info:
        iptables.install(example("host-a.toml"))
    err = info.value
    assert err.argv == (str(bindir / "iptables-restore"), "--noflush", "--wait=30")
    assert err.returncode == 2 and "line 3 failed" in err.stderr
    text = str(err)
    assert "command: " in text and "--noflush" in text and "exit status: 2" in text
    restored = (tmp_path / "restored.txt").read_text()
    assert f"line 3 of the input: {restored.splitlines()[2]}" in text


def test_backends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = fake_iptables(tmp_path, "", 0)
    monkeypatch.setattr(iptables, "find_command", lambda name: str(bindir / name))
    data = host_data()
    for choice, prefix in (("auto", "iptables-"), ("nft", "iptables-nft-"), ("legacy", "iptables-legacy-")):
        data["daemon"]["iptables"] = choice
        cfg = cfg_of(data)
        assert iptables.backend_for(cfg).restore == prefix + "restore"
        iptables.install(cfg)
        assert (tmp_path / "restored.txt").read_text() == rules.plan_install(rules.build(cfg), {})
        v6 = rules.build6(cfg)
        assert v6 is not None  # default discard: IPv6 is dropped on the unprotected side
        assert (tmp_path / "restored6.txt").read_text() == rules.plan_install(v6, {})
        assert not iptables.is_installed(cfg)
        iptables.install(cfg, closed=True)
        closed = (tmp_path / "restored.txt").read_text()
        assert closed == rules.plan_install(rules.close(rules.build(cfg)), {})
        assert "NFQUEUE" not in closed and "-j DROP" in closed


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    p.chmod(0o600)
    return p


def test_cli_invalid_config_exit_2_and_all_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = write(tmp_path, "bad.toml", '[node]\nrole = "gateway"\nmtu = 5\n[daemon]\nmark = 3\n')
    for action in ("show", "install", "remove"):
        assert cli_main(["rules", action, "--config", str(bad)]) == 2
        err = capsys.readouterr().err
        assert "node.interface" in err and "node.mtu" in err and "daemon.mark" in err


def test_cli_show(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  capsys: pytest.CaptureFixture[str]) -> None:
    cfg_path = write(tmp_path, "h.toml", toml_text(host_data()))
    bindir = fake_iptables(tmp_path, "", 0)
    monkeypatch.setattr(iptables, "find_command", lambda name: str(bindir / name))
    assert cli_main(["rules", "show", "--config", str(cfg_path)]) == 0
    out, err = capsys.readouterr()
    assert out == rules.render(load_config(cfg_path, online_cpus=CPUS))
    assert "rules not installed" in err

    monkeypatch.setattr(iptables, "find_command", lambda name: None)
    assert cli_main(["rules", "show", "--config", str(cfg_path)]) == 0
    out, err = capsys.readouterr()
    assert out and "rules unknown (iptables-save not found" in err

    assert cli_main(["rules", "install", "--config", str(cfg_path)]) == 1
    assert "iptables-save not found" in capsys.readouterr().err


def test_cli_rules_namespace_args() -> None:
    args = argparse.Namespace(action="show", config="/nonexistent/x.toml")
    assert rules_command.run(args) == 2


def test_shell_script_is_shellcheck_clean() -> None:
    import subprocess
    script = ROOT / "scripts" / "nfq-ipsec-rules"
    assert script.stat().st_mode & 0o111, "scripts/nfq-ipsec-rules must be executable"
    shellcheck = gate.tool("shellcheck", "shellcheck")
    proc = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    usage = subprocess.run([str(script)], capture_output=True, text=True, check=False)
    assert usage.returncode == 2 and "usage" in usage.stderr.lower()


def test_gateway_without_interface_is_refused() -> None:
    cfg = example("gateway-a.toml")
    broken = dataclasses.replace(cfg, node=dataclasses.replace(cfg.node, interface=None))
    with pytest.raises(ValueError, match="interface"):
        rules.build(broken)


# -- closed rules (the daemon is stopped) and IPv6 --------------------------------------------

@pytest.mark.parametrize("name", ["host-a.toml", "gateway-a.toml"])
def test_closed_rules_drop_where_the_live_ones_queue(name: str) -> None:
    live = rules.build(example(name))
    closed = rules.close(live)
    assert closed.chains == live.chains and closed.jumps == live.jumps
    changed = 0
    for t_live, t_closed in zip(live.tables, closed.tables, strict=True):
        for a, b in zip(t_live.rules, t_closed.rules, strict=True):
            if "NFQUEUE" in a.args:
                changed += 1
                assert b.args[-2:] == ("-j", "DROP") and b.reason == rules.STOPPED_REASON
                assert a.args[:a.args.index("-j")] == b.args[:b.args.index("-j")]  # same match
            else:
                assert a == b
    assert changed >= 1
    assert "NFQUEUE" not in rules.render_ruleset(closed)


def test_status_tells_closed_from_live() -> None:
    cfg = example("host-a.toml")
    live = rules.build(cfg)
    closed_text = as_save(cfg, closed=True)
    st = iptables.compare(live, rules.parse_save(closed_text))
    assert st.complete and not st.matches  # same chains and jumps, other rules
    assert iptables.compare(rules.close(live), rules.parse_save(closed_text)).matches
    assert not iptables.compare(rules.close(live), rules.parse_save(as_save(cfg))).matches


ND_RULES = [f"-p ipv6-icmp -m icmp6 --icmpv6-type {t} -m hl --hl-eq 255 -j RETURN"
            for t in (133, 134, 135, 136, 137)] + [
    f"-p ipv6-icmp -m icmp6 --icmpv6-type {t} -m hl --hl-eq 1 -j RETURN"
    for t in (130, 131, 132, 143)]
MARK_RETURN = "-m mark --mark 0x10000000/0x10000000 -j RETURN"


def test_ipv6_rules_follow_the_default() -> None:
    """Without IPv6 policies: nothing with default bypass; with discard, every IPv6 packet
    drops but neighbour discovery and MLD (unless turned off)."""
    assert rules.build6(cfg_of(host_data(default="bypass"))) is None
    v6 = rules.build6(cfg_of(host_data()))
    assert v6 is not None and v6.family == 6
    text = rules.render_ruleset(v6, comments=False)
    unknown_spi = "-p esp -m addrtype --dst-type LOCAL -j DROP"
    assert chain(text, "NFQIPSEC-IN") == [MARK_RETURN, *ND_RULES, unknown_spi, "-j DROP"]
    assert chain(text, "NFQIPSEC-OUT") == [*ND_RULES, "-j DROP"]
    assert "-I PREROUTING 1 -i eth1 -j NFQIPSEC-IN" in text
    assert "-I OUTPUT 1 -o eth1 -j NFQIPSEC-OUT" in text
    assert "10.0.0" not in text and "--espspi 4096" not in text  # the IPv4 policy and its SAs
    off = rules.build6(cfg_of(host_data(ipv6_neighbour_discovery=False)))
    assert off is not None
    off_text = rules.render_ruleset(off, comments=False)
    assert chain(off_text, "NFQIPSEC-OUT") == ["-j DROP"]
    assert [r.reason for t in off.tables for r in t.rules if r.args[-1] == "DROP"] == [
        "unknown_spi", "no_policy", "no_policy"]


def test_ipv6_rules_without_interface_and_on_gateways() -> None:
    data = host_data(ipv6_neighbour_discovery=False)
    del data["node"]["interface"]
    v6 = rules.build6(cfg_of(data))
    assert v6 is not None
    text = rules.render_ruleset(v6, comments=False)
    assert chain(text, "NFQIPSEC-IN") == [MARK_RETURN, "-i lo -j RETURN",
                                          "-p esp -m addrtype --dst-type LOCAL -j DROP", "-j DROP"]
    assert "-I PREROUTING 1 -j NFQIPSEC-IN" in text
    gw = rules.build6(example("gateway-a.toml"))
    assert gw is not None
    gw_text = rules.render_ruleset(gw, comments=False)
    assert "-I FORWARD 1 -o wan0 -j NFQIPSEC-LEAK" in gw_text
    assert chain(gw_text, "NFQIPSEC-LEAK") == ["-j DROP"]


def test_ipv6_policies_get_the_ipv4_layout_in_ip6tables() -> None:
    cfg = cfg_of(host6_data())
    v4 = rules.render(cfg, comments=False)
    assert "2001:db8" not in v4 and "--espspi 8192" not in v4  # nothing IPv6 in iptables
    v6 = rules.build6(cfg)
    assert v6 is not None and v6.family == 6
    text = rules.render_ruleset(v6, comments=False)
    assert chain(text, "NFQIPSEC-IN") == [
        MARK_RETURN, *ND_RULES,
        "-p esp -m esp --espspi 8192 -j NFQUEUE --queue-num 7",
        "-p esp -m addrtype --dst-type LOCAL -j DROP",
        "-s 2001:db8::2/128 -d 2001:db8::1/128 -j DROP",
        "-j DROP"]
    mss = 1500 - 60 - overhead_for(cfg.sa("out0"))
    assert chain(text, "NFQIPSEC-P0") == [
        f"-p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss {mss}",
        "-j NFQUEUE --queue-num 7", "-j DROP"]
    assert chain(text, "NFQIPSEC-OUT") == [
        "-p esp -m esp --espspi 4096 -m mark --mark 0x10000000/0x10000000 -j RETURN",
        *ND_RULES, "-s 2001:db8::1/128 -d 2001:db8::2/128 -j NFQIPSEC-P0", "-j DROP"]
    assert "--icmp-type" not in text and "-f " not in text  # IPv4-only matches


def test_ipv6_icmp_errors_match_the_quoted_ipv6_flow() -> None:
    data = host6_data(default="bypass")
    data["policy"][0].update(protocol="udp", remote_ports="5000")
    v6 = rules.build6(cfg_of(data))
    assert v6 is not None
    out = [r.args for r in v6.tables[1].rules if "u32" in r.args and r.chain == "NFQIPSEC-OUT"]
    # leaving: an error about an inbound datagram 2001:db8::2:5000 -> 2001:db8::1
    # (ten tests at most per u32 match: two IPv6 addresses take two matches)
    assert out == [("-p", "ipv6-icmp", "-m", "u32", "--u32",
                    "0x4>>0x8&0xff=0x3a&&0x28>>0x18=0x1:0x4&&0x38&0xffffffff=0x20010db8&&"
                    "0x3c&0xffffffff=0x0&&0x40&0xffffffff=0x0&&0x44&0xffffffff=0x2&&"
                    "0x48&0xffffffff=0x20010db8&&0x4c&0xffffffff=0x0&&0x50&0xffffffff=0x0&&"
                    "0x54&0xffffffff=0x1", "-m", "u32", "--u32",
                    "0x34>>0x8&0xff=0x11&&0x58>>0x10=0x1388", "-j", "NFQIPSEC-P0")]
    esp = rules.quoted_esp6_args(0x1000)
    assert esp[-1].endswith("0x34>>0x8&0xff=0x32&&0x58=0x1000")


def test_ipv6_tunnel_sa_steers_by_its_outer_family() -> None:
    """A 4-in-6 tunnel: the policy (IPv4) is in iptables, its ESP (IPv6) in ip6tables."""
    data = host_data()
    for sa in data["sa"]:
        tl, tr = ("2001:db8::a", "2001:db8::b") if sa["direction"] == "out" else (
            "2001:db8::b", "2001:db8::a")
        sa.update(mode="tunnel", tunnel_local=tl, tunnel_remote=tr)
    cfg = cfg_of(data)
    v4 = rules.render(cfg, comments=False)
    assert "-s 10.0.0.1/32 -d 10.0.0.2/32 -j NFQIPSEC-P0" in v4 and "--espspi 8192" not in v4
    v6 = rules.build6(cfg)
    assert v6 is not None
    text = rules.render_ruleset(v6, comments=False)
    assert "-p esp -m esp --espspi 8192 -j NFQUEUE --queue-num 7" in chain(text, "NFQIPSEC-IN")
    assert "NFQIPSEC-P0" not in text


def test_ipv6_neighbour_discovery_must_be_a_boolean() -> None:
    data = host_data(ipv6_neighbour_discovery="yes")
    with pytest.raises(ConfigError) as info:
        cfg_of(data)
    assert "node.ipv6_neighbour_discovery: must be bool" in str(info.value)


# -- ICMP errors: by the packet they quote ----------------------------------------------------

def test_icmp_errors_follow_the_quoted_flow() -> None:
    """A UDP-only protect policy with default bypass: the kernel's port-unreachable about a
    protected datagram matches no policy by its own header, and would leave in clear. The
    rules match it by the quoted header and send it to the flow's protect chain (outbound) or
    drop it in clear (inbound); a bypass policy's errors pass as its flow does."""
    data = host_data(default="bypass")
    data["policy"][0].update(protocol="udp", remote_ports="5000")
    data["policy"].insert(0, {"name": "dns", "action": "bypass", "protocol": "udp",
                              "remote_ports": "53"})
    text = rules.render(cfg_of(data), comments=False)
    types = "0x0>>0x16&0x3c@0x0>>0x18=0x3,0x4,0x5,0xb,0xc"
    udp = "0x0>>0x16&0x3c@0x10>>0x10&0xff=0x11"
    dport = "0x0>>0x16&0x3c@0x8>>0x16&0x3c@0x8&0xffff="
    sport = "0x0>>0x16&0x3c@0x8>>0x16&0x3c@0x8>>0x10="
    a, b = "0xa000001", "0xa000002"  # 10.0.0.1 (local), 10.0.0.2
    out = chain(text, "NFQIPSEC-OUT", icmp_errors=True)
    errors_out = [r for r in out if ICMP_ERROR_MARK in r]
    # leaving: the quoted packet came in (remote -> local), its source port is the remote port
    assert errors_out == [
        f'-p icmp ! -f -m u32 --u32 "{types}&&{udp}&&{sport}0x35" -j RETURN',
        f'-p icmp ! -f -m u32 --u32 "{types}&&0x0>>0x16&0x3c@0x14&0xffffffff={b}'
        f'&&0x0>>0x16&0x3c@0x18&0xffffffff={a}&&{udp}&&{sport}0x1388" -j NFQIPSEC-P1',
    ]
    # before the SPD proper, after the worker's own ESP
    assert out.index(errors_out[0]) == 1 and out[0].startswith("-p esp -m esp --espspi 4096")
    errors_in = [r for r in chain(text, "NFQIPSEC-IN", icmp_errors=True) if ICMP_ERROR_MARK in r]
    assert errors_in == [
        # about our own ESP (path MTU): accepted
        f'-p icmp ! -f -m u32 --u32 "{types}&&0x0>>0x16&0x3c@0x10>>0x10&0xff=0x32'
        '&&0x0>>0x16&0x3c@0x8>>0x16&0x3c@0x8=0x1000" -j RETURN',
        f'-p icmp ! -f -m u32 --u32 "{types}&&{udp}&&{dport}0x35" -j RETURN',
        # arriving in clear: the quoted packet went out (local -> remote); not accepted in clear
        f'-p icmp ! -f -m u32 --u32 "{types}&&0x0>>0x16&0x3c@0x14&0xffffffff={a}'
        f'&&0x0>>0x16&0x3c@0x18&0xffffffff={b}&&{udp}&&{dport}0x1388" -j DROP',
    ]
    reasons = {r.args[-1]: r.reason for t in rules.build(cfg_of(data)).tables for r in t.rules
               if ICMP_ERROR_MARK in " ".join(r.args) and r.args[-1] == "DROP"}
    assert reasons == {"DROP": "cleartext_protected"}


def test_icmp_errors_on_a_gateway_and_in_the_leak_guard() -> None:
    text = rules.render(example("gateway-a.toml"), comments=False)
    fwd = [r for r in chain(text, "NFQIPSEC-FWD", icmp_errors=True) if ICMP_ERROR_MARK in r]
    leak = [r for r in chain(text, "NFQIPSEC-LEAK", icmp_errors=True) if ICMP_ERROR_MARK in r]
    assert len(fwd) == len(leak) == 1
    assert fwd[0].endswith("-j NFQIPSEC-P0") and leak[0].endswith("-j DROP")
    # quoted: 10.2.0.0/24 (remote LAN) -> 10.1.0.0/24 (ours)
    assert "@0x14&0xffffff00=0xa020000" in fwd[0] and "@0x18&0xffffff00=0xa010000" in fwd[0]


def test_reassembly_is_turned_on_first_and_matches_nothing() -> None:
    """The first rule of P-IN uses the socket match, so the kernel registers IPv4
    defragmentation in the namespace (tested on packets, and that no flow gets tracked, in
    test_leak_matrix_root.py); it matches only SPI 0, which no ESP packet carries (RFC 4303
    2.1)."""
    for name in ("host-a.toml", "gateway-a.toml"):
        text = rules.render(example(name), comments=False)
        assert chain(text, "NFQIPSEC-IN", icmp_errors=True)[0] == DEFRAG_RULE
    assert all(DEFRAG_RULE not in r for r in chain(rules.render(example("host-a.toml")), "NFQIPSEC-OUT",
                                                     icmp_errors=True))


# -- ESP in UDP (RFC 3948) ----------------------------------------------------------------------

def udp_rule(port: int, u32: str, target: str) -> str:
    return (f"-p udp -m udp --dport {port} -m addrtype --dst-type LOCAL -m u32 --u32 "
            f'"0x0>>0x16&0x3c@{u32}" -j {target}')


KEEPALIVE_U32 = "0x4>>0x10=0x9&&0x0>>0x16&0x3c@0x5&0xff=0xff"
ANY_SPI_U32 = "0x8=0x1:0xffffffff&&0x0>>0x16&0x3c@0x4>>0x10=0x10:0xffff"


def test_esp_in_udp_is_steered_by_spi_and_the_rest_sorted_in_the_kernel() -> None:
    cfg = cfg_of(udp_data())
    text = rules.render(cfg, comments=False)
    p_in = chain(text, "NFQIPSEC-IN")
    mark = "-m mark --mark 0x10000000/0x10000000 -j RETURN"
    assert p_in[:p_in.index("-p esp -f -m addrtype --dst-type LOCAL -j DROP")] == [
        mark,
        # plain ESP with the SPI of an SA of ESP in UDP: refused in the kernel
        "-p esp -m esp --espspi 8192 -j DROP",
        "-p esp -m esp --espspi 8193 -j DROP",
        "-p esp -m esp --espspi 8194 -j DROP",
        "-p esp -m esp --espspi 12288 -j NFQUEUE --queue-num 100",
        udp_rule(4500, "0x8=0x2000", "NFQUEUE --queue-num 100"),
        udp_rule(4500, "0x8=0x2001", "NFQUEUE --queue-num 101"),
        udp_rule(4500, "0x8=0x3000", "DROP"),  # the plain SA's SPI in UDP
        udp_rule(4500, KEEPALIVE_U32, "DROP"),
        udp_rule(4500, ANY_SPI_U32, "DROP"),
        "-p udp -m udp --dport 4500 -m addrtype --dst-type LOCAL -j NFQUEUE --queue-num 100",
        udp_rule(4501, "0x8=0x2002", "NFQUEUE --queue-num 101"),
        udp_rule(4501, "0x8=0x3000", "DROP"),
        udp_rule(4501, KEEPALIVE_U32, "DROP"),
        udp_rule(4501, ANY_SPI_U32, "DROP"),
        "-p udp -m udp --dport 4501 -m addrtype --dst-type LOCAL -j NFQUEUE --queue-num 101",
    ]
    reasons = {r.spec(): r.reason for r in rules.build(cfg).tables[0].rules if r.reason}
    assert reasons["-p esp -m esp --espspi 8192 -j DROP"] == "encap_mismatch"
    assert reasons[udp_rule(4500, "0x8=0x3000", "DROP")] == "encap_mismatch"
    assert reasons[udp_rule(4500, KEEPALIVE_U32, "DROP")] == "nat_keepalive"
    assert reasons[udp_rule(4501, ANY_SPI_U32, "DROP")] == "unknown_spi"


def test_esp_in_udp_from_a_worker_leaves_and_is_not_natted() -> None:
    text = rules.render(cfg_of(udp_data()), comments=False)
    mark = "-m mark --mark 0x10000000/0x10000000"
    returns = [
        f'-p udp -m udp --sport 4500 -m u32 --u32 "0x0>>0x16&0x3c@0x8=0x1000" {mark} -j RETURN',
        f'-p udp -m udp --sport 4501 -m u32 --u32 "0x0>>0x16&0x3c@0x8=0x1001" {mark} -j RETURN',
        # keepalives only from the port of the SA that sends them (o1 has keepalive = 0)
        f'-p udp -m udp --sport 4500 -m u32 --u32 "0x0>>0x16&0x3c@{KEEPALIVE_U32}" {mark} -j RETURN',
    ]
    for name in ("NFQIPSEC-OUT", "NFQIPSEC-FWD", "NFQIPSEC-LEAK"):
        assert chain(text, name)[:3] == returns, name
    assert not any("-p esp" in r for r in chain(text, "NFQIPSEC-OUT"))
    assert chain(text, "NFQIPSEC-NAT") == [
        f"-p esp {mark} -j ACCEPT",
        f"-p udp -m udp --sport 4500 {mark} -j ACCEPT",
        f"-p udp -m udp --sport 4501 {mark} -j ACCEPT",
    ]


def test_esp_in_udp_mss_counts_the_udp_header() -> None:
    data = host_data()
    plain = cfg_of(data)
    data["sa"][0]["encapsulation"] = "udp"
    udp = cfg_of(data)
    pol = plain.policies[0]
    assert rules.mss_for(plain, pol) - rules.mss_for(udp, udp.policies[0]) == 8


def test_closed_esp_in_udp_rules_drop() -> None:
    closed = rules.render_ruleset(rules.close(rules.build(cfg_of(udp_data()))), comments=False)
    assert "NFQUEUE" not in closed
    assert ("-A NFQIPSEC-IN -p udp -m udp --dport 4500 -m addrtype --dst-type LOCAL -j DROP"
            in closed)


def test_a_mixed_tunnel_clamps_the_syns_its_worker_sends_through_a_raw_socket() -> None:
    """4-in-6: the decrypted IPv4 packets leave the worker through a raw socket, so they start
    in mangle OUTPUT and never pass INPUT or FORWARD. The IPv4 rules send marked packets there
    to P-MSS too (no -i: OUTPUT has no input interface); a same-family tunnel needs no such
    jump, nor do the IPv6 rules, whose policies are none."""
    data = host_data()
    for sa in data["sa"]:
        tl, tr = ("2001:db8::a", "2001:db8::b") if sa["direction"] == "out" else (
            "2001:db8::b", "2001:db8::a")
        sa.update(mode="tunnel", tunnel_local=tl, tunnel_remote=tr)
    cfg = cfg_of(data)
    assert rules.crosses_in(cfg, False) and not rules.crosses_in(cfg, True)
    v4 = rules.render(cfg, comments=False)
    assert "-I OUTPUT 1 -m mark --mark 0x10000000/0x10000000 -j NFQIPSEC-MSS" in v4
    assert "-I INPUT 1 -i eth1 -m mark --mark 0x10000000/0x10000000 -j NFQIPSEC-MSS" in v4
    v6 = rules.build6(cfg)
    assert v6 is not None and "NFQIPSEC-MSS" not in rules.render_ruleset(v6, comments=False)
    # the ESP the worker sends through its IPv6 raw socket returns by mark and SPI in
    # ip6tables' P-OUT, and only there: the mark alone lets nothing out of either
    esp_back = "-p esp -m esp --espspi 4096 -m mark --mark 0x10000000/0x10000000 -j RETURN"
    assert esp_back in chain(rules.render_ruleset(v6, comments=False), "NFQIPSEC-OUT")
    assert "--espspi 4096" not in v4
    assert not any("-m mark" in rule for rule in chain(v4, "NFQIPSEC-OUT", icmp_errors=True))
    same = cfg_of(host_data())
    assert not rules.crosses_in(same, False)
    assert "-I OUTPUT 1 -m mark" not in rules.render(same, comments=False)


def test_ike_between_a_connections_endpoints_passes_before_any_policy(tmp_path: Path) -> None:
    """IKE to and from the agent passes (inbound: UDP 500, and 4500 with the non-ESP marker;
    outbound: the same from the agent's marked sockets), ahead of the policies; the
    connection's protect policy drops until a Child SA is up (no_sa, cleartext_protected)."""
    from configs import connection_data

    from nfq_ipsec.config import parse_config

    cfg = parse_config(connection_data(tmp_path), base_dir=tmp_path, online_cpus=CPUS)
    rs = rules.build(cfg)
    chain_in, chain_out = rules.chain_in("NFQIPSEC"), rules.chain_out("NFQIPSEC")
    by_chain = {c: [r for t in rs.tables for r in t.rules if r.chain == c]
                for c in (chain_in, chain_out, rules.chain_protect("NFQIPSEC", 1))}
    marker = "0x0>>0x16&0x3c@0x8=0x0"
    mark = ("-m", "mark", "--mark", "0x10000000/0x10000000")
    ends_in = ("-s", "192.0.2.2/32", "-d", "192.0.2.1/32", "-p", "udp", "-m", "udp")
    ends_out = ("-s", "192.0.2.1/32", "-d", "192.0.2.2/32", "-p", "udp", "-m", "udp")
    want_in = [(*ends_in, "--dport", "500", "-j", "RETURN"),
               (*ends_in, "--dport", "4500", "-m", "u32", "--u32", marker, "-j", "RETURN")]
    want_out = [(*ends_out, "--sport", "500", *mark, "-j", "RETURN"),
                (*ends_out, "--sport", "4500", "-m", "u32", "--u32", marker, *mark, "-j", "RETURN")]
    args_in = [r.args for r in by_chain[chain_in]]
    args_out = [r.args for r in by_chain[chain_out]]
    for want, got in ((want_in, args_in), (want_out, args_out)):
        at = [got.index(w) for w in want]
        first_policy = next(i for i, r in enumerate(got) if ("-s" in r and "10.1.0.0/24" in r)
                            or ("-d" in r and "10.1.0.0/24" in r))
        assert max(at) < first_policy
    assert [r.args for r in by_chain[rules.chain_protect("NFQIPSEC", 1)]] == [("-j", "DROP")]
    assert ("-s", "10.2.0.0/24", "-d", "10.1.0.0/24", "-j", "DROP") in args_in
    assert not any("500" in r for r in args_in if r[:2] != ("-s", "192.0.2.2/32"))

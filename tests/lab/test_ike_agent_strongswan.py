"""The keying agent's Child SA carrying traffic between nfq-ipsec and strongSwan.

Namespace ``a`` runs charon 5.9 (kernel-libipsec, the benchmark's strongswan.conf: its own ESP
in user space, always in UDP 4500, and its IKE kept off its tunnel by a firewall mark), ``b``
runs ``nfq-ipsec run`` with one ``[[connection]]`` to it (tunnel mode between the two hosts'
addresses, PSK, FQDN identities), which starts it; charon answers. charon gets ``encap = yes``:
kernel-libipsec has no plain ESP, and without it charon's ESP in UDP stays on port 500 while
its NAT detection sends the IKE SA to 4500. Checked: the IKE SA and
Child SA are up on both sides with each other's SPIs in UDP; ping and a file over TCP (its
sha256) go through; a capture of the link holds ESP in UDP and IKE only. Then the other way:
our connection waits (start_action = "none") and charon initiates and rekeys its Child SA every
2 s under a ping stream: none lost, no drop counted. Needs root, the lab's
tools and strongSwan (scripts/install-deps installs it); namespaces ``ika<pid>-<n>sa``/``sb``.
"""

from __future__ import annotations

import os
import re
import secrets
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gate
import pytest
from ikepeers import connection_daemon_config
from labutil import QUEUES, Daemon, Pair, Sniffer, env, make_pair

from nfq_ipsec_lab.bench import strongswan
from nfq_ipsec_lab.lab import traffic
from nfq_ipsec_lab.lab.netns import LabError

A_ID, B_ID = "a.nfq-ipsec.test", "b.nfq-ipsec.test"
IKE, ESP = "aes256gcm16-prfsha256-x25519", "aes128gcm16"


def swanctl_conf(me: str, peer: str, psk: str) -> str:
    return textwrap.dedent(f"""\
        connections {{
          nfq {{
            version = 2
            local_addrs = {me}
            remote_addrs = {peer}
            proposals = {IKE}
            encap = yes
            dpd_delay = 0s
            local {{
              auth = psk
              id = {A_ID}
            }}
            remote {{
              auth = psk
              id = {B_ID}
            }}
            children {{
              nfq {{
                local_ts = {me}/32
                remote_ts = {peer}/32
                esp_proposals = {ESP}
                mode = tunnel
                rekey_time = 1h
              }}
            }}
          }}
        }}
        secrets {{
          ike-nfq {{
            id = {B_ID}
            secret = "{psk}"
          }}
        }}
        """)


def daemon_config(directory: Path, iface: str, me: str, peer: str, psk: str) -> Path:
    return connection_daemon_config(directory, iface, me, peer, psk, QUEUES, local_id=B_ID,
                                    remote_id=A_ID, ike=IKE, esp=ESP, start_action="start",
                                    dpd_delay=0)


class Bed:
    def __init__(self, pair: Pair, charon: strongswan.Charon, daemon: Daemon,
                 addr_a: str, addr_b: str, charon_psk: str) -> None:
        self.pair, self.charon, self.daemon = pair, charon, daemon
        self.addr_a, self.addr_b = addr_a, addr_b
        self.charon_psk = charon_psk


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    why = strongswan.missing()
    if why:
        gate.require([f"strongSwan can't run here: {why}"], "nfq-ipsec against strongSwan")
    tmp = tmp_path_factory.mktemp("ike-agent-strongswan")
    psk = secrets.token_hex(16)
    started: list[Daemon] = []
    with make_pair("s", prefix="ika") as pair:
        a_host, b_host = pair.host(pair.a), pair.host(pair.b)
        addr_a, addr_b = "10.81.0.1", "10.81.0.2"  # make_pair's
        charon = strongswan.Charon(pair.lab, f"ika{os.getpid()}", a_host, addr_a, addr_b, psk,
                                   swanctl_conf=swanctl_conf(addr_a, addr_b, psk))
        try:
            charon.start()
            charon.wait_vici()
            charon.swanctl("--load-all", "--file", str(charon.swanctl_conf))
            path = daemon_config(tmp / "b", pair.vb, addr_b, addr_a, psk)
            d = Daemon("b", b_host, path, env=env(), log=tmp / "b" / "daemon.log", lab=pair.lab)
            started.append(d)
            d.start()
            d.wait_running()
            yield Bed(pair, charon, d, addr_a, addr_b, psk)
        finally:
            for d in started:
                d.cleanup()


def _up(bed: Bed, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if traffic.ping(bed.pair.host(bed.pair.b), bed.addr_a, 1, 0.5).received == 1:
                return
        except LabError:  # refused at the sender until the Child SA is up
            time.sleep(0.3)
    raise AssertionError(f"no traffic through the Child SA after {timeout:g} s; daemon log:\n"
                         f"{bed.daemon.log_text()[-3000:]}\nstatus:\n{bed.daemon.status_text()}\n"
                         f"charon's SAs:\n{bed.charon.swanctl('--list-sas')}\n"
                         f"charon:\n{bed.charon.log()[-3000:]}")


def test_ping_and_a_file_between_nfq_ipsec_and_strongswan(bed: Bed, tmp_path: Path) -> None:
    _up(bed)
    sas = bed.charon.swanctl("--list-sas")
    assert "ESTABLISHED" in sas and "INSTALLED, TUNNEL-in-UDP" in sas, sas
    spis = re.search(r"INSTALLED, TUNNEL-in-UDP.*?\bin\s+([0-9a-f]{8}),.*?\bout\s+([0-9a-f]{8}),",
                     sas, re.S)
    assert spis, sas
    ours = {(sa["direction"], int(sa["spi"], 16), sa["encapsulation"])
            for sa in bed.daemon.status()["sas"]}
    assert ("in", int(spis.group(2), 16), "udp") in ours and ("out", int(spis.group(1), 16), "udp") in ours
    sniffer = Sniffer(bed.pair, bed.pair.b, bed.pair.vb, tmp_path / "link.pcap")
    try:
        ping = traffic.ping(bed.pair.host(bed.pair.b), bed.addr_a, 20)
        blob = traffic.random_file(tmp_path / "file.bin")
        sent = traffic.send_file(bed.pair.lab, bed.pair.host(bed.pair.b),
                                 bed.pair.host(bed.pair.a), bed.addr_a, blob, port=9300)
    finally:
        assert sniffer.stop() == 0
    assert (ping.sent, ping.received) == (20, 20)
    assert sent.ok, sent
    kinds: dict[str, int] = {}
    for p in sniffer.packets():
        if p[0] >> 4 != 4:
            continue
        ihl = (p[0] & 0x0F) * 4
        ports = (int.from_bytes(p[ihl:ihl + 2], "big"), int.from_bytes(p[ihl + 2:ihl + 4], "big"))
        if p[9] == 17 and ports == (4500, 4500):
            kind = "ike" if p[ihl + 8:ihl + 12] == bytes(4) else "esp-in-udp"
        elif p[9] == 17 and 500 in ports:
            kind = "ike"
        else:
            kind = f"cleartext proto {p[9]}"
        kinds[kind] = kinds.get(kind, 0) + 1
    assert set(kinds) <= {"esp-in-udp", "ike"}, kinds
    assert kinds.get("esp-in-udp", 0) >= 40 + 100, kinds


CHILD_REKEY = 2  # seconds: charon rekeys its Child SA this often in the initiator case
PINGS = 140  # 50 ms apart: about 7 s


def test_strongswan_initiates_and_rekeys_its_child_sa_under_a_ping_stream_with_no_loss(
        bed: Bed) -> None:
    """Our connection made ``start_action = "none"`` (a reload takes its SAs down, and nothing
    initiates); charon, given ``rekey_time = 2s`` for its Child SA, initiates to the daemon
    and rekeys under 7 s of pings 50 ms apart: every ping answered, no drop counted on our
    side, our SPIs charon's newest, one Child SA pair left on each side."""
    _up(bed)
    text = bed.daemon.config.read_text()
    bed.daemon.config.write_text(text.replace('start_action = "start"', 'start_action = "none"'))
    res = bed.daemon.ask("reload")
    assert res.returncode == 0, res.stderr
    bed.daemon.wait_for(lambda st: not [sa for sa in st["sas"] if sa["name"].startswith("peer.")],
                        timeout=10, what="our Child SAs out")
    conf = swanctl_conf(bed.addr_a, bed.addr_b, bed.charon_psk).replace(
        "rekey_time = 1h", f"rekey_time = {CHILD_REKEY}s\n                life_time = 30s\n"
                           "                rand_time = 0s")
    bed.charon.swanctl_conf.write_text(conf)
    bed.charon.swanctl("--load-all", "--file", str(bed.charon.swanctl_conf))
    deadline = time.monotonic() + 10
    while "ESTABLISHED" in bed.charon.swanctl("--list-sas") and time.monotonic() < deadline:
        time.sleep(0.2)  # our Delete of the old IKE SA reached charon
    bed.charon.swanctl("--initiate", "--child", "nfq", "--timeout", "10")
    _up(bed)
    log_before = bed.daemon.log_text().count("Child SA rekeyed")

    def counted(st: dict[str, Any]) -> dict[str, int]:
        out: dict[str, int] = {}
        for w in st["workers"]:
            for reason, n in w["drops"].items():
                out[reason] = out.get(reason, 0) + n
        return out

    before = counted(bed.daemon.status())
    ping = traffic.ping(bed.pair.host(bed.pair.b), bed.addr_a, PINGS, wait=1.0, interval=0.05)
    after = counted(bed.daemon.status())
    rekeys = bed.daemon.log_text().count("Child SA rekeyed") - log_before
    assert rekeys >= 2, bed.daemon.log_text()[-3000:]
    assert (ping.sent, ping.received) == (PINGS, PINGS), [
        ln for ln in ping.output.splitlines() if ln.startswith("timeout")]
    grown = {r: n - before.get(r, 0) for r, n in after.items() if n != before.get(r, 0)}
    assert grown == {}, grown  # no packet of ours dropped, for any reason
    (conn,) = bed.daemon.status()["ike"]["connections"]
    assert conn["start_action"] == "none"
    roles = {sa["role"] for sa in conn["ike_sas"] if sa["state"] == "established"}
    assert roles == {"responder"}, conn["ike_sas"]
    # charon keeps rekeying every 2 s: our SAs and its installed ones overlap in both
    # directions at some look (between two looks a rekey may come)
    deadline = time.monotonic() + 3 * CHILD_REKEY
    while True:
        ours = {(sa["direction"], int(sa["spi"], 16)) for sa in bed.daemon.status()["sas"]
                if sa["name"].startswith("peer.")}
        sas = bed.charon.swanctl("--list-sas")
        spis = re.findall(r"INSTALLED, TUNNEL-in-UDP.*?\bin\s+([0-9a-f]{8}),.*?\bout\s+([0-9a-f]{8}),",
                          sas, re.S)
        theirs = {("in", int(o, 16)) for _, o in spis} | {("out", int(i, 16)) for i, _ in spis}
        if {d for d, _ in ours & theirs} == {"in", "out"} or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {d for d, _ in ours & theirs} == {"in", "out"}, (ours, theirs)
    assert len(ours) <= 6, ours  # old pairs retire: no more than a rekey or two half done
    print(f"\nstrongSwan as initiator: {rekeys} Child SA rekeys by charon under {PINGS} pings, "
          "none lost, no drop counted")

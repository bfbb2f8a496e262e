"""The kernel peer's pure parts: the guest's ``ip xfrm`` commands, reading its counters, the
initramfs archive. The guest itself runs in tests/lab/test_kernel_peer.py."""

from __future__ import annotations

import stat
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest

from nfq_ipsec_lab.lab import labconfig
from nfq_ipsec_lab.lab.guestimage import Cpio
from nfq_ipsec_lab.lab.kernelpeer import IP, UdpEncap, parse_xfrm_stats, redact, xfrm_commands
from nfq_ipsec_lab.lab.labconfig import PeerSpec

HOST, GUEST = IPv4Address("10.231.0.1"), IPv4Address("10.231.0.2")

# `ip -s xfrm state` of Debian 12's kernel, as the guest prints it without the key lines
STATS = """\
src 10.231.0.2 dst 10.231.0.1
\tproto esp spi 0x00002000(8192) reqid 1(0x00000001) mode tunnel
\treplay-window 0 seq 0x00000000 flag  (0x00000000)
\tanti-replay esn context:
\t seq-hi 0x0, seq 0x0, oseq-hi 0x0, oseq 0x11
\t replay_window 64, bitmap-length 2
\t 00000000 00000000
\tsel src 0.0.0.0/0 dst 0.0.0.0/0 uid 0
\tlifetime config:
\t  limit: soft (INF)(bytes), hard (INF)(bytes)
\t  limit: soft (INF)(packets), hard (INF)(packets)
\t  expire add: soft 0(sec), hard 0(sec)
\t  expire use: soft 0(sec), hard 0(sec)
\tlifetime current:
\t  20480(bytes), 17(packets)
\t  add 2026-12-02 19:01:20 use 2026-12-02 19:01:22
\tstats:
\t  replay-window 0 replay 0 failed 0
src 10.231.0.1 dst 10.231.0.2
\tproto esp spi 0x00001000(4096) reqid 1(0x00000001) mode tunnel
\treplay-window 0 seq 0x00000000 flag  (0x00000000)
\tlifetime current:
\t  3000(bytes), 5(packets)
\t  add 2026-12-02 19:01:20 use 2026-12-02 19:01:22
\tstats:
\t  replay-window 0 replay 2 failed 1
"""


def plan(encryption: str, mode: str) -> labconfig.LabConfig:
    return labconfig.plan(PeerSpec("a", "nfkt1", HOST, IPv4Network(f"{HOST}/32")),
                          PeerSpec("b", "eth0", GUEST, IPv4Network(f"{GUEST}/32")),
                          encryption, queues=1, mode=mode)


def test_xfrm_commands_mirror_the_lab_sas() -> None:
    cfg = plan("aes-gcm-128", "transport")
    out_sa, in_sa = sorted(cfg.sas, key=lambda sa: sa.sender != "b")
    cmds = xfrm_commands(cfg.sas, "b", "transport")
    assert cmds[:2] == [f"{IP} xfrm policy flush", f"{IP} xfrm state flush"]
    states = [c for c in cmds if " state add " in c]
    assert len(states) == 2
    # the guest (b) sends with b-to-a and receives with a-to-b; the GCM key carries its salt
    assert states[0].startswith(f"{IP} xfrm state add src {HOST} dst {GUEST} proto esp spi "
                                "0x00001000 reqid 1 mode transport ")
    assert states[0].endswith(f"aead 'rfc4106(gcm(aes))' 0x{in_sa.key.hex()} 128")
    assert len(in_sa.key) == 20 and out_sa.sender == "b"
    assert [c for c in cmds if "policy add" in c] == [
        f"{IP} xfrm policy add src {HOST}/32 dst {GUEST}/32 dir in priority 100 tmpl src {HOST} "
        f"dst {GUEST} proto esp reqid 1 mode transport",
        f"{IP} xfrm policy add src {GUEST}/32 dst {HOST}/32 dir out priority 100 tmpl src {GUEST} "
        f"dst {HOST} proto esp reqid 1 mode transport"]
    assert not any("encap" in c or "proto 58" in c for c in cmds)


def test_xfrm_commands_over_ipv6_let_neighbour_discovery_pass() -> None:
    """IPv6: the same states and policies, and before them (a lower priority number) policies
    without templates for ICMPv6 router and neighbour discovery both ways, as our rules pass
    them in clear: the kernel would otherwise encrypt its advertisements and drop ours."""
    host6, guest6 = IPv6Address("fd00:231::1"), IPv6Address("fd00:231::2")
    cfg = labconfig.plan(PeerSpec("a", "nfkt1", host6, IPv6Network(f"{host6}/128")),
                         PeerSpec("b", "eth0", guest6, IPv6Network(f"{guest6}/128")),
                         "aes-gcm-128", queues=1, mode="tunnel")
    cmds = xfrm_commands(cfg.sas, "b", "tunnel")
    assert f"{IP} xfrm state add src {host6} dst {guest6} proto esp spi 0x00001000 " in cmds[2]
    protect = [c for c in cmds if " tmpl " in c]
    assert protect[0] == (f"{IP} xfrm policy add src {host6}/128 dst {guest6}/128 dir in "
                          f"priority 100 tmpl src {host6} dst {guest6} proto esp reqid 1 mode tunnel")
    nd = [c for c in cmds if "proto 58" in c]
    assert nd == [f"{IP} xfrm policy add src ::/0 dst ::/0 proto 58 type {t} dir {d} priority 10"
                  for d in ("out", "in") for t in (133, 134, 135, 136, 137)]


def test_xfrm_commands_and_config_of_esp_in_udp() -> None:
    """ESP in UDP: the guest's states carry ``encap espinudp``, our SAs ``encapsulation =
    "udp"``; IPv6 is refused (our configuration refuses ESP in UDP over IPv6)."""
    cfg = labconfig.plan(PeerSpec("a", "nfkt1", HOST, IPv4Network(f"{HOST}/32")),
                         PeerSpec("b", "eth0", GUEST, IPv4Network(f"{GUEST}/32")),
                         "aes-gcm-128", queues=1, mode="transport", encapsulation="udp")
    assert all(sa.encapsulation == "udp" for sa in cfg.sas)
    states = [c for c in xfrm_commands(cfg.sas, "b", "transport", UdpEncap(4500, 4500))
              if " state add " in c]
    assert len(states) == 2 and all(c.endswith(" encap espinudp 4500 4500 0.0.0.0") for c in states)
    a, b = (PeerSpec("a", "nfkt1", HOST, IPv4Network(f"{HOST}/32")),
            PeerSpec("b", "eth0", GUEST, IPv4Network(f"{GUEST}/32")))
    text = labconfig.render(a, b, cfg.sas, cfg.queues, Path("ctl.sock"), Path("state"), "transport")
    assert text.count('encapsulation = "udp"') == 2
    with pytest.raises(ValueError, match="IPv4 only"):
        labconfig.plan(PeerSpec("a", "x", IPv6Address("fd00::1"), IPv6Network("fd00::1/128")),
                       PeerSpec("b", "y", IPv6Address("fd00::2"), IPv6Network("fd00::2/128")),
                       encapsulation="udp")


def test_xfrm_commands_cbc_hmac_tunnel() -> None:
    cfg = plan("aes-cbc-128", "tunnel")
    sa = next(sa for sa in cfg.sas if sa.sender == "b")
    state = next(c for c in xfrm_commands(cfg.sas, "b", "tunnel") if f"spi 0x{sa.spi:08x}" in c)
    assert " mode tunnel " in state
    assert state.endswith(f"enc 'cbc(aes)' 0x{sa.key.hex()} auth-trunc 'hmac(sha256)' "
                          f"0x{sa.integrity_key.hex()} 128")
    assert sa.key.hex() not in redact(state) and "0x<key>" in redact(state)


def test_xfrm_counters_are_read_per_spi() -> None:
    counters = parse_xfrm_stats(STATS)
    assert set(counters) == {0x2000, 0x1000}
    assert (counters[0x2000].packets, counters[0x2000].bytes) == (17, 20480)
    c = counters[0x1000]
    assert (c.packets, c.bytes, c.replay, c.integrity_failed) == (5, 3000, 2, 1)


def test_initramfs_archive_is_newc() -> None:
    """The kernel unpacks newc: every header "070701", 13 hex fields, name and data padded
    to 4 bytes, a TRAILER!!! entry last."""
    cpio = Cpio()
    cpio.directories("lib/x86_64-linux-gnu")
    cpio.file("init", b"#!/bin/sh\n", 0o755)
    cpio.symlink("bin/sh", "busybox")
    data = cpio.finish()
    entries = []
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        start = pos + 110
        name = data[start:start + namesize - 1].decode()
        body = start + namesize + (-(110 + namesize) % 4)
        entries.append((name, mode, data[body:body + size]))
        pos = body + size + (-size % 4)
        if name == "TRAILER!!!":
            break
    assert pos == len(data)
    names = [e[0] for e in entries]
    assert names == ["lib", "lib/x86_64-linux-gnu", "init", "bin/sh", "TRAILER!!!"]
    assert stat.S_ISDIR(entries[1][1]) and entries[2][2] == b"#!/bin/sh\n"
    assert stat.S_IMODE(entries[2][1]) == 0o755 and stat.S_ISLNK(entries[3][1])
    assert entries[3][2] == b"busybox"


@pytest.mark.parametrize("text", ["0x" + "ab" * 20, "key 0x" + "0F" * 16 + " 128"])
def test_redact_hides_key_material(text: str) -> None:
    assert "abab" not in redact(text) and "0F0F" not in redact(text)

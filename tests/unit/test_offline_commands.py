"""The offline commands: check-config, decode (pcap and pcapng), genkey; exit codes."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import gate
import pytest
from repo import EXAMPLES
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.l2 import CookedLinux, Ether
from scapy.packet import Raw
from scapy.utils import PcapNgWriter, wrpcap

from nfq_ipsec.cli import main
from nfq_ipsec.config import load_config
from nfq_ipsec.core import Processor

A = EXAMPLES / "host-a.toml"
B = EXAMPLES / "host-b.toml"
CPUS = [0, 1]


def capture_packets() -> list[bytes]:
    """ESP of both directions made by two processors (the example pair), plus extras."""
    a = load_config(A, online_cpus=CPUS)
    b = load_config(B, online_cpus=CPUS)
    pa = Processor(a.spd, a.sas_for_queue(101), 0.0)
    pb = Processor(b.spd, b.sas_for_queue(101), 0.0)
    ping = bytes(IP(src="192.168.56.10", dst="192.168.56.11") / ICMP(id=7, seq=1) / Raw(b"x" * 20))
    pong = bytes(IP(src="192.168.56.11", dst="192.168.56.10") / ICMP(type=0, id=7, seq=1) / Raw(b"x" * 20))
    udp = bytes(IP(src="192.168.56.10", dst="192.168.56.11") / UDP(sport=5000, dport=53) / Raw(b"q" * 30))
    out1 = pa.outbound(ping, 0.0).packet
    out2 = pb.outbound(pong, 0.0).packet
    out3 = pa.outbound(udp, 0.0).packet
    assert out1 and out2 and out3
    tampered = bytearray(out3)
    tampered[-1] ^= 0x80
    clear = bytes(IP(src="192.168.56.10", dst="192.168.56.11") / TCP(sport=22, dport=4000))
    # ok, ok, ok, replay of #1, tampered copy of #3 (seq 2 already seen -> replay), cleartext
    return [out1, out2, out3, out1, bytes(tampered), clear]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_config_summarises_without_keys(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = run(capsys, "check-config", str(A))
    assert code == 0
    assert "a-to-b-0" in out and "0x00001000" in out and "queue 101" in out
    assert "; watchdog 10 s\n" in out  # the default: the example sets none
    text = A.read_text()
    for line in text.splitlines():
        if line.startswith("key = "):
            hexkey = line.split('"')[1].removeprefix("0x")
            assert hexkey[:8] not in out


def test_check_config_bad_file_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(A.read_text().replace("spi = 0x00001000", "spi = 7").replace('"aes-gcm-128"', '"des"', 1))
    code, out, err = run(capsys, "check-config", str(bad))
    assert code == 2 and out == ""
    assert "sa[0].spi:" in err and "sa[0].encryption:" in err and "2 problems" in err


@pytest.mark.parametrize("fmt", ["pcap-ether", "pcap-sll", "pcapng"])
def test_decode_capture(fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pkts = capture_packets()
    path = tmp_path / "cap"
    if fmt == "pcap-ether":
        wrpcap(str(path), [Ether() / IP(p) for p in pkts])
    elif fmt == "pcap-sll":
        wrpcap(str(path), [CookedLinux(proto=0x0800) / IP(p) for p in pkts])
    else:
        with PcapNgWriter(str(path)) as w:
            for p in pkts:
                w.write(Ether() / IP(p))
    code, out, _err = run(capsys, "decode", "--config", str(A), str(path))
    lines = out.splitlines()
    assert code == 4  # some packets were dropped
    assert "ok    sa=a-to-b-1  ICMP 192.168.56.10 > 192.168.56.11 echo-request id=7 seq=1" in lines[0]
    assert "sa=b-to-a-1  ICMP 192.168.56.11 > 192.168.56.10 echo-reply" in lines[1]
    assert "UDP 192.168.56.10:5000 > 192.168.56.11:53 len=30" in lines[2]
    assert "DROP  replay" in lines[3]
    assert "DROP  replay" in lines[4]
    assert "not-esp" in lines[5] and "TCP 192.168.56.10:22 > 192.168.56.11:4000" in lines[5]
    assert lines[-1] == "summary: drop replay 2, not-esp 1, ok 3"


@pytest.mark.parametrize("fmt", ["pcap-ether", "pcap-vlan", "pcap-sll", "pcap-raw", "pcapng"])
def test_pcap_views_agree(fmt: str, tmp_path: Path) -> None:
    """One reader for decode and the lab's wire check: records, frames (ethertype and network
    layer) and IP packets describe the same capture, frame for frame."""
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import ARP, Dot1Q

    from nfq_ipsec.pcap import ETH_ARP, ETH_IPV4, ETH_IPV6, read_frames, read_packets, read_records

    ip4 = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / Raw(b"v4"))
    ip6 = bytes(IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=1, dport=2) / Raw(b"v6"))
    path = tmp_path / "cap"
    if fmt == "pcap-raw":
        wrpcap(str(path), [IP(ip4), IPv6(ip6)], linktype=101)  # LINKTYPE_RAW: either version
        want = [(ETH_IPV4, ip4), (ETH_IPV6, ip6)]
    elif fmt == "pcap-sll":
        wrpcap(str(path), [CookedLinux(proto=0x0800) / IP(ip4), CookedLinux(proto=0x86DD) / IPv6(ip6)])
        want = [(ETH_IPV4, ip4), (ETH_IPV6, ip6)]
    else:
        frames = [Ether() / IP(ip4), Ether() / ARP(), Ether() / IPv6(ip6)]
        if fmt == "pcap-vlan":
            frames = [Ether() / Dot1Q(vlan=5) / f.payload for f in frames]
        if fmt == "pcapng":
            with PcapNgWriter(str(path)) as w:
                for f in frames:
                    w.write(f)
        else:
            wrpcap(str(path), frames)
        want = [(ETH_IPV4, ip4), (ETH_ARP, bytes(ARP())), (ETH_IPV6, ip6)]
    got = list(read_frames(path))
    assert [(etype, data[:len(w)]) for (etype, data), (_, w) in zip(got, want, strict=True)] == want
    assert len(list(read_records(path))) == len(want)
    assert list(read_packets(path)) == [d if e in (ETH_IPV4, ETH_IPV6) else None for e, d in got]


def test_decode_reports_integrity_and_unknown_spi(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pkts = capture_packets()
    tampered = bytearray(pkts[2])
    tampered[-1] ^= 1
    unknown = bytearray(pkts[0])
    unknown[20:24] = b"\x00\x00\x99\x99"
    path = tmp_path / "c.pcap"
    wrpcap(str(path), [IP(bytes(tampered)), IP(bytes(unknown))])  # raw IP link type
    code, out, _ = run(capsys, "decode", "--config", str(A), str(path))
    assert code == 4
    assert "DROP  integrity sa=a-to-b-1" in out.splitlines()[0]
    assert "DROP  unknown_spi" in out.splitlines()[1]


def test_decode_all_good_exit_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ok.pcap"
    wrpcap(str(path), [Ether() / IP(p) for p in capture_packets()[:3]])
    code, out, _ = run(capsys, "decode", "--config", str(A), str(path))
    assert code == 0 and out.splitlines()[-1] == "summary: ok 3"


def test_decode_not_a_capture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.pcap"
    path.write_bytes(b"hello world")
    code, _out, err = run(capsys, "decode", "--config", str(A), str(path))
    assert code == 1 and "not a pcap or pcapng file" in err


def test_decode_agrees_with_tshark_on_spis(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An independent reader (tshark) sees the same ESP SPIs and sequence numbers in our pcap."""
    gate.tool("tshark", "tshark")
    import subprocess

    path = tmp_path / "t.pcap"
    wrpcap(str(path), [Ether() / IP(p) for p in capture_packets()[:3]])
    res = subprocess.run(
        ["tshark", "-r", str(path), "-T", "fields", "-e", "esp.spi", "-e", "esp.sequence"],
        capture_output=True, text=True, check=True,
    )
    theirs = [tuple(int(v, 0) for v in ln.split("\t")) for ln in res.stdout.strip().splitlines()]
    _code, out, _ = run(capsys, "decode", "--config", str(A), str(path))
    ours = re.findall(r"spi=(0x[0-9a-f]+) seq=(\d+)", out)
    assert [(int(s, 16), int(q)) for s, q in ours] == theirs == [(0x1001, 1), (0x2001, 1), (0x1001, 2)]


def test_check_config_says_what_happens_to_ipv6(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = run(capsys, "check-config", str(EXAMPLES / "host6-a.toml"))
    assert code == 0
    assert ("IPv6: 2 policies, 2 SAs with ESP in IPv6, the rest by node.default = discard; "
            "neighbour discovery and MLD pass in clear (node.ipv6_neighbour_discovery = false "
            "turns that off)") in out
    assert "2001:db8:56::10/128 <-> 2001:db8:56::11/128" in out


def test_decode_ipv6_capture_made_by_scapy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """ESP over IPv6 that scapy's SecurityAssociation made with the example pair's key: decode
    opens it, walks a destination options header in front of ESP, and names a tampered one."""
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt
    from scapy.layers.ipsec import ESP
    from scapy.layers.ipsec import SecurityAssociation as ScapySA

    a = load_config(EXAMPLES / "host6-a.toml", online_cpus=CPUS)
    sa = a.sa("a-to-b")
    peer = ScapySA(ESP, spi=sa.spi, crypt_algo="AES-GCM", crypt_key=sa.key.reveal())  # type: ignore[no-untyped-call]
    src, dst = "2001:db8:56::10", "2001:db8:56::11"
    ping = IPv6(src=src, dst=dst) / ICMPv6EchoRequest(id=3, seq=1, data=b"v6" * 8)
    udp = IPv6(src=src, dst=dst) / IPv6ExtHdrDestOpt() / UDP(sport=4000, dport=53) / Raw(b"q" * 9)
    wire = [bytes(peer.encrypt(IPv6(bytes(p)), seq_num=n + 1))  # type: ignore[no-untyped-call]
            for n, p in enumerate((ping, udp))]
    tampered = bytearray(wire[1])
    tampered[-1] ^= 1
    path = tmp_path / "v6.pcap"
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")  # no neighbour lookups
    wrpcap(str(path), [eth / IPv6(p) for p in (wire[0], bytes(tampered), wire[1])])
    code, out, _ = run(capsys, "decode", "--config", str(EXAMPLES / "host6-b.toml"), str(path))
    lines = out.splitlines()
    assert code == 4, out
    assert (f"ok    sa=a-to-b  ICMPv6 {src} > {dst} echo-request id=3 seq=1") in lines[0]
    assert "DROP  integrity sa=a-to-b" in lines[1]  # before the genuine one: not a replay
    assert f"ok    sa=a-to-b  UDP {src}:4000 > {dst}:53 len=9" in lines[2]


def test_decode_reassembles_fragmented_ipv6_esp(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """IPv6 fragments of ESP (scapy's ESP, scapy's fragment6) in a capture, out of order: held,
    then decoded whole at the last one; a destination options header behind the fragment
    header, an atomic fragment, a first fragment that ends inside the chain too; overlapping
    fragments drop the datagram."""
    from scapy.layers.inet6 import (
        ICMPv6EchoRequest,
        IPv6,
        IPv6ExtHdrDestOpt,
        IPv6ExtHdrFragment,
        fragment6,
    )
    from scapy.layers.ipsec import ESP
    from scapy.layers.ipsec import SecurityAssociation as ScapySA

    a = load_config(EXAMPLES / "host6-a.toml", online_cpus=CPUS)
    sa = a.sa("a-to-b")
    peer = ScapySA(ESP, spi=sa.spi, crypt_algo="AES-GCM", crypt_key=sa.key.reveal())  # type: ignore[no-untyped-call]
    src, dst = "2001:db8:56::10", "2001:db8:56::11"
    ping = IPv6(src=src, dst=dst) / ICMPv6EchoRequest(id=5, seq=1, data=bytes(range(256)) * 12)
    dest = (IPv6(src=src, dst=dst) / IPv6ExtHdrDestOpt() / UDP(sport=4000, dport=53)
            / Raw(b"d" * 2000))
    small = IPv6(src=src, dst=dst) / UDP(sport=4001, dport=53) / Raw(b"atomic")
    other = IPv6(src=src, dst=dst) / UDP(sport=4002, dport=53) / Raw(b"cut-chain")
    wire = [IPv6(bytes(peer.encrypt(IPv6(bytes(p)), seq_num=n + 1)))  # type: ignore[no-untyped-call]
            for n, p in enumerate((ping, dest, small, other))]

    def fragments(pkt: IPv6, ident: int, size: int = 1280) -> list[bytes]:
        framed = IPv6(src=pkt.src, dst=pkt.dst) / IPv6ExtHdrFragment(id=ident, nh=pkt.nh) / pkt.payload
        return [bytes(f) for f in fragment6(framed, size)]  # type: ignore[no-untyped-call]

    f1, f2 = fragments(wire[0], 1), fragments(wire[1], 2)
    assert len(f1) == 3 and len(f2) == 2
    assert IPv6(f2[0])[IPv6ExtHdrFragment].nh == 60  # the options header follows it
    atomic = bytes(IPv6(src=src, dst=dst) / IPv6ExtHdrFragment(id=3, nh=50) / wire[2].payload)
    # ESP behind four destination options, the first fragment ending inside them: the kernel
    # reassembles it all the same (RFC 7112 would not), and so does decode
    chain = b"".join(bytes((60 if i < 3 else 50, 0, 1, 4, 0, 0, 0, 0)) for i in range(4))
    esp4 = bytes(wire[3].payload)
    cut = [bytes(IPv6(src=src, dst=dst) / IPv6ExtHdrFragment(id=4, nh=60, m=1) / Raw(chain[:16])),
           bytes(IPv6(src=src, dst=dst) / IPv6ExtHdrFragment(id=4, nh=60, offset=2)
                 / Raw(chain[16:] + esp4))]
    path = tmp_path / "frag6.pcap"
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")  # no neighbour lookups
    wrpcap(str(path), [eth / IPv6(f) for f in (f1[2], f2[1], f1[0], f2[0], f1[1], atomic, *cut)])
    code, out, _ = run(capsys, "decode", "--config", str(EXAMPLES / "host6-b.toml"), str(path))
    lines = out.splitlines()
    assert code == 0, out
    assert all("held for reassembly" in line for line in lines[:3]), out
    assert "fragment id=2 offset=" in lines[1] and "fragment id=1 offset=0: held" in lines[2]
    assert f"ok    sa=a-to-b  UDP {src}:4000 > {dst}:53 len=2000" in lines[3]
    assert lines[3].endswith("(reassembled from 2 fragments)")
    assert f"ok    sa=a-to-b  ICMPv6 {src} > {dst} echo-request id=5 seq=1" in lines[4]
    assert lines[4].endswith("(reassembled from 3 fragments)")
    assert f"ok    sa=a-to-b  UDP {src}:4001 > {dst}:53 len=6 (reassembled from 1 fragment)" in lines[5]
    assert "fragment id=4 offset=0: held" in lines[6]
    assert f"ok    sa=a-to-b  UDP {src}:4002 > {dst}:53 len=9 (reassembled from 2 fragments)" in lines[7]
    assert lines[-1] == "summary: fragment 4, ok 4"
    # overlapping: a second copy of the middle fragment, its bytes changed
    copy = IPv6(f1[1])
    copy[IPv6ExtHdrFragment].offset -= 1
    wrpcap(str(path), [eth / IPv6(f) for f in (f1[0], bytes(copy), f1[1], f1[2])])
    code, out, _ = run(capsys, "decode", "--config", str(EXAMPLES / "host6-b.toml"), str(path))
    assert code == 4 and "DROP  fragment" in out and " ok " not in out, out


def test_decode_reassembles_fragmented_esp_over_ipv6(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The Linux kernel fragments a big ESP packet over IPv6 too (a fragment header after the
    unfragmentable part, here a hop-by-hop header): decode holds the fragments, in any order,
    and checks the ESP packet once it is whole; a later fragment is never read as ESP."""
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
    from scapy.layers.ipsec import ESP
    from scapy.layers.ipsec import SecurityAssociation as ScapySA

    a = load_config(EXAMPLES / "host6-a.toml", online_cpus=CPUS)
    sa = a.sa("a-to-b")
    peer = ScapySA(ESP, spi=sa.spi, crypt_algo="AES-GCM", crypt_key=sa.key.reveal())  # type: ignore[no-untyped-call]
    src, dst = "2001:db8:56::10", "2001:db8:56::11"
    big = IPv6(src=src, dst=dst) / IPv6ExtHdrHopByHop() / UDP(sport=4000, dport=53) / Raw(b"q" * 3000)
    wire = peer.encrypt(IPv6(bytes(big)), seq_num=1)  # type: ignore[no-untyped-call]
    assert wire[IPv6ExtHdrHopByHop].nh == 50
    esp_bytes = bytes(wire[IPv6ExtHdrHopByHop].payload)
    frags = []
    for offset in range(0, len(esp_bytes), 1232):  # RFC 8200 4.5: 8-byte multiples
        chunk = esp_bytes[offset:offset + 1232]
        more = int(offset + len(chunk) < len(esp_bytes))
        frags.append(IPv6(src=src, dst=dst) / IPv6ExtHdrHopByHop()
                     / IPv6ExtHdrFragment(nh=50, offset=offset // 8, m=more, id=0x1234) / Raw(chunk))
    assert len(frags) == 3 and IPv6(bytes(frags[0]))[IPv6ExtHdrHopByHop].nh == 44
    path = tmp_path / "v6frag.pcap"
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")  # no neighbour lookups
    wrpcap(str(path), [eth / IPv6(bytes(f)) for f in (frags[2], frags[0], frags[1])])
    code, out, _ = run(capsys, "decode", "--config", str(EXAMPLES / "host6-b.toml"), str(path))
    lines = out.splitlines()
    assert code == 0, out
    assert all("held for reassembly" in line for line in lines[:2]), out
    assert f"ok    sa=a-to-b  UDP {src}:4000 > {dst}:53 len=3000" in lines[2], out
    assert lines[2].endswith("(reassembled from 3 fragments)")
    assert lines[-1] == "summary: fragment 2, ok 1"
    # the same fragments with one changed byte: reassembled, and the ICV says no
    bad = bytearray(bytes(frags[1]))
    bad[-1] ^= 1
    wrpcap(str(path), [eth / IPv6(p) for p in (bytes(frags[0]), bytes(bad), bytes(frags[2]))])
    code, out, _ = run(capsys, "decode", "--config", str(EXAMPLES / "host6-b.toml"), str(path))
    assert code == 4 and "DROP  integrity sa=a-to-b" in out and "unknown_spi" not in out, out


def test_genkey(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "genkey", "aes-gcm-128")
    assert code == 0 and len(bytes.fromhex(out.strip())) == 20
    code, out2, _ = run(capsys, "genkey", "aes-gcm-128")
    assert out2 != out
    code, out, _ = run(capsys, "genkey", "hmac-sha512-256")
    assert code == 0 and len(bytes.fromhex(out.strip())) == 64
    code, _, err = run(capsys, "genkey", "des")
    assert code == 2 and "MUST NOT" in err


def test_genkey_out_creates_a_0600_file_and_never_overwrites(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    key = tmp_path / "a-to-b.key"
    old = os.umask(0o022)  # a permissive umask must not matter
    try:
        code, out, _ = run(capsys, "genkey", "aes-gcm-256", "--out", str(key))
    finally:
        os.umask(old)
    assert code == 0 and "mode 0600" in out and key.read_text().strip() not in out
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(bytes.fromhex(key.read_text().strip())) == 36
    before = key.read_text()
    code, _, err = run(capsys, "genkey", "aes-gcm-256", "-o", str(key))
    assert code == 1 and "never overwritten" in err and key.read_text() == before
    code, _, err = run(capsys, "genkey", "aes-gcm-256", "-o", str(tmp_path / "no" / "dir.key"))
    assert code == 1 and "No such file or directory" in err


def udp_configs(tmp_path: Path) -> tuple[Path, Path]:
    """The example pair with every SA's ESP in UDP (RFC 3948)."""
    out = []
    for src in (A, B):
        path = tmp_path / src.name
        path.write_text(src.read_text().replace("[[sa]]\n", '[[sa]]\nencapsulation = "udp"\n'))
        path.chmod(0o600)
        out.append(path)
    return out[0], out[1]


def test_decode_esp_in_udp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """decode opens ESP in UDP, tells the marker and keepalives apart, and names the drops;
    tshark, reading the same capture, sees the same SPIs inside UDP 4500."""
    a_path, b_path = udp_configs(tmp_path)
    a = load_config(a_path, online_cpus=CPUS)
    b = load_config(b_path, online_cpus=CPUS)
    pa = Processor(a.spd, a.sas_for_queue(101), 0.0)
    pb = Processor(b.spd, b.sas_for_queue(101), 0.0)
    ping = bytes(IP(src="192.168.56.10", dst="192.168.56.11") / ICMP(id=7, seq=1))
    pong = bytes(IP(src="192.168.56.11", dst="192.168.56.10") / ICMP(type=0, id=7, seq=1))
    out1, out2 = pa.outbound(ping, 0.0).packet, pb.outbound(pong, 0.0).packet
    assert out1 and out2 and IP(out1)[UDP].dport == 4500
    (keepalive,) = pa.keepalives(100.0)
    marker = bytes(IP(src="192.168.56.11", dst="192.168.56.10") / UDP(sport=4500, dport=4500)
                   / Raw(b"\0\0\0\0ike"))
    runt = bytes(IP(src="192.168.56.11", dst="192.168.56.10") / UDP(sport=4500, dport=4500)
                 / Raw(b"\0\0\x20"))
    path = tmp_path / "u.pcap"
    wrpcap(str(path), [Ether() / IP(p) for p in (out1, out2, keepalive, marker, runt)])
    code, out, _ = run(capsys, "decode", "--config", str(a_path), str(path))
    lines = out.splitlines()
    assert code == 4  # the runt
    assert "udp" in lines[0] and "ok    sa=a-to-b-1" in lines[0] and "ICMP" in lines[0]
    assert "ok    sa=b-to-a-1" in lines[1]
    assert "keepalive" in lines[2] and "ike" in lines[3] and "non-ESP marker" in lines[3]
    assert "udp_runt" in lines[4]
    # the same ESP, plain, for these SAs: refused
    plain = load_config(A, online_cpus=CPUS)
    plain_out = Processor(plain.spd, plain.sas_for_queue(101), 0.0).outbound(ping, 0.0).packet
    assert plain_out is not None
    wrpcap(str(path), [Ether() / IP(plain_out)])
    code, out, _ = run(capsys, "decode", "--config", str(a_path), str(path))
    assert code == 4 and "DROP  encap_mismatch" in out
    gate.tool("tshark", "tshark")
    import subprocess

    wrpcap(str(path), [Ether() / IP(p) for p in (out1, out2)])
    res = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "udp.dstport",
                          "-e", "esp.spi", "-e", "esp.sequence"],
                         capture_output=True, text=True, check=True)
    theirs = [tuple(int(v, 0) for v in ln.split("\t")) for ln in res.stdout.strip().splitlines()]
    assert theirs == [(4500, 0x1001, 1), (4500, 0x2001, 1)]


def test_check_config_shows_esp_in_udp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_path, _ = udp_configs(tmp_path)
    code, out, _ = run(capsys, "check-config", str(a_path))
    assert code == 0
    lines = [ln for ln in out.splitlines() if "in UDP 4500 -> 4500" in ln]
    assert len(lines) == 4
    assert all("(new peer: drop, keepalive 20 s)" in ln for ln in lines if " out " in ln)
    assert all(ln.endswith("(new peer: drop)") for ln in lines if " in  " in ln)


def test_decode_reassembles_fragmented_esp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A peer like the Linux kernel encrypts a big packet without DF whole and fragments the
    ESP packet: decode holds the fragments and checks the ESP packet once it is whole, in
    whatever order its fragments were captured."""
    a = load_config(A, online_cpus=CPUS)
    pa = Processor(a.spd, a.sas_for_queue(101), 0.0)
    big = bytes(IP(src="192.168.56.10", dst="192.168.56.11", flags=0) / ICMP(id=9, seq=1)
                / Raw(bytes(range(256)) * 12))
    esp_packet = pa.outbound(big, 0.0).packet
    assert esp_packet is not None
    frags = fragment(IP(esp_packet), fragsize=1480)  # type: ignore[no-untyped-call]
    assert len(frags) == 3
    path = tmp_path / "frag.pcap"
    wrpcap(str(path), [Ether() / f for f in (frags[1], frags[0], frags[2])])
    code, out, _ = run(capsys, "decode", "--config", str(A), str(path))
    lines = out.splitlines()
    assert code == 0, out
    assert "fragment" in lines[0] and "held for reassembly" in lines[0]
    assert "fragment" in lines[1] and "held for reassembly" in lines[1]
    assert "ok    sa=a-to-b-1  ICMP 192.168.56.10 > 192.168.56.11 echo-request id=9 seq=1" in lines[2]
    assert lines[2].endswith("(reassembled from 3 fragments)")
    assert lines[-1] == "summary: fragment 2, ok 1"
    # overlapping fragments: the datagram is dropped, never decoded
    bad = IP(bytes(frags[1]))
    bad.frag -= 1
    wrpcap(str(path), [Ether() / f for f in (frags[0], bad, frags[1], frags[2])])
    code, out, _ = run(capsys, "decode", "--config", str(A), str(path))
    assert code == 4 and "DROP  fragment" in out and " ok " not in out, out
    # ESP in UDP, fragmented: reassembled before the UDP header is read
    a_path, _b_path = udp_configs(tmp_path)
    a = load_config(a_path, online_cpus=CPUS)
    udp_esp = Processor(a.spd, a.sas_for_queue(101), 0.0).outbound(big, 0.0).packet
    assert udp_esp is not None and IP(udp_esp)[UDP].dport == 4500
    frags = fragment(IP(udp_esp), fragsize=1480)  # type: ignore[no-untyped-call]
    wrpcap(str(path), [Ether() / f for f in reversed(frags)])
    code, out, _ = run(capsys, "decode", "--config", str(a_path), str(path))
    assert code == 0 and "udp" in out and "ok    sa=a-to-b-1" in out, out
    assert "(reassembled from 3 fragments)" in out

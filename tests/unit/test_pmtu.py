"""Path MTU for ESP (RFC 4301 section 8) in the core: a "fragmentation needed" about our ESP
sets the SA's path MTU; a DF packet too big for it after ESP is dropped and its sender told
the MTU that fits. The ICMP messages are built and read by scapy (an independent codec), and
sizes are checked against the ESP packets the core really makes.
"""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest
import sas
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.ipsec import ESP

from nfq_ipsec.core import DfPolicy, Processor, Verdict, pmtu
from nfq_ipsec.core import packet as ip
from nfq_ipsec.core.errors import DropReason, EspError
from nfq_ipsec.core.esp import encapsulate
from nfq_ipsec.core.sa import SADirection, SAParams, SecurityAssociation
from nfq_ipsec.core.spd import SPD, Action, Policy, Selector

A, B, ROUTER = "10.0.0.1", "10.0.0.2", "10.9.9.9"
LAN_A, LAN_B = "192.168.1.10", "192.168.2.20"
GW_A, GW_B = "172.16.0.1", "172.16.0.2"
OUT_SPI, IN_SPI = 0x1000, 0x2000
SUITES = [("aes-gcm-128", None), ("aes-cbc-128", "hmac-sha256-128"), ("chacha20-poly1305", None),
          ("null", "hmac-sha256-128")]


def _sa(encryption: str = "aes-gcm-128", integrity: str | None = None, tunnel: bool = False,
        df: DfPolicy = DfPolicy.COPY) -> SAParams:
    if tunnel:
        return sas.params("out", OUT_SPI, SADirection.OUT, encryption, integrity=integrity,
                          local=GW_A, remote=GW_B, df=df)
    return sas.params("out", OUT_SPI, SADirection.OUT, encryption, integrity=integrity)


def host(mtu: int = 1500, **sa: object) -> Processor:
    """A host, A, protecting UDP to B (transport mode)."""
    sel = Selector(local=IPv4Network(f"{A}/32"), remote=IPv4Network(f"{B}/32"), protocol=17)
    return Processor(SPD([Policy("udp", sel, Action.PROTECT, sa_names=("out",))]),
                     [_sa(**sa)], 0.0, mtu=mtu)  # type: ignore[arg-type]


def gateway(mtu: int = 1500, df: DfPolicy = DfPolicy.COPY) -> Processor:
    """A gateway protecting its LAN to the peer's LAN (tunnel mode)."""
    sel = Selector(local=IPv4Network("192.168.1.0/24"), remote=IPv4Network("192.168.2.0/24"))
    return Processor(SPD([Policy("lan", sel, Action.PROTECT, sa_names=("out",))]),
                     [_sa(tunnel=True, df=df)], 0.0, mtu=mtu)


def udp(size: int, df: bool = True, src: str = A, dst: str = B) -> bytes:
    """An IPv4 UDP datagram of exactly ``size`` bytes."""
    pkt = IP(src=src, dst=dst, flags="DF" if df else 0) / UDP(sport=4000, dport=5000)
    return bytes(pkt / (b"p" * (size - len(pkt))))


def frag_needed(mtu: int, spi: int = OUT_SPI, dst: str = B, quoted_len: int = 1500,
                code: int = 4) -> bytes:
    """A router's "fragmentation needed" about one of A's ESP packets to ``dst``."""
    quoted = bytes(IP(src=A, dst=dst, len=quoted_len, proto=50) / ESP(spi=spi, seq=1))[:28]
    return bytes(IP(src=ROUTER, dst=A) / ICMP(type=3, code=code, nexthopmtu=mtu) / quoted)


def out_sa(proc: Processor) -> SecurityAssociation:
    sa = proc.sad.by_name("out")
    assert sa is not None
    return sa


# -- sizes -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("encryption", "integrity"), SUITES)
@pytest.mark.parametrize("tunnel", [False, True])
def test_esp_size_is_the_size_encapsulate_makes(encryption: str, integrity: str | None,
                                                tunnel: bool) -> None:
    sa = SecurityAssociation(_sa(encryption, integrity, tunnel), 0.0)
    for size in range(28, 140):
        data = udp(size, src=LAN_A if tunnel else A, dst=LAN_B if tunnel else B)
        hdr = ip.parse_ipv4(data)
        assert pmtu.esp_size(sa, size, hdr.ihl) == len(encapsulate(sa, data, hdr)), size
        assert pmtu.esp_size(sa, size, hdr.ihl) <= size + sa.max_overhead


@pytest.mark.parametrize(("encryption", "integrity"), SUITES)
@pytest.mark.parametrize("path", [576, 1280, 1400, 1500, 9000])
def test_inner_mtu_is_the_largest_packet_that_fits(encryption: str, integrity: str | None,
                                                   path: int) -> None:
    sa = SecurityAssociation(_sa(encryption, integrity), 0.0)
    best = pmtu.inner_mtu(sa, path, 20)
    assert pmtu.esp_size(sa, best, 20) <= path < pmtu.esp_size(sa, best + 1, 20)


# -- learning from "fragmentation needed" ----------------------------------------------------

def test_frag_needed_is_read_from_the_quote() -> None:
    data = frag_needed(1400)
    report = pmtu.frag_needed(data, ip.parse_ipv4(data))
    assert report is not None
    assert (report.spi, ip.ip_to_str(report.dst), report.mtu) == (OUT_SPI, B, 1400)
    for other in (frag_needed(1400, code=3),  # port unreachable: not a path MTU report
                  bytes(IP(src=ROUTER, dst=A) / ICMP(type=3, code=4, nexthopmtu=1400)
                        / bytes(IP(src=A, dst=B) / UDP())[:28]),  # about UDP, not ESP
                  frag_needed(1400)[:48]):  # the quote ends before the SPI
        if len(other) == 48:
            other = other[:2] + (48).to_bytes(2, "big") + other[4:]
        assert pmtu.frag_needed(other, ip.parse_ipv4(other)) is None


@pytest.mark.parametrize(("reported", "quoted_len", "learned"), [
    (1400, 1500, 1400),
    (300, 1500, pmtu.MIN_PMTU),  # a report below 576: never less than 576
    (0, 1500, 1492),  # a router older than RFC 1191: the plateau below 1500
    (0, 1492, 1006),
    (1600, 1500, 1492),  # bigger than the packet that did not fit: a plateau instead
])
def test_reported_mtu_is_checked(reported: int, quoted_len: int, learned: int) -> None:
    data = frag_needed(reported, quoted_len=quoted_len)
    report = pmtu.frag_needed(data, ip.parse_ipv4(data))
    assert report is not None and report.mtu == learned


def test_a_report_about_our_esp_sets_the_path_mtu_and_passes() -> None:
    proc = host()
    res = proc.inbound(frag_needed(1200), 5.0)
    assert res.verdict is Verdict.ACCEPT and res.packet is None
    sa = out_sa(proc)
    assert (sa.pmtu, sa.pmtu_at, proc.pmtu_updates) == (1200, 5.0, 1)
    proc.inbound(frag_needed(1400), 6.0)  # a bigger report does not raise it
    assert sa.pmtu == 1200
    proc.inbound(frag_needed(1000), 7.0)  # a smaller one lowers it
    assert (sa.pmtu, proc.pmtu_updates) == (1000, 3)
    assert proc.drops == {}


def test_reports_about_esp_not_ours_are_dropped() -> None:
    proc = host()
    res = proc.inbound(frag_needed(1200, spi=0xDEAD), 0.0)
    assert (res.verdict, res.reason) == (Verdict.DROP, DropReason.UNKNOWN_SPI)
    res = proc.inbound(frag_needed(1200, dst="10.7.7.7"), 0.0)  # our SPI, another destination
    assert (res.verdict, res.reason) == (Verdict.DROP, DropReason.POLICY_MISMATCH)
    assert out_sa(proc).pmtu == 0


# -- applying it -----------------------------------------------------------------------------

def test_a_local_df_packet_to_the_peer_leaves_with_df_cleared() -> None:
    """Transport mode on a host: the packet's route is the ESP packet's route, so telling the
    local kernel a smaller MTU would strand the ESP packet; it leaves without DF instead."""
    proc = host()
    first = proc.outbound(udp(1400), 0.0)  # nothing learned yet: DF kept (the sender's own)
    assert first.packet is not None and IP(first.packet).flags == "DF"
    proc.inbound(frag_needed(1200), 1.0)
    big = udp(1300)
    res = proc.outbound(big, 2.0)
    assert res.verdict is Verdict.ACCEPT and res.reply is None and res.packet is not None
    esp = IP(res.packet)  # read by scapy: a well-formed header, DF cleared, ESP of our SA
    assert (esp.flags, esp.proto, esp[ESP].spi, esp.len) == (0, 50, OUT_SPI, len(res.packet))
    checked = esp.chksum
    del esp.chksum
    assert IP(bytes(esp)).chksum == checked
    assert len(res.packet) > 1200 and proc.df_cleared == 1
    small = proc.outbound(udp(1100), 2.0)  # fits: DF as the sender set it
    assert small.packet is not None and IP(small.packet).flags == "DF"
    assert proc.drops == {}


def test_a_local_df_packet_for_another_destination_gets_frag_needed_back() -> None:
    """Tunnel mode from a gateway's own address to the peer's LAN: the inner destination's
    route is not the ESP packet's, so the local sender is told the MTU that fits."""
    proc = gateway()
    sa = out_sa(proc)
    report = bytes(IP(src=ROUTER, dst=GW_A) / ICMP(type=3, code=4, nexthopmtu=1200)
                   / bytes(IP(src=GW_A, dst=GW_B, proto=50, len=1500) / ESP(spi=OUT_SPI))[:28])
    assert proc.inbound(report, 0.0).verdict is Verdict.ACCEPT and sa.pmtu == 1200
    big = udp(1300, src=LAN_A, dst=LAN_B)
    res = proc.outbound(big, 1.0)
    assert (res.verdict, res.reason) == (Verdict.DROP, DropReason.PATH_MTU)
    assert res.reply is not None
    icmp = IP(res.reply)  # read by scapy
    told = icmp[ICMP].nexthopmtu
    assert (icmp.dst, icmp[ICMP].type, icmp[ICMP].code) == (LAN_A, 3, 4)
    assert icmp.src == "0.0.0.0"  # the sending kernel fills in its own address
    assert bytes(icmp[ICMP].payload)[:28] == big[:28]  # header and 8 bytes, as RFC 792 says
    sent = icmp[ICMP].chksum
    del icmp[ICMP].chksum
    assert IP(bytes(icmp))[ICMP].chksum == sent  # scapy computes the same checksum
    # what the sender was told fits, and one byte more does not
    fits = proc.outbound(udp(told, src=LAN_A, dst=LAN_B), 2.0)
    assert fits.verdict is Verdict.ACCEPT and fits.packet is not None and len(fits.packet) <= 1200
    assert proc.outbound(udp(told + 1, src=LAN_A, dst=LAN_B), 2.0).reason is DropReason.PATH_MTU
    # without DF the kernel fragments the ESP packet: it passes
    assert proc.outbound(udp(1300, df=False, src=LAN_A, dst=LAN_B), 2.0).verdict is Verdict.ACCEPT
    assert sa.drops[DropReason.PATH_MTU] == 2


def test_a_learned_mtu_ages_out() -> None:
    proc = host()
    proc.inbound(frag_needed(1200), 0.0)
    assert proc.outbound(udp(1300), pmtu.PMTU_AGE).verdict is Verdict.ACCEPT
    assert proc.df_cleared == 1
    assert proc.outbound(udp(1300), pmtu.PMTU_AGE + 1).verdict is Verdict.ACCEPT
    assert (out_sa(proc).pmtu, proc.df_cleared) == (0, 1)  # aged: DF kept again


def test_forwarded_df_packets_are_held_to_the_interface_mtu() -> None:
    proc = gateway(mtu=1500)
    sa = out_sa(proc)
    big = udp(1500, src=LAN_A, dst=LAN_B)
    res = proc.outbound(big, 0.0, forwarded=True)
    assert (res.verdict, res.reason) == (Verdict.DROP, DropReason.PATH_MTU)
    assert res.reply is not None
    told = IP(res.reply)[ICMP].nexthopmtu
    assert IP(res.reply).dst == LAN_A
    assert told == pmtu.inner_mtu(sa, 1500, 20) and 1400 < told < 1500 - 20
    fits = proc.outbound(udp(told, src=LAN_A, dst=LAN_B), 0.0, forwarded=True)
    assert fits.packet is not None and len(fits.packet) <= 1500
    # locally generated too: the local kernel knows only the route's MTU, which the ESP
    # packet overruns (it would die there with DF, its sender never told); the sender is told
    local = proc.outbound(big, 0.0)
    assert (local.verdict, local.reason) == (Verdict.DROP, DropReason.PATH_MTU)
    assert local.reply is not None and IP(local.reply)[ICMP].nexthopmtu == told


def test_a_local_df_packet_too_big_for_the_interface_after_esp_is_never_lost() -> None:
    """Transport mode, nothing learned from the path: a local DF packet that fits the
    interface but not after ESP (a UDP socket with IP_PMTUDISC_DO, TCP to a peer that didn't
    clamp) leaves with DF cleared, for the kernel to fragment, instead of being dropped
    silently by the kernel for exceeding the interface's MTU."""
    proc = host(mtu=1500)
    res = proc.outbound(udp(1500), 0.0)
    assert res.verdict is Verdict.ACCEPT and res.reply is None and res.packet is not None
    assert len(res.packet) > 1500 and IP(res.packet).flags == 0 and proc.df_cleared == 1
    fits = proc.outbound(udp(1400), 0.0)
    assert fits.packet is not None and IP(fits.packet).flags == "DF" and proc.df_cleared == 1


def test_tunnel_df_clear_lets_the_kernel_fragment() -> None:
    proc = gateway(df=DfPolicy.CLEAR)
    assert proc.outbound(udp(1500, src=LAN_A, dst=LAN_B), 0.0, forwarded=True).verdict is Verdict.ACCEPT


def test_replies_are_rate_limited() -> None:
    proc = gateway()
    big = udp(1500, src=LAN_A, dst=LAN_B)
    replies = [proc.outbound(big, 0.5, forwarded=True).reply for _ in range(150)]
    assert sum(r is not None for r in replies) == 100
    assert proc.drops[DropReason.PATH_MTU] == 150  # every packet dropped, replies or not
    assert proc.outbound(big, 1.6, forwarded=True).reply is not None  # the next second


def test_fragment_own_makes_fragments_that_scapy_puts_back_together() -> None:
    """A mixed tunnel's own ESP packet in fragments of at most the MTU: IPv4 (its identification
    and DF on each, offsets in 8-byte units, checksums right) and IPv6 (a fragment header with
    our identification, next header ESP); scapy's reassembly gives the packet back. One that
    fits stays whole; an MTU that holds no fragment is refused."""
    from scapy.layers.inet import defragment
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, defragment6

    v4 = bytes(IP(src="192.0.2.1", dst="198.51.100.2", id=0x1234, flags="DF", proto=50)
               / ESP(spi=0x1000, seq=1, data=bytes(range(256)) * 7))
    pieces = pmtu.fragment_own(v4, 1000, 9)
    assert len(pieces) == 2 and all(len(f) <= 1000 for f in pieces)
    frags = [IP(f) for f in pieces]
    for f in frags:
        assert f.id == 0x1234 and f.flags.DF and IP(bytes(f)).chksum == f.chksum
    assert [f.frag for f in frags] == [0, 122] and frags[0].flags.MF and not frags[1].flags.MF
    assert bytes(defragment(frags)[0]) == v4  # type: ignore[no-untyped-call]
    v6 = bytes(IPv6(src="2001:db8:ff::1", dst="2001:db8:ff::2", nh=50, hlim=64)
               / ESP(spi=0x1000, seq=1, data=bytes(range(256)) * 7))
    pieces = pmtu.fragment_own(v6, 1280, 0xABCDEF01)
    assert len(pieces) == 2 and all(len(f) <= 1280 for f in pieces)
    frags6 = [IPv6(f) for f in pieces]
    for f6 in frags6:
        fh = f6[IPv6ExtHdrFragment]
        assert f6.nh == 44 and fh.nh == 50 and fh.id == 0xABCDEF01
    assert [f[IPv6ExtHdrFragment].m for f in frags6] == [1, 0]
    assert bytes(defragment6(frags6)) == v6  # type: ignore[no-untyped-call]
    assert pmtu.fragment_own(v4, len(v4), 1) == [v4]
    with pytest.raises(EspError) as err:
        pmtu.fragment_own(v6, 48, 1)
    assert err.value.reason is DropReason.TOO_BIG

"""ICMP errors about protected flows (RFC 4301 section 6.2), in the core: an error goes where the
flow it quotes goes, and an error received under an SA must be about that SA's flows.

The packets are built by scapy (an independent encoder), the ESP the core makes of an error is
opened by scapy's ESP too.
"""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest
import sas
from scapy.layers.inet import ICMP, IP, UDP, IPerror, UDPerror
from scapy.layers.ipsec import ESP, SecurityAssociation

from nfq_ipsec.core import Processor, Verdict
from nfq_ipsec.core import packet as ip
from nfq_ipsec.core.errors import DropReason
from nfq_ipsec.core.sa import SADirection
from nfq_ipsec.core.spd import SPD, Action, Policy, Selector

A, B = "10.0.0.1", "10.0.0.2"
KEY_AB = bytes(range(20))
KEY_BA = bytes(range(20, 40))
PORT = 5000


def _processor(me: str, peer: str, out_key: bytes, in_key: bytes, out_spi: int, in_spi: int,
               remote_ports: tuple[int, int] | None = None,
               local_ports: tuple[int, int] | None = None) -> Processor:
    """One protect policy for UDP between ``me`` and ``peer`` (an address or a network)."""
    sel = Selector(local=IPv4Network(f"{me}/32"), remote=IPv4Network(peer), protocol=17,
                   remote_ports=remote_ports, local_ports=local_ports)
    pol = Policy("udp", sel, Action.PROTECT, sa_names=("out", "in"))
    both = [sas.params("out", out_spi, SADirection.OUT, key=out_key),
            sas.params("in", in_spi, SADirection.IN, key=in_key)]
    return Processor(SPD([pol]), both, 0.0)


def sender() -> Processor:  # A sends UDP to B:PORT
    return _processor(A, B, KEY_AB, KEY_BA, 0x1000, 0x2000, remote_ports=(PORT, PORT))


def receiver() -> Processor:  # B, whose kernel answers with ICMP errors
    return _processor(B, A, KEY_BA, KEY_AB, 0x2000, 0x1000, local_ports=(PORT, PORT))


def unreachable(dport: int = PORT, src: str = A) -> bytes:
    """B's kernel: port unreachable about a datagram from ``src`` to B:dport."""
    quoted = IP(src=src, dst=B, id=7) / UDP(sport=40000, dport=dport) / b"CANARY-payload"
    return bytes(IP(src=B, dst=A) / ICMP(type=3, code=3) / bytes(quoted))


def test_quoted_key_reads_the_quoted_packet() -> None:
    data = unreachable()
    key = ip.quoted_key(data, ip.parse_ipv4(data))
    assert key is not None
    assert (ip.ip_to_str(key.src), ip.ip_to_str(key.dst), key.protocol, key.sport, key.dport) == (
        A, B, 17, 40000, PORT)
    echo = bytes(IP(src=B, dst=A) / ICMP(type=8) / (b"x" * 40))
    assert ip.quoted_key(echo, ip.parse_ipv4(echo)) is None  # not an error
    short = bytes(IP(src=B, dst=A) / ICMP(type=11) / bytes(IP(src=A, dst=B))[:12])
    assert ip.quoted_key(short, ip.parse_ipv4(short)) is None  # the quote is cut short
    time_exceeded = bytes(IP(src=B, dst=A) / ICMP(type=11) / IPerror(src=A, dst=B) / ICMP(type=8, code=0))
    tk = ip.quoted_key(time_exceeded, ip.parse_ipv4(time_exceeded))
    assert tk is not None and (tk.protocol, tk.sport, tk.dport) == (1, 8, 0)


@pytest.mark.parametrize("truncate", range(1, len(unreachable()) - 20))
def test_quoted_key_on_every_truncation(truncate: int) -> None:
    """Every prefix of an error, with its length fields claiming only that much: None or a key,
    never an exception; a key only once the quote holds a whole IPv4 header, ports only once
    it holds them."""
    data = bytearray(unreachable()[:-truncate])
    data[2:4] = len(data).to_bytes(2, "big")
    key = ip.quoted_key(bytes(data), ip.parse_ipv4(bytes(data)))
    quoted = len(data) - 20 - 8  # bytes of the quoted packet left
    if quoted < 20:
        assert key is None
    else:
        assert key is not None and (ip.ip_to_str(key.src), key.protocol) == (A, 17)
        assert (key.dport == PORT) == (quoted >= 24)


def test_error_about_a_protected_flow_goes_through_its_sa() -> None:
    b = receiver()
    res = b.outbound(unreachable(), 1.0)
    assert res.verdict is Verdict.ACCEPT and res.sa is not None and res.sa.name == "out"
    assert res.packet is not None and res.packet[9] == 50
    assert b"CANARY" not in res.packet
    # scapy opens it: the ICMP error, quote and all, under B's outbound SA
    sa = SecurityAssociation(ESP, spi=0x2000, crypt_algo="AES-GCM", crypt_key=KEY_BA)
    inner = sa.decrypt(IP(res.packet))
    assert inner[ICMP].type == 3 and inner[IPerror].src == A and inner[UDPerror].dport == PORT
    # the sender takes it: the quoted datagram is one of its own flow's
    a = sender()
    got = a.inbound(res.packet, 1.0)
    assert got.verdict is Verdict.ACCEPT, got
    assert got.packet == unreachable()


def test_error_about_another_flow_is_not_sent_and_not_taken() -> None:
    b = receiver()
    res = b.outbound(unreachable(dport=PORT + 1), 1.0)  # no policy for that datagram
    assert res.verdict is Verdict.DROP and res.reason is DropReason.NO_POLICY
    # a peer that puts an error about someone else's flow under the SA: policy mismatch
    forged = _processor(B, "0.0.0.0/0", KEY_BA, KEY_AB, 0x2000, 0x1000)  # its policy: any UDP
    esp = forged.outbound(unreachable(src="10.9.9.9"), 1.0)
    assert esp.verdict is Verdict.ACCEPT and esp.packet is not None
    got = sender().inbound(esp.packet, 1.0)
    assert got.verdict is Verdict.DROP and got.reason is DropReason.POLICY_MISMATCH


def test_error_in_clear_about_a_protected_flow_is_dropped() -> None:
    a = sender()
    res = a.inbound(unreachable(), 1.0)
    assert res.verdict is Verdict.DROP and res.reason is DropReason.CLEARTEXT_PROTECTED

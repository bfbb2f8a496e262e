"""The core's TCP segmentation against the kernel's own, byte for byte (root).

Host a sends one TCP flow to host b over a veth pair whose sending end does no TSO, GSO or
checksum offload, so the kernel cuts each TCP superpacket in software as it leaves (and
completes every segment's checksum); b's end does no GRO, so what b captures is the kernel's
segments as made. A queue bound with the GSO flag (``NfQueue(gso=True)``) at a's OUTPUT
records every superpacket whole and accepts it unchanged. Then ``core.gso`` cuts each
recorded superpacket at the kernel's segment size (the first segment's payload) and the
result must equal the captured segments exactly: IP headers and their checksums, IPv4
identifications, TCP sequence numbers, flags on the first and last segment (PSH, FIN), TCP
checksums. IPv4 and IPv6.

Then the daemon itself with ``daemon.gso = true`` on a 9000-byte link (``node.mtu = 9000``,
the MSS clamp on, as by default): one TCP flow from a to b arrives whole, a's workers cut its
superpackets (status counts them), the wire carries only ESP and jumbo ESP packets no bigger
than the MTU, and the sender's MSS is the clamp's (less its timestamp option), not the
8,960 bytes b announced.

Needs root; runs in CI (marks ``lab`` and ``root``).
"""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest
from labutil import (
    ADDR6_A,
    ADDR6_B,
    ADDR_B,
    Pair,
    Sniffer,
    end,
    make_keys,
    make_pair,
    ready,
    result,
    write_config,
)

from nfq_ipsec import rules
from nfq_ipsec.config import load_config
from nfq_ipsec.core import gso, ipv6
from nfq_ipsec.core import packet as ip
from nfq_ipsec_lab.lab.daemon import Daemon

QUEUE = 231
PORT = 7231
TOTAL = 600_000  # bytes the flow carries: a few dozen superpackets
ETHTOOL_STXCSUM = 0x17  # linux/ethtool.h, legacy ioctls (no ethtool binary needed)
ETHTOOL_SSG = 0x19
ETHTOOL_STSO = 0x1F
ETHTOOL_SGSO = 0x24
ETHTOOL_SGRO = 0x2C

# An offload of one interface on or off, in its namespace.
SET_FEATURE = textwrap.dedent("""
    import sys
    from nfq_ipsec_lab.bench.udpgso import set_feature
    set_feature(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1")
""")

# The queue side at a: every packet of the flow recorded (payload and NFQA_SKB_INFO) and
# accepted unchanged, until stdin closes.
RECORDER = textwrap.dedent("""
    import json, select, sys
    from nfq_ipsec.nfqueue import NetlinkQueue
    q = NetlinkQueue(gso=True)
    q.bind(int(sys.argv[1]))
    print("READY", flush=True)
    seen = []
    while True:
        r, _, _ = select.select([q, sys.stdin], [], [], 0.2)
        if q in r:
            for p in q.receive(64):
                seen.append([p.payload.hex(), p.skb_info, p.length])
                q.verdict(p.packet_id, True)
            q.flush()
        if sys.stdin in r:
            break
    print(json.dumps(seen), flush=True)
""")

# b: accept one connection, read it to the end, print how many bytes came.
SERVER = textwrap.dedent("""
    import socket, sys
    family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2])))
    s.listen(1)
    print("READY", flush=True)
    c, _ = s.accept()
    n = 0
    while True:
        data = c.recv(1 << 20)
        if not data:
            break
        n += len(data)
    print(n, flush=True)
""")

# a: send the flow in big writes, then close (the FIN may ride on the last superpacket).
CLIENT = textwrap.dedent("""
    import socket, sys
    family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
    total = int(sys.argv[3])
    block = bytes((i * 13 + 5) & 0xFF for i in range(1 << 16))
    sent = 0
    while sent < total:
        sent += c.send(block[: min(len(block), total - sent)])
    mss = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
    c.shutdown(socket.SHUT_WR)
    c.recv(1)
    c.close()
    print(mss if len(sys.argv) > 4 else sent, flush=True)
""")


def _tcp_packets(packets: list[bytes], v6: bool) -> list[bytes]:
    """The flow's data-carrying TCP packets (a to b, port PORT), in order."""
    out = []
    for p in packets:
        if v6:
            if p[0] >> 4 != 6 or p[6] != ip.PROTO_TCP:
                continue
            l4 = 40
            length = 40 + ((p[4] << 8) | p[5])
        else:
            if p[0] >> 4 != 4 or p[9] != ip.PROTO_TCP:
                continue
            l4 = (p[0] & 15) * 4
            length = (p[2] << 8) | p[3]
        if (p[l4 + 2] << 8) | p[l4 + 3] != PORT:
            continue
        if length - l4 - (p[l4 + 12] >> 4) * 4 > 0 or p[l4 + 13] & 0x01:  # data or FIN
            out.append(p[:length])
    return out


def _run_flow(pair: Pair, tmp: Path, v6: bool) -> tuple[list[tuple[bytes, int]], list[bytes]]:
    """The superpackets a's GSO queue saw (with their NFQA_SKB_INFO) and b's capture."""
    for flag in (ETHTOOL_SGSO, ETHTOOL_STSO, ETHTOOL_SSG, ETHTOOL_STXCSUM):
        pair.run(pair.a, sys.executable, "-c", SET_FEATURE, pair.va, str(flag), "0")
    pair.run(pair.b, sys.executable, "-c", SET_FEATURE, pair.vb, str(ETHTOOL_SGRO), "0")
    dst = ADDR6_B if v6 else ADDR_B
    tables = "ip6tables" if v6 else "iptables"
    rule = ["-t", "mangle", "-A", "OUTPUT", "-p", "tcp", "-d", dst, "--dport", str(PORT),
            "-j", "NFQUEUE", "--queue-num", str(QUEUE)]
    pair.run(pair.a, tables, *rule)
    recorder = server = sniffer = None
    try:
        recorder = pair.python(pair.a, RECORDER, str(QUEUE), stdin=True)
        ready(recorder)
        server = pair.python(pair.b, SERVER, dst, str(PORT))
        ready(server)
        sniffer = Sniffer(pair, pair.b, pair.vb, tmp / f"b{'6' if v6 else '4'}.pcap")
        client = pair.python(pair.a, CLIENT, dst, str(PORT), str(TOTAL))
        assert result(client) == TOTAL
        assert result(server) == TOTAL
        time.sleep(0.3)
        assert sniffer.stop() == 0, "the capture lost frames"
        captured = _tcp_packets(sniffer.packets(), v6)
        seen = result(recorder, stdin="")
        queued = [(bytes.fromhex(h), info) for h, info, _length in seen]
    finally:
        end(recorder, server, sniffer.proc if sniffer is not None else None)
        pair.run(pair.a, tables, *["-D" if a == "-A" else a for a in rule], check=False)
    return queued, captured


def _payload_start(p: bytes, v6: bool) -> int:
    l4 = 40 if v6 else (p[0] & 15) * 4
    return l4 + (p[l4 + 12] >> 4) * 4


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_core_segments_equal_the_kernels(tmp_path: Path, v6: bool) -> None:
    with make_pair("g") as pair:
        if v6:
            for ns, iface, addr in ((pair.a, pair.va, ADDR6_A), (pair.b, pair.vb, ADDR6_B)):
                pair.run(ns, "ip", "-6", "addr", "add", f"{addr}/64", "dev", iface, "nodad")
        queued, captured = _run_flow(pair, tmp_path, v6)
    supers = [(p, info) for p, info in queued if info & 0x2]  # NFQA_SKB_GSO
    assert len(supers) >= 3, f"{len(supers)} superpackets of {len(queued)} queued packets"
    assert all(info & 0x1 for _, info in supers), "a superpacket's checksum was ready"
    # The kernel's segments, in the order of the superpackets they came from: each
    # superpacket's first sequence number finds its run in the capture.
    def seq(p: bytes) -> int:
        at = 40 if v6 else (p[0] & 15) * 4
        return int.from_bytes(p[at + 4:at + 8], "big")

    by_seq = {seq(p): i for i, p in enumerate(captured)}
    psh_last = fin_last = 0
    compared = 0
    for sp, _info in supers:
        start = by_seq.get(seq(sp))
        assert start is not None, f"superpacket at seq {seq(sp)} not in the capture"
        first = captured[start]
        size = len(first) - _payload_start(first, v6)
        ours = (gso.segment6(sp, ipv6.parse_ipv6(sp), size) if v6
                else gso.segment4(sp, ip.parse_ipv4(sp), size))
        kernels = captured[start:start + len(ours)]
        assert len(kernels) == len(ours)
        for k, (mine, theirs) in enumerate(zip(ours, kernels, strict=True)):
            assert mine == theirs, (
                f"superpacket at seq {seq(sp)}, segment {k} of {len(ours)}:\n"
                f" ours   {mine[:_payload_start(mine, v6)].hex()}\n"
                f" kernel {theirs[:_payload_start(theirs, v6)].hex()}")
        flags = sp[(40 if v6 else (sp[0] & 15) * 4) + 13]
        psh_last += bool(flags & 0x08)
        fin_last += bool(flags & 0x01)
        compared += len(ours)
    assert compared >= 3 * 2
    assert psh_last, "no superpacket with PSH: the last-segment rule went unchecked"
    print(f"\n{'IPv6' if v6 else 'IPv4'}: {len(supers)} superpackets, {compared} segments "
          f"equal the kernel's; {psh_last} with PSH, {fin_last} with FIN")


def _gso_config(path: Path) -> Path:
    """A ``write_config`` host configuration with ``node.mtu = 9000`` and ``daemon.gso``."""
    text = path.read_text()
    assert "mtu = 1500\n" in text
    text = text.replace("mtu = 1500\n", "mtu = 9000\n", 1)
    text = text.replace('log_level = "info"\n', 'log_level = "info"\ngso = true\n', 1)
    path.write_text(text)
    return path


def _gso_daemons(pair: Pair, tmp_path: Path, keys: dict[str, str], started: list[Daemon]) -> list[Daemon]:
    """Both hosts' daemons with ``_gso_config``, started (each in ``started`` first) and running."""
    daemons = []
    for name, a_side, ns, iface in (("a", True, pair.a, pair.va), ("b", False, pair.b, pair.vb)):
        cfg = _gso_config(write_config(tmp_path / name, a_side, iface, keys, per_port=False))
        d = Daemon(name, pair.host(ns), cfg, log=tmp_path / name / "daemon.log", lab=pair.lab)
        started.append(d)
        daemons.append(d)
    for d in daemons:
        d.start()
    for d in daemons:
        d.wait_running()
    return daemons


def test_the_daemon_cuts_superpackets_on_a_jumbo_link_within_the_mss_clamp(tmp_path: Path) -> None:
    keys = make_keys()
    started: list[Daemon] = []
    with make_pair("j") as pair:
        try:
            daemons = _gso_daemons(pair, tmp_path, keys, started)
            server = pair.python(pair.b, SERVER, ADDR_B, str(PORT))
            ready(server)
            sniffer = Sniffer(pair, pair.b, pair.vb, tmp_path / "jumbo.pcap")
            client = pair.python(pair.a, CLIENT, ADDR_B, str(PORT), str(TOTAL * 10), "mss")
            mss = result(client)
            assert result(server) == TOTAL * 10
            status = daemons[0].status()
            assert sniffer.stop() == 0
            wire = sniffer.packets()
        finally:
            for d in started:
                d.stop()
    conf = load_config(tmp_path / "a" / "nfq.toml")
    clamp = rules.mss_for(conf, conf.policies[0])
    assert clamp < 9000 - 40 and clamp - 12 <= mss <= clamp, (mss, clamp)  # timestamps: 12
    workers = status["workers"]
    assert sum(w["superpackets"] or 0 for w in workers) > 0, workers
    assert not any((w["drops"] or {}).get(r) for w in workers
                   for r in ("gso_unsupported", "checksum_partial", "gso_send")), workers
    ours = [p for p in wire if p[0] >> 4 == 4]
    assert ours and all(p[9] == 50 for p in ours), "something left in clear"
    sizes = [(p[2] << 8) | p[3] for p in ours]
    assert max(sizes) <= 9000 and max(sizes) > 8000, max(sizes)
    print(f"\njumbo: MSS {mss} (clamp {clamp}), {sum(w['superpackets'] for w in workers)} "
          f"superpackets as {sum(w['segments'] for w in workers)} ESP packets, {len(ours)} "
          f"ESP packets on the wire, the largest {max(sizes)} bytes")


# a: send canary-filled blocks as fast as TCP takes them for SECONDS (a send that waits over a
# second is given up and tried again), then close without waiting; prints the bytes sent.
TIMED_CLIENT = textwrap.dedent("""
    import socket, sys, time
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
    c.settimeout(1.0)
    seconds, marker = float(sys.argv[3]), sys.argv[4].encode()
    block = (marker * (65536 // len(marker) + 1))[:65536]
    sent, end = 0, time.monotonic() + seconds
    print("READY", flush=True)
    while time.monotonic() < end:
        try:
            sent += c.send(block)
        except TimeoutError:
            pass
        except OSError:  # the server gave up on a stalled flow
            break
    c.close()
    print(sent, flush=True)
""")

# b: accept one connection and read it until EOF or 10 s without data; prints the bytes read.
IDLE_SERVER = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2])))
    s.listen(1)
    print("READY", flush=True)
    c, _ = s.accept()
    c.settimeout(10.0)
    n = 0
    try:
        while data := c.recv(1 << 20):
            n += len(data)
    except (TimeoutError, ConnectionResetError):
        pass
    print(n, flush=True)
""")


def test_leak_gso_daemon_restarted_and_workers_killed_mid_flow(tmp_path: Path) -> None:
    """The leak matrix's GSO row: with ``daemon.gso`` a TCP flow of canary-filled blocks runs
    while a's daemon is restarted (SIGTERM, ``run``: the flow goes on through the new workers,
    which cut its superpackets) and then each of a's workers is killed (SIGKILL). No frame on
    the wire carries the canary in clear.

    After a worker's crash its inbound SA refuses the peer's packets up to the floor its state
    file saved (*SA state across restarts*): here B's ACKs, so the flow may stall from then on;
    this row checks only that nothing leaves in clear meanwhile."""
    canary = f"GSOCANARY{time.monotonic_ns()}x"
    keys = make_keys()
    started: list[Daemon] = []
    with make_pair("k") as pair:
        try:
            daemons = _gso_daemons(pair, tmp_path, keys, started)
            a = daemons[0]
            server = pair.python(pair.b, IDLE_SERVER, ADDR_B, str(PORT))
            ready(server)
            sniffer = Sniffer(pair, pair.b, pair.vb, tmp_path / "gso-leak.pcap")
            client = pair.python(pair.a, TIMED_CLIENT, ADDR_B, str(PORT), "7", canary)
            try:
                ready(client)
                time.sleep(1.0)
                assert a.stop() == 0
                a.start()
                a.wait_running()
                restarted = a.wait_for(lambda st: sum(w["superpackets"] or 0 for w in st["workers"]) > 0,
                                       timeout=10, what="the new workers cutting the flow's superpackets")
                for w in restarted["workers"]:
                    a.host.run(["kill", "-KILL", str(w["pid"])])
                a.wait_for(lambda st: all(w["state"] == "ready" and w["restarts"] >= 1
                                          for w in st["workers"]), what="the workers back")
                sent = result(client, timeout=60)
                got = result(server, timeout=60)
            finally:
                end(client, server)
                assert sniffer.stop() == 0
        finally:
            for d in started:
                d.stop()
    frames = sniffer.frames()
    leaked = [f for f in frames if canary.encode() in f]
    assert not leaked, f"{len(leaked)} frames carry the canary in clear"
    assert sent >= got > 1_000_000, (sent, got)
    esp = sum(1 for f in frames if len(f) > 34 and f[12:14] == b"\x08\x00" and f[23] == 50)
    print(f"\nleak matrix (GSO): daemon restarted, then workers killed under a TCP flow: 0 canary "
          f"frames in clear of {len(frames)} ({esp} ESP), {got} of {sent} bytes received")

"""The per-packet shortcuts give exactly the answers of the plain code they stand in for:
header rebuilding from fields, the flow cache in front of the SPD, the lifetime watch, the
netlink verdict encoding, and the profiler's command line.
"""

from __future__ import annotations

import json
import struct
from ipaddress import IPv4Network
from pathlib import Path

import pytest
import sas
from hypothesis import given, settings
from hypothesis import strategies as st

from nfq_ipsec.core import Processor, Verdict
from nfq_ipsec.core import packet as ip
from nfq_ipsec.core import processor as processor_mod
from nfq_ipsec.core.errors import DropReason, EspError
from nfq_ipsec.core.sa import Lifetime, SADirection, SAEvent, SecurityAssociation
from nfq_ipsec.core.spd import SPD, Action, Direction, Policy, Selector
from nfq_ipsec.nfqueue import QueuedPacket
from nfq_ipsec.worker import PacketHandler
from nfq_ipsec_lab.bench import profile

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)


def _header(tos: int, total: int, ident: int, ff: int, ttl: int, proto: int, src: int, dst: int,
            options: bytes = b"") -> bytes:
    ihl = (20 + len(options)) // 4
    raw = struct.pack("!BBHHHBBHII", 0x40 | ihl, tos, total, ident, ff, ttl, proto, 0, src, dst) + options
    return ip.rewrite_header(raw, proto, total)


@given(u8, st.integers(40, 0xFFFF), u16, u16, u8, u8, u32, u32, u8, st.integers(0, 0xFFFF),
       st.sampled_from([b"", b"\x01\x01\x01\x00", bytes(range(8))]))
def test_replace_header_equals_rewrite_header(
    tos: int, total: int, ident: int, ff: int, ttl: int, proto: int, src: int, dst: int,
    new_proto: int, new_total: int, options: bytes,
) -> None:
    raw = _header(tos, total, ident, ff, ttl, proto, src, dst, options)
    data = raw + bytes(max(0, total - len(raw)))
    hdr = ip.parse_ipv4(data)
    got = ip.replace_header(data, hdr, new_proto, new_total)
    assert got == ip.rewrite_header(data[: hdr.ihl], new_proto, new_total)
    assert ip.checksum(got) == 0  # a valid header sums to zero


@given(u8, u16, u16, st.booleans(), u8, u8, u32, u32)
def test_build_header_checksum_is_valid(
    tos: int, total: int, ident: int, df: bool, ttl: int, proto: int, src: int, dst: int
) -> None:
    hdr = ip.build_header(tos=tos, total_length=total, ident=ident, df=df, ttl=ttl, protocol=proto,
                          src=src, dst=dst)
    assert len(hdr) == 20 and ip.checksum(hdr) == 0
    assert struct.unpack("!BBHHHBB", hdr[:10]) == (0x45, tos, total, ident, 0x4000 if df else 0, ttl, proto)


# -- flow cache ----------------------------------------------------------------------------
def _udp(src: int, dst: int, sport: int, dport: int) -> bytes:
    return _header(0, 28, 1, 0, 64, ip.PROTO_UDP, src, dst) + struct.pack("!HHHH", sport, dport, 8, 0)


def _spd() -> SPD:
    return SPD([
        Policy("bypass-dns", Selector(protocol=ip.PROTO_UDP, remote_ports=(53, 53)), Action.BYPASS),
        Policy("drop-net", Selector(remote=IPv4Network("10.9.0.0/16")), Action.DISCARD, Direction.OUT),
        Policy("bypass-rest", Selector(), Action.BYPASS, Direction.OUT),
    ])


@settings(max_examples=60)
@given(st.lists(st.tuples(st.sampled_from([0x0A090001, 0x0A090102, 0x0A000001, 0xC0A80001]),
                          st.sampled_from([53, 54, 4500])), min_size=1, max_size=40))
def test_flow_cache_answers_like_the_spd(flows: list[tuple[int, int]]) -> None:
    spd = _spd()
    proc = Processor(spd, [], 0.0)
    for dst, dport in flows * 2:  # every flow twice: the second answer comes from the cache
        data = _udp(0x0A000063, dst, 1000, dport)
        res = proc.outbound(data, 0.0)
        policy = spd.lookup(ip.packet_key(data, ip.parse_ipv4(data)), True)
        assert policy is not None
        want = Verdict.DROP if policy.action is Action.DISCARD else Verdict.ACCEPT
        assert res.verdict is want
        if want is Verdict.DROP:
            assert res.reason is DropReason.POLICY_DISCARD


def test_flow_cache_is_bounded() -> None:
    assert Processor(_spd(), [], 0.0).flow_cache_size == processor_mod.FLOW_CACHE_SIZE
    proc = Processor(_spd(), [], 0.0, flow_cache_size=16)
    for port in range(1000, 1100):
        assert proc.outbound(_udp(0x0A000063, 0x0A090001, port, 80), 0.0).verdict is Verdict.DROP
        assert len(proc._out_cache) <= 16
    # after the cache was emptied, answers are still right
    assert proc.outbound(_udp(0x0A000063, 0x0A000001, 1000, 80), 0.0).verdict is Verdict.ACCEPT
    assert proc.drops[DropReason.POLICY_DISCARD] == 100


# -- lifetime watch ------------------------------------------------------------------------
def _reference_check(sa: SecurityAssociation, now: float) -> None:
    """The lifetime rule without the watch shortcut: every limit looked at on every call."""
    sa._check_limits(now)


limit = st.one_of(st.none(), st.integers(1, 12))


@given(limit, limit, limit, limit, st.one_of(st.none(), st.floats(1, 12)),
       st.one_of(st.none(), st.floats(1, 12)),
       st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3), st.floats(0, 2)), max_size=25))
def test_lifetime_watch_matches_the_full_check(
    sp: int | None, hp: int | None, sb: int | None, hb: int | None, ss: float | None,
    hs: float | None, steps: list[tuple[int, int, float]],
) -> None:
    lt = Lifetime(soft_packets=sp, hard_packets=hp, soft_bytes=sb, hard_bytes=hb, soft_seconds=ss,
                  hard_seconds=hs)
    params = sas.params("x", 0x100, SADirection.OUT, key=bytes(20), lifetime=lt)
    fast = SecurityAssociation(params, 0.0)
    slow = SecurityAssociation(params, 0.0)
    now = 0.0
    for packets, nbytes, dt in steps:
        now += dt
        outcomes: list[DropReason | None] = []
        for sa, check in ((fast, SecurityAssociation.check_lifetime), (slow, _reference_check)):
            sa.packets += packets
            sa.bytes += nbytes
            try:
                check(sa, now)
                outcomes.append(None)
            except EspError as err:
                outcomes.append(err.reason)
        assert outcomes[0] == outcomes[1]
        assert (fast.soft_expired, fast.hard_expired) == (slow.soft_expired, slow.hard_expired)
        assert fast.events == slow.events
    assert fast.events.count(SAEvent.SOFT_EXPIRED) <= 1


# -- the profiler --------------------------------------------------------------------------
@pytest.mark.parametrize("encryption,mode", [("aes-gcm-128", "transport"), ("aes-cbc-128", "tunnel")])
def test_profile_command_output(
    encryption: str, mode: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "p.json"
    assert profile.main(["--encryption", encryption, "--mode", mode, "--iterations", "200",
                         "--rounds", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    for direction, stages in (("outbound", profile.STAGES_OUT), ("inbound", profile.STAGES_IN)):
        rows = data[direction]["breakdown"]
        assert set(rows) == {*stages, "other", "whole"}
        assert all(v >= 0 for v in rows.values()) and rows["whole"] > 0
        assert f"  {direction}:" in text
    assert data["encryption"] == encryption and data["mode"] == mode


@pytest.mark.parametrize("mode", ["transport", "tunnel"])
def test_profile_gso_block(mode: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--gso``: the per-segment cost of a 64 KiB superpacket, each stage present and
    positive, the superpacket cut into as many segments as its 65,000 bytes need at the
    size the path and the 1,460-byte MSS allow."""
    out = tmp_path / "p.json"
    assert profile.main(["--mode", mode, "--iterations", "200", "--rounds", "1", "--gso",
                         "--json", str(out)]) == 0
    data = json.loads(out.read_text())["superpacket"]
    assert set(data["us"]) == {"cut", "seal", "whole", "per-packet"}
    assert all(v > 0 for v in data["us"].values())
    assert -(-65000 // 1448) <= data["segments"] <= -(-65000 // 1300)
    assert f"per segment of {data['segments']}" in capsys.readouterr().out


@pytest.mark.parametrize("direction", ["outbound", "inbound"])
def test_profile_drive_runs_the_whole_handler_untimed(
    direction: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--drive`` (for an instruction counter) runs exactly the batches asked for, and each
    packet really goes through the handler: every one of them is accepted, none dropped."""
    handled: list[int] = []
    real = PacketHandler.handle_batch

    def counting(self: PacketHandler, packets: list[QueuedPacket]) -> None:
        real(self, packets)
        handled.append(self.packets_out)
        assert not self.processor.drops, self.processor.drops

    monkeypatch.setattr(PacketHandler, "handle_batch", counting)
    assert profile.main(["--drive", direction, "--batches", "3"]) == 0
    assert capsys.readouterr().out.strip() == f"{3 * profile.BATCH} packets"
    assert handled == [profile.BATCH, 2 * profile.BATCH, 3 * profile.BATCH]
    assert profile.drive("aes-gcm-128", "transport", 1400, direction, 0) == 0


def test_profile_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        profile.main(["--size", "10"])
    assert exc.value.code == 2
    assert profile.main(["--encryption", "rot13", "--iterations", "10", "--rounds", "1"]) == 2
    assert "rot13" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        profile.main(["--drive", "outbound", "--batches", "-1"])

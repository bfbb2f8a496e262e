"""The crypto engines (nfq_ipsec/engines): known-answer tests from the shipped vectors, byte
for byte agreement of every available engine with every other, routing by policy, and the
faults a test injects (wrong output, an exception, a hang, a failing periodic test): each
detected, the engine excluded, its SAs moved with their sequence numbers and replay state."""

from __future__ import annotations

import errno
import socket
import time
from ipaddress import IPv4Network
from pathlib import Path

import pytest
import sas
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st
from packets import ipv4, udp

from nfq_ipsec.core import (
    SPD,
    Action,
    Direction,
    DropReason,
    EspError,
    Policy,
    Processor,
    SADirection,
    SecurityAssociation,
    Selector,
    Verdict,
)
from nfq_ipsec.core.processor import LEAVING
from nfq_ipsec.core.suites import ENCRYPTION, HMACS, GuardedSuite, Suite, make_suite
from nfq_ipsec.engines import kat
from nfq_ipsec.engines.afalg import AfAlgEngine
from nfq_ipsec.engines.base import ALL_SUITES, CryptoSettings, Engine, Probe
from nfq_ipsec.engines.openssl import OpenSSLEngine
from nfq_ipsec.engines.pycryptodome import PycryptodomeEngine
from nfq_ipsec.engines.sodium import SodiumEngine
from nfq_ipsec.engines.team import NoEngine, Team

REAL = [OpenSSLEngine(), SodiumEngine(), PycryptodomeEngine(), AfAlgEngine()]
PROBES = {e.name: e.probe() for e in REAL}
AVAILABLE = [e for e in REAL if PROBES[e.name].absent is None]
CLAIMS = [(e, s) for e in REAL for s in sorted(PROBES[e.name].suites or ALL_SUITES)
          if s in kat.KATS or s.startswith("null+")]


def _afalg_reason() -> str | None:
    return PROBES["afalg"].absent


def _skip_if_absent(engine: Engine) -> None:
    absent = PROBES[engine.name].absent
    if absent is not None:
        pytest.skip(f"engine {engine.name} absent here: {absent}")


# -- the shipped vectors ----------------------------------------------------------------------

def test_sp800_38a_transcription() -> None:
    # the ECB blocks the CBC known-answer test builds on, against OpenSSL's AES
    for v in kat.ECB.values():
        enc = Cipher(algorithms.AES(bytes.fromhex(v["key"])), modes.ECB()).encryptor()
        assert enc.update(bytes.fromhex(v["plaintext"])) == bytes.fromhex(v["ciphertext"])
    assert sorted(kat.ECB) == [16, 32]


def test_vectors_parser_checks_octet_counts() -> None:
    with pytest.raises(ValueError, match="not 2 octets"):
        kat.parse_vectors("case = 1\nkey = 00\n  (2 octets)\n", "case")


def test_every_configurable_suite_has_a_known_answer_test_on_openssl() -> None:
    claims = PROBES["openssl"].suites
    for s in claims:
        kat.run(OpenSSLEngine().build, s)
    assert set(kat.KATS) <= claims


@pytest.mark.parametrize(("engine", "suite"), CLAIMS, ids=[f"{e.name}-{s}" for e, s in CLAIMS])
def test_known_answers(engine: Engine, suite: str) -> None:
    _skip_if_absent(engine)
    if suite not in PROBES[engine.name].suites:
        pytest.skip(f"{engine.name} does not claim {suite} here")
    kat.run(engine.build, suite)


def test_known_answer_test_catches_a_wrong_engine() -> None:
    with pytest.raises(kat.KatFailure, match="wrong output"):
        kat.run(Corrupt().build, "aes-gcm-128")
    with pytest.raises(kat.KatFailure, match="wrong output"):
        kat.run(Corrupt().build, "aes-cbc-256+hmac-sha512-256")


# -- AF_ALG -----------------------------------------------------------------------------------

def _kernel_has_af_alg() -> bool:
    try:
        socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0).close()
    except OSError:
        return False
    return True


def test_afalg_discovery_says_why_it_is_absent() -> None:
    probe = AfAlgEngine().probe()
    if _kernel_has_af_alg():
        assert probe.absent is None or "AF_ALG has none" in probe.absent
        return
    try:
        socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0)
    except OSError as err:
        code = errno.errorcode[err.errno or 0]
    assert probe.absent is not None and "kernel has no AF_ALG" in probe.absent and code in probe.absent
    assert not probe.suites


@pytest.mark.skipif(not _kernel_has_af_alg(), reason=f"this kernel has no AF_ALG: {_afalg_reason()}")
def test_afalg_agrees_with_openssl() -> None:
    engine = AfAlgEngine()
    for s in sorted(PROBES["afalg"].suites):
        kat.run(engine.build, s)
        enc, _, integ = s.partition("+")
        a, b = _pair(engine, OpenSSLEngine(), enc, integ or None, bytes(range(64)))
        assert a.seal(HDR, b"", 7, bytes(64)) == b.seal(HDR, b"", 7, bytes(64))


# -- every engine agrees with every other ------------------------------------------------------

HDR = b"\x00\x00\x12\x34\x00\x00\x00\x07"


def _pair(x: Engine, y: Engine, enc: str, integ: str | None, seed: bytes) -> tuple[Suite, Suite]:
    key = (seed * 4)[: ENCRYPTION[enc].keymat_size]
    ikey = (seed[::-1] * 4)[: HMACS[integ].key_size] if integ else b""
    return x.build(enc, key, integ, ikey), y.build(enc, key, integ, ikey)


SUITES = [s for s in kat.KATS]


@settings(max_examples=60, deadline=None)
@given(suite=st.sampled_from(SUITES), seed=st.binary(min_size=16, max_size=16),
       seq=st.integers(1, 2**64 - 1), esn=st.booleans(), blocks=st.integers(1, 100),
       extra=st.integers(0, 15), data=st.data())
def test_engines_agree_byte_for_byte(suite: str, seed: bytes, seq: int, esn: bool, blocks: int,
                                     extra: int, data: st.DataObject) -> None:
    enc, _, integ = suite.partition("+")
    able = [e for e in AVAILABLE if suite in PROBES[e.name].suites]
    assert len(able) >= 2 or suite in ("aes-gcm-256",), f"{suite}: only {able}"
    # AEADs take any length (padded to 4 by ESP); CBC whole blocks
    size = blocks * 16 if integ else blocks * 16 + (extra & ~3)
    plaintext = data.draw(st.binary(min_size=size, max_size=size))
    seq_hi = (seq >> 32).to_bytes(4, "big") if esn else b""
    header = HDR[:4] + (seq & 0xFFFFFFFF).to_bytes(4, "big")
    key = (seed * 4)[: ENCRYPTION[enc].keymat_size]
    ikey = (seed[::-1] * 4)[: HMACS[integ].key_size] if integ else b""
    sealed = {e.name: e.build(enc, key, integ or None, ikey).seal(header, seq_hi, seq, plaintext)
              for e in able}
    assert len(set(sealed.values())) == 1, {k: v[:24].hex() for k, v in sealed.items()}
    body = sealed[able[0].name]
    for e in able:  # and each opens what the others sealed, and refuses a changed ICV
        s = e.build(enc, key, integ or None, ikey)
        assert s.open(header, seq_hi, body) == plaintext
        with pytest.raises(EspError) as err:
            s.open(header, seq_hi, body[:-1] + bytes([body[-1] ^ 0x80]))
        assert err.value.reason is DropReason.INTEGRITY


# -- injected faults: engines written by the tests ---------------------------------------------

class TestEngine(Engine):
    """Wraps OpenSSL; a test turns on ``mode``: "corrupt" (a flipped byte), "raise", "hang"."""

    __test__ = False

    def __init__(self, name: str, mode: str = "", suites: frozenset[str] = frozenset(kat.KATS)) -> None:
        self.name = name
        self.mode = mode
        self.suites = suites
        self.calls = 0

    def probe(self) -> Probe:
        return Probe(self.suites)

    def build(self, encryption: str, key: bytes, integrity: str | None, integrity_key: bytes) -> Suite:
        return _Faulty(self, make_suite(encryption, key, integrity, integrity_key))


class Corrupt(TestEngine):
    def __init__(self) -> None:
        super().__init__("corrupt", "corrupt")


class _Faulty:
    def __init__(self, engine: TestEngine, inner: Suite) -> None:
        self.e, self.inner = engine, inner
        self.name, self.iv_size = inner.name, inner.iv_size
        self.icv_size, self.align = inner.icv_size, inner.align

    def _fault(self) -> None:
        self.e.calls += 1
        if self.e.mode == "raise":
            raise RuntimeError("device gone")
        if self.e.mode == "hang":
            time.sleep(30)

    def seal(self, esp_header: bytes, seq_hi: bytes, seq: int, plaintext: bytes) -> bytes:
        self._fault()
        out = self.inner.seal(esp_header, seq_hi, seq, plaintext)
        if self.e.mode == "corrupt":
            out = out[:-1] + bytes([out[-1] ^ 1])
        return out

    def open(self, esp_header: bytes | bytearray | memoryview, seq_hi: bytes,
             body: bytes | bytearray | memoryview) -> bytes:
        self._fault()
        return self.inner.open(esp_header, seq_hi, body)


def _team(*engines: Engine, **settings_: object) -> Team:
    team = Team(list(engines), CryptoSettings(**settings_))  # type: ignore[arg-type]
    team.discover(speed_seconds=0.0005)
    return team


def _outbound(name: str = "out", enc: str = "aes-gcm-128", integ: str | None = None,
              next_seq: int = 1) -> SecurityAssociation:
    return SecurityAssociation(sas.params(name, 0x1000 + len(name), SADirection.OUT, enc,
                                          integrity=integ), 0.0, next_seq=next_seq)


def test_fastest_policy_picks_the_best_measured_speed() -> None:
    a, b = TestEngine("a"), TestEngine("b")
    team = _team(a, b)
    team.members["a"].speed["aes-gcm-128"] = 1e6
    team.members["b"].speed["aes-gcm-128"] = 2e6
    sa = _outbound()
    team.bind([sa])
    assert team.engine_of(sa) == "b" and isinstance(sa.suite, GuardedSuite)


def test_prefer_policy_takes_the_list_in_order_then_the_fastest() -> None:
    team = _team(TestEngine("a"), TestEngine("b"), TestEngine("c"), policy="prefer", prefer=("c", "a"))
    sa = _outbound()
    team.bind([sa])
    assert team.engine_of(sa) == "c"
    team.disable("c")
    assert team.engine_of(sa) == "a"


def test_balance_spreads_sas_by_speed() -> None:
    team = _team(TestEngine("a"), TestEngine("b"), policy="balance")
    team.members["a"].speed["aes-gcm-128"] = 3e6
    team.members["b"].speed["aes-gcm-128"] = 1e6
    many = [_outbound(f"s{i}") for i in range(8)]
    team.bind(many)
    # (SAs + 1) / speed: the three-times-faster engine carries three in four
    assert (team.load("a"), team.load("b")) == (6, 2)


def _balanced_pair(opens_at_build: bool = False) -> tuple[Team, list[SecurityAssociation]]:
    a, b = TestEngine("a"), TestEngine("b")
    b.opens_at_build = opens_at_build
    team = _team(a, b, policy="balance")
    for m in team.members.values():
        m.speed["aes-gcm-128"] = 1e6
    many = [_outbound(f"s{i}") for i in range(4)]
    team.bind(many)
    assert (team.load("a"), team.load("b")) == (2, 2)
    return team, many


def test_balance_moves_an_sa_off_the_engine_its_traffic_keeps_busiest() -> None:
    team, many = _balanced_pair()
    busy = [sa for sa in many if team.engine_of(sa) == "a"]
    for sa in busy:  # both of a's SAs carry traffic, none of b's
        sa.bytes += 10_000_000
    moved = team.rebalance()
    assert len(moved) == 1 and moved[0][1] == "b" and moved[0][0] in {sa.name for sa in busy}
    assert sorted(str(team.engine_of(sa)) for sa in busy) == ["a", "b"]  # one moved, one stayed
    assert (team.load("a"), team.load("b")) == (1, 3)
    for sa in busy:  # the same traffic again: even now, so nothing moves back and forth
        sa.bytes += 10_000_000
    assert team.rebalance() == []
    assert team.rebalance() == []  # and no traffic at all: nothing to even


def test_balance_output_is_the_same_after_a_move() -> None:
    team, many = _balanced_pair()
    busy = [s for s in many if team.engine_of(s) == "a"]
    before = {sa.name: sa.suite.seal(b"\0" * 8, b"", 7, b"x" * 100) for sa in busy}
    for sa in busy:
        sa.bytes += 10_000_000
    [(name, engine)] = team.rebalance()
    sa = next(s for s in busy if s.name == name)
    assert engine == "b" and team.engine_of(sa) == "b"
    assert sa.suite.seal(b"\0" * 8, b"", 7, b"x" * 100) == before[name]


def test_rebalance_only_under_balance_and_never_onto_a_socket_engine_in_a_sandbox() -> None:
    team = _team(TestEngine("a"), TestEngine("b"))
    sa = _outbound()
    team.bind([sa])
    sa.bytes += 10_000_000
    assert team.rebalance() == []  # fastest: never moved for load
    team, many = _balanced_pair(opens_at_build=True)
    team.threads = False  # a sandboxed worker: its filter allows no new socket
    for s in many:
        if team.engine_of(s) == "a":
            s.bytes += 10_000_000
    assert team.rebalance() == []
    team.threads = True
    assert len(team.rebalance()) == 0  # its bytes were taken as seen by the call before
    for s in many:
        if team.engine_of(s) == "a":
            s.bytes += 10_000_000
    assert [engine for _name, engine in team.rebalance()] == ["b"]


def test_an_sa_with_no_verified_engine_refuses_to_start() -> None:
    team = _team(TestEngine("a", suites=frozenset({"aes-gcm-128"})))
    with pytest.raises(NoEngine, match=r"chacha20-poly1305.*a: not offered"):
        team.bind([_outbound(enc="chacha20-poly1305")])
    team.disable("a")
    with pytest.raises(NoEngine, match="a: disabled"):
        team.bind([_outbound()])


def test_an_engine_failing_its_first_known_answer_test_is_excluded() -> None:
    team = _team(Corrupt(), TestEngine("good"))
    bad = team.members["corrupt"]
    assert bad.excluded is not None and "known-answer test failed" in bad.excluded
    assert not bad.verified and bad.failed
    sa = _outbound()
    team.bind([sa])
    assert team.engine_of(sa) == "good"
    assert {r["name"]: r["state"] for r in team.report()} == {"corrupt": "excluded", "good": "ready"}


def _processor(sa_out: SecurityAssociation) -> Processor:
    pol = Policy("p", Selector(IPv4Network("10.0.0.1/32"), IPv4Network("10.0.0.2/32")),
                 Action.PROTECT, Direction.OUT, (sa_out.name,))
    return Processor(SPD([pol]), [sa_out], 0.0)


def _packet(i: int) -> bytes:
    return ipv4("10.0.0.1", "10.0.0.2", 17, udp("10.0.0.1", "10.0.0.2", 1000, 2000, bytes([i]) * 100))


def _reference(n: int) -> list[bytes]:
    """What the same SA seals on OpenSSL alone, packets 1..n."""
    sa = _outbound(next_seq=1)
    proc = _processor(sa)
    out = []
    for i in range(n):
        res = proc.process(_packet(i), len(_packet(i)), LEAVING, 0.0)
        assert res.verdict is Verdict.ACCEPT and res.packet is not None
        out.append(res.packet)
    return out


def test_an_engine_that_raises_drops_the_packet_and_hands_its_sas_on() -> None:
    flaky = TestEngine("flaky")
    team = _team(flaky, OpenSSLEngine(), policy="prefer", prefer=("flaky",))
    sa = _outbound()
    proc = _processor(sa)
    team.bind([sa])
    want = _reference(4)
    got = []
    for i in range(4):
        if i == 1:
            flaky.mode = "raise"
        res = proc.process(_packet(i), len(_packet(i)), LEAVING, 0.0)
        got.append(res)
        if team.alarms:  # what the worker does after each batch
            assert team.on_alarms() == [("out", "openssl")]
    assert [r.verdict for r in got] == [Verdict.ACCEPT, Verdict.DROP, Verdict.ACCEPT, Verdict.ACCEPT]
    assert got[1].reason is DropReason.ENGINE_FAILED
    assert proc.drops[DropReason.ENGINE_FAILED] == 1 and sa.drops[DropReason.ENGINE_FAILED] == 1
    # the sequence number the failed packet took is not reused: packets 3 and 4 are the
    # reference's 3 and 4 byte for byte (same SA state on another engine), 2 never left
    assert got[0].packet == want[0] and got[2].packet == want[2] and got[3].packet == want[3]
    row = {r["name"]: r for r in team.report()}["flaky"]
    assert (row["state"], row["faults"], row["moved_away"], row["sas"]) == ("excluded", 1, 1, 0)
    assert team.enable("flaky") == [] and team.members["flaky"].excluded  # still raising: stays out
    flaky.mode = ""
    assert team.enable("flaky") == [("out", "flaky")] and team.members["flaky"].excluded is None


def test_a_periodic_known_answer_failure_moves_the_sas_keeping_their_state() -> None:
    turn = TestEngine("turncoat")
    team = _team(turn, PycryptodomeEngine(), policy="prefer", prefer=("turncoat",))
    out, inb = _outbound(), SecurityAssociation(sas.params("in", 0x2000, SADirection.IN), 0.0)
    team.bind([out, inb])
    out.take_seq()
    inb.replay.update(41)
    turn.mode = "corrupt"  # wrong output: only a known-answer test sees it
    assert team.verify() == ["turncoat"]
    assert team.engine_of(out) == "pycryptodome" == team.engine_of(inb)
    assert out.next_seq == 2 and inb.replay.top == 41
    turn.mode = ""
    assert team.verify() == []  # passes again: back in the team, not rebound by itself
    assert team.members["turncoat"].excluded is None
    assert team.rebind_all() == [("out", "turncoat"), ("in", "turncoat")]


def test_a_hanging_engine_is_excluded_at_the_deadline() -> None:
    hang = TestEngine("hang")
    team = _team(hang, OpenSSLEngine(), policy="prefer", prefer=("hang",), verify_timeout=0.3)
    sa = _outbound()
    team.bind([sa])
    hang.mode = "hang"
    started = time.monotonic()
    assert team.verify() == ["hang"]
    assert time.monotonic() - started < 1.5
    assert "did not finish in 0.3 s" in (team.members["hang"].excluded or "")
    assert team.engine_of(sa) == "openssl"
    calls = hang.calls
    assert team.verify() == [] and hang.calls == calls  # still stuck: not run again


def test_disable_and_enable_move_an_sa_without_losing_its_place() -> None:
    team = _team(OpenSSLEngine(), PycryptodomeEngine(), policy="prefer", prefer=("pycryptodome",))
    sa = _outbound(next_seq=100)
    proc = _processor(sa)
    team.bind([sa])
    outs = []
    for i in range(6):
        if i == 2:
            assert team.disable("pycryptodome") == [("out", "openssl")]
        if i == 4:
            assert team.enable("pycryptodome") == [("out", "pycryptodome")]
        outs.append(proc.process(_packet(i), len(_packet(i)), LEAVING, 0.0).packet)
    ref_sa = _outbound(next_seq=100)
    ref = _processor(ref_sa)
    assert outs == [ref.process(_packet(i), len(_packet(i)), LEAVING, 0.0).packet for i in range(6)]


def test_the_last_engine_gone_leaves_its_sas_dropping() -> None:
    team = _team(TestEngine("only"))
    sa = _outbound()
    proc = _processor(sa)
    team.bind([sa])
    assert team.disable("only") == [("out", "none")]
    res = proc.process(_packet(0), len(_packet(0)), LEAVING, 0.0)
    assert (res.verdict, res.reason) == (Verdict.DROP, DropReason.ENGINE_FAILED)
    assert team.enable("only") == [("out", "only")]
    assert proc.process(_packet(0), len(_packet(0)), LEAVING, 0.0).verdict is Verdict.ACCEPT


def test_no_key_in_reports_or_reprs() -> None:
    team = _team(OpenSSLEngine())
    sa = _outbound()
    team.bind([sa])
    key = sas.key_for("aes-gcm-128")
    assert key.hex() not in repr(sa.suite) and key.hex() not in str(team.report())


def test_the_self_check_catches_wrong_output_before_it_leaves() -> None:
    turn = TestEngine("turncoat")
    team = _team(turn, OpenSSLEngine(), policy="prefer", prefer=("turncoat",), self_check=1)
    sa = _outbound()
    proc = _processor(sa)
    team.bind([sa])
    assert isinstance(sa.suite, GuardedSuite) and sa.suite.witness is not None
    want = _reference(4)
    got = []
    for i in range(4):
        if i == 1:
            turn.mode = "corrupt"
        got.append(proc.process(_packet(i), len(_packet(i)), LEAVING, 0.0))
        if team.alarms:
            assert team.on_alarms() == [("out", "openssl")]
    assert [r.reason for r in got] == [None, DropReason.ENGINE_FAILED, None, None]
    assert [got[i].packet for i in (0, 2, 3)] == [want[i] for i in (0, 2, 3)]
    assert {r["name"]: r["faults"] for r in team.report()}["turncoat"] == 1


def test_the_self_check_samples_every_nth_packet() -> None:
    team = _team(OpenSSLEngine(), PycryptodomeEngine(), self_check=3)
    sa = _outbound()
    proc = _processor(sa)
    team.bind([sa])
    for i in range(10):
        assert proc.process(_packet(i), len(_packet(i)), LEAVING, 0.0).verdict is Verdict.ACCEPT
    assert isinstance(sa.suite, GuardedSuite) and sa.suite.checked == 3 and not team.alarms


def test_the_daemon_refuses_sas_no_engine_can_carry() -> None:
    from nfq_ipsec import supervisor
    from nfq_ipsec.config import parse_config

    doc = {"daemon": {"queues": [100]}, "crypto": {"disabled": ["openssl", "sodium"]},
           "policy": [{"name": "p", "action": "protect", "direction": "out", "sa": ["o"]}],
           "sa": [{"name": "o", "direction": "out", "spi": 0x1000, "encryption": "null",
                   "integrity": "hmac-sha256-128", "integrity_key": "11" * 32}]}
    cfg = parse_config(doc, online_cpus=[0])
    team, code = supervisor.engine_preflight(cfg)
    assert code == 2
    assert team.problems(cfg.sas) == [
        "SA o: no verified crypto engine can run null+hmac-sha256-128 (openssl: disabled; "
        "sodium: not offered; pycryptodome: not offered; afalg: "
        + ("absent)" if PROBES["afalg"].absent else "not offered)")]
    doc["crypto"] = {}
    assert supervisor.engine_preflight(parse_config(doc, online_cpus=[0]))[1] is None


# -- AF_ALG's requests, against a kernel simulated after its documented socket interface ------
# Where the kernel has AF_ALG the real one is tested above; here the engine's request shapes
# (keys, IVs, AAD lengths, what it reads back) run against a stand-in that behaves as the
# kernel's AF_ALG does (Documentation/crypto/userspace-if.rst: AEAD reads AAD || input and
# writes AAD || output, a wrong tag is EBADMSG on recv), computed with OpenSSL. This proves the
# engine's own code, not the kernel.

class _FakeKernel:
    AF_ALG = 38
    SOCK_SEQPACKET = socket.SOCK_SEQPACKET
    SOL_ALG = 279
    ALG_SET_KEY = 1
    ALG_SET_AEAD_AUTHSIZE = 5
    ALG_OP_DECRYPT = 0
    ALG_OP_ENCRYPT = 1
    HAVE = {"aead": {"gcm(aes)", "rfc7539(chacha20,poly1305)"}, "skcipher": {"ecb(aes)", "cbc(aes)"},
            "hash": {"hmac(sha256)", "hmac(sha384)", "hmac(sha512)"}}

    class socket:  # the module attribute it stands in for
        def __init__(self, family: int, kind: int, proto: int = 0) -> None:
            assert (family, kind) == (_FakeKernel.AF_ALG, socket.SOCK_SEQPACKET)
            self.alg: tuple[str, str] | None = None
            self.key = b""
            self.authsize = 0
            self.out: bytes | OSError = b""
            self.hashed = b""
            self.parent: _FakeKernel.socket | None = None

        def bind(self, addr: tuple[str, str]) -> None:
            if addr[1] not in _FakeKernel.HAVE.get(addr[0], set()):
                raise FileNotFoundError(errno.ENOENT, "No such file or directory")
            self.alg = addr

        def setsockopt(self, level: int, opt: int, value: bytes | None, optlen: int = 0) -> None:
            assert level == _FakeKernel.SOL_ALG
            if opt == _FakeKernel.ALG_SET_KEY:
                assert isinstance(value, bytes)
                self.key = value
            else:
                assert opt == _FakeKernel.ALG_SET_AEAD_AUTHSIZE and value is None
                self.authsize = optlen

        def accept(self) -> tuple[_FakeKernel.socket, None]:
            op = _FakeKernel.socket(_FakeKernel.AF_ALG, socket.SOCK_SEQPACKET)
            op.parent = self
            return op, None

        def close(self) -> None:
            pass

        def sendmsg_afalg(self, msg: list[bytes], *, op: int, iv: bytes | None = None,
                          assoclen: int | None = None, flags: int = 0) -> int:
            from cryptography.exceptions import InvalidTag
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

            t = self.parent
            assert t is not None and t.alg is not None
            data = b"".join(msg)
            kind, name = t.alg
            if kind == "aead":
                assert iv is not None and len(iv) == 12 and assoclen is not None and t.authsize == 16
                aead = AESGCM(t.key) if name == "gcm(aes)" else ChaCha20Poly1305(t.key)
                aad, rest = data[:assoclen], data[assoclen:]
                try:
                    self.out = aad + (aead.encrypt(iv, rest, aad) if op == _FakeKernel.ALG_OP_ENCRYPT
                                      else aead.decrypt(iv, rest, aad))
                except InvalidTag:
                    self.out = OSError(errno.EBADMSG, "Bad message")
            else:
                assert kind == "skcipher" and len(data) % 16 == 0
                mode = modes.ECB() if name == "ecb(aes)" else modes.CBC(iv or b"")
                c = Cipher(algorithms.AES(t.key), mode)
                ctx = c.encryptor() if op == _FakeKernel.ALG_OP_ENCRYPT else c.decryptor()
                self.out = ctx.update(data) + ctx.finalize()
            return len(data)

        def sendall(self, data: bytes) -> None:
            self.hashed += data

        def recv(self, n: int) -> bytes:
            import hmac as hmac_

            t = self.parent
            assert t is not None and t.alg is not None
            if t.alg[0] == "hash":
                out, self.hashed = hmac_.digest(t.key, self.hashed, t.alg[1][5:-1]), b""
                return out[:n]
            if isinstance(self.out, OSError):
                raise self.out
            assert n == len(self.out), (n, len(self.out))  # the engine asks for exactly this
            return self.out


def test_afalg_requests_against_a_simulated_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    from nfq_ipsec.engines import afalg

    monkeypatch.setattr(afalg, "socket", _FakeKernel)
    engine = AfAlgEngine()
    probe = engine.probe()
    assert probe.absent is None and probe.suites == set(kat.KATS)
    for s in sorted(probe.suites):
        kat.run(engine.build, s)
        enc, _, integ = s.partition("+")
        for seq, esn, size in ((1, False, 64), (2**40 + 7, True, 1408)):
            a, b = _pair(engine, OpenSSLEngine(), enc, integ or None, bytes(range(7, 23)))
            seq_hi = (seq >> 32).to_bytes(4, "big") if esn else b""
            sealed = a.seal(HDR, seq_hi, seq, bytes(size))
            assert sealed == b.seal(HDR, seq_hi, seq, bytes(size))
            assert a.open(HDR, seq_hi, sealed) == bytes(size)
    _FakeKernel.HAVE = {"hash": set()}
    try:
        assert "AF_ALG has none" in (engine.probe().absent or "")
    finally:
        _FakeKernel.HAVE = {"aead": {"gcm(aes)", "rfc7539(chacha20,poly1305)"},
                            "skcipher": {"ecb(aes)", "cbc(aes)"},
                            "hash": {"hmac(sha256)", "hmac(sha384)", "hmac(sha512)"}}


def test_afalg_names_the_driver_the_kernel_would_pick(tmp_path: Path) -> None:
    from nfq_ipsec.engines.afalg import _drivers

    proc = tmp_path / "crypto"
    proc.write_text("name         : gcm(aes)\ndriver       : generic-gcm-aes\npriority     : 100\n\n"
                    "name         : gcm(aes)\ndriver       : qat-gcm-aes\npriority     : 4001\n\n"
                    "name         : cbc(aes)\ndriver       : cbc-aes-aesni\npriority     : 400\n")
    assert _drivers({"gcm(aes)", "cbc(aes)"}, proc) == (
        "cbc(aes): cbc-aes-aesni (400), gcm(aes): qat-gcm-aes (4001)")
    assert _drivers({"gcm(aes)"}, tmp_path / "absent") == ""


def test_status_text_and_the_engines_command_show_the_team() -> None:
    from statusschema import sample_answer

    from nfq_ipsec.commands.engines import render
    from nfq_ipsec.control import render_status

    answer = sample_answer()
    assert "crypto engines (nfq-ipsec engines): openssl ready (1 SAs), afalg absent\n" in (
        render_status(answer))  # type: ignore[arg-type]
    text = render(answer["engines"])
    assert text.splitlines()[:3] == ["openssl: ready", "  OpenSSL 3", "  SAs 1, faults 0, SAs moved away 0"]
    assert "aes-gcm-128" in text and "verified" in text and "1900 MB/s" in text
    assert "afalg: absent (kernel has no AF_ALG: EAFNOSUPPORT)" in text
    from nfq_ipsec.commands.engines import render_offload

    assert render_offload(answer["workers"]) == (
        "offload, queue 100: 1 helper(s), active; 500 seals in 70 chunks (batch 8), "
        "0 in the worker, 0 lost (engine_failed)")


def test_sodium_claims_aes_gcm_only_where_the_cpu_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import nacl.bindings
    from nacl.exceptions import CryptoError

    def refuse(*_args: object) -> bytes:
        raise CryptoError("unavailable")

    monkeypatch.setattr(nacl.bindings, "crypto_aead_aes256gcm_encrypt", refuse)
    probe = SodiumEngine().probe()
    assert probe.suites == {"chacha20-poly1305"} and "no AES-256-GCM" in probe.detail

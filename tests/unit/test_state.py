"""SA state persistence (``nfq_ipsec/state.py`` and the core's reserve hooks), without root.

- outbound: a fresh key starts at 1; nothing is sent before its reservation is on disk; after a
  simulated crash (locks dropped, no exact store) the SA resumes above every number it used;
  a clean stop stores the exact next number; hypothesis drives random send/crash/stop runs
  and checks that no sequence number is ever used twice under one key;
- inbound: after a crash every number accepted before it is refused, numbers above the stored
  floor pass; the margin adapts to the write rate within its bounds;
- a failed write drops the packet (``state_unavailable``) and uses nothing;
- corrupt, foreign, symlinked files and a state_dir others can use stop the SA; two SAs
  sharing a key are refused; a second owner can't take the lock;
- ``nfq-ipsec state show/reset`` and the status fields.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import sas
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nfq_ipsec import state
from nfq_ipsec.core import (
    SPD,
    Action,
    Direction,
    DropReason,
    EspError,
    Policy,
    Processor,
    SADirection,
    SAParams,
    SecurityAssociation,
    Selector,
    Verdict,
)
from nfq_ipsec.core.replay import ReplayWindow

KEY = bytes(range(20))
KEY2 = bytes(range(1, 21))


def params(name: str = "out0", direction: SADirection = SADirection.OUT, key: bytes = KEY,
           spi: int = 0x1000, esn: bool = False) -> SAParams:
    return sas.params(name, spi, direction, key=key, esn=esn)


def sa(p: SAParams | None = None) -> SecurityAssociation:
    return SecurityAssociation(p or params(), 0.0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sdir(tmp_path: Path) -> Path:
    return tmp_path / "state"


def qpath(sdir: Path, params: SAParams) -> Path:
    """``params``' state file, its queue's directory made (as its worker would)."""
    path = state.state_path(sdir, params)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


@pytest.fixture
def stores() -> Iterator[list[state.StateStore]]:
    made: list[state.StateStore] = []
    yield made
    for s in made:
        s.close(exact=False)


def attach(sdir: Path, sas: list[SecurityAssociation], stores: list[state.StateStore],
           clock: Clock | None = None) -> state.StateStore:
    store = state.StateStore(sdir, clock=clock or Clock(), lock_wait=0.0)
    store.attach(sas)
    stores.append(store)
    return store


def crash(store: state.StateStore) -> None:
    """What SIGKILL leaves behind: the files as they are; the kernel drops the locks."""
    store.close(exact=False)


# -- outbound -------------------------------------------------------------------------------------
def test_fresh_key_starts_at_1_and_reserves_before_sending(sdir: Path,
                                                           stores: list[state.StateStore]) -> None:
    s = sa()
    attach(sdir, [s], stores)
    path = qpath(sdir, s.params)
    assert s.next_seq == 1 and s.seq_limit == 0  # nothing may be sent before a reservation
    assert not path.exists()
    assert s.take_seq() == 1
    body = json.loads(path.read_text())
    assert body["next_seq"] == 1 + state.OUT_BLOCK and body["sa"] == "out0"
    assert s.seq_limit == state.OUT_BLOCK
    assert stat.S_IMODE(path.stat().st_mode) == state.FILE_MODE == 0o640  # its directory's group reads
    assert stat.S_IMODE(sdir.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700  # the queue's: this user's own
    assert KEY.hex() not in path.read_text()
    for _ in range(10):
        s.take_seq()
    assert json.loads(path.read_text())["next_seq"] == 1 + state.OUT_BLOCK  # no write per packet


def test_crash_resumes_above_everything_used(sdir: Path, stores: list[state.StateStore],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state, "OUT_BLOCK", 8)
    s = sa()
    store = attach(sdir, [s], stores)
    used = [s.take_seq() for _ in range(20)]
    crash(store)
    s2 = sa()
    attach(sdir, [s2], stores)
    assert s2.next_seq > max(used)
    assert s2.next_seq <= max(used) + 8  # skips at most one block
    assert s2.take_seq() not in used


def test_clean_stop_stores_the_exact_next_number(sdir: Path, stores: list[state.StateStore]) -> None:
    s = sa()
    store = attach(sdir, [s], stores)
    for _ in range(5):
        s.take_seq()
    store.close(exact=True)
    s2 = sa()
    attach(sdir, [s2], stores)
    assert s2.take_seq() == 6  # no gap after a planned restart


OPS = st.lists(st.one_of(st.tuples(st.just("send"), st.integers(0, 40)),
                         st.tuples(st.sampled_from(["crash", "stop"]), st.just(0))), max_size=25)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(OPS, st.integers(1, 16))
def test_no_sequence_number_is_ever_used_twice(tmp_path: Path, ops: list[tuple[str, int]],
                                                block: int) -> None:
    sdir = tmp_path / f"s{os.urandom(6).hex()}"
    old = state.OUT_BLOCK
    state.OUT_BLOCK = block
    try:
        used: set[int] = set()
        s = sa()
        store = state.StateStore(sdir, lock_wait=0.0)
        store.attach([s])
        for op, n in ops:
            if op == "send":
                for _ in range(n):
                    seq = s.take_seq()
                    assert seq not in used
                    used.add(seq)
                    # write-ahead: the file always covers what was handed out
                    on_disk = state.read(state.state_path(sdir, s.params), s.params)
                    assert on_disk is not None and on_disk.value > seq
            else:
                store.close(exact=op == "stop")
                s = sa()
                store = state.StateStore(sdir, lock_wait=0.0)
                store.attach([s])
        store.close(exact=False)
    finally:
        state.OUT_BLOCK = old


def test_write_failure_drops_the_packet_and_uses_nothing(sdir: Path, stores: list[state.StateStore],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    s = sa()
    inn = sa(params("in0", SADirection.IN, KEY2, 0x2000))
    pol = Policy("p", Selector(), Action.PROTECT, Direction.BOTH, ("out0", "in0"))
    proc = Processor(SPD([pol]), [s, inn], 0.0)
    attach(sdir, [s, inn], stores)

    def full(*_a: object, **_k: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state, "write", full)
    pkt = bytes.fromhex("450000200001400040110000") + bytes([10, 0, 0, 1, 10, 0, 0, 2]) + bytes(12)
    res = proc.outbound(pkt, 1.0)
    assert res.verdict is Verdict.DROP and res.reason is DropReason.STATE_UNAVAILABLE
    assert s.drops[DropReason.STATE_UNAVAILABLE] == 1
    assert s.next_seq == 1  # the number was not handed out
    monkeypatch.undo()
    res = proc.outbound(pkt, 1.0)
    assert res.verdict is Verdict.ACCEPT and res.seq == 1


def test_interrupted_write_leaves_the_old_state(sdir: Path, stores: list[state.StateStore],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state, "OUT_BLOCK", 4)
    s = sa()
    store = attach(sdir, [s], stores)
    for _ in range(4):
        s.take_seq()  # reserved up to 4, stored next_seq 5
    real_replace = os.replace

    def crash_before_rename(src: str, dst: str, **_kw: object) -> None:
        raise OSError(5, "simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash_before_rename)
    with pytest.raises(EspError) as info:
        s.take_seq()
    assert info.value.reason is DropReason.STATE_UNAVAILABLE
    monkeypatch.setattr(os, "replace", real_replace)
    crash(store)
    path = state.state_path(sdir, s.params)
    assert (path.parent / (path.name + ".tmp")).exists()  # the torn write
    s2 = sa()
    attach(sdir, [s2], stores)
    assert s2.take_seq() == 5  # 5 was never sent: the old file said so


def test_exhausted_state_keeps_the_sa_stopped(sdir: Path, stores: list[state.StateStore]) -> None:
    p = params()
    sdir.mkdir(mode=0o700)
    state.write(qpath(sdir, p), state.render(p, 0xFFFFFFFF + 1))
    s = sa(p)
    attach(sdir, [s], stores)
    with pytest.raises(EspError) as info:
        s.take_seq()
    assert info.value.reason is DropReason.SEQ_EXHAUSTED


def test_reservation_stops_at_the_last_number(sdir: Path, stores: list[state.StateStore]) -> None:
    p = params()
    sdir.mkdir(mode=0o700)
    state.write(qpath(sdir, p), state.render(p, 0xFFFFFFFF - 2))
    s = sa(p)
    attach(sdir, [s], stores)
    assert [s.take_seq() for _ in range(3)] == [0xFFFFFFFD, 0xFFFFFFFE, 0xFFFFFFFF]
    with pytest.raises(EspError):
        s.take_seq()


def test_esn_numbers_round_trip(sdir: Path, stores: list[state.StateStore]) -> None:
    p = params(esn=True)
    sdir.mkdir(mode=0o700)
    state.write(qpath(sdir, p), state.render(p, (7 << 32) + 5))
    s = sa(p)
    attach(sdir, [s], stores)
    assert s.take_seq() == (7 << 32) + 5


# -- inbound --------------------------------------------------------------------------------------
def accept(s: SecurityAssociation, seq: int) -> bool:
    """What decapsulate does after a good ICV: check, persist ahead, update."""
    if not s.replay.check(seq):
        return False
    s.allow_top(seq)
    s.replay.update(seq)
    return True


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 3000), min_size=1, max_size=60), st.integers(0, 5))
def test_inbound_refuses_after_a_crash_what_it_accepted_before(seqs: list[int], ticks: int) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        sdir = Path(tmp) / "state"
        clock = Clock()
        p = params("in0", SADirection.IN)
        s = sa(p)
        store = state.StateStore(sdir, clock=clock, lock_wait=0.0)
        store.attach([s])
        accepted = []
        for i, seq in enumerate(seqs):
            clock.now += ticks * 0.4 * (i % 3)
            if accept(s, seq):
                accepted.append(seq)
                on_disk = state.read(state.state_path(sdir, p), p)
                assert on_disk is not None and on_disk.value >= seq  # written before accepted
        top = s.replay.top
        store.close(exact=False)
        s2 = sa(p)
        store2 = state.StateStore(sdir, clock=clock, lock_wait=0.0)
        store2.attach([s2])
        try:
            for seq in accepted:
                assert not s2.replay.check(seq)
            floor = s2.replay.top
            assert floor >= top
            assert s2.replay.check(floor + 1)
        finally:
            store2.close(exact=False)


def test_inbound_clean_stop_keeps_the_exact_top(sdir: Path, stores: list[state.StateStore]) -> None:
    p = params("in0", SADirection.IN)
    s = sa(p)
    store = attach(sdir, [s], stores)
    for seq in (1, 2, 3, 10):
        assert accept(s, seq)
    store.close(exact=True)
    s2 = sa(p)
    attach(sdir, [s2], stores)
    assert s2.replay.top == 10
    assert not s2.replay.check(10) and not s2.replay.check(5)  # 5 counts as seen
    assert accept(s2, 11) and accept(s2, 13) and accept(s2, 12)  # reordering after the floor


def test_inbound_margin_adapts_to_the_write_rate(sdir: Path, stores: list[state.StateStore]) -> None:
    p = params("in0", SADirection.IN)
    s = sa(p)
    clock = Clock()
    attach(sdir, [s], stores, clock)
    entry = next(iter(stores[-1].entries.values()))
    seq = 0
    for _ in range(40):  # a fast sender: every write comes quickly, the margin grows
        seq = s.replay_limit + 1
        clock.now += 0.01
        assert accept(s, seq)
    assert entry.margin == state.IN_MARGIN_MAX
    writes = entry.writes
    for _ in range(2000):
        seq += 1
        assert accept(s, seq)
    assert entry.writes == writes  # within the margin: no write per packet
    for _ in range(40):  # a slow sender: the margin shrinks, so a crash loses little
        seq = s.replay_limit + 1
        clock.now += 5.0
        assert accept(s, seq)
    assert entry.margin == state.IN_MARGIN_MIN
    assert s.replay_limit - s.replay.top <= state.IN_MARGIN_MIN


def test_replay_window_restore_marks_everything_up_to_top() -> None:
    w = ReplayWindow(64)
    w.restore(1000)
    assert all(not w.check(n) for n in range(900, 1001))
    assert w.check(1001) and w.check(1003)
    w.update(1003)
    assert w.check(1001) and w.check(1002) and not w.check(1000)
    w = ReplayWindow(64)
    w.restore(0)
    assert w.check(1)


# -- unusable state -------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["garbage", "mac", "other-key", "range", "empty", "symlink",
                                    "forged", "no-lifetime"])
def test_corrupt_state_stops_the_sa(sdir: Path, stores: list[state.StateStore], damage: str) -> None:
    p = params()
    sdir.mkdir(mode=0o700)
    path = qpath(sdir, p)
    good = state.render(p, 500)
    if damage == "garbage":
        path.write_bytes(b"\x00\xffnot json")
    elif damage == "mac":
        path.write_text(good.replace('"next_seq": 500', '"next_seq": 5'))
    elif damage == "other-key":
        path.write_text(state.render(params(key=KEY2), 500))
    elif damage in ("range", "forged", "no-lifetime"):
        # a well-formed file whose MAC is right for its content, under the right key or not
        body = json.loads(good)
        body.pop("mac")
        key = state.mac_key(p)
        if damage == "range":
            body["next_seq"] = -3
        elif damage == "forged":  # rolled back by someone without the key
            body["next_seq"] = 1
            key = bytes(32)
        else:
            body.pop("lifetime")
        body["mac"] = state._mac(key, body)
        path.write_text(json.dumps(body))
    elif damage == "empty":
        path.write_text("")
    else:
        (sdir / "elsewhere").write_text(good)
        path.symlink_to(sdir / "elsewhere")
    with pytest.raises(state.StateError) as info:
        attach(sdir, [sa(p)], stores)
    assert str(path) in str(info.value)
    problems = state.check(str(sdir), [p])
    assert len(problems) == 1 and "out0" in problems[0]
    # nothing is held after a refused attach: a reset (or a retry) can take the lock
    lock = state._Lock(path.with_suffix(".lock"), 0.0)
    lock.release()


def test_missing_file_is_a_fresh_key(sdir: Path) -> None:
    assert state.check(str(sdir), [params(), params("in0", SADirection.IN)]) == []


def test_state_dir_must_be_private(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o755)
    with pytest.raises(state.StateError, match="chmod 700"):
        state.prepare_dir(d)
    assert "chmod 700" in state.check(str(d), [params()])[0]
    with pytest.raises(state.StateError, match="absolute"):
        state.prepare_dir("relative/dir")
    made = state.prepare_dir(tmp_path / "a" / "b")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    assert stat.S_IMODE(made.parent.stat().st_mode) == 0o700


def test_two_sas_sharing_a_key_are_refused(sdir: Path, stores: list[state.StateStore]) -> None:
    a, b = params("out0"), params("out1", spi=0x1001)
    problems = state.check(str(sdir), [a, b])
    assert len(problems) == 1 and "shares its key" in problems[0]
    with pytest.raises(state.StateError, match="share a key"):
        attach(sdir, [sa(a), sa(b)], stores)
    # the same key in both directions is two files (a loopback setup), not a clash
    assert state.check(str(sdir), [a, params("in0", SADirection.IN)]) == []


def test_one_owner_at_a_time(sdir: Path, stores: list[state.StateStore]) -> None:
    attach(sdir, [sa()], stores)
    with pytest.raises(state.StateError, match="held by another process"):
        attach(sdir, [sa()], stores)


def test_key_id_names_the_key_without_showing_it() -> None:
    a, b = params(), params(key=KEY2)
    assert state.key_id(a) == state.key_id(params(name="renamed", spi=0x9999))
    assert state.key_id(a) != state.key_id(b)
    assert KEY.hex()[:8] not in state.key_id(a)


# -- the command and the status ---------------------------------------------------------------
def write_config(tmp_path: Path, sandbox: str = "off") -> Path:
    """A configuration of one queue; ``sandbox`` "off": the files are the test's user's."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
[node]
interface = "eth1"
[daemon]
queues = [100]
cpus = [0]
state_dir = "{tmp_path / 'st'}"
sandbox = "{sandbox}"
[[policy]]
name = "p"
action = "protect"
local = "10.0.0.1/32"
remote = "10.0.0.2/32"
sa = ["out0", "in0"]
[[sa]]
name = "out0"
direction = "out"
spi = 0x1000
encryption = "aes-gcm-128"
key = "{KEY.hex()}"
[[sa]]
name = "in0"
direction = "in"
spi = 0x2000
encryption = "aes-gcm-128"
key = "{KEY2.hex()}"
""")
    cfg.chmod(0o600)
    return cfg


def test_state_show_and_reset_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nfq_ipsec.cli import main
    from nfq_ipsec.config import load_config

    cfg_path = write_config(tmp_path)
    cfg = load_config(cfg_path, online_cpus=[0])
    out_p = cfg.sa("out0")
    assert main(["state", "show", "--config", str(cfg_path)]) == 0
    assert "fresh" in capsys.readouterr().out
    path = qpath(state.prepare_dir(cfg.daemon.state_dir), out_p)
    path.write_text("{broken")
    assert main(["state", "show", "--config", str(cfg_path), "--json"]) == 1
    shown = json.loads(capsys.readouterr().out)
    assert {r["sa"]: r["state"] for r in shown["sas"]} == {"out0": "unusable", "in0": "fresh"}
    assert main(["state", "reset", "--config", str(cfg_path), "--sa", "out0"]) == 2
    assert "needs --sa NAME and --seq N" in capsys.readouterr().err
    assert main(["state", "reset", "--config", str(cfg_path), "--sa", "nope", "--seq", "1"]) == 2
    assert main(["state", "reset", "--config", str(cfg_path), "--sa", "out0", "--seq", "0"]) == 2
    capsys.readouterr()
    # while a worker holds the SA, reset refuses
    holder = state.StateStore(cfg.daemon.state_dir, lock_wait=0.0, queue=out_p.queue)
    with pytest.raises(state.StateError):
        holder.attach([sa(out_p)])  # corrupt: refuses, holds nothing
    assert main(["state", "reset", "--config", str(cfg_path), "--sa", "out0", "--seq", "0x10000"]) == 0
    assert "state reset" in capsys.readouterr().out
    s = sa(out_p)
    holder.attach([s])
    try:
        assert s.take_seq() == 0x10000
        assert main(["state", "reset", "--config", str(cfg_path), "--sa", "out0", "--seq", "1"]) == 1
        assert "held by another process" in capsys.readouterr().err
    finally:
        holder.close(exact=False)
    assert main(["state", "show", "--config", str(cfg_path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    row = next(r for r in shown["sas"] if r["sa"] == "out0")
    assert row["next_seq"] == 0x10000 + state.OUT_BLOCK
    for text in path.read_text(), json.dumps(shown):
        assert KEY.hex() not in text and KEY2.hex() not in text


def test_worker_snapshot_shows_what_is_saved(sdir: Path, stores: list[state.StateStore]) -> None:
    from nfq_ipsec.worker import PacketHandler

    out, inn = sa(), sa(params("in0", SADirection.IN, KEY2, 0x2000))
    pol = Policy("p", Selector(), Action.PROTECT, Direction.BOTH, ("out0", "in0"))
    proc = Processor(SPD([pol]), [out, inn], 0.0)
    store = attach(sdir, [out, inn], stores)

    class NoQueue:
        overflows = 0

    handler = PacketHandler(proc, NoQueue(), 0x10000000)  # type: ignore[arg-type]
    handler.store = store
    out.take_seq()
    snap = handler.snapshot(999999, None, 0.0)
    by = {s["name"]: s for s in snap["sas"]}
    assert by["out0"]["saved"] == state.OUT_BLOCK and by["out0"]["state_writes"] == 1
    assert by["in0"]["saved"] is None and by["in0"]["state_writes"] == 0


def test_inbound_write_failure_drops_before_the_window_moves(sdir: Path, stores: list[state.StateStore],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the processor: ICV, then the write-ahead, then the window. A packet whose floor
    can't be saved is dropped and leaves the window as it was, so a retry is accepted."""
    def host(out_key: bytes, in_key: bytes) -> tuple[Processor, SecurityAssociation]:
        o = sa(params("o", SADirection.OUT, out_key, 0x1000))
        i = sa(params("i", SADirection.IN, in_key, 0x1000))
        pol = Policy("p", Selector(), Action.PROTECT, Direction.BOTH, ("o", "i"))
        return Processor(SPD([pol]), [o, i], 0.0), i

    a, _ = host(KEY, KEY2)
    b, b_in = host(KEY2, KEY)
    attach(sdir, [b_in], stores)
    pkt = bytes.fromhex("450000200001400040110000") + bytes([10, 0, 0, 1, 10, 0, 0, 2]) + bytes(12)
    esp = a.outbound(pkt, 0.0).packet
    assert esp is not None

    def full(*_a: object, **_k: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state, "write", full)
    res = b.inbound(esp, 0.0)
    assert res.reason is DropReason.STATE_UNAVAILABLE
    assert b_in.replay.top == 0 and b_in.replay.check(1)
    monkeypatch.undo()
    assert b.inbound(esp, 0.0).verdict is Verdict.ACCEPT
    assert b.inbound(esp, 0.0).reason is DropReason.REPLAY


# -- authenticated files, owned files --------------------------------------------------------
OTHER_UID = 65534  # nobody


def test_old_unkeyed_format_is_refused_with_what_to_do(sdir: Path,
                                                       stores: list[state.StateStore]) -> None:
    """Version 1 files carried an unkeyed checksum: anyone able to write one could roll a
    sequence number back. They are refused, and the message says how to go on."""
    import hashlib

    p = params()
    sdir.mkdir(mode=0o700)
    path = qpath(sdir, p)
    body = {"version": 1, "direction": "out", "key_id": state.key_id(p), "sa": "out0",
            "spi": "0x00001000", "next_seq": 1, "written": "2026-01-01T00:00:00Z"}
    body["check"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    path.write_text(json.dumps(body, sort_keys=True))
    with pytest.raises(state.StateError) as info:
        attach(sdir, [sa(p)], stores)
    msg = str(info.value)
    assert "old format" in msg and "nfq-ipsec state reset" in msg and "new key" in msg
    (problem,) = state.check(str(sdir), [p])
    assert "old format" in problem


def test_state_file_reveals_neither_key_nor_mac_key(sdir: Path,
                                                    stores: list[state.StateStore]) -> None:
    p = params()
    s = sa(p)
    attach(sdir, [s], stores)
    s.take_seq()
    text = state.state_path(sdir, p).read_text()
    assert KEY.hex() not in text and KEY.hex()[:10] not in text
    assert state.mac_key(p).hex()[:10] not in text
    assert state.mac_key(p) != state.mac_key(params(key=KEY2))
    assert KEY.hex() not in repr(stores[-1].entries[id(s)])


@pytest.mark.root
@pytest.mark.parametrize("what", ["file-owner", "file-mode", "dir-owner", "dir-symlink",
                                  "lock-owner"])
def test_state_others_control_stops_the_sa(sdir: Path, stores: list[state.StateStore],
                                           what: str) -> None:
    p = params()
    s = sa(p)
    store = attach(sdir, [s], stores)
    s.take_seq()
    store.close()
    path = qpath(sdir, p)
    expect = {"file-owner": f"owned by uid {OTHER_UID}, not by uid 0",
              "file-mode": "writable by group or others (mode 0620)",
              "dir-owner": f"owned by uid {OTHER_UID}, not by uid 0",
              "dir-symlink": "symbolic link",
              "lock-owner": f"owned by uid {OTHER_UID}, not by uid 0"}[what]
    target = sdir
    if what == "file-owner":
        os.chown(path, OTHER_UID, OTHER_UID)
        target = path
    elif what == "file-mode":
        path.chmod(0o620)
        target = path
    elif what == "dir-owner":
        os.chown(sdir, OTHER_UID, OTHER_UID)
    elif what == "lock-owner":
        target = path.with_suffix(".lock")
        os.chown(target, OTHER_UID, OTHER_UID)
    else:
        real = sdir.parent / "real-state"
        sdir.rename(real)
        sdir.symlink_to(real)
    with pytest.raises(state.StateError) as info:
        attach(sdir, [sa(p)], stores)
    assert expect in str(info.value) and str(target) in str(info.value)
    problems = state.check(str(sdir), [p])
    assert len(problems) == 1 and expect in problems[0], problems


@pytest.mark.root
def test_rollback_by_another_user_is_refused(sdir: Path, stores: list[state.StateStore]) -> None:
    """Another user who can write into state_dir copies an old state file back (a valid MAC:
    it was written under the key). The file is theirs now, so the SA refuses to start."""
    p = params()
    s = sa(p)
    store = attach(sdir, [s], stores)
    s.take_seq()
    path = qpath(sdir, p)
    old = path.read_bytes()
    for _ in range(5):
        s.take_seq()
    store.close()
    os.chown(sdir, OTHER_UID, OTHER_UID)
    path.unlink()
    path.write_bytes(old)
    os.chown(path, OTHER_UID, OTHER_UID)
    os.chown(sdir, 0, 0)  # even with the directory handed back, the file stays theirs
    with pytest.raises(state.StateError, match=f"owned by uid {OTHER_UID}"):
        attach(sdir, [sa(p)], stores)


@pytest.mark.root
def test_stale_temp_file_is_replaced_not_written_through(sdir: Path,
                                                         stores: list[state.StateStore]) -> None:
    p = params()
    sdir.mkdir(mode=0o700)
    path = qpath(sdir, p)
    victim = sdir.parent / "victim"
    victim.write_text("untouched")
    tmp = path.parent / (path.name + ".tmp")
    tmp.symlink_to(victim)  # a link where the temp file goes
    s = sa(p)
    attach(sdir, [s], stores)
    assert s.take_seq() == 1
    assert victim.read_text() == "untouched"
    assert not tmp.exists() and not tmp.is_symlink()
    tmp.write_text("a stale temp of another user")
    os.chown(tmp, OTHER_UID, OTHER_UID)
    state.write(path, state.render(p, 77))
    st = path.stat()
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == state.FILE_MODE
    assert state.read(path, p) is not None and not tmp.exists()


# -- lifetime use across restarts ---------------------------------------------------------------
def life_params(direction: SADirection = SADirection.OUT, **limits: int) -> SAParams:
    from nfq_ipsec.core import Lifetime

    return sas.params("out0" if direction is SADirection.OUT else "in0", 0x1000, direction, key=KEY,
                      lifetime=Lifetime(**limits))


def send_n(s: SecurityAssociation, n: int, size: int = 100, now: float = 1.0) -> None:
    for _ in range(n):
        s.check_lifetime(now)
        s.take_seq()
        s.account(size)


def test_lifetime_use_survives_a_clean_restart(sdir: Path, stores: list[state.StateStore]) -> None:
    p = life_params(hard_packets=100, hard_bytes=10**9)
    s = sa(p)
    store = attach(sdir, [s], stores)
    send_n(s, 60)
    store.close()
    s2 = sa(p)
    attach(sdir, [s2], stores)
    assert s2.lifetime_left(1.0)["packets"] == 40
    assert s2.lifetime_left(1.0)["bytes"] == 10**9 - 6000
    assert s2.packets == 0  # this process's own counts (status) start from zero
    send_n(s2, 40)
    with pytest.raises(EspError) as info:
        s2.check_lifetime(1.0)
    assert info.value.reason is DropReason.SA_EXPIRED  # at 100 in all, as without the restart


def test_lifetime_use_after_a_crash_is_what_the_last_write_saw(
        sdir: Path, stores: list[state.StateStore], monkeypatch: pytest.MonkeyPatch) -> None:
    """After a crash the use counts resume from the last reservation write: the under-count is
    at most what was sent under the last reservation (fewer than OUT_BLOCK packets)."""
    monkeypatch.setattr(state, "OUT_BLOCK", 10)
    p = life_params(hard_packets=1000)
    s = sa(p)
    store = attach(sdir, [s], stores)
    send_n(s, 25)  # writes at numbers 1, 11, 21: the last one saw 20 packets
    crash(store)
    s2 = sa(p)
    attach(sdir, [s2], stores)
    used = 1000 - int(s2.lifetime_left(1.0)["packets"] or 0)
    assert used == 20 and 25 - used < state.OUT_BLOCK


def test_inbound_lifetime_use_survives_a_restart(sdir: Path, stores: list[state.StateStore]) -> None:
    p = life_params(SADirection.IN, hard_bytes=1000)
    s = sa(p)
    store = attach(sdir, [s], stores)
    for seq in range(1, 6):
        assert accept(s, seq)
        s.account(100)
    store.close()
    s2 = sa(p)
    attach(sdir, [s2], stores)
    assert s2.lifetime_left(1.0)["bytes"] == 500


def test_age_counts_across_restarts_and_downtime(sdir: Path, stores: list[state.StateStore]) -> None:
    """hard_seconds = 100: 30 s in a first process, 20 s down, then it expires 50 s into the
    second. A fresh key with an age limit is dated at once, before any packet."""
    wall = [1000.0]
    p = life_params(hard_seconds=100)
    s = SecurityAssociation(p, 0.0)
    store = state.StateStore(sdir, clock=Clock(), lock_wait=0.0, wallclock=lambda: wall[0])
    store.attach([s])
    stores.append(store)
    assert state.read(state.state_path(sdir, p), p) is not None  # dated before any packet
    wall[0] += 30
    store.close()
    wall[0] += 20
    s2 = SecurityAssociation(p, 500.0)  # this process's own clock
    store2 = state.StateStore(sdir, clock=Clock(), lock_wait=0.0, wallclock=lambda: wall[0])
    store2.attach([s2])
    stores.append(store2)
    assert s2.lifetime_left(500.0)["seconds"] == pytest.approx(50.0)
    s2.check_lifetime(549.0)
    with pytest.raises(EspError):
        s2.check_lifetime(550.0)


def test_reload_attaches_more_and_lets_some_go(sdir: Path, stores: list[state.StateStore]) -> None:
    """A reload attaches its new SAs to a store that holds others already, and later lets the
    retired ones go with their exact state; a failing attach leaves the earlier SAs held."""
    old = sa(params())
    store = attach(sdir, [old], stores)
    for _ in range(5):
        old.take_seq()
    new = sa(params(name="out0", key=KEY2, spi=0x1001))  # same name, new key: both held
    store.attach([new])
    assert len(store.entries) == 2
    with pytest.raises(state.StateError):  # a third SA under the old key: refused ...
        store.attach([sa(params(name="other", spi=0x1002))])
    assert set(store.entries) == {id(old), id(new)}  # ... and nothing held before is lost
    store.detach([old])
    assert set(store.entries) == {id(new)}
    # the retired SA's exact state is on disk and its lock is free: a new store takes it
    again = sa(params())
    attach(sdir, [again], stores)
    assert again.next_seq == old.next_seq == 6


def test_negotiated_sas_state_files_are_removed_and_static_ones_kept(sdir: Path) -> None:
    """``remove`` (a retired negotiated SA) and ``prune_negotiated`` (what a previous run's
    negotiated SAs left): only files whose SA name is a negotiated one, never those kept."""
    from nfq_ipsec import childsas

    neg = params("peer.out.0badcafe", key=KEY2, spi=0x0BADCAFE)
    kept_neg = params("peer.in.00001234", SADirection.IN, key=bytes(range(2, 22)), spi=0x1234)
    static = params()
    for p in (neg, kept_neg, static):
        path = qpath(sdir, p)
        path.write_text(state.render(p, 7))
        path.with_suffix(".lock").write_text("")
    assert state.remove(sdir, neg) == 2 and not state.state_path(sdir, neg).exists()
    assert state.remove(sdir, neg) == 0  # gone already: nothing to do
    qpath(sdir, neg).write_text(state.render(neg, 9))
    junk = state.state_path(sdir, static).with_name("out-junk.json")
    junk.write_text("not json")  # unreadable: left alone
    gone = state.prune_negotiated(sdir, [static.queue, 999], lambda n: childsas.is_negotiated(n, ["peer"]),
                                  [state.state_path(sdir, kept_neg)])
    assert gone == 1 and not state.state_path(sdir, neg).exists()
    assert state.state_path(sdir, kept_neg).exists() and state.state_path(sdir, static).exists()
    assert junk.exists() and state.state_path(sdir, static).with_suffix(".lock").exists()


@pytest.mark.parametrize(("name", "yes"), [
    ("peer.in.0badcafe", True), ("peer.out.00000001", True), ("a.b.peer.out.00000001", False),
    ("peer.fwd.00000001", False), ("peer.in.1234", False), ("peer.in.0BADCAFE", False),
    ("other.in.0badcafe", False), ("out0", False)])
def test_a_negotiated_name_is_told_from_a_static_one(name: str, yes: bool) -> None:
    from nfq_ipsec import childsas

    assert childsas.is_negotiated(name, ["peer", "a.b"]) is yes

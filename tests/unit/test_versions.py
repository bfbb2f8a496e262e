"""The comparator of ESP versions (``nfq_ipsec.versions``: ``daemon.versions``,
``daemon.compare``): agreement, each kind of disagreement, a version that raises or keeps
disagreeing taken out, fail closed with one version left, sampling, a reload, and the worker
that builds it; with three versions (the core's source as ``core-source``), ``majority``:
the odd one outvoted and taken out, two left as ``all``, one left fail closed, the core itself
outvoted. Faults are injected into the independent version or the core's source from outside
(tests/faults, as a real daemon's are); the compiled core is wrapped instead."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import cast

import pytest
from faults.nfq_ipsec_faults import VERSION_FAULTS, patch_version
from packets import udp
from repo import EXAMPLES
from statusschema import sample_answer

from nfq_ipsec import control, supervisor, versions
from nfq_ipsec.config import load_config
from nfq_ipsec.core import DropReason, Processor, Result, Verdict
from nfq_ipsec.core.processor import ARRIVING, LEAVING
from nfq_ipsec.nfqueue import HOOK_LOCAL_OUT, HOOK_PRE_ROUTING, QueuedPacket
from nfq_ipsec.status import StatusReport
from nfq_ipsec.supervisor import worker_spec
from nfq_ipsec.versions import MISMATCH_LIMIT, Versions
from nfq_ipsec.worker import PacketHandler, WorkerSpec

A, B = "192.168.56.10", "192.168.56.11"
OUT, IN = "a-to-b-0", "b-to-a-0"  # host-a's SAs on queue 100


TWO = ("core", "independent")
THREE = ("core", "independent", "core-source")


def spec(compare: str = "all", fallback: bool = False,
         names: tuple[str, ...] = TWO) -> WorkerSpec:
    cfg = load_config(EXAMPLES / "host-a.toml", online_cpus=[0, 1])
    return dataclasses.replace(worker_spec(cfg, cfg.daemon.queues[0]),
                               versions=names, compare=compare,
                               compare_fallback=fallback)


def build(compare: str = "all", fallback: bool = False,
          names: tuple[str, ...] = TWO) -> Versions:
    s = spec(compare, fallback, names)
    built = versions.build(s, Processor(s.spd(), s.sas, 0.0, mtu=s.mtu), 0.0, lambda: 0.0)
    assert isinstance(built, Versions)
    return built


def peer() -> Processor:
    cfg = load_config(EXAMPLES / "host-b.toml", online_cpus=[0, 1])
    return Processor(cfg.spd, cfg.sas_for_queue(100), 0.0)


PLAIN = udp(A, B, 4000, 5000, b"payload " * 20)
BACK = udp(B, A, 5000, 4000, b"answer " * 20)


def esp_from_b(p: Processor) -> bytes:
    out = p.process(BACK, len(BACK), LEAVING, 0.0).packet
    assert out is not None
    return out


def out(v: Versions) -> tuple[Verdict, DropReason | None, bytes | None]:
    res = v.process(PLAIN, len(PLAIN), LEAVING, 0.0)
    return res.verdict, res.reason, res.packet


def inb(v: Versions, packet: bytes) -> tuple[Verdict, DropReason | None, bytes | None]:
    res = v.process(packet, len(packet), ARRIVING, 0.0)
    return res.verdict, res.reason, res.packet


@pytest.fixture
def fault(request: pytest.FixtureRequest) -> Iterator[str]:
    kind, _, target = request.param.partition("@")
    undo = patch_version(kind, target or "independent")
    try:
        yield request.param
    finally:
        undo()


def pair(v: Versions) -> tuple[int, int]:
    [p] = v.snapshot()["pairs"]
    return p["agreed"], p["mismatches"]


def independent(v: Versions) -> dict[str, object]:
    return dict(v.snapshot()["versions"][1])


# -- agreement ---------------------------------------------------------------------------------
def test_versions_that_agree_pass_the_cores_answer_and_count_it() -> None:
    v, b = build(), peer()
    alone = Processor(v.core.spd, spec().sas, 0.0)
    for _ in range(3):
        verdict, reason, packet = out(v)
        assert (verdict, reason) == (Verdict.ACCEPT, None)
        assert packet == alone.process(PLAIN, len(PLAIN), LEAVING, 0.0).packet  # byte for byte
    esp = esp_from_b(b)
    assert inb(v, esp) == (Verdict.ACCEPT, None, BACK)
    assert inb(v, esp)[:2] == (Verdict.DROP, DropReason.REPLAY)  # both drop it: agreed
    assert pair(v) == (5, 0)
    snap = v.snapshot()
    assert (snap["packets"], snap["compared"], snap["sa_mismatches"]) == (5, 5, {})
    assert v.drops[DropReason.REPLAY] == 1 and not v.drops[DropReason.VERSION_MISMATCH]


def test_compare_off_builds_the_core_alone() -> None:
    s = spec("off")
    core = Processor(s.spd(), s.sas, 0.0)
    assert versions.build(s, core, 0.0) is core
    snap = versions.snapshot(core)
    assert [x["name"] for x in snap["versions"]] == ["core"] and snap["pairs"] == []


# -- disagreement ------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["flip-byte"], indirect=True)
def test_different_bytes_drop_the_packet_and_log_no_content(
        fault: str, caplog: pytest.LogCaptureFixture) -> None:
    v = build()
    caplog.set_level(logging.WARNING, "nfq_ipsec.versions")
    assert out(v) == (Verdict.DROP, DropReason.VERSION_MISMATCH, None)
    assert pair(v) == (0, 1)
    assert v.drops[DropReason.VERSION_MISMATCH] == 1
    sa = v.sad.by_name(OUT)
    assert sa is not None and sa.drops[DropReason.VERSION_MISMATCH] == 1
    assert v.snapshot()["sa_mismatches"] == {OUT: 1}
    [line] = [r.getMessage() for r in caplog.records]
    assert "core and independent" in line and f"SA {OUT}" in line
    assert "first difference at offset" in line and "sha256 " in line
    assert PLAIN.hex() not in line and "payload" not in line


@pytest.mark.parametrize("fault", ["accept-drop"], indirect=True)
def test_a_different_verdict_drops_and_the_drop_counts_once(fault: str) -> None:
    v, b = build(), peer()
    esp = esp_from_b(b)
    assert inb(v, esp) == (Verdict.ACCEPT, None, BACK)
    assert inb(v, esp) == (Verdict.DROP, DropReason.VERSION_MISMATCH, None)  # replay vs accept
    assert pair(v) == (1, 1)
    # the core's replay drop moved to version_mismatch: one reason per dropped packet
    assert v.drops[DropReason.REPLAY] == 0 and v.drops[DropReason.VERSION_MISMATCH] == 1


def test_a_different_drop_reason_is_a_disagreement(monkeypatch: pytest.MonkeyPatch) -> None:
    v, b = build(), peer()
    engine = v.others[0].engine
    process = engine.process

    def other_reason(data: bytes, length: int, where: int, now: float):  # type: ignore[no-untyped-def]
        got = process(data, length, where, now)
        if got.reason == "replay":
            got.reason = "integrity"
        return got

    monkeypatch.setattr(engine, "process", other_reason)
    esp = esp_from_b(b)
    inb(v, esp)
    assert inb(v, esp) == (Verdict.DROP, DropReason.VERSION_MISMATCH, None)
    assert versions.difference(versions.of_result(v.core.process(esp, len(esp), ARRIVING, 0.0)),
                               versions.of_outcome(other_reason(esp, len(esp), ARRIVING, 0.0))
                               ) == "drop reason"


@pytest.mark.parametrize("fault", ["skip-replay"], indirect=True)
def test_a_skipped_replay_check_never_lets_the_replay_through(fault: str) -> None:
    v, b = build(), peer()
    esp = esp_from_b(b)
    assert inb(v, esp)[0] is Verdict.ACCEPT
    for _ in range(MISMATCH_LIMIT + 2):
        assert inb(v, esp)[0] is Verdict.DROP
    assert pair(v) == (1, MISMATCH_LIMIT)  # then out of service: no more comparisons
    assert independent(v)["in_service"] is False


# -- out of service ----------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["raise"], indirect=True)
def test_a_version_that_raises_is_taken_out_and_all_fails_closed(
        fault: str, caplog: pytest.LogCaptureFixture) -> None:
    v, b = build(), peer()
    assert out(v) == (Verdict.DROP, DropReason.VERSION_OUT, None)
    state = independent(v)
    assert (state["in_service"], state["out_reason"], state["errors"]) == (
        False, "raised RuntimeError", 1)
    assert "taken out of service: raised RuntimeError" in caplog.text
    assert inb(v, esp_from_b(b)) == (Verdict.DROP, DropReason.VERSION_OUT, None)
    cleartext_to_nobody = udp(A, "192.0.2.99", 1, 2, b"x")  # no SA: the core's own answer
    assert inb(v, cleartext_to_nobody)[1] is not DropReason.VERSION_OUT
    assert v.drops[DropReason.VERSION_OUT] == 2 and pair(v) == (0, 0)


@pytest.mark.parametrize("fault", ["raise"], indirect=True)
def test_with_fallback_the_core_carries_on_alone(fault: str) -> None:
    v = build(fallback=True)
    assert out(v)[0] is Verdict.ACCEPT
    assert out(v)[0] is Verdict.ACCEPT
    assert independent(v)["in_service"] is False


@pytest.mark.parametrize("fault", ["wrong-seq"], indirect=True)
def test_a_version_that_keeps_disagreeing_is_taken_out(fault: str) -> None:
    v = build()
    for _ in range(MISMATCH_LIMIT):
        assert out(v)[1] is DropReason.VERSION_MISMATCH
    state = independent(v)
    assert (state["in_service"], state["out_reason"]) == (
        False, f"disagreed {MISMATCH_LIMIT} times in a row")
    assert out(v) == (Verdict.DROP, DropReason.VERSION_OUT, None)
    assert pair(v) == (0, MISMATCH_LIMIT)


def test_an_agreement_resets_the_streak() -> None:
    v = build()
    for _ in range(MISMATCH_LIMIT - 1):
        undo = patch_version("flip-byte")
        try:
            assert out(v)[1] is DropReason.VERSION_MISMATCH
        finally:
            undo()
        assert out(v)[0] is Verdict.ACCEPT
    assert independent(v)["in_service"] is True and independent(v)["streak"] == 0


# -- sampling ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["flip-byte"], indirect=True)
def test_sample_n_compares_one_packet_in_n_and_runs_every_version_on_all(fault: str) -> None:
    v = build("sample:4")
    answers = [out(v)[1] for _ in range(10)]
    assert [i + 1 for i, r in enumerate(answers) if r is DropReason.VERSION_MISMATCH] == [4, 8]
    snap = v.snapshot()
    assert (snap["packets"], snap["compared"]) == (10, 2) and pair(v) == (0, 2)
    # every version sealed every packet: their sequence numbers are in step
    assert v.others[0].engine.sa(OUT).next_seq == v.sad.by_name(OUT).next_seq == 11


@pytest.mark.parametrize("fault", ["raise"], indirect=True)
def test_sample_n_carries_on_with_the_core_once_the_other_is_out(fault: str) -> None:
    v = build("sample:10")
    assert out(v)[0] is Verdict.ACCEPT
    assert independent(v)["in_service"] is False


def test_every_fault_is_caught() -> None:
    for kind in VERSION_FAULTS:
        v, b = build(), peer()
        undo = patch_version(kind)
        try:
            esp = esp_from_b(b)
            answers = [out(v), inb(v, esp), inb(v, esp)]
        finally:
            undo()
        assert all(a[0] is Verdict.DROP for a in answers[1:] if a[2] != BACK), kind
        assert any(a[1] in (DropReason.VERSION_MISMATCH, DropReason.VERSION_OUT)
                   for a in answers), kind


# -- the worker --------------------------------------------------------------------------------
class FakeQueue:
    def __init__(self) -> None:
        self.verdicts: list[tuple[int, bool, bytes | None]] = []

    def verdict(self, packet_id: int, accept: bool, mark: int | None = None,
                payload: bytes | None = None) -> None:
        self.verdicts.append((packet_id, accept, payload))

    def flush(self) -> None:
        pass


def arriving(pid: int, data: bytes) -> QueuedPacket:
    return QueuedPacket(pid, HOOK_PRE_ROUTING, data, len(data), 0, 0)


def test_the_worker_runs_the_versions_and_keeps_them_through_a_reload() -> None:
    v, b = build(), peer()
    q = FakeQueue()
    h = PacketHandler(v, q, 0x10000000, clock=lambda: 1.0)  # type: ignore[arg-type]
    assert v.others[0].engine.frag_ident == v.core.frag_ident  # the shell's seed, in both
    h.handle_batch([QueuedPacket(1, HOOK_LOCAL_OUT, PLAIN, len(PLAIN), 0, 0),
                    arriving(2, esp_from_b(b))])
    assert [a for _, a, _ in q.verdicts] == [True, True]
    h.reload(spec(), 2.0)
    h.commit_reload()
    assert isinstance(h.processor, Versions) and h.processor is not v
    h.handle_batch([QueuedPacket(3, HOOK_LOCAL_OUT, PLAIN, len(PLAIN), 0, 0),
                    arriving(4, esp_from_b(b))])
    assert [a for _, a, _ in q.verdicts] == [True, True, True, True]
    snap = h.snapshot(100, None, 0.0)["versions"]
    assert snap["pairs"][0]["agreed"] == 4 and snap["packets"] == 4
    assert h.processor.others[0].engine.sa(OUT).next_seq == 3  # kept across the reload


def test_a_reloaded_plain_core_stays_plain() -> None:
    s = spec("off")
    core = Processor(s.spd(), s.sas, 0.0)
    assert versions.rebuilt(core, core, s, 0.0) is core


# -- status ------------------------------------------------------------------------------------
def test_status_text_and_warnings_name_a_version_out_of_service() -> None:
    answer = cast(StatusReport, sample_answer())  # queue 100: independent out, 3 mismatches
    assert ("  q100 versions (compare all): core in service, independent OUT (disagreed 3 times "
            "in a row); core+independent agreed 6, mismatches 3") in control.render_status(answer)
    assert ("queue 100: ESP version independent out of service (disagreed 3 times in a row); its "
            "SAs' traffic is dropped until the worker restarts") in supervisor.warnings(
                answer["workers"])
    answer["workers"][0]["versions"]["fallback"] = True  # type: ignore[index]
    assert any(w.endswith("the core carries on until the worker restarts")
               for w in supervisor.warnings(answer["workers"]))
    answer["workers"][0]["versions"] = None
    assert "versions" not in control.render_status(answer)
    assert not any("ESP version" in w for w in supervisor.warnings(answer["workers"]))


def test_versions_and_compare_change_only_with_a_restart() -> None:
    cfg = load_config(EXAMPLES / "host-a.toml", online_cpus=[0, 1])
    other = dataclasses.replace(cfg, daemon=dataclasses.replace(
        cfg.daemon, versions=("core", "independent"), compare="all", compare_fallback=True))
    assert supervisor.reload_problems(cfg, other) == [
        "daemon.versions: a change needs a restart", "daemon.compare: a change needs a restart",
        "daemon.compare_fallback: a change needs a restart"]
    spec = worker_spec(other, other.daemon.queues[0])
    assert (spec.versions, spec.compare, spec.compare_fallback) == (
        ("core", "independent"), "all", True)


# -- three versions: the core's source beside it, and majority ----------------------------------
def states(v: Versions) -> dict[str, dict[str, object]]:
    return {x["name"]: dict(x) for x in v.snapshot()["versions"]}


def pairs(v: Versions) -> dict[str, tuple[int, int]]:
    return {"+".join(p["versions"]): (p["agreed"], p["mismatches"]) for p in v.snapshot()["pairs"]}


def alone_packets(n: int) -> list[bytes | None]:
    s = spec("off")
    core = Processor(s.spd(), s.sas, 0.0)
    return [core.process(PLAIN, len(PLAIN), LEAVING, 0.0).packet for _ in range(n)]


def test_the_cores_source_is_a_version_of_its_own_that_agrees() -> None:
    v, b = build("majority", names=THREE), peer()
    source = v.others[1].engine
    assert type(source).__module__ == "nfq_ipsec.core_as_source.processor"
    assert type(source) is not Processor  # its own classes, beside the compiled ones
    assert [out(v)[2] for _ in range(3)] == alone_packets(3)
    esp = esp_from_b(b)
    assert inb(v, esp) == (Verdict.ACCEPT, None, BACK)
    assert inb(v, esp)[:2] == (Verdict.DROP, DropReason.REPLAY)
    assert pairs(v) == {"core+independent": (5, 0), "core+core-source": (5, 0),
                        "independent+core-source": (5, 0)}
    assert source.sad.by_name(OUT).next_seq == v.sad.by_name(OUT).next_seq == 4


@pytest.mark.parametrize("fault", ["flip-byte", "wrong-seq", "flip-byte@core-source",
                                   "wrong-seq@core-source"], indirect=True)
def test_majority_outvotes_one_faulty_version_and_traffic_flows(
        fault: str, caplog: pytest.LogCaptureFixture) -> None:
    bad = fault.partition("@")[2] or "independent"
    good = "core-source" if bad == "independent" else "independent"
    v = build("majority", names=THREE)
    caplog.set_level(logging.WARNING, "nfq_ipsec.versions")
    count = MISMATCH_LIMIT + 3
    answers = [out(v) for _ in range(count)]
    assert [a[2] for a in answers] == alone_packets(count)  # every one left, the core's bytes
    st = states(v)
    assert (st[bad]["in_service"], st[bad]["outvoted"], st[bad]["out_reason"]) == (
        False, MISMATCH_LIMIT, f"disagreed {MISMATCH_LIMIT} times in a row")
    assert st["core"]["in_service"] and st[good]["in_service"] and st[good]["outvoted"] == 0
    p = pairs(v)
    assert p[f"core+{good}"] == (count, 0)
    assert p[f"core+{bad}"] == (0, MISMATCH_LIMIT) and sorted(p.values())[0] == (0, MISMATCH_LIMIT)
    assert v.snapshot()["sa_mismatches"] == {OUT: MISMATCH_LIMIT}
    assert not v.drops[DropReason.VERSION_MISMATCH] and not v.drops[DropReason.VERSION_OUT]
    lines = [r.getMessage() for r in caplog.records]
    assert f"versions core and {bad} disagree on a packet of SA {OUT}" in lines[0]
    assert f"outvoted, the answer of core, {good} leaves" in lines[0]
    assert f"version {bad} taken out of service" in lines[-1]


@pytest.mark.parametrize("fault", ["accept-drop@core-source", "skip-replay@core-source",
                                   "accept-drop", "skip-replay"], indirect=True)
def test_majority_drops_a_replay_one_version_would_accept(fault: str) -> None:
    v, b = build("majority", names=THREE), peer()
    esp = esp_from_b(b)
    assert inb(v, esp) == (Verdict.ACCEPT, None, BACK)
    assert inb(v, esp)[:2] == (Verdict.DROP, DropReason.REPLAY)  # the majority's drop, as is
    assert v.drops[DropReason.REPLAY] == 1 and not v.drops[DropReason.VERSION_MISMATCH]
    bad = fault.partition("@")[2] or "independent"
    assert states(v)[bad]["outvoted"] == 1 and states(v)[bad]["streak"] == 1


@pytest.mark.parametrize("fault", ["raise", "raise@core-source"], indirect=True)
def test_majority_takes_a_raising_version_out_and_goes_on_as_all(fault: str) -> None:
    bad = fault.partition("@")[2] or "independent"
    v = build("majority", names=THREE)
    assert [out(v)[2] for _ in range(3)] == alone_packets(3)
    st = states(v)
    assert (st[bad]["in_service"], st[bad]["errors"], st[bad]["out_reason"]) == (
        False, 1, "raised RuntimeError")
    assert sum(a for a, _ in pairs(v).values()) == 3  # the two left agreed on each
    assert v.snapshot()["compared"] == 3


def test_majority_with_two_left_is_all_and_with_one_left_fails_closed() -> None:
    v = build("majority", names=THREE)
    undo = patch_version("raise", "core-source")
    try:
        out(v)
    finally:
        undo()
    undo = patch_version("flip-byte")  # two left: a disagreement drops, as with all
    try:
        assert out(v) == (Verdict.DROP, DropReason.VERSION_MISMATCH, None)
        assert states(v)["independent"]["outvoted"] == 0  # no majority of two
        for _ in range(MISMATCH_LIMIT - 1):
            out(v)
    finally:
        undo()
    assert not states(v)["independent"]["in_service"]
    assert out(v) == (Verdict.DROP, DropReason.VERSION_OUT, None)  # the core alone: closed
    w = build("majority", True, THREE)
    for target in ("independent", "core-source"):
        undo = patch_version("raise", target)
        try:
            out(w)
        finally:
            undo()
    assert out(w)[0] is Verdict.ACCEPT  # compare_fallback: the core carries on alone


@pytest.mark.parametrize("fault", ["flip-byte@core-source"], indirect=True)
def test_all_with_three_versions_drops_and_blames_the_odd_one(fault: str) -> None:
    v = build("all", names=THREE)
    assert out(v) == (Verdict.DROP, DropReason.VERSION_MISMATCH, None)
    st = states(v)
    assert (st["core"]["streak"], st["independent"]["streak"], st["core-source"]["streak"]) == (
        0, 0, 1)
    assert st["core-source"]["outvoted"] == 0  # dropped, not outvoted


class _WrongCore:
    """The compiled core with a fault of its own (its classes can't be patched): every ESP
    packet it seals has a flipped byte."""

    inner: Processor

    def __init__(self, core: Processor) -> None:
        self.__dict__["inner"] = core

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: object) -> None:
        setattr(self.inner, name, value)

    def process(self, data: bytes, length: int, where: int, now: float) -> Result:
        res = self.inner.process(data, length, where, now)
        if where == LEAVING and res.packet:
            at = len(res.packet) - 20
            res.packet = res.packet[:at] + bytes((res.packet[at] ^ 1,)) + res.packet[at + 1:]
        return res


def test_majority_outvotes_the_core_then_fails_closed_once_it_is_out(
        caplog: pytest.LogCaptureFixture) -> None:
    s = spec("majority", names=THREE)
    core = Processor(s.spd(), s.sas, 0.0, mtu=s.mtu)
    v = versions.build(s, cast(Processor, _WrongCore(core)), 0.0, lambda: 0.0)
    assert isinstance(v, Versions)
    good = alone_packets(MISMATCH_LIMIT)
    answers = [out(v) for _ in range(MISMATCH_LIMIT)]
    assert [a[2] for a in answers[:-1]] == good[:-1]  # the majority's right bytes left
    assert answers[-1] == (Verdict.DROP, DropReason.VERSION_OUT, None)  # then the core is out
    st = states(v)
    assert (st["core"]["in_service"], st["core"]["outvoted"]) == (False, MISMATCH_LIMIT)
    assert out(v) == (Verdict.DROP, DropReason.VERSION_OUT, None)
    assert v.drops[DropReason.VERSION_OUT] == 2
    assert "version core taken out of service" in caplog.text


def test_three_versions_keep_their_state_through_a_reload() -> None:
    v, b = build("majority", names=THREE), peer()
    q = FakeQueue()
    h = PacketHandler(v, q, 0x10000000, clock=lambda: 1.0)  # type: ignore[arg-type]
    h.handle_batch([QueuedPacket(1, HOOK_LOCAL_OUT, PLAIN, len(PLAIN), 0, 0),
                    arriving(2, esp_from_b(b))])
    h.reload(spec("majority", names=THREE), 2.0)
    h.commit_reload()
    h.handle_batch([QueuedPacket(3, HOOK_LOCAL_OUT, PLAIN, len(PLAIN), 0, 0),
                    arriving(4, esp_from_b(b))])
    assert [a for _, a, _ in q.verdicts] == [True] * 4
    new = h.processor
    assert isinstance(new, Versions) and new is not v
    assert new.others[1].engine.sad.by_name(OUT).next_seq == 3  # kept across the reload
    assert set(pairs(new).values()) == {(4, 0)}


def test_warnings_say_what_carries_on_with_three_versions() -> None:
    answer = cast(StatusReport, sample_answer())
    w = answer["workers"][0]
    v = w["versions"]
    assert v is not None
    v["compare"] = "majority"
    v["versions"].append({"name": "core-source", "in_service": True, "out_reason": None,
                          "errors": 0, "abstained": 0, "streak": 0, "outvoted": 0})
    assert any(x.endswith("(disagreed 3 times in a row); core and core-source carry on until "
                          "the worker restarts") for x in supervisor.warnings(answer["workers"]))
    v["versions"][2].update({"in_service": False, "out_reason": "raised RuntimeError"})
    assert any(x.endswith("(raised RuntimeError); its SAs' traffic is dropped until the worker "
                          "restarts") for x in supervisor.warnings(answer["workers"]))
    v["versions"][0].update({"in_service": False, "out_reason": "disagreed 3 times in a row"})
    v["fallback"] = True  # the core out: no fallback helps
    assert all("carries on" not in x for x in supervisor.warnings(answer["workers"])
               if "ESP version" in x)
    v["versions"][2]["outvoted"] = 2
    assert "core-source OUT (raised RuntimeError) outvoted 2" in control.render_status(answer)

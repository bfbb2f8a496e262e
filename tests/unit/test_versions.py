"""The comparator of ESP versions (``nfq_ipsec.versions``: ``daemon.versions``,
``daemon.compare``): agreement, each kind of disagreement, a version that raises or keeps
disagreeing taken out, fail closed with one version left, sampling, a reload, and the worker
that builds it. Faults are injected into the independent version from outside
(tests/faults, as a real daemon's are)."""

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
from nfq_ipsec.core import DropReason, Processor, Verdict
from nfq_ipsec.core.processor import ARRIVING, LEAVING
from nfq_ipsec.nfqueue import HOOK_LOCAL_OUT, HOOK_PRE_ROUTING, QueuedPacket
from nfq_ipsec.status import StatusReport
from nfq_ipsec.supervisor import worker_spec
from nfq_ipsec.versions import MISMATCH_LIMIT, Versions
from nfq_ipsec.worker import PacketHandler, WorkerSpec

A, B = "192.168.56.10", "192.168.56.11"
OUT, IN = "a-to-b-0", "b-to-a-0"  # host-a's SAs on queue 100


def spec(compare: str = "all", fallback: bool = False) -> WorkerSpec:
    cfg = load_config(EXAMPLES / "host-a.toml", online_cpus=[0, 1])
    return dataclasses.replace(worker_spec(cfg, cfg.daemon.queues[0]),
                               versions=("core", "independent"), compare=compare,
                               compare_fallback=fallback)


def build(compare: str = "all", fallback: bool = False) -> Versions:
    s = spec(compare, fallback)
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
    undo = patch_version(request.param)
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
    assert versions.difference(v.core.process(esp, len(esp), ARRIVING, 0.0),
                               other_reason(esp, len(esp), ARRIVING, 0.0)) == "drop reason"


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

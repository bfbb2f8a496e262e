"""The IKE SA state machine, initiator against responder in memory: IKE_SA_INIT and IKE_AUTH
with a pre-shared key bring up mirrored Child SAs; lost messages are retransmitted and
answered alike; a wrong DH guess, a wrong key, a wrong identity, an unacceptable proposal or
selector each end the way RFC 7296 says; forged and random datagrams change nothing."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ikepeers import ESP_CBC, ESP_GCM, LAN_A, LAN_B, T, cfg, events, ike, pair, run, shuttle, up

from nfq_ipsec.ike import selectors
from nfq_ipsec.ike.errors import Notify
from nfq_ipsec.ike.message import (
    PT,
    Exchange,
    Header,
    NotifyPayload,
    decode_message,
    encode_message,
)
from nfq_ipsec.ike.proposal import (
    Encr,
    Group,
    SAPayload,
    TransformType,
)
from nfq_ipsec.ike.session import (
    RETRANSMIT_TRIES,
    IkeSession,
    Output,
    PeerConfig,
    Role,
    State,
)


@pytest.mark.parametrize(("group", "esp"), [(Group.CURVE25519, ESP_GCM), (Group.ECP_256, ESP_CBC),
                                            (Group.ECP_384, ESP_GCM)])
def test_a_child_sa_comes_up_mirrored_on_both_sides(group: int, esp: SAPayload) -> None:
    i, r = pair(cfg("a", "b", ike_p=ike(group), esp=esp), cfg("b", "a", ike_p=ike(group), esp=esp))
    outs = run(i, r, i.start(0.0))
    assert events(outs).count("established") == 2, events(outs)
    assert i.state is State.ESTABLISHED and r.state is State.ESTABLISHED
    ci, cr = i.child, r.child
    assert ci is not None and cr is not None
    assert (ci.spi_in, ci.spi_out) == (cr.spi_out, cr.spi_in) and ci.spi_in != ci.spi_out
    assert ci.keys_out == cr.keys_in and ci.keys_in == cr.keys_out and ci.keys_in != ci.keys_out
    assert ci.local_ts == cr.remote_ts == (LAN_A,) and ci.remote_ts == cr.local_ts == (LAN_B,)
    assert "keys" not in repr(ci) and ci.keys_in[0].hex() not in repr(ci)
    assert i.keys is not None and r.keys is not None and i.keys == r.keys


def test_transport_mode_is_agreed_by_notify() -> None:
    i, r = pair(cfg("a", "b", transport=True), cfg("b", "a", transport=True))
    run(i, r, i.start(0.0))
    assert i.child is not None and i.child.transport and r.child is not None and r.child.transport
    i, r = pair(cfg("a", "b", transport=True), cfg("b", "a"))
    outs = run(i, r, i.start(0.0))
    assert i.child is None and r.child is None and i.state is State.ESTABLISHED
    assert any("transport mode asked for and not configured" in e for e in events(outs))


def test_a_wrong_dh_guess_is_corrected_by_invalid_ke_payload() -> None:
    i, r = pair(cfg("a", "b", ike_p=ike(Group.ECP_256, Group.CURVE25519)),
                cfg("b", "a", ike_p=ike(Group.CURVE25519)))
    first = i.start(0.0)
    assert decode_message(first.send[0]).find(PT.KE)[0].group == Group.ECP_256  # type: ignore[union-attr]
    outs = run(i, r, first)
    assert events(outs).count("established") == 2
    assert i.chosen is not None and i.chosen.one(TransformType.DH) == T(4, Group.CURVE25519)


@pytest.mark.parametrize("lost", [1, 2, 3, 4])
def test_a_lost_datagram_is_sent_again_and_answered_alike(lost: int) -> None:
    i, r = pair(cfg("a", "b"), cfg("b", "a"))
    outs = run(i, r, i.start(0.0), lose={lost})
    assert events(outs).count("established") == 2, events(outs)
    assert i.child is not None and r.child is not None and i.child.keys_out == r.child.keys_in


def test_an_unanswered_request_fails_after_the_last_try() -> None:
    i, _ = pair(cfg("a", "b"), cfg("b", "a"))
    sends = len(i.start(0.0).send)
    now, out = 0.0, Output()
    while i.state is not State.FAILED and now < 600:
        now += 0.5
        out = i.tick(now)
        sends += len(out.send)
    assert sends == RETRANSMIT_TRIES and "no answer to message 0" in events([out])[0]
    assert now >= 1 + 2 + 4 + 8 + 16  # exponential back-off


def test_a_wrong_psk_is_refused_and_both_sides_say_so() -> None:
    i, r = pair(cfg("a", "b", psk=b"first-secret"), cfg("b", "a", psk=b"second-secret"))
    outs = run(i, r, i.start(0.0))
    ev = events(outs)
    assert "failed:the peer's AUTH does not verify (pre-shared key)" in ev
    assert "failed:the peer refused our authentication (AUTHENTICATION_FAILED)" in ev
    assert i.child is None and r.child is None and b"first-secret" not in repr(i.cfg).encode()


def test_an_unexpected_identity_is_refused() -> None:
    i, r = pair(cfg("mallory", "b"), cfg("b", "a"))
    assert "failed:the peer's identity is not the configured one" in events(run(i, r, i.start(0.0)))


def test_a_proposal_without_common_ground_is_refused_naming_it() -> None:
    i, r = pair(cfg("a", "b", ike_p=ike(Group.CURVE25519, encr=(Encr.AES_CBC, 128))),
                cfg("b", "a"))
    ev = events(run(i, r, i.start(0.0)))
    assert any(e.startswith("failed:IKE_SA_INIT refused: proposal 1: no acceptable ENCR") for e in ev), ev
    assert "failed:the peer refused IKE_SA_INIT: NO_PROPOSAL_CHOSEN" in ev


def test_selectors_are_narrowed_and_disjoint_ones_refused() -> None:
    wide_a, wide_b = selectors.from_prefix("10.0.0.0/8"), selectors.from_prefix("10.0.0.0/8")
    i, r = pair(cfg("a", "b", local=(wide_a,), remote=(wide_b,)), cfg("b", "a"))
    run(i, r, i.start(0.0))
    assert i.child is not None and i.child.local_ts == (LAN_A,) and i.child.remote_ts == (LAN_B,)
    i, r = pair(cfg("a", "b", local=(selectors.from_prefix("192.168.0.0/24"),)), cfg("b", "a"))
    ev = events(run(i, r, i.start(0.0)))
    assert "failed:IKE SA up, no Child SA: the peer answered TS_UNACCEPTABLE" in ev


def test_informational_liveness_is_answered_and_a_delete_ends_the_sa() -> None:
    i, r = pair(cfg("a", "b"), cfg("b", "a"))
    run(i, r, i.start(0.0))
    ping = i.ping(1.0)
    answer = r.receive(ping.send[0], 1.0)
    assert len(answer.send) == 1 and r.state is State.ESTABLISHED
    assert r.receive(ping.send[0], 1.5).send == answer.send  # retransmission: the same answer
    assert [e.kind for e in i.receive(answer.send[0], 1.6).events] == ["alive"]
    outs = shuttle(i, r, i.delete(2.0))
    assert sorted(events(outs)) == ["deleted:the peer deleted the IKE SA", "deleted:we deleted the IKE SA"]
    assert r.state.value == "deleted" and i.state.value == "deleted" and not r.children


def test_an_unauthenticated_notify_does_not_tear_down_an_established_sa() -> None:
    i, r = pair(cfg("a", "b"), cfg("b", "a"))
    run(i, r, i.start(0.0))
    forged = encode_message(Header(r.spi_i, r.spi_r, 0, Exchange.INFORMATIONAL, 0x08, 2),
                            [NotifyPayload(Notify.AUTHENTICATION_FAILED)])
    assert r.receive(forged, 1.0).send == [] and r.state is State.ESTABLISHED
    assert sum(r.dropped.values()) == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=6), st.integers(0, 2**16))
def test_random_datagrams_never_raise_and_never_establish(noise: list[bytes], seed: int) -> None:
    i, r = pair(cfg("a", "b"), cfg("b", "a"), seed=seed)
    first = i.start(0.0)
    for data in noise + [first.send[0][:28] + n for n in noise]:
        for s in (i, r):
            out = s.receive(data, 0.5)
            assert all(e.kind != "established" for e in out.events)
    assert i.state is State.INIT_SENT


def test_a_real_random_source_works_too() -> None:
    i = IkeSession(Role.INITIATOR, cfg("a", "b"), os.urandom)
    r = IkeSession(Role.RESPONDER, cfg("b", "a"), os.urandom)
    assert events(run(i, r, i.start(0.0))).count("established") == 2


def test_nat_detection_moves_both_sides_to_port_4500_and_esp_in_udp() -> None:
    a_addr, b_addr = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])

    def with_addrs(c: PeerConfig, me: bytes, peer: bytes, force: bool = False) -> PeerConfig:
        from dataclasses import replace
        return replace(c, local_addr=me, remote_addr=peer, force_encap=force)

    i, r = pair(with_addrs(cfg("a", "b"), a_addr, b_addr), with_addrs(cfg("b", "a"), b_addr, a_addr))
    run(i, r, i.start(0.0))
    assert not i.nat and not r.nat and i.port == 500
    assert i.child is not None and not i.child.udp_encap
    i, r = pair(with_addrs(cfg("a", "b"), a_addr, b_addr, force=True),
                with_addrs(cfg("b", "a"), b_addr, a_addr))
    run(i, r, i.start(0.0))
    assert i.nat and r.nat and i.port == 4500 == r.port
    assert i.child is not None and r.child is not None and i.child.udp_encap and r.child.udp_encap
    # a NAT that rewrote the initiator's port: the responder sees another source
    i, r = pair(with_addrs(cfg("a", "b"), a_addr, b_addr), with_addrs(cfg("b", "a"), b_addr, a_addr))
    first = i.start(0.0)
    answer = r.receive(first.send[0], 0.0, source=(bytes([198, 51, 100, 7]), 31000))
    assert r.nat and r.port == 4500
    i.receive(answer.send[0], 0.0)
    assert i.nat and i.port == 4500


@pytest.mark.parametrize("by", ["initiator", "responder"])
def test_a_child_sa_rekey_makes_a_new_pair_then_deletes_the_old(by: str) -> None:
    i, r = up()
    asker, other = (i, r) if by == "initiator" else (r, i)
    old_in, old_keys = asker.child.spi_in, asker.child.keys_out  # type: ignore[union-attr]
    outs = shuttle(i, r, asker.rekey_child(old_in, 1.0), sender=asker)
    kinds = [e.kind for o in outs for e in o.events]
    assert kinds.count("rekeyed") == 2 and kinds.count("child_deleted") == 2, kinds
    new_a, new_o = asker.child, other.child
    assert new_a is not None and new_o is not None
    assert (new_a.spi_in, new_a.spi_out) == (new_o.spi_out, new_o.spi_in) and new_a.spi_in != old_in
    assert new_a.keys_out == new_o.keys_in and new_a.keys_out != old_keys
    assert list(asker.children) == [new_a.spi_in] and list(other.children) == [new_o.spi_in]
    assert asker.rekeys["child"] == 1 == other.rekeys["child"]
    # and the SA keeps working: a liveness check both ways
    assert "alive" in events(shuttle(i, r, i.ping(2.0)))
    assert "alive" in events(shuttle(i, r, r.ping(2.0), sender=r))


@pytest.mark.parametrize("by", ["initiator", "responder"])
def test_an_ike_sa_rekey_moves_everything_to_new_spis_and_keys(by: str) -> None:
    i, r = up()
    asker = i if by == "initiator" else r
    old_spis, old_keys = (i.spi_i, i.spi_r), i.keys
    child_before = dict(i.children)
    outs = shuttle(i, r, asker.rekey_ike(1.0), sender=asker)
    assert events(outs).count("ike_rekeyed") == 2, events(outs)
    assert (i.spi_i, i.spi_r) == (r.spi_i, r.spi_r) != old_spis and i.keys == r.keys != old_keys
    assert i.children == child_before  # the Child SAs moved over unchanged
    # the rekeying side is the new SA's original initiator; the old SA's delete went through
    assert asker.role is Role.INITIATOR and (r if asker is i else i).role is Role.RESPONDER
    assert i._old_sa is None and r._old_sa is None
    assert "alive" in events(shuttle(i, r, i.ping(2.0)))
    outs = shuttle(i, r, r.rekey_child(r.child.spi_in, 3.0), sender=r)  # type: ignore[union-attr]
    assert [e.kind for o in outs for e in o.events].count("rekeyed") == 2
    assert i.child is not None and r.child is not None and i.child.keys_out == r.child.keys_in


def test_requests_queue_behind_the_one_in_flight() -> None:
    i, r = up()
    first = i.rekey_child(i.child.spi_in, 1.0)  # type: ignore[union-attr]
    assert i.ping(1.0).send == []  # queued: window size 1
    outs = shuttle(i, r, first)
    kinds = [e.kind for o in outs for e in o.events]
    assert kinds.count("rekeyed") == 2 and "alive" in kinds and kinds.count("child_deleted") == 2


def test_a_rekey_of_an_unknown_child_is_refused_with_child_sa_not_found() -> None:
    i, r = up()
    kept = i.child
    assert kept is not None
    ghost = kept.spi_in
    shuttle(i, r, i.delete_child(ghost, 1.0))
    assert not i.children and not r.children
    i.children[ghost] = kept  # i forgets it deleted it
    outs = shuttle(i, r, i.rekey_child(ghost, 2.0))
    assert any("CHILD_SA_NOT_FOUND" in e for e in events(outs)), events(outs)


def timed(rekey_time: float = 0.0, child_rekey_time: float = 0.0,
          dpd_delay: float = 0.0) -> tuple[IkeSession, IkeSession]:
    from dataclasses import replace
    i, r = pair(replace(cfg("a", "b"), rekey_time=rekey_time, child_rekey_time=child_rekey_time,
                        dpd_delay=dpd_delay), cfg("b", "a"))
    run(i, r, i.start(0.0))
    return i, r


def clock(i: IkeSession, r: IkeSession, until: float, step: float = 0.25,
          deliver: bool = True) -> list[Output]:
    """Ticks the initiator until ``until``, delivering what it sends (or losing it all)."""
    outs, now = [], 0.0
    while now < until:
        now += step
        out = i.tick(now)
        outs += shuttle(i, r, out, now) if deliver else [out]
    return outs


def test_timers_rekey_the_child_and_the_ike_sa_on_time() -> None:
    i, r = timed(rekey_time=10.0, child_rekey_time=4.0)
    outs = clock(i, r, 21.0)
    ev = [e.kind for o in outs for e in o.events]
    assert ev.count("ike_rekeyed") == 4  # both sides, about at 10 and 20 s
    assert i.rekeys["child"] >= 4 and i.rekeys["child"] == r.rekeys["child"]
    assert len(i.children) == 1 and i.child is not None and r.child is not None
    assert i.child.keys_out == r.child.keys_in


def test_liveness_checks_when_idle_and_a_dead_peer_fails_the_sa() -> None:
    i, r = timed(dpd_delay=2.0)
    ev = [e.kind for o in clock(i, r, 7.0) for e in o.events]
    assert ev.count("alive") == 3 and i.state is State.ESTABLISHED
    outs = clock(i, r, 80.0, deliver=False)  # the peer went away
    failed = [e.detail for o in outs for e in o.events if e.kind == "failed"]
    assert failed and "(ping) after 5 sends" in failed[0] and i.state.value == "failed"


def _deliver(to: IkeSession, data: list[bytes], now: float = 1.0) -> list[Output]:
    return [to.receive(d, now) for d in data]


@pytest.mark.parametrize("seed", range(12))
def test_simultaneous_child_sa_rekeys_leave_one_pair(seed: int) -> None:
    """Both ends rekey the same Child SA at once (RFC 7296 section 2.8.1): each answers the
    other's request, then gets its own answer. The SA made by the exchange with the lowest of
    the four nonces is deleted by the end that started that exchange, the old SA by both, and
    both ends are left with the same one pair, keys agreeing, and it carries on."""
    i, r = pair(cfg("a", "b"), cfg("b", "a"), seed=seed)
    run(i, r, i.start(0.0))
    assert i.child is not None and r.child is not None
    old_i, old_r = i.child.spi_in, r.child.spi_in
    req_i, req_r = i.rekey_child(old_i, 1.0), r.rekey_child(old_r, 1.0)
    assert len(req_i.send) == len(req_r.send) == 1
    ans_to_r = _deliver(i, req_r.send)  # each answers the other's request first
    ans_to_i = _deliver(r, req_i.send)
    outs = ans_to_r + ans_to_i
    # then the answers; what they set off (Deletes) goes back and forth to the end
    for o in ans_to_r:
        outs += shuttle(i, r, Output(send=o.send), sender=i)
    for o in ans_to_i:
        outs += shuttle(i, r, Output(send=o.send), sender=r)
    kinds = events(outs)
    assert kinds.count("rekeyed") == 4, kinds  # two exchanges, each seen by both ends
    assert i.rekeys["child"] == r.rekeys["child"] == 2
    assert old_i not in i.children and old_r not in r.children
    assert len(i.children) == len(r.children) == 1, (i.children, r.children)
    (ci,), (cr,) = i.children.values(), r.children.values()
    assert (ci.spi_in, ci.spi_out) == (cr.spi_out, cr.spi_in) and ci.keys_out == cr.keys_in
    assert "alive" in events(shuttle(i, r, i.ping(2.0)))


def test_a_lone_rekey_leaves_no_record_behind() -> None:
    """The rekey records that find simultaneous rekeys go with the old SA: none piles up."""
    i, r = up()
    for k in range(5):
        shuttle(i, r, i.rekey_child(i.child.spi_in, 1.0 + k))  # type: ignore[union-attr]
    assert i._rekeys_of == {} and r._rekeys_of == {}
    assert i.rekey_collisions == r.rekey_collisions == 0


@pytest.mark.parametrize("seed", range(12))
def test_a_rekey_answered_before_the_peers_own_request_arrives(seed: int) -> None:
    """The same, staggered: i's rekey is answered and i's Delete of the old SA is on its way
    when r's rekey request (sent before r saw i's) arrives; still one pair at the end."""
    i, r = pair(cfg("a", "b"), cfg("b", "a"), seed=seed)
    run(i, r, i.start(0.0))
    assert i.child is not None and r.child is not None
    req_i, req_r = i.rekey_child(i.child.spi_in, 1.0), r.rekey_child(r.child.spi_in, 1.0)
    (answer_to_i,) = _deliver(r, req_i.send)
    (after_answer,) = _deliver(i, answer_to_i.send)  # i done: its Delete of the old SA goes out
    (answer_to_r,) = _deliver(i, req_r.send)  # r's request, sent before r saw i's
    outs = shuttle(i, r, Output(send=after_answer.send), sender=i)
    outs += shuttle(i, r, Output(send=answer_to_r.send), sender=i)
    assert len(i.children) == len(r.children) == 1, (events(outs), i.children, r.children)
    (ci,), (cr,) = i.children.values(), r.children.values()
    assert (ci.spi_in, ci.spi_out) == (cr.spi_out, cr.spi_in) and ci.keys_out == cr.keys_in
    assert i.rekey_collisions == r.rekey_collisions == 1
    assert "alive" in events(shuttle(i, r, r.ping(2.0), sender=r))


# -- hard lifetimes (section 2.8: the rekey times are soft) -----------------------------------

def lived(rekey_time: float = 0.0, child_rekey_time: float = 0.0, life_time: float = 0.0,
          child_life_time: float = 0.0) -> tuple[IkeSession, IkeSession]:
    from dataclasses import replace
    i, r = pair(replace(cfg("a", "b"), rekey_time=rekey_time, child_rekey_time=child_rekey_time,
                        life_time=life_time, child_life_time=child_life_time), cfg("b", "a"))
    run(i, r, i.start(0.0))
    return i, r


def kinds(outs: list[Output]) -> list[str]:
    return [e.kind for o in outs for e in o.events]


def test_sas_that_rekey_in_time_never_reach_their_hard_lifetime() -> None:
    i, r = lived(rekey_time=10.0, child_rekey_time=4.0, life_time=12.0, child_life_time=5.0)
    assert i.expires == 12.0 and list(i.child_expiries.values()) == [5.0]
    ev = kinds(clock(i, r, 31.0))
    assert "child_expired" not in ev and "failed" not in ev, ev
    assert ev.count("ike_rekeyed") == 6 and i.state is State.ESTABLISHED
    assert i.expires > 30.0  # each rekey gave the new IKE SA its own
    assert len(i.children) == 1 and i.child is not None and r.child is not None
    assert set(i.child_expiries) == set(i.children)  # only the live Child SA has one


def test_a_child_sa_whose_rekey_fails_is_deleted_at_its_hard_lifetime() -> None:
    i, r = lived(child_rekey_time=4.0, child_life_time=6.0)
    first = i.child
    assert first is not None
    outs = clock(i, r, 5.0, deliver=False)  # the rekey request goes nowhere
    assert "child_expired" not in kinds(outs) and first.spi_in in i.children
    outs = clock(i, r, 7.0, deliver=False)
    expired = [e for o in outs for e in o.events if e.kind == "child_expired"]
    assert [e.old_spi for e in expired] == [first.spi_in]
    assert "hard lifetime (6 s)" in expired[0].detail
    assert i.children == {} and i.child_expiries == {} and i.state is State.ESTABLISHED


def test_a_child_sa_without_rekeys_is_deleted_at_its_hard_lifetime_on_both_sides() -> None:
    i, r = lived(child_life_time=5.0)
    outs = clock(i, r, 4.75)
    assert "child_expired" not in kinds(outs)
    outs = clock(i, r, 5.25)  # ticks to 5.25 again: the expiry and its Delete, answered
    ev = kinds(outs)
    assert ev.count("child_expired") == 1 and "child_deleted" in ev, ev
    assert i.children == {} and r.children == {}
    assert i.state is State.ESTABLISHED and r.state is State.ESTABLISHED


def test_an_ike_sa_whose_rekey_fails_fails_at_its_hard_lifetime_with_its_child_sas() -> None:
    i, r = lived(rekey_time=10.0, life_time=12.0)
    outs = clock(i, r, 11.5, deliver=False)  # the rekey request is retransmitted, unanswered
    assert "failed" not in kinds(outs) and i.state is State.ESTABLISHED
    outs = clock(i, r, 12.5, deliver=False)
    failed = [e.detail for o in outs for e in o.events if e.kind == "failed"]
    assert failed and "hard lifetime (12 s)" in failed[0], failed
    assert i.state.value == "failed" and i.children == {}
    assert i.tick(20.0).send == []  # nothing more: no retransmission of the abandoned rekey


def test_an_ike_sa_at_its_hard_lifetime_with_a_free_window_sends_its_delete() -> None:
    i, r = lived(life_time=3.0)
    outs = clock(i, r, 3.25)
    assert "failed" in kinds(outs) and "deleted" in kinds(outs)  # the peer got the Delete
    assert i.state is State.FAILED and r.state is State.DELETED and r.children == {}

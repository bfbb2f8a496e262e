"""The keying agent without sockets (``nfq_ipsec.agent.Agent``), two of them in memory: a
connection comes up from the configuration, its Child SA goes to the supervisor as messages,
becomes the data plane's SAs in the configuration the workers run (``childsas``), is rekeyed
and terminated; nothing it logs or reports holds a key or the PSK."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path
from typing import Any

import pytest
from configs import CPUS, PSK, connection_data
from statusschema import check_level

from nfq_ipsec import childsas, rules
from nfq_ipsec.agent import Agent, Send, agent_spec
from nfq_ipsec.childsas import Negotiated
from nfq_ipsec.config import parse_config
from nfq_ipsec.config.model import Config
from nfq_ipsec.core.sa import Encapsulation, Mode, SADirection
from nfq_ipsec.ike.child import ChildSA
from nfq_ipsec.ike.message import Exchange


def mirrored(tmp_path: Path, **conn: Any) -> tuple[Config, Config]:
    """Gateway a (192.0.2.1, LAN 10.1.0.0/24, starts) and its mirror b (192.0.2.2, waits)."""
    a = connection_data(tmp_path, start_action="start", **conn)
    b = connection_data(tmp_path, **conn)
    b["connection"][0].update(local="192.0.2.2", remote="192.0.2.1")
    b["policy"][1].update(local="10.2.0.0/24", remote="10.1.0.0/24")
    b["policy"][0].update(local="10.0.0.2/32", remote="10.0.0.1/32")
    b["sa"][0]["key"], b["sa"][1]["key"] = a["sa"][1]["key"], a["sa"][0]["key"]
    return tuple(parse_config(d, base_dir=tmp_path, online_cpus=CPUS) for d in (a, b))  # type: ignore[return-value]


def agent(cfg: Config, seed: int) -> Agent:
    spec = agent_spec(cfg)
    assert spec is not None
    rng = random.Random(seed)
    return Agent(spec, lambda n: bytes(rng.getrandbits(8) for _ in range(n)), 0.0, clock=lambda: 1e9)


def shuttle(a: Agent, b: Agent, sends: list[Send], now: float, frm: Agent) -> int:
    """Carry datagrams between a and b until nobody sends; how many went."""
    queue = [(frm, s) for s in sends]
    n = 0
    while queue:
        sender, (port, dest, data) = queue.pop(0)
        to = b if sender is a else a
        src = next(iter(sender.conns.values())).spec.local
        assert dest[0] == next(iter(to.conns.values())).spec.local
        queue += [(to, s) for s in to.receive(data, (src, port), port, now)]
        n += 1
    return n


def test_a_connection_comes_up_and_its_child_sa_reaches_the_workers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="nfq_ipsec")
    cfg_a, cfg_b = mirrored(tmp_path)
    a, b = agent(cfg_a, 1), agent(cfg_b, 2)
    assert b.start(0.0) == []  # start_action "none" waits
    assert shuttle(a, b, a.start(0.0), 0.0, a) == 4  # IKE_SA_INIT and IKE_AUTH
    ((kind_a, name_a, child_a),) = a.messages
    ((kind_b, name_b, child_b),) = b.messages
    assert (kind_a, name_a, kind_b, name_b) == ("child_up", "site", "child_up", "site")
    assert isinstance(child_a, ChildSA) and isinstance(child_b, ChildSA)
    assert (child_a.spi_in, child_a.spi_out) == (child_b.spi_out, child_b.spi_in)
    assert child_a.keys_out == child_b.keys_in and child_a.keys_in == child_b.keys_out

    eff_a = childsas.effective(cfg_a, {"site": [Negotiated(child_a)]}, 0.0)
    eff_b = childsas.effective(cfg_b, {"site": [Negotiated(child_b)]}, 0.0)
    lans = next(p for p in eff_a.policies if p.name == "lans")
    out_a = eff_a.sa(lans.sa_names[0])
    in_b = next(sa for sa in eff_b.sas if sa.direction is SADirection.IN and sa.spi == out_a.spi)
    assert out_a.direction is SADirection.OUT and out_a.key == in_b.key
    assert (out_a.encryption, out_a.mode, out_a.tunnel_local, out_a.tunnel_remote) == (
        "aes-gcm-128", Mode.TUNNEL, cfg_a.connections[0].local, cfg_a.connections[0].remote)
    assert out_a.encapsulation is Encapsulation.NONE
    assert out_a.queue == childsas.queue_for(child_a.spi_in, cfg_a.queue_numbers)
    assert eff_a.sas[:2] == cfg_a.sas  # the static SAs stay as they were
    ruleset = rules.render(eff_a)
    assert f"--espspi {child_a.spi_in} -j NFQUEUE" in ruleset
    assert f"outbound SA {out_a.name!r}" in ruleset

    report = a.report(0.0)[0]
    assert report["name"] == "site" and report["ike_sas"][0]["state"] == "established"
    assert report["ike_sas"][0]["children"][0]["spi_in"] == f"0x{child_a.spi_in:08x}"
    seen: set[str] = set()
    check_level(json.loads(json.dumps(report)), "ike.connections[]", seen)  # as status sends it
    assert seen == {"ike.connections[]", "ike.connections[].ike_sas[]",
                    "ike.connections[].ike_sas[].children[]"}
    text = caplog.text + repr(a.report(0.0)) + repr(eff_a) + repr(child_a)
    for secret in (PSK, *(k.hex() for k in child_a.keys_in + child_a.keys_out if k)):
        assert secret not in text
    assert "connection site: Child SA established, SPIs in" in caplog.text


def test_rekey_keeps_the_old_inbound_sa_until_its_delete(tmp_path: Path) -> None:
    cfg_a, cfg_b = mirrored(tmp_path)
    a, b = agent(cfg_a, 3), agent(cfg_b, 4)
    shuttle(a, b, a.start(0.0), 0.0, a)
    first = a.messages[0][2]
    a.messages.clear()
    session = next(iter(a.conns["site"].dispatcher.sessions.values())).session
    shuttle(a, b, a._handle(a.conns["site"], session.rekey_child(first.spi_in, 1.0), 500), 1.0, a)
    kinds = [(m[0], m[2] if m[0] == "child_down" else m[2].spi_in) for m in a.messages]
    new = a.messages[0][2]
    assert kinds == [("child_up", new.spi_in), ("child_down", first.spi_in)], kinds
    assert a.messages[1][3] is True  # deleted by an exchange: its inbound SA may linger

    def names(up: list[Negotiated], now: float) -> tuple[str, ...]:
        eff = childsas.effective(cfg_a, {"site": up}, now)
        return next(p for p in eff.policies if p.name == "lans").sa_names

    out_old, out_new = (childsas.sa_name("site", SADirection.OUT, c.spi_out) for c in (first, new))
    in_old, in_new = (childsas.sa_name("site", SADirection.IN, c.spi_in) for c in (first, new))
    # make before break: the successor's inbound SA at once, its outbound SA from send_from
    up = [Negotiated(first), Negotiated(new, send_from=5.0)]
    assert names(up, 1.0) == (out_old, in_old, in_new)
    assert names(up, 5.0) == (out_new, in_old, in_new)
    assert childsas.next_change({"site": up}, 1.0) == 5.0
    # deleted (its Delete came before the successor's send_from): it sends until then, its
    # inbound SA stays until retire_at
    up = [Negotiated(first, retire_at=8.0), Negotiated(new, send_from=5.0)]
    assert names(up, 2.0) == (out_old, in_old, in_new)
    assert names(up, 5.0) == (out_new, in_old, in_new)
    assert names(up, 8.0) == (out_new, in_new)
    assert childsas.next_change({"site": up}, 5.0) == 8.0
    assert childsas.next_change({"site": up}, 8.0) is None
    # the only one left deleted: nothing is sent, its inbound SA lingers, then the policy is shut
    assert names([Negotiated(first, retire_at=8.0)], 2.0) == (in_old,)
    assert names([Negotiated(first, retire_at=8.0)], 9.0) == ()


def test_terminate_takes_the_child_sas_out_at_once(tmp_path: Path) -> None:
    cfg_a, cfg_b = mirrored(tmp_path)
    a, b = agent(cfg_a, 5), agent(cfg_b, 6)
    shuttle(a, b, a.start(0.0), 0.0, a)
    spi = a.messages[0][2].spi_in
    a.messages.clear()
    b.messages.clear()
    sends = a.terminate("site", 2.0)
    assert a.messages == [("child_down", "site", spi, False)]  # at once, before any answer
    shuttle(a, b, sends, 2.0, a)
    assert [m[0] for m in b.messages] == ["child_down"]
    assert not a.active("site")
    assert a.initiate("site", 3.0)  # and it can come back
    assert a.active("site")


def test_a_child_sa_the_data_plane_cannot_hold_is_left_out(tmp_path: Path) -> None:
    cfg_a, cfg_b = mirrored(tmp_path, esp="aes256-sha512", encap=True)
    a, b = agent(cfg_a, 7), agent(cfg_b, 8)
    shuttle(a, b, a.start(0.0), 0.0, a)
    child = a.messages[0][2]
    eff = childsas.effective(cfg_a, {"site": [Negotiated(child)]}, 0.0)
    out = eff.sa(childsas.sa_name("site", SADirection.OUT, child.spi_out))
    assert (out.encryption, out.integrity, out.encapsulation) == (
        "aes-cbc-256", "hmac-sha512-256", Encapsulation.UDP)
    # an SPI a static SA has already: the pair is not installed, the policy stays closed
    clash = cfg_a.sas[1]
    assert clash.direction is SADirection.IN
    taken = childsas.effective(cfg_a, {"site": [Negotiated(ChildSA(
        clash.spi, child.spi_out, child.proposal, child.suite, child.keys_in, child.keys_out,
        child.local_ts, child.remote_ts, child.transport, child.udp_encap))]}, 0.0)
    assert taken == cfg_a


def test_the_ike_command_and_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from configs import toml_text

    from nfq_ipsec.cli import main as cli_main
    from nfq_ipsec.supervisor import Supervisor

    conf = tmp_path / "gw.toml"
    data = connection_data(tmp_path)
    data["daemon"]["control_socket"] = str(tmp_path / "none.sock")
    data["daemon"]["cpus"] = [0]
    conf.write_text(toml_text(data))
    conf.chmod(0o600)
    assert cli_main(["ike", "initiate", "elsewhere", "--config", str(conf)]) == 2
    assert "no connection 'elsewhere'" in capsys.readouterr().err
    assert cli_main(["ike", "terminate", "site", "--config", str(conf)]) == 3  # no daemon
    cfg = parse_config(data, base_dir=tmp_path, online_cpus=[0])
    sup = Supervisor(cfg, str(conf))
    assert sup.agent is not None and sup.agent.spec.connections[0].name == "site"
    assert PSK not in repr(sup.agent)
    assert sup.handle_request({"command": "ike", "action": "rekey", "name": "site"}) == {
        "error": "ike needs action initiate or terminate and a connection name"}
    assert sup.handle_request({"command": "ike", "action": "initiate", "name": "site"}) == {
        "error": "the daemon is starting; try again once it runs"}
    sup.state = "running"
    assert sup.handle_request({"command": "ike", "action": "initiate", "name": "site"}) == {
        "error": "the agent is stopped; try again once it is ready"}
    without = parse_config(dict(data, connection=[], policy=data["policy"][:1]),
                           base_dir=tmp_path, online_cpus=[0])
    assert Supervisor(without, str(conf)).agent is None


def test_a_nat_found_in_ike_sa_init_moves_the_ike_auth_request_to_4500(tmp_path: Path) -> None:
    cfg_a, cfg_b = mirrored(tmp_path, encap=True)  # encap claims a NAT, as strongSwan's does
    a, b = agent(cfg_a, 9), agent(cfg_b, 10)
    ((port, dest, init),) = a.start(0.0)
    assert (port, dest) == (500, ("192.0.2.2", 500))
    ((b_port, b_dest, answer),) = b.receive(init, ("192.0.2.1", 500), 500, 0.0)
    assert (b_port, b_dest) == (500, ("192.0.2.1", 500))
    ((port, dest, auth),) = a.receive(answer, ("192.0.2.2", 500), 500, 0.0)
    assert (port, dest) == (4500, ("192.0.2.2", 4500))
    ((b_port, b_dest, done),) = b.receive(auth, ("192.0.2.1", 4500), 4500, 0.0)
    assert (b_port, b_dest) == (4500, ("192.0.2.1", 4500))
    assert a.receive(done, ("192.0.2.2", 4500), 4500, 0.0) == []
    assert [m[0] for m in a.messages + b.messages] == ["child_up", "child_up"]
    assert a.messages[0][2].udp_encap and b.messages[0][2].udp_encap


def test_a_failed_exchange_is_logged_in_words_without_the_key(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nfq_ipsec")
    cfg_a, cfg_b = mirrored(tmp_path)
    spec = agent_spec(cfg_b)
    assert spec is not None
    (conn,) = spec.connections
    wrong = dataclasses.replace(conn, peer=dataclasses.replace(conn.peer, psk=b"another pre-shared key"))
    rng = random.Random(12)
    a = agent(cfg_a, 11)
    b = Agent(dataclasses.replace(spec, connections=(wrong,)),
              lambda n: bytes(rng.getrandbits(8) for _ in range(n)), 0.0)
    shuttle(a, b, a.start(0.0), 0.0, a)
    assert a.messages == [] and b.messages == []  # no Child SA either side
    last = [r["last"] for r in a.report(0.0) + b.report(0.0)]
    assert any(text is not None and text.startswith("IKE SA failed: ") for text in last), last
    assert "connection site: IKE SA failed: " in caplog.text
    for secret in (PSK, "another pre-shared key"):
        assert secret not in caplog.text and secret not in repr(a.report(0.0) + b.report(0.0))


def test_a_reload_keeps_an_unchanged_connection_and_restarts_a_changed_one(tmp_path: Path) -> None:
    """``Agent.reconfigure``: the same connection keeps its IKE and Child SAs; changed (a new
    rekey time), it is terminated (Child SAs down at once, the Delete to the peer) and
    negotiated again; gone, it is dropped."""
    cfg_a, cfg_b = mirrored(tmp_path)
    a, b = agent(cfg_a, 7), agent(cfg_b, 8)
    shuttle(a, b, a.start(0.0), 0.0, a)
    spi = a.messages[0][2].spi_in
    a.messages.clear()
    b.messages.clear()
    same = agent_spec(cfg_a)
    assert same is not None
    goodbye, hello = a.reconfigure(same, 1.0)
    assert (goodbye, hello, a.messages) == ([], [], []) and a.active("site")  # nothing moved
    conn = same.connections[0]
    changed = dataclasses.replace(same, connections=(dataclasses.replace(
        conn, peer=dataclasses.replace(conn.peer, rekey_time=conn.peer.rekey_time + 60)),))
    goodbye, hello = a.reconfigure(changed, 2.0)
    assert a.messages[0] == ("child_down", "site", spi, False)  # the old Child SAs out at once
    assert goodbye and hello  # the Delete of the old IKE SA, the new IKE_SA_INIT
    shuttle(a, b, goodbye, 2.0, a)
    a.messages.clear()
    shuttle(a, b, hello, 3.0, a)
    (up,) = [m for m in a.messages if m[0] == "child_up"]
    assert up[2].spi_in != spi  # negotiated again
    gone = dataclasses.replace(same, connections=())
    goodbye, hello = a.reconfigure(gone, 4.0)
    assert goodbye and not hello and a.conns == {} and a.by_remote == {}


def test_a_start_connection_the_peer_deleted_is_initiated_again(tmp_path: Path) -> None:
    """``start_action = "start"``: the peer deletes the IKE SA; A's Child SAs go down at once,
    and A initiates again after RETRY_MIN seconds (not before); once up, the wait is back to
    RETRY_MIN. A connection the operator terminated stays down."""
    from nfq_ipsec.agent import RETRY_MIN

    cfg_a, cfg_b = mirrored(tmp_path)
    a, b = agent(cfg_a, 9), agent(cfg_b, 10)
    shuttle(a, b, a.start(0.0), 0.0, a)
    first = a.messages[0][2].spi_in
    a.messages.clear()
    shuttle(a, b, b.terminate("site", 1.0), 1.0, b)  # B deletes: A is told
    assert ("child_down", "site", first, False) in a.messages
    assert not a.active("site")
    assert a.tick(1.1) == [] and a.tick(1.0 + RETRY_MIN) == []  # waiting
    again = a.tick(1.2 + RETRY_MIN)
    assert again, "no new IKE_SA_INIT after the wait"
    b.initiate("site", 0.0)  # B's operator said terminate: B answers all the same as responder
    a.messages.clear()
    shuttle(a, b, again, 1.2 + RETRY_MIN, a)
    (up,) = [m for m in a.messages if m[0] == "child_up"]
    assert up[2].spi_in != first and a.active("site")
    a.tick(2.0 + RETRY_MIN)
    assert a.conns["site"].backoff == 0.0  # up: the next outage waits RETRY_MIN again
    a.terminate("site", 20.0)  # its Delete goes unanswered here (retransmitted, then given up)
    later = [d for k in range(1, 30) for _, _, d in a.tick(20.0 + RETRY_MIN * k)]
    assert all(d[18] != Exchange.IKE_SA_INIT for d in later), "a terminated connection came back"
    assert not a.active("site")


def test_retries_back_off_to_the_cap(tmp_path: Path) -> None:
    from nfq_ipsec.agent import RETRY_MAX, RETRY_MIN

    cfg_a, _ = mirrored(tmp_path)
    a = agent(cfg_a, 11)
    conn = a.conns["site"]
    waits = []
    now = 0.0
    for _ in range(8):  # each attempt fails before the next: the wait doubles
        assert a._keep_up("site", conn, now) == []
        assert conn.retry_at is not None
        waits.append(conn.retry_at - now)
        now = conn.retry_at
        conn.retry_at = None  # the attempt went out and failed
    assert waits == [min(RETRY_MAX, RETRY_MIN * 2 ** k) for k in range(8)]


def test_a_child_sa_at_its_hard_lifetime_is_taken_out_at_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No rekey (rekey_time 0) and life_time 20 s: at 20 s the Child SA goes to the supervisor
    as down without lingering (its traffic is dropped), and status says when it would."""
    cfg_a, cfg_b = mirrored(tmp_path, rekey_time=0, life_time=20)
    a, b = agent(cfg_a, 5), agent(cfg_b, 6)
    shuttle(a, b, a.start(0.0), 0.0, a)
    child = a.messages[0][2]
    a.messages.clear()
    (sa,) = a.report(5.0)[0]["ike_sas"]
    assert sa["children"][0]["expires_in"] == 15.0 and sa["children"][0]["rekey_in"] is None
    assert sa["expires_in"] == round(4 * 3600 * 1.1 - 5.0, 1)  # ike_rekey_time's default + 10 %
    shuttle(a, b, a.tick(19.9), 19.9, a)
    assert a.messages == []
    shuttle(a, b, a.tick(20.1), 20.1, a)
    assert a.messages == [("child_down", "site", child.spi_in, False)]
    assert "expired: hard lifetime (20 s) reached without a rekey" in caplog.text
    assert [m[0] for m in b.messages[1:]] == ["child_down"]  # the peer got the Delete


def test_an_answer_that_makes_a_child_sa_waits_until_it_is_installed(tmp_path: Path) -> None:
    """As the responder (``hold``, as the process runs it), the IKE_AUTH answer and a rekey's
    answer leave only once the supervisor says the new inbound SA is installed, or after
    HOLD_MAX; the Child SA goes to the supervisor at once."""
    from nfq_ipsec.agent import HOLD_MAX

    cfg_a, cfg_b = mirrored(tmp_path)
    a, b = agent(cfg_a, 7), agent(cfg_b, 8)
    b.hold = True
    shuttle(a, b, a.start(0.0), 0.0, a)
    assert a.messages == [] and [m[0] for m in b.messages] == ["child_up"]  # answer held
    child_b = b.messages[0][2]
    assert b.installed({child_b.spi_in + 1}) == []  # not that one
    shuttle(a, b, b.installed({child_b.spi_in}), 0.1, b)
    assert [m[0] for m in a.messages] == ["child_up"] and b.held == []
    # a rekey a asks for: b's answer waits for the successor, then HOLD_MAX lets it go
    a.messages.clear()
    b.messages.clear()
    session = next(iter(a.conns["site"].dispatcher.sessions.values())).session
    first = a.messages[0][2] if a.messages else next(iter(session.children.values()))
    shuttle(a, b, a._handle(a.conns["site"], session.rekey_child(first.spi_in, 1.0), 500), 1.0, a)
    assert a.messages == [] and len(b.held) == 1
    assert b.tick(1.0 + HOLD_MAX / 2) == []
    shuttle(a, b, b.tick(1.0 + HOLD_MAX), 1.0 + HOLD_MAX, b)
    assert [m[0] for m in a.messages][:1] == ["child_up"] and b.held == []

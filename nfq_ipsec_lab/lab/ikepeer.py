"""A lab driver for the IKE core: one IKE SA over real UDP sockets, as initiator or responder.

Run inside a lab namespace (``python -m nfq_ipsec_lab.lab.ikepeer CONFIG.json``); it binds
UDP 500 and 4500 (with the non-ESP marker, RFC 3948), drives ``nfq_ipsec.ike.session``, and
writes what happened to the result file named in the config: events, every Child SA it made
(SPIs, encapsulation) and, because the lab compares them with the peer's, every IKE and Child
SA key. ``actions`` in the config ask for rekeys and liveness checks at given seconds;
``linger`` keeps it answering the peer's requests (its rekeys, its liveness checks) after that.
The result file is created 0600; it exists only in the lab's private work directory. This is
a test tool, not the keying agent: that runs under the supervisor.

Proposal strings follow strongSwan's (``aes256gcm16-prfsha256-x25519``, ``aes128-sha256``), so
a test can give both sides the same text.
"""

from __future__ import annotations

import ipaddress
import json
import os
import select
import socket
import sys
import time
from pathlib import Path
from typing import Any

from nfq_ipsec.agent import identity
from nfq_ipsec.ike import proposal_text, selectors
from nfq_ipsec.ike.child import ChildSA
from nfq_ipsec.ike.proposal import Protocol, SAPayload
from nfq_ipsec.ike.session import IKE_PORT, NAT_T_PORT, IkeSession, Output, PeerConfig, Role, State

MARKER = bytes(4)


def parse_proposal(text: str, protocol: Protocol) -> SAPayload:
    """One proposal from a strongSwan-style string (``nfq_ipsec.ike.proposal_text``)."""
    return proposal_text.parse(text, protocol)


def peer_config(c: dict[str, Any]) -> PeerConfig:
    return PeerConfig(
        local_id=identity(c["local_id"]), remote_id=identity(c["remote_id"]),
        psk=bytes.fromhex(c["psk_hex"]),
        ike_proposals=parse_proposal(c["ike"], Protocol.IKE),
        esp_proposals=parse_proposal(c["esp"], Protocol.ESP),
        local_ts=tuple(selectors.from_prefix(p) for p in c["local_ts"]),
        remote_ts=tuple(selectors.from_prefix(p) for p in c["remote_ts"]),
        transport=bool(c.get("transport")),
        local_addr=ipaddress.ip_address(c["local_addr"]).packed,
        remote_addr=ipaddress.ip_address(c["remote_addr"]).packed,
        force_encap=bool(c.get("force_encap")))


def _ike_keys(s: IkeSession) -> dict[str, str]:
    k = s.keys
    assert k is not None
    return {n: getattr(k, n).hex() for n in ("sk_d", "sk_ai", "sk_ar", "sk_ei", "sk_er", "sk_pi",
                                             "sk_pr")} | {"spi_i": s.spi_i.hex(), "spi_r": s.spi_r.hex()}


def _child(c: ChildSA) -> dict[str, Any]:
    return {"spi_in": c.spi_in, "spi_out": c.spi_out, "udp_encap": c.udp_encap,
            "transport": c.transport, "keys_in": [k.hex() for k in c.keys_in],
            "keys_out": [k.hex() for k in c.keys_out],
            "local_ts": [selectors.describe(t) for t in c.local_ts],
            "remote_ts": [selectors.describe(t) for t in c.remote_ts]}


def _result(s: IkeSession, events: list[dict[str, Any]], ike_history: list[dict[str, str]],
            children: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"state": s.state.value, "events": events, "nat": s.nat,
                           "dropped": dict(s.dropped), "spi_i": s.spi_i.hex(), "spi_r": s.spi_r.hex(),
                           "ike_history": ike_history, "children_history": children,
                           "live_children": sorted(s.children), "rekeys": dict(s.rekeys)}
    if s.keys is not None:
        out["ike_keys"] = _ike_keys(s)
    if s.child is not None:
        out["child"] = _child(s.child)
    return out


def serve(c: dict[str, Any]) -> dict[str, Any]:
    cfg = peer_config(c)
    role = Role(c["role"])
    family = socket.AF_INET if len(cfg.local_addr) == 4 else socket.AF_INET6
    local = ipaddress.ip_address(cfg.local_addr).compressed
    socks: dict[int, socket.socket] = {}
    for port in (IKE_PORT, NAT_T_PORT):
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.bind((local, port))
        socks[port] = s
    session = IkeSession(role, cfg, os.urandom)
    events: list[dict[str, Any]] = []
    ike_history: list[dict[str, str]] = []
    children: list[dict[str, Any]] = []
    start = time.monotonic()
    actions = sorted(c.get("actions", []), key=lambda a: float(a["at"]))
    peer = (ipaddress.ip_address(cfg.remote_addr).compressed, IKE_PORT)
    deadline = time.monotonic() + float(c.get("timeout", 30))
    linger_until: float | None = None

    def emit(out: Output, to: tuple[str, int], port: int) -> None:
        for data in out.send:
            socks[port].sendto(MARKER + data if port == NAT_T_PORT else data, to)
        for e in out.events:
            events.append({"kind": e.kind, "detail": e.detail, "at": round(time.monotonic() - start, 3),
                           "old_spi": e.old_spi})
            if e.child is not None:
                children.append(_child(e.child))
            if e.kind in ("established", "ike_rekeyed") and session.keys is not None and (
                    not ike_history or ike_history[-1]["spi_i"] != session.spi_i.hex()):
                ike_history.append(_ike_keys(session))

    if role is Role.INITIATOR:
        emit(session.start(time.monotonic()), peer, IKE_PORT)
    while time.monotonic() < deadline:
        now = time.monotonic()
        while actions and session.state is State.ESTABLISHED and now - start >= float(actions[0]["at"]):
            act = actions.pop(0)["do"]
            if act == "rekey_child" and session.child is not None:
                emit(session.rekey_child(session.child.spi_in, now), (peer[0], session.port), session.port)
            elif act == "rekey_ike":
                emit(session.rekey_ike(now), (peer[0], session.port), session.port)
            elif act == "ping":
                emit(session.ping(now), (peer[0], session.port), session.port)
        done = session.state in (State.FAILED, State.DELETED) or (
            session.state is State.ESTABLISHED and not actions and not session.busy)
        if done and linger_until is None:  # answer retransmissions and the peer's own requests
            linger_until = time.monotonic() + float(c.get("linger", 2))
        if linger_until is not None and time.monotonic() > linger_until:
            break
        ready, _, _ = select.select(list(socks.values()), [], [], 0.1)
        for s in ready:
            data, src = s.recvfrom(65535)
            port = s.getsockname()[1]
            if port == NAT_T_PORT:
                if data[:4] != MARKER:
                    continue  # ESP: not ours to handle here
                data = data[4:]
            out = session.receive(data, time.monotonic(),
                                  (ipaddress.ip_address(src[0]).packed, src[1]))
            emit(out, src[:2], port)
        out = session.tick(time.monotonic())
        emit(out, (peer[0], session.port), session.port)
    for s in socks.values():
        s.close()
    return _result(session, events, ike_history, children)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m nfq_ipsec_lab.lab.ikepeer CONFIG.json", file=sys.stderr)
        return 2
    conf = json.loads(Path(argv[0]).read_text())
    result = serve(conf)
    fd = os.open(conf["result"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=1)
    print(f"ikepeer: {result['state']}; events: {[e['kind'] for e in result['events']]}")
    return 0 if result["state"] == "established" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

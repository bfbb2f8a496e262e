"""IKE test peers, written once: configurations for two sides "a" and "b" (a on LAN_A, b on
LAN_B, PSK authentication), a reproducible random source, and shuttles that carry datagrams
between two IKE sessions in memory until nobody sends."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from nfq_ipsec.ike import selectors
from nfq_ipsec.ike.message import IdPayload, IdType
from nfq_ipsec.ike.proposal import Encr, Group, Integ, Prf, Proposal, Protocol, SAPayload, Transform
from nfq_ipsec.ike.session import IkeSession, Output, PeerConfig, Role

T = Transform


def ike(*groups: int, encr: tuple[int, int | None] = (Encr.AES_GCM_16, 256)) -> SAPayload:
    return SAPayload((Proposal(1, Protocol.IKE, b"", (
        T(1, encr[0], encr[1]), T(2, Prf.HMAC_SHA2_256), *(T(4, g) for g in groups))),))


ESP_GCM = SAPayload((Proposal(1, Protocol.ESP, b"", (T(1, Encr.AES_GCM_16, 128), T(5, 0))),))
ESP_CBC = SAPayload((Proposal(1, Protocol.ESP, b"", (
    T(1, Encr.AES_CBC, 256), T(3, Integ.HMAC_SHA2_256_128), T(5, 0))),))
LAN_A, LAN_B = selectors.from_prefix("10.1.0.0/24"), selectors.from_prefix("10.2.0.0/24")


def cfg(me: str, peer: str, psk: bytes = b"correct horse", ike_p: SAPayload | None = None,
        esp: SAPayload = ESP_GCM, local: tuple | None = None, remote: tuple | None = None,  # type: ignore[type-arg]
        transport: bool = False) -> PeerConfig:
    """``me`` "b" sits on LAN_B, anyone else on LAN_A."""
    local = local or ((LAN_B,) if me == "b" else (LAN_A,))
    remote = remote or ((LAN_A,) if me == "b" else (LAN_B,))
    return PeerConfig(IdPayload(IdType.FQDN, me.encode()), IdPayload(IdType.FQDN, peer.encode()),
                      psk, ike_p or ike(Group.CURVE25519), esp, local, remote, transport)


def pair(a: PeerConfig, b: PeerConfig, seed: int = 1) -> tuple[IkeSession, IkeSession]:
    rng = random.Random(seed)
    rand = lambda n: bytes(rng.getrandbits(8) for _ in range(n))  # noqa: E731 (reproducible)
    return IkeSession(Role.INITIATOR, a, rand), IkeSession(Role.RESPONDER, b, rand)


def run(i: IkeSession, r: IkeSession, first: Output, lose: set[int] | None = None) -> list[Output]:
    """Shuttles datagrams until nobody sends; ``lose``: indexes of datagrams that vanish."""
    outs, queue, n, now = [first], [(r, d) for d in first.send], 0, 0.0
    while queue:
        to, data = queue.pop(0)
        n += 1
        if lose and n in lose:
            now += 1.0
            t = i.tick(now)
            outs.append(t)
            queue += [(r, d) for d in t.send]
            continue
        out = to.receive(data, now)
        outs.append(out)
        queue += [(i if to is r else r, d) for d in out.send]
    return outs


def events(outs: list[Output]) -> list[str]:
    return [f"{e.kind}:{e.detail}" if e.detail else e.kind for o in outs for e in o.events]


def shuttle(i: IkeSession, r: IkeSession, out: Output, now: float = 1.0,
            sender: IkeSession | None = None) -> list[Output]:
    """Delivers ``out`` (sent by ``sender``, default ``i``) and everything it sets off."""
    frm = sender or i
    queue, outs = [(r if frm is i else i, d) for d in out.send], [out]
    while queue:
        to, data = queue.pop(0)
        res = to.receive(data, now)
        outs.append(res)
        queue += [(i if to is r else r, d) for d in res.send]
    return outs


def up() -> tuple[IkeSession, IkeSession]:
    i, r = pair(cfg("a", "b"), cfg("b", "a"))
    run(i, r, i.start(0.0))
    assert i.child is not None and r.child is not None
    return i, r


def connection_daemon_config(directory: Path, interface: str, me: str, peer: str, psk: str,
                             queues: Sequence[int], **connection: str | int) -> Path:
    """A daemon configuration (0600) whose one protect policy, ``me/32`` to ``peer/32``,
    names its one ``[[connection]]`` ("peer", PSK in ``peer.psk``, 0600, beside it);
    ``connection``: that section's other fields (strings quoted, numbers as they are)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = directory / "peer.psk"
    key.write_text(psk + "\n")
    key.chmod(0o600)
    fields = "".join(f"{name} = {value!r}\n".replace("'", '"') if isinstance(value, str)
                     else f"{name} = {value}\n" for name, value in connection.items())
    path = directory / "nfq.toml"
    path.write_text(
        f'[node]\ninterface = "{interface}"\nmtu = 1500\n\n'
        f"[daemon]\nqueues = [{', '.join(map(str, queues))}]\n"
        f'control_socket = "{directory / "run" / "ctl.sock"}"\n'
        f'state_dir = "{directory / "state"}"\n\n'
        f'[[policy]]\nname = "to-peer"\naction = "protect"\nlocal = "{me}/32"\n'
        f'remote = "{peer}/32"\nconnection = "peer"\n\n'
        f'[[connection]]\nname = "peer"\nlocal = "{me}"\nremote = "{peer}"\n'
        f'psk_file = "peer.psk"\n{fields}')
    path.chmod(0o600)
    return path

"""Negotiated Child SAs as the data plane's SAs, and the configuration the workers run with
them: the file's SAs and policies, plus, for each connection, the Child SAs its agent has up.

Pure: the supervisor calls it whenever the agent reports a Child SA up or gone, and on every
reload, and applies the result the way a reload applies a new file. A Child SA pair lives on
one worker, chosen by its inbound SPI (ours, chosen when the SPI was: ``queue_for``), so the
rules steer its ESP there by SPI like a configured SA's.

Make before break across a rekey, with the peer's daemon doing the same on its own time: a
policy lists every inbound SA its connection has up, and one outbound SA, the newest whose
``send_from`` has come. A successor's outbound SA takes over ``SWITCH_AFTER`` seconds after it
came up (by then the peer has installed its inbound twin), and until then its predecessor
sends, deleted or not (the peer keeps the inbound twin of a deleted SA ``LINGER`` seconds, as
we do: it may not have switched yet). A deleted SA without a successor sends nothing more. A
connection's first Child SA carries traffic at once, and one taken down by ``terminate`` or
with its IKE SA goes at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .config.model import Config, ConnectionConfig
from .core.sa import Encapsulation, Mode, SADirection, SAParams, Secret
from .core.spd import Policy
from .ike.child import ChildSA
from .ike.proposal import Esn, TransformType
from .ike.proposal_text import DATA_PLANE_ENCR, DATA_PLANE_INTEG

SWITCH_AFTER = 1.0  # seconds before a successor's outbound SA takes over
LINGER = 3.0  # seconds a deleted SA's inbound twin stays


@dataclass(frozen=True)
class Negotiated:
    """A Child SA the agent has up, and when its outbound SA may carry traffic (monotonic
    time); ``retire_at``: deleted, its inbound SA stays until then."""

    child: ChildSA
    send_from: float = 0.0
    retire_at: float | None = None


def next_change(up: Mapping[str, Sequence[Negotiated]], now: float) -> float | None:
    """When ``effective`` will next give another answer (a switch or a retirement due)."""
    times = [t for entries in up.values() for n in entries
             for t in (n.send_from, n.retire_at) if t is not None and t > now]
    return min(times, default=None)


def current(entries: Iterable[Negotiated], now: float) -> list[Negotiated]:
    """``entries`` without those retired by ``now``."""
    return [n for n in entries if n.retire_at is None or n.retire_at > now]


def queue_for(spi_in: int, queues: Sequence[int]) -> int:
    """The worker that owns the Child SA pair with inbound SPI ``spi_in``."""
    return queues[spi_in % len(queues)]


def sa_name(conn: str, direction: SADirection, spi: int) -> str:
    return f"{conn}.{direction.value}.{spi:08x}"


def is_negotiated(name: str, connections: Iterable[str]) -> bool:
    """Whether ``name`` is the name ``sa_name`` gives a Child SA of one of ``connections``."""
    parts = name.rsplit(".", 2)
    if len(parts) != 3:
        return False
    conn, direction, spi = parts
    return (conn in set(connections) and direction in ("in", "out") and len(spi) == 8
            and all(c in "0123456789abcdef" for c in spi))


def sa_pair(conn: ConnectionConfig, child: ChildSA, queues: Sequence[int]) -> tuple[SAParams, SAParams]:
    """The inbound and outbound SA of ``child`` (ValueError if the data plane can't run it)."""
    encryption = DATA_PLANE_ENCR.get((child.suite.encr, child.suite.key_bits))
    if encryption is None:
        raise ValueError(f"no data-plane cipher for ENCR {child.suite.encr}/{child.suite.key_bits}")
    integrity = None if child.suite.aead else DATA_PLANE_INTEG.get(child.suite.integ)
    if not child.suite.aead and integrity is None:
        raise ValueError(f"no data-plane HMAC for INTEG {child.suite.integ}")
    esn_t = child.proposal.one(TransformType.ESN)
    esn = esn_t is not None and esn_t.id == Esn.YES
    tunnel = not child.transport
    queue = queue_for(child.spi_in, queues)
    common = dict(
        encryption=encryption, integrity=integrity, esn=esn, queue=queue,
        mode=Mode.TUNNEL if tunnel else Mode.TRANSPORT,
        tunnel_local=conn.local if tunnel else None, tunnel_remote=conn.remote if tunnel else None,
        encapsulation=Encapsulation.UDP if child.udp_encap else Encapsulation.NONE,
    )
    inbound = SAParams(
        name=sa_name(conn.name, SADirection.IN, child.spi_in), spi=child.spi_in,
        direction=SADirection.IN, key=Secret(child.keys_in[0]),
        integrity_key=Secret(child.keys_in[1] if integrity else b""), **common)  # type: ignore[arg-type]
    outbound = SAParams(
        name=sa_name(conn.name, SADirection.OUT, child.spi_out), spi=child.spi_out,
        direction=SADirection.OUT, key=Secret(child.keys_out[0]),
        integrity_key=Secret(child.keys_out[1] if integrity else b""), **common)  # type: ignore[arg-type]
    return inbound, outbound


def effective(cfg: Config, up: Mapping[str, Sequence[Negotiated]], now: float) -> Config:
    """``cfg`` with the Child SAs in ``up`` (by connection, oldest first) added, as they stand
    at ``now``. A pair whose SPI another SA already has, or that the data plane can't run, is
    left out (it carries nothing: its policy stays fail-closed)."""
    taken = {(sa.direction, sa.spi) for sa in cfg.sas}
    added: list[SAParams] = []
    names: dict[str, list[str]] = {}
    for conn in cfg.connections:
        if not conn.policy:
            continue
        queues = cfg.compartment_of_policy(conn.policy).queues  # its policy's compartment's
        sending: SAParams | None = None
        fallback: SAParams | None = None
        inbound: list[str] = []
        for entry in current(up.get(conn.name, ()), now):
            try:
                sa_in, sa_out = sa_pair(conn, entry.child, queues)
            except ValueError:
                continue
            if (SADirection.IN, sa_in.spi) in taken or (SADirection.OUT, sa_out.spi) in taken:
                continue
            taken |= {(SADirection.IN, sa_in.spi), (SADirection.OUT, sa_out.spi)}
            added.append(sa_in)
            inbound.append(sa_in.name)
            if entry.retire_at is None:
                fallback = sa_out
            if entry.send_from <= now:
                sending = sa_out  # a deleted one, too, until its successor takes over
        out = sending if sending is not None and fallback is not None else fallback
        if out is not None:
            added.append(out)
        if out is not None or inbound:
            names[conn.policy] = ([out.name] if out is not None else []) + inbound
    if not added:
        return cfg
    policies = tuple(_with_sas(pol, names[pol.name]) if pol.name in names else pol
                     for pol in cfg.policies)
    return dataclasses.replace(cfg, sas=cfg.sas + tuple(added), policies=policies)


def _with_sas(pol: Policy, sa_names: list[str]) -> Policy:
    return dataclasses.replace(pol, sa_names=tuple(sa_names))

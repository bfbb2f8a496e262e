"""Child SA negotiation (RFC 7296 sections 1.3, 2.9, 2.17): the offer, the answer, the check of
the answer, and the keys, for IKE_AUTH and CREATE_CHILD_SA alike.

"Initiator" here is the initiator of the exchange that creates the Child SA: its nonce comes
first in KEYMAT and its outbound keys are taken first, whichever side began the IKE SA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import selectors
from .errors import IkeError, Notify
from .keys import Suite, child_keys
from .message import PT, Message, NotifyPayload, Payload, SAPayloadP, TrafficSelector, TSPayload
from .proposal import Proposal, Protocol, SAPayload, check_chosen, choose

Selectors = tuple[TrafficSelector, ...]


@dataclass(frozen=True)
class ChildSA:
    """A negotiated Child SA pair, as the data plane needs it: ``spi_in`` is ours (the peer
    sends with it), ``spi_out`` the peer's. Keys never appear in a repr."""

    spi_in: int
    spi_out: int
    proposal: Proposal
    suite: Suite
    keys_in: tuple[bytes, bytes] = field(repr=False)  # (encryption, integrity)
    keys_out: tuple[bytes, bytes] = field(repr=False)
    local_ts: Selectors
    remote_ts: Selectors
    transport: bool
    udp_encap: bool = False  # a NAT was detected (or claimed): ESP in UDP port 4500


@dataclass(frozen=True)
class Terms:
    """What a Child SA is asked for: proposals (SPIs filled in per offer), our selectors, mode."""

    proposals: SAPayload
    local_ts: Selectors
    remote_ts: Selectors
    transport: bool


def one(msg: Message, kind: int, cls: type) -> object:
    found = msg.find(kind)
    if len(found) != 1 or not isinstance(found[0], cls):
        raise IkeError(Notify.INVALID_SYNTAX, f"{len(found)} {PT(kind).name} payloads, need one")
    return found[0]


def offer(terms: Terms, spi: bytes) -> SAPayload:
    return SAPayload(tuple(Proposal(p.number, Protocol.ESP, spi, p.transforms)
                           for p in terms.proposals.proposals))


def request_payloads(terms: Terms, sa: SAPayload) -> list[Payload]:
    """SA, TSi and TSr of a request, with USE_TRANSPORT_MODE first where it applies."""
    out: list[Payload] = [NotifyPayload(Notify.USE_TRANSPORT_MODE)] if terms.transport else []
    return [*out, SAPayloadP(sa), TSPayload(terms.local_ts, PT.TSI), TSPayload(terms.remote_ts, PT.TSR)]


def answer(terms: Terms, msg: Message, our_spi: bytes) -> tuple[list[Payload], Proposal, Selectors,
                                                                 Selectors]:
    """The responder's side: the chosen proposal (refused: NO_PROPOSAL_CHOSEN), our selectors
    narrowed to what the peer offered (none in common: TS_UNACCEPTABLE), and the mode. Returns
    the answer's payloads, the chosen proposal with the peer's SPI, and (local, remote) TS."""
    sa = one(msg, PT.SA, SAPayloadP)
    assert isinstance(sa, SAPayloadP)
    chosen = choose(sa.sa, terms.proposals)
    if chosen.protocol != Protocol.ESP or len(chosen.spi) != 4:
        raise IkeError(Notify.NO_PROPOSAL_CHOSEN, f"protocol {chosen.protocol} with an SPI of "
                       f"{len(chosen.spi)} bytes: only ESP is offered")
    tsi, tsr = one(msg, PT.TSI, TSPayload), one(msg, PT.TSR, TSPayload)
    assert isinstance(tsi, TSPayload) and isinstance(tsr, TSPayload)
    remote = selectors.narrow(tsi.selectors, terms.remote_ts)  # the peer's TSi is its side
    local = selectors.narrow(tsr.selectors, terms.local_ts)
    if not remote or not local:
        raise IkeError(Notify.TS_UNACCEPTABLE, "the peer's traffic selectors hold none of ours")
    transport = any(n.notify == Notify.USE_TRANSPORT_MODE for n in msg.notifies())
    if transport != terms.transport:
        raise IkeError(Notify.NO_PROPOSAL_CHOSEN, "transport mode asked for "
                       + ("and not configured" if transport else "by us, not by the peer"))
    reply = Proposal(chosen.number, Protocol.ESP, our_spi, chosen.transforms)
    out: list[Payload] = [NotifyPayload(Notify.USE_TRANSPORT_MODE)] if transport else []
    out += [SAPayloadP(SAPayload((reply,))), TSPayload(remote, PT.TSI), TSPayload(local, PT.TSR)]
    return out, chosen, local, remote


def check_answer(terms: Terms, sent: SAPayload, msg: Message) -> tuple[Proposal, Selectors, Selectors]:
    """The exchange initiator's check: one proposal of those we sent, selectors within ours,
    the mode we asked for. Returns the proposal (the peer's SPI) and (local, remote) TS."""
    sa = one(msg, PT.SA, SAPayloadP)
    assert isinstance(sa, SAPayloadP)
    chosen = check_chosen(sa.sa, sent)
    if len(chosen.spi) != 4:
        raise IkeError(Notify.INVALID_SYNTAX, f"an ESP SPI of {len(chosen.spi)} bytes")
    tsi, tsr = one(msg, PT.TSI, TSPayload), one(msg, PT.TSR, TSPayload)
    assert isinstance(tsi, TSPayload) and isinstance(tsr, TSPayload)
    if not selectors.all_within(tsi.selectors, terms.local_ts) or not selectors.all_within(
            tsr.selectors, terms.remote_ts):
        raise IkeError(Notify.TS_UNACCEPTABLE, "the peer's traffic selectors are wider than ours")
    if any(n.notify == Notify.USE_TRANSPORT_MODE for n in msg.notifies()) != terms.transport:
        raise IkeError(Notify.NO_PROPOSAL_CHOSEN, "the peer did not agree to the mode")
    return chosen, tsi.selectors, tsr.selectors


def make(prf_alg: int, sk_d: bytes, chosen: Proposal, our_spi: bytes, ni: bytes, nr: bytes,
         we_initiated: bool, local_ts: Selectors, remote_ts: Selectors, transport: bool,
         udp_encap: bool, shared: bytes = b"") -> ChildSA:
    """The Child SA from a chosen proposal carrying the peer's SPI. ``ni``/``nr`` are the
    nonces of the creating exchange; ``shared`` its fresh DH value (PFS), if any."""
    suite = Suite.of(chosen)
    km = child_keys(prf_alg, sk_d, suite, ni, nr, shared)
    i_keys, r_keys = (km.encr_i, km.integ_i), (km.encr_r, km.integ_r)
    return ChildSA(spi_in=int.from_bytes(our_spi, "big"), spi_out=int.from_bytes(chosen.spi, "big"),
                   proposal=chosen, suite=suite,
                   keys_in=r_keys if we_initiated else i_keys,
                   keys_out=i_keys if we_initiated else r_keys,
                   local_ts=local_ts, remote_ts=remote_ts, transport=transport, udp_encap=udp_encap)

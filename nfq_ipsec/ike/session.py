"""One IKE SA as a sans-IO state machine: IKE_SA_INIT and IKE_AUTH with a pre-shared key, as
initiator or responder, bringing up one Child SA (RFC 7296 sections 1.2, 2.15, 2.17).

Bytes go in (``receive``), time goes in (``tick``), random bytes come from the ``rand``
callable the shell passes; out come ``Output``s: datagrams to send and ``Event``s (a Child SA
up, the IKE SA failed). Window size 1: one request outstanding, retransmitted on ``tick`` with
exponential back-off until it is answered or the tries run out (section 2.1); a responder
answers a retransmitted request with the same bytes (section 2.1) and drops requests with any
other message ID. Messages that are not for this SA, not authentic, or not the expected ones
are dropped and counted in ``dropped``, never answered with anything that could help an
attacker, and never tear the SA down: an unauthenticated notify ends only an exchange that
has nothing authenticated yet (IKE_SA_INIT, as section 2.21.1 allows).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TypeVar

from . import selectors
from .dh import KeyPair, private_size
from .errors import IkeError, Notify
from .keys import (
    ChildKeys,
    IkeKeys,
    Suite,
    auth_matches,
    child_keys,
    ike_keys,
    psk_auth,
    signed_octets,
    skeyseed,
)
from .message import (
    PT,
    AuthMethod,
    AuthPayload,
    EncryptedPayload,
    Exchange,
    Flag,
    Header,
    IdPayload,
    KEPayload,
    Message,
    NoncePayload,
    NotifyPayload,
    Payload,
    SAPayloadP,
    TrafficSelector,
    TSPayload,
    decode_header,
    decode_message,
    encode_message,
)
from .proposal import Proposal, Protocol, SAPayload, TransformType, check_chosen, choose
from .sk import iv_size, open_message, seal

_P = TypeVar("_P")
NONCE_SIZE = 32
IKE_PORT = 500
NAT_T_PORT = 4500
RETRANSMIT_TIMEOUT = 1.0  # seconds before the first retransmission; doubled each time
RETRANSMIT_TRIES = 5  # sends of one request before the SA fails


class Role(Enum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


class State(Enum):
    IDLE = "idle"
    INIT_SENT = "init-sent"  # initiator: IKE_SA_INIT request out
    AUTH_SENT = "auth-sent"  # initiator: IKE_AUTH request out
    INIT_DONE = "init-done"  # responder: IKE_SA_INIT answered, waiting for IKE_AUTH
    ESTABLISHED = "established"
    FAILED = "failed"
    DELETED = "deleted"


@dataclass(frozen=True)
class PeerConfig:
    """What one side knows of a connection. ``psk`` never appears in a repr."""

    local_id: IdPayload
    remote_id: IdPayload
    psk: bytes = field(repr=False)
    ike_proposals: SAPayload
    esp_proposals: SAPayload  # SPIs are filled in per negotiation
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]
    transport: bool = False
    # NAT detection (section 2.23): our address and the peer's as packed bytes; empty: no
    # NAT_DETECTION_* notifies are sent. ``force_encap`` claims a NAT even where none is,
    # so the Child SA carries its ESP in UDP (strongSwan's ``encap = yes``).
    local_addr: bytes = b""
    remote_addr: bytes = b""
    force_encap: bool = False


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
    local_ts: tuple[TrafficSelector, ...]
    remote_ts: tuple[TrafficSelector, ...]
    transport: bool
    udp_encap: bool = False  # a NAT was detected (or claimed): ESP in UDP port 4500


@dataclass(frozen=True)
class Event:
    kind: str  # "established", "failed", "deleted"
    detail: str = ""
    child: ChildSA | None = None


@dataclass
class Output:
    send: list[bytes] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def extend(self, other: Output) -> None:
        self.send += other.send
        self.events += other.events


class IkeSession:
    """One IKE SA. ``rand(n)`` returns n random bytes (the shell passes ``os.urandom``)."""

    def __init__(self, role: Role, cfg: PeerConfig, rand: Callable[[int], bytes]) -> None:
        self.role, self.cfg, self.rand = role, cfg, rand
        self.state = State.IDLE
        self.spi_i = b""
        self.spi_r = bytes(8)
        self.ni = self.nr = b""
        self.keys: IkeKeys | None = None
        self.chosen: Proposal | None = None
        self.child: ChildSA | None = None
        self.dropped: Counter[str] = Counter()
        self._dh: KeyPair | None = None
        self._group = 0
        self._cookie = b""
        self._first = b""  # our first message (section 2.15's RealMessage)
        self._peer_first = b""
        self._child_spi = b""
        self._child_offer: SAPayload | None = None
        self._request: bytes = b""  # the request we wait an answer to (initiator)
        self._request_id = 0
        self._tries = 0
        self._next_retry = 0.0
        self._next_id = 0  # responder: the next request's message ID
        self._last_answer: tuple[int, bytes] | None = None
        self._sent = 0  # messages we sealed: the AEAD IV counter
        self.nat = False  # a NAT between us (or claimed): IKE moves to port 4500, ESP in UDP
        self.port = IKE_PORT  # the port the next messages go to and from
        self._peer_natd = False  # the peer sent NAT_DETECTION_* notifies
        self._source: tuple[bytes, int] | None = None  # where the datagram being handled came from

    def __repr__(self) -> str:
        return f"IkeSession({self.role.value}, {self.state.value}, spi_i={self.spi_i.hex()})"

    # -- starting --------------------------------------------------------------------------
    def start(self, now: float) -> Output:
        """The initiator's IKE_SA_INIT request."""
        if self.role is not Role.INITIATOR or self.state is not State.IDLE:
            raise ValueError("start() is for an idle initiator")
        self.spi_i = self._nonzero(8)
        self.ni = self.rand(NONCE_SIZE)
        first = self.cfg.ike_proposals.proposals[0].one(TransformType.DH)
        if first is None:
            raise ValueError("the first IKE proposal has no DH group")
        self._group = first.id
        return self._send_init(now)

    def _send_init(self, now: float) -> Output:
        self._dh = KeyPair(self._group, self.rand(private_size(self._group)))
        payloads: list[Payload] = []
        if self._cookie:
            payloads.append(NotifyPayload(Notify.COOKIE, data=self._cookie))
        payloads += [SAPayloadP(self.cfg.ike_proposals), KEPayload(self._group, self._dh.public),
                     NoncePayload(self.ni), *self._natd_payloads(bytes(8), None)]
        header = Header(self.spi_i, bytes(8), 0, Exchange.IKE_SA_INIT, Flag.INITIATOR, 0)
        self._first = encode_message(header, payloads)
        self.state = State.INIT_SENT
        return self._request_out(self._first, 0, now)

    def _request_out(self, data: bytes, message_id: int, now: float) -> Output:
        self._request, self._request_id, self._tries = data, message_id, 1
        self._next_retry = now + RETRANSMIT_TIMEOUT
        return Output(send=[data])

    def tick(self, now: float) -> Output:
        """Retransmits the outstanding request when its time has come; fails the SA after
        ``RETRANSMIT_TRIES`` sends without an answer."""
        if not self._request or self.state in (State.ESTABLISHED, State.FAILED, State.DELETED):
            return Output()
        if now < self._next_retry:
            return Output()
        if self._tries >= RETRANSMIT_TRIES:
            return self._fail(f"no answer to message {self._request_id} after {self._tries} sends")
        self._tries += 1
        self._next_retry = now + RETRANSMIT_TIMEOUT * 2 ** (self._tries - 1)
        return Output(send=[self._request])

    # -- receiving -------------------------------------------------------------------------
    def receive(self, data: bytes, now: float, source: tuple[bytes, int] | None = None) -> Output:
        """One datagram from the peer (the IKE message, without a non-ESP marker), and where
        it came from (packed address, port) for NAT detection, if the shell knows."""
        self._source = source
        try:
            header = decode_header(data)
        except IkeError as err:
            return self._drop(err.notify.name.lower())
        try:
            if header.is_response:
                return self._response(data, header, now)
            return self._request_in(data, header, now)
        except IkeError as err:
            return self._drop(err.notify.name.lower())

    def _drop(self, why: str) -> Output:
        self.dropped[why] += 1
        return Output()

    def _response(self, data: bytes, header: Header, now: float) -> Output:
        if self.role is not Role.INITIATOR and header.exchange != Exchange.INFORMATIONAL:
            return self._drop("unexpected_response")
        if header.spi_i != self.spi_i or header.message_id != self._request_id or not self._request:
            return self._drop("not_ours")
        if self.state is State.INIT_SENT and header.exchange == Exchange.IKE_SA_INIT:
            return self._init_response(data, decode_message(data), now)
        if self.state is State.AUTH_SENT and header.exchange == Exchange.IKE_AUTH:
            return self._auth_response(data, header, now)
        return self._drop("unexpected_response")

    def _init_response(self, data: bytes, msg: Message, now: float) -> Output:
        notes = {n.notify: n for n in msg.notifies()}
        if Notify.COOKIE in notes and not self._cookie:
            self._cookie = notes[Notify.COOKIE].data
            return self._send_init(now)
        if Notify.INVALID_KE_PAYLOAD in notes:
            wanted = int.from_bytes(notes[Notify.INVALID_KE_PAYLOAD].data[:2], "big")
            ours = {t.id for p in self.cfg.ike_proposals.proposals for t in p.of_type(TransformType.DH)}
            if wanted in ours and wanted != self._group:
                self._group = wanted
                return self._send_init(now)
            return self._fail(f"the peer wants DH group {wanted}, which we did not offer")
        errors = [n for n in notes if n < 16384]
        if errors:
            return self._fail(f"the peer refused IKE_SA_INIT: {Notify(errors[0]).name}"
                              if errors[0] in Notify._value2member_map_ else
                              f"the peer refused IKE_SA_INIT: notify {errors[0]}")
        sa = _one(msg, PT.SA, SAPayloadP)
        ke = _one(msg, PT.KE, KEPayload)
        nonce = _one(msg, PT.NONCE, NoncePayload)
        try:
            chosen = check_chosen(sa.sa, self.cfg.ike_proposals)
        except IkeError as err:
            return self._fail(f"the peer's IKE_SA_INIT answer: {err.detail}")
        group = chosen.one(TransformType.DH)
        if group is None or group.id != ke.group or ke.group != self._group:
            return self._fail(f"the peer answered with DH group {ke.group}, we sent {self._group}")
        assert self._dh is not None
        self.spi_r = msg.header.spi_r
        self.nr = nonce.data
        self.chosen = chosen
        self._detect_nat(msg)
        self._peer_first = data
        self._derive(self._dh.shared(ke.data))
        self._dh = None
        return self._send_auth(now)

    def _derive(self, shared: bytes) -> None:
        assert self.chosen is not None
        suite = Suite.of(self.chosen)
        seed = skeyseed(suite.prf, self.ni, self.nr, shared)
        self.keys = ike_keys(suite, seed, self.ni, self.nr, self.spi_i, self.spi_r)

    def _auth_value(self, mine: bool) -> bytes:
        """The PSK AUTH value of our side (``mine``) or the peer's (section 2.15)."""
        k = self.keys
        assert k is not None
        initiator = (self.role is Role.INITIATOR) == mine
        first = self._first if mine else self._peer_first
        nonce = self.nr if initiator else self.ni
        idp = self.cfg.local_id if mine else self.cfg.remote_id
        sk_p = k.sk_pi if initiator else k.sk_pr
        return psk_auth(k.suite.prf, self.cfg.psk,
                        signed_octets(first, nonce, k.suite.prf, sk_p, idp.body))

    def _send_auth(self, now: float) -> Output:
        self._child_spi = self._nonzero(4)
        offer = SAPayload(tuple(Proposal(p.number, Protocol.ESP, self._child_spi, p.transforms)
                                for p in self.cfg.esp_proposals.proposals))
        self._child_offer = offer
        inner: list[Payload] = [
            IdPayload(self.cfg.local_id.id_type, self.cfg.local_id.data, PT.IDI),
            IdPayload(self.cfg.remote_id.id_type, self.cfg.remote_id.data, PT.IDR),
            AuthPayload(AuthMethod.SHARED_KEY_MIC, self._auth_value(mine=True)),
        ]
        if self.cfg.transport:
            inner.append(NotifyPayload(Notify.USE_TRANSPORT_MODE))
        inner += [SAPayloadP(offer), TSPayload(self.cfg.local_ts, PT.TSI),
                  TSPayload(self.cfg.remote_ts, PT.TSR)]
        self.state = State.AUTH_SENT
        return self._request_out(self._seal(Exchange.IKE_AUTH, 1, inner, response=False), 1, now)

    def _seal(self, exchange: int, message_id: int, inner: list[Payload], response: bool) -> bytes:
        k = self.keys
        assert k is not None
        flags = (Flag.INITIATOR if self.role is Role.INITIATOR else 0) | (Flag.RESPONSE if response else 0)
        header = Header(self.spi_i, self.spi_r, 0, exchange, flags, message_id)
        self._sent += 1
        # AEAD: a counter, unique under this key; CBC: unpredictable
        n = iv_size(k.suite)
        iv = self._sent.to_bytes(n, "big") if k.suite.aead else self.rand(n)
        ours_i = self.role is Role.INITIATOR
        return seal(header, [], inner, k.suite, k.sk_ei if ours_i else k.sk_er,
                    k.sk_ai if ours_i else k.sk_ar, iv)

    def _open(self, data: bytes, header: Header) -> tuple[Payload, ...]:
        k = self.keys
        if k is None:
            raise IkeError(Notify.INVALID_SYNTAX, "an encrypted message before the keys")
        msg = decode_message(data)
        if not msg.payloads or not isinstance(msg.payloads[-1], EncryptedPayload):
            raise IkeError(Notify.INVALID_SYNTAX, "no Encrypted payload")
        theirs_i = self.role is Role.RESPONDER
        return open_message(data, header, msg.payloads[-1], k.suite,
                            k.sk_ei if theirs_i else k.sk_er, k.sk_ai if theirs_i else k.sk_ar)

    def _auth_response(self, data: bytes, header: Header, now: float) -> Output:
        try:
            inner = self._open(data, header)
        except IkeError as err:
            return self._drop(err.notify.name.lower())
        msg = Message(header, inner)
        notes = {n.notify: n for n in msg.notifies()}
        if Notify.AUTHENTICATION_FAILED in notes:
            return self._fail("the peer refused our authentication (AUTHENTICATION_FAILED)")
        try:
            idr = _one(msg, PT.IDR, IdPayload)
            auth = _one(msg, PT.AUTH, AuthPayload)
        except IkeError as err:
            return self._fail(f"IKE_AUTH answer: {err.detail}")
        if (idr.id_type, idr.data) != (self.cfg.remote_id.id_type, self.cfg.remote_id.data):
            return self._fail("the peer's identity is not the configured one")
        if auth.method != AuthMethod.SHARED_KEY_MIC or not auth_matches(
                self._auth_value(mine=False), auth.data):
            return self._fail("the peer's AUTH does not verify (pre-shared key)")
        self._request = b""
        self.state = State.ESTABLISHED
        errors = [n for n in notes if n < 16384]
        if errors:
            name = Notify(errors[0]).name if errors[0] in Notify._value2member_map_ else str(errors[0])
            return Output(events=[Event("failed", f"IKE SA up, no Child SA: the peer answered {name}")])
        try:
            child = self._child_from_answer(msg, notes)
        except IkeError as err:
            return Output(events=[Event("failed", f"IKE SA up, no Child SA: {err.detail}")])
        self.child = child
        return Output(events=[Event("established", "", child)])

    def _child_from_answer(self, msg: Message, notes: dict[int, NotifyPayload]) -> ChildSA:
        assert self._child_offer is not None
        sa = _one(msg, PT.SA, SAPayloadP)
        chosen = check_chosen(sa.sa, self._child_offer)
        tsi = _one(msg, PT.TSI, TSPayload).selectors
        tsr = _one(msg, PT.TSR, TSPayload).selectors
        if not selectors.all_within(tsi, self.cfg.local_ts) or not selectors.all_within(
                tsr, self.cfg.remote_ts):
            raise IkeError(Notify.TS_UNACCEPTABLE, "the peer's traffic selectors are wider than ours")
        transport = Notify.USE_TRANSPORT_MODE in notes
        if transport != self.cfg.transport:
            raise IkeError(Notify.NO_PROPOSAL_CHOSEN, "the peer did not agree to the mode")
        return self._make_child(chosen, tsi, tsr, transport)

    def _make_child(self, chosen: Proposal, local_ts: tuple[TrafficSelector, ...],
                    remote_ts: tuple[TrafficSelector, ...], transport: bool) -> ChildSA:
        k = self.keys
        assert k is not None
        suite = Suite.of(chosen)
        km: ChildKeys = child_keys(k.suite.prf, k.sk_d, suite, self.ni, self.nr)
        i_keys, r_keys = (km.encr_i, km.integ_i), (km.encr_r, km.integ_r)
        initiator = self.role is Role.INITIATOR
        if len(chosen.spi) != 4:
            raise IkeError(Notify.INVALID_SYNTAX, f"an ESP SPI of {len(chosen.spi)} bytes")
        return ChildSA(
            spi_in=int.from_bytes(self._child_spi, "big"), spi_out=int.from_bytes(chosen.spi, "big"),
            proposal=chosen, suite=suite,
            keys_in=r_keys if initiator else i_keys, keys_out=i_keys if initiator else r_keys,
            local_ts=local_ts, remote_ts=remote_ts, transport=transport, udp_encap=self.nat)

    # -- as responder ----------------------------------------------------------------------
    def _request_in(self, data: bytes, header: Header, now: float) -> Output:
        if self.role is Role.RESPONDER and header.from_initiator is False:
            return self._drop("flags")
        if self._last_answer is not None and header.message_id == self._last_answer[0]:
            if self.state is State.INIT_DONE and header.exchange == Exchange.IKE_SA_INIT \
                    and data != self._peer_first:
                return self._drop("not_ours")
            return Output(send=[self._last_answer[1]])  # a retransmission: the same answer
        if header.message_id != self._next_id:
            return self._drop("message_id")
        if self.role is Role.RESPONDER and self.state is State.IDLE \
                and header.exchange == Exchange.IKE_SA_INIT:
            return self._init_request(data, decode_message(data))
        if self.state is State.INIT_DONE and header.exchange == Exchange.IKE_AUTH \
                and header.spi_i == self.spi_i and header.spi_r == self.spi_r:
            return self._auth_request(data, header)
        if self.state is State.ESTABLISHED and header.exchange == Exchange.INFORMATIONAL:
            return self._informational(data, header)
        return self._drop("unexpected_request")

    def _answer(self, message_id: int, data: bytes) -> Output:
        self._last_answer = (message_id, data)
        self._next_id = message_id + 1
        return Output(send=[data])

    def _init_request(self, data: bytes, msg: Message) -> Output:
        if msg.header.spi_r != bytes(8) or msg.header.message_id != 0:
            return self._drop("invalid_syntax")
        self.spi_i = msg.header.spi_i
        try:
            sa = _one(msg, PT.SA, SAPayloadP)
            ke = _one(msg, PT.KE, KEPayload)
            nonce = _one(msg, PT.NONCE, NoncePayload)
            chosen = choose(sa.sa, self.cfg.ike_proposals)
        except IkeError as err:
            return self._refuse_init(err)
        group = chosen.one(TransformType.DH)
        assert group is not None
        if ke.group != group.id:
            # section 1.2: tell the initiator which group we want; keep no state
            return Output(send=[self._plain_answer(msg.header, [NotifyPayload(
                Notify.INVALID_KE_PAYLOAD, data=group.id.to_bytes(2, "big"))])])
        dh = KeyPair(group.id, self.rand(private_size(group.id)))
        try:
            shared = dh.shared(ke.data)
        except IkeError as err:
            return self._refuse_init(err)
        self.spi_r = self._nonzero(8)
        self.ni, self.nr = nonce.data, self.rand(NONCE_SIZE)
        self.chosen = Proposal(chosen.number, chosen.protocol, b"", chosen.transforms)
        self._derive(shared)
        self._peer_first = data
        self._detect_nat(msg)
        answer = encode_message(
            Header(self.spi_i, self.spi_r, 0, Exchange.IKE_SA_INIT, Flag.RESPONSE, 0),
            [SAPayloadP(SAPayload((self.chosen,))), KEPayload(group.id, dh.public),
             NoncePayload(self.nr),
             *(self._natd_payloads(self.spi_r, self._source) if self._peer_natd else [])])
        self._first = answer
        self.state = State.INIT_DONE
        return self._answer(0, answer)

    def _plain_answer(self, request: Header, payloads: list[Payload]) -> bytes:
        return encode_message(Header(request.spi_i, self.spi_r if self.keys else bytes(8), 0,
                                     request.exchange, Flag.RESPONSE, request.message_id), payloads)

    def _refuse_init(self, err: IkeError) -> Output:
        self.state = State.FAILED
        header = Header(self.spi_i, bytes(8), 0, Exchange.IKE_SA_INIT, Flag.RESPONSE, 0)
        notify = err.notify if err.notify < 16384 else Notify.INVALID_SYNTAX
        out = Output(send=[encode_message(header, [NotifyPayload(notify)])])
        out.events.append(Event("failed", f"IKE_SA_INIT refused: {err.detail}"))
        return out

    def _auth_request(self, data: bytes, header: Header) -> Output:
        try:
            inner = self._open(data, header)
        except IkeError as err:
            return self._drop(err.notify.name.lower())
        msg = Message(header, inner)
        try:
            idi = _one(msg, PT.IDI, IdPayload)
            auth = _one(msg, PT.AUTH, AuthPayload)
        except IkeError as err:
            return self._auth_refused(header, f"IKE_AUTH request: {err.detail}")
        if (idi.id_type, idi.data) != (self.cfg.remote_id.id_type, self.cfg.remote_id.data):
            return self._auth_refused(header, "the peer's identity is not the configured one")
        if auth.method != AuthMethod.SHARED_KEY_MIC or not auth_matches(
                self._auth_value(mine=False), auth.data):
            return self._auth_refused(header, "the peer's AUTH does not verify (pre-shared key)")
        self.state = State.ESTABLISHED
        out_payloads: list[Payload] = [
            IdPayload(self.cfg.local_id.id_type, self.cfg.local_id.data, PT.IDR),
            AuthPayload(AuthMethod.SHARED_KEY_MIC, self._auth_value(mine=True)),
        ]
        event: Event
        try:
            child_payloads, child = self._child_for_request(msg)
            out_payloads += child_payloads
            self.child = child
            event = Event("established", "", child)
        except IkeError as err:
            out_payloads.append(NotifyPayload(err.notify))
            event = Event("failed", f"IKE SA up, no Child SA: {err.detail}")
        out = self._answer(header.message_id, self._seal(Exchange.IKE_AUTH, header.message_id,
                                                         out_payloads, response=True))
        out.events.append(event)
        return out

    def _auth_refused(self, header: Header, why: str) -> Output:
        self.state = State.FAILED
        out = self._answer(header.message_id, self._seal(
            Exchange.IKE_AUTH, header.message_id, [NotifyPayload(Notify.AUTHENTICATION_FAILED)],
            response=True))
        out.events.append(Event("failed", why))
        return out

    def _child_for_request(self, msg: Message) -> tuple[list[Payload], ChildSA]:
        notes = {n.notify for n in msg.notifies()}
        sa = _one(msg, PT.SA, SAPayloadP)
        chosen = choose(sa.sa, self.cfg.esp_proposals)
        if len(chosen.spi) != 4:
            raise IkeError(Notify.INVALID_SYNTAX, f"an ESP SPI of {len(chosen.spi)} bytes")
        # the peer's TSi is its side: our remote; its TSr is ours
        tsi = selectors.narrow(_one(msg, PT.TSI, TSPayload).selectors, self.cfg.remote_ts)
        tsr = selectors.narrow(_one(msg, PT.TSR, TSPayload).selectors, self.cfg.local_ts)
        if not tsi or not tsr:
            raise IkeError(Notify.TS_UNACCEPTABLE, "the peer's traffic selectors hold none of ours")
        transport = Notify.USE_TRANSPORT_MODE in notes
        if transport != self.cfg.transport:
            raise IkeError(Notify.NO_PROPOSAL_CHOSEN, "transport mode asked for "
                           + ("and not configured" if transport else "by us, not by the peer"))
        self._child_spi = self._nonzero(4)
        answer = Proposal(chosen.number, Protocol.ESP, self._child_spi, chosen.transforms)
        peer_view = Proposal(chosen.number, Protocol.ESP, chosen.spi, chosen.transforms)
        child = self._make_child(peer_view, tsr, tsi, transport)
        payloads: list[Payload] = []
        if transport:
            payloads.append(NotifyPayload(Notify.USE_TRANSPORT_MODE))
        payloads += [SAPayloadP(SAPayload((answer,))), TSPayload(tsi, PT.TSI), TSPayload(tsr, PT.TSR)]
        return payloads, child

    def _informational(self, data: bytes, header: Header) -> Output:
        """An authenticated INFORMATIONAL request: answered (an empty one is a liveness check);
        a Delete of the IKE SA ends it."""
        try:
            inner = self._open(data, header)
        except IkeError as err:
            return self._drop(err.notify.name.lower())
        out = self._answer(header.message_id, self._seal(Exchange.INFORMATIONAL, header.message_id,
                                                         [], response=True))
        if any(p.type == PT.DELETE and getattr(p, "protocol", 0) == Protocol.IKE for p in inner):
            self.state = State.DELETED
            out.events.append(Event("deleted", "the peer deleted the IKE SA"))
        return out

    # -- NAT detection (section 2.23) ------------------------------------------------------
    def _natd_payloads(self, spi_r: bytes, peer: tuple[bytes, int] | None) -> list[Payload]:
        """NAT_DETECTION_SOURCE_IP (us) and _DESTINATION_IP (the peer as we see it); none
        without configured addresses. A claimed NAT (``force_encap``) sends a source hash
        that can't match, as strongSwan does."""
        if not self.cfg.local_addr or not self.cfg.remote_addr:
            return []
        me = (self.cfg.local_addr, IKE_PORT)
        src = natd_hash(self.spi_i, spi_r, *me)
        if self.cfg.force_encap:
            src = natd_hash(self.spi_i, spi_r, self.rand(len(me[0])), IKE_PORT)
        dst = natd_hash(self.spi_i, spi_r, *(peer or (self.cfg.remote_addr, IKE_PORT)))
        return [NotifyPayload(Notify.NAT_DETECTION_SOURCE_IP, data=src),
                NotifyPayload(Notify.NAT_DETECTION_DESTINATION_IP, data=dst)]

    def _detect_nat(self, msg: Message) -> None:
        """Whether the peer's view of the addresses differs from ours: then IKE moves to port
        4500 and the Child SA carries ESP in UDP. Needs both sides' notifies."""
        notes = msg.notifies()
        sources = [n.data for n in notes if n.notify == Notify.NAT_DETECTION_SOURCE_IP]
        dests = [n.data for n in notes if n.notify == Notify.NAT_DETECTION_DESTINATION_IP]
        if not sources or not dests or not self.cfg.local_addr:
            return
        self._peer_natd = True
        spi_r = msg.header.spi_r
        peer = self._source or (self.cfg.remote_addr, IKE_PORT)
        peer_moved = natd_hash(self.spi_i, spi_r, *peer) not in sources
        me_moved = natd_hash(self.spi_i, spi_r, self.cfg.local_addr, IKE_PORT) not in dests
        self.nat = peer_moved or me_moved or self.cfg.force_encap
        if self.nat:
            self.port = NAT_T_PORT

    # -- helpers ---------------------------------------------------------------------------
    def _fail(self, why: str) -> Output:
        self.state = State.FAILED
        self._request = b""
        return Output(events=[Event("failed", why)])

    def _nonzero(self, n: int) -> bytes:
        while True:
            b = self.rand(n)
            if any(b):
                return b


def natd_hash(spi_i: bytes, spi_r: bytes, addr: bytes, port: int) -> bytes:
    """SHA-1(SPIi | SPIr | IP | Port): the hash section 2.23 prescribes (not a security use)."""
    return hashlib.sha1(spi_i + spi_r + addr + port.to_bytes(2, "big"), usedforsecurity=False).digest()


def _one(msg: Message, kind: int, cls: type[_P]) -> _P:
    found = msg.find(kind)
    if len(found) != 1 or not isinstance(found[0], cls):
        raise IkeError(Notify.INVALID_SYNTAX, f"{len(found)} {PT(kind).name} payloads, need one")
    return found[0]

"""One IKE SA as a sans-IO state machine (RFC 7296): IKE_SA_INIT and IKE_AUTH with a
pre-shared key, as initiator or responder, bringing up a Child SA; then CREATE_CHILD_SA (Child
SA and IKE SA rekeys, either side asking) and INFORMATIONAL (delete, liveness).

Bytes go in (``receive``), time goes in (``tick``), random bytes come from the ``rand``
callable the shell passes; out come ``Output``s: datagrams to send and ``Event``s. Window size
1 both ways: one request of ours outstanding, retransmitted on ``tick`` with exponential
back-off until answered or the tries run out (section 2.1), further requests of ours queued;
a retransmitted request of the peer's is answered with the same bytes, any other message ID
dropped. Messages that are not for this SA, not authentic, or not expected are dropped and
counted in ``dropped``, and never tear anything down: an unauthenticated notify ends only an
IKE_SA_INIT, which has nothing authenticated yet (section 2.21.1).

Rekeys are make before break: a rekeyed Child SA's successor is reported (``rekeyed``) while
the old one stays until its Delete has been exchanged (``child_deleted``). A rekeyed IKE SA
keeps this object: new SPIs and keys, message IDs from 0, the Child SAs moved over; the old
SA's keys stay for the Delete of the old SA. Simultaneous rekeys of one Child SA by both sides
(section 2.8.1): each end answers the other's request and gets its own answer, so two
successors are made; the one made by the exchange with the lowest of the four nonces is
deleted by the end that started that exchange (``_rekey_made``), both ends delete the old
one, and one pair is left. Simultaneous IKE SA rekeys are not resolved yet.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TypeVar

from . import child as childsa
from .child import ChildSA, Terms
from .dh import KeyPair, private_size
from .errors import IkeError, Notify
from .keys import (
    IkeKeys,
    Suite,
    auth_matches,
    ike_keys,
    psk_auth,
    rekeyed_skeyseed,
    signed_octets,
    skeyseed,
)
from .message import (
    PT,
    AuthMethod,
    AuthPayload,
    DeletePayload,
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
    decode_header,
    decode_message,
    encode_message,
)
from .proposal import Proposal, Protocol, SAPayload, TransformType, check_chosen, choose
from .sk import iv_size, open_message, seal

__all__ = ["ChildSA", "Event", "IkeSession", "Output", "PeerConfig", "Role", "State"]

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
    # Timers (seconds; 0: never): rekey the IKE SA, rekey the newest Child SA, check the peer's
    # liveness after that long without a word from it. Rekeys come up to 10 % early, at random,
    # so two peers with the same settings rarely collide.
    rekey_time: float = 0.0
    child_rekey_time: float = 0.0
    dpd_delay: float = 0.0
    # Hard lifetimes (section 2.8: the rekey times are soft): an IKE SA or Child SA still there
    # this long after it was made (its rekey failed or never came) is deleted, and with it
    # its traffic (fail closed). 0: none.
    life_time: float = 0.0
    child_life_time: float = 0.0

    @property
    def terms(self) -> Terms:
        return Terms(self.esp_proposals, self.local_ts, self.remote_ts, self.transport)


@dataclass(frozen=True)
class Event:
    """``established`` (a Child SA with the IKE SA, or a new one), ``rekeyed`` (``child``
    replaces the Child SA whose inbound SPI is ``old_spi``), ``child_deleted`` (``old_spi``),
    ``ike_rekeyed``, ``failed``, ``deleted`` (the IKE SA), ``child_expired`` (``old_spi``: its
    hard lifetime ran out; it is gone at once, its traffic dropped)."""

    kind: str
    detail: str = ""
    child: ChildSA | None = None
    old_spi: int = 0


@dataclass
class Output:
    send: list[bytes] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def extend(self, other: Output) -> None:
        self.send += other.send
        self.events += other.events


@dataclass
class _Keys:
    """An IKE SA's identity: SPIs, keys, who began it, and its message counters."""

    spi_i: bytes
    spi_r: bytes
    keys: IkeKeys
    original_initiator: bool
    my_next_id: int = 0  # the ID of our next request
    peer_next_id: int = 0  # the ID of the peer's next request


@dataclass
class _Pending:
    """A request of ours under way, and what it needs to finish when answered."""

    kind: str  # init, auth, rekey_child, rekey_ike, delete_child, delete_ike, delete_old_ike, ping
    data: bytes = b""
    message_id: int = 0
    spi: bytes = b""  # our new SPI (Child: 4 bytes, IKE: 8)
    nonce: bytes = b""
    dh: KeyPair | None = None
    offer: SAPayload | None = None
    old_spi: int = 0  # the Child SA rekeyed or deleted (its inbound SPI)


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
        self.children: dict[int, ChildSA] = {}  # by inbound SPI
        self.child: ChildSA | None = None  # the newest Child SA
        self.dropped: Counter[str] = Counter()
        self.nat = False  # a NAT between us (or claimed): IKE moves to port 4500, ESP in UDP
        self.port = IKE_PORT  # the port the next messages go to and from
        self.rekeys = Counter[str]()  # child, ike: completed rekeys
        self._dh: KeyPair | None = None
        self._group = 0
        self._cookie = b""
        self._first = b""  # our first message (section 2.15's RealMessage)
        self._peer_first = b""
        self._peer_natd = False
        self._source: tuple[bytes, int] | None = None
        self._sa: _Keys | None = None
        self._old_sa: _Keys | None = None  # after an IKE rekey: for the old SA's Delete
        self._pending: _Pending | None = None
        self._queue: list[_Pending] = []
        self._tries = 0
        self._next_retry = 0.0
        self._peer_next_id = 0  # before the keys: the peer's next request (responder)
        self._last_answer: tuple[_Keys | None, int, bytes] | None = None  # (SA, ID, answer)
        self._sent = 0  # messages we sealed: the AEAD IV counter
        self._heard = 0.0  # when the peer last sent something authentic
        self._opened = False  # the datagram being handled decrypted and verified
        self._ike_due = 0.0  # when this IKE SA is to be rekeyed (0: never)
        self._child_due: dict[int, float] = {}  # Child SA (inbound SPI) -> when to rekey it
        self._ike_expires = 0.0  # this IKE SA's hard lifetime ends then (0: never)
        self._child_expires: dict[int, float] = {}  # Child SA (inbound SPI) -> its hard end
        # Child SA rekeys done, by the rekeyed SA's inbound SPI: (started by us, the successor's
        # inbound SPI, Ni, Nr) of each exchange, to find two at once (section 2.8.1)
        self._rekeys_of: dict[int, list[tuple[bool, int, bytes, bytes]]] = {}
        self.rekey_collisions = 0  # simultaneous Child SA rekeys resolved

    def __repr__(self) -> str:
        return f"IkeSession({self.role.value}, {self.state.value}, spi_i={self.spi_i.hex()})"

    @property
    def our_spis(self) -> list[bytes]:
        """Our SPI of this IKE SA, and of the old one while its Delete is still due."""
        out = []
        for sa in (self._sa, self._old_sa):
            if sa is not None:
                out.append(sa.spi_i if sa.original_initiator else sa.spi_r)
        if not out:
            out.append(self.spi_i if self.role is Role.INITIATOR else self.spi_r)
        return out

    @property
    def rekey_due(self) -> float:
        """When this IKE SA is to be rekeyed, in the shell's time (0: never)."""
        return self._ike_due

    @property
    def child_rekeys_due(self) -> dict[int, float]:
        """When each Child SA (by inbound SPI) is to be rekeyed, in the shell's time (0: never)."""
        return dict(self._child_due)

    @property
    def expires(self) -> float:
        """When this IKE SA's hard lifetime ends, in the shell's time (0: never)."""
        return self._ike_expires

    @property
    def child_expiries(self) -> dict[int, float]:
        """When each Child SA's (by inbound SPI) hard lifetime ends (none listed: never)."""
        return dict(self._child_expires)

    @property
    def busy(self) -> bool:
        """A request of ours is under way or queued."""
        return self._pending is not None or bool(self._queue)

    # -- starting and asking ---------------------------------------------------------------
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

    def rekey_child(self, spi_in: int, now: float) -> Output:
        """CREATE_CHILD_SA rekeying the Child SA with inbound SPI ``spi_in`` (section 1.3.3)."""
        if spi_in not in self.children:
            raise ValueError(f"no Child SA with inbound SPI {spi_in:08x}")
        return self._ask(_Pending("rekey_child", old_spi=spi_in), now)

    def rekey_ike(self, now: float) -> Output:
        """CREATE_CHILD_SA rekeying this IKE SA (section 1.3.2)."""
        return self._ask(_Pending("rekey_ike"), now)

    def delete_child(self, spi_in: int, now: float) -> Output:
        return self._ask(_Pending("delete_child", old_spi=spi_in), now)

    def delete(self, now: float) -> Output:
        """INFORMATIONAL deleting this IKE SA and its Child SAs."""
        return self._ask(_Pending("delete_ike"), now)

    def ping(self, now: float) -> Output:
        """An empty INFORMATIONAL: is the peer alive (dead peer detection)?"""
        return self._ask(_Pending("ping"), now)

    def _ask(self, req: _Pending, now: float) -> Output:
        if self.state is not State.ESTABLISHED:
            raise ValueError(f"the IKE SA is {self.state.value}, not established")
        if self._pending is not None:
            self._queue.append(req)
            return Output()
        return self._send_request(req, now)

    def _send_request(self, req: _Pending, now: float) -> Output:
        sa = self._old_sa if req.kind == "delete_old_ike" else self._sa
        if sa is None:
            return self._next_request(now)
        inner: list[Payload]
        exchange = Exchange.CREATE_CHILD_SA
        if req.kind == "rekey_child":
            old = self.children.get(req.old_spi)
            if old is None:  # deleted meanwhile
                return self._next_request(now)
            req.spi, req.nonce = self._nonzero(4), self.rand(NONCE_SIZE)
            req.offer = childsa.offer(self.cfg.terms, req.spi)
            inner = [NotifyPayload(Notify.REKEY_SA, Protocol.ESP, old.spi_in.to_bytes(4, "big")),
                     SAPayloadP(req.offer), NoncePayload(req.nonce)]
            group = req.offer.proposals[0].one(TransformType.DH)
            if group is not None and group.id:  # PFS: a fresh DH exchange
                req.dh = KeyPair(group.id, self.rand(private_size(group.id)))
                inner.append(KEPayload(group.id, req.dh.public))
            inner += childsa.request_payloads(self.cfg.terms, req.offer)[-2:]
            if self.cfg.transport:
                inner.insert(0, NotifyPayload(Notify.USE_TRANSPORT_MODE))
        elif req.kind == "rekey_ike":
            req.spi, req.nonce = self._nonzero(8), self.rand(NONCE_SIZE)
            assert self.chosen is not None
            group = self.chosen.one(TransformType.DH)
            assert group is not None
            req.dh = KeyPair(group.id, self.rand(private_size(group.id)))
            req.offer = SAPayload(tuple(Proposal(p.number, Protocol.IKE, req.spi, p.transforms)
                                        for p in self.cfg.ike_proposals.proposals))
            inner = [SAPayloadP(req.offer), NoncePayload(req.nonce), KEPayload(group.id, req.dh.public)]
        else:
            exchange = Exchange.INFORMATIONAL
            if req.kind == "delete_child":
                inner = [DeletePayload(Protocol.ESP, 4, (req.old_spi.to_bytes(4, "big"),))]
            elif req.kind in ("delete_ike", "delete_old_ike"):
                inner = [DeletePayload(Protocol.IKE, 0)]
            else:
                inner = []
        req.message_id = sa.my_next_id
        sa.my_next_id += 1
        req.data = self._seal(sa, exchange, req.message_id, inner, response=False)
        return self._request_out(req, now)

    def _request_out(self, req: _Pending, now: float) -> Output:
        self._pending, self._tries = req, 1
        self._next_retry = now + RETRANSMIT_TIMEOUT
        return Output(send=[req.data])

    def _next_request(self, now: float) -> Output:
        self._pending = None
        while self._queue and self.state is State.ESTABLISHED:
            out = self._send_request(self._queue.pop(0), now)
            if out.send:
                return out
        return Output()

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
        return self._request_out(_Pending("init", self._first, 0), now)

    def tick(self, now: float) -> Output:
        """Retransmits the outstanding request when its time has come; fails the SA after
        ``RETRANSMIT_TRIES`` sends without an answer (for a liveness check: the peer is dead).
        With nothing outstanding, starts what the timers ask for: an IKE SA rekey, a Child SA
        rekey, a liveness check."""
        if self.state is State.ESTABLISHED:
            expired = self._expire(now)
            if expired is not None:
                return expired
        req = self._pending
        if req is None and self.state is State.ESTABLISHED and not self._queue:
            return self._timers(now)
        if req is None or self.state in (State.FAILED, State.DELETED) or now < self._next_retry:
            return Output()
        if self._tries >= RETRANSMIT_TRIES:
            return self._fail(f"no answer to message {req.message_id} ({req.kind}) after "
                              f"{self._tries} sends")
        self._tries += 1
        self._next_retry = now + RETRANSMIT_TIMEOUT * 2 ** (self._tries - 1)
        return Output(send=[req.data])

    def _expire(self, now: float) -> Output | None:
        """The hard lifetimes, whatever is under way (a rekey still retransmitted, say): an
        expired IKE SA fails with its Child SAs (a Delete is sent if the window is free, not
        waited for); an expired Child SA goes at once and its Delete is asked for."""
        if self._ike_expires and now >= self._ike_expires:
            out = Output()
            sa = self._sa
            if sa is not None and self._pending is None:
                out.send.append(self._seal(sa, Exchange.INFORMATIONAL, sa.my_next_id,
                                           [DeletePayload(Protocol.IKE, 0)], response=False))
                sa.my_next_id += 1
            self.state = State.FAILED
            self.children.clear()
            self._child_expires.clear()
            self._pending, self._queue = None, []
            out.events.append(Event("failed", f"hard lifetime ({self.cfg.life_time:g} s) reached "
                                    "without a rekey: IKE SA and its Child SAs deleted"))
            return out
        gone = [spi for spi, end in self._child_expires.items() if now >= end]
        if not gone:
            return None
        out = Output()
        for spi in gone:
            del self._child_expires[spi]
            self._child_due.pop(spi, None)
            if spi not in self.children:
                continue
            self._forget_child(spi)
            out.events.append(Event("child_expired", f"hard lifetime ({self.cfg.child_life_time:g} "
                                    "s) reached without a rekey", None, spi))
            out.extend(self.delete_child(spi, now))
        return out

    def _timers(self, now: float) -> Output:
        cfg = self.cfg
        if self._ike_due and now >= self._ike_due:
            self._ike_due = 0.0
            return self.rekey_ike(now)
        for spi, due in list(self._child_due.items()):
            if now >= due:
                del self._child_due[spi]
                if spi in self.children:
                    return self.rekey_child(spi, now)
        if cfg.dpd_delay and now - self._heard >= cfg.dpd_delay:
            self._heard = now  # one check at a time; its retransmissions decide
            return self.ping(now)
        return Output()

    def _due(self, now: float, period: float) -> float:
        """``now + period``, up to 10 % earlier at random; 0 for a period of 0."""
        if not period:
            return 0.0
        return now + period * (1 - self.rand(1)[0] / 2550)

    def _arm(self, now: float) -> None:
        """Timers after the IKE SA came up (or was rekeyed) and for each new Child SA."""
        self._heard = now
        if not self._ike_due:
            self._ike_due = self._due(now, self.cfg.rekey_time)
        if not self._ike_expires and self.cfg.life_time:
            self._ike_expires = now + self.cfg.life_time
        for spi in self.children:
            if spi not in self._child_due and self.cfg.child_rekey_time:
                self._child_due[spi] = self._due(now, self.cfg.child_rekey_time)
            if spi not in self._child_expires and self.cfg.child_life_time:
                self._child_expires[spi] = now + self.cfg.child_life_time

    # -- receiving -------------------------------------------------------------------------
    def receive(self, data: bytes, now: float, source: tuple[bytes, int] | None = None) -> Output:
        """One datagram from the peer (the IKE message, without a non-ESP marker), and where
        it came from (packed address, port) for NAT detection, if the shell knows."""
        self._source = source
        self._opened = False
        try:
            header = decode_header(data)
        except IkeError as err:
            return self._drop(err.notify.name.lower())
        try:
            if header.is_response:
                out = self._response(data, header, now)
            else:
                out = self._request_in(data, header, now)
        except IkeError as err:
            return self._drop(err.notify.name.lower())
        if self.state is State.ESTABLISHED:
            if self._opened:  # something authentic arrived (a replayed request is not)
                self._heard = now
            if any(e.kind in ("established", "rekeyed", "ike_rekeyed") for e in out.events):
                if any(e.kind == "ike_rekeyed" for e in out.events):
                    self._ike_due = self._ike_expires = 0.0  # the new IKE SA's own
                self._arm(now)
        return out

    def _drop(self, why: str) -> Output:
        self.dropped[why] += 1
        return Output()

    def _which_sa(self, header: Header) -> _Keys | None:
        for sa in (self._sa, self._old_sa):
            if sa is not None and (header.spi_i, header.spi_r) == (sa.spi_i, sa.spi_r):
                return sa
        return None

    def _response(self, data: bytes, header: Header, now: float) -> Output:
        req = self._pending
        if req is None or header.message_id != req.message_id:
            return self._drop("not_ours")
        if req.kind == "init":
            if header.spi_i != self.spi_i or header.exchange != Exchange.IKE_SA_INIT:
                return self._drop("not_ours")
            return self._init_response(data, decode_message(data), now)
        sa = self._which_sa(header)
        if sa is None or sa is not (self._old_sa if req.kind == "delete_old_ike" else self._sa):
            return self._drop("not_ours")
        try:
            inner = self._open(sa, data, header)
        except IkeError as err:
            return self._drop(err.notify.name.lower())
        msg = Message(header, inner)
        if req.kind == "auth":
            return self._auth_response(msg, now)
        out = self._answered(req, msg, now)
        if self.state is State.ESTABLISHED:
            out.extend(self._next_request(now))
        else:
            self._pending = None
        return out

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
            return self._fail(f"the peer refused IKE_SA_INIT: {_notify_name(errors[0])}")
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
        self._sa = _Keys(self.spi_i, self.spi_r, self.keys, self.role is Role.INITIATOR)

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
        sa = self._sa
        assert sa is not None
        req = _Pending("auth", spi=self._nonzero(4))
        req.offer = childsa.offer(self.cfg.terms, req.spi)
        inner: list[Payload] = [
            IdPayload(self.cfg.local_id.id_type, self.cfg.local_id.data, PT.IDI),
            IdPayload(self.cfg.remote_id.id_type, self.cfg.remote_id.data, PT.IDR),
            AuthPayload(AuthMethod.SHARED_KEY_MIC, self._auth_value(mine=True)),
            *childsa.request_payloads(self.cfg.terms, req.offer),
        ]
        self.state = State.AUTH_SENT
        req.message_id = 1
        sa.my_next_id = 2
        req.data = self._seal(sa, Exchange.IKE_AUTH, 1, inner, response=False)
        return self._request_out(req, now)

    def _seal(self, sa: _Keys, exchange: int, message_id: int, inner: list[Payload],
              response: bool) -> bytes:
        k = sa.keys
        flags = (Flag.INITIATOR if sa.original_initiator else 0) | (Flag.RESPONSE if response else 0)
        header = Header(sa.spi_i, sa.spi_r, 0, exchange, flags, message_id)
        self._sent += 1
        # AEAD: a counter, unique under this key; CBC: unpredictable
        n = iv_size(k.suite)
        iv = self._sent.to_bytes(n, "big") if k.suite.aead else self.rand(n)
        ours_i = sa.original_initiator
        return seal(header, [], inner, k.suite, k.sk_ei if ours_i else k.sk_er,
                    k.sk_ai if ours_i else k.sk_ar, iv)

    def _open(self, sa: _Keys, data: bytes, header: Header) -> tuple[Payload, ...]:
        k = sa.keys
        msg = decode_message(data)
        if not msg.payloads or not isinstance(msg.payloads[-1], EncryptedPayload):
            raise IkeError(Notify.INVALID_SYNTAX, "no Encrypted payload")
        theirs_i = not sa.original_initiator
        inner = open_message(data, header, msg.payloads[-1], k.suite,
                             k.sk_ei if theirs_i else k.sk_er, k.sk_ai if theirs_i else k.sk_ar)
        self._opened = True
        return inner

    def _auth_response(self, msg: Message, now: float) -> Output:
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
        req = self._pending
        assert req is not None and req.offer is not None
        self._pending = None
        self.state = State.ESTABLISHED
        errors = [n for n in notes if n < 16384]
        if errors:
            return Output(events=[Event("failed", "IKE SA up, no Child SA: the peer answered "
                                        + _notify_name(errors[0]))])
        try:
            chosen, local, remote = childsa.check_answer(self.cfg.terms, req.offer, msg)
        except IkeError as err:
            return Output(events=[Event("failed", f"IKE SA up, no Child SA: {err.detail}")])
        made = self._make_child(chosen, req.spi, self.ni, self.nr, True, local, remote)
        return Output(events=[Event("established", "", made)])

    def _make_child(self, chosen: Proposal, our_spi: bytes, ni: bytes, nr: bytes,
                    we_initiated: bool, local: tuple[TrafficSelector, ...],
                    remote: tuple[TrafficSelector, ...], shared: bytes = b"") -> ChildSA:
        k = self.keys
        assert k is not None
        made = childsa.make(k.suite.prf, k.sk_d, chosen, our_spi, ni, nr, we_initiated, local,
                            remote, self.cfg.transport, self.nat, shared)
        self.children[made.spi_in] = made
        self.child = made
        return made

    def _answered(self, req: _Pending, msg: Message, now: float) -> Output:
        """The answer to a CREATE_CHILD_SA or INFORMATIONAL request of ours."""
        errors = [n.notify for n in msg.notifies() if n.notify < 16384]
        if req.kind == "rekey_child":
            if errors:
                return Output(events=[Event("failed", f"rekey of {req.old_spi:08x} refused: "
                                            + _notify_name(errors[0]))])
            assert req.offer is not None
            try:
                chosen, local, remote = childsa.check_answer(self.cfg.terms, req.offer, msg)
                nonce = _one(msg, PT.NONCE, NoncePayload)
            except IkeError as err:
                return Output(events=[Event("failed", f"rekey of {req.old_spi:08x}: {err.detail}")])
            shared = b""
            if req.dh is not None:
                kes = [p for p in msg.payloads if isinstance(p, KEPayload)]
                if len(kes) != 1 or kes[0].group != req.dh.group:
                    return Output(events=[Event("failed", f"rekey of {req.old_spi:08x}: no KE "
                                                "for the PFS group")])
                shared = req.dh.shared(kes[0].data)
            made = self._make_child(chosen, req.spi, req.nonce, nonce.data, True, local, remote,
                                    shared)
            self.rekeys["child"] += 1
            self._queue.insert(0, _Pending("delete_child", old_spi=req.old_spi))
            self._rekey_made(req.old_spi, True, made.spi_in, req.nonce, nonce.data)
            return Output(events=[Event("rekeyed", "", made, req.old_spi)])
        if req.kind == "rekey_ike":
            if errors:
                return Output(events=[Event("failed", "IKE SA rekey refused: "
                                            + _notify_name(errors[0]))])
            try:
                return self._ike_rekeyed(req, msg)
            except IkeError as err:
                return Output(events=[Event("failed", f"IKE SA rekey: {err.detail}")])
        if req.kind == "delete_child":
            return Output(events=[self._forget_child(req.old_spi)])
        if req.kind == "delete_old_ike":
            self._old_sa = None
            return Output()
        if req.kind == "delete_ike":
            self.state = State.DELETED
            self.children.clear()
            return Output(events=[Event("deleted", "we deleted the IKE SA")])
        return Output(events=[Event("alive")])

    def _ike_rekeyed(self, req: _Pending, msg: Message) -> Output:
        assert req.offer is not None and req.dh is not None
        sa = _one(msg, PT.SA, SAPayloadP)
        chosen = check_chosen(sa.sa, req.offer)
        ke = _one(msg, PT.KE, KEPayload)
        nonce = _one(msg, PT.NONCE, NoncePayload)
        if len(chosen.spi) != 8:
            raise IkeError(Notify.INVALID_SYNTAX, f"an IKE SPI of {len(chosen.spi)} bytes")
        shared = req.dh.shared(ke.data)
        self._switch_ike(chosen, req.spi, chosen.spi, req.nonce, nonce.data, shared, True)
        self._queue.insert(0, _Pending("delete_old_ike"))
        return Output(events=[Event("ike_rekeyed")])

    def _switch_ike(self, chosen: Proposal, spi_i: bytes, spi_r: bytes, ni: bytes, nr: bytes,
                    shared: bytes, we_initiated: bool) -> None:
        """The new IKE SA of a rekey (section 2.18): SKEYSEED from the old SK_d and PRF, the
        exchange's initiator the new SA's original initiator, message IDs from 0."""
        old = self._sa
        assert old is not None
        old_prf = old.keys.suite.prf
        suite = Suite.of(chosen)
        seed = rekeyed_skeyseed(old_prf, old.keys.sk_d, shared, ni, nr)
        keys = ike_keys(suite, seed, ni, nr, spi_i, spi_r, derive_prf=old_prf)
        self._old_sa = old
        self._sa = _Keys(spi_i, spi_r, keys, we_initiated)
        self.spi_i, self.spi_r, self.keys = spi_i, spi_r, keys
        self.chosen = Proposal(chosen.number, chosen.protocol, b"", chosen.transforms)
        self.role = Role.INITIATOR if we_initiated else Role.RESPONDER
        self.rekeys["ike"] += 1

    def _rekey_made(self, old_spi: int, ours: bool, new_spi: int, ni: bytes, nr: bytes) -> None:
        """A rekey of the Child SA ``old_spi`` is done (``ours``: we started it). If the peer
        rekeyed it too, the successor made by the exchange with the lowest nonce is redundant
        and the end that started that exchange deletes it (RFC 7296 section 2.8.1); both ends
        come to the same answer from the same four nonces."""
        done = self._rekeys_of.setdefault(old_spi, [])
        done.append((ours, new_spi, ni, nr))
        mine = next((d for d in done if d[0]), None)
        theirs = next((d for d in done if not d[0]), None)
        if mine is None or theirs is None:
            return
        del self._rekeys_of[old_spi]
        self.rekey_collisions += 1
        if min(mine[2], mine[3]) < min(theirs[2], theirs[3]):  # ours is redundant
            self._queue.insert(0, _Pending("delete_child", old_spi=mine[1]))

    def _forget_child(self, spi_in: int) -> Event:
        self.children.pop(spi_in, None)
        self._child_expires.pop(spi_in, None)
        # Its rekey records go too, unless a rekey of it of ours is still on its way (the
        # peer may have deleted it first, its own rekey's record waiting for our answer):
        # a rekey of it the peer asks for from now on is refused.
        ours = [p for p in (self._pending, *self._queue)
                if p is not None and p.kind == "rekey_child" and p.old_spi == spi_in]
        if not ours:
            self._rekeys_of.pop(spi_in, None)
        if self.child is not None and self.child.spi_in == spi_in:
            self.child = next(reversed(self.children.values()), None)
        return Event("child_deleted", "", None, spi_in)

    # -- requests from the peer ------------------------------------------------------------
    def _request_in(self, data: bytes, header: Header, now: float) -> Output:
        if self.state in (State.IDLE, State.INIT_DONE) or self._sa is None:
            return self._setup_request(data, header)
        sa = self._which_sa(header)
        if sa is None:
            return self._drop("not_ours")
        if header.from_initiator != (not sa.original_initiator):
            return self._drop("flags")
        if self._last_answer is not None and self._last_answer[:2] == (sa, header.message_id):
            return Output(send=[self._last_answer[2]])  # a retransmission: the same answer
        if header.message_id != sa.peer_next_id:
            return self._drop("message_id")
        try:
            inner = self._open(sa, data, header)
        except IkeError as err:
            return self._drop(err.notify.name.lower())
        msg = Message(header, inner)
        if sa is self._old_sa:  # the old IKE SA after a rekey: only its Delete is expected
            if header.exchange == Exchange.INFORMATIONAL:
                sa.peer_next_id += 1
                self._old_sa = None
                return Output(send=[self._seal(sa, Exchange.INFORMATIONAL, header.message_id, [],
                                               response=True)])
            return self._drop("unexpected_request")
        if self.state is not State.ESTABLISHED:
            return self._drop("unexpected_request")
        if header.exchange == Exchange.INFORMATIONAL:
            return self._informational(sa, msg)
        if header.exchange == Exchange.CREATE_CHILD_SA:
            return self._create_child(sa, msg)
        return self._drop("unexpected_request")

    def _answer(self, sa: _Keys | None, message_id: int, data: bytes) -> Output:
        self._last_answer = (sa, message_id, data)
        if sa is not None:
            sa.peer_next_id = message_id + 1
        else:
            self._peer_next_id = message_id + 1
        return Output(send=[data])

    def _setup_request(self, data: bytes, header: Header) -> Output:
        """IKE_SA_INIT and IKE_AUTH requests to a responder."""
        if self.role is not Role.RESPONDER or not header.from_initiator:
            return self._drop("flags")
        if self._last_answer is not None and header.message_id == self._last_answer[1]:
            if header.exchange == Exchange.IKE_SA_INIT and data != self._peer_first:
                return self._drop("not_ours")
            return Output(send=[self._last_answer[2]])  # a retransmission: the same answer
        if header.message_id != self._peer_next_id:
            return self._drop("message_id")
        if self.state is State.IDLE and header.exchange == Exchange.IKE_SA_INIT:
            return self._init_request(data, decode_message(data))
        if self.state is State.INIT_DONE and header.exchange == Exchange.IKE_AUTH \
                and header.spi_i == self.spi_i and header.spi_r == self.spi_r:
            return self._auth_request(data, header)
        return self._drop("unexpected_request")

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
            return Output(send=[encode_message(
                Header(msg.header.spi_i, bytes(8), 0, Exchange.IKE_SA_INIT, Flag.RESPONSE, 0),
                [NotifyPayload(Notify.INVALID_KE_PAYLOAD, data=group.id.to_bytes(2, "big"))])])
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
        return self._answer(None, 0, answer)

    def _refuse_init(self, err: IkeError) -> Output:
        self.state = State.FAILED
        header = Header(self.spi_i, bytes(8), 0, Exchange.IKE_SA_INIT, Flag.RESPONSE, 0)
        notify = err.notify if err.notify < 16384 else Notify.INVALID_SYNTAX
        out = Output(send=[encode_message(header, [NotifyPayload(notify)])])
        out.events.append(Event("failed", f"IKE_SA_INIT refused: {err.detail}"))
        return out

    def _auth_request(self, data: bytes, header: Header) -> Output:
        sa = self._sa
        assert sa is not None
        try:
            inner = self._open(sa, data, header)
        except IkeError as err:
            return self._drop(err.notify.name.lower())
        msg = Message(header, inner)
        try:
            idi = _one(msg, PT.IDI, IdPayload)
            auth = _one(msg, PT.AUTH, AuthPayload)
        except IkeError as err:
            return self._auth_refused(sa, header, f"IKE_AUTH request: {err.detail}")
        if (idi.id_type, idi.data) != (self.cfg.remote_id.id_type, self.cfg.remote_id.data):
            return self._auth_refused(sa, header, "the peer's identity is not the configured one")
        if auth.method != AuthMethod.SHARED_KEY_MIC or not auth_matches(
                self._auth_value(mine=False), auth.data):
            return self._auth_refused(sa, header, "the peer's AUTH does not verify (pre-shared key)")
        self.state = State.ESTABLISHED
        sa.peer_next_id = 1
        out_payloads: list[Payload] = [
            IdPayload(self.cfg.local_id.id_type, self.cfg.local_id.data, PT.IDR),
            AuthPayload(AuthMethod.SHARED_KEY_MIC, self._auth_value(mine=True)),
        ]
        event: Event
        spi = self._nonzero(4)
        try:
            payloads, chosen, local, remote = childsa.answer(self.cfg.terms, msg, spi)
            out_payloads += payloads
            event = Event("established", "", self._make_child(chosen, spi, self.ni, self.nr, False,
                                                              local, remote))
        except IkeError as err:
            out_payloads.append(NotifyPayload(err.notify))
            event = Event("failed", f"IKE SA up, no Child SA: {err.detail}")
        out = self._answer(sa, header.message_id, self._seal(sa, Exchange.IKE_AUTH, header.message_id,
                                                             out_payloads, response=True))
        out.events.append(event)
        return out

    def _auth_refused(self, sa: _Keys, header: Header, why: str) -> Output:
        self.state = State.FAILED
        out = self._answer(None, header.message_id, self._seal(
            sa, Exchange.IKE_AUTH, header.message_id, [NotifyPayload(Notify.AUTHENTICATION_FAILED)],
            response=True))
        out.events.append(Event("failed", why))
        return out

    def _informational(self, sa: _Keys, msg: Message) -> Output:
        """An INFORMATIONAL request: answered; Deletes of Child SAs are answered with the
        paired SAs' Deletes (section 1.4.1), a Delete of the IKE SA ends it, an empty one is
        a liveness check."""
        events: list[Event] = []
        answer: list[Payload] = []
        ours: list[bytes] = []
        for p in msg.payloads:
            if not isinstance(p, DeletePayload):
                continue
            if p.protocol == Protocol.IKE:
                self.state = State.DELETED
                self.children.clear()
                events.append(Event("deleted", "the peer deleted the IKE SA"))
            elif p.protocol == Protocol.ESP and p.spi_size == 4:
                for spi in p.spis:
                    peer_spi = int.from_bytes(spi, "big")
                    mine = next((c for c in self.children.values() if c.spi_out == peer_spi), None)
                    if mine is not None:
                        ours.append(mine.spi_in.to_bytes(4, "big"))
                        events.append(self._forget_child(mine.spi_in))
        if ours:
            answer.append(DeletePayload(Protocol.ESP, 4, tuple(ours)))
        out = self._answer(sa, msg.header.message_id, self._seal(
            sa, Exchange.INFORMATIONAL, msg.header.message_id, answer, response=True))
        out.events += events
        return out

    def _create_child(self, sa: _Keys, msg: Message) -> Output:
        """A CREATE_CHILD_SA request: a Child SA rekey (REKEY_SA), a new Child SA, or an IKE
        SA rekey (an SA payload for IKE)."""
        mid = msg.header.message_id
        try:
            found = _one(msg, PT.SA, SAPayloadP)
            nonce = _one(msg, PT.NONCE, NoncePayload)
        except IkeError as err:
            return self._refuse(sa, mid, err)
        if found.sa.proposals and found.sa.proposals[0].protocol == Protocol.IKE:
            return self._rekey_ike_request(sa, msg, found.sa, nonce.data)
        rekey = next((n for n in msg.notifies() if n.notify == Notify.REKEY_SA), None)
        old: ChildSA | None = None
        if rekey is not None:
            peer_spi = int.from_bytes(rekey.spi, "big")
            old = next((c for c in self.children.values() if c.spi_out == peer_spi), None)
            if old is None:
                return self._refuse(sa, mid, IkeError(
                    Notify.CHILD_SA_NOT_FOUND, f"no Child SA with SPI {peer_spi:08x} to rekey"))
        our_nonce, spi = self.rand(NONCE_SIZE), self._nonzero(4)
        try:
            payloads, chosen, local, remote = childsa.answer(self.cfg.terms, msg, spi)
            shared, ke_out = self._child_dh(msg, chosen)
        except IkeError as err:
            return self._refuse(sa, mid, err)
        made = self._make_child(chosen, spi, nonce.data, our_nonce, False, local, remote, shared)
        answer: list[Payload] = [*payloads[:-2], NoncePayload(our_nonce), *ke_out, *payloads[-2:]]
        out = self._answer(sa, mid, self._seal(sa, Exchange.CREATE_CHILD_SA, mid, answer, response=True))
        if old is not None:
            self.rekeys["child"] += 1
            out.events.append(Event("rekeyed", "", made, old.spi_in))
            self._rekey_made(old.spi_in, False, made.spi_in, nonce.data, our_nonce)
        else:
            out.events.append(Event("established", "", made))
        return out

    def _child_dh(self, msg: Message, chosen: Proposal) -> tuple[bytes, list[Payload]]:
        """PFS: the chosen proposal's DH group with the request's KE (section 1.3.1)."""
        group = chosen.one(TransformType.DH)
        kes = [p for p in msg.payloads if isinstance(p, KEPayload)]
        if group is None or group.id == 0:
            return b"", []
        if len(kes) != 1 or kes[0].group != group.id:
            raise IkeError(Notify.INVALID_KE_PAYLOAD, f"PFS with DH group {group.id} needs its KE")
        dh = KeyPair(group.id, self.rand(private_size(group.id)))
        return dh.shared(kes[0].data), [KEPayload(group.id, dh.public)]

    def _rekey_ike_request(self, sa: _Keys, msg: Message, offered: SAPayload, ni: bytes) -> Output:
        mid = msg.header.message_id
        try:
            chosen = choose(offered, self.cfg.ike_proposals)
            if len(chosen.spi) != 8:
                raise IkeError(Notify.INVALID_SYNTAX, f"an IKE SPI of {len(chosen.spi)} bytes")
            group = chosen.one(TransformType.DH)
            ke = _one(msg, PT.KE, KEPayload)
            if group is None or ke.group != group.id:
                raise IkeError(Notify.INVALID_KE_PAYLOAD, "the KE is not of the chosen group")
            dh = KeyPair(group.id, self.rand(private_size(group.id)))
            shared = dh.shared(ke.data)
        except IkeError as err:
            return self._refuse(sa, mid, err)
        nr, spi = self.rand(NONCE_SIZE), self._nonzero(8)
        reply = Proposal(chosen.number, Protocol.IKE, spi, chosen.transforms)
        out = self._answer(sa, mid, self._seal(sa, Exchange.CREATE_CHILD_SA, mid, [
            SAPayloadP(SAPayload((reply,))), NoncePayload(nr), KEPayload(group.id, dh.public)],
            response=True))
        self._switch_ike(chosen, chosen.spi, spi, ni, nr, shared, False)
        out.events.append(Event("ike_rekeyed"))
        return out

    def _refuse(self, sa: _Keys, mid: int, err: IkeError) -> Output:
        notify = err.notify if err.notify < 16384 else Notify.NO_PROPOSAL_CHOSEN
        out = self._answer(sa, mid, self._seal(sa, Exchange.CREATE_CHILD_SA, mid,
                                               [NotifyPayload(notify)], response=True))
        out.events.append(Event("failed", f"CREATE_CHILD_SA refused: {err.detail}"))
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
        self._pending = None
        self._queue.clear()
        return Output(events=[Event("failed", why)])

    def _nonzero(self, n: int) -> bytes:
        while True:
            b = self.rand(n)
            if any(b):
                return b


def _notify_name(n: int) -> str:
    return Notify(n).name if n in Notify._value2member_map_ else f"notify {n}"


def natd_hash(spi_i: bytes, spi_r: bytes, addr: bytes, port: int) -> bytes:
    """SHA-1(SPIi | SPIr | IP | Port): the hash section 2.23 prescribes (not a security use)."""
    return hashlib.sha1(spi_i + spi_r + addr + port.to_bytes(2, "big"), usedforsecurity=False).digest()


def _one(msg: Message, kind: int, cls: type[_P]) -> _P:
    found = msg.find(kind)
    if len(found) != 1 or not isinstance(found[0], cls):
        raise IkeError(Notify.INVALID_SYNTAX, f"{len(found)} {PT(kind).name} payloads, need one")
    return found[0]

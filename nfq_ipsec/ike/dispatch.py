"""All IKE SAs of one agent, and the door they come in by (RFC 7296 sections 2.1, 2.6, 2.22).

``Dispatcher.receive`` takes every IKE datagram with its source and hands it to the IKE SA it
belongs to, found by our SPI (the responder's SPI of SAs we answered, the initiator's of SAs we
began; after an IKE SA rekey, its new one). An IKE_SA_INIT request with a zero responder SPI
starts a new responder SA for the peer whose configuration names that source address, unless
it is a retransmission of one already answered (same initiator SPI and source: the same
answer again).

Half-open SAs (IKE_SA_INIT answered, IKE_AUTH not yet) cost memory and a DH computation each,
which is what a flood from spoofed addresses aims at. From ``cookie_threshold`` half-open SAs
on, a request must carry a COOKIE that proves its sender receives at its address (section 2.6:
``SHA-256(Ni | IPi | SPIi | secret)``, the secret replaced every ``COOKIE_ROTATION`` seconds
with the previous one still accepted); without one it gets the cookie, statelessly, and no SA.
Beyond ``max_half_open`` nothing new is started at all. Half-open SAs that don't finish within
``HALF_OPEN_TIMEOUT`` are forgotten. Everything refused is counted in ``dropped``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .errors import IkeError, Notify
from .message import (
    PT,
    Exchange,
    Flag,
    Header,
    NoncePayload,
    NotifyPayload,
    decode_header,
    decode_message,
    encode_message,
)
from .session import IkeSession, Output, PeerConfig, Role, State

COOKIE_VERSION = b"\x01"
COOKIE_ROTATION = 120.0  # seconds a cookie secret lives (the previous one is still accepted)
HALF_OPEN_TIMEOUT = 30.0  # seconds a half-open SA may wait for its IKE_AUTH


@dataclass
class _Entry:
    session: IkeSession
    source: tuple[bytes, int]
    started: float
    spis: frozenset[bytes] = frozenset()  # the keys it is filed under


class Dispatcher:
    """The agent's IKE SAs. ``peers`` maps a peer's packed address to its configuration;
    ``rand(n)`` gives random bytes."""

    def __init__(self, peers: dict[bytes, PeerConfig], rand: Callable[[int], bytes], now: float,
                 cookie_threshold: int = 50, max_half_open: int = 1000) -> None:
        self.peers, self.rand = peers, rand
        self.cookie_threshold, self.max_half_open = cookie_threshold, max_half_open
        self.sessions: dict[bytes, _Entry] = {}  # by our SPI (and the old one after a rekey)
        self._answered: dict[tuple[bytes, bytes, int], _Entry] = {}  # half-open, by SPIi and source
        self.dropped: Counter[str] = Counter()
        self.cookies_sent = 0
        self._secret, self._old_secret = rand(32), b""
        self._rotated = now

    # -- entry points ----------------------------------------------------------------------
    def initiate(self, peer: bytes, now: float) -> tuple[IkeSession, Output]:
        """Begin an IKE SA with the peer at ``peer`` (its configuration must exist)."""
        session = IkeSession(Role.INITIATOR, self.peers[peer], self.rand)
        out = session.start(now)
        self.sessions[session.spi_i] = _Entry(session, (peer, 500), now, frozenset([session.spi_i]))
        return session, out

    def receive(self, data: bytes, source: tuple[bytes, int], now: float) -> Output:
        try:
            header = decode_header(data)
        except IkeError as err:
            self.dropped[err.notify.name.lower()] += 1
            return Output()
        if header.spi_r == bytes(8) and header.exchange == Exchange.IKE_SA_INIT \
                and not header.is_response:
            return self._sa_init(data, header, source, now)
        mine = header.spi_r if header.from_initiator else header.spi_i
        entry = self.sessions.get(mine)
        if entry is None and header.is_response and header.exchange == Exchange.IKE_SA_INIT:
            entry = self.sessions.get(header.spi_i)  # the answer to our own IKE_SA_INIT
        if entry is None:
            self.dropped["unknown_spi"] += 1
            return Output()
        out = entry.session.receive(data, now, source)
        self._reindex(entry)
        return out

    def tick(self, now: float) -> Output:
        """Retransmissions, cookie secret rotation, and half-open SAs that waited too long."""
        if now - self._rotated >= COOKIE_ROTATION:
            self._old_secret, self._secret, self._rotated = self._secret, self.rand(32), now
        out = Output()
        for key, entry in list(self._answered.items()):
            if entry.session.state is not State.INIT_DONE:
                del self._answered[key]
        for spi, entry in list(self.sessions.items()):
            s = entry.session
            if s.state in (State.FAILED, State.DELETED):
                del self.sessions[spi]
                self._answered.pop((s.spi_i, *entry.source), None)
                continue
            if s.state is State.INIT_DONE and now - entry.started > HALF_OPEN_TIMEOUT:
                del self.sessions[spi]
                self._answered.pop((s.spi_i, *entry.source), None)
                self.dropped["half_open_timeout"] += 1
                continue
            out.extend(s.tick(now))
            self._reindex(entry)
        return out

    @property
    def half_open(self) -> int:
        return len(self._answered)

    # -- IKE_SA_INIT requests --------------------------------------------------------------
    def _sa_init(self, data: bytes, header: Header, source: tuple[bytes, int], now: float) -> Output:
        known = self._answered.get((header.spi_i, *source))
        if known is not None and known.session.state is State.INIT_DONE:
            return known.session.receive(data, now, source)  # a retransmission: the same answer
        cfg = self.peers.get(source[0])
        if cfg is None:
            self.dropped["unknown_peer"] += 1
            return Output()
        half_open = self.half_open
        if half_open >= self.max_half_open:
            self.dropped["half_open_limit"] += 1
            return Output()
        if half_open >= self.cookie_threshold:
            try:
                msg = decode_message(data)
            except IkeError as err:
                self.dropped[err.notify.name.lower()] += 1
                return Output()
            nonces = [p for p in msg.payloads if isinstance(p, NoncePayload)]
            if len(nonces) != 1:
                self.dropped["invalid_syntax"] += 1
                return Output()
            got = next((p.data for p in msg.payloads if isinstance(p, NotifyPayload)
                        and p.notify == Notify.COOKIE), None)
            if got is None or not self._cookie_ok(got, nonces[0].data, source[0], header.spi_i):
                self.cookies_sent += 1
                self.dropped["cookie_required" if got is None else "cookie_invalid"] += 1
                cookie = self._cookie(self._secret, nonces[0].data, source[0], header.spi_i)
                return Output(send=[encode_message(
                    Header(header.spi_i, bytes(8), 0, Exchange.IKE_SA_INIT, Flag.RESPONSE, 0),
                    [NotifyPayload(Notify.COOKIE, data=cookie)])])
        session = IkeSession(Role.RESPONDER, cfg, self.rand)
        out = session.receive(data, now, source)
        if session.state is State.INIT_DONE:
            entry = _Entry(session, source, now, frozenset([session.spi_r]))
            self.sessions[session.spi_r] = entry
            self._answered[(header.spi_i, *source)] = entry
        return out

    @staticmethod
    def _cookie(secret: bytes, ni: bytes, ip: bytes, spi_i: bytes) -> bytes:
        return COOKIE_VERSION + hashlib.sha256(ni + ip + spi_i + secret).digest()

    def _cookie_ok(self, got: bytes, ni: bytes, ip: bytes, spi_i: bytes) -> bool:
        return any(secret and hmac.compare_digest(got, self._cookie(secret, ni, ip, spi_i))
                   for secret in (self._secret, self._old_secret))

    def _reindex(self, entry: _Entry) -> None:
        """After an IKE SA rekey our SPI is a new one: file the SA under it (and under the old
        one until its Delete is through); once established it is no longer half-open."""
        s = entry.session
        if s.state is not State.INIT_DONE:
            self._answered.pop((s.spi_i, *entry.source), None)
        spis = frozenset(s.our_spis)
        if spis == entry.spis:
            return
        for spi in entry.spis - spis:
            if self.sessions.get(spi) is entry:
                del self.sessions[spi]
        for spi in spis:
            self.sessions[spi] = entry
        entry.spis = spis


__all__ = ["PT", "Dispatcher"]

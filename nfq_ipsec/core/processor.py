"""The processor: SPD + SAD + ESP for one compartment (one worker's queue).

Bytes in, a Result out. No I/O; time is a parameter. A processor holds only the SAs it was
given, so a worker knows the keys of its own queue and nothing else.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from . import esp
from . import packet as ip
from .errors import DropReason, EspError
from .sa import SAEvent, SAParams, SecurityAssociation
from .sad import SAD
from .spd import SPD, Action, Policy

FLOW_CACHE_SIZE: Final = 4096  # flows whose SPD answer a processor remembers, per direction


class Verdict(enum.Enum):
    ACCEPT = "accept"
    DROP = "drop"


class Result:
    """What to do with a packet. ``packet`` is the new payload, or None if unchanged.

    A plain class, not a dataclass: one is made per packet, and the compiled core builds a
    plain class about five times faster."""

    __slots__ = ("detail", "packet", "reason", "sa", "seq", "verdict")

    def __init__(
        self, verdict: Verdict, packet: bytes | None = None, reason: DropReason | None = None,
        sa: SecurityAssociation | None = None, seq: int | None = None, detail: str = "",
    ) -> None:
        self.verdict = verdict
        self.packet = packet
        self.reason = reason
        self.sa = sa
        self.seq = seq
        self.detail = detail

    def __repr__(self) -> str:
        size = "unchanged" if self.packet is None else f"{len(self.packet)} bytes"
        sa = "" if self.sa is None else f", sa={self.sa.name}"
        reason = "" if self.reason is None else f", reason={self.reason.value}"
        return f"<Result {self.verdict.value}, {size}{reason}{sa}>"


@dataclass(frozen=True, slots=True)
class Event:
    """Something the shell should report once (soft/hard expiry, exhaustion)."""

    sa_name: str
    spi: int
    kind: SAEvent


class Processor:
    def __init__(
        self, spd: SPD, sas: Iterable[SAParams | SecurityAssociation], now: float,
        flow_cache_size: int = FLOW_CACHE_SIZE,
    ) -> None:
        self.spd = spd
        self.flow_cache_size = flow_cache_size
        self.sad = SAD(spd, sas, now)
        self.packets_in = 0
        self.packets_out = 0
        self.drops: Counter[DropReason] = Counter()
        self._out_cache: dict[ip.PacketKey, Policy | None] = {}
        self._in_cache: dict[ip.PacketKey, Policy | None] = {}
        self._icmp_cache: dict[ip.PacketKey, Policy | None] = {}  # outbound errors, by quote

    # -- outbound -------------------------------------------------------------------------
    def outbound(self, data: bytes, now: float) -> Result:
        """Apply the outbound SPD to a packet leaving this host (or forwarded by it)."""
        self.packets_in += 1
        sa: SecurityAssociation | None = None
        try:
            hdr = ip.parse_ipv4(data)
            if hdr.protocol == ip.PROTO_ICMP and (quoted := ip.quoted_key(data, hdr)) is not None:
                # RFC 4301 6.2: an ICMP error about a packet that came in goes where that
                # packet's flow goes (its SA), whatever the error's own header says.
                policy = self._policy(quoted, self._icmp_cache, False)
            else:
                policy = self._policy(ip.packet_key(data, hdr), self._out_cache, True)
            if policy is None:
                raise EspError(DropReason.NO_POLICY)
            action = policy.action
            if action is not Action.PROTECT:
                if action is Action.BYPASS:
                    return self._accept(None)
                raise EspError(DropReason.POLICY_DISCARD, policy.name)
            sa = self.sad.outbound_sa(policy)
            if sa is None:
                raise EspError(DropReason.NO_SA, policy.name)
            sa.check_lifetime(now)
            out = esp.encapsulate(sa, data, hdr)
            sa.account(hdr.total_length)
            return self._accept(out, sa, sa.next_seq - 1)
        except EspError as err:
            return self._drop(err, sa)

    def _policy(self, key: ip.PacketKey, cache: dict[ip.PacketKey, Policy | None],
                outbound: bool) -> Policy | None:
        """The SPD's answer for ``key``, remembered per flow. The SPD never changes while a
        processor lives, so a remembered answer is exact; the cache is bounded (emptied when
        full), so a flood of new flows costs one SPD lookup each and no memory."""
        try:
            return cache[key]
        except KeyError:
            pass
        policy = self.spd.lookup(key, outbound)
        if len(cache) >= self.flow_cache_size:
            cache.clear()
        cache[key] = policy
        return policy

    # -- inbound --------------------------------------------------------------------------
    def inbound(self, data: bytes, now: float) -> Result:
        """Process a packet arriving at this host: ESP is decapsulated, cleartext checked."""
        self.packets_in += 1
        sa: SecurityAssociation | None = None
        try:
            hdr = ip.parse_ipv4(data)
            if hdr.protocol != ip.PROTO_ESP:
                return self._inbound_cleartext(data, hdr)
            try:
                dec = esp.decapsulate(data, hdr, self.sad.by_spi, now)
            except EspError as err:
                sa = self.sad.by_spi(err.spi) if err.spi is not None else None
                raise
            sa = dec.sa
            policy = self.sad.policy_of(sa)
            key = ip.packet_key(dec.packet, dec.header)
            quoted = (ip.quoted_key(dec.packet, dec.header)
                      if dec.header.protocol == ip.PROTO_ICMP else None)
            if quoted is not None:
                # an ICMP error under this SA must be about a packet of the SA's own flows,
                # one this side sent (RFC 4301 6.2)
                if policy is None or not policy.selector.matches(quoted, True):
                    raise EspError(
                        DropReason.POLICY_MISMATCH,
                        f"ICMP error about {ip.ip_to_str(quoted.src)} -> {ip.ip_to_str(quoted.dst)} "
                        f"proto {quoted.protocol}", sa.spi)
            elif policy is None or not policy.selector.matches(key, False):
                raise EspError(
                    DropReason.POLICY_MISMATCH,
                    f"inner {ip.ip_to_str(key.src)} -> {ip.ip_to_str(key.dst)} proto {key.protocol}",
                    sa.spi,
                )
            return self._accept(dec.packet, sa, dec.seq)
        except EspError as err:
            return self._drop(err, sa if sa is not None and not sa.outbound else None)

    def _inbound_cleartext(self, data: bytes, hdr: ip.IPv4Header) -> Result:
        quoted = ip.quoted_key(data, hdr) if hdr.protocol == ip.PROTO_ICMP else None
        if quoted is not None:  # an error about a packet this side sent: that flow's policy
            policy = self.spd.lookup(quoted, True)
        else:
            policy = self._policy(ip.packet_key(data, hdr), self._in_cache, False)
        if policy is None:
            raise EspError(DropReason.NO_POLICY)
        if policy.action is Action.BYPASS:
            return self._accept(None)
        if policy.action is Action.DISCARD:
            raise EspError(DropReason.POLICY_DISCARD, policy.name)
        raise EspError(DropReason.CLEARTEXT_PROTECTED, policy.name)

    # -- results and counters -------------------------------------------------------------
    def _accept(
        self, out: bytes | None, sa: SecurityAssociation | None = None, seq: int | None = None
    ) -> Result:
        self.packets_out += 1
        return Result(Verdict.ACCEPT, out, None, sa, seq)

    def _drop(self, err: EspError, sa: SecurityAssociation | None) -> Result:
        self.drops[err.reason] += 1
        if sa is not None:
            sa.drops[err.reason] += 1
        return Result(Verdict.DROP, None, err.reason, sa, None, err.detail)

    def count_drop(self, reason: DropReason) -> None:
        """Count a drop decided outside the core (the shell's fail-closed paths)."""
        self.drops[reason] += 1

    def drain_events(self) -> list[Event]:
        events = []
        for sa in self.sad.all():
            for kind in sa.events:
                events.append(Event(sa.name, sa.spi, kind))
            sa.events.clear()
        return events

"""The entry point: one compartment's SPD and SAD, and a packet through them.

``Engine.process(data, length, where, now)`` has the shape of the core's
``Processor.process`` and answers with an ``Outcome`` whose verdict and drop reason are the
same words the data plane counts (``"accept"``, ``"drop"``, ``"cross"``; ``"integrity"``,
``"replay"``...). What this implementation does not do it refuses explicitly: the verdict
``"drop"`` with the reason ``UNSUPPORTED`` and a detail naming what, so a comparison knows
this version abstained rather than disagreed. docs/independent.md lists those cases. A
refusal changes no state, except where the packet would have taken a sequence number
anyway (so the versions' counters stay in step): then the number is taken and the
refusal comes after it.

No I/O; the time is a parameter. Every module this package needs is imported when it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final

from . import framing, natt
from .fragments import fragment_v4, fragment_v6
from .ipwire import (
    DF,
    ESP,
    ICMPV6,
    UDP,
    V4,
    V6,
    Flow,
    Refused,
    declared_length,
    parse_v4,
    parse_v6,
    v4_header,
)
from .state import Association, Databases, Rule, first_match

ARRIVING: Final = 0
LEAVING: Final = 1
FORWARDED: Final = 2
UNSUPPORTED: Final = "unsupported"  # the drop reason of what this implementation refuses


class Unsupported(Exception):
    """Something the core does that this implementation deliberately does not."""


@dataclass
class Outcome:
    """What to do with a packet: ``verdict`` ``"accept"`` (``packet`` the new bytes, or None:
    unchanged), ``"drop"`` (``reason`` why) or ``"cross"`` (``packets`` of the other IP
    family, sent in the queued packet's place). ``sa_name`` and ``seq``: the SA and
    sequence number that carried it."""

    verdict: str
    packet: bytes | None = None
    reason: str | None = None
    detail: str = ""
    sa_name: str | None = None
    seq: int | None = None
    packets: list[bytes] | None = None
    reply: bytes | None = None  # never set: ICMP errors are not generated here

    @property
    def unsupported(self) -> bool:
        return self.reason == UNSUPPORTED


class Engine:
    """``policies``: the configuration's policies in order; ``sas``: the SA parameters this
    compartment holds; ``mtu``: the unprotected interface's MTU (no path MTU is learned);
    ``max_packet``: the most the shell can hand back; ``ipv6_link``: neighbour discovery and
    MLD pass in clear."""

    def __init__(self, policies: Iterable[Any], sas: Iterable[Any], now: float,
                 mtu: int = 1500, max_packet: int = 65535, ipv6_link: bool = True) -> None:
        self.db = Databases(policies, sas, now)
        self.mtu = mtu
        self.max_packet = max_packet
        self.ipv6_link = ipv6_link
        self.udp_ports = self.db.udp_ports()
        self.drops: dict[str, int] = {}
        # the identification of the last IPv6 fragments made here; the shell seeds it (the
        # same seed as the core's, to compare them), this package having no randomness
        self.frag_ident = 0

    def sa(self, name: str) -> Association:
        return self.db.by_name[name]

    # -- the entry --------------------------------------------------------------------------
    def process(self, data: bytes, length: int, where: int, now: float) -> Outcome:
        data = bytes(data)
        if len(data) < length or len(data) < declared_length(data):
            return self._drop("truncated", f"{len(data)} of {max(length, len(data))} bytes")
        try:
            if data and data[0] >> 4 == 6:
                outcome = (self._arriving6(data, now) if where == ARRIVING
                           else self._leaving6(data, now, where == FORWARDED))
            else:
                outcome = (self._arriving4(data, now) if where == ARRIVING
                           else self._leaving4(data, now, where == FORWARDED))
        except Refused as err:
            return self._drop(err.reason, err.detail)
        except Unsupported as err:
            return self._drop(UNSUPPORTED, str(err))
        out = outcome.packet
        if out is not None:
            if len(out) > self.max_packet:
                return self._drop("too_big", f"{len(out)} bytes to hand back")
            if (out[0] >> 4) != (data[0] >> 4):
                return self._cross(outcome, out)
        return outcome

    def _cross(self, outcome: Outcome, out: bytes) -> Outcome:
        """A packet of the other IP family (a mixed tunnel) can't go back in the verdict: the
        shell sends ``packets`` instead, fragments made here when it is an ESP packet of ours
        too big for the interface (the raw socket that sends it never fragments)."""
        packets = [out]
        sa = self.db.by_name.get(outcome.sa_name or "")
        if sa is not None and sa.outbound and len(out) > self.mtu:
            self.frag_ident = (self.frag_ident + 1) % (1 << 32)
            try:
                packets = (fragment_v6(out, self.mtu, self.frag_ident) if out[0] >> 4 == 6
                           else fragment_v4(out, self.mtu))
            except Refused as err:
                return self._drop(err.reason, err.detail)
        return Outcome("cross", out, None, "", outcome.sa_name, outcome.seq, packets)

    def keepalives(self, now: float) -> list[bytes]:
        """RFC 3948 2.3: a NAT-keepalive for each outbound SA of ESP in UDP idle too long."""
        due = []
        for sa in self.db.by_name.values():
            udp = sa.udp
            if not sa.outbound or udp is None or udp.keepalive <= 0:
                continue
            if now - udp.last_sent < udp.keepalive:
                continue
            packet = natt.keepalive(udp)
            if packet is not None:
                udp.last_sent = now
                due.append(packet)
        return due

    def _drop(self, reason: str, detail: str = "") -> Outcome:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        return Outcome("drop", None, reason, detail)

    # -- the SPD ----------------------------------------------------------------------------
    def _lookup(self, flow: Flow, outbound: bool) -> Rule:
        rule = first_match(self.db.rules, flow, outbound)
        if rule is None:
            raise Refused("no_policy")
        return rule

    def _cleartext_in(self, flow: Flow, quoted: Flow | None) -> Outcome:
        """A packet that came in without ESP: only a bypass rule lets it in. An ICMP error
        is judged by the flow it is about, which this side sent (RFC 4301 6.2)."""
        rule = self._lookup(quoted, True) if quoted is not None else self._lookup(flow, False)
        if rule.action == "bypass":
            return Outcome("accept")
        if rule.action == "discard":
            raise Refused("policy_discard", rule.name)
        raise Refused("cleartext_protected", rule.name)

    def _outbound_rule(self, flow: Flow, quoted: Flow | None) -> Rule:
        # an ICMP error about a packet that came in goes the way of that packet's flow
        return self._lookup(quoted, False) if quoted is not None else self._lookup(flow, True)

    def _sa_for(self, rule: Rule, now: float) -> Association:
        sa = self.db.outbound_sa(rule)
        if sa is None:
            raise Refused("no_sa", rule.name)
        sa.check_lifetime(now)
        return sa

    # -- IPv4 -------------------------------------------------------------------------------
    def _leaving4(self, data: bytes, now: float, forwarded: bool) -> Outcome:
        packet = parse_v4(data)
        rule = self._outbound_rule(packet.flow(), packet.quoted_flow())
        if rule.action == "bypass":
            return Outcome("accept")
        if rule.action == "discard":
            raise Refused("policy_discard", rule.name)
        sa = self._sa_for(rule, now)
        clear_df = False
        if packet.df:
            payload = packet.total if sa.tunnel else packet.total - len(packet.header)
            outer = ((40 if isinstance(sa.remote, IPv6Address) else 20) if sa.tunnel
                     else len(packet.header))
            size = framing.esp_length(sa, payload, outer)
            outer_df = sa.df != "clear" if sa.tunnel else True
            if size > self.mtu and outer_df:
                # RFC 4301 8.2.2. Sent with DF cleared (local, to the SA's peer itself) is
                # done here; telling the sender "fragmentation needed" is not.
                if forwarded or (sa.tunnel and packet.dst != sa.remote):
                    raise Unsupported("a packet too big for the path (ICMP error generation)")
                clear_df = True
        esp = framing.protect_v4(sa, packet, data[: packet.total])
        if sa.udp is not None:
            esp = natt.encapsulate(sa.udp, esp, sa.tunnel, now)
        sa.count(packet.total)
        if clear_df:
            head = parse_v4(esp)
            esp = _v4_without_df(head) + esp[len(head.header) :]
        return Outcome("accept", esp, None, "", sa.name, sa.next_seq - 1)

    def _arriving4(self, data: bytes, now: float) -> Outcome:
        packet = parse_v4(data)
        if packet.protocol != ESP:
            if (packet.protocol == UDP and self.udp_ports
                    and natt.destination_port(packet) in self.udp_ports):
                return self._arriving_udp(packet, now)
            quoted = packet.quoted_flow()
            if quoted is not None and quoted.protocol == ESP:
                raise Unsupported("an ICMP error about ESP (path MTU learning)")
            return self._cleartext_in(packet.flow(), quoted)
        try:
            opened = framing.unprotect_v4(packet, self._plain_esp_sa, now)
        except Refused as err:
            if err.reason == "unknown_spi" and len(packet.payload) >= 4:
                spi = int.from_bytes(packet.payload[:4], "big")
                if spi in self.db.inbound:
                    raise Refused("encap_mismatch", "plain ESP for an SA of ESP in UDP") from None
            raise
        self._check_inner(opened)
        return Outcome("accept", opened.packet, None, "", opened.sa.name, opened.seq)

    def _plain_esp_sa(self, spi: int) -> Association | None:
        sa = self.db.inbound.get(spi)
        return sa if sa is not None and sa.udp is None else None

    def _udp_esp_sa(self, spi: int) -> Association | None:
        sa = self.db.inbound.get(spi)
        return sa if sa is not None and sa.udp is not None else None

    def _arriving_udp(self, packet: V4, now: float) -> Outcome:
        """RFC 3948: a datagram to one of our ESP-in-UDP ports."""
        datagram = natt.classify(packet)
        if datagram.esp is None:
            return Outcome("accept")  # the non-ESP marker: IKE, for the host
        spi = int.from_bytes(datagram.esp[:4], "big")
        owner = self._udp_esp_sa(spi)
        if owner is not None and owner.udp is not None \
                and owner.udp.port != natt.destination_port(packet):
            raise Refused("unknown_spi", f"SPI 0x{spi:08x} on another port")
        esp_packet = natt.as_plain_esp(packet, datagram.esp)
        try:
            opened = framing.unprotect_v4(esp_packet, self._udp_esp_sa, now)
        except Refused as err:
            if err.reason == "unknown_spi" and spi in self.db.inbound:
                raise Refused("encap_mismatch", "ESP in UDP for an SA of plain ESP") from None
            raise
        sa = opened.sa
        udp = sa.udp
        assert udp is not None
        moved = datagram.source_port != udp.peer_port or (
            udp.peer is not None and int(udp.peer) != 0 and packet.src != udp.peer)
        if moved and not udp.follow:
            raise Refused("peer_changed", f"from {packet.src}:{datagram.source_port}")
        if not sa.tunnel and opened.v4 is not None:
            opened.packet = natt.transport_checksum(opened.packet, opened.v4)
            opened.v4 = parse_v4(opened.packet)
        self._check_inner(opened)
        if moved and opened.seq == sa.window.top:
            self._follow(sa, packet.src, datagram.source_port)
        return Outcome("accept", opened.packet, None, "", sa.name, opened.seq)

    def _follow(self, sa: Association, source: IPv4Address, port: int) -> None:
        """NAT rebinding: the peer now sends from ``source``:``port``; so does the outbound SA
        of the same policy that follows too."""
        assert sa.udp is not None
        sa.udp.peer_port = port
        if sa.tunnel:
            sa.udp.peer = source
        sa.events.append("peer_changed")
        rule = self.db.rule_of(sa)
        out = self.db.outbound_sa(rule) if rule is not None else None
        if out is not None and out.udp is not None and out.udp.follow:
            out.udp.peer_port = port
            if out.tunnel:
                out.udp.peer = source

    # -- the inner packet's policy ----------------------------------------------------------
    def _check_inner(self, opened: framing.Opened) -> None:
        """RFC 4301 5.2: what came out of an SA must be one of its policy's flows; an ICMP
        error must be about a flow of it that this side sent (6.2)."""
        rule = self.db.rule_of(opened.sa)
        inner: V4 | V6 | None = opened.v4 if opened.v4 is not None else opened.v6
        assert inner is not None
        quoted = inner.quoted_flow()
        flow = quoted if quoted is not None else inner.flow()
        if rule is None or not rule.covers(flow, outbound=quoted is not None):
            what = "an ICMP error about" if quoted is not None else "inner"
            raise Refused("policy_mismatch",
                          f"{what} {flow.src} -> {flow.dst} proto {flow.protocol}")

    # -- IPv6 -------------------------------------------------------------------------------
    def _leaving6(self, data: bytes, now: float, forwarded: bool) -> Outcome:
        packet = parse_v6(data)
        if self.ipv6_link and packet.is_link_message():
            return Outcome("accept")
        quoted = packet.quoted_flow() if packet.upper == ICMPV6 else None
        rule = self._outbound_rule(packet.flow(), quoted)
        if rule.action == "bypass":
            return Outcome("accept")
        if rule.action == "discard":
            raise Refused("policy_discard", rule.name)
        sa = self._sa_for(rule, now)
        if sa.udp is not None:
            raise Unsupported("IPv6 and ESP in UDP")
        esp = framing.protect_v6(sa, packet)
        sa.count(packet.total)
        seq = sa.next_seq - 1
        if sa.tunnel and isinstance(sa.remote, IPv4Address):
            return Outcome("accept", esp, None, "", sa.name, seq)  # crosses in ``process``
        if forwarded and len(esp) > self.mtu:
            # the number is taken, as the core takes it: the versions stay in step
            raise Unsupported("a forwarded IPv6 packet too big for the path (ICMPv6 errors)")
        limit = max(self.mtu, 1280)
        if not forwarded and len(esp) > limit:
            # RFC 8200 4.5: this node is the ESP packet's source, so it fragments it
            self.frag_ident = (self.frag_ident + 1) % (1 << 32)
            return Outcome("replace", None, None, "", sa.name, seq,
                           fragment_v6(esp, limit, self.frag_ident))
        return Outcome("accept", esp, None, "", sa.name, seq)

    def _arriving6(self, data: bytes, now: float) -> Outcome:
        packet = parse_v6(data)
        if packet.upper != ESP:
            if self.ipv6_link and packet.is_link_message():
                return Outcome("accept")
            quoted = packet.quoted_flow()
            if quoted is not None and quoted.protocol == ESP:
                return Outcome("accept")  # an error about ESP: the kernel's to act on
            return self._cleartext_in(packet.flow(), quoted)
        opened = framing.unprotect_v6(packet, self.db.inbound.get, now)
        self._check_inner(opened)
        return Outcome("accept", opened.packet, None, "", opened.sa.name, opened.seq)


def _v4_without_df(header: V4) -> bytes:
    return v4_header(header.header, flags=header.flags & ~DF)

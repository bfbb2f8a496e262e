"""The entry point: one compartment's SPD and SAD, and a packet through them.

``Engine.process(data, length, where, now)`` has the shape of the core's
``Processor.process`` and answers with an ``Outcome`` whose verdict and drop reason are the
same words the data plane counts (``"accept"``, ``"drop"``, ``"replace"``, ``"cross"``;
``"integrity"``, ``"replay"``...). What this implementation does not do it refuses explicitly: the verdict
``"drop"`` with the reason ``UNSUPPORTED`` and a detail naming what, so a comparison knows
this version abstained rather than disagreed. docs/independent.md lists those cases; a
refusal changes no state.

No I/O; the time is a parameter. Every module this package needs is imported when it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any, Final

from . import framing, natt, pathmtu
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
ICMP_REPLIES_PER_SECOND: Final = 100


class Unsupported(Exception):
    """Something the core does that this implementation deliberately does not."""


@dataclass
class Outcome:
    """What to do with a packet: ``verdict`` ``"accept"`` (``packet`` the new bytes, or None:
    unchanged), ``"drop"`` (``reason`` why), ``"replace"`` (``packets``, the fragments of our
    own ESP packet, sent in the queued packet's place) or ``"cross"`` (``packets`` of the
    other IP family, sent in its place too). ``sa_name`` and ``seq``: the SA and
    sequence number that carried it."""

    verdict: str
    packet: bytes | None = None
    reason: str | None = None
    detail: str = ""
    sa_name: str | None = None
    seq: int | None = None
    packets: list[bytes] | None = None
    reply: bytes | None = None  # an ICMP error for the shell to send back to the sender

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
        self._reply_window = 0.0  # ICMP errors sent back: this second's window, and what is left
        self._replies_left = ICMP_REPLIES_PER_SECOND

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
        limit = (sa.pmtu or self.mtu) if sa is not None else self.mtu
        if sa is not None and sa.outbound and len(out) > limit:
            self.frag_ident = (self.frag_ident + 1) % (1 << 32)
            try:
                packets = (fragment_v6(out, limit, self.frag_ident) if out[0] >> 4 == 6
                           else fragment_v4(out, limit))
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
        limit = sa.pmtu or self.mtu
        if limit and packet.total + sa.max_overhead > limit and packet.df:
            too_big = self._too_big(sa, packet, data, limit, now, forwarded)
            if too_big is not None:
                return too_big
        esp = self._seal_v4(sa, packet, data, now)
        sa.count(packet.total)
        return Outcome("accept", esp, None, "", sa.name, sa.next_seq - 1)

    @staticmethod
    def _seal_v4(sa: Association, packet: V4, data: bytes, now: float) -> bytes:
        esp = framing.protect_v4(sa, packet, data[: packet.total])
        if sa.udp is not None:
            esp = natt.encapsulate(sa.udp, esp, sa.tunnel, now)
        return esp

    def _too_big(self, sa: Association, packet: V4, data: bytes, limit: int, now: float,
                 forwarded: bool) -> Outcome | None:
        """RFC 4301 8.2.2, a DF packet too big for the SA's path once ESP is added (None: it
        fits after all). Local, to the SA's peer itself: sent with DF cleared, for the path
        to fragment (telling the local kernel would shrink the very route ESP leaves by).
        Otherwise dropped, and its sender told the MTU that fits (at most 100 a second)."""
        if sa.pmtu and now - sa.pmtu_at > pathmtu.PMTU_AGE:
            sa.pmtu = 0  # aged out (RFC 1191 6.3): the interface's MTU again
            limit = self.mtu
        size = pathmtu.esp_size(sa, packet.total, len(packet.header))
        outer_df = sa.df != "clear" if sa.tunnel else True
        if size <= limit or not outer_df:
            return None
        if not forwarded and (not sa.tunnel or packet.dst == sa.remote):
            esp = self._seal_v4(sa, packet, data, now)
            head = parse_v4(esp)
            esp = v4_header(head.header, flags=head.flags & ~DF) + esp[len(head.header) :]
            sa.count(packet.total)
            return Outcome("accept", esp, None, "", sa.name, sa.next_seq - 1)
        mtu = pathmtu.largest_inner(sa, limit, len(packet.header))
        reply = (pathmtu.fragmentation_needed_reply(packet, mtu) if self._may_reply(now)
                 else None)
        outcome = self._drop("path_mtu", f"{size} > {limit} bytes, sender told {mtu}")
        outcome.reply = reply
        return outcome

    def _may_reply(self, now: float) -> bool:
        """At most ``ICMP_REPLIES_PER_SECOND`` errors sent back in each window of a second."""
        if now - self._reply_window >= 1.0:
            self._reply_window = now
            self._replies_left = ICMP_REPLIES_PER_SECOND
        if self._replies_left <= 0:
            return False
        self._replies_left -= 1
        return True

    def _arriving4(self, data: bytes, now: float) -> Outcome:
        packet = parse_v4(data)
        if packet.protocol != ESP:
            if (packet.protocol == UDP and self.udp_ports
                    and natt.destination_port(packet) in self.udp_ports):
                return self._arriving_udp(packet, now)
            quoted = packet.quoted_flow()
            if quoted is not None and quoted.protocol == ESP:
                return self._about_our_esp(packet, now)
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

    def _about_our_esp(self, packet: V4, now: float) -> Outcome:
        """An ICMP error about an ESP packet passes on (the kernel may want it too); a
        "fragmentation needed" about one of our outbound SAs' packets, to that SA's peer,
        sets the SA's path MTU first; one about ESP that is not ours is dropped."""
        report = pathmtu.fragmentation_needed(packet)
        if report is None:
            return Outcome("accept")
        sa = next((a for a in self.db.by_name.values() if a.outbound and a.spi == report.spi),
                  None)
        if sa is None:
            raise Refused("unknown_spi", "ICMP error about ESP of an SPI not ours")
        rule = self.db.rule_of(sa)
        if sa.tunnel:
            wrong_peer = report.peer != sa.remote
        else:  # transport: the peer is any address of the policy's remote side
            wrong_peer = rule is not None and (int(report.peer) & int(rule.remote.netmask)
                                               != int(rule.remote.network_address))
        if wrong_peer:
            raise Refused("policy_mismatch", f"ICMP error about SPI 0x{sa.spi:08x} to "
                          f"{report.peer}, not its peer")
        if not sa.pmtu or report.mtu < sa.pmtu or now - sa.pmtu_at > pathmtu.PMTU_AGE:
            sa.pmtu = min(report.mtu, self.mtu)
        sa.pmtu_at = now
        return Outcome("accept")

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
        six_in_four = sa.tunnel and isinstance(sa.remote, IPv4Address)
        reply = self._too_big6(sa, packet, now) if forwarded and not six_in_four else None
        esp = framing.protect_v6(sa, packet)
        sa.count(packet.total)
        seq = sa.next_seq - 1
        if not forwarded and not six_in_four and len(esp) > (sa.pmtu or self.mtu):
            # RFC 8200 4.5: this node is the ESP packet's source, so it fragments it
            if sa.pmtu and now - sa.pmtu_at > pathmtu.PMTU_AGE:
                sa.pmtu = 0
            limit = max(sa.pmtu or self.mtu, pathmtu.MIN_MTU6)
            if len(esp) > limit:
                self.frag_ident = (self.frag_ident + 1) % (1 << 32)
                return Outcome("replace", None, None, "", sa.name, seq,
                               fragment_v6(esp, limit, self.frag_ident))
        return Outcome("accept", esp, None, "", sa.name, seq, reply=reply)

    def _too_big6(self, sa: Association, packet: V6, now: float) -> bytes | None:
        """A forwarded IPv6 packet too big for the SA's path once ESP is added still goes (a
        gateway can't tell it from one its kernel reassembled), and its sender is told
        "packet too big" with the MTU that fits (rate-limited); None when it fits."""
        if sa.pmtu and now - sa.pmtu_at > pathmtu.PMTU_AGE:
            sa.pmtu = 0
        limit = sa.pmtu or self.mtu
        if packet.total + sa.max_overhead <= limit:
            return None
        if pathmtu.esp_size(sa, packet.total, packet.esp_at) <= limit:
            return None
        if not self._may_reply(now):
            return None
        mtu = max(pathmtu.largest_inner(sa, limit, packet.esp_at), pathmtu.MIN_MTU6)
        return pathmtu.packet_too_big_reply(packet, mtu)

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


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

from . import esp, esp6, gso, ipv6, pmtu, udpencap
from . import packet as ip
from .errors import DropReason, EspError
from .sa import SAEvent, SAParams, SecurityAssociation
from .sad import SAD
from .spd import SPD, Action, Policy

FLOW_CACHE_SIZE: Final = 4096  # flows whose SPD answer a processor remembers, per direction
# Where a packet is, as the shell saw it (``Processor.process``): arriving on the unprotected
# side, leaving this host, or forwarded by it from the protected side.
ARRIVING: Final = 0
LEAVING: Final = 1
FORWARDED: Final = 2
ICMP_REPLIES_PER_SECOND: Final = 100  # "fragmentation needed" messages a processor sends back
# The TCP MSS a sender assumes of a peer that announced none (RFC 9293 3.7.1): what a
# superpacket of a flow whose SYN this processor did not see is cut to.
DEFAULT_MSS4: Final = 536
DEFAULT_MSS6: Final = 1220
MssKey = tuple[int, int, int, int]  # an outbound flow: source, destination, ports


class Verdict(enum.Enum):
    ACCEPT = "accept"
    DROP = "drop"
    REPLACE = "replace"  # the queued packet goes no further: ``packets`` are sent instead
    CROSS = "cross"  # ``packet`` is of the other IP family (a mixed tunnel): it can't go back
    # in the verdict (the kernel puts a verdict's bytes back into the queued packet's family),
    # so, as with REPLACE, the shell drops the queued one and sends ``packets`` (``packet``,
    # or its fragments) instead


class Result:
    """What to do with a packet. ``packet`` is the new payload, or None if unchanged;
    ``reply`` is a packet for the shell to send back to the sender (an ICMP error), or None.
    ``packets``: with :attr:`Verdict.REPLACE`, what the shell sends in the queued packet's
    place (the fragments of a local IPv6 ESP packet too big for its path).

    A plain class, not a dataclass: one is made per packet, and the compiled core builds a
    plain class about five times faster."""

    __slots__ = ("detail", "packet", "packets", "reason", "reply", "sa", "seq", "verdict")

    def __init__(
        self, verdict: Verdict, packet: bytes | None = None, reason: DropReason | None = None,
        sa: SecurityAssociation | None = None, seq: int | None = None, detail: str = "",
        reply: bytes | None = None, packets: list[bytes] | None = None,
    ) -> None:
        self.verdict = verdict
        self.packet = packet
        self.reason = reason
        self.sa = sa
        self.seq = seq
        self.detail = detail
        self.reply = reply
        self.packets = packets

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
    """``mtu``: the unprotected interface's MTU, the path MTU of every outbound SA until an
    ICMP error says less. Forwarded and local packets alike are held to it: a local sender's
    kernel sizes its packets by the route's MTU, which the ESP packet overruns, and the kernel
    drops an ESP packet too big for the interface with DF set without telling the sender
    (its ICMP error quotes the ESP packet, not the sender's). ``_too_big`` says what happens
    instead.

    ``ipv6_link``: IPv6 neighbour discovery and MLD (``ipv6.LINK_TYPES``) pass in clear
    whatever the SPD says; without them an IPv6 link dies."""

    def __init__(
        self, spd: SPD, sas: Iterable[SAParams | SecurityAssociation], now: float,
        flow_cache_size: int = FLOW_CACHE_SIZE, mtu: int = 1500,
        max_packet: int = ip.IPV4_MAX_PACKET, ipv6_link: bool = True,
    ) -> None:
        self.spd = spd
        self.ipv6_link = ipv6_link
        self.flow_cache_size = flow_cache_size
        self.mtu = mtu
        self.max_packet = max_packet  # the most the shell can hand back (its queue's limit)
        self.pmtu_updates = 0  # "fragmentation needed" messages about our ESP taken in
        self.icmp_replies = 0  # "fragmentation needed" messages sent back to inner senders
        self.df_cleared = 0  # ESP packets sent with DF cleared, too big for the reported path
        self.fragmented6 = 0  # local IPv6 ESP packets sent as fragments, too big for the path
        # the last fragment identification used; the shell seeds it at random (RFC 7739: not
        # predictable from outside), the core having no source of randomness
        self.frag_ident = 0
        self._reply_window = 0.0
        self._replies_left = ICMP_REPLIES_PER_SECOND
        self.sad = SAD(spd, sas, now)
        self.drops: Counter[DropReason] = Counter()
        self._out_cache: dict[ip.PacketKey, Policy | None] = {}
        self._in_cache: dict[ip.PacketKey, Policy | None] = {}
        self._icmp_cache: dict[ip.PacketKey, Policy | None] = {}  # outbound errors, by quote
        self.udp_ports = self.sad.udp_ports()  # ESP in UDP comes to these (RFC 3948)
        self.udp_markers = 0  # non-ESP marker (IKE) datagrams passed to the host
        # daemon.gso: the MSS each TCP peer announced in its SYN under one of our SAs, by
        # outbound flow (bounded like the flow caches); a superpacket is cut to fit it
        self.learn_mss = False
        self.peer_mss: dict[MssKey, int] = {}
        self.superpackets = 0  # GSO superpackets cut into segments and sealed
        self.segments = 0  # the segments they were cut into

    # -- the entry point ------------------------------------------------------------------
    def process(self, data: bytes, length: int, where: int, now: float) -> Result:
        """One packet as the shell got it: ``length`` is its real length (the copy may be
        shorter), ``where`` one of ARRIVING, LEAVING, FORWARDED. A packet delivered
        incomplete is dropped (TRUNCATED): passing it on would pass on a different packet;
        so is a new packet bigger than ``max_packet`` (TOO_BIG)."""
        n = len(data)
        if n < length or n < ip.declared_length(data):
            return self._drop(EspError(DropReason.TRUNCATED, f"{n} of {max(length, n)} bytes"),
                              None)
        if n and data[0] >> 4 == 6:
            res = (self.inbound6(data, now) if where == ARRIVING
                   else self.outbound6(data, now, where == FORWARDED))
        else:
            res = (self.inbound(data, now) if where == ARRIVING
                   else self.outbound(data, now, where == FORWARDED))
        out = res.packet
        if out is not None:
            if len(out) > self.max_packet:
                return self._drop(EspError(DropReason.TOO_BIG, f"{len(out)} bytes to hand back"),
                                  res.sa)
            if (out[0] ^ data[0]) & 0xF0:
                return self._crossed(res, out)
        return res

    def _crossed(self, res: Result, out: bytes) -> Result:
        """A result of the other IP family (a mixed tunnel): CROSS, with ``packets`` what the
        shell sends through a raw socket of that family in the queued packet's place. A raw
        socket never fragments, so an outbound ESP packet bigger than its SA's path goes in
        fragments made here, as its source may (``pmtu.fragment_own``)."""
        sa = res.sa
        res.verdict = Verdict.CROSS
        res.packets = [out]
        if sa is not None and sa.outbound and len(out) > (sa.pmtu or self.mtu):
            self.frag_ident = (self.frag_ident + 1) & 0xFFFFFFFF
            try:
                res.packets = pmtu.fragment_own(out, sa.pmtu or self.mtu, self.frag_ident)
            except EspError as err:
                return self._drop(err, sa)
        return res

    # -- outbound -------------------------------------------------------------------------
    def outbound(self, data: bytes, now: float, forwarded: bool = False) -> Result:
        """Apply the outbound SPD to a packet leaving this host (``forwarded``: routed through
        it, from the protected side)."""
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
            limit = sa.pmtu if sa.pmtu else self.mtu
            if (limit and hdr.total_length + sa.max_overhead > limit
                    and hdr.flags_frag & ip.FLAG_DF):
                too_big = self._too_big(sa, data, hdr, limit, now, forwarded)
                if too_big is not None:
                    return too_big
            out = esp.encapsulate(sa, data, hdr)
            udp = sa.udp
            if udp is not None:  # ESP in UDP (RFC 3948); inline: the per-packet path
                out = udpencap.wrap(udp, out, sa.tunnel, now)
            sa.account(hdr.total_length)
            return self._accept(out, sa, sa.next_seq - 1)
        except EspError as err:
            return self._drop(err, sa)

    @staticmethod
    def _seal(sa: SecurityAssociation, data: bytes, hdr: ip.IPv4Header, now: float) -> bytes:
        """ESP, and around it UDP for an SA of ESP in UDP (RFC 3948)."""
        out = esp.encapsulate(sa, data, hdr)
        udp = sa.udp
        if udp is not None:
            out = udpencap.wrap(udp, out, sa.tunnel, now)
        return out

    def _too_big(self, sa: SecurityAssociation, data: bytes, hdr: ip.IPv4Header, limit: int,
                 now: float, forwarded: bool) -> Result | None:
        """RFC 4301 8.2.2: a DF packet too big for the SA's path after ESP. None: it fits after
        all (the exact size, or a learned MTU that has aged out).

        Forwarded, or local to a destination other than the SA's peer: dropped, and the
        sender told the MTU that fits. Local to the peer itself (transport mode): telling the
        local kernel would lower the MTU of the very route the ESP packet leaves by, and the
        ESP packet, always bigger than what it carries, would then never fit; so it leaves
        with DF cleared instead, for the path to fragment (RFC 4301 8.1), and nothing is lost.
        """
        if sa.pmtu and now - sa.pmtu_at > pmtu.PMTU_AGE:
            sa.pmtu = 0  # aged: try the interface's MTU again (RFC 1191 6.3)
            limit = self.mtu
        size = pmtu.esp_size(sa, hdr.total_length, hdr.ihl)
        if size <= limit or not pmtu.outer_df(sa, True):
            return None
        if not forwarded and (not sa.tunnel or hdr.dst == sa.params.tunnel_remote):
            out = pmtu.clear_df(self._seal(sa, data, hdr, now))
            sa.account(hdr.total_length)
            self.df_cleared += 1
            return self._accept(out, sa, sa.next_seq - 1)
        mtu = pmtu.inner_mtu(sa, limit, hdr.ihl)
        reply: bytes | None = None
        if now - self._reply_window >= 1.0:
            self._reply_window = now
            self._replies_left = ICMP_REPLIES_PER_SECOND
        if self._replies_left > 0:
            self._replies_left -= 1
            self.icmp_replies += 1
            reply = pmtu.frag_needed_reply(data, hdr, mtu)
        result = self._drop(EspError(DropReason.PATH_MTU, f"{size} > {limit} bytes, sender told "
                                     f"{mtu}", sa.spi), sa)
        result.reply = reply
        return result

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
        sa: SecurityAssociation | None = None
        try:
            hdr = ip.parse_ipv4(data)
            if hdr.protocol != ip.PROTO_ESP:
                return self._inbound_cleartext(data, hdr, now)
            try:
                dec = esp.decapsulate(data, hdr, self.sad.esp_by_spi, now)
            except EspError as err:
                sa = self.sad.by_spi(err.spi) if err.spi is not None else None
                if sa is not None and err.reason is DropReason.UNKNOWN_SPI:
                    raise EspError(DropReason.ENCAP_MISMATCH, "plain ESP for an SA of ESP in "
                                   "UDP", err.spi) from None
                raise
            sa = dec.sa
            self._check_inner(dec)
            return self._accept(dec.packet, sa, dec.seq)
        except EspError as err:
            return self._drop(err, sa if sa is not None and not sa.outbound else None)

    def _check_inner(self, dec: esp.Decapsulated) -> None:
        """The decrypted packet must be one of its SA's policy's flows (RFC 4301 5.2), of
        that policy's family; an ICMP error under the SA must be about a packet of those
        flows, one this side sent (RFC 4301 6.2)."""
        sa = dec.sa
        policy = self.sad.policy_of(sa)
        inner = dec.header
        if inner is None:
            self._check_inner6(dec)
            return
        key = ip.packet_key(dec.packet, inner)
        quoted = (ip.quoted_key(dec.packet, inner)
                  if inner.protocol == ip.PROTO_ICMP else None)
        if quoted is not None:
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
        if self.learn_mss and inner.protocol == ip.PROTO_TCP and not inner.is_fragment:
            self._learn_mss(dec.packet, inner.ihl, inner.total_length, inner.dst, inner.src)

    def _check_inner6(self, dec: esp.Decapsulated) -> None:
        """``_check_inner`` for an IPv6 packet (``matches6``: an IPv4 policy never matches)."""
        sa = dec.sa
        policy = self.sad.policy_of(sa)
        inner = dec.header6
        if inner is None:
            raise EspError(DropReason.INTERNAL, "no inner header", sa.spi)
        quoted = (ipv6.quoted_key6(dec.packet, inner)
                  if inner.protocol == ipv6.NH_ICMPV6 else None)
        key = quoted if quoted is not None else ipv6.packet_key6(dec.packet, inner)
        if policy is None or not policy.selector.matches6(key, quoted is not None):
            what = "ICMPv6 error about" if quoted is not None else "inner"
            raise EspError(
                DropReason.POLICY_MISMATCH,
                f"{what} {ipv6.addr_str(key.src)} -> {ipv6.addr_str(key.dst)} "
                f"proto {key.protocol}", sa.spi)
        if self.learn_mss and inner.protocol == ip.PROTO_TCP and inner.frag_offset < 0:
            self._learn_mss(dec.packet, inner.offset, inner.total_length, inner.dst, inner.src)

    def _learn_mss(self, data: bytes, at: int, end: int, local: int, remote: int) -> None:
        """Remember the MSS option of a TCP SYN or SYN-ACK that came in under one of our
        SAs, for the outbound flow that answers it (``gso_segment_size``)."""
        mss = gso.syn_mss(data, at, end)
        if not mss:
            return
        key = (local, remote, (data[at + 2] << 8) | data[at + 3], (data[at] << 8) | data[at + 1])
        cache = self.peer_mss
        if len(cache) >= self.flow_cache_size and key not in cache:
            cache.clear()
        cache[key] = mss

    def _inbound_cleartext(self, data: bytes, hdr: ip.IPv4Header, now: float) -> Result:
        if (hdr.protocol == ip.PROTO_UDP and self.udp_ports
                and udpencap.local_port(data, hdr) in self.udp_ports):
            return self._inbound_udp(data, hdr, now)
        quoted = ip.quoted_key(data, hdr) if hdr.protocol == ip.PROTO_ICMP else None
        if quoted is not None and quoted.protocol == ip.PROTO_ESP:
            return self._about_our_esp(data, hdr, now)
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

    def _inbound_udp(self, data: bytes, hdr: ip.IPv4Header, now: float) -> Result:
        """UDP to the port of one of our SAs of ESP in UDP (RFC 3948): the non-ESP marker
        passes to the host (IKE), ESP is opened, the rest drops with its reason."""
        sa: SecurityAssociation | None = None
        try:
            if udpencap.classify(data, hdr) == udpencap.MARKER_PACKET:
                self.udp_markers += 1
                return self._accept(None)
            esp_data, esp_hdr = udpencap.strip(data, hdr)
            spi = udpencap.spi_of(data, hdr)
            owner = self.sad.udp_by_spi(spi)
            if (owner is not None and owner.udp is not None
                    and owner.udp.local_port != udpencap.local_port(data, hdr)):
                raise EspError(DropReason.UNKNOWN_SPI, f"SPI 0x{spi:08x} on another port", spi)
            try:
                dec = esp.decapsulate(esp_data, esp_hdr, self.sad.udp_by_spi, now)
            except EspError as err:
                sa = self.sad.by_spi(err.spi) if err.spi is not None else None
                if sa is not None and err.reason is DropReason.UNKNOWN_SPI:
                    raise EspError(DropReason.ENCAP_MISMATCH, "ESP in UDP for an SA of plain "
                                   "ESP", err.spi) from None
                raise
            sa = dec.sa
            udp = sa.udp
            assert udp is not None  # udp_by_spi holds only SAs of ESP in UDP
            src, sport = hdr.src, udpencap.source_port(data, hdr)
            moved = sport != udp.peer_port or (udp.peer_addr != 0 and src != udp.peer_addr)
            if moved and not udp.follow:
                raise EspError(DropReason.PEER_CHANGED,
                               f"from {ip.ip_to_str(src)}:{sport}, the SA's peer is "
                               f"{ip.ip_to_str(udp.peer_addr)}:{udp.peer_port}", sa.spi)
            if not sa.tunnel and dec.header is not None:
                dec.packet = udpencap.fix_checksum(dec.packet, dec.header)
            self._check_inner(dec)
            if moved and dec.seq == sa.replay.top:  # the newest packet, authenticated
                self._follow(sa, udp, src, sport)
            return self._accept(dec.packet, sa, dec.seq)
        except EspError as err:
            return self._drop(err, sa)

    def _follow(self, sa: SecurityAssociation, udp: udpencap.UdpEndpoint, src: int,
                sport: int) -> None:
        """NAT rebinding: the peer of an inbound SA is now at ``src``:``sport``, and so is the
        peer of this processor's outbound SA of the same policy if that one follows too
        (tunnel mode: address and port; transport mode: the port, the address being the
        packets' own)."""
        udp.peer_port = sport
        if sa.tunnel:
            udp.peer_addr = src
        udp.peer_changes += 1
        sa.events.append(SAEvent.PEER_CHANGED)
        policy = self.sad.policy_of(sa)
        out = self.sad.outbound_sa(policy) if policy is not None else None
        if out is not None and out.udp is not None and out.udp.follow:
            out.udp.peer_port = sport
            if out.tunnel:
                out.udp.peer_addr = src

    def keepalives(self, now: float) -> list[bytes]:
        """NAT-keepalives (RFC 3948 2.3) due now: one for each outbound SA of ESP in UDP that
        has sent nothing for its keepalive interval."""
        due: list[bytes] = []
        for sa in self.sad.all():
            udp = sa.udp
            if (udp is None or not sa.outbound or udp.keepalive <= 0
                    or now - udp.last_sent < udp.keepalive):
                continue
            packet = udpencap.keepalive(udp)
            if packet is not None:
                udp.last_sent = now
                udp.keepalives_sent += 1
                due.append(packet)
        return due

    def _about_our_esp(self, data: bytes, hdr: ip.IPv4Header, now: float) -> Result:
        """An ICMP error in clear about an ESP packet (RFC 4301 8): "fragmentation needed" about
        one of this processor's outbound SAs sets that SA's path MTU, and passes on (the
        kernel may want it too). Any other error about ESP passes as well; one about ESP that
        is not ours (another SPI, or our SPI to another peer) is dropped."""
        report = pmtu.frag_needed(data, hdr)
        if report is None:
            return self._accept(None)
        sa = self.sad.outbound_by_spi(report.spi)
        if sa is None:
            raise EspError(DropReason.UNKNOWN_SPI, "ICMP error about ESP of an SPI not ours",
                           report.spi)
        peer = sa.params.tunnel_remote if sa.tunnel else None
        policy = self.sad.policy_of(sa)
        if (peer is not None and report.dst != peer) or (
                peer is None and policy is not None
                and (report.dst & int(policy.selector.remote.netmask))
                != int(policy.selector.remote.network_address)):
            raise EspError(DropReason.POLICY_MISMATCH,
                           f"ICMP error about SPI 0x{sa.spi:08x} to {ip.ip_to_str(report.dst)}, "
                           "not its peer", sa.spi)
        if not sa.pmtu or report.mtu < sa.pmtu or now - sa.pmtu_at > pmtu.PMTU_AGE:
            sa.pmtu = min(report.mtu, self.mtu)
        sa.pmtu_at = now
        self.pmtu_updates += 1
        return self._accept(None)

    # -- a GSO queue's packets (daemon.gso) -------------------------------------------------
    def process_offloaded(self, data: bytes, length: int, where: int, now: float,
                          superpacket: bool) -> Result:
        """A packet leaving (LEAVING or FORWARDED) from a queue bound with the GSO flag whose
        checksum is not ready (``NFQA_SKB_CSUMNOTREADY``) or which is a superpacket
        (``NFQA_SKB_GSO``). A single TCP or UDP packet gets its checksum completed and goes
        the way of ``process`` (the completion is thrown away with the packet if it is
        bypassed: the kernel completes the original). Otherwise bypassed or discarded as
        ``process`` would; protected, a superpacket is cut into segments (``gso``) and each
        sealed in order on the flow's SA: REPLACE, ``packets`` the ESP packets; a partial
        checksum of another protocol is dropped (CHECKSUM_PARTIAL)."""
        n = len(data)
        if n < length or n < ip.declared_length(data):
            return self._drop(EspError(DropReason.TRUNCATED, f"{n} of {max(length, n)} bytes"),
                              None)
        if not superpacket:
            try:  # TCP and UDP: completed, then the per-packet path decides as ever
                done = (gso.complete6(data, ipv6.parse_ipv6(data)) if n and data[0] >> 4 == 6
                        else gso.complete4(data, ip.parse_ipv4(data)))
            except EspError as err:
                if err.reason is not DropReason.CHECKSUM_PARTIAL:
                    return self._drop(err, None)
            else:
                return self.process(done, length, where, now)
        sa: SecurityAssociation | None = None
        try:
            v6 = bool(n) and data[0] >> 4 == 6
            if v6:
                hdr6 = ipv6.parse_ipv6(data)
                if self.ipv6_link and ipv6.is_link_message(data, hdr6):
                    return self._accept(None)
                key = ipv6.packet_key6(data, hdr6)
            else:
                hdr = ip.parse_ipv4(data)
                key = ip.packet_key(data, hdr)
            policy = self._policy(key, self._out_cache, True)
            if policy is None:
                raise EspError(DropReason.NO_POLICY)
            action = policy.action
            if action is not Action.PROTECT:
                if action is Action.BYPASS:
                    return self._accept(None)  # the kernel segments and checksums it
                raise EspError(DropReason.POLICY_DISCARD, policy.name)
            if not superpacket:  # a partial checksum of another protocol, to be protected
                raise EspError(DropReason.CHECKSUM_PARTIAL, f"protocol {key.protocol}")
            sa = self.sad.outbound_sa(policy)
            if sa is None:
                raise EspError(DropReason.NO_SA, policy.name)
            sa.check_lifetime(now)
            if v6:
                l3 = hdr6.offset
                size = self.gso_segment_size(sa, key, data, l3, hdr6.total_length, now)
                segments = gso.segment6(data, hdr6, size)
            else:
                l3 = hdr.ihl
                size = self.gso_segment_size(sa, key, data, l3, hdr.total_length, now)
                segments = gso.segment4(data, hdr, size)
            out: list[bytes] = []
            for seg in segments:
                if v6:
                    shdr6 = ipv6.parse_ipv6(seg)
                    packet = esp6.encapsulate6(sa, seg, shdr6)
                    sa.account(shdr6.total_length)
                else:
                    shdr = ip.parse_ipv4(seg)
                    packet = self._seal(sa, seg, shdr, now)
                    sa.account(shdr.total_length)
                out.append(packet)
            self.superpackets += 1
            self.segments += len(out)
            return Result(Verdict.REPLACE, None, None, sa, sa.next_seq - 1, "", None, out)
        except EspError as err:
            return self._drop(err, sa)

    def gso_segment_size(self, sa: SecurityAssociation, key: ip.PacketKey, data: bytes,
                         l3: int, end: int, now: float) -> int:
        """The TCP payload bytes per segment of a superpacket on ``sa`` (its IP headers
        ``l3`` bytes, its TCP header at ``data[l3:]``): the most that fits the SA's path
        after ESP, and no more than the MSS the peer announced in its SYN less the TCP
        options the segments carry, as the sender's own kernel sizes them; a flow whose SYN
        this processor did not see (one older than it) gets the MSS a peer that announces
        none has (``DEFAULT_MSS4``, ``DEFAULT_MSS6``): smaller segments, never too big ones.
        The README's *Outbound TCP superpackets* says why the superpacket itself can't tell."""
        if sa.pmtu and now - sa.pmtu_at > pmtu.PMTU_AGE:
            sa.pmtu = 0  # aged: the interface's MTU again (RFC 1191 6.3)
        limit = sa.pmtu or self.mtu
        options = ((data[l3 + 12] >> 4) * 4 - gso.TCP_HEADER) if end >= l3 + gso.TCP_HEADER else 0
        size = pmtu.inner_mtu(sa, limit, l3) - l3 - gso.TCP_HEADER - options
        mss = self.peer_mss.get((key.src, key.dst, key.sport or 0, key.dport or 0))
        if mss is None:
            mss = DEFAULT_MSS6 if data[0] >> 4 == 6 else DEFAULT_MSS4
        return min(size, mss - options)

    # -- IPv6 -----------------------------------------------------------------------------
    def outbound6(self, data: bytes, now: float, forwarded: bool = False) -> Result:
        """``outbound`` for an IPv6 packet."""
        sa: SecurityAssociation | None = None
        try:
            hdr = ipv6.parse_ipv6(data)
            if self.ipv6_link and ipv6.is_link_message(data, hdr):
                return self._accept(None)
            if (hdr.protocol == ipv6.NH_ICMPV6
                    and (quoted := ipv6.quoted_key6(data, hdr)) is not None):
                policy = self._policy(quoted, self._icmp_cache, False)  # RFC 4301 6.2
            else:
                policy = self._policy(ipv6.packet_key6(data, hdr), self._out_cache, True)
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
            reply = (self._too_big6(sa, data, hdr, now)
                     if forwarded and (sa.outer_v6 or not sa.tunnel) else None)
            out = esp6.encapsulate6(sa, data, hdr)
            sa.account(hdr.total_length)
            if not forwarded and (sa.outer_v6 or not sa.tunnel) and len(out) > (sa.pmtu or self.mtu):
                return self._fragments6(sa, out, now)
            res = self._accept(out, sa, sa.next_seq - 1)
            res.reply = reply
            return res
        except EspError as err:
            return self._drop(err, sa)

    def _too_big6(self, sa: SecurityAssociation, data: bytes, hdr: ipv6.IPv6Header,
                  now: float) -> bytes | None:
        """RFC 4301 8.2.2 for a forwarded IPv6 packet too big for the SA's path after ESP: an
        ICMPv6 "packet too big" for its sender with the MTU that fits (rate-limited), or None
        (it fits, or the limit is spent). The packet itself still goes on, encrypted. A worker
        can't tell a packet that came whole from one the gateway's kernel reassembled from its
        sender's fragments before the queue (IPv6 conntrack and the reassembly our rules turn
        on): after ESP the kernel drops the first, too big for the route, and its sender, told,
        fragments the next ones; the second it fragments again at the size its sender's
        fragments had. Dropping both would drop the second kind for good: its sender already
        fragments. IPv6 has no DF bit and no router fragments, so every packet counts. A local
        sender's packets are never held: its kernel fragments the ESP packet at the source. A
        6-in-4 tunnel's never either: the worker fragments their IPv4 outer header itself."""
        if sa.pmtu and now - sa.pmtu_at > pmtu.PMTU_AGE:
            sa.pmtu = 0
        limit = sa.pmtu or self.mtu
        if hdr.total_length + sa.max_overhead <= limit:
            return None
        size = pmtu.esp_size(sa, hdr.total_length, hdr.split)
        if size <= limit:
            return None
        if now - self._reply_window >= 1.0:
            self._reply_window = now
            self._replies_left = ICMP_REPLIES_PER_SECOND
        if self._replies_left <= 0:
            return None
        self._replies_left -= 1
        self.icmp_replies += 1
        mtu = max(pmtu.inner_mtu(sa, limit, hdr.split), ipv6.MIN_MTU)
        return pmtu.packet_too_big_reply(data, hdr, mtu)

    def _fragments6(self, sa: SecurityAssociation, out: bytes, now: float) -> Result:
        """A local IPv6 packet whose ESP is too big for the SA's path: sent as fragments that
        fit (RFC 8200 4.5, the source's to make). Handed back whole, the local kernel would
        fragment it only for a socket that allows it: one with IPV6_DONTFRAG or
        IPV6_PMTUDISC_DO would lose it, and the kernel's "packet too big", quoting the ESP
        packet, never reaches that socket."""
        if sa.pmtu and now - sa.pmtu_at > pmtu.PMTU_AGE:
            sa.pmtu = 0  # aged: try the interface's MTU again (RFC 8201 4)
        limit = max(sa.pmtu or self.mtu, ipv6.MIN_MTU)
        if len(out) <= limit:
            return self._accept(out, sa, sa.next_seq - 1)
        self.frag_ident = (self.frag_ident + 1) & 0xFFFFFFFF
        pieces = ipv6.fragment_packet(out, ipv6.parse_ipv6(out), limit, self.frag_ident)
        self.fragmented6 += 1
        return Result(Verdict.REPLACE, None, None, sa, sa.next_seq - 1, "", None, pieces)

    def inbound6(self, data: bytes, now: float) -> Result:
        """``inbound`` for an IPv6 packet: ESP after the extension headers in front of it."""
        sa: SecurityAssociation | None = None
        try:
            hdr = ipv6.parse_ipv6(data)
            if hdr.protocol != ip.PROTO_ESP:
                return self._inbound_cleartext6(data, hdr)
            try:
                dec = esp6.decapsulate6(data, hdr, self.sad.by_spi, now)
            except EspError as err:
                sa = self.sad.by_spi(err.spi) if err.spi is not None else None
                raise
            sa = dec.sa
            self._check_inner(dec)
            return self._accept(dec.packet, sa, dec.seq)
        except EspError as err:
            return self._drop(err, sa if sa is not None and not sa.outbound else None)

    def _inbound_cleartext6(self, data: bytes, hdr: ipv6.IPv6Header) -> Result:
        if self.ipv6_link and ipv6.is_link_message(data, hdr):
            return self._accept(None)
        quoted = ipv6.quoted_key6(data, hdr) if hdr.protocol == ipv6.NH_ICMPV6 else None
        if quoted is not None and quoted.protocol == ip.PROTO_ESP:
            return self._accept(None)  # an error about ESP: the kernel's to act on
        if quoted is not None:
            policy = self.spd.lookup(quoted, True)
        else:
            policy = self._policy(ipv6.packet_key6(data, hdr), self._in_cache, False)
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

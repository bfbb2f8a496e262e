"""Drop reasons and the single error type the core raises."""

from __future__ import annotations

import enum


class DropReason(enum.Enum):
    """Why a packet was not passed on. Every drop is counted under one of these."""

    MALFORMED = "malformed"  # not a well-formed IPv4/IPv6/ESP packet
    NOT_IPV4 = "not_ipv4"  # an IP version other than 4 (or 6, where IPv6 is handled)
    BAD_EXT_HEADER = "bad_ext_header"  # an IPv6 extension header cut short or out of place
    EXT_CHAIN_TOO_LONG = "ext_chain_too_long"  # more IPv6 extension headers than we walk
    FRAGMENT = "fragment"  # ESP must be reassembled before processing (RFC 4303 3.4.1)
    UNKNOWN_SPI = "unknown_spi"
    REPLAY = "replay"  # duplicate or left of the anti-replay window
    INTEGRITY = "integrity"  # ICV check failed
    BAD_PADDING = "bad_padding"  # padding bytes not 1, 2, 3, ...
    BAD_NEXT_HEADER = "bad_next_header"  # next header does not fit the SA's mode
    DUMMY = "dummy"  # next header 59: a TFC dummy packet, discarded by design
    POLICY_MISMATCH = "policy_mismatch"  # decrypted packet outside its SA's selectors
    CLEARTEXT_PROTECTED = "cleartext_protected"  # cleartext where a PROTECT policy applies
    POLICY_DISCARD = "policy_discard"  # matched a DISCARD policy
    NO_POLICY = "no_policy"  # matched no policy: discard (RFC 4301)
    NO_SA = "no_sa"  # PROTECT policy but this processor holds none of its SAs
    ACQUIRE = "acquire"  # no_sa for a trap connection's policy: the agent is asked for an SA
    SA_EXPIRED = "sa_expired"  # hard lifetime reached
    SEQ_EXHAUSTED = "seq_exhausted"  # sequence number space used up; the SA never wraps
    TOO_BIG = "too_big"  # the ESP packet would exceed the IP maximum of 65535 bytes (payload, IPv6)
    PATH_MTU = "path_mtu"  # too big for the path after ESP: "fragmentation needed"/"packet too big" sent back
    INTERNAL = "internal"  # an unexpected exception, caught by the shell: fail closed
    ENGINE_FAILED = "engine_failed"  # the SA's crypto engine raised: dropped, the SA moves on
    QUEUE_OVERFLOW = "queue_overflow"  # the kernel dropped it before a worker saw it
    TRUNCATED = "truncated"  # the queue delivered fewer bytes than the packet has
    STATE_UNAVAILABLE = "state_unavailable"  # the SA's state could not be saved first: fail closed
    FAMILY_SEND = "family_send"  # a mixed tunnel's result refused by the other family's raw socket
    # a GSO queue's packets (daemon.gso, gso.py)
    GSO_UNSUPPORTED = "gso_unsupported"  # a superpacket the core can't segment as the kernel would
    CHECKSUM_PARTIAL = "checksum_partial"  # a partial checksum the core can't complete
    GSO_SEND = "gso_send"  # a superpacket's ESP packets refused by the socket sending them
    # ESP in UDP (RFC 3948, udpencap.py)
    NAT_KEEPALIVE = "nat_keepalive"  # a NAT-keepalive (one 0xFF byte): it has done its job
    UDP_RUNT = "udp_runt"  # UDP to an ESP-in-UDP port, too short for ESP and no marker
    UDP_MALFORMED = "udp_malformed"  # UDP header inconsistent with the IP header
    ENCAP_MISMATCH = "encap_mismatch"  # plain ESP for a UDP SA, or ESP in UDP for a plain one
    PEER_CHANGED = "peer_changed"  # authenticated, from a new address or port; the SA won't follow
    # daemon.compare (nfq_ipsec.versions): the ESP versions disagreed, or too few are in service
    VERSION_MISMATCH = "version_mismatch"
    VERSION_OUT = "version_out"  # an SA's traffic with one version left and no compare_fallback


class EspError(Exception):
    """Raised by the core for any packet it will not pass. Carries a DropReason.

    The message never contains key material; it may name the SPI and sequence number.
    """

    def __init__(self, reason: DropReason, detail: str = "", spi: int | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.spi = spi
        text = reason.value if not detail else f"{reason.value}: {detail}"
        super().__init__(text)


class ConfigError(Exception):
    """One or more configuration problems, each with its location (``sa[2].key: ...``)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

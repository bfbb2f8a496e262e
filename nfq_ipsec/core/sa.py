"""Security associations: their parameters (from configuration) and their runtime state."""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from .errors import DropReason, EspError
from .ipv6 import is_v6
from .pickling import reduce_dataclass
from .replay import DEFAULT_WINDOW, ReplayWindow
from .suites import Suite, make_suite
from .udpencap import UdpEndpoint

MIN_SPI: Final = 256  # RFC 4303 section 2.1: 1..255 are reserved by IANA
MAX_SEQ_32: Final = 0xFFFFFFFF
MAX_SEQ_64: Final = 0xFFFFFFFFFFFFFFFF


class Mode(enum.Enum):
    TRANSPORT = "transport"
    TUNNEL = "tunnel"


class Encapsulation(enum.Enum):
    """How ESP travels: as IP protocol 50, or inside UDP (RFC 3948, NAT traversal)."""

    NONE = "none"
    UDP = "udp"


class PeerChange(enum.Enum):
    """ESP in UDP: what an authenticated packet from a new source address or port does."""

    FOLLOW = "follow"  # the SA sends to the new source from then on (NAT rebinding)
    DROP = "drop"  # dropped and counted (PEER_CHANGED)


NAT_T_PORT: Final = 4500  # RFC 3948: the port of ESP in UDP
DEFAULT_KEEPALIVE: Final = 20.0  # RFC 3948 2.3: seconds of idle before a NAT-keepalive


class SADirection(enum.Enum):
    OUT = "out"
    IN = "in"


class DfPolicy(enum.Enum):
    """RFC 4301 section 8.1: what the tunnel-mode outer header's DF bit becomes."""

    COPY = "copy"
    SET = "set"
    CLEAR = "clear"


class Secret:
    """Key bytes that never show themselves in a repr, str or log line."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = bytes(value)

    def reveal(self) -> bytes:
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return f"<Secret {len(self._value)} bytes>"

    def __str__(self) -> str:
        return self.__repr__()

    def __reduce__(self) -> tuple[type[Secret], tuple[bytes]]:
        return (Secret, (self._value,))  # pickled for a worker process, as its key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", len(self._value)))


@dataclass(frozen=True)
class Lifetime:
    """Soft and hard limits; None means no limit. Seconds count from installation."""

    soft_packets: int | None = None
    hard_packets: int | None = None
    soft_bytes: int | None = None
    hard_bytes: int | None = None
    soft_seconds: float | None = None
    hard_seconds: float | None = None

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return reduce_dataclass(self)


@dataclass(frozen=True)
class SAParams:
    """Everything configured about one SA. Keys are Secrets; the repr shows none."""

    name: str
    spi: int
    direction: SADirection
    encryption: str
    key: Secret
    integrity: str | None = None
    integrity_key: Secret = field(default_factory=lambda: Secret(b""))
    mode: Mode = Mode.TRANSPORT
    tunnel_local: int | None = None  # outer addresses (tunnel mode), as ints (IPv6: ipv6.V6 set)
    tunnel_remote: int | None = None
    replay_window: int = DEFAULT_WINDOW
    esn: bool = False
    lifetime: Lifetime = field(default_factory=Lifetime)
    queue: int = 0  # the NFQUEUE (worker) that owns this SA
    df: DfPolicy = DfPolicy.COPY
    ttl: int = 64
    encapsulation: Encapsulation = Encapsulation.NONE
    udp_source_port: int = NAT_T_PORT  # ESP in UDP: the ports of this SA's packets
    udp_destination_port: int = NAT_T_PORT
    peer_change: PeerChange = PeerChange.DROP
    keepalive: float = DEFAULT_KEEPALIVE  # outbound ESP in UDP: idle seconds; 0: none

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return reduce_dataclass(self)


class SAEvent(enum.Enum):
    SOFT_EXPIRED = "soft_expired"
    HARD_EXPIRED = "hard_expired"
    SEQ_EXHAUSTED = "seq_exhausted"
    PEER_CHANGED = "peer_changed"  # ESP in UDP: the SA now talks to the peer's new address/port


Reserve = Callable[["SecurityAssociation", int], int]
"""``reserve(sa, seq)``: make ``seq`` durably usable and return the new limit (>= ``seq``).

The shell (``nfq_ipsec/state.py``) provides it; the core only calls it. Outbound, ``seq`` is
the sequence number about to be sent; inbound, the authenticated number about to become the
top of the replay window. It raises EspError (STATE_UNAVAILABLE) to refuse: the packet drops.
"""


class SecurityAssociation:
    """An installed SA: suite built once, sequence counter or replay window, counters.

    Persistence hooks (write-ahead, see ``nfq_ipsec/state.py``): an outbound SA sends numbers
    up to ``seq_limit`` and an inbound SA lets its window top move up to ``replay_limit``
    without asking; past the limit it calls ``reserve`` first and uses the limit it returns.
    Without a ``reserve`` both limits are the largest sequence number (nothing persisted).
    """

    def __init__(
        self, params: SAParams, installed_at: float, next_seq: int = 1,
        suite: Suite | None = None,
    ) -> None:
        self.params = params
        self.spi = params.spi
        self.spi_bytes = params.spi.to_bytes(4, "big")
        self.esn = params.esn
        self.max_seq = MAX_SEQ_64 if params.esn else MAX_SEQ_32
        self.suite = suite or make_suite(
            params.encryption, params.key.reveal(), params.integrity,
            params.integrity_key.reveal(),
        )
        self.installed_at = installed_at
        self.next_seq = next_seq  # outbound: the next number to send
        self.replay = ReplayWindow(params.replay_window, params.esn)
        self.packets = 0  # counted by this process (status)
        self.bytes = 0
        # Lifetime use before this process started (restored by the shell from the SA's state
        # file): the limits count it too, so a restart does not start them again from zero.
        self.packets_before = 0
        self.bytes_before = 0
        self.drops: Counter[DropReason] = Counter()
        self.soft_expired = False
        self.hard_expired = False
        self.exhausted = False
        self.events: list[SAEvent] = []
        self.reserve: Reserve | None = None
        self.seq_limit = self.max_seq  # outbound: highest number usable without reserving
        self.replay_limit = self.max_seq  # inbound: highest top allowed without reserving
        # Plain attributes for the per-packet path (params is frozen, so they never change).
        self.outbound = params.direction is SADirection.OUT
        self.tunnel = params.mode is Mode.TUNNEL
        # Outbound path MTU (RFC 4301 8.2, see pmtu.py): 0 until an ICMP "fragmentation needed"
        # about this SA's ESP says otherwise; learned at ``pmtu_at``. ``max_overhead``: the most
        # bytes ESP adds, so the per-packet size check is one addition.
        self.pmtu = 0
        self.pmtu_at = 0.0
        suite = self.suite
        self.outer_v6 = self.tunnel and is_v6(params.tunnel_remote)  # IPv6 tunnel endpoints
        # ESP in UDP (RFC 3948): the UDP ports and the peer's address (udpencap.py); None
        # for plain ESP, so the per-packet path checks one attribute.
        self.udp: UdpEndpoint | None = None
        if params.encapsulation is Encapsulation.UDP:
            ports = (params.udp_source_port, params.udp_destination_port)
            local, peer = ports if self.outbound else ports[::-1]
            self.udp = UdpEndpoint(local, peer, params.tunnel_remote or 0,
                                   params.tunnel_local or 0,
                                   params.peer_change is PeerChange.FOLLOW, params.keepalive)
        self.max_overhead = (8 + suite.iv_size + suite.icv_size + 2 + suite.align - 1
                             + ((40 if self.outer_v6 else 20) if self.tunnel else 0)
                             + (8 if self.udp is not None else 0))
        # The lifetime check compares against the nearest limit not yet passed (soft, then
        # hard); only when one is reached does it look at the rest (see check_lifetime).
        self._watch_packets = 0.0
        self._watch_bytes = 0.0
        self._watch_age = 0.0

    @property
    def name(self) -> str:
        return self.params.name

    def take_seq(self) -> int:
        """The next outbound sequence number; the SA stops instead of cycling. Past
        ``seq_limit`` the number is reserved (persisted) before it is handed out."""
        seq = self.next_seq
        if seq > self.seq_limit:
            if seq > self.max_seq:
                if not self.exhausted:
                    self.exhausted = True
                    self.events.append(SAEvent.SEQ_EXHAUSTED)
                raise EspError(DropReason.SEQ_EXHAUSTED, f"SA {self.name}", self.spi)
            self.seq_limit = min(self._reserve(seq), self.max_seq)
        self.next_seq = seq + 1
        return seq

    def allow_top(self, seq: int) -> None:
        """Inbound: called before an authenticated ``seq`` above ``replay_limit`` enters the
        replay window, so that the persisted floor covers it before the packet is passed on."""
        if seq > self.replay_limit:
            self.replay_limit = self._reserve(seq)

    def _reserve(self, seq: int) -> int:
        if self.reserve is None:
            raise EspError(DropReason.STATE_UNAVAILABLE, f"SA {self.name}: no reservation", self.spi)
        limit = self.reserve(self, seq)
        if limit < seq:
            raise EspError(DropReason.STATE_UNAVAILABLE, f"SA {self.name}: reservation short",
                           self.spi)
        return limit

    def check_lifetime(self, now: float) -> None:
        """Raise SA_EXPIRED past a hard limit; note a soft limit once as an event."""
        if (self.packets < self._watch_packets and self.bytes < self._watch_bytes
                and now - self.installed_at < self._watch_age):
            return
        self._check_limits(now)
        lt = self.params.lifetime
        watch = [(lt.hard_packets, lt.hard_bytes, lt.hard_seconds)]
        if not self.soft_expired:
            watch.append((lt.soft_packets, lt.soft_bytes, lt.soft_seconds))
        self._watch_packets = min((w[0] for w in watch if w[0] is not None),
                                  default=_INF) - self.packets_before
        self._watch_bytes = min((w[1] for w in watch if w[1] is not None),
                                default=_INF) - self.bytes_before
        self._watch_age = min((w[2] for w in watch if w[2] is not None), default=_INF)

    def _check_limits(self, now: float) -> None:
        lt = self.params.lifetime
        age = now - self.installed_at
        packets = self.packets + self.packets_before
        nbytes = self.bytes + self.bytes_before
        if not self.hard_expired and (
            _past(packets, lt.hard_packets) or _past(nbytes, lt.hard_bytes)
            or _past(age, lt.hard_seconds)
        ):
            self.hard_expired = True
            self.events.append(SAEvent.HARD_EXPIRED)
        if self.hard_expired:
            raise EspError(DropReason.SA_EXPIRED, f"SA {self.name}", self.spi)
        if not self.soft_expired and (
            _past(packets, lt.soft_packets) or _past(nbytes, lt.soft_bytes)
            or _past(age, lt.soft_seconds)
        ):
            self.soft_expired = True
            self.events.append(SAEvent.SOFT_EXPIRED)

    def account(self, nbytes: int) -> None:
        self.packets += 1
        self.bytes += nbytes

    def restore_usage(self, packets: int, nbytes: int, age: float) -> None:
        """Continue the lifetime from an earlier process: ``packets`` and ``nbytes`` used
        before, installed ``age`` seconds before this SA was. Call before any packet."""
        self.packets_before = packets
        self.bytes_before = nbytes
        self.installed_at -= age
        self._watch_packets = 0.0  # the next check_lifetime looks at the limits again
        self._watch_bytes = 0.0
        self._watch_age = 0.0

    def lifetime_used(self, now: float) -> tuple[int, int, float]:
        """Packets, bytes and seconds of the lifetime used, earlier processes included."""
        return (self.packets + self.packets_before, self.bytes + self.bytes_before,
                now - self.installed_at)

    def lifetime_left(self, now: float) -> dict[str, float | int | None]:
        lt = self.params.lifetime
        packets = self.packets + self.packets_before
        nbytes = self.bytes + self.bytes_before
        return {
            "packets": None if lt.hard_packets is None else max(0, lt.hard_packets - packets),
            "bytes": None if lt.hard_bytes is None else max(0, lt.hard_bytes - nbytes),
            "seconds": None if lt.hard_seconds is None
            else max(0.0, lt.hard_seconds - (now - self.installed_at)),
        }

    def __repr__(self) -> str:
        return f"<SA {self.name} spi=0x{self.spi:08x} {self.params.direction.value}>"


_INF: Final = float("inf")


def _past(value: float, limit: float | None) -> bool:
    return limit is not None and value >= limit

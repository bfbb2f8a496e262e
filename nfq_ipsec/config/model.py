"""The validated configuration. Built only by the loader; every field is already checked.

The defaults are those of the field tables (``fields.py``), written there once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.sa import Mode, SADirection, SAParams, Secret
from ..core.spd import SPD, Action, Network, Policy
from ..engines.base import DEFAULT_CRYPTO, CryptoSettings
from ..ike.proposal import SAPayload
from .fields import (
    COMPARTMENT_MARK_SHIFT,
    DEFAULT_BUSY_POLL,
    DEFAULT_CHAIN_PREFIX,
    DEFAULT_COMPARE,
    DEFAULT_COMPARE_FALLBACK,
    DEFAULT_COMPARTMENT,
    DEFAULT_DPD_DELAY,
    DEFAULT_DROP_LOG,
    DEFAULT_ESP_PROPOSAL,
    DEFAULT_GSO,
    DEFAULT_IKE_PROPOSAL,
    DEFAULT_IKE_REKEY_TIME,
    DEFAULT_IPTABLES,
    DEFAULT_IPV6_ND,
    DEFAULT_KEY_LOG,
    DEFAULT_LOG_LEVEL,
    DEFAULT_MARK,
    DEFAULT_METRICS,
    DEFAULT_MSS_CLAMP,
    DEFAULT_MTU,
    DEFAULT_NODE_ACTION,
    DEFAULT_QUEUE_BASE,
    DEFAULT_REKEY_TIME,
    DEFAULT_ROLE,
    DEFAULT_SANDBOX,
    DEFAULT_SOCKET,
    DEFAULT_STATE_DIR,
    DEFAULT_VERSIONS,
    DEFAULT_WATCHDOG,
    DEFAULT_WORKER_USER,
    WATCHDOG_RANGE,
)

# The constants this module always had stay importable from it (the lab and tests use them).
__all__ = [
    "DEFAULT_MARK", "DEFAULT_QUEUE_BASE", "DEFAULT_SOCKET", "DEFAULT_STATE_DIR",
    "DEFAULT_WATCHDOG", "WATCHDOG_RANGE", "CompartmentConfig", "Config", "ConnectionConfig",
    "DaemonConfig", "NodeConfig", "QueueConfig",
]


@dataclass(frozen=True)
class NodeConfig:
    """Where the IPsec boundary is (RFC 4301 section 3.1) and what this node is."""

    interface: str | None = None  # the unprotected (IPsec-facing) interface; None: all but lo
    role: str = DEFAULT_ROLE  # "host" or "gateway" (gateway also protects forwarded traffic)
    default_action: Action = DEFAULT_NODE_ACTION  # for traffic that matches no policy
    mtu: int = DEFAULT_MTU  # of the unprotected interface: TCP MSS clamping, each SA's first path MTU
    # IPv6 neighbour discovery on the unprotected interface while IPv6 is otherwise dropped
    # (node.default = discard; policies and SAs are IPv4 only).
    ipv6_neighbour_discovery: bool = DEFAULT_IPV6_ND
    # where ``mtu`` came from (check-config says it): node.mtu, the interface's, or the default
    mtu_source: str = field(default="node.mtu", compare=False)


@dataclass(frozen=True)
class QueueConfig:
    num: int  # NFQUEUE number
    cpu: int | None  # CPU the worker is pinned to (None: not pinned)


@dataclass(frozen=True)
class DaemonConfig:
    queues: tuple[QueueConfig, ...]
    mark: int = DEFAULT_MARK
    control_socket: str = DEFAULT_SOCKET
    state_dir: str = DEFAULT_STATE_DIR
    mss_clamp: bool = DEFAULT_MSS_CLAMP
    chain_prefix: str = DEFAULT_CHAIN_PREFIX
    log_level: str = DEFAULT_LOG_LEVEL
    iptables: str = DEFAULT_IPTABLES  # "auto" (the system's iptables), "nft" or "legacy"
    watchdog: float = DEFAULT_WATCHDOG  # seconds a ready worker may not answer; 0: no watchdog
    drop_log: bool = DEFAULT_DROP_LOG  # the rate-limited drop log (opt-in)
    busy_poll: int = DEFAULT_BUSY_POLL  # microseconds a worker polls after a batch; 0: off
    metrics: str | None = DEFAULT_METRICS  # "ADDRESS:PORT" of the metrics listener; None: off
    gso: bool = DEFAULT_GSO  # queues bound with NFQA_CFG_F_GSO: outbound TCP superpackets whole
    sandbox: str = DEFAULT_SANDBOX  # "enforce", "log" or "off" (workers as root)
    worker_user: str = DEFAULT_WORKER_USER  # who the workers run as when sandboxed
    versions: tuple[str, ...] = DEFAULT_VERSIONS  # the ESP implementations each worker runs
    compare: str = DEFAULT_COMPARE  # "off", "all" or "sample:N" (nfq_ipsec.versions)
    compare_fallback: bool = DEFAULT_COMPARE_FALLBACK  # one version left may carry an SA alone
    key_log: str | None = DEFAULT_KEY_LOG  # the agent's key log for Wireshark (keylog.py); None: off


@dataclass(frozen=True)
class ConnectionConfig:
    """One ``[[connection]]``: what the keying agent negotiates for the policy that names it.
    Addresses are the core's ints (IPv6 with the marker bit); the PSK never shows in a repr."""

    name: str
    local: int
    remote: int
    local_id: str
    remote_id: str
    psk: Secret
    ike_proposal: SAPayload  # ``ike`` and ``esp`` parsed
    esp_proposal: SAPayload
    ike: str = DEFAULT_IKE_PROPOSAL  # the proposal strings as written
    esp: str = DEFAULT_ESP_PROPOSAL
    auth: str = "psk"
    mode: Mode = Mode.TUNNEL
    start_action: str = "none"  # "start", "trap" or "none"
    rekey_time: float = DEFAULT_REKEY_TIME  # the Child SAs'; 0: never
    ike_rekey_time: float = DEFAULT_IKE_REKEY_TIME
    dpd_delay: float = DEFAULT_DPD_DELAY
    encap: bool = False
    life_time: float = DEFAULT_REKEY_TIME * 1.1  # the Child SAs' hard lifetime; 0: none
    ike_life_time: float = DEFAULT_IKE_REKEY_TIME * 1.1
    policy: str = ""  # the protect policy that names it ("" if none does)


@dataclass(frozen=True)
class CompartmentConfig:
    """One ``[[compartment]]``, or the implicit default one (id 0, no selector): a label
    selector, the queues whose workers hold its SAs, and its policies (by name)."""

    name: str
    queues: tuple[int, ...]
    id: int = 0  # set by the loader (its place, from 1) when the file gives none
    uid: int | None = None
    gid: int | None = None
    cgroup: str | None = None
    interface: str | None = None  # forwarded traffic: the input interface
    source: Network | None = None  # forwarded traffic: the source prefix
    user: str | None = None  # its workers' user; None: daemon.worker_user
    policies: tuple[str, ...] = ()  # the names of its policies, in SPD order

    @property
    def mark(self) -> int:
        """Its bits in the mark of what its workers send (``COMPARTMENT_MARK_MASK``)."""
        return self.id << COMPARTMENT_MARK_SHIFT

    @property
    def selects_local(self) -> bool:
        return self.uid is not None or self.gid is not None or self.cgroup is not None

    @property
    def selects_forwarded(self) -> bool:
        return self.interface is not None or self.source is not None

    def selector_text(self) -> str:
        """Its selector in words (status, check-config)."""
        parts = [f"{k} {v}" for k, v in (("uid", self.uid), ("gid", self.gid),
                                         ("cgroup", self.cgroup), ("interface", self.interface),
                                         ("source", self.source)) if v is not None]
        return ", ".join(parts) or "unlabelled traffic"


@dataclass(frozen=True)
class Config:
    node: NodeConfig
    daemon: DaemonConfig
    policies: tuple[Policy, ...]
    sas: tuple[SAParams, ...]
    path: Path | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)
    connections: tuple[ConnectionConfig, ...] = ()
    crypto: CryptoSettings = DEFAULT_CRYPTO
    compartments: tuple[CompartmentConfig, ...] = ()  # the file's; the default one is not here

    @property
    def default_compartment(self) -> CompartmentConfig:
        """The implicit compartment: the queues no ``[[compartment]]`` owns, the policies that
        name none."""
        owned = {q for c in self.compartments for q in c.queues}
        named = {n for c in self.compartments for n in c.policies}
        return CompartmentConfig(
            DEFAULT_COMPARTMENT, tuple(q for q in self.queue_numbers if q not in owned),
            policies=tuple(p.name for p in self.policies if p.name not in named))

    @property
    def all_compartments(self) -> tuple[CompartmentConfig, ...]:
        return (self.default_compartment, *self.compartments)

    def compartment_of_queue(self, queue: int) -> CompartmentConfig:
        for comp in self.compartments:
            if queue in comp.queues:
                return comp
        return self.default_compartment

    def compartment_of_policy(self, name: str) -> CompartmentConfig:
        for comp in self.compartments:
            if name in comp.policies:
                return comp
        return self.default_compartment

    def policies_of(self, comp: CompartmentConfig) -> tuple[Policy, ...]:
        """A compartment's SPD: its policies, in the file's order."""
        names = set(comp.policies)
        return tuple(p for p in self.policies if p.name in names)

    def connection(self, name: str) -> ConnectionConfig:
        for conn in self.connections:
            if conn.name == name:
                return conn
        raise KeyError(name)

    def policy_connection(self, policy: Policy) -> ConnectionConfig | None:
        """The connection whose Child SAs carry ``policy`` (None: its SAs are static)."""
        for conn in self.connections:
            if conn.policy == policy.name:
                return conn
        return None

    @property
    def spd(self) -> SPD:
        return SPD(list(self.policies))

    @property
    def queue_numbers(self) -> tuple[int, ...]:
        return tuple(q.num for q in self.daemon.queues)

    def sas_for_queue(self, queue: int) -> tuple[SAParams, ...]:
        """The SAs one worker (compartment) holds: only those its queue owns."""
        return tuple(sa for sa in self.sas if sa.queue == queue)

    def sa(self, name: str) -> SAParams:
        for sa in self.sas:
            if sa.name == name:
                return sa
        raise KeyError(name)

    def outbound_sas(self, policy: Policy) -> tuple[SAParams, ...]:
        """A PROTECT policy's outbound SAs, in the order they are listed (one per queue)."""
        if policy.action is not Action.PROTECT:
            return ()
        by_name = {sa.name: sa for sa in self.sas}
        return tuple(
            by_name[n] for n in policy.sa_names if by_name[n].direction is SADirection.OUT
        )

    def inbound_sas(self) -> tuple[SAParams, ...]:
        return tuple(sa for sa in self.sas if sa.direction is SADirection.IN)

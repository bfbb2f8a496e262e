"""The validated configuration. Built only by ``loader``; every field is already checked."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.sa import SADirection, SAParams
from ..core.spd import SPD, Action, Policy

DEFAULT_QUEUE_BASE = 100
DEFAULT_MARK = 0x10000000  # set on every packet a worker reinjects; our rules skip it
DEFAULT_SOCKET = "/run/nfq-ipsec/nfq-ipsec.sock"
DEFAULT_STATE_DIR = "/var/lib/nfq-ipsec"


@dataclass(frozen=True)
class NodeConfig:
    """Where the IPsec boundary is (RFC 4301 section 3.1) and what this node is."""

    interface: str | None = None  # the unprotected (IPsec-facing) interface; None: all but lo
    role: str = "host"  # "host" or "gateway" (gateway also protects forwarded traffic)
    default_action: Action = Action.DISCARD  # for traffic that matches no policy
    mtu: int = 1500  # of the unprotected interface: TCP MSS clamping, each SA's first path MTU
    # IPv6 neighbour discovery on the unprotected interface while IPv6 is otherwise dropped
    # (node.default = discard; policies and SAs are IPv4 only).
    ipv6_neighbour_discovery: bool = False


DEFAULT_WATCHDOG = 10.0
WATCHDOG_RANGE = (1.0, 3600.0)  # or 0, which turns the watchdog off


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
    mss_clamp: bool = True
    chain_prefix: str = "NFQIPSEC"
    log_level: str = "info"
    iptables: str = "auto"  # "auto" (the system's iptables), "nft" or "legacy"
    watchdog: float = DEFAULT_WATCHDOG  # seconds a ready worker may not answer; 0: no watchdog


@dataclass(frozen=True)
class Config:
    node: NodeConfig
    daemon: DaemonConfig
    policies: tuple[Policy, ...]
    sas: tuple[SAParams, ...]
    path: Path | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)

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

"""The types of the status answer and of what the workers report for it.

The answer to a ``status`` request on the control socket (``nfq-ipsec status --json`` prints it
as it comes) is a :class:`StatusReport`. It is built by the supervisor
(``Supervisor.status``) from its own state and the workers' :class:`WorkerSnapshot` (one per
``("stats",)`` request, the answer ``("stats", snapshot)``); each worker also answers every
watchdog ping with its :class:`Counts` (``("pong", counts)``), which the supervisor carries
over to the queue's next worker if this one dies (:mod:`nfq_ipsec.counts`).

They are TypedDicts: plain dicts at run time (they cross the workers' pipes and go out as JSON
as they are), with their keys and value types checked by mypy. The JSON schema of the answer,
every field with its type and what it means, is ``docs/status.md``; a test
(``tests/unit/test_status.py``) holds that page, these types and real answers to the same
keys and types.

Nothing here is key material: names, SPIs and counters only.
"""

from __future__ import annotations

from typing import TypedDict

DropCounts = dict[str, int]  # drops by reason (``DropReason`` values); reasons never seen absent


# -- what a worker counts, carried across its restarts -----------------------------------------
class SaCounts(TypedDict):
    packets: int
    bytes: int
    drops: DropCounts


class Counts(TypedDict):
    """A worker's packets and drops since it started, in all and per SA (by name)."""

    packets_in: int
    packets_out: int
    drops: DropCounts
    sas: dict[str, SaCounts]


# -- what a worker reports for a status answer ---------------------------------------------------
class LifetimeLeft(TypedDict):
    """What is left of an SA's hard lifetime (``None``: no such limit)."""

    packets: int | None
    bytes: int | None
    seconds: float | None


class KernelQueueCounts(TypedDict):
    """The kernel's counters for a queue (``/proc/net/netfilter/nfnetlink_queue``)."""

    queue_total: int
    queue_dropped: int
    user_dropped: int


class UdpSnapshot(TypedDict):
    """An SA of ESP in UDP (RFC 3948), as its worker sees it now."""

    local_port: int
    peer: str  # "address:port" (address "*": any, a transport-mode inbound SA)
    keepalives_sent: int
    peer_changes: int


class SaSnapshot(TypedDict):
    name: str
    spi: int
    direction: str
    packets: int
    bytes: int
    drops: DropCounts
    seq: int  # outbound: the last sequence number sent; inbound: the highest authenticated
    lifetime_left: LifetimeLeft
    path_mtu: int | None
    saved: int | None  # what the SA's state file covers (None: no state file)
    state_writes: int | None
    udp: UdpSnapshot | None  # ESP in UDP; None for plain ESP
    engine: str | None  # the crypto engine it is bound to ("none": no engine can carry it)


class EngineReport(TypedDict):
    """One crypto engine (``engines/team.py``): what it can do, its state, its load."""

    name: str
    state: str  # ready, excluded, disabled, absent
    reason: str  # why it is absent or excluded ("" otherwise)
    detail: str  # its library's version, the kernel drivers behind AF_ALG
    claims: list[str]  # the suites it offers here
    verified: list[str]  # those whose known-answer tests it passed
    failed: dict[str, str]  # suite -> why its known-answer test failed
    speed: dict[str, float]  # bytes per second sealed, per verified suite (discovery)
    sas: int  # SAs bound to it now
    faults: int  # packets its suites raised on (dropped as engine_failed)
    moved_away: int  # SAs moved off it (exclusion, fault, disable)


class OffloadReport(TypedDict):
    """A worker's crypto offload helpers (``crypto.offload_helpers``, ``engines/offload.py``),
    counted since the worker started."""

    helpers: int  # running now (0 once stopped)
    batch: int  # crypto.offload_batch
    active: bool  # False: stopped (``failed`` says why), every SA seals in the worker
    failed: str  # why it stopped ("" while it runs)
    jobs: int  # seals handed to the helpers
    chunks: int  # doorbells rung (a chunk of up to ``batch`` seals each)
    inline: int  # seals done in the worker while offloading (no room in shared memory)
    lost: int  # seals that did not come back: their packets dropped as engine_failed
    checked: int  # helpers' results sealed again in the worker (crypto.self_check)


class VersionState(TypedDict):
    """One ESP version of a worker (``daemon.versions``, :mod:`nfq_ipsec.versions`)."""

    name: str
    in_service: bool
    out_reason: str | None  # why it was taken out; None while in service
    errors: int  # exceptions it raised
    abstained: int  # packets it refused as unsupported
    streak: int  # disagreements in a row it was blamed for
    outvoted: int  # packets the others' majority answer left for (``majority``)


class PairCounts(TypedDict):
    versions: list[str]  # two names, in the order of daemon.versions
    agreed: int
    mismatches: int


class VersionsSnapshot(TypedDict):
    """A worker's ESP versions and how far they agreed (``daemon.compare``)."""

    compare: str  # "off", "all", "sample:N", "majority"
    fallback: bool
    packets: int  # packets the versions processed
    compared: int  # of those, compared
    versions: list[VersionState]
    pairs: list[PairCounts]
    sa_mismatches: dict[str, int]  # SA name -> disagreements on its packets


class WorkerSnapshot(TypedDict):
    """A worker's answer to ``("stats",)`` (``PacketHandler.snapshot``). Its ``drops`` include
    what the kernel dropped before the worker saw it (``queue_overflow``)."""

    queue: int
    cpu: int | None
    pid: int
    started: float  # time.time() when the worker started
    packets_in: int
    packets_out: int
    drops: DropCounts
    overflow_reports: int
    ike_markers: int
    crossed_family: int
    superpackets: int  # daemon.gso: superpackets whose ESP packets all left in a batch
    segments: int  # the ESP packets they left as
    busy_poll_hits: int  # daemon.busy_poll: polls that caught a packet (0 with it off)
    busy_poll_misses: int  # and polls that ran out empty
    core: str
    kernel: KernelQueueCounts | None
    sas: list[SaSnapshot]
    engines: list[EngineReport]
    versions: VersionsSnapshot  # daemon.versions and daemon.compare
    offload: OffloadReport | None  # crypto.offload_helpers (None: off)


# -- the status answer ---------------------------------------------------------------------------
class DaemonReport(TypedDict):
    pid: int
    uptime: float
    config: str
    state: str
    rules_installed: bool
    ipv6: str
    version: str
    core: str
    control_errors: int
    control_clients: int
    cpu_seconds: float | None  # the supervisor's own (usage.py)
    memory_bytes: int | None


class WorkerReport(TypedDict):
    """One queue and its worker. Counters are ``None`` while the worker is down or did not
    answer in time; packets and drops count from the daemon's start, across restarts."""

    queue: int
    cpu: int | None
    pid: int | None
    uptime: float | None
    restarts: int
    state: str
    packets_in: int | None
    packets_out: int | None
    drops: DropCounts | None
    kernel_queue_dropped: int | None
    user_dropped: int | None
    last_error: str | None
    last_exit: str | None
    last_signal: str | None
    last_syscall: int | None
    last_outage: float | None
    core: str | None
    ike_markers: int | None
    crossed_family: int | None
    superpackets: int | None
    segments: int | None
    busy_poll_hits: int | None
    busy_poll_misses: int | None
    cpu_seconds: float | None  # the current worker process's user + system time
    memory_bytes: int | None  # and its resident memory
    versions: VersionsSnapshot | None  # its ESP versions (daemon.versions, daemon.compare)
    compartment: str  # the compartment whose queue it is ("default": daemon.queues)
    offload: OffloadReport | None  # its crypto offload helpers (crypto.offload_helpers)


class CompartmentReport(TypedDict):
    """One compartment: its workers, and their packets and drops added up (``None`` while
    none of its workers answered)."""

    name: str
    id: int  # its bits in the mark: id << 8
    selector: str  # in words: "uid 1000", "unlabelled traffic"
    user: str | None  # its workers' user (None: daemon.worker_user, or root with the sandbox off)
    workers: int  # its queues
    workers_ready: int
    restarts: int
    packets_in: int | None
    packets_out: int | None
    drops: DropCounts | None


class SaReport(TypedDict):
    name: str
    spi: str  # "0x%08x"
    direction: str
    queue: int
    packets: int | None
    bytes: int | None
    replay_drops: int | None
    integrity_drops: int | None
    other_drops: int | None
    seq: int | None
    lifetime_left: LifetimeLeft | None
    saved: int | None
    path_mtu: int | None
    encapsulation: str
    udp_peer: str | None
    keepalives_sent: int | None
    peer_changes: int | None
    last_packet_age: float | None  # seconds since its worker's report first counted its last packet
    engine: str | None  # the crypto engine it runs on now


class ChildSaReport(TypedDict):
    """A negotiated Child SA pair: ``spi_in`` ours, ``spi_out`` the peer's."""

    spi_in: str  # "0x%08x"
    spi_out: str
    esp: str  # its transforms
    udp_encap: bool
    rekey_in: float | None  # seconds to its rekey (None: never)
    expires_in: float | None  # seconds to its hard lifetime's end (None: none)


class IkeSaReport(TypedDict):
    spi_i: str  # hex
    spi_r: str
    role: str  # ours: initiator (we began it) or responder
    state: str
    ike: str | None  # the chosen transforms
    nat: bool
    port: int
    established: float | None  # when, in seconds since the epoch
    rekey_in: float | None  # seconds to the IKE SA's rekey (None: never)
    expires_in: float | None  # seconds to its hard lifetime's end (None: none)
    children: list[ChildSaReport]


class ConnectionReport(TypedDict):
    name: str
    local: str
    remote: str
    start_action: str
    last: str | None  # the last exchange's outcome, in words
    ike_sas: list[IkeSaReport]


class IkeReport(TypedDict):
    """The keying agent: its process and what it negotiated. ``connections`` is ``None`` while
    the agent is not running or did not answer in time."""

    state: str  # starting, ready, down, stopped
    pid: int | None
    restarts: int
    last_error: str | None
    key_log: str | None  # daemon.key_log: where every negotiated key is written (None: off)
    connections: list[ConnectionReport] | None


class StatusReport(TypedDict):
    """The answer to ``{"command": "status"}``."""

    taken_at: str  # when the supervisor built it: UTC, ISO 8601 ("2026-12-03T10:13:00.123+00:00")
    taken_at_epoch: float  # the same in seconds since the Unix epoch
    daemon: DaemonReport
    kernel_drops: DropCounts | None
    kernel_drops_age: float | None
    warnings: list[str]
    workers: list[WorkerReport]
    compartments: list[CompartmentReport]  # the default one first, then the file's
    sas: list[SaReport]
    ike: IkeReport | None  # None: no connection, no agent
    engines: list[EngineReport]  # the crypto engines, across the workers

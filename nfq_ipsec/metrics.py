"""The status answer as Prometheus metrics: the text exposition format, version 0.0.4.

:func:`render` turns a :class:`~nfq_ipsec.status.StatusReport` (what ``nfq-ipsec status --json``
prints) into the lines a Prometheus server scrapes from ``GET /metrics``
(``metricsserver.py`` serves them). It is written by hand, not with ``prometheus_client``: the
format is a few lines of text per metric, not worth a runtime dependency (the tests parse
the output with ``prometheus_client``'s own parser).

Names follow Prometheus's conventions: the prefix ``nfq_ipsec_``, counters end in ``_total``,
times in ``_seconds``. Labels: ``queue`` (the NFQUEUE number), ``reason`` (a drop reason, as
``docs/status.md`` lists them), and per SA ``sa`` (its name), ``spi`` (``0x`` and 8 hex
digits), ``direction`` (``in`` or ``out``) and ``queue``. A value the status has as ``null``
(a worker down or silent) has no sample: the series is absent, not zero.

Nothing here is key material: the status answer holds names, SPIs and counters only, and only
those fields are read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .status import SaReport, StatusReport

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "nfq_ipsec_"

Labels = Mapping[str, str]


@dataclass
class Family:
    """One metric: its name, type, help line and samples."""

    name: str
    kind: str  # counter or gauge
    help: str
    samples: list[tuple[Labels, float]] = field(default_factory=list)

    def add(self, labels: Labels, value: float | None) -> None:
        """A sample; none for ``None`` (the status has no value for it)."""
        if value is not None:
            self.samples.append((labels, int(value) if isinstance(value, bool) else value))


def escape(value: str) -> str:
    """A label value as the text format writes it: backslash, double quote and newline
    escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def format_families(families: Iterable[Family]) -> str:
    lines: list[str] = []
    for fam in families:
        lines.append(f"# HELP {fam.name} {fam.help}")
        lines.append(f"# TYPE {fam.name} {fam.kind}")
        for labels, value in fam.samples:
            inner = ",".join(f'{k}="{escape(v)}"' for k, v in labels.items())
            lines.append(f"{fam.name}{{{inner}}} {_number(value)}" if inner
                         else f"{fam.name} {_number(value)}")
    return "\n".join(lines) + "\n"


def _sa_labels(sa: SaReport) -> dict[str, str]:
    return {"sa": sa["name"], "spi": sa["spi"], "direction": sa["direction"],
            "queue": str(sa["queue"])}


def families(status: StatusReport) -> list[Family]:
    """The metrics of one status answer, in a fixed order."""

    def fam(name: str, kind: str, text: str) -> Family:
        suffix = "_total" if kind == "counter" else ""
        return Family(PREFIX + name + suffix, kind, text)

    d = status["daemon"]
    info = fam("info", "gauge", "Always 1; the version of the running daemon.")
    info.add({"version": d["version"]}, 1)
    uptime = fam("uptime_seconds", "gauge", "Seconds since the daemon started.")
    uptime.add({}, d["uptime"])
    cpu = fam("cpu_seconds", "counter", "The supervisor's CPU time, user and system.")
    cpu.add({}, d["cpu_seconds"])
    mem = fam("resident_memory_bytes", "gauge", "The supervisor's resident memory.")
    mem.add({}, d["memory_bytes"])
    rules = fam("rules_installed", "gauge", "1 while the daemon's live iptables rules are in place.")
    rules.add({}, d["rules_installed"])
    control_errors = fam("control_errors", "counter",
                         "Bad requests, error answers and dropped clients on the control socket.")
    control_errors.add({}, d["control_errors"])
    warnings = fam("warnings", "gauge", "Lines in the status answer's warnings (0: nothing to look at).")
    warnings.add({}, len(status["warnings"]))

    up = fam("worker_up", "gauge", "1 while the queue's worker is ready and answers.")
    w_uptime = fam("worker_uptime_seconds", "gauge", "Seconds since the queue's current worker started.")
    restarts = fam("worker_restarts", "counter", "Times the queue's worker was started again.")
    w_cpu = fam("worker_cpu_seconds", "counter", "The queue's current worker's CPU time, user "
                "and system (from zero for each worker process).")
    hits = fam("worker_busy_poll_hits", "counter", "daemon.busy_poll: polls that caught the next "
               "packet without a wake-up (from zero for each worker process).")
    misses = fam("worker_busy_poll_misses", "counter", "daemon.busy_poll: polls that ran out empty "
                 "(from zero for each worker process).")
    w_mem = fam("worker_resident_memory_bytes", "gauge", "The queue's current worker's resident memory.")
    p_in = fam("packets_in", "counter", "Packets the queue's workers took from the kernel.")
    p_out = fam("packets_out", "counter", "Packets the queue's workers handed back accepted.")
    drops = fam("drops", "counter", "Packets the queue's workers dropped, by reason "
                "(queue_overflow: dropped by the kernel before a worker saw them).")
    k_queue = fam("kernel_queue_dropped", "counter", "The kernel's drops on the queue with the "
                  "queue full (from zero for each worker process).")
    k_user = fam("kernel_user_dropped", "counter", "The kernel's drops on the queue with the "
                 "worker's socket buffer full (from zero for each worker process).")
    in_service = fam("worker_version_in_service", "gauge", "daemon.versions: 1 while the "
                     "worker's ESP implementation is in service, 0 once taken out.")
    agreed = fam("worker_version_agreed", "counter", "daemon.compare: compared packets on which "
                 "the pair of ESP implementations agreed (from zero for each worker process).")
    mismatches = fam("worker_version_mismatches", "counter", "daemon.compare: compared packets on "
                     "which they did not, each dropped unless a majority's answer left (from zero for "
                     "each worker process).")
    outvoted = fam("worker_version_outvoted", "counter", "daemon.compare = majority: packets for "
                   "which the other ESP implementations' majority answer left instead of this "
                   "one's (from zero for each worker process).")
    for w in status["workers"]:
        q = {"queue": str(w["queue"])}
        versions = w["versions"]
        if versions is not None:
            for v in versions["versions"]:
                in_service.add({**q, "implementation": v["name"]}, int(v["in_service"]))
                outvoted.add({**q, "implementation": v["name"]}, v["outvoted"])
            for pair in versions["pairs"]:
                labels = {**q, "pair": "+".join(pair["versions"])}
                agreed.add(labels, pair["agreed"])
                mismatches.add(labels, pair["mismatches"])
        up.add(q, int(w["state"] == "ready"))
        w_uptime.add(q, w["uptime"])
        restarts.add(q, w["restarts"])
        w_cpu.add(q, w["cpu_seconds"])
        w_mem.add(q, w["memory_bytes"])
        hits.add(q, w["busy_poll_hits"])
        misses.add(q, w["busy_poll_misses"])
        p_in.add(q, w["packets_in"])
        p_out.add(q, w["packets_out"])
        for reason, n in sorted((w["drops"] or {}).items()):
            drops.add({**q, "reason": reason}, n)
        k_queue.add(q, w["kernel_queue_dropped"])
        k_user.add(q, w["user_dropped"])

    rule_drops = fam("rule_drops", "counter", "Packets the daemon's own iptables DROP rules "
                     "dropped, never queued to a worker, by reason.")
    for reason, n in sorted((status["kernel_drops"] or {}).items()):
        rule_drops.add({"reason": reason}, n)

    sa_info = fam("sa_info", "gauge", "Always 1, for each SA of the running configuration "
                  "(its encapsulation: none or udp).")
    sa_packets = fam("sa_packets", "counter", "Packets an SA protected (out) or authenticated (in).")
    sa_bytes = fam("sa_bytes", "counter", "Bytes of those packets without ESP (the inner packets).")
    sa_drops = fam("sa_drops", "counter", "An SA's packets dropped, by reason (replay, integrity, other).")
    sa_seq = fam("sa_sequence_number", "gauge", "Outbound: the last sequence number sent; inbound: "
                 "the highest authenticated.")
    left_s = fam("sa_lifetime_left_seconds", "gauge", "Seconds left of the SA's hard lifetime.")
    left_p = fam("sa_lifetime_left_packets", "gauge", "Packets left of the SA's hard lifetime.")
    left_b = fam("sa_lifetime_left_bytes", "gauge", "Bytes left of the SA's hard lifetime.")
    idle = fam("sa_last_packet_age_seconds", "gauge", "Seconds since the SA last carried a packet "
               "(as its worker's reports show it; at most one report interval short).")
    for sa in status["sas"]:
        labels = _sa_labels(sa)
        sa_info.add({**labels, "encapsulation": sa["encapsulation"]}, 1)
        sa_packets.add(labels, sa["packets"])
        sa_bytes.add(labels, sa["bytes"])
        sa_drops.add({**labels, "reason": "replay"}, sa["replay_drops"])
        sa_drops.add({**labels, "reason": "integrity"}, sa["integrity_drops"])
        sa_drops.add({**labels, "reason": "other"}, sa["other_drops"])
        sa_seq.add(labels, sa["seq"])
        left = sa["lifetime_left"]
        if left is not None:
            left_s.add(labels, left["seconds"])
            left_p.add(labels, left["packets"])
            left_b.add(labels, left["bytes"])
        idle.add(labels, sa["last_packet_age"])

    e_up = fam("engine_up", "gauge", "1 while the crypto engine is ready (verified, enabled, "
               "not excluded), else 0.")
    e_sas = fam("engine_sas", "gauge", "SAs bound to the crypto engine now, across the workers.")
    e_faults = fam("engine_faults", "counter", "Packets the crypto engine's suites failed on "
                   "(dropped as engine_failed).")
    for e in status["engines"]:
        labels = {"engine": e["name"]}
        e_up.add(labels, int(e["state"] == "ready"))
        e_sas.add(labels, e["sas"])
        e_faults.add(labels, e["faults"])
    return [info, uptime, cpu, mem, rules, control_errors, warnings, up, w_uptime, restarts, w_cpu, w_mem,
            hits, misses, in_service, outvoted, agreed, mismatches, p_in, p_out,
            drops, k_queue, k_user, rule_drops, sa_info, sa_packets, sa_bytes, sa_drops, sa_seq, left_s,
            left_p, left_b, idle, e_up, e_sas, e_faults]


def render(status: StatusReport) -> str:
    """The exposition of one status answer."""
    return format_families(families(status))

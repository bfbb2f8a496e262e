"""The ``[node]`` and ``[daemon]`` sections."""

from __future__ import annotations

from typing import Any

from . import parsers
from .fields import DAEMON, DEFAULT_QUEUE_BASE, NODE
from .model import DaemonConfig, NodeConfig, QueueConfig
from .reading import Problems


def read_node(raw: dict[str, Any], probs: Problems) -> NodeConfig:
    NODE.check_unknown(raw, "node", probs)
    interface = NODE["interface"].read(raw, "node", probs)
    role = NODE["role"].read(raw, "node", probs)
    if role == "gateway" and interface is None:
        probs.add("node.interface", "a gateway must name its unprotected interface")
    default = NODE["default"].read(raw, "node", probs)
    mtu = NODE["mtu"].read(raw, "node", probs)
    nd = NODE["ipv6_neighbour_discovery"].read(raw, "node", probs)
    return NodeConfig(interface, role, default, mtu, nd)


def read_daemon(raw: dict[str, Any], cpus: list[int], probs: Problems) -> DaemonConfig:
    DAEMON.check_unknown(raw, "daemon", probs)
    pairs = parsers.queues(raw, cpus, DEFAULT_QUEUE_BASE, probs)
    mark = DAEMON["mark"].read(raw, "daemon", probs)
    prefix = DAEMON["chain_prefix"].read(raw, "daemon", probs)
    log_level = DAEMON["log_level"].read(raw, "daemon", probs)
    iptables = DAEMON["iptables"].read(raw, "daemon", probs)
    watchdog = parsers.seconds_or_off(DAEMON["watchdog"], raw, "daemon", probs)
    return DaemonConfig(
        iptables=iptables,
        watchdog=watchdog,
        queues=tuple(QueueConfig(num, cpu) for num, cpu in pairs),
        mark=mark,
        control_socket=DAEMON["control_socket"].read(raw, "daemon", probs),
        state_dir=DAEMON["state_dir"].read(raw, "daemon", probs),
        mss_clamp=DAEMON["mss_clamp"].read(raw, "daemon", probs),
        gso=DAEMON["gso"].read(raw, "daemon", probs),
        chain_prefix=prefix,
        log_level=log_level,
    )

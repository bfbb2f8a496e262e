"""The ``[node]`` and ``[daemon]`` sections."""

from __future__ import annotations

import re
from typing import Any

from .. import netif
from . import parsers
from .fields import DAEMON, DEFAULT_MTU, DEFAULT_QUEUE_BASE, DEFAULT_SOCKET, NODE, SOCKET_DIR
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
    source = "node.mtu"
    if mtu is None:
        mtu, source = interface_mtu(interface)
    nd = NODE["ipv6_neighbour_discovery"].read(raw, "node", probs)
    return NodeConfig(interface, role, default, mtu, nd, mtu_source=source)


def interface_mtu(interface: str | None) -> tuple[int, str]:
    """``node.mtu`` when the file does not set it, and where it comes from: the interface's, as
    the kernel has it now (within the bounds a configured one has), or 1500."""
    if interface is None:
        return DEFAULT_MTU, "the default (no node.interface)"
    found = netif.mtu(interface)
    if found is None:
        return DEFAULT_MTU, f"the default ({interface} does not exist here)"
    return max(576, min(found, 65535)), f"{interface}'s"


def read_daemon(raw: dict[str, Any], cpus: list[int], probs: Problems,
                config_name: str | None = None) -> DaemonConfig:
    """``config_name``: the file's name without ``.toml`` (None: not a file's), which the
    default control socket is named after."""
    DAEMON.check_unknown(raw, "daemon", probs)
    pairs = parsers.queues(raw, cpus, DEFAULT_QUEUE_BASE, probs)
    mark = DAEMON["mark"].read(raw, "daemon", probs)
    prefix = DAEMON["chain_prefix"].read(raw, "daemon", probs)
    log_level = DAEMON["log_level"].read(raw, "daemon", probs)
    iptables = DAEMON["iptables"].read(raw, "daemon", probs)
    watchdog = parsers.seconds_or_off(DAEMON["watchdog"], raw, "daemon", probs)
    gso = DAEMON["gso"].read(raw, "daemon", probs)
    versions = parsers.versions(raw, probs)
    return DaemonConfig(
        iptables=iptables,
        watchdog=watchdog,
        queues=tuple(QueueConfig(num, cpu) for num, cpu in pairs),
        mark=mark,
        control_socket=(DAEMON["control_socket"].read(raw, "daemon", probs)
                        if "control_socket" in raw else default_socket(config_name, probs)),
        state_dir=DAEMON["state_dir"].read(raw, "daemon", probs),
        mss_clamp=DAEMON["mss_clamp"].read(raw, "daemon", probs),
        gso=gso,
        chain_prefix=prefix,
        log_level=log_level,
        drop_log=DAEMON["drop_log"].read(raw, "daemon", probs),
        busy_poll=DAEMON["busy_poll"].read(raw, "daemon", probs),
        metrics=DAEMON["metrics"].read(raw, "daemon", probs),
        sandbox=DAEMON["sandbox"].read(raw, "daemon", probs),
        worker_user=DAEMON["worker_user"].read(raw, "daemon", probs),
        versions=versions,
        compare=parsers.compare(raw, len(versions), gso, probs),
        compare_fallback=DAEMON["compare_fallback"].read(raw, "daemon", probs),
        key_log=DAEMON["key_log"].read(raw, "daemon", probs),
    )


_SOCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def default_socket(config_name: str | None, probs: Problems) -> str:
    """``daemon.control_socket`` when the file does not set it: ``SOCKET_DIR/NAME.sock``, NAME
    the configuration file's name without ``.toml`` (so two daemons of two files don't share
    one); the fixed default for a configuration that is not a file's."""
    if config_name is None:
        return DEFAULT_SOCKET
    if not _SOCKET_NAME.fullmatch(config_name):
        probs.add("daemon.control_socket", f"the default is {SOCKET_DIR}/NAME.sock, NAME the "
                  f"file's name without .toml, and {config_name!r} can't be one (letters, digits, "
                  "'.', '_', '@', '-', at most 64): set control_socket")
        return DEFAULT_SOCKET
    return f"{SOCKET_DIR}/{config_name}.sock"

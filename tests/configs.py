"""Configurations the tests write: one outbound SA protecting 10.0.0.1 -> 10.0.0.2 (queue 100
unless asked), its control socket and state under the test's own directory."""

from __future__ import annotations

from pathlib import Path


def one_sa(run_dir: Path, state_dir: Path, key: str, node_extra: str = "",
           queues: str = "[100]", cpus: str = "[0]") -> str:
    """The TOML text. ``key`` is the SA's key line: ``key = "hex"`` or ``key_file = "path"``."""
    return f"""
[node]
interface = "eth1"
{node_extra}
[daemon]
queues = {queues}
cpus = {cpus}
control_socket = "{run_dir / 'ctl.sock'}"
state_dir = "{state_dir}"
[[policy]]
name = "p"
action = "protect"
local = "10.0.0.1/32"
remote = "10.0.0.2/32"
direction = "out"
sa = ["o"]
[[sa]]
name = "o"
direction = "out"
spi = 0x1000
encryption = "aes-gcm-128"
{key}
"""

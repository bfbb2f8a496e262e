"""Configurations the tests build: as TOML text (one outbound SA with its own control socket and
state directory) and as data (a host pair, a gateway using every selector type) with a small
TOML writer."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from nfq_ipsec.config import parse_config
from nfq_ipsec.config.model import Config


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


CPUS = [0, 1]


GCM128 = "00112233445566778899aabbccddeeff01020304"


GCM256 = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff01020304"


CBC256 = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"


SHA512 = "ab" * 64


def host_data(**node: Any) -> dict[str, Any]:
    """Host 10.0.0.1 <-> 10.0.0.2, one queue, one SA each way."""
    return {
        "node": {"interface": "eth1", **node},
        "daemon": {"queues": [7], "cpus": [0]},
        "policy": [
            {"name": "p", "action": "protect", "local": "10.0.0.1/32", "remote": "10.0.0.2/32",
             "sa": ["out0", "in0"]},
        ],
        "sa": [
            {"name": "out0", "direction": "out", "spi": 0x1000, "encryption": "aes-gcm-128",
             "key": GCM128, "queue": 7},
            {"name": "in0", "direction": "in", "spi": 0x2000, "encryption": "aes-gcm-128",
             "key": GCM128[::-1], "queue": 7},  # each SA its own key
        ],
    }


def host6_data(**node: Any) -> dict[str, Any]:
    """``host_data`` over IPv6: host 2001:db8::1 <-> 2001:db8::2, transport mode."""
    data = host_data(**node)
    data["policy"][0].update(local="2001:db8::1/128", remote="2001:db8::2/128")
    return data


def everything_data() -> dict[str, Any]:
    """A gateway that uses every selector type, several queues and a custom prefix and mark."""
    def sa(name: str, direction: str, spi: int, queue: int, cbc: bool = False) -> dict[str, Any]:
        d = {"name": name, "direction": direction, "spi": spi, "queue": queue, "mode": "tunnel",
             "tunnel_local": "192.0.2.1", "tunnel_remote": "192.0.2.2",
             "encryption": "aes-gcm-256", "key": GCM256}
        if cbc:
            d.update(encryption="aes-cbc-256", key=CBC256, integrity="hmac-sha512-256",
                     integrity_key=SHA512)
        # each SA its own keys (a shared key is refused): these, made distinct per SA
        d["key"] = hashlib.sha256(f"{name} key".encode()).hexdigest() + d["key"][64:]  # type: ignore[index]
        if cbc:
            d["integrity_key"] = hashlib.sha512(f"{name} integrity".encode()).hexdigest()
        return d
    return {
        "node": {"interface": "wan0", "role": "gateway", "default": "discard", "mtu": 1400},
        "daemon": {"queues": [100, 101, 102], "cpus": [0, 1, 0], "mark": 0x40000000,
                   "chain_prefix": "NQT"},
        "policy": [
            {"name": "echo", "action": "bypass", "protocol": "icmp", "icmp_type": 8, "icmp_code": 0},
            {"name": "unreach", "action": "bypass", "protocol": "icmp", "icmp_type": 3},
            {"name": "code4", "action": "discard", "protocol": "icmp", "icmp_code": 4},
            {"name": "type255", "action": "bypass", "protocol": "icmp", "icmp_type": 255,
             "icmp_code": 1},
            {"name": "proto0", "action": "bypass", "protocol": 0},
            {"name": "no-dns-out", "action": "discard", "direction": "out", "protocol": "udp",
             "remote_ports": "5000-5100"},
            {"name": "ssh-in", "action": "bypass", "direction": "in", "protocol": "tcp",
             "local": "192.0.2.1/32", "local_ports": 22},
            {"name": "sctp", "action": "bypass", "protocol": "sctp", "local_ports": 9,
             "remote_ports": "1000-2000"},
            {"name": "gre", "action": "bypass", "protocol": "gre", "remote": "198.51.100.0/24"},
            {"name": "all-ports", "action": "bypass", "protocol": "udp", "local_ports": "0-65535",
             "remote": "203.0.113.0/24"},
            {"name": "web", "action": "protect", "direction": "out", "protocol": "tcp",
             "local": "10.1.0.0/24", "remote": "10.3.0.0/16", "remote_ports": 443, "sa": ["web-out"]},
            {"name": "lans", "action": "protect", "local": "10.1.0.0/24", "remote": "10.2.0.0/24",
             "sa": ["o0", "o1", "o2", "i0", "i1"]},
            {"name": "in-only", "action": "protect", "direction": "in", "local": "10.1.0.0/24",
             "remote": "10.4.0.0/24", "sa": ["i4"]},
        ],
        "sa": [
            sa("web-out", "out", 0x500, 102, cbc=True),
            sa("o0", "out", 0x1000, 100),
            sa("o1", "out", 0x1001, 101, cbc=True),
            sa("o2", "out", 0x1002, 102),
            sa("i0", "in", 0x2000, 100),
            sa("i1", "in", 0x2001, 101),
            sa("i4", "in", 0x2004, 102),
        ],
    }


def udp_data() -> dict[str, Any]:
    """A gateway with SAs of ESP in UDP (RFC 3948) beside a plain one: inbound two on port
    4500 (queues 100 and 101; i0 follows a new peer) and one on 4501, one plain; outbound one
    from 4500 with keepalives that follows what i0 learns (o0, queue 100) and one from 4501
    without keepalives."""
    def sa(name: str, direction: str, spi: int, queue: int, **extra: Any) -> dict[str, Any]:
        return {"name": name, "direction": direction, "spi": spi, "queue": queue,
                "mode": "tunnel", "tunnel_local": "192.0.2.1", "tunnel_remote": "198.51.100.2",
                "encryption": "aes-gcm-128",
                "key": hashlib.sha256(name.encode()).hexdigest()[:40], **extra}
    udp = {"encapsulation": "udp"}
    return {
        "node": {"interface": "wan0", "role": "gateway"},
        "daemon": {"queues": [100, 101], "cpus": [0, 1]},
        "policy": [
            {"name": "lans", "action": "protect", "local": "10.1.0.0/24", "remote": "10.2.0.0/24",
             "sa": ["o0", "o1", "i0", "i1", "i2", "plain"]},
        ],
        "sa": [
            sa("o0", "out", 0x1000, 100, **udp, keepalive=10, peer_change="follow"),
            sa("o1", "out", 0x1001, 101, **udp, udp_source_port=4501, keepalive=0),
            sa("i0", "in", 0x2000, 100, **udp, peer_change="follow"),
            sa("i1", "in", 0x2001, 101, **udp),
            sa("i2", "in", 0x2002, 101, **udp, udp_destination_port=4501),
            sa("plain", "in", 0x3000, 100),
        ],
    }


def everything6_data() -> dict[str, Any]:
    """``everything_data`` over IPv6: its prefixes moved into 2001:db8::/32, ICMP as ICMPv6
    and IPv6 tunnel endpoints; every policy names an IPv6 prefix or ICMPv6."""
    data = everything_data()
    data["daemon"]["chain_prefix"] = "NQ6"

    def six(net: str) -> str:
        addr, _, plen = net.partition("/")
        a, b, c, d = (int(x) for x in addr.split("."))
        return f"2001:db8:{a:x}:{b:x}::{c:x}:{d:x}/{96 + int(plen)}"

    for pol in data["policy"]:
        for side in ("local", "remote"):
            if side in pol:
                pol[side] = six(pol[side])
        if pol.get("protocol") == "icmp":
            pol["protocol"] = "ipv6-icmp"
        if "local" not in pol and "remote" not in pol and pol.get("protocol") != "ipv6-icmp":
            pol["remote"] = "::/0"
    for sa in data["sa"]:
        sa["tunnel_local"], sa["tunnel_remote"] = "2001:db8:ff::1", "2001:db8:ff::2"
    return data


def cfg_of(data: dict[str, Any]) -> Config:
    return parse_config(data, online_cpus=CPUS)


def toml_text(data: dict[str, Any]) -> str:
    """A tiny TOML writer for the test configs (tables and arrays of tables)."""
    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, str):
            return '"' + v + '"'
        return "[" + ", ".join(val(x) for x in v) + "]"

    out: list[str] = []
    for section in ("node", "daemon"):
        out.append(f"[{section}]")
        out += [f"{k} = {val(v)}" for k, v in data.get(section, {}).items() if v is not None]
    for section in ("policy", "sa", "connection"):
        for item in data.get(section, []):
            out.append(f"[[{section}]]")
            out += [f"{k} = {val(v)}" for k, v in item.items()]
    return "\n".join(out) + "\n"


PSK = "a pre-shared key of some length"


def write_psk(directory: Path, name: str = "peer.psk", text: str = PSK, mode: int = 0o600) -> Path:
    """A PSK file beside the config (``psk_file = name``), with the mode asked for."""
    path = directory / name
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def connection_data(directory: Path, **conn: Any) -> dict[str, Any]:
    """A gateway 192.0.2.1 whose LAN 10.1.0.0/24 reaches 10.2.0.0/24 behind 192.0.2.2 through an
    IKEv2 connection "site" (PSK in ``directory``), beside ``host_data``'s static SAs."""
    write_psk(directory)
    data = host_data()
    data["node"]["role"] = "gateway"
    data["policy"].append({"name": "lans", "action": "protect", "local": "10.1.0.0/24",
                           "remote": "10.2.0.0/24", "connection": "site"})
    data["connection"] = [{"name": "site", "local": "192.0.2.1", "remote": "192.0.2.2",
                           "psk_file": "peer.psk", **conn}]
    return data

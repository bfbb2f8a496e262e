"""Read and validate a TOML configuration, reporting every problem at once with its location.

File format: see README "Configuration". Keys are hex strings, inline (``key``) or in a file
of their own (``key_file``, relative to the config file, mode 0600 or stricter). The config
file and the key files must belong to the user that runs nfq-ipsec and must not be writable by
group or others; both are opened without following a symbolic link and checked as opened,
and so is every directory on their paths (``hardening.open_checked``). Each key may serve
one SA only. Error messages name lengths and locations, never key bytes.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tomllib
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, TypeVar

from .. import hardening
from ..core.errors import ConfigError
from ..core.replay import MAX_WINDOW, MIN_WINDOW
from ..core.sa import MIN_SPI, DfPolicy, Lifetime, Mode, SADirection, SAParams, Secret
from ..core.spd import Action, Direction, Policy, Selector
from ..core.suites import ENCRYPTION, HMACS, suite_problems
from .model import (
    DEFAULT_MARK,
    DEFAULT_QUEUE_BASE,
    DEFAULT_SOCKET,
    DEFAULT_STATE_DIR,
    DEFAULT_WATCHDOG,
    WATCHDOG_RANGE,
    Config,
    DaemonConfig,
    NodeConfig,
    QueueConfig,
)

MAX_KEY_FILE = 4096  # bytes; a key file holds one hex key (and maybe whitespace)
MAX_CONFIG_FILE = 16 << 20
PROTOCOLS = {"any": None, "icmp": 1, "tcp": 6, "udp": 17, "sctp": 132, "gre": 47}
T = TypeVar("T")


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []
        self.warnings: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")


def load_config(path: str | os.PathLike[str], online_cpus: Iterable[int] | None = None) -> Config:
    """Load and validate ``path``. Raises ConfigError listing every problem found."""
    p = Path(path)
    try:
        text = hardening.read_checked(p, MAX_CONFIG_FILE)
    except hardening.UnsafeFileError as err:
        raise ConfigError([f"{p}: refused: {err}"]) from None
    except OSError as err:
        raise ConfigError([f"{p}: cannot read: {err.strerror}"]) from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError([f"{p}: not valid TOML: {err}"]) from None
    cfg = parse_config(data, base_dir=p.parent, online_cpus=online_cpus, path=p)
    return cfg


def parse_config(
    data: dict[str, Any],
    base_dir: Path | None = None,
    online_cpus: Iterable[int] | None = None,
    path: Path | None = None,
) -> Config:
    """Validate an already-parsed TOML document."""
    probs = _Problems()
    cpus = sorted(online_cpus) if online_cpus is not None else sorted(os.sched_getaffinity(0))
    known_top = {"node", "daemon", "policy", "sa"}
    for key in data:
        if key not in known_top:
            probs.add(key, f"unknown section (known: {', '.join(sorted(known_top))})")
    node = _node(_table(data, "node", probs), probs)
    daemon = _daemon(_table(data, "daemon", probs), cpus, probs)
    raw_sas = _array(data, "sa", probs)
    raw_policies = _array(data, "policy", probs)
    inline_keys = False
    sas: list[SAParams] = []
    keys: list[tuple[str, bytes]] = []
    for i, raw in enumerate(raw_sas):
        sa, inline = _sa(raw, f"sa[{i}]", base_dir, daemon, probs, keys)
        inline_keys = inline_keys or inline
        if sa is not None:
            sas.append(sa)
    _check_sa_uniqueness(raw_sas, probs)
    _check_shared_keys(keys, probs)
    policies: list[Policy] = []
    for i, raw in enumerate(raw_policies):
        pol = _policy(raw, f"policy[{i}]", probs)
        if pol is not None:
            policies.append(pol)
    raw_sa_names = {raw["name"] for raw in raw_sas if isinstance(raw.get("name"), str)}
    _check_policies(raw_policies, policies, sas, raw_sa_names, probs)
    if inline_keys and path is not None:
        try:
            mode = path.stat().st_mode
        except OSError:
            mode = 0
        if mode & 0o077:
            probs.warnings.append(
                f"{path}: holds inline keys and is readable by group or others "
                f"(mode {stat.S_IMODE(mode):04o}); use key_file or chmod 600"
            )
    if probs.items:
        raise ConfigError(probs.items)
    return Config(node, daemon, tuple(policies), tuple(sas), path, tuple(probs.warnings))


# -- generic field readers --------------------------------------------------------------------

def _table(data: dict[str, Any], key: str, probs: _Problems) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        probs.add(key, "must be a table")
        return {}
    return value


def _array(data: dict[str, Any], key: str, probs: _Problems) -> list[dict[str, Any]]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        probs.add(key, f"must be an array of tables ([[{key}]])")
        return []
    return value


def _unknown(raw: dict[str, Any], where: str, known: set[str], probs: _Problems) -> None:
    for key in raw:
        if key not in known:
            probs.add(f"{where}.{key}", f"unknown field (known: {', '.join(sorted(known))})")


def _get(
    raw: dict[str, Any], key: str, where: str, kind: type[T] | tuple[type, ...],
    probs: _Problems, default: T | None = None,
) -> Any:
    if key not in raw:
        return default
    value = raw[key]
    if kind is int and isinstance(value, bool):
        probs.add(f"{where}.{key}", "must be an integer, not a boolean")
        return default
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        probs.add(f"{where}.{key}", f"must be {names}, got {type(value).__name__}")
        return default
    return value


def _choice(
    raw: dict[str, Any], key: str, where: str, choices: dict[str, T], probs: _Problems, default: T
) -> T:
    value = _get(raw, key, where, str, probs)
    if value is None:
        return default
    if value not in choices:
        probs.add(f"{where}.{key}", f"must be one of {', '.join(choices)}, got {value!r}")
        return default
    return choices[value]


def _int_range(
    raw: dict[str, Any], key: str, where: str, lo: int, hi: int, probs: _Problems,
    default: int | None,
) -> int | None:
    value = _get(raw, key, where, int, probs)
    if value is None:
        return default
    if not lo <= value <= hi:
        probs.add(f"{where}.{key}", f"must be {lo}..{hi}, got {value}")
        return default
    return int(value)


# -- sections ---------------------------------------------------------------------------------

def _node(raw: dict[str, Any], probs: _Problems) -> NodeConfig:
    _unknown(raw, "node", {"interface", "role", "default", "mtu", "ipv6_neighbour_discovery"}, probs)
    interface = _get(raw, "interface", "node", str, probs)
    if interface is not None and not _valid_ifname(interface):
        probs.add("node.interface", f"not a valid interface name: {interface!r}")
    role = _choice(raw, "role", "node", {"host": "host", "gateway": "gateway"}, probs, "host")
    if role == "gateway" and interface is None:
        probs.add("node.interface", "a gateway must name its unprotected interface")
    default = _choice(
        raw, "default", "node", {"discard": Action.DISCARD, "bypass": Action.BYPASS}, probs,
        Action.DISCARD,
    )
    mtu = _int_range(raw, "mtu", "node", 576, 65535, probs, 1500) or 1500
    nd = _get(raw, "ipv6_neighbour_discovery", "node", bool, probs)
    return NodeConfig(interface, role, default, mtu, bool(nd))


def _valid_ifname(name: str) -> bool:
    return 0 < len(name) < 16 and all(c.isalnum() or c in "-_.@" for c in name)


def _daemon(raw: dict[str, Any], cpus: list[int], probs: _Problems) -> DaemonConfig:
    _unknown(
        raw, "daemon",
        {"queues", "cpus", "mark", "control_socket", "state_dir", "mss_clamp", "chain_prefix",
         "log_level", "iptables", "watchdog"},
        probs,
    )
    queues_raw = _get(raw, "queues", "daemon", list, probs)
    cpus_raw = _get(raw, "cpus", "daemon", list, probs)
    if queues_raw is None:
        n = len(cpus_raw) if cpus_raw is not None else len(cpus)
        queues_raw = [DEFAULT_QUEUE_BASE + i for i in range(n)]
    if cpus_raw is None:
        cpus_raw = [cpus[i % len(cpus)] for i in range(len(queues_raw))] if cpus else []
    queues: list[QueueConfig] = []
    if not queues_raw:
        probs.add("daemon.queues", "needs at least one queue")
    for i, q in enumerate(queues_raw):
        if not isinstance(q, int) or isinstance(q, bool) or not 0 <= q <= 65535:
            probs.add(f"daemon.queues[{i}]", f"must be a queue number 0..65535, got {q!r}")
            continue
        if q in [x.num for x in queues]:
            probs.add(f"daemon.queues[{i}]", f"queue {q} listed twice")
        cpu: int | None = None
        if i < len(cpus_raw):
            c = cpus_raw[i]
            if not isinstance(c, int) or isinstance(c, bool):
                probs.add(f"daemon.cpus[{i}]", f"must be a CPU number, got {c!r}")
            elif c not in cpus:
                probs.add(f"daemon.cpus[{i}]", f"CPU {c} is not online here (online: {_fmt_cpus(cpus)})")
            else:
                cpu = c
        queues.append(QueueConfig(q, cpu))
    if len(cpus_raw) > len(queues_raw):
        probs.add("daemon.cpus", f"{len(cpus_raw)} CPUs for {len(queues_raw)} queues")
    mark = _int_range(raw, "mark", "daemon", 1, 0xFFFFFFFF, probs, DEFAULT_MARK) or DEFAULT_MARK
    if mark & (mark - 1):
        probs.add("daemon.mark", f"must be a single bit (a power of two), got 0x{mark:x}")
    prefix = _get(raw, "chain_prefix", "daemon", str, probs, "NFQIPSEC")
    if not (0 < len(prefix) <= 16 and prefix.replace("_", "").replace("-", "").isalnum()):
        probs.add("daemon.chain_prefix", "1..16 letters, digits, '-' or '_'")
    log_level = _choice(
        raw, "log_level", "daemon",
        {k: k for k in ("debug", "info", "warning", "error")}, probs, "info",
    )
    iptables = _choice(
        raw, "iptables", "daemon", {k: k for k in ("auto", "nft", "legacy")}, probs, "auto"
    )
    watchdog = _watchdog(raw, probs)
    return DaemonConfig(
        iptables=iptables,
        watchdog=watchdog,
        queues=tuple(queues),
        mark=mark,
        control_socket=_get(raw, "control_socket", "daemon", str, probs, DEFAULT_SOCKET),
        state_dir=_get(raw, "state_dir", "daemon", str, probs, DEFAULT_STATE_DIR),
        mss_clamp=_get(raw, "mss_clamp", "daemon", bool, probs, True),
        chain_prefix=prefix,
        log_level=log_level,
    )


def _watchdog(raw: dict[str, Any], probs: _Problems) -> float:
    value = _get(raw, "watchdog", "daemon", (int, float), probs)
    if value is None or isinstance(value, bool):
        if isinstance(value, bool):
            probs.add("daemon.watchdog", "must be a number of seconds, not a boolean")
        return DEFAULT_WATCHDOG
    lo, hi = WATCHDOG_RANGE
    if value != 0 and not lo <= value <= hi:
        probs.add("daemon.watchdog", f"must be 0 (off) or {lo:g}..{hi:g} seconds, got {value}")
        return DEFAULT_WATCHDOG
    return float(value)


def _fmt_cpus(cpus: list[int]) -> str:
    return ", ".join(map(str, cpus)) or "none"


_SA_FIELDS = {
    "name", "spi", "direction", "mode", "tunnel_local", "tunnel_remote", "encryption", "key",
    "key_file", "integrity", "integrity_key", "integrity_key_file", "replay_window", "esn",
    "queue", "df", "ttl", "lifetime",
}
_LIFETIME_FIELDS = {
    "soft_packets", "hard_packets", "soft_bytes", "hard_bytes", "soft_seconds", "hard_seconds",
}


def _sa(
    raw: dict[str, Any], where: str, base_dir: Path | None, daemon: DaemonConfig,
    probs: _Problems, keys: list[tuple[str, bytes]],
) -> tuple[SAParams | None, bool]:
    before = len(probs.items)
    _unknown(raw, where, _SA_FIELDS, probs)
    name = _get(raw, "name", where, str, probs)
    if not name:
        probs.add(f"{where}.name", "required")
    spi = _get(raw, "spi", where, int, probs)
    if spi is None:
        probs.add(f"{where}.spi", "required")
    elif not MIN_SPI <= spi <= 0xFFFFFFFF:
        probs.add(f"{where}.spi", f"must be {MIN_SPI}..0xffffffff (RFC 4303: 1..255 are reserved), got {spi}")
    if "direction" not in raw:
        probs.add(f"{where}.direction", "required: \"out\" or \"in\"")
    direction = _choice(raw, "direction", where, {"out": SADirection.OUT, "in": SADirection.IN},
                        probs, SADirection.OUT)
    mode = _choice(raw, "mode", where, {"transport": Mode.TRANSPORT, "tunnel": Mode.TUNNEL},
                   probs, Mode.TRANSPORT)
    tunnel_local = _address(raw, "tunnel_local", where, probs)
    tunnel_remote = _address(raw, "tunnel_remote", where, probs)
    if mode is Mode.TUNNEL:
        for fname, val in (("tunnel_local", tunnel_local), ("tunnel_remote", tunnel_remote)):
            if val is None and fname not in raw:
                probs.add(f"{where}.{fname}", "required in tunnel mode")
    elif "tunnel_local" in raw or "tunnel_remote" in raw:
        probs.add(f"{where}.mode", "tunnel_local/tunnel_remote given but mode is transport")
    encryption = _get(raw, "encryption", where, str, probs)
    integrity = _get(raw, "integrity", where, str, probs)
    key = b""
    ikey = b""
    inline = "key" in raw or "integrity_key" in raw
    if encryption is None:
        probs.add(f"{where}.encryption", f"required (one of {', '.join(ENCRYPTION)})")
    else:
        suite_probs = suite_problems(encryption, integrity)
        for msg in suite_probs:
            field = "integrity" if integrity and integrity in msg and encryption not in msg else "encryption"
            probs.add(f"{where}.{field}", msg)
        if not suite_probs:
            alg = ENCRYPTION[encryption]
            if alg.keymat_size:
                got = _key(raw, "key", where, base_dir, probs)
                if got is not None:
                    key = got
                    if len(key) != alg.keymat_size:
                        msg = _key_len_msg(encryption, alg.key_size, alg.salt_size, len(key))
                        probs.add(f"{where}.key", msg)
                    else:
                        keys.append((_key_field(raw, where, "key"), key))
            elif "key" in raw or "key_file" in raw:
                probs.add(f"{where}.key", "null encryption takes no key")
            if integrity is not None:
                mac = HMACS[integrity]
                got = _key(raw, "integrity_key", where, base_dir, probs)
                if got is not None:
                    ikey = got
                    if len(ikey) != mac.key_size:
                        probs.add(f"{where}.integrity_key",
                                  f"{integrity} needs {mac.key_size} bytes, got {len(ikey)}")
                    else:
                        keys.append((_key_field(raw, where, "integrity_key"), ikey))
            elif "integrity_key" in raw or "integrity_key_file" in raw:
                probs.add(f"{where}.integrity_key", f"{encryption} takes no integrity key")
    window = _int_range(raw, "replay_window", where, MIN_WINDOW, 4096, probs, 128) or 128
    if window > MAX_WINDOW:  # pragma: no cover - bounded above
        window = MAX_WINDOW
    esn = _get(raw, "esn", where, bool, probs, False)
    queue = _get(raw, "queue", where, int, probs)
    queue_nums = [q.num for q in daemon.queues]
    if queue is None:
        queue = queue_nums[0] if queue_nums else 0
    elif queue not in queue_nums:
        probs.add(f"{where}.queue", f"queue {queue} is not in daemon.queues ({queue_nums})")
    df = _choice(raw, "df", where, {d.value: d for d in DfPolicy}, probs, DfPolicy.COPY)
    ttl = _int_range(raw, "ttl", where, 1, 255, probs, 64) or 64
    lifetime = _lifetime(raw, where, probs)
    if len(probs.items) != before:
        return None, inline
    assert name is not None and spi is not None and encryption is not None
    return (
        SAParams(
            name=name, spi=spi, direction=direction, encryption=encryption, key=Secret(key),
            integrity=integrity, integrity_key=Secret(ikey), mode=mode,
            tunnel_local=tunnel_local, tunnel_remote=tunnel_remote, replay_window=window,
            esn=esn, lifetime=lifetime, queue=queue, df=df, ttl=ttl,
        ),
        inline,
    )


def _key_len_msg(encryption: str, key_size: int, salt: int, got: int) -> str:
    if salt:
        return f"{encryption} needs {key_size + salt} bytes ({key_size} key + {salt} salt), got {got}"
    return f"{encryption} needs {key_size} bytes, got {got}"


def _address(raw: dict[str, Any], key: str, where: str, probs: _Problems) -> int | None:
    value = _get(raw, key, where, str, probs)
    if value is None:
        return None
    try:
        return int(IPv4Address(value))
    except ValueError:
        probs.add(f"{where}.{key}", f"not an IPv4 address: {value!r}")
        return None


def _key(
    raw: dict[str, Any], key: str, where: str, base_dir: Path | None, probs: _Problems
) -> bytes | None:
    file_key = f"{key}_file"
    if key in raw and file_key in raw:
        probs.add(f"{where}.{key}", f"give {key} or {file_key}, not both")
        return None
    if key in raw:
        text = _get(raw, key, where, str, probs)
        return None if text is None else _hex(text, f"{where}.{key}", probs)
    if file_key in raw:
        name = _get(raw, file_key, where, str, probs)
        if name is None:
            return None
        path = Path(name)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            data = hardening.read_checked(path, MAX_KEY_FILE, forbid=0o077,
                                          fix="run chmod 600 on it")
        except hardening.UnsafeFileError as err:
            probs.add(f"{where}.{file_key}", str(err))
            return None
        except OSError as err:
            probs.add(f"{where}.{file_key}", f"{path}: {err.strerror}")
            return None
        except ValueError:  # a NUL byte in the name
            probs.add(f"{where}.{file_key}", "not a usable file name")
            return None
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            probs.add(f"{where}.{file_key}", f"{path}: cannot read as hex text")
            return None
        return _hex(text, f"{where}.{file_key}", probs)
    probs.add(f"{where}.{key}", f"required ({key} = \"hex\" or {file_key} = \"path\")")
    return None


def _hex(text: str, where: str, probs: _Problems) -> bytes | None:
    clean = "".join(text.split())
    if clean[:2].lower() == "0x":
        clean = clean[2:]
    try:
        return bytes.fromhex(clean)
    except ValueError:
        probs.add(where, "not a hex string")  # never echo the value: it may be a key
        return None


def _lifetime(raw: dict[str, Any], where: str, probs: _Problems) -> Lifetime:
    table = raw.get("lifetime", {})
    lw = f"{where}.lifetime"
    if not isinstance(table, dict):
        probs.add(lw, "must be a table")
        return Lifetime()
    _unknown(table, lw, _LIFETIME_FIELDS, probs)
    values: dict[str, Any] = {}
    for f in sorted(_LIFETIME_FIELDS):
        kind: type | tuple[type, ...] = (int, float) if f.endswith("seconds") else int
        v = _get(table, f, lw, kind, probs)
        if v is not None and (isinstance(v, bool) or v <= 0):
            probs.add(f"{lw}.{f}", "must be positive")
            v = None
        values[f] = v
    for what in ("packets", "bytes", "seconds"):
        soft, hard = values[f"soft_{what}"], values[f"hard_{what}"]
        if soft is not None and hard is not None and soft >= hard:
            probs.add(f"{lw}.soft_{what}", f"must be below hard_{what} ({hard})")
    return Lifetime(**values)


def _key_field(raw: dict[str, Any], where: str, key: str) -> str:
    """Where a key was given: ``sa[i].key`` or ``sa[i].key_file`` (and integrity_key...)."""
    return f"{where}.{key}_file" if f"{key}_file" in raw and key not in raw else f"{where}.{key}"


def _check_shared_keys(keys: list[tuple[str, bytes]], probs: _Problems) -> None:
    """Refuse a key given twice (two SAs, either direction, or one SA's two keys): under a
    shared key both users draw nonces/IVs from the same sequence numbers. Keys are compared
    by a hash, never shown."""
    first: dict[bytes, str] = {}
    for where, key in keys:
        digest = hashlib.sha256(b"nfq-ipsec config key compare\0" + key).digest()
        if digest in first:
            probs.add(where, f"the same key as {first[digest]}; every SA needs keys of its own "
                             "(two SAs under one key repeat each other's nonces); make another "
                             "with `nfq-ipsec genkey`")
        else:
            first[digest] = where


def _check_sa_uniqueness(raw_sas: list[dict[str, Any]], probs: _Problems) -> None:
    names: dict[str, int] = {}
    spis: dict[tuple[str, int], int] = {}
    for i, raw in enumerate(raw_sas):
        name = raw.get("name")
        if isinstance(name, str):
            if name in names:
                probs.add(f"sa[{i}].name", f"duplicate name {name!r} (also sa[{names[name]}])")
            names.setdefault(name, i)
        spi = raw.get("spi")
        direction = raw.get("direction")
        if isinstance(spi, int) and isinstance(direction, str):
            k = (direction, spi)
            if k in spis:
                probs.add(f"sa[{i}].spi", f"duplicate {direction}bound SPI 0x{spi:08x} (also sa[{spis[k]}])")
            spis.setdefault(k, i)


_POLICY_FIELDS = {
    "name", "action", "direction", "local", "remote", "protocol", "local_ports", "remote_ports",
    "icmp_type", "icmp_code", "sa",
}


def _policy(raw: dict[str, Any], where: str, probs: _Problems) -> Policy | None:
    before = len(probs.items)
    _unknown(raw, where, _POLICY_FIELDS, probs)
    name = _get(raw, "name", where, str, probs)
    if not name:
        probs.add(f"{where}.name", "required")
    if "action" not in raw:
        probs.add(f"{where}.action", "required: protect, bypass or discard")
    action = _choice(raw, "action", where, {a.value: a for a in Action}, probs, Action.DISCARD)
    direction = _choice(raw, "direction", where, {d.value: d for d in Direction}, probs, Direction.BOTH)
    local = _network(raw, "local", where, probs)
    remote = _network(raw, "remote", where, probs)
    proto = _protocol(raw, where, probs)
    lports = _ports(raw, "local_ports", where, proto, probs)
    rports = _ports(raw, "remote_ports", where, proto, probs)
    icmp_type = _int_range(raw, "icmp_type", where, 0, 255, probs, None)
    icmp_code = _int_range(raw, "icmp_code", where, 0, 255, probs, None)
    if (icmp_type is not None or icmp_code is not None) and proto != 1:
        probs.add(f"{where}.icmp_type", "icmp_type/icmp_code need protocol = \"icmp\"")
    sa_names = _get(raw, "sa", where, list, probs, [])
    if sa_names and not all(isinstance(n, str) for n in sa_names):
        probs.add(f"{where}.sa", "must be a list of SA names")
        sa_names = []
    if action is Action.PROTECT and not sa_names:
        probs.add(f"{where}.sa", "a protect policy needs at least one SA")
    if action is not Action.PROTECT and sa_names:
        probs.add(f"{where}.sa", f"a {action.value} policy takes no SAs")
    if len(probs.items) != before:
        return None
    assert name is not None
    sel = Selector(local, remote, proto, lports, rports, icmp_type, icmp_code)
    return Policy(name, sel, action, direction, tuple(sa_names))


def _network(raw: dict[str, Any], key: str, where: str, probs: _Problems) -> IPv4Network:
    value = _get(raw, key, where, str, probs, "0.0.0.0/0")
    try:
        return IPv4Network(value if value != "any" else "0.0.0.0/0", strict=True)
    except ValueError as err:
        probs.add(f"{where}.{key}", f"not an IPv4 prefix: {err}")
        return IPv4Network("0.0.0.0/0")


def _protocol(raw: dict[str, Any], where: str, probs: _Problems) -> int | None:
    value = raw.get("protocol", "any")
    if isinstance(value, str):
        if value not in PROTOCOLS:
            names = ", ".join(PROTOCOLS)
            probs.add(f"{where}.protocol", f"unknown protocol {value!r} (names: {names} or 0..255)")
            return None
        return PROTOCOLS[value]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255:
        if value == 50:
            probs.add(f"{where}.protocol", "ESP itself can't be a selector of an ESP policy")
        return value
    probs.add(f"{where}.protocol", f"must be a name or 0..255, got {value!r}")
    return None


def _ports(
    raw: dict[str, Any], key: str, where: str, proto: int | None, probs: _Problems
) -> tuple[int, int] | None:
    if key not in raw:
        return None
    value = raw[key]
    rng: tuple[int, int] | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        rng = (value, value)
    elif isinstance(value, str) and "-" in value:
        lo, _, hi = value.partition("-")
        if lo.strip().isdigit() and hi.strip().isdigit():
            rng = (int(lo), int(hi))
    elif isinstance(value, str) and value.strip().isdigit():
        rng = (int(value), int(value))
    if rng is None or not 0 <= rng[0] <= rng[1] <= 65535:
        probs.add(f"{where}.{key}", f"must be a port or \"lo-hi\" within 0..65535, got {value!r}")
        return None
    if proto not in (6, 17, 132):
        probs.add(f"{where}.{key}", "ports need protocol tcp, udp or sctp")
        return None
    return rng


def _check_policies(
    raw_policies: list[dict[str, Any]], policies: list[Policy], sas: list[SAParams],
    defined: set[Any], probs: _Problems,
) -> None:
    """Cross-checks. SAs that are defined but invalid were reported already: skip them here."""
    by_name = {sa.name: sa for sa in sas}
    raw_sa_names = set()
    seen_names: dict[str, int] = {}
    served_by: dict[str, str] = {}
    for i, raw in enumerate(raw_policies):
        name = raw.get("name")
        if isinstance(name, str):
            if name in seen_names:
                probs.add(f"policy[{i}].name", f"duplicate name {name!r} (also policy[{seen_names[name]}])")
            seen_names.setdefault(name, i)
        for n in raw.get("sa", []) if isinstance(raw.get("sa"), list) else []:
            if isinstance(n, str):  # anything else was reported by _policy
                raw_sa_names.add(n)
    pos = {p["name"]: i for i, p in enumerate(raw_policies) if isinstance(p.get("name"), str)}
    for pol in policies:
        where = f"policy[{pos[pol.name]}]"
        out_queues: list[int] = []
        for n in pol.sa_names:
            sa = by_name.get(n)
            if sa is None:
                if n not in defined:
                    probs.add(f"{where}.sa", f"unknown SA {n!r}")
                continue
            if n in served_by and served_by[n] != pol.name:
                probs.add(
                    f"{where}.sa",
                    f"SA {n!r} already serves policy {served_by[n]!r}; an SA serves one policy",
                )
            served_by[n] = pol.name
            if not pol.direction.covers(sa.direction is SADirection.OUT):
                probs.add(
                    f"{where}.sa",
                    f"SA {n!r} is {sa.direction.value}bound but the policy is {pol.direction.value}",
                )
            if sa.direction is SADirection.OUT:
                if sa.queue in out_queues:
                    probs.add(f"{where}.sa", f"two outbound SAs on queue {sa.queue}; use one per queue")
                out_queues.append(sa.queue)
        if pol.action is Action.PROTECT and all(n in by_name for n in pol.sa_names):
            dirs = {by_name[n].direction for n in pol.sa_names if n in by_name}
            if pol.direction.covers(True) and SADirection.OUT not in dirs:
                probs.add(f"{where}.sa", "protects outbound traffic but lists no outbound SA")
            if pol.direction.covers(False) and SADirection.IN not in dirs:
                probs.add(f"{where}.sa", "protects inbound traffic but lists no inbound SA")
    for sa in sas:
        if sa.name not in raw_sa_names:
            probs.warnings.append(f"sa {sa.name!r}: no policy uses it; it will never carry traffic")
    _check_shadowing(policies, probs)


def _check_shadowing(policies: list[Policy], probs: _Problems) -> None:
    """A policy that an earlier one covers entirely can never match: almost surely a mistake."""
    for j, later in enumerate(policies):
        for i in range(j):
            earlier = policies[i]
            if _covers(earlier, later):
                probs.add(
                    f"policy[{j}]",
                    f"unreachable: policy[{i}] ({earlier.name!r}) matches everything it would",
                )
                break


def _covers(a: Policy, b: Policy) -> bool:
    if not (a.direction is Direction.BOTH or a.direction is b.direction):
        return False
    sa, sb = a.selector, b.selector
    if not (sb.local.subnet_of(sa.local) and sb.remote.subnet_of(sa.remote)):
        return False
    if sa.protocol is not None and sa.protocol != sb.protocol:
        return False
    for ra, rb in ((sa.local_ports, sb.local_ports), (sa.remote_ports, sb.remote_ports)):
        if ra is not None and (rb is None or not (ra[0] <= rb[0] and rb[1] <= ra[1])):
            return False
    for fa, fb in ((sa.icmp_type, sb.icmp_type), (sa.icmp_code, sb.icmp_code)):
        if fa is not None and fa != fb:
            return False
    return True



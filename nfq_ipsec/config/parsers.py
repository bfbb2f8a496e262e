"""The fields that need more than a type, bounds or choices: the parsers the field tables
(``fields.py``) name, and the checks they run on a value the table already accepted.

Keys are hex strings, inline (``key``) or in a file of their own (``key_file``, relative to the
config file, mode 0600 or stricter, owned by the user that runs nfq-ipsec, opened without
following a symbolic link, every directory on its path checked: ``hardening.open_checked``).
Error messages name lengths and locations, never key bytes.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

from .. import hardening
from ..core.ipv6 import V6
from ..core.sa import Lifetime, Secret
from ..core.spd import Network
from ..engines.base import ENGINE_NAMES
from .reading import Problems, get
from .schema import Field, Section

MAX_KEY_FILE = 4096  # bytes; a key file holds one hex key (and maybe whitespace)
PROTOCOLS = {"any": None, "icmp": 1, "ipv6-icmp": 58, "tcp": 6, "udp": 17, "sctp": 132, "gre": 47}
ICMP_BY_FAMILY = {4: 1, 6: 58}  # the ICMP of each address family: "icmp" and "ipv6-icmp"
MIN_PSK = 16  # bytes: a shorter pre-shared key falls to an offline guess of the AUTH value


# -- checks of an accepted value: a problem, or None ---------------------------------------------

def interface_problem(name: str) -> str | None:
    if 0 < len(name) < 16 and all(c.isalnum() or c in "-_.@" for c in name):
        return None
    return f"not a valid interface name: {name!r}"


def listen_address(text: str) -> tuple[str, int]:
    """``ADDRESS:PORT`` (an IPv6 address in brackets) as (address, port); ValueError if it is
    not one. A literal address only: a host name would make the daemon's start wait on DNS.
    Port 0 (the kernel chooses) is one here; the configuration refuses it."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"not ADDRESS:PORT with a port 0..65535: {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ip_address(host).version != 6:
            raise ValueError(f"only an IPv6 address goes in brackets: {text!r}")
    elif ip_address(host).version != 4:  # ValueError for a name; an IPv6 address needs brackets
        raise ValueError(f"an IPv6 address goes in brackets ([::1]:9477): {text!r}")
    return host, int(port)


def listen_address_problem(text: str) -> str | None:
    try:
        if listen_address(text)[1] == 0:
            raise ValueError("port 0")
    except ValueError:
        return (f"must be ADDRESS:PORT, an IPv4 address or an IPv6 one in brackets and a port "
                f"1..65535 (127.0.0.1:9477, [::1]:9477), got {text!r}")
    return None


def absolute_path_problem(text: str) -> str | None:
    return None if text.startswith("/") else f"must be an absolute path, got {text!r}"


def mark_problem(mark: int) -> str | None:
    return f"must be a single bit (a power of two), got 0x{mark:x}" if mark & (mark - 1) else None


def chain_prefix_problem(prefix: str) -> str | None:
    if 0 < len(prefix) <= 16 and prefix.replace("_", "").replace("-", "").isalnum():
        return None
    return "1..16 letters, digits, '-' or '_'"


# -- [daemon] ---------------------------------------------------------------------------------------

def queues(
    raw: dict[str, Any], cpus: list[int], base: int, probs: Problems, where: str = "daemon",
    default_pinned: bool = True,
) -> list[tuple[int, int | None]]:
    """``queues`` and ``cpus`` together: (queue number, CPU or None) pairs. Without ``queues``,
    one queue per CPU listed (or online), numbered from ``base``; without ``cpus``, queue i
    runs on online CPU i (``default_pinned``; else not pinned)."""
    queues_raw = get(raw, "queues", where, list, probs)
    cpus_raw = get(raw, "cpus", where, list, probs)
    if queues_raw is None:
        n = len(cpus_raw) if cpus_raw is not None else len(cpus)
        queues_raw = [base + i for i in range(n)]
    if cpus_raw is None:
        cpus_raw = ([cpus[i % len(cpus)] for i in range(len(queues_raw))]
                    if cpus and default_pinned else [])
    pairs: list[tuple[int, int | None]] = []
    if not queues_raw:
        probs.add(f"{where}.queues", "needs at least one queue")
    for i, q in enumerate(queues_raw):
        if not isinstance(q, int) or isinstance(q, bool) or not 0 <= q <= 65535:
            probs.add(f"{where}.queues[{i}]", f"must be a queue number 0..65535, got {q!r}")
            continue
        if q in [num for num, _ in pairs]:
            probs.add(f"{where}.queues[{i}]", f"queue {q} listed twice")
        cpu: int | None = None
        if i < len(cpus_raw):
            c = cpus_raw[i]
            if not isinstance(c, int) or isinstance(c, bool):
                probs.add(f"{where}.cpus[{i}]", f"must be a CPU number, got {c!r}")
            elif c not in cpus:
                probs.add(f"{where}.cpus[{i}]", f"CPU {c} is not online here (online: {_fmt_cpus(cpus)})")
            else:
                cpu = c
        pairs.append((q, cpu))
    if len(cpus_raw) > len(queues_raw):
        probs.add(f"{where}.cpus", f"{len(cpus_raw)} CPUs for {len(queues_raw)} queues")
    return pairs


_COMPARTMENT_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")
CGROUP2_ROOT = "/sys/fs/cgroup"  # where cgroup v2 is mounted (a hybrid host: its "unified")


def compartment_name_problem(name: str) -> str | None:
    if name == "default":
        return "'default' is the implicit compartment's name (daemon.queues); choose another"
    if not _COMPARTMENT_NAME.fullmatch(name):
        return f"must be 1..32 letters, digits, '-' or '_', got {name!r}"
    return None


def cgroup2_mount(root: str = CGROUP2_ROOT) -> str | None:
    """Where cgroup v2 is mounted: ``root`` itself (unified), its ``unified`` (hybrid), or
    None (not mounted: ``-m cgroup --path`` can't match)."""
    for path in (root, os.path.join(root, "unified")):
        if os.path.isfile(os.path.join(path, "cgroup.procs")) and os.path.isfile(
                os.path.join(path, "cgroup.max.depth")):
            return path
    return None


def cgroup_problem(path: str) -> str | None:
    """A cgroup v2 path as ``-m cgroup --path`` takes it: absolute, without ``.`` or ``..``."""
    parts = path.split("/")
    if not path.startswith("/") or any(p in (".", "..") for p in parts[1:]) or len(path) > 4095:
        return f"not an absolute cgroup path without '.' or '..': {path!r}"
    if any(c.isspace() or c in "\\\"'" or not c.isprintable() for c in path):
        return f"a cgroup path of printable characters without spaces or quotes, got {path!r}"
    return None


def cgroup_missing(path: str) -> tuple[str | None, str | None]:
    """(problem, warning) about a cgroup that may not exist here: the kernel looks the path up
    when the rule is installed and refuses a rule whose group does not exist. Where cgroup v2
    is not to be seen (not mounted, or a network namespace's own /sys), only a warning."""
    mount = cgroup2_mount()
    if mount is None:
        return None, (f"cgroup v2 is not mounted where this can see it ({CGROUP2_ROOT}), so "
                      f"whether {path} exists is not checked; the rules will not install if "
                      "it does not")
    if not os.path.isdir(mount + path.rstrip("/")):
        return f"no such cgroup v2 group here: {path} (make it before the daemon starts)", None
    return None, None


def owner_id(raw: dict[str, Any], key: str, where: str, probs: Problems) -> int | None:
    """``uid`` or ``gid``: a number 0..2**32-2, or a user (group) name that exists here, as
    its number (the rule matches the number)."""
    value = get(raw, key, where, (int, str), probs)
    if value is None:
        return None
    if isinstance(value, bool):
        probs.add(f"{where}.{key}", "must be a number or a name, not a boolean")
        return None
    if isinstance(value, int):
        if not 0 <= value <= 0xFFFFFFFE:
            probs.add(f"{where}.{key}", f"must be 0..4294967294, got {value}")
            return None
        return value
    try:
        return pwd.getpwnam(value).pw_uid if key == "uid" else grp.getgrnam(value).gr_gid
    except KeyError:
        probs.add(f"{where}.{key}", f"no {'user' if key == 'uid' else 'group'} {value!r} here")
        return None


def _fmt_cpus(cpus: list[int]) -> str:
    return ", ".join(map(str, cpus)) or "none"


def seconds_or_off(field: Field, raw: dict[str, Any], where: str, probs: Problems) -> float:
    """Seconds within the field's bounds, or 0 (off)."""
    value = get(raw, field.name, where, (int, float), probs)
    if value is None or isinstance(value, bool):
        if isinstance(value, bool):
            probs.add(f"{where}.{field.name}", "must be a number of seconds, not a boolean")
        return float(field.default)
    assert field.bounds is not None
    lo, hi = field.bounds
    if value != 0 and not lo <= value <= hi:
        probs.add(f"{where}.{field.name}", f"must be {field.allowed_text}, got {value}")
        return float(field.default)
    return float(value)


# -- [crypto] ---------------------------------------------------------------------------------------

def engine_names(field: Field, raw: dict[str, Any], where: str, probs: Problems) -> tuple[str, ...]:
    """A list of engine names, each known and given once."""
    names = get(raw, field.name, where, list, probs, [])
    if not all(isinstance(n, str) for n in names):
        probs.add(f"{where}.{field.name}", "must be a list of engine names")
        return ()
    for n in names:
        if n not in ENGINE_NAMES:
            probs.add(f"{where}.{field.name}", f"unknown engine {n!r} (known: {', '.join(ENGINE_NAMES)})")
    if len(set(names)) != len(names):
        probs.add(f"{where}.{field.name}", "names an engine twice")
    return tuple(names)


VERSION_NAMES = ("core", "independent", "core-source")  # daemon.versions: nfq_ipsec.versions
SAMPLE_RANGE = (2, 1_000_000)


def versions(raw: dict[str, Any], probs: Problems) -> tuple[str, ...]:
    """``daemon.versions``: the ESP implementations each worker runs, ``core`` first (the
    worker's shell, its state files and GSO are the core's; the others run beside it)."""
    value = get(raw, "versions", "daemon", list, probs)
    if value is None:
        return ("core",)
    names: list[str] = []
    for i, name in enumerate(value):
        if name not in VERSION_NAMES:
            probs.add(f"daemon.versions[{i}]", f"must be one of {', '.join(VERSION_NAMES)}, "
                      f"got {name!r}")
        elif name in names:
            probs.add(f"daemon.versions[{i}]", f"{name} listed twice")
        else:
            names.append(name)
    if value and names and names[0] != "core":
        probs.add("daemon.versions", "must start with core: the other versions run beside it "
                  "(the independent one alone as the data plane is not built)")
    if not value:
        probs.add("daemon.versions", "needs at least one version")
    return tuple(names) or ("core",)


def compare(raw: dict[str, Any], count: int, gso: bool, probs: Problems) -> str:
    """``daemon.compare`` as given (``off``, ``all``, ``sample:N``, ``majority``), checked
    against the number of versions; ``off`` where it is refused."""
    value = get(raw, "compare", "daemon", str, probs)
    if value is None:
        value = "off"
    if value == "majority" and count < 3:
        probs.add("daemon.compare", "majority needs three versions that can outvote one (core, "
                  f"independent, core-source), got {count}: use all or sample:N")
        return "off"
    if value.startswith("sample:"):
        n = value.removeprefix("sample:")
        if not n.isdigit() or not SAMPLE_RANGE[0] <= int(n) <= SAMPLE_RANGE[1]:
            probs.add("daemon.compare", f"sample:N needs N in {SAMPLE_RANGE[0]}..{SAMPLE_RANGE[1]}"
                      f", got {value!r}")
            return "off"
        value = f"sample:{int(n)}"
    elif value not in ("off", "all", "majority"):
        probs.add("daemon.compare", f"must be off, all, sample:N or majority, got {value!r}")
        return "off"
    if value == "off" and count > 1:
        probs.add("daemon.versions", "more than one version needs daemon.compare (all, "
                  "sample:N or majority): with off one version runs")
    elif value != "off" and count < 2:
        probs.add("daemon.compare", f"{value} needs at least two daemon.versions")
    elif value != "off" and gso:
        probs.add("daemon.compare", "can't be used with daemon.gso: only the core segments "
                  "superpackets")
    return str(value)


# -- [[sa]] -----------------------------------------------------------------------------------------

def sa_queue(raw: dict[str, Any], where: str, queue_nums: list[int], probs: Problems) -> int:
    """The queue that owns the SA: one of ``daemon.queues``, by default the first."""
    queue = get(raw, "queue", where, int, probs)
    if queue is None:
        return queue_nums[0] if queue_nums else 0
    if queue not in queue_nums:
        probs.add(f"{where}.queue", f"queue {queue} is not in daemon.queues ({queue_nums})")
    return int(queue)


def address(raw: dict[str, Any], key: str, where: str, probs: Problems) -> int | None:
    """An IPv4 or IPv6 address as the core's int (IPv6 with the marker bit ``V6``)."""
    value = get(raw, key, where, str, probs)
    if value is None:
        return None
    try:
        addr = ip_address(value)
    except ValueError:
        probs.add(f"{where}.{key}", f"not an IPv4 or IPv6 address: {value!r}")
        return None
    return int(addr) | (V6 if addr.version == 6 else 0)


def key(
    raw: dict[str, Any], key: str, where: str, base_dir: Path | None, probs: Problems
) -> bytes | None:
    """``key`` (hex inline) or ``key_file`` (a file of hex); the same for ``integrity_key``."""
    file_key = f"{key}_file"
    if key in raw and file_key in raw:
        probs.add(f"{where}.{key}", f"give {key} or {file_key}, not both")
        return None
    if key in raw:
        text = get(raw, key, where, str, probs)
        return None if text is None else hex_bytes(text, f"{where}.{key}", probs)
    if file_key in raw:
        name = get(raw, file_key, where, str, probs)
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
        return hex_bytes(text, f"{where}.{file_key}", probs)
    probs.add(f"{where}.{key}", f"required ({key} = \"hex\" or {file_key} = \"path\")")
    return None


# -- [[connection]] ------------------------------------------------------------------------------

def psk(raw: dict[str, Any], where: str, base_dir: Path | None, probs: Problems) -> Secret | None:
    """The key of ``psk_file``, read like a key file: its text, a trailing newline not part of
    it, or ``0x`` and hex for bytes. Nothing about its content is ever quoted."""
    if "psk" in raw:
        probs.add(f"{where}.psk", "a pre-shared key is never written in the configuration; put "
                  "it in a file of its own (mode 0600) and name it with psk_file")
    name = get(raw, "psk_file", where, str, probs)
    if name is None:
        if "psk_file" not in raw:
            probs.add(f"{where}.psk_file", "required (auth = \"psk\")")
        return None
    path = Path(name)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        data = hardening.read_checked(path, MAX_KEY_FILE, forbid=0o077, fix="run chmod 600 on it")
    except hardening.UnsafeFileError as err:
        probs.add(f"{where}.psk_file", str(err))
        return None
    except OSError as err:
        probs.add(f"{where}.psk_file", f"{path}: {err.strerror}")
        return None
    except ValueError:  # a NUL byte in the name
        probs.add(f"{where}.psk_file", "not a usable file name")
        return None
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if data[:2].lower() == b"0x":
        try:
            key = bytes.fromhex(data[2:].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            probs.add(f"{where}.psk_file", f"{path}: starts with 0x but is not hex")
            return None
    else:
        key = data
    if len(key) < MIN_PSK:
        probs.add(f"{where}.psk_file", f"{path}: the key is {len(key)} bytes; at least {MIN_PSK} "
                  "(a short pre-shared key can be guessed offline from one exchange)")
        return None
    return Secret(key)


def hex_bytes(text: str, where: str, probs: Problems) -> bytes | None:
    clean = "".join(text.split())
    if clean[:2].lower() == "0x":
        clean = clean[2:]
    try:
        return bytes.fromhex(clean)
    except ValueError:
        probs.add(where, "not a hex string")  # never echo the value: it may be a key
        return None


def key_len_msg(encryption: str, key_size: int, salt: int, got: int) -> str:
    if salt:
        return f"{encryption} needs {key_size + salt} bytes ({key_size} key + {salt} salt), got {got}"
    return f"{encryption} needs {key_size} bytes, got {got}"


def key_field(raw: dict[str, Any], where: str, key: str) -> str:
    """Where a key was given: ``sa[i].key`` or ``sa[i].key_file`` (and integrity_key...)."""
    return f"{where}.{key}_file" if f"{key}_file" in raw and key not in raw else f"{where}.{key}"


def lifetime(raw: dict[str, Any], where: str, section: Section, probs: Problems) -> Lifetime:
    """The ``[sa.lifetime]`` table: positive limits (the fields of ``section``), each soft
    limit below its hard one."""
    table = raw.get("lifetime", {})
    lw = f"{where}.lifetime"
    if not isinstance(table, dict):
        probs.add(lw, "must be a table")
        return Lifetime()
    section.check_unknown(table, lw, probs)
    values: dict[str, Any] = {}
    for field in sorted(section.fields, key=lambda f: f.name):
        v = get(table, field.name, lw, field.kind, probs)
        if v is not None and (isinstance(v, bool) or v <= 0):
            probs.add(f"{lw}.{field.name}", "must be positive")
            v = None
        values[field.name] = v
    for what in ("packets", "bytes", "seconds"):
        soft, hard = values[f"soft_{what}"], values[f"hard_{what}"]
        if soft is not None and hard is not None and soft >= hard:
            probs.add(f"{lw}.soft_{what}", f"must be below hard_{what} ({hard})")
    return Lifetime(**values)


# -- [[policy]] -------------------------------------------------------------------------------------

def network(raw: dict[str, Any], key: str, where: str, probs: Problems) -> Network | None:
    """An IPv4 or IPv6 prefix; None for "any" (or absent), which takes the policy's family."""
    value = get(raw, key, where, str, probs, "any")
    if value == "any":
        return None
    try:
        return ip_network(value, strict=True)
    except ValueError as err:
        probs.add(f"{where}.{key}", f"not an IPv4 or IPv6 prefix: {err}")
        return None


def protocol(raw: dict[str, Any], where: str, probs: Problems) -> int | None:
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


def ports(
    raw: dict[str, Any], key: str, where: str, proto: int | None, probs: Problems
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


def sa_names(raw: dict[str, Any], where: str, probs: Problems) -> list[str]:
    """A policy's ``sa``: a list of SA names (which exist is a cross-check)."""
    names = get(raw, "sa", where, list, probs, [])
    if names and not all(isinstance(n, str) for n in names):
        probs.add(f"{where}.sa", "must be a list of SA names")
        return []
    return list(names)

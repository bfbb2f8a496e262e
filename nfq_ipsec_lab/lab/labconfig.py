"""Configuration for the two IPsec peers of a lab: both TOML files and fresh random keys.

Nothing here knows about namespaces: give it the two peers (:class:`PeerSpec`: name,
unprotected interface, role, address on the wire, protected prefix) and it writes, into a
private directory (mode 0700):

    <dir>/<peer>/nfq-ipsec.toml     the peer's configuration
    <dir>/<peer>/keys/<sa>.key      one key file per SA (hex, mode 0600), fresh from os.urandom
    <dir>/<peer>/state/             the daemon's state_dir; control socket <dir>/<peer>/ctl.sock

Both peers get the same SAs with directions swapped: one SA per queue and direction (RFC
9611), SPIs 0x1000+i (peer a to peer b) and 0x2000+i (b to a), SA i owned by queue i. The SPD
of each peer, first match wins, default discard (RFC 4301):

    1. bypass   TCP to/from port ``bypass_port`` on peer b's side   (cleartext on purpose)
    2. discard  UDP to/from port ``discard_port`` on peer b's side  (never passes)
    3. protect  everything between the two protected prefixes       (transport or tunnel)

Hosts protect their own address (/32, transport mode); gateways protect their LAN prefix
(tunnel mode between their wire addresses, which may be of the other family: a mixed tunnel).
With ``encapsulation = "udp"`` every SA carries its ESP in UDP (RFC 3948, port 4500 both ways,
no NAT-keepalives: the lab has no NAT to keep open). The returned :class:`LabConfig` keeps the SAs with
their keys (:class:`LabSA`, keys hidden from repr) so a capture can be checked with tshark.

Keys are fresh from the system's random source, or, given a ``seed`` (the two-VM lab, where
two machines must agree on them without one sending keys to the other), derived from it with
HKDF-Expand (RFC 5869, SHA-256; the seed is the pseudorandom key) per SA, algorithm and a
context (the lab's topology), so the same seed yields the same keys on every machine and a new
seed yields new ones. :func:`write_peer` writes one peer's configuration and keys wherever it
is to live (``/etc/nfq-ipsec`` on a VM).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

from nfq_ipsec.core.suites import ENCRYPTION, HMACS

DEFAULT_INTEGRITY = "hmac-sha256-128"  # for aes-cbc-* (RFC 8221 pairs it with HMAC-SHA2)
QUEUE_BASE = 100
SPI_BASE = {("a", "b"): 0x1000, ("b", "a"): 0x2000}
BYPASS_PORT = 2222
DISCARD_PORT = 9999


@dataclass(frozen=True)
class PeerSpec:
    """One IPsec peer as the configuration sees it."""

    name: str  # "a" or "b"
    interface: str  # its unprotected (IPsec-facing) interface
    address: IPv4Address | IPv6Address  # on the wire: the tunnel endpoint, or the host itself
    protected: IPv4Network | IPv6Network  # what it protects: its own /32 or /128, or its LAN
    role: str = "host"  # "host" or "gateway"


@dataclass(frozen=True)
class LabSA:
    """One SA as both peers and the capture check see it. Keys never show in repr."""

    name: str
    spi: int
    sender: str  # peer name that sends with it ("a" or "b")
    receiver: str
    src: IPv4Address | IPv6Address  # outer source on the wire
    dst: IPv4Address | IPv6Address
    encryption: str
    integrity: str | None
    key: bytes = field(repr=False)
    integrity_key: bytes = field(repr=False, default=b"")
    queue: int = QUEUE_BASE
    mode: str = "transport"
    encapsulation: str = "none"  # "udp": ESP in UDP (RFC 3948)


@dataclass(frozen=True)
class PeerConfig:
    spec: PeerSpec
    path: Path  # the TOML file
    control_socket: Path
    state_dir: Path


@dataclass(frozen=True)
class LabConfig:
    directory: Path
    peers: dict[str, PeerConfig]
    sas: tuple[LabSA, ...]
    encryption: str
    integrity: str | None
    mode: str
    queues: tuple[int, ...]
    bypass_port: int = BYPASS_PORT
    discard_port: int = DISCARD_PORT
    encapsulation: str = "none"
    gso: bool = False  # daemon.gso on both peers: outbound TCP superpackets whole
    compare: str = "off"  # daemon.compare on both peers; not off: both ESP versions run

    def peer(self, name: str) -> PeerConfig:
        return self.peers[name]


def parse_encryption(text: str) -> tuple[str, str | None]:
    """``aes-gcm-128`` -> (aes-gcm-128, None); ``aes-cbc-128`` -> (aes-cbc-128, hmac-sha256-128);
    ``aes-cbc-256+hmac-sha512-256`` -> as written. Raises ValueError for what we can't run."""
    enc, _, integrity = text.partition("+")
    alg = ENCRYPTION.get(enc)
    if alg is None or enc == "null":
        names = ", ".join(n for n in ENCRYPTION if n != "null")
        raise ValueError(f"unknown encryption {enc!r} for the lab (known: {names})")
    if alg.aead:
        if integrity:
            raise ValueError(f"{enc} is an AEAD and takes no separate integrity algorithm")
        return enc, None
    integrity = integrity or DEFAULT_INTEGRITY
    if integrity not in HMACS:
        raise ValueError(f"unknown integrity {integrity!r} (known: {', '.join(HMACS)})")
    return enc, integrity


SEED_MIN = 16  # bytes


def derive_key(seed: bytes, label: str, size: int) -> bytes:
    """HKDF-Expand(PRK=seed, info=label, L=size) with SHA-256 (RFC 5869 section 2.3)."""
    if len(seed) < SEED_MIN:
        raise ValueError(f"a lab seed needs at least {SEED_MIN} random bytes, got {len(seed)}")
    out, block, counter = b"", b"", 0
    info = b"nfq-ipsec lab key v1|" + label.encode()
    while len(out) < size:
        counter += 1
        block = hmac.new(seed, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
    return out[:size]


def make_sas(
    a: PeerSpec, b: PeerSpec, encryption: str, integrity: str | None, queues: Sequence[int],
    mode: str, seed: bytes | None = None, context: str = "", encapsulation: str = "none",
) -> tuple[LabSA, ...]:
    """Per queue one a->b and one b->a SA, each with its own key(s): random, or derived from
    ``seed`` for this SA, algorithm, mode and ``context``."""
    alg = ENCRYPTION[encryption]

    def key(name: str, what: str, algorithm: str, size: int) -> bytes:
        if seed is None:
            return secrets.token_bytes(size)
        return derive_key(seed, f"{context}|{mode}|{name}|{what}|{algorithm}", size)

    sas = []
    for sender, receiver in ((a, b), (b, a)):
        base = SPI_BASE[(sender.name, receiver.name)]
        for i, queue in enumerate(queues):
            sas.append(LabSA(
                name=f"{sender.name}-to-{receiver.name}-{i}", spi=base + i, sender=sender.name,
                receiver=receiver.name, src=sender.address, dst=receiver.address,
                encryption=encryption, integrity=integrity,
                key=key(f"{sender.name}-to-{receiver.name}-{i}", "encryption", encryption,
                        alg.keymat_size),
                integrity_key=(key(f"{sender.name}-to-{receiver.name}-{i}", "integrity", integrity,
                                   HMACS[integrity].key_size) if integrity else b""),
                queue=queue, mode=mode, encapsulation=encapsulation,
            ))
    return tuple(sas)


def plan(
    a: PeerSpec, b: PeerSpec, encryption: str = "aes-gcm-128", queues: int = 2,
    mode: str | None = None, bypass_port: int = BYPASS_PORT, discard_port: int = DISCARD_PORT,
    seed: bytes | None = None, context: str = "", directory: Path = Path("."),
    encapsulation: str = "none", gso: bool = False, compare: str = "off",
) -> LabConfig:
    """The lab's SAs and settings for peers ``a`` and ``b``, nothing written yet (``peers`` is
    empty: :func:`write_peer` fills it). Raises ValueError for what the lab can't run."""
    if {a.name, b.name} != {"a", "b"}:
        raise ValueError("the two peers are named 'a' and 'b'")
    if a.name != "a":
        a, b = b, a
    if queues < 1:
        raise ValueError("a lab needs at least one queue")
    enc, integrity = parse_encryption(encryption)
    if mode is None:
        mode = "tunnel" if "gateway" in (a.role, b.role) else "transport"
    if mode not in ("transport", "tunnel"):
        raise ValueError(f"mode must be transport or tunnel, not {mode!r}")
    if mode == "transport" and any(p.protected.prefixlen != p.protected.max_prefixlen
                                   for p in (a, b)):
        raise ValueError("transport mode protects the peers' own addresses (/32, /128) only")
    if encapsulation not in ("none", "udp"):
        raise ValueError(f"encapsulation must be none or udp, not {encapsulation!r}")
    if encapsulation == "udp" and 6 in (a.address.version, b.address.version):
        raise ValueError("ESP in UDP is IPv4 only: the peers' wire addresses are IPv6")
    qnums = tuple(QUEUE_BASE + i for i in range(queues))
    sas = make_sas(a, b, enc, integrity, qnums, mode, seed, context, encapsulation)
    return LabConfig(directory, {}, sas, enc, integrity, mode, qnums, bypass_port, discard_port,
                     encapsulation, gso, compare)


def generate(
    directory: Path, a: PeerSpec, b: PeerSpec, encryption: str = "aes-gcm-128", queues: int = 2,
    mode: str | None = None, bypass_port: int = BYPASS_PORT, discard_port: int = DISCARD_PORT,
    seed: bytes | None = None, context: str = "", encapsulation: str = "none", gso: bool = False,
    compare: str = "off",
) -> LabConfig:
    """Write both peers' configs and key files under ``directory`` (created, mode 0700).
    Keys: random, or derived from ``seed`` and ``context`` (see :func:`derive_key`)."""
    cfg = plan(a, b, encryption, queues, mode, bypass_port, discard_port, seed, context, directory,
               encapsulation, gso, compare)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    for me, other in ((a, b), (b, a)):
        pdir = directory / me.name
        pdir.mkdir(mode=0o700, exist_ok=True)
        cfg.peers[me.name] = write_peer(cfg, me, other, pdir / "nfq-ipsec.toml", pdir / "ctl.sock",
                                        pdir / "state")
    return cfg


def write_peer(
    cfg: LabConfig, me: PeerSpec, other: PeerSpec, path: Path, control_socket: Path,
    state_dir: Path, key_dir: str = "keys",
) -> PeerConfig:
    """Write ``me``'s configuration to ``path`` (mode 0600) and its SAs' keys into
    ``<path's directory>/<key_dir>/`` (0700, files 0600), creating ``state_dir`` (0700)."""
    keys = path.parent / key_dir
    keys.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(keys, 0o700)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for sa in cfg.sas:
        if me.name not in (sa.sender, sa.receiver):
            continue
        _write_key(keys / f"{sa.name}.key", sa.key)
        if sa.integrity:
            _write_key(keys / f"{sa.name}.auth.key", sa.integrity_key)
    text = render(me, other, cfg.sas, cfg.queues, control_socket, state_dir, cfg.mode,
                  cfg.bypass_port, cfg.discard_port, key_dir, cfg.gso, cfg.compare)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    return PeerConfig(me, path, control_socket, state_dir)


def _write_key(path: Path, key: bytes) -> None:
    """A key file created with mode 0600 from the start (never readable by others)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, key.hex().encode() + b"\n")
    finally:
        os.close(fd)


def render(
    me: PeerSpec, other: PeerSpec, sas: Sequence[LabSA], queues: Sequence[int], socket: Path,
    state_dir: Path, mode: str, bypass_port: int = BYPASS_PORT, discard_port: int = DISCARD_PORT,
    key_dir: str = "keys", gso: bool = False, compare: str = "off",
) -> str:
    """One peer's TOML. Keys are referenced by file (<key_dir>/<sa>.key), never inline."""
    # Ports live on peer b's side: seen from a they are remote ports, from b local ones.
    side = "remote_ports" if me.name == "a" else "local_ports"
    mine = [sa for sa in sas if me.name in (sa.sender, sa.receiver)]
    out_names = [sa.name for sa in mine if sa.sender == me.name]
    in_names = [sa.name for sa in mine if sa.receiver == me.name]
    lines = [
        f"# nfq-ipsec lab: peer {me.name} ({me.role}), {mode} mode with peer {other.name}.",
        "# Generated for one lab run (keys: random, or from its seed); see nfq_ipsec_lab/lab/labconfig.py.",
        "",
        "[node]",
        f'interface = "{me.interface}"',
        f'role = "{me.role}"',
        'default = "discard"',
        "",
        "[daemon]",
        f"queues = [{', '.join(str(q) for q in queues)}]",
        f'control_socket = "{socket}"',
        f'state_dir = "{state_dir}"',
        *(["gso = true"] if gso else []),
        *(['versions = ["core", "independent"]', f'compare = "{compare}"']
          if compare != "off" else []),
        "",
        "[[policy]]",
        'name = "bypass-tcp"',
        'action = "bypass"',
        f'local = "{me.protected}"',
        f'remote = "{other.protected}"',
        'protocol = "tcp"',
        f"{side} = {bypass_port}",
        "",
        "[[policy]]",
        'name = "discard-udp"',
        'action = "discard"',
        f'local = "{me.protected}"',
        f'remote = "{other.protected}"',
        'protocol = "udp"',
        f"{side} = {discard_port}",
        "",
        "[[policy]]",
        f'name = "{me.name}-{other.name}"',
        'action = "protect"',
        f'local = "{me.protected}"',
        f'remote = "{other.protected}"',
        f"sa = [{', '.join(_q(n) for n in out_names + in_names)}]",
    ]
    for sa in mine:
        outbound = sa.sender == me.name
        lines += [
            "",
            "[[sa]]",
            f'name = "{sa.name}"',
            f'direction = "{"out" if outbound else "in"}"',
            f"spi = 0x{sa.spi:08x}",
            f"queue = {sa.queue}",
            f'mode = "{mode}"',
        ]
        if mode == "tunnel":
            lines += [f'tunnel_local = "{me.address}"', f'tunnel_remote = "{other.address}"']
        lines += [f'encryption = "{sa.encryption}"', f'key_file = "{key_dir}/{sa.name}.key"']
        if sa.integrity:
            lines += [f'integrity = "{sa.integrity}"',
                      f'integrity_key_file = "{key_dir}/{sa.name}.auth.key"']
        if sa.encapsulation == "udp":
            lines += ['encapsulation = "udp"', "keepalive = 0"] if outbound else [
                'encapsulation = "udp"']
    return "\n".join(lines) + "\n"


def _q(name: str) -> str:
    return f'"{name}"'

"""SA parameters the core tests build: the one SA builder. Addresses are dotted strings;
keys default to fixed, suite-sized bytes (each SA of a test its own, by ``seed``)."""

from __future__ import annotations

from typing import Any

from packets import ip4

from nfq_ipsec.core import SAParams, Secret
from nfq_ipsec.core.sa import Mode, SADirection
from nfq_ipsec.core.suites import ENCRYPTION, HMACS


def key_for(encryption: str, seed: int = 0) -> bytes:
    return bytes((seed + i) & 0xFF for i in range(ENCRYPTION[encryption].keymat_size))


def integrity_key_for(integrity: str, seed: int = 40) -> bytes:
    return bytes((seed + i) & 0xFF for i in range(HMACS[integrity].key_size))


def params(name: str, spi: int, direction: SADirection, encryption: str = "aes-gcm-128",
           key: bytes | None = None, integrity: str | None = None,
           integrity_key: bytes | None = None, *, local: str | None = None,
           remote: str | None = None, mode: Mode | None = None, **more: Any) -> SAParams:
    """One SA. ``local``/``remote`` are the tunnel endpoints; giving them makes a tunnel-mode SA
    unless ``mode`` says otherwise. ``more`` are SAParams' other fields (esn, lifetime, df...)."""
    if key is None:
        key = key_for(encryption)
    if integrity_key is None:
        integrity_key = integrity_key_for(integrity) if integrity else b""
    if mode is None:
        mode = Mode.TUNNEL if local or remote else Mode.TRANSPORT
    return SAParams(name, spi, direction, encryption, Secret(key), integrity, Secret(integrity_key),
                    mode=mode, tunnel_local=ip4(local) if local else None,
                    tunnel_remote=ip4(remote) if remote else None, **more)

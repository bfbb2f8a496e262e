"""The key log for Wireshark (``daemon.key_log``): every IKE SA's and Child SA's keys the agent
negotiates, written to two files in one directory, ``ikev2_decryption_table`` and ``esp_sa``,
in the formats of Wireshark's user tables of those names (as strongSwan's save-keys plugin
writes them). Point Wireshark or tshark at the directory as its personal configuration
(``WIRESHARK_CONFIG_DIR=DIR tshark ...``), or copy the files into a profile, and it decrypts
the IKE messages and the ESP of a capture.

Anyone who reads the files can read all the traffic of those SAs: they are made 0600 in a
0700 directory, only when the option asks for them, and the agent warns at its start and
``status`` warns while it is on. This module is the only place the keys are formatted, and it
writes them only into those files: never a log line, an exception or a repr.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from .ike.child import ChildSA
from .ike.keys import IkeKeys, Suite
from .ike.proposal import Encr, Integ

IKE_FILE = "ikev2_decryption_table"
ESP_FILE = "esp_sa"
# Wireshark's names (packet-isakmp.c): the IKEv2 table's algorithms. It has no
# ChaCha20-Poly1305 for IKE (4.0): such an IKE SA gets no line.
_IKE_ENCR = {(Encr.AES_CBC, 128): "AES-CBC-128 [RFC3602]", (Encr.AES_CBC, 192): "AES-CBC-192 [RFC3602]",
             (Encr.AES_CBC, 256): "AES-CBC-256 [RFC3602]",
             (Encr.AES_GCM_16, 128): "AES-GCM-128 with 16 octet ICV [RFC5282]",
             (Encr.AES_GCM_16, 192): "AES-GCM-192 with 16 octet ICV [RFC5282]",
             (Encr.AES_GCM_16, 256): "AES-GCM-256 with 16 octet ICV [RFC5282]"}
_IKE_INTEG = {Integ.NONE: "NONE [RFC4306]", Integ.HMAC_SHA2_256_128: "HMAC_SHA2_256_128 [RFC4868]",
              Integ.HMAC_SHA2_384_192: "HMAC_SHA2_384_192 [RFC4868]",
              Integ.HMAC_SHA2_512_256: "HMAC_SHA2_512_256 [RFC4868]"}
# ... and the ESP table's (packet-ipsec.c); an AEAD key is given with its salt
_ESP_ENCR = {Encr.AES_CBC: "AES-CBC [RFC3602]", Encr.AES_GCM_16: "AES-GCM with 16 octet ICV [RFC4106]",
             Encr.CHACHA20_POLY1305: "ChaCha20 with Poly1305 [RFC7634]"}
_ESP_INTEG = {Integ.NONE: "NULL", Integ.HMAC_SHA2_256_128: "HMAC-SHA-256-128 [RFC4868]",
              Integ.HMAC_SHA2_384_192: "HMAC-SHA-384-192 [RFC4868]",
              Integ.HMAC_SHA2_512_256: "HMAC-SHA-512-256 [RFC4868]"}


def ike_line(spi_i: bytes, spi_r: bytes, keys: IkeKeys) -> str | None:
    """One ``ikev2_decryption_table`` entry (None: Wireshark has no name for the cipher)."""
    s = keys.suite
    encr = _IKE_ENCR.get((Encr(s.encr), s.key_bits or 0))
    integ = _IKE_INTEG.get(Integ(s.integ))
    if encr is None or integ is None:
        return None
    return (f'{spi_i.hex()},{spi_r.hex()},{keys.sk_ei.hex()},{keys.sk_er.hex()},"{encr}",'
            f'{keys.sk_ai.hex()},{keys.sk_ar.hex()},"{integ}"')


def esp_line(src: str, dst: str, spi: int, suite: Suite, keys: tuple[bytes, bytes]) -> str | None:
    """One ``esp_sa`` entry: the SA from ``src`` to ``dst`` (its outer addresses)."""
    encr = _ESP_ENCR.get(Encr(suite.encr))
    integ = _ESP_INTEG.get(Integ(suite.integ))
    if encr is None or integ is None:
        return None
    family = "IPv6" if ":" in src else "IPv4"
    ekey, ikey = keys
    fields = [family, src, dst, f"0x{spi:08x}", encr, f"0x{ekey.hex()}", integ,
              f"0x{ikey.hex()}" if ikey else ""]
    return ",".join(f'"{f}"' for f in fields)


@dataclass
class KeyLog:
    """The two files in ``directory``, appended to (made 0600, the directory 0700)."""

    directory: Path
    _logged: set[tuple[bytes, bytes] | int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        for name in (IKE_FILE, ESP_FILE):
            self._append(name, None)

    def _append(self, name: str, line: str | None) -> None:
        fd = os.open(self.directory / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW,
                     0o600)
        try:
            os.fchmod(fd, 0o600)
            if line is not None:
                os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def _remember(self, what: tuple[bytes, bytes] | int) -> None:
        if len(self._logged) >= 4096:  # bounded: at worst an SA's line is written twice
            self._logged.clear()
        self._logged.add(what)

    def ike_sa(self, spi_i: bytes, spi_r: bytes, keys: IkeKeys) -> bool:
        """Log an IKE SA's keys once (False: already there, or no Wireshark name)."""
        if (spi_i, spi_r) in self._logged:
            return False
        self._remember((spi_i, spi_r))
        line = ike_line(spi_i, spi_r, keys)
        if line is not None:
            with contextlib.suppress(OSError):
                self._append(IKE_FILE, line)
        return line is not None

    def child_sa(self, local: str, remote: str, child: ChildSA) -> None:
        """Log a Child SA pair's keys once: inbound (``remote`` to ``local``) and outbound."""
        if child.spi_in in self._logged:
            return
        self._remember(child.spi_in)
        for line in (esp_line(remote, local, child.spi_in, child.suite, child.keys_in),
                     esp_line(local, remote, child.spi_out, child.suite, child.keys_out)):
            if line is not None:
                with contextlib.suppress(OSError):
                    self._append(ESP_FILE, line)

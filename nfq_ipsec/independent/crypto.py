"""The ciphers of ESP, one function per RFC, through pycryptodome.

Every function takes its key, nonce or IV and additional data explicitly; none keeps state
between packets (a cipher object is made per call). Which IV a packet gets is decided by
the caller (``iv_for``): the published vectors pass their own.

- AES-GCM-16 (RFC 4106) and ChaCha20-Poly1305 (RFC 7634): nonce = 4-byte salt || 8-byte
  explicit IV; the ICV is the 16-byte tag; the AAD is SPI || sequence number (with ESN:
  SPI || high 32 bits || low 32 bits, RFC 4106 section 5).
- AES-CBC (RFC 3602) with HMAC-SHA-2 truncated (RFC 4868); ENCR_NULL (RFC 2410) with the same
  HMACs. The ICV covers ESP header || IV || ciphertext, then the high 32 sequence bits with
  ESN (RFC 4303 section 2.2.1, appended for the computation only).

IVs of this data plane are deterministic (ESP must be byte-identical in every version given
the same SA state): an AEAD's explicit IV is the 64-bit sequence number; an AES-CBC IV is
AES-ECB under the SA's own key of the sequence number as a 128-bit big-endian block (NIST
SP 800-38A Appendix C: unique and unpredictable without the key).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from types import ModuleType
from typing import Final

# pycryptodome imports a mode's module when a cipher of that mode is first made: imported
# here instead, so the packet path opens no file (GCM brings CTR along)
import Crypto.Cipher._mode_cbc
import Crypto.Cipher._mode_ctr
import Crypto.Cipher._mode_ecb
import Crypto.Cipher._mode_gcm  # noqa: F401
from Crypto.Cipher import AES, ChaCha20_Poly1305
from Crypto.Hash import HMAC, SHA256, SHA384, SHA512


class IntegrityFailure(Exception):
    """The ICV did not verify (a wrong key, or the packet changed on the way)."""


class TooShort(Exception):
    """The ESP body cannot hold what its suite needs (IV, a block, the ICV)."""


AEAD_TAG: Final = 16
AEAD_IV: Final = 8
SALT: Final = 4
BLOCK: Final = 16


@dataclass(frozen=True)
class Integrity:
    """An HMAC-SHA-2 of RFC 4868: its hash, key length and truncated ICV length."""

    name: str
    hash_module: ModuleType
    key_len: int
    icv_len: int


INTEGRITY: Final = {
    "hmac-sha256-128": Integrity("hmac-sha256-128", SHA256, 32, 16),
    "hmac-sha384-192": Integrity("hmac-sha384-192", SHA384, 48, 24),
    "hmac-sha512-256": Integrity("hmac-sha512-256", SHA512, 64, 32),
}


@dataclass(frozen=True)
class Cipher:
    """An encryption transform: its cipher key length, salt length, explicit IV length, the
    block the plaintext is padded to, and whether it is an AEAD."""

    name: str
    key_len: int
    salt_len: int
    iv_len: int
    align: int
    aead: bool


CIPHERS: Final = {
    "aes-gcm-128": Cipher("aes-gcm-128", 16, SALT, AEAD_IV, 4, True),
    "aes-gcm-256": Cipher("aes-gcm-256", 32, SALT, AEAD_IV, 4, True),
    "chacha20-poly1305": Cipher("chacha20-poly1305", 32, SALT, AEAD_IV, 4, True),
    "aes-cbc-128": Cipher("aes-cbc-128", 16, 0, BLOCK, BLOCK, False),
    "aes-cbc-256": Cipher("aes-cbc-256", 32, 0, BLOCK, BLOCK, False),
    "null": Cipher("null", 0, 0, 0, 4, False),
}


# -- RFC 4106 / RFC 7634 ------------------------------------------------------------------


def _aead(name: str, key: bytes, nonce: bytes):  # type: ignore[no-untyped-def]
    if name == "chacha20-poly1305":
        return ChaCha20_Poly1305.new(key=key, nonce=nonce)
    return AES.new(key, AES.MODE_GCM, nonce=nonce, mac_len=AEAD_TAG)


def aead_seal(name: str, key: bytes, salt: bytes, iv: bytes, aad: bytes, plaintext: bytes) -> bytes:
    """IV || ciphertext || tag."""
    cipher = _aead(name, key, salt + iv)
    cipher.update(aad)
    ciphertext, tag = cipher.encrypt_and_digest(plaintext)
    return iv + bytes(ciphertext) + bytes(tag)


def aead_open(name: str, key: bytes, salt: bytes, aad: bytes, body: bytes) -> bytes:
    """The plaintext of IV || ciphertext || tag; IntegrityFailure if the tag is wrong."""
    if len(body) < AEAD_IV + AEAD_TAG:
        raise TooShort("ESP body shorter than IV and ICV")
    cipher = _aead(name, key, salt + body[:AEAD_IV])
    cipher.update(aad)
    try:
        return bytes(cipher.decrypt_and_verify(body[AEAD_IV:-AEAD_TAG], body[-AEAD_TAG:]))
    except ValueError:
        raise IntegrityFailure("ICV mismatch") from None


def aead_aad(spi_and_seq: bytes, seq_hi: bytes) -> bytes:
    """RFC 4106 section 5: SPI || seq (or SPI || seq_hi || seq_lo with ESN)."""
    return spi_and_seq[:4] + seq_hi + spi_and_seq[4:8]


# -- RFC 4868 -----------------------------------------------------------------------------


def hmac_icv(mac: Integrity, key: bytes, *parts: bytes) -> bytes:
    h = HMAC.new(key, digestmod=mac.hash_module)
    for part in parts:
        h.update(part)
    return h.digest()[: mac.icv_len]


def hmac_check(mac: Integrity, key: bytes, icv: bytes, *parts: bytes) -> None:
    if not hmac.compare_digest(hmac_icv(mac, key, *parts), icv):
        raise IntegrityFailure("ICV mismatch")


# -- RFC 3602 -----------------------------------------------------------------------------


def cbc_iv(key: bytes, seq: int) -> bytes:
    """This data plane's AES-CBC IV for sequence number ``seq`` (see the module's doc)."""
    return bytes(AES.new(key, AES.MODE_ECB).encrypt(seq.to_bytes(BLOCK, "big")))


def cbc_seal(key: bytes, iv: bytes, mac: Integrity, ikey: bytes, esp_header: bytes,
             seq_hi: bytes, plaintext: bytes) -> bytes:
    """IV || AES-CBC ciphertext || ICV (``plaintext`` already padded to the block)."""
    ciphertext = bytes(AES.new(key, AES.MODE_CBC, iv=iv).encrypt(plaintext))
    return iv + ciphertext + hmac_icv(mac, ikey, esp_header, iv, ciphertext, seq_hi)


def cbc_open(key: bytes, mac: Integrity, ikey: bytes, esp_header: bytes, seq_hi: bytes,
             body: bytes) -> bytes:
    """Verify the ICV first, then decrypt. TooShort: less than IV, one block and the ICV, or
    (after the ICV) a ciphertext that is no whole number of blocks."""
    n = len(body) - mac.icv_len
    if n < 2 * BLOCK:
        raise TooShort("ESP body shorter than IV, one block and ICV")
    hmac_check(mac, ikey, body[n:], esp_header, body[:n], seq_hi)
    if (n - BLOCK) % BLOCK:
        raise TooShort("ciphertext not a whole number of blocks")
    return bytes(AES.new(key, AES.MODE_CBC, iv=body[:BLOCK]).decrypt(body[BLOCK:n]))


# -- RFC 2410 -----------------------------------------------------------------------------


def null_seal(mac: Integrity, ikey: bytes, esp_header: bytes, seq_hi: bytes,
              plaintext: bytes) -> bytes:
    return plaintext + hmac_icv(mac, ikey, esp_header, plaintext, seq_hi)


def null_open(mac: Integrity, ikey: bytes, esp_header: bytes, seq_hi: bytes, body: bytes) -> bytes:
    n = len(body) - mac.icv_len
    if n < 4:
        raise TooShort("ESP body shorter than trailer and ICV")
    hmac_check(mac, ikey, body[n:], esp_header, body[:n], seq_hi)
    return body[:n]


# -- one SA's transform -------------------------------------------------------------------


class Transform:
    """The keys and algorithms of one SA, and the three things ESP asks of them. Keys stay
    in private attributes; the repr names the algorithms only."""

    def __init__(self, encryption: str, keymat: bytes, integrity: str | None,
                 integrity_key: bytes) -> None:
        cipher = CIPHERS.get(encryption)
        if cipher is None:
            raise ValueError(f"unknown encryption {encryption!r}")
        if len(keymat) != cipher.key_len + cipher.salt_len:
            raise ValueError(f"{encryption} needs {cipher.key_len + cipher.salt_len} key bytes")
        self.cipher = cipher
        self.mac: Integrity | None = None
        if not cipher.aead:
            if integrity not in INTEGRITY:
                raise ValueError(f"{encryption} needs an integrity algorithm")
            self.mac = INTEGRITY[integrity]
            if len(integrity_key) != self.mac.key_len:
                raise ValueError(f"{integrity} needs {self.mac.key_len} key bytes")
        elif integrity is not None:
            raise ValueError(f"{encryption} is an AEAD and takes no integrity algorithm")
        self._key = keymat[: cipher.key_len]
        self._salt = keymat[cipher.key_len :]
        self._ikey = integrity_key
        self.icv_len = AEAD_TAG if cipher.aead else self.mac.icv_len  # type: ignore[union-attr]

    @property
    def align(self) -> int:
        return self.cipher.align

    @property
    def iv_len(self) -> int:
        return self.cipher.iv_len

    def iv_for(self, seq: int) -> bytes:
        if self.cipher.aead:
            return seq.to_bytes(AEAD_IV, "big")
        if self.cipher.iv_len:
            return cbc_iv(self._key, seq)
        return b""

    def seal(self, esp_header: bytes, seq_hi: bytes, iv: bytes, plaintext: bytes) -> bytes:
        """IV || ciphertext || ICV of ``plaintext`` (payload, padding, trailer)."""
        if self.cipher.aead:
            return aead_seal(self.cipher.name, self._key, self._salt, iv,
                             aead_aad(esp_header, seq_hi), plaintext)
        assert self.mac is not None
        if self.cipher.iv_len:
            return cbc_seal(self._key, iv, self.mac, self._ikey, esp_header, seq_hi, plaintext)
        return null_seal(self.mac, self._ikey, esp_header, seq_hi, plaintext)

    def open(self, esp_header: bytes, seq_hi: bytes, body: bytes) -> bytes:
        if self.cipher.aead:
            return aead_open(self.cipher.name, self._key, self._salt,
                             aead_aad(esp_header, seq_hi), body)
        assert self.mac is not None
        if self.cipher.iv_len:
            return cbc_open(self._key, self.mac, self._ikey, esp_header, seq_hi, body)
        return null_open(self.mac, self._ikey, esp_header, seq_hi, body)

    def __repr__(self) -> str:
        mac = f"+{self.mac.name}" if self.mac else ""
        return f"<Transform {self.cipher.name}{mac}>"

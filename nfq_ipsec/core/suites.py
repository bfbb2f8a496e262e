"""Crypto suites: the one seam between ESP framing and a crypto implementation.

A suite seals and opens the part of an ESP packet after the 8-byte header (IV, ciphertext,
ICV). ESP framing never touches a cipher directly, so a second, independent crypto engine can
be plugged in by providing the same three-method interface (see ``SuiteFactory``). The engines
(``nfq_ipsec/engines/``) build suites for an SA when it is built; ``GuardedSuite`` turns an
engine's unexpected exception into a counted drop (``engine_failed``) and an alarm.

IVs are derived from the 64-bit sequence number, which never repeats under a key:
- AEAD suites (RFC 4106, RFC 7634) send the sequence number itself as the 8-byte IV;
- AES-CBC (RFC 3602 wants an unpredictable IV) sends AES_K(counter), the method of
  NIST SP 800-38A Appendix C: unique per packet and unpredictable without the key.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .errors import DropReason, EspError

Buffer = bytes | bytearray | memoryview
_IV: Final = struct.Struct("!Q")


class Suite(Protocol):
    """What ESP framing needs from a crypto implementation."""

    name: str
    iv_size: int
    icv_size: int
    align: int  # plaintext (payload + padding + 2) is padded to a multiple of this

    def seal(self, esp_header: bytes, seq_hi: bytes, seq: int, plaintext: bytes) -> bytes:
        """Return IV || ciphertext || ICV. ``seq`` is the full (64-bit) sequence number."""
        ...

    def open(self, esp_header: Buffer, seq_hi: bytes, body: Buffer) -> bytes:
        """Verify and decrypt IV || ciphertext || ICV. Raises EspError(INTEGRITY/MALFORMED)."""
        ...


class Aead(Protocol):
    """An AEAD cipher as ``cryptography`` shapes it: ``encrypt(nonce, data, aad)`` returns
    ciphertext || tag, ``decrypt`` raises ``InvalidTag``. Other engines adapt to it."""

    def encrypt(self, nonce: bytes, data: bytes, associated_data: Buffer | None) -> bytes: ...

    def decrypt(self, nonce: bytes, data: Buffer, associated_data: Buffer | None) -> bytes: ...


def _aad(esp_header: Buffer, seq_hi: bytes) -> bytes:
    # RFC 4106 section 5 / RFC 7634 section 2.1: with ESN the AAD is SPI || seq_hi || seq_lo.
    if seq_hi:
        return bytes(esp_header[:4]) + seq_hi + bytes(esp_header[4:8])
    return bytes(esp_header)


class AeadSuite:
    """AES-GCM-16 (RFC 4106) and ChaCha20-Poly1305 (RFC 7634): key || 4-byte salt."""

    iv_size = 8
    icv_size = 16
    align = 4

    def __init__(self, name: str, aead: Aead | AESGCM | ChaCha20Poly1305, salt: bytes) -> None:
        self.name = name
        self._aead = aead
        self._salt = salt
        self._encrypt = aead.encrypt  # bound once: called per packet
        self._decrypt = aead.decrypt

    def seal(self, esp_header: bytes, seq_hi: bytes, seq: int, plaintext: bytes) -> bytes:
        iv = _IV.pack(seq)
        aad = _aad(esp_header, seq_hi) if seq_hi else esp_header
        return iv + self._encrypt(self._salt + iv, plaintext, aad)

    def open(self, esp_header: Buffer, seq_hi: bytes, body: Buffer) -> bytes:
        if len(body) < self.iv_size + self.icv_size:
            raise EspError(DropReason.MALFORMED, "ESP body shorter than IV and ICV")
        aad = _aad(esp_header, seq_hi) if seq_hi else esp_header
        try:
            if isinstance(body, bytes):  # the worker's case: compiled, a bytes slice is cheaper
                return self._decrypt(self._salt + body[:8], body[8:], aad)  # than a memoryview
            return self._decrypt(self._salt + bytes(body[:8]), body[8:], aad)
        except InvalidTag:
            raise EspError(DropReason.INTEGRITY, "ICV mismatch") from None

    def __repr__(self) -> str:
        return f"<AeadSuite {self.name}>"


@dataclass(frozen=True)
class _Hmac:
    name: str
    digest: str
    key_size: int
    icv_size: int


HMACS = {
    "hmac-sha256-128": _Hmac("hmac-sha256-128", "sha256", 32, 16),  # RFC 4868
    "hmac-sha384-192": _Hmac("hmac-sha384-192", "sha384", 48, 24),
    "hmac-sha512-256": _Hmac("hmac-sha512-256", "sha512", 64, 32),
}


class _HmacMixin:
    icv_size: int
    _ikey: bytes
    _digest: str

    def _icv(self, *parts: Buffer) -> bytes:
        return hmac.digest(self._ikey, b"".join(parts), self._digest)[: self.icv_size]

    def _verify(self, icv: Buffer, *signed: Buffer) -> None:
        if not hmac.compare_digest(self._icv(*signed), icv):
            raise EspError(DropReason.INTEGRITY, "ICV mismatch")


class CbcHmacSuite(_HmacMixin):
    """AES-CBC (RFC 3602) with HMAC-SHA-2 (RFC 4868); ICV over header||IV||ct (||seq_hi)."""

    iv_size = 16
    align = 16

    def __init__(self, name: str, key: bytes, mac: _Hmac, ikey: bytes) -> None:
        self.name = name
        self.icv_size = mac.icv_size
        self._aes = algorithms.AES(key)  # built once; a CBC context per packet reuses it
        self._ikey = ikey
        self._digest = mac.digest
        self._iv_maker = Cipher(algorithms.AES(key), modes.ECB()).encryptor()

    def seal(self, esp_header: bytes, seq_hi: bytes, seq: int, plaintext: bytes) -> bytes:
        iv = self._iv_maker.update(seq.to_bytes(16, "big"))
        enc = Cipher(self._aes, modes.CBC(iv)).encryptor()
        ct = enc.update(plaintext) + enc.finalize()
        return iv + ct + self._icv(esp_header, iv, ct, seq_hi)

    def open(self, esp_header: Buffer, seq_hi: bytes, body: Buffer) -> bytes:
        n = len(body) - self.icv_size
        if n < 2 * 16:
            raise EspError(DropReason.MALFORMED, "ESP body shorter than IV, one block and ICV")
        body = memoryview(body)
        self._verify(body[n:], esp_header, body[:n], seq_hi)
        if (n - 16) % 16:
            raise EspError(DropReason.MALFORMED, "ciphertext not a whole number of blocks")
        dec = Cipher(self._aes, modes.CBC(bytes(body[:16]))).decryptor()
        return dec.update(body[16:n]) + dec.finalize()

    def __repr__(self) -> str:
        return f"<CbcHmacSuite {self.name}>"


class NullHmacSuite(_HmacMixin):
    """ENCR_NULL (RFC 2410) with an HMAC: integrity only, the payload travels readable."""

    iv_size = 0
    align = 4

    def __init__(self, name: str, mac: _Hmac, ikey: bytes) -> None:
        self.name = name
        self.icv_size = mac.icv_size
        self._ikey = ikey
        self._digest = mac.digest

    def seal(self, esp_header: bytes, seq_hi: bytes, seq: int, plaintext: bytes) -> bytes:
        return plaintext + self._icv(esp_header, plaintext, seq_hi)

    def open(self, esp_header: Buffer, seq_hi: bytes, body: Buffer) -> bytes:
        n = len(body) - self.icv_size
        if n < 4:
            raise EspError(DropReason.MALFORMED, "ESP body shorter than trailer and ICV")
        body = memoryview(body)
        self._verify(body[n:], esp_header, body[:n], seq_hi)
        return bytes(body[:n])

    def __repr__(self) -> str:
        return f"<NullHmacSuite {self.name}>"


@dataclass(frozen=True)
class EncryptionAlgorithm:
    name: str
    key_size: int  # bytes of cipher key
    salt_size: int  # bytes of salt appended to the key (AEAD), 0 otherwise
    aead: bool

    @property
    def keymat_size(self) -> int:
        return self.key_size + self.salt_size


ENCRYPTION = {
    "aes-gcm-128": EncryptionAlgorithm("aes-gcm-128", 16, 4, True),
    "aes-gcm-256": EncryptionAlgorithm("aes-gcm-256", 32, 4, True),
    "chacha20-poly1305": EncryptionAlgorithm("chacha20-poly1305", 32, 4, True),
    "aes-cbc-128": EncryptionAlgorithm("aes-cbc-128", 16, 0, False),
    "aes-cbc-256": EncryptionAlgorithm("aes-cbc-256", 32, 0, False),
    "null": EncryptionAlgorithm("null", 0, 0, False),
}

# RFC 8221 section 5/6: what we refuse and why.
FORBIDDEN = {
    "des": "DES is MUST NOT in RFC 8221 (56-bit key)",
    "des-cbc": "DES is MUST NOT in RFC 8221 (56-bit key)",
    "3des": "3DES is SHOULD NOT in RFC 8221 (64-bit block); use aes-gcm-128",
    "3des-cbc": "3DES is SHOULD NOT in RFC 8221 (64-bit block); use aes-gcm-128",
    "des-iv32": "DES_IV32 is MUST NOT in RFC 8221",
    "des-iv64": "DES_IV64 is MUST NOT in RFC 8221",
    "rc5": "RC5 is MUST NOT in RFC 8221",
    "idea": "IDEA is MUST NOT in RFC 8221",
    "cast": "CAST is MUST NOT in RFC 8221",
    "blowfish": "Blowfish is MUST NOT in RFC 8221",
    "3idea": "3IDEA is MUST NOT in RFC 8221",
    "aes-gcm-8": "AES-GCM with an 8-octet ICV is SHOULD NOT in RFC 8221; use aes-gcm-128",
    "aes-ccm-8": "AES-CCM-8 is only for IoT in RFC 8221 and not supported here",
    "hmac-md5-96": "HMAC-MD5-96 is MUST NOT in RFC 8221",
    "hmac-md5": "HMAC-MD5-96 is MUST NOT in RFC 8221",
    "hmac-sha1-96": "HMAC-SHA1-96 is MUST- in RFC 8221 (being phased out); use hmac-sha256-128",
    "des-mac": "DES-MAC is MUST NOT in RFC 8221",
    "kpdk-md5": "KPDK-MD5 is MUST NOT in RFC 8221",
    "aes-xcbc-96": "AES-XCBC-96 is SHOULD NOT+ for ESP in RFC 8221; use hmac-sha256-128",
}


def suite_problems(encryption: str, integrity: str | None) -> list[str]:
    """Why this algorithm pair can't be used, or an empty list."""
    problems = []
    for name in (encryption, integrity):
        if name is not None and name in FORBIDDEN:
            problems.append(f"{name} is refused: {FORBIDDEN[name]}")
    if problems:
        return problems
    enc = ENCRYPTION.get(encryption)
    if enc is None:
        return [f"unknown encryption {encryption!r} (known: {', '.join(ENCRYPTION)})"]
    if enc.aead:
        if integrity is not None:
            problems.append(f"{encryption} is an AEAD and takes no separate integrity algorithm")
    elif integrity is None:
        if encryption == "null":
            problems.append("null encryption needs an integrity algorithm (RFC 4303 forbids NULL/NULL)")
        else:
            problems.append(f"{encryption} needs an integrity algorithm (known: {', '.join(HMACS)})")
    elif integrity not in HMACS:
        problems.append(f"unknown integrity {integrity!r} (known: {', '.join(HMACS)})")
    return problems


def make_suite(encryption: str, key: bytes, integrity: str | None, integrity_key: bytes) -> Suite:
    """Build the default (OpenSSL through ``cryptography``) suite. Inputs must be validated."""
    problems = suite_problems(encryption, integrity)
    if problems:
        raise ValueError("; ".join(problems))
    enc = ENCRYPTION[encryption]
    if len(key) != enc.keymat_size:
        raise ValueError(f"{encryption} needs {enc.keymat_size} key bytes, got {len(key)}")
    if enc.aead:
        cipher_key, salt = key[: enc.key_size], key[enc.key_size :]
        aead: AESGCM | ChaCha20Poly1305 = (
            ChaCha20Poly1305(cipher_key) if encryption == "chacha20-poly1305" else AESGCM(cipher_key)
        )
        return AeadSuite(encryption, aead, salt)
    assert integrity is not None
    mac = HMACS[integrity]
    if len(integrity_key) != mac.key_size:
        raise ValueError(f"{integrity} needs {mac.key_size} key bytes, got {len(integrity_key)}")
    if encryption == "null":
        return NullHmacSuite(f"null+{integrity}", mac, integrity_key)
    return CbcHmacSuite(f"{encryption}+{integrity}", key, mac, integrity_key)


class GuardedSuite:
    """A suite of a crypto engine (``nfq_ipsec/engines``), fenced: an exception that is not
    the core's own (a library error, a broken device) drops the packet as ``engine_failed``
    and appends the engine's name to ``alarms``, which the worker looks at after each batch
    to move the engine's SAs to another. Bound per SA when the SA is built, never per packet.

    ``witness`` and ``check_every`` (``crypto.self_check``): every ``check_every``-th call is
    done again on another engine's suite of the same SA, whose output must be the same bytes
    (IVs come from the sequence number, so every engine's are); a difference is a wrong
    engine: the packet is dropped as ``engine_failed`` and the alarm raised, before anything
    wrong reaches the wire.
    """

    def __init__(self, inner: Suite, engine: str, alarms: list[str],
                 witness: Suite | None = None, check_every: int = 0) -> None:
        self.inner = inner
        self.engine = engine
        self.alarms = alarms
        self.name = inner.name
        self.iv_size = inner.iv_size
        self.icv_size = inner.icv_size
        self.align = inner.align
        self.faults = 0
        self.checked = 0  # calls done again on the witness
        self._seal = inner.seal
        self._open = inner.open
        self.witness = witness if check_every > 0 else None
        self.check_every = check_every if witness is not None else 0
        self._left = self.check_every  # calls to the next check

    def seal(self, esp_header: bytes, seq_hi: bytes, seq: int, plaintext: bytes) -> bytes:
        try:
            out = self._seal(esp_header, seq_hi, seq, plaintext)
        except EspError:
            raise
        except Exception as err:
            raise self._failed(type(err).__name__) from None
        if self.check_every:
            self._left -= 1
            if self._left <= 0:
                self._left = self.check_every
                self._check(out, self._witness_seal(esp_header, seq_hi, seq, plaintext))
        return out

    def open(self, esp_header: Buffer, seq_hi: bytes, body: Buffer) -> bytes:
        try:
            out = self._open(esp_header, seq_hi, body)
        except EspError:
            raise
        except Exception as err:
            raise self._failed(type(err).__name__) from None
        if self.check_every:
            self._left -= 1
            if self._left <= 0:
                self._left = self.check_every
                self._check(out, self._witness_open(esp_header, seq_hi, body))
        return out

    def _witness_seal(self, esp_header: bytes, seq_hi: bytes, seq: int, plaintext: bytes) -> bytes:
        assert self.witness is not None
        try:
            return self.witness.seal(esp_header, seq_hi, seq, plaintext)
        except Exception:  # the witness failed, not the engine: no verdict on it
            return b""

    def _witness_open(self, esp_header: Buffer, seq_hi: bytes, body: Buffer) -> bytes:
        assert self.witness is not None
        try:
            return self.witness.open(esp_header, seq_hi, body)
        except Exception:  # an ICV the witness refuses is the engine's wrong answer
            return b"\x00refused"

    def _check(self, out: bytes, witnessed: bytes) -> None:
        self.checked += 1
        if witnessed and witnessed != out:
            raise self._failed("output differs from another engine's")

    def _failed(self, what: str) -> EspError:
        self.faults += 1
        self.alarms.append(self.engine)
        # the type only: a library's message might quote its input
        return EspError(DropReason.ENGINE_FAILED, f"engine {self.engine}: {what}")

    def __repr__(self) -> str:
        return f"<GuardedSuite {self.name} on {self.engine}>"


SuiteFactory = Callable[[str, bytes, "str | None", bytes], Suite]

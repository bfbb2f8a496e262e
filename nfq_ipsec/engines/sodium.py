"""libsodium through PyNaCl: ChaCha20-Poly1305 (IETF, RFC 8439), and AES-256-GCM where the
CPU has the instructions libsodium wants (without them the library refuses the call, and
``probe`` does not claim the suite: a missing capability, not a wrong answer). PyNaCl exposes
no HMAC-SHA-2 with a key of our sizes and no AES-CBC, so the CBC suites are not claimed."""

from __future__ import annotations

import nacl
import nacl.bindings as sodium
from cryptography.exceptions import InvalidTag
from nacl.exceptions import CryptoError

from ..core.suites import AeadSuite, Buffer, Suite
from .base import Engine, Probe, Unsupported, check_keys


class _SodiumAead:
    """libsodium's AEAD calls shaped as ``core.suites.Aead``."""

    def __init__(self, key: bytes, chacha: bool) -> None:
        self._key = key
        if chacha:
            self._enc = sodium.crypto_aead_chacha20poly1305_ietf_encrypt
            self._dec = sodium.crypto_aead_chacha20poly1305_ietf_decrypt
        else:
            self._enc = sodium.crypto_aead_aes256gcm_encrypt
            self._dec = sodium.crypto_aead_aes256gcm_decrypt

    def encrypt(self, nonce: bytes, data: bytes, associated_data: Buffer | None) -> bytes:
        return self._enc(data, bytes(associated_data or b""), nonce, self._key)

    def decrypt(self, nonce: bytes, data: Buffer, associated_data: Buffer | None) -> bytes:
        try:
            return self._dec(bytes(data), bytes(associated_data or b""), nonce, self._key)
        except CryptoError:
            raise InvalidTag from None

    def __repr__(self) -> str:
        return "<_SodiumAead>"


class SodiumEngine(Engine):
    name = "sodium"

    def probe(self) -> Probe:
        suites = {"chacha20-poly1305"}
        detail = f"PyNaCl {nacl.__version__}"
        try:
            sodium.crypto_aead_aes256gcm_encrypt(b"", b"", bytes(12), bytes(32))
        except CryptoError:
            detail += "; no AES-256-GCM on this CPU"
        else:
            suites.add("aes-gcm-256")
        return Probe(frozenset(suites), detail=detail)

    def build(self, encryption: str, key: bytes, integrity: str | None, integrity_key: bytes) -> Suite:
        check_keys(encryption, key, integrity, integrity_key)
        if encryption not in ("chacha20-poly1305", "aes-gcm-256"):
            raise Unsupported(f"sodium has no {encryption}")
        return AeadSuite(encryption, _SodiumAead(key[:32], encryption == "chacha20-poly1305"), key[32:])

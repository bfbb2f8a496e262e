"""pycryptodome: AES-GCM, ChaCha20-Poly1305, AES-CBC and HMAC-SHA-2, all of them in C
within the library (not OpenSSL), so a second implementation of every suite but null."""

from __future__ import annotations

import Crypto
from Crypto.Cipher import AES, ChaCha20_Poly1305
from Crypto.Hash import HMAC, SHA256, SHA384, SHA512
from cryptography.exceptions import InvalidTag

from ..core.suites import HMACS, AeadSuite, Buffer, Suite
from .base import AEADS, CBCS, Engine, Probe, Unsupported, check_keys, suite_name
from .frames import CbcHmacFrame

_HASHES = {"sha256": SHA256, "sha384": SHA384, "sha512": SHA512}


class _GcmOrChacha:
    """pycryptodome's one-shot AEAD objects shaped as ``core.suites.Aead``."""

    def __init__(self, key: bytes, chacha: bool) -> None:
        self._key = key
        self._chacha = chacha

    def _cipher(self, nonce: bytes) -> object:
        if self._chacha:
            return ChaCha20_Poly1305.new(key=self._key, nonce=nonce)
        return AES.new(self._key, AES.MODE_GCM, nonce=nonce, mac_len=16)

    def encrypt(self, nonce: bytes, data: bytes, associated_data: Buffer | None) -> bytes:
        c = self._cipher(nonce)
        c.update(associated_data or b"")  # type: ignore[attr-defined]
        ct, tag = c.encrypt_and_digest(data)  # type: ignore[attr-defined]
        return ct + tag  # type: ignore[no-any-return]

    def decrypt(self, nonce: bytes, data: Buffer, associated_data: Buffer | None) -> bytes:
        if len(data) < 16:
            raise InvalidTag
        c = self._cipher(nonce)
        c.update(associated_data or b"")  # type: ignore[attr-defined]
        raw = bytes(data)
        try:
            return c.decrypt_and_verify(raw[:-16], raw[-16:])  # type: ignore[attr-defined,no-any-return]
        except ValueError:
            raise InvalidTag from None

    def __repr__(self) -> str:
        return "<_GcmOrChacha>"


def _cbc_frame(name: str, key: bytes, integrity: str, ikey: bytes) -> CbcHmacFrame:
    ecb = AES.new(key, AES.MODE_ECB)
    digest = _HASHES[HMACS[integrity].digest]

    def encrypt(iv: bytes, data: bytes) -> bytes:
        return AES.new(key, AES.MODE_CBC, iv=iv).encrypt(data)

    def decrypt(iv: bytes, data: bytes) -> bytes:
        return AES.new(key, AES.MODE_CBC, iv=iv).decrypt(data)

    def mac(data: bytes) -> bytes:
        return HMAC.new(ikey, data, digestmod=digest).digest()

    return CbcHmacFrame(name, HMACS[integrity].icv_size, ecb.encrypt, encrypt, decrypt, mac)


class PycryptodomeEngine(Engine):
    name = "pycryptodome"

    def probe(self) -> Probe:
        return Probe(frozenset({*AEADS, *(suite_name(c, h) for c in CBCS for h in HMACS)}),
                     detail=f"pycryptodome {Crypto.__version__}")

    def build(self, encryption: str, key: bytes, integrity: str | None, integrity_key: bytes) -> Suite:
        check_keys(encryption, key, integrity, integrity_key)
        if encryption in AEADS:
            size = len(key) - 4
            return AeadSuite(encryption, _GcmOrChacha(key[:size], encryption == "chacha20-poly1305"),
                             key[size:])
        if encryption in CBCS and integrity is not None:
            return _cbc_frame(suite_name(encryption, integrity), key, integrity, integrity_key)
        raise Unsupported(f"pycryptodome engine has no {suite_name(encryption, integrity)}")

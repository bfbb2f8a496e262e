"""ESP's AES-CBC with HMAC (RFC 3602, RFC 4868) over an engine's primitives, for the engines
other than OpenSSL (whose suite is the core's own, compiled).

The same rules as ``core.suites.CbcHmacSuite``: the IV is AES_K(sequence number as 128 bits),
the ICV is HMAC(header || IV || ciphertext || seq_hi) truncated, checked before decrypting.
An engine gives four callables: one-block AES-ECB (the IV), CBC encrypt and decrypt of whole
blocks with an IV, and the full HMAC digest.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from ..core.errors import DropReason, EspError
from ..core.suites import Buffer

Ecb = Callable[[bytes], bytes]
CbcOp = Callable[[bytes, bytes], bytes]  # (iv, data) -> data
Mac = Callable[[bytes], bytes]  # data -> full digest


class CbcHmacFrame:
    iv_size = 16
    align = 16

    def __init__(self, name: str, icv_size: int, ecb: Ecb, encrypt: CbcOp, decrypt: CbcOp,
                 mac: Mac) -> None:
        self.name = name
        self.icv_size = icv_size
        self._ecb = ecb
        self._encrypt = encrypt
        self._decrypt = decrypt
        self._mac = mac

    def seal(self, esp_header: bytes, seq_hi: bytes, seq: int, plaintext: bytes) -> bytes:
        iv = self._ecb(seq.to_bytes(16, "big"))
        ct = self._encrypt(iv, plaintext)
        return iv + ct + self._mac(esp_header + iv + ct + seq_hi)[: self.icv_size]

    def open(self, esp_header: Buffer, seq_hi: bytes, body: Buffer) -> bytes:
        n = len(body) - self.icv_size
        if n < 2 * 16:
            raise EspError(DropReason.MALFORMED, "ESP body shorter than IV, one block and ICV")
        data = bytes(body)
        icv = self._mac(bytes(esp_header) + data[:n] + seq_hi)[: self.icv_size]
        if not hmac.compare_digest(icv, data[n:]):
            raise EspError(DropReason.INTEGRITY, "ICV mismatch")
        if (n - 16) % 16:
            raise EspError(DropReason.MALFORMED, "ciphertext not a whole number of blocks")
        return self._decrypt(data[:16], data[16:n])

    def __repr__(self) -> str:
        return f"<CbcHmacFrame {self.name}>"

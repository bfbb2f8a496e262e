"""The Encrypted payload (SK, RFC 7296 section 3.14; AEAD per RFC 5282 and RFC 7634).

Sealed content is the inner payload chain, padding and a pad length byte. With AES-CBC the
padding fills the last block and an HMAC-SHA2 ICV covers the whole message from the IKE
header up to it. With AES-GCM-16 or ChaCha20-Poly1305 there is no padding, the nonce is the
4-byte salt of the key material followed by the 8-byte IV, and the associated data is the IKE
header and the Encrypted payload's generic header (RFC 5282 section 5.1). The IV comes from
the caller: random for CBC, unique per key for the AEADs (a counter does).

Opening checks the ICV first (constant time), then the padding length; every failure is one
IkeError, and no detail of it depends on key material.
"""

from __future__ import annotations

import hmac

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .errors import IkeError, Notify
from .keys import AEAD_SALT, Suite, integ_params
from .message import (
    GENERIC,
    HEADER,
    PT,
    EncryptedPayload,
    Header,
    Payload,
    decode_payloads,
    encode_message,
    encode_payloads,
)
from .proposal import Encr

AEAD_IV = 8
AEAD_ICV = 16
CBC_BLOCK = 16


def iv_size(suite: Suite) -> int:
    return AEAD_IV if suite.aead else CBC_BLOCK


def icv_size(suite: Suite) -> int:
    return AEAD_ICV if suite.aead else integ_params(suite.integ)[2]


def _aead(suite: Suite, key: bytes) -> AESGCM | ChaCha20Poly1305:
    k = key[:-AEAD_SALT]
    return ChaCha20Poly1305(k) if suite.encr == Encr.CHACHA20_POLY1305 else AESGCM(k)


def seal(header: Header, outer: list[Payload], inner: list[Payload], suite: Suite, encr_key: bytes,
         integ_key: bytes, iv: bytes) -> bytes:
    """The whole message: ``header``, the cleartext ``outer`` payloads (usually none), then an
    Encrypted payload holding ``inner``."""
    if len(iv) != iv_size(suite):
        raise ValueError(f"an IV of {len(iv)} bytes, the cipher takes {iv_size(suite)}")
    first_inner, plain = encode_payloads(inner)
    if suite.aead:
        plain += b"\0"  # no padding, pad length 0
    else:
        pad = -(len(plain) + 1) % CBC_BLOCK
        plain += bytes(pad) + bytes([pad])
    size = len(iv) + len(plain) + icv_size(suite)
    placeholder = EncryptedPayload(first_inner, bytes(size))
    unsealed = encode_message(header, [*outer, placeholder])
    start = len(unsealed) - size  # where IV | ciphertext | ICV go
    aad = unsealed[:start]
    if suite.aead:
        nonce = encr_key[-AEAD_SALT:] + iv
        sealed = _aead(suite, encr_key).encrypt(nonce, plain, aad)
        return aad + iv + sealed
    enc = Cipher(algorithms.AES(encr_key), modes.CBC(iv)).encryptor()
    body = aad + iv + enc.update(plain) + enc.finalize()
    name, _, icv = integ_params(suite.integ)
    return body + hmac.new(integ_key, body, name).digest()[:icv]


def open_message(data: bytes, header: Header, sk: EncryptedPayload, suite: Suite,
                 encr_key: bytes, integ_key: bytes) -> tuple[Payload, ...]:
    """The payloads inside ``sk``, the last payload of the message ``data`` whose ``header``
    was decoded. Refused (INVALID_SYNTAX or AUTHENTICATION_FAILED) if the ICV does not verify
    or the content is malformed."""
    ivn, icvn = iv_size(suite), icv_size(suite)
    if len(sk.data) < ivn + icvn + (1 if suite.aead else CBC_BLOCK):
        raise IkeError(Notify.INVALID_SYNTAX, f"an Encrypted payload of {len(sk.data)} bytes")
    start = len(data) - len(sk.data)
    if start < HEADER + GENERIC or bytes(data[start:]) != sk.data:
        raise IkeError(Notify.INVALID_SYNTAX, "the Encrypted payload is not the message's end")
    iv = sk.data[:ivn]
    if suite.aead:
        try:
            plain = _aead(suite, encr_key).decrypt(encr_key[-AEAD_SALT:] + iv, sk.data[ivn:],
                                                   bytes(data[:start]))
        except InvalidTag:
            raise IkeError(Notify.AUTHENTICATION_FAILED, "the Encrypted payload's ICV does not "
                           "verify") from None
    else:
        name, _, _ = integ_params(suite.integ)
        want = hmac.new(integ_key, bytes(data[:-icvn]), name).digest()[:icvn]
        if not hmac.compare_digest(want, bytes(data[-icvn:])):
            raise IkeError(Notify.AUTHENTICATION_FAILED, "the Encrypted payload's ICV does not "
                           "verify")
        ct = sk.data[ivn:-icvn]
        if len(ct) % CBC_BLOCK:
            raise IkeError(Notify.INVALID_SYNTAX, "ciphertext not a whole number of blocks")
        dec = Cipher(algorithms.AES(encr_key), modes.CBC(iv)).decryptor()
        plain = dec.update(ct) + dec.finalize()
    pad = plain[-1]
    if pad + 1 > len(plain):
        raise IkeError(Notify.INVALID_SYNTAX, f"pad length {pad} in {len(plain)} bytes")
    return decode_payloads(sk.first, plain[:-1 - pad])


__all__ = ["PT", "icv_size", "iv_size", "open_message", "seal"]

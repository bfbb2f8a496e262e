"""The Linux kernel crypto API through AF_ALG sockets: how Linux exposes crypto hardware (QAT,
CCP, CAAM, ...) and its own accelerated code. ``/proc/crypto`` lists the drivers and their
priorities; the kernel picks the highest-priority driver of each algorithm name.

Transforms used, each through its own socket per SA (opened when the SA is built):
- AEAD ``gcm(aes)`` and ``rfc7539(chacha20,poly1305)`` with the 12-byte nonce salt || IV and
  the ESP AAD, which is exactly what the ESP variants ``rfc4106(gcm(aes))`` and
  ``rfc7539esp(chacha20,poly1305)`` compute from their own key and IV layout; the generic
  names take the same request shape for both, and hardware registers both.
- AES-CBC with HMAC: ``ecb(aes)`` (the IV, AES_K(counter)), ``cbc(aes)`` and
  ``hmac(sha256|sha384|sha512)`` as three transforms rather than
  ``authenc(hmac(sha256),cbc(aes))``: the ESN case (seq_hi after the ciphertext) would need
  ``authencesn`` and its own request layout, and the separate transforms give the same bytes.

Discovery (``probe``) opens an AF_ALG socket: where the kernel has none (EAFNOSUPPORT) the
engine is absent with that reason. Then it binds each transform; one the kernel lacks
(ENOENT) is not claimed.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

from cryptography.exceptions import InvalidTag

from ..core.suites import HMACS, AeadSuite, Buffer, Suite
from .base import CBCS, Engine, Probe, Unsupported, check_keys, suite_name
from .frames import CbcHmacFrame

_AEADS = {"aes-gcm-128": "gcm(aes)", "aes-gcm-256": "gcm(aes)",
          "chacha20-poly1305": "rfc7539(chacha20,poly1305)"}
_HMAC_ALGS = {name: f"hmac({mac.digest})" for name, mac in HMACS.items()}
_DIGEST_SIZES = {"sha256": 32, "sha384": 48, "sha512": 64}


def _alg(kind: str, name: str, key: bytes | None = None, authsize: int = 0) -> socket.socket:
    """A bound, keyed transform socket (``accept`` gives the socket requests go through)."""
    tfm = socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0)
    try:
        tfm.bind((kind, name))
        if key is not None:
            tfm.setsockopt(socket.SOL_ALG, socket.ALG_SET_KEY, key)
        if authsize:
            tfm.setsockopt(socket.SOL_ALG, socket.ALG_SET_AEAD_AUTHSIZE, None, authsize)
    except BaseException:
        tfm.close()
        raise
    return tfm


class _Op:
    """One transform and its request socket; the transform socket is kept open with it."""

    def __init__(self, kind: str, name: str, key: bytes | None = None, authsize: int = 0) -> None:
        self.tfm = _alg(kind, name, key, authsize)
        self.op, _ = self.tfm.accept()

    def close(self) -> None:
        self.op.close()
        self.tfm.close()


class _AlgAead:
    """An AF_ALG AEAD shaped as ``core.suites.Aead``. The kernel reads AAD || input and
    writes AAD || output (|| tag when encrypting); a wrong tag is EBADMSG."""

    def __init__(self, alg: str, key: bytes) -> None:
        self._op = _Op("aead", alg, key, 16)
        self._sock = self._op.op

    def encrypt(self, nonce: bytes, data: bytes, associated_data: Buffer | None) -> bytes:
        aad = bytes(associated_data or b"")
        self._sock.sendmsg_afalg([aad + data], op=socket.ALG_OP_ENCRYPT, iv=nonce,
                                 assoclen=len(aad))
        return self._sock.recv(len(aad) + len(data) + 16)[len(aad):]

    def decrypt(self, nonce: bytes, data: Buffer, associated_data: Buffer | None) -> bytes:
        aad = bytes(associated_data or b"")
        msg = aad + bytes(data)
        if len(data) < 16:
            raise InvalidTag
        self._sock.sendmsg_afalg([msg], op=socket.ALG_OP_DECRYPT, iv=nonce, assoclen=len(aad))
        try:
            out = self._sock.recv(len(msg) - 16)
        except OSError as err:
            if err.errno == errno.EBADMSG:
                raise InvalidTag from None
            raise
        return out[len(aad):]

    def __repr__(self) -> str:
        return "<_AlgAead>"


class _AlgCipher:
    def __init__(self, alg: str, key: bytes) -> None:
        self._op = _Op("skcipher", alg, key)
        self._sock = self._op.op

    def run(self, op: int, iv: bytes | None, data: bytes) -> bytes:
        if not data:
            return b""
        if iv is None:
            self._sock.sendmsg_afalg([data], op=op)
        else:
            self._sock.sendmsg_afalg([data], op=op, iv=iv)
        return self._sock.recv(len(data))


class _AlgHash:
    def __init__(self, alg: str, key: bytes, size: int) -> None:
        self._op = _Op("hash", alg, key)
        self._sock = self._op.op
        self._size = size

    def digest(self, data: bytes) -> bytes:
        self._sock.sendall(data)
        return self._sock.recv(self._size)


def _cbc_frame(name: str, key: bytes, integrity: str, ikey: bytes) -> CbcHmacFrame:
    ecb = _AlgCipher("ecb(aes)", key)
    cbc = _AlgCipher("cbc(aes)", key)
    mac = HMACS[integrity]
    hmac_ = _AlgHash(_HMAC_ALGS[integrity], ikey, _DIGEST_SIZES[mac.digest])

    def iv_of(counter: bytes) -> bytes:
        return ecb.run(socket.ALG_OP_ENCRYPT, None, counter)

    def encrypt(iv: bytes, data: bytes) -> bytes:
        return cbc.run(socket.ALG_OP_ENCRYPT, iv, data)

    def decrypt(iv: bytes, data: bytes) -> bytes:
        return cbc.run(socket.ALG_OP_DECRYPT, iv, data)

    return CbcHmacFrame(name, mac.icv_size, iv_of, encrypt, decrypt, hmac_.digest)


def _drivers(names: set[str], proc: Path = Path("/proc/crypto")) -> str:
    """The driver and priority the kernel would pick for each algorithm name, from /proc/crypto."""
    try:
        text = proc.read_text()
    except OSError:
        return ""
    best: dict[str, tuple[int, str]] = {}
    for block in text.split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        name, driver = fields.get("name"), fields.get("driver", "?")
        if name in names:
            prio = int(fields.get("priority", "0") or 0)
            if name not in best or prio > best[name][0]:
                best[name] = (prio, driver)
    return ", ".join(f"{n}: {d} ({p})" for n, (p, d) in sorted(best.items()))


class AfAlgEngine(Engine):
    name = "afalg"
    opens_at_build = True  # a socket per SA (its tfm and operation sockets)

    def probe(self) -> Probe:
        if not hasattr(socket, "AF_ALG"):
            return Probe(frozenset(), absent="this Python's socket module has no AF_ALG")
        try:
            socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0).close()
        except OSError as err:
            code = errno.errorcode.get(err.errno or 0, str(err.errno))
            return Probe(frozenset(), absent=f"kernel has no AF_ALG: {code} ({err.strerror})")
        have: set[str] = set()
        for kind, alg in [("aead", "gcm(aes)"), ("aead", "rfc7539(chacha20,poly1305)"),
                          ("skcipher", "ecb(aes)"), ("skcipher", "cbc(aes)"),
                          *(("hash", a) for a in _HMAC_ALGS.values())]:
            try:
                _alg(kind, alg).close()
            except OSError:
                continue
            have.add(alg)
        suites = {s for s, alg in _AEADS.items() if alg in have}
        if {"ecb(aes)", "cbc(aes)"} <= have:
            suites |= {suite_name(c, h) for c in CBCS for h, a in _HMAC_ALGS.items() if a in have}
        if not suites:
            return Probe(frozenset(), absent="AF_ALG has none of gcm(aes), "
                         "rfc7539(chacha20,poly1305), cbc(aes) with hmac(sha2)")
        return Probe(frozenset(suites), detail=_drivers(have))

    def build(self, encryption: str, key: bytes, integrity: str | None, integrity_key: bytes) -> Suite:
        check_keys(encryption, key, integrity, integrity_key)
        if encryption in _AEADS:
            size = len(key) - 4
            return AeadSuite(encryption, _AlgAead(_AEADS[encryption], key[:size]), key[size:])
        if encryption in CBCS and integrity is not None:
            return _cbc_frame(suite_name(encryption, integrity), key, integrity, integrity_key)
        raise Unsupported(f"afalg engine has no {suite_name(encryption, integrity)}")

"""Known-answer tests of an engine's suites, from the published vectors shipped in
``vectors/`` (the unit tests read the same files), and a few milliseconds of speed.

Per suite, through the engine's own ``Suite`` (built as an SA's would be):
- AES-GCM: every draft-mcgrew-gcm-test-01 case of that key size (32-bit and extended sequence
  numbers): open gives the plaintext, seal with the vector's IV as the sequence number gives
  the packet, a flipped tag bit is an integrity drop.
- ChaCha20-Poly1305: RFC 7634 Appendix A the same way.
- AES-CBC with HMAC: NIST SP 800-38A's ECB blocks P1..P4 -> C1..C4 under the key. Sealing at
  the sequence number P1 must give the IV C1 (AES_K(counter)); the plaintext
  (P2^C1) || (P3^C2) || (P4^C3) must then encrypt to C2 || C3 || C4: every byte before the ICV
  is published. The ICV is computed with the standard library's HMAC, itself first checked
  against RFC 4868's vector for that hash; with and without ESN. AES-128 also opens RFC 3602's
  cases 5 and 7.
- null with HMAC: RFC 4868's authenticators through the suite's ICV.

The vector files are read when this module is imported (worker start), never later.
"""

from __future__ import annotations

import hmac
import os
import re
import time
from collections.abc import Callable
from importlib import resources

from ..core.errors import DropReason, EspError
from ..core.suites import ENCRYPTION, HMACS, Suite
from .base import AEADS, CBCS, suite_name

Build = Callable[[str, bytes, "str | None", bytes], Suite]
Vector = dict[str, str]

_FIELD = re.compile(r"^\s*([a-z+_]+)\s*=\s*(.*?)\s*$")
_OCTETS = re.compile(r"^\s*\((\d+) octets\)\s*$")


def parse_vectors(text: str, first_field: str) -> list[Vector]:
    """Blocks of ``name = hex`` fields with indented continuation lines and ``(N octets)``
    length notes (checked); a block starts at ``first_field``. Raises ValueError."""
    blocks: list[Vector] = []
    last = ""
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        field = _FIELD.match(raw)
        octets = _OCTETS.match(line)
        if field and not octets:
            name, value = field.groups()
            if name == first_field:
                blocks.append({})
            if not blocks:
                raise ValueError(f"line {lineno}: a field before the first {first_field}")
            blocks[-1][name] = "" if _OCTETS.match(value) else value
            last = name
        elif octets:
            if len(bytes.fromhex(blocks[-1][last])) != int(octets.group(1)):
                raise ValueError(f"line {lineno}: {last} is not {octets.group(1)} octets")
        else:
            blocks[-1][last] += line
    return blocks


def load(filename: str, first_field: str) -> list[Vector]:
    return parse_vectors(resources.files(__package__).joinpath("vectors").joinpath(filename).read_text(),
                         first_field)


MCGREW = load("draft-mcgrew-gcm-test-01.txt", "algorithm")
RFC7634 = load("rfc7634-appendix-a.txt", "key")[0]
RFC4868 = load("rfc4868-auth.txt", "case")
RFC3602 = load("rfc3602-esp.txt", "case")
ECB = {len(bytes.fromhex(v["key"])): v for v in load("sp800-38a-ecb.txt", "case")}


class KatFailure(Exception):
    """A known answer not given. The message names the suite and the vector, no key."""


def _h(v: Vector, name: str) -> bytes:
    return bytes.fromhex(v[name])


def _expect(what: str, got: object, want: object) -> None:
    if got != want:
        raise KatFailure(f"{what}: wrong output")


def _expect_integrity(what: str, suite: Suite, header: bytes, seq_hi: bytes, body: bytes) -> None:
    bad = bytearray(body)
    bad[-1] ^= 0x01
    try:
        suite.open(header, seq_hi, bytes(bad))
    except EspError as err:
        if err.reason is DropReason.INTEGRITY:
            return
        raise KatFailure(f"{what}: a flipped ICV bit gave {err.reason.value}") from None
    raise KatFailure(f"{what}: a flipped ICV bit was accepted")


def _aead_case(build: Build, name: str, what: str, keymat: bytes, packet: bytes, seq_hi: bytes,
               iv: bytes, plaintext: bytes) -> None:
    suite = build(name, keymat, None, b"")
    header, body = packet[:8], packet[8:]
    _expect(f"{what} open", suite.open(header, seq_hi, body), plaintext)
    _expect(f"{what} seal", suite.seal(header, seq_hi, int.from_bytes(iv, "big"), plaintext), body)
    _expect_integrity(what, suite, header, seq_hi, body)


def _gcm(build: Build, name: str) -> None:
    size = {"aes-gcm-128": 16, "aes-gcm-256": 32}[name]
    cases = [(n, v) for n, v in enumerate(MCGREW, 1)
             if v["algorithm"] == "AES-GCM-ESP" and len(_h(v, "key")) == size]
    if not cases:
        raise KatFailure(f"{name}: no vectors")
    for n, v in cases:
        seq = _h(v, "seq")
        seq_hi = seq[:4] if len(seq) == 8 else b""
        nonce = _h(v, "nonce")
        _aead_case(build, name, f"{name} draft-mcgrew case {n}", _h(v, "key") + nonce[:4],
                   _h(v, "packet"), seq_hi, nonce[4:], _h(v, "plaintext"))


def _chacha(build: Build, name: str) -> None:
    v = RFC7634
    _aead_case(build, name, f"{name} RFC 7634 A", _h(v, "key") + _h(v, "salt"), _h(v, "packet"),
               b"", _h(v, "iv"), _h(v, "plaintext"))


def _reference_hmac(digest: str) -> tuple[bytes, Callable[[bytes], bytes]]:
    """The standard library's HMAC under RFC 4868's first key for ``digest``, checked against
    that vector's authenticator first."""
    v = next(v for v in RFC4868 if v["digest"] == digest)
    key = _h(v, "key")
    if hmac.digest(key, _h(v, "data"), digest) != _h(v, "prf"):
        raise KatFailure(f"reference HMAC-{digest} fails RFC 4868 {v['case']}")
    return key, lambda data: hmac.digest(key, data, digest)


def _cbc(build: Build, name: str) -> None:
    encryption, integrity = name.split("+")
    mac = HMACS[integrity]
    ikey, ref = _reference_hmac(mac.digest)
    v = ECB[{"aes-cbc-128": 16, "aes-cbc-256": 32}[encryption]]
    p = [_h(v, "plaintext")[i : i + 16] for i in range(0, 64, 16)]
    c = [_h(v, "ciphertext")[i : i + 16] for i in range(0, 64, 16)]
    plaintext = b"".join(bytes(a ^ b for a, b in zip(p[i + 1], c[i], strict=True)) for i in range(3))
    seq = int.from_bytes(p[0], "big")
    suite = build(encryption, _h(v, "key"), integrity, ikey)
    for seq_hi in (b"", b"\x00\x00\x00\x01"):
        what = f"{name} SP 800-38A {v['case']}{' ESN' if seq_hi else ''}"
        header = b"\x00\x00\x43\x21" + (seq & 0xFFFFFFFF).to_bytes(4, "big")
        body = b"".join(c)
        body += ref(header + body + seq_hi)[: mac.icv_size]
        _expect(f"{what} seal", suite.seal(header, seq_hi, seq, plaintext), body)
        _expect(f"{what} open", suite.open(header, seq_hi, body), plaintext)
        _expect_integrity(what, suite, header, seq_hi, body)
    if encryption == "aes-cbc-128":
        for v in RFC3602:
            esp = _h(v, "esp")
            suite = build(encryption, _h(v, "key"), integrity, ikey)
            body = esp[8:] + ref(esp)[: mac.icv_size]
            _expect(f"{name} RFC 3602 case {v['case']} open", suite.open(esp[:8], b"", body),
                    _h(v, "plaintext"))


def _null(build: Build, name: str) -> None:
    integrity = name.split("+")[1]
    for v in RFC4868:
        if HMACS[integrity].digest != v["digest"]:
            continue
        data, auth = _h(v, "data"), _h(v, "auth")
        suite = build("null", b"", integrity, _h(v, "key"))
        _expect(f"{name} RFC 4868 {v['case']} seal", suite.seal(data[:8], b"", 1, data[8:]),
                data[8:] + auth)


def run(build: Build, suite: str) -> None:
    """The known-answer tests of ``suite`` through ``build``. Raises KatFailure, or whatever
    the engine raises (the caller treats any exception as a failure)."""
    if suite in ("aes-gcm-128", "aes-gcm-256"):
        _gcm(build, suite)
    elif suite == "chacha20-poly1305":
        _chacha(build, suite)
    elif suite.split("+")[0] in CBCS:
        _cbc(build, suite)
    elif suite.startswith("null+"):
        _null(build, suite)
    else:
        raise KatFailure(f"{suite}: no known-answer test")


KATS = (*AEADS, *(suite_name(c, h) for c in CBCS for h in HMACS))


def speed(build: Build, suite: str, seconds: float = 0.002, size: int = 1408) -> float:
    """Bytes per second sealed, over about ``seconds`` of sealing ``size``-byte packets (whole
    AES blocks) under a random key: the same work for every engine, so the figures compare."""
    encryption, _, integrity = suite.partition("+")
    keymat = os.urandom(ENCRYPTION[encryption].keymat_size)
    ikey = os.urandom(HMACS[integrity].key_size) if integrity else b""
    s = build(encryption, keymat, integrity or None, ikey)
    plaintext = bytes(size)
    header = b"\x00\x00\x01\x00\x00\x00\x00\x01"
    s.seal(header, b"", 1, plaintext)  # warm
    best = 0.0
    n = 2
    for _ in range(3):  # the best of three short runs: a run the scheduler cut is not the speed
        done = 0
        start = now = time.perf_counter()
        end = start + seconds / 3
        while now < end:
            for _ in range(4):
                s.seal(header, b"", n, plaintext)
                n += 1
            done += 4
            now = time.perf_counter()
        best = max(best, done * size / (now - start))
    return best

"""IKEv2 key derivation (RFC 7296 sections 2.13, 2.14, 2.17, 2.18) and the PSK AUTH value
(section 2.15).

Key lengths: an AEAD cipher's key material is its key plus a 4-byte salt (RFC 5282 section
7.1 for AES-GCM, RFC 7634 section 2 for ChaCha20-Poly1305); AES-CBC takes its key length; an
HMAC-SHA2 integrity key is as long as the hash output (RFC 4868), and so is a PRF key
(SK_d, SK_pi, SK_pr). Every ``bytes`` here is secret: nothing in this module formats a key.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from .errors import IkeError, Notify
from .proposal import AEAD, Encr, Integ, Prf, Proposal, TransformType

_PRF_HASH = {Prf.HMAC_SHA2_256: "sha256", Prf.HMAC_SHA2_384: "sha384", Prf.HMAC_SHA2_512: "sha512"}
_INTEG = {  # hash, key length, ICV length
    Integ.HMAC_SHA2_256_128: ("sha256", 32, 16),
    Integ.HMAC_SHA2_384_192: ("sha384", 48, 24),
    Integ.HMAC_SHA2_512_256: ("sha512", 64, 32),
}
AEAD_SALT = 4
PSK_PAD = b"Key Pad for IKEv2"


def prf(alg: int, key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, _PRF_HASH[Prf(alg)]).digest()


def prf_plus(alg: int, key: bytes, seed: bytes, length: int) -> bytes:
    """prf+ (section 2.13): T1 | T2 | ... with Tn = prf(K, Tn-1 | S | n), at most 255 blocks."""
    out, t, n = b"", b"", 1
    while len(out) < length:
        if n > 255:
            raise IkeError(Notify.INVALID_SYNTAX, "prf+ asked for more than 255 blocks")
        t = prf(alg, key, t + seed + bytes([n]))
        out += t
        n += 1
    return out[:length]


def prf_size(alg: int) -> int:
    return hashlib.new(_PRF_HASH[Prf(alg)]).digest_size


def integ_params(alg: int) -> tuple[str, int, int]:
    """(hash name, key length, ICV length) of an HMAC-SHA2 integrity transform."""
    return _INTEG[Integ(alg)]


def encr_key_size(encr: int, key_bits: int | None) -> int:
    """Bytes of key material an encryption transform takes (AEAD: key + salt)."""
    if encr == Encr.CHACHA20_POLY1305:
        return 32 + AEAD_SALT
    if key_bits is None:
        raise IkeError(Notify.INVALID_SYNTAX, f"encryption {encr} needs a key length")
    return key_bits // 8 + (AEAD_SALT if encr in AEAD else 0)


@dataclass(frozen=True)
class Suite:
    """What a chosen proposal means for keys: encryption (with key bits), integrity (NONE
    for AEAD), PRF (IKE SAs only)."""

    encr: int
    key_bits: int | None
    integ: int
    prf: int = 0

    @classmethod
    def of(cls, prop: Proposal) -> Suite:
        e = prop.one(TransformType.ENCR)
        if e is None:
            raise IkeError(Notify.NO_PROPOSAL_CHOSEN, "no encryption transform")
        i = prop.one(TransformType.INTEG)
        p = prop.one(TransformType.PRF)
        integ = i.id if i is not None else Integ.NONE
        if e.id in AEAD and integ != Integ.NONE:
            raise IkeError(Notify.NO_PROPOSAL_CHOSEN, "an AEAD cipher with an integrity transform")
        if e.id not in AEAD and integ == Integ.NONE:
            raise IkeError(Notify.NO_PROPOSAL_CHOSEN, "a non-AEAD cipher without integrity")
        return cls(e.id, e.key_length, integ, p.id if p is not None else 0)

    @property
    def aead(self) -> bool:
        return self.encr in AEAD

    @property
    def encr_size(self) -> int:
        return encr_key_size(self.encr, self.key_bits)

    @property
    def integ_size(self) -> int:
        return 0 if self.aead else integ_params(self.integ)[1]


@dataclass(frozen=True)
class IkeKeys:
    """The seven keys of an IKE SA (section 2.14). The repr shows none of them."""

    suite: Suite
    sk_d: bytes = field(repr=False)
    sk_ai: bytes = field(repr=False)
    sk_ar: bytes = field(repr=False)
    sk_ei: bytes = field(repr=False)
    sk_er: bytes = field(repr=False)
    sk_pi: bytes = field(repr=False)
    sk_pr: bytes = field(repr=False)


def skeyseed(prf_alg: int, ni: bytes, nr: bytes, shared: bytes) -> bytes:
    """SKEYSEED = prf(Ni | Nr, g^ir) for a new IKE SA (section 2.14)."""
    return prf(prf_alg, ni + nr, shared)


def rekeyed_skeyseed(prf_alg: int, old_sk_d: bytes, shared: bytes, ni: bytes, nr: bytes) -> bytes:
    """SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr) for a rekeyed IKE SA (section 2.18)."""
    return prf(prf_alg, old_sk_d, shared + ni + nr)


def ike_keys(suite: Suite, seed: bytes, ni: bytes, nr: bytes, spi_i: bytes,
             spi_r: bytes, derive_prf: int = 0) -> IkeKeys:
    """{SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr} = prf+(SKEYSEED, Ni | Nr | SPIi |
    SPIr), in that order. ``derive_prf``: the PRF that runs prf+ when it is not the suite's
    (a rekeyed IKE SA's keys come from the old SA's PRF, as strongSwan derives them); the key
    lengths are always the new suite's."""
    p = prf_size(suite.prf)
    a, e = suite.integ_size, suite.encr_size
    km = prf_plus(derive_prf or suite.prf, seed, ni + nr + spi_i + spi_r, 3 * p + 2 * a + 2 * e)
    cuts = [p, a, a, e, e, p, p]
    parts: list[bytes] = []
    at = 0
    for n in cuts:
        parts.append(km[at:at + n])
        at += n
    return IkeKeys(suite, *parts)


@dataclass(frozen=True)
class ChildKeys:
    """Keys of a Child SA pair (section 2.17): ``*_i`` protect what the initiator sends."""

    encr_i: bytes = field(repr=False)
    integ_i: bytes = field(repr=False)
    encr_r: bytes = field(repr=False)
    integ_r: bytes = field(repr=False)


def child_keys(prf_alg: int, sk_d: bytes, child: Suite, ni: bytes, nr: bytes,
               shared: bytes = b"") -> ChildKeys:
    """KEYMAT = prf+(SK_d, [g^ir (new) |] Ni | Nr), taken as the initiator's encryption and
    integrity keys, then the responder's. ``shared`` is the fresh DH value of a
    CREATE_CHILD_SA with PFS, empty otherwise."""
    e, a = child.encr_size, child.integ_size
    km = prf_plus(prf_alg, sk_d, shared + ni + nr, 2 * (e + a))
    return ChildKeys(km[:e], km[e:e + a], km[e + a:2 * e + a], km[2 * e + a:])


def psk_auth(prf_alg: int, psk: bytes, signed_octets: bytes) -> bytes:
    """AUTH = prf(prf(Shared Secret, "Key Pad for IKEv2"), <SignedOctets>) (section 2.15)."""
    return prf(prf_alg, prf(prf_alg, psk, PSK_PAD), signed_octets)


def signed_octets(first_message: bytes, peer_nonce: bytes, prf_alg: int, sk_p: bytes,
                  id_body: bytes) -> bytes:
    """<SignedOctets> of one side (section 2.15): its own first message, the other side's
    nonce data, and prf(SK_p, the body of its own ID payload). The initiator uses SK_pi,
    the responder SK_pr."""
    return first_message + peer_nonce + prf(prf_alg, sk_p, id_body)


def auth_matches(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)

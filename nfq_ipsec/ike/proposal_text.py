"""Proposal strings in strongSwan's spelling (``aes128gcm16-prfsha256-x25519``,
``aes256-sha256-ecp384``), read into one SA payload proposal.

The words known are those of RFC 8247's set that ``proposal`` accepts. A word for an algorithm
RFC 8247 or RFC 8221 forbids or discourages is refused with the reason, as the ESP
configuration refuses one; any other word is unknown. An IKE proposal needs an encryption
algorithm and a DH group, and a PRF (given, or the one of its HMAC); an ESP proposal needs an
encryption algorithm, an HMAC unless it is an AEAD, and gets ESN "no" unless ``esn`` is named
(a DH group in it asks for PFS on rekeys).
"""

from __future__ import annotations

from .proposal import AEAD, Encr, Group, Integ, Prf, Proposal, Protocol, SAPayload, Transform, TransformType

ENCR: dict[str, tuple[Encr, int | None]] = {
    "aes128gcm16": (Encr.AES_GCM_16, 128), "aes192gcm16": (Encr.AES_GCM_16, 192),
    "aes256gcm16": (Encr.AES_GCM_16, 256), "chacha20poly1305": (Encr.CHACHA20_POLY1305, None),
    "aes128": (Encr.AES_CBC, 128), "aes192": (Encr.AES_CBC, 192), "aes256": (Encr.AES_CBC, 256),
}
INTEG: dict[str, Integ] = {"sha256": Integ.HMAC_SHA2_256_128, "sha384": Integ.HMAC_SHA2_384_192,
                           "sha512": Integ.HMAC_SHA2_512_256}
PRF: dict[str, Prf] = {"prfsha256": Prf.HMAC_SHA2_256, "prfsha384": Prf.HMAC_SHA2_384,
                       "prfsha512": Prf.HMAC_SHA2_512}
DH: dict[str, Group] = {"x25519": Group.CURVE25519, "curve25519": Group.CURVE25519,
                        "ecp256": Group.ECP_256, "ecp384": Group.ECP_384}
_PRF_OF_INTEG = {Integ.HMAC_SHA2_256_128: Prf.HMAC_SHA2_256, Integ.HMAC_SHA2_384_192: Prf.HMAC_SHA2_384,
                 Integ.HMAC_SHA2_512_256: Prf.HMAC_SHA2_512}

_MODP_WEAK = "MODP groups below 3072 bits are SHOULD NOT or MUST NOT in RFC 8247; use x25519"
WEAK: dict[str, str] = {
    "des": "DES is MUST NOT in RFC 8247 (56-bit key); use aes128gcm16",
    "3des": "3DES is MAY in RFC 8247 only for old peers (64-bit block); use aes128gcm16",
    "blowfish": "Blowfish is MUST NOT in RFC 8221",
    "cast128": "CAST is MUST NOT in RFC 8221",
    "null": "NULL encryption is refused for a negotiated SA",
    "aes128gcm8": "AES-GCM with an 8-octet ICV is SHOULD NOT in RFC 8247; use aes128gcm16",
    "aes256gcm8": "AES-GCM with an 8-octet ICV is SHOULD NOT in RFC 8247; use aes256gcm16",
    "aes128gcm12": "AES-GCM with a 12-octet ICV is SHOULD NOT in RFC 8247; use aes128gcm16",
    "aes256gcm12": "AES-GCM with a 12-octet ICV is SHOULD NOT in RFC 8247; use aes256gcm16",
    "md5": "HMAC-MD5 is MUST NOT in RFC 8247; use sha256",
    "sha1": "HMAC-SHA1 is MUST- in RFC 8247 and refused here; use sha256",
    "sha": "HMAC-SHA1 is MUST- in RFC 8247 and refused here; use sha256",
    "aesxcbc": "AES-XCBC is not supported here; use sha256",
    "prfmd5": "PRF_HMAC_MD5 is MUST NOT in RFC 8247; use prfsha256",
    "prfsha1": "PRF_HMAC_SHA1 is MUST- in RFC 8247 and refused here; use prfsha256",
    "modp768": _MODP_WEAK, "modp1024": _MODP_WEAK, "modp1536": _MODP_WEAK, "modp2048": _MODP_WEAK,
    "modp1024s160": _MODP_WEAK, "modp2048s224": _MODP_WEAK, "modp2048s256": _MODP_WEAK,
}


# What the ESP data plane (``nfq_ipsec.core.suites``) calls each negotiable algorithm: a Child
# SA's encryption by (ENCR id, key bits), its integrity by INTEG id.
DATA_PLANE_ENCR: dict[tuple[int, int | None], str] = {
    (Encr.AES_GCM_16, 128): "aes-gcm-128", (Encr.AES_GCM_16, 256): "aes-gcm-256",
    (Encr.CHACHA20_POLY1305, None): "chacha20-poly1305",
    (Encr.AES_CBC, 128): "aes-cbc-128", (Encr.AES_CBC, 256): "aes-cbc-256",
}
DATA_PLANE_INTEG: dict[int, str] = {
    Integ.HMAC_SHA2_256_128: "hmac-sha256-128", Integ.HMAC_SHA2_384_192: "hmac-sha384-192",
    Integ.HMAC_SHA2_512_256: "hmac-sha512-256",
}


class ProposalTextError(ValueError):
    """Why a proposal string can't be used (the string holds no secret; it may be quoted)."""


def parse(text: str, protocol: Protocol) -> SAPayload:
    """One proposal from ``text`` for IKE or ESP (ProposalTextError with the reason)."""
    if protocol not in (Protocol.IKE, Protocol.ESP):
        raise ProposalTextError(f"no proposal strings for {protocol.name}")
    encr: list[Transform] = []
    integ: list[Transform] = []
    prf: list[Transform] = []
    dh: list[Transform] = []
    esn = False
    words = text.lower().split("-") if text else []
    if not words or any(not w for w in words):
        raise ProposalTextError(f"{text!r} is not a proposal (words joined by '-', for example "
                                "aes128gcm16-prfsha256-x25519)")
    for word in words:
        if word in WEAK:
            raise ProposalTextError(f"{word} is refused: {WEAK[word]}")
        if word in ENCR:
            encr.append(Transform(TransformType.ENCR, ENCR[word][0], ENCR[word][1]))
        elif word in INTEG:
            integ.append(Transform(TransformType.INTEG, INTEG[word]))
        elif word in PRF:
            prf.append(Transform(TransformType.PRF, PRF[word]))
        elif word in DH:
            dh.append(Transform(TransformType.DH, DH[word]))
        elif word in ("esn", "noesn") and protocol is Protocol.ESP:
            esn = word == "esn"
        else:
            raise ProposalTextError(f"unknown word {word!r} in {text!r} (known: "
                                    f"{', '.join(_known(protocol))})")
    if len(encr) != 1:
        raise ProposalTextError(f"{text!r} needs exactly one encryption algorithm "
                                f"({', '.join(ENCR)}), got {len(encr)}")
    aead = encr[0].id in AEAD
    if aead and integ:
        raise ProposalTextError(f"{text!r}: an AEAD ({words[0] if words[0] in ENCR else 'its cipher'}) "
                                "takes no separate integrity algorithm")
    if not aead and len(integ) != 1:
        raise ProposalTextError(f"{text!r}: AES-CBC needs one integrity algorithm ({', '.join(INTEG)})")
    if len(prf) > 1 or len(dh) > 1:
        raise ProposalTextError(f"{text!r}: one PRF and one DH group at most")
    if protocol is Protocol.ESP:
        if prf:
            raise ProposalTextError(f"{text!r}: an ESP proposal takes no PRF")
        if (encr[0].id, encr[0].key_length) not in DATA_PLANE_ENCR:
            raise ProposalTextError(f"{text!r}: the ESP data plane has no 192-bit AES; use "
                                    "128 or 256 bits")
        return SAPayload((Proposal(1, protocol, b"", (
            *encr, *integ, *dh, Transform(TransformType.ESN, 1 if esn else 0))),))
    if not dh:
        raise ProposalTextError(f"{text!r}: an IKE proposal needs a DH group ({', '.join(DH)})")
    if not prf:
        if not integ:
            raise ProposalTextError(f"{text!r}: an AEAD IKE proposal needs a PRF ({', '.join(PRF)})")
        prf = [Transform(TransformType.PRF, _PRF_OF_INTEG[Integ(integ[0].id)])]
    return SAPayload((Proposal(1, protocol, b"", (*encr, *prf, *integ, *dh)),))


def _known(protocol: Protocol) -> list[str]:
    words = [*ENCR, *INTEG, *DH]
    return [*words, *PRF] if protocol is Protocol.IKE else [*words, "esn", "noesn"]

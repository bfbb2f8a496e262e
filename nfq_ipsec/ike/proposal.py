"""The SA payload's proposals and transforms (RFC 7296 section 3.3), and choosing one.

Only what RFC 8247 lets an implementation use today is known here: AES-GCM-16 and
ChaCha20-Poly1305 (AEAD), AES-CBC with HMAC-SHA2, PRFs HMAC-SHA2-256/384/512, and the DH groups
19, 20 and 31. A proposal that needs anything else is not chosen, and the refusal says which
transform was missing (``NO_PROPOSAL_CHOSEN``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from .errors import IkeError, Notify


class Protocol(IntEnum):
    IKE = 1
    AH = 2
    ESP = 3


class TransformType(IntEnum):
    ENCR = 1
    PRF = 2
    INTEG = 3
    DH = 4
    ESN = 5


class Encr(IntEnum):
    AES_CBC = 12
    AES_GCM_16 = 20
    CHACHA20_POLY1305 = 28


class Prf(IntEnum):
    HMAC_SHA2_256 = 5
    HMAC_SHA2_384 = 6
    HMAC_SHA2_512 = 7


class Integ(IntEnum):
    NONE = 0
    HMAC_SHA2_256_128 = 12
    HMAC_SHA2_384_192 = 13
    HMAC_SHA2_512_256 = 14


class Group(IntEnum):
    NONE = 0
    ECP_256 = 19
    ECP_384 = 20
    CURVE25519 = 31


class Esn(IntEnum):
    NO = 0
    YES = 1


KEY_LENGTH_ATTRIBUTE = 14  # the only transform attribute (TV format)
AEAD: frozenset[int] = frozenset({Encr.AES_GCM_16, Encr.CHACHA20_POLY1305})
_KEY_LENGTHS: dict[int, frozenset[int]] = {
    Encr.AES_CBC: frozenset({128, 192, 256}),
    Encr.AES_GCM_16: frozenset({128, 192, 256}),
}
_KNOWN: dict[TransformType, type[IntEnum]] = {
    TransformType.ENCR: Encr, TransformType.PRF: Prf, TransformType.INTEG: Integ,
    TransformType.DH: Group, TransformType.ESN: Esn,
}


@dataclass(frozen=True)
class Transform:
    type: int
    id: int
    key_length: int | None = None  # bits, for variable-length ciphers

    def describe(self) -> str:
        """A name for logs and refusals: ``ENCR_AES_GCM_16_256``, ``DH_31``, ``PRF_7``."""
        try:
            ttype = TransformType(self.type)
        except ValueError:
            return f"TYPE{self.type}_{self.id}"
        kind = _KNOWN[ttype]
        name = kind(self.id).name if self.id in kind._value2member_map_ else str(self.id)
        tname = ttype.name
        return f"{tname}_{name}" + (f"_{self.key_length}" if self.key_length else "")


@dataclass(frozen=True)
class Proposal:
    number: int
    protocol: int
    spi: bytes
    transforms: tuple[Transform, ...]

    def of_type(self, kind: TransformType) -> list[Transform]:
        return [t for t in self.transforms if t.type == kind]

    def one(self, kind: TransformType) -> Transform | None:
        """The chosen transform of ``kind`` (a chosen proposal has at most one per type)."""
        found = self.of_type(kind)
        return found[0] if found else None


@dataclass(frozen=True)
class SAPayload:
    proposals: tuple[Proposal, ...] = field(default_factory=tuple)


def _u16(data: bytes, at: int) -> int:
    return (data[at] << 8) | data[at + 1]


def decode_sa(body: bytes) -> SAPayload:
    """The proposals of an SA payload's body; malformed structure is INVALID_SYNTAX."""
    proposals: list[Proposal] = []
    at, last = 0, False
    while at < len(body):
        if last:
            raise IkeError(Notify.INVALID_SYNTAX, "data after the last proposal")
        if len(body) - at < 8:
            raise IkeError(Notify.INVALID_SYNTAX, "proposal header cut short")
        more, length = body[at], _u16(body, at + 2)
        number, protocol, spi_size, count = body[at + 4], body[at + 5], body[at + 6], body[at + 7]
        if more not in (0, 2) or length < 8 + spi_size or at + length > len(body):
            raise IkeError(Notify.INVALID_SYNTAX, f"proposal {number}: bad length or marker")
        if number != len(proposals) + 1:
            raise IkeError(Notify.INVALID_SYNTAX, f"proposal numbered {number}, expected "
                           f"{len(proposals) + 1}")
        spi = bytes(body[at + 8:at + 8 + spi_size])
        transforms = _decode_transforms(body[at + 8 + spi_size:at + length], count, number)
        proposals.append(Proposal(number, protocol, spi, transforms))
        last = more == 0
        at += length
    if not proposals or not last:
        raise IkeError(Notify.INVALID_SYNTAX, "an SA payload without a last proposal")
    return SAPayload(tuple(proposals))


def _decode_transforms(data: bytes, count: int, number: int) -> tuple[Transform, ...]:
    out: list[Transform] = []
    at = 0
    while at < len(data):
        if len(data) - at < 8:
            raise IkeError(Notify.INVALID_SYNTAX, f"proposal {number}: transform cut short")
        more, length = data[at], _u16(data, at + 2)
        if more not in (0, 3) or length < 8 or at + length > len(data):
            raise IkeError(Notify.INVALID_SYNTAX, f"proposal {number}: bad transform")
        kind, tid = data[at + 4], _u16(data, at + 6)
        key_length = None
        a = at + 8
        while a < at + length:
            if at + length - a < 4:
                raise IkeError(Notify.INVALID_SYNTAX, f"proposal {number}: attribute cut short")
            atype = _u16(data, a)
            if atype & 0x8000:  # TV: the value is the next two bytes
                if atype & 0x7FFF == KEY_LENGTH_ATTRIBUTE:
                    key_length = _u16(data, a + 2)
                a += 4
            else:  # TLV: unknown to us; a transform with it is one we can't choose
                a += 4 + _u16(data, a + 2)
                key_length = -1
        if a != at + length:
            raise IkeError(Notify.INVALID_SYNTAX, f"proposal {number}: attributes overrun")
        out.append(Transform(kind, tid, key_length))
        at += length
        if more == 0:
            if at != len(data):
                raise IkeError(Notify.INVALID_SYNTAX, f"proposal {number}: data after transforms")
            break
    if len(out) != count:
        raise IkeError(Notify.INVALID_SYNTAX, f"proposal {number}: {len(out)} transforms, "
                       f"header says {count}")
    return tuple(out)


def encode_sa(sa: SAPayload) -> bytes:
    parts = []
    for i, prop in enumerate(sa.proposals):
        transforms = b"".join(
            _encode_transform(t, last=j == len(prop.transforms) - 1)
            for j, t in enumerate(prop.transforms))
        length = 8 + len(prop.spi) + len(transforms)
        more = 0 if i == len(sa.proposals) - 1 else 2
        parts.append(bytes([more, 0]) + length.to_bytes(2, "big")
                     + bytes([prop.number, prop.protocol, len(prop.spi), len(prop.transforms)])
                     + prop.spi + transforms)
    return b"".join(parts)


def _encode_transform(t: Transform, last: bool) -> bytes:
    attrs = b""
    if t.key_length is not None:
        attrs = (0x8000 | KEY_LENGTH_ATTRIBUTE).to_bytes(2, "big") + t.key_length.to_bytes(2, "big")
    return (bytes([0 if last else 3, 0]) + (8 + len(attrs)).to_bytes(2, "big")
            + bytes([t.type, 0]) + t.id.to_bytes(2, "big") + attrs)


def acceptable(t: Transform) -> bool:
    """Whether we can use this transform at all (RFC 8247's set, with a valid key length)."""
    try:
        kind = TransformType(t.type)
    except ValueError:
        return False
    if t.id not in _KNOWN[kind]._value2member_map_:
        return False
    if kind is TransformType.ENCR:
        if t.id == Encr.CHACHA20_POLY1305:
            return t.key_length is None
        return t.key_length in _KEY_LENGTHS[t.id]
    return t.key_length is None


def choose(offered: SAPayload, ours: SAPayload) -> Proposal:
    """The responder's choice (RFC 7296 section 2.7): the first offered proposal of which every
    transform type has a transform that one of ours also has, reduced to one transform per
    type; our proposals' order decides among the transforms of a type. Refused with
    NO_PROPOSAL_CHOSEN, naming what the last candidate lacked."""
    why = "no proposal offered"
    for prop in offered.proposals:
        for mine in ours.proposals:
            if mine.protocol != prop.protocol:
                why = f"proposal {prop.number} is for protocol {prop.protocol}"
                continue
            picked: list[Transform] = []
            missing = None
            kinds = sorted({t.type for t in prop.transforms} | {t.type for t in mine.transforms})
            for kind in kinds:
                theirs = [t for t in prop.transforms if t.type == kind and acceptable(t)]
                if kind == TransformType.ESN and not theirs and not mine.of_type(TransformType.ESN):
                    continue
                match = next((t for t in mine.transforms if t.type == kind and t in theirs), None)
                if match is None:
                    missing = kind
                    break
                picked.append(match)
            if missing is None:
                return Proposal(prop.number, prop.protocol, prop.spi, tuple(picked))
            offers = ", ".join(t.describe() for t in prop.transforms if t.type == missing) or "none"
            kind_name = (TransformType(missing).name if missing in TransformType._value2member_map_
                         else f"type-{missing}")
            why = f"proposal {prop.number}: no acceptable {kind_name} transform (offered: {offers})"
    raise IkeError(Notify.NO_PROPOSAL_CHOSEN, why)


def check_chosen(answer: SAPayload, offered: SAPayload) -> Proposal:
    """The initiator's check of the responder's answer: exactly one proposal, one transform
    per type, and all of it from the proposal of that number we offered."""
    if len(answer.proposals) != 1:
        raise IkeError(Notify.INVALID_SYNTAX, f"{len(answer.proposals)} proposals in an answer")
    got = answer.proposals[0]
    ours = next((p for p in offered.proposals if p.number == got.number), None)
    if ours is None or ours.protocol != got.protocol:
        raise IkeError(Notify.NO_PROPOSAL_CHOSEN, f"answer names proposal {got.number}, not ours")
    kinds = [t.type for t in got.transforms]
    if len(set(kinds)) != len(kinds) or any(t not in ours.transforms for t in got.transforms):
        raise IkeError(Notify.NO_PROPOSAL_CHOSEN, "answer holds transforms we did not offer")
    if {t.type for t in ours.transforms} != set(kinds):
        raise IkeError(Notify.NO_PROPOSAL_CHOSEN, "answer lacks a transform type we offered")
    return got

"""Diffie-Hellman for IKEv2: groups 19 and 20 (RFC 5903) and 31 (curve25519, RFC 8031).

The private value comes in as bytes from the caller (sans-IO: no random source here). Key
Exchange data is x || y for the NIST curves (no point-format byte, RFC 5903 section 7) and the
32-byte u-coordinate for curve25519; the shared secret is the x-coordinate (RFC 5903 section
7, as corrected by its erratum) or the X25519 output. A peer's value that is of the wrong
length, not on the curve, or gives an all-zero X25519 result (RFC 8031 section 2.3) is
refused with INVALID_SYNTAX.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec, x25519

from .errors import IkeError, Notify
from .proposal import Group


@dataclass(frozen=True)
class _Curve:
    curve: ec.EllipticCurve
    size: int  # bytes per coordinate
    order: int


_NIST = {
    Group.ECP_256: _Curve(ec.SECP256R1(), 32,
                          0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551),
    Group.ECP_384: _Curve(ec.SECP384R1(), 48, int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973",
        16)),
}
SUPPORTED: frozenset[int] = frozenset({Group.ECP_256, Group.ECP_384, Group.CURVE25519})


def private_size(group: int) -> int:
    """How many random bytes ``KeyPair`` takes for ``group``."""
    if group == Group.CURVE25519:
        return 32
    return _curve(group).size + 8  # reduced mod the order: the extra bytes remove the bias


def public_size(group: int) -> int:
    return 32 if group == Group.CURVE25519 else 2 * _curve(group).size


def _curve(group: int) -> _Curve:
    c = _NIST.get(Group(group)) if group in Group._value2member_map_ else None
    if c is None:
        raise IkeError(Notify.INVALID_KE_PAYLOAD, f"DH group {group} is not supported")
    return c


class KeyPair:
    """One side's ephemeral DH key. ``private`` is random bytes of ``private_size(group)``;
    for a NIST curve they are reduced to a scalar in [1, order-1]. The repr shows no key."""

    def __init__(self, group: int, private: bytes) -> None:
        if group not in SUPPORTED:
            raise IkeError(Notify.INVALID_KE_PAYLOAD, f"DH group {group} is not supported")
        self.group = group
        if group == Group.CURVE25519:
            if len(private) != 32:
                raise ValueError("curve25519 takes 32 private bytes")
            self._x = x25519.X25519PrivateKey.from_private_bytes(private)
            self.public = self._x.public_key().public_bytes_raw()
            return
        c = _curve(group)
        scalar = int.from_bytes(private, "big") % (c.order - 1) + 1
        self._ec = ec.derive_private_key(scalar, c.curve)
        nums = self._ec.public_key().public_numbers()
        self.public = nums.x.to_bytes(c.size, "big") + nums.y.to_bytes(c.size, "big")

    @classmethod
    def from_scalar(cls, group: int, scalar: bytes) -> KeyPair:
        """A NIST-curve key from its exact scalar (published test vectors give scalars)."""
        c = _curve(group)
        pair = cls.__new__(cls)
        pair.group = group
        pair._ec = ec.derive_private_key(int.from_bytes(scalar, "big"), c.curve)
        nums = pair._ec.public_key().public_numbers()
        pair.public = nums.x.to_bytes(c.size, "big") + nums.y.to_bytes(c.size, "big")
        return pair

    def __repr__(self) -> str:
        return f"KeyPair(group={self.group})"

    def shared(self, peer: bytes) -> bytes:
        """g^ir from the peer's Key Exchange data."""
        if len(peer) != public_size(self.group):
            raise IkeError(Notify.INVALID_SYNTAX, f"DH group {self.group}: key exchange data of "
                           f"{len(peer)} bytes, not {public_size(self.group)}")
        if self.group == Group.CURVE25519:
            try:
                out = self._x.exchange(x25519.X25519PublicKey.from_public_bytes(peer))
            except ValueError:  # the library refuses a low-order point itself
                out = bytes(32)
            if not any(out):
                raise IkeError(Notify.INVALID_SYNTAX, "curve25519: an all-zero shared secret")
            return out
        c = _curve(self.group)
        try:
            point = ec.EllipticCurvePublicKey.from_encoded_point(c.curve, b"\x04" + peer)
        except ValueError as err:
            raise IkeError(Notify.INVALID_SYNTAX, f"DH group {self.group}: not a point on the "
                           "curve") from err
        return self._ec.exchange(ec.ECDH(), point)

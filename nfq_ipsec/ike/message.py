"""IKEv2 messages: the header and the payload chain (RFC 7296 sections 3.1 to 3.15).

``decode_message`` is strict: a length that runs past the message or its payload, a wrong
version, an unknown payload marked critical (UNSUPPORTED_CRITICAL_PAYLOAD), a payload after an
Encrypted payload, or a field out of range is refused with INVALID_SYNTAX and a reason. Unknown
non-critical payloads are kept as ``RawPayload`` (section 2.5: skipped). Payloads are plain
frozen dataclasses; ``encode_payloads`` writes them back byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from .errors import IkeError, Notify
from .proposal import SAPayload, decode_sa, encode_sa

HEADER = 28
GENERIC = 4
VERSION = 0x20  # major 2, minor 0
MAX_MESSAGE = 65535


class Exchange(IntEnum):
    IKE_SA_INIT = 34
    IKE_AUTH = 35
    CREATE_CHILD_SA = 36
    INFORMATIONAL = 37


class Flag(IntEnum):
    INITIATOR = 0x08
    VERSION = 0x10
    RESPONSE = 0x20


class PT(IntEnum):
    """Payload types."""

    NONE = 0
    SA = 33
    KE = 34
    IDI = 35
    IDR = 36
    CERT = 37
    CERTREQ = 38
    AUTH = 39
    NONCE = 40
    NOTIFY = 41
    DELETE = 42
    VENDOR = 43
    TSI = 44
    TSR = 45
    SK = 46
    CP = 47
    EAP = 48
    SKF = 53


class IdType(IntEnum):
    IPV4_ADDR = 1
    FQDN = 2
    RFC822_ADDR = 3
    IPV6_ADDR = 5
    DER_ASN1_DN = 9
    DER_ASN1_GN = 10
    KEY_ID = 11


class AuthMethod(IntEnum):
    RSA_SIG = 1
    SHARED_KEY_MIC = 2
    ECDSA_256 = 9
    ECDSA_384 = 10
    ECDSA_521 = 11
    DIGITAL_SIGNATURE = 14


class TsType(IntEnum):
    IPV4_ADDR_RANGE = 7
    IPV6_ADDR_RANGE = 8


@dataclass(frozen=True)
class Header:
    spi_i: bytes
    spi_r: bytes
    first: int  # the first payload's type
    exchange: int
    flags: int
    message_id: int
    length: int = 0

    @property
    def is_response(self) -> bool:
        return bool(self.flags & Flag.RESPONSE)

    @property
    def from_initiator(self) -> bool:
        return bool(self.flags & Flag.INITIATOR)

    def encode(self, length: int, first: int | None = None) -> bytes:
        return (self.spi_i + self.spi_r
                + bytes([self.first if first is None else first, VERSION, self.exchange,
                         self.flags])
                + self.message_id.to_bytes(4, "big") + length.to_bytes(4, "big"))


@dataclass(frozen=True)
class KEPayload:
    group: int
    data: bytes = field(repr=False)
    type: int = PT.KE


@dataclass(frozen=True)
class IdPayload:
    id_type: int
    data: bytes
    type: int = PT.IDI  # or PT.IDR

    @property
    def body(self) -> bytes:
        """RestOfIDPayload (section 2.15): what the AUTH value's prf covers."""
        return bytes([self.id_type, 0, 0, 0]) + self.data


@dataclass(frozen=True)
class AuthPayload:
    method: int
    data: bytes = field(repr=False)
    type: int = PT.AUTH


@dataclass(frozen=True)
class NoncePayload:
    data: bytes = field(repr=False)
    type: int = PT.NONCE


@dataclass(frozen=True)
class NotifyPayload:
    notify: int
    protocol: int = 0
    spi: bytes = b""
    data: bytes = b""
    type: int = PT.NOTIFY


@dataclass(frozen=True)
class DeletePayload:
    protocol: int
    spi_size: int
    spis: tuple[bytes, ...] = ()
    type: int = PT.DELETE


@dataclass(frozen=True)
class TrafficSelector:
    ts_type: int
    ip_protocol: int  # 0: any
    start_port: int
    end_port: int
    start: bytes  # 4 or 16 bytes
    end: bytes


@dataclass(frozen=True)
class TSPayload:
    selectors: tuple[TrafficSelector, ...]
    type: int = PT.TSI  # or PT.TSR


@dataclass(frozen=True)
class SAPayloadP:
    sa: SAPayload
    type: int = PT.SA


@dataclass(frozen=True)
class RawPayload:
    """A payload we keep as bytes: vendor IDs, certificates and requests, configuration,
    and unknown non-critical ones."""

    type: int
    body: bytes
    critical: bool = False


@dataclass(frozen=True)
class EncryptedPayload:
    """The Encrypted payload as it travels: ``first`` is the type of the first payload
    inside, ``data`` IV | ciphertext | ICV (``sk`` opens it)."""

    first: int
    data: bytes = field(repr=False)
    type: int = PT.SK


Payload = (KEPayload | IdPayload | AuthPayload | NoncePayload | NotifyPayload | DeletePayload
           | TSPayload | SAPayloadP | RawPayload | EncryptedPayload)


@dataclass(frozen=True)
class Message:
    header: Header
    payloads: tuple[Payload, ...]

    def find(self, kind: int) -> list[Payload]:
        return [p for p in self.payloads if p.type == kind]

    def notifies(self) -> list[NotifyPayload]:
        return [p for p in self.payloads if isinstance(p, NotifyPayload)]


def decode_header(data: bytes) -> Header:
    if len(data) < HEADER:
        raise IkeError(Notify.INVALID_SYNTAX, f"{len(data)} bytes: shorter than the IKE header")
    version = data[17]
    if version >> 4 != 2:
        raise IkeError(Notify.INVALID_MAJOR_VERSION, f"major version {version >> 4}")
    length = int.from_bytes(data[24:28], "big")
    if length != len(data):
        raise IkeError(Notify.INVALID_SYNTAX, f"header length {length}, message {len(data)} bytes")
    return Header(bytes(data[0:8]), bytes(data[8:16]), data[16], data[18], data[19],
                  int.from_bytes(data[20:24], "big"), length)


def decode_message(data: bytes) -> Message:
    header = decode_header(data)
    return Message(header, decode_payloads(header.first, data[HEADER:]))


def decode_payloads(first: int, data: bytes) -> tuple[Payload, ...]:
    """The payload chain starting with type ``first``; an Encrypted payload ends it."""
    out: list[Payload] = []
    kind, at = first, 0
    while kind != PT.NONE:
        if len(data) - at < GENERIC:
            raise IkeError(Notify.INVALID_SYNTAX, f"payload {kind} header cut short")
        nxt, flags, length = data[at], data[at + 1], int.from_bytes(data[at + 2:at + 4], "big")
        if length < GENERIC or at + length > len(data):
            raise IkeError(Notify.INVALID_SYNTAX, f"payload {kind}: length {length} runs past "
                           "the message")
        body = bytes(data[at + GENERIC:at + length])
        if kind in (PT.SK, PT.SKF):
            if at + length != len(data):
                raise IkeError(Notify.INVALID_SYNTAX, "payloads after the Encrypted payload")
            out.append(EncryptedPayload(nxt, body) if kind == PT.SK else RawPayload(kind, body))
            return tuple(out)
        out.append(_decode_body(kind, body, bool(flags & 0x80)))
        kind, at = nxt, at + length
    if at != len(data):
        raise IkeError(Notify.INVALID_SYNTAX, f"{len(data) - at} bytes after the last payload")
    return tuple(out)


def _need(body: bytes, n: int, what: str) -> None:
    if len(body) < n:
        raise IkeError(Notify.INVALID_SYNTAX, f"{what} payload of {len(body)} bytes, needs {n}")


def _decode_body(kind: int, body: bytes, critical: bool) -> Payload:
    if kind == PT.SA:
        return SAPayloadP(decode_sa(body))
    if kind == PT.KE:
        _need(body, 4, "KE")
        return KEPayload(int.from_bytes(body[0:2], "big"), body[4:])
    if kind in (PT.IDI, PT.IDR):
        _need(body, 4, "ID")
        return IdPayload(body[0], body[4:], kind)
    if kind == PT.AUTH:
        _need(body, 4, "AUTH")
        return AuthPayload(body[0], body[4:])
    if kind == PT.NONCE:
        if not 16 <= len(body) <= 256:
            raise IkeError(Notify.INVALID_SYNTAX, f"a nonce of {len(body)} bytes (16 to 256)")
        return NoncePayload(body)
    if kind == PT.NOTIFY:
        _need(body, 4, "Notify")
        spi_size = body[1]
        _need(body, 4 + spi_size, "Notify")
        return NotifyPayload(int.from_bytes(body[2:4], "big"), body[0], body[4:4 + spi_size],
                             body[4 + spi_size:])
    if kind == PT.DELETE:
        _need(body, 4, "Delete")
        size, count = body[1], int.from_bytes(body[2:4], "big")
        if len(body) != 4 + size * count or (body[0] == 1 and (size, count) != (0, 0)):
            raise IkeError(Notify.INVALID_SYNTAX, f"Delete: {count} SPIs of {size} bytes in "
                           f"{len(body) - 4}")
        return DeletePayload(body[0], size, tuple(body[4 + i * size:4 + (i + 1) * size]
                                                  for i in range(count)))
    if kind in (PT.TSI, PT.TSR):
        return TSPayload(_decode_ts(body), kind)
    if kind in (PT.VENDOR, PT.CERT, PT.CERTREQ, PT.CP, PT.EAP):
        return RawPayload(kind, body)
    if critical:
        raise IkeError(Notify.UNSUPPORTED_CRITICAL_PAYLOAD, f"payload type {kind} is critical")
    return RawPayload(kind, body, critical)


def _decode_ts(body: bytes) -> tuple[TrafficSelector, ...]:
    _need(body, 4, "TS")
    count, at, out = body[0], 4, []
    for _ in range(count):
        if len(body) - at < 8:
            raise IkeError(Notify.INVALID_SYNTAX, "traffic selector cut short")
        ts_type, proto, length = body[at], body[at + 1], int.from_bytes(body[at + 2:at + 4], "big")
        size = {TsType.IPV4_ADDR_RANGE: 4, TsType.IPV6_ADDR_RANGE: 16}.get(TsType(ts_type)) \
            if ts_type in TsType._value2member_map_ else None
        if size is None:
            raise IkeError(Notify.INVALID_SYNTAX, f"traffic selector type {ts_type}")
        if length != 8 + 2 * size or at + length > len(body):
            raise IkeError(Notify.INVALID_SYNTAX, f"traffic selector of length {length}")
        sp, ep = int.from_bytes(body[at + 4:at + 6], "big"), int.from_bytes(body[at + 6:at + 8], "big")
        start, end = body[at + 8:at + 8 + size], body[at + 8 + size:at + 8 + 2 * size]
        out.append(TrafficSelector(ts_type, proto, sp, ep, start, end))
        at += length
    if at != len(body):
        raise IkeError(Notify.INVALID_SYNTAX, "data after the traffic selectors")
    return tuple(out)


def encode_body(p: Payload) -> bytes:
    if isinstance(p, SAPayloadP):
        return encode_sa(p.sa)
    if isinstance(p, KEPayload):
        return p.group.to_bytes(2, "big") + b"\0\0" + p.data
    if isinstance(p, IdPayload):
        return p.body
    if isinstance(p, AuthPayload):
        return bytes([p.method, 0, 0, 0]) + p.data
    if isinstance(p, NoncePayload):
        return p.data
    if isinstance(p, NotifyPayload):
        return bytes([p.protocol, len(p.spi)]) + p.notify.to_bytes(2, "big") + p.spi + p.data
    if isinstance(p, DeletePayload):
        return (bytes([p.protocol, p.spi_size]) + len(p.spis).to_bytes(2, "big")
                + b"".join(p.spis))
    if isinstance(p, TSPayload):
        return bytes([len(p.selectors), 0, 0, 0]) + b"".join(
            bytes([ts.ts_type, ts.ip_protocol]) + (8 + 2 * len(ts.start)).to_bytes(2, "big")
            + ts.start_port.to_bytes(2, "big") + ts.end_port.to_bytes(2, "big") + ts.start + ts.end
            for ts in p.selectors)
    if isinstance(p, EncryptedPayload):
        return p.data
    return p.body


def encode_payloads(payloads: tuple[Payload, ...] | list[Payload]) -> tuple[int, bytes]:
    """(the first payload's type, the chain's bytes). An Encrypted payload, if any, is last,
    and its next-payload field names the first payload inside it."""
    out = b""
    for i, p in enumerate(payloads):
        if isinstance(p, EncryptedPayload):
            if i != len(payloads) - 1:
                raise ValueError("the Encrypted payload must be last")
            nxt = p.first
        else:
            nxt = payloads[i + 1].type if i + 1 < len(payloads) else PT.NONE
        body = encode_body(p)
        flags = 0x80 if isinstance(p, RawPayload) and p.critical else 0
        out += bytes([nxt, flags]) + (GENERIC + len(body)).to_bytes(2, "big") + body
    return (payloads[0].type if payloads else PT.NONE), out


def encode_message(header: Header, payloads: tuple[Payload, ...] | list[Payload]) -> bytes:
    first, body = encode_payloads(payloads)
    length = HEADER + len(body)
    if length > MAX_MESSAGE:
        raise ValueError(f"an IKE message of {length} bytes")
    return header.encode(length, first) + body

"""The drop log (``droplog.py``): what a line says of a dropped packet (its SPI and source, no
more), and the rate limit per reason with its "suppressed" count."""

from __future__ import annotations

import logging
import socket
import struct

import pytest
from packets import ipv4, udp

from nfq_ipsec import journal
from nfq_ipsec.core import DropReason
from nfq_ipsec.droplog import PER_SECOND, DropLog

PAYLOAD = b"SECRET-PAYLOAD" * 4


def esp(spi: int, seq: int = 7) -> bytes:
    return struct.pack("!II", spi, seq) + PAYLOAD


def ipv6(src: str, dst: str, nh: int, payload: bytes) -> bytes:
    return (struct.pack("!IHBB", 6 << 28, len(payload), nh, 64) + socket.inet_pton(socket.AF_INET6, src)
            + socket.inet_pton(socket.AF_INET6, dst) + payload)


@pytest.mark.parametrize(("packet", "said"), [
    (ipv4("192.0.2.1", "192.0.2.2", 50, esp(0x1000)), "SPI 0x00001000 from 192.0.2.1"),
    (ipv4("192.0.2.1", "192.0.2.2", 50, esp(0x1000), options=b"\x01" * 4),
     "SPI 0x00001000 from 192.0.2.1"),  # past the options
    (udp("198.51.100.7", "192.0.2.2", 4500, 4500, esp(0xDEADBEEF)),
     "SPI 0xdeadbeef from 198.51.100.7:4500"),
    (ipv6("2001:db8::1", "2001:db8::2", 50, esp(0x2000)), "SPI 0x00002000 from [2001:db8::1]"),
    (ipv4("192.0.2.1", "192.0.2.2", 50, b"\x00\x01"), "SPI ? from 192.0.2.1"),  # cut short
    (b"\x45\x00", "SPI ? from ?"),
    (b"", "SPI ? from ?"),
])
def test_a_line_names_the_spi_and_the_source(packet: bytes, said: str) -> None:
    log, lines = drop_log()
    log.note(DropReason.INTEGRITY, packet, 0.0)
    assert lines.lines == [f"dropped (integrity): {said}"]
    # and the journal's fields of the line: the reason, and the SPI when the bytes have one
    spi = said.split()[1]
    expected = {"NFQ_REASON": "integrity"} | ({} if spi == "?" else {"NFQ_SPI": spi})
    assert lines.fields == [expected]


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.fields: list[dict[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        self.fields.append(getattr(record, journal.EXTRA, {}))


def drop_log(level: int = logging.INFO) -> tuple[DropLog, Lines]:
    logger = logging.getLogger(f"test.droplog.{id(object())}")
    logger.propagate = False
    logger.setLevel(level)
    lines = Lines()
    logger.addHandler(lines)
    return DropLog(logger), lines


def test_at_most_per_second_lines_per_reason_then_a_count() -> None:
    dl, out = drop_log()
    pkt = ipv4("192.0.2.1", "192.0.2.2", 50, esp(0x1000))
    for i in range(PER_SECOND + 7):
        dl.note(DropReason.INTEGRITY, pkt, 10.0 + i * 0.01)
    dl.note(DropReason.REPLAY, pkt, 10.5)  # its own budget
    assert out.lines == ["dropped (integrity): SPI 0x00001000 from 192.0.2.1"] * PER_SECOND + [
        "dropped (replay): SPI 0x00001000 from 192.0.2.1"]
    dl.flush(10.9)  # the integrity window is not over yet
    assert len(out.lines) == PER_SECOND + 1
    dl.flush(11.0)
    assert out.lines[-1].startswith("dropped (integrity): suppressed 7 more line(s) in 1 s")
    assert len(out.lines) == PER_SECOND + 2  # replay suppressed nothing: no count for it
    dl.note(DropReason.INTEGRITY, pkt, 11.2)  # a new window: logged again
    assert out.lines[-1] == "dropped (integrity): SPI 0x00001000 from 192.0.2.1"


def test_a_new_window_says_the_last_ones_count_first() -> None:
    dl, out = drop_log()
    pkt = ipv4("192.0.2.1", "192.0.2.2", 50, esp(0x1000))
    for _ in range(PER_SECOND + 2):
        dl.note(DropReason.UNKNOWN_SPI, pkt, 1.0)
    dl.note(DropReason.UNKNOWN_SPI, pkt, 2.5)
    assert out.lines[-2:] == [
        f"dropped (unknown_spi): suppressed 2 more line(s) in 1 s (at most {PER_SECOND} a second "
        "are logged)", "dropped (unknown_spi): SPI 0x00001000 from 192.0.2.1"]


def test_other_reasons_and_a_quiet_level_log_nothing() -> None:
    dl, out = drop_log()
    pkt = ipv4("192.0.2.1", "192.0.2.2", 50, esp(0x1000))
    dl.note(DropReason.NO_POLICY, pkt, 1.0)
    assert out.lines == []
    quiet, out2 = drop_log(logging.WARNING)
    quiet.note(DropReason.INTEGRITY, pkt, 1.0)
    assert out2.lines == []


def test_nothing_of_the_packet_but_spi_and_source() -> None:
    dl, out = drop_log()
    for reason in (DropReason.UNKNOWN_SPI, DropReason.INTEGRITY, DropReason.REPLAY):
        dl.note(reason, udp("198.51.100.7", "192.0.2.2", 4500, 4500, esp(0x1000, seq=0x4142434)), 1.0)
    text = "\n".join(out.lines)
    assert len(out.lines) == 3
    for leak in ("SECRET", PAYLOAD.hex()[:16], "192.0.2.2", "4142434", str(0x4142434)):
        assert leak not in text

"""The ESP implementations behind one test interface, so a test can run against each: the
core (``nfq_ipsec.core.Processor``: compiled when the build is current, else its source) and
the independent implementation (``nfq_ipsec.independent.Engine``).

Each is built from the same configuration objects (policies and SA parameters) and answers
with an ``Answer``: the verdict and drop reason as the words the data plane counts, the new
bytes, the SA's name and the sequence number."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from nfq_ipsec.core import SPD, Policy, Processor, SAParams, SecurityAssociation
from nfq_ipsec.core.processor import ARRIVING, FORWARDED, LEAVING, Result
from nfq_ipsec.independent import Engine, Outcome

__all__ = ["ARRIVING", "FORWARDED", "LEAVING", "VERSIONS", "Answer", "Runner", "build"]


@dataclass(frozen=True)
class Answer:
    verdict: str  # "accept", "drop", "replace", "cross"
    packet: bytes | None
    reason: str | None
    sa: str | None
    seq: int | None
    packets: tuple[bytes, ...] = ()
    reply: bytes | None = None  # an ICMP error for the sender

    @property
    def unsupported(self) -> bool:
        return self.reason == "unsupported"


class Runner(Protocol):
    name: str

    def process(self, data: bytes, where: int, now: float = 0.0) -> Answer: ...
    def outbound(self, data: bytes, now: float = 0.0) -> Answer: ...
    def inbound(self, data: bytes, now: float = 0.0) -> Answer: ...
    def start_at(self, sa: str, next_seq: int) -> None: ...
    def seen_up_to(self, sa: str, seq: int) -> None: ...
    def next_seq(self, sa: str) -> int: ...
    def window_top(self, sa: str) -> int: ...


class _Base:
    name = ""

    def process(self, data: bytes, where: int, now: float = 0.0) -> Answer:
        raise NotImplementedError

    def outbound(self, data: bytes, now: float = 0.0) -> Answer:
        return self.process(data, LEAVING, now)

    def inbound(self, data: bytes, now: float = 0.0) -> Answer:
        return self.process(data, ARRIVING, now)


class CoreRunner(_Base):
    name = "core"

    def __init__(self, policies: Sequence[Policy], sas: Sequence[SAParams], now: float,
                 mtu: int = 1500) -> None:
        self.processor = Processor(SPD(list(policies)), list(sas), now, mtu=mtu)

    def process(self, data: bytes, where: int, now: float = 0.0) -> Answer:
        res: Result = self.processor.process(data, len(data), where, now)
        return Answer(res.verdict.value, res.packet, None if res.reason is None else res.reason.value,
                      None if res.sa is None else res.sa.name, res.seq, tuple(res.packets or ()),
                      res.reply)

    def _sa(self, name: str) -> SecurityAssociation:
        sa = self.processor.sad.by_name(name)
        assert sa is not None, name
        return sa

    def start_at(self, sa: str, next_seq: int) -> None:
        self._sa(sa).next_seq = next_seq

    def seen_up_to(self, sa: str, seq: int) -> None:
        self._sa(sa).replay.update(seq)

    def next_seq(self, sa: str) -> int:
        return self._sa(sa).next_seq

    def window_top(self, sa: str) -> int:
        return self._sa(sa).replay.top


class IndependentRunner(_Base):
    name = "independent"

    def __init__(self, policies: Sequence[Policy], sas: Sequence[SAParams], now: float,
                 mtu: int = 1500) -> None:
        self.engine = Engine(policies, sas, now, mtu=mtu)

    def process(self, data: bytes, where: int, now: float = 0.0) -> Answer:
        out: Outcome = self.engine.process(data, len(data), where, now)
        return Answer(out.verdict, out.packet, out.reason, out.sa_name, out.seq,
                      tuple(out.packets or ()), out.reply)

    def start_at(self, sa: str, next_seq: int) -> None:
        self.engine.sa(sa).next_seq = next_seq

    def seen_up_to(self, sa: str, seq: int) -> None:
        self.engine.sa(sa).window.record(seq)

    def next_seq(self, sa: str) -> int:
        return self.engine.sa(sa).next_seq

    def window_top(self, sa: str) -> int:
        return self.engine.sa(sa).window.top


Builder = Callable[..., Runner]
VERSIONS: dict[str, Builder] = {"core": CoreRunner, "independent": IndependentRunner}


def build(version: str, policies: Sequence[Policy], sas: Sequence[SAParams], now: float = 0.0,
          mtu: int = 1500) -> Runner:
    return VERSIONS[version](policies, sas, now, mtu=mtu)

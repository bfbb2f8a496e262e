"""What a crypto engine is: a name, the suites it can build, and how it builds one for an SA.

A suite is named as the configuration names an SA's algorithms: the encryption alone for an
AEAD (``aes-gcm-128``), ``encryption+integrity`` otherwise (``aes-cbc-128+hmac-sha256-128``).
An engine claims suites; only those its known-answer tests pass are used (``kat``, ``team``).
Every engine builds a ``core.suites.Suite`` with the same IV rule (the sequence number for
an AEAD, AES_K(counter) for CBC), so the same SA state gives the same bytes on any engine.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Final

from ..core.suites import ENCRYPTION, HMACS, Suite, suite_problems

ENGINE_NAMES: Final = ("openssl", "sodium", "pycryptodome", "afalg")  # team.default_engines' order
POLICIES: Final = ("fastest", "prefer", "balance")
DEFAULT_POLICY: Final = "fastest"
DEFAULT_VERIFY_INTERVAL: Final = 300.0  # seconds between known-answer runs in each worker
VERIFY_INTERVAL_RANGE: Final = (1.0, 86400.0)  # or 0: only at start
DEFAULT_VERIFY_TIMEOUT: Final = 2.0  # an engine's known-answer tests must finish within this
VERIFY_TIMEOUT_RANGE: Final = (0.1, 60.0)
DEFAULT_SELF_CHECK: Final = 0  # off: every Nth packet done again on another engine
SELF_CHECK_RANGE: Final = (0, 1_000_000)
DEFAULT_OFFLOAD_HELPERS: Final = 0  # off: every seal in the worker's own process (offload.py)
OFFLOAD_HELPERS_RANGE: Final = (0, 64)
DEFAULT_OFFLOAD_BATCH: Final = 8  # seals handed to a helper per wake-up
OFFLOAD_BATCH_RANGE: Final = (1, 256)
DEFAULT_OFFLOAD_TIMEOUT: Final = 0.25  # seconds a batch's helpers may take before they are cut off
OFFLOAD_TIMEOUT_RANGE: Final = (0.005, 10.0)


@dataclass(frozen=True)
class CryptoSettings:
    """The ``[crypto]`` section (``config/fields.py`` declares it)."""

    policy: str = DEFAULT_POLICY
    prefer: tuple[str, ...] = ()
    verify_interval: float = DEFAULT_VERIFY_INTERVAL  # 0: only at start
    verify_timeout: float = DEFAULT_VERIFY_TIMEOUT
    disabled: tuple[str, ...] = ()
    self_check: int = DEFAULT_SELF_CHECK  # every Nth packet of an SA checked on a witness; 0: off
    offload_helpers: int = DEFAULT_OFFLOAD_HELPERS  # helper processes per worker; 0: off
    offload_batch: int = DEFAULT_OFFLOAD_BATCH
    offload_timeout: float = DEFAULT_OFFLOAD_TIMEOUT


DEFAULT_CRYPTO: Final = CryptoSettings()


AEADS: Final = ("aes-gcm-128", "aes-gcm-256", "chacha20-poly1305")
CBCS: Final = ("aes-cbc-128", "aes-cbc-256")


def suite_name(encryption: str, integrity: str | None) -> str:
    return encryption if integrity is None else f"{encryption}+{integrity}"


# Every suite an engine may claim (null encryption is OpenSSL's alone: integrity only).
ALL_SUITES: Final = (*AEADS, *(suite_name(c, h) for c in CBCS for h in HMACS),
                     *(suite_name("null", h) for h in HMACS))


@dataclass(frozen=True)
class Probe:
    """What discovery found: the suites an engine claims here, or why it is absent."""

    suites: frozenset[str]
    absent: str | None = None  # "kernel has no AF_ALG: ..." and so on
    detail: str = ""  # e.g. the kernel drivers that would serve it


class Engine(abc.ABC):
    """A crypto implementation the data plane can bind SAs to.

    ``probe`` runs once per process at start (it may open sockets or read ``/proc``);
    ``build`` makes the cipher objects of one SA and is called when an SA is built or moved,
    never per packet. Every module an engine needs is imported when its module is imported
    (at worker start), never later: workers may run where opening files after start-up is
    forbidden.
    """

    name: str = ""
    # Its suites have ``seal_batch`` (many packets of one SA in one call, cheaper than one call
    # each), which the offload helpers use (``offload.seal_many``). None does: see
    # docs/engines.md, *Batches*.
    batches: bool = False
    # ``build`` opens file descriptors (sockets): a sandboxed worker, whose filter forbids
    # that, never moves an SA onto it by choice (``Team.rebalance``)
    opens_at_build: bool = False

    @abc.abstractmethod
    def probe(self) -> Probe: ...

    @abc.abstractmethod
    def build(self, encryption: str, key: bytes, integrity: str | None, integrity_key: bytes) -> Suite:
        """The suite of one SA. Inputs are checked here as ``make_suite`` checks them."""


def check_keys(encryption: str, key: bytes, integrity: str | None, integrity_key: bytes) -> None:
    """Raise ValueError (without key bytes) unless the algorithms and key sizes fit."""
    problems = suite_problems(encryption, integrity)
    if problems:
        raise ValueError("; ".join(problems))
    enc = ENCRYPTION[encryption]
    if len(key) != enc.keymat_size:
        raise ValueError(f"{encryption} needs {enc.keymat_size} key bytes, got {len(key)}")
    if integrity is not None and len(integrity_key) != HMACS[integrity].key_size:
        raise ValueError(f"{integrity} needs {HMACS[integrity].key_size} key bytes, "
                         f"got {len(integrity_key)}")


class Unsupported(ValueError):
    """The engine does not provide this suite."""

"""The I/O-free ESP core: packets as bytes in, bytes and a verdict out.

Imports only the standard library and ``cryptography``; never opens a socket, starts a
process, reads the clock or imports the queue binding. ``tests/unit/test_core_purity.py`` checks.
"""

from .errors import ConfigError, DropReason, EspError
from .processor import Event, Processor, Result, Verdict
from .sa import DfPolicy, Lifetime, Mode, SADirection, SAParams, Secret, SecurityAssociation
from .spd import SPD, Action, Direction, Policy, Selector

__all__ = [
    "SPD", "Action", "ConfigError", "DfPolicy", "Direction", "DropReason", "EspError", "Event",
    "Lifetime", "Mode", "Policy", "Processor", "Result", "SADirection", "SAParams", "Secret",
    "SecurityAssociation", "Selector", "Verdict",
]

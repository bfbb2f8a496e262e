"""Pickling for the core's frozen dataclasses (configuration sent to a worker process).

Compiled by mypyc, a frozen dataclass can't be unpickled the default way (it restores fields
by assignment, which a frozen class refuses), so each one reduces to its constructor call.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def reduce_dataclass(obj: Any) -> tuple[type, tuple[object, ...]]:
    """``obj.__reduce__()``: rebuild it by calling its class with its init fields."""
    return (type(obj), tuple(getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init))

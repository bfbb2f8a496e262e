"""Processes by pid: whether one still runs."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited. A zombie (exited, not yet reaped by
    its parent) counts as gone; a process of another user, which we may not signal, counts as
    alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rpartition(")")[2].split()
    except FileNotFoundError:
        return False  # gone since the signal check
    except OSError:
        return True  # it exists; its state is hidden from us
    return not fields or fields[0] != "Z"

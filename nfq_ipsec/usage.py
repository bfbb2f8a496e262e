"""CPU time and memory of the daemon's processes, for status and the metrics, through psutil.

psutil, not a hand-written reader of ``/proc/PID/stat``: it converts clock ticks and pages
itself, and its ``Process`` remembers the process's start time, so a pid the kernel has given
to another process since is told apart (``is_running``) instead of being read as ours.
A process that is gone, or can't be read, gives ``None``: its figures are absent, never zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Usage:
    cpu_seconds: float  # user + system, since the process started
    memory_bytes: int  # resident set size


class Meter:
    """Reads one process at a time; keeps each pid's ``psutil.Process`` between reads."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def read(self, pid: int | None) -> Usage | None:
        if pid is None:
            return None
        proc = self._procs.get(pid)
        try:
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
            elif not proc.is_running():  # gone, or the pid now names another process
                raise psutil.NoSuchProcess(pid)
            with proc.oneshot():
                t = proc.cpu_times()
                rss = proc.memory_info().rss
        except (psutil.Error, OSError):
            self._procs.pop(pid, None)
            return None
        return Usage(round(t.user + t.system, 3), int(rss))

    def forget_others(self, pids: set[int]) -> None:
        """Drop the processes not in ``pids`` (workers replaced since)."""
        for pid in list(self._procs):
            if pid not in pids:
                del self._procs[pid]

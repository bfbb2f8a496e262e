"""usage.Meter: a live process's CPU time and memory, nothing for one that is gone."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from nfq_ipsec import usage


def test_a_live_process_is_read_and_its_cpu_time_grows() -> None:
    meter = usage.Meter()
    first = meter.read(os.getpid())
    assert first is not None
    assert first.memory_bytes > 1 << 20  # an interpreter with the package loaded
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:  # burn 0.2 s of CPU
        pass
    second = meter.read(os.getpid())
    assert second is not None and second.cpu_seconds >= first.cpu_seconds + 0.15


def test_a_process_that_is_gone_has_no_figures() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    meter = usage.Meter()
    assert meter.read(child.pid) is not None or child.poll() is not None
    child.wait()
    assert meter.read(child.pid) is None  # reaped: no such process (or another's start time)
    assert meter.read(None) is None


def test_forget_others_keeps_only_the_named() -> None:
    meter = usage.Meter()
    assert meter.read(os.getpid()) is not None
    meter.forget_others(set())
    assert meter._procs == {}

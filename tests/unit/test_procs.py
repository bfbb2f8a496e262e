"""``nfq_ipsec/procs.py``: whether a pid still runs (``stop`` waits on it; the lab and the
benchmark use it to find namespaces of runs that were killed)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from nfq_ipsec import procs


def test_running_zombie_and_reaped() -> None:
    assert procs.alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    pid = child.pid
    deadline = time.monotonic() + 30
    while procs.alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    # exited but not reaped yet: a zombie, which counts as gone
    with open(f"/proc/{pid}/stat") as f:
        assert f.read().rpartition(")")[2].split()[0] == "Z"
    assert not procs.alive(pid)
    child.wait()
    assert not procs.alive(pid)


def test_a_running_child_is_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert procs.alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not procs.alive(child.pid)

"""``nfq_ipsec/hardening.py``: core dumps off in a process that holds keys; files opened
without following links and checked as opened (the config and state tests cover the callers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nfq_ipsec import hardening

PROBE = """
import json, resource
from nfq_ipsec import hardening
before = hardening.dumpable()
hardening.disable_core_dumps()
print(json.dumps({"before": before, "after": hardening.dumpable(),
                  "core": list(resource.getrlimit(resource.RLIMIT_CORE))}))
"""


def test_disable_core_dumps() -> None:
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got == {"before": True, "after": False, "core": [0, 0]}


def test_open_checked_refuses_links_and_other_kinds(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    f.chmod(0o600)
    fd, st = hardening.open_checked(f)
    os.close(fd)
    assert st.st_size == 1
    (tmp_path / "link").symlink_to(f)
    with pytest.raises(hardening.UnsafeFileError, match="symbolic link"):
        hardening.open_checked(tmp_path / "link")
    with pytest.raises(hardening.UnsafeFileError, match="not a regular file"):
        hardening.open_checked(tmp_path)
    with pytest.raises(hardening.UnsafeFileError, match="not a directory"):
        hardening.open_checked(f, directory=True)
    f.chmod(0o640)
    with pytest.raises(hardening.UnsafeFileError, match=r"readable by group or others \(mode 0640\)"):
        hardening.open_checked(f, forbid=0o077)
    with pytest.raises(FileNotFoundError):
        hardening.open_checked(tmp_path / "missing")
    big = tmp_path / "big"
    big.write_bytes(b"0" * 100)
    with pytest.raises(hardening.UnsafeFileError, match="over 10 bytes"):
        hardening.read_checked(big, 10)

"""Keys and the files that guard them, with the real daemon (root; namespaces ``nfqx<pid>...``):

- another user who gets write access to ``state_dir`` puts an old state file back (a genuine
  one, written under the SA's key, so its MAC is valid): ``nfq-ipsec run`` refuses (exit 5)
  while the directory is theirs and, after the directory is handed back, because the file is
  theirs; a running daemon's restarted worker refuses the SA the same way (and the daemon
  stops rather than reuse sequence numbers); a state file in the old unkeyed format is refused
  with what to do;
- an SA's hard packet limit counts across a clean restart of the daemon;
- the supervisor and its workers are not dumpable (no core dumps, no /proc access for a
  process without CAP_SYS_PTRACE), where a control process under the same conditions is.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import gate
import pytest
from labutil import (
    PORTS,
    QUEUES,
    Daemon,
    Pair,
    daemon,
    make_keys,
    make_pair,
    running_pair,
    send,
)

from nfq_ipsec import state
from nfq_ipsec.config import load_config

OTHER = 65534  # nobody
NO_PTRACE = ["setpriv", "--bounding-set", "-sys_ptrace", "--inh-caps", "-sys_ptrace", "--"]


@pytest.fixture
def pair() -> Iterator[Pair]:
    with make_pair("k") as p:
        yield p


def replace_as_other_user(directory: Path, name: str, data: bytes) -> None:
    """As uid 65534: put ``data`` at ``directory/name`` (a temp file renamed over it), through
    a descriptor of the directory (the test's parent directories are root's own)."""
    code = ("import os, sys; d = int(sys.argv[1]); n = sys.argv[2]; "
            "fd = os.open(n + '.x', os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=d); "
            "os.write(fd, sys.stdin.buffer.read()); os.close(fd); "
            "os.rename(n + '.x', n, src_dir_fd=d, dst_dir_fd=d)")
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        subprocess.run([sys.executable, "-I", "-c", code, str(dfd), name], input=data, check=True,
                       user=OTHER, group=OTHER, extra_groups=[], pass_fds=(dfd,), cwd="/")
    finally:
        os.close(dfd)
    assert (directory / name).stat().st_uid == OTHER


def run_to_exit(d: Daemon) -> tuple[int, str]:
    start = len(d.log_text())
    d.start()
    assert d.proc is not None
    code = d.proc.wait(60)
    return code, d.log_text()[start:]


def test_state_rolled_back_by_another_user_is_refused(pair: Pair, tmp_path: Path,
                                                      daemons: list[Daemon]) -> None:
    keys = make_keys()
    a, _ = running_pair(pair, tmp_path, keys, daemons)
    first = [(PORTS[0], f"first-{n}") for n in range(5)]
    assert send(pair, first) == [m for _, m in first]
    assert a.stop() == 0
    cfg = load_config(a.config)
    sdir = Path(cfg.daemon.state_dir)
    params = cfg.sa("ab0")
    path = state.state_path(sdir, params)
    old = path.read_bytes()
    assert state.parse(params, old).value == 6
    a.start()
    a.wait_running()
    second = [(PORTS[0], f"second-{n}") for n in range(5)]
    assert send(pair, second) == [m for _, m in second]
    assert a.stop() == 0
    new = path.read_bytes()
    assert state.parse(params, new).value == 11

    # The directories are given to another user by mistake; they put the old file back. Its
    # MAC is valid (it was written under the key): only ownership tells it apart. The queue's
    # directory (path.parent) is the workers' user's (daemon.worker_user).
    worker = pwd.getpwnam(cfg.daemon.worker_user)
    qdir = path.parent
    assert qdir.stat().st_uid == worker.pw_uid and path.stat().st_uid == worker.pw_uid
    os.chown(sdir, OTHER, OTHER)
    os.chown(qdir, OTHER, OTHER)
    replace_as_other_user(qdir, path.name, old)
    assert state.parse(params, path.read_bytes()).value == 6
    code, log = run_to_exit(a)
    assert code == 5, log
    assert f"state directory {sdir} is owned by uid {OTHER}, not by uid 0" in log
    assert "nothing started, nothing installed" in log
    os.chown(sdir, 0, 0)  # the directories handed back; the file stays theirs
    os.chown(qdir, worker.pw_uid, worker.pw_gid)
    code, log = run_to_exit(a)
    assert code == 5, log
    assert f"sa ab0 (spi 0x{params.spi:08x}, out): state file {path} is owned by uid {OTHER}" in log

    # Put right by root (the newest file), the daemon runs; the same rollback under a running
    # daemon: the restarted worker refuses the SA and the daemon stops instead of sending.
    path.unlink()
    path.write_bytes(new)
    path.chmod(0o600)
    a.start()
    st = a.wait_running()
    assert a.sa(st, "ab0")["seq"] == 10
    os.chown(qdir, OTHER, OTHER)
    replace_as_other_user(qdir, path.name, old)
    os.chown(qdir, worker.pw_uid, worker.pw_gid)
    os.kill(a.worker_pid(st, 0), 9)
    assert a.proc is not None
    assert a.proc.wait(60) == 1
    log = a.log_text()
    # the sandboxed worker, as its own user, can't even open another user's file (mode 0600)
    assert f"queue {QUEUES[0]}: cannot read state file {path}: Permission denied" in log

    # A file in the old unkeyed format (root's own) is refused with what to do.
    path.unlink()
    body = {"version": 1, "direction": "out", "key_id": state.key_id(params), "sa": "ab0",
            "spi": f"0x{params.spi:08x}", "next_seq": 11, "written": "2026-01-01T00:00:00Z",
            "check": "0" * 16}
    path.write_text(json.dumps(body))
    path.chmod(0o600)
    code, log = run_to_exit(a)
    assert code == 5, log
    assert "old format (version 1)" in log and "nfq-ipsec state reset" in log
    for key in keys.values():
        assert key not in a.log_text()


def _stack_readable(pid: int) -> bool:
    """Whether a root process without CAP_SYS_PTRACE may read /proc/PID/stack. For a target
    with no more capabilities than it, the kernel refuses exactly when the target is not
    dumpable (PR_SET_DUMPABLE 0)."""
    return subprocess.run([*NO_PTRACE, "cat", f"/proc/{pid}/stack"], capture_output=True).returncode == 0


def test_lifetime_counts_across_a_restart_and_no_core_dumps(pair: Pair, tmp_path: Path,
                                                            daemons: list[Daemon]) -> None:
    gate.tool("setpriv", "util-linux")
    keys = make_keys()
    a = daemon(pair, tmp_path, True, keys, daemons)
    text = a.config.read_text()
    line = f'key = "0x{keys["ab0"]}"\n'
    assert line in text
    a.config.write_text(text.replace(line, line + "[sa.lifetime]\nhard_packets = 30\n"))
    b = daemon(pair, tmp_path, False, keys, daemons)
    a.start(prefix=NO_PTRACE)  # A without CAP_SYS_PTRACE, so its dumpable flag shows
    b.start()
    st = a.wait_running()
    b.wait_running()
    control = subprocess.Popen([*NO_PTRACE, "sleep", "60"])
    try:
        time.sleep(0.2)
        assert _stack_readable(control.pid)  # the check can tell: a dumpable process
    finally:
        control.kill()
        control.wait()
    assert a.proc is not None
    pids = [a.proc.pid] + [w["pid"] for w in st["workers"]]
    assert [_stack_readable(p) for p in pids] == [False] * len(pids)
    limits = Path(f"/proc/{a.proc.pid}/limits").read_text()
    core = next(ln for ln in limits.splitlines() if ln.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"]  # soft and hard RLIMIT_CORE

    first = [(PORTS[0], f"first-{n}") for n in range(20)]
    assert send(pair, first) == [m for _, m in first]
    assert a.stop() == 0
    a.start()
    st = a.wait_running()
    assert a.sa(st, "ab0")["lifetime_left"]["packets"] == 10
    second = [(PORTS[0], f"second-{n}") for n in range(15)]
    got = send(pair, second)
    assert got == [m for _, m in second][:10]  # the limit falls at 30 in all, as without restart
    st = a.status()
    assert st is not None
    assert a.sa(st, "ab0")["other_drops"] == 5 and a.sa(st, "ab0")["lifetime_left"]["packets"] == 0
    assert "hard expired" in a.log_text()
    assert a.stop() == 0 and b.stop() == 0

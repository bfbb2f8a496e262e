"""Workers without root (root; namespaces as in test_resilience):

- a real worker runs sandboxed: its own user, ``CAP_NET_ADMIN`` only, ``no_new_privs``, seccomp
  mode 2, not dumpable; the supervisor stays root; traffic flows; ``daemon.sandbox = "off"``
  shows the other side of each check;
- the daemon under the systemd unit's capability bounding set (no capability to override file
  permissions): it starts, restarts and reads its workers' state files, traffic flows;
- isolation: a worker that acts compromised (test fault ``compromised``) tries to read another
  queue's key file and state file, /etc/shadow, to write outside its state files, to exec a
  shell, to ptrace and to signal its sibling and to open a raw socket. Each attempt is refused
  or kills it with SIGSYS; the supervisor reports the death (signal, system call) and restarts
  it; paced flows on the other queue lose nothing all along (as test_resilience measures a
  SIGKILL).

Figures are printed (run with ``-s``).
"""

from __future__ import annotations

import json
import os
import pwd
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gate
import pytest
from labutil import (
    ADDR_B,
    PACED,
    PORTS,
    RECEIVER,
    SENDER,
    Daemon,
    Pair,
    daemon,
    end,
    make_keys,
    make_pair,
    ready,
    result,
    send,
)

from nfq_ipsec import sandbox, state
from nfq_ipsec.config import load_config
from nfq_ipsec.service import UnitFile

REPO = Path(__file__).resolve().parents[2]

MARKER = "CLEAR-TEXT-MARKER"
CAP_NET_ADMIN_ONLY = f"{1 << sandbox.CAP_NET_ADMIN:016x}"


@pytest.fixture
def pair() -> Iterator[Pair]:
    with make_pair("s") as p:
        yield p


def _status_of(pid: int) -> dict[str, str]:
    return sandbox.proc_status(pid)


def _dumpable(pid: int) -> bool:
    """A process that is not dumpable has its /proc entries owned by root, whatever its user."""
    return os.stat(f"/proc/{pid}/environ").st_uid != 0


def _set_daemon(d: Daemon, line: str) -> None:
    text = d.config.read_text()
    assert 'log_level = "info"\n' in text
    d.config.write_text(text.replace('log_level = "info"\n', f'log_level = "info"\n{line}\n'))


def test_worker_runs_sandboxed(pair: Pair, tmp_path: Path, daemons: list[Daemon]) -> None:
    keys = make_keys()
    a = daemon(pair, tmp_path, True, keys, daemons)
    b = daemon(pair, tmp_path, False, keys, daemons)
    _set_daemon(b, 'sandbox = "off"')
    a.start()
    b.start()
    st_a, st_b = a.wait_running(), b.wait_running()
    user = pwd.getpwnam(load_config(a.config).daemon.worker_user)
    for i in range(2):
        pid = a.worker_pid(st_a, i)
        s = _status_of(pid)
        assert s["Uid"].split() == [str(user.pw_uid)] * 4 and s["Gid"].split() == [str(user.pw_gid)] * 4
        assert s["Groups"] == ""
        assert (s["CapEff"], s["CapPrm"], s["CapInh"], s["CapBnd"], s["CapAmb"]) == (
            CAP_NET_ADMIN_ONLY, CAP_NET_ADMIN_ONLY, "0" * 16, CAP_NET_ADMIN_ONLY, "0" * 16)
        assert s["NoNewPrivs"] == "1" and s["Seccomp"] == "2"
        assert not _dumpable(pid)
    assert a.proc is not None
    assert _status_of(a.proc.pid)["Uid"].split()[0] == "0"  # the supervisor stays root
    # B's workers, sandbox off: root, every capability, no filter
    s = _status_of(b.worker_pid(st_b, 0))
    assert s["Uid"].split()[0] == "0" and s["Seccomp"] == "0" and s["CapEff"] != CAP_NET_ADMIN_ONLY
    # traffic both ways, with state files written by the workers' user in their directories
    messages = [(PORTS[i % 2], f"msg-{i}") for i in range(20)]
    assert sorted(send(pair, messages)) == sorted(m for _, m in messages)  # two queues: any order
    cfg = load_config(a.config)
    for name in ("ab0", "ab1"):
        path = state.state_path(cfg.daemon.state_dir, cfg.sa(name))
        assert path.parent.stat().st_uid == user.pw_uid and path.stat().st_uid == user.pw_uid
        # the supervisor's group (root's) reads them: setgid directory, files 0640
        assert (path.parent.stat().st_mode & 0o7777, path.parent.stat().st_gid) == (0o2750, 0)
        assert (path.stat().st_mode & 0o777, path.stat().st_gid) == (0o640, 0)
    base = Path(cfg.daemon.state_dir)
    assert base.stat().st_uid == 0 and base.stat().st_mode & 0o777 == 0o700
    assert a.stop() == 0 and b.stop() == 0


def _unit_caps() -> list[str]:
    """``setpriv`` limiting what follows to the unit's CapabilityBoundingSet."""
    unit = UnitFile.parse((REPO / "scripts" / "nfq-ipsec@.service.in").read_text())
    caps = (unit.get("Service", "CapabilityBoundingSet") or "").split()
    assert caps and "CAP_DAC_READ_SEARCH" not in caps and "CAP_DAC_OVERRIDE" not in caps
    wanted = ",".join(f"+{c.removeprefix('CAP_').lower()}" for c in caps)
    return ["setpriv", "--bounding-set", f"-all,{wanted}", "--inh-caps", "-all", "--"]


def test_daemon_runs_with_the_units_capabilities(pair: Pair, tmp_path: Path,
                                                daemons: list[Daemon]) -> None:
    gate.tool("setpriv", "util-linux")
    keys = make_keys()
    a = daemon(pair, tmp_path, True, keys, daemons)
    b = daemon(pair, tmp_path, False, keys, daemons)
    prefix = _unit_caps()
    a.start(prefix=prefix)
    b.start()
    a.wait_running()
    b.wait_running()
    assert a.proc is not None
    eff = int(_status_of(a.proc.pid)["CapEff"], 16)
    assert eff & (1 << 1 | 1 << 2) == 0  # neither CAP_DAC_OVERRIDE nor CAP_DAC_READ_SEARCH
    first = [(PORTS[i % 2], f"first-{i}") for i in range(10)]
    assert sorted(send(pair, first)) == sorted(m for _, m in first)
    assert a.stop() == 0
    a.start(prefix=prefix)  # reads the state files its workers wrote, through their group
    st = a.wait_running()
    assert a.sa(st, "ab0")["seq"] == 5 and a.sa(st, "ab1")["seq"] == 5
    second = [(PORTS[i % 2], f"second-{i}") for i in range(10)]
    assert sorted(send(pair, second)) == sorted(m for _, m in second)
    st = a.status()
    assert st is not None and a.sa(st, "ab0")["seq"] == 10
    assert a.stop() == 0 and b.stop() == 0


def _restarted(times: int) -> Callable[[dict[str, Any]], bool]:
    def done(s: dict[str, Any]) -> bool:
        w = s["workers"][0]
        return bool(w["restarts"] == times and w["state"] == "ready")

    return done


def _attack(pair: Pair, what: str) -> None:
    sender = pair.python(pair.a, SENDER, ADDR_B, "0", json.dumps([[PORTS[0], f"NFQ-ATTACK:{what}"]]))
    _, err = sender.communicate(timeout=60)
    assert sender.returncode == 0, err


def test_compromised_worker_is_contained(pair: Pair, tmp_path: Path, daemons: list[Daemon]) -> None:
    keys = make_keys()
    a = daemon(pair, tmp_path, True, keys, daemons, NFQ_IPSEC_TEST_FAULT="compromised")
    b = daemon(pair, tmp_path, False, keys, daemons)
    a.start()
    b.start()
    st = a.wait_running()
    b.wait_running()
    cfg = load_config(a.config)
    # Another queue's (compartment's) key file: root's, 0600, as the hardening checks want it.
    other_key = tmp_path / "a" / "other.key"
    other_key.write_text(keys["ab1"])
    other_key.chmod(0o600)
    messages = [(PORTS[1], f"warm-{n}") for n in range(3)]  # queue 1 writes its state file
    assert send(pair, messages) == [m for _, m in messages]
    sibling_state = state.state_path(cfg.daemon.state_dir, cfg.sa("ab1"))
    assert sibling_state.exists()
    survivor = a.worker_pid(st, 1)
    outside = tmp_path / "a" / "pwned"
    refused = [
        f"read:{other_key}",
        f"read:{sibling_state}",
        f"state-read:../{sibling_state.parent.name}/{sibling_state.name}",
        "read:/etc/shadow",
        f"write:{outside}",
        "state-write:../pwned",
    ]
    killed = {  # attack -> the system call seccomp kills it for
        "exec": "execve",
        f"ptrace:{survivor}": "ptrace",
        f"kill:{survivor}": "kill",
        "raw-socket": "socket",
    }
    gap, seconds, flows = 0.004, 14.0, 3
    receiver = pair.python(pair.b, RECEIVER, ADDR_B, ",".join(map(str, PORTS)), "0", stdin=True)
    sender = None
    deaths: list[dict[str, Any]] = []
    try:
        ready(receiver)
        sender = pair.python(pair.a, PACED, ADDR_B, str(PORTS[1]), str(flows), str(gap),
                             str(seconds), MARKER)
        ready(sender)
        time.sleep(0.5)
        for what in refused:
            _attack(pair, what)
        for n, (what, call) in enumerate(killed.items(), 1):
            _attack(pair, what)
            st = a.wait_for(_restarted(n), what=f"restart after {what}")
            w = st["workers"][0]
            deaths.append({"attack": what, "last_exit": w["last_exit"],
                           "signal": w["last_signal"], "syscall": w["last_syscall"]})
            assert w["last_signal"] == "SIGSYS", (what, w)
            if w["last_syscall"] is not None:  # the kernel log had the audit line
                assert sandbox.syscall_name(w["last_syscall"]) == call, (what, w)
                assert call in w["last_exit"]
        sent = result(sender, timeout=60)
        time.sleep(0.5)
        got = result(receiver, stdin="")
    finally:
        end(sender, receiver)
    log = a.log_text()
    for what in refused:
        assert f"test fault: attack {what}: refused" in log, what
    assert "SUCCEEDED" not in log
    assert "killed by SIGSYS" in log
    assert not outside.exists()
    st = a.status()
    assert st is not None
    assert st["workers"][1]["pid"] == survivor and st["workers"][1]["restarts"] == 0
    arrivals: dict[str, list[int]] = {}
    for _, text in got:
        if text.startswith(MARKER):
            _, port, flow, n = text.split(":")
            arrivals.setdefault(f"{port}:{flow}", []).append(int(n))
    assert set(arrivals) == set(sent)
    for key, count in sent.items():
        assert arrivals[key] == list(range(count)), f"flow {key} on the other queue lost or reordered"
    # the compromised queue still carries traffic after all that
    after = [(PORTS[0], f"after-{n}") for n in range(5)]
    assert send(pair, after) == [m for _, m in after]
    figures = {"attacks refused": len(refused), "deaths by SIGSYS": deaths,
               "packets sent on the other queue": sum(sent.values()),
               "packets lost on the other queue": 0}
    print(f"\nisolation figures: {json.dumps(figures)}")
    assert a.stop() == 0 and b.stop() == 0


def test_state_directories_prepared_for_the_workers(tmp_path: Path) -> None:
    """The supervisor's part before a worker starts (no namespaces needed): each queue's
    directory made for the workers' user, an SA's files moved in from the old flat layout and
    from another queue's directory, files root left there given to the workers' user through a
    descriptor, a directory another user owns refused, not taken."""
    import dataclasses
    import stat as st_mod

    import sas

    from nfq_ipsec.core import SADirection

    user = pwd.getpwnam("nobody")
    sdir = tmp_path / "state"
    flat = sas.params("flat", 0x100, SADirection.OUT)
    moved = sas.params("moved", 0x101, SADirection.OUT, key=sas.key_for("aes-gcm-128", 7), queue=5)
    state.prepare_dir(sdir)
    # the old layout: a file in state_dir itself; an SA whose file another queue's dir holds
    old = sdir / state.state_path(sdir, flat).name
    old.write_text(state.render(flat, 42))
    old.chmod(0o600)
    elsewhere = state.state_path(sdir, dataclasses.replace(moved, queue=9))
    state.prepare_worker_dir(sdir, 9, [], user.pw_uid)
    state.write(elsewhere, state.render(moved, 7), owner=(user.pw_uid, 0))
    state.prepare_worker_dir(sdir, 0, [flat], user.pw_uid)
    state.prepare_worker_dir(sdir, 5, [moved], user.pw_uid)
    for params, value in ((flat, 42), (moved, 7)):
        path = state.state_path(sdir, params)
        info = path.stat()
        assert (info.st_uid, info.st_gid, st_mod.S_IMODE(info.st_mode)) == (user.pw_uid, 0, 0o640)
        assert state.parse(params, path.read_bytes()).value == value
        d = path.parent.stat()
        assert (d.st_uid, d.st_gid, st_mod.S_IMODE(d.st_mode)) == (user.pw_uid, 0, 0o2750)
    assert not old.exists() and not elsewhere.exists()
    assert (sdir / "q9").stat().st_uid == user.pw_uid  # the other queue's directory handed back
    assert state.check(str(sdir), [flat, moved], user.pw_uid) == []
    # the sandbox turned off afterwards: refused (the workers' user's, not root's), with the fix
    with pytest.raises(state.StateError, match=f"owned by uid {user.pw_uid}, not by uid 0.*chown 0"):
        state.prepare_worker_dir(sdir, 5, [moved], None)
    # a queue directory that belongs to someone else is refused, not taken over
    os.chown(sdir / "q0", 12345, 12345)
    with pytest.raises(state.StateError, match="owned by uid 12345"):
        state.prepare_worker_dir(sdir, 0, [flat], user.pw_uid)
    assert (sdir / "q0").stat().st_uid == 12345

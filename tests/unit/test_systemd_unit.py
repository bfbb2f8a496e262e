"""The systemd unit nfq-ipsec@.service and scripts/install-service that installs it.

This machine runs no systemd, so: the template is rendered by the real setup script
(``scripts/install-service --no-deps`` into a temporary unit directory), ``systemd-analyze
verify`` must accept the result without a word (it also checks that ExecStart's program exists),
and the unit's settings that carry the design (fail closed, KillMode, restart policy, private
directories, capabilities) are asserted. Starting and stopping the daemon *as the unit does*
(its ExecStart/ExecStartPost argv, SIGTERM to the main process, a crash and
Restart=on-failure) runs in the namespace test of the VM flow, tests/lab/test_vagrant.py.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import gate
import pytest
from repo import ROOT

from nfq_ipsec import cli, exitcodes, supervisor
from nfq_ipsec.service import UnitFile, ready, wait_ready
from nfq_ipsec.status import StatusReport

INSTALL = ROOT / "scripts" / "install-service"
VENV = Path(sys.prefix)


def _tool(name: str, package: str) -> str:
    return gate.tool(name, package)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(unit file, config dir) as scripts/install-service renders them for this venv."""
    gate.require([f"{VENV} has no bin/nfq-ipsec (run scripts/install-deps)"]
                 if not (VENV / "bin" / "nfq-ipsec").exists() else [])
    gate.require(gate.root_problems(), "scripts/install-service")
    tmp = tmp_path_factory.mktemp("unit")
    res = subprocess.run([str(INSTALL), "--no-deps", "--venv", str(VENV), "--unit-dir", str(tmp / "unit"),
                          "--config-dir", str(tmp / "etc"), "--bin-dir", str(tmp / "bin")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return tmp / "unit" / "nfq-ipsec@.service", tmp / "etc"


@pytest.fixture(scope="module")
def unit(rendered: tuple[Path, Path]) -> UnitFile:
    return UnitFile.parse(rendered[0].read_text())


def test_install_service_renders_the_template(rendered: tuple[Path, Path]) -> None:
    path, etc = rendered
    text = path.read_text()
    assert not re.search(r"@[A-Z_]+@", text), "a placeholder was left"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(etc.stat().st_mode) == 0o700
    assert f"{VENV}/bin/nfq-ipsec run --config {etc}/%i.toml" in text
    assert os.readlink(etc.parent / "bin" / "nfq-ipsec") == f"{VENV}/bin/nfq-ipsec"


def test_systemd_analyze_verify_is_silent(rendered: tuple[Path, Path]) -> None:
    analyze = _tool("systemd-analyze", "systemd")
    path, _ = rendered
    res = subprocess.run([analyze, "verify", "--man=no", str(path.parent / "nfq-ipsec@site.service")],
                         capture_output=True, text=True, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
    assert res.returncode == 0 and not res.stderr.strip() and not res.stdout.strip(), res.stdout + res.stderr


def test_systemd_analyze_verify_catches_mistakes(rendered: tuple[Path, Path], tmp_path: Path) -> None:
    """The check above would notice: an unknown setting, a missing program."""
    analyze = _tool("systemd-analyze", "systemd")
    path, _ = rendered
    broken = tmp_path / "nfq-ipsec@.service"
    broken.write_text(path.read_text().replace("KillMode=mixed", "KillMode=mixed\nKilMode=mixed")
                      .replace("/bin/nfq-ipsec run", "/bin/nfq-ipsec-missing run"))
    res = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / "nfq-ipsec@x.service")],
                         capture_output=True, text=True)
    assert "Unknown key" in res.stderr and "nfq-ipsec-missing" in res.stderr, res.stderr


def test_hardening_exposure_stays_low(rendered: tuple[Path, Path]) -> None:
    analyze = _tool("systemd-analyze", "systemd")
    path, _ = rendered
    res = subprocess.run([analyze, "security", "--offline=true", "--no-pager",
                          str(path.parent / "nfq-ipsec@x.service")],
                         capture_output=True, text=True, env={**os.environ, "SYSTEMD_COLORS": "0"})
    line = [ln for ln in res.stdout.splitlines() if "Overall exposure level" in ln]
    assert line, res.stdout[-2000:] + res.stderr
    level = float(line[0].split(":")[1].split()[0])
    print(line[0])
    assert level <= 3.0, line[0]


def test_fail_closed_settings(unit: UnitFile, rendered: tuple[Path, Path]) -> None:
    _, etc = rendered
    s = "Service"
    assert unit.get(s, "Type") == "notify" and unit.get(s, "NotifyAccess") == "main"
    # the watchdog outlasts the longest a reload holds the supervisor's loop (3 waits on workers)
    assert int(unit.get(s, "WatchdogSec") or 0) > 3 * supervisor.READY_TIMEOUT
    assert unit.commands("ExecStart", "site") == [
        [f"{VENV}/bin/nfq-ipsec", "run", "--config", f"{etc}/site.toml"]]
    # No path of the unit removes the rules: a stop closes them (the daemon itself, on
    # SIGTERM), and nothing runs between a crash and the automatic restart.
    for key in ("ExecStop", "ExecStopPost"):
        assert unit.values(s, key) == [], f"{key} would run between a crash and the restart"
    # systemctl reload: the daemon applies its changed configuration; the command's exit status
    # tells systemd whether it did
    assert unit.commands("ExecReload", "site") == [
        [f"{VENV}/bin/nfq-ipsec", "reload", "--config", f"{etc}/site.toml"]]
    assert unit.get(s, "Restart") == "on-failure"
    assert float(unit.get(s, "RestartSec") or 0) > 0
    assert unit.get(s, "KillMode") == "mixed"
    assert unit.get(s, "KillSignal") == "SIGTERM"
    assert int(unit.get(s, "TimeoutStopSec") or 0) >= 15  # the supervisor's own stop takes up to ~10 s
    prevent = " ".join(unit.values(s, "RestartPreventExitStatus")).split()
    assert str(exitcodes.CONFIG) in prevent
    if hasattr(cli, "EXIT_STATE"):
        assert str(exitcodes.STATE) in prevent
    (post,) = unit.commands("ExecStartPost", "site", {"MAINPID": "1234"})
    assert post == [f"{VENV}/bin/python", "-m", "nfq_ipsec.service", "wait-ready", "--config",
                    f"{etc}/site.toml", "--pid", "1234", "--timeout", "60"]
    assert unit.get("Unit", "Before") == "network-pre.target"


def test_boot_guard_unit(rendered: tuple[Path, Path]) -> None:
    """The guard installs the closed rules early in boot, before any network and before the
    daemon; the daemon's unit pulls it in. Its effect on packets: tests/lab/test_leak_matrix.py
    (``boot guard alone`` runs this ExecStart in a namespace)."""
    analyze = _tool("systemd-analyze", "systemd")
    path, etc = rendered
    guard_path = path.parent / "nfq-ipsec-guard@.service"
    assert stat.S_IMODE(guard_path.stat().st_mode) == 0o644
    guard = UnitFile.parse(guard_path.read_text())
    assert guard.get("Unit", "DefaultDependencies") == "no"
    assert set((guard.get("Unit", "Before") or "").split()) == {"network-pre.target",
                                                                 "nfq-ipsec@%i.service"}
    assert guard.get("Service", "Type") == "oneshot"
    assert guard.get("Service", "RemainAfterExit") == "yes"
    assert guard.commands("ExecStart", "site") == [
        [f"{VENV}/bin/nfq-ipsec", "rules", "install", "--closed", "--config", f"{etc}/site.toml"]]
    for key in ("ExecStop", "ExecStopPost"):
        assert guard.values("Service", key) == [], f"{key} would take the guard away"
    daemon = UnitFile.parse(path.read_text())
    assert "nfq-ipsec-guard@%i.service" in (daemon.get("Unit", "Wants") or "").split()
    assert "nfq-ipsec-guard@%i.service" in (daemon.get("Unit", "After") or "").split()
    res = subprocess.run([analyze, "verify", "--man=no", str(path.parent / "nfq-ipsec-guard@site.service")],
                         capture_output=True, text=True, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
    assert res.returncode == 0 and not res.stderr.strip() and not res.stdout.strip(), res.stdout + res.stderr


def test_directories_and_capabilities(unit: UnitFile) -> None:
    s = "Service"
    assert unit.get(s, "RuntimeDirectory") == "nfq-ipsec"
    assert unit.get(s, "RuntimeDirectoryMode") == "0700"
    assert unit.get(s, "StateDirectory") == "nfq-ipsec"
    assert unit.get(s, "StateDirectoryMode") == "0700"
    rw = " ".join(unit.values(s, "ReadWritePaths")).split()
    assert {"/run/nfq-ipsec", "/var/lib/nfq-ipsec"} <= set(rw)
    assert unit.get(s, "ProtectSystem") == "strict"
    # the rules and queues; and the workers' user and state directories (daemon.sandbox)
    assert set((unit.get(s, "CapabilityBoundingSet") or "").split()) == {
        "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_CHOWN"}
    families = set((unit.get(s, "RestrictAddressFamilies") or "").split())
    assert {"AF_NETLINK", "AF_UNIX", "AF_INET"} <= families
    # @system-service includes sched_setaffinity and setresuid; seccomp for the workers' filter
    assert unit.values(s, "SystemCallFilter") == ["@system-service", "seccomp"]
    assert unit.get(s, "PrivateMounts") == "yes"


def test_no_core_dumps(unit: UnitFile) -> None:
    """The processes hold keys: a core dump would write them to disk."""
    assert unit.get("Service", "LimitCORE") == "0"


def test_install_service_refuses_paths_systemd_would_misread(tmp_path: Path) -> None:
    res = subprocess.run([str(INSTALL), "--no-deps", "--venv", "/opt/my venv", "--unit-dir", str(tmp_path),
                          "--bin-dir", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "absolute path" in res.stderr
    assert not (tmp_path / "nfq-ipsec@.service").exists()


# -- unit file reading ---------------------------------------------------------------------------

def test_unitfile_parse_and_expand() -> None:
    u = UnitFile.parse("[Service]\n# c\nExecStart=-/bin/x --a %i \\\n  --b $MAINPID ${ONE}\n"
                       "Environment=A=1\nReadWritePaths=/a\nReadWritePaths=\nReadWritePaths=/b\n")
    assert u.commands("ExecStart", "inst", {"MAINPID": "7", "ONE": "x y"}) == [
        ["/bin/x", "--a", "inst", "--b", "7", "x y"]]
    assert u.values("Service", "ReadWritePaths") == ["/b"]
    with pytest.raises(ValueError):
        UnitFile.parse("garbage\n")


# -- wait-ready (the unit's ExecStartPost) -------------------------------------------------------

def _status(rules: bool, pid: int = 42, workers: int = 2) -> dict[str, Any]:
    return {"daemon": {"pid": pid, "rules_installed": rules, "state": "running" if rules else "starting"},
            "workers": [{"queue": 100 + i, "pid": 1000 + i, "packets_in": 0} for i in range(workers)]}


@pytest.fixture
def control(tmp_path: Path) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A stand-in control socket that answers with the next queued status (the last repeats)."""
    path = str(tmp_path / "ctl.sock")
    answers: list[dict[str, Any]] = []
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(4096)
                answer = answers.pop(0) if len(answers) > 1 else answers[0]
                conn.sendall(json.dumps(answer).encode() + b"\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield path, answers
    stop.set()
    t.join(2)
    srv.close()


def test_wait_ready_waits_for_rules(control: tuple[str, list[dict[str, Any]]]) -> None:
    path, answers = control
    answers += [_status(False), _status(False), _status(True)]
    ok, last = wait_ready(path, timeout=10)
    assert ok, last


def test_wait_ready_times_out_and_checks_the_pid(control: tuple[str, list[dict[str, Any]]]) -> None:
    path, answers = control
    answers.append(_status(False))
    ok, last = wait_ready(path, timeout=0.5)
    assert not ok and "rules_installed False" in last
    answers[0] = _status(True, pid=42)
    ok, last = wait_ready(path, timeout=1, pid=43)
    assert not ok and "not 43" in last


def test_wait_ready_without_a_daemon(tmp_path: Path) -> None:
    ok, last = wait_ready(str(tmp_path / "none.sock"), timeout=0.3)
    assert not ok and "not running" in last
    assert not ready(cast(StatusReport, {"daemon": {"rules_installed": True}, "workers": []}))

"""The sandbox's pieces that need no root: the user lookup and its error, the seccomp filter
in a child process (no_new_privs lets any process install one), what the supervisor reads back
of a seccomp death. The whole sandbox on a real worker: tests/root/test_sandbox.py."""

from __future__ import annotations

import errno
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from nfq_ipsec import sandbox


def test_missing_user_names_the_setting_and_the_fix() -> None:
    with pytest.raises(sandbox.SandboxError) as info:
        sandbox.lookup("nfq-ipsec-no-such-user")
    text = str(info.value)
    assert "daemon.worker_user" in text and "useradd --system" in text
    assert 'daemon.sandbox = "off"' in text


def test_root_is_no_worker_user() -> None:
    with pytest.raises(sandbox.SandboxError, match="is root"):
        sandbox.lookup("root")


def test_worker_owner_is_none_with_the_sandbox_off() -> None:
    assert sandbox.worker_owner("off", "nfq-ipsec-no-such-user") is None
    assert sandbox.worker_owner("enforce", "nobody") == 65534


def _in_child(body: Callable[[], int]) -> tuple[int | None, int | None]:
    """Run ``body`` in a forked child: (its exit code, None) or (None, the signal that killed
    it)."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = body()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    return os.WEXITSTATUS(status), None


def test_filter_allows_the_state_directory_and_refuses_other_opens(tmp_path: Path) -> None:
    (tmp_path / "mine").write_text("x")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.write_text("secret")

    def body() -> int:
        dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        sandbox.install_filter(dfd, "enforce")
        os.close(os.open("mine", os.O_RDONLY, dir_fd=dfd))  # its own directory: allowed
        fd = os.open("new", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=dfd)
        os.write(fd, b"y")
        os.close(fd)
        try:
            os.open(outside, os.O_RDONLY)
        except OSError as err:
            return 0 if err.errno == errno.EACCES else 3
        return 4

    assert _in_child(body) == (0, None)
    assert (tmp_path / "new").read_text() == "y"


@pytest.mark.parametrize("attempt", ["socket", "exec", "kill"])
def test_filter_kills_on_what_a_worker_never_does(attempt: str) -> None:
    actions: dict[str, Callable[[], object]] = {
        "socket": lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
        "exec": lambda: os.execv("/bin/true", ["true"]),
        "kill": lambda: os.kill(parent, 0),
    }
    parent = os.getpid()

    def body() -> int:
        sandbox.install_filter(None, "enforce")
        actions[attempt]()
        return 0

    assert _in_child(body) == (None, signal.SIGSYS)


@pytest.mark.parametrize("target", ["helper", "parent"])
def test_a_worker_may_kill_and_reap_its_offload_helpers_only(target: str) -> None:
    """``children`` (crypto offload helpers forked before the filter): kill and wait4 of
    those pids allowed, kill of any other pid still fatal."""
    parent = os.getpid()

    def body() -> int:
        r, w = os.pipe()
        helper = os.fork()
        if helper == 0:  # waits until killed, or until its parent is gone (end of file)
            os.close(w)
            os.read(r, 1)
            os._exit(0)
        os.close(r)
        sandbox.install_filter(None, "enforce", children=(helper,))
        os.kill(helper if target == "helper" else parent, signal.SIGKILL)
        _, status = os.waitpid(helper, 0)
        return 0 if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL else 5

    want = (0, None) if target == "helper" else (None, signal.SIGSYS)
    assert _in_child(body) == want


def test_log_mode_lets_the_call_through() -> None:
    def body() -> int:
        sandbox.install_filter(None, "log")
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()
        return 0

    assert _in_child(body) == (0, None)


def test_seccomp_syscall_reads_the_audit_line(tmp_path: Path) -> None:
    kmsg = tmp_path / "kmsg"
    kmsg.write_text(
        "6,1,2,-;audit: type=1326 audit(1.2:3): auid=1 uid=999 gid=995 ses=1 pid=41 "
        'comm="nfq-ipsec-q1" exe="/usr/bin/python3" sig=31 arch=c000003e syscall=101 compat=0\n'
        "6,2,3,-;audit: type=1326 audit(1.2:4): auid=1 uid=999 gid=995 ses=1 pid=42 "
        'comm="nfq-ipsec-q2" exe="/usr/bin/python3" sig=31 arch=c000003e syscall=59 compat=0\n')
    assert sandbox.seccomp_syscall(42, str(kmsg)) == 59
    assert sandbox.seccomp_syscall(41, str(kmsg)) == 101
    assert sandbox.seccomp_syscall(43, str(kmsg)) is None
    assert sandbox.seccomp_syscall(42, str(tmp_path / "none")) is None
    assert sandbox.syscall_name(59) == "execve"

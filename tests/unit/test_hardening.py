"""``nfq_ipsec/hardening.py``: core dumps off in a process that holds keys; files opened
without following links and checked as opened (the config and state tests cover the callers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import configs
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


# -- the directories on a file's path --------------------------------------------------------
OTHER_UID = 65534  # nobody


def private_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")
    path.chmod(0o600)
    return path


def refusal(path: Path) -> str:
    with pytest.raises(hardening.UnsafePathError) as info:
        os.close(hardening.open_checked(path)[0])
    return str(info.value)


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757, 0o2775])
def test_a_directory_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    f = private_file(tmp_path / "d" / "f")
    os.close(hardening.open_checked(f)[0])  # as made: accepted
    (tmp_path / "d").chmod(mode)
    msg = refusal(f)
    assert msg == (f"{tmp_path / 'd'} (a directory on the path to {f}) is writable by group or "
                   f"others (mode {mode:04o}) and not sticky: they can put another file in its "
                   f"place; run chmod go-w {tmp_path / 'd'}")


def test_a_directory_further_up_is_checked_too(tmp_path: Path) -> None:
    f = private_file(tmp_path / "a" / "b" / "c" / "f")
    (tmp_path / "a").chmod(0o777)
    assert refusal(f).startswith(f"{tmp_path / 'a'} (a directory on the path to {f}) is writable")
    (tmp_path / "a").chmod(0o755)
    os.close(hardening.open_checked(f)[0])


def test_sticky_directories_like_tmp_are_accepted(tmp_path: Path) -> None:
    """A sticky directory (``/tmp``, the tests' own temporary directories) lets others add
    entries but not touch ours."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    for f in (private_file(shared / "f"), private_file(shared / "mine" / "f")):
        fd, st = hardening.open_checked(f)
        os.close(fd)
        assert st.st_size == 1
    assert os.stat("/tmp").st_mode & 0o1000  # the tests' own files pass through /tmp


def test_relative_paths_and_dot_dot_are_walked_as_the_kernel_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = private_file(tmp_path / "d" / "f")
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    monkeypatch.chdir(tmp_path / "d")
    os.close(hardening.open_checked("f")[0])
    with pytest.raises(hardening.UnsafePathError, match="writable by group or others"):
        hardening.open_checked("../open/../d/f")  # the kernel passes through "open"
    (tmp_path / "d").chmod(0o777)
    assert "a directory on the path to f)" in refusal(Path("f"))
    assert f.exists()


def test_links_on_the_way_are_followed_and_their_target_checked(tmp_path: Path) -> None:
    f = private_file(tmp_path / "real" / "sub" / "f")
    (tmp_path / "via").symlink_to(tmp_path / "real")  # absolute target
    (tmp_path / "rel").symlink_to("real/sub")  # relative target
    os.close(hardening.open_checked(tmp_path / "via" / "sub" / "f")[0])
    os.close(hardening.open_checked(tmp_path / "rel" / "f")[0])
    (tmp_path / "real").chmod(0o777)
    for path in (tmp_path / "via" / "sub" / "f", tmp_path / "rel" / "f"):
        assert refusal(path).startswith(f"{tmp_path / 'real'} (a directory on the path to {path})")
    (tmp_path / "real").chmod(0o755)
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(hardening.UnsafePathError, match="too many symbolic links"):
        hardening.open_checked(tmp_path / "loop" / "f")
    assert f.exists()


@pytest.mark.root
def test_a_directory_another_user_owns_is_refused(tmp_path: Path) -> None:
    f = private_file(tmp_path / "theirs" / "f")
    os.chown(tmp_path / "theirs", OTHER_UID, OTHER_UID)  # mode 0755: only they can write it
    assert refusal(f) == (f"{tmp_path / 'theirs'} (a directory on the path to {f}) is owned by "
                          f"uid {OTHER_UID}, not by root that runs nfq-ipsec: that user can put "
                          f"another file in its place; run chown root {tmp_path / 'theirs'}")


@pytest.mark.root
def test_a_link_of_another_user_in_a_sticky_directory_is_refused(tmp_path: Path) -> None:
    """In a sticky directory the owner of an entry may replace it: a link there must be ours.
    A link of another user in a directory only we can write can't be changed by them."""
    f = private_file(tmp_path / "real" / "f")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    link = shared / "link"
    link.symlink_to(tmp_path / "real")
    os.close(hardening.open_checked(link / "f")[0])
    os.lchown(link, OTHER_UID, OTHER_UID)
    assert refusal(link / "f") == (
        f"{link} (a symbolic link on the path to {link / 'f'}) is owned by uid {OTHER_UID}, not "
        "by root that runs nfq-ipsec: that user can replace the link; name the file by a path "
        "without it")
    safe_link = tmp_path / "link"
    safe_link.symlink_to(tmp_path / "real")
    os.lchown(safe_link, OTHER_UID, OTHER_UID)
    os.close(hardening.open_checked(safe_link / "f")[0])
    assert f.exists()


@pytest.mark.root
def test_the_daemons_own_user_may_own_the_directories(tmp_path: Path) -> None:
    """Run as another user (not root), a file in that user's own directories is accepted; the
    same file is refused by root, since that user could replace it."""
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="g12home-"))  # /tmp: sticky, root's
    try:
        f = private_file(home / "etc" / "f")
        for p in (home, home / "etc", f):
            os.chown(p, OTHER_UID, OTHER_UID)
        probe = ("import os, sys\nfrom nfq_ipsec import hardening\n"
                 "os.close(hardening.open_checked(sys.argv[1])[0])\nprint('accepted')")
        res = subprocess.run(["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}",
                              "--clear-groups", sys.executable, "-c", probe, str(f)],
                             capture_output=True, text=True, timeout=60, cwd="/")
        assert res.returncode == 0 and res.stdout == "accepted\n", res.stderr
        assert f"owned by uid {OTHER_UID}, not by root" in refusal(f)
    finally:
        import shutil

        shutil.rmtree(home)


def _config(cfg: Path, key: Path, state_dir: Path) -> Path:
    private_file(key).write_text("11" * 20 + "\n")
    private_file(cfg).write_text(configs.one_sa(cfg.parent / "run", state_dir,
                                                f'key_file = "{key}"'))
    return cfg


def test_callers_refuse_with_their_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The config file and the key files: exit 2, like their own owner and mode; state_dir:
    exit 5 from ``run``'s checks, and nothing is created under the open directory."""
    from nfq_ipsec import iptables, state, supervisor
    from nfq_ipsec.cli import main
    from nfq_ipsec.config import load_config

    cfg = _config(tmp_path / "etc" / "c.toml", tmp_path / "keys" / "o.key",
                  tmp_path / "var" / "state")
    assert main(["check-config", str(cfg)]) == 0
    capsys.readouterr()
    for opened, what in ((tmp_path / "etc", f"{cfg}: refused: "),
                         (tmp_path / "keys", "sa[0].key_file: ")):
        opened.chmod(0o777)
        assert main(["check-config", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert f"  {what}{opened} (a directory on the path to " in err, err
        assert f"run chmod go-w {opened}" in err
        opened.chmod(0o755)

    var = tmp_path / "var"
    var.mkdir(mode=0o777)
    var.chmod(0o777)
    loaded = load_config(cfg, online_cpus=[0])
    (problem,) = state.check(loaded.daemon.state_dir, loaded.sas)
    assert problem == (f"state directory {var / 'state'} refused: {var} (a directory on the path "
                       f"to {var / 'state'}) is writable by group or others (mode 0777) and not "
                       f"sticky: they can put another file in its place; run chmod go-w {var}")
    monkeypatch.setattr(iptables, "commands", lambda cfg: ("iptables-save", "iptables-restore"))
    monkeypatch.setattr(iptables, "read_tables", lambda be, netns=None: {})
    assert supervisor.preflight(loaded) == 5
    assert main(["state", "show", "--config", str(cfg)]) == 1
    assert f"UNUSABLE: state file {var / 'state'}" in capsys.readouterr().out
    assert not (var / "state").exists()  # nothing made under it
    var.chmod(0o755)
    assert state.check(loaded.daemon.state_dir, loaded.sas) == []
    assert supervisor.preflight(loaded) is None
    assert (var / "state").is_dir()

"""The README's "Two peers" walkthrough, executed as written.

The commands of its ``sh`` block run in host A's directory (``nfq-ipsec`` is this checkout's),
with ``host-a.toml`` as the README shows it; ``peer-config`` must write exactly the
``host-b.toml`` the README shows. Then both files, with the key files copied to B's directory,
run as two daemons in two namespaces whose interfaces are ``eth1`` with the README's
addresses: pings from A to B are answered, the wire between them carries ESP only (with the
README's SPIs), and each side's SA counters agree with the other's.

The one change to the copies that run: ``control_socket`` and ``state_dir`` under ``[daemon]``
point into the test's own directories, so that the test never touches ``/run/nfq-ipsec`` or
``/var/lib/nfq-ipsec`` of the machine it runs on.

Needs root; runs in CI (marks ``lab`` and ``root``).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from labutil import Pair, Sniffer, env, esp_ids

from nfq_ipsec_lab.lab.daemon import Daemon
from nfq_ipsec_lab.lab.netns import Lab
from nfq_ipsec_lab.lab.traffic import ping

ROOT = Path(__file__).resolve().parents[2]
ADDR_A, ADDR_B = "192.168.56.10", "192.168.56.11"


def readme_block(marker: str) -> str:
    """The fenced block right after ``<!-- walkthrough: MARKER`` in the README."""
    text = (ROOT / "README.md").read_text()
    at = text.index(f"<!-- walkthrough: {marker}")
    m = re.compile(r"```[a-z]*\n(.*?)```", re.S).search(text, at)
    assert m is not None, marker
    return m.group(1)


def nfq_ipsec() -> list[str]:
    return [sys.executable, "-m", "nfq_ipsec.cli"]


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A's directory after the README's commands, and B's with what A sends it."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    for d in (a_dir, b_dir):
        d.mkdir(mode=0o700)
    (a_dir / "host-a.toml").write_text(readme_block("host-a.toml"))
    (a_dir / "host-a.toml").chmod(0o600)
    for line in readme_block("commands").splitlines():
        argv = shlex.split(line, comments=True)
        if not argv:
            continue
        assert argv[0] == "nfq-ipsec", line
        res = subprocess.run([*nfq_ipsec(), *argv[1:]], cwd=a_dir, env=env(), capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, (line, res.stdout, res.stderr)
    written = (a_dir / "host-b.toml").read_text()
    assert written == readme_block("host-b.toml"), "the README's host-b.toml is not what peer-config writes"
    for f in ["host-b.toml", *(p.name for p in a_dir.glob("*.key"))]:
        shutil.copy2(a_dir / f, b_dir / f)  # scp -p: modes kept (0600)
    yield a_dir, b_dir


def running_copy(path: Path, run_dir: Path) -> Path:
    """``path`` with the test's own control socket and state directory (nothing else changed)."""
    run_dir.mkdir(mode=0o700)
    text = path.read_text()
    assert "\n[daemon]\n" in text
    text = text.replace("\n[daemon]\n", f'\n[daemon]\ncontrol_socket = "{run_dir}/ctl.sock"\n'
                        f'state_dir = "{run_dir}/state"\n', 1)
    out = path.with_name(path.stem + "-run.toml")
    out.write_text(text)
    out.chmod(0o600)
    return out


@pytest.fixture
def pair() -> Iterator[Pair]:
    """Two namespaces joined by a veth pair named eth1 at both ends, with the README's addresses."""
    with Lab() as lab:
        a, b = lab.netns("wka"), lab.netns("wkb")
        lab.veth(a, "eth1", b, "eth1")
        a.addr("eth1", f"{ADDR_A}/24")
        b.addr("eth1", f"{ADDR_B}/24")
        p = Pair(lab, {a.name: a, b.name: b}, a.name, b.name, "eth1", "eth1", a.mac("eth1"), b.mac("eth1"))
        a.ip("neigh", "replace", ADDR_B, "lladdr", p.mac_b, "dev", "eth1", "nud", "permanent")
        b.ip("neigh", "replace", ADDR_A, "lladdr", p.mac_a, "dev", "eth1", "nud", "permanent")
        yield p


def test_the_readme_walkthrough_carries_traffic(peers: tuple[Path, Path], pair: Pair, tmp_path: Path,
                                                daemons: list[Daemon]) -> None:
    a_dir, b_dir = peers
    a = Daemon("a", pair.host(pair.a), running_copy(a_dir / "host-a.toml", tmp_path / "run-a"),
               env=env(), log=tmp_path / "a.log", lab=pair.lab)
    b = Daemon("b", pair.host(pair.b), running_copy(b_dir / "host-b.toml", tmp_path / "run-b"),
               env=env(), log=tmp_path / "b.log", lab=pair.lab)
    daemons += [a, b]
    for d in (a, b):
        d.start()
    for d in (a, b):
        d.wait_running()
    sniffer = Sniffer(pair, pair.b, "eth1", tmp_path / "wire.pcap")
    try:
        result = ping(pair.host(pair.a), ADDR_B, count=10, interval=0.05)
    finally:
        assert sniffer.stop() == 0
    assert result.received == result.sent == 10
    packets = sniffer.packets()
    assert packets and all(p[9] == 50 for p in packets if p[0] >> 4 == 4), "only ESP on the wire"
    spis = {spi for spi, _ in esp_ids(packets)}
    assert spis and spis <= {0x1000, 0x1001, 0x2000, 0x2001}  # the README's SPIs
    sa_a = {s["name"]: s for s in a.status()["sas"]}
    sa_b = {s["name"]: s for s in b.status()["sas"]}
    assert sum(s["packets"] for s in sa_a.values() if s["direction"] == "out") == 10
    for name in sa_a:  # what one side sent with an SA, the other received with it
        assert sa_a[name]["packets"] == sa_b[name]["packets"], name
        assert sa_a[name]["direction"] != sa_b[name]["direction"]
        assert sa_b[name]["integrity_drops"] == sa_a[name]["integrity_drops"] == 0
    assert a.stop() == 0
    assert b.stop() == 0

"""The Vagrant two-VM lab, as far as a machine that can't boot VMs can prove it.

- ``vagrant validate`` on vagrant/Vagrantfile: the common configuration (providers ignored),
  the libvirt provider's block (vagrant-libvirt's own validation) and the VirtualBox block
  (Vagrant's own validation; VirtualBox itself is not in Debian, so a stand-in ``VBoxManage``
  that only answers ``--version`` lets Vagrant load the provider). Debian 12 has ``vagrant``
  and ``vagrant-libvirt`` and scripts/install-deps installs them, so under CI=true a missing
  vagrant fails the test rather than skipping it.
- shellcheck on the provisioning scripts (vagrant/provision.sh, vagrant/run-check;
  scripts/install-service is covered with scripts/ by test_quality).
- The VM flow's own pieces, no VMs: the remote-shell host's command lines, file and process
  handling (nfq_ipsec_lab/lab/vagrant.py), and the key agreement from one seed.
- The VM flow for real, in namespaces (root): two namespaces stand in for the VMs, reached
  through the same ``RemoteHost`` class with ``nsenter --net=... sh -c`` as transport (a shell
  on the other machine that gets one command line, as sshd gives it). Each "VM" is
  provisioned with ``python -m nfq_ipsec_lab.lab.vm setup`` exactly as vagrant/provision.sh calls
  it (config and keys from the seed, network, sysctls, for the gateway topology a LAN
  namespace behind each VM); the unit rendered by scripts/install-service is run as systemd
  would run it (its ExecStartPre/ExecStart/ExecStartPost argv, SIGTERM to the main process
  only); then ``vm.check_pair``, the very check vagrant/run-check runs against the VMs: ping,
  TCP, UDP, a file, the bypass and discard policies, capture on the private wire, no cleartext,
  tshark's ICV check; a SIGKILL of a's daemon (rules stay, nothing in clear, restarted as
  Restart=on-failure would); a clean stop (rules gone, iptables exactly as before).

What needs a workstation with Vagrant: booting the Debian box, rsync, the shell provisioners,
systemd itself (the unit's sandboxing, Restart=, the journal) and ssh. ``vagrant/run-check``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import gate
import pytest
from repo import ROOT

from nfq_ipsec.service import UnitFile
from nfq_ipsec_lab.lab import vm
from nfq_ipsec_lab.lab.checks import Verdict
from nfq_ipsec_lab.lab.daemon import Daemon, iptables_snapshot
from nfq_ipsec_lab.lab.labconfig import LabSA
from nfq_ipsec_lab.lab.netns import Lab, Netns, run
from nfq_ipsec_lab.lab.topology import HOST_A, HOST_B
from nfq_ipsec_lab.lab.vagrant import RemoteHost, ssh_transport

VAGRANT_DIR = ROOT / "vagrant"
SCRIPTS = [VAGRANT_DIR / "provision.sh", VAGRANT_DIR / "run-check"]
VENV = Path(sys.prefix)


def _missing(what: str) -> None:
    gate.require([what + " (scripts/install-deps installs it)"])


# -- vagrant validate ----------------------------------------------------------------------------

def _vagrant(tmp_path: Path) -> tuple[str, dict[str, str]]:
    vagrant = shutil.which("vagrant")
    if vagrant is None:
        _missing("vagrant is not installed (Debian package 'vagrant')")
    assert vagrant is not None
    env = {**os.environ, "NFQ_IPSEC_LAB_DIR": str(tmp_path / "lab"), "VAGRANT_HOME": str(tmp_path / "home"),
           "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"), "VAGRANT_CHECKPOINT_DISABLE": "1",
           "VAGRANT_NO_COLOR": "1"}
    return vagrant, env


def _validate(vagrant: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([vagrant, "validate", *args], cwd=VAGRANT_DIR, env=env, capture_output=True,
                          text=True, timeout=120)


def test_vagrant_validate(tmp_path: Path) -> None:
    vagrant, env = _vagrant(tmp_path)
    res = _validate(vagrant, env, "--ignore-provider")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "validated successfully" in res.stdout
    seed = tmp_path / "lab" / "seed"  # made on first use, private
    assert (seed.stat().st_mode & 0o777) == 0o600 and len(vm.read_seed(seed)) == 32


def test_vagrant_validate_rejects_a_bad_setting(tmp_path: Path) -> None:
    vagrant, env = _vagrant(tmp_path)
    res = _validate(vagrant, {**env, "NFQ_IPSEC_LAB_TOPOLOGY": "mesh"}, "--ignore-provider")
    assert res.returncode != 0 and "host or gateway" in res.stdout + res.stderr


def test_vagrant_validate_libvirt_provider(tmp_path: Path) -> None:
    vagrant, env = _vagrant(tmp_path)
    plugins = subprocess.run([vagrant, "plugin", "list"], env=env, capture_output=True, text=True).stdout
    if "vagrant-libvirt" not in plugins:
        _missing("the vagrant-libvirt plugin is not installed (Debian package 'vagrant-libvirt')")
    res = _validate(vagrant, {**env, "VAGRANT_DEFAULT_PROVIDER": "libvirt"})
    assert res.returncode == 0, res.stdout + res.stderr


def test_vagrant_validate_virtualbox_provider(tmp_path: Path) -> None:
    vagrant, env = _vagrant(tmp_path)
    stub = tmp_path / "bin" / "VBoxManage"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\n# a stand-in: Vagrant only asks for the version to validate\n"
                    "[ \"$1\" = --version ] && echo 7.0.14r161095 && exit 0\nexit 1\n")
    stub.chmod(0o755)
    env = {**env, "VAGRANT_DEFAULT_PROVIDER": "virtualbox", "PATH": f"{stub.parent}:{env['PATH']}"}
    res = _validate(vagrant, env)
    assert res.returncode == 0, res.stdout + res.stderr
    # ... and the provider block really is validated:
    bad = tmp_path / "vf"
    bad.mkdir()
    text = (VAGRANT_DIR / "Vagrantfile").read_text().replace("vb.cpus = 2",
                                                              "vb.cpus = 2\n    vb.cpu_count = 2")
    (bad / "Vagrantfile").write_text(text)
    (bad / "provision.sh").write_text("")
    res = subprocess.run([vagrant, "validate"], cwd=bad, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "cpu_count" in res.stdout + res.stderr


def test_provisioning_scripts_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        _missing("shellcheck is not installed")
    assert shellcheck is not None
    res = subprocess.run([shellcheck, *map(str, SCRIPTS)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_vagrantfile_and_provisioning_agree() -> None:
    """The names the Vagrantfile, provision.sh and vm.py share."""
    vf = (VAGRANT_DIR / "Vagrantfile").read_text()
    prov = (VAGRANT_DIR / "provision.sh").read_text()
    assert f'"a" => "{HOST_A}"' in vf and f'"b" => "{HOST_B}"' in vf
    assert 'destination: "/tmp/nfq-ipsec-lab.seed"' in vf and "/tmp/nfq-ipsec-lab.seed" in prov
    assert f"instance={vm.INSTANCE}" in prov and f"{vm.VENV}" in prov
    assert "-m nfq_ipsec_lab.lab.vm setup" in prov
    assert "scripts/install-service" in prov
    for tool in ("vagrant", "vagrant-libvirt", "systemd"):
        assert tool in (ROOT / "scripts" / "install-deps").read_text()
    # the lab step at every boot (a reboot loses the LAN namespace), build outputs not synced
    lab_step = vf[vf.index('node.vm.provision "lab"'):]
    assert 'run: "always"' in lab_step.split("\n")[0]
    assert '"*.so"' in vf and '"nfq_ipsec/core/_compiled.json"' in vf
    # the check's driver needs no compiler on the workstation
    assert "NFQ_IPSEC_PURE=1" in (VAGRANT_DIR / "run-check").read_text()


# -- the remote-shell host (no VMs) --------------------------------------------------------------

def _remote(tmp_path: Path, **kw: object) -> RemoteHost:
    return RemoteHost("a", ssh_transport(Path("/lab/ssh-config"), "a"), tmp_path, "/var/tmp/nfq-check-1",
                      **kw)  # type: ignore[arg-type]


def test_ssh_command_lines(tmp_path: Path) -> None:
    h = _remote(tmp_path)
    argv = h.argv(["python3", "-c", "print('it''s')\nx = 1", "a b"])
    assert argv[:3] == ["ssh", "-F", "/lab/ssh-config"]
    assert argv[-3:-1] == ["--", "a"]  # options end before the host: nothing after it is an option
    assert shlex.split(argv[-1]) == ["sudo", "-n", "env", "LC_ALL=C", "python3", "-c",
                                     "print('it''s')\nx = 1", "a b"]
    lan = h.within("a:lan", ["ip", "netns", "exec", "nfq-lan"])
    assert shlex.split(lan.argv(["ss", "-ltn"])[-1])[4:] == ["ip", "netns", "exec", "nfq-lan", "ss", "-ltn"]
    assert lan.remote_root == h.remote_root and not lan.local


def test_remote_paths_and_background_wrapper(tmp_path: Path) -> None:
    h = _remote(tmp_path)
    assert h.path(tmp_path / "x" / "wire.pcap") == "/var/tmp/nfq-check-1/x/wire.pcap"
    with pytest.raises(Exception, match="not in the lab's work directory"):
        h.path(Path("/etc/passwd"))
    line = shlex.split(h.background_argv(["tcpdump", "-i", "eth1"], "tcpdump-eth1")[-1])
    assert line[:4] == ["sudo", "-n", "sh", "-c"]
    assert line[5] == "/var/tmp/nfq-check-1/pids/tcpdump-eth1.pid"
    assert line[6:] == ["env", "LC_ALL=C", "tcpdump", "-i", "eth1"]
    with pytest.raises(ValueError):
        RemoteHost("a", ["sh", "-c"], tmp_path, "/tmp")


def test_remote_host_files_and_signals_through_a_local_shell(tmp_path: Path) -> None:
    """The transport ``sh -c`` (this machine as "the other machine"): push, fetch, a background
    process stopped with the signal the lab chose, pid-checked cleanup."""
    local, remote = tmp_path / "local", tmp_path / "remote"
    local.mkdir()
    h = RemoteHost("here", ["sh", "-c"], local, str(remote), sudo=(), python=sys.executable)
    h.prepare()
    assert (remote.stat().st_mode & 0o777) == 0o700
    f = local / "d" / "blob.bin"
    f.parent.mkdir()
    data = os.urandom(70000) + b"\r\n\0"
    f.write_bytes(data)
    h.push(f)
    assert (remote / "d" / "blob.bin").read_bytes() == data
    f.unlink()
    h.fetch(f)
    assert f.read_bytes() == data
    lab = Lab(workdir=local / "lab")
    try:
        src = ("import signal, sys, time\n"
               "signal.signal(signal.SIGINT, lambda *a: (print('got INT', flush=True), sys.exit(3)))\n"
               "print('up', flush=True)\ntime.sleep(60)\n")
        p = lab.start("sleeper", h, [sys.executable, "-c", src])
        for _ in range(100):
            if "up" in p.output() and h.pid_of(p):
                break
            subprocess.run(["sleep", "0.05"])
        p.stop_signal = signal.SIGINT
        assert lab.stop(p, 10) == 3 and "got INT" in p.output()
        q = lab.start("orphan", h, [sys.executable, "-c", "import time; time.sleep(60)"])
        for _ in range(100):
            if h.pid_of(q):
                break
            subprocess.run(["sleep", "0.05"])
        pid = h.pid_of(q)
        assert pid
        h.cleanup()  # kills it by its pidfile, removes the remote root
        q.popen.wait(10)
        assert not remote.exists()
    finally:
        lab.close()


def test_one_seed_same_keys(tmp_path: Path) -> None:
    vm.write_seed(tmp_path / "seed")
    assert (tmp_path / "seed").stat().st_mode & 0o777 == 0o600
    seed = vm.read_seed(tmp_path / "seed")
    a = vm.lab_plan(seed, "host", "aes-cbc-128", 2)
    b = vm.lab_plan(seed, "host", "aes-cbc-128", 2, {"a": "ens6"})
    def keys(sas: tuple[LabSA, ...]) -> list[tuple[int, bytes, bytes]]:
        return [(s.spi, s.key, s.integrity_key) for s in sas]

    assert keys(a.sas) == keys(b.sas)
    assert len({s.key for s in a.sas}) == len(a.sas)  # every SA its own key
    other_topology = vm.lab_plan(seed, "gateway", "aes-cbc-128", 2)
    assert not {s.key for s in a.sas} & {s.key for s in other_topology.sas}
    vm.write_seed(tmp_path / "seed")
    fresh = vm.lab_plan(vm.read_seed(tmp_path / "seed"), "host", "aes-cbc-128", 2)
    assert not {s.key for s in a.sas} & {s.key for s in fresh.sas}
    assert "key" not in repr(a.sas[0]).replace("key=", "")


# -- the VM flow in namespaces -------------------------------------------------------------------

def _lab_or_skip() -> None:
    """What the VM flow needs beyond the lab (the folder's gate checks that, tests/gate.py)."""
    problems = [f"{tool} is not installed" for tool in ("nsenter", "pgrep") if shutil.which(tool) is None]
    if not (VENV / "bin" / "nfq-ipsec").exists():
        problems.append(f"{VENV}/bin/nfq-ipsec is missing")
    gate.require(problems, "the VM flow")


@contextlib.contextmanager
def vm_pair(tmp_path: Path, topology: str, encryption: str, queues: int) -> Iterator[vm.Pair]:
    """Two namespaces provisioned as the VMs are, daemons started as the unit starts them."""
    lab = Lab(prefix="nfqv", workdir=tmp_path / "work")
    hosts: dict[str, RemoteHost] = {}
    try:
        with lab:
            a_ns, b_ns = lab.netns("a"), lab.netns("b")
            lab.veth(a_ns, "eth1", b_ns, "eth1")
            a_ns.addr("eth1", f"{HOST_A}/24")
            b_ns.addr("eth1", f"{HOST_B}/24")
            seed = tmp_path / "seed"
            vm.write_seed(seed)
            layouts, services = {}, {}
            for name, ns in (("a", a_ns), ("b", b_ns)):
                base = tmp_path / name
                layouts[name] = vm.Layout(base / "etc", base / "state", base / "run", vm.INSTANCE,
                                          f"{lab.tag}lan{name}")
                shell = ["nsenter", f"--net=/run/netns/{ns.name}", "sh", "-c"]
                hosts[name] = RemoteHost(name, shell, lab.workdir, str(base / "remote"), sudo=(),
                                         python=sys.executable)
                hosts[name].prepare()
            for name, h in hosts.items():
                lay = layouts[name]
                # What vagrant/provision.sh runs on the VM (paths moved off /etc, /var, /run).
                res = h.run([str(VENV / "bin" / "python"), "-m", "nfq_ipsec_lab.lab.vm", "setup",
                             "--peer", name, "--topology", topology, "--encryption", encryption,
                             "--queues", str(queues), "--seed-file", str(seed),
                             "--etc-dir", str(lay.etc_dir), "--state-dir", str(lay.state_dir),
                             "--run-dir", str(lay.run_dir), "--lan-netns", lay.lan_netns],
                            check=False, timeout=60)
                if topology == "gateway":
                    lab.namespaces.append(Netns(lay.lan_netns))  # removed with the lab
                assert res.returncode == 0, res.stdout + res.stderr
                # The unit as scripts/install-service renders it for this "VM".
                unit_dir = tmp_path / name / "unit"
                r = subprocess.run([str(ROOT / "scripts" / "install-service"), "--no-deps",
                                    "--venv", str(VENV), "--unit-dir", str(unit_dir),
                                    "--config-dir", str(lay.etc_dir),
                                    "--bin-dir", str(tmp_path / name / "bin")],
                                   capture_output=True, text=True)
                assert r.returncode == 0, r.stdout + r.stderr
                unit = UnitFile.parse((unit_dir / "nfq-ipsec@.service").read_text())
                services[name] = vm.UnitProcess(lab, h, unit)
            before = {n: iptables_snapshot(h) for n, h in hosts.items()}
            for svc in services.values():
                svc.start()
            cfg = vm.lab_plan(vm.read_seed(seed), topology, encryption, queues)
            specs = dict(zip("ab", vm.peer_specs(topology), strict=True))
            cmd = [str(VENV / "bin" / "nfq-ipsec")]
            daemons = {n: Daemon.of_peer(layouts[n].peer_config(specs[n]), hosts[n], cmd) for n in hosts}
            ends = vm.endpoints(topology, hosts["a"], hosts["b"], vm.wire_interface(hosts["a"], HOST_A),
                                (layouts["a"].lan_netns, layouts["b"].lan_netns))
            yield vm.Pair(lab, cfg, ends, daemons, dict(services), before)
    finally:
        lab.close()
        for h in hosts.values():
            with contextlib.suppress(Exception):
                h.cleanup()
        leftovers = [n for n in run(["ip", "netns", "list"], check=False).stdout.split()
                     if n.startswith(f"nfqv{os.getpid()}-")]
        assert not leftovers, leftovers


@pytest.mark.parametrize("topology,encryption", [("host", "aes-gcm-128"), ("gateway", "aes-cbc-128")])
def test_vm_flow_in_namespaces(tmp_path: Path, topology: str, encryption: str) -> None:
    _lab_or_skip()
    lines: list[str] = []
    t0 = time.monotonic()
    with vm_pair(tmp_path, topology, encryption, queues=2) as pair:
        lines.append(f"   provisioned and started in {time.monotonic() - t0:.1f} s")
        verdicts: list[Verdict] = vm.check_pair(pair, tmp_path / "work", lines.append, seconds=2,
                                                parallel=2, file_size=256 << 10, crash=topology == "host")
    lines.append(f"   total {time.monotonic() - t0:.1f} s")
    print("\n".join(lines))
    failed = [v for v in verdicts if not v.ok]
    assert not failed, "\n".join(f"{v.text}\n{v.detail}" for v in failed)
    texts = " | ".join(v.text for v in verdicts)
    for must in ("ready", "ping", "wire:", "tshark", "clean stop",
                 "rules removed, iptables exactly as before"):
        assert must in texts, texts
    if topology == "host":
        assert "its rules are still installed" in texts and "restarted (Restart=on-failure)" in texts
    assert not any(v.skipped for v in verdicts), "tshark could not check this algorithm"


# -- the workstation's driver, with a stand-in vagrant ---------------------------------------------

FAKE_VAGRANT = r"""#!/bin/sh
# Logs how it was called; ssh-config names machines nothing listens for (loopback port 9).
echo "$* | topology=$NFQ_IPSEC_LAB_TOPOLOGY lab=$NFQ_IPSEC_LAB_DIR cwd=$VAGRANT_CWD" >> "$FAKE_LOG"
case $1 in
  ssh-config)
    for m in a b; do printf 'Host %s\n  HostName 127.0.0.1\n  Port 9\n  User vagrant\n' "$m"; done ;;
  up) [ -n "$FAKE_FAIL_UP" ] && { echo "no provider" >&2; exit 1; } ;;
esac
exit 0
"""


@pytest.mark.parametrize("keep", [False, True])
def test_vm_check_drives_vagrant_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep: bool,
) -> None:
    """vm.vm_check's use of vagrant: up (no provisioning), rsync, provision with the topology in
    the environment, ssh-config, and destroy unless --keep, also when a step fails (here: the
    VMs are unreachable). Real ssh is used; it is refused on 127.0.0.1 port 9."""
    if shutil.which("ssh") is None:
        _missing("ssh is not installed")
    fake = tmp_path / "bin" / "vagrant"
    fake.parent.mkdir()
    fake.write_text(FAKE_VAGRANT)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("NFQ_IPSEC_LAB_DIR", str(tmp_path / "lab"))
    out = tmp_path / "out.txt"
    with out.open("w") as f:
        code = vm.vm_check(VAGRANT_DIR, ["host", "gateway"], "aes-gcm-128", 2, keep, "libvirt", f)
    text = out.read_text()
    assert code == vm.EXIT_FAILED, text
    calls = [line.split(" | ")[0] for line in log.read_text().splitlines()]
    expected = ["up --no-provision --provider=libvirt", "rsync", "provision", "ssh-config a b"]
    assert calls == expected + ([] if keep else ["destroy -f"]), calls
    assert "topology=host" in log.read_text().splitlines()[2]
    assert f"lab={tmp_path / 'lab'}" in log.read_text()
    seed = tmp_path / "lab" / "seed"
    assert seed.stat().st_mode & 0o777 == 0o600 and (tmp_path / "lab").stat().st_mode & 0o777 == 0o700
    assert "FAILED" in text and "Connection refused" in text
    assert ("the VMs stay up" in text) == keep and ("destroying the VMs" in text) != keep

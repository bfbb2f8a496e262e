"""The two-VM lab (``vagrant/``): what a VM runs to become a lab peer, and the whole VM check.

    python -m nfq_ipsec_lab.lab.vm setup --peer a --topology host --seed-file /etc/nfq-ipsec/lab.seed
    python -m nfq_ipsec_lab.lab.vm check [--topology host|gateway|both] [--keep] [--provider P]

One source of truth with the namespace lab. The pieces are the namespace lab's own:
``labconfig`` writes the configuration and keys, ``topology`` says which kernel settings a host
or a gateway needs, the daemon is ``nfq-ipsec run`` started by the unit ``nfq-ipsec@.service``,
and ``checks.traffic_and_capture`` plus ``checks.verdicts`` are the traffic-and-capture check.
What is specific to VMs is only where things live (:class:`Layout`: ``/etc/nfq-ipsec``,
``/var/lib/nfq-ipsec``, ``/run/nfq-ipsec``) and how commands get there (``vagrant.RemoteHost``).
``tests/lab/test_vagrant.py`` runs :func:`setup_node` (through this module's CLI, as
``vagrant/provision.sh`` does), the unit's own ExecStart/ExecStartPost argv and
:func:`check_pair` on two network namespaces standing in for the VMs.

Keys: both VMs derive them from one random seed (``labconfig.derive_key``) that the workstation
writes (``vagrant/.lab/seed``, mode 0600) and Vagrant uploads to each VM, so no key crosses the
network and both ends agree; the workstation derives them too, for tshark. The topology is
part of the derivation, and ``check`` writes a new seed for every topology it runs, so keys are
never reused across runs.

``setup`` on a VM (run by ``provision.sh lab``, as root):

- finds the interface holding the VM's private address (``eth1`` on the usual boxes) and
  switches IPv6 off on it (the daemon protects IPv4; link-local IPv6 would cross in clear);
- host topology: ``topology.HOST_SYSCTLS``, no forwarding; transport mode between the VMs;
- gateway topology: a network namespace (``nfq-lan``) behind the VM stands in for its LAN: a
  veth pair ``lan0`` (VM, 10.1.0.1 / 10.2.0.1) -- ``eth0`` (namespace, 10.1.0.2 / 10.2.0.2,
  default route via the VM), a route to the other LAN via the other VM, and
  ``topology.GATEWAY_SYSCTLS`` with lan0 as LAN and the private interface as WAN; tunnel mode;
- writes ``/etc/nfq-ipsec/lab.toml`` and ``lab.keys/*.key`` (0600) with ``labconfig.write_peer``;
  state in ``/var/lib/nfq-ipsec/lab``, control socket ``/run/nfq-ipsec/lab.sock``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import IO, Protocol

from nfq_ipsec.service import UnitFile

from .checks import PROTECTED_UDP_PORT, CheckRun, Endpoints, Verdict, traffic_and_capture, verdicts
from .daemon import Daemon, iptables_snapshot
from .labconfig import LabConfig, PeerConfig, PeerSpec, parse_encryption, plan, write_peer
from .netns import Host, Lab, LabError, Netns, Started, run
from .topology import (
    CLIENT,
    GATEWAY_SYSCTLS,
    GW_LAN_A,
    GW_LAN_B,
    HOST_A,
    HOST_B,
    HOST_SYSCTLS,
    LAN_A,
    LAN_B,
    SERVER,
    apply_sysctls,
)
from .traffic import Capture, analyse_wire, ping, udp_probe
from .vagrant import RemoteHost, Vagrant, vagrant_host

INSTANCE = "lab"
LAN_NETNS = "nfq-lan"
VENV = "/opt/nfq-ipsec/venv"
TOPOLOGIES = ("host", "gateway")
WIRE = {"a": HOST_A, "b": HOST_B}
LANS = {"a": (LAN_A, GW_LAN_A, CLIENT), "b": (LAN_B, GW_LAN_B, SERVER)}
LAN_IF, LAN_PEER_IF = "lan0", "eth0"
CHAIN_PREFIX = "NFQIPSEC"  # the daemon's default chain_prefix; the lab's configs keep it
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True)
class Layout:
    """Where a lab peer's files live on its machine (the VM defaults match the systemd unit)."""

    etc_dir: Path = Path("/etc/nfq-ipsec")
    state_dir: Path = Path("/var/lib/nfq-ipsec")
    run_dir: Path = Path("/run/nfq-ipsec")
    instance: str = INSTANCE
    lan_netns: str = LAN_NETNS

    @property
    def config_path(self) -> Path:
        return self.etc_dir / f"{self.instance}.toml"

    @property
    def key_dir(self) -> str:  # relative to etc_dir
        return f"{self.instance}.keys"

    @property
    def control_socket(self) -> Path:
        return self.run_dir / f"{self.instance}.sock"

    @property
    def instance_state(self) -> Path:
        return self.state_dir / self.instance

    @property
    def seed_path(self) -> Path:
        return self.etc_dir / f"{self.instance}.seed"

    def peer_config(self, spec: PeerSpec) -> PeerConfig:
        return PeerConfig(spec, self.config_path, self.control_socket, self.instance_state)


# -- keys and configuration -------------------------------------------------------------------

def write_seed(path: Path) -> None:
    """A fresh random seed (32 bytes, hex), mode 0600 from the start, in a 0700 directory."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_hex(32).encode() + b"\n")
    finally:
        os.close(fd)


def read_seed(path: Path) -> bytes:
    text = path.read_text().strip()
    try:
        seed = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{path}: not a hex seed") from None
    if len(seed) < 16:
        raise ValueError(f"{path}: a seed needs at least 16 random bytes")
    return seed


def peer_specs(topology: str, interfaces: dict[str, str] | None = None) -> tuple[PeerSpec, PeerSpec]:
    """Peers a and b as the configuration sees them, for a topology of the VM lab."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology must be host or gateway, not {topology!r}")
    ifs = interfaces or {}
    specs = []
    for name in ("a", "b"):
        addr = IPv4Address(WIRE[name])
        if topology == "host":
            specs.append(PeerSpec(name, ifs.get(name, "eth1"), addr, IPv4Network(f"{addr}/32"), "host"))
        else:
            specs.append(PeerSpec(name, ifs.get(name, "eth1"), addr, IPv4Network(LANS[name][0]), "gateway"))
    return specs[0], specs[1]


def lab_plan(seed: bytes, topology: str, encryption: str, queues: int,
             interfaces: dict[str, str] | None = None) -> LabConfig:
    """The lab's SAs (keys from the seed, the topology as context): the same on both VMs and on
    the workstation."""
    a, b = peer_specs(topology, interfaces)
    return plan(a, b, encryption, queues, seed=seed, context=f"vm-lab/{topology}")


def wire_interface(host: Host, address: str) -> str:
    """The interface that holds ``address`` on ``host``."""
    res = host.run(["ip", "-o", "-4", "addr", "show", "to", f"{address}/32"])
    words = res.stdout.split()
    if len(words) < 2:
        raise LabError(f"no interface of {host.name} has the address {address} (is the private "
                       "network up?)")
    return words[1].split("@")[0]


def setup_node(
    peer: str, topology: str, encryption: str, queues: int, seed: bytes, layout: Layout,
    host: Host | None = None, log: Callable[[str], None] = lambda _t: None,
) -> PeerConfig:
    """Make this machine lab peer ``peer``: network, kernel settings, configuration and keys.
    Idempotent; switching topologies undoes the other topology's LAN namespace and route."""
    if peer not in WIRE:
        raise ValueError(f"peer must be a or b, not {peer!r}")
    host = host or Host()
    other = "b" if peer == "a" else "a"
    iface = wire_interface(host, WIRE[peer])
    with contextlib.suppress(LabError):  # a kernel without IPv6
        host.sysctl(f"net.ipv6.conf.{iface}.disable_ipv6", 1)
    # Undo the gateway topology if it was set up before (namespace, its veth, the route).
    lan_ns = Netns(layout.lan_netns)
    if layout.lan_netns in run(["ip", "netns", "list"], check=False).stdout.split():
        for pid in lan_ns.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        run(["ip", "netns", "del", layout.lan_netns])
    host.run(["ip", "route", "del", LANS[other][0]], check=False)
    if topology == "host":
        apply_sysctls(host, (("net.ipv4.ip_forward", "0"), *HOST_SYSCTLS))
        log(f"{peer}: host {WIRE[peer]} on {iface}, transport mode")
    elif topology == "gateway":
        _, gw, inner = LANS[peer]
        run(["ip", "netns", "add", layout.lan_netns])
        host.run(["ip", "link", "add", LAN_IF, "type", "veth", "peer", "name", LAN_PEER_IF,
                  "netns", layout.lan_netns])
        host.run(["ip", "addr", "add", f"{gw}/24", "dev", LAN_IF])
        host.run(["ip", "link", "set", LAN_IF, "up"])
        with contextlib.suppress(LabError):
            host.sysctl(f"net.ipv6.conf.{LAN_IF}.disable_ipv6", 1)
        lan_ns.up("lo")
        for key in ("net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6"):
            with contextlib.suppress(LabError):
                lan_ns.sysctl(key, 1)
        lan_ns.addr(LAN_PEER_IF, f"{inner}/24")
        lan_ns.up(LAN_PEER_IF)
        lan_ns.route("default", gw)
        host.run(["ip", "route", "replace", LANS[other][0], "via", WIRE[other], "dev", iface])
        apply_sysctls(host, GATEWAY_SYSCTLS, lan=LAN_IF, wan=iface)
        log(f"{peer}: gateway {WIRE[peer]} on {iface}, LAN {LANS[peer][0]} in namespace "
            f"{layout.lan_netns} ({inner}), tunnel mode")
    else:
        raise ValueError(f"topology must be host or gateway, not {topology!r}")
    cfg = lab_plan(seed, topology, encryption, queues, {peer: iface})
    a, b = peer_specs(topology, {peer: iface})
    me, them = (a, b) if peer == "a" else (b, a)
    layout.etc_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    pc = write_peer(cfg, me, them, layout.config_path, layout.control_socket, layout.instance_state,
                    layout.key_dir)
    log(f"{peer}: wrote {pc.path} and {len(cfg.sas)} key files in {layout.etc_dir / layout.key_dir}")
    return pc


# -- the daemon as a service ----------------------------------------------------------------

class Service(Protocol):
    """The daemon of one peer, run as the unit nfq-ipsec@INSTANCE runs it."""

    def start(self) -> None: ...  # returns once ready (the unit's ExecStartPost)
    def stop(self) -> int | None: ...  # a clean stop; the daemon's exit status
    def crash(self) -> None: ...  # SIGKILL the main process (then the rest, as KillMode=mixed)
    def down(self) -> bool: ...  # not running (between a crash and the restart)
    def recover(self, timeout: float) -> None: ...  # Restart=on-failure has brought it back
    def log(self) -> str: ...


class SystemdUnit:
    """The real thing, on a VM: systemctl and the journal."""

    def __init__(self, host: Host, instance: str = INSTANCE) -> None:
        self.host, self.unit = host, f"nfq-ipsec@{instance}.service"
        self._restarts = 0

    def show(self, *props: str) -> dict[str, str]:
        res = self.host.run(["systemctl", "show", self.unit, *[f"--property={p}" for p in props]])
        return dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)

    def start(self) -> None:
        self.host.run(["systemctl", "restart", self.unit], timeout=150)

    def stop(self) -> int | None:
        self.host.run(["systemctl", "stop", self.unit], timeout=90)
        st = self.show("Result", "ExecMainStatus", "ActiveState")
        if st.get("Result") != "success" or st.get("ActiveState") != "inactive":
            return -1
        return int(st.get("ExecMainStatus", "-1") or -1)

    def crash(self) -> None:
        self._restarts = int(self.show("NRestarts").get("NRestarts", "0") or 0)
        self.host.run(["systemctl", "kill", "--kill-who=main", "--signal=SIGKILL", self.unit])

    def down(self) -> bool:
        st = self.show("ActiveState", "SubState")
        return st.get("ActiveState") != "active" or st.get("SubState") != "running"

    def recover(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.show("NRestarts", "ActiveState")
            if int(st.get("NRestarts", "0") or 0) > self._restarts and st.get("ActiveState") == "active":
                return
            time.sleep(0.5)
        state = self.show("ActiveState", "SubState")
        raise LabError(f"{self.unit} did not restart within {timeout:g} s: {state}")

    def log(self) -> str:
        return self.host.run(["journalctl", "-u", self.unit, "-n", "40", "--no-pager", "-o", "cat"],
                             check=False).stdout


class UnitProcess:
    """What systemd does with the unit, done by hand where there is no systemd (the namespace
    test): the unit's own ExecStartPre/ExecStart/ExecStartPost argv (``%i``, ``$MAINPID``
    expanded; no ``$NOTIFY_SOCKET``: Type=notify's start ends with ExecStartPost's wait),
    KillSignal to the main process only and TimeoutStopSec (KillMode=mixed), the
    rest of the daemon's processes SIGKILLed after a crash, Restart=on-failure after
    RestartSec unless the exit status is in RestartPreventExitStatus."""

    def __init__(self, lab: Lab, host: Host, unit: UnitFile, instance: str = INSTANCE) -> None:
        self.lab, self.host, self.unit, self.instance = lab, host, unit, instance
        self.proc: Started | None = None
        self.mainpid: int | None = None
        self.worker_pids: list[int] = []
        self.exit_status: int | None = None
        for key, want in (("KillMode", "mixed"), ("Restart", "on-failure"), ("Type", "notify")):
            if unit.get("Service", key) != want:
                raise LabError(f"the unit's {key} is {unit.get('Service', key)!r}; UnitProcess "
                               f"emulates {key}={want}")

    def _seconds(self, key: str, default: float) -> float:
        value = self.unit.get("Service", key)
        return float(value.removesuffix("s")) if value else default

    def start(self) -> None:
        for argv in self.unit.commands("ExecStartPre", self.instance):
            self.host.run(argv)
        (argv,) = self.unit.commands("ExecStart", self.instance)
        self.proc = self.lab.start(f"nfq-ipsec@{self.instance}", self.host, argv)
        deadline = time.monotonic() + 10
        while (pid := self.host.pid_of(self.proc)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid is None:
            raise LabError(f"nfq-ipsec@{self.instance}: no pid for the main process")
        self.mainpid = pid
        timeout = self._seconds("TimeoutStartSec", 90)
        for post in self.unit.commands("ExecStartPost", self.instance, {"MAINPID": str(pid)}):
            res = self.host.run(post, check=False, timeout=timeout)
            if res.returncode != 0:
                raise LabError(f"ExecStartPost {post[-6:]} failed ({res.returncode}): "
                               f"{res.stderr.strip()}\n{self.log()[-2000:]}")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        self.exit_status = self.lab.stop(self.proc, self._seconds("TimeoutStopSec", 90))
        return self.exit_status

    def crash(self) -> None:
        if self.proc is None:
            raise LabError("not started")
        # The main process's children (its workers), listed before it dies and they move.
        kids = self.host.run(["pgrep", "-P", str(self.mainpid)], check=False).stdout.split()
        self.worker_pids = [int(k) for k in kids if k.isdigit()]
        self.host.signal(self.proc, signal.SIGKILL)
        self.exit_status = self.proc.popen.wait(10)
        if self.worker_pids:  # KillMode=mixed: the rest of the unit's processes get SIGKILL
            self.host.run(["kill", "-s", "KILL", *map(str, self.worker_pids)], check=False)

    def down(self) -> bool:
        return self.proc is None or self.proc.popen.poll() is not None

    def recover(self, timeout: float) -> None:
        prevent = {int(v) for v in " ".join(self.unit.values("Service", "RestartPreventExitStatus")).split()}
        if self.exit_status == 0 or self.exit_status in prevent:
            raise LabError(f"exit status {self.exit_status}: Restart=on-failure would not restart")
        time.sleep(self._seconds("RestartSec", 0.1))
        self.start()

    def log(self) -> str:
        return self.proc.output() if self.proc else ""


# -- the check of a running pair ------------------------------------------------------------

@dataclass
class Pair:
    """Two lab peers with their daemons running as services, and where traffic goes."""

    lab: Lab
    cfg: LabConfig
    ends: Endpoints
    daemons: dict[str, Daemon]
    services: dict[str, Service]
    iptables_before: dict[str, str] = field(default_factory=dict)


def endpoints(topology: str, a: RemoteHost, b: RemoteHost, wire_if: str,
              lan_netns: tuple[str, str] = (LAN_NETNS, LAN_NETNS)) -> Endpoints:
    """Client behind a, server behind b (the VMs themselves, or their LAN namespaces); the
    capture on a's private interface, filtered to what passes between the protected parties
    (the private network is shared with the hypervisor, which has things to say); tshark on a."""
    pa, pb = peer_specs(topology)
    bpf = (f"ip and ((host {HOST_A} and host {HOST_B}) or "
           f"(net {pa.protected} and net {pb.protected}))")
    if topology == "host":
        client, caddr, server, saddr = a, HOST_A, b, HOST_B
    else:
        client = a.within(f"{a.name}:{lan_netns[0]}", ["ip", "netns", "exec", lan_netns[0]])
        server = b.within(f"{b.name}:{lan_netns[1]}", ["ip", "netns", "exec", lan_netns[1]])
        caddr, saddr = CLIENT, SERVER
    return Endpoints(client, caddr, server, saddr, a, wire_if, (HOST_A, HOST_B), bpf, a)


def check_pair(
    pair: Pair, workdir: Path, say: Callable[[str], None], *, seconds: float = 2,
    parallel: int = 4, file_size: int = 1 << 20, udp_count: int = 20, crash: bool = True,
    stop: bool = True,
) -> list[Verdict]:
    """Both daemons ready; (``crash``) the fail-closed crash and restart of peer a's service;
    the traffic-and-capture check; (``stop``) a clean stop of both. One report line per
    verdict."""
    out: list[Verdict] = []

    def add(vs: Sequence[Verdict]) -> None:
        for v in vs:
            out.append(v)
            mark = "skipped" if v.skipped else ("ok" if v.ok else "FAILED")
            say(f"      {v.text:<66} {mark}")
            if v.detail and not v.ok:
                for line in v.detail.splitlines()[-20:]:
                    say(f"        {line}")

    lab, ends = pair.lab, pair.ends
    t0 = time.monotonic()

    def section(title: str) -> None:
        say(f"   {title}  [{time.monotonic() - t0:.1f} s]")

    section("daemons")
    ready = []
    for name, d in pair.daemons.items():
        try:
            st = d.wait_ready()
            ready.append(Verdict(f"{name}: ready, {len(st['workers'])} workers, rules installed", True))
        except LabError as err:
            ready.append(Verdict(f"{name}: not ready", False, f"{err}\n{pair.services[name].log()}"))
    add(ready)
    if not all(v.ok for v in ready):
        return out
    if crash:
        # First, while no SA has carried traffic: a restarted daemon's inbound SAs refuse
        # sequence numbers up to the replay floor it saved (state.py), which after heavy
        # traffic can be thousands ahead; the traffic check below then runs on the restarted
        # daemon and shows every SA working.
        section("crash of a's daemon (SIGKILL): fail closed, restart")
        add(crash_check(pair, workdir, udp_count))
    section(f"traffic {ends.client_addr} -> {ends.server_addr}, capture on {ends.wire_host.name} "
            f"{ends.wire_if}")
    r = traffic_and_capture(lab, ends, pair.cfg, workdir, pair.daemons, seconds=seconds,
                            parallel=parallel, file_size=file_size, udp_count=udp_count, run=CheckRun())
    add(verdicts(r, pair.cfg, udp_count, file_size))
    if stop:
        section("clean stop (SIGTERM): rules removed")
        add(stop_check(pair))
    section("done")
    return out


def crash_check(pair: Pair, workdir: Path, udp_count: int = 20) -> list[Verdict]:
    svc, d, ends = pair.services["a"], pair.daemons["a"], pair.ends
    out: list[Verdict] = []
    cap = Capture(pair.lab, ends.wire_host, ends.wire_if, workdir / "crash.pcap", bpf=ends.capture_filter)
    cap.start()
    try:
        svc.crash()
        rules = CHAIN_PREFIX in iptables_snapshot(d.host)
        was_down = svc.down()
        out.append(Verdict("after the crash, while a is down, its rules are still installed",
                           rules and was_down, f"rules present: {rules}; service down: {was_down}"))
        probe = udp_probe(pair.lab, ends.client, ends.server, ends.server_addr, PROTECTED_UDP_PORT,
                          udp_count)
    finally:
        pcap = cap.stop()
    wire = analyse_wire(pcap, ends.peers)
    out.append(Verdict(f"meanwhile: {probe.received}/{probe.sent} protected UDP datagrams arrived, "
                       f"{wire.cleartext} cleartext packets on the wire",
                       wire.cleartext == 0 and wire.other == 0, "\n".join(wire.examples)))
    try:
        svc.recover(60)
        d.wait_ready()
        p = ping(ends.client, ends.server_addr, count=3)
        out.append(Verdict(f"restarted (Restart=on-failure): ping {p.received}/{p.sent}", p.ok, p.output))
    except LabError as err:
        out.append(Verdict("restarted (Restart=on-failure)", False, f"{err}\n{svc.log()[-3000:]}"))
    return out


def stop_check(pair: Pair) -> list[Verdict]:
    out = []
    for name, svc in pair.services.items():
        host = pair.daemons[name].host
        code = svc.stop()
        out.append(Verdict(f"{name}: clean stop, exit status {code}", code == 0, svc.log()[-3000:]))
        stopped = iptables_snapshot(host)
        closed = CHAIN_PREFIX in stopped and "-j NFQUEUE" not in stopped
        out.append(Verdict(f"{name}: rules closed after the stop (protected traffic dropped)",
                           closed, stopped))
        try:
            pair.daemons[name].remove_rules()
        except LabError as err:
            out.append(Verdict(f"{name}: nfq-ipsec rules remove", False, str(err)))
            continue
        after = iptables_snapshot(host)
        before = pair.iptables_before.get(name)
        gone = CHAIN_PREFIX not in after and (before is None or after == before)
        out.append(Verdict(f"{name}: rules removed" + (", iptables exactly as before" if before else ""),
                           gone, after))
    return out


# -- the VM check (workstation) ---------------------------------------------------------------

def vm_check(
    vagrant_dir: Path, topologies: Sequence[str], encryption: str, queues: int, keep: bool,
    provider: str | None, out: IO[str], seconds: float = 2,
) -> int:
    """Bring the VMs up, provision, check each topology, destroy them unless ``keep``."""

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    lab_dir = Path(os.environ.get("NFQ_IPSEC_LAB_DIR", vagrant_dir / ".lab"))
    lab_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(lab_dir, 0o700)
    env = {"NFQ_IPSEC_LAB_DIR": str(lab_dir), "NFQ_IPSEC_LAB_ENCRYPTION": encryption,
           "NFQ_IPSEC_LAB_QUEUES": str(queues)}
    vg = Vagrant(vagrant_dir, env, echo=out)
    results: dict[str, list[Verdict]] = {}
    code = EXIT_FAILED
    try:
        for n, topology in enumerate(topologies):
            say(f"\n== {topology} topology ({'transport' if topology == 'host' else 'tunnel'} mode), "
                f"{encryption}, {queues} queue(s) ==")
            write_seed(lab_dir / "seed")
            vg.env["NFQ_IPSEC_LAB_TOPOLOGY"] = topology
            if n == 0:
                vg.run(["up", "--no-provision", *([f"--provider={provider}"] if provider else [])],
                       stream=True)
                vg.run(["rsync"], stream=True)
                vg.run(["provision"], stream=True)
            else:
                vg.run(["provision", "--provision-with", "seed,lab"], stream=True)
            ssh_cfg = vg.ssh_config(["a", "b"], lab_dir / "ssh-config")
            results[topology] = _check_vms(topology, encryption, queues, lab_dir, ssh_cfg, say, keep, seconds)
        failed = [v for vs in results.values() for v in vs if not v.ok]
        total = sum(len(vs) for vs in results.values())
        say("\n== report ==")
        for topology, vs in results.items():
            bad = [v for v in vs if not v.ok]
            say(f"   {topology:<8} {len(vs) - len(bad)}/{len(vs)} checks passed"
                + "".join(f"\n            FAILED: {v.text}" for v in bad))
        say(f"RESULT: all {total} checks passed" if not failed
            else f"RESULT: {len(failed)} of {total} checks FAILED")
        code = EXIT_OK if total and not failed else EXIT_FAILED
    except LabError as err:
        say(f"\nFAILED: {err}")
    except KeyboardInterrupt:
        say("\ninterrupted")
        code = 130
    finally:
        if keep:
            say("\n--keep: the VMs stay up. To look around:")
            say(f"  cd {vagrant_dir} && vagrant ssh a")
            say(f"  sudo {VENV}/bin/nfq-ipsec status --config /etc/nfq-ipsec/{INSTANCE}.toml")
            say(f"  journalctl -u nfq-ipsec@{INSTANCE}")
            say(f"To remove them: cd {vagrant_dir} && vagrant destroy -f")
        else:
            say("\ndestroying the VMs")
            try:
                vg.run(["destroy", "-f"], stream=True)
            except LabError as err:
                say(f"vagrant destroy failed: {err}")
                code = EXIT_FAILED
    return code


def _check_vms(topology: str, encryption: str, queues: int, lab_dir: Path, ssh_cfg: Path,
               say: Callable[[str], None], keep: bool, seconds: float) -> list[Verdict]:
    seed = read_seed(lab_dir / "seed")
    layout = Layout()
    workdir = Path(tempfile.mkdtemp(prefix=f"run-{topology}-", dir=lab_dir))
    remote_root = f"/var/tmp/nfq-ipsec-check-{os.getpid()}"
    lab = Lab(keep=False, workdir=workdir)
    with lab:
        hosts = {n: vagrant_host(n, ssh_cfg, workdir, remote_root) for n in ("a", "b")}
        try:
            for h in hosts.values():
                h.prepare()
            wire_if = wire_interface(hosts["a"], HOST_A)
            cfg = lab_plan(seed, topology, encryption, queues)
            specs = dict(zip("ab", peer_specs(topology), strict=True))
            cmd = [f"{VENV}/bin/nfq-ipsec"]
            daemons = {n: Daemon.of_peer(layout.peer_config(specs[n]), hosts[n], cmd) for n in hosts}
            services: dict[str, Service] = {n: SystemdUnit(hosts[n]) for n in hosts}
            pair = Pair(lab, cfg, endpoints(topology, hosts["a"], hosts["b"], wire_if), daemons, services)
            verdicts_ = check_pair(pair, workdir, say, seconds=seconds)
            if keep:  # leave the lab running
                for svc in services.values():
                    with contextlib.suppress(LabError):
                        svc.start()
            return verdicts_
        finally:
            lab.close()  # stops what still runs on the VMs, by pidfile, before those go
            for h in hosts.values():
                with contextlib.suppress(LabError):
                    h.cleanup()


# -- command line -----------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nfq_ipsec_lab.lab.vm", description=__doc__.split("\n")[0]
                                     if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("setup", help="make this machine a lab peer (run on the VM, as root)")
    p.add_argument("--peer", choices=["a", "b"], required=True)
    p.add_argument("--topology", choices=TOPOLOGIES, default="host")
    p.add_argument("--encryption", default="aes-gcm-128")
    p.add_argument("--queues", type=int, default=2)
    p.add_argument("--seed-file", type=Path, help="default: <etc-dir>/<instance>.seed")
    p.add_argument("--etc-dir", type=Path, default=Layout.etc_dir)
    p.add_argument("--state-dir", type=Path, default=Layout.state_dir)
    p.add_argument("--run-dir", type=Path, default=Layout.run_dir)
    p.add_argument("--instance", default=INSTANCE)
    p.add_argument("--lan-netns", default=LAN_NETNS, help="the LAN namespace (gateway topology)")
    p = sub.add_parser("check", help="the whole two-VM check, from the workstation (vagrant/run-check)")
    p.add_argument("--vagrant-dir", type=Path, default=Path(__file__).resolve().parents[2] / "vagrant")
    p.add_argument("--topology", choices=[*TOPOLOGIES, "both"], default="both")
    p.add_argument("--encryption", default="aes-gcm-128")
    p.add_argument("--queues", type=int, default=2)
    p.add_argument("--provider", help="vagrant up --provider (libvirt, virtualbox)")
    p.add_argument("--keep", action="store_true", help="leave the VMs up (default: destroy them)")
    p.add_argument("--seconds", type=float, default=2, help="length of each iperf3 run")
    args = parser.parse_args(argv)
    try:
        parse_encryption(args.encryption)
    except ValueError as err:
        print(f"nfq-ipsec lab vm: {err}", file=sys.stderr)
        return EXIT_USAGE
    if not 1 <= args.queues <= 16:
        print("nfq-ipsec lab vm: --queues must be 1..16", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "setup":
        layout = Layout(args.etc_dir, args.state_dir, args.run_dir, args.instance, args.lan_netns)
        try:
            seed = read_seed(args.seed_file or layout.seed_path)
            setup_node(args.peer, args.topology, args.encryption, args.queues, seed, layout,
                       log=lambda t: print(f"nfq-ipsec lab vm: {t}", flush=True))
        except (OSError, ValueError) as err:
            print(f"nfq-ipsec lab vm: {err}", file=sys.stderr)
            return EXIT_USAGE
        except LabError as err:
            print(f"nfq-ipsec lab vm: {err}", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK
    if not (args.vagrant_dir / "Vagrantfile").is_file():
        print(f"nfq-ipsec lab vm: no Vagrantfile in {args.vagrant_dir}", file=sys.stderr)
        return EXIT_USAGE
    topologies = TOPOLOGIES if args.topology == "both" else (args.topology,)
    return vm_check(args.vagrant_dir, topologies, args.encryption, args.queues, args.keep,
                    args.provider, sys.stdout, args.seconds)


if __name__ == "__main__":
    sys.exit(main())

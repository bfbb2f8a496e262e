"""The rows of the benchmark and the test bed each one runs on.

Every test bed is built from the lab's pieces in a fresh :class:`~nfq_ipsec_lab.lab.netns.Lab`
(namespaces ``nfqb<pid>-<n><role>``, removed on every exit path) and is the same pair of
namespaces joined by one veth pair, 192.168.56.10 -> 192.168.56.11 (the lab's host topology),
except the IPv6 row (the same pair over IPv6, the lab's host6 topology) and the tunnel row,
which is the lab's gateway topology (client -> gateway -> gateway -> server, tunnel mode
between the gateways):

- ``plain``: no rules, nothing in user space;
- ``accept``: on both hosts, every packet of the link is queued, in mangle OUTPUT and raw
  PREROUTING, where the daemon queues (skipping packets with the reinject mark, as the daemon's
  rules do; with several queues HMARK spreads flows over them like the daemon's per-flow hash),
  and accepted unchanged by one accept-only worker per queue (:mod:`nfq_ipsec_lab.bench.accept`:
  the daemon's worker loop with a processor that accepts everything);
- ``accept-gso``: the ``accept`` bed (one queue) with its queues bound with the GSO flag: a
  TCP superpacket makes one queue trip whole and is segmented by the kernel after its verdict
  (the ceiling of ``daemon.gso``);
- ``accept-payload`` and ``accept-gcm``: the ``accept`` bed (one queue) whose workers also do
  the part of an ESP worker's work that no ESP implementation on this binding can avoid: the
  verdict carries the packet back as a payload, and (``accept-gcm``) the packet is first sealed
  with AES-GCM-128 (``--work`` of :mod:`nfq_ipsec_lab.bench.accept`). Their ratio to ``accept``
  is the floor under the ESP rows' ratio;
- ``gcm``, ``chacha``, ``cbc``, ``tunnel-gcm``: the real daemon on both peers
  (``nfq-ipsec run``), configured by the lab (one SA per queue and direction, fresh keys);
- ``gcm-gso``: the ``gcm`` row (one queue) with ``daemon.gso = true`` on both peers;
- ``gcm-source``: the ``gcm`` row (one queue) with the daemon's ESP core run from its Python
  source (``NFQ_IPSEC_PURE=1``) instead of the compiled build;
- ``gcm6``: the ``gcm`` row (one queue) over IPv6: the lab's ``host6`` topology (the same veth
  pair, 2001:db8:56::10 -> ::11, IPv4 unaddressed), transport mode;
- ``gcm-udp``: the ``gcm`` row (one queue) with ESP in UDP (RFC 3948: every SA
  ``encapsulation = "udp"``, port 4500 to 4500) on the IPv4 host topology;
- ``gcm-all2``, ``gcm-all3``, ``gcm-sample``, ``gcm-majority``: the ``gcm`` row (one queue)
  with N-version ESP on both peers (``daemon.versions``, ``daemon.compare``): ``all`` over
  the core and the independent version, ``all`` over those and the core's source
  (``core-source``), ``sample:100`` over two, ``majority`` over three;
- ``strongswan``: two charons with kernel-libipsec (:mod:`nfq_ipsec_lab.bench.strongswan`).

CPU pinning: ``spread`` (the default) pins queue i of peer a to online CPU i and queue i of peer
b to CPU i+1 (mod the CPU count), so that with one queue each peer's worker has a CPU of its
own, as two real hosts would; ``same`` is the daemon's default on both peers (queue i on CPU i),
which on one machine puts both peers' first workers on CPU 0.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nfq_ipsec import corebuild
from nfq_ipsec.config.model import DEFAULT_MARK
from nfq_ipsec.nfqueue import PROC_QUEUES
from nfq_ipsec.rules import HMARK_RND, hmark_base

from ..lab import labconfig, topology
from ..lab.daemon import Daemon, command
from ..lab.netns import Host, Lab, LabError, Started
from . import strongswan
from .measure import TrafficPath

LAYOUTS = ("spread", "same")
READY_TIMEOUT = 15.0


@dataclass(frozen=True)
class RowSpec:
    key: str  # what --rows takes
    label: str  # what the table says
    kind: str  # plain, accept, esp, strongswan
    topology: str = "host"
    encryption: str | None = None
    per_queue: bool = True  # measured once per --queues value (else once)
    note: str = ""
    source_core: bool = False  # the daemon runs its ESP core from source (NFQ_IPSEC_PURE=1)
    work: str = "none"  # accept rows: what the worker does besides accepting (bench.accept)
    encapsulation: str = "none"  # esp rows: the SAs' (config and status): "none" or "udp"
    gso: bool = False  # queues bound with the GSO flag (esp rows: daemon.gso)
    base: str | None = None  # a variant of this row: the report gives the ratio to it
    busy_poll: int = 0  # esp rows: daemon.busy_poll (microseconds; 0: off)
    pinned: bool = True  # esp rows: workers pinned per --cpu-layout (else `cpus = []`)
    engine: str | None = None  # esp rows: crypto.policy "prefer" this engine (None: the default)
    policy: str | None = None  # esp rows: crypto.policy (None: the default, fastest)
    sandboxed: bool = True  # esp rows: the workers in their sandbox (daemon.sandbox, the default)
    versions: tuple[str, ...] = ()  # esp rows: daemon.versions (empty: the default, the core)
    compare: str = "off"  # esp rows: daemon.compare


ROWS = (
    RowSpec("plain", "plain veth (no rules)", "plain", per_queue=False,
            note="two namespaces joined by a veth pair, no rules, nothing in user space"),
    RowSpec("accept", "NFQUEUE accept-only", "accept",
            note="every packet of the link through NFQUEUE and the worker loop, accepted "
                 "unchanged: the redirect ceiling"),
    RowSpec("accept-gso", "NFQUEUE accept-only GSO flag", "accept", per_queue=False, gso=True,
            base="accept",
            note="the accept row with its queue bound with NFQA_CFG_F_GSO: a TCP superpacket "
                 "makes one queue trip whole, the kernel segments it after the verdict; the "
                 "ceiling of daemon.gso"),
    RowSpec("accept-payload", "accept-only + payload verdict", "accept", per_queue=False, work="payload",
            note="accept-only, each verdict carrying the packet back (as an ESP verdict carries "
                 "its new packet): what the kernel's payload copy and the lost checksum offload "
                 "cost"),
    RowSpec("accept-gcm", "accept-only + AES-GCM (floor)", "accept", per_queue=False, work="gcm",
            note="accept-payload, each packet first sealed with AES-GCM-128 by the core's "
                 "suite: the floor under any ESP worker on this binding and cipher library"),
    RowSpec("gcm", "transport aes-gcm-128", "esp", encryption="aes-gcm-128"),
    RowSpec("gcm-gso", "transport aes-gcm-128 GSO", "esp", encryption="aes-gcm-128",
            per_queue=False, gso=True, base="gcm",
            note="the gcm row with daemon.gso: outbound TCP superpackets cut, sealed and sent "
                 "in sendmmsg batches by the worker; inbound as ever"),
    RowSpec("gcm-source", "transport gcm (uncompiled core)", "esp", encryption="aes-gcm-128",
            per_queue=False, source_core=True, base="gcm",
            note="the gcm row with the ESP core run from its Python source instead of the "
                 "mypyc-compiled build: what compiling gains, in the same run"),
    RowSpec("gcm6", "transport aes-gcm-128 IPv6", "esp", topology="host6",
            encryption="aes-gcm-128", per_queue=False, base="gcm",
            note="the gcm row over IPv6 (host6: the same veth pair, IPv6 only); its ratio to "
                 "accept-only compares with the IPv4 accept-only row"),
    RowSpec("gcm-udp", "transport aes-gcm-128 in UDP", "esp", encryption="aes-gcm-128",
            per_queue=False, encapsulation="udp", base="gcm",
            note="the gcm row with ESP in UDP (RFC 3948, 4500 -> 4500, IPv4): 8 bytes more "
                 "per packet, the UDP rules and the core's UDP path"),
    RowSpec("gcm-poll", "transport gcm busy_poll 200us", "esp", encryption="aes-gcm-128",
            per_queue=False, busy_poll=200, base="gcm",
            note="the gcm row with adaptive polling (daemon.busy_poll = 200): each worker "
                 "polls its queue for up to 200 us after a batch before it sleeps"),
    RowSpec("gcm-float", "transport gcm workers unpinned", "esp", encryption="aes-gcm-128",
            per_queue=False, pinned=False, base="gcm",
            note="the gcm row with its workers not pinned (cpus = []): the scheduler runs each "
                 "where it wakes up"),
    RowSpec("gcm-nosandbox", "transport gcm without sandbox", "esp", encryption="aes-gcm-128",
            per_queue=False, sandboxed=False, base="gcm",
            note="the gcm row with daemon.sandbox = \"off\" (workers as root, no seccomp filter): "
                 "what the sandbox costs, as the gcm row's ratio to this one"),
    RowSpec("gcm-all2", "transport gcm compare all x2", "esp", encryption="aes-gcm-128",
            per_queue=False, base="gcm", versions=("core", "independent"), compare="all",
            note="the gcm row with daemon.compare = all over the core and the independent "
                 "version: every packet through both, only agreed output leaves"),
    RowSpec("gcm-all3", "transport gcm compare all x3", "esp", encryption="aes-gcm-128",
            per_queue=False, base="gcm", versions=("core", "independent", "core-source"),
            compare="all",
            note="gcm-all2 with the core's Python source as a third version (core-source)"),
    RowSpec("gcm-sample", "transport gcm sample:100 x2", "esp", encryption="aes-gcm-128",
            per_queue=False, base="gcm", versions=("core", "independent"),
            compare="sample:100",
            note="gcm-all2 with daemon.compare = sample:100: every version still processes "
                 "every packet (SA state in step), one in 100 is compared"),
    RowSpec("gcm-majority", "transport gcm majority x3", "esp", encryption="aes-gcm-128",
            per_queue=False, base="gcm", versions=("core", "independent", "core-source"),
            compare="majority",
            note="gcm-all3 with daemon.compare = majority: the answer two of three give leaves"),
    RowSpec("chacha", "transport chacha20-poly1305", "esp", encryption="chacha20-poly1305"),
    RowSpec("cbc", "transport aes-cbc-128+sha256", "esp", encryption="aes-cbc-128"),
    RowSpec("gcm-pycryptodome", "transport gcm on pycryptodome", "esp", encryption="aes-gcm-128",
            per_queue=False, engine="pycryptodome", base="gcm",
            note="the gcm row with every SA on the pycryptodome engine (crypto.policy prefer)"),
    RowSpec("chacha-sodium", "transport chacha on libsodium", "esp",
            encryption="chacha20-poly1305", per_queue=False, engine="sodium", base="chacha",
            note="the chacha row with every SA on the libsodium engine (PyNaCl)"),
    RowSpec("chacha-pycryptodome", "transport chacha pycryptodome", "esp",
            encryption="chacha20-poly1305", per_queue=False, engine="pycryptodome", base="chacha",
            note="the chacha row with every SA on the pycryptodome engine"),
    RowSpec("cbc-pycryptodome", "transport cbc on pycryptodome", "esp", encryption="aes-cbc-128",
            per_queue=False, engine="pycryptodome", base="cbc",
            note="the cbc row with every SA on the pycryptodome engine"),
    RowSpec("gcm-balance", "transport gcm engines balanced", "esp", encryption="aes-gcm-128",
            per_queue=False, policy="balance", base="gcm",
            note="the gcm row with crypto.policy balance: SAs spread over the capable engines "
                 "by measured speed"),
    RowSpec("tunnel-gcm", "tunnel aes-gcm-128 (gateways)", "esp", topology="gateway",
            encryption="aes-gcm-128",
            note="client -> gateway -> gateway -> server: two more forwarding hops than the "
                 "host rows"),
    RowSpec("strongswan", "strongSwan libipsec gcm (UDP)", "strongswan", per_queue=False,
            note=strongswan.DESCRIPTION),
)
ROW_KEYS = tuple(r.key for r in ROWS)


def row_spec(key: str) -> RowSpec:
    for r in ROWS:
        if r.key == key:
            return r
    raise KeyError(key)


@dataclass
class Bed:
    """A built test bed: where traffic goes and which processes are the data plane."""

    path: TrafficPath
    dataplane: list[Started] = field(default_factory=list)  # CPU: these and their descendants
    queue_hosts: list[Host] = field(default_factory=list)  # namespaces with NFQUEUE queues
    daemons: list[Daemon] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    workers: int = 0  # the processes that carry packets (idle CPU per worker)

    def dataplane_pids(self) -> list[int]:
        return [p.pid for p in self.dataplane if p.popen.poll() is None]

    def check_alive(self) -> None:
        for p in self.dataplane:
            if p.popen.poll() is not None:
                raise LabError(f"{p.name} exited with {p.popen.returncode}: {p.output()[-600:]}")

    def daemon_status(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Per peer, from ``nfq-ipsec status --json``: each worker's packets, drops and core
        build; each SA's packets and encapsulation (what the ESP-in-UDP row really ran)."""
        workers: dict[str, Any] = {}
        sas: dict[str, Any] = {}
        for d in self.daemons:
            try:
                st = d.status()
            except (LabError, ValueError) as err:
                workers[d.name] = sas[d.name] = {"error": str(err)[:300]}
                continue
            workers[d.name] = [
                {k: w.get(k)
                 for k in ("queue", "cpu", "packets_in", "packets_out", "drops", "kernel", "core",
                           "superpackets", "segments")}
                for w in st.get("workers", [])
            ]
            sas[d.name] = [
                {k: sa.get(k) for k in ("name", "direction", "queue", "packets", "encapsulation",
                                        "udp_peer")}
                for sa in st.get("sas", [])
            ]
        return workers, sas


def cpus_for(peer_index: int, queues: int, layout: str) -> list[int]:
    online = sorted(os.sched_getaffinity(0))
    offset = peer_index if layout == "spread" else 0
    return [online[(i + offset) % len(online)] for i in range(queues)]


def build(lab: Lab, spec: RowSpec, queues: int, layout: str) -> Bed:
    if spec.kind == "plain":
        topo = topology.host_to_host(lab)
        return Bed(TrafficPath(lab, topo.client, topo.server, topo.server_addr))
    if spec.kind == "accept":
        return _accept_bed(lab, queues, layout, spec.work, spec.gso)
    if spec.kind == "esp":
        return _esp_bed(lab, spec, queues, layout)
    if spec.kind == "strongswan":
        topo = topology.host_to_host(lab)
        for peer in topo.peers:
            # libipsec routes the peer's address into its TUN device (table 220), so strict
            # reverse-path filtering on the wire would drop the peer's ESP-in-UDP packets.
            peer.host.sysctl("net.ipv4.conf.all.rp_filter", 2)
        procs = strongswan.start_pair(lab, topo.client, topo.client_addr, topo.server, topo.server_addr)
        return Bed(TrafficPath(lab, topo.client, topo.server, topo.server_addr), dataplane=procs,
                   workers=len(procs),
                   info={"strongswan": strongswan.version(), "ike": strongswan.IKE_PROPOSAL,
                         "esp": strongswan.ESP_PROPOSAL})
    raise ValueError(f"unknown row kind {spec.kind!r}")


# -- the real daemon ------------------------------------------------------------------------

def pin_config(path: Path, cpus: Sequence[int]) -> None:
    """Add ``cpus = [...]`` to the [daemon] table of a lab-generated config."""
    daemon_setting(path, f"cpus = [{', '.join(map(str, cpus))}]")


def daemon_setting(path: Path, line: str) -> None:
    """Add one ``key = value`` line to the [daemon] table of a lab-generated config."""
    text = path.read_text()
    new, n = re.subn(r"^(queues = \[[0-9, ]*\])$", lambda m: f"{m.group(1)}\n{line}", text,
                     count=1, flags=re.M)
    if n != 1:
        raise LabError(f"{path}: no 'queues = [...]' line to add {line!r} after")
    path.write_text(new)


def encapsulate_udp(path: Path) -> None:
    """Give every SA of a lab-generated config ``encapsulation = "udp"`` (ports: the
    defaults, 4500 to 4500), after its ``key_file`` line."""
    text = path.read_text()
    new, n = re.subn(r'^(key_file = "[^"\n]*")$', r'\1\nencapsulation = "udp"', text, flags=re.M)
    if n == 0 or n != text.count("[[sa]]"):
        raise LabError(f"{path}: {n} key_file lines for {text.count('[[sa]]')} SAs")
    path.write_text(new)


def crypto_config(path: Path, spec: RowSpec) -> None:
    """An engine row's ``[crypto]``: its SAs on ``spec.engine`` (policy prefer), or
    ``spec.policy``; nothing for the other rows."""
    if spec.engine:
        crypto = f'policy = "prefer"\nprefer = ["{spec.engine}"]\n'
    elif spec.policy:
        crypto = f'policy = "{spec.policy}"\n'
    else:
        return
    path.write_text(path.read_text() + "\n[crypto]\n" + crypto)


def _esp_bed(lab: Lab, spec: RowSpec, queues: int, layout: str) -> Bed:
    assert spec.encryption is not None
    topo = topology.build(lab, spec.topology)
    cfg = labconfig.generate(lab.workdir / "config", topo.a.spec, topo.b.spec, spec.encryption, queues,
                             gso=spec.gso)
    cpus = {}
    for i, peer in enumerate(topo.peers):
        path = cfg.peer(peer.name).path
        cpus[peer.name] = cpus_for(i, queues, layout) if spec.pinned else []
        pin_config(path, cpus[peer.name])
        if spec.busy_poll:
            daemon_setting(path, f"busy_poll = {spec.busy_poll}")
        if not spec.sandboxed:
            daemon_setting(path, 'sandbox = "off"')
        if spec.compare != "off":
            names = ", ".join(f'"{v}"' for v in spec.versions)
            daemon_setting(path, f'versions = [{names}]\ncompare = "{spec.compare}"')
        if spec.encapsulation == "udp":
            encapsulate_udp(cfg.peer(peer.name).path)
        crypto_config(path, spec)
    cmd = command()
    if spec.source_core:
        cmd = ["env", f"{corebuild.PURE_ENV}=1", *cmd]
    daemons = [Daemon.of_peer(cfg.peer(p.name), p.host, cmd) for p in topo.peers]
    for d in daemons:
        d.start(lab)
    for d in daemons:
        d.wait_ready()
    procs = [d.proc for d in daemons if d.proc is not None]
    return Bed(TrafficPath(lab, topo.client, topo.server, topo.server_addr), dataplane=procs,
               queue_hosts=[p.host for p in topo.peers], daemons=daemons,
               workers=queues * len(topo.peers),
               info={"mode": cfg.mode, "encryption": cfg.encryption, "integrity": cfg.integrity,
                     "cpus": cpus, "topology": topo.kind, "encapsulation": spec.encapsulation,
                     "busy_poll_us": spec.busy_poll, "gso": spec.gso,
                     "engine": spec.engine, "crypto_policy": spec.policy,
                     "versions": list(spec.versions) or ["core"], "compare": spec.compare})


# -- accept-only ----------------------------------------------------------------------------

def accept_rules(interface: str, queues: Sequence[int], mark: int = DEFAULT_MARK) -> str:
    """iptables-restore input: every packet of ``interface`` to the queues, like the daemon's
    hooks (mangle OUTPUT for what this host sends, raw PREROUTING for what it receives),
    skipping packets that carry the reinject mark; several queues: HMARK per flow."""
    lines = []
    for table, chain, direction in (("raw", "PREROUTING", "-i"), ("mangle", "OUTPUT", "-o")):
        lines += [f"*{table}", f":{chain} ACCEPT [0:0]",
                  f"-A {chain} {direction} {interface} -m mark --mark 0x{mark:x}/0x{mark:x} -j RETURN"]
        if len(queues) == 1:
            lines.append(f"-A {chain} {direction} {interface} -j NFQUEUE --queue-num {queues[0]}")
        else:
            base = hmark_base(mark)
            lines.append(
                f"-A {chain} {direction} {interface} -j HMARK --hmark-src-prefix 32 --hmark-dst-prefix 32 "
                f"--hmark-sport-mask 0xffff --hmark-dport-mask 0xffff --hmark-proto-mask 0xffff "
                f"--hmark-rnd 0x{HMARK_RND:08x} --hmark-mod {len(queues)} --hmark-offset {base}")
            for k, q in enumerate(queues):
                lines.append(f"-A {chain} {direction} {interface} -m mark --mark 0x{base + k:x} "
                             f"-j NFQUEUE --queue-num {q}")
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def bound_queues(host: Host) -> set[int]:
    res = host.run(["cat", PROC_QUEUES], check=False)
    return {int(line.split()[0]) for line in res.stdout.splitlines() if line.split()}


def _accept_bed(lab: Lab, queues: int, layout: str, work: str = "none", gso: bool = False) -> Bed:
    topo = topology.host_to_host(lab)
    qnums = [labconfig.QUEUE_BASE + k for k in range(queues)]
    procs: list[Started] = []
    cpus = {}
    for i, peer in enumerate(topo.peers):
        cpus[peer.name] = cpus_for(i, queues, layout)
        for q, cpu in zip(qnums, cpus[peer.name], strict=True):
            procs.append(lab.start(f"accept-{peer.name}-q{q}", peer.host, [
                sys.executable, "-m", "nfq_ipsec_lab.bench.accept", "--queue", str(q), "--cpu", str(cpu),
                "--mark", f"0x{DEFAULT_MARK:x}", "--work", work, *(["--gso"] if gso else [])]))
    deadline = time.monotonic() + READY_TIMEOUT
    for peer in topo.peers:
        while not set(qnums) <= bound_queues(peer.host):
            for p in procs:
                if p.popen.poll() is not None:
                    raise LabError(f"{p.name} exited with {p.popen.returncode}: {p.output()[-600:]}")
            if time.monotonic() > deadline:
                raise LabError(f"accept-only workers on {peer.host.name} did not bind queues {qnums} "
                               f"within {READY_TIMEOUT:g} s")
            time.sleep(0.05)
    for peer in topo.peers:  # rules only once every queue has its worker, as the daemon does
        peer.host.run(["iptables-restore"], input=accept_rules(peer.spec.interface, qnums))
    return Bed(TrafficPath(lab, topo.client, topo.server, topo.server_addr), dataplane=procs,
               queue_hosts=[p.host for p in topo.peers], workers=len(procs),
               info={"queues": qnums, "cpus": cpus, "work": work, "gso": gso})

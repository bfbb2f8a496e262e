"""A lab session: topology + both configurations + both daemons, torn down as one.

    with LabSession("host", "aes-gcm-128", queues=2) as s:
        s.start_daemons()                 # snapshots iptables first, waits until ready
        cap = s.capture()                 # tcpdump on the wire
        ping(s.topo.client, s.topo.server_addr)
        s.stop_daemons()                  # SIGTERM; snapshots iptables again
        analyse_wire(cap.stop(), s.peer_addresses, s.allowed_flows)

Used by the demo (``nfq-ipsec lab demo``) and by ``tests/test_e2e_lab.py``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import IO

from . import netns
from .checks import Endpoints
from .daemon import Daemon, command, iptables_snapshot
from .labconfig import LabConfig, generate
from .netns import Lab, LabError
from .topology import Topology, build
from .traffic import PROTO_TCP, Capture, Flow


def check_environment() -> list[str]:
    """What keeps a lab from running here, as readable lines (empty: nothing)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("the lab needs root (network namespaces, iptables)")
    for tool in ("ip", "iptables", "tcpdump", "iperf3", "ss", "sysctl"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} is not installed (run scripts/install-deps)")
    return problems


class LabSession:
    def __init__(
        self, topology: str = "host", encryption: str = "aes-gcm-128", queues: int = 2,
        keep: bool = False, cmd: list[str] | None = None, log: IO[str] | None = None,
        prefix: str = netns.PREFIX, encapsulation: str = "none", gso: bool = False,
        compare: str = "off",
    ) -> None:
        self.kind = topology
        self.encapsulation = encapsulation
        self.gso = gso
        self.compare = compare  # daemon.compare on both peers (both ESP versions)
        self.encryption = encryption
        self.queues = queues
        self.cmd = cmd or command()
        self.log = log
        self.lab = Lab(keep=keep, prefix=prefix)
        self.topo: Topology | None = None
        self.cfg: LabConfig | None = None
        self.daemons: dict[str, Daemon] = {}
        self.iptables_before: dict[str, str] = {}
        self.iptables_stopped: dict[str, str] = {}  # after the stop: the closed rules
        self.iptables_after: dict[str, str] = {}  # after `rules remove`

    # -- set up and tear down -------------------------------------------------------------
    def __enter__(self) -> LabSession:
        self.lab.__enter__()
        try:
            netns.remove_stale(self.log, prefix=self.lab.prefix)
            self.topo = build(self.lab, self.kind)
            self.cfg = generate(self.lab.workdir / "config", self.topo.a.spec, self.topo.b.spec,
                                self.encryption, self.queues, mode=self.topo.mode,
                                encapsulation=self.encapsulation, gso=self.gso,
                                compare=self.compare)
            for peer in self.topo.peers:
                self.daemons[peer.name] = Daemon.of_peer(self.cfg.peer(peer.name), peer.host, self.cmd)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.lab.close()

    @property
    def workdir(self) -> Path:
        return self.lab.workdir

    @property
    def topology(self) -> Topology:
        if self.topo is None:
            raise LabError("the lab is not built")
        return self.topo

    @property
    def config(self) -> LabConfig:
        if self.cfg is None:
            raise LabError("the lab is not built")
        return self.cfg

    # -- daemons --------------------------------------------------------------------------
    def start_daemons(self) -> None:
        for d in self.daemons.values():
            self.iptables_before[d.name] = iptables_snapshot(d.host)
        for d in self.daemons.values():
            d.start(self.lab)
        for d in self.daemons.values():
            d.wait_ready()

    def stop_daemons(self, remove_rules: bool = True) -> dict[str, int | None]:
        """SIGTERM to every daemon; snapshots of iptables after the stop (the closed rules)
        and, with ``remove_rules``, after ``nfq-ipsec rules remove``."""
        codes = {name: d.stop() for name, d in self.daemons.items()}
        for d in self.daemons.values():
            self.iptables_stopped[d.name] = iptables_snapshot(d.host)
            if remove_rules:
                d.remove_rules()
                self.iptables_after[d.name] = iptables_snapshot(d.host)
        return codes

    # -- capture --------------------------------------------------------------------------
    def capture(self, name: str = "wire") -> Capture:
        topo = self.topology
        return Capture(self.lab, topo.wire_host, topo.wire_if, self.workdir / f"{name}.pcap").start()

    @property
    def endpoints(self) -> Endpoints:
        t = self.topology
        return Endpoints(t.client, t.client_addr, t.server, t.server_addr, t.wire_host, t.wire_if,
                         self.peer_addresses)

    @property
    def peer_addresses(self) -> tuple[str, str]:
        return str(self.topology.a.spec.address), str(self.topology.b.spec.address)

    @property
    def allowed_flows(self) -> tuple[Flow, ...]:
        """Flows that may cross the wire in clear: the bypass policy's."""
        return (Flow(PROTO_TCP, self.config.bypass_port),)

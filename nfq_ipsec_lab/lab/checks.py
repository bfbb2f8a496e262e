"""The traffic-and-capture check of a running pair of IPsec peers, in one call.

Independent of how the peers were built: give it where the traffic starts and ends, where to
capture the wire, the two peers' wire addresses and the lab's configuration (for the SAs,
keys and the bypass/discard ports). The namespace e2e tests use it, and so can a two-VM lab.

While tcpdump records the wire it sends: ping; TCP bulk (iperf3, several parallel flows so a
per-flow hash spreads them over the workers); UDP (iperf3, 1200-byte datagrams); a random file
(SHA-256 compared on arrival); a small file to the BYPASS port; UDP to the DISCARD port and, as
its positive control, to a protected port; then the daemons' status. Afterwards the capture is
analysed (cleartext, ESP per SPI; with the lab's ``encapsulation = "udp"`` ESP in UDP on port
4500 is what counts as ESP) and tshark checks every ICV. Every step keeps its result or
its error, so one failure doesn't hide the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .daemon import Daemon
from .labconfig import LabConfig
from .netns import Host, Lab
from .traffic import (
    PROTO_TCP,
    Capture,
    Flow,
    analyse_wire,
    iperf3_tcp,
    iperf3_udp,
    ping,
    random_file,
    send_file,
    tshark_verify,
    udp_probe,
)

PROTECTED_UDP_PORT = 9998
UDP_ENCAP_PORT = 4500  # the lab's ESP in UDP: the default ports both ways


@dataclass(frozen=True)
class Endpoints:
    """Where a check sends traffic and listens to the wire."""

    client: Host
    client_addr: str
    server: Host
    server_addr: str
    wire_host: Host
    wire_if: str
    peers: tuple[str, str]  # the two IPsec peers' addresses on the wire
    capture_filter: str | None = None  # tcpdump filter for a shared wire (see traffic.Capture)
    tshark_host: Host | None = None  # where tshark runs on the capture; None: here


@dataclass
class CheckRun:
    values: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.monotonic()
        try:
            self.values[name] = fn()
        except Exception as err:  # kept for whoever needs this step; the others go on
            self.errors[name] = f"{type(err).__name__}: {err}"
        finally:
            self.timings[name] = time.monotonic() - t0
        return self.values.get(name)

    def failed(self) -> list[str]:
        return [f"{k}: {v}" for k, v in self.errors.items()]


def traffic_and_capture(
    lab: Lab, ends: Endpoints, cfg: LabConfig, workdir: Path,
    daemons: Mapping[str, Daemon] | None = None, seconds: float = 2, parallel: int = 4,
    file_size: int = 1 << 20, udp_count: int = 20, run: CheckRun | None = None,
) -> CheckRun:
    """Run the traffic with the wire captured; analyse the capture. ``workdir`` holds the
    capture and the files (it should be private: the capture is decryptable with the keys)."""
    r = run or CheckRun()
    c, s, addr = ends.client, ends.server, ends.server_addr
    cap = Capture(lab, ends.wire_host, ends.wire_if, workdir / "wire.pcap", bpf=ends.capture_filter)
    if r.step("capture_start", cap.start) is None:
        return r
    r.step("ping", lambda: ping(c, addr, count=3))
    r.step("tcp", lambda: iperf3_tcp(lab, c, s, addr, seconds=seconds, parallel=parallel))
    r.step("udp", lambda: iperf3_udp(lab, c, s, addr, seconds=seconds, bitrate="20M", length=1200))
    data = random_file(workdir / "random.bin", file_size)
    r.step("file", lambda: send_file(lab, c, s, addr, data, port=5001,
                                     received_path=workdir / "received.bin"))
    small = random_file(workdir / "random-small.bin", 64 << 10)
    r.step("bypass", lambda: send_file(lab, c, s, addr, small, port=cfg.bypass_port))
    r.step("discard", lambda: udp_probe(lab, c, s, addr, cfg.discard_port, udp_count))
    r.step("udp_control", lambda: udp_probe(lab, c, s, addr, PROTECTED_UDP_PORT, udp_count))
    if daemons:
        r.step("status", lambda: {n: d.status() for n, d in daemons.items()})
    pcap = cap.stop()
    r.values["pcap"] = pcap
    r.values["capture_dropped"] = cap.kernel_dropped
    udp_port = UDP_ENCAP_PORT if cfg.encapsulation == "udp" else None
    r.step("wire", lambda: analyse_wire(pcap, ends.peers, [Flow(PROTO_TCP, cfg.bypass_port)],
                                        udp_port=udp_port))
    r.step("tshark", lambda: tshark_verify(pcap, cfg.sas, host=ends.tshark_host))
    return r


@dataclass(frozen=True)
class Verdict:
    """One line of a check's report: what was checked, whether it passed, and why not."""

    text: str
    ok: bool
    detail: str = ""
    skipped: bool = False  # not checkable here (tshark without the algorithm): not a failure


def verdicts(r: CheckRun, cfg: LabConfig, udp_count: int = 20, file_size: int = 1 << 20) -> list[Verdict]:
    """Judge a :func:`traffic_and_capture` run: the same criteria as the namespace e2e tests
    (``tests/test_e2e_lab.py``), as report lines. A step that failed is a failed line."""
    out: list[Verdict] = []

    def get(name: str) -> Any:
        if name in r.errors:
            out.append(Verdict(f"{name}: step failed", False, r.errors[name]))
            return None
        return r.values.get(name)

    p = get("ping")
    if p is not None:
        out.append(Verdict(f"ping: {p.received}/{p.sent} replies", p.ok, p.output))
    tcp = get("tcp")
    if tcp is not None:
        out.append(Verdict(f"TCP (iperf3): {tcp.mbit:.0f} Mbit/s, {tcp.bytes_received / 1e6:.1f} MB",
                           tcp.tcp_complete, str(tcp)))
    udp = get("udp")
    if udp is not None:
        out.append(Verdict(f"UDP (iperf3): {udp.packets} datagrams, {udp.lost_packets} lost",
                           udp.packets > 0 and udp.lost_packets <= udp.packets * 0.05, str(udp)))
    f = get("file")
    if f is not None:
        out.append(Verdict(f"file transfer: {f.size} bytes, sha256 {'matches' if f.ok else 'DIFFERS'}",
                           f.ok and f.size == file_size, str(f)))
    bp = get("bypass")
    if bp is not None:
        out.append(Verdict(f"bypass policy: TCP port {cfg.bypass_port} arrives", bp.ok, str(bp)))
    ctl, disc = get("udp_control"), get("discard")
    if ctl is not None:
        out.append(Verdict(f"protected UDP: {ctl.received}/{udp_count} datagrams arrive",
                           ctl.received == udp_count, str(ctl)))
    if disc is not None:
        out.append(Verdict(f"discard policy: {disc.received} of {disc.sent} UDP datagrams to port "
                           f"{cfg.discard_port} arrive", disc.received == 0, str(disc)))
    status = get("status")
    if status is not None:
        idle = [f"{peer} q{w.get('queue')}" for peer, st in status.items() for w in st.get("workers", [])
                if not w.get("packets_out")]
        out.append(Verdict("every worker of both peers carried traffic" if not idle
                           else f"idle workers: {', '.join(idle)}", not idle))
    dropped = r.values.get("capture_dropped")
    if "pcap" in r.values:
        out.append(Verdict(f"capture complete: tcpdump lost {dropped} frames", dropped == 0))
    wire = get("wire")
    if wire is not None:
        spis = {sa.spi for sa in cfg.sas}
        out.append(Verdict(f"wire: {wire.summary()}", wire.ok and wire.esp + wire.bypassed == wire.ipv4,
                           "\n".join(wire.examples)))
        out.append(Verdict(f"wire: ESP on all {len(spis)} SAs", set(wire.esp_by_spi) == spis,
                           ", ".join(f"0x{k:x}: {v}" for k, v in sorted(wire.esp_by_spi.items()))))
    ts = get("tshark")
    if ts is not None:
        if not ts.supported:
            out.append(Verdict(ts.summary(), True, skipped=True))
        else:
            esp = wire.esp if wire is not None else -1
            out.append(Verdict(ts.summary() + f" of {ts.esp} ESP packets", ts.ok and ts.esp == esp and
                               ts.unchecked == 0, f"tshark saw {ts.esp} ESP packets, the capture has {esp}"))
    return out

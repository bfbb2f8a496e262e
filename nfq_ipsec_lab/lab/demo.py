"""The README demo (``nfq-ipsec lab demo``, ``scripts/demo``): a lab, real daemons, checks.

Builds the lab (host-to-host by default), writes configs with fresh keys, starts an
``nfq-ipsec run`` on both IPsec peers, captures the wire while it sends ping, a short TCP
transfer and a 1 MiB file through ESP, checks the capture (only ESP; tshark authenticates every
packet with the keys), prints both daemons' status, stops them with SIGTERM (their iptables
rules must be gone) and removes everything, also on failure and on Ctrl-C. Exit status 0 only
if every check passed.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import IO

from .netns import LabError
from .session import LabSession, check_environment
from .traffic import (
    analyse_wire,
    iperf3_tcp,
    ping,
    random_file,
    send_file,
    tshark_verify,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass
class Checks:
    out: IO[str]
    results: list[tuple[str, bool]] = field(default_factory=list)

    def check(self, text: str, ok: bool, detail: str = "") -> bool:
        self.results.append((text, ok))
        mark = "ok" if ok else "FAILED"
        line = f"      {text:<62} {mark}"
        print(line, file=self.out, flush=True)
        if detail and not ok:
            for d in detail.splitlines():
                print(f"        {d}", file=self.out, flush=True)
        return ok

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(ok for _, ok in self.results)


def run_demo(
    topology: str = "host", encryption: str = "aes-gcm-128", queues: int = 2, keep: bool = False,
    out: IO[str] | None = None,
) -> int:
    out = out or sys.stdout

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    problems = check_environment()
    if problems:
        for problem in problems:
            say(f"nfq-ipsec lab: {problem}")
        return EXIT_USAGE
    kind = {"host": "host-to-host, transport mode",
            "host6": "host-to-host over IPv6, transport mode",
            "gateway6": "gateway-to-gateway over IPv6, tunnel mode"}.get(
                topology, "gateway-to-gateway, tunnel mode")
    say(f"nfq-ipsec lab demo: {kind}, {encryption}, {queues} queue(s) per peer")
    checks = Checks(out)
    steps = 7
    try:
        with LabSession(topology, encryption, queues, keep=keep, log=out) as s:
            topo, cfg = s.topology, s.config
            say(f"\n[1/{steps}] Lab built from network namespaces (removed again at the end)")
            for line in topo.describe():
                say(f"      {line}")
            say(f"\n[2/{steps}] Configurations and fresh random keys (files of mode 0600) in {cfg.directory}")
            for name, pc in cfg.peers.items():
                say(f"      {name}: {pc.path}")
            alg = cfg.encryption + (f" + {cfg.integrity}" if cfg.integrity else "")
            for sender, receiver in (("a", "b"), ("b", "a")):
                spis = ", ".join(f"0x{sa.spi:x} (queue {sa.queue})" for sa in cfg.sas if sa.sender == sender)
                say(f"      SAs {sender} -> {receiver}: {spis}; {alg}")

            say(f"\n[3/{steps}] Starting `nfq-ipsec run` on both peers (workers first, then rules)")
            t0 = time.monotonic()
            s.start_daemons()
            for name, d in s.daemons.items():
                st = d.status()
                pids = [str(w.get("pid")) for w in st.get("workers", [])]
                say(f"      {name}: daemon pid {st['daemon'].get('pid')}, workers {', '.join(pids)}, "
                    "rules installed")
            say(f"      both ready in {time.monotonic() - t0:.1f} s")

            say(f"\n[4/{steps}] Capturing the wire: tcpdump on {topo.wire_host.name} {topo.wire_if}")
            cap = s.capture()

            say(f"\n[5/{steps}] Traffic from {topo.client_addr} to {topo.server_addr} through ESP")
            p = ping(topo.client, topo.server_addr, count=3)
            checks.check(f"ping: {p.received}/{p.sent} replies", p.ok, p.output)
            tcp = iperf3_tcp(s.lab, topo.client, topo.server, topo.server_addr, seconds=2,
                             parallel=2 * queues)
            checks.check(f"TCP, iperf3 -t 2 -P {2 * queues}: {tcp.mbit:.0f} Mbit/s, "
                         f"{tcp.bytes_received / 1e6:.1f} MB", tcp.bytes_received > 0)
            f = random_file(s.workdir / "file-1MiB.bin")
            tr = send_file(s.lab, topo.client, topo.server, topo.server_addr, f)
            checks.check(f"1 MiB file: sha256 {tr.sha256_received[:16]}... "
                         f"{'matches' if tr.ok else 'DIFFERS'}", tr.ok,
                         f"sent {tr.size} bytes sha256 {tr.sha256_sent}\n"
                         f"received {tr.bytes_received} bytes sha256 {tr.sha256_received}")

            say(f"\n[6/{steps}] Checking the capture")
            pcap = cap.stop()
            wire = analyse_wire(pcap, s.peer_addresses, s.allowed_flows)
            packets = wire.ipv4 + wire.ipv6  # IPv6: neighbour discovery and MLD are the link's
            all_esp = ("all ESP" if wire.cleartext == 0 and wire.esp + wire.link == packets
                       else "NOT all ESP")
            link = f" (and {wire.link} neighbour discovery/MLD)" if wire.link else ""
            checks.check(f"{packets} packets on the wire, {all_esp}{link}, {wire.cleartext} "
                         "cleartext", wire.ok, "\n".join(wire.examples))
            checks.check(f"capture complete: tcpdump lost {cap.kernel_dropped} frames",
                         cap.kernel_dropped == 0)
            ts = tshark_verify(pcap, cfg.sas)
            if ts.supported:
                checks.check(f"tshark: {ts.icv_good} ICV good, {ts.icv_bad} bad"
                             + (f", {ts.unchecked} unchecked" if ts.unchecked else ""),
                             ts.ok and ts.esp == wire.esp)
            else:
                say(f"      tshark: NOT CHECKED: {ts.reason}")
            say(f"      summary: {packets} packets on the wire, {all_esp}, {wire.cleartext} "
                f"cleartext; {ts.summary()}")

            say(f"\n[7/{steps}] `nfq-ipsec status` of both peers")
            for name, d in s.daemons.items():
                say(f"  --- peer {name} ({d.host.name}) ---")
                for line in d.status_text().rstrip().splitlines():
                    say(f"  {line}")

            if keep:
                say("\n--keep: the lab stays up. To look around:")
                a = topo.a.host.name
                say(f"  ip netns exec {a} {' '.join(s.cmd)} status --config {cfg.peer('a').path}")
                say(f"  ip netns exec {a} iptables-save")
                say("To remove it:")
                for c in s.lab.removal_commands():
                    say(f"  {c}")
            else:
                say("\nStopping both daemons with SIGTERM, then `nfq-ipsec rules remove`")
                codes = s.stop_daemons()
                for name, code in codes.items():
                    checks.check(f"daemon {name} exited with {code}", code == 0,
                                 s.daemons[name].output()[-2000:])
                    stopped = s.iptables_stopped[name]
                    checks.check(f"iptables of {name} after the stop: rules closed (no queue, "
                                 "protected traffic dropped)",
                                 "-j NFQUEUE" not in stopped and "NFQIPSEC-OUT" in stopped, stopped)
                    same = s.iptables_before[name] == s.iptables_after[name]
                    checks.check(f"iptables of {name} after `rules remove`: exactly as before", same,
                                 _diff(s.iptables_before[name], s.iptables_after[name]))
                say("Removing the lab (processes, namespaces, keys)")
    except KeyboardInterrupt:
        say("\ninterrupted: the lab was removed")
        return EXIT_INTERRUPTED
    except SystemExit as stop:
        say("\nstopped by a signal: the lab was removed")
        raise stop
    except (LabError, ValueError) as err:
        say(f"\nFAILED: {err}")
        say("the lab was removed")
        return EXIT_FAILED
    failed = [text for text, ok in checks.results if not ok]
    if failed:
        say(f"\nRESULT: {len(failed)} of {len(checks.results)} checks FAILED")
        return EXIT_FAILED
    say(f"\nRESULT: all {len(checks.results)} checks passed")
    return EXIT_OK


def _diff(before: str, after: str) -> str:
    import difflib

    return "\n".join(difflib.unified_diff(before.splitlines(), after.splitlines(), "before", "after",
                                          lineterm=""))

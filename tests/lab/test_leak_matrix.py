"""The leak matrix: in every state the daemon can be in, protected traffic never crosses the wire
in clear.

One lab for the module (tests/labutil.py: hosts A and B, a daemon on each, UDP to two ports
protected by one SA per queue). In each scenario A sends canary datagrams to B on both ports
every 5 ms while a sniffer on B's interface records every frame on the wire; something happens
to A's daemon meanwhile. The capture must hold no byte of the canary in clear. Each scenario
also reports the canaries lost (sent by A, never received by B) and checks a counter that proves
the packets met the rules, so a scenario can't pass by sending nothing.

``NFQ_IPSEC_LEAK_REPORT=FILE`` writes the table (JSON) there.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from labutil import (
    ADDR_A,
    ADDR_B,
    MARK,
    PACED,
    PORTS,
    RECEIVER,
    ROOT,
    Daemon,
    Pair,
    Sniffer,
    daemon,
    end,
    inject,
    make_keys,
    make_pair,
    nfq_ipsec,
    ready,
    result,
)
from packets import ipv4

CANARY = f"CANARY{os.getpid()}x"
GAP = 0.005  # seconds between rounds of the paced sender (one datagram per flow and port)
SECONDS = 3.0  # each scenario's traffic
ULA_A, ULA_B = "fd00:81::1", "fd00:81::2"


@dataclass
class Lab:
    pair: Pair
    a: Daemon
    b: Daemon
    tmp: Path
    rows: list[dict[str, Any]]
    keys: dict[str, str]

    def kernel_drops(self, d: Daemon) -> dict[str, int]:
        from nfq_ipsec import iptables
        from nfq_ipsec.config import load_config

        cfg = load_config(d.config)
        return iptables.kernel_drops(cfg, netns=d.host.name)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("leak")
    keys = make_keys()
    started: list[Daemon] = []
    with make_pair("lk") as pair:
        try:
            for ns, iface, mine, peer, peer_iface in ((pair.a, pair.va, ULA_A, ULA_B, pair.vb),
                                                       (pair.b, pair.vb, ULA_B, ULA_A, pair.va)):
                pair.run(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0")
                pair.run(ns, "ip", "addr", "add", f"{mine}/64", "dev", iface, "nodad")
                mac = pair.mac_b if peer_iface == pair.vb else pair.mac_a
                # static neighbours: the IPv6 canary would leave at once if nothing stopped it
                pair.run(ns, "ip", "neigh", "replace", peer, "lladdr", mac, "dev", iface,
                         "nud", "permanent")
            a = daemon(pair, tmp, True, keys, started)
            b = daemon(pair, tmp, False, keys, started)
            for d in (a, b):
                d.start()
            for d in (a, b):
                d.wait_running()
            lab = Lab(pair, a, b, tmp, [], keys)
            yield lab
            table = "\n".join(f"{r['scenario']:<34} cleartext {r['cleartext_packets']:>3} packets "
                              f"{r['cleartext_bytes']:>6} bytes, lost {r['lost']:>4} of {r['sent']}"
                              for r in lab.rows)
            print("\nleak matrix:\n" + table)
            report = os.environ.get("NFQ_IPSEC_LEAK_REPORT")
            if report:
                Path(report).write_text(json.dumps(lab.rows, indent=1))
        finally:
            for d in started:
                d.cleanup()


def restart(d: Daemon) -> None:
    d.start()
    d.wait_running()


def stopped_cleanly(d: Daemon) -> None:
    assert d.stop() == 0, d.log_text()[-2000:]


@dataclass
class Outcome:
    sent: int
    received: int
    cleartext: list[bytes]
    frames: list[bytes]
    extra: dict[str, Any]

    @property
    def lost(self) -> int:
        return self.sent - self.received


def run_scenario(lab: Lab, name: str, during: Callable[[], dict[str, Any] | None],
                 seconds: float = SECONDS, listen: bool = True) -> Outcome:
    """Canary traffic A -> B for ``seconds`` with ``during`` run after the first 0.8 s; the
    wire is captured on B's side (``listen``: B receives the canaries; otherwise its ports are
    closed). Records a row of the matrix."""
    pair = lab.pair
    sniffer = Sniffer(pair, pair.b, pair.vb, lab.tmp / f"{name.replace(' ', '_')}.pcap")
    receiver = pair.python(pair.b, RECEIVER, ADDR_B, ",".join(map(str, PORTS)) if listen else "9",
                           "0", stdin=True)
    sender = None
    extra: dict[str, Any] = {}
    try:
        ready(receiver)
        sender = pair.python(pair.a, PACED, ADDR_B, ",".join(map(str, PORTS)), "2", str(GAP),
                             str(seconds), CANARY)
        ready(sender)
        time.sleep(0.8)
        extra = during() or {}
        sent_by_flow = result(sender, timeout=seconds + 60)
        time.sleep(0.5)
        got = result(receiver, stdin="")
    finally:
        end(sender, receiver)
        drops = sniffer.stop()
    assert drops == 0, "the capture is incomplete"
    frames = sniffer.frames()
    canary = CANARY.encode()
    cleartext = [f for f in frames if canary in f]
    sent = sum(sent_by_flow.values())
    texts = {text for _, text in got if text.startswith(CANARY)}
    paced = {t for t in texts if t.split(":")[1].isdigit()}  # the PACED sender's
    out = Outcome(sent, len(paced), cleartext, frames, extra)
    extra["other_received"] = texts - paced
    lab.rows.append({"scenario": name, "cleartext_packets": len(cleartext),
                     "cleartext_bytes": sum(len(f) for f in cleartext), "sent": sent,
                     "lost": out.lost, **{k: v for k, v in extra.items() if isinstance(v, int)}})
    assert sent > 100, sent_by_flow
    return out


def esp_frames(frames: list[bytes]) -> int:
    """ESP frames (Ethernet, IPv4) in a capture."""
    return sum(1 for f in frames if len(f) > 34 and f[12:14] == b"\x08\x00" and f[23] == 50)


def no_cleartext(out: Outcome) -> None:
    assert not out.cleartext, f"{len(out.cleartext)} frames carry the canary in clear: {out.cleartext[0]!r}"


# -- the scenarios (in order: each leaves A's daemon running for the next) ----------------------

def test_running_baseline(lab: Lab) -> None:
    """Steady state: everything arrives, all of it as ESP."""
    out = run_scenario(lab, "running (baseline)", lambda: None)
    no_cleartext(out)
    assert out.lost == 0
    assert esp_frames(out.frames) >= out.sent


def test_clean_stop(lab: Lab) -> None:
    """SIGTERM: the rules stay, closed; nothing protected leaves while the daemon is down."""
    before = lab.kernel_drops(lab.a).get("daemon_stopped", 0)

    def stop() -> dict[str, Any]:
        stopped_cleanly(lab.a)
        time.sleep(0.3)
        return {}

    out = run_scenario(lab, "clean stop (SIGTERM)", stop)
    no_cleartext(out)
    dropped = lab.kernel_drops(lab.a).get("daemon_stopped", 0) - before
    assert dropped > 100 and out.lost > 100, (dropped, out.lost)  # the closed rules took them
    text = subprocess.run(["ip", "netns", "exec", lab.a.host.name, *nfq_ipsec(), "rules", "show",
                           "--config", str(lab.a.config)], capture_output=True, text=True).stderr
    assert "rules closed" in text, text
    restart(lab.a)


def test_restart(lab: Lab) -> None:
    """SIGTERM, then ``run`` at once, as ``systemctl restart`` does it."""
    def bounce() -> dict[str, Any]:
        t0 = time.monotonic()
        stopped_cleanly(lab.a)
        restart(lab.a)
        return {"restart_ms": round((time.monotonic() - t0) * 1000)}

    out = run_scenario(lab, "restart (SIGTERM, then run)", bounce, seconds=6.0)
    no_cleartext(out)
    assert esp_frames(out.frames) > 0


def test_supervisor_sigkill(lab: Lab) -> None:
    """The supervisor killed: its workers follow it, the live rules stay and drop."""
    def kill() -> dict[str, Any]:
        assert lab.a.proc is not None
        st = lab.a.status()
        assert st is not None
        pids = [w["pid"] for w in st["workers"]]
        lab.a.proc.kill()
        lab.a.proc.wait(30)
        from labutil import wait_gone
        wait_gone(pids)
        time.sleep(0.3)
        restart(lab.a)
        return {}

    out = run_scenario(lab, "SIGKILL of the supervisor", kill, seconds=6.0)
    no_cleartext(out)
    assert out.lost > 0


def test_worker_sigkill(lab: Lab) -> None:
    def kill() -> dict[str, Any]:
        st = lab.a.status()
        assert st is not None
        os.kill(lab.a.worker_pid(st, 0), signal.SIGKILL)
        lab.a.wait_for(lambda s: s["workers"][0]["restarts"] >= 1
                       and s["workers"][0]["state"] == "ready", what="worker back")
        return {}

    out = run_scenario(lab, "SIGKILL of a worker", kill)
    no_cleartext(out)


def test_failed_start(lab: Lab) -> None:
    """Stopped, then two starts that fail (a broken config, a missing key file): the closed
    rules stay in place."""
    bad = lab.tmp / "bad.toml"
    bad.write_text(lab.a.config.read_text().replace('action = "protect"', 'action = "protekt"', 1))
    bad.chmod(0o600)
    nokey = lab.tmp / "nokey.toml"
    text = lab.a.config.read_text()
    first_key = text.index('key = "0x')
    line_end = text.index("\n", first_key)
    nokey.write_text(text[:first_key] + f'key_file = "{lab.tmp / "missing.key"}"' + text[line_end:])
    nokey.chmod(0o600)

    def fail() -> dict[str, Any]:
        stopped_cleanly(lab.a)
        codes = []
        for cfg in (bad, nokey):
            res = lab.pair.run(lab.a.host.name, *nfq_ipsec(), "run", "--config", str(cfg), check=False)
            codes.append(res.returncode)
        assert codes == [2, 2], codes
        return {}

    before = lab.kernel_drops(lab.a).get("daemon_stopped", 0)
    out = run_scenario(lab, "failed start (bad config, no key)", fail)
    no_cleartext(out)
    assert lab.kernel_drops(lab.a).get("daemon_stopped", 0) - before > 100
    restart(lab.a)


def test_boot_guard_alone(lab: Lab) -> None:
    """No rules at all (as at boot), then the guard unit's ExecStart: the protected flows are
    dropped before any daemon ran. Then the daemon takes over."""
    # `nfq-ipsec stop --remove-rules`: SIGTERM, wait, then the deliberate removal
    res = lab.pair.run(lab.a.host.name, *nfq_ipsec(), "stop", "--remove-rules", "--config",
                       str(lab.a.config), check=False)
    assert res.returncode == 0, res.stderr
    assert "stopped" in res.stdout and "rules removed" in res.stdout, res.stdout
    assert lab.a.proc is not None and lab.a.proc.wait(5) == 0
    assert not any("NFQIPSEC" in line for line in lab.pair.iptables_save(lab.a.host.name))
    res = lab.pair.run(lab.a.host.name, *nfq_ipsec(), "stop", "--config", str(lab.a.config), check=False)
    assert res.returncode == 3 and "no daemon answers" in res.stderr, res.stderr
    unit = (ROOT / "scripts" / "nfq-ipsec-guard@.service.in").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = exec_start.removeprefix("ExecStart=").split()
    assert argv[0] == "@NFQ_IPSEC@" and argv[-1] == "@CONFDIR@/%i.toml", argv
    argv = [*nfq_ipsec(), *argv[1:-1], str(lab.a.config)]
    lab.pair.run(lab.a.host.name, *argv)

    out = run_scenario(lab, "boot guard alone", lambda: None)
    no_cleartext(out)
    assert out.received == 0
    assert lab.kernel_drops(lab.a).get("daemon_stopped", 0) >= out.sent
    restart(lab.a)
    # the guard started again by hand while the daemon runs: the live rules stay
    res = lab.pair.run(lab.a.host.name, *argv)
    assert "live rules are left in place" in res.stdout, res.stdout
    assert any("NFQUEUE" in line for line in lab.pair.iptables_save(lab.a.host.name))


IPV6_SENDER = textwrap.dedent("""
    import socket, sys, time
    canary, dests = sys.argv[1], sys.argv[2:]
    sent = 0
    for i in range(200):
        for d in dests:
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            try:  # a DROP rule in OUTPUT answers EPERM
                s.sendto(f"{canary}:v6:{i}".encode(), socket.getaddrinfo(d, 7100, socket.AF_INET6)[0][4])
            except PermissionError:
                pass
            s.close()
            sent += 1
        time.sleep(0.002)
    print(sent, flush=True)
""")


def test_ipv6_to_the_peer(lab: Lab) -> None:
    """IPv6 between the same hosts (ULA and link-local) while the IPv4 policies protect: with
    node.default = discard it is dropped on the unprotected interface and counted."""
    pair = lab.pair
    ll = json.loads(subprocess.run(["ip", "-n", pair.b, "-j", "-6", "addr", "show", "dev", pair.vb,
                                    "scope", "link"], capture_output=True, text=True,
                                   check=True).stdout)
    dests = [ULA_B]
    for info in ll[0].get("addr_info", []) if ll else []:
        if info.get("local", "").startswith("fe80"):
            dests.append(f"{info['local']}%{pair.va}")
    before = lab.kernel_drops(lab.a).get("ipv6", 0)

    def send6() -> dict[str, Any]:
        proc = pair.python(pair.a, IPV6_SENDER, CANARY, *dests)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        return {"ipv6_sent": int(out.strip())}

    out = run_scenario(lab, "IPv6 to the peer", send6)
    no_cleartext(out)
    assert not any(f[12:14] == b"\x86\xdd" and CANARY.encode() in f for f in out.frames)
    dropped = lab.kernel_drops(lab.a).get("ipv6", 0) - before
    assert dropped >= out.extra["ipv6_sent"], (dropped, out.extra)


MARKED_SENDER = textwrap.dedent("""
    import socket, sys, time
    canary, dst, mark, ports = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    sent = refused = 0
    for i in range(200):
        for p in ports:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)  # EPERM without CAP_NET_RAW
            try:
                s.sendto(f"{canary}:marked:{p}:{i}".encode(), (dst, int(p)))
            except PermissionError:  # a DROP rule in OUTPUT (the port no policy protects)
                refused += 1
            s.close()
            sent += 1
        time.sleep(0.002)
    print(sent, refused, flush=True)
""")


def test_cap_net_raw_process_with_our_mark(lab: Lab) -> None:
    """An unprivileged process holding only CAP_NET_RAW sets our reinject mark on its socket:
    its datagrams still go through the SPD (protected ones are encrypted, others discarded)."""
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is needed"
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    pair = lab.pair

    def send_marked() -> dict[str, Any]:
        proc = subprocess.run(
            ["ip", "netns", "exec", pair.a, setpriv, "--reuid=65534", "--regid=65534",
             "--clear-groups", "--inh-caps=-all,+net_raw", "--ambient-caps=-all,+net_raw",
             "--bounding-set=-all,+net_raw", python, "-c", MARKED_SENDER, CANARY, ADDR_B,
             str(MARK), str(PORTS[0]), "9999"],
            capture_output=True, text=True, timeout=60, cwd="/",
        )
        assert proc.returncode == 0, proc.stderr
        sent, refused = map(int, proc.stdout.split())
        return {"marked_sent": sent, "marked_refused": refused}

    out = run_scenario(lab, "CAP_NET_RAW process with the mark", send_marked)
    no_cleartext(out)
    assert out.extra["marked_sent"] == 400
    # the port no policy covers: the default discard refused every one of them
    assert out.extra["marked_refused"] == 200
    # the protected port: each went through the SPD, was encrypted, and arrived
    marked = {t for t in out.extra["other_received"] if ":marked:" in t}
    assert len(marked) == 200 and all(f":marked:{PORTS[0]}:" in t for t in marked)
    assert out.lost == 0


def test_unknown_spi_flood(lab: Lab) -> None:
    """Random SPIs flooding B: dropped by B's rules before any queue; the canaries on both of
    B's queues (one inbound SA each) keep arriving."""
    pair = lab.pair
    st0 = lab.b.status()
    assert st0 is not None
    rng = random.Random(7)
    flood = [ipv4(ADDR_A, ADDR_B, 50, struct.pack("!II", rng.randrange(0x10000, 1 << 32), i + 1)
                  + os.urandom(64)) for i in range(20000)]
    drops_before = lab.kernel_drops(lab.b).get("unknown_spi", 0)

    def storm() -> dict[str, Any]:
        inject(pair, flood, gap=0)
        return {"flood_packets": len(flood)}

    out = run_scenario(lab, "unknown-SPI flood", storm)
    no_cleartext(out)
    st1 = lab.b.status()
    assert st1 is not None
    dropped = lab.kernel_drops(lab.b).get("unknown_spi", 0) - drops_before
    assert dropped == len(flood), dropped
    for w0, w1 in zip(st0["workers"], st1["workers"], strict=True):
        assert w1["drops"].get("unknown_spi", 0) == w0["drops"].get("unknown_spi", 0)
    for sa in ("ab0", "ab1"):  # B's inbound SAs, one per queue: both carried traffic
        assert lab.b.sa(st1, sa)["packets"] > lab.b.sa(st0, sa)["packets"]
    lab.rows[-1]["lost"] = out.lost
    assert out.lost <= out.sent * 0.05, (out.lost, out.sent)


def test_icmp_error_from_the_receiver(lab: Lab) -> None:
    """B with ``default = "bypass"`` and nothing listening on the protected ports: its kernel
    answers each canary with a port unreachable that quotes the decrypted datagram. The error
    goes through the flow's SA (RFC 4301 6.2), never in clear by its own header."""
    b = lab.b
    original = b.config.read_text()
    assert 'role = "host"' in original
    stopped_cleanly(b)
    b.config.write_text(original.replace('role = "host"', 'role = "host"\ndefault = "bypass"', 1))
    try:
        restart(b)
        st0 = lab.a.status()
        assert st0 is not None
        out = run_scenario(lab, "ICMP error from the receiver", lambda: None, listen=False)
        no_cleartext(out)
        st1 = lab.a.status()
        assert st1 is not None
        # the errors arrived at A under B's outbound SAs (B sends nothing else)
        errors = sum(lab.a.sa(st1, n)["packets"] - lab.a.sa(st0, n)["packets"] for n in ("ba0", "ba1"))
        lab.rows[-1]["icmp_errors_protected"] = errors
        assert errors >= 2, errors
        assert out.received == 0
    finally:
        stopped_cleanly(b)
        b.config.write_text(original)
        restart(b)



# -- reload ---------------------------------------------------------------------------------------

def rekeyed(text: str, a_side: bool, step: int, keys: dict[str, str]) -> str:
    """One host's config at ``step`` of a hitless manual rekey, from its original ``text``
    (tests/labutil.write_config): every SA gets a successor with a new key and SPI.
    1: each side adds the successors of its inbound SAs; 2: each side sends with the successor
    of its outbound SAs (the peer knows them since step 1); 3: the old inbound SAs go."""
    out_d, in_d = ("ab", "ba") if a_side else ("ba", "ab")
    for i in range(len(PORTS)):
        old_list = f'sa = ["{out_d}{i}", "{in_d}{i}"]'
        assert old_list in text
        lists = {1: [f"{out_d}{i}", f"{in_d}{i}", f"{in_d}{i}n"],
                 2: [f"{out_d}{i}n", f"{in_d}{i}", f"{in_d}{i}n"],
                 3: [f"{out_d}{i}n", f"{in_d}{i}n"]}[step]
        text = text.replace(old_list, "sa = [" + ", ".join(f'"{n}"' for n in lists) + "]")
    blocks = text.split("\n[[sa]]\n")
    head, sas = blocks[0], blocks[1:]
    keep = []
    for block in sas:
        name = block.split('name = "')[1].split('"')[0]
        outbound = name.startswith(out_d)
        if step >= 2 and outbound:
            continue  # the old outbound SAs go with step 2
        if step == 3 and not outbound:
            continue
        keep.append(block)
    for block in sas:
        name = block.split('name = "')[1].split('"')[0]
        outbound = name.startswith(out_d)
        if outbound and step == 1:
            continue  # not yet
        spi = int(block.split("spi = ")[1].split("\n")[0])
        keep.append(block.replace(f'name = "{name}"', f'name = "{name}n"')
                    .replace(f"spi = {spi}", f"spi = {spi + 0x100}")
                    .replace(f'key = "0x{keys[name]}"', f'key = "0x{keys[name + "n"]}"'))
    return "\n[[sa]]\n".join([head, *keep])


def reload(d: Daemon, text: str) -> subprocess.CompletedProcess[str]:
    d.config.write_text(text)
    return d.host.run([*nfq_ipsec(), "reload", "--config", str(d.config)], check=False, env=d.env)


def test_reload_with_changed_keys(lab: Lab) -> None:
    """A hitless manual rekey by three reloads on each side, while the canaries flow: every SA
    replaced by one with a new key and SPI, the workers never restarted, nothing lost."""
    originals = {d.host.name: d.config.read_text() for d in (lab.a, lab.b)}
    keys = {**{k: v for k, v in lab.keys.items()}, **{f"{k}n": os.urandom(20).hex() for k in lab.keys}}
    st0 = lab.a.status()
    assert st0 is not None
    pids0 = [w["pid"] for w in st0["workers"]]
    results: list[str] = []

    def rekey() -> dict[str, Any]:
        for step in (1, 2, 3):
            for d, a_side in ((lab.a, True), (lab.b, False)):
                res = reload(d, rekeyed(originals[d.host.name], a_side, step, keys))
                assert res.returncode == 0, (step, d.host.name, res.stdout, res.stderr,
                                             d.log_text()[-3000:])
                results.append(res.stdout.strip())
        return {"reloads": 6}

    try:
        out = run_scenario(lab, "reload with changed keys", rekey, seconds=5.0)
        no_cleartext(out)
        st = lab.a.status()
        assert st is not None
        assert [w["pid"] for w in st["workers"]] == pids0  # no worker restarted
        names = {s["name"] for s in st["sas"]}
        assert names == {"ab0n", "ab1n", "ba0n", "ba1n"}, names
        assert all(s["packets"] > 0 for s in st["sas"] if s["direction"] == "out"), st["sas"]
        assert out.lost == 0, (out.lost, results)
    finally:
        for d in (lab.a, lab.b):  # back to the first keys, by restart
            d.config.write_text(originals[d.host.name])
            stopped_cleanly(d)
            restart(d)


def test_reload_refused_keeps_the_running_configuration(lab: Lab) -> None:
    """An invalid file (refused by the command before it asks), a change only a restart can
    make (refused by the daemon), and SIGHUP with an invalid file: the old configuration keeps
    running and the traffic with it."""
    a = lab.a
    original = a.config.read_text()
    st0 = a.status()
    assert st0 is not None
    try:
        res = reload(a, original.replace('action = "protect"', 'action = "protekt"', 1))
        assert res.returncode == 2 and "policy[0].action" in res.stderr, res.stderr
        res = reload(a, original.replace('log_level = "info"', 'log_level = "debug"'))
        assert res.returncode == 1 and "daemon.log_level: a change needs a restart" in res.stderr, res.stderr
        a.config.write_text(original.replace('action = "protect"', 'action = "protekt"', 1))
        assert a.proc is not None
        a.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload refused" not in a.log_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "reload refused" in a.log_text()
        a.config.write_text(original)
        out = run_scenario(lab, "refused reloads", lambda: None)
        no_cleartext(out)
        assert out.lost == 0
        st = a.status()
        assert st is not None and [w["pid"] for w in st["workers"]] == [w["pid"] for w in st0["workers"]]
        lab.rows.pop()  # not a row of the matrix
    finally:
        a.config.write_text(original)


BIG_SENDER = textwrap.dedent("""
    import socket, sys
    dst, port, canary, sizes = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for size in map(int, sizes):
        head = f"{canary}:big:{size}:".encode()
        s.sendto(head + b"z" * (size - len(head)), (dst, port))
    print("SENT", flush=True)
""")


def test_big_datagrams_arrive_whole_through_fragmented_esp(lab: Lab) -> None:
    """3,000-, 8,000- and 30,000-byte UDP datagrams over a 1500-byte link: A's kernel fragments
    the ESP packets the worker made, B's kernel reassembles them before the raw table (the
    first rule of our inbound chain turns that on, without turning on conntrack), B's worker
    opens them whole."""
    pair = lab.pair
    for ns, iface in ((pair.a, pair.va), (pair.b, pair.vb)):
        pair.run(ns, "ip", "link", "set", iface, "mtu", "1500")
    sizes = [3000, 8000, 30000]
    try:
        sniffer = Sniffer(pair, pair.b, pair.vb, lab.tmp / "big.pcap")
        receiver = pair.python(pair.b, RECEIVER, ADDR_B, str(PORTS[0]), "0", stdin=True)
        try:
            ready(receiver)
            sender = pair.python(pair.a, BIG_SENDER, ADDR_B, str(PORTS[0]), CANARY,
                                 *map(str, sizes))
            out, err = sender.communicate(timeout=60)
            assert sender.returncode == 0 and "SENT" in out, err
            time.sleep(1.0)
            got = [text for _, text in result(receiver, stdin="")]
        finally:
            end(receiver)
            sniffer.stop()
        frames = sniffer.frames()
    finally:
        for ns, iface in ((pair.a, pair.va), (pair.b, pair.vb)):
            pair.run(ns, "ip", "link", "set", iface, "mtu", "9000")
    if sorted(len(t) for t in got) != sizes:
        sta, stb = lab.a.status(), lab.b.status()
        raise AssertionError(f"got {[len(t) for t in got]}; A: {sta and sta['workers']} "
                             f"{sta and sta['kernel_drops']}; B: {stb and stb['workers']} "
                             f"{stb and stb['kernel_drops']}; {len(frames)} frames")
    assert all(t.endswith("z" * 100) for t in got)
    assert not any(CANARY.encode() in f for f in frames)
    # the ESP went over the wire in fragments (more fragments set, or an offset)
    frags = [f for f in frames if len(f) > 34 and f[12:14] == b"\x08\x00" and f[23] == 50
             and (struct.unpack_from("!H", f, 20)[0] & 0x3FFF)]
    assert len(frags) >= 2 + 6 + 21, len(frags)
    # reassembly came without conntrack (the socket match registers only the former): nothing
    # of ours makes the kernel track every flow in the namespace
    tracked = pair.run(pair.b, "sh", "-c", "cat /proc/net/nf_conntrack 2>/dev/null | wc -l").stdout
    assert int(tracked) == 0, tracked

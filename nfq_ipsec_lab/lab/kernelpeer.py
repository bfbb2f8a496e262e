"""A Linux kernel ESP peer: Debian's kernel in QEMU (TCG), behind a tap device in a namespace.

The guest (:mod:`guestimage`) boots with no configuration at all; everything per test goes
over its serial console, which the harness drives as a line protocol (``/init`` runs each
line as a command and frames what it prints, with its exit status). The console, rather than
the kernel command line or a second cpio appended to the initramfs: both of those are fixed
at boot, and one boot (6 to 10 seconds under TCG on a 2-core machine) should serve a whole
test module, each case flushing the guest's xfrm states and policies and setting its own.
The console also gives the tests the guest's word on everything: ``ip -s xfrm state``,
``sha256sum``, busybox ``wget`` and ``httpd``.

The wire is a :class:`GuestLink` and the SAs come from the lab's configuration generator
(:mod:`labconfig`, the guest being peer ``b``): :func:`xfrm_commands` turns them into
``ip xfrm`` commands for the guest. Addresses are :mod:`ipaddress` objects, so IPv6 renders
the same commands (plus policies that let neighbour discovery pass in clear, as our side's
rules do: the kernel applies its policies to ICMPv6 too, and would otherwise encrypt its
neighbour advertisements and drop ours). :meth:`KernelPeer.add_address` puts a second
address pair (IPv6 beside the IPv4 link) on the same tap, so one boot serves both families.
``encap`` adds ESP in UDP (``encap espinudp``) to the states and starts the guest's holder of
the encapsulation socket (:data:`guestimage.ESPINUDP`), without which the kernel would send ESP
in UDP but never decapsulate it.

Everything is removed on every exit path: QEMU is a process of the :class:`~netns.Lab` (stopped
by pid), and the tap lives in the lab's namespace, deleted with it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from pathlib import Path

from . import guestimage
from .guestimage import GuestImage
from .labconfig import LabSA
from .netns import Lab, LabError, Netns, Started

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = 180.0  # seconds; TCG on a busy 2-core machine
GUEST_MAC = "52:54:00:6e:66:6b"
XFRM_REQID = 1
# xfrm policy priorities (lower wins): neighbour discovery in clear before the protect policies
ND_PRIORITY, PROTECT_PRIORITY = 10, 100
ND_TYPES = (133, 134, 135, 136, 137)  # router/neighbour solicitation and advertisement, redirect
# iproute2's ip in the guest, by its path: busybox's sh runs its own applets first, and its
# "ip" applet has no xfrm.
IP = "/sbin/ip"
IPNetwork = IPv4Network | IPv6Network
_KEY_HEX = re.compile(r"0x[0-9a-fA-F]{32,}")


@dataclass(frozen=True)
class GuestLink:
    """The wire between the namespace (``host``) and the guest: one tap, one prefix."""

    host: IPv4Address | IPv6Address
    guest: IPv4Address | IPv6Address
    prefixlen: int = 24
    mtu: int = 1500


@dataclass(frozen=True)
class UdpEncap:
    """ESP in UDP (RFC 3948) for the guest's states: its source and destination ports."""

    sport: int = 4500
    dport: int = 4500


@dataclass(frozen=True)
class ShellResult:
    status: int
    output: str


@dataclass(frozen=True)
class XfrmCounters:
    """One state's counters as ``ip -s xfrm state`` prints them."""

    spi: int
    packets: int
    bytes: int
    replay: int
    integrity_failed: int


def redact(text: str) -> str:
    """``text`` with anything that looks like key material (long hex) replaced."""
    return _KEY_HEX.sub("0x<key>", text)


def xfrm_commands(sas: Sequence[LabSA], me: str, mode: str, encap: UdpEncap | None = None,
                  replay_window: int = 64,
                  protected: tuple[IPNetwork, IPNetwork] | None = None) -> list[str]:
    """The ``ip xfrm`` commands that make peer ``me`` the other side of ``sas``: a state per
    SA, and one policy per direction between what the two sides protect: ``protected`` (mine,
    theirs), by default the two addresses themselves (a host protecting itself, in transport
    or tunnel mode). The states hold key material: never log them."""
    cmds = [f"{IP} xfrm policy flush", f"{IP} xfrm state flush"]
    for sa in sas:
        if me not in (sa.sender, sa.receiver):
            continue
        cmd = (f"{IP} xfrm state add src {sa.src} dst {sa.dst} proto esp spi 0x{sa.spi:08x} "
               f"reqid {XFRM_REQID} mode {mode} replay-window {replay_window} ")
        cmd += _algorithm(sa)
        if encap is not None:
            cmd += f" encap espinudp {encap.sport} {encap.dport} 0.0.0.0"
        cmds.append(cmd)
    directions = {(sa.src, sa.dst, "out" if sa.sender == me else "in")
                  for sa in sas if me in (sa.sender, sa.receiver)}
    for src, dst, direction in sorted(directions, key=str):
        sel_src, sel_dst = (ip_network(src), ip_network(dst))
        if protected is not None:
            sel_src, sel_dst = protected if direction == "out" else protected[::-1]
        cmds.append(f"{IP} xfrm policy add src {sel_src} dst {sel_dst} dir {direction} "
                    f"priority {PROTECT_PRIORITY} "
                    f"tmpl src {src} dst {dst} proto esp reqid {XFRM_REQID} mode {mode}")
    if (protected is not None and protected[0].version == 6) or any(
            src.version == 6 for src, _, _ in directions):
        cmds += [f"{IP} xfrm policy add src ::/0 dst ::/0 proto 58 type {t} "
                 f"dir {direction} priority {ND_PRIORITY}"
                 for direction in ("out", "in") for t in ND_TYPES]
    return cmds


def _algorithm(sa: LabSA) -> str:
    """The state's algorithm arguments: rfc4106(gcm(aes)) carries the 4-byte salt at the end of
    its key, as the daemon's key files do (RFC 4106 section 8.1)."""
    if sa.encryption.startswith("aes-gcm-"):
        return f"aead 'rfc4106(gcm(aes))' 0x{sa.key.hex()} 128"
    if sa.encryption.startswith("aes-cbc-") and sa.integrity:
        digest = sa.integrity.split("-")[1]  # hmac-sha256-128 -> sha256
        bits = int(sa.integrity.rsplit("-", 1)[1])
        return (f"enc 'cbc(aes)' 0x{sa.key.hex()} "
                f"auth-trunc 'hmac({digest})' 0x{sa.integrity_key.hex()} {bits}")
    raise LabError(f"the kernel peer has no mapping for {sa.encryption} + {sa.integrity}")


def parse_xfrm_stats(text: str) -> dict[int, XfrmCounters]:
    """SPI -> counters, from ``ip -s xfrm state`` (its "lifetime current" and "stats" lines)."""
    out: dict[int, XfrmCounters] = {}
    for block in re.split(r"(?m)^src ", text):
        spi = re.search(r"spi 0x([0-9a-f]+)", block)
        cur = re.search(r"lifetime current:\s*\n\s*(\d+)\(bytes\), (\d+)\(packets\)", block)
        stats = re.search(r"replay-window \d+ replay (\d+) failed (\d+)", block)
        if spi and cur:
            value = int(spi.group(1), 16)
            out[value] = XfrmCounters(value, int(cur.group(2)), int(cur.group(1)),
                                      int(stats.group(1)) if stats else 0,
                                      int(stats.group(2)) if stats else 0)
    return out


class KernelPeer:
    """The guest: booted once, then driven command by command over its console."""

    def __init__(self, lab: Lab, ns: Netns, link: GuestLink, image: GuestImage | None = None,
                 memory_mb: int = 256) -> None:
        self.lab, self.ns, self.link = lab, ns, link
        self.image = image
        self.memory_mb = memory_mb
        self.tap = f"nfkt{os.getpid() % 10**8}"  # in the lab's own namespace: unique to the run
        self.proc: Started | None = None
        self.boot_seconds: float | None = None
        self._buf = ""
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._next_id = 0
        self._encap_ports: set[int] = set()
        self.transcript = lab.workdir / "kernel-peer-console.log"

    # -- boot -----------------------------------------------------------------------------
    def start(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Build (or take from the cache) the image, boot it, set the guest's address. Returns
        the boot time: QEMU started to the guest reading commands."""
        if shutil.which(QEMU) is None:
            raise LabError(f"{QEMU} is not installed (Debian package qemu-system-x86)")
        image = self.image = self.image or guestimage.build()
        self.ns.ip("tuntap", "add", "dev", self.tap, "mode", "tap")
        self.ns.ip("link", "set", self.tap, "mtu", str(self.link.mtu))
        self.ns.addr(self.tap, f"{self.link.host}/{self.link.prefixlen}")
        self.ns.up(self.tap)
        argv = self.ns.argv([
            QEMU, "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", str(self.memory_mb),
            "-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", "console=ttyS0 quiet panic=-1",
            "-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=n0,mac={GUEST_MAC}",
        ])
        t0 = time.monotonic()
        popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, start_new_session=True, text=True)
        self.proc = Started("qemu-kernel-peer", self.ns, popen, stop_signal=signal.SIGTERM)
        self.lab.processes.append(self.proc)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._wait(lambda buf: guestimage.READY_LINE + "\n" in buf, timeout, "the guest's boot")
        self.boot_seconds = time.monotonic() - t0
        with self._cond:
            self._buf = self._buf.split(guestimage.READY_LINE + "\n", 1)[1]
        addr = f"{self.link.guest}/{self.link.prefixlen}"
        self.check(f"{IP} link set eth0 mtu {self.link.mtu} && {IP} addr add {addr} dev eth0 && "
                   f"{IP} link set eth0 up")
        return self.boot_seconds

    def add_address(self, host: IPv4Address | IPv6Address, guest: IPv4Address | IPv6Address,
                    prefixlen: int) -> None:
        """Another address pair on the link (IPv6 beside the IPv4 one, say): ``host`` on the
        tap, ``guest`` on the guest's eth0; IPv6 without duplicate address detection, so both
        work at once."""
        nodad = ["nodad"] if host.version == 6 else []
        self.ns.ip("addr", "add", f"{host}/{prefixlen}", "dev", self.tap, *nodad)
        self.check(f"{IP} addr add {guest}/{prefixlen} dev eth0 {' '.join(nodad)}")

    def _read(self) -> None:
        assert self.proc is not None and self.proc.popen.stdout is not None
        out = self.proc.popen.stdout
        with self.transcript.open("ab") as log:
            while chunk := _read_some(out.fileno()):
                log.write(chunk)
                log.flush()
                with self._cond:
                    self._buf += chunk.decode(errors="replace").replace("\r", "")
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _wait(self, check: Callable[[str], bool], timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not check(self._buf):
                left = deadline - time.monotonic()
                if self.proc is not None and self.proc.popen.poll() is not None:
                    raise LabError(f"QEMU exited ({self.proc.popen.returncode}) waiting for {what}; "
                                   f"console:\n{redact(self._buf[-2000:])}")
                if left <= 0:
                    raise LabError(f"{what}: nothing after {timeout:g} s; console:\n"
                                   f"{redact(self._buf[-2000:])}")
                self._cond.wait(min(left, 0.5))
            return self._buf

    # -- commands -------------------------------------------------------------------------
    def sh(self, cmd: str, timeout: float = 60.0) -> ShellResult:
        """Run one shell command line in the guest; its exit status and output."""
        if "\n" in cmd or len(cmd) > 3500:
            raise LabError("a guest command is one line of at most 3500 characters")
        if self.proc is None or self.proc.popen.stdin is None:
            raise LabError("the kernel peer is not running")
        self._next_id += 1
        ident = self._next_id
        begin, end = f"{guestimage.BEGIN} {ident}\n", re.compile(
            rf"(?m)^{guestimage.END} {ident} (\d+)\n")
        self.proc.popen.stdin.write(f"{ident} {max(int(timeout), 1)} {cmd}\n")
        self.proc.popen.stdin.flush()
        buf = self._wait(lambda b: begin in b and end.search(b.split(begin, 1)[1]) is not None,
                         timeout + 10, f"guest command {redact(cmd)[:200]!r}")
        after = buf.split(begin, 1)[1]
        m = end.search(after)
        assert m is not None
        with self._cond:
            self._buf = after[m.end():]
        return ShellResult(int(m.group(1)), after[:m.start()])

    def check(self, cmd: str, timeout: float = 60.0) -> str:
        """``sh``, raising LabError (keys redacted) unless the command succeeds."""
        res = self.sh(cmd, timeout)
        if res.status != 0:
            raise LabError(f"guest command {redact(cmd)[:300]!r} failed (exit {res.status}): "
                           f"{redact(res.output)[-1000:]}")
        return res.output

    # -- IPsec ----------------------------------------------------------------------------
    def xfrm_setup(self, sas: Sequence[LabSA], mode: str, me: str = "b",
                   encap: UdpEncap | None = None,
                   protected: tuple[IPNetwork, IPNetwork] | None = None) -> None:
        """Replace the guest's xfrm states and policies with the mirror of ``sas``; with
        ``encap``, also hold the ESP-in-UDP socket on its destination port."""
        for cmd in xfrm_commands(sas, me, mode, encap, protected=protected):
            self.check(cmd)
        if encap is not None:
            self.hold_udp_encap(encap.dport)

    def hold_udp_encap(self, port: int) -> None:
        """A UDP socket on ``port`` marked UDP_ENCAP_ESPINUDP (what an IKE daemon opens): the
        kernel decapsulates ESP in UDP only for datagrams to such a socket. Started once, kept
        until the guest stops."""
        if port not in self._encap_ports:
            self.check(f"{guestimage.ESPINUDP} {port}")
            self._encap_ports.add(port)

    def xfrm_flush(self) -> None:
        self.check(f"{IP} xfrm policy flush && {IP} xfrm state flush")

    def xfrm_counters(self) -> dict[int, XfrmCounters]:
        """Every state's counters (the lines with keys are left in the guest)."""
        text = self.check(f"{IP} -s xfrm state | grep -v -e '^\\s*aead' -e '^\\s*enc' -e '^\\s*auth'")
        return parse_xfrm_stats(text)

    def sha256(self, path: str) -> str:
        return self.check(f"sha256sum {shlex.quote(path)}").split()[0]

    def stop(self) -> None:
        if self.proc is not None:
            self.lab.stop(self.proc, 10)


def _read_some(fd: int) -> bytes:
    """What the console printed next; b"" at its end (or once the lab closed the pipe)."""
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""


def kernel_peer_problems() -> list[str]:
    """Why the kernel peer can't run here ([] if it can): QEMU, /dev/net/tun for the tap, and
    the guest's busybox."""
    problems = []
    if shutil.which(QEMU) is None:
        problems.append(f"{QEMU} is not installed (Debian package qemu-system-x86; "
                        "scripts/install-deps installs it)")
    if not guestimage.BUSYBOX.is_file():
        problems.append(f"{guestimage.BUSYBOX} is missing (Debian package busybox-static; "
                        "scripts/install-deps installs it)")
    if not Path("/dev/net/tun").exists():
        problems.append("/dev/net/tun is missing (no tap devices for the guest)")
    return problems

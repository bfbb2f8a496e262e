"""The kernel peer's guest: Debian's own kernel with busybox and iproute2 in an initramfs.

Built from Debian packages only, so it runs wherever apt reaches a Debian 12 mirror (CI's
fresh machine too): the kernel package is downloaded with ``apt-get download`` and unpacked
here (never installed); busybox comes from ``busybox-static`` and ``ip`` from ``iproute2``,
both installed by ``scripts/install-deps``, with the shared libraries ``ldd`` lists for ``ip``.

Only the modules the peer needs go in (ESP for IPv4 and IPv6, the xfrm netlink interface,
virtio-net, and the
crypto templates that are modules in Debian's build: gcm, ctr, ghash, authenc, seqiv,
echainiv), with their dependencies from ``modinfo``, loaded in that order by ``/init``
(busybox ``insmod``: there is no ``modprobe`` and no ``modules.dep`` in the guest, so the
crypto API can't load a template on demand, and everything it may ask for is loaded first).

The result is cached under ``.cache/kernel-peer/<key>/`` of the checkout (or
``$NFQ_IPSEC_KERNEL_PEER_CACHE``), keyed by the package versions and this file's text, so a
second build costs a few ``dpkg-query`` calls. ``python -m nfq_ipsec_lab.lab.guestimage``
builds it and prints where it is.

One program of our own goes in too, ``/sbin/espinudp`` (:data:`ESPINUDP_SRC`, compiled here with
``gcc -static``, so it needs nothing in the guest): the kernel decapsulates ESP in UDP (RFC
3948) only for datagrams to a UDP socket marked ``UDP_ENCAP_ESPINUDP``, which is what an IKE
daemon opens on port 4500; ``encap espinudp`` on a state covers sending alone. The program
opens that socket and stays in the background holding it, as the IKE daemon would.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

KERNEL_META = "linux-image-amd64"  # depends on the current linux-image-<abi>-amd64
HOST_PACKAGES = ("busybox-static", "iproute2")  # installed here; copied into the guest
BUILD_PACKAGES = ("gcc", "libc6-dev")  # build the guest's helper (gcc -static)
BUSYBOX = Path("/bin/busybox")
IP = Path("/bin/ip")
# Loaded in this order, each after its own dependencies (modinfo's "depends").
MODULES = ("virtio_pci", "virtio_net", "xfrm_user", "esp4", "esp6", "ecb", "jitterentropy_rng",
           "drbg", "gf128mul", "ghash-generic", "ctr",
           "gcm", "authenc", "seqiv", "echainiv")
CACHE_ENV = "NFQ_IPSEC_KERNEL_PEER_CACHE"
ESPINUDP = "/sbin/espinudp"
READY_LINE = "NFK-GUEST-READY"  # /init prints it when it starts reading commands
BEGIN = "NFK-BEGIN"
END = "NFK-END"

INIT = f"""#!/bin/sh
# The kernel peer's /init: mount what the tools need, load the modules, then read commands
# from the console. A loop, not an interactive shell: no prompt, no line editing, no echo
# (stty -echo), so what the harness reads is exactly what its commands print, between
# "{BEGIN} <id>" and "{END} <id> <exit status>". A line is "<id> <seconds> <command>": a
# command still running after its seconds is killed (status 143), so the loop never hangs.
/bin/busybox --install -s /bin
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp /www
dmesg -n 1
for m in $(cat /modules/order); do
  insmod /modules/$m || echo "insmod $m failed"
done
ip link set lo up
stty -echo -onlcr < /dev/console
echo {READY_LINE}
while IFS= read -r line; do
  id=${{line%% *}}; rest=${{line#* }}; secs=${{rest%% *}}
  echo "{BEGIN} $id"
  timeout "$secs" sh -c "${{rest#* }}" < /dev/null 2>&1
  echo "{END} $id $?"
done < /dev/console > /dev/console 2>&1
poweroff -f
"""

# The guest's holder of the ESP-in-UDP socket: binds UDP <port> (all addresses), marks it
# UDP_ENCAP_ESPINUDP, and gives it socket policies that bypass IPsec both ways, as IKE
# daemons do for their sockets: the kernel checks the inbound policy on the UDP datagram
# before it decapsulates, and a host's policy covers the peer's UDP to port 4500 too. Then it
# forks: the parent exits 0 once the socket is ready (so the harness knows), the child keeps it
# in a new session, reading and discarding whatever the kernel hands up (the non-ESP marker's
# IKE, were there any) until it is killed.
ESPINUDP_SRC = r"""
#include <linux/xfrm.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <string.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>
#include <fcntl.h>

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 4500;
    int type = UDP_ENCAP_ESPINUDP;
    struct sockaddr_in addr = {0};
    char buf[2048];
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)port);
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0
            || setsockopt(fd, IPPROTO_UDP, UDP_ENCAP, &type, sizeof type) < 0) {
        perror("espinudp");
        return 1;
    }
    for (int dir = XFRM_POLICY_IN; dir <= XFRM_POLICY_OUT; dir++) {
        struct xfrm_userpolicy_info pol;
        memset(&pol, 0, sizeof pol);
        pol.action = XFRM_POLICY_ALLOW;
        pol.sel.family = AF_INET;
        pol.dir = dir;
        if (setsockopt(fd, IPPROTO_IP, IP_XFRM_POLICY, &pol, sizeof pol) < 0) {
            perror("espinudp: IP_XFRM_POLICY");
            return 1;
        }
    }
    pid_t pid = fork();
    if (pid < 0) {
        perror("espinudp: fork");
        return 1;
    }
    if (pid > 0) {
        printf("espinudp: port %d, pid %d\n", port, (int)pid);
        return 0;
    }
    setsid();
    int null = open("/dev/null", O_RDWR);
    if (null >= 0) {
        dup2(null, 0);
        dup2(null, 1);
        dup2(null, 2);
    }
    for (;;)
        if (recv(fd, buf, sizeof buf, 0) < 0)
            sleep(1);
}
"""


class GuestBuildError(Exception):
    """The guest image could not be built; the message says which step failed."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path  # the vmlinuz to boot
    initrd: Path  # the initramfs (cpio.gz)
    key: str  # what the cache is keyed by (package versions)
    kernel_release: str  # e.g. 6.1.0-57-amd64


def default_cache() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".cache" / "kernel-peer"


def _run(argv: Sequence[str], cwd: Path | None = None) -> str:
    res = subprocess.run(list(argv), capture_output=True, text=True, cwd=cwd,
                         env={**os.environ, "LC_ALL": "C"}, check=False)
    if res.returncode != 0:
        raise GuestBuildError(f"{' '.join(argv)} failed (exit {res.returncode}): "
                              f"{(res.stderr or res.stdout).strip()[-500:]}")
    return res.stdout


def installed_version(package: str) -> str:
    try:
        return _run(["dpkg-query", "-W", "-f", "${Version}", package]).strip()
    except GuestBuildError:
        raise GuestBuildError(f"Debian package {package!r} is not installed (scripts/install-deps "
                              "installs it)") from None


def kernel_package() -> tuple[str, str]:
    """(name, version) of the kernel package that ``linux-image-amd64`` depends on now.
    Runs ``apt-get update`` once if apt knows no such package yet (a fresh machine)."""
    for attempt in range(2):
        res = subprocess.run(["apt-cache", "show", "--no-all-versions", KERNEL_META],
                             capture_output=True, text=True, check=False,
                             env={**os.environ, "LC_ALL": "C"})
        for line in res.stdout.splitlines():
            if line.startswith("Depends:"):
                for dep in line.split(":", 1)[1].split(","):
                    name, _, rest = dep.strip().partition(" ")
                    if name.startswith("linux-image-") and "(=" in rest:
                        return name, rest.split("=", 1)[1].strip(" )")
        if attempt == 0:
            _run(["apt-get", "update", "-qq"])
    raise GuestBuildError(f"apt knows no {KERNEL_META} with a linux-image-* dependency")


def cache_key(kernel: tuple[str, str]) -> str:
    parts = [f"{kernel[0]}={kernel[1]}"]
    parts += [f"{p}={installed_version(p)}" for p in (*HOST_PACKAGES, *BUILD_PACKAGES, "libc6")]
    parts.append(hashlib.sha256(Path(__file__).read_bytes()).hexdigest())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def build(cache: Path | None = None) -> GuestImage:
    """The guest image, from the cache or built now (a minute at most, most of it the
    kernel package's download and unpacking)."""
    cache = cache or default_cache()
    kernel = kernel_package()
    key = cache_key(kernel)
    release = kernel[0].removeprefix("linux-image-")
    out = cache / key
    image = GuestImage(out / "vmlinuz", out / "initrd.gz", key, release)
    if image.kernel.is_file() and image.initrd.is_file():
        return image
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=cache) as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # apt's _apt user downloads into it
        _run(["apt-get", "download", f"{kernel[0]}={kernel[1]}"], cwd=work)
        debs = list(work.glob("linux-image-*.deb"))
        if len(debs) != 1:
            raise GuestBuildError(f"apt-get download left {len(debs)} kernel packages")
        tree = work / "tree"
        _run(["dpkg-deb", "-x", str(debs[0]), str(tree)])
        vmlinuz = tree / "boot" / f"vmlinuz-{release}"
        moddir = tree / "lib" / "modules" / release
        if not vmlinuz.is_file() or not moddir.is_dir():
            raise GuestBuildError(f"{debs[0].name} has no vmlinuz-{release} or its modules")
        initrd = initramfs(module_files(moddir, MODULES), espinudp(work))
        staged = work / "out"
        staged.mkdir()
        shutil.copyfile(vmlinuz, staged / "vmlinuz")
        (staged / "initrd.gz").write_bytes(initrd)
        try:
            staged.rename(out)  # whole or not at all: a half-built image is never in the cache
        except OSError:
            if not (image.kernel.is_file() and image.initrd.is_file()):
                raise  # not another run's build of the same key: something else is wrong
    for old in cache.iterdir():  # earlier keys: superseded
        if old.is_dir() and old.name != key and not old.name.startswith("build-"):
            shutil.rmtree(old, ignore_errors=True)
    return image


def module_files(moddir: Path, names: Sequence[str]) -> list[Path]:
    """The ``.ko`` files of ``names`` and their dependencies, each after what it needs."""
    index = {p.name.split(".ko")[0].replace("-", "_"): p for p in moddir.rglob("*.ko*")}
    order: list[Path] = []

    def add(name: str, chain: tuple[str, ...]) -> None:
        key = name.replace("-", "_")
        path = index.get(key)
        if path is None:
            raise GuestBuildError(f"kernel module {name} is not in the kernel package "
                                  f"(needed for {' <- '.join(chain) or 'the peer'})")
        if path in order:
            return
        deps = _run(["modinfo", "-F", "depends", str(path)]).strip()
        for dep in filter(None, deps.split(",")):
            add(dep, (*chain, name))
        order.append(path)

    for n in names:
        add(n, ())
    return order


def espinudp(work: Path) -> bytes:
    """The guest's ESP-in-UDP socket holder, compiled from :data:`ESPINUDP_SRC`: static, so
    the guest needs no C library for it."""
    if shutil.which("gcc") is None:
        raise GuestBuildError("gcc is not installed (scripts/install-deps installs gcc and "
                              "libc6-dev; the guest's ESP-in-UDP helper is built with them)")
    src, out = work / "espinudp.c", work / "espinudp"
    src.write_text(ESPINUDP_SRC)
    try:
        _run(["gcc", "-static", "-Os", "-Wall", "-Werror", "-o", str(out), str(src)])
    except GuestBuildError as err:
        raise GuestBuildError(f"building the guest's ESP-in-UDP helper failed (static linking "
                              f"needs libc6-dev): {err}") from None
    return out.read_bytes()


def _ldd(binary: Path) -> list[Path]:
    libs = []
    for line in _run(["ldd", str(binary)]).splitlines():
        words = line.split()
        if "=>" in words and len(words) > words.index("=>") + 1:
            target = words[words.index("=>") + 1]
            if target.startswith("/"):
                libs.append(Path(target))
        elif words and words[0].startswith("/"):
            libs.append(Path(words[0]))  # the dynamic loader
    return libs


def initramfs(modules: Sequence[Path], helper: bytes) -> bytes:
    """The gzipped newc cpio archive: /init, busybox, ip and its libraries, the modules, and
    ``helper`` as :data:`ESPINUDP`."""
    for p in (BUSYBOX, IP):
        if not p.is_file():
            raise GuestBuildError(f"{p} is missing (scripts/install-deps installs "
                                  f"{', '.join(HOST_PACKAGES)})")
    cpio = Cpio()
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "etc", "lib", "lib64", "modules",
              "usr", "usr/lib", "www"):
        cpio.directory(d)
    cpio.file("init", INIT.encode(), 0o755)
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("sbin/ip", IP.read_bytes(), 0o755)  # before busybox's ip in PATH
    cpio.file(ESPINUDP.lstrip("/"), helper, 0o755)
    seen: set[str] = set()
    for lib in _ldd(IP):
        dest = str(lib).lstrip("/")
        parent = str(Path(dest).parent)
        if parent not in seen:
            cpio.directories(parent)
            seen.add(parent)
        cpio.file(dest, lib.resolve().read_bytes(), 0o755)
    names = []
    for i, m in enumerate(modules):
        name = f"{i:02d}-{m.name}"
        cpio.file(f"modules/{name}", m.read_bytes(), 0o644)
        names.append(name)
    cpio.file("modules/order", ("\n".join(names) + "\n").encode(), 0o644)
    cpio.file("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n", 0o644)
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)


class Cpio:
    """A newc ("070701") cpio archive, the format the kernel unpacks as an initramfs."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes) -> None:
        fields = [self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._buf.write(header + name.encode() + b"\0")
        self._pad()
        self._buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))

    def directory(self, name: str) -> None:
        if name not in self._dirs:
            self._dirs.add(name)
            self._entry(name, stat.S_IFDIR | 0o755, b"")

    def directories(self, path: str) -> None:
        parts = Path(path).parts
        for i in range(1, len(parts) + 1):
            self.directory("/".join(parts[:i]))

    def file(self, name: str, data: bytes, mode: int) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"")
        return self._buf.getvalue()


def main() -> int:
    try:
        image = build()
    except GuestBuildError as err:
        print(f"guestimage: {err}", file=sys.stderr)
        return 1
    print(f"kernel {image.kernel} ({image.kernel_release})\ninitrd {image.initrd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

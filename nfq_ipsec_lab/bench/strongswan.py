"""The reference row: two strongSwan 5.9 daemons with kernel-libipsec, another userspace ESP.

Only when Debian's packages are installed (they are not a dependency of nfq-ipsec)::

    apt-get install strongswan-charon libcharon-extra-plugins libstrongswan-standard-plugins \
        strongswan-swanctl

kernel-libipsec (in libcharon-extra-plugins) does ESP inside charon, in C, and hands packets to
and from the kernel through a TUN device (``ipsec0``) with routes in table 220: tunnel mode only,
and in Debian 12's 5.9.8 ESP in UDP 4500 only (``encap = yes``), so its packets are 28 bytes
(outer IP + UDP) bigger than ours in transport mode. Both peers authenticate with a random
pre-shared key (IKEv2) and negotiate AES-GCM-128 for IKE and ESP.

How two charons share one machine, each in its own lab namespace (checked here):

- charon's pid file is always ``/var/run/charon.pid``: each runs in a private mount namespace
  (``unshare --mount``) with a directory of the lab's bind-mounted over ``/run``;
- each reads its own ``strongswan.conf`` (``STRONGSWAN_CONF``) with its own vici socket in the lab
  directory, which ``swanctl --uri`` uses from here;
- host to host, the traffic selectors contain the peers themselves, which libipsec refuses
  ("conflicts with IKE traffic") unless ``kernel-libipsec.allow_peer_ts = yes`` and IKE/ESP
  packets are kept out of table 220 by a firewall mark (``socket-default.fwmark = 0x42``,
  ``kernel-netlink.fwmark = !0x42``);
- that route of the peer's address into the TUN device also makes strict reverse-path
  filtering on the wire interface drop every ESP-in-UDP packet from the peer (IKE got through
  only because it came before the route): the strongSwan namespaces use loose mode
  (``rp_filter = 2``), where the lab's hosts use strict mode.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path

from ..lab.netns import Host, Lab, LabError, Started, run

PACKAGES = ("strongswan-charon", "libcharon-extra-plugins", "libstrongswan-standard-plugins",
            "strongswan-swanctl")
APT_COMMAND = "apt-get install " + " ".join(PACKAGES)
CHARON = "/usr/lib/ipsec/charon"
LIBIPSEC_PLUGIN = "/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so"
OPENSSL_PLUGIN = "/usr/lib/ipsec/plugins/libstrongswan-openssl.so"  # AES-GCM, X25519, ECP
FWMARK = 0x42
PLUGINS = ("random nonce openssl kdf hmac sha2 aes gcm kernel-libipsec kernel-netlink "
           "socket-default vici")
IKE_PROPOSAL = "aes128gcm16-prfsha256-x25519"
ESP_PROPOSAL = "aes128gcm16"
START_TIMEOUT = 15.0
DESCRIPTION = ("strongSwan kernel-libipsec: tunnel mode over a TUN device, ESP in UDP 4500 (Debian 12's "
               "libipsec sends no plain ESP), IKEv2 PSK, AES-GCM-128")


def missing() -> str | None:
    """Why the strongSwan row can't run here (None: it can)."""
    need = [(CHARON, "strongswan-charon"), (LIBIPSEC_PLUGIN, "libcharon-extra-plugins"),
            (OPENSSL_PLUGIN, "libstrongswan-standard-plugins")]
    absent = [pkg for path, pkg in need if not os.path.exists(path)]
    if shutil.which("swanctl") is None:
        absent.append("strongswan-swanctl")
    if absent:
        return f"not installed ({APT_COMMAND})"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun (kernel-libipsec needs a TUN device)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    return None


def _strongswan_conf(d: Path) -> str:
    return f"""\
# nfq-ipsec bench: one of two charons, each in its own lab namespace
charon {{
  load = {PLUGINS}
  filelog {{
    log {{
      path = {d / "charon.log"}
      default = 1
    }}
  }}
  plugins {{
    vici {{
      socket = unix://{d / "charon.vici"}
    }}
    socket-default {{
      fwmark = 0x{FWMARK:x}
    }}
    kernel-netlink {{
      fwmark = !0x{FWMARK:x}
    }}
    kernel-libipsec {{
      allow_peer_ts = yes
    }}
  }}
}}
"""


def _swanctl_conf(me: str, peer: str, psk: str) -> str:
    return f"""\
connections {{
  bench {{
    version = 2
    local_addrs = {me}
    remote_addrs = {peer}
    encap = yes
    proposals = {IKE_PROPOSAL}
    local {{
      auth = psk
      id = {me}
    }}
    remote {{
      auth = psk
      id = {peer}
    }}
    children {{
      bench {{
        local_ts = {me}/32
        remote_ts = {peer}/32
        esp_proposals = {ESP_PROPOSAL}
        mode = tunnel
      }}
    }}
  }}
}}
secrets {{
  ike-bench {{
    secret = "{psk}"
  }}
}}
"""


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


class Charon:
    """One charon in one lab namespace, with its files in ``lab.workdir/strongswan/<name>``."""

    def __init__(self, lab: Lab, name: str, ns: Host, me: str, peer: str, psk: str,
                 strongswan_conf: str | None = None, swanctl_conf: str | None = None) -> None:
        """The bench's configuration unless ``strongswan_conf``/``swanctl_conf`` are given
        (``{dir}`` in them is this charon's directory)."""
        self.lab, self.name, self.ns = lab, name, ns
        self.dir = lab.workdir / "strongswan" / name
        (self.dir / "run").mkdir(mode=0o700, parents=True, exist_ok=True)
        self.conf = self.dir / "strongswan.conf"
        self.swanctl_conf = self.dir / "swanctl.conf"
        _write_private(self.conf, strongswan_conf.replace("{dir}", str(self.dir))
                       if strongswan_conf else _strongswan_conf(self.dir))
        _write_private(self.swanctl_conf, swanctl_conf or _swanctl_conf(me, peer, psk))
        self.proc: Started | None = None

    @property
    def uri(self) -> str:
        return f"unix://{self.dir / 'charon.vici'}"

    def start(self) -> Started:
        # env, unshare, sh and charon each exec the next: the pid we get is charon's.
        self.proc = self.lab.start(f"charon-{self.name}", self.ns, [
            "env", f"STRONGSWAN_CONF={self.conf}",
            "unshare", "--mount", "--propagation", "private",
            "sh", "-c", 'mount --bind "$1" /run && exec "$2"', "sh",
            str(self.dir / "run"), CHARON,
        ])
        return self.proc

    def wait_vici(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        sock = self.dir / "charon.vici"
        while not sock.exists():
            if self.proc is not None and self.proc.popen.poll() is not None:
                raise LabError(f"charon in {self.ns.name} exited ({self.proc.popen.returncode}): "
                               f"{self.log()[-800:]}")
            if time.monotonic() > deadline:
                raise LabError(f"charon in {self.ns.name}: no vici socket after {timeout:g} s: "
                               f"{self.log()[-800:]}")
            time.sleep(0.05)

    def swanctl(self, *args: str, timeout: float = 30.0) -> str:
        res = run(["swanctl", *args, "--uri", self.uri], timeout=timeout, check=False)
        if res.returncode != 0:
            lines = [line for line in (res.stdout + res.stderr).splitlines()
                     if not line.startswith(("plugin '", "opening directory"))]
            raise LabError(f"swanctl {' '.join(args)} ({self.name}) failed (exit {res.returncode}): "
                           + "\n".join(lines[-15:]) + f"\ncharon log:\n{self.log()[-800:]}")
        return res.stdout

    def log(self) -> str:
        path = self.dir / "charon.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return text + (self.proc.output() if self.proc else "")


def start_pair(lab: Lab, a: Host, a_addr: str, b: Host, b_addr: str) -> list[Started]:
    """Two charons, connections loaded, the CHILD_SA established from a. Their processes."""
    psk = secrets.token_hex(24)
    charons = [Charon(lab, "a", a, a_addr, b_addr, psk), Charon(lab, "b", b, b_addr, a_addr, psk)]
    procs = [c.start() for c in charons]
    for c in charons:
        c.wait_vici()
        c.swanctl("--load-all", "--file", str(c.swanctl_conf))
    out = charons[0].swanctl("--initiate", "--child", "bench", "--timeout", "20", timeout=40)
    if "established" not in out:
        raise LabError(f"strongSwan CHILD_SA not established:\n{out[-1500:]}")
    return procs


def version() -> str:
    res = run([CHARON, "--version"], check=False, timeout=10)
    return (res.stdout or res.stderr).strip().splitlines()[0] if (res.stdout or res.stderr).strip() else ""

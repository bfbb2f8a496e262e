"""What the kernel says about a network interface: its MTU.

One ``SIOCGIFMTU`` ioctl on a datagram socket, in the network namespace the process runs in
(``/sys/class/net`` shows the namespace that mounted it, which ``ip netns exec`` changes only
by remounting). Not pyroute2: the README's "pyroute2" paragraph has the measured reason (an
MTU read took 974 µs through it, 15 µs from sysfs, and this ioctl needs no dependency).
"""

from __future__ import annotations

import fcntl
import socket
import struct

SIOCGIFMTU = 0x8921  # <linux/sockios.h>
IFNAMSIZ = 16


def mtu(name: str) -> int | None:
    """The MTU of interface ``name``; None if there is no such interface here."""
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b"\0" in raw:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            answer = fcntl.ioctl(s.fileno(), SIOCGIFMTU, struct.pack("16si12x", raw, 0))
        except OSError:
            return None
    return int(struct.unpack_from("16si", answer)[1])

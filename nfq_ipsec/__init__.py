"""nfq-ipsec: a userspace IPsec (ESP) data plane for Linux, fed by iptables NFQUEUE."""

from . import corebuild

__version__ = "0.1.0"

corebuild.choose()  # before any core module loads: compiled, or the source if that is stale

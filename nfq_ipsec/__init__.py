"""nfq-ipsec: a userspace IPsec (ESP) data plane for Linux, fed by iptables NFQUEUE."""

__version__ = "0.1.0"

"""The lab: IPsec peers built from network namespaces, running the real daemon.

Modules, each usable on its own (a two-VM lab reuses labconfig, daemon, traffic and checks):

- ``netns``: hosts (namespaces, veth pairs, addresses, routes, sysctls) and the processes the
  lab starts, all removed on every exit path;
- ``topology``: host-to-host (transport mode) and gateway-to-gateway (tunnel mode), over IPv4,
  IPv6 or mixed (4-in-6, 6-in-4), with the kernel settings each node needs and why;
- ``labconfig``: both peers' TOML configurations and fresh random key files (mode 0600);
- ``daemon``: ``nfq-ipsec run`` / ``status --json`` / SIGTERM, and the iptables snapshot;
- ``traffic``: ping, iperf3, a file transfer with SHA-256, UDP probes, the wire capture, the
  cleartext check and tshark's ICV check;
- ``checks``: the whole traffic-and-capture check of a running pair, in one call;
- ``session``: all of the above as one context manager; ``demo``: the README demo;
- ``vagrant``: hosts behind a remote shell (the VMs); ``vm``: the two-VM lab's per-VM setup
  and the workstation's whole VM check (``vagrant/run-check``).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``nfq-ipsec lab``'s subcommands (the command line lives in :mod:`nfq_ipsec_lab.cli`)."""
    parser.description = ("The network-namespace lab: IPsec peers in namespaces, running the "
                          "real daemon. Needs root.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser(
        "demo", help="the two-host lab demo, torn down after",
        description="Hosts up, daemons up, traffic through ESP, a capture that shows only ESP, "
        "counters, everything torn down. Needs root.")
    p.add_argument("--topology", choices=["host", "gateway", "host6", "gateway6"], default="host",
                   help="host: two hosts, transport mode; gateway: four namespaces, tunnel mode; "
                   "host6: two hosts over IPv6, transport mode; gateway6: four namespaces, "
                   "tunnel mode over IPv6")
    p.add_argument("--encryption", default="aes-gcm-128",
                   help="aes-gcm-128, aes-gcm-256, chacha20-poly1305, aes-cbc-128, aes-cbc-256")
    p.add_argument("--queues", type=int, default=2, help="queues (workers) per host")
    p.add_argument("--keep", action="store_true", help="leave the lab up (prints how to remove it)")


def cli_lab(args: argparse.Namespace) -> int:
    """``nfq-ipsec lab demo [--topology host|gateway|host6|gateway6] [--encryption ALG]
    [--queues N] [--keep]``."""
    from .demo import EXIT_USAGE, run_demo
    from .labconfig import parse_encryption

    if args.action != "demo":  # pragma: no cover - argparse enforces the choices
        raise AssertionError(args.action)
    try:
        parse_encryption(args.encryption)
    except ValueError as err:
        print(f"nfq-ipsec lab: {err}")
        return EXIT_USAGE
    if not 1 <= args.queues <= 16:
        print("nfq-ipsec lab: --queues must be 1..16")
        return EXIT_USAGE
    return run_demo(args.topology, args.encryption, args.queues, args.keep)

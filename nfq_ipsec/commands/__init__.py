"""The commands of ``nfq-ipsec``: the one layer that parses arguments, prints and chooses exit
codes (:mod:`nfq_ipsec.exitcodes`, also in the README). One module per command or family
(``daemon``: run, stop, reload; ``status``; ``top``; ``rules``; ``state``; ``ike``: initiate,
terminate; ``engines``: engines, engine disable|enable; ``offline``: check-config, decode,
genkey; ``peer``: peer-config); each adds its parser and runs it by calling the domain
modules, which import nothing from here. Every command that takes a configuration takes it as
``-c/--config``.

``lab`` and ``bench`` come with the optional extra ``lab``: the package ``nfq_ipsec_lab``
beside this one registers them in the entry-point group :data:`EXTRA_GROUP`. This package
never imports it (a test checks that): it looks the command up by name and hands it the rest
of the command line. Without the extra, both say what to install and exit 1, like any other
missing tool.

Every command that reads key material turns core dumps off first (``HOLDS_KEYS``): a
configuration names its keys (inline or in key files, read by the loader whatever the command
does with them), ``genkey`` makes one, and ``state`` derives the state files' MAC keys from the
SAs' keys. A core dump would write them to disk. If the kernel refuses, the command exits 1
before it reads any.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence

from .. import __version__, corebuild, exitcodes, hardening
from . import daemon, engines, ike, offline, peer, rules, state, status, top

# the commands that read key material (see above); lab and bench make throwaway keys of their own
HOLDS_KEYS = frozenset({"check-config", "decode", "genkey", "run", "status", "rules", "stop",
                        "reload", "state", "ike", "top", "peer-config", "engines", "engine"})
# The commands of the optional extra "lab" (nfq_ipsec_lab): name -> help.
EXTRA_COMMANDS = {
    "lab": "the network-namespace lab: lab demo (needs root; the lab extra)",
    "bench": "benchmark: plain veth, NFQUEUE accept-only, ESP rows, strongSwan; table, JSON, PNG "
             "(needs root; the lab extra)",
}
EXTRA = "lab"
EXTRA_GROUP = "nfq_ipsec.commands"
DISTRIBUTION = "nfq-ipsec"
INSTALL_EXTRA = ("pip install 'nfq-ipsec[lab]' (in a checkout: scripts/install-deps, or "
                 "pip install -e '.[lab]')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nfq-ipsec",
        description="Userspace IPsec (ESP) data plane fed by iptables NFQUEUE.",
    )
    parser.add_argument("--version", action="version",
                        version=f"nfq-ipsec {__version__}; ESP core: {corebuild.running()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check-config", help="validate a configuration and summarise it (no keys)",
                       description="Validate a configuration and summarise it (no keys).")
    p.add_argument("-c", "--config", dest="config_option", help="TOML configuration file")
    p.add_argument("config", nargs="?", help="the same, as a positional argument")

    p = sub.add_parser("decode", help="decrypt captured ESP offline with the configured SAs",
                       description="Decrypt captured ESP offline with the configured SAs and "
                       "say what the daemon would do with every packet.")
    p.add_argument("-c", "--config", required=True, help="TOML configuration file")
    p.add_argument("capture", help="pcap file (Ethernet, raw IPv4 or Linux cooked)")

    p = sub.add_parser("genkey", help="print a fresh random key (hex) for an algorithm",
                       description="Print a fresh random key (hex) for an algorithm, or write it "
                       "to a new file that is mode 0600 from its creation (--out).")
    p.add_argument("algorithm", help="aes-gcm-128, aes-gcm-256, chacha20-poly1305, aes-cbc-128, "
                   "aes-cbc-256, hmac-sha256-128, hmac-sha384-192, hmac-sha512-256")
    p.add_argument("-o", "--out", metavar="FILE",
                   help="write the key to FILE, created 0600 (never an existing file)")

    daemon.add_parsers(sub)
    status.add_parser(sub)
    top.add_parser(sub)
    peer.add_parser(sub)
    rules.add_parser(sub)
    state.add_parser(sub)
    ike.add_parser(sub)
    engines.add_parsers(sub)

    # lab, bench: listed here, parsed and run by the lab extra (main hands them over first)
    for name, text in EXTRA_COMMANDS.items():
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("arguments", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given and given[0] in EXTRA_COMMANDS:
        return extra_command(given[0], given[1:])
    args = build_parser().parse_args(given)
    if args.command in HOLDS_KEYS:
        try:
            hardening.disable_core_dumps()
        except OSError as err:
            print(f"nfq-ipsec: cannot turn core dumps off, so no key is read: {err}",
                  file=sys.stderr)
            return exitcodes.FAILURE
    if args.command == "check-config":
        args.config = args.config_option or args.config
        if not args.config or (args.config_option and args.config != args.config_option):
            print("nfq-ipsec check-config: give the configuration once, as -c/--config FILE "
                  "(or as a positional argument)", file=sys.stderr)
            return exitcodes.CONFIG
    return COMMANDS[args.command](args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "check-config": offline.main, "decode": offline.main, "genkey": offline.main,
    "run": daemon.run, "stop": daemon.stop, "reload": daemon.reload,
    "status": status.run, "top": top.run, "peer-config": peer.run, "rules": rules.run,
    "state": state.run, "ike": ike.run,
    "engines": engines.run_engines, "engine": engines.run_engine,
}


def extra_command(name: str, argv: Sequence[str]) -> int:
    """``nfq-ipsec lab ...`` / ``nfq-ipsec bench ...``: the lab extra's command, given the rest
    of the command line; without the extra, what to install (exit 1)."""
    from importlib import metadata

    missing = missing_extra_requirements()
    command: Callable[[list[str]], int] | None = None
    if missing:
        why = f"missing {', '.join(missing)}"
    else:
        found = [ep for ep in metadata.entry_points(group=EXTRA_GROUP) if ep.name == name]
        why = f"no {name!r} command in the entry points {EXTRA_GROUP}"
        if found:
            try:
                command = found[0].load()
            except ImportError as err:
                why = str(err)
    if command is None:
        print(f"nfq-ipsec {name}: needs the optional extra {EXTRA!r}, which is not installed "
              f"({why}); install it: {INSTALL_EXTRA}", file=sys.stderr)
        return exitcodes.FAILURE
    return int(command(list(argv)))


def missing_extra_requirements(extra: str = EXTRA) -> list[str]:
    """The distributions the extra requires that are not installed (names, as declared)."""
    from importlib import metadata

    try:
        requires = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return []  # not installed as a distribution: the entry point lookup says so
    missing = []
    for req in requires:
        name, _, marker = req.partition(";")
        if not re.search(rf"""extra\s*==\s*["']{re.escape(extra)}["']""", marker):
            continue
        dist = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", name.strip())
        if dist is None:
            continue
        try:
            metadata.distribution(dist.group(0))
        except metadata.PackageNotFoundError:
            missing.append(dist.group(0))
    return missing

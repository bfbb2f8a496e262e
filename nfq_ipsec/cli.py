"""The ``nfq-ipsec`` command. Thin: parses arguments and calls the module that does the work.

Exit codes (also in the README):
  0  success
  1  runtime failure (a command we ran failed, the daemon stopped on an error, a reload the
     daemon refused, a stop that did not finish in time)
  2  usage error or invalid configuration (nothing was changed)
  3  the daemon is not running / not reachable (status, stop, reload)
  4  an offline decode found packets that failed (decode)
  5  run: an SA's saved state is unusable (corrupt state file, state_dir not private); nothing
     was started (see ``nfq-ipsec state``)
 75  bench: another benchmark is running; nothing was measured

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

from . import __version__, corebuild, hardening

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_NOT_RUNNING = 3
EXIT_DECODE_DROPS = 4
EXIT_STATE = 5

# the commands that read key material (see above); lab and bench make throwaway keys of their own
HOLDS_KEYS = frozenset({"check-config", "decode", "genkey", "run", "status", "rules", "stop",
                        "reload", "state"})
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

    p = sub.add_parser("check-config", help="validate a configuration and summarise it (no keys)")
    p.add_argument("config", help="TOML configuration file")

    p = sub.add_parser("decode", help="decrypt captured ESP offline with the configured SAs")
    p.add_argument("--config", required=True, help="TOML configuration file")
    p.add_argument("capture", help="pcap file (Ethernet, raw IPv4 or Linux cooked)")

    p = sub.add_parser("genkey", help="print a fresh random key (hex) for an algorithm")
    p.add_argument("algorithm", help="aes-gcm-128, aes-gcm-256, chacha20-poly1305, aes-cbc-128, "
                   "aes-cbc-256, hmac-sha256-128, hmac-sha384-192, hmac-sha512-256")

    p = sub.add_parser("run", help="run the daemon: workers, rules, control socket")
    p.add_argument("--config", required=True, help="TOML configuration file")

    p = sub.add_parser("status", help="show the running daemon's workers, SAs and counters")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", help="configuration of the daemon to ask")
    g.add_argument("--socket", help="control socket of the daemon to ask")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser(
        "rules", help="show, install or remove the iptables rules for a config",
        description="show: print the rules and say whether they are installed. install: put them "
        "in place (replacing any earlier copy in one transaction). remove: take every rule of "
        "ours out, so traffic is no longer checked against the policies at all. --closed: the "
        "rules a stopped daemon leaves (every rule that would queue to a worker drops instead); "
        "the boot guard installs these.",
    )
    p.add_argument("action", choices=["show", "install", "remove"])
    p.add_argument("--config", required=True, help="TOML configuration file")
    p.add_argument("--closed", action="store_true",
                   help="show/install: the closed rules (protected traffic dropped, no queues)")
    p.add_argument("--ipv6", action="store_true", help="show: the ip6tables rules")

    p = sub.add_parser(
        "reload", help="apply a changed configuration to the running daemon, without a restart",
        description="Ask the daemon to re-read its configuration file (as SIGHUP and systemctl "
        "reload do) and wait for the result. New and changed SAs, keys and policies are applied "
        "without stopping established flows: the workers build their new state first, then the "
        "rules move over in one transaction. A configuration that fails validation, or changes "
        "what only a restart can (control_socket, state_dir, chain_prefix, mark, iptables, "
        "log_level, a queue's CPU, an SA's settings under the same key), changes nothing.",
    )
    p.add_argument("--config", required=True, help="the configuration the daemon runs")
    p.add_argument("--timeout", type=float, default=90.0,
                   help="seconds to wait for the result (default 90)")

    p = sub.add_parser(
        "stop", help="stop the running daemon (its rules stay, closed)",
        description="Ask the daemon to stop (SIGTERM) and wait until it has. It leaves its rules "
        "in place, closed: protected traffic is dropped until it runs again, never sent in clear. "
        "--remove-rules then removes them, after which traffic is no longer checked at all.",
    )
    p.add_argument("--config", required=True, help="TOML configuration file")
    p.add_argument("--remove-rules", action="store_true",
                   help="after the daemon has stopped, remove its iptables rules as well")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for the daemon to exit (default 30)")

    p = sub.add_parser(
        "state", help="show or reset the SAs' saved state (sequence numbers, replay)",
        description="show: each SA's state file and what it holds. reset --sa NAME --seq N: set it "
        "(the daemon must be stopped). Outbound, N is the next sequence number to send: it must be "
        "above every number the SA ever sent under its key, or IVs repeat; a new key needs no "
        "reset. Inbound, numbers up to N count as already received.",
    )
    p.add_argument("action", choices=["show", "reset"])
    p.add_argument("--config", required=True, help="TOML configuration file")
    p.add_argument("--sa", help="reset: the SA's name")
    p.add_argument("--seq", type=lambda t: int(t, 0), help="reset: outbound, the next sequence "
                   "number to send; inbound, the highest number treated as already received")
    p.add_argument("--json", action="store_true", help="show: machine-readable output")

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
            return EXIT_FAILURE
    if args.command in ("check-config", "decode", "genkey"):
        from . import tools

        return tools.main(args)
    if args.command == "run":
        from . import supervisor

        return supervisor.cli_run(args)
    if args.command == "status":
        from . import control

        return control.cli_status(args)
    if args.command == "rules":
        from . import iptables

        return iptables.cli_rules(args)
    if args.command == "stop":
        from . import supervisor

        return supervisor.cli_stop(args)
    if args.command == "reload":
        from . import supervisor

        return supervisor.cli_reload(args)
    if args.command == "state":
        from . import state

        return state.cli_state(args)
    raise AssertionError(args.command)  # pragma: no cover - argparse enforces the choices


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
        return EXIT_FAILURE
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


if __name__ == "__main__":
    sys.exit(main())

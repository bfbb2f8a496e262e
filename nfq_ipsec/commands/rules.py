"""``nfq-ipsec rules show|install|remove``: the iptables rules of a configuration
(``nfq_ipsec.rules`` builds them, ``nfq_ipsec.iptables`` applies them)."""

from __future__ import annotations

import argparse
import sys

from .. import control, exitcodes, iptables, rules
from ..config.model import Config
from .common import load_or_report


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "rules", help="show, install or remove the iptables rules for a config",
        description="The iptables rules of a configuration: show them, install them, remove "
        "them.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = actions.add_parser("show", help="print the rules and say whether they are installed",
                           description="Print the rules (stdout) and say whether they are "
                           "installed (stderr).")
    s.add_argument("-c", "--config", required=True, help="TOML configuration file")
    s.add_argument("--closed", action="store_true",
                   help="the closed rules (protected traffic dropped, no queues)")
    s.add_argument("--ipv6", action="store_true", help="the ip6tables rules")
    i = actions.add_parser(
        "install", help="put the rules in place (root)",
        description="Put the rules in place, replacing any earlier copy in one transaction. "
        "--closed: the rules a stopped daemon leaves (every rule that would queue to a worker "
        "drops instead); the boot guard installs these.",
    )
    i.add_argument("-c", "--config", required=True, help="TOML configuration file")
    i.add_argument("--closed", action="store_true",
                   help="the closed rules (protected traffic dropped, no queues)")
    r = actions.add_parser(
        "remove", help="take every rule of ours out (root)",
        description="Take every rule of ours out, IPv4 and IPv6: traffic is then no longer "
        "checked against the policies at all.",
    )
    r.add_argument("-c", "--config", required=True, help="TOML configuration file")


def run(args: argparse.Namespace) -> int:
    """show: print the rules (stdout) and whether they are installed (stderr).
    install / remove: change the ruleset. Exit 0, 1 (a command failed) or 2 (bad config)."""
    cfg = load_or_report(args.config)
    if cfg is None:
        return exitcodes.CONFIG
    be = iptables.backend_for(cfg)
    closed = bool(getattr(args, "closed", False))
    try:
        if args.action == "show" and getattr(args, "ipv6", False):
            v6 = rules.build6(cfg)
            if v6 is None:
                print("nfq-ipsec: no ip6tables rules: node.default = bypass lets IPv6 pass",
                      file=sys.stderr)
                return exitcodes.OK
            sys.stdout.write(rules.render_ruleset(v6))
            return exitcodes.OK
        if args.action == "show":
            v4 = rules.build(cfg)
            sys.stdout.write(rules.render_ruleset(rules.close(v4) if closed else v4))
            v6 = rules.build6(cfg)
            print("nfq-ipsec: IPv6: " + (
                "passes (node.default = bypass; no policy applies to IPv6)" if v6 is None else
                f"dropped on the unprotected side by {sum(len(t.rules) for t in v6.tables)} "
                "ip6tables rules (`rules show --ipv6`)"), file=sys.stderr)
            try:
                state = iptables.status(cfg).describe()
            except iptables.RulesError as err:
                why = f"{err.message}: {err.stderr.strip()}" if err.stderr.strip() else err.message
                state = f"unknown ({why})"
            print(f"nfq-ipsec: rules {state} [{be.save}]", file=sys.stderr)
            return exitcodes.OK
        if args.action == "install":
            if closed and _daemon_answers(cfg):
                print(f"nfq-ipsec: a daemon answers on {cfg.daemon.control_socket}: its live rules "
                      "are left in place")
                return exitcodes.OK
            clashes = iptables.preflight(cfg)
            if clashes:
                for line in clashes:
                    print(f"nfq-ipsec: {line}", file=sys.stderr)
                print("nfq-ipsec: nothing installed; choose other daemon.queues or remove those "
                      "rules", file=sys.stderr)
                return exitcodes.CONFIG
            iptables.install(cfg, closed=closed)
            for rs in iptables.rulesets(cfg):
                chains = ", ".join(f"{t}:{c}" for t, c in rs.chains)
                what = "closed rules" if closed and rs.family == 4 else "rules"
                print(f"nfq-ipsec: {what} installed with {iptables.backend_for(cfg, rs.family).restore}: "
                      f"{chains}")
            return exitcodes.OK
        removed = iptables.remove(cfg)
        print(f"nfq-ipsec: {'rules removed' if removed else 'no rules to remove'} "
              f"({cfg.daemon.chain_prefix}-*, {be.restore})")
        return exitcodes.OK
    except iptables.RulesError as err:
        print(f"nfq-ipsec: {err}", file=sys.stderr)
        if err.family is not None:
            done = "removed" if args.action == "remove" else "closed" if closed else "installed"
            print(f"nfq-ipsec: {iptables.outcome(err, done)}", file=sys.stderr)
        return exitcodes.FAILURE


def _daemon_answers(cfg: Config) -> bool:
    """Whether a daemon answers on this configuration's control socket (it owns the rules)."""
    try:
        control.request(cfg.daemon.control_socket, {"command": "status"}, timeout=5.0)
    except control.NotRunning:
        return False
    return True

"""Install, remove and inspect the rules of ``rules.py`` with iptables-save and iptables-restore.

Backends (``daemon.iptables``): "auto" runs ``iptables-restore``/``iptables-save`` (whatever the
system's iptables is), "nft" the ``iptables-nft-*`` and "legacy" the ``iptables-legacy-*``
commands. Changes go through ``iptables-restore --noflush --wait``, one transaction per table:

- install reads the current ruleset, and in the same transaction that adds our chains and
  jumps it flushes and deletes whatever an earlier run left (after a crash, a duplicate jump,
  a chain an older configuration needed), so there is never a second jump and never a moment
  without the boundary;
- remove flushes and deletes our chains and the jumps into them and touches nothing else, so
  iptables-save shows what it showed before install (a table that install had to create stays,
  empty: iptables can't delete tables).

Every function takes ``netns``: the name of a network namespace to run the commands in
(through ``ip netns exec``); the daemon runs inside its namespace and leaves it None.
Failures raise RulesError with the command, its exit status and its stderr.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from . import rules
from .config.model import Config

TIMEOUT = 60.0  # seconds for one iptables command (restore waits for the xtables lock)
WAIT = 30  # seconds iptables-restore waits for the xtables lock
COUNTERS_TIMEOUT = 5.0  # seconds for reading rule counters (status must not stall the daemon)
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_PROTO_NUMBERS = {"icmp": 1, "tcp": 6, "udp": 17, "gre": 47, "esp": 50, "ah": 51, "ipv6-icmp": 58,
                  "icmpv6": 58, "sctp": 132}


class RulesError(Exception):
    """Installing, removing or reading the rules failed. Carries the command and its stderr,
    and, from ``install`` and ``remove``, which address family's step failed (``family``: 4 for
    iptables, 6 for ip6tables), whether it failed while changing the rules rather than reading
    them (``changing``) and which families' changes were already made (``applied``)."""

    def __init__(
        self, message: str, argv: Sequence[str] = (), stderr: str = "",
        returncode: int | None = None, detail: str = "",
    ) -> None:
        self.message = message
        self.argv = tuple(argv)
        self.stderr = stderr
        self.returncode = returncode
        self.family: int | None = None
        self.applied: tuple[int, ...] = ()
        self.changing = False
        text = message
        if self.argv:
            text += f"\n  command: {shlex.join(self.argv)}"
        if returncode is not None:
            text += f"\n  exit status: {returncode}"
        if stderr.strip():
            text += "\n  stderr: " + "\n          ".join(stderr.strip().splitlines())
        if detail:
            text += f"\n  {detail}"
        super().__init__(text)


@dataclass(frozen=True)
class Backend:
    name: str  # "auto", "nft" or "legacy"
    restore: str  # command names, looked up in PATH and the sbin directories
    save: str

    def v6(self) -> Backend:
        """The same backend's ip6tables commands."""
        return Backend(self.name, "ip6" + self.restore[2:], "ip6" + self.save[2:])


BACKENDS = {
    "auto": Backend("auto", "iptables-restore", "iptables-save"),
    "nft": Backend("nft", "iptables-nft-restore", "iptables-nft-save"),
    "legacy": Backend("legacy", "iptables-legacy-restore", "iptables-legacy-save"),
}


def backend_for(cfg: Config, family: int = 4) -> Backend:
    be = BACKENDS[cfg.daemon.iptables]
    return be.v6() if family == 6 else be


def ipv6_enabled() -> bool:
    """Whether this kernel has IPv6 at all (without it there is no IPv6 to leak)."""
    return os.path.isdir("/proc/sys/net/ipv6")


def rulesets(cfg: Config, closed: bool = False) -> list[rules.Ruleset]:
    """What ``install`` puts in place: the IPv4 ruleset (``closed``: every queue rule drops),
    and the IPv6 one (closed alike) when this configuration has one and the kernel has IPv6."""
    v4 = rules.build(cfg)
    out = [rules.close(v4) if closed else v4]
    v6 = rules.build6(cfg)
    if v6 is not None and ipv6_enabled():
        out.append(rules.close(v6) if closed else v6)
    return out


def find_command(name: str) -> str | None:
    """The path of ``name`` in PATH or the sbin directories (root's PATH may lack them)."""
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *_SBIN])
    return shutil.which(name, path=path)


def _command(name: str, why: str) -> str:
    found = find_command(name)
    if found is None:
        raise RulesError(
            f"{name} not found ({why}); install the iptables package or choose another "
            "daemon.iptables backend",
            argv=(name,),
        )
    return found


def _prefix(netns: str | None) -> list[str]:
    if netns is None:
        return []
    return [_command("ip", "needed to run iptables in a network namespace"), "netns", "exec", netns]


def _run(argv: Sequence[str], stdin: str | None, what: str, timeout: float = TIMEOUT) -> str:
    try:
        proc = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
    except OSError as err:
        raise RulesError(f"{what}: cannot run {argv[0]}: {err.strerror}", argv=argv) from None
    except subprocess.TimeoutExpired:
        raise RulesError(f"{what}: no answer after {timeout:.0f} s", argv=argv) from None
    if proc.returncode != 0:
        raise RulesError(
            f"{what} failed", argv=argv, stderr=proc.stderr, returncode=proc.returncode,
            detail=_failed_line(proc.stderr, stdin),
        )
    return proc.stdout


def _failed_line(stderr: str, stdin: str | None) -> str:
    """The input line iptables-restore complains about, if it names one."""
    m = re.search(r"line:? (\d+)", stderr)
    if m is None or stdin is None:
        return ""
    n = int(m.group(1))
    lines = stdin.splitlines()
    return f"line {n} of the input: {lines[n - 1]}" if 0 < n <= len(lines) else ""


def read_tables(backend: Backend, netns: str | None = None) -> dict[str, rules.SavedTable]:
    """The current ruleset, as iptables-save prints it, parsed."""
    argv = [*_prefix(netns), _command(backend.save, f"daemon.iptables = {backend.name!r}")]
    return rules.parse_save(_run(argv, None, "reading the ruleset"))


def apply(backend: Backend, script: str, netns: str | None = None) -> None:
    """Feed ``script`` to iptables-restore --noflush (each table is one transaction)."""
    cmd = _command(backend.restore, f"daemon.iptables = {backend.name!r}")
    argv = [*_prefix(netns), cmd, "--noflush", f"--wait={WAIT}"]
    _run(argv, script, "iptables-restore")


def install(cfg: Config, netns: str | None = None, closed: bool = False) -> None:
    """Install the rules for ``cfg`` (``closed``: the stopped daemon's, every queue rule a
    DROP), replacing any earlier copy in the same transaction, table by table: there is never
    a moment without the boundary. Both rulesets are read and planned first, then the IPv4 one
    is applied, then the IPv6 one (ip6tables): a RulesError says which step failed and whether
    the IPv4 change was already made (``family``, ``applied``; see :func:`outcome`)."""
    scripts = []
    for rs in rulesets(cfg, closed):
        be = backend_for(cfg, rs.family)
        try:
            scripts.append((rs.family, be, rules.plan_install(rs, read_tables(be, netns))))
        except rules.PlanError as err:
            raise _failed(RulesError(f"cannot install: {err}"), rs.family, [], False) from None
        except RulesError as err:
            raise _failed(err, rs.family, [], False) from None
    applied: list[int] = []
    for family, be, script in scripts:
        try:
            apply(be, script, netns)
        except RulesError as err:
            raise _failed(err, family, applied, True) from None
        applied.append(family)


def _failed(err: RulesError, family: int, applied: list[int], changing: bool) -> RulesError:
    err.family, err.applied, err.changing = family, tuple(applied), changing
    return err


def outcome(err: RulesError, done: str) -> str:
    """What a failed ``install`` or ``remove`` left in place, for each address family, in words;
    ``done`` is what the step would have made of the rules ("closed", "installed", "removed").

    Both apply the IPv4 rules before the IPv6 ones, and iptables-restore commits table by
    table, so a failed IPv4 step may have changed a table it committed before the error."""
    if 4 in err.applied:
        return (f"the IPv4 rules are {done}; the IPv6 rules are not: the ip6tables step failed, "
                "and they are left as they were")
    if not err.changing:
        return "nothing was changed: the IPv4 and IPv6 rules are left as they were"
    return (f"the IPv4 rules are not {done} (but for any table iptables-restore committed before "
            "the error), and the IPv6 rules are left as they were")


def remove(cfg: Config, netns: str | None = None) -> bool:
    """Remove all our chains and jumps (any configuration with this chain prefix), IPv4 and
    IPv6. Idempotent. Whether there was anything to remove."""
    return _remove(cfg, netns)


def _remove(cfg: Config, netns: str | None) -> bool:
    removed = False
    applied: list[int] = []
    for family in (4, 6):
        be = backend_for(cfg, family)
        if family == 6 and (not ipv6_enabled() or find_command(be.save) is None):
            continue  # nothing of ours can be there
        try:
            script = rules.plan_remove(cfg.daemon.chain_prefix, read_tables(be, netns))
        except rules.PlanError as err:
            raise _failed(RulesError(f"cannot remove: {err}"), family, applied, False) from None
        except RulesError as err:
            raise _failed(err, family, applied, False) from None
        if script:
            try:
                apply(be, script, netns)
            except RulesError as err:
                raise _failed(err, family, applied, True) from None
            removed = True
        applied.append(family)
    return removed


def commands(cfg: Config) -> tuple[str, str]:
    """The save and restore commands of the configured backend, found, or RulesError naming
    the missing one (checked before the daemon starts anything)."""
    be = backend_for(cfg)
    why = f"daemon.iptables = {be.name!r}"
    found = _command(be.save, why), _command(be.restore, why)
    if len(rulesets(cfg)) > 1:
        be6 = be.v6()
        why6 = f"{why}; IPv6 is dropped on the unprotected side (node.default = discard)"
        _command(be6.save, why6), _command(be6.restore, why6)
    return found


def queues_of(rule: rules.SavedRule) -> set[int]:
    """The NFQUEUE (or QUEUE) queue numbers a saved rule sends packets to; empty for others."""
    toks = rule.tokens()
    target = rule.target()
    if target == "QUEUE":
        return {0}
    if target != "NFQUEUE":
        return set()
    for i, tok in enumerate(toks[:-1]):
        if tok == "--queue-num" and toks[i + 1].isdigit():
            return {int(toks[i + 1])}
        if tok == "--queue-balance":
            lo, _, hi = toks[i + 1].partition(":")
            if lo.isdigit() and hi.isdigit() and int(hi) - int(lo) < 65536:
                return set(range(int(lo), int(hi) + 1))
    return {0}


def foreign_queue_users(cfg: Config, tables: dict[str, rules.SavedTable]) -> list[str]:
    """Rules that are not ours and send packets to one of our queues: two listeners can't share
    a queue, and their packets would get our verdicts. One line per rule."""
    ours = set(cfg.queue_numbers)
    prefix = cfg.daemon.chain_prefix
    found = []
    for name, table in tables.items():
        for r in table.rules:
            if rules.is_our_chain(prefix, r.chain):
                continue
            clash = sorted(queues_of(r) & ours)
            if clash:
                qs = ", ".join(map(str, clash))
                found.append(f"queue {qs} is already used by a rule that is not ours: "
                             f"*{name} -A {r.chain} {r.spec}")
    return found


def prefix_users(cfg: Config, tables: dict[str, rules.SavedTable], bound: set[int]) -> list[str]:
    """Rules in chains of our ``chain_prefix`` that feed queues which are not this
    configuration's and which a process listens on now (``bound``): another daemon runs with
    the same chain_prefix, and installing our rules would replace its own. (Rules left by an
    earlier run of ours feed queues nobody listens on.)"""
    ours = set(cfg.queue_numbers)
    prefix = cfg.daemon.chain_prefix
    live: set[int] = set()
    for table in tables.values():
        for r in table.rules:
            if rules.is_our_chain(prefix, r.chain):
                live |= (queues_of(r) - ours) & bound
    if not live:
        return []
    qs = ", ".join(map(str, sorted(live)))
    return [f"daemon.chain_prefix {prefix!r}: chains of that prefix feed queue(s) {qs}, which "
            "another process listens on: another nfq-ipsec daemon runs with this chain_prefix, "
            "and installing these rules would replace its own. A second daemon on a host needs "
            "its own daemon.chain_prefix (and daemon.queues, daemon.control_socket)"]


def preflight(cfg: Config, netns: str | None = None) -> list[str]:
    """Before ``run`` starts anything: the iptables commands exist (RulesError if not), no
    foreign rule feeds our queues, and no other running daemon owns our chain prefix (returned
    as problems; the last is checked in this network namespace only, ``netns`` None)."""
    from .nfqueue import kernel_queue_stats

    commands(cfg)
    tables = read_tables(backend_for(cfg), netns)
    bound = set(kernel_queue_stats()) if netns is None else set()
    return foreign_queue_users(cfg, tables) + prefix_users(cfg, tables, bound)


_COUNTED = re.compile(r"^\[(\d+):(\d+)\] -A (\S+) ?(.*)$")


def kernel_drops(cfg: Config, netns: str | None = None) -> dict[str, int]:
    """Packets dropped by our own DROP rules (not by a worker), by drop reason: cleartext where
    ESP is required, discard policies, traffic matching no policy, the leak guard. Read from the
    rule counters (``iptables-save -c``); a chain whose rules differ from this configuration's
    is skipped."""
    out: dict[str, int] = {}
    for rs in rulesets(cfg):
        be = backend_for(cfg, rs.family)
        argv = [*_prefix(netns), _command(be.save, f"daemon.iptables = {be.name!r}"), "-c"]
        text = _run(argv, None, "reading the rule counters", timeout=COUNTERS_TIMEOUT)
        counted: dict[tuple[str, str], list[tuple[int, tuple[str, ...]]]] = {}
        table = ""
        for line in text.splitlines():
            if line.startswith("*"):
                table = line[1:].strip()
                continue
            m = _COUNTED.match(line)
            if m:
                counted.setdefault((table, m.group(3)), []).append(
                    (int(m.group(1)), canonical(rules.split_spec(m.group(4)))))
        variants = [rs, rules.close(rs)] if rs.family == 4 else [rs]
        for t_live in rs.tables:
            for chain in t_live.chains:
                have = counted.get((t_live.name, chain), [])
                for variant in variants:
                    t = variant.table(t_live.name)
                    assert t is not None
                    want = t.rules_of(chain)
                    if len(want) == len(have) and all(
                        canonical(r.args) == toks for r, (_, toks) in zip(want, have, strict=True)
                    ):
                        for r, (packets, _) in zip(want, have, strict=True):
                            if r.reason:
                                out[r.reason] = out.get(r.reason, 0) + packets
                        break
    return out


@dataclass(frozen=True)
class RulesStatus:
    present: bool  # some chain or jump of ours exists
    complete: bool  # every chain exists and every jump is there exactly once
    matches: bool  # exactly the rules of this configuration, jumps first, nothing stale
    problems: tuple[str, ...]
    closed: bool = False  # exactly this configuration's closed rules (the daemon is stopped)

    def describe(self) -> str:
        if self.matches:
            return "installed (matches this configuration)"
        if self.closed:
            return ("closed: the daemon is stopped and protected traffic is dropped, not sent "
                    "in clear (`nfq-ipsec rules remove` takes the rules out)")
        if not self.present:
            return "not installed"
        what = "installed but differs from this configuration" if self.complete else "partly installed"
        return what + "".join(f"\n  {p}" for p in self.problems)


def status(cfg: Config, netns: str | None = None) -> RulesStatus:
    """How the installed IPv4 rules relate to ``cfg``'s, running or closed. The IPv6 rules are
    compared too (running or closed as well): a difference there is a problem of the IPv4
    answer."""
    live = rules.build(cfg)
    tables = read_tables(backend_for(cfg), netns)
    st = compare(live, tables)
    if not st.matches:
        closed = compare(rules.close(live), tables)
        if closed.matches:
            st = RulesStatus(True, True, False, (), closed=True)
    v6 = rulesets(cfg)[1:]
    if v6:
        tables6 = read_tables(backend_for(cfg, 6), netns)
        closed6 = compare(rules.close(v6[0]), tables6)
        if (st.matches and closed6.matches and rules.close(live).tables == live.tables
                and not compare(v6[0], tables6).matches):
            # nothing IPv4 queues: only the IPv6 rules tell a stopped daemon from a running one
            return RulesStatus(True, True, False, (), closed=True)
        st6 = closed6 if st.closed else compare(v6[0], tables6)
        if not st6.matches:
            problems = (*st.problems, *(f"ip6tables {p}" for p in st6.problems
                                        or ("IPv6 rules missing",)))
            return RulesStatus(st.present, st.complete and st6.complete, False, problems)
    return st


def is_installed(cfg: Config, netns: str | None = None) -> bool:
    """True when exactly the rules of ``cfg`` are installed (see RulesStatus.matches)."""
    return status(cfg, netns).matches


def canonical(tokens: Sequence[str]) -> tuple[str, ...]:
    """Rule arguments with protocol names replaced by numbers (iptables-save prints a name for
    any protocol /etc/protocols knows; we render numbers for the ones it may not)."""
    out = list(tokens)
    for i in range(len(out) - 1):
        if out[i] in ("-p", "--protocol"):
            out[i + 1] = str(_proto_number(out[i + 1]))
    return tuple(out)


def _proto_number(name: str) -> int | str:
    if name.isdigit():
        return int(name)
    if name in _PROTO_NUMBERS:
        return _PROTO_NUMBERS[name]
    try:
        return socket.getprotobyname(name)
    except OSError:
        return name


def compare(rs: rules.Ruleset, tables: dict[str, rules.SavedTable]) -> RulesStatus:
    """How the installed ``tables`` relate to ruleset ``rs``."""
    found = rules.find_ours(rs.prefix, tables)
    problems: list[str] = []
    complete = True
    expected_jumps: set[tuple[str, str, tuple[str, ...]]] = set()
    for name, jump in rs.jumps:
        t = tables.get(name)
        want = canonical(jump.args)
        expected_jumps.add((name, jump.chain, want))
        in_chain = [r for r in t.rules if r.chain == jump.chain] if t else []
        positions = [i for i, r in enumerate(in_chain) if canonical(r.tokens()) == want]
        if len(positions) != 1:
            complete = False
            problems.append(f"{name} {jump.chain}: {len(positions)} copies of {jump.line('-A')}")
        elif positions[0] != 0:
            problems.append(f"{name} {jump.chain}: our jump is rule {positions[0] + 1}, not 1")
    for name, chain in rs.chains:
        t = tables.get(name)
        if t is None or chain not in t.chains:
            complete = False
            problems.append(f"{name}: chain {chain} missing")
            continue
        new = rs.table(name)
        assert new is not None
        want_rules = [canonical(r.args) for r in new.rules_of(chain)]
        have_rules = [canonical(r.tokens()) for r in t.rules if r.chain == chain]
        if want_rules != have_rules:
            problems.append(f"{name}: chain {chain} holds {len(have_rules)} rules that differ "
                            f"from the {len(want_rules)} of this configuration")
    wanted_chains = set(rs.chains)
    for name, f in found.items():
        problems += [f"{name}: stale chain {c}" for c in f.chains if (name, c) not in wanted_chains]
        problems += [
            f"{name}: unexpected jump -A {r.chain} {r.spec}" for r in f.jumps
            if (name, r.chain, canonical(r.tokens())) not in expected_jumps
        ]
        problems += [f"{name}: foreign rule -A {r.chain} {r.spec} uses our chain" for r in f.foreign]
    return RulesStatus(bool(found), complete, complete and not problems, tuple(problems))


# -- the `nfq-ipsec rules` command ------------------------------------------------------------

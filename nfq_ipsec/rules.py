"""The iptables rules for a configuration: built, rendered and planned here, applied elsewhere.

Pure: no I/O, no subprocess. ``iptables.py`` runs iptables-save/iptables-restore around it.

The rules are the IPsec boundary of RFC 4301 section 3.1. ``node.interface`` is the
unprotected interface (None: every interface except lo). With M the worker's reinject mark and
P the chain prefix:

- raw PREROUTING -> P-IN (before conntrack): a reinjected (decrypted) packet returns; inbound
  ESP goes to the queue of the worker that owns its SPI, ESP to this host with an unknown SPI
  is dropped right here (unknown_spi); ICMP errors in clear are matched by the packet they
  quote; cleartext is checked against the inbound SPD: BYPASS returns, DISCARD and PROTECT
  drop (cleartext where ESP is required); then the default action.
- mangle OUTPUT -> P-OUT (after conntrack, so conntrack sees the plaintext flow): ESP of our
  own outbound SAs with the mark returns (the mark alone proves nothing: CAP_NET_RAW sets it);
  ICMP errors go the way of the flow they quote (RFC 4301 section 6.2); then the outbound
  SPD; PROTECT jumps to P-Pn, the sub-chain of policy n, which clamps the TCP MSS and queues
  to the owner of the policy's outbound SA (several SAs: HMARK spreads flows, never the
  packets of one flow, one SA per queue as in RFC 9611) and ends in DROP (fail closed).
- ESP in UDP (RFC 3948, SAs with ``encapsulation = "udp"``): inbound, UDP to an SA's port
  and to this host goes to the owner of the SPI at the start of its payload (u32); keepalives,
  unknown SPIs and the SPIs of plain SAs are dropped here, the rest (the non-ESP marker of IKE,
  runts) goes to the port's first worker. Plain ESP with the SPI of a UDP SA is dropped.
  Outbound, ESP in UDP and NAT-keepalives from a worker return by mark, port and SPI or shape.
- mangle INPUT (and FORWARD on gateways) -> P-MSS for decrypted packets (the mark M): the
  MSS of the SYNs received is clamped like that of the SYNs sent, so a peer that doesn't clamp
  (the Linux kernel's ESP) doesn't make this side's TCP send segments too big after ESP.
- gateways only: mangle PREROUTING -> P-FWD for traffic arriving on any other interface (the
  kernel routes the outer header after reinjection); nat POSTROUTING -> P-NAT, which keeps
  SNAT/MASQUERADE off the workers' ESP packets (they still carry the conntrack entry of the
  plaintext flow, and NAT would rewrite them as if they were that flow); filter FORWARD ->
  P-LEAK, a leak guard so forwarded cleartext never leaves the unprotected interface.

- compartments (``[[compartment]]``): P-OUT (and P-FWD) send a packet their selector matches
  (``-m owner``, ``-m cgroup``; forwarded: ``-i``, ``-s``) with ``-g`` to the compartment's
  chain P-C<id> (P-F<id>): its own policies, then the node's default; entered by goto, a
  RETURN from it leaves P-OUT too, so a labelled packet never meets another compartment's
  policies. P-LEAK does the same with P-L<id>. P-MSS first copies a decrypted packet's
  compartment (its worker's mark, ``id << 8``) to its conntrack entry (``CONNMARK``).

There is no ``--queue-bypass`` anywhere: a queue without a worker drops its packets. A
stopped daemon leaves :func:`close`'s rules (every queue rule a DROP). :func:`build6` makes the
same chains for ip6tables from the IPv6 policies and the SAs whose ESP travels in IPv6, with
neighbour discovery and MLD returned first (``node.ipv6_neighbour_discovery``).
Each built-in chain gets exactly one rule from us, a jump inserted at position 1; every other
rule lives in chains named ``P-...``. Rules are rendered the way iptables-save prints them, so
what ``render`` shows can be compared with what is installed, line by line.
"""

from __future__ import annotations

import re
import shlex
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .acquire import trap_queue
from .config.fields import COMPARTMENT_MARK_MASK
from .config.model import CompartmentConfig, Config
from .core.esp import overhead_for
from .core.ipv6 import ICMPV6_ERROR_TYPES, MLD_TYPES, ND_TYPES, addr_str, is_v6
from .core.packet import ICMP_ERROR_TYPES
from .core.sa import Encapsulation, Mode, SADirection, SAParams
from .core.spd import Action, Network, Policy, Selector

TABLES = ("raw", "mangle", "nat", "filter")  # every table we may touch, in install order
HMARK_BASE = 0x4E510000  # marks B+k steer a flow to the k-th SA of a policy ("NQ" in the top bits)
HMARK_RND = 0x6E667169  # fixed hash seed: the same flow maps to the same SA after a restart
IPV4_TCP_HEADERS = 40  # IPv4 + TCP header without options: MSS = MTU - 40 - ESP overhead
IPV6_TCP_HEADERS = 60  # IPv6 + TCP header without options
MAX_CHAIN_NAME = 28  # XT_EXTENSION_MAXNAMELEN - 1
COMMENT_WIDTH = 100
_QUOTE_NEEDED = re.compile(r"[^A-Za-z0-9_./:,!+=@%-]")
_PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp", 132: "sctp"}  # printed by name
_PORT_PROTOCOLS = (6, 17, 132)


@dataclass(frozen=True)
class Rule:
    """One rule: the chain it is in and its arguments after ``-A CHAIN``."""

    chain: str
    args: tuple[str, ...]
    comment: str = ""
    # For a DROP rule: the drop reason its packet counter is reported under (status).
    reason: str = field(default="", compare=False)

    def spec(self) -> str:
        return " ".join(quote(a) for a in self.args)

    def line(self, op: str = "-A") -> str:
        return f"{op} {self.chain} {self.spec()}"


@dataclass(frozen=True)
class Table:
    """What we put in one table: our chains, the jumps into them, and their rules."""

    name: str
    chains: tuple[str, ...]
    jumps: tuple[Rule, ...]  # each inserted at position 1 of a built-in chain
    rules: tuple[Rule, ...]
    chain_comments: tuple[tuple[str, str], ...] = ()

    def rules_of(self, chain: str) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.chain == chain)


@dataclass(frozen=True)
class Ruleset:
    prefix: str
    tables: tuple[Table, ...]
    header: tuple[str, ...] = ()
    family: int = 4  # 4: iptables, 6: ip6tables

    def table(self, name: str) -> Table | None:
        for t in self.tables:
            if t.name == name:
                return t
        return None

    @property
    def chains(self) -> tuple[tuple[str, str], ...]:
        """(table, chain) for every chain we create."""
        return tuple((t.name, c) for t in self.tables for c in t.chains)

    @property
    def jumps(self) -> tuple[tuple[str, Rule], ...]:
        return tuple((t.name, j) for t in self.tables for j in t.jumps)


# -- names ------------------------------------------------------------------------------------

def chain_in(prefix: str) -> str:
    return f"{prefix}-IN"


def chain_out(prefix: str) -> str:
    return f"{prefix}-OUT"


def chain_fwd(prefix: str) -> str:
    return f"{prefix}-FWD"


def chain_leak(prefix: str) -> str:
    return f"{prefix}-LEAK"


def chain_nat(prefix: str) -> str:
    return f"{prefix}-NAT"


def chain_mss(prefix: str) -> str:
    return f"{prefix}-MSS"


def chain_protect(prefix: str, index: int) -> str:
    return f"{prefix}-P{index}"


def chain_compartment(prefix: str, cid: int, kind: str) -> str:
    """A compartment's SPD chain: ``C`` (locally sent, mangle), ``F`` (forwarded, mangle) or
    ``L`` (its leak guard, filter), by its id."""
    return f"{prefix}-{kind}{cid}"




def is_our_chain(prefix: str, name: str) -> bool:
    """Whether ``name`` is a chain this prefix creates (exact shapes only: another instance with
    a longer prefix such as ``P-X`` never looks like ours)."""
    return re.fullmatch(re.escape(prefix) + r"-(?:IN|OUT|FWD|LEAK|NAT|MSS|[PCFL]\d+)", name) is not None


def hmark_base(mark: int) -> int:
    """The first steering mark: HMARK_BASE without the bit of the reinject mark."""
    return HMARK_BASE & ~mark & 0xFFFFFFFF


def mss_for(cfg: Config, policy: Policy) -> int:
    """The TCP MSS that keeps an ESP packet of ``policy`` within the unprotected MTU."""
    sas = cfg.outbound_sas(policy)
    overhead = max((overhead_for(sa) for sa in sas), default=0)
    headers = IPV6_TCP_HEADERS if policy.selector.v6 else IPV4_TCP_HEADERS
    return cfg.node.mtu - headers - overhead


def _policies(cfg: Config, v6: bool) -> list[tuple[int, Policy]]:
    """The policies of one family with their places in the whole list (the chain names)."""
    return [(i, pol) for i, pol in enumerate(cfg.policies) if pol.selector.v6 == v6]


def esp_family_v6(cfg: Config, sa: SAParams) -> bool:
    """Whether an SA's ESP travels in IPv6: a tunnel's endpoints say; in transport mode, the
    family of the policy it serves."""
    if sa.mode is Mode.TUNNEL:
        return is_v6(sa.tunnel_remote)
    return any(sa.name in pol.sa_names and pol.selector.v6 for pol in cfg.policies)


def crosses_in(cfg: Config, v6: bool) -> bool:
    """Whether an inbound SA of a policy of this family carries its ESP in the other family (a
    mixed tunnel: 4-in-6 or 6-in-4). Its worker sends the decrypted packets through a raw
    socket: they start in OUTPUT, not PREROUTING, and never pass INPUT or FORWARD."""
    return any(sa.direction is SADirection.IN and sa.name in pol.sa_names
               and esp_family_v6(cfg, sa) != v6
               for _, pol in _policies(cfg, v6) for sa in cfg.sas)


def _sas(cfg: Config, v6: bool) -> list[SAParams]:
    return [sa for sa in cfg.sas if esp_family_v6(cfg, sa) == v6]


def quote(arg: str) -> str:
    """Quote an argument the way iptables-save does (double quotes), if it needs it."""
    if arg and not _QUOTE_NEEDED.search(arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- building ---------------------------------------------------------------------------------

def build(cfg: Config, v6: bool = False) -> Ruleset:
    """The complete ruleset for ``cfg``: the iptables one, or (``v6``) the ip6tables one, each
    with the policies of its family and the SAs whose ESP travels in it."""
    p = cfg.daemon.chain_prefix
    node = cfg.node
    for name in (chain_leak(p), chain_protect(p, max(len(cfg.policies) - 1, 0))):
        if len(name) > MAX_CHAIN_NAME:
            raise ValueError(f"chain name {name!r} is longer than {MAX_CHAIN_NAME} characters")
    if node.role == "gateway" and not node.interface:
        raise ValueError("a gateway needs node.interface (the unprotected interface)")
    protect_chains = _protect_chains(cfg, v6)
    raw = _inbound_table(cfg, v6)
    mangle_chains = [chain_out(p)]
    mangle_comments = [(chain_out(p), _OUT_COMMENT)]
    mangle_jumps = [_jump("OUTPUT", "-o", node.interface, chain_out(p),
                          "locally generated traffic to the unprotected side")]
    mangle_rules = list(_outbound_rules(cfg, chain_out(p), lo_flag="-o",
                                        with_lo=node.interface is None, default=True, v6=v6))
    extra: list[Table] = []
    if node.role == "gateway":
        iface = node.interface or ""
        mangle_chains.append(chain_fwd(p))
        mangle_comments.append((chain_fwd(p), _FWD_COMMENT))
        mangle_jumps.append(Rule("PREROUTING", ("!", "-i", iface, "-j", chain_fwd(p)),
                                 f"traffic arriving from the protected side (not {iface})"))
        mangle_rules += _outbound_rules(cfg, chain_fwd(p), lo_flag="-i", with_lo=True,
                                        default=False, v6=v6)
        extra = [_nat_table(cfg), _leak_table(cfg, v6)]
    for kind in ("C", "F") if node.role == "gateway" else ("C",):
        protect_chains = _compartment_chains(cfg, kind, v6) + protect_chains
    for chain, rules, comment in protect_chains:
        mangle_chains.append(chain)
        mangle_comments.append((chain, comment))
        mangle_rules += rules
    # decrypted packets: their compartment onto their connection, then the MSS clamp
    mss = (_label_rules(cfg) if cfg.compartments else []) + _mss_rules(cfg, v6)
    if mss:
        mangle_chains.append(chain_mss(p))
        mangle_comments.append((chain_mss(p), _MSS_COMMENT + (_LBL_COMMENT if cfg.compartments
                                                              else "")))
        m = cfg.daemon.mark
        on_iface = ("-i", node.interface) if node.interface else ()
        match = (*on_iface, "-m", "mark", "--mark", f"0x{m:x}/0x{m:x}", "-j", chain_mss(p))
        for builtin in ("INPUT", "FORWARD") if node.role == "gateway" else ("INPUT",):
            mangle_jumps.append(Rule(builtin, match, "decrypted packets (a worker's mark): "
                                     + ("label their connections, " if cfg.compartments else "")
                                     + "clamp the MSS of their SYNs"))
        if crosses_in(cfg, v6):
            mangle_jumps.append(Rule("OUTPUT", match[len(on_iface):],
                                     "decrypted packets of a mixed tunnel, which a worker sends "
                                     "through a raw socket (the mark): clamp the MSS of their "
                                     "SYNs"))
        mangle_rules += mss
    mangle = Table("mangle", tuple(mangle_chains), tuple(mangle_jumps), tuple(mangle_rules),
                   tuple(mangle_comments))
    return Ruleset(p, (raw, mangle, *extra), _header(cfg, v6), 6 if v6 else 4)


def _jump(builtin: str, flag: str, iface: str | None, target: str, comment: str) -> Rule:
    args = (flag, iface) if iface is not None else ()
    return Rule(builtin, (*args, "-j", target), comment)


def _mark_return(cfg: Config, chain: str) -> Rule:
    """Inbound: a packet a worker decrypted and reinjected. Only a worker's verdict can put a
    marked packet into PREROUTING of the unprotected side (a local process's packets never
    pass there, but through lo, which returns anyway)."""
    m = cfg.daemon.mark
    return Rule(chain, ("-m", "mark", "--mark", f"0x{m:x}/0x{m:x}", "-j", "RETURN"),
                "decrypted and reinjected by a worker (carries the mark): already processed")


def _esp_returns(cfg: Config, chain: str, v6: bool) -> list[Rule]:
    """Outbound: ESP a worker produced, one rule per outbound SA. The mark alone is no proof:
    any process with CAP_NET_RAW can set it (SO_MARK), so a marked packet skips the SPD only if
    it is ESP of one of our outbound SAs; a marked UDP datagram goes through the SPD like any
    other."""
    m = cfg.daemon.mark
    mark = ("-m", "mark", "--mark", f"0x{m:x}/0x{m:x}")
    rules: list[Rule] = []
    for sa in _sas(cfg, v6):
        if sa.direction is not SADirection.OUT:
            continue
        if sa.encapsulation is Encapsulation.UDP:
            rules.append(Rule(chain, (*_udp_from(sa.udp_source_port), *_udp_spi(sa.spi), *mark,
                                      "-j", "RETURN"),
                              f"ESP in UDP of outbound SA {sa.name!r} reinjected by a worker "
                              "(mark, port and SPI): already processed"))
        else:
            rules.append(Rule(chain, ("-p", "esp", "-m", "esp", "--espspi", str(sa.spi), *mark,
                                      "-j", "RETURN"),
                              f"ESP of outbound SA {sa.name!r} reinjected by a worker (mark and "
                              "SPI): already processed"))
    for port in sorted({sa.udp_source_port for sa in _udp_sas(cfg, SADirection.OUT)
                        if sa.keepalive and not v6}):
        rules.append(Rule(chain, (*_udp_from(port), "-m", "u32", "--u32", _U32_KEEPALIVE, *mark,
                                  "-j", "RETURN"),
                          f"a NAT-keepalive from port {port} sent by a worker (mark, one byte "
                          "0xff): RFC 3948 section 2.3"))
    return rules


# -- ESP in UDP (RFC 3948): u32 reads the UDP header and payload at IHL*4 (iptables-save's form)
_U32_AT_UDP = "0x0>>0x16&0x3c@"
# length 9 and the one byte 0xff (read as the low byte of the word at 5: a word must fit)
_U32_KEEPALIVE = f"{_U32_AT_UDP}0x4>>0x10=0x9&&{_U32_AT_UDP}0x5&0xff=0xff"
# an SPI (not the marker's 0) and room for an ESP header: UDP length >= 8 + 8
_U32_ANY_SPI = f"{_U32_AT_UDP}0x8=0x1:0xffffffff&&{_U32_AT_UDP}0x4>>0x10=0x10:0xffff"


# the non-ESP marker (RFC 3948 section 2.2): four zero bytes at the start of the UDP payload
_U32_MARKER = f"{_U32_AT_UDP}0x8=0x0"


def _ike_rules(cfg: Config, chain: str, outbound: bool, v6: bool) -> list[Rule]:
    """IKE between a connection's endpoints, before any policy: inbound, UDP 500 and (IPv4)
    UDP 4500 with the non-ESP marker from the peer to this end go up to the agent's sockets;
    outbound, the same from the agent (its sockets carry the mark) to the peer leave. Anything
    else between them (ESP in UDP without the marker too) goes on to the rules below."""
    m = cfg.daemon.mark
    mark = ("-m", "mark", "--mark", f"0x{m:x}/0x{m:x}")
    width = "128" if v6 else "32"
    rules: list[Rule] = []
    for conn in cfg.connections:
        if is_v6(conn.local) != v6:
            continue
        here, there = f"{addr_str(conn.local)}/{width}", f"{addr_str(conn.remote)}/{width}"
        src, dst = (here, there) if outbound else (there, here)
        port_flag = "--sport" if outbound else "--dport"
        ends = ("-s", src, "-d", dst, "-p", "udp", "-m", "udp")
        way = "from the agent to its peer (the mark)" if outbound else "from its peer to the agent"
        ports: list[tuple[str, tuple[str, ...], str]] = [("500", (), "IKE")]
        if not v6:
            ports.append(("4500", ("-m", "u32", "--u32", _U32_MARKER),
                          "IKE after the non-ESP marker (NAT traversal)"))
        for port, extra, what in ports:
            rules.append(Rule(chain, (*ends, port_flag, port, *extra, *(mark if outbound else ()),
                                      "-j", "RETURN"),
                              f"connection {conn.name!r}: {what} on UDP {port} {way}"))
    return rules


def _udp_sas(cfg: Config, direction: SADirection) -> list[SAParams]:
    return [sa for sa in cfg.sas
            if sa.direction is direction and sa.encapsulation is Encapsulation.UDP]


def _udp_spi(spi: int) -> tuple[str, ...]:
    return ("-m", "u32", "--u32", f"{_U32_AT_UDP}0x8=0x{spi:x}")


def _udp_from(port: int) -> tuple[str, ...]:
    return ("-p", "udp", "-m", "udp", "--sport", str(port))


def _udp_inbound_rules(cfg: Config, chain: str) -> list[Rule]:
    """UDP to the port of an inbound SA of ESP in UDP, addressed to this host: its ESP to the
    worker that owns the SPI (u32 reads the SPI at the start of the UDP payload); plain ESP's
    SPIs in UDP and keepalives dropped here; ESP with an unknown SPI dropped here, as for plain
    ESP; the rest (the non-ESP marker of IKE, runts) to the port's first worker, which passes
    the marker to the host and counts the rest by reason."""
    rules: list[Rule] = []
    udp_in = _udp_sas(cfg, SADirection.IN)
    plain_in = [sa for sa in cfg.inbound_sas() if sa.encapsulation is not Encapsulation.UDP]
    for port in sorted({sa.udp_destination_port for sa in udp_in}):
        to = ("-p", "udp", "-m", "udp", "--dport", str(port), "-m", "addrtype", "--dst-type",
              "LOCAL")
        owners = [sa for sa in udp_in if sa.udp_destination_port == port]
        for sa in owners:
            rules.append(Rule(chain, (*to, *_udp_spi(sa.spi), "-j", "NFQUEUE", "--queue-num",
                                      str(sa.queue)),
                              f"ESP in UDP to port {port} of inbound SA {sa.name!r} (SPI "
                              f"0x{sa.spi:08x}) to its owner, queue {sa.queue}"))
        for sa in plain_in:
            rules.append(Rule(chain, (*to, *_udp_spi(sa.spi), "-j", "DROP"),
                              f"ESP in UDP with the SPI of inbound SA {sa.name!r}, which takes "
                              "plain ESP only", "encap_mismatch"))
        rules.append(Rule(chain, (*to, "-m", "u32", "--u32", _U32_KEEPALIVE, "-j", "DROP"),
                          f"a NAT-keepalive to port {port} (one byte 0xff): its job is done on "
                          "the way (RFC 3948 section 2.3)", "nat_keepalive"))
        rules.append(Rule(chain, (*to, "-m", "u32", "--u32", _U32_ANY_SPI, "-j", "DROP"),
                          f"ESP in UDP to port {port} with an unknown SPI: dropped here, as for "
                          "plain ESP", "unknown_spi"))
        first = owners[0]
        rules.append(Rule(chain, (*to, "-j", "NFQUEUE", "--queue-num", str(first.queue)),
                          f"the rest to port {port} (the non-ESP marker of IKE, which passes; "
                          f"runts and malformed datagrams, dropped): queue {first.queue}"))
    return rules


_IN_COMMENT = ("inbound boundary, before conntrack: ESP to the worker that owns the SPI, "
               "cleartext checked against the inbound SPD")
_OUT_COMMENT = ("outbound SPD for locally generated traffic (after conntrack, so conntrack "
                "tracks the plaintext flow)")
_FWD_COMMENT = ("outbound SPD for forwarded traffic, queued in PREROUTING so the kernel routes "
                "the outer (ESP) header after reinjection; no match: not ours (to the gateway "
                "itself or within the LAN)")
_MSS_COMMENT = ("MSS clamp for received SYNs, after decryption: a peer that doesn't clamp (the Linux "
                "kernel's ESP doesn't) offers the MSS of its interface, and this host's TCP would "
                "then send segments that no longer fit the path after ESP")
_NAT_COMMENT = ("NAT exemption: forwarded traffic is queued after conntrack, so the ESP packet a "
                "worker returns still carries the plaintext flow's conntrack entry; NAT on it "
                "would rewrite ESP bytes as if they were TCP/UDP ports and checksums")
_LBL_COMMENT = ("; first, each decrypted packet's compartment (its worker's mark) onto its "
                "conntrack entry (CONNMARK), for host rules that keep the label")
_LEAK_COMMENT = ("leak guard: forwarded traffic leaving the unprotected interface must be ESP "
                 "from a worker or explicitly bypassed")


def _inbound_table(cfg: Config, v6: bool) -> Table:
    p = cfg.daemon.chain_prefix
    c = chain_in(p)
    family = "IPv6" if v6 else "IPv4"
    rules = [
        # The socket match makes the kernel register IPv4 (IPv6) defragmentation (and only
        # that, not conntrack) in this network namespace: fragmented ESP then reaches this
        # chain reassembled, so a big ESP packet finds its SA's worker whole. No ESP packet
        # carries SPI 0 (RFC 4303 2.1), so the rule itself touches nothing.
        Rule(c, ("-p", "esp", "-m", "esp", "--espspi", "0", "-m", "socket", "-j", "RETURN"),
             f"turns on {family} reassembly before this chain (the socket match makes the kernel "
             "register defragmentation here); matches nothing: no ESP packet has SPI 0"),
        _mark_return(cfg, c),
    ]
    if cfg.node.interface is None:
        rules.append(Rule(c, ("-i", "lo", "-j", "RETURN"), "loopback is never IPsec-protected"))
    if v6:
        rules += _link_rules(cfg, c)
    rules += _ike_rules(cfg, c, outbound=False, v6=v6)
    for sa in _sas(cfg, v6):
        if sa.direction is not SADirection.IN:
            continue
        if sa.encapsulation is Encapsulation.UDP:
            rules.append(Rule(c, ("-p", "esp", "-m", "esp", "--espspi", str(sa.spi), "-j", "DROP"),
                              f"plain ESP with the SPI of inbound SA {sa.name!r}, which takes "
                              "ESP in UDP only", "encap_mismatch"))
            continue
        rules.append(Rule(
            c, ("-p", "esp", "-m", "esp", "--espspi", str(sa.spi), "-j", "NFQUEUE",
                "--queue-num", str(sa.queue)),
            f"ESP of inbound SA {sa.name!r} (SPI 0x{sa.spi:08x}) to its owner, queue {sa.queue}",
        ))
    if not v6:  # ESP in UDP is IPv4 only; IPv6 has no -f: its fragments are reassembled before
        rules += _udp_inbound_rules(cfg, c)
        rules.append(Rule(c, ("-p", "esp", "-f", "-m", "addrtype", "--dst-type", "LOCAL", "-j",
                              "DROP"),
                          "a non-first fragment of ESP to this host (no SPI to steer it by): "
                          "dropped (the first fragment goes to its SA's worker, which counts it)",
                          "fragment"))
    rules.append(Rule(c, ("-p", "esp", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "DROP"),
                      "ESP to this host with an unknown SPI: dropped here, so a flood of random "
                      "SPIs costs no worker anything (ESP in transit follows the policies below)",
                      "unknown_spi"))
    rules += _icmp_error_rules(cfg, c, "in", v6)
    for i, pol in _policies(cfg, v6):
        if not pol.direction.covers(False):
            continue
        target, what, reason = {
            Action.BYPASS: ("RETURN", "bypass: cleartext allowed", ""),
            Action.DISCARD: ("DROP", "discard", "policy_discard"),
            Action.PROTECT: ("DROP", "protect: cleartext where ESP is required", "cleartext_protected"),
        }[pol.action]
        rules.append(Rule(c, (*selector_args(pol.selector, outbound=False, v6=v6), "-j", target),
                          f"policy[{i}] {pol.name!r}, inbound: {what}", reason))
    rules.append(_default(cfg, c, "inbound"))
    jump = _jump("PREROUTING", "-i", cfg.node.interface, c,
                 "traffic arriving on the unprotected side" if cfg.node.interface
                 else "traffic arriving on any interface (lo returns)")
    return Table("raw", (c,), (jump,), tuple(rules), ((c, _IN_COMMENT),))


def _default(cfg: Config, chain: str, what: str) -> Rule:
    act = cfg.node.default_action
    target = "DROP" if act is Action.DISCARD else "RETURN"
    return Rule(chain, ("-j", target), f"{what} traffic that matches no policy: default {act.value}",
                "no_policy" if target == "DROP" else "")


def _outbound_rules(
    cfg: Config, chain: str, lo_flag: str, with_lo: bool, default: bool, v6: bool = False,
) -> list[Rule]:
    rules = _esp_returns(cfg, chain, v6)
    if with_lo:
        rules.append(Rule(chain, (lo_flag, "lo", "-j", "RETURN"), "loopback is never IPsec-protected"))
    if v6 and default:
        rules += _link_rules(cfg, chain)
    if default:  # the agent's own IKE leaves from this host, never through the FORWARD path
        rules += _ike_rules(cfg, chain, outbound=True, v6=v6)
    rules += _icmp_error_rules(cfg, chain, "out", v6)
    # default: locally sent traffic (P-OUT); else forwarded (P-FWD)
    rules += _compartment_gotos(cfg, chain, "C" if default else "F", v6)
    rules += _spd_rules(cfg, chain, cfg.default_compartment, v6)
    if default:
        rules.append(_default(cfg, chain, "outbound"))
    return rules


def _spd_rules(cfg: Config, chain: str, comp: CompartmentConfig, v6: bool) -> list[Rule]:
    """The outbound SPD of one compartment, in order."""
    p = cfg.daemon.chain_prefix
    rules: list[Rule] = []
    mine = set(comp.policies)
    for i, pol in _policies(cfg, v6):
        if not pol.direction.covers(True) or pol.name not in mine:
            continue
        if pol.action is Action.PROTECT:
            target, what = chain_protect(p, i), "protect: to its ESP sub-chain"
        elif pol.action is Action.BYPASS:
            target, what = "RETURN", "bypass: leaves in cleartext"
        else:
            target, what = "DROP", "discard"
        rules.append(Rule(chain, (*selector_args(pol.selector, outbound=True, v6=v6), "-j", target),
                          f"policy[{i}] {pol.name!r}, outbound: {what}",
                          "policy_discard" if target == "DROP" else ""))
    return rules


def compartment_args(comp: CompartmentConfig, kind: str, v6: bool) -> tuple[str, ...] | None:
    """The matches of a compartment's label selector, as iptables-save prints them: ``C`` the
    sending socket's owner and cgroup v2, ``F`` and ``L`` a forwarded packet's source and
    input interface. None: it selects no traffic of this kind (or of this family)."""
    args: list[str] = []
    if kind == "C":
        if not comp.selects_local:
            return None
        if comp.uid is not None or comp.gid is not None:
            args += ["-m", "owner"]
            if comp.uid is not None:
                args += ["--uid-owner", str(comp.uid)]
            if comp.gid is not None:
                args += ["--gid-owner", str(comp.gid)]
        if comp.cgroup is not None:
            args += ["-m", "cgroup", "--path", comp.cgroup]
        return tuple(args)
    if not comp.selects_forwarded or (comp.source is not None and (comp.source.version == 6) != v6):
        return None
    if comp.source is not None:
        args += [*_net("-s", comp.source)] or ["-s", "::/0" if v6 else "0.0.0.0/0"]
    if comp.interface is not None:
        args += ["-i", comp.interface]
    return tuple(args)


def _compartment_gotos(cfg: Config, chain: str, kind: str, v6: bool) -> list[Rule]:
    """A labelled packet goes (``-g``) to its compartment's chain and never comes back to this
    one: what its compartment's SPD does not decide, its chain's end does (the node's default),
    so it never meets another compartment's policies."""
    p = cfg.daemon.chain_prefix
    rules = []
    for comp in cfg.compartments:
        args = compartment_args(comp, kind, v6)
        if args is not None:
            rules.append(Rule(chain, (*args, "-g", chain_compartment(p, comp.id, kind)),
                              f"compartment {comp.name!r} ({comp.selector_text()}): its own SPD "
                              "only"))
    if kind != "C":
        return rules
    mask = COMPARTMENT_MARK_MASK
    for comp in cfg.compartments:  # what the kernel sends for a socket without its owner
        if comp.selects_local:
            rules.append(Rule(chain, ("-m", "owner", "!", "--socket-exists", "-m", "connmark",
                                      "--mark", f"0x{comp.mark:x}/0x{mask:x}", "-g",
                                      chain_compartment(p, comp.id, kind)),
                              f"compartment {comp.name!r}: a packet of one of its connections "
                              "without a socket owner (a SYN-ACK, the last ACK of a closed "
                              "socket, a reset) follows its connection"))
    return rules


def _compartment_chains(cfg: Config, kind: str, v6: bool) -> list[tuple[str, list[Rule], str]]:
    """Each compartment's SPD chain of one kind (see :func:`compartment_args`)."""
    p = cfg.daemon.chain_prefix
    out = []
    for comp in cfg.compartments:
        if compartment_args(comp, kind, v6) is None:
            continue
        c = chain_compartment(p, comp.id, kind)
        if kind == "L":
            rules = _leak_rules(cfg, c, comp, v6)
            what = "forwarded traffic leaving"
        else:
            rules = _spd_rules(cfg, c, comp, v6)
            what = "locally sent" if kind == "C" else "forwarded"
        if kind == "C":  # the connection is the compartment's, for its packets without owner
            mask = COMPARTMENT_MARK_MASK
            rules.insert(0, Rule(c, ("-j", "CONNMARK", "--set-xmark",
                                     f"0x{comp.mark:x}/0x{mask:x}"),
                                 f"its connection is compartment {comp.name!r}'s: the packets "
                                 "the kernel sends for it without a socket owner follow it"))
        if kind == "F":  # as in P-FWD: what no policy matches is not ours (the leak guard's)
            rules.append(Rule(c, ("-j", "RETURN"), "no policy of the compartment matches: not "
                              "ours (to the gateway itself or within the LAN); the compartment's "
                              "leak guard decides if it leaves"))
        else:
            rules.append(_default(cfg, c, f"compartment {comp.name!r}"))
        out.append((c, rules, f"compartment {comp.name!r} (id {comp.id}, "
                    f"{comp.selector_text()}): {what}, its own policies only"))
    return out


def _label_rules(cfg: Config) -> list[Rule]:
    """Decrypted packets carry their compartment in the mark (``COMPARTMENT_MARK_MASK``) from
    their worker's verdict; copy it to their conntrack entry, so host rules can keep the label
    (``-m connmark``) for the whole connection, replies too."""
    c = chain_mss(cfg.daemon.chain_prefix)
    m = cfg.daemon.mark
    mask = COMPARTMENT_MARK_MASK
    rules = []
    for comp in cfg.all_compartments:
        rules.append(Rule(c, ("-m", "mark", "--mark", f"0x{m | comp.mark:x}/0x{m | mask:x}",
                              "-j", "CONNMARK", "--set-xmark", f"0x{comp.mark:x}/0x{mask:x}"),
                          f"decrypted by compartment {comp.name!r}: its connection's mark "
                          f"0x{comp.mark:x}/0x{mask:x}"))
    return rules


def _protect_chains(cfg: Config, v6: bool) -> list[tuple[str, list[Rule], str]]:
    p = cfg.daemon.chain_prefix
    out: list[tuple[str, list[Rule], str]] = []
    headers = IPV6_TCP_HEADERS if v6 else IPV4_TCP_HEADERS
    prefix = "128" if v6 else "32"
    for i, pol in _policies(cfg, v6):
        if pol.action is not Action.PROTECT or not pol.direction.covers(True):
            continue
        c = chain_protect(p, i)
        sas = cfg.outbound_sas(pol)
        rules: list[Rule] = []
        if cfg.daemon.mss_clamp and sas:
            mss = mss_for(cfg, pol)
            worst = max(overhead_for(sa) for sa in sas)
            rules.append(Rule(
                c, ("-p", "tcp", "-m", "tcp", "--tcp-flags", "SYN,RST", "SYN",
                    "-j", "TCPMSS", "--set-mss", str(mss)),
                f"clamp the MSS of SYNs: MTU {cfg.node.mtu} - {headers} - {worst} bytes of ESP = "
                f"{mss}",
            ))
        if len(sas) == 1:
            sa = sas[0]
            rules.append(Rule(c, ("-j", "NFQUEUE", "--queue-num", str(sa.queue)),
                              f"to queue {sa.queue}, owner of outbound SA {sa.name!r}"))
        elif sas:
            base = hmark_base(cfg.daemon.mark)
            rules.append(Rule(
                c, ("-j", "HMARK", "--hmark-src-prefix", prefix, "--hmark-dst-prefix", prefix,
                    "--hmark-sport-mask", "0xffff", "--hmark-dport-mask", "0xffff",
                    "--hmark-proto-mask", "0xffff", "--hmark-rnd", f"0x{HMARK_RND:08x}",
                    "--hmark-mod", str(len(sas)), "--hmark-offset", str(base)),
                f"per-flow hash over --hmark-tuple src,dst,sport,dport,proto: mark = "
                f"0x{base:x} + hash % {len(sas)} (iptables-save spells the tuple out like this)",
            ))
            for k, sa in enumerate(sas):
                rules.append(Rule(
                    c, ("-m", "mark", "--mark", f"0x{base + k:x}", "-j", "NFQUEUE",
                        "--queue-num", str(sa.queue)),
                    f"flows hashed to {k}: queue {sa.queue}, owner of outbound SA {sa.name!r}",
                ))
        conn = cfg.policy_connection(pol)
        if not sas and conn is not None and conn.start_action == "trap":
            # a worker of the policy's own compartment: only it holds the policy
            q = trap_queue(conn.name, cfg.compartment_of_policy(pol.name).queues)
            rules.append(Rule(c, ("-j", "NFQUEUE", "--queue-num", str(q)),
                              f"trap: no Child SA of connection {conn.name!r} yet: to queue {q}, "
                              "which drops it (acquire) and asks the agent for one"))
        rules.append(Rule(c, ("-j", "DROP"), "fail closed: never leaves in cleartext", "no_sa"))
        comment = (f"policy[{i}] {pol.name!r}: {len(sas)} outbound SA{'s' if len(sas) != 1 else ''} "
                   f"({', '.join(sa.name for sa in sas)})")
        out.append((c, rules, comment))
    return out


def _mss_rules(cfg: Config, v6: bool) -> list[Rule]:
    """One TCPMSS rule per protecting policy of a family, for the SYNs and SYN-ACKs it lets in: the same
    MSS as for the SYNs it sends (``mss_for``), so TCP sends no segment too big after ESP
    in either direction. Empty with ``daemon.mss_clamp`` off."""
    if not cfg.daemon.mss_clamp:
        return []
    c = chain_mss(cfg.daemon.chain_prefix)
    rules = []
    for i, pol in _policies(cfg, v6):
        if (pol.action is not Action.PROTECT or not pol.direction.covers(False)
                or not cfg.outbound_sas(pol) or pol.selector.protocol not in (None, 0, 6)):
            continue
        args = list(selector_args(pol.selector, outbound=False))
        if pol.selector.protocol == 6:
            if "-m" not in args:
                args += ["-m", "tcp"]
        else:
            args = [a for a in args if a not in ("-m", "u32", "--u32", "0x6&0xff=0x0")]
            args += ["-p", "tcp", "-m", "tcp"]
        mss = mss_for(cfg, pol)
        rules.append(Rule(c, (*args, "--tcp-flags", "SYN,RST", "SYN", "-j", "TCPMSS", "--set-mss",
                              str(mss)),
                          f"policy[{i}] {pol.name!r}: clamp the MSS of SYNs received to {mss}, as "
                          "of those sent"))
    return rules


def _nat_table(cfg: Config) -> Table:
    """Keep NAT off our ESP packets. A forwarded packet is queued after conntrack, so the ESP
    packet a worker sends back still carries the conntrack entry of the plaintext flow; a
    MASQUERADE/SNAT rule on the unprotected interface would bind that entry and then rewrite
    the ESP packet as if it were the plaintext TCP/UDP packet (its ports land on the SPI, its
    checksum update on the sequence number). ACCEPT in the nat table means "no translation"."""
    p = cfg.daemon.chain_prefix
    c = chain_nat(p)
    iface = cfg.node.interface or ""
    m = cfg.daemon.mark
    rules = [Rule(c, ("-p", "esp", "-m", "mark", "--mark", f"0x{m:x}/0x{m:x}", "-j", "ACCEPT"),
                  "ESP from a worker: no NAT (the conntrack entry it carries is the plaintext "
                  "flow's)")]
    for port in sorted({sa.udp_source_port for sa in _udp_sas(cfg, SADirection.OUT)}):
        rules.append(Rule(c, (*_udp_from(port), "-m", "mark", "--mark", f"0x{m:x}/0x{m:x}",
                              "-j", "ACCEPT"),
                          f"ESP in UDP from port {port} from a worker: no NAT, as for ESP"))
    jump = Rule("POSTROUTING", ("-o", iface, "-j", c),
                f"before any SNAT/MASQUERADE on the unprotected interface {iface}")
    return Table("nat", (c,), (jump,), tuple(rules), ((c, _NAT_COMMENT),))


def _leak_table(cfg: Config, v6: bool) -> Table:
    p = cfg.daemon.chain_prefix
    c = chain_leak(p)
    iface = cfg.node.interface or ""
    rules = _esp_returns(cfg, c, v6)
    rules += _icmp_error_rules(cfg, c, "leak", v6)
    rules += _compartment_gotos(cfg, c, "L", v6)
    rules += _leak_rules(cfg, c, cfg.default_compartment, v6)
    rules.append(_default(cfg, c, "forwarded"))
    chains = [(c, _LEAK_COMMENT)]
    sub: list[Rule] = []
    for chain, crules, comment in _compartment_chains(cfg, "L", v6):
        chains.append((chain, comment))
        sub += crules
    jump = Rule("FORWARD", ("-o", iface, "-j", c),
                f"forwarded traffic leaving through the unprotected interface {iface}")
    return Table("filter", tuple(n for n, _ in chains), (jump,), (*rules, *sub), tuple(chains))


def _leak_rules(cfg: Config, c: str, comp: CompartmentConfig, v6: bool) -> list[Rule]:
    """The leak guard of one compartment's policies: bypass may leave, the rest is dropped."""
    rules: list[Rule] = []
    mine = set(comp.policies)
    for i, pol in _policies(cfg, v6):
        if not pol.direction.covers(True) or pol.name not in mine:
            continue
        if pol.action is Action.BYPASS:
            target, what, reason = "RETURN", "bypass: may leave in cleartext", ""
        elif pol.action is Action.PROTECT:
            target, what, reason = "DROP", "protect: cleartext that escaped the queue", "leak_guard"
        else:
            target, what, reason = "DROP", "discard", "policy_discard"
        rules.append(Rule(c, (*selector_args(pol.selector, outbound=True, v6=v6), "-j", target),
                          f"policy[{i}] {pol.name!r}, forwarded: {what}", reason))
    return rules


def selector_args(sel: Selector, outbound: bool, v6: bool = False) -> tuple[str, ...]:
    """iptables arguments matching ``sel`` (outbound: source = local; inbound: reversed), in the
    order iptables-save prints them."""
    src, dst = (sel.local, sel.remote) if outbound else (sel.remote, sel.local)
    sports, dports = (
        (sel.local_ports, sel.remote_ports) if outbound else (sel.remote_ports, sel.local_ports)
    )
    args: list[str] = []
    args += _net("-s", src)
    args += _net("-d", dst)
    proto = sel.protocol
    if proto is None:
        return tuple(args)
    if proto == 0:
        # "-p 0" means "all protocols" to iptables; match the header byte instead (IPv6:
        # the next header of the fixed header, hop-by-hop options).
        return (*args, "-m", "u32", "--u32", "0x4>>0x8&0xff=0x0" if v6 else "0x6&0xff=0x0")
    args += ["-p", _PROTO_NAMES.get(proto, str(proto))]
    if proto == 1:
        args += _icmp_args(sel.icmp_type, sel.icmp_code)
    elif proto == 58:
        args += _icmp6_args(sel.icmp_type, sel.icmp_code)
    elif proto in _PORT_PROTOCOLS:
        ports = [*_port("--sport", sports), *_port("--dport", dports)]
        if ports:
            args += ["-m", _PROTO_NAMES[proto], *ports]
    return tuple(args)


# -- ICMP errors: matched by the packet they quote (RFC 4301 section 6.2) --------------------

_AT_ICMP = "0x0>>0x16&0x3c@"  # u32: to the ICMP header (the outer IHL)
_AT_QUOTED_L4 = _AT_ICMP + "0x8>>0x16&0x3c@"  # then past the quoted IP header (minus 8)
_IS_ICMP_ERROR = f"{_AT_ICMP}0x0>>0x18=" + ",".join(f"0x{t:x}" for t in sorted(ICMP_ERROR_TYPES))


def quoted_args(sel: Selector, quoted_outbound: bool) -> tuple[str, ...]:
    """iptables arguments matching an ICMP error whose quoted packet matches ``sel``
    (``quoted_outbound``: the quoted packet is one this side sent). A u32 match written the way
    iptables-save prints it; the quote is read at the offsets of RFC 792 (the outer header,
    8 bytes of ICMP, the quoted IPv4 header, its first 8 bytes)."""
    src, dst = (sel.local, sel.remote) if quoted_outbound else (sel.remote, sel.local)
    sports, dports = (
        (sel.local_ports, sel.remote_ports) if quoted_outbound else (sel.remote_ports, sel.local_ports)
    )
    tests = [_IS_ICMP_ERROR]
    for offset, net in ((0x14, src), (0x18, dst)):
        if net.prefixlen:
            tests.append(f"{_AT_ICMP}0x{offset:x}&0x{int(net.netmask):x}=0x{int(net.network_address):x}")
    proto = sel.protocol
    if proto is not None:
        tests.append(f"{_AT_ICMP}0x10>>0x10&0xff=0x{proto:x}")
        if proto == 1:
            if sel.icmp_type is not None:
                tests.append(f"{_AT_QUOTED_L4}0x8>>0x18=0x{sel.icmp_type:x}")
            if sel.icmp_code is not None:
                tests.append(f"{_AT_QUOTED_L4}0x8>>0x10&0xff=0x{sel.icmp_code:x}")
        elif proto in _PORT_PROTOCOLS:
            for shift, rng in ((">>0x10", sports), ("&0xffff", dports)):
                if rng is not None and rng != (0, 0xFFFF):
                    lo, hi = rng
                    value = f"0x{lo:x}" if lo == hi else f"0x{lo:x}:0x{hi:x}"
                    tests.append(f"{_AT_QUOTED_L4}0x8{shift}={value}")
    return ("-p", "icmp", "!", "-f", "-m", "u32", "--u32", "&&".join(tests))


def quoted_esp_args(spi: int, frag_needed: bool = False) -> tuple[str, ...]:
    """An ICMP error that quotes ESP of the given SPI (one of ours: RFC 4301 section 8);
    ``frag_needed``: only "fragmentation needed" (type 3 code 4, a path MTU report)."""
    kind = f"{_AT_ICMP}0x0>>0x10=0x304" if frag_needed else _IS_ICMP_ERROR
    return ("-p", "icmp", "!", "-f", "-m", "u32", "--u32",
            f"{kind}&&{_AT_ICMP}0x10>>0x10&0xff=0x32&&{_AT_QUOTED_L4}0x8=0x{spi:x}")


def _icmp_error_rules(cfg: Config, chain: str, where: str, v6: bool = False) -> list[Rule]:
    """ICMP errors about the flows of each policy, before the SPD proper, so a kernel's error
    about a protected packet goes the way of that packet's flow (its SA) instead of leaving in
    clear by its own header. ``where``: "out" and "fwd" (errors leaving: about packets that came
    in), "leak" (forwarded errors on the unprotected interface), "in" (errors arriving in clear:
    about packets this side sent)."""
    p = cfg.daemon.chain_prefix
    incoming = where == "in"
    rules: list[Rule] = []
    if incoming and v6:
        for sa in _sas(cfg, True):
            if sa.direction is SADirection.OUT:
                rules.append(Rule(chain, (*quoted_esp6_args(sa.spi), "-j", "RETURN"),
                                  f"ICMPv6 error about ESP of outbound SA {sa.name!r}: accepted "
                                  "(the kernel acts on it)"))
    elif incoming:
        for sa in _sas(cfg, False):
            if sa.direction is SADirection.OUT:
                rules.append(Rule(
                    chain, (*quoted_esp_args(sa.spi, frag_needed=True), "-j", "NFQUEUE",
                            "--queue-num", str(sa.queue)),
                    f"path MTU report about ESP of outbound SA {sa.name!r}: to its owner, queue "
                    f"{sa.queue}, which sets the SA's path MTU (RFC 4301 section 8.2)"))
                rules.append(Rule(chain, (*quoted_esp_args(sa.spi), "-j", "RETURN"),
                                  f"other ICMP error about ESP of outbound SA {sa.name!r} "
                                  "(unreachable, time exceeded): accepted"))
    for i, pol in _policies(cfg, v6):
        # the quoted packet travelled the other way: inbound for errors leaving, and back
        if not pol.direction.covers(incoming):
            continue
        args = (quoted6_args if v6 else quoted_args)(pol.selector, incoming)
        what = f"ICMP error about a flow of policy[{i}] {pol.name!r}"
        if pol.action is Action.BYPASS:
            rules.append(Rule(chain, (*args, "-j", "RETURN"), f"{what}: bypass, as the flow"))
        elif pol.action is Action.DISCARD:
            rules.append(Rule(chain, (*args, "-j", "DROP"), f"{what}: discard, as the flow",
                              "policy_discard"))
        elif incoming:
            rules.append(Rule(chain, (*args, "-j", "DROP"), f"{what}: protect, so not in clear",
                              "cleartext_protected"))
        elif where == "leak":
            rules.append(Rule(chain, (*args, "-j", "DROP"), f"{what}: protect: escaped the queue",
                              "leak_guard"))
        elif pol.direction.covers(True) and cfg.outbound_sas(pol):
            rules.append(Rule(chain, (*args, "-j", chain_protect(p, i)),
                              f"{what}: protect, through the flow's SA (HMARK hashes the "
                              "quoted header, so the same SA as the flow)"))
        else:
            rules.append(Rule(chain, (*args, "-j", "DROP"), f"{what}: protect, no outbound SA",
                              "no_sa"))
    return rules


def _net(flag: str, net: Network) -> list[str]:
    return [flag, str(net)] if net.prefixlen else []


def _port(flag: str, rng: tuple[int, int] | None) -> list[str]:
    if rng is None or rng == (0, 0xFFFF):
        return []
    lo, hi = rng
    return [flag, str(lo) if lo == hi else f"{lo}:{hi}"]


def _icmp_args(icmp_type: int | None, icmp_code: int | None) -> list[str]:
    if icmp_type is None and icmp_code is None:
        return []
    if icmp_type is not None and icmp_type != 0xFF:
        value = str(icmp_type) if icmp_code is None else f"{icmp_type}/{icmp_code}"
        return ["-m", "icmp", "--icmp-type", value]
    # The icmp match can't say "any type, this code", and it reads type 255 as "any type":
    # look at the ICMP header with u32 (IHL*4 bytes in; ! -f: only where the header is).
    if icmp_type is None:
        expr = f"0x0>>0x16&0x3c@0x0>>0x10&0xff=0x{icmp_code:x}"
    elif icmp_code is None:
        expr = f"0x0>>0x16&0x3c@0x0>>0x18=0x{icmp_type:x}"
    else:
        expr = f"0x0>>0x16&0x3c@0x0>>0x10=0x{icmp_type << 8 | icmp_code:x}"
    return ["!", "-f", "-m", "u32", "--u32", expr]


def _header(cfg: Config, v6: bool = False) -> tuple[str, ...]:
    node, d = cfg.node, cfg.daemon
    name = cfg.path.name if cfg.path is not None else "(configuration)"
    return (
        f"nfq-ipsec {'ip6tables' if v6 else 'iptables'} rules for {name}",
        f"node: interface {node.interface or 'all but lo'}, role {node.role}, default "
        f"{node.default_action.value}, mtu {node.mtu}; queues "
        f"{', '.join(map(str, cfg.queue_numbers))}; reinject mark 0x{d.mark:08x}",
        f"Every chain is named {d.chain_prefix}-*; each built-in chain gets one jump, at "
        "position 1. No --queue-bypass: a queue without a worker drops its packets (fail closed).",
        "Install with `nfq-ipsec rules install --config FILE`: it applies this with "
        "iptables-restore --noflush (one transaction per table) and removes any earlier copy in "
        "the same transaction. Restoring this text by hand twice would add a second jump.",
    )


# -- closed: the daemon is stopped ------------------------------------------------------------

STOPPED_REASON = "daemon_stopped"


def close(rs: Ruleset) -> Ruleset:
    """``rs`` with every NFQUEUE rule dropping instead: what a stopped daemon leaves behind, so
    protected traffic is dropped (and counted) while no worker runs, never sent in clear. The
    next ``run`` replaces it with the live ruleset in one transaction; only ``rules remove``
    takes the boundary away."""
    def closed(r: Rule) -> Rule:
        if "NFQUEUE" not in r.args:
            return r
        cut = r.args.index("-j")
        return Rule(r.chain, (*r.args[:cut], "-j", "DROP"),
                    f"daemon stopped, dropped (running: {r.comment})", STOPPED_REASON)

    tables = tuple(
        Table(t.name, t.chains, t.jumps, tuple(closed(r) for r in t.rules), t.chain_comments)
        for t in rs.tables
    )
    header = (*rs.header, "CLOSED: the daemon is stopped; every rule that queues to a worker "
              "drops instead, so protected traffic is dropped, not sent in clear.")
    return Ruleset(rs.prefix, tables, header, rs.family)


# -- IPv6 ----------------------------------------------------------------------------------

def build6(cfg: Config) -> Ruleset | None:
    """The ip6tables rules: :func:`build` with the IPv6 policies and the SAs whose ESP travels
    in IPv6, the same chains and layout. With ``node.default = bypass`` and nothing IPv6 in the
    configuration there are no rules (IPv6 passes): None."""
    if rules_v6_absent(cfg):
        return None
    return build(cfg, v6=True)


def rules_v6_absent(cfg: Config) -> bool:
    return (cfg.node.default_action is not Action.DISCARD and not _policies(cfg, True)
            and not _sas(cfg, True))


def ipv6_summary(cfg: Config) -> str:
    """One line on what happens to IPv6 (check-config, status)."""
    if rules_v6_absent(cfg):
        return "passes in clear: node.default = bypass and no policy or SA is IPv6"
    link = ("neighbour discovery and MLD pass in clear (node.ipv6_neighbour_discovery = false "
            "turns that off)" if cfg.node.ipv6_neighbour_discovery else
            "neighbour discovery and MLD follow the policies (node.ipv6_neighbour_discovery = "
            "false)")
    n, m = len(_policies(cfg, True)), len(_sas(cfg, True))
    return (f"{n} polic{'y' if n == 1 else 'ies'}, {m} SA{'' if m == 1 else 's'} with ESP in "
            f"IPv6, the rest by node.default = {cfg.node.default_action.value}; {link}")


_ND_NAMES = {133: "router solicitation", 134: "router advertisement",
             135: "neighbour solicitation", 136: "neighbour advertisement", 137: "redirect"}
_MLD_NAMES = {130: "MLD query", 131: "MLD report", 132: "MLD done", 143: "MLDv2 report"}


def _link_rules(cfg: Config, chain: str) -> list[Rule]:
    """Neighbour discovery (hop limit 255, RFC 4861) and MLD (hop limit 1, RFC 3810) in clear,
    before any policy: without them the IPv6 link dies. The processor passes them too."""
    if not cfg.node.ipv6_neighbour_discovery:
        return []
    rules = []
    for types, hl in ((sorted(ND_TYPES), "255"), (sorted(MLD_TYPES), "1")):
        for t in types:
            name = _ND_NAMES.get(t) or _MLD_NAMES.get(t, str(t))
            rules.append(Rule(chain, ("-p", "ipv6-icmp", "-m", "icmp6", "--icmpv6-type", str(t),
                                      "-m", "hl", "--hl-eq", hl, "-j", "RETURN"),
                              f"{name} (hop limit {hl}): node.ipv6_neighbour_discovery"))
    return rules


_IS_ICMPV6 = "0x4>>0x8&0xff=0x3a"  # u32: the fixed header's next header is ICMPv6
_IS_ICMPV6_ERROR = (f"{_IS_ICMPV6}&&0x28>>0x18=0x{min(ICMPV6_ERROR_TYPES):x}:"
                    f"0x{max(ICMPV6_ERROR_TYPES):x}")
_Q6_SRC, _Q6_DST, _Q6_NH, _Q6_L4 = 0x38, 0x48, 0x34, 0x58  # in an error: 40 + 8 + the quote's


def _words6(offset: int, net: Network) -> list[str]:
    """u32 tests that a 128-bit address at ``offset`` is in ``net``, one per 32-bit word."""
    tests = []
    mask, value = int(net.netmask), int(net.network_address)
    for k in range(4):
        shift = 96 - 32 * k
        word_mask = (mask >> shift) & 0xFFFFFFFF
        if word_mask:
            tests.append(f"0x{offset + 4 * k:x}&0x{word_mask:x}="
                         f"0x{(value >> shift) & 0xFFFFFFFF:x}")
    return tests


def quoted6_args(sel: Selector, quoted_outbound: bool) -> tuple[str, ...]:
    """:func:`quoted_args` for ICMPv6 (RFC 4443): an error whose quoted packet matches ``sel``,
    read at fixed offsets (the error and the quote without extension headers)."""
    src, dst = (sel.local, sel.remote) if quoted_outbound else (sel.remote, sel.local)
    sports, dports = (
        (sel.local_ports, sel.remote_ports) if quoted_outbound else (sel.remote_ports, sel.local_ports)
    )
    tests = [*_IS_ICMPV6_ERROR.split("&&"), *_words6(_Q6_SRC, src), *_words6(_Q6_DST, dst)]
    proto = sel.protocol
    if proto is not None:
        tests.append(f"0x{_Q6_NH:x}>>0x8&0xff=0x{proto:x}")
        if proto == 58:
            if sel.icmp_type is not None:
                tests.append(f"0x{_Q6_L4:x}>>0x18=0x{sel.icmp_type:x}")
            if sel.icmp_code is not None:
                tests.append(f"0x{_Q6_L4:x}>>0x10&0xff=0x{sel.icmp_code:x}")
        elif proto in _PORT_PROTOCOLS:
            for shift, rng in ((">>0x10", sports), ("&0xffff", dports)):
                if rng is not None and rng != (0, 0xFFFF):
                    lo, hi = rng
                    value = f"0x{lo:x}" if lo == hi else f"0x{lo:x}:0x{hi:x}"
                    tests.append(f"0x{_Q6_L4:x}{shift}={value}")
    return ("-p", "ipv6-icmp", *_u32(tests))


def _u32(tests: list[str]) -> tuple[str, ...]:
    """u32 matches of ``tests``, all of which must hold: one match takes at most
    ``U32_TESTS``, so a longer list (two IPv6 prefixes: up to eight words) takes several."""
    out: list[str] = []
    for k in range(0, len(tests), U32_TESTS):
        out += ["-m", "u32", "--u32", "&&".join(tests[k : k + U32_TESTS])]
    return tuple(out)


U32_TESTS = 10  # the tests one u32 match holds (XT_U32_MAXSIZE)


def quoted_esp6_args(spi: int) -> tuple[str, ...]:
    """An ICMPv6 error that quotes ESP of the given SPI (one of ours)."""
    return ("-p", "ipv6-icmp", "-m", "u32", "--u32",
            f"{_IS_ICMPV6_ERROR}&&0x{_Q6_NH:x}>>0x8&0xff=0x32&&0x{_Q6_L4:x}=0x{spi:x}")


def _icmp6_args(icmp_type: int | None, icmp_code: int | None) -> list[str]:
    if icmp_type is None and icmp_code is None:
        return []
    if icmp_type is not None and icmp_type != 0xFF:
        value = str(icmp_type) if icmp_code is None else f"{icmp_type}/{icmp_code}"
        return ["-m", "icmp6", "--icmpv6-type", value]
    # as _icmp_args: u32 where the icmp6 match can't say it (no extension headers)
    if icmp_type is None:
        expr = f"{_IS_ICMPV6}&&0x28>>0x10&0xff=0x{icmp_code:x}"
    elif icmp_code is None:
        expr = f"{_IS_ICMPV6}&&0x28>>0x18=0x{icmp_type:x}"
    else:
        expr = f"{_IS_ICMPV6}&&0x28>>0x10=0x{icmp_type << 8 | icmp_code:x}"
    return ["-m", "u32", "--u32", expr]


# -- rendering --------------------------------------------------------------------------------

def render(cfg: Config, comments: bool = True) -> str:
    """The ruleset in iptables-restore syntax (``--noflush``), one ``*table ... COMMIT`` each."""
    return render_ruleset(build(cfg), comments)


def render_ruleset(rs: Ruleset, comments: bool = True) -> str:
    lines: list[str] = []

    def note(text: str) -> None:
        if comments and text:
            lines.extend(textwrap.wrap(text, COMMENT_WIDTH, initial_indent="# ",
                                       subsequent_indent="#   ", break_on_hyphens=False))

    for h in rs.header:
        note(h)
    for t in rs.tables:
        lines.append(f"*{t.name}")
        notes = dict(t.chain_comments)
        for c in t.chains:
            note(f"{c}: {notes.get(c, '')}")
            lines.append(f":{c} - [0:0]")
        for j in t.jumps:
            note(f"jump first: {j.comment}")
            lines.append(f"-I {j.chain} 1 {j.spec()}")
        for r in t.rules:
            note(r.comment)
            lines.append(r.line())
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


# -- what is installed (parsed iptables-save output) ------------------------------------------

@dataclass(frozen=True)
class SavedRule:
    chain: str
    spec: str  # the text after "-A CHAIN ", verbatim

    def tokens(self) -> tuple[str, ...]:
        return split_spec(self.spec)

    def target(self) -> str | None:
        toks = self.tokens()
        for i, tok in enumerate(toks[:-1]):
            if tok in ("-j", "--jump", "-g", "--goto"):
                return toks[i + 1]
        return None


@dataclass
class SavedTable:
    name: str
    chains: dict[str, str] = field(default_factory=dict)  # name -> policy ("-" for user chains)
    rules: list[SavedRule] = field(default_factory=list)

    def builtin(self, chain: str) -> bool:
        return self.chains.get(chain, "-") != "-"


def split_spec(spec: str) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(spec))
    except ValueError:
        return tuple(spec.split())


def parse_save(text: str) -> dict[str, SavedTable]:
    """Parse iptables-save output into tables (comments and counters ignored)."""
    tables: dict[str, SavedTable] = {}
    current: SavedTable | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = tables.setdefault(line[1:], SavedTable(line[1:]))
        elif current is None:
            continue
        elif line == "COMMIT":
            current = None
        elif line.startswith(":"):
            parts = line[1:].split()
            current.chains[parts[0]] = parts[1] if len(parts) > 1 else "-"
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            current.rules.append(SavedRule(chain, rest[0] if rest else ""))
    return tables


@dataclass(frozen=True)
class Found:
    """Our chains and our jumps as found in one table."""

    table: str
    chains: tuple[str, ...]
    jumps: tuple[SavedRule, ...]  # rules in built-in chains that target one of our chains
    foreign: tuple[SavedRule, ...]  # rules in someone else's chains that target ours


def find_ours(prefix: str, tables: dict[str, SavedTable]) -> dict[str, Found]:
    out: dict[str, Found] = {}
    for name, t in tables.items():
        ours = tuple(c for c in t.chains if is_our_chain(prefix, c))
        jumps: list[SavedRule] = []
        foreign: list[SavedRule] = []
        for r in t.rules:
            target = r.target()
            if target is None or not is_our_chain(prefix, target) or is_our_chain(prefix, r.chain):
                continue
            (jumps if t.builtin(r.chain) else foreign).append(r)
        if ours or jumps or foreign:
            out[name] = Found(name, ours, tuple(jumps), tuple(foreign))
    return out


class PlanError(ValueError):
    """The installed state can't be changed safely (someone else's rule uses our chains)."""


def _check_foreign(found: Iterable[Found]) -> None:
    bad = [f"*{f.table}: -A {r.chain} {r.spec}" for f in found for r in f.foreign]
    if bad:
        raise PlanError(
            "rules in chains that are not ours jump to our chains; remove them first: " + "; ".join(bad)
        )


def _cleanup(f: Found, keep: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """Lines that flush our chains, delete the jumps into them and delete unneeded chains."""
    flush = [f":{c} - [0:0]" for c in f.chains if c not in keep]
    delete_jumps = [f"-D {r.chain} {r.spec}" for r in f.jumps]
    delete_chains = [f"-X {c}" for c in f.chains if c not in keep]
    return flush, delete_jumps, delete_chains


def plan_install(rs: Ruleset, tables: dict[str, SavedTable]) -> str:
    """An iptables-restore --noflush script that replaces whatever we had installed (after a
    crash, an older configuration, a duplicate jump) with ``rs``, in one transaction per table."""
    found = find_ours(rs.prefix, tables)
    _check_foreign(found.values())
    out: list[str] = []
    for name in TABLES:
        new = rs.table(name)
        old = found.get(name)
        if new is None and old is None:
            continue
        keep = new.chains if new is not None else ()
        flush, delete_jumps, delete_chains = _cleanup(old, keep) if old else ([], [], [])
        out.append(f"*{name}")
        if new is not None:
            out += [f":{c} - [0:0]" for c in new.chains]  # creates it, or flushes it
        out += flush + delete_jumps + delete_chains
        if new is not None:
            out += [f"-I {j.chain} 1 {j.spec()}" for j in new.jumps]
            out += [r.line() for r in new.rules]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def plan_remove(prefix: str, tables: dict[str, SavedTable]) -> str:
    """An iptables-restore --noflush script that removes all we installed; "" if nothing is."""
    found = find_ours(prefix, tables)
    _check_foreign(found.values())
    out: list[str] = []
    for name in TABLES:
        old = found.get(name)
        if old is None:
            continue
        flush, delete_jumps, delete_chains = _cleanup(old, ())
        out += [f"*{name}", *flush, *delete_jumps, *delete_chains, "COMMIT"]
    return "\n".join(out) + "\n" if out else ""

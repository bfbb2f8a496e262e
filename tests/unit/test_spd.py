"""Security Policy Database (RFC 4301 section 4.4.1): ordered, first match wins, no match = None.

The lookup is compared with a brute-force reference written with ``ipaddress`` objects and
the RFC's selector semantics (the selectors the configuration loader admits: ports only with
TCP/UDP/SCTP, ICMP type/code only with ICMP).
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from hypothesis import given, settings
from hypothesis import strategies as st

from nfq_ipsec.core import SPD, Action, Direction, Policy, Selector
from nfq_ipsec.core.packet import PacketKey

PORT_PROTOS = (6, 17, 132)


def n(text: str) -> IPv4Network:
    return IPv4Network(text)


def key(src: str, dst: str, proto: int = 6, sport: int | None = 1000, dport: int | None = 80) -> PacketKey:
    return PacketKey(int(IPv4Address(src)), int(IPv4Address(dst)), proto, sport, dport)


# --- reference ------------------------------------------------------------------------------


def ref_matches(sel: Selector, k: PacketKey, outbound: bool) -> bool:
    src, dst = IPv4Address(k.src), IPv4Address(k.dst)
    local, remote = (src, dst) if outbound else (dst, src)
    lport, rport = (k.sport, k.dport) if outbound else (k.dport, k.sport)
    if local not in sel.local or remote not in sel.remote:
        return False
    if sel.protocol is None:
        return True
    if k.protocol != sel.protocol:
        return False
    if sel.protocol == 1:  # ICMP: the key's "ports" are type and code, in that order
        return (sel.icmp_type is None or k.sport == sel.icmp_type) and (
            sel.icmp_code is None or k.dport == sel.icmp_code)
    for port, rng in ((lport, sel.local_ports), (rport, sel.remote_ports)):
        if rng is not None and (port is None or not rng[0] <= port <= rng[1]):
            return False
    return True


def ref_lookup(policies: list[Policy], k: PacketKey, outbound: bool) -> Policy | None:
    for p in policies:
        covers = p.direction is Direction.BOTH or (p.direction is Direction.OUT) == outbound
        if covers and ref_matches(p.selector, k, outbound):
            return p
    return None


# --- examples -------------------------------------------------------------------------------


def test_first_match_wins_and_no_match_is_none() -> None:
    specific = Policy("ssh", Selector(n("10.0.0.1/32"), n("10.0.0.0/24"), 6, None, (22, 22)), Action.BYPASS)
    general = Policy("lan", Selector(n("10.0.0.1/32"), n("10.0.0.0/24")), Action.PROTECT, sa_names=("a",))
    spd = SPD([specific, general])
    assert spd.lookup(key("10.0.0.1", "10.0.0.9", 6, 5000, 22), True) is specific
    assert spd.lookup(key("10.0.0.1", "10.0.0.9", 6, 5000, 23), True) is general
    assert spd.lookup(key("10.0.0.1", "10.0.1.9"), True) is None
    # Order matters: the other way round the general policy shadows the specific one.
    assert SPD([general, specific]).lookup(key("10.0.0.1", "10.0.0.9", 6, 5000, 22), True) is general


def test_inbound_view_swaps_local_and_remote() -> None:
    pol = Policy("web", Selector(n("10.0.0.1/32"), n("10.0.0.2/32"), 6, (80, 80), None), Action.PROTECT)
    spd = SPD([pol])
    assert spd.lookup(key("10.0.0.1", "10.0.0.2", 6, 80, 40000), True) is pol
    assert spd.lookup(key("10.0.0.2", "10.0.0.1", 6, 40000, 80), False) is pol
    assert spd.lookup(key("10.0.0.2", "10.0.0.1", 6, 80, 40000), False) is None


def test_direction_restricted_policies() -> None:
    out_only = Policy("o", Selector(), Action.DISCARD, Direction.OUT)
    in_only = Policy("i", Selector(), Action.BYPASS, Direction.IN)
    spd = SPD([out_only, in_only])
    assert spd.lookup(key("1.2.3.4", "5.6.7.8"), True) is out_only
    assert spd.lookup(key("1.2.3.4", "5.6.7.8"), False) is in_only


def test_icmp_type_and_code() -> None:
    echo = Policy("echo", Selector(protocol=1, icmp_type=8), Action.BYPASS)
    unreach = Policy("frag-needed", Selector(protocol=1, icmp_type=3, icmp_code=4), Action.BYPASS)
    spd = SPD([echo, unreach])
    assert spd.lookup(key("1.1.1.1", "2.2.2.2", 1, 8, 0), True) is echo
    assert spd.lookup(key("1.1.1.1", "2.2.2.2", 1, 3, 4), True) is unreach
    assert spd.lookup(key("1.1.1.1", "2.2.2.2", 1, 3, 1), True) is None
    assert spd.lookup(key("1.1.1.1", "2.2.2.2", 6, 8, 0), True) is None  # TCP is not ICMP


def test_port_selector_does_not_match_missing_ports() -> None:
    # Non-first fragments and truncated transport headers have no ports (PacketKey None).
    pol = Policy("dns", Selector(protocol=17, remote_ports=(53, 53)), Action.BYPASS)
    assert SPD([pol]).lookup(key("1.1.1.1", "2.2.2.2", 17, None, None), True) is None
    anyport = Policy("udp", Selector(protocol=17), Action.BYPASS)
    assert SPD([anyport]).lookup(key("1.1.1.1", "2.2.2.2", 17, None, None), True) is anyport


def test_empty_spd() -> None:
    assert SPD([]).lookup(key("1.1.1.1", "2.2.2.2"), True) is None
    assert len(SPD([])) == 0


# --- model-based ----------------------------------------------------------------------------

ADDRS = ["10.0.0.1", "10.0.0.2", "10.0.1.7", "10.1.0.1", "192.0.2.1", "198.51.100.9", "0.0.0.0",
         "255.255.255.255"]


@st.composite
def networks(draw: st.DrawFn) -> IPv4Network:
    addr = draw(st.sampled_from(ADDRS))
    prefix = draw(st.sampled_from([0, 8, 16, 23, 24, 31, 32]))
    return IPv4Network(f"{addr}/{prefix}", strict=False)


@st.composite
def selectors(draw: st.DrawFn) -> Selector:
    proto = draw(st.sampled_from([None, 1, 6, 17, 132, 50]))
    lports = rports = None
    itype = icode = None
    if proto in PORT_PROTOS:
        ranges = st.one_of(st.none(), st.tuples(st.integers(0, 100), st.integers(0, 100)).map(
            lambda t: (min(t), max(t))))
        lports, rports = draw(ranges), draw(ranges)
    elif proto == 1:
        itype = draw(st.one_of(st.none(), st.integers(0, 9)))
        icode = draw(st.one_of(st.none(), st.integers(0, 3)))
    return Selector(draw(networks()), draw(networks()), proto, lports, rports, itype, icode)


@st.composite
def packet_keys(draw: st.DrawFn) -> PacketKey:
    proto = draw(st.sampled_from([1, 6, 17, 132, 50, 47]))
    if proto in PORT_PROTOS or proto == 1:
        sport = draw(st.one_of(st.none(), st.integers(0, 100)))
        dport = draw(st.one_of(st.none(), st.integers(0, 100))) if sport is not None else None
    else:
        sport = dport = None
    addrs = st.one_of(st.sampled_from(ADDRS), st.integers(0, 2**32 - 1).map(lambda i: str(IPv4Address(i))))
    src, dst = draw(addrs), draw(addrs)
    return PacketKey(int(IPv4Address(src)), int(IPv4Address(dst)), proto, sport, dport)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(selectors(), st.sampled_from(list(Action)), st.sampled_from(list(Direction))),
             max_size=8),
    st.lists(packet_keys(), min_size=1, max_size=10),
)
def test_lookup_agrees_with_brute_force(
    raw: list[tuple[Selector, Action, Direction]], keys: list[PacketKey],
) -> None:
    policies = [Policy(f"p{i}", sel, act, d) for i, (sel, act, d) in enumerate(raw)]
    spd = SPD(policies)
    for k in keys:
        for outbound in (True, False):
            assert spd.lookup(k, outbound) is ref_lookup(policies, k, outbound), (k, outbound)

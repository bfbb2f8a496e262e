"""The SPD's indexed lookup: the same answer as a first-match scan, without scanning everything.

Every check runs on three builds of the same policy list: as the SPD chooses (linear scan for
small views, tuple-space index for large ones), and forced to each of the two. The reference is
a brute-force first match over the list with :meth:`Selector.matches`, written here. Whether a
lookup scans is checked by counting the operations it does on the key's fields (an ``int``
subclass that counts), never by timing.
"""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nfq_ipsec import corebuild
from nfq_ipsec.core import SPD, Action, Direction, Policy, Selector, ipv6
from nfq_ipsec.core import spd as spd_module
from nfq_ipsec.core.packet import PacketKey
from nfq_ipsec.core.spd import Network

MODES = ("auto", "index", "linear")
LOCAL = "192.0.2.10"


def build(policies: list[Policy], mode: str = "auto") -> SPD:
    return SPD(policies, index=None if mode == "auto" else mode == "index")


def reference(policies: list[Policy], k: PacketKey, outbound: bool) -> Policy | None:
    v6 = k.src > 0xFFFFFFFF  # an IPv6 key: its addresses carry the marker bit
    for p in policies:
        if p.direction.covers(outbound) and (
                p.selector.matches6(k, outbound) if v6 else p.selector.matches(k, outbound)):
            return p
    return None


def a(text: str) -> int:
    return int(IPv4Address(text))


def key(src: str, dst: str, proto: int = 6, sport: int | None = 40000, dport: int | None = 443) -> PacketKey:
    return PacketKey(a(src), a(dst), proto, sport, dport)


def remote(i: int, prefix: int = 32) -> IPv4Network:
    """The i-th of consecutive distinct /prefix networks from 10.0.0.0 on."""
    return IPv4Network((a("10.0.0.0") + (i << (32 - prefix)), prefix))


def host_spd(n: int, prefix: int = 32, **protect: Any) -> list[Policy]:
    """A large host SPD: IKE bypass, ``n`` protect policies for distinct remotes, discard all."""
    ike = Policy("ike", Selector(protocol=17, local_ports=(500, 500)), Action.BYPASS)
    protects = [Policy(f"p{i}", Selector(IPv4Network(f"{LOCAL}/32"), remote(i, prefix), **protect),
                       Action.PROTECT, sa_names=(f"sa{i}",)) for i in range(n)]
    return [ike, *protects, Policy("discard", Selector(), Action.DISCARD)]


# -- model-based -----------------------------------------------------------------------------

# Few addresses, nested in each other's prefixes, and the common prefix lengths: policies share
# buckets and groups interleave in list order, which is where an index could lose the order.
ADDRS = ["192.0.2.10", "192.0.2.11", "10.0.0.1", "10.0.0.2", "10.0.1.7", "10.1.0.1", "0.0.0.0",
         "255.255.255.255"]
PREFIXES = [0, 16, 32]
any_addr = st.integers(0, 2**32 - 1).map(lambda i: str(IPv4Address(i)))


@st.composite
def networks(draw: st.DrawFn) -> IPv4Network:
    common = draw(st.integers(0, 5)) > 0
    addr = draw(st.sampled_from(ADDRS) if common else any_addr)
    prefix = draw(st.sampled_from(PREFIXES) if common else st.integers(0, 32))
    return IPv4Network(f"{addr}/{prefix}", strict=False)


PORT_EDGES = [0, 1, 22, 53, 500, 4500, 65534, 65535]
ports = st.one_of(st.sampled_from(PORT_EDGES), st.integers(0, 65535))
ranges = st.one_of(st.none(), st.tuples(ports, ports).map(lambda t: (min(t), max(t))),
                   ports.map(lambda p: (p, p)))
PROTOCOLS = [None, None, 0, 1, 6, 17, 132, 47, 50]


@st.composite
def selectors(draw: st.DrawFn) -> Selector:
    local, remote = draw(networks()), draw(networks())
    if draw(st.booleans()):  # addresses only, like most protect policies: many keys match
        return Selector(local, remote)
    proto = draw(st.sampled_from(PROTOCOLS))
    lports = rports = None
    itype = icode = None
    if proto in (None, 6, 17, 132):
        lports, rports = draw(ranges), draw(ranges)
    if proto in (None, 1, 6):  # ICMP fields only count for ICMP; elsewhere they must be ignored
        itype = draw(st.one_of(st.none(), st.integers(0, 10), st.just(255)))
        icode = draw(st.one_of(st.none(), st.integers(0, 4), st.just(255)))
    return Selector(local, remote, proto, lports, rports, itype, icode)


_entries = st.tuples(selectors(), st.sampled_from(list(Action)), st.sampled_from(list(Direction)))
# Short lists, and long ones (plain st.lists stays short): long enough that groups interleave.
policy_lists = st.one_of(st.lists(_entries, max_size=7), st.lists(_entries, min_size=8, max_size=40)).map(
    lambda raw: [Policy(f"p{i}", sel, act, d) for i, (sel, act, d) in enumerate(raw)])


def _inside(draw: st.DrawFn, net: Network) -> int:
    """An address in ``net``: often one of ADDRS (inside many prefixes at once), if one is."""
    pool = [addr for addr in map(IPv4Address, ADDRS) if addr in net]
    if pool and draw(st.booleans()):  # type: ignore[arg-type]
        return int(draw(st.sampled_from(pool)))
    return int(net.network_address) + draw(st.integers(0, net.num_addresses - 1))


def _port(draw: st.DrawFn, rng: tuple[int, int] | None, exact: int | None) -> int | None:
    """Often a value the selector accepts, else any port, an ICMP-sized value or none."""
    if rng is not None and draw(st.booleans()):
        return draw(st.integers(*rng))
    if exact is not None and draw(st.booleans()):
        return exact
    return draw(st.one_of(st.none(), ports, st.integers(0, 255)))


@st.composite
def keys_for(draw: st.DrawFn, policies: list[Policy]) -> tuple[PacketKey, bool]:
    """A key and a direction, mostly built to fall inside some policy's selector."""
    outbound = draw(st.booleans())
    if policies and draw(st.integers(0, 5)):  # type: ignore[arg-type]
        sel = draw(st.sampled_from(policies)).selector
        local, rem = _inside(draw, sel.local), _inside(draw, sel.remote)
        proto = sel.protocol if sel.protocol is not None and draw(st.integers(0, 5)) else None
        lport = _port(draw, sel.local_ports, sel.icmp_type)
        rport = _port(draw, sel.remote_ports, sel.icmp_code)
    else:
        local, rem = draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1))
        proto = None
        lport, rport = _port(draw, None, None), _port(draw, None, None)
    if proto is None:
        proto = draw(st.sampled_from([0, 1, 6, 17, 132, 47, 50]))
    if proto == 1:  # type and code, in that order whatever the direction
        sport, dport = lport, rport
    else:
        sport, dport = (lport, rport) if outbound else (rport, lport)
    src, dst = (local, rem) if outbound else (rem, local)
    return PacketKey(src, dst, proto, sport, dport), outbound


@settings(max_examples=200, deadline=None)
@given(st.data(), policy_lists)
def test_indexed_lookup_is_the_first_match(data: st.DataObject, policies: list[Policy]) -> None:
    spds = {mode: build(policies, mode) for mode in MODES}
    for _ in range(16):
        k, outbound = data.draw(keys_for(policies))
        want = reference(policies, k, outbound)
        for mode, spd in spds.items():
            assert spd.lookup(k, outbound) is want, (mode, k, outbound)


# IPv6: the same shapes moved into 2001:db8::/96 (a /0 stays ::/0, ICMP becomes ICMPv6)
PREFIX6 = 0x20010DB8 << 96


def _net6(net: Network) -> IPv6Network:
    if not net.prefixlen:
        return IPv6Network("::/0")
    return IPv6Network((PREFIX6 | int(net.network_address), net.prefixlen + 96))


def _as_v6(p: Policy) -> Policy:
    sel = p.selector
    proto = ipv6.NH_ICMPV6 if sel.protocol == 1 else sel.protocol
    return Policy(p.name, Selector(_net6(sel.local), _net6(sel.remote), proto, sel.local_ports,
                                   sel.remote_ports, sel.icmp_type, sel.icmp_code),
                  p.action, p.direction)


def _key6(k: PacketKey) -> PacketKey:
    proto = ipv6.NH_ICMPV6 if k.protocol == 1 else k.protocol
    return PacketKey(ipv6.V6 | PREFIX6 | k.src, ipv6.V6 | PREFIX6 | k.dst, proto, k.sport, k.dport)


@settings(max_examples=200, deadline=None)
@given(st.data(), policy_lists)
def test_mixed_family_lookup_is_the_first_match_of_the_family(
        data: st.DataObject, policies: list[Policy]) -> None:
    """IPv4 and IPv6 policies in one list: a key finds the first match among its own
    family's policies, never one of the other family, in every mode."""
    mixed = [_as_v6(p) if data.draw(st.booleans()) else p for p in policies]
    spds = {mode: build(mixed, mode) for mode in MODES}
    for _ in range(16):
        k, outbound = data.draw(keys_for(policies))
        for k2 in (k, _key6(k)):
            want = reference(mixed, k2, outbound)
            assert want is None or want.selector.v6 == (k2 is not k)
            for mode, spd in spds.items():
                assert spd.lookup(k2, outbound) is want, (mode, k2, outbound)


@settings(max_examples=50, deadline=None)
@given(st.data(), st.integers(0, 400), st.sampled_from([16, 24, 32]))
def test_large_host_spds_agree_with_the_scan(data: st.DataObject, n: int, prefix: int) -> None:
    policies = host_spd(n, prefix)
    spd = build(policies)
    for _ in range(20):
        k, outbound = data.draw(keys_for(policies))
        assert spd.lookup(k, outbound) is reference(policies, k, outbound), (k, outbound)


# -- examples --------------------------------------------------------------------------------

@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def padded(policies: list[Policy]) -> list[Policy]:
    """``policies`` followed by enough distinct /32 policies that the SPD chooses its index."""
    filler = [Policy(f"f{i}", Selector(IPv4Network("203.0.113.1/32"), remote(i)), Action.DISCARD)
              for i in range(2 * spd_module.LINEAR_SCAN_MAX)]
    return policies + filler


def test_the_spd_chooses_its_index_for_large_views_only() -> None:
    for policies in (padded([]), host_spd(10_000)):
        spd = build(policies)
        assert spd._out_groups and spd._in_groups and not spd._out_linear and not spd._in_linear
    for policies in (host_spd(1), host_spd(spd_module.LINEAR_SCAN_MAX - 2)):
        spd = build(policies)
        assert spd._out_linear and spd._in_linear and not spd._out_groups and not spd._in_groups
    for mode in MODES:
        assert build([], mode).lookup(key("1.1.1.1", "2.2.2.2"), True) is None


def test_earlier_broad_policy_beats_later_specific(mode: str) -> None:
    broad = Policy("lan", Selector(IPv4Network(f"{LOCAL}/32"), IPv4Network("10.0.0.0/8")), Action.BYPASS)
    specific = Policy("host", Selector(IPv4Network(f"{LOCAL}/32"), IPv4Network("10.1.2.3/32")),
                      Action.PROTECT, sa_names=("x",))
    spd = build(padded([broad, specific]), mode)
    assert spd.lookup(key(LOCAL, "10.1.2.3"), True) is broad
    assert spd.lookup(key("10.1.2.3", LOCAL), False) is broad
    # Later in the list, the specific one is still shadowed; first in the list, it wins.
    assert build(padded([specific, broad]), mode).lookup(key(LOCAL, "10.1.2.3"), True) is specific


def test_later_specific_found_when_earlier_broad_misses_on_ports(mode: str) -> None:
    web = Policy("web", Selector(IPv4Network("0.0.0.0/0"), IPv4Network("10.0.0.0/8"), 6, None, (80, 80)),
                 Action.BYPASS)
    specific = Policy("host", Selector(IPv4Network(f"{LOCAL}/32"), IPv4Network("10.1.2.3/32")),
                      Action.PROTECT, sa_names=("x",))
    spd = build(padded([web, specific]), mode)
    assert spd.lookup(key(LOCAL, "10.1.2.3", 6, 40000, 80), True) is web
    assert spd.lookup(key(LOCAL, "10.1.2.3", 6, 40000, 443), True) is specific
    assert spd.lookup(key(LOCAL, "10.1.2.3", 17, 40000, 80), True) is specific  # UDP is not TCP
    assert spd.lookup(key(LOCAL, "10.1.2.3", 6, None, None), True) is specific  # a fragment: no ports
    # Inbound the remote port is the source port.
    assert spd.lookup(key("10.1.2.3", LOCAL, 6, 80, 40000), False) is web
    assert spd.lookup(key("10.1.2.3", LOCAL, 6, 40000, 80), False) is specific


def test_interleaved_groups_keep_list_order(mode: str) -> None:
    """Policies for /32 and /8 remotes, interleaved: two groups whose positions alternate."""
    def pol(name: str, rem: str) -> Policy:
        return Policy(name, Selector(IPv4Network(f"{LOCAL}/32"), IPv4Network(rem)), Action.PROTECT)
    extra = [pol(f"x{i}", f"192.168.0.{i}/32") for i in range(spd_module.LINEAR_SCAN_MAX)]

    # The /32 group starts first, but the /8 group, starting before the /32 match, wins.
    early = [pol("a0", "10.9.9.9/32"), pol("b1", "10.0.0.0/8"), pol("a2", "10.0.0.2/32"), *extra]
    assert build(early, mode).lookup(key(LOCAL, "10.0.0.2"), True) is early[1]
    # The /8 group starts before the /32 match, but its own match comes after it.
    late = [pol("a0", "10.9.9.9/32"), pol("b1", "172.0.0.0/8"), pol("a2", "10.0.0.2/32"),
            pol("b3", "10.0.0.0/8"), *extra]
    assert build(late, mode).lookup(key(LOCAL, "10.0.0.2"), True) is late[2]
    # The /8 group starts after the /32 match: it is not looked at.
    after = [pol("a0", "10.0.0.2/32"), pol("b1", "10.0.0.0/8"), *extra]
    assert build(after, mode).lookup(key(LOCAL, "10.0.0.2"), True) is after[0]

    mixed = [pol("a0", "10.9.9.9/32"), pol("b1", "172.0.0.0/8"), pol("a2", "10.0.0.7/32"),
             pol("b3", "10.0.0.0/8"), pol("a4", "10.0.0.2/32"), pol("b5", "11.0.0.0/8"),
             pol("a6", "11.0.0.1/32"), *extra]
    spd = build(mixed, mode)
    want = {"10.0.0.2": "b3", "10.0.0.7": "a2", "10.9.9.9": "a0", "10.1.1.1": "b3", "11.0.0.1": "b5",
            "172.1.2.3": "b1", "192.168.0.1": "x1", "192.168.1.1": None}
    for peer, name in want.items():
        found = spd.lookup(key(LOCAL, peer), True)
        assert (found.name if found else None) == name, peer
        found = spd.lookup(key(peer, LOCAL), False)
        assert (found.name if found else None) == name, peer


def test_icmp_type_code_and_directions_in_an_index(mode: str) -> None:
    echo_out = Policy("echo", Selector(protocol=1, icmp_type=8), Action.BYPASS, Direction.OUT)
    frag = Policy("frag", Selector(protocol=1, icmp_type=3, icmp_code=4), Action.BYPASS, Direction.IN)
    host = Policy("host", Selector(IPv4Network(f"{LOCAL}/32"), IPv4Network("10.1.2.3/32")),
                  Action.PROTECT, sa_names=("x",))
    spd = build(padded([echo_out, frag, host]), mode)
    assert spd.lookup(key(LOCAL, "10.1.2.3", 1, 8, 0), True) is echo_out
    assert spd.lookup(key("10.1.2.3", LOCAL, 1, 8, 0), False) is host  # echo is OUT only
    assert spd.lookup(key("10.1.2.3", LOCAL, 1, 3, 4), False) is frag
    assert spd.lookup(key(LOCAL, "10.1.2.3", 1, 3, 4), True) is host  # frag is IN only
    assert spd.lookup(key("10.1.2.3", LOCAL, 1, 3, 1), False) is host
    assert spd.lookup(key("10.1.2.3", LOCAL, 1, None, None), False) is host  # truncated ICMP
    assert spd.lookup(key("10.1.2.3", LOCAL, 6, 3, 4), False) is host  # ports 3/4 are not ICMP


def test_ten_thousand_policies(mode: str) -> None:
    policies = host_spd(10_000)
    spd = build(policies, mode)
    assert len(spd) == 10_002 and spd.policies == tuple(policies)
    first, middle, last, discard = policies[1], policies[5_000], policies[10_000], policies[-1]
    for pol in (first, middle, last):
        peer = str(pol.selector.remote.network_address)
        assert spd.lookup(key(LOCAL, peer), True) is pol
        assert spd.lookup(key(peer, LOCAL), False) is pol
        assert spd.lookup(key(LOCAL, peer, 17, 500, 500), True) is policies[0]  # IKE stays bypassed
        assert spd.lookup(key(LOCAL, peer, 17, 501, 500), True) is pol
    assert spd.lookup(key(LOCAL, "10.200.0.1"), True) is discard  # a miss falls to the discard
    assert spd.lookup(key("192.0.2.99", "10.0.0.1"), True) is discard  # not our local address
    assert build(policies[1:-1], mode).lookup(key(LOCAL, "10.200.0.1"), True) is None


# -- no scan ---------------------------------------------------------------------------------

def _counted(name: str) -> Callable[..., Any]:
    method = getattr(int, name)

    def op(self: int, *args: Any) -> Any:
        Counted.ops += 1
        return method(self, *args)
    return op


class Counted(int):
    """An int that counts the operations done on it (by all of its kind, together)."""

    ops = 0
    __and__ = _counted("__and__")
    __rand__ = _counted("__rand__")
    __or__ = _counted("__or__")
    __ror__ = _counted("__ror__")
    __xor__ = _counted("__xor__")
    __rxor__ = _counted("__rxor__")
    __lshift__ = _counted("__lshift__")
    __rshift__ = _counted("__rshift__")
    __add__ = _counted("__add__")
    __radd__ = _counted("__radd__")
    __sub__ = _counted("__sub__")
    __rsub__ = _counted("__rsub__")
    __eq__ = _counted("__eq__")
    __ne__ = _counted("__ne__")
    __lt__ = _counted("__lt__")
    __le__ = _counted("__le__")
    __gt__ = _counted("__gt__")
    __ge__ = _counted("__ge__")
    __hash__ = _counted("__hash__")


def counted_key(k: PacketKey) -> PacketKey:
    return PacketKey(*(None if v is None else Counted(v) for v in k))  # type: ignore[arg-type]


def ops_for(spd: SPD, k: PacketKey, outbound: bool) -> tuple[Policy | None, int]:
    Counted.ops = 0
    found = spd.lookup(counted_key(k), outbound)
    return found, Counted.ops


def test_counting_sees_every_operation() -> None:
    x = Counted(10)
    Counted.ops = 0
    # 5 <= x as the lookup writes it (range low <= port): Python asks x first, a subclass.
    assert (x & 0xF, 0xF & x, x == 10, 5 <= x, hash(x) == hash(10)) == (10, 10, True, True, True)  # noqa: SIM300
    assert Counted.ops == 5


@pytest.mark.parametrize("protect", [{}, {"protocol": 6, "remote_ports": (443, 443)}],
                         ids=["addresses", "ports"])
def test_a_large_spd_is_a_few_probes_into_small_buckets(protect: dict[str, Any]) -> None:
    """What a lookup can touch, read off the index (on either build of the core): one dict
    probe per netmask group, then one bucket's entries."""
    spd = build(host_spd(10_000, **protect))
    for linear, groups in ((spd._out_linear, spd._out_groups), (spd._in_linear, spd._in_groups)):
        assert linear == () and 1 <= len(groups) <= 3
        for _first, _masks, get in groups:
            buckets = get.__self__  # type: ignore[attr-defined]  # the group's dict: nets -> entries
            assert isinstance(buckets, dict) and max(len(entries) for entries in buckets.values()) <= 2


@pytest.mark.parametrize("protect", [{}, {"protocol": 6, "remote_ports": (443, 443)}],
                         ids=["addresses", "ports"])
def test_lookup_in_a_large_spd_does_not_scan(protect: dict[str, Any]) -> None:
    if corebuild.running().compiled:
        pytest.skip("counts operations through an int subclass, which the compiled core unboxes: "
                    "this test runs on the source build in test_corebuild.py")
    policies = host_spd(10_000, **protect)
    spd = build(policies)
    for pol in (policies[1], policies[5_000], policies[10_000]):
        peer = str(pol.selector.remote.network_address)
        for k, outbound in ((key(LOCAL, peer), True), (key(peer, LOCAL, 6, 443, 40000), False)):
            found, ops = ops_for(spd, k, outbound)
            assert found is pol
            assert ops < 50, (pol.name, outbound, ops)
    found, ops = ops_for(spd, key(LOCAL, "10.200.0.1"), True)
    assert found is policies[-1] and ops < 50
    # The count would catch a scan: the same SPD scanned linearly touches the key per policy.
    found, ops = ops_for(build(policies, "linear"), key(LOCAL, "10.0.39.15"), True)
    assert found is policies[10_000] and ops >= 10_000


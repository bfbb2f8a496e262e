"""The offline commands: check-config, decode, genkey."""

from __future__ import annotations

import argparse
import secrets
import sys
from collections import Counter

from .. import exitcodes, rules
from ..config.fields import COMPARTMENT_MARK_MASK
from ..config.model import Config
from ..core.ipv6 import addr_str as fmt_addr
from ..core.sa import Encapsulation, SADirection
from ..core.spd import Action
from ..core.suites import ENCRYPTION, FORBIDDEN, HMACS
from ..decode import OfflineDecoder
from ..pcap import PcapError, read_packets
from .common import load_or_report, write_secret_file


def main(args: argparse.Namespace) -> int:
    if args.command == "genkey":
        return genkey(args.algorithm, args.out)
    cfg = load_or_report(args.config)
    if cfg is None:
        return exitcodes.CONFIG
    if args.command == "check-config":
        print(summary(cfg))
        return exitcodes.OK
    return decode_capture(cfg, args.capture)


def summary(cfg: Config) -> str:
    """What a config does, for humans. Names lengths and algorithms, never key bytes."""
    node, d = cfg.node, cfg.daemon
    lines = [f"{cfg.path}: OK"]
    lines.append(
        f"node: interface {node.interface or 'all but lo'}, role {node.role}, "
        f"default {node.default_action.value}, mtu {node.mtu} ({node.mtu_source})"
    )
    queues = ", ".join(f"{q.num} (cpu {q.cpu if q.cpu is not None else 'any'})" for q in d.queues)
    watchdog = f"{d.watchdog:g} s" if d.watchdog > 0 else "off"
    lines.append(f"daemon: queues {queues}; mark 0x{d.mark:08x}; socket {d.control_socket}; "
                 f"watchdog {watchdog}")
    lines.append(f"IPv6: {rules.ipv6_summary(cfg)}")
    if cfg.compartments:
        lines.append("compartments (the first whose selector matches; the rest is default's):")
        for comp in cfg.all_compartments:
            who = f", workers as {comp.user}" if comp.user else ""
            lines.append(f"  {comp.name:<16} id {comp.id} (mark 0x{comp.mark:x}/0x{COMPARTMENT_MARK_MASK:x}) "
                         f"{comp.selector_text()}; queues {', '.join(map(str, comp.queues))}; "
                         f"policies {', '.join(comp.policies) or 'none'}{who}")
    lines.append("policies (first match wins; no match: " f"{node.default_action.value}):")
    sa_by_name = {sa.name: sa for sa in cfg.sas}
    for i, pol in enumerate(cfg.policies):
        lines.append(
            f"  [{i}] {pol.name:<16} {pol.direction.value:<4} {pol.action.value:<8} "
            f"{pol.selector.describe()}"
        )
        conn = cfg.policy_connection(pol)
        if conn is not None:
            lines.append(f"        both via connection {conn.name} (negotiated Child SAs; "
                         "dropped until one is up)")
        if pol.action is Action.PROTECT:
            for name in pol.sa_names:
                sa = sa_by_name[name]
                lines.append(
                    f"        {sa.direction.value:>3} via {name} (spi 0x{sa.spi:08x}, queue {sa.queue})"
                )
    lines.append("SAs:")
    for sa in cfg.sas:
        alg = sa.encryption + (f"+{sa.integrity}" if sa.integrity else "")
        tunnel = ""
        if sa.tunnel_local is not None and sa.tunnel_remote is not None:
            tunnel = f" {fmt_addr(sa.tunnel_local)} <-> {fmt_addr(sa.tunnel_remote)}"
        window = f" window {sa.replay_window}" if sa.direction is SADirection.IN else ""
        udp = ""
        if sa.encapsulation is Encapsulation.UDP:
            keepalive = ("" if sa.direction is SADirection.IN
                         else f", keepalive {sa.keepalive:g} s" if sa.keepalive
                         else ", no keepalives")
            udp = (f" in UDP {sa.udp_source_port} -> {sa.udp_destination_port} (new peer: "
                   f"{sa.peer_change.value}{keepalive})")
        lines.append(
            f"  {sa.name:<16} {sa.direction.value:<3} spi 0x{sa.spi:08x} queue {sa.queue} "
            f"{sa.mode.value}{tunnel} {alg}{window} esn {'on' if sa.esn else 'off'}{udp}"
        )
    if cfg.connections:
        lines.append("connections (IKEv2, pre-shared key):")
    for c in cfg.connections:
        timers = ", ".join(f"{what} {value:g} s" if value else f"no {what}" for what, value in (
            ("rekey", c.rekey_time), ("IKE rekey", c.ike_rekey_time), ("dpd", c.dpd_delay)))
        lines.append(
            f"  {c.name:<16} {fmt_addr(c.local)} ({c.local_id}) <-> {fmt_addr(c.remote)} "
            f"({c.remote_id}) ike {c.ike} esp {c.esp} {c.mode.value}"
            f"{' in UDP' if c.encap else ''}; start {c.start_action}; {timers}")
    return "\n".join(lines)


def decode_capture(cfg: Config, capture: str) -> int:
    decoder = OfflineDecoder(cfg)
    tally: Counter[str] = Counter()
    try:
        for index, packet in enumerate(read_packets(capture), start=1):
            result = decoder.decode(index, packet)
            print(result.line())
            key = result.verdict if result.reason is None else f"drop {result.reason.value}"
            tally[key] += 1
    except (PcapError, OSError) as err:
        print(f"decode: {err}", file=sys.stderr)
        return exitcodes.FAILURE
    print("summary: " + (", ".join(f"{k} {v}" for k, v in sorted(tally.items())) or "no packets"))
    return exitcodes.DECODE_DROPS if any(k.startswith("drop") for k in tally) else exitcodes.OK


def genkey(algorithm: str, out: str | None = None) -> int:
    """A fresh key on stdout, or in ``out``: a new file created with mode 0600 (no moment
    in which another user could read it, unlike a redirect followed by chmod), never an
    existing one."""
    if algorithm in FORBIDDEN:
        print(f"genkey: {algorithm} is refused: {FORBIDDEN[algorithm]}", file=sys.stderr)
        return exitcodes.CONFIG
    if algorithm in ENCRYPTION and ENCRYPTION[algorithm].keymat_size:
        size = ENCRYPTION[algorithm].keymat_size
    elif algorithm in HMACS:
        size = HMACS[algorithm].key_size
    else:
        known = [a for a in ENCRYPTION if ENCRYPTION[a].keymat_size] + list(HMACS)
        print(f"genkey: unknown algorithm {algorithm!r} (known: {', '.join(known)})", file=sys.stderr)
        return exitcodes.CONFIG
    key = secrets.token_hex(size)
    if out is None:
        print(key)
        return exitcodes.OK
    if not write_secret_file(out, key + "\n", "genkey", "a key file"):
        return exitcodes.FAILURE
    print(f"genkey: wrote a {algorithm} key to {out} (mode 0600)")
    return exitcodes.OK

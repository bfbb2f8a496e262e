"""IKE connection setup cost: ``python -m nfq_ipsec_lab.bench.ikesetup``.

No root, no network: an initiator and a responder of the IKE core (``nfq_ipsec.ike.session``)
in this process run IKE_SA_INIT and IKE_AUTH with a pre-shared key, each bringing up a Child
SA, ``--handshakes`` times per DH group, with fresh SPIs, nonces and DH keys each time (the
system's random source, as the agent has). Timed (``time.perf_counter_ns``): the responder's
work alone (its two ``receive`` calls: what a responder's CPU spends per handshake, so its
handshakes per second on one core) and the whole handshake on both sides (what one CPU needs
to set up a connection, without the network's round trips). Median and min-max of
``--repeat`` runs.

The daemon adds to this its process hops (the agent's answer held until the supervisor has
installed the Child SA in a worker, which moves rules); the lab prints that figure for a trap
connection, from the first packet to the Child SA (``tests/lab/test_ike_agent.py``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nfq_ipsec.ike import selectors
from nfq_ipsec.ike.message import IdPayload, IdType
from nfq_ipsec.ike.proposal import Encr, Group, Prf, Proposal, Protocol, SAPayload, Transform
from nfq_ipsec.ike.session import IkeSession, PeerConfig, Role, State

SCHEMA = "nfq-ipsec-ikesetup/1"
GROUPS = {"x25519": Group.CURVE25519, "ecp256": Group.ECP_256, "ecp384": Group.ECP_384}
_ESP = SAPayload((Proposal(1, Protocol.ESP, b"", (Transform(1, Encr.AES_GCM_16, 128),
                                                  Transform(5, 0))),))
_LAN_A, _LAN_B = selectors.from_prefix("10.1.0.0/24"), selectors.from_prefix("10.2.0.0/24")


def _config(me: str, peer: str, group: int) -> PeerConfig:
    ike = SAPayload((Proposal(1, Protocol.IKE, b"", (
        Transform(1, Encr.AES_GCM_16, 256), Transform(2, Prf.HMAC_SHA2_256), Transform(4, group))),))
    mine, theirs = ((_LAN_A,), (_LAN_B,)) if me == "a" else ((_LAN_B,), (_LAN_A,))
    return PeerConfig(IdPayload(IdType.FQDN, me.encode()), IdPayload(IdType.FQDN, peer.encode()),
                      b"a benchmark's pre-shared key", ike, _ESP, mine, theirs)


def handshake(group: int) -> tuple[int, int]:
    """One IKE_SA_INIT and IKE_AUTH: (the responder's nanoseconds, both sides' nanoseconds)."""
    t0 = time.perf_counter_ns()
    i = IkeSession(Role.INITIATOR, _config("a", "b", group), os.urandom)
    r = IkeSession(Role.RESPONDER, _config("b", "a", group), os.urandom)
    responder = 0
    queue = [(r, d) for d in i.start(0.0).send]
    while queue:
        to, data = queue.pop(0)
        if to is r:
            t = time.perf_counter_ns()
            out = r.receive(data, 0.0)
            responder += time.perf_counter_ns() - t
        else:
            out = i.receive(data, 0.0)
        queue += [(i if to is r else r, d) for d in out.send]
    total = time.perf_counter_ns() - t0
    if i.state is not State.ESTABLISHED or r.child is None:
        raise RuntimeError(f"the handshake did not complete ({i.state.value})")
    return responder, total


def measure(name: str, group: int, handshakes: int, repeat: int) -> dict[str, Any]:
    resp: list[float] = []
    both: list[float] = []
    handshake(group)  # warm-up
    for _ in range(repeat):
        gc.disable()
        try:
            runs = [handshake(group) for _ in range(handshakes)]
        finally:
            gc.enable()
        resp.append(sum(r for r, _ in runs) / handshakes / 1e6)
        both.append(sum(t for _, t in runs) / handshakes / 1e6)
    return {"group": name, "responder_ms": _spread(resp), "handshake_ms": _spread(both),
            "responder_per_s": round(1000 / statistics.median(resp), 1)}


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def format_table(result: dict[str, Any]) -> str:
    lines = [f"IKE setup, IKE_SA_INIT + IKE_AUTH with a Child SA, PSK, AES-GCM-256 "
             f"({result['settings']['handshakes']} handshakes x {result['settings']['repeat']}; "
             f"{result['python']})",
             f"{'DH':8} {'responder ms':>22} {'responder/s':>12} {'both sides ms':>22}"]
    for row in result["results"]:
        r, b = row["responder_ms"], row["handshake_ms"]
        lines.append(f"{row['group']:8} {r['median']:8.3f} ({r['min']:.3f}-{r['max']:.3f}) "
                     f"{row['responder_per_s']:12.1f} {b['median']:8.3f} ({b['min']:.3f}-{b['max']:.3f})")
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nfq_ipsec_lab.bench.ikesetup",
                                description=__doc__.split("\n\n")[0] if __doc__ else None,
                                epilog="A script, not a test: figures from one run compare with each other.")
    p.add_argument("--handshakes", type=_positive_int, default=100, metavar="N",
                   help="handshakes per timing (default 100)")
    p.add_argument("--repeat", type=_positive_int, default=5, metavar="N",
                   help="timings per DH group; the median and min-max are reported (default 5)")
    p.add_argument("--groups", default=",".join(GROUPS), metavar="LIST",
                   help=f"DH groups, comma-separated (default {','.join(GROUPS)})")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the figures here")
    args = p.parse_args(argv)
    names = [g for g in args.groups.split(",") if g]
    unknown = [g for g in names if g not in GROUPS]
    if unknown:
        p.error(f"unknown DH group(s) {', '.join(unknown)} (known: {', '.join(GROUPS)})")
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "settings": {"handshakes": args.handshakes, "repeat": args.repeat, "groups": names},
        "python": platform.python_implementation() + " " + platform.python_version(),
        "machine": platform.machine(),
        "results": [measure(n, GROUPS[n], args.handshakes, args.repeat) for n in names],
    }
    print(format_table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The IKE core against strongSwan (charon 5.9, the reference implementation users run).

One lab for the module: namespace ``a`` runs charon (kernel-libipsec, so no kernel ESP is
needed; its log at level 4 prints every key it derives), namespace ``b`` runs our IKE core
through the lab driver (``nfq_ipsec_lab.lab.ikepeer``). Each case loads one connection into
charon and negotiates one IKE SA with one Child SA, with strongSwan as initiator or as
responder, with AEAD and CBC+HMAC proposals and each DH group we speak. Checked: both sides
established; the SPIs each side uses are the other's; and every key, the IKE SA's seven and
the Child SA's four, is byte for byte the one strongSwan derived (an independent check of
SKEYSEED, prf+ and the key order). strongSwan claims a NAT through its NAT_DETECTION hashes
(``encap = yes``, and always with kernel-libipsec, which has no plain ESP): both sides must
then move to port 4500 and agree on ESP in UDP. Two more cases run rekeys under charon's
eyes: charon rekeying its Child SA every 2 s and its IKE SA every 5 s with liveness checks every
second, and we rekeying the Child SA, the IKE SA and the Child SA again; each side ends with the
other's newest SAs, and every key of every generation is the one charon derived.

Needs root and strongSwan (scripts/install-deps installs it); namespaces ``nfi<pid>-<n>a``/``b``.
"""

from __future__ import annotations

import json
import re
import secrets
import sys
import time
from collections.abc import Iterator
from typing import Any

import gate
import pytest

from nfq_ipsec_lab.bench import strongswan
from nfq_ipsec_lab.lab.netns import Lab, Netns

A_ADDR, B_ADDR = "192.168.57.1", "192.168.57.2"
LAN_A, LAN_B = "10.61.0.0/24", "10.62.0.0/24"
CASES = [  # (name, strongSwan's role, IKE proposal, ESP proposal, encap)
    ("ss-init-gcm-x25519", "initiator", "aes256gcm16-prfsha256-x25519", "aes128gcm16", True),
    ("ss-resp-cbc-ecp256", "responder", "aes128-sha256-prfsha256-ecp256", "aes256-sha256", True),
    ("ss-resp-gcm-ecp384", "responder", "aes128gcm16-prfsha384-ecp384", "aes256gcm16", False),
    ("ss-init-cbc-x25519", "initiator", "aes256-sha512-prfsha512-x25519", "aes128-sha384", False),
]

STRONGSWAN_CONF = """\
charon {
  install_routes = no
  load = random nonce openssl kdf hmac sha1 sha2 aes gcm kernel-libipsec kernel-netlink socket-default vici
  filelog {
    log {
      path = {dir}/charon.log
      flush_line = yes
      default = 1
      ike = 4
      chd = 4
    }
  }
  plugins {
    vici {
      socket = unix://{dir}/charon.vici
    }
  }
}
"""


def swanctl_conf(name: str, ike: str, esp: str, encap: bool, psk: str, ike_rekey: str = "4h",
                 child_rekey: str = "1h", dpd: str = "0s") -> str:
    return f"""\
connections {{
  {name} {{
    version = 2
    rekey_time = {ike_rekey}
    over_time = 60s
    dpd_delay = {dpd}
    local_addrs = {A_ADDR}
    remote_addrs = {B_ADDR}
    encap = {"yes" if encap else "no"}
    proposals = {ike}
    local {{
      auth = psk
      id = a.nfq-ipsec.test
    }}
    remote {{
      auth = psk
      id = b.nfq-ipsec.test
    }}
    children {{
      {name} {{
        local_ts = {LAN_A}
        remote_ts = {LAN_B}
        esp_proposals = {esp}
        rekey_time = {child_rekey}
        life_time = 120m
        rand_time = 0s
        mode = tunnel
      }}
    }}
  }}
}}
secrets {{
  ike-{name} {{
    id = b.nfq-ipsec.test
    secret = "{psk}"
  }}
}}
"""


class Bed:
    def __init__(self, lab: Lab, a: Netns, b: Netns, charon: strongswan.Charon) -> None:
        self.lab, self.a, self.b, self.charon = lab, a, b, charon


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    why = strongswan.missing()
    if why:
        gate.require([f"strongSwan can't run here: {why}"], "the IKE interoperability tests")
    with Lab(prefix="nfi") as lab:
        a, b = lab.netns("a"), lab.netns("b")
        lab.veth(a, "eth1", b, "eth1")
        a.addr("eth1", f"{A_ADDR}/24")
        b.addr("eth1", f"{B_ADDR}/24")
        # kernel-libipsec routes the remote LAN through its TUN device from a local address
        # of the local LAN: give it one
        a.addr("lo", LAN_A.replace(".0/24", ".1/32"))
        charon = strongswan.Charon(lab, "a", a, A_ADDR, B_ADDR, "unused",
                                   strongswan_conf=STRONGSWAN_CONF,
                                   swanctl_conf=swanctl_conf("none", CASES[0][2], CASES[0][3], False, "x"))
        charon.start()
        charon.wait_vici()
        yield Bed(lab, a, b, charon)


def _hexdump_keys(log: str) -> dict[str, list[bytes]]:
    """What charon's log shows of each named secret (``Sk_ei secret => 36 bytes @ 0x...``
    then hexdump lines), every occurrence in order."""
    found: dict[str, list[bytes]] = {}
    lines = log.splitlines()
    for n, line in enumerate(lines):
        m = re.search(r"\] (.+?) => (\d+) bytes @ 0x[0-9a-f]+", line)
        if not m:
            continue
        data = b""
        for more in lines[n + 1:]:
            h = re.search(r"\]\s+\d+: ((?:[0-9A-F]{2} ){1,16})", more)
            if not h:
                break
            data += bytes.fromhex(h.group(1).replace(" ", ""))
        found.setdefault(m.group(1), []).append(data[:int(m.group(2))])
    return found


def _run_case(bed: Bed, name: str, role: str, ike: str, esp: str, encap: bool,
              actions: list[dict[str, Any]] | None = None, linger: float = 3,
              **rekeys: str) -> tuple[dict[str, Any], str]:
    psk = secrets.token_hex(16)
    log = bed.charon.dir / "charon.log"
    before = log.read_text(errors="replace") if log.exists() else ""
    bed.charon.swanctl_conf.write_text(swanctl_conf(name, ike, esp, encap, psk, **rekeys))
    bed.charon.swanctl("--load-all", "--file", str(bed.charon.swanctl_conf))
    ours_role = "responder" if role == "initiator" else "initiator"
    work = bed.lab.workdir / name
    work.mkdir(mode=0o700)
    conf = {"role": ours_role, "local_id": "b.nfq-ipsec.test", "remote_id": "a.nfq-ipsec.test",
            "psk_hex": psk.encode().hex(), "ike": ike, "esp": esp, "local_ts": [LAN_B],
            "remote_ts": [LAN_A], "local_addr": B_ADDR, "remote_addr": A_ADDR,
            "result": str(work / "result.json"), "timeout": 40, "linger": linger,
            "actions": actions or []}
    cpath = work / "ikepeer.json"
    cpath.write_text(json.dumps(conf))
    cpath.chmod(0o600)
    proc = bed.lab.start(f"ikepeer-{name}", bed.b, [sys.executable, "-m", "nfq_ipsec_lab.lab.ikepeer",
                                                    str(cpath)])
    if role == "initiator":
        time.sleep(0.5)  # our responder binds its ports first
        bed.charon.swanctl("--initiate", "--child", name, "--timeout", "30", timeout=40)
    code = proc.wait(timeout=60)
    result = json.loads((work / "result.json").read_text())
    assert code == 0, f"{proc.output()}\n{json.dumps(result, indent=1)[:2000]}"
    text = log.read_text(errors="replace")[len(before):]
    return result, text


@pytest.mark.parametrize(("name", "role", "ike", "esp", "encap"), CASES, ids=[c[0] for c in CASES])
def test_strongswan_and_we_agree_on_every_key(bed: Bed, name: str, role: str, ike: str, esp: str,
                                              encap: bool) -> None:
    result, log = _run_case(bed, name, role, ike, esp, encap)
    assert result["state"] == "established" and result["events"][0]["kind"] == "established", result
    sas = bed.charon.swanctl("--list-sas", "--ike", name)
    assert "ESTABLISHED" in sas and "INSTALLED" in sas, sas
    child = result["child"]
    # the SPIs: ours in is strongSwan's out and back
    spis = re.search(r"INSTALLED, TUNNEL.*?\bin\s+([0-9a-f]{8}),.*?\bout\s+([0-9a-f]{8}),", sas, re.S)
    assert spis, sas
    ss_in, ss_out = int(spis.group(1), 16), int(spis.group(2), 16)
    assert (child["spi_in"], child["spi_out"]) == (ss_out, ss_in)
    # NAT-T: strongSwan claims a NAT (encap = yes, and always with kernel-libipsec, which
    # has no plain ESP); both sides must then agree on ESP in UDP
    assert child["udp_encap"] is ("TUNNEL-in-UDP" in sas) is result["nat"], sas
    assert child["udp_encap"] or not encap
    # every key, as strongSwan printed it
    keys = _hexdump_keys(log)
    ike_k = result["ike_keys"]
    for ours, theirs in (("sk_d", "Sk_d secret"), ("sk_ai", "Sk_ai secret"), ("sk_ar", "Sk_ar secret"),
                         ("sk_ei", "Sk_ei secret"), ("sk_er", "Sk_er secret"), ("sk_pi", "Sk_pi secret"),
                         ("sk_pr", "Sk_pr secret")):
        if not bytes.fromhex(ike_k[ours]):
            continue  # AEAD: no integrity keys
        assert theirs in keys, f"charon printed no {theirs!r}: {sorted(keys)}"
        assert keys[theirs][-1].hex() == ike_k[ours], ours
    we_initiated = role == "responder"
    enc_i, int_i = child["keys_out"] if we_initiated else child["keys_in"]
    enc_r, int_r = child["keys_in"] if we_initiated else child["keys_out"]
    for ours, theirs in ((enc_i, "encryption initiator key"), (enc_r, "encryption responder key"),
                         (int_i, "integrity initiator key"), (int_r, "integrity responder key")):
        if not ours:
            continue
        assert theirs in keys, f"charon printed no {theirs!r}: {sorted(keys)}"
        assert keys[theirs][-1].hex() == ours, theirs


def _all_keys_known(result: dict[str, Any], keys: dict[str, list[bytes]]) -> None:
    """Every IKE SA's keys and every Child SA's keys we made are among those charon printed."""
    logged = {k: {v.hex() for v in vs} for k, vs in keys.items()}
    for ike in result["ike_history"]:
        for ours, theirs in (("sk_d", "Sk_d secret"), ("sk_ei", "Sk_ei secret"), ("sk_er", "Sk_er secret"),
                             ("sk_pi", "Sk_pi secret"), ("sk_pr", "Sk_pr secret")):
            assert ike[ours] in logged.get(theirs, set()), (ours, ike["spi_i"])
    enc = logged.get("encryption initiator key", set()) | logged.get("encryption responder key", set())
    for child in result["children_history"]:
        for k in (child["keys_in"][0], child["keys_out"][0]):
            assert k in enc, child["spi_in"]


def test_strongswan_rekeys_and_we_follow(bed: Bed) -> None:
    """strongSwan as initiator rekeys its Child SA every 2 s and its IKE SA every 5 s and checks
    our liveness every second, for 9 s: we answer each, make before break, and every key of
    every generation is the one charon derived."""
    result, log = _run_case(bed, "ss-rekeys", "initiator", "aes256gcm16-prfsha256-x25519",
                            "aes128gcm16", True, linger=9, ike_rekey="5s", child_rekey="2s", dpd="1s")
    kinds = [e["kind"] for e in result["events"]]
    assert "failed" not in kinds, result["events"]
    # how many depends on charon's timers under load: at least one of each
    assert result["rekeys"].get("child", 0) >= 1 and result["rekeys"].get("ike", 0) >= 1, result["rekeys"]
    assert kinds.count("child_deleted") == result["rekeys"]["child"]  # each old one went, after its successor
    assert len(result["live_children"]) == 1
    _all_keys_known(result, _hexdump_keys(log))
    sas = bed.charon.swanctl("--list-sas", "--ike", "ss-rekeys")
    assert f"{result['spi_i']}_i" in sas and f"{result['spi_r']}_r" in sas, sas
    assert f"in  {result['child']['spi_out']:08x}" in sas, sas
    assert len(result["ike_history"]) == result["rekeys"]["ike"] + 1


def test_we_rekey_and_strongswan_follows(bed: Bed) -> None:
    """We initiate, then rekey the Child SA, the IKE SA, the Child SA again and check liveness:
    strongSwan ends with our newest IKE SA and Child SA installed (the old ones deleted), and
    every key of every generation is the one charon derived."""
    actions = [{"at": 1.0, "do": "rekey_child"}, {"at": 2.0, "do": "rekey_ike"},
               {"at": 3.0, "do": "rekey_child"}, {"at": 3.5, "do": "ping"}]
    result, log = _run_case(bed, "we-rekey", "responder", "aes128-sha256-prfsha256-ecp256",
                            "aes256-sha256", True, actions=actions, linger=2)
    kinds = [e["kind"] for e in result["events"]]
    assert "failed" not in kinds, result["events"]
    # ours: two Child SA rekeys and one IKE SA rekey (charon may add a Child SA rekey of its own)
    assert result["rekeys"]["child"] >= 2 and result["rekeys"]["ike"] == 1, result["events"]
    assert "alive" in kinds
    _all_keys_known(result, _hexdump_keys(log))
    sas = bed.charon.swanctl("--list-sas", "--ike", "we-rekey")
    assert f"{result['spi_i']}_i" in sas and f"{result['spi_r']}_r" in sas, sas
    assert sas.count("INSTALLED") == 1 and f"in  {result['child']['spi_out']:08x}" in sas, sas

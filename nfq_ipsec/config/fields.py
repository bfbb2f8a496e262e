"""The configuration file's fields: one table per section, each field with its TOML type,
default, allowed values and a one-line description.

The tables are the one place a field is declared (what a field and a section can say:
``schema.py``). They drive the loader (``node.py``, ``sas.py``, ``policies.py``): a simple
field (a string, integer or boolean with choices, bounds or a check) is read by
:meth:`~nfq_ipsec.config.schema.Field.read` from its entry alone, and the known keys of every
section come from its table. A field that needs more names its parser (``parsers.py``), which
its section calls. The README's configuration reference is rendered from the tables
(``reference.py``).

Defaults are written once. Those of ``[node]`` and ``[daemon]`` are the constants below, which
the dataclasses in ``model.py`` use too; those of ``[[sa]]`` and ``[[policy]]`` are the core's
own (``SAParams``, ``Lifetime``, ``Selector``, ``Policy``), read from its dataclasses.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .. import logsetup, sandbox
from ..core.replay import MIN_WINDOW
from ..core.sa import (
    MIN_SPI,
    DfPolicy,
    Encapsulation,
    Lifetime,
    Mode,
    PeerChange,
    SADirection,
    SAParams,
)
from ..core.spd import Action, Direction, Policy, Selector
from ..core.suites import ENCRYPTION, HMACS
from ..engines.base import (
    DEFAULT_OFFLOAD_BATCH,
    DEFAULT_OFFLOAD_HELPERS,
    DEFAULT_OFFLOAD_TIMEOUT,
    DEFAULT_POLICY,
    DEFAULT_SELF_CHECK,
    DEFAULT_VERIFY_INTERVAL,
    DEFAULT_VERIFY_TIMEOUT,
    ENGINE_NAMES,
    OFFLOAD_BATCH_RANGE,
    OFFLOAD_HELPERS_RANGE,
    OFFLOAD_TIMEOUT_RANGE,
    POLICIES,
    SELF_CHECK_RANGE,
    VERIFY_INTERVAL_RANGE,
    VERIFY_TIMEOUT_RANGE,
)
from . import parsers
from .schema import BOOLEAN, INTEGER, NUMBER, STRING, Field, Section

# -- defaults of [node] and [daemon] (model.py's dataclasses use the same) -------------------------
DEFAULT_ROLE = "host"
DEFAULT_NODE_ACTION = Action.DISCARD  # node.default: RFC 4301 discards what no policy matches
DEFAULT_MTU = 1500
DEFAULT_IPV6_ND = True  # without neighbour discovery and MLD an IPv6 link dies
DEFAULT_QUEUE_BASE = 100  # the first queue number when daemon.queues is not given
DEFAULT_MARK = 0x10000000  # set on every packet a worker reinjects; our rules skip it
SOCKET_DIR = "/run/nfq-ipsec"
DEFAULT_SOCKET = f"{SOCKET_DIR}/nfq-ipsec.sock"  # a configuration that is not a file's
DEFAULT_STATE_DIR = "/var/lib/nfq-ipsec"
DEFAULT_MSS_CLAMP = True
DEFAULT_GSO = False  # until measured better than one queue trip per segment
DEFAULT_CHAIN_PREFIX = "NFQIPSEC"
DEFAULT_LOG_LEVEL = "info"
DEFAULT_IPTABLES = "auto"
DEFAULT_WATCHDOG = 10.0
WATCHDOG_RANGE = (1.0, 3600.0)  # or 0, which turns the watchdog off
DEFAULT_SANDBOX = sandbox.DEFAULT_MODE  # every worker sandboxed: the whole suite passes so
DEFAULT_WORKER_USER = sandbox.DEFAULT_USER  # a system user of its own (install-deps makes it)
DEFAULT_DROP_LOG = False  # opt-in: a line per dropped packet, even rate-limited, is noise
DEFAULT_BUSY_POLL = 0  # microseconds; off: on CPUs shared with applications it delays them
BUSY_POLL_RANGE = (0, 10_000)
DEFAULT_METRICS: str | None = None  # no metrics listener
DEFAULT_KEY_LOG: str | None = None  # no key log
DEFAULT_VERSIONS = ("core",)  # the ESP versions a worker runs (daemon.versions)
DEFAULT_COMPARE = "off"  # daemon.compare: one version runs
DEFAULT_COMPARE_FALLBACK = False  # with one version left in service, its SAs' traffic drops
KEEPALIVE_RANGE = (1.0, 3600.0)  # or 0: no NAT-keepalives
DEFAULT_COMPARTMENT = "default"  # the implicit compartment: daemon.queues, unlabelled traffic
COMPARTMENT_MARK_SHIFT = 8  # a compartment's id sits in bits 8..15 of a worker's mark
COMPARTMENT_MARK_MASK = 0xFF << COMPARTMENT_MARK_SHIFT
COMPARTMENT_ID_RANGE = (1, 255)  # 0 is the default compartment's


def _core_defaults(cls: type) -> dict[str, Any]:
    """The defaults of a core dataclass's fields (the core can't import the configuration)."""
    return {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }


def _enum_choices(enum: Any) -> dict[str, Any]:
    return {member.value: member for member in enum}


_SA = _core_defaults(SAParams)
_SELECTOR = _core_defaults(Selector)
_POLICY = _core_defaults(Policy)
_LIFETIME = _core_defaults(Lifetime)
_ANY = '`"any"`'

NODE = Section("node", "[node]", "Where the IPsec boundary is (RFC 4301 section 3.1) and what this "
               "node is.", (
    Field("interface", STRING, "the unprotected (IPsec-facing) interface; a gateway must name it",
          default_text="every interface but `lo`", allowed="an interface name (1..15 characters)",
          check=parsers.interface_problem),
    Field("role", STRING, "`host`: this host's own traffic; `gateway`: also forwarded traffic",
          default=DEFAULT_ROLE, choices={"host": "host", "gateway": "gateway"}),
    Field("default", STRING, "what happens to traffic that matches no policy (RFC 4301: discard)",
          default=DEFAULT_NODE_ACTION, choices={"discard": Action.DISCARD, "bypass": Action.BYPASS}),
    Field("mtu", INTEGER, "of the unprotected interface: TCP MSS clamping, each SA's first path MTU",
          default_text="`interface`'s MTU as the kernel has it when the configuration is read "
          "(1500 without `interface`, or if it does not exist there)", bounds=(576, 65535)),
    Field("ipv6_neighbour_discovery", BOOLEAN,
          "let IPv6 neighbour discovery (ICMPv6 types 133-137) and MLD (130-132, 143) through in "
          "clear whatever the policies say; `false` leaves them to the policies and "
          "`node.default`",
          default=DEFAULT_IPV6_ND),
))

DAEMON = Section("daemon", "[daemon]", "The daemon: its workers (one per NFQUEUE), the mark on "
                 "what they send, its files and its iptables chains.", (
    Field("queues", "array of integers", "NFQUEUE numbers, one worker each",
          default_text=f"one per entry of `cpus` (else per online CPU), numbered from "
                       f"{DEFAULT_QUEUE_BASE}",
          allowed="0..65535, each once", parser=parsers.queues),
    Field("cpus", "array of integers", "the CPU each queue's worker is pinned to, in queue order",
          default_text="queue i on the i-th online CPU (round robin)",
          allowed="online CPUs, at most one per queue (the rest are not pinned)",
          parser=parsers.queues),
    Field("mark", INTEGER, "one bit (a power of two), set on every packet a worker reinjects; our "
          "rules skip it",
          default=DEFAULT_MARK, bounds=(1, 0xFFFFFFFF), hex=True, check=parsers.mark_problem),
    Field("control_socket", STRING, "the socket `status`, `reload` and `stop` talk to; each "
          "daemon on a host needs its own", default=DEFAULT_SOCKET,
          default_text=f"`{SOCKET_DIR}/NAME.sock`, NAME the configuration file's name without "
                       "`.toml`"),
    Field("state_dir", STRING, "each SA's saved sequence numbers and lifetime use (see *SA state "
          "across restarts*)", default=DEFAULT_STATE_DIR),
    Field("sandbox", STRING, "how the workers run: `enforce` (as `worker_user`, with "
          "`CAP_NET_ADMIN` only, `no_new_privs` and a seccomp allow-list whose violation kills "
          "the worker), `log` (the same, but a system call outside the list is only logged by "
          "the kernel), `off` (as root, for debugging; see *Threat model*)",
          default=DEFAULT_SANDBOX, choices={k: k for k in sandbox.MODES}),
    Field("worker_user", STRING, "the unprivileged user the workers run as (with `sandbox` not "
          "`off`); it owns their state directories", default=DEFAULT_WORKER_USER),
    Field("mss_clamp", BOOLEAN, "clamp the TCP MSS of protected flows for the ESP overhead",
          default=DEFAULT_MSS_CLAMP),
    Field("gso", BOOLEAN, "queue outbound TCP superpackets whole (`NFQA_CFG_F_GSO`): the worker "
          "segments, seals and sends them in a batch (see *Outbound TCP superpackets*)",
          default=DEFAULT_GSO),
    Field("iptables", STRING, "which iptables: the system's (`auto`), `nft` or `legacy`",
          default=DEFAULT_IPTABLES, choices={k: k for k in ("auto", "nft", "legacy")}),
    Field("chain_prefix", STRING, "the start of the names of our iptables chains",
          default=DEFAULT_CHAIN_PREFIX, allowed="1..16 letters, digits, `-` or `_`",
          check=parsers.chain_prefix_problem),
    Field("log_level", STRING, "what the daemon and its workers log",
          default=DEFAULT_LOG_LEVEL, choices={k: k for k in logsetup.LEVELS}),
    Field("drop_log", BOOLEAN, "log inbound packets dropped as `unknown_spi`, `integrity`, "
          "`replay` or `policy_mismatch` with their SPI and source, rate-limited (see *Status*)",
          default=DEFAULT_DROP_LOG),
    Field("busy_poll", INTEGER, "microseconds a worker keeps looking for the next packet after "
          "each batch before it sleeps (adaptive polling: a packet that arrives within it "
          "needs no wake-up); for workers on CPUs of their own, see *Latency*",
          default=DEFAULT_BUSY_POLL, bounds=BUSY_POLL_RANGE,
          allowed=f"0 (off) or up to {BUSY_POLL_RANGE[1]} microseconds"),
    Field("versions", "array of strings", "the ESP implementations every worker runs, each with "
          "its own SA state (see *Comparing ESP versions*)",
          default=DEFAULT_VERSIONS, default_text='`["core"]`',
          allowed="`core` first, then `independent` and/or `core-source`; more than one needs "
                  "`compare`",
          parser=parsers.versions),
    Field("compare", STRING, "compare the versions' answers in the data path: `off` (one "
          "version), `all` (every packet, only agreed output leaves), `sample:N` (every "
          "version sees every packet, one in N is compared) or `majority` (the answer most "
          "versions give leaves; with two left, as `all`)",
          default=DEFAULT_COMPARE,
          allowed='`off`, `all`, `"sample:N"` (N 2..1000000) or `majority` (three versions); '
                  'not with `gso`', parser=parsers.compare),
    Field("compare_fallback", BOOLEAN, "with `compare`, whether the one version left in service "
          "may carry an SA's traffic alone once the others are out (else it is dropped)",
          default=DEFAULT_COMPARE_FALLBACK),
    Field("watchdog", NUMBER, "seconds a worker may not answer before it is killed and restarted",
          default=DEFAULT_WATCHDOG, bounds=WATCHDOG_RANGE,
          allowed=f"0 (off) or {WATCHDOG_RANGE[0]:g}..{WATCHDOG_RANGE[1]:g} seconds",
          parser=parsers.seconds_or_off),
    Field("metrics", STRING, "where the Prometheus metrics listen (HTTP, `GET /metrics`); "
          "see *Metrics*", default=DEFAULT_METRICS, default_text="off",
          allowed='`"ADDRESS:PORT"`: an IPv4 address, or an IPv6 one in brackets',
          check=parsers.listen_address_problem),
    Field("key_log", STRING, "a directory where the IKE agent writes the keys of every IKE SA "
          "and Child SA it negotiates, in Wireshark's `ikev2_decryption_table` and `esp_sa` "
          "formats (files 0600), to decrypt captures: for debugging only, anyone who reads "
          "them reads the traffic (see *The IKEv2 keying agent*)", default=DEFAULT_KEY_LOG,
          default_text="off", allowed="an absolute path", check=parsers.absolute_path_problem),
))

_ENGINES = ", ".join(f"`{n}`" for n in ENGINE_NAMES)
CRYPTO = Section("crypto", "[crypto]", "The crypto engines each SA can run on, how one is chosen, "
                 "and how often each is checked (see *Crypto engines*).", (
    Field("policy", STRING, "`fastest`: the engine measured fastest for the SA's suite; "
          "`prefer`: the first usable one of `prefer`; `balance`: SAs spread by measured speed, "
          "then moved one at a time, every `verify_interval`, off the engine their traffic "
          "keeps busiest",
          default=DEFAULT_POLICY, choices={k: k for k in POLICIES}),
    Field("prefer", "array of strings", "engines in order of preference (policy `prefer`); "
          "the fastest usable engine after them", default=(), default_text="none",
          allowed=_ENGINES, parser=parsers.engine_names),
    Field("verify_interval", NUMBER, "seconds between each worker's known-answer tests of its "
          "engines (they also run at start)", default=DEFAULT_VERIFY_INTERVAL,
          bounds=VERIFY_INTERVAL_RANGE,
          allowed=f"0 (at start only) or {VERIFY_INTERVAL_RANGE[0]:g}..{VERIFY_INTERVAL_RANGE[1]:g}"
                  " seconds", parser=parsers.seconds_or_off),
    Field("verify_timeout", NUMBER, "seconds an engine's known-answer tests may take before it "
          "is excluded as hung", default=DEFAULT_VERIFY_TIMEOUT, bounds=VERIFY_TIMEOUT_RANGE),
    Field("self_check", INTEGER, "every Nth packet of an SA is done again on another engine "
          "and must give the same bytes, else it is dropped and its engine excluded (wrong "
          "output caught before it leaves); 0: off", default=DEFAULT_SELF_CHECK,
          bounds=SELF_CHECK_RANGE),
    Field("offload_helpers", INTEGER, "helper processes per worker that seal its outbound "
          "packets in batches over shared memory while the worker keeps order and verdicts "
          "(idle CPUs lent to a busy SA; see *Crypto engines*); 0: off, every seal in the "
          "worker", default=DEFAULT_OFFLOAD_HELPERS, default_text="0 (off)",
          bounds=OFFLOAD_HELPERS_RANGE),
    Field("offload_batch", INTEGER, "seals handed to a helper per wake-up (`offload_helpers`)",
          default=DEFAULT_OFFLOAD_BATCH, bounds=OFFLOAD_BATCH_RANGE),
    Field("offload_timeout", NUMBER, "seconds a batch's helpers may take; a helper that dies "
          "or takes longer is stopped, the packets it held are dropped (`engine_failed`) and "
          "every SA seals in the worker from then on", default=DEFAULT_OFFLOAD_TIMEOUT,
          bounds=OFFLOAD_TIMEOUT_RANGE),
    Field("disabled", "array of strings", "engines not used (`nfq-ipsec engine enable` puts one "
          "back until the next restart)", default=(), default_text="none", allowed=_ENGINES,
          parser=parsers.engine_names),
))

POLICY = Section("policy", "[[policy]]", "The SPD (RFC 4301 section 4.4.1), in order: the first "
                 "policy that matches a packet decides. Selectors are from this host's point of "
                 "view: outbound, `local` is the source; inbound, the destination.", (
    Field("name", STRING, "names the policy in messages and status", required=True),
    Field("action", STRING, "`protect` through its SAs, `bypass` in clear, or `discard`",
          required=True, choices=_enum_choices(Action)),
    Field("direction", STRING, "the traffic the policy applies to",
          default=_POLICY["direction"], choices=_enum_choices(Direction)),
    Field("local", STRING, "this host's side", default=_SELECTOR["local"], default_text=_ANY,
          allowed='an IPv4 or IPv6 prefix (one family per policy), or `"any"`',
          parser=parsers.network),
    Field("remote", STRING, "the other side", default=_SELECTOR["remote"], default_text=_ANY,
          allowed='an IPv4 or IPv6 prefix (one family per policy), or `"any"`',
          parser=parsers.network),
    Field("protocol", "string or integer", "the IP protocol (IPv6: the last next header)",
          default=_SELECTOR["protocol"],
          default_text=_ANY, allowed=", ".join(f"`{p}`" for p in parsers.PROTOCOLS)
          + " or 0..255 (not 50, ESP itself)", parser=parsers.protocol),
    Field("local_ports", "integer or string", "this host's ports",
          default=_SELECTOR["local_ports"], default_text="any",
          allowed='a port or `"lo-hi"`, 0..65535; protocol `tcp`, `udp` or `sctp`',
          parser=parsers.ports),
    Field("remote_ports", "integer or string", "the other side's ports",
          default=_SELECTOR["remote_ports"], default_text="any",
          allowed='a port or `"lo-hi"`, 0..65535; protocol `tcp`, `udp` or `sctp`',
          parser=parsers.ports),
    Field("icmp_type", INTEGER, 'the ICMP type; needs `protocol = "icmp"` or `"ipv6-icmp"`',
          default=_SELECTOR["icmp_type"], default_text="any", bounds=(0, 255)),
    Field("icmp_code", INTEGER, 'the ICMP code; needs `protocol = "icmp"` or `"ipv6-icmp"`',
          default=_SELECTOR["icmp_code"], default_text="any", bounds=(0, 255)),
    Field("sa", "array of strings", "`protect`: its SAs, at most one outbound per queue, and the "
          "inbound ones; an SA serves one policy", default=_POLICY["sa_names"],
          allowed="names of `[[sa]]`", parser=parsers.sa_names),
    Field("connection", STRING, "`protect`, instead of `sa`: the connection whose negotiated "
          "Child SAs carry it (its selectors are the traffic selectors); until one is up its "
          "traffic is dropped", default_text="none", allowed="the name of a `[[connection]]`"),
    Field("compartment", STRING, "the compartment whose traffic the policy is for; its SAs "
          "must be that compartment's (see *Compartments*)",
          default_text=f"`{DEFAULT_COMPARTMENT}`",
          allowed=f"the name of a `[[compartment]]`, or `{DEFAULT_COMPARTMENT}`"),
))

_KEY = "hex; AEADs: the key, then the 4-byte salt"
_KEY_FILE = "relative to this file; mode 0600 or stricter"
SA = Section("sa", "[[sa]]", "Security associations, each with its SPI, direction, algorithms "
             "and keys, and the worker (queue) that owns it.", (
    Field("name", STRING, "names the SA in policies, messages and status", required=True),
    Field("direction", STRING, "`out`: we send with it; `in`: we receive with it", required=True,
          choices=_enum_choices(SADirection)),
    Field("spi", INTEGER, "the Security Parameters Index, unique per direction", required=True,
          bounds=(MIN_SPI, 0xFFFFFFFF),
          allowed=f"{MIN_SPI}..0xffffffff (RFC 4303: 1..{MIN_SPI - 1} are reserved)"),
    Field("queue", INTEGER, "the worker that owns the SA",
          default_text="the first queue of its compartment",
          allowed="one of its compartment's queues (`daemon.queues` for the default one)",
          parser=parsers.sa_queue),
    Field("compartment", STRING, "the compartment whose key database holds the SA: only its "
          "workers hold it, only its policies use it", default_text=f"`{DEFAULT_COMPARTMENT}`",
          allowed=f"the name of a `[[compartment]]`, or `{DEFAULT_COMPARTMENT}`"),
    Field("mode", STRING, "`tunnel` needs `tunnel_local` and `tunnel_remote`",
          default=_SA["mode"], choices=_enum_choices(Mode)),
    Field("encryption", STRING, "the algorithm (RFC 8221); `aes-cbc-*` and `null` need "
          "`integrity`", required=True, allowed=", ".join(f"`{a}`" for a in ENCRYPTION)),
    Field("key", STRING, f"the encryption key, {_KEY}; or `key_file`",
          default_text="required unless `null`", allowed="its algorithm's size",
          parser=parsers.key),
    Field("key_file", STRING, f"a file holding `key`; {_KEY_FILE}", parser=parsers.key),
    Field("integrity", STRING, "the HMAC (RFC 4868) for `aes-cbc-*` and `null`; AEADs take none",
          default=_SA["integrity"], allowed=", ".join(f"`{a}`" for a in HMACS)),
    Field("integrity_key", STRING, "the HMAC key, hex; or `integrity_key_file`",
          default_text="required with `integrity`", allowed="its HMAC's size", parser=parsers.key),
    Field("integrity_key_file", STRING, f"a file holding `integrity_key`; {_KEY_FILE}",
          parser=parsers.key),
    Field("tunnel_local", STRING, "tunnel mode: this end's outer address",
          allowed="an IPv4 or IPv6 address", parser=parsers.address),
    Field("tunnel_remote", STRING, "tunnel mode: the peer's outer address (the same family; "
          "the inner packets may be of either)",
          allowed="an IPv4 or IPv6 address", parser=parsers.address),
    Field("replay_window", INTEGER, "inbound: the anti-replay window, in packets",
          default=_SA["replay_window"], bounds=(MIN_WINDOW, 4096)),
    Field("esn", BOOLEAN, "64-bit extended sequence numbers (RFC 4303)", default=_SA["esn"]),
    Field("df", STRING, "tunnel mode: the outer header's DF bit (RFC 4301 section 8.1)",
          default=_SA["df"], choices=_enum_choices(DfPolicy)),
    Field("ttl", INTEGER, "tunnel mode: the outer header's TTL (IPv6: hop limit)", default=_SA["ttl"],
          bounds=(1, 255)),
    Field("lifetime", "table", "the SA's limits: `[sa.lifetime]`", default_text="no limits",
          parser=parsers.lifetime),
    Field("encapsulation", STRING, "`udp`: ESP inside UDP (RFC 3948, NAT traversal); the "
          "fields below are for it", default=_SA["encapsulation"],
          choices=_enum_choices(Encapsulation)),
    Field("udp_source_port", INTEGER, "ESP in UDP: the source port of the SA's packets "
          "(outbound: ours; inbound: the peer's, before any NAT rebinding)",
          default=_SA["udp_source_port"], bounds=(1, 65535)),
    Field("udp_destination_port", INTEGER, "ESP in UDP: the destination port of the SA's packets "
          "(outbound: the peer's; inbound: ours)", default=_SA["udp_destination_port"],
          bounds=(1, 65535)),
    Field("peer_change", STRING, "ESP in UDP, NAT rebinding: inbound, an authenticated packet "
          "(ICV and replay checked) from a new address or port is followed or dropped "
          "(`peer_changed`); outbound, `follow` sends to what the inbound SAs of its policy "
          "and queue followed", default=_SA["peer_change"], choices=_enum_choices(PeerChange)),
    Field("keepalive", NUMBER, "outbound ESP in UDP: seconds without a packet before a "
          "NAT-keepalive (RFC 3948 section 2.3)", default=_SA["keepalive"],
          bounds=KEEPALIVE_RANGE,
          allowed=f"0 (none) or {KEEPALIVE_RANGE[0]:g}..{KEEPALIVE_RANGE[1]:g} seconds",
          parser=parsers.seconds_or_off),
))


def _limit(what: str, toml: str, unit: str) -> tuple[Field, Field]:
    soft, hard = f"soft_{what}", f"hard_{what}"
    return (
        Field(soft, toml, f"after this many {unit}: an event in the log", default=_LIFETIME[soft],
              default_text="no limit", allowed=f"> 0, below `{hard}`"),
        Field(hard, toml, f"after this many {unit}: the SA stops", default=_LIFETIME[hard],
              default_text="no limit", allowed="> 0"),
    )


LIFETIME = Section("lifetime", "[sa.lifetime]", "An SA's limits, under its `[[sa]]`: a soft "
                   "limit is an event in the log, a hard one stops the SA. They count from the "
                   "key's first installation, across restarts.", (
    *_limit("packets", INTEGER, "packets"),
    *_limit("bytes", INTEGER, "bytes"),
    *_limit("seconds", NUMBER, "seconds"),
))

DEFAULT_IKE_PROPOSAL = "aes128gcm16-prfsha256-x25519"
DEFAULT_ESP_PROPOSAL = "aes128gcm16"
DEFAULT_REKEY_TIME = 3600.0
DEFAULT_IKE_REKEY_TIME = 14400.0
DEFAULT_DPD_DELAY = 30.0
REKEY_RANGE = (10.0, 86400.0 * 7)  # or 0: never
DPD_RANGE = (1.0, 3600.0)  # or 0: no liveness checks
_PROPOSAL = ("words joined by `-` in strongSwan's spelling; RFC 8247's algorithms only "
             "(`aes128gcm16`, `aes256gcm16`, `chacha20poly1305`, `aes128`/`aes256` with `sha256`, "
             "`sha384`, `sha512`; `prfsha256`...; `x25519`, `ecp256`, `ecp384`)")

CONNECTION = Section("connection", "[[connection]]", "IKEv2 connections (RFC 7296): the keying "
                     "agent negotiates their Child SAs, which carry the `protect` policies that "
                     "name them, beside the static `[[sa]]`s.", (
    Field("name", STRING, "names the connection in policies, messages, status and `nfq-ipsec "
          "ike`", required=True),
    Field("local", STRING, "this end's address: IKE's and the ESP's", required=True,
          allowed="an IPv4 or IPv6 address", parser=parsers.address),
    Field("remote", STRING, "the peer's address", required=True,
          allowed="an IPv4 or IPv6 address of `local`'s family", parser=parsers.address),
    Field("local_id", STRING, "our identity (IKE ID payload)", default_text="`local`",
          allowed="an IP address, or a name (FQDN)"),
    Field("remote_id", STRING, "the identity the peer must prove", default_text="`remote`",
          allowed="an IP address, or a name (FQDN)"),
    Field("auth", STRING, "how both ends authenticate: a pre-shared key", default="psk",
          choices={"psk": "psk"}),
    Field("psk_file", STRING, "a file holding the pre-shared key (its text; a trailing newline "
          "is not part of it; `0x` and hex for bytes); relative to this file; mode 0600 or "
          "stricter", required=True, allowed="at least 16 bytes of key", parser=parsers.psk),
    Field("ike", STRING, "the IKE SA's proposal", default=DEFAULT_IKE_PROPOSAL,
          allowed=_PROPOSAL + "; a DH group is required"),
    Field("esp", STRING, "the Child SAs' proposal (a DH group in it: PFS on rekeys)",
          default=DEFAULT_ESP_PROPOSAL, allowed=_PROPOSAL),
    Field("mode", STRING, "the Child SAs' mode: `tunnel` between `local` and `remote`, or "
          "`transport`", default=Mode.TUNNEL, choices=_enum_choices(Mode)),
    Field("start_action", STRING, "`start`: the agent initiates when the daemon starts, and again "
          "whenever the IKE SA fails or the peer deletes it (after 5 s, doubling to 120 s); "
          "`trap`: it initiates when the first packet of the policy finds no Child SA (that "
          "packet and the next ones until the SA is up are dropped, counted `acquire`); "
          "`none`: it waits for the peer (or `nfq-ipsec ike initiate`)", default="none",
          choices={"start": "start", "trap": "trap", "none": "none"}),
    Field("rekey_time", NUMBER, "seconds before a Child SA is rekeyed (up to 10 % early)",
          default=DEFAULT_REKEY_TIME, bounds=REKEY_RANGE,
          allowed=f"0 (never) or {REKEY_RANGE[0]:g}..{REKEY_RANGE[1]:g} seconds",
          parser=parsers.seconds_or_off),
    Field("ike_rekey_time", NUMBER, "seconds before the IKE SA is rekeyed (up to 10 % early)",
          default=DEFAULT_IKE_REKEY_TIME, bounds=REKEY_RANGE,
          allowed=f"0 (never) or {REKEY_RANGE[0]:g}..{REKEY_RANGE[1]:g} seconds",
          parser=parsers.seconds_or_off),
    Field("life_time", NUMBER, "seconds after which a Child SA that was not rekeyed is deleted "
          "and its traffic dropped (the hard lifetime; `rekey_time` is the soft one)",
          default=None, default_text="`rekey_time` + 10 % (none if it never rekeys)",
          bounds=REKEY_RANGE, allowed=f"0 (none) or {REKEY_RANGE[0]:g}..{REKEY_RANGE[1]:g} "
          "seconds, more than `rekey_time`", parser=parsers.seconds_or_off),
    Field("ike_life_time", NUMBER, "seconds after which an IKE SA that was not rekeyed is "
          "deleted with its Child SAs (the hard lifetime; `ike_rekey_time` is the soft one)",
          default=None, default_text="`ike_rekey_time` + 10 % (none if it never rekeys)",
          bounds=REKEY_RANGE, allowed=f"0 (none) or {REKEY_RANGE[0]:g}..{REKEY_RANGE[1]:g} "
          "seconds, more than `ike_rekey_time`", parser=parsers.seconds_or_off),
    Field("dpd_delay", NUMBER, "seconds without a word from the peer before a liveness check",
          default=DEFAULT_DPD_DELAY, bounds=DPD_RANGE,
          allowed=f"0 (none) or {DPD_RANGE[0]:g}..{DPD_RANGE[1]:g} seconds",
          parser=parsers.seconds_or_off),
    Field("encap", BOOLEAN, "carry the ESP in UDP 4500 even without a NAT (IPv4 only); a NAT "
          "found by IKE does it anyway", default=False),
))

_LOCAL = "a locally sent packet's; several selectors in one compartment must all match"
COMPARTMENT = Section("compartment", "[[compartment]]", "Compartments (see *Compartments*): the "
                      "traffic of the processes one selector picks goes to the compartment's "
                      "own workers, policies and SAs only. Traffic no compartment selects is "
                      f"the implicit `{DEFAULT_COMPARTMENT}` compartment's (`daemon.queues`, the "
                      "policies and SAs that name none).", (
    Field("name", STRING, "names the compartment in policies, SAs, status and logs",
          required=True, allowed=f"1..32 letters, digits, `-` or `_`; not `{DEFAULT_COMPARTMENT}`",
          check=parsers.compartment_name_problem),
    Field("id", INTEGER, "its number in the mark of the packets its workers decrypt and of their "
          "connections (`CONNMARK`): `id << 8` under the mask `0xff00`",
          default_text="its place among the `[[compartment]]`s, from 1",
          bounds=COMPARTMENT_ID_RANGE),
    Field("uid", "integer or string", f"the sending process's user (`-m owner`); {_LOCAL}",
          default_text="any", allowed="a uid, or a user name that exists here",
          parser=parsers.owner_id),
    Field("gid", "integer or string", f"the sending process's group (`-m owner`); {_LOCAL}",
          default_text="any", allowed="a gid, or a group name that exists here",
          parser=parsers.owner_id),
    Field("cgroup", STRING, "the cgroup v2 the sending socket was made in (`-m cgroup --path`; "
          f"its descendants too); {_LOCAL}", default_text="any",
          allowed="an absolute cgroup v2 path that exists here (`/web.slice`)",
          check=parsers.cgroup_problem),
    Field("interface", STRING, "gateways, forwarded traffic: the interface it arrived on",
          default_text="any", allowed="an interface name (1..15 characters)",
          check=parsers.interface_problem),
    Field("source", STRING, "gateways, forwarded traffic: its source address; with "
          "`interface`, both must match", default_text="any",
          allowed="an IPv4 or IPv6 prefix", parser=parsers.network),
    Field("queues", "array of integers", "its NFQUEUE numbers, one worker each", required=True,
          allowed="0..65535, each once, in no other compartment nor `daemon.queues`",
          parser=parsers.queues),
    Field("cpus", "array of integers", "the CPU each of its queues' workers is pinned to",
          default_text="not pinned", allowed="online CPUs, at most one per queue",
          parser=parsers.queues),
    Field("user", STRING, "the unprivileged user its workers run as (with `daemon.sandbox` not "
          "`off`); give each compartment its own, so no worker can read another compartment's "
          "state directories", default=None, default_text="`daemon.worker_user`"),
))

# the sections a file may have; every table, in the reference's order
TOP_LEVEL = (NODE, DAEMON, CRYPTO, POLICY, SA, CONNECTION, COMPARTMENT)
SECTIONS = (NODE, DAEMON, CRYPTO, POLICY, SA, LIFETIME, CONNECTION, COMPARTMENT)

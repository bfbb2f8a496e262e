"""The queue binding against the real kernel, in a namespace pair of our own (root).

(a) every size from 64 bytes up to the 9000-byte MTU, and locally generated datagrams larger
    than the MTU (queued whole at OUTPUT, fragmented after), is received whole and reinjected
    with a rewritten payload intact; the one size a netlink attribute can't carry (65535) is
    reported as cut, never passed on silently;
(b) queue overflow is counted: a full queue (max_len) shows as queue_dropped, a full socket
    buffer as ENOBUFS reports and user_dropped; the dropped packets never reach the peer;
(c) what a worker that gave up root must keep: every verdict needs CAP_NET_ADMIN (nfnetlink
    checks it on each message, not only at bind), so a sandboxed worker keeps it and nothing else.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from collections.abc import Iterator

import pytest
from labutil import ADDR_B, Pair, make_pair

PORT = 5555


@pytest.fixture
def pair() -> Iterator[Pair]:
    """Two namespaces joined by a veth pair (MTU 9000): the tests' pair (tests/labutil.py)."""
    with make_pair("q") as p:
        yield p


# The queue side: binds a queue, answers every packet, reports what it saw as JSON.
QUEUE_SERVER = textwrap.dedent("""
    import json, select, struct, sys, time
    from nfq_ipsec.nfqueue import NetlinkQueue, kernel_queue_stats
    opts = json.loads(sys.argv[1])
    q = NetlinkQueue(max_len=opts["max_len"], rcvbuf=opts["rcvbuf"])
    q.bind(opts["queue"])
    if opts.get("keep_caps") is not None:  # as a sandboxed worker: another user, these only
        from nfq_ipsec import sandbox
        sandbox.drop_user(sandbox.Identity("nobody", 65534, 65534), opts["keep_caps"])
    print("READY", flush=True)
    seen = []
    accepted = 0
    first = None
    last = time.monotonic()
    end = time.monotonic() + opts["timeout"]
    time.sleep(opts.get("stall", 0))  # a deliberately slow worker: let the queue fill up
    while time.monotonic() < end and (first is None or time.monotonic() - last < opts["idle"]):
        if not select.select([q], [], [], 0.05)[0]:
            continue
        for p in q.receive(64):
            first = first or time.monotonic()
            last = time.monotonic()
            data = p.payload
            seen.append([len(data), p.length, p.hook])
            if len(data) < p.length:
                q.verdict(p.packet_id, False)  # cut short: never pass it on
                continue
            if opts["mode"] == "reverse":
                # Rewrite the UDP data (reversed) and zero the UDP checksum: the peer sees our
                # payload, so it really replaced the kernel's copy, at full size.
                ihl = (data[0] & 15) * 4
                udp = data[ihl:ihl + 8]
                data = data[:ihl] + udp[:6] + b"\\0\\0" + data[ihl + 8:][::-1]
                q.verdict(p.packet_id, True, 0x1000, data)
            else:
                q.verdict(p.packet_id, True, 0x1000)
            accepted += 1
        q.flush()
    k = kernel_queue_stats().get(opts["queue"])
    print(json.dumps({"seen": seen, "accepted": accepted, "overflows": q.overflows,
                      "verdict_errors": q.verdict_errors,
                      "queue_dropped": k.queue_dropped if k else None,
                      "user_dropped": k.user_dropped if k else None,
                      "copy_range": k.copy_range if k else None}), flush=True)
""")

RECEIVER = textwrap.dedent("""
    import hashlib, json, socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)
    s.bind((sys.argv[1], int(sys.argv[2])))
    s.settimeout(float(sys.argv[3]))
    print("READY", flush=True)
    got = []
    try:
        while True:
            got.append(hashlib.sha256(s.recv(70000)).hexdigest())
    except socket.timeout:
        pass
    print(json.dumps(got), flush=True)
""")

SENDER = textwrap.dedent("""
    import json, socket, sys, time
    sizes = json.loads(sys.argv[3])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 24)
    gap = float(sys.argv[4])
    cache = {}
    for i, n in enumerate(sizes):
        key = ((i * 7) & 255, n)
        if key not in cache:
            cache[key] = bytes((key[0] + j) & 255 for j in range(n))
        s.sendto(cache[key], (sys.argv[1], int(sys.argv[2])))
        if gap:
            time.sleep(gap)
""")


def _payload(i: int, n: int) -> bytes:
    return bytes((i * 7 + j) & 255 for j in range(n))


def _wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        raise AssertionError(f"helper did not start: {line!r} {proc.communicate()[1]}")


def _finish(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out.strip().splitlines()[-1]


def _exchange(pair: Pair, queue: int, sizes: list[int], server_opts: dict[str, object],
              gap: float, recv_timeout: float) -> tuple[dict[str, object], list[str]]:
    opts = {"queue": queue, "max_len": 2048, "rcvbuf": 16 << 20, "mode": "reverse",
            "timeout": 30, "idle": 1.0, **server_opts}
    pair.run(pair.a, "iptables", "-t", "mangle", "-A", "OUTPUT", "-p", "udp", "-d", ADDR_B,
             "-j", "NFQUEUE", "--queue-num", str(queue))
    server = pair.python(pair.a, QUEUE_SERVER, json.dumps(opts))
    receiver = pair.python(pair.b, RECEIVER, ADDR_B, str(PORT), str(recv_timeout))
    try:
        _wait_ready(server)
        _wait_ready(receiver)
        sender = pair.python(pair.a, SENDER, ADDR_B, str(PORT), json.dumps(sizes), str(gap))
        _, err = sender.communicate(timeout=120)
        assert sender.returncode == 0, err
        summary = json.loads(_finish(server))
        got = json.loads(_finish(receiver))
    finally:
        for p in (server, receiver):
            if p.poll() is None:
                p.kill()
                p.wait()
    return summary, got


def test_every_size_up_to_jumbo_and_beyond_passes_intact(pair: Pair) -> None:
    import hashlib

    totals = [64, 65, 127, 576, 1500, 1501, 4016, 4017, 4096, 4097, 8000, 8999, 9000,
              # larger than the MTU: queued whole at OUTPUT, fragmented after our verdict
              9001, 20000, 40000, 65531, 65535]
    sizes = [t - 28 for t in totals]  # UDP data bytes for an IPv4 total length t
    summary, got = _exchange(pair, 300, sizes, {}, gap=0.02, recv_timeout=3.0)
    seen = summary["seen"]
    assert isinstance(seen, list)
    assert summary["copy_range"] == 65531  # what the kernel gives for "copy everything"
    assert [s[1] for s in seen] == totals  # every packet was queued, in order, at full length
    assert all(hook == 3 for _, _, hook in seen)  # LOCAL_OUT
    for (copied, length, _), total in zip(seen, totals, strict=True):
        if total <= 65531:
            assert copied == length == total, f"{total}-byte packet arrived as {copied}"
        else:
            # 65535 can't fit in one netlink attribute: we are told it was cut (and drop it)
            assert (copied, length) == (65531, 65535)
    expected = [hashlib.sha256(_payload(i, n)[::-1]).hexdigest()
                for i, n in enumerate(sizes) if n + 28 <= 65531]
    assert got == expected, "the peer must receive exactly our rewritten payloads, each whole"
    assert summary["verdict_errors"] == 0
    assert summary["queue_dropped"] == summary["user_dropped"] == 0


def test_full_queue_is_counted_and_dropped(pair: Pair) -> None:
    count = 2000
    summary, got = _exchange(pair, 301, [100] * count,
                             {"max_len": 16, "stall": 1.0, "mode": "accept"},
                             gap=0, recv_timeout=4.0)
    seen = len(summary["seen"])  # type: ignore[arg-type]
    queue_dropped = summary["queue_dropped"]
    assert isinstance(queue_dropped, int) and queue_dropped > 0
    assert seen + queue_dropped + summary["user_dropped"] == count  # type: ignore[operator]
    assert len(got) == summary["accepted"] == seen  # what was dropped never reached the peer


def test_full_socket_buffer_reports_enobufs(pair: Pair) -> None:
    count = 2000
    summary, got = _exchange(pair, 302, [1000] * count,
                             {"max_len": 65536, "rcvbuf": 1, "stall": 1.0, "mode": "accept"},
                             gap=0, recv_timeout=4.0)
    user_dropped = summary["user_dropped"]
    assert isinstance(user_dropped, int) and user_dropped > 0
    overflows = summary["overflows"]
    assert isinstance(overflows, int) and overflows > 0  # ENOBUFS seen and counted, not hidden
    seen = len(summary["seen"])  # type: ignore[arg-type]
    assert seen + user_dropped + summary["queue_dropped"] == count  # type: ignore[operator]
    assert len(got) == seen


def test_no_listener_drops(pair: Pair) -> None:
    """Fail closed: a queue rule without a bound queue (a dead worker) passes nothing."""
    pair.run(pair.a, "iptables", "-t", "mangle", "-A", "OUTPUT", "-p", "udp", "-d", ADDR_B,
             "-j", "NFQUEUE", "--queue-num", "303")
    receiver = pair.python(pair.b, RECEIVER, ADDR_B, str(PORT), "1.5")
    _wait_ready(receiver)
    sender = pair.python(pair.a, SENDER, ADDR_B, str(PORT), json.dumps([100] * 20), "0")
    sender.communicate(timeout=30)
    assert json.loads(_finish(receiver)) == []


def test_second_bind_of_a_held_queue_is_refused(pair: Pair) -> None:
    code = textwrap.dedent("""
        import errno
        from nfq_ipsec.nfqueue import NetlinkQueue, NfQueueError
        first = NetlinkQueue(); first.bind(304)
        try:
            NetlinkQueue().bind(304)
        except NfQueueError as err:
            print(err.errno == errno.EPERM, "another process holds this queue" in str(err))
    """)
    proc = pair.python(pair.a, code)
    out, err = proc.communicate(timeout=30)
    assert out.split() == ["True", "True"], err


def test_burst_is_accounted_for_exactly(pair: Pair) -> None:
    """An unpaced burst of 5000 packets (faster than Python answers): each one is either seen
    by us and delivered, or counted by the kernel as dropped. Nothing passes unseen."""
    count = 5000
    summary, got = _exchange(pair, 305, [1400] * count, {"mode": "reverse", "idle": 0.5},
                             gap=0, recv_timeout=2.0)
    seen = len(summary["seen"])  # type: ignore[arg-type]
    dropped = summary["queue_dropped"] + summary["user_dropped"]  # type: ignore[operator]
    assert seen + dropped == count
    assert len(got) == seen
    assert seen > count // 10


@pytest.mark.parametrize("keep", [[], [12]], ids=["no-capability", "cap_net_admin"])
def test_verdicts_after_giving_up_root_need_cap_net_admin(pair: Pair, keep: list[int]) -> None:
    """The queue bound as root, then the process becomes another user keeping ``keep`` (12:
    CAP_NET_ADMIN): without it the kernel refuses every verdict (the packets never leave),
    with it alone they pass."""
    sizes = [100] * 5
    summary, got = _exchange(pair, 302, sizes, {"keep_caps": keep, "idle": 0.5}, gap=0.02,
                             recv_timeout=2.0)
    assert summary["accepted"] == 5  # the worker saw them all and answered
    if keep:
        assert summary["verdict_errors"] == 0 and len(got) == 5
    else:
        assert summary["verdict_errors"] == 5 and got == []

"""The Prometheus metrics: the exposition of a status answer (``metrics.py``), read back with
``prometheus_client``'s parser (an independent implementation of the format), and the HTTP
listener (``metricsserver.py``) against a real control socket, hostile scrapers included;
``daemon.metrics`` in the configuration.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from configs import cfg_of, host_data
from prometheus_client.parser import text_string_to_metric_families
from statusschema import WITHOUT_IKE, check_answer, sample_answer

from nfq_ipsec import control, metrics, metricsserver, supervisor
from nfq_ipsec.core import ConfigError
from nfq_ipsec.status import StatusReport

Sample = tuple[str, frozenset[tuple[str, str]]]


def parsed(text: str) -> tuple[dict[Sample, float], dict[str, str]]:
    """Every sample of an exposition by (name, labels), and each family's type, as
    prometheus_client reads them."""
    values: dict[Sample, float] = {}
    types: dict[str, str] = {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in values, f"{key} twice"
            values[key] = s.value
    return values, types


def key(name: str, **labels: str) -> Sample:
    return (name, frozenset(labels.items()))


def test_the_sample_is_a_whole_status_answer() -> None:
    assert check_answer(sample_answer()) == WITHOUT_IKE  # a daemon without connections


def test_the_exposition_parses_and_carries_the_status() -> None:
    status = cast(StatusReport, sample_answer())
    values, types = parsed(metrics.render(status))
    q100, q101 = {"queue": "100"}, {"queue": "101"}
    out = {"sa": "a-to-b", "spi": "0x00001000", "direction": "out", "queue": "100"}
    inb = {"sa": 'b-to-a "\\in"', "spi": "0x00002000", "direction": "in", "queue": "100"}
    expected = {
        key("nfq_ipsec_info", version="0.1.0"): 1,
        key("nfq_ipsec_uptime_seconds"): 3725.5,
        key("nfq_ipsec_cpu_seconds_total"): 12.5,
        key("nfq_ipsec_resident_memory_bytes"): 41943040,
        key("nfq_ipsec_rules_installed"): 1,
        key("nfq_ipsec_control_errors_total"): 4,
        key("nfq_ipsec_warnings"): 1,
        key("nfq_ipsec_worker_up", **q100): 1,
        key("nfq_ipsec_worker_up", **q101): 0,
        key("nfq_ipsec_worker_uptime_seconds", **q100): 12.5,
        key("nfq_ipsec_worker_restarts_total", **q100): 1,
        key("nfq_ipsec_worker_restarts_total", **q101): 3,
        key("nfq_ipsec_worker_cpu_seconds_total", **q100): 3.25,
        key("nfq_ipsec_worker_resident_memory_bytes", **q100): 33554432,
        key("nfq_ipsec_worker_busy_poll_hits_total", **q100): 40,
        key("nfq_ipsec_worker_busy_poll_misses_total", **q100): 7,
        key("nfq_ipsec_worker_version_in_service", implementation="core", **q100): 1,
        key("nfq_ipsec_worker_version_in_service", implementation="independent", **q100): 0,
        key("nfq_ipsec_worker_version_outvoted_total", implementation="core", **q100): 0,
        key("nfq_ipsec_worker_version_outvoted_total", implementation="independent", **q100): 0,
        key("nfq_ipsec_worker_version_agreed_total", pair="core+independent", **q100): 6,
        key("nfq_ipsec_worker_version_mismatches_total", pair="core+independent", **q100): 3,
        key("nfq_ipsec_packets_in_total", **q100): 10,
        key("nfq_ipsec_packets_out_total", **q100): 8,
        key("nfq_ipsec_drops_total", reason="replay", **q100): 2,
        key("nfq_ipsec_drops_total", reason="integrity", **q100): 1,
        key("nfq_ipsec_kernel_queue_dropped_total", **q100): 3,
        key("nfq_ipsec_kernel_user_dropped_total", **q100): 0,
        key("nfq_ipsec_rule_drops_total", reason="no_policy"): 4,
        key("nfq_ipsec_rule_drops_total", reason="cleartext_protected"): 0,
        key("nfq_ipsec_sa_info", encapsulation="none", **out): 1,
        key("nfq_ipsec_sa_info", encapsulation="udp", **inb): 1,
        key("nfq_ipsec_sa_info", encapsulation="none", sa="c-to-d", spi="0x00003000",
            direction="out", queue="101"): 1,
        key("nfq_ipsec_sa_packets_total", **out): 8,
        key("nfq_ipsec_sa_bytes_total", **out): 800,
        key("nfq_ipsec_sa_packets_total", **inb): 7,
        key("nfq_ipsec_sa_bytes_total", **inb): 700,
        key("nfq_ipsec_sa_drops_total", reason="replay", **inb): 2,
        key("nfq_ipsec_sa_drops_total", reason="integrity", **inb): 1,
        key("nfq_ipsec_sa_drops_total", reason="other", **inb): 0,
        key("nfq_ipsec_sa_drops_total", reason="replay", **out): 0,
        key("nfq_ipsec_sa_drops_total", reason="integrity", **out): 0,
        key("nfq_ipsec_sa_drops_total", reason="other", **out): 0,
        key("nfq_ipsec_sa_sequence_number", **out): 8,
        key("nfq_ipsec_sa_sequence_number", **inb): 9,
        key("nfq_ipsec_sa_lifetime_left_seconds", **out): 3500.25,
        key("nfq_ipsec_sa_lifetime_left_bytes", **out): 1000000,
        key("nfq_ipsec_sa_last_packet_age_seconds", **out): 2.5,
        key("nfq_ipsec_sa_last_packet_age_seconds", **inb): 75.0,
        key("nfq_ipsec_engine_up", engine="openssl"): 1,
        key("nfq_ipsec_engine_up", engine="afalg"): 0,
        key("nfq_ipsec_engine_sas", engine="openssl"): 1,
        key("nfq_ipsec_engine_sas", engine="afalg"): 0,
        key("nfq_ipsec_engine_faults_total", engine="openssl"): 0,
        key("nfq_ipsec_engine_faults_total", engine="afalg"): 2,
    }
    # exactly these: the down queue's and SA's null counters have no series (absent, not 0)
    assert values == expected
    assert types["nfq_ipsec_packets_in"] == "counter" and types["nfq_ipsec_worker_up"] == "gauge"
    counters = {f"nfq_ipsec_{n}" for n in (
        "packets_in", "packets_out", "drops", "worker_restarts", "kernel_queue_dropped",
        "kernel_user_dropped", "rule_drops", "sa_packets", "sa_bytes", "sa_drops", "control_errors",
        "cpu_seconds", "worker_cpu_seconds", "worker_busy_poll_hits", "worker_busy_poll_misses",
        "engine_faults", "worker_version_agreed", "worker_version_mismatches",
        "worker_version_outvoted")}
    assert {name for name, t in types.items() if t == "counter"} == counters


def test_names_follow_the_conventions() -> None:
    text = metrics.render(cast(StatusReport, sample_answer()))
    for fam in metrics.families(cast(StatusReport, sample_answer())):
        assert fam.name.startswith("nfq_ipsec_")
        assert fam.name.endswith("_total") == (fam.kind == "counter"), fam.name
        assert f"# TYPE {fam.name} {fam.kind}" in text
    labels = {k for f in metrics.families(cast(StatusReport, sample_answer()))
              for lab, _ in f.samples for k in lab}
    assert labels == {"version", "queue", "reason", "sa", "spi", "direction", "encapsulation",
                      "engine", "implementation", "pair"}


def test_label_values_are_escaped() -> None:
    assert metrics.escape('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    status = sample_answer()
    status["sas"][0]["name"] = 'odd "name"\\\nend'
    values, _ = parsed(metrics.render(cast(StatusReport, status)))
    names = {dict(labels).get("sa") for _, labels in values}
    assert 'odd "name"\\\nend' in names


def test_no_key_in_the_metrics_of_a_real_status() -> None:
    """The supervisor's own status answer (no worker started) as metrics: names and SPIs, no
    key bytes in any spelling."""
    cfg = cfg_of(host_data())
    text = metrics.render(supervisor.Supervisor(cfg, "x.toml").status())
    assert 'spi="0x00001000"' in text and 'sa="in0"' in text
    for sa in cfg.sas:
        secret = sa.key.reveal()
        for spelling in (secret.hex(), secret.hex().upper(), secret[:8].hex()):
            assert spelling not in text


# -- the listener ----------------------------------------------------------------------------------
class Daemon:
    """A control socket served as the supervisor serves it (``ControlServer.serve`` in a
    loop), answering status with the sample; ``answered`` counts its answers."""

    def __init__(self, path: str) -> None:
        self.server = control.ControlServer(path)
        self.answered = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        self.answered += 1
        return sample_answer() if req.get("command") == "status" else {"error": "unknown"}

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.server.serve(self.handle)
            time.sleep(0.005)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(str(tmp_path / "run" / "c.sock"))
    d.server.open()
    d.thread.start()
    try:
        yield d
    finally:
        d.stop.set()
        d.thread.join(5)
        d.server.close()


@pytest.fixture
def listener(daemon: Daemon) -> Iterator[metricsserver.MetricsServer]:
    m = metricsserver.MetricsServer("127.0.0.1:0", daemon.server.path, client_timeout=0.5,
                                    status_timeout=2.0)
    m.open()
    m.start()
    try:
        yield m
    finally:
        m.close()


def get(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read().decode()
    finally:
        conn.close()


def test_get_metrics(listener: metricsserver.MetricsServer, daemon: Daemon) -> None:
    status, ctype, body = get(listener.port)
    assert status == 200 and ctype == metrics.CONTENT_TYPE
    values, _ = parsed(body)
    assert values[key("nfq_ipsec_packets_in_total", queue="100")] == 10
    assert body == metrics.render(cast(StatusReport, sample_answer()))
    assert listener.scrapes == 1 and daemon.answered == 1


def test_scrapes_close_together_share_one_status_request(listener: metricsserver.MetricsServer,
                                                         daemon: Daemon) -> None:
    first = get(listener.port)
    second = get(listener.port)
    assert first == second and first[0] == 200
    assert daemon.answered == 1 and listener.scrapes == 2


def test_other_paths_and_methods(listener: metricsserver.MetricsServer, daemon: Daemon) -> None:
    assert get(listener.port, "/")[0] == 404
    assert get(listener.port, "/metrics", "POST")[0] == 405
    status, _, body = get(listener.port, "/metrics", "HEAD")
    assert status == 200 and body == ""
    assert listener.errors == 2


def test_no_daemon_is_503(tmp_path: Path) -> None:
    m = metricsserver.MetricsServer("127.0.0.1:0", str(tmp_path / "nobody.sock"))
    m.open()
    m.start()
    try:
        status, _, body = get(m.port)
        assert status == 503 and "not running" in body
    finally:
        m.close()


def test_a_silent_scraper_stalls_neither_the_daemon_nor_the_listener_for_long(
        listener: metricsserver.MetricsServer, daemon: Daemon) -> None:
    silent = socket.create_connection(("127.0.0.1", listener.port))
    try:
        time.sleep(0.1)  # the listener is now waiting on it
        t0 = time.monotonic()
        answer = control.request(daemon.server.path, {"command": "status"}, timeout=5)
        assert answer["daemon"]["pid"] == 10 and time.monotonic() - t0 < 0.3
        t0 = time.monotonic()
        assert get(listener.port)[0] == 200  # served once the silent one is dropped
        assert time.monotonic() - t0 < 0.5 + 1.0
        silent.settimeout(2)
        assert silent.recv(100) == b""  # dropped without an answer
        assert listener.errors == 1
    finally:
        silent.close()


def test_a_request_too_long_is_dropped(listener: metricsserver.MetricsServer) -> None:
    with socket.create_connection(("127.0.0.1", listener.port)) as s:
        s.settimeout(5)
        with pytest.raises(OSError):  # reset, or the pipe broken, as it is closed on us
            for _ in range(64):
                s.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 1024)
            assert s.recv(100) == b""
            raise ConnectionResetError  # closed cleanly: the same for this test
    assert listener.errors == 1
    assert get(listener.port)[0] == 200


def test_a_port_in_use_is_refused_naming_the_setting(listener: metricsserver.MetricsServer) -> None:
    other = metricsserver.MetricsServer(f"127.0.0.1:{listener.port}", "unused.sock")
    with pytest.raises(metricsserver.MetricsError, match=r"daemon\.metrics"):
        other.open()


# -- the configuration -----------------------------------------------------------------------------
def test_metrics_is_off_by_default_and_read() -> None:
    assert cfg_of(host_data()).daemon.metrics is None
    data = host_data()
    data["daemon"]["metrics"] = "[::1]:9477"
    assert cfg_of(data).daemon.metrics == "[::1]:9477"
    assert supervisor.Supervisor(cfg_of(data), "x.toml").metrics is not None
    assert supervisor.Supervisor(cfg_of(host_data()), "x.toml").metrics is None


@pytest.mark.parametrize("value", ["localhost:9477", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536",
                                   "::1:9477", "[127.0.0.1]:9477", "127.0.0.1:http", 9477])
def test_metrics_rejects(value: object) -> None:
    data = host_data()
    data["daemon"]["metrics"] = value
    with pytest.raises(ConfigError) as err:
        cfg_of(data)
    assert any(p.startswith("daemon.metrics") for p in err.value.problems), err.value.problems


def test_a_metrics_change_needs_a_restart() -> None:
    old = cfg_of(host_data())
    data = host_data()
    data["daemon"]["metrics"] = "127.0.0.1:9477"
    assert supervisor.reload_problems(old, cfg_of(data)) == [
        "daemon.metrics: a change needs a restart"]


def test_docs_status_md_lists_every_metric() -> None:
    from repo import ROOT

    text = (ROOT / "docs" / "status.md").read_text().split("## As Prometheus metrics", 1)[1]
    listed = {line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| nfq_ipsec_")}
    assert listed == {f.name for f in metrics.families(cast(StatusReport, sample_answer()))}


def test_close_does_not_wait_for_a_silent_scraper(daemon: Daemon) -> None:
    m = metricsserver.MetricsServer("127.0.0.1:0", daemon.server.path, client_timeout=30)
    m.open()
    m.start()
    port = m.port
    with socket.create_connection(("127.0.0.1", port)):
        time.sleep(0.1)  # the listener is waiting on it, for up to 30 s
        t0 = time.monotonic()
        m.close()
        assert time.monotonic() - t0 < 2.0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_a_metrics_address_in_use_stops_the_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Exit 1 before any worker starts or rule is installed, the message naming the setting."""
    from standins import signals_restored

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    data = host_data()
    data["daemon"]["metrics"] = f"127.0.0.1:{taken.getsockname()[1]}"
    sup = supervisor.Supervisor(cfg_of(data), "x.toml")
    sup.control = control.ControlServer(str(tmp_path / "run" / "c.sock"))

    def never(*args: Any) -> None:
        raise AssertionError("a worker started")

    monkeypatch.setattr(supervisor, "worker_main", never)
    monkeypatch.setattr(sup, "_install_rules", never)
    try:
        with signals_restored():
            assert sup.run() == 1
    finally:
        taken.close()
    assert "daemon.metrics" in caplog.text and "cannot listen for metrics" in caplog.text
    assert not (tmp_path / "run" / "c.sock").exists()  # the control socket closed again

"""Metrics: what the handler wrapper counts, the HTTP endpoint's answers, and a real
`filterd serve` scraped over HTTP while it takes mail and reloads its model."""

import asyncio
import hashlib
import http.client
import json
import os
import re
import signal
import smtplib
import socket
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from filterd import cli, metrics
from filterd.config import Config, load_config
from filterd.engine import Engine
from filterd.mail import Mail
from filterd.metrics import Endpoint, Metrics
from filterd.model.checkpoint import checkpoint_path
from filterd.plugin_api import Outcome
from filterd.verdict import Verdict
from tests.test_daemon import Daemon, settings, wait_until
from tests.test_engine import HAM, Counting, make_checkpoint
from tests.test_smtp_proxy import MSG, sink_running


def verdict(p: float | None, spam: bool, decided_by: str = "model") -> Verdict:
    return Verdict(p, spam, "tag", 0.5, "stub", decided_by)


def value(m: Metrics, name: str, /, **labels: str) -> float:
    found = m.registry.get_sample_value(name, labels)
    assert found is not None, (name, labels)
    return found


# --- counting --------------------------------------------------------------------------


def test_the_wrapper_counts_each_outcome_under_its_source():
    outcomes = iter(
        [
            Outcome("deliver", b"x", verdict=verdict(0.12, False)),
            Outcome("quarantine", b"x", verdict=verdict(0.97, True)),
            Outcome("reject", verdict=verdict(None, True, "check:lists")),
            Outcome("deliver", b"x", verdict=verdict(None, False, "marker")),
            Outcome("deliver", b"x", verdict=verdict(None, False, "no_text")),
            Outcome("deliver", b"x", note="ScoringTimeout: no verdict within 30 s"),
            Outcome("tempfail", note="ScoringProcessError: the scoring process died"),
        ]
    )
    calls = []

    async def handle(mail, *, can_reject=False, tag_only=False):
        calls.append((can_reject, tag_only))
        return next(outcomes)

    m = Metrics()
    smtp, maildir = m.wrap(handle, "smtp"), m.wrap(handle, "maildir")

    async def main():
        for _ in range(4):
            await smtp(Mail(HAM), can_reject=True)
        for _ in range(3):
            await maildir(Mail(HAM), tag_only=True)

    asyncio.run(main())
    assert calls == [(True, False)] * 4 + [(False, True)] * 3  # passed on as given
    assert value(m, "filterd_messages_total", source="smtp", outcome="deliver") == 2
    assert value(m, "filterd_messages_total", source="smtp", outcome="quarantine") == 1
    assert value(m, "filterd_messages_total", source="smtp", outcome="reject") == 1
    assert value(m, "filterd_messages_total", source="maildir", outcome="deliver") == 1
    assert value(m, "filterd_messages_total", source="maildir", outcome="unscored") == 2
    assert value(m, "filterd_messages_total", source="maildir", outcome="tempfail") == 0
    assert value(m, "filterd_scoring_failures_total", reason="timeout") == 1
    assert value(m, "filterd_scoring_failures_total", reason="error") == 1
    assert value(m, "filterd_verdicts_total", label="ham", decided_by="model") == 1
    assert value(m, "filterd_verdicts_total", label="spam", decided_by="model") == 1
    assert value(m, "filterd_verdicts_total", label="spam", decided_by="check") == 1
    assert value(m, "filterd_verdicts_total", label="ham", decided_by="marker") == 1
    assert value(m, "filterd_verdicts_total", label="ham", decided_by="no_text") == 1
    # Only the model's probabilities go into the histogram.
    assert value(m, "filterd_spam_probability_count") == 2
    assert value(m, "filterd_spam_probability_bucket", le="0.2") == 1
    assert value(m, "filterd_spam_probability_bucket", le="0.95") == 1
    assert value(m, "filterd_spam_probability_sum") == pytest.approx(1.09)
    # Every message is timed, failures too.
    assert value(m, "filterd_message_duration_seconds_count", source="smtp") == 4
    assert value(m, "filterd_message_duration_seconds_count", source="maildir") == 3
    assert value(m, "filterd_message_duration_seconds_bucket", source="smtp", le="60.0") == 4


def test_a_handler_that_raises_is_counted_and_the_error_goes_on():
    async def broken(mail, *, can_reject=False, tag_only=False):
        raise RuntimeError("bug")

    m = Metrics()
    with pytest.raises(RuntimeError, match="bug"):
        asyncio.run(m.wrap(broken, "spamd")(Mail(HAM)))
    assert value(m, "filterd_messages_total", source="spamd", outcome="error") == 1
    assert value(m, "filterd_messages_total", source="spamd", outcome="deliver") == 0


class Failing(Counting):
    def score_messages(self, raws, progress=None):
        raise RuntimeError("the model fell over")


@pytest.mark.parametrize(
    ("clf", "reason"), [(Counting(delay=0.5), "timeout"), (Failing(), "error")]
)
def test_the_engines_failures_are_told_apart_and_its_queue_depth_read(clf, reason):
    engine = Engine(clf, Config.model_validate({"scoring": {"timeout_seconds": 0.2}}))
    m = Metrics(lambda: engine.queue_depth)
    handle = m.wrap(engine.handle, "smtp")
    depths = []

    async def main():
        tasks = [asyncio.create_task(handle(Mail(HAM))) for _ in range(3)]
        await asyncio.sleep(0.05)
        depths.append(value(m, "filterd_queue_depth"))
        return await asyncio.gather(*tasks)

    outcomes = asyncio.run(main())
    engine.close()
    assert all(o.verdict is None for o in outcomes)
    assert value(m, "filterd_scoring_failures_total", reason=reason) == 3
    assert value(m, "filterd_messages_total", source="smtp", outcome="unscored") == 3
    if reason == "timeout":  # all three still wait (a failure may come before the look)
        assert depths == [3]
    assert value(m, "filterd_queue_depth") == 0


def test_reloads_and_the_checkpoint_in_use(tmp_path):
    first = make_checkpoint(tmp_path / "a", -2.0)
    second = make_checkpoint(tmp_path / "b", 2.0)
    m = Metrics()

    async def main():
        await m.checkpoint_loaded("gpt2-tiny", first)
        await m.reloaded(False, "gpt2-tiny", second)  # failed: the first stays
        assert value(m, "filterd_checkpoint_info", name="gpt2-tiny", sha256=sha(first)) == 1
        await m.reloaded(True, "gpt2-small", second)
        await m.checkpoint_loaded("x", tmp_path / "gone")

    asyncio.run(main())
    assert value(m, "filterd_model_reloads_total", result="ok") == 1
    assert value(m, "filterd_model_reloads_total", result="failed") == 1
    assert (
        m.registry.get_sample_value(
            "filterd_checkpoint_info", {"name": "gpt2-tiny", "sha256": sha(first)}
        )
        is None
    )  # replaced, not added to
    assert value(m, "filterd_checkpoint_info", name="x", sha256="unknown") == 1
    assert value(m, "filterd_checkpoint_loaded_timestamp_seconds") > 1.7e9


def sha(path) -> str:
    return hashlib.sha256(checkpoint_path(path).read_bytes()).hexdigest()


def test_metrics_settings_are_checked_like_a_sources(tmp_path):
    assert Config().metrics.enabled is False and Config().metrics.port == 9847
    path = tmp_path / "config.yaml"
    path.write_text("metrics:\n  enabled: true\n  host: 192.0.2.1\n")
    with pytest.raises(ValueError, match=r"metrics\.host: .*set allow_remote: true"):
        load_config(path)
    path.write_text("metrics:\n  host: ''\n")
    with pytest.raises(ValueError, match=r"metrics\.host: .*empty"):
        load_config(path)
    path.write_text("metrics:\n  allowed_clients: [10.0.0.0/8]\n  prot: 1\n")
    with pytest.raises(ValueError, match=r"metrics\.prot: Extra inputs"):
        load_config(path)


# --- the HTTP endpoint -----------------------------------------------------------------


async def exchange(port: int, data: bytes, wait: float = 0.0) -> bytes:
    """Send `data`, then read the whole answer until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    if wait:
        await asyncio.sleep(wait)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


def endpoint(**settings) -> Endpoint:
    config = Config.model_validate({"metrics": {"enabled": True, "port": 0} | settings})
    m = Metrics()
    m.wrap(lambda mail, **_: None, "smtp")  # its series exist from here
    return Endpoint(m, config.metrics, lambda: "gpt2-tiny")


def test_the_endpoint_answers_metrics_health_and_refuses_the_rest(monkeypatch):
    monkeypatch.setattr(metrics, "HEAD_SECONDS", 0.3)
    ep = endpoint()

    async def main():
        where = await ep.start()
        port = int(where.rpartition(":")[2])
        get = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n"
        answers = {"starting": await exchange(port, get % b"/healthz")}
        ep.state = "serving"
        answers["serving"] = await exchange(port, get % b"/healthz")
        answers["metrics"] = await exchange(port, get % b"/metrics?x=1")
        answers["openmetrics"] = await exchange(
            port, b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text\r\n\r\n"
        )
        answers["post"] = await exchange(port, b"POST /metrics HTTP/1.1\r\n\r\nbody")
        answers["other"] = await exchange(port, get % b"/")
        answers["junk"] = await exchange(port, b"\x16\x03\x01 hello\r\n\r\n")
        answers["huge"] = await exchange(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 50000)
        answers["slow"] = await exchange(port, b"GET /metrics HTTP/1.1\r\n", wait=0.5)
        answers["after"] = await exchange(port, get % b"/healthz")
        ep.state = "stopping"
        answers["stopping"] = await exchange(port, get % b"/healthz")
        await ep.close()
        return where, answers

    where, answers = asyncio.run(main())
    assert re.fullmatch(r"127\.0\.0\.1:\d+", where)
    head, body = answers["serving"].split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.0 200 OK\r\n") and body == b"ok gpt2-tiny\n"
    assert head.endswith(b"\r\nConnection: close") and b"\r\nContent-Length: 13\r\n" in head
    assert answers["starting"].startswith(b"HTTP/1.0 503 ")
    assert answers["starting"].endswith(b"\r\n\r\nstarting\n")
    assert answers["stopping"].endswith(b"\r\n\r\nstopping\n")
    text = answers["metrics"].split(b"\r\n\r\n", 1)[1].decode()
    assert b"Content-Type: text/plain; version=0.0.4" in answers["metrics"]
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"filterd_messages", "filterd_queue_depth", "process_cpu_seconds"} <= names
    assert 'filterd_messages_total{outcome="deliver",source="smtp"} 0.0' in text
    assert b"Content-Type: application/openmetrics-text" in answers["openmetrics"]
    assert answers["openmetrics"].endswith(b"# EOF\n")
    assert answers["post"].startswith(b"HTTP/1.0 405 Method Not Allowed\r\n")
    assert b"\r\nAllow: GET\r\n" in answers["post"]
    assert answers["other"].startswith(b"HTTP/1.0 404 ")
    assert answers["junk"].startswith(b"HTTP/1.0 400 ")
    assert answers["huge"].startswith(b"HTTP/1.0 431 ")
    assert answers["slow"].startswith(b"HTTP/1.0 408 ")
    assert answers["after"].endswith(b"ok gpt2-tiny\n")  # still serving


def test_the_endpoint_closes_clients_not_allowed_and_caps_those_at_once(monkeypatch):
    monkeypatch.setattr(metrics, "MAX_CLIENTS", 1)
    monkeypatch.setattr(metrics, "HEAD_SECONDS", 1.0)
    refusing = endpoint(allowed_clients=["192.0.2.0/24"])
    ep = endpoint()
    ep.state = "serving"

    async def main():
        port = int((await refusing.start()).rpartition(":")[2])
        try:  # closed at connect: the unread request may reset the connection
            refused = await exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n")
        except ConnectionResetError:
            refused = b""
        await refusing.close()
        port = int((await ep.start()).rpartition(":")[2])
        _, idle = await asyncio.open_connection("127.0.0.1", port)  # holds the one place
        await asyncio.sleep(0.1)
        busy = await exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n")
        idle.close()
        await asyncio.sleep(0.3)  # the idle one left: its place is free again
        ok = await exchange(port, b"GET /healthz HTTP/1.1\r\n\r\n")
        await ep.close()
        return refused, busy, ok

    refused, busy, ok = asyncio.run(main())
    assert refused == b""
    assert busy.startswith(b"HTTP/1.0 503 ") and busy.endswith(b"busy\n")
    assert ok.endswith(b"ok gpt2-tiny\n")


def test_serve_exits_2_when_the_metrics_port_is_taken(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = settings(
            tmp_path,
            1,
            daemon={"scoring_process": False},
            metrics={"enabled": True, "port": port},
        )
        path = tmp_path / "config.yaml"
        path.write_text(json.dumps(config))
        assert cli.main(["serve", "--config", str(path)]) == 2
    assert f"metrics: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


# --- a real daemon ---------------------------------------------------------------------


def http_get(port: int, path: str, accept: str | None = None) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Accept": accept} if accept else {})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response.read().decode()
    finally:
        conn.close()


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    status, _, text = http_get(port, "/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict, name: str, /, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def send(port: int, count: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        for i in range(count):
            raw = MSG.replace(b"<m1@example.org>", f"<n{i}.{threading.get_ident()}@t>".encode())
            smtp.sendmail("ann@example.org", ["bob@example.net"], raw)


def test_a_real_daemon_is_scraped_while_it_takes_mail_and_reloads(tmp_path):
    model = tmp_path / "model"
    with sink_running() as sink:
        daemon = Daemon(
            tmp_path,
            settings(
                tmp_path,
                sink.port,
                daemon={"reload_check_seconds": 0, "scoring_process": False},
                scoring={"batch_wait_ms": 1},
                metrics={"enabled": True, "port": 0},
            ),
        )
        try:
            port = int(daemon.wait_for(r"ready: .*, metrics on 127\.0\.0\.1:(\d+)")[1])
            assert http_get(port, "/healthz")[::2] == (200, "ok gpt2-tiny\n")
            send(daemon.port, 3)  # ham: p = 0.1192
            first = sha(model)
            got = scrape(port)
            assert sample(got, "filterd_messages_total", source="smtp", outcome="deliver") == 3
            assert sample(got, "filterd_messages_total", source="smtp", outcome="unscored") == 0
            assert sample(got, "filterd_verdicts_total", label="ham", decided_by="model") == 3
            assert sample(got, "filterd_spam_probability_bucket", le="0.2") == 3
            assert sample(got, "filterd_message_duration_seconds_count", source="smtp") == 3
            assert sample(got, "filterd_checkpoint_info", name="gpt2-tiny", sha256=first) == 1
            assert sample(got, "filterd_model_reloads_total", result="ok") == 0
            assert sample(got, "filterd_queue_depth") == 0
            assert sample(got, "process_resident_memory_bytes") > 0

            # A new checkpoint on SIGHUP: counted, and its hash shows.
            make_checkpoint(model, 2.0)  # spam: p = 0.8808
            second = sha(model)
            daemon.proc.send_signal(signal.SIGHUP)
            wait_until(
                lambda: (
                    sample(scrape(port), "filterd_checkpoint_info", name="gpt2-tiny", sha256=second)
                    == 1
                )
            )
            # A broken one: a failed reload, and the hash in use stays.
            broken = tmp_path / "broken"
            broken.write_bytes(b"not a checkpoint")
            os.replace(broken, checkpoint_path(model))
            daemon.proc.send_signal(signal.SIGHUP)
            wait_until(
                lambda: sample(scrape(port), "filterd_model_reloads_total", result="failed") == 1
            )
            send(daemon.port, 1)

            # Bad requests get a clean answer and the endpoint keeps serving.
            assert raw_request(port, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 405 ")
            huge = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n"
            assert raw_request(port, huge).startswith(b"HTTP/1.0 431 ")
            status, content_type, text = http_get(
                port, "/metrics", accept="application/openmetrics-text; version=1.0.0"
            )
            assert status == 200 and content_type.startswith("application/openmetrics-text")
            assert text.endswith("# EOF\n")
            got = scrape(port)
            assert sample(got, "filterd_model_reloads_total", result="ok") == 1
            assert sample(got, "filterd_checkpoint_info", name="gpt2-tiny", sha256=second) == 1
            assert sample(got, "filterd_checkpoint_info", name="gpt2-tiny", sha256=first) is None
            assert sample(got, "filterd_messages_total", source="smtp", outcome="deliver") == 4
            assert sample(got, "filterd_verdicts_total", label="spam", decided_by="model") == 1
            assert sample(got, "filterd_spam_probability_count") == 4
            assert sample(got, "filterd_spam_probability_bucket", le="0.8") == 3
            assert sample(got, "filterd_spam_probability_bucket", le="0.9") == 4
            assert sample(got, "filterd_message_duration_seconds_count", source="smtp") == 4
            assert sample(got, "filterd_message_duration_seconds_sum", source="smtp") > 0
            assert sample(got, "filterd_scoring_failures_total", reason="error") == 0
            assert http_get(port, "/healthz")[0] == 200
            assert daemon.stop() == 0
        finally:
            daemon.kill()
    assert len(sink.messages) == 4
    with pytest.raises(OSError):  # closed on stop
        socket.create_connection(("127.0.0.1", port), timeout=2).close()

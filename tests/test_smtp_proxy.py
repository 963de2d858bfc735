"""The SMTP proxy over real loopback sockets: smtplib -> filterd -> an aiosmtpd sink."""

import asyncio
import contextlib
import logging
import smtplib
import socket
import threading
import time

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from filterd.builtin.smtp_proxy import DSN_PARAMS, SmtpOptions, SmtpProxy, dot_stuffed
from filterd.config import Config, ConfigError, load_config
from filterd.daemon import load_sources
from filterd.engine import Engine
from filterd.headers import Tagger
from filterd.plugin_api import Context, Outcome
from filterd.store.quarantine import Store
from tests.test_engine import make_checkpoint

MSG = (
    b"From: Ann <ann@example.org>\r\nTo: bob@example.net\r\nSubject: hello\r\n"
    b"Message-ID: <m1@example.org>\r\nX-Spam-Flag: NO\r\n\r\n"
    b"Caf\xc3\xa9 at noon?\r\n.a line with a leading dot\r\n..two\r\n"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _SinkServer(SMTP):
    """aiosmtpd as a next hop that takes DSN parameters and records MAIL/RCPT as sent."""

    def _getparams(self, params):
        result = super()._getparams(params)
        return None if result is None else {k: v for k, v in result.items() if k not in DSN_PARAMS}

    async def smtp_MAIL(self, arg):
        self.event_handler.lines.append(f"MAIL {arg}")
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg):
        self.event_handler.lines.append(f"RCPT {arg}")
        await super().smtp_RCPT(arg)


class Sink:
    """The next hop: keeps what it accepts; can refuse recipients, answer DATA, be slow."""

    def __init__(self):
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.lines: list[str] = []
        self.refuse: dict[str, str] = {}  # recipient -> RCPT answer
        self.data_reply: str | None = None
        self.delay = 0.0

    async def handle_RCPT(self, server, session, envelope, address, options):
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(self.delay)
        if self.data_reply:
            return self.data_reply
        self.messages.append((envelope.mail_from, envelope.rcpt_tos, envelope.original_content))
        return "250 2.0.0 Ok: queued"


class _SinkController(Controller):
    def factory(self):
        return _SinkServer(self.handler, **self.SMTP_kwargs)


@contextlib.contextmanager
def sink_running():
    """A Sink listening on a free loopback port (its `port`)."""
    handler = Sink()
    controller = _SinkController(
        handler, hostname="127.0.0.1", port=free_port(), enable_SMTPUTF8=True
    )
    controller.start()
    handler.port = controller.port
    try:
        yield handler
    finally:
        controller.stop()


@pytest.fixture
def sink():
    with sink_running() as handler:
        yield handler


def make_config(tmp_path, port: int, logit: float = 2.0, **sections) -> Config:
    """Config for a gpt2-tiny model whose every message scores sigmoid(logit)."""
    folder = tmp_path / f"model{logit}"
    if not folder.exists():
        make_checkpoint(folder, logit)
    data = {
        "checkpoint": str(folder),
        "headers": {"secret_file": str(tmp_path / "secret")},
        "quarantine": {"path": str(tmp_path / "quarantine")},
        "relay": {"port": port, "timeout_seconds": 2},
        "smtp": {"enabled": True, "port": 0},
        "scoring": {"batch_wait_ms": 1},
    }
    for key, value in sections.items():
        data[key] = data.get(key, {}) | value if isinstance(value, dict) else value
    return Config.model_validate(data)


async def _cancel_the_rest() -> None:
    """What asyncio.run does at its end: e.g. a batcher still waiting out a timed-out verdict."""
    for task in asyncio.all_tasks() - {asyncio.current_task()}:
        task.cancel()


def smtp_source(config: Config) -> SmtpProxy:
    """The config's smtp source, built through the plugin registry as the daemon builds it."""
    (proxy,) = [source for source in load_sources(config) if source.name == "smtp"]
    return proxy


@contextlib.contextmanager
def proxy_running(config: Config, handle=None, context=None):
    """The proxy on its own event loop thread, started and stopped as the daemon does it;
    yields it. Without a handle, a real engine from the config scores."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    engine = None
    if handle is None:
        engine = Engine.from_config(config)
        handle, context = engine.handle, engine.context
    proxy = smtp_source(config)
    context = context or Context(config, Tagger(None, config.headers.prefix))
    asyncio.run_coroutine_threadsafe(proxy.start(handle, context), loop).result(5)
    try:
        yield proxy
    finally:
        asyncio.run_coroutine_threadsafe(proxy.stop_accepting(), loop).result(10)
        asyncio.run_coroutine_threadsafe(proxy.drain(5), loop).result(10)
        asyncio.run_coroutine_threadsafe(_cancel_the_rest(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        if engine is not None:
            engine.close()


def client(proxy: SmtpProxy) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", proxy.port, timeout=10)


def test_dot_stuffing_is_the_wire_form():
    assert dot_stuffed(b".a\r\nb\r\n..c") == b"..a\r\nb\r\n...c\r\n.\r\n"


@pytest.mark.parametrize(
    "arg",
    [
        "<a@b.example>",
        "<a.b+c@x-y.example.org> SIZE=10 BODY=8BITMIME",
        "<A@B.C>\tSMTPUTF8",
        "<a@b.c>x",
        "<>",
        "<> SIZE=5",
        "<a@b.c> (comment) SIZE=5",
        "<a..b@c.d>",
        "<.a@b.c>",
        "<a@b..c>",
        "<a@b.c.>",
        '<"q x"@b.c>',
        "<a@[192.0.2.1]>",
        "<@relay.example:a@b.c>",
        " <a@b.c>",
        "< a@b.c >",
        "a@b.c",
        "<a@b.c",
        "<ü@b.c>",
        "<a@ü.example>",
        "<" + "x" * 70 + "@b.c>",
    ],
)
def test_paths_parse_as_aiosmtpd_parses_them(arg):
    plain, fast = SMTP(None), SmtpProxy(SmtpOptions(), Config())._connection()
    plain.local_part_limit = fast.local_part_limit = 64
    assert fast._getaddr(arg) == plain._getaddr(arg)


def test_relays_tagged_mail_with_envelope_parameters_and_per_recipient_answers(tmp_path, sink):
    sink.refuse["nobody@example.net"] = "550 5.1.1 <nobody@example.net>: no such user"
    config = make_config(tmp_path, sink.port)
    with proxy_running(config) as proxy, client(proxy) as smtp:
        smtp.ehlo("mta.example")
        for extension in ("dsn", "size", "8bitmime", "smtputf8"):
            assert smtp.has_extn(extension), extension
        refused = smtp.sendmail(
            "ann@example.org",
            ["bob@example.net", "nobody@example.net", "carol@elsewhere.example"],
            MSG,
            mail_options=["BODY=8BITMIME", "RET=HDRS", "ENVID=Qx+2Bz.7"],  # smtplib adds size=
            rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Bob@Example.NET"],
        )
        assert refused == {"nobody@example.net": (550, b"5.1.1 <nobody@example.net>: no such user")}
        # A bounce (null sender) to an address in UTF-8.
        smtp.sendmail("", ["用户@example.net"], MSG, mail_options=["SMTPUTF8"])
    assert len(sink.messages) == 2
    (sender, rcpts, data), (null, utf8, _) = sink.messages
    # Every recipient went to the configured next hop, whatever its domain: no relaying
    # elsewhere; the refused one is not in the envelope.
    assert (sender, rcpts) == ("ann@example.org", ["bob@example.net", "carol@elsewhere.example"])
    assert (null, utf8) == ("<>", ["用户@example.net"])
    # Parameters arrive as the client wrote them (aiosmtpd alone would upper-case them).
    assert sink.lines[0] == (
        f"MAIL FROM:<ann@example.org> size={len(MSG)} BODY=8BITMIME RET=HDRS ENVID=Qx+2Bz.7"
    )
    assert (
        sink.lines[1]
        == "RCPT TO:<bob@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob@Example.NET"
    )
    assert f"MAIL FROM:<> size={len(MSG)} SMTPUTF8" in sink.lines
    # Tagged: our headers on top, the spoofed one gone, the rest byte for byte.
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"X-Spam-Flag: YES\r\nX-Spam-Status: Yes, score=8.8")
    assert b"X-Spam-Flag: NO" not in head
    assert data.endswith(MSG[MSG.index(b"From:") :].split(b"X-Spam-Flag: NO\r\n")[1])
    assert body == MSG.split(b"\r\n\r\n", 1)[1]


def test_size_limit_answers_552(tmp_path, sink):
    config = make_config(tmp_path, sink.port, smtp={"max_message_bytes": 2048})
    big = MSG + (b"x" * 70 + b"\r\n") * 50
    with proxy_running(config) as proxy, client(proxy) as smtp:
        smtp.ehlo()
        assert smtp.esmtp_features["size"] == "2048"
        assert smtp.mail("ann@example.org", [f"SIZE={len(big)}"])[0] == 552
        assert smtp.mail("ann@example.org")[0] == 250  # no SIZE given: found out in DATA
        assert smtp.rcpt("bob@example.net")[0] == 250
        assert smtp.data(big)[0] == 552
    assert sink.messages == []


def test_before_queue_reject_answers_550_and_the_connection_goes_on(tmp_path, sink):
    config = make_config(
        tmp_path,
        sink.port,
        smtp={"mode": "before_queue"},
        scoring={"quarantine_threshold": 0.6, "reject_threshold": 0.8},
        checks=[{"name": "lists", "options": {"allow": ["friend.example"]}}],
    )
    with proxy_running(config) as proxy, client(proxy) as smtp:
        with pytest.raises(smtplib.SMTPDataError) as e:
            smtp.sendmail("ann@example.org", ["bob@example.net"], MSG)
        assert (e.value.smtp_code, e.value.smtp_error[:5]) == (550, b"5.7.1")
        # The next hop's half-open transaction was reset: the next message goes through.
        assert smtp.sendmail("joe@friend.example", ["bob@example.net"], MSG) == {}
    assert [m[0] for m in sink.messages] == ["joe@friend.example"]
    assert b"allowlisted=friend.example" in sink.messages[0][2]


def test_after_queue_refuses_reject_in_config_and_quarantines_a_check_reject(tmp_path, sink):
    path = tmp_path / "config.yaml"
    path.write_text("smtp: {enabled: true}\nscoring: {reject_threshold: 0.9}\n")
    with pytest.raises(ConfigError, match=r"scoring.reject_threshold.*after_queue.*quarantine"):
        load_sources(load_config(path))
    config = make_config(
        tmp_path,
        sink.port,
        checks=[{"name": "lists", "options": {"block": ["example.org"], "block_action": "reject"}}],
    )
    with proxy_running(config) as proxy, client(proxy) as smtp:
        assert smtp.sendmail("ann@example.org", ["bob@example.net"], MSG) == {}
    assert sink.messages == []
    (held,) = Store(tmp_path / "quarantine").list()
    assert (held.mail_from, held.rcpt_tos, held.reason) == (
        "ann@example.org",
        ["bob@example.net"],
        "blocklisted=example.org",
    )
    assert Store(tmp_path / "quarantine").read(held.id) == MSG


def test_next_hop_down_slow_or_4xx_answers_451(tmp_path, sink):
    down = make_config(tmp_path, free_port())
    with proxy_running(down) as proxy, client(proxy) as smtp:
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            smtp.sendmail("ann@example.org", ["bob@example.net"], MSG)
        assert e.value.smtp_code == 451

    config = make_config(tmp_path, sink.port, relay={"timeout_seconds": 0.5})
    sink.refuse["busy@example.net"] = "452 4.2.2 mailbox full"
    with proxy_running(config) as proxy, client(proxy) as smtp:
        refused = smtp.sendmail("ann@example.org", ["bob@example.net", "busy@example.net"], MSG)
        assert refused == {"busy@example.net": (451, b"4.2.2 mailbox full")}
        sink.data_reply = "452 4.3.1 out of space"
        with pytest.raises(smtplib.SMTPDataError) as e:
            smtp.sendmail("ann@example.org", ["bob@example.net"], MSG)
        assert e.value.smtp_code == 451
        sink.data_reply, sink.delay = "250 Ok", 1.0  # answers after relay.timeout_seconds
        with pytest.raises(smtplib.SMTPDataError) as e:
            smtp.sendmail("ann@example.org", ["bob@example.net"], MSG)
        assert e.value.smtp_code == 451
        sink.delay = 0.0
        sink.data_reply = None
        # A fresh next-hop session serves the next message on the same client connection.
        assert smtp.sendmail("ann@example.org", ["bob@example.net"], MSG) == {}
    assert len(sink.messages) == 2  # the first message, and the last


def test_failure_policy_over_smtp(tmp_path, sink):
    for policy in ("fail_open", "tempfail"):
        # A verdict can never come within 0.1 ms (a thread hop and the model).
        scoring = {"failure_policy": policy, "timeout_seconds": 0.0001}
        config = make_config(tmp_path, sink.port, scoring=scoring)
        with proxy_running(config) as proxy, client(proxy) as smtp:
            if policy == "tempfail":
                with pytest.raises(smtplib.SMTPDataError) as e:
                    smtp.sendmail("ann@example.org", ["bob@example.net"], MSG)
                assert e.value.smtp_code == 451
            else:
                assert smtp.sendmail("ann@example.org", ["bob@example.net"], MSG) == {}
    (_, _, data), *others = sink.messages
    assert others == []
    assert data.startswith(b"X-Spam-Status: Unscored, reason=ScoringTimeout")


def sending(proxy, results: list) -> threading.Thread:
    """A client in a thread that sends MSG and appends sendmail's result to results."""
    return threading.Thread(
        target=lambda: results.append(
            smtplib.SMTP("127.0.0.1", proxy.port).sendmail("a@x.example", ["b@y.example"], MSG)
        )
    )


def test_overload_answers_451_and_too_many_connections_421(tmp_path, sink):
    config = make_config(tmp_path, sink.port, smtp={"max_queue": 1, "max_connections": 2})
    release = threading.Event()

    async def slow(mail, **_):  # holds the one queue place until released
        await asyncio.to_thread(release.wait, 10)
        return Outcome("deliver", mail.raw)

    results = []
    with proxy_running(config, slow) as proxy:
        first = sending(proxy, results)
        first.start()
        while proxy.in_flight == 0:
            time.sleep(0.01)
        with client(proxy) as smtp:
            with pytest.raises(smtplib.SMTPSenderRefused) as e:
                smtp.sendmail("ann@example.org", ["bob@example.net"], MSG)
            assert (e.value.smtp_code, e.value.smtp_error[:5]) == (451, b"4.3.2")
            with pytest.raises(smtplib.SMTPConnectError) as e:
                client(proxy)  # a third connection
            assert e.value.smtp_code == 421
        release.set()
        first.join(10)
    assert results == [{}]
    assert len(sink.messages) == 1


def test_stop_lets_messages_in_progress_finish(tmp_path, sink):
    config = make_config(tmp_path, sink.port)
    started = threading.Event()

    async def slow(mail, **_):
        started.set()
        await asyncio.sleep(0.5)
        return Outcome("deliver", mail.raw)

    results = []
    with proxy_running(config, slow) as proxy:
        sender = sending(proxy, results)
        sender.start()
        assert started.wait(5)
        port = proxy.port
    # The context's stop() returned: the message in progress got its answer first.
    sender.join(5)
    assert results == [{}] and len(sink.messages) == 1
    with pytest.raises(OSError):
        smtplib.SMTP("127.0.0.1", port, timeout=2)


def on_loop(proxy: SmtpProxy, coro) -> object:
    """Run a coroutine on the proxy's event loop (proxy_running's thread) and wait for it."""
    return asyncio.run_coroutine_threadsafe(coro, proxy._server.get_loop()).result(10)


@pytest.mark.parametrize(
    ("smtp", "message"),
    [
        ({"host": ""}, r"smtp\.host: .*empty.*every address"),
        ({"host": "  "}, r"smtp\.host: .*empty.*every address"),
        ({"host": "0.0.0.0"}, r"smtp\.host: .*0\.0\.0\.0 is not a loopback address.*allow_remote"),
        ({"host": "::"}, r"smtp\.host: .*not a loopback address.*allow_remote"),
        ({"host": "mail.example.org"}, r"smtp\.host: .*not a loopback address.*allow_remote"),
    ],
)
def test_listening_beyond_loopback_must_be_asked_for(tmp_path, smtp, message):
    """An empty host listened on every address without a word; the reinjection port trusts
    loopback, so a proxy reachable from elsewhere is an open relay."""
    with pytest.raises(ConfigError, match=message):
        smtp_source(make_config(tmp_path, 10026, **{"smtp": smtp}))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_hosts_need_nothing_more(tmp_path, host):
    assert smtp_source(make_config(tmp_path, 10026, smtp={"host": host})).settings.host == host


def test_allow_remote_listens_beyond_loopback_and_warns(tmp_path, sink, caplog):
    caplog.set_level(logging.INFO, logger="filterd.smtp")
    config = make_config(tmp_path, sink.port, smtp={"host": "0.0.0.0", "allow_remote": True})
    with proxy_running(config) as proxy, client(proxy) as smtp:
        assert smtp.sendmail("ann@example.org", ["bob@example.net"], MSG) == {}
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "0.0.0.0" in warning.getMessage() and "open relay" in warning.getMessage()
    caplog.clear()
    with proxy_running(make_config(tmp_path, sink.port)):
        pass
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def message_lines(caplog) -> list[str]:
    """The per-message log lines, in order."""
    return [r.getMessage() for r in caplog.records if " message_id=" in r.getMessage()]


def with_id(mid: str) -> bytes:
    return MSG.replace(b"<m1@example.org>", mid.encode())


def test_the_message_log_line_says_ham_or_spam_and_what_decided(tmp_path, sink, caplog):
    caplog.set_level(logging.INFO, logger="filterd.smtp")
    lists = [{"name": "lists", "options": {"allow": ["friend.example"]}}]
    ham = make_config(tmp_path, sink.port, logit=-2.0, checks=lists)
    spam = make_config(tmp_path, sink.port)
    scoring = {"failure_policy": "fail_open", "timeout_seconds": 0.0001}
    unscored = make_config(tmp_path, sink.port, scoring=scoring)
    with proxy_running(ham) as proxy, client(proxy) as smtp:
        smtp.sendmail("ann@example.org", ["bob@example.net"], with_id("<ham@x>"))
        smtp.sendmail("ann@friend.example", ["bob@example.net"], with_id("<friend@x>"))
    with proxy_running(spam) as proxy, client(proxy) as smtp:
        smtp.sendmail("ann@example.org", ["bob@example.net"], with_id("<spam@x>"))
        # The ham as we relayed it, marker and all: passed on as marked, no model.
        smtp.sendmail("ann@example.org", ["bob@example.net"], sink.messages[0][2])
    with proxy_running(unscored) as proxy, client(proxy) as smtp:
        smtp.sendmail("ann@example.org", ["bob@example.net"], with_id("<unscored@x>"))
    fields = [line.split(" rcpts=1 ")[1].split(" reply=")[0] for line in message_lines(caplog)]
    assert fields == [
        "label=ham score=0.1192 action=tag",
        "label=ham decided_by=check:lists score=- action=tag",
        "label=spam score=0.8808 action=tag",
        "label=ham decided_by=marker score=- action=tag",
        "label=- score=- action=unscored",
    ]


def test_mail_from_after_stop_accepting_answers_421_and_closes(tmp_path, sink):
    """On SIGTERM a client holding its connection is told the proxy is going (421), not that
    it is busy (451), and the connection ends; a transaction already begun finishes."""
    config = make_config(tmp_path, sink.port)
    with proxy_running(config) as proxy, client(proxy) as idle, client(proxy) as busy:
        idle.ehlo()
        busy.ehlo()
        assert busy.mail("ann@example.org")[0] == 250
        assert busy.rcpt("bob@example.net")[0] == 250
        on_loop(proxy, proxy.stop_accepting())
        assert idle.mail("ann@example.org") == (
            421,
            b"4.3.2 filterd shutting down, try again later",
        )
        with pytest.raises(smtplib.SMTPServerDisconnected):
            idle.noop()
        assert busy.data(MSG)[0] == 250
    assert len(sink.messages) == 1

"""The spamd source with SpamAssassin's own client: the real `spamc` against real `filterd
serve` processes (one model scoring every message spam, one ham), every command, the
faults a server meets, and `filterd score --tag --connect`. The failure policies and the
drain use the source in this process with a stub handler, so no model has to fail.

Debian's spamc (what CI installs) is built without zlib, so `-z` is not in it: compressed
requests are sent with the same wire bytes by a socket here."""

import asyncio
import contextlib
import errno
import io
import json
import logging
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from filterd import spamd_protocol
from filterd.builtin.spamd import SpamdSource
from filterd.cli import main
from filterd.config import Config, ConfigError, load_config
from filterd.daemon import load_sources
from filterd.headers import Tagger, load_secret
from filterd.learning import open_store
from filterd.plugin_api import Context, Outcome
from tests.test_daemon import Daemon
from tests.test_engine import make_checkpoint
from tests.test_smtp_proxy import free_port

SPAMC = shutil.which("spamc") or "/usr/bin/spamc"  # CI installs Debian's spamc package
MSG = (
    b"From sender@example.org Sat Jan  1 00:00:00 2000\r\n"
    b"Subject: caf\xc3\xa9 offer\r\n"
    b"X-Spam-Flag: NO\r\n"
    b"From: Sender <sender@example.org>\r\n"
    b"Message-ID: <spamd1@example.org>\r\n"
    b"\r\n"
    b"8-bit body \xff\r\n.a dotted line\r\nno final line end"
)
LISTENING = re.compile(r"source=spamd listening on (\S+) \(sources\[(\d+)\]")


def spamc(where, *args: str, data: bytes = MSG) -> subprocess.CompletedProcess:
    """spamc with a port (TCP on 127.0.0.1) or a socket path; -t bounds its wait."""
    target = (
        ["-U", str(where)] if isinstance(where, Path) else ["-d", "127.0.0.1", "-p", str(where)]
    )
    return subprocess.run(
        [SPAMC, *target, "-t", "20", *args], input=data, capture_output=True, timeout=60
    )


class Served:
    """A running `filterd serve` with spamd sources; `at[i]`: where sources[i] listens."""

    def __init__(self, folder: Path, logit: float, sources: list[dict], **extra):
        self.config = folder / "config.yaml"
        self.settings = {
            "checkpoint": str(make_checkpoint(folder / "model", logit)),
            "headers": {"secret_file": str(folder / "secret")},
            "learning": {"store": str(folder / "feedback")},
            "daemon": {"scoring_process": False, "reload_check_seconds": 0},
            "scoring": {"batch_wait_ms": 1} | extra.pop("scoring", {}),
            "sources": [{"name": "spamd", "options": options} for options in sources],
        } | extra
        self.config.write_text(json.dumps(self.settings))
        self.daemon = Daemon(folder, self.settings, smtp=False)  # writes the same config
        found = {int(m[2]): m[1] for line in self.daemon.lines if (m := LISTENING.search(line))}
        self.at = [
            Path(found[i].removeprefix("unix:"))
            if found[i].startswith("unix:")
            else int(found[i].rpartition(":")[2])
            for i in range(len(sources))
        ]

    def logged(self, pattern: str, timeout: float = 10) -> re.Match:
        return self.daemon.wait_for(pattern, timeout)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two daemons, started at once: `spam` (every message p = 0.8808, quarantine_threshold
    0.8) with four spamd sources (TCP with TELL on; a Unix socket; a TCP one with short
    limits for the faults; one whose allowed_clients leave out loopback), and `ham`
    (p = 0.1192, TELL off)."""
    assert Path(SPAMC).is_file(), "spamc is not installed (Debian: apt-get install spamc)"
    spam_dir, ham_dir = tmp_path_factory.mktemp("spam"), tmp_path_factory.mktemp("ham")
    spam_sources = [
        {"port": 0, "allow_tell": True},
        {"socket": str(spam_dir / "spamd.sock")},
        {"port": 0, "timeout_seconds": 2, "max_message_bytes": 65536, "max_connections": 8},
        {"port": 0, "allowed_clients": ["10.0.0.0/8"]},
    ]
    with ThreadPoolExecutor(2) as pool:
        spam = pool.submit(
            Served, spam_dir, 2.0, spam_sources, scoring={"quarantine_threshold": 0.8}
        )
        ham = pool.submit(Served, ham_dir, -2.0, [{"port": 0}])
        daemons = {}
        try:
            daemons = {"spam": spam.result(), "ham": ham.result()}
            yield daemons
        finally:
            for future in (spam, ham):
                if future.exception() is None:
                    future.result().daemon.kill()


def score_tag(monkeypatch, capsysbinary, argv: list, data: bytes = MSG) -> tuple[int, bytes, str]:
    """`filterd score --tag ...` in this process: exit status, stdout, stderr."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    code = main(["score", "--tag", *map(str, argv)])
    out, err = capsysbinary.readouterr()
    return code, out, err.decode()


# --- every command, through spamc -------------------------------------------------------


def test_check_prints_score_and_required_and_exits_1_for_spam(served):
    spam, ham = served["spam"], served["ham"]
    run = spamc(spam.at[0], "-c")
    assert (run.returncode, run.stdout) == (1, b"8.8/5.0\n")
    run = spamc(ham.at[0], "-c")
    assert (run.returncode, run.stdout) == (0, b"1.2/5.0\n")
    line = spam.logged(r"source=spamd command=CHECK user=\S+ peer=127\.0\.0\.1:\d+ .*")[0]
    assert "message_id=<spamd1@example.org>" in line
    assert re.search(r"label=spam score=0\.8808 action=quarantine reply=0 latency_ms=\d+", line)


def test_process_is_byte_exact_with_score_tag_over_tcp_unix_socket_and_headers(
    served, monkeypatch, capsysbinary
):
    for name, spam in (("spam", True), ("ham", False)):
        daemon = served[name]
        code, expected, err = score_tag(monkeypatch, capsysbinary, ["--config", daemon.config])
        assert code == 0, err
        secret = load_secret(Path(daemon.settings["headers"]["secret_file"]))
        assert Tagger(secret).previous(expected) == (spam, 0.881 if spam else 0.119)
        run = spamc(daemon.at[0])  # PROCESS
        assert (run.returncode, run.stdout) == (0, expected)
        run = spamc(daemon.at[0], "-E")
        assert (run.returncode, run.stdout) == (int(spam), expected)
        run = spamc(daemon.at[0], "--headers")  # HEADERS: spamc adds the body it sent
        assert (run.returncode, run.stdout) == (0, expected)
        if spam:
            run = spamc(daemon.at[1])  # -U: the Unix socket
            assert (run.returncode, run.stdout) == (0, expected)
    served["spam"].logged(r"command=HEADERS .* label=spam .* reply=0")
    served["spam"].logged(r"command=PROCESS user=\S+ peer=unix .* label=spam .* reply=0")


def test_report_symbols_and_report_ifspam_say_what_decided(served):
    spam, ham = served["spam"], served["ham"]
    run = spamc(spam.at[0], "-R", "-u", "bob")
    first, report = run.stdout.decode().split("\n", 1)
    assert (run.returncode, first) == (0, "8.8/5.0")
    for said in (
        "scored this message spam: 8.8 points, 5.0 required",
        "probability:  0.8808 (spam from 0.5000)",
        "decided_by:   model",
        "model:        gpt2-tiny",
        "action:       quarantine (quarantine_threshold 0.8000, reject_threshold not set; "
        "spamd only tags: the caller acts)",
        "user:         bob (one model for all users)",
    ):
        assert said in report
    spam.logged(r"command=REPORT user=bob ")
    assert spamc(spam.at[0], "-r", "-u", "bob").stdout == run.stdout  # REPORT_IFSPAM: spam
    run = spamc(spam.at[0], "-y")
    expected = b"FILTERD_SPAM,FILTERD_BY_MODEL,FILTERD_MODEL_GPT2_TINY,FILTERD_PROB_88"
    assert run.stdout == expected + b",FILTERD_QUARANTINE"
    assert (
        spamc(ham.at[0], "-y").stdout
        == b"FILTERD_HAM,FILTERD_BY_MODEL,FILTERD_MODEL_GPT2_TINY,FILTERD_PROB_11"
    )
    run = spamc(ham.at[0], "-r")  # REPORT_IFSPAM, ham: nothing
    assert (run.returncode, run.stdout) == (0, b"")
    run = spamc(ham.at[0], "-R")
    assert run.stdout.startswith(b"1.2/5.0\nfilterd scored this message ham: 1.2 points")
    assert b"action:       tag (quarantine_threshold not set" in run.stdout


def test_exim_and_protocol_1_2_clients_get_the_reply_form_of_their_version(served):
    """Exim's spam condition sends REPORT SPAMC/1.2 with User and Content-length, then reads
    `SPAMD/v 0 EX_OK`, `Spam: x ; score / required`, an empty line and the report: spamd's
    form for clients before 1.3 (one header, no Content-length)."""
    port = served["spam"].at[0]
    exim = b"REPORT SPAMC/1.2\r\nUser: Debian-exim\r\nContent-length: %d\r\n\r\n" % len(MSG)
    answer = raw_exchange(port, exim + MSG)
    m = re.match(rb"SPAMD/\S{1,7} 0 EX_OK\r\nSpam: \S+ ; ([-\d.]+) / ([-\d.]+)\r\n\r\n", answer)
    assert m is not None and (float(m[1]), float(m[2])) == (8.8, 5.0), answer[:200]
    assert b"decided_by:   model" in answer[m.end() :]
    served["spam"].logged(r"command=REPORT user=Debian-exim .* reply=0")
    # PROCESS at 1.2: the message with Content-length alone; SYMBOLS: a line end after it.
    answer = raw_exchange(port, request_bytes("PROCESS", MSG).replace(b"/1.5", b"/1.2", 1))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head == b"SPAMD/1.5 0 EX_OK\r\nContent-length: %d" % len(body)
    assert body == spamc(port).stdout
    answer = raw_exchange(port, request_bytes("SYMBOLS", MSG).replace(b"/1.5", b"/1.2", 1))
    assert answer.startswith(b"SPAMD/1.5 0 EX_OK\r\nSpam: True ; 8.8 / 5.0\r\n\r\nFILTERD_SPAM,")
    assert answer.endswith(b"FILTERD_QUARANTINE\r\n")


def test_ping_and_skip(served):
    run = spamc(served["spam"].at[0], "-K")
    assert (run.returncode, run.stdout) == (0, b"SPAMD/1.5 0\n")
    # Before protocol 1.5 PING had no empty line after it: answered all the same.
    assert raw_exchange(served["spam"].at[0], b"PING SPAMC/1.2\r\n", close=False) == (
        b"SPAMD/1.5 0 PONG\r\n"
    )
    reply = spamd_protocol.request(("127.0.0.1", served["spam"].at[0]), "PING", None)
    assert (reply.code, reply.message) == (0, "PONG")
    assert raw_exchange(served["spam"].at[0], b"SKIP SPAMC/1.5\r\n\r\n") == b""
    served["spam"].logged(r"command=SKIP .* reply=0 .* note=skipped")


def test_tell_learns_relabels_and_forgets_in_the_feedback_store(served):
    spam = served["spam"]
    store = open_store(load_config(spam.config))
    message = MSG.replace(b"<spamd1@", b"<tell@")
    run = spamc(spam.at[0], "-L", "spam", "-u", "bob", data=message)
    assert (run.returncode, run.stdout) == (0, b"Message successfully un/learned\n")
    (record,) = store.records()
    assert (record.label, record.source, record.kind) == ("spam", "spamd user=bob", "feedback")
    assert store.read(record) == message
    run = spamc(spam.at[0], "-L", "spam", "-u", "bob", data=message)
    assert run.stdout == b"Message was already un/learned\n"  # unchanged: no DidSet
    run = spamc(spam.at[0], "-L", "ham", data=message)
    assert run.stdout == b"Message successfully un/learned\n"
    assert [r.label for r in store.records()] == ["ham"]
    run = spamc(spam.at[0], "-L", "forget", data=message)
    assert (run.returncode, run.stdout) == (0, b"Message successfully un/learned\n")
    assert store.records() == []
    run = spamc(spam.at[0], "-L", "forget", data=message)
    assert (run.returncode, run.stdout) == (0, b"Message was already un/learned\n")
    spam.logged(r"command=TELL user=bob .* label=spam .* reply=0 .* note=learn spam: added")
    spam.logged(r"command=TELL .* note=forget: forgotten")
    # A daemon without allow_tell refuses, as spamd does without --allow-tell.
    ham = served["ham"]
    run = spamc(ham.at[0], "-L", "spam", data=message)
    assert run.returncode != 0 and b"successfully" not in run.stdout
    ham.logged(
        r"command=TELL .* reply=69 .*note=TELL is off here \(sources\[0\]\.options\.allow_tell"
    )
    assert open_store(load_config(ham.config)).records() == []


def test_compressed_requests_and_a_zip_bomb(served):
    port = served["spam"].at[0]
    packed = zlib.compress(MSG)
    reply = spamd_protocol.request(("127.0.0.1", port), "PROCESS", packed, [("Compress", "zlib")])
    assert reply.body == spamc(port).stdout and reply.spam() == (True, 8.8, 5.0)
    # 32 KiB of zlib that would inflate to 32 MiB: refused once past the 64 KiB cap, with
    # no more than that inflated.
    bomb = zlib.compress(bytes(32 << 20), 9)
    assert len(bomb) < 65536
    answer = raw_exchange(
        served["spam"].at[2], request_bytes("CHECK", bomb, [("Compress", "zlib")])
    )
    assert answer == b"SPAMD/1.5 65 EX_DATAERR over the 65536-byte limit once decompressed\r\n"
    served["spam"].logged(r"reply=65 .* note=over the 65536-byte limit once decompressed")
    answer = raw_exchange(port, request_bytes("CHECK", b"not zlib", [("Compress", "zlib")]))
    assert b"65 EX_DATAERR Compress: zlib: not zlib data" in answer


def test_a_ten_megabyte_message_with_spamc_s(served, monkeypatch, capsysbinary):
    spam = served["spam"]
    big = MSG + b"\r\n" + b"filler line of a large attachment\r\n" * 300_000
    assert len(big) > 10_000_000
    run = spamc(spam.at[0], "-s", "20000000", data=big)
    assert run.returncode == 0 and len(run.stdout) > len(big)
    code, expected, _ = score_tag(monkeypatch, capsysbinary, ["--config", spam.config], big)
    assert (code, run.stdout) == (0, expected)
    assert run.stdout.endswith(big[-1000:])
    # Over a source's max_message_bytes: refused with EX_DATAERR; spamc passes it through.
    run = spamc(spam.at[2], "-s", "20000000", data=big)
    assert (run.returncode, run.stdout) == (0, big)
    spam.logged(r"reply=65 .* note=Content-length \d+ is over the 65536-byte limit")


# --- faults: each one logged, the daemon unharmed, others served meanwhile --------------


def request_bytes(command: str, body: bytes, fields=()) -> bytes:
    return spamd_protocol.encode(f"{command} SPAMC/1.5", list(fields), body)


def raw_exchange(where, data: bytes, close: bool = True, timeout: float = 20) -> bytes:
    """Send `data` (then end our side, if `close`) and read until the server closes."""
    family = socket.AF_UNIX if isinstance(where, Path) else socket.AF_INET
    with socket.socket(family) as sock:
        sock.settimeout(timeout)
        sock.connect(str(where) if isinstance(where, Path) else ("127.0.0.1", where))
        sock.sendall(data)
        if close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def test_faults_are_answered_and_logged_while_others_are_served(served):
    spam = served["spam"]
    port = spam.at[2]  # timeout_seconds 2
    with ThreadPoolExecutor(4) as pool:
        slow = pool.submit(raw_exchange, port, b"CHECK SPAMC/1.5\r\nContent-le", False)
        lying = request_bytes("CHECK", MSG).replace(b"length: %d" % len(MSG), b"length: 9999")
        waiting = pool.submit(raw_exchange, port, lying, False)
        closing = pool.submit(raw_exchange, port, lying)
        time.sleep(0.2)
        # Meanwhile, on the same port, spamc is answered at once.
        run = spamc(port, "-c")
        assert (run.returncode, run.stdout) == (1, b"8.8/5.0\n")
        assert not (slow.done() or waiting.done())  # still held open meanwhile
        assert closing.result().startswith(
            b"SPAMD/1.5 65 EX_DATAERR Content-length 9999, but the client closed after"
        )
        assert slow.result() == (
            b"SPAMD/1.5 75 EX_TEMPFAIL no whole request within timeout_seconds (2 s)\r\n"
        )
        assert waiting.result().startswith(
            b"SPAMD/1.5 75 EX_TEMPFAIL no whole request within timeout_seconds (2 s); it "
            b"declared Content-length 9999"
        )
    cases = [
        (b"GARBAGE\r\n\r\n", b"76 EX_PROTOCOL bad SPAMC line 'GARBAGE'"),
        (b"FROB SPAMC/1.5\r\n\r\n", b"76 EX_PROTOCOL unknown command 'FROB'"),
        (b"CHECK SPAMC/1.5\r\nno colon\r\n\r\n", b"76 EX_PROTOCOL bad header line 'no colon'"),
        (b"CHECK SPAMC/1.5\r\n" + b"X-Pad: 1234567890\r\n" * 600, b"76 EX_PROTOCOL header block"),
        (b"CHECK SPAMC/1.5\r\nX: " + b"x" * 20000, b"76 EX_PROTOCOL header block over 8192"),
        (b"CHECK SPAMC/1.5\r\n\r\n" + MSG, b"65 EX_DATAERR Content-length missing"),
        (b"CHECK SPAMC/1.5\r\nContent-length: -1\r\n\r\n", b"65 EX_DATAERR bad Content-length"),
        (b"TELL SPAMC/1.5\r\nSet: local\r\nContent-length: 0\r\n\r\n", b"69 EX_UNAVAILABLE"),
    ]
    for request, answer in cases:
        assert raw_exchange(port, request).startswith(b"SPAMD/1.5 " + answer), request[:40]
    for note in (
        r"command=CHECK user=- peer=127\.0\.0\.1:\d+ .* reply=75 .* note=no whole request",
        r"reply=65 .* note=Content-length 9999, but the client closed after \d+ bytes",
        r"command=- .* reply=76 .* note=bad SPAMC line 'GARBAGE'",
        r"command=CHECK .* reply=76 .* note=header block over 8192 bytes",
    ):
        spam.logged(note)
    # A client allowed_clients leaves out is closed unanswered, and named in the log.
    assert raw_exchange(spam.at[3], request_bytes("CHECK", MSG)) == b""
    run = spamc(spam.at[3], "-x", "-c")
    assert run.returncode != 0 and run.stdout == b"0/0\n"
    spam.logged(r"source=spamd refused a client from \('127\.0\.0\.1', \d+\): not in allowed")
    assert spam.daemon.proc.poll() is None
    assert spamc(spam.at[2], "-c").returncode == 1  # still serving


# --- filterd score --tag --connect ------------------------------------------------------


def test_score_tag_connect_matches_score_tag_and_loads_no_model(served, monkeypatch, capsysbinary):
    spam = served["spam"]
    expected = score_tag(monkeypatch, capsysbinary, ["--config", spam.config])[1]
    for where in (f"127.0.0.1:{spam.at[0]}", str(spam.at[1])):
        argv = ["--connect", where, "--config", spam.config]
        assert score_tag(monkeypatch, capsysbinary, argv)[:2] == (0, expected)
    # Without an address: where the config's first spamd source listens (here a socket).
    config = Path(spam.config).with_name("client.yaml")
    settings = dict(spam.settings, sources=[spam.settings["sources"][1]])
    config.write_text(json.dumps(settings))
    assert score_tag(monkeypatch, capsysbinary, ["--connect", "--config", config])[:2] == (
        0,
        expected,
    )
    # The whole command as a pipe runs it: no torch imported, nothing of the model.
    command = ["score", "--tag", "--connect", f"127.0.0.1:{spam.at[0]}", "--config", spam.config]
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "filterd.cli", *map(str, command)],
        input=MSG,
        capture_output=True,
        timeout=60,
    )
    assert (run.returncode, run.stdout) == (0, expected)
    imported = {line.rsplit(b"|", 1)[-1].strip() for line in run.stderr.splitlines()}
    assert b"filterd.spamd_protocol" in imported
    assert not [m for m in imported if m.split(b".")[0] in (b"torch", b"filterd.engine")]
    assert b"filterd.engine" not in imported and b"filterd.model" not in imported


def test_score_tag_connect_to_a_dead_address_applies_the_failure_policy(
    tmp_path, monkeypatch, capsysbinary
):
    dead = f"127.0.0.1:{free_port()}"
    secret = tmp_path / "secret"
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"headers": {"secret_file": str(secret)}}))
    code, out, err = score_tag(monkeypatch, capsysbinary, ["--connect", dead, "--config", config])
    why = f"spamd {dead}: Connection refused"
    assert (code, out) == (0, Tagger(load_secret(secret)).unscored(MSG, why))
    assert out.startswith(
        MSG.split(b"\n")[0] + b"\nX-Spam-Status: Unscored, reason=" + why.encode()
    )
    assert f"not scored: {why}" in err
    config.write_text(json.dumps({"scoring": {"failure_policy": "tempfail"}}))
    assert score_tag(monkeypatch, capsysbinary, ["--connect", dead, "--config", config])[:2] == (
        75,
        b"",
    )
    code, _, err = score_tag(monkeypatch, capsysbinary, ["--connect", "nohost:xx"])
    assert code == 2 and "--connect: 'nohost:xx': expected HOST:PORT" in err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(MSG)))
    assert main(["score", "--connect", dead]) == 2


# --- the source in this process: failure policies, drain, limits ------------------------


@contextlib.contextmanager
def source_running(tmp_path, handle, policy: str = "fail_open", **options):
    """A spamd source from the registry on an event loop thread, with a stub handler."""
    config = Config.model_validate(
        {
            "headers": {"secret_file": str(tmp_path / "secret")},
            "scoring": {"failure_policy": policy},
            "sources": [{"name": "spamd", "options": {"port": 0} | options}],
        }
    )
    (source,) = load_sources(config)
    context = Context(config, Tagger(load_secret(tmp_path / "secret")))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(source.start(handle(context), context), loop).result(10)
        yield source, context, loop
    finally:
        asyncio.run_coroutine_threadsafe(source.stop_accepting(), loop).result(10)
        asyncio.run_coroutine_threadsafe(source.drain(5), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def failing(context: Context):
    async def handle(mail, **_):
        return context.failure(mail, "RuntimeError: model crashed")

    return handle


def test_fail_open_answers_unscored_ham_with_the_unscored_header(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="filterd.spamd")
    with source_running(tmp_path, failing) as (source, context, _):
        run = spamc(source.port)
        assert (run.returncode, run.stdout) == (
            0,
            context.tagger.unscored(MSG, "RuntimeError: model crashed"),
        )
        assert b"X-Spam-Status: Unscored, reason=RuntimeError: model crashed" in run.stdout
        assert spamc(source.port, "--headers").stdout == run.stdout
        assert spamc(source.port, "-c").stdout == b"0.0/5.0\n"
        assert spamc(source.port, "-y").stdout == b"FILTERD_UNSCORED"
        report = spamc(source.port, "-R").stdout
        assert b"did not score this message" in report and b"model crashed" in report
    assert re.search(r"command=PROCESS .* label=- score=- action=unscored reply=0", caplog.text)


def test_tempfail_answers_ex_tempfail_and_connect_applies_the_local_policy(
    tmp_path, monkeypatch, capsysbinary
):
    with source_running(tmp_path, failing, "tempfail") as (source, _, _):
        assert raw_exchange(source.port, request_bytes("PROCESS", MSG)) == (
            b"SPAMD/1.5 75 EX_TEMPFAIL not scored: RuntimeError: model crashed\r\n"
        )
        run = spamc(source.port, "-x")  # spamc reads no code: the reply ends, EX_IOERR
        assert (run.returncode, run.stdout) == (74, b"")
        run = spamc(source.port)  # spamc's safe fallback: the message unchanged
        assert (run.returncode, run.stdout) == (0, MSG)
        where = f"127.0.0.1:{source.port}"
        config = tmp_path / "client.yaml"
        config.write_text(json.dumps({"scoring": {"failure_policy": "tempfail"}}))
        argv = ["--connect", where, "--config", config]
        assert score_tag(monkeypatch, capsysbinary, argv)[:2] == (75, b"")
        config.write_text(json.dumps({"headers": {"secret_file": str(tmp_path / "secret")}}))
        code, out, err = score_tag(monkeypatch, capsysbinary, argv)
        assert code == 0 and b"X-Spam-Status: Unscored, reason=spamd " in out
        assert "answered 75 EX_TEMPFAIL" in err


def test_drain_answers_requests_in_flight_and_refuses_new_ones(tmp_path):
    entered, release = threading.Event(), threading.Event()

    def slow(context: Context):
        async def handle(mail, **_):
            entered.set()
            await asyncio.to_thread(release.wait, 20)
            return Outcome("deliver", b"X-Held: yes\r\n" + mail.raw)

        return handle

    socket_path = tmp_path / "spamd.sock"
    running = source_running(tmp_path, slow, socket=str(socket_path))
    with running as (source, _, loop), ThreadPoolExecutor(1) as pool:
        asked = pool.submit(spamd_protocol.process, str(socket_path), MSG, 20)
        assert entered.wait(10)
        asyncio.run_coroutine_threadsafe(source.stop_accepting(), loop).result(10)
        assert not socket_path.exists()  # the listener and its socket are gone
        with pytest.raises(spamd_protocol.SpamdError, match="No such file"):
            spamd_protocol.process(str(socket_path), MSG, 5)
        draining = asyncio.run_coroutine_threadsafe(source.drain(20), loop)
        time.sleep(0.2)
        assert not draining.done()  # waiting for the message in flight
        release.set()
        tagged, _ = asked.result(20)
        assert tagged == b"X-Held: yes\r\n" + MSG
        draining.result(20)


def test_max_connections_answers_tempfail_beyond_the_limit(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="filterd.spamd")
    entered, release = threading.Event(), threading.Event()

    def slow(context: Context):
        async def handle(mail, **_):
            entered.set()
            await asyncio.to_thread(release.wait, 20)
            return Outcome("deliver", mail.raw)

        return handle

    running = source_running(tmp_path, slow, max_connections=1)
    with running as (source, _, _), ThreadPoolExecutor(1) as pool:
        first = pool.submit(spamd_protocol.process, ("127.0.0.1", source.port), MSG, 20)
        assert entered.wait(10)
        assert raw_exchange(source.port, request_bytes("CHECK", MSG)) == (
            b"SPAMD/1.5 75 EX_TEMPFAIL too many connections (max_connections 1)\r\n"
        )
        release.set()
        assert first.result(20)[0] == MSG
    assert "reply=75 latency_ms=" in caplog.text and "too many connections" in caplog.text


def test_a_privileged_port_names_the_option(monkeypatch):
    async def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("filterd.builtin.spamd.serve", refused)
    config = Config.model_validate({"sources": [{"name": "spamd"}]})
    (source,) = load_sources(config)
    assert isinstance(source, SpamdSource) and source.options.port == 783
    with pytest.raises(ConfigError) as caught:
        asyncio.run(source.start(None, None))
    assert str(caught.value).startswith(
        "sources[0].options.port: cannot listen on 127.0.0.1:783: Permission denied: a port "
        "below 1024 needs root or CAP_NET_BIND_SERVICE"
    )


def test_connect_passes_a_message_over_the_daemons_cap_unscored_even_under_tempfail(
    served, tmp_path, monkeypatch, capsysbinary
):
    """A retry cannot make it smaller: tempfail there would bounce it days later."""
    spam = served["spam"]
    config = tmp_path / "client.yaml"
    config.write_text(json.dumps(dict(spam.settings, scoring={"failure_policy": "tempfail"})))
    big = MSG + b"x" * 70000 + b"\r\n"  # the daemon takes 65536 bytes at most
    argv = ["--connect", f"127.0.0.1:{spam.at[2]}", "--config", config]  # the short limits
    code, out, err = score_tag(monkeypatch, capsysbinary, argv, big)
    assert code == 0 and out.endswith(big.split(b"\r\n\r\n", 1)[1]), err
    assert b"X-Spam-Status: Unscored, reason=" in out and "not scored" in err


def test_sigterm_stops_the_daemons_and_removes_the_socket(served):
    spam = served["spam"]
    assert spam.daemon.stop() == 0 and served["ham"].daemon.stop() == 0
    assert "stopped" in spam.daemon.lines[-1]
    assert not spam.at[1].exists()


@pytest.mark.parametrize(
    ("message", "head"),
    [
        (b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\nmore", b"A: 1\r\nB: 2\r\n\r\n"),
        (b"A: 1\nB: 2\n\nbody\n\nmore", b"A: 1\nB: 2\n\n"),  # LF only: a file on disk
        (b"A: 1\nB: 2\n\nbody\r\n\r\nmore", b"A: 1\nB: 2\n\n"),
        (b"A: 1\nB: 2\n", b"A: 1\nB: 2\n"),  # no body: all of it
    ],
)
def test_header_block_ends_at_the_first_empty_line_whatever_the_line_ends(message, head):
    assert spamd_protocol.header_block(message) == head

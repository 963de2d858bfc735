"""SMTP abuse on loopback: hostile clients against `filterd serve`'s proxy. After each one the
proxy is still up and another client's message goes through.

The next hop here is `RawHop`, a minimal SMTP server that records the exact bytes the proxy
sends it, so what reaches the next hop (injected commands, smuggled messages) is seen as
is, not through another SMTP library's parsing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import smtplib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filterd.builtin.smtp_proxy import SmtpOptions, SmtpProxy
from filterd.config import Config
from filterd.plugin_api import Outcome
from tests.test_smtp_proxy import make_config, proxy_running

HAM = b"Subject: hello\r\nFrom: Ann <ann@example.org>\r\n\r\nSee you at noon.\r\n"
# Examples per hypothesis property; raise it for a long fuzz run (README "Robustness").
EXAMPLES = int(os.environ.get("FILTERD_FUZZ_EXAMPLES", "300"))


class RawHop:
    """A next hop on loopback: answers every command, keeps the raw bytes of each session
    and every message it accepted (with its envelope)."""

    def __init__(self) -> None:
        self.sessions: list[bytearray] = []
        self.messages: list[tuple[list[bytes], bytes]] = []  # (MAIL and RCPT lines, data)
        self.loop = asyncio.new_event_loop()
        self.port = 0

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = bytearray()
        self.sessions.append(raw)
        envelope: list[bytes] = []
        writer.write(b"220 hop ESMTP\r\n")
        try:
            while line := await reader.readuntil(b"\r\n"):
                raw += line
                verb = line[:4].upper()
                if verb == b"EHLO":
                    writer.write(b"250-hop\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n")
                elif verb in (b"MAIL", b"RCPT"):
                    envelope.append(line)
                    writer.write(b"250 ok\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go\r\n")
                    await writer.drain()
                    data = await reader.readuntil(b"\r\n.\r\n")
                    raw += data
                    self.messages.append((envelope, data))
                    envelope = []
                    writer.write(b"250 queued\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:  # RSET, NOOP, ...
                    envelope = [] if verb == b"RSET" else envelope
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def commands(self) -> list[bytes]:
        """Every command line sent to the next hop, DATA content left out."""
        out = []
        for raw in self.sessions:
            text = re.sub(rb"354 go|(?<=DATA\r\n).*?\r\n\.\r\n", b"", bytes(raw), flags=re.S)
            out += [line for line in text.split(b"\r\n") if line]
        return out


@contextlib.contextmanager
def serving(hop, limit: int = 1 << 16):
    """Run a next hop (an object with .loop and ._session) on 127.0.0.1 in its own thread;
    `limit`: the longest line (or message, for RawHop) its reader takes."""
    thread = threading.Thread(target=hop.loop.run_forever, daemon=True)
    thread.start()
    start = asyncio.start_server(hop._session, "127.0.0.1", 0, limit=limit)
    server = asyncio.run_coroutine_threadsafe(start, hop.loop).result(5)
    hop.port = server.sockets[0].getsockname()[1]
    try:
        yield hop
    finally:
        # The server belongs to the hop's loop: closing it from this thread raced with the
        # loop's own bookkeeping of a connection that had just ended (a CI teardown error).
        hop.loop.call_soon_threadsafe(server.close)
        hop.loop.call_soon_threadsafe(hop.loop.stop)
        thread.join(5)


@pytest.fixture
def hop() -> Iterator[RawHop]:
    with serving(RawHop()) as running:
        yield running


class Client:
    """A raw SMTP client: send bytes, read replies, nothing fixed up."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        """One (possibly multi-line) reply, e.g. b"250"; b"" if the connection closed."""
        while True:
            line = self.file.readline()
            if not line or line[3:4] != b"-":
                return line[:3]

    def replies(self, n: int) -> list[bytes]:
        return [self.reply() for _ in range(n)]

    def start_data(self) -> None:
        """A plain envelope, pipelined, up to DATA's 354."""
        self.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        assert self.replies(3) == [b"250", b"250", b"354"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


@contextlib.contextmanager
def connected(proxy: SmtpProxy, greet: bool = True) -> Iterator[Client]:
    client = Client(proxy.port)
    try:
        if greet:
            assert client.reply() == b"220"
            client.send(b"EHLO client.example\r\n")
            assert client.reply() == b"250"
        yield client
    finally:
        client.close()


def still_serving(proxy: SmtpProxy, hop: RawHop) -> None:
    """Another client's message goes through, untouched apart from our headers."""
    before = len(hop.messages)
    with smtplib.SMTP("127.0.0.1", proxy.port, timeout=10) as smtp:
        assert smtp.sendmail("ann@example.org", ["bob@example.net"], HAM) == {}
    assert len(hop.messages) == before + 1
    assert hop.messages[-1][1].endswith(HAM + b".\r\n")


@pytest.fixture
def config(tmp_path, hop):
    return make_config(tmp_path, hop.port, logit=-2.0)


def test_oversize_data_is_refused_and_nothing_relayed(tmp_path, hop):
    config = make_config(tmp_path, hop.port, logit=-2.0, smtp={"max_message_bytes": 4096})
    with proxy_running(config) as proxy, connected(proxy) as c:
        c.start_data()
        line = b"x" * 998 + b"\r\n"
        for _ in range(5 * 1024):  # 5 MB without SIZE: found out while reading
            c.send(line)
        c.send(b".\r\n")
        assert c.reply() == b"552"
        c.send(b"RSET\r\n")
        assert c.reply() == b"250"  # the connection goes on
        assert hop.messages == []
        still_serving(proxy, hop)


def test_client_stalled_mid_data_is_dropped_and_nothing_half_relayed(tmp_path, hop):
    config = make_config(tmp_path, hop.port, logit=-2.0, smtp={"timeout_seconds": 1.0})
    with proxy_running(config) as proxy, connected(proxy) as stalled:
        stalled.start_data()
        stalled.send(HAM[:20])  # half a message, then nothing
        still_serving(proxy, hop)  # served while the other one stalls
        start = time.monotonic()
        assert stalled.reply() in (b"421", b"")  # timed out and closed
        assert time.monotonic() - start < 5
        assert len(hop.messages) == 1  # only the other client's message
        still_serving(proxy, hop)


def test_client_that_never_quits_is_disconnected_after_the_timeout(tmp_path, hop):
    config = make_config(tmp_path, hop.port, logit=-2.0, smtp={"timeout_seconds": 1.0})
    with proxy_running(config) as proxy, connected(proxy) as c:
        c.start_data()
        c.send(HAM + b".\r\n")
        assert c.reply() == b"250"
        start = time.monotonic()
        assert c.reply() in (b"421", b"")  # no QUIT: the proxy hangs up
        assert time.monotonic() - start < 5
        assert len(hop.messages) == 1
        still_serving(proxy, hop)


def test_connections_past_the_limit_get_421_and_the_rest_are_served(tmp_path, hop):
    config = make_config(tmp_path, hop.port, logit=-2.0, smtp={"max_connections": 3})
    with proxy_running(config) as proxy:
        held = [Client(proxy.port) for _ in range(3)]
        assert [c.reply() for c in held] == [b"220"] * 3
        extra = [Client(proxy.port) for _ in range(20)]
        assert [c.reply() for c in extra] == [b"421"] * 20
        for c in extra:
            c.close()
        held[0].send(b"EHLO a\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
        assert held[0].replies(3) == [b"250", b"250", b"250"]  # the held ones still work
        held.pop().close()
        time.sleep(0.2)
        still_serving(proxy, hop)  # a place came free
        for c in held:
            c.close()


def test_pipelined_transaction_in_one_write(config, hop):
    with proxy_running(config) as proxy, connected(proxy, greet=False) as c:
        c.send(
            b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
            b"RCPT TO:<c@example.net>\r\nDATA\r\n" + HAM + b".\r\n"
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<d@example.net>\r\nDATA\r\n"
            + HAM
            + b".\r\nQUIT\r\n"
        )
        got = c.replies(11)
        one = [b"250", b"250", b"354", b"250"]  # MAIL, RCPT, DATA, end of data
        assert got == [b"220", b"250", *one[:2], b"250", *one[2:], *one]
        assert c.reply() == b"221"
    assert [len(env) for env, _ in hop.messages] == [3, 2]
    assert all(data.endswith(HAM + b".\r\n") for _, data in hop.messages)


SMUGGLING = [
    b"\n.\n",  # <LF>.<LF>
    b"\n.\r\n",  # <LF>.<CR><LF>
    b"\r\n.\n",  # <CR><LF>.<LF>
    b"\r.\r\n",  # <CR>.<CR><LF>
    b"\r.\r",  # <CR>.<CR>
]


@pytest.mark.parametrize("end", SMUGGLING, ids=["LF.LF", "LF.CRLF", "CRLF.LF", "CR.CRLF", "CR.CR"])
def test_smuggled_end_of_data_cannot_split_one_message_into_two(config, hop, end):
    smuggled = (
        b"MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nwire the money\r\n"
    )
    with proxy_running(config) as proxy, connected(proxy) as c:
        c.start_data()
        c.send(b"Subject: hi\r\n\r\nbefore" + end + smuggled + b"\r\n.\r\n")
        assert c.reply() == b"250"
        c.send(b"QUIT\r\n")
        assert c.reply() == b"221"
    assert len(hop.messages) == 1  # one message, the smuggled text inside it
    (envelope, data) = hop.messages[0]
    assert envelope == [b"MAIL FROM:<a@example.org>\r\n", b"RCPT TO:<b@example.net>\r\n"]
    assert b"wire the money" in data
    assert not any(b"victim" in cmd for cmd in hop.commands())
    # What went on the wire has no end-of-data look-alike either: a dot after a bare LF
    # is doubled, so a lenient next hop cannot be tricked instead.
    assert b"\n.\n" not in data and b"\n.\r\n" not in data[:-5]


def read_line_by_line(stream: bytes, limit: int) -> tuple[bytes | None, bytes]:
    """aiosmtpd's DATA rules, one line at a time: lines end with CRLF only, the line "."
    ends the message, a leading dot is removed; over `limit` wire bytes: None. Returns the
    message and what follows its end."""
    out, size, pos = [], 0, 0
    while (line := stream[pos : stream.index(b"\r\n", pos) + 2]) != b".\r\n":
        pos += len(line)
        size += len(line)
        out.append(line[1:] if line.startswith(b".") else line)
    return (None if size > limit else b"".join(out)), stream[pos + 3 :]


async def read_in_chunks(chunks: list[bytes], limit: int) -> tuple[bytes | None, bytes]:
    """The proxy's DATA reader fed `chunks` one event-loop turn apart; the message and what
    it left in the reader."""
    connection = SmtpProxy(SmtpOptions(), Config())._connection()
    connection.data_size_limit = limit
    connection._reader = reader = asyncio.StreamReader()
    connection._reset_timeout = lambda: None  # no transport here to time out
    task = asyncio.ensure_future(connection.read_message())
    for chunk in chunks:
        reader.feed_data(chunk)
        await asyncio.sleep(0)
    reader.feed_eof()
    return await task, await reader.read()


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    body=st.lists(st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n."]), max_size=40),
    after=st.binary(max_size=12),
    cuts=st.lists(st.integers(0, 80), max_size=6),
    limit=st.sampled_from([4, 16, 1 << 20]),
)
def test_the_data_reader_agrees_with_reading_line_by_line(body, after, cuts, limit):
    """Whatever the chunking: the same message (dots unstuffed, bare CR and LF kept, only
    CRLF . CRLF ending it), the same size verdict, and the bytes after the end (pipelined
    commands) left in order for the command reader."""
    stream = b"".join(body) + b"\r\n.\r\n" + after
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    assert asyncio.run(read_in_chunks(chunks, limit)) == read_line_by_line(stream, limit)


@pytest.mark.parametrize(
    "command",
    [
        b"MAIL FROM:<a@example.org\rRCPT TO:<evil@example.com>>",
        b"MAIL FROM:<a@example.org> BODY=8BITMIME\rRCPT TO:<evil@example.com>",
        b"MAIL FROM:<a@example.org>\x00RCPT TO:<evil@example.com>",
    ],
    ids=["cr-in-address", "cr-in-parameters", "nul"],
)
def test_cr_lf_injection_in_mail_from_or_rcpt_to_never_reaches_the_next_hop(config, hop, command):
    with proxy_running(config) as proxy, connected(proxy) as c:
        c.send(command + b"\r\n")
        assert c.reply() == b"501"
        c.send(b"MAIL FROM:<a@example.org>\r\n")
        assert c.reply() == b"250"
        c.send(b"RCPT TO:<b@example.net\rRCPT TO:<evil2@example.com>>\r\n")
        assert c.reply() == b"501"
        c.send(b"QUIT\r\n")
        assert c.reply() == b"221"
        still_serving(proxy, hop)
    for line in hop.commands():
        assert b"\r" not in line and b"\n" not in line and b"\x00" not in line, line
        assert not line.upper().startswith(b"RCPT") or b"evil" not in line, line


def test_a_bare_lf_command_is_one_command_not_an_injection(config, hop):
    """A bare LF ends a command line for aiosmtpd: the two lines are two commands the client
    sent, each relayed on its own line with CRLF."""
    with proxy_running(config) as proxy, connected(proxy) as c:
        c.send(b"MAIL FROM:<a@example.org>\nRCPT TO:<b@example.net>\n")
        assert c.replies(2) == [b"250", b"250"]
        still_serving(proxy, hop)
    for session in hop.sessions:
        assert re.search(rb"(?<!\r)\n", bytes(session).split(b"DATA\r\n")[0]) is None


def test_a_thousand_recipients(config, hop):
    rcpts = [f"user{i}@example.net" for i in range(1000)]
    with proxy_running(config) as proxy:
        start = time.monotonic()
        with smtplib.SMTP("127.0.0.1", proxy.port, timeout=30) as smtp:
            assert smtp.sendmail("a@example.org", rcpts, HAM) == {}
        elapsed = time.monotonic() - start
        assert elapsed < 30
        still_serving(proxy, hop)
    envelope, _ = hop.messages[0]
    assert len(envelope) == 1001 and envelope[-1] == b"RCPT TO:<user999@example.net>\r\n"


def test_envelope_cannot_pick_another_next_hop(tmp_path, hop):
    """Source routes, % hacks and host:port literals all go to the configured next hop; a
    trap listening where the envelope points gets nothing."""
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen()
    trap.settimeout(0.5)
    port = trap.getsockname()[1]
    config = make_config(tmp_path, hop.port, logit=-2.0)
    rcpts = [
        f"<@127.0.0.1:{port}:x@example.net>",
        f"x%127.0.0.1:{port}@example.net",
        f"x@[127.0.0.1]:{port}",
        f"x@127.0.0.1:{port}",
    ]
    with proxy_running(config) as proxy, connected(proxy) as c:
        for rcpt in rcpts:
            c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:" + rcpt.encode() + b"\r\nRSET\r\n")
            c.replies(3)
    with pytest.raises(TimeoutError):
        trap.accept()
    trap.close()
    assert all(session.startswith(b"EHLO ") for session in hop.sessions)


@pytest.fixture
def big_hop() -> Iterator[RawHop]:
    """A RawHop whose reader takes whole messages of up to 64 MiB (lines of any length)."""
    with serving(RawHop(), limit=1 << 26) as running:
        yield running


async def deliver(mail, **_):
    """A handler that passes every message on as it came: the proxy's own costs alone."""
    return Outcome("deliver", mail.raw)


def timed_send(port: int, raw: bytes) -> float:
    """Seconds smtplib takes to connect, send raw and get its 250."""
    start = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as smtp:
        assert smtp.sendmail("a@example.org", ["b@example.net"], raw) == {}
    return time.monotonic() - start


def test_many_short_lines_neither_crawl_nor_stall_other_clients(tmp_path, big_hop):
    """4 MB of 3-byte lines while other clients send theirs. aiosmtpd read DATA one line
    per call, up to 256 KiB of lines per event-loop turn: 6.3 s to receive (80-byte lines of
    the same size: 0.6 s), other clients' transactions took up to 5.7 s. Now 0.12 s for
    either, the others at most 0.13 s."""
    size = 4_000_000
    short = b"Subject: short\r\n\r\n" + b"a\r\n" * (size // 3)
    long = b"Subject: long\r\n\r\n" + (b"b" * 78 + b"\r\n") * (size // 80)
    config = make_config(
        tmp_path, big_hop.port, smtp={"max_message_bytes": 8 * size}, relay={"timeout_seconds": 60}
    )
    others: list[float] = []
    with proxy_running(config, deliver) as proxy:
        long_seconds = timed_send(proxy.port, long)
        sending = threading.Event()

        def other_clients() -> None:
            while sending.is_set() or not others:
                others.append(timed_send(proxy.port, HAM))

        sending.set()
        thread = threading.Thread(target=other_clients)
        thread.start()
        short_seconds = timed_send(proxy.port, short)
        sending.clear()
        thread.join(60)
    print(
        f"\n3-byte lines {short_seconds:.2f} s, 80-byte lines {long_seconds:.2f} s; "
        f"{len(others)} other transactions meanwhile, slowest {max(others):.3f} s"
    )
    assert short_seconds < 3 * long_seconds + 1.0
    assert max(others) < 1.0
    relayed = {data[:40]: data for _, data in big_hop.messages}
    assert relayed[short[:40]] == short + b".\r\n" and relayed[long[:40]] == long + b".\r\n"


def test_long_lines_are_taken_and_relayed_byte_for_byte(tmp_path, big_hop):
    """Real mail has lines over RFC 5322's 998 characters (SpamAssassin's ham does, and
    Postfix takes them): refusing them with aiosmtpd's permanent 500 bounced it."""
    raw = (
        b"Subject: long lines\r\nX-Long: "
        + b"h" * 5_000
        + b"\r\n\r\n"
        + b"5" * 5_000
        + b"\r\n"
        + b"k" * 100_000
        + b"\r\n.ends with a dot line\r\n"
    )
    config = make_config(tmp_path, big_hop.port, logit=-2.0)
    with proxy_running(config) as proxy, connected(proxy) as c:
        c.start_data()
        c.send(raw.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        assert c.reply() == b"250"
        c.send(b"MAIL FROM:<" + b"x" * 2_000 + b"@example.org>\r\n")
        assert c.reply() == b"500"  # command lines keep their limit
        c.send(b"NOOP\r\n")
        assert c.reply() == b"250"
    ((_, data),) = big_hop.messages
    assert data.endswith(raw.replace(b"\r\n.", b"\r\n..") + b".\r\n")


def test_a_slow_but_steady_client_is_not_idle(tmp_path, hop):
    """`timeout_seconds` is the wait between bytes, not the whole upload: a client sending
    for 3 s with `timeout_seconds` 1 gets its 250 (before: cut off after 1 s)."""
    config = make_config(tmp_path, hop.port, logit=-2.0, smtp={"timeout_seconds": 1.0})
    body = b"".join(b"line %d of a slow message\r\n" % i for i in range(15))
    with proxy_running(config) as proxy, connected(proxy) as c:
        c.start_data()
        c.send(HAM)
        for line in body.splitlines(keepends=True):
            time.sleep(0.2)
            c.send(line)
        c.send(b".\r\n")
        assert c.reply() == b"250"
    assert hop.messages[0][1].endswith(HAM + body + b".\r\n")


def test_a_trickling_client_meets_the_transaction_timeout(tmp_path, hop):
    """Never idle, never done: after `transaction_timeout_seconds` it gets 451 and is
    disconnected (it keeps its message); nothing reaches the next hop."""
    smtp = {"timeout_seconds": 5.0, "transaction_timeout_seconds": 1.0}
    config = make_config(tmp_path, hop.port, logit=-2.0, smtp=smtp)
    with proxy_running(config) as proxy, connected(proxy) as c:
        c.start_data()
        start = time.monotonic()
        with contextlib.suppress(OSError):  # the proxy may close before the last bytes
            for byte in HAM * 4:
                c.send(bytes([byte]))
                time.sleep(0.1)
                if time.monotonic() - start > 4:
                    break
        assert c.reply() == b"451"
        assert c.reply() == b""  # and closed
        assert 0.9 < time.monotonic() - start < 4
        still_serving(proxy, hop)
    assert len(hop.messages) == 1  # the other client's

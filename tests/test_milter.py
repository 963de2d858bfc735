"""The milter source in process, driven by a scripted MTA speaking the wire protocol:
the dialogue Postfix has with it (tests/test_postfix.py runs the real one), the edits it
answers with, and what a broken or hostile peer gets."""

from __future__ import annotations

import asyncio
import logging

import pytest
from kilter.protocol import messages as m
from kilter.protocol.buffer import SimpleBuffer

from filterd.config import Config
from filterd.headers import Tagger
from filterd.mail import Mail
from filterd.plugin_api import Context, Outcome
from filterd.verdict import Verdict
from plugins.milter import MilterOptions, MilterSource, header_edits

PROTOCOL_OFFER = m.ProtocolFlags(0x3FFFFF)  # every step and flag, as Postfix offers
HEADERS = [
    ("From", b" Ann <ann@example.org>"),
    ("X-Spam-Flag", b" NO"),
    ("Subject", b" lunch"),
    ("x-spam-flag", b" NO again"),
    ("Message-ID", b" <m1@example.org>"),
]
BODY = b"Caf\xc3\xa9 at noon?\r\n"


def pack(message: m.Message) -> bytes:
    buffer = SimpleBuffer(1 << 20)
    message.pack(buffer)
    return buffer[:].tobytes()


class Mta:
    """One connection to the milter, as an MTA holds it."""

    async def open(self, port: int) -> Mta:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        return self

    async def send(self, *messages: m.Message) -> None:
        for message in messages:
            self.writer.write(pack(message))
        await self.writer.drain()

    async def reply(self) -> m.Message:
        head = await asyncio.wait_for(self.reader.readexactly(4), 5)
        data = await asyncio.wait_for(self.reader.readexactly(int.from_bytes(head, "big")), 5)
        buffer = SimpleBuffer(len(data) + 4)
        buffer[:] = head + data
        message, _ = m.Message.unpack(buffer)
        message.freeze()
        return message

    async def replies_until_final(self) -> list[m.Message]:
        """The edits and the final answer to end of message."""
        out = [await self.reply()]
        while not isinstance(out[-1], m.Accept | m.Discard | m.ReplyCode | m.TemporaryFailure):
            out.append(await self.reply())
        return out

    async def negotiate(self) -> m.Negotiate:
        await self.send(m.Negotiate(6, m.ActionFlags.ALL, PROTOCOL_OFFER))
        answer = await self.reply()
        assert isinstance(answer, m.Negotiate)
        return answer

    async def message(self, sender: str = "<ann@example.org>", auth: str = "") -> list[m.Message]:
        """One message's whole dialogue; the answer to its end."""
        await self.send(m.Macro(ord("M"), {"{auth_authen}": auth, "i": "4XyZ"}))
        await self.send(m.EnvelopeFrom(sender.encode()))
        first = await self.reply()
        if isinstance(first, m.Accept):
            return [first]
        assert isinstance(first, m.Continue)
        await self.send(m.EnvelopeRecipient(b"<bob@example.net>"))
        assert isinstance(await self.reply(), m.Continue)
        await self.send(m.Data())
        assert isinstance(await self.reply(), m.Continue)
        await self.send(*(m.Header(name, value) for name, value in HEADERS))  # no replies: NR
        await self.send(m.EndOfHeaders())
        assert isinstance(await self.reply(), m.Continue)
        await self.send(m.Body(BODY), m.EndOfMessage(b""))
        return await self.replies_until_final()

    async def close(self) -> None:
        self.writer.close()


class Scripted:
    """A handler that tags with the real Tagger at a fixed probability (or answers the
    disposition it is told), and remembers what it saw."""

    def __init__(self, tagger: Tagger, disposition: str = "deliver", probability: float = 0.9):
        self.tagger = tagger
        self.disposition = disposition
        self.probability = probability
        self.seen: list[tuple[Mail, bool]] = []

    async def __call__(self, mail: Mail, *, can_reject: bool = False, tag_only: bool = False):
        self.seen.append((mail, can_reject))
        action = "quarantine" if self.disposition == "quarantine" else "tag"
        verdict = Verdict(self.probability, self.probability >= 0.5, action, 0.5, "scripted")
        if self.disposition in ("deliver", "quarantine"):
            return Outcome(self.disposition, self.tagger.tag(mail.raw, verdict), verdict=verdict)
        return Outcome(self.disposition, verdict=verdict)


async def running(options: dict, handler: Scripted | None = None, tagger=None):
    config = Config()
    tagger = tagger or Tagger(b"k" * 32)
    handler = handler or Scripted(tagger)
    source = MilterSource(MilterOptions(port=0, **options), config)
    source.name = "milter"
    await source.start(handler, Context(config, tagger))
    return source, handler


async def stopped(source: MilterSource) -> None:
    await source.stop_accepting()
    await source.drain(5)


def test_header_edits_delete_ours_last_first_change_the_subject_and_insert_at_the_top():
    tagger = Tagger(b"k" * 32, subject_prefix="[SPAM] ")
    raw = b"".join(n.encode() + b":" + v + b"\r\n" for n, v in HEADERS) + b"\r\n" + BODY
    tagged = tagger.tag(raw, Verdict(0.9, True, "tag", 0.5, "scripted"))
    edits = header_edits(HEADERS, tagged, "X-Spam-")
    assert edits[:3] == [
        m.ChangeHeader(2, "x-spam-flag", b""),
        m.ChangeHeader(1, "X-Spam-Flag", b""),
        m.ChangeHeader(1, "Subject", b" [SPAM] lunch"),
    ]
    inserted = edits[3:]
    assert [type(e) for e in inserted] == [m.InsertHeader] * len(inserted)
    assert [e.index for e in inserted] == list(range(len(inserted)))
    assert [e.name for e in inserted] == [
        "X-Spam-Flag",
        "X-Spam-Status",
        "X-Spam-Score",
        "X-Spam-Level",
        "X-Spam-Marker",
    ]


def test_a_connection_carries_messages_one_after_another():
    async def go():
        source, handler = await running({})
        mta = await Mta().open(source.port)
        offer = await mta.negotiate()
        first = await mta.message()
        await mta.send(m.Abort())  # between messages, as Postfix resets
        second = await mta.message(sender="<carl@example.org>")
        await mta.close()
        await stopped(source)
        return offer, first, second, handler

    offer, first, second, handler = asyncio.run(go())
    wanted = offer.protocol_flags  # no steps it does not use; no replies it need not send
    assert m.ProtocolFlags.NO_CONNECT in wanted and m.ProtocolFlags.NO_HELO in wanted
    assert m.ProtocolFlags.NR_HEADER in wanted and m.ProtocolFlags.NR_BODY in wanted
    assert m.ActionFlags.QUARANTINE in offer.action_flags
    for answer in (first, second):
        assert isinstance(answer[-1], m.Accept)
        names = [e.name for e in answer if isinstance(e, m.InsertHeader)]
        assert names[0] == "X-Spam-Flag" and names[-1] == "X-Spam-Marker"
    assert [mail.mail_from for mail, _ in handler.seen] == ["ann@example.org", "carl@example.org"]
    mail, can_reject = handler.seen[0]
    assert can_reject  # before the queue: the client still waits for the answer
    assert mail.raw.endswith(b"\r\n\r\n" + BODY)
    assert mail.raw.startswith(b"From: Ann <ann@example.org>\r\nX-Spam-Flag: NO\r\n")
    assert mail.rcpt_tos == ("bob@example.net",)


@pytest.mark.parametrize(
    ("disposition", "code"), [("reject", b"550 5.7.1"), ("tempfail", b"451 4.3.0")]
)
def test_reject_and_tempfail_answer_with_a_reply_code(disposition, code):
    async def go():
        tagger = Tagger(b"k" * 32)
        source, _ = await running({}, Scripted(tagger, disposition), tagger)
        mta = await Mta().open(source.port)
        await mta.negotiate()
        answer = await mta.message()
        await stopped(source)
        return answer

    (answer,) = asyncio.run(go())
    assert isinstance(answer, m.ReplyCode)
    assert bytes(answer.content).startswith(code) and bytes(answer.content).endswith(b"\0")


def test_quarantine_to_the_hold_queue_keeps_the_edits(caplog):
    async def go():
        tagger = Tagger(b"k" * 32)
        handler = Scripted(tagger, "quarantine", probability=0.97)
        source, _ = await running({"quarantine": "hold"}, handler, tagger)
        mta = await Mta().open(source.port)
        await mta.negotiate()
        answer = await mta.message()
        await stopped(source)
        return answer

    with caplog.at_level(logging.INFO, "filterd.milter"):
        answer = asyncio.run(go())
    assert isinstance(answer[-1], m.Accept)
    (quarantine,) = [e for e in answer if isinstance(e, m.Quarantine)]
    assert "0.970" in quarantine.reason
    assert any(isinstance(e, m.InsertHeader) for e in answer)
    assert "queue_id=4XyZ" in caplog.text and "action=quarantine reply=hold" in caplog.text


def test_authenticated_senders_pass_unscored_when_asked(caplog):
    async def go(skip: bool):
        source, handler = await running({"skip_authenticated": skip})
        mta = await Mta().open(source.port)
        await mta.negotiate()
        answer = await mta.message(auth="bob")
        await stopped(source)
        return answer, handler

    with caplog.at_level(logging.INFO, "filterd.milter"):
        answer, handler = asyncio.run(go(True))
    assert [type(a) for a in answer] == [m.Accept] and handler.seen == []
    assert "action=skipped reason=authenticated" in caplog.text
    answer, handler = asyncio.run(go(False))
    assert len(handler.seen) == 1 and isinstance(answer[-1], m.Accept)


def test_a_message_over_the_cap_passes_with_an_unscored_header():
    async def go():
        source, handler = await running({"max_message_bytes": 1024})
        mta = await Mta().open(source.port)
        await mta.negotiate()
        await mta.send(m.EnvelopeFrom(b"<ann@example.org>"))
        await mta.reply()
        await mta.send(*(m.Header(n, v) for n, v in HEADERS), m.EndOfHeaders())
        await mta.reply()
        await mta.send(*(m.Body(b"x" * 600 + b"\r\n") for _ in range(5)), m.EndOfMessage(b""))
        answer = await mta.replies_until_final()
        await stopped(source)
        return answer, handler

    answer, handler = asyncio.run(go())
    assert handler.seen == []
    status = [e for e in answer if isinstance(e, m.InsertHeader) and e.name == "X-Spam-Status"]
    assert b"Unscored" in bytes(status[0].value) and b"max_message_bytes" in bytes(status[0].value)
    assert isinstance(answer[-1], m.Accept)


@pytest.mark.parametrize(
    ("garbage", "logged"),
    [
        (b"GET / HTTP/1.0\r\n\r\n", "not a milter peer"),  # the length reads 1.2 GB
        (b"\x7f\xff\xff\xffO", "not a milter peer"),  # a huge length field
        (b"\x00\x00\x00\x02Zz", "unreadable frame"),  # an unknown command
        (b"\x00\x00\x00\x10O\x00\x00", "connection ended inside a frame"),
    ],
)
def test_garbage_closes_that_connection_with_a_log_line_and_others_go_on(caplog, garbage, logged):
    async def go():
        source, _ = await running({})
        bad = await Mta().open(source.port)
        good = await Mta().open(source.port)
        await good.negotiate()
        bad.writer.write(garbage)
        if logged == "connection ended inside a frame":
            bad.writer.write_eof()
        await bad.writer.drain()
        closed = await asyncio.wait_for(bad.reader.read(), 5)  # the milter hangs up
        answer = await good.message()  # meanwhile, an honest MTA is served
        await stopped(source)
        return closed, answer

    with caplog.at_level(logging.INFO, "filterd.milter"):
        closed, answer = asyncio.run(go())
    assert closed == b""
    assert isinstance(answer[-1], m.Accept)
    assert logged in caplog.text


def test_the_mta_leaving_mid_message_or_falling_silent_is_logged(caplog):
    async def go():
        source, handler = await running({"timeout_seconds": 0.5})
        gone = await Mta().open(source.port)
        await gone.negotiate()
        await gone.send(m.EnvelopeFrom(b"<ann@example.org>"))
        await gone.reply()
        await gone.send(m.Header("Subject", b" half"))
        await gone.close()
        silent = await Mta().open(source.port)
        await silent.negotiate()
        closed = await asyncio.wait_for(silent.reader.read(), 5)
        await stopped(source)
        return closed, handler

    with caplog.at_level(logging.INFO, "filterd.milter"):
        closed, handler = asyncio.run(go())
    assert closed == b"" and handler.seen == []
    assert "silent for 0.5 s" in caplog.text
    assert "ended the connection mid-message" in caplog.text


def test_stopping_answers_the_message_being_scored_then_closes(caplog):
    """SIGTERM's drain: a message whose verdict is still coming gets its answer; a
    connection between messages is closed (the MTA applies its default action)."""

    class Slow(Scripted):
        async def __call__(self, mail, **kwargs):
            await asyncio.sleep(0.5)
            return await super().__call__(mail, **kwargs)

    async def go():
        tagger = Tagger(b"k" * 32)
        source, _ = await running({}, Slow(tagger), tagger)
        idle = await Mta().open(source.port)
        await idle.negotiate()
        busy = await Mta().open(source.port)
        await busy.negotiate()
        answer = asyncio.create_task(busy.message())
        await asyncio.sleep(0.2)  # its end of message is being scored
        await source.stop_accepting()
        refused = await asyncio.gather(Mta().open(source.port), return_exceptions=True)
        await source.drain(5)
        return await answer, await idle.reader.read(), refused[0]

    final, idle_closed, refused = asyncio.run(go())
    assert isinstance(final[-1], m.Accept)
    assert idle_closed == b""
    assert isinstance(refused, OSError)  # the listener is closed: no new connections


def closed_by_the_milter(caplog, talk) -> str:
    """What the milter logged after `talk(mta)`, once it has closed the connection."""

    async def go():
        source, _ = await running({})
        mta = await Mta().open(source.port)
        await talk(mta)
        closed = await asyncio.wait_for(mta.reader.read(), 5)
        await stopped(source)
        return closed

    with caplog.at_level(logging.INFO, "filterd.milter"):
        assert asyncio.run(go()) == b""
    return caplog.text


def test_a_malformed_header_frame_is_refused_with_a_log_line(caplog):
    async def talk(mta):
        await mta.negotiate()  # headers unanswered (NR): read on the quick path
        await mta.send(m.EnvelopeFrom(b"<ann@example.org>"))
        await mta.reply()
        mta.writer.write(b"\x00\x00\x00\x05LSubj")  # no NUL after the name, no value

    logged = closed_by_the_milter(caplog, talk)
    assert "unreadable frame b'L': a header is NAME\\0VALUE\\0" in logged


def test_a_second_daemon_never_takes_over_a_live_socket_and_ours_goes_at_stop(tmp_path):
    from filterd.config import ConfigError

    path = tmp_path / "milter.sock"

    async def go():
        first, _ = await running({"socket": str(path)})
        with pytest.raises(ConfigError, match="in use by another process"):
            await running({"socket": str(path)})
        reader, writer = await asyncio.open_unix_connection(str(path))  # still the first's
        writer.write(pack(m.Negotiate(6, m.ActionFlags.ALL, PROTOCOL_OFFER)))
        head = await asyncio.wait_for(reader.readexactly(5), 5)
        writer.close()
        await stopped(first)
        return head

    assert asyncio.run(go())[4:5] == b"O"  # the first daemon answered
    assert not path.exists()  # removed at stop
    path.touch()  # not a socket: never replaced
    with pytest.raises(Exception, match="not a socket"):
        asyncio.run(running({"socket": str(path)}))


def test_a_client_that_never_negotiates_is_closed_soon(caplog, monkeypatch):
    import plugins.milter

    monkeypatch.setattr(plugins.milter, "NEGOTIATE_SECONDS", 0.3)

    async def talk(mta):  # says nothing
        pass

    assert "no milter negotiation within 0.3 s" in closed_by_the_milter(caplog, talk)


def test_a_folded_subject_is_changed_without_a_stray_cr():
    tagger = Tagger(b"k" * 32, subject_prefix="[SPAM] ")
    received = [("Subject", b" lunch\n\ttomorrow"), ("From", b" a@example.org")]
    raw = b"Subject: lunch\r\n\ttomorrow\r\nFrom: a@example.org\r\n\r\nhi\r\n"
    tagged = tagger.tag(raw, Verdict(0.9, True, "tag", 0.5, "scripted"))
    (subject,) = [e for e in header_edits(received, tagged, "X-Spam-") if e.name == "Subject"]
    assert subject.value == b" [SPAM] lunch\n\ttomorrow"


def test_a_utf8_sasl_name_is_read_and_skipped_when_asked(caplog):
    async def go():
        source, handler = await running({"skip_authenticated": True})
        mta = await Mta().open(source.port)
        offer = await mta.negotiate()
        payload = b"DM{auth_authen}\x00J\xc3\xb6rg\x00"  # kilter would refuse it: not ASCII
        mta.writer.write(len(payload).to_bytes(4, "big") + payload)
        await mta.send(m.EnvelopeFrom(b"<j@example.org>"))
        answer = await mta.reply()
        await stopped(source)
        return offer, answer, handler

    with caplog.at_level(logging.INFO, "filterd.milter"):
        offer, answer, handler = asyncio.run(go())
    assert "{auth_authen}" in offer.macros[m.Stage.ENVELOPE_FROM]
    assert isinstance(answer, m.Accept) and handler.seen == []
    assert "action=skipped reason=authenticated" in caplog.text

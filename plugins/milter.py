"""The milter source: filterd as a Sendmail milter (protocol version 6, as Postfix speaks
it), the way Rspamd and OpenDKIM plug into Postfix (`smtpd_milters`, `non_smtpd_milters`)
and Sendmail (`INPUT_MAIL_FILTER`). The MTA keeps the queue: no reinjection port, no second
smtpd. Per message the MTA sends the envelope, every header and the body; at end of body
filterd scores the message and answers with header edits (its headers inserted at the
top, incoming ones with its prefix deleted) and accept, quarantine, reject or tempfail.

The wire format (framing, packing, the negotiation's flags) comes from `kilter.protocol`:
typed, pure Python, no C library, and it checks each answer against what was negotiated.
The session loop is ours, for what a mail server needs around it: bounded frames and
messages, an idle timeout, the one handler of every source, drain on stop, a log line per
message. (kilter.service's session framework hides the raw header order and indices that
deleting headers and the marker need; pymilter binds the C libmilter and runs a thread
per connection.)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import struct
import time
from pathlib import Path
from typing import Literal

from kilter.protocol import messages as m
from kilter.protocol.buffer import SimpleBuffer
from kilter.protocol.core import FilterProtocol
from pydantic import Field

from filterd.config import Config, ConfigError
from filterd.headers import header_fields
from filterd.listen import Listening, bound_port, remove_socket, serve, socket_identity
from filterd.mail import Mail
from filterd.plugin_api import Context, Handler, Options, Outcome, Source
from filterd.verdict import log_fields

log = logging.getLogger("filterd.milter")

VERSION = 6
# Postfix sends body chunks of at most 64 KiB; a frame larger than this is not a milter's.
MAX_FRAME = 1 << 20
NEGOTIATE_SECONDS = 10.0  # an MTA negotiates as it connects
_LENGTH = struct.Struct("!L")
REJECTED = b"550 5.7.1 Message refused as spam"
NOT_SCORED = b"451 4.3.0 Message not scored, try again later"
# What we ask the MTA for: no connect, HELO or unknown-command events (unused); no
# replies to single headers or body chunks where it allows (fewer round trips); header
# values with their leading space, so the message is rebuilt as it was sent.
_NOT_WANTED = m.ProtocolFlags.NO_CONNECT | m.ProtocolFlags.NO_HELO | m.ProtocolFlags.NO_UNKNOWN
_IF_OFFERED = (
    m.ProtocolFlags.NR_HEADER | m.ProtocolFlags.NR_BODY | m.ProtocolFlags.HEADER_LEADING_SPACE
)
_ACTIONS = (
    m.ActionFlags.ADD_HEADERS
    | m.ActionFlags.CHANGE_HEADERS
    | m.ActionFlags.QUARANTINE
    | m.ActionFlags.SETSYMLIST
)
# Macros asked for: the SMTP client, authentication and the queue id (Postfix's names);
# none at the other stages, where the MTA would send its default sets with every message.
_MACROS = {
    m.Stage.CONNECT: [],
    m.Stage.HELO: [],
    m.Stage.ENVELOPE_FROM: ["{client_addr}"],  # and {auth_authen} with skip_authenticated
    m.Stage.ENVELOPE_RECIPIENT: [],
    m.Stage.DATA: [],
    m.Stage.END_HEADERS: [],
    m.Stage.END_MESSAGE: ["i"],
}


class MilterOptions(Options, Listening):
    """Where the milter listens (TCP on loopback, or a Unix socket) and what it does."""

    port: int = Field(10029, ge=0, le=65535)
    # Quarantine: "store", filterd's quarantine store (`filterd quarantine` lists and
    # releases it; the MTA is told to discard its copy once the store has the message), or
    # "hold", the MTA's own hold queue (Postfix: `postqueue -p`, release with `postsuper -H`).
    quarantine: Literal["store", "hold"] = "store"
    # Mail from a client that authenticated (the MTA's {auth_authen} macro: your users'
    # outgoing mail) passes unscored and untouched.
    skip_authenticated: bool = False
    # Larger messages are passed on untouched but for a header saying they were not
    # scored; the body beyond this is not kept.
    max_message_bytes: int = Field(52_428_800, ge=1024)
    max_connections: int = Field(100, ge=1)
    # Seconds the MTA may stay silent on a connection (it keeps one open per SMTP session,
    # and Postfix's smtpd_timeout is 300 s) before filterd closes it.
    timeout_seconds: float = Field(1800.0, gt=0)


class MilterError(Exception):
    """The MTA broke the protocol; the connection is closed."""


@dataclasses.dataclass
class _Message:
    """What the MTA told us of one message so far."""

    mail_from: str | None = None
    rcpts: list[str] = dataclasses.field(default_factory=list)
    headers: list[tuple[str, bytes]] = dataclasses.field(default_factory=list)
    body: list[bytes] = dataclasses.field(default_factory=list)
    size: int = 0
    too_big: bool = False
    skip: str = ""  # why it passes unscored (authenticated)
    macros: dict[str, str] = dataclasses.field(default_factory=dict)


def _address(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").strip()
    return text[1:-1] if text.startswith("<") and text.endswith(">") else text


def header_edits(received: list[tuple[str, bytes]], tagged: bytes, prefix: str) -> list[m.Message]:
    """The edits that turn the message the MTA holds into `tagged`: incoming fields with
    our prefix deleted (last first, so the indices of the others hold), fields whose
    value changed (a Subject prefix) replaced, ours inserted at the top in order."""
    ours_lower = prefix.lower().encode()
    out_fields = header_fields(tagged)
    ours = [f for n, f in out_fields if n.startswith(ours_lower)]
    kept_out = [f for n, f in out_fields if not n.startswith(ours_lower)]
    edits: list[m.Message] = []
    counts: dict[str, int] = {}
    numbered = []
    for name, value in received:
        counts[name.lower()] = counts.get(name.lower(), 0) + 1
        numbered.append((name, value, counts[name.lower()]))
    kept_in = [(n, v, i) for n, v, i in numbered if not n.lower().encode().startswith(ours_lower)]
    for name, _, index in reversed(numbered):
        if name.lower().encode().startswith(ours_lower):
            edits.append(m.ChangeHeader(index, name, b""))
    for (name, value, index), field in zip(kept_in, kept_out, strict=False):
        new = _field_value(field)
        if _unfolded(new) != _unfolded(value):
            edits.append(m.ChangeHeader(index, name, new))
    for position, field in enumerate(ours):
        name, _, _ = field.partition(b":")
        edits.append(m.InsertHeader(position, name.decode("ascii"), _field_value(field)))
    return edits


def _field_value(field: bytes) -> bytes:
    """A field's value as a milter sends and takes it: after the colon, line end gone,
    folded lines joined by LF alone (a CR there would reach the mailbox as a stray CR)."""
    return field.partition(b":")[2].rstrip(b"\r\n").replace(b"\r\n", b"\n")


def _unfolded(value: bytes) -> bytes:
    return b" ".join(value.split())


def _rebuilt(message: _Message) -> bytes:
    """The message as the MTA holds it: each header as `Name:value` (the value keeps its
    leading space and folding), a blank line, the body (CR LF line ends, as sent)."""
    lines = [
        name.encode("ascii", "replace")
        + b":"
        + value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        + b"\r\n"
        for name, value in message.headers
    ]
    return b"".join([*lines, b"\r\n", *message.body])


class _Session:
    """One MTA connection: any number of messages, one after another."""

    def __init__(
        self,
        source: MilterSource,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ):
        self.source = source
        self.reader = reader
        self.writer = writer
        self.protocol = FilterProtocol()
        self.message = _Message()
        self.leading_space = False
        self.started = False  # a message is under way (MAIL seen, no end or abort yet)
        self.waiting_since: float | None = None  # reading the MTA's next frame since
        self.unanswered = frozenset([b"D"])  # macros; header, body too when negotiated NR
        self.negotiated = False
        self.opened = time.monotonic()
        self.silent = ""  # why the source's watch closed it

    async def read(self) -> m.Message | None:
        """The next frame, parsed; None at a clean end of the connection. While it waits,
        `waiting_since` says since when: the source's watch closes a connection silent
        for timeout_seconds (one timer for all, not one per frame: a message is ~30)."""
        self.waiting_since = time.monotonic()
        head = b""
        try:
            head = await self.reader.readexactly(4)
            (size,) = _LENGTH.unpack(head)
            if not 1 <= size <= MAX_FRAME:
                raise MilterError(
                    f"a frame of {size} bytes (at most {MAX_FRAME}): not a milter peer"
                )
            data = await self.reader.readexactly(size)
        except asyncio.IncompleteReadError as e:
            if head:
                raise MilterError("connection ended inside a frame") from None
            if e.partial:
                raise MilterError("connection ended inside a frame's length") from None
            return None
        finally:
            self.waiting_since = None
        kind = data[:1]
        if kind in self.unanswered:  # most frames: taken apart here, see _unanswered_frame
            return _unanswered_frame(kind, data)
        buffer = SimpleBuffer(size + 4)
        buffer[:] = head + data
        messages = []
        try:
            for message in self.protocol.read_from(buffer):
                message.freeze()  # copies out of the buffer, which it releases next
                messages.append(message)
        except Exception as e:  # a malformed frame: unknown command, bad fields
            raise MilterError(f"unreadable frame {data[:1]!r}: {type(e).__name__}: {e}") from e
        if len(messages) != 1:
            raise MilterError(f"unreadable frame {data[:1]!r}")
        return messages[0]

    def send(self, *replies: m.Message) -> None:
        # Room for the replies: a header edit carries one field, the others a short text.
        room = sum(
            len(getattr(r, "value", b"")) + len(getattr(r, "name", "")) + 256 for r in replies
        )
        buffer = SimpleBuffer(room)
        for reply in replies:
            self.protocol.write_to(buffer, reply)
        self.writer.write(buffer[:].tobytes())

    async def run(self) -> None:
        while (event := await self.read()) is not None:
            if type(event) is m.Close:
                return
            reply = await self.on(event)
            if reply:
                self.send(*reply)
                await self.writer.drain()
        if self.started:
            raise MilterError("the MTA ended the connection mid-message (it keeps the message)")

    async def on(self, event: m.Message) -> list[m.Message]:
        """What to answer one event (nothing where none is due). Dispatched on the exact
        type: isinstance against kilter's ABCs costs more than the rest of a header."""
        message = self.message
        kind = type(event)
        if kind is m.Header:
            self.add(message, event.name, bytes(event.value))
        elif kind is m.Macro:
            message.macros.update(event.macros)
            return []
        elif kind is m.Body:
            self.add_body(message, bytes(event.content))
        elif kind is m.EndOfMessage:
            self.add_body(message, bytes(event.content))
            replies = await self.source.end_of_message(message, self.leading_space)
            self.message = _Message(macros=message.macros)
            self.started = False
            return replies
        elif kind is m.EnvelopeFrom:
            self.started = True
            self.message = message = _Message(
                mail_from=_address(bytes(event.sender)), macros=message.macros
            )
            if self.source.options.skip_authenticated and message.macros.get("{auth_authen}"):
                message.skip = "authenticated"
                self.source.log_skip(message)
                self.started = False
                return [m.Accept()]  # no more events for this message
        elif kind is m.EnvelopeRecipient:
            message.rcpts.append(_address(bytes(event.recipient)))
        elif kind is m.Abort:
            self.message = _Message()
            self.started = False
            return []
        elif kind is m.Negotiate:
            return [self.negotiate(event)]
        return [m.Continue()] if self.protocol.needs_response(event) else []

    def negotiate(self, offer: m.Negotiate) -> m.Negotiate:
        if offer.version < 2:
            raise MilterError(f"milter protocol version {offer.version} is too old")
        missing = (m.ActionFlags.ADD_HEADERS | m.ActionFlags.CHANGE_HEADERS) & ~offer.action_flags
        if missing:
            raise MilterError(f"the MTA does not allow {missing!r}: filterd cannot tag")
        protocol = (_NOT_WANTED | _IF_OFFERED) & offer.protocol_flags
        self.leading_space = bool(protocol & m.ProtocolFlags.HEADER_LEADING_SPACE)
        self.unanswered |= frozenset(
            kind
            for kind, flag in ((b"L", m.ProtocolFlags.NR_HEADER), (b"B", m.ProtocolFlags.NR_BODY))
            if protocol & flag
        )
        actions = _ACTIONS & offer.action_flags
        macros = dict(_MACROS) if actions & m.ActionFlags.SETSYMLIST else {}
        if macros and self.source.options.skip_authenticated:
            macros[m.Stage.ENVELOPE_FROM] = [*macros[m.Stage.ENVELOPE_FROM], "{auth_authen}"]
        self.negotiated = True
        return m.Negotiate(min(VERSION, offer.version), actions, protocol, macros)

    def add(self, message: _Message, name: str, value: bytes) -> None:
        if not self.leading_space:  # the MTA dropped the space after the colon
            value = b" " + value
        message.size += len(name) + len(value) + 3
        message.too_big = message.too_big or message.size > self.source.options.max_message_bytes
        if not message.too_big:
            message.headers.append((name, value))
        elif name.lower().startswith(self.source.prefix):  # to delete it; nothing else kept
            message.headers.append((name, b""))

    def add_body(self, message: _Message, chunk: bytes) -> None:
        message.size += len(chunk)
        if message.size > self.source.options.max_message_bytes:
            message.too_big = True
        if not message.too_big:
            message.body.append(chunk)


class MilterSource(Source):
    """The listening side: sessions, limits, the failure policy's answers, drain."""

    Options = MilterOptions
    options: MilterOptions

    def __init__(self, options: MilterOptions, config: Config):
        super().__init__(options, config)
        if options.quarantine == "hold" and config.quarantine.path is not None:
            log.info("milter quarantines to the MTA's hold queue; quarantine.path is unused")
        self.sessions: dict[asyncio.Task, _Session] = {}
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._server: asyncio.Server | None = None
        self._handle: Handler | None = None
        self._context: Context | None = None
        self._watch: asyncio.Task | None = None
        self._socket: tuple[Path, int] | None = None  # our Unix socket and its inode
        self.prefix = "x-spam-"  # the tagger's, lower-cased, once started
        self.port = 0

    async def start(self, handle: Handler, context: Context) -> None:
        self._handle, self._context = handle, context
        self.prefix = context.tagger.prefix.lower()
        name = self.name or "milter"
        try:
            self._server = await serve(self.options, self._session, name)
        except OSError as e:
            where = self.where or "milter"
            raise ConfigError(f"{where}: cannot listen on {self.options.where()}: {e}") from e
        self.port = bound_port(self._server)
        if self.options.socket is not None:
            self._socket = socket_identity(self.options.socket.expanduser())
        where = self.options.where() if self.options.socket else f"{self.options.host}:{self.port}"
        log.info("source=%s listening on %s quarantine=%s", name, where, self.options.quarantine)
        self._watch = asyncio.create_task(self._close_silent())

    async def _close_silent(self) -> None:
        """End the connections whose MTA has said nothing for timeout_seconds, and those
        that did not negotiate at once (an MTA does so as it connects; an idle client must
        not hold one of max_connections for long)."""
        limit = self.options.timeout_seconds
        while True:
            await asyncio.sleep(min(limit, NEGOTIATE_SECONDS) / 4)
            now = time.monotonic()
            for task, session in list(self.sessions.items()):
                since = session.waiting_since
                if since is not None and now - since > limit:
                    session.silent = f"silent for {limit:g} s (timeout_seconds)"
                elif not session.negotiated and now - session.opened > NEGOTIATE_SECONDS:
                    session.silent = f"no milter negotiation within {NEGOTIATE_SECONDS:g} s"
                else:
                    continue
                task.cancel()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        if len(self.sessions) >= self.options.max_connections:
            log.warning("source=milter peer=%s refused: max_connections reached", peer)
            writer.close()
            return
        session = self.sessions[task] = _Session(self, reader, writer)
        try:
            await session.run()
        except MilterError as e:
            log.warning("source=milter peer=%s closed: %s", peer, e)
        except asyncio.CancelledError:
            if not session.silent:  # we stop: the MTA applies its milter_default_action
                raise
            log.warning("source=milter peer=%s closed: %s", peer, session.silent)
        except ConnectionError:
            pass  # the MTA went away: it applies its milter_default_action
        except Exception:  # a bug of ours: the MTA applies milter_default_action
            log.exception("source=milter peer=%s closed on an internal error", peer)
        finally:
            del self.sessions[task]
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def end_of_message(self, message: _Message, leading_space: bool) -> list[m.Message]:
        """Score, act, and answer the MTA; one log line."""
        began = time.monotonic()
        raw = _rebuilt(message)
        mail = Mail(
            raw, message.mail_from, tuple(message.rcpts), message.macros.get("{client_addr}", "")
        )
        assert self._handle is not None and self._context is not None
        self.in_flight += 1
        self._idle.clear()
        outcome: Outcome | None = None
        try:
            if message.too_big:
                why = f"over max_message_bytes ({self.options.max_message_bytes})"
                outcome = Outcome("deliver", self._context.tagger.unscored(raw, why), note=why)
            else:
                outcome = await self._handle(mail, can_reject=True)
            replies, outcome = await self._answer(mail, message, outcome, leading_space)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()
        self._log(mail, message, outcome, replies, began)
        return replies

    async def _answer(
        self, mail: Mail, message: _Message, outcome: Outcome, leading_space: bool
    ) -> tuple[list[m.Message], Outcome]:
        """The answer to end of body, and the outcome as carried out (a quarantine id)."""
        assert self._context is not None
        if outcome.disposition == "reject":
            return [m.ReplyCode(REJECTED + b"\0")], outcome
        if outcome.disposition == "tempfail":
            return [m.ReplyCode(NOT_SCORED + b"\0")], outcome
        edits = []
        if outcome.data is not None:
            edits = header_edits(message.headers, outcome.data, self._context.tagger.prefix)
            if not leading_space:  # the MTA adds the space after the colon itself
                edits = [_strip_space(e) for e in edits]
        if outcome.disposition == "quarantine":
            if self.options.quarantine == "hold":
                reason = f"filterd: spam probability {_probability(outcome)}"
                return [*edits, m.Quarantine(reason), m.Accept()], outcome
            try:
                qid = await asyncio.to_thread(self._context.store.add, mail, outcome.verdict)
            except OSError as e:
                failed = self._context.failure(mail, f"quarantine failed: {type(e).__name__}: {e}")
                return await self._answer(mail, message, failed, leading_space)
            # The store has it (written durably): only now may the MTA drop its copy.
            return [m.Discard()], dataclasses.replace(outcome, note=qid)
        return [*edits, m.Accept()], outcome

    def log_skip(self, message: _Message) -> None:
        log.info(
            "source=milter queue_id=%s from=<%s> action=skipped reason=%s",
            message.macros.get("i", "-"),
            message.mail_from,
            message.skip,
        )

    @staticmethod
    def _log(
        mail: Mail,
        message: _Message,
        outcome: Outcome | None,
        replies: list[m.Message],
        began: float,
    ) -> None:
        """The line per message; reply: accept, hold (Postfix's hold queue), discard (in
        filterd's store) or the reply code."""
        reply = replies[-1]
        answer = {
            m.Accept: "hold" if any(type(r) is m.Quarantine for r in replies) else "accept",
            m.Discard: "discard",
            m.ReplyCode: getattr(reply, "content", b"")[:3].decode(),
        }.get(type(reply), type(reply).__name__)
        log.info(
            "source=milter queue_id=%s message_id=%s peer=%s from=<%s> rcpts=%d %s reply=%s "
            "latency_ms=%.0f note=%s",
            message.macros.get("i", "-"),
            mail.header("Message-ID") or "-",
            mail.origin or "-",
            mail.mail_from,
            len(mail.rcpt_tos),
            log_fields(None if outcome is None else outcome.verdict),
            answer,
            (time.monotonic() - began) * 1000,
            (outcome.note if outcome else "") or "-",
        )

    async def stop_accepting(self) -> None:
        """Close the listener (and remove our Unix socket); messages being scored still get
        their answer."""
        if self._server is not None:
            self._server.close()
        if self._socket is not None:
            remove_socket(self._socket)

    async def drain(self, timeout: float) -> None:
        """Wait for messages being scored (at most `timeout`), then end every session: the
        MTA applies its milter_default_action to messages it was still sending."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning("source=milter stopping with %d messages unanswered", self.in_flight)
        if self._watch is not None:
            self._watch.cancel()
        for task in list(self.sessions):
            task.cancel()
        if self.sessions:
            await asyncio.wait(list(self.sessions), timeout=5)
        if self._server is not None:
            await self._server.wait_closed()


def _unanswered_frame(kind: bytes, data: bytes) -> m.Message:
    """A macro list, header or body chunk the MTA expects no answer to, read without kilter's
    protocol state machine (whose only check for such a frame is that no answer is owed,
    which this loop never leaves open): these are ~25 of a message's ~30 frames, and the
    generic path cost more than the rest of the session. Same message types, same
    errors for a malformed frame."""
    if kind == b"B":
        return m.Body(data[1:])
    if kind == b"D":  # a stage, then NAME\0VALUE\0 pairs; values may be UTF-8 (a SASL name)
        if len(data) < 2:
            raise MilterError("unreadable frame b'D': no stage")
        words = [w.decode("utf-8", "replace") for w in data[2:].split(b"\0")]
        return m.Macro(data[1], dict(zip(words[0:-1:2], words[1::2], strict=False)))
    name, sep, rest = data[1:].partition(b"\0")
    value, end, tail = rest.partition(b"\0")
    if not (sep and end) or tail:
        raise MilterError(f"unreadable frame {kind!r}: a header is NAME\\0VALUE\\0")
    try:
        return m.Header(name.decode("ascii"), value)
    except UnicodeDecodeError as e:
        raise MilterError(f"unreadable frame {kind!r}: a header name not in ASCII") from e


def _strip_space(edit: m.Message) -> m.Message:
    if isinstance(edit, m.ChangeHeader) and edit.value.startswith(b" "):
        return type(edit)(edit.index, edit.name, edit.value[1:])
    return edit


def _probability(outcome: Outcome) -> str:
    p = None if outcome.verdict is None else outcome.verdict.probability
    return "-" if p is None else f"{p:.3f}"

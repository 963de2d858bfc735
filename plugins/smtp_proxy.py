"""The SMTP proxy source: filterd between an MTA and its next hop, answering a client only
for what the next hop (or the quarantine) already holds.

Every client connection gets its own session with the configured next hop (relay.host,
relay.port), whatever the envelope says, so filterd is never an open relay. MAIL FROM and
each RCPT TO are mirrored there as they arrive, with their ESMTP parameters as the client
wrote them (SIZE, BODY, SMTPUTF8, DSN's RET/ENVID/NOTIFY/ORCPT), so every recipient gets the
next hop's own answer. Once DATA is in, the message is scored; the client's DATA is
answered only after the next hop accepted the tagged message or the quarantine copy is on
disk. Anything failing in between answers 451: the client still holds the message and
retries, so nothing is lost (at worst it arrives twice).

Modes: `after_queue` (Postfix content_filter; the MTA already accepted the mail, so the
daemon turns a reject verdict into quarantine: a refusal would bounce to a possibly forged
sender) and `before_queue` (smtpd_proxy_filter; reject answers 550 5.7.1 to the client).

Time limits: `timeout_seconds` is idle time only (waiting for the client's next bytes or
command); `transaction_timeout_seconds` bounds DATA to its answer; `relay.timeout_seconds`
bounds each step with the next hop. Wherever the next hop may hold a message its client was
not answered 250 for (the one duplicate path of any relay), a warning names the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from aiosmtpd.smtp import SMTP, Envelope, Session, syntax
from pydantic import Field

from filterd.config import Config, ConfigError
from filterd.listen import TcpListening, is_loopback
from filterd.mail import Mail
from filterd.plugin_api import Context, Handler, Options, Outcome, Source
from filterd.verdict import log_fields

log = logging.getLogger("filterd.smtp")

# RFC 3461 (DSN) parameters aiosmtpd does not know; they go to the next hop unchanged.
DSN_PARAMS = ("RET", "ENVID", "NOTIFY", "ORCPT")
END_OF_DATA = b"\r\n.\r\n"
# reader.read(n) hands over everything buffered, up to n: with this, all of it. Its flow
# control keeps that to about one socket read (256 KiB), so one turn of the event loop
# handles at most that much of one client's message.
_EVERYTHING = sys.maxsize
_REPLY_LINE = re.compile(r"[0-9]{3}([ -]|$)")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# A path as nearly every client writes it: <dot-atom@domain>, or the null path <>.
_PLAIN_PATH = re.compile(rf"<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)?>")

NEXT_HOP_DOWN = "451 4.4.1 Next hop unavailable, try again later"
BUSY = "451 4.3.2 Too busy, try again later"
NOT_SCORED = "451 4.3.0 Message not scored, try again later"
REJECTED = "550 5.7.1 Message refused as spam"
TIMED_OUT = "451 4.4.2 Transaction timed out, try again later"
TOO_MUCH = "552 Error: Too much mail data"
SHUTTING_DOWN = b"421 4.3.2 filterd shutting down, try again later\r\n"
TOO_MANY = b"421 4.7.0 Too many connections, try again later\r\n"
IDLE = b"421 4.4.2 Idle too long, closing connection\r\n"


class SmtpOptions(Options, TcpListening):
    """The SMTP proxy in front of the next hop (the config's `relay`). Where it listens:
    filterd.listen.TcpListening (loopback unless allow_remote: the next hop's reinjection
    port trusts loopback, so a proxy others can reach is an open relay)."""

    exposed: ClassVar[str] = (
        "firewall it: the next hop trusts mail from filterd, so an exposed proxy is an open relay"
    )
    # after_queue: Postfix content_filter (reject not allowed: it would cause backscatter);
    # before_queue: smtpd_proxy_filter (reject answers 550 5.7.1 to the sending client).
    mode: Literal["after_queue", "before_queue"] = "after_queue"
    port: int = Field(10025, ge=0, le=65535)  # 0: any free port (tests)
    max_message_bytes: int = Field(52_428_800, ge=1024)  # advertised as SIZE; larger: 552
    max_connections: int = Field(100, ge=1)  # more: 421 at connect
    max_queue: int = Field(64, ge=1)  # messages being scored or relayed at once; more: 451
    timeout_seconds: float = Field(300.0, gt=0)  # idle: waiting for the client; then 421
    # DATA to its answer (upload, scoring, relaying); past it: 451 (the client retries)
    transaction_timeout_seconds: float = Field(600.0, gt=0)


class NextHopError(OSError):
    """The next hop is unreachable, too slow, or broke the protocol."""


@dataclass(frozen=True)
class Reply:
    """An SMTP reply; str() gives it back in wire form (multi-line included)."""

    code: int
    lines: tuple[str, ...]

    def __str__(self) -> str:
        last = len(self.lines) - 1
        return "\r\n".join(
            f"{self.code}{' ' if i == last else '-'}{line}" for i, line in enumerate(self.lines)
        )

    def for_client(self) -> str:
        """Passed back as is, except that every temporary failure becomes 451."""
        return str(Reply(451, self.lines) if self.code // 100 == 4 else self)


def dot_stuffed(message: bytes) -> bytes:
    """DATA's wire form: leading dots doubled (after any LF, so a lenient next hop cannot be
    fooled by a bare-LF end of data), a final line end, the lone dot."""
    body = message.replace(b"\n.", b"\n..")
    if body.startswith(b"."):
        body = b"." + body
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"


def _reason(e: BaseException) -> str:
    """An exception as a log reason, never empty (a TimeoutError's text is)."""
    return str(e) or type(e).__name__


class NextHop:
    """An SMTP client session with the next hop over asyncio streams; every wait is bounded
    by relay.timeout_seconds, so a slow next hop becomes a 451, never a hung client. Errors
    name the step that failed: `next hop HOST:PORT: sending the message: ...`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        timeout: float,
        where: str = "",
    ):
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.where = where  # host:port, for errors
        self.in_transaction = False  # MAIL accepted and no final DATA answer since
        self.unanswered = False  # a whole message was handed over, no answer yet

    @classmethod
    async def connect(cls, host: str, port: int, timeout: float, helo: str) -> NextHop:
        where = f"{host}:{port}"
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except TimeoutError:
            why = f"no answer within {timeout:g} s"
            raise NextHopError(f"next hop {where}: connecting: {why}") from None
        except OSError as e:
            raise NextHopError(f"next hop {where}: connecting: {_reason(e)}") from e
        hop = cls(reader, writer, timeout, where)
        try:
            greeting = await hop.reply("waiting for its greeting")
            if greeting.code != 220:
                raise NextHopError(f"next hop {where}: greeted {greeting}")
            hello = await hop.command(f"EHLO {helo}")
            if hello.code != 250:
                raise NextHopError(f"next hop {where}: answered EHLO {hello}")
        except NextHopError:
            hop.abort()
            raise
        return hop

    @property
    def closed(self) -> bool:
        return self.writer.is_closing() or self.reader.at_eof()

    @property
    def may_hold(self) -> bool:
        """Whether the next hop may have taken a message we have no answer for: all of it,
        final dot included, left our buffer for the kernel's."""
        return self.unanswered and not self.writer.transport.get_write_buffer_size()

    def _error(self, step: str, why: str) -> NextHopError:
        return NextHopError(f"next hop {self.where}: {step}: {why}")

    async def reply(self, step: str = "waiting for an answer") -> Reply:
        """One (multi-line) reply; `step` says what it answers, for errors."""
        lines = []
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    raw = await self.reader.readline()
                    line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
                    if not raw:
                        raise self._error(step, "connection closed")
                    if not raw.endswith(b"\n") or not _REPLY_LINE.match(line):
                        raise self._error(step, f"garbled answer {line!r}")
                    lines.append(line[4:])
                    if line[3:4] != "-":
                        return Reply(int(line[:3]), tuple(lines))
        except TimeoutError:
            raise self._error(step, f"no answer within {self.timeout:g} s") from None
        except (OSError, ValueError) as e:  # ValueError: a line over the stream limit
            raise self._error(step, _reason(e)) from e

    async def command(self, line: str) -> Reply:
        verb = line[:4]  # MAIL, RCPT, DATA, ...
        await self._send(line.encode("utf-8", "surrogateescape") + b"\r\n", f"sending {verb}")
        return await self.reply(f"waiting for the answer to {verb}")

    async def data(self, message: bytes) -> Reply:
        """DATA, the message, its final answer; ends the transaction whatever that says."""
        go = await self.command("DATA")
        if go.code != 354:
            return go
        await self._send(dot_stuffed(message), "sending the message")
        self.unanswered = True  # drained: the rest (the dot last) is with the kernel or soon
        reply = await self.reply("waiting for the answer to the message")
        self.in_transaction = self.unanswered = False
        return reply

    async def _send(self, data: bytes, step: str) -> None:
        try:
            self.writer.write(data)
            async with asyncio.timeout(self.timeout):
                await self.writer.drain()
        except TimeoutError:
            raise self._error(step, f"not taken within {self.timeout:g} s") from None
        except OSError as e:
            raise self._error(step, _reason(e)) from e

    async def quit(self) -> None:
        with contextlib.suppress(NextHopError):
            await self.command("QUIT")
        self.abort()

    def abort(self) -> None:
        """Drop the connection at once, unsent bytes with it: a message cut short can never
        reach the next hop whole, and its transaction is discarded there."""
        if self.writer.transport.get_write_buffer_size():
            self.unanswered = False  # its final dot never left
        self.writer.transport.abort()


class _Connection(SMTP):
    """One client connection: aiosmtpd's protocol, plus the next-hop session it owns."""

    def __init__(self, proxy: SmtpProxy, **kwargs: Any):
        super().__init__(proxy, **kwargs)
        self.proxy = proxy
        self.hop: NextHop | None = None
        self.arg = ""  # the current MAIL or RCPT command's argument, as the client wrote it
        self.refused = False
        self.deadline = 0.0  # loop time at which the current DATA's transaction times out

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.proxy.settings.permits(transport):
            log.warning(
                "source=smtp refused a client from %s: not in allowed_clients",
                transport.get_extra_info("peername"),
            )
            self.refused = True
            transport.close()
            return
        refusal = self.proxy.refusal()
        if refusal is not None:
            self.refused = True
            transport.write(refusal)  # type: ignore[attr-defined]
            transport.close()
            return
        self.proxy.connections.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self.refused:
            return
        self.proxy.connections.discard(self)
        self.drop_hop()
        super().connection_lost(error)

    def shut(self, reply: bytes = SHUTTING_DOWN) -> None:
        """Say 421 (or `reply`) and close: a client mid-transaction keeps its message and
        retries. Nothing the client sent after this is read as a command: aiosmtpd's command
        loop ends once the transport is None, and the close may wait on a slow reader."""
        if self.transport is not None:
            self.transport.write(reply)  # type: ignore[attr-defined]
            self.transport.close()
            self.transport = None

    def _timeout_cb(self) -> None:
        """Idle for timeout_seconds: say so (421) before closing, as Postfix does."""
        self.shut(IDLE)

    @contextlib.contextmanager
    def _client_waits(self) -> Iterator[None]:
        """While a command is worked on (the next hop, scoring), the client waits for us:
        that is not idle time, so the idle timer stops until our answer is sent."""
        assert self._timeout_handle is not None
        self._timeout_handle.cancel()
        try:
            yield
        finally:
            if self.transport is not None:
                self._reset_timeout()

    # aiosmtpd upper-cases parameters (changing ENVID and ORCPT values) and refuses the ones
    # it does not know: keep the client's line for the next hop, and let DSN's through.
    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if self.proxy.stopping:  # SIGTERM: not busy but going; the client retries elsewhere
            self.shut()
            return
        self.arg = arg or ""
        with self._client_waits():
            await super().smtp_MAIL(arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        self.arg = arg or ""
        with self._client_waits():
            await super().smtp_RCPT(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        """aiosmtpd's DATA with the message read in chunks (see read_message), and with
        `transaction_timeout_seconds` from here to the answer."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        self.deadline = self.loop.time() + self.proxy.settings.transaction_timeout_seconds
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            async with asyncio.timeout_at(self.deadline):
                message = await self.read_message()
        except TimeoutError:  # still sending: the rest of the stream cannot be followed
            log.warning(
                "peer=%s still sending its message after transaction_timeout_seconds (%g s): "
                "451 and disconnected (it keeps the message)",
                _peer(self.session),
                self.proxy.settings.transaction_timeout_seconds,
            )
            self.shut(TIMED_OUT.encode() + b"\r\n")
            return
        with self._client_waits():
            if message is None:
                status = TOO_MUCH
            else:
                self.envelope.content = self.envelope.original_content = message
                status = await self._call_handler_hook("DATA")
            self._set_post_data_state()
            await self.push(status)

    async def read_message(self) -> bytes | None:
        """The message after 354, up to the lone dot, dots unstuffed; None if it is over
        data_size_limit (read to its end all the same, then 552, as aiosmtpd does).

        aiosmtpd reads DATA one line per call (40 MB of 3-byte lines took 53 s, and a loop
        turn handled up to 256 KiB of them, so other clients waited seconds) and refuses
        lines over 998 characters with a permanent 500 (real mail has them). Here each
        arrival is taken whole and searched for the end in C, and lines of any length pass.
        As in aiosmtpd, only CRLF . CRLF ends the message and only a dot after CRLF is
        unstuffed, so bare CR or LF cannot smuggle a second message in. Bytes after the end
        (pipelined commands) go back to the reader. Every arrival restarts the idle timer."""
        limit = self.data_size_limit
        buffer = bytearray(b"\r\n")  # DATA's own line end: a lone dot first ends it too
        dropped = 0  # bytes cut from the buffer's front: a message over the limit
        start = 0
        while (end := buffer.find(END_OF_DATA, start)) < 0:
            start = max(len(buffer) - len(END_OF_DATA) + 1, 0)  # where an end may begin
            if limit and dropped + start > limit:  # too big whatever follows: keep no more
                dropped += start
                del buffer[:start]
                start = 0
            chunk = await self._reader.read(_EVERYTHING)
            if not chunk:  # EOF cancels this task first; in case it did not
                raise ConnectionResetError("connection closed during DATA")
            self._reset_timeout()
            buffer += chunk
        rest = bytes(buffer[end + len(END_OF_DATA) :])
        if rest:
            self._reader.feed_data(rest)  # the next commands: nothing else is buffered
        if limit and dropped + end > limit:  # dropped + end: the message's length
            return None
        del buffer[end + 2 :]
        if b"\r\n." in buffer:
            buffer = buffer.replace(b"\r\n.", b"\r\n")
        return bytes(memoryview(buffer)[2:])

    def client_params(self, options: list[str]) -> str:
        """The command's parameters as the client wrote them (`options`, upper-cased by
        aiosmtpd, are its last words unless the client left out a space)."""
        words = self.arg.split()[-len(options) :] if options else []
        if [w.upper() for w in words] != options:
            words = options
        return "".join(" " + w for w in words)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's answer for MAIL and RCPT paths, found without the email package's
        parser for plain ones: that costs over 100 us a call, twice a message."""
        m = _PLAIN_PATH.match(arg)
        if m is None:
            return super()._getaddr(arg)
        if m[1] is None:
            return "<>", arg[m.end() :]
        rest = arg[m.end() :].lstrip(" \t")
        local = m[1].rpartition("@")[0]
        if rest.startswith("(") or (self.local_part_limit and len(local) > self.local_part_limit):
            return super()._getaddr(arg)  # a comment, or refused for its length
        return m[1], rest

    def _getparams(self, params: Any) -> dict[str, str | bool] | None:
        result = super()._getparams(params)
        for key in DSN_PARAMS if result is not None else ():
            result.pop(key, None)  # type: ignore[union-attr]
        return result

    def drop_hop(self) -> None:
        if self.hop is not None:
            self.hop.abort()
            self.hop = None

    async def mail(self, line: str) -> Reply:
        """MAIL FROM on this connection's next-hop session; a fresh session when there is
        none or the next hop closed the idle one."""
        if self.hop is not None and self.hop.closed:
            self.drop_hop()
        if self.hop is None:
            relay = self.proxy.config.relay
            self.hop = await NextHop.connect(
                relay.host, relay.port, relay.timeout_seconds, self.proxy.hostname
            )
        hop = self.hop
        try:
            if hop.in_transaction:  # the client reset, or the last message was not relayed
                reset = await hop.command("RSET")
                if reset.code != 250:
                    raise NextHopError(f"RSET answered {reset}")
            reply = await hop.command(line)
            if reply.code == 421:
                raise NextHopError(f"next hop is closing: {reply}")
        except NextHopError:
            self.drop_hop()
            raise
        hop.in_transaction = reply.code // 100 == 2
        return reply


def _address(address: str) -> str:
    return "" if address == "<>" else address  # aiosmtpd's null sender


def _peer(session: Session | None) -> str:
    peer = None if session is None else session.peer
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


def unconfirmed(mail: Mail, holder: str, why: str) -> None:
    """The one duplicate path of any relay, logged wherever it opens: `holder` (the next
    hop, the quarantine) may have the message while its client was not told 250, so the
    client sends it again."""
    log.warning(
        "message_id=%s peer=%s: %s may hold this message but its client was not told it "
        "was taken (%s); if the client sends it again, it arrives twice",
        mail.header("Message-ID") or "-",
        mail.origin,
        holder,
        why,
    )


class SmtpProxy(Source):
    """The listening side: the server socket, the limits, and a drain on stop. Each
    message goes to the handler (checks, model, action) and the client is answered with
    what the next hop (or the quarantine) made of the outcome."""

    Options = SmtpOptions
    options: SmtpOptions

    def __init__(self, options: SmtpOptions, config: Config):
        super().__init__(options, config)
        if options.mode == "after_queue" and config.scoring.reject_threshold is not None:
            raise ConfigError(
                "scoring.reject_threshold: not allowed with the smtp source's mode after_queue "
                "(the MTA already accepted the mail, so a reject would bounce to a possibly "
                "forged sender); use scoring.quarantine_threshold, or mode before_queue"
            )
        self.settings = options
        self.hostname = socket.gethostname()  # not getfqdn(): no DNS lookup per start
        self.connections: set[_Connection] = set()
        self.in_flight = 0  # messages being scored or relayed: the bounded queue
        self.stopping = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._server: asyncio.Server | None = None
        self._handle: Handler | None = None
        self._context: Context | None = None
        self.port = 0  # once started: the port listened on (chosen by the system for port 0)

    async def start(self, handle: Handler, context: Context) -> None:
        self._handle, self._context = handle, context
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                self._connection, self.settings.host, self.settings.port
            )
        except OSError as e:
            where = self.where or "smtp"
            raise ConfigError(f"{where}.host, {where}.port: cannot listen: {e}") from e
        self.port = self._server.sockets[0].getsockname()[1]
        bound = [sock.getsockname()[0] for sock in self._server.sockets]
        exposed = [address for address in bound if not is_loopback(address)]
        if exposed:
            log.warning(
                "source=%s listening beyond loopback on %s (allow_remote): the next hop "
                "trusts mail from filterd, so anyone reaching port %d can relay through it "
                "(an open relay) unless a firewall stops them",
                self.name or "smtp",
                ", ".join(exposed),
                self.port,
            )
        relay = self.config.relay
        log.info(
            "source=%s listening on %s:%d mode=%s next_hop=%s:%d",
            self.name or "smtp",
            self.settings.host,
            self.port,
            self.settings.mode,
            relay.host,
            relay.port,
        )

    def _connection(self) -> _Connection:
        return _Connection(
            self,
            data_size_limit=self.settings.max_message_bytes,
            enable_SMTPUTF8=True,
            hostname=self.hostname,
            ident="filterd",
            timeout=self.settings.timeout_seconds,
        )

    async def stop_accepting(self) -> None:
        """Close the listening socket; a new MAIL on an open connection gets 421 and the
        connection ends, while transactions already begun carry on."""
        self.stopping = True
        if self._server is not None:
            self._server.close()

    async def drain(self, timeout: float) -> None:
        """Wait (at most `timeout`) for messages being scored or relayed to get their
        answer; then say 421 to every client still connected."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning(
                "stopping with %d messages unanswered (their senders retry)", self.in_flight
            )
        for connection in list(self.connections):
            connection.shut()
        if self._server is not None:
            await self._server.wait_closed()

    def refusal(self) -> bytes | None:
        """What a new connection is told before it is closed, if it is not served."""
        if self.stopping:
            return SHUTTING_DOWN
        if len(self.connections) >= self.settings.max_connections:
            return TOO_MANY
        return None

    def _busy(self) -> bool:
        return self.in_flight >= self.settings.max_queue

    # --- aiosmtpd hooks: each answers the client with the next hop's own reply ------------

    async def handle_EHLO(
        self, server: _Connection, session: Session, envelope: Envelope, hostname: str, responses
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-DSN", responses[-1]]

    async def handle_MAIL(
        self, server: _Connection, session: Session, envelope: Envelope, address: str, options
    ) -> str:
        if self._busy():
            return BUSY
        try:
            reply = await server.mail(
                f"MAIL FROM:<{_address(address)}>{server.client_params(options)}"
            )
        except NextHopError as e:
            log.warning("%s", e)
            return NEXT_HOP_DOWN
        if reply.code // 100 == 2:
            envelope.mail_from = address
            envelope.mail_options.extend(options)
        return reply.for_client()

    async def handle_RCPT(
        self, server: _Connection, session: Session, envelope: Envelope, address: str, options
    ) -> str:
        hop = server.hop
        if hop is None or not hop.in_transaction:  # lost since MAIL FROM
            return NEXT_HOP_DOWN
        try:
            reply = await hop.command(f"RCPT TO:<{address}>{server.client_params(options)}")
        except NextHopError as e:
            log.warning("%s", e)
            server.drop_hop()
            return NEXT_HOP_DOWN
        if reply.code // 100 == 2:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        return reply.for_client()

    async def handle_QUIT(self, server: _Connection, session: Session, envelope: Envelope) -> str:
        if server.hop is not None:  # politely: a dropped connection makes the next hop log
            await server.hop.quit()
            server.hop = None
        return "221 2.0.0 Bye"

    async def handle_DATA(self, server: _Connection, session: Session, envelope: Envelope) -> str:
        hop = server.hop
        if hop is None or not hop.in_transaction:
            return NEXT_HOP_DOWN
        if self.in_flight >= self.settings.max_queue:
            return BUSY
        self.in_flight += 1
        self._idle.clear()
        try:
            return await self._data(server, hop, session, envelope)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()

    async def _data(
        self, server: _Connection, hop: NextHop, session: Session, envelope: Envelope
    ) -> str:
        """Score, act, answer, all within the transaction's deadline; one log line each."""
        began = time.monotonic()
        mail = Mail(
            envelope.original_content or b"",
            _address(envelope.mail_from or ""),
            tuple(envelope.rcpt_tos),
            origin=_peer(session),
        )
        assert self._handle is not None and self._context is not None
        outcome: Outcome | None = None
        answer, holder = "-", ""  # holder: who may have the message before our answer
        try:
            async with asyncio.timeout_at(server.deadline):
                outcome = await self._handle(mail, can_reject=self.settings.mode == "before_queue")
                if outcome.disposition == "quarantine":
                    holder = "the quarantine"  # its write goes on in a thread if we stop
                    outcome = await self._hold(mail, outcome, self._context)
                    holder = ""
                answer = await self._answer(server, hop, mail, outcome)
        except TimeoutError:
            answer = TIMED_OUT
            why = f"transaction_timeout_seconds ({self.settings.transaction_timeout_seconds:g} s)"
            holder = holder or ("the next hop" if hop.may_hold else "")
            if holder:
                unconfirmed(mail, holder, f"{why} ran out waiting for its answer")
            server.drop_hop()  # a message half sent is discarded, never completed
            outcome = dataclasses.replace(outcome or Outcome("tempfail"), note=f"{why} ran out")
        except asyncio.CancelledError:  # the client went away (or the daemon stopped)
            holder = holder or ("the next hop" if hop.may_hold else "")
            if holder:
                unconfirmed(mail, holder, "the client's connection ended before our answer")
            raise
        finally:
            self._log(mail, outcome, answer, began)
        return answer

    @staticmethod
    def _log(mail: Mail, outcome: Outcome | None, answer: str, began: float) -> None:
        """The line per message: label ham/spam ("-" unscored), the model's score ("-" when
        a check or an existing marker decided, and then decided_by says which)."""
        log.info(
            "source=smtp message_id=%s peer=%s from=<%s> rcpts=%d %s reply=%s latency_ms=%.0f "
            "note=%s",
            mail.header("Message-ID") or "-",
            mail.origin,
            mail.mail_from,
            len(mail.rcpt_tos),
            log_fields(None if outcome is None else outcome.verdict),
            answer[:3],
            (time.monotonic() - began) * 1000,
            (outcome.note if outcome else "") or "-",
        )

    @staticmethod
    async def _hold(mail: Mail, outcome: Outcome, context: Context) -> Outcome:
        """The original, with its envelope, into the quarantine store; a store that fails
        (disk full, read-only) hands the message to the failure policy."""
        try:
            qid = await asyncio.to_thread(context.store.add, mail, outcome.verdict)
        except OSError as e:
            return context.failure(mail, f"quarantine failed: {type(e).__name__}: {e}")
        return dataclasses.replace(outcome, note=qid)

    async def _answer(self, server: _Connection, hop: NextHop, mail: Mail, outcome: Outcome) -> str:
        """The client's answer to DATA: given once the next hop or the quarantine has it."""
        if outcome.disposition == "quarantine":
            return "250 2.0.0 Ok: held"
        if outcome.disposition == "reject":
            return REJECTED
        if outcome.disposition == "tempfail" or outcome.data is None:
            return NOT_SCORED
        try:
            reply = await hop.data(outcome.data)
        except NextHopError as e:
            log.warning("%s", e)
            if hop.may_hold:
                unconfirmed(mail, "the next hop", str(e))
            server.drop_hop()
            return NEXT_HOP_DOWN
        return reply.for_client()

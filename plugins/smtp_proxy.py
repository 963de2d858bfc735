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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import socket
import time
from dataclasses import dataclass
from typing import Any, Literal

from aiosmtpd.smtp import SMTP, Envelope, Session
from pydantic import Field

from filterd.config import Config, ConfigError
from filterd.mail import Mail
from filterd.plugin_api import Context, Handler, Options, Outcome, Source

log = logging.getLogger("filterd.smtp")

# RFC 3461 (DSN) parameters aiosmtpd does not know; they go to the next hop unchanged.
DSN_PARAMS = ("RET", "ENVID", "NOTIFY", "ORCPT")
_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)
_REPLY_LINE = re.compile(r"[0-9]{3}([ -]|$)")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# A path as nearly every client writes it: <dot-atom@domain>, or the null path <>.
_PLAIN_PATH = re.compile(rf"<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)?>")

NEXT_HOP_DOWN = "451 4.4.1 Next hop unavailable, try again later"
BUSY = "451 4.3.2 Too busy, try again later"
NOT_SCORED = "451 4.3.0 Message not scored, try again later"
REJECTED = "550 5.7.1 Message refused as spam"
SHUTTING_DOWN = b"421 4.3.2 filterd shutting down, try again later\r\n"
TOO_MANY = b"421 4.7.0 Too many connections, try again later\r\n"


class SmtpOptions(Options):
    """The SMTP proxy in front of the next hop (the config's `relay`)."""

    # after_queue: Postfix content_filter (reject not allowed: it would cause backscatter);
    # before_queue: smtpd_proxy_filter (reject answers 550 5.7.1 to the sending client).
    mode: Literal["after_queue", "before_queue"] = "after_queue"
    host: str = "127.0.0.1"  # loopback: the MTA on this machine is the only client
    port: int = Field(10025, ge=0, le=65535)  # 0: any free port (tests)
    max_message_bytes: int = Field(52_428_800, ge=1024)  # advertised as SIZE; larger: 552
    max_connections: int = Field(100, ge=1)  # more: 421 at connect
    max_queue: int = Field(64, ge=1)  # messages being scored or relayed at once; more: 451
    timeout_seconds: float = Field(300.0, gt=0)  # an idle client is disconnected


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
    """DATA's wire form: leading dots doubled, a final line end, the lone dot."""
    body = _LEADING_DOT.sub(b"..", message)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"


class NextHop:
    """An SMTP client session with the next hop over asyncio streams; every wait is bounded
    by relay.timeout_seconds, so a slow next hop becomes a 451, never a hung client."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float):
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.in_transaction = False  # MAIL accepted and no final DATA answer since

    @classmethod
    async def connect(cls, host: str, port: int, timeout: float, helo: str) -> NextHop:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (OSError, TimeoutError) as e:
            raise NextHopError(f"{host}:{port}: {e or 'connect timed out'}") from e
        hop = cls(reader, writer, timeout)
        try:
            for command, expected in ((None, 220), (f"EHLO {helo}", 250)):
                reply = await (hop.reply() if command is None else hop.command(command))
                if reply.code != expected:
                    raise NextHopError(f"{host}:{port} answered {reply}")
        except NextHopError:
            hop.abort()
            raise
        return hop

    @property
    def closed(self) -> bool:
        return self.writer.is_closing() or self.reader.at_eof()

    async def reply(self) -> Reply:
        lines = []
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    raw = await self.reader.readline()
                    line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
                    if not raw.endswith(b"\n") or not _REPLY_LINE.match(line):
                        raise NextHopError(f"connection closed or garbled answer {line!r}")
                    lines.append(line[4:])
                    if line[3:4] != "-":
                        return Reply(int(line[:3]), tuple(lines))
        except TimeoutError:
            raise NextHopError(f"no answer within {self.timeout:g} s") from None
        except (OSError, ValueError) as e:  # ValueError: a line over the stream limit
            raise NextHopError(f"reading the answer: {e}") from e

    async def command(self, line: str) -> Reply:
        await self._send(line.encode("utf-8", "surrogateescape") + b"\r\n")
        return await self.reply()

    async def data(self, message: bytes) -> Reply:
        """DATA, the message, its final answer; ends the transaction whatever that says."""
        go = await self.command("DATA")
        if go.code != 354:
            return go
        await self._send(dot_stuffed(message))
        reply = await self.reply()
        self.in_transaction = False
        return reply

    async def _send(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            async with asyncio.timeout(self.timeout):
                await self.writer.drain()
        except (OSError, TimeoutError) as e:
            raise NextHopError(f"sending: {e or 'timed out'}") from e

    async def quit(self) -> None:
        with contextlib.suppress(NextHopError):
            await self.command("QUIT")
        self.abort()

    def abort(self) -> None:
        """Drop the connection: a transaction in progress is discarded by the next hop."""
        self.writer.close()


class _Connection(SMTP):
    """One client connection: aiosmtpd's protocol, plus the next-hop session it owns."""

    def __init__(self, proxy: SmtpProxy, **kwargs: Any):
        super().__init__(proxy, **kwargs)
        self.proxy = proxy
        self.hop: NextHop | None = None
        self.arg = ""  # the current MAIL or RCPT command's argument, as the client wrote it
        self.refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
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

    def shut(self) -> None:
        """Say 421 and close: a client mid-transaction keeps its message and retries."""
        if self.transport is not None:
            self.transport.write(SHUTTING_DOWN)  # type: ignore[attr-defined]
            self.transport.close()

    # aiosmtpd upper-cases parameters (changing ENVID and ORCPT values) and refuses the ones
    # it does not know: keep the client's line for the next hop, and let DSN's through.
    async def smtp_MAIL(self, arg: str | None) -> None:
        self.arg = arg or ""
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        self.arg = arg or ""
        await super().smtp_RCPT(arg)

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
        """Close the listening socket; new commands on open connections get 451 (busy)."""
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
        return self.stopping or self.in_flight >= self.settings.max_queue

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
            log.warning("next hop: %s", e)
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
            log.warning("next hop: %s", e)
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
        began = time.monotonic()
        peer = session.peer
        mail = Mail(
            envelope.original_content or b"",
            _address(envelope.mail_from or ""),
            tuple(envelope.rcpt_tos),
            origin=f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer),
        )
        assert self._handle is not None and self._context is not None
        outcome = await self._handle(mail, can_reject=self.settings.mode == "before_queue")
        if outcome.disposition == "quarantine":
            outcome = await self._hold(mail, outcome, self._context)
        answer = await self._answer(server, hop, outcome)
        verdict = outcome.verdict
        p = None if verdict is None else verdict.probability
        log.info(
            "source=smtp message_id=%s peer=%s from=<%s> rcpts=%d score=%s action=%s reply=%s "
            "latency_ms=%.0f note=%s",
            mail.header("Message-ID") or "-",
            mail.origin,
            mail.mail_from,
            len(mail.rcpt_tos),
            "-" if p is None else f"{p:.4f}",
            verdict.action if verdict else "unscored",
            answer[:3],
            (time.monotonic() - began) * 1000,
            outcome.note or "-",
        )
        return answer

    @staticmethod
    async def _hold(mail: Mail, outcome: Outcome, context: Context) -> Outcome:
        """The original, with its envelope, into the quarantine store; a store that fails
        (disk full, read-only) hands the message to the failure policy."""
        try:
            qid = await asyncio.to_thread(context.store.add, mail, outcome.verdict)
        except OSError as e:
            return context.failure(mail, f"quarantine failed: {type(e).__name__}: {e}")
        return dataclasses.replace(outcome, note=qid)

    async def _answer(self, server: _Connection, hop: NextHop, outcome: Outcome) -> str:
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
            log.warning("next hop took the message but gave no answer: %s", e)
            server.drop_hop()
            return NEXT_HOP_DOWN
        return reply.for_client()

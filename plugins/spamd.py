"""The spamd source: filterd answering SpamAssassin's spamd protocol, so spamc, Exim's
`spamd_address`, procmail and anything else that talks to spamd can use it unchanged.

One request per connection (filterd.spamd_protocol has the wire format). PING, CHECK,
SYMBOLS, REPORT, REPORT_IFSPAM, PROCESS, HEADERS, SKIP and TELL are answered. Every message
is only tagged (`tag_only`): the caller decides what to do with it, so a verdict at or
above scoring.quarantine_threshold or reject_threshold is reported (REPORT, SYMBOLS), never
carried out. One model scores for everyone: the `User` header is logged, nothing more.
TELL (spamc -L) records labels into the feedback store when `allow_tell` is on, as spamd
does only with --allow-tell: whoever can connect could otherwise teach the model.

Limits: the whole request must arrive within `timeout_seconds` (a client that stalls or
declares a longer Content-length than it sends gets EX_TEMPFAIL and is closed), at most
`max_message_bytes` (after decompression too), at most `max_connections` at once. Each
request ends in one log line, faults included.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import time
from pathlib import Path

from pydantic import Field

from filterd.config import Config, ConfigError
from filterd.learning import forget, learn
from filterd.listen import Listening, bound_port, linger, remove_socket, serve, socket_identity
from filterd.mail import Mail
from filterd.plugin_api import Context, Handler, Options, Outcome, Source
from filterd.spamd_protocol import (
    DEFAULT_PORT,
    EX_DATAERR,
    EX_IOERR,
    EX_OK,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    HEADER_LIMIT,
    Head,
    ProtocolError,
    Request,
    error_reply,
    header_block,
    older,
    pong,
    read_request,
    reply,
    scored,
    spam_field,
    user_of,
)
from filterd.store.feedback import FeedbackError
from filterd.verdict import Verdict, log_fields

log = logging.getLogger("filterd.spamd")

_LINGER = 2.0  # seconds to wait for a client's last bytes after the reply, before closing
_SYMBOL = re.compile(r"[^A-Z0-9]+")


class SpamdOptions(Options, Listening):
    """Where it listens (filterd.listen.Listening: host, port, socket, allowed_clients)
    and its limits."""

    port: int = Field(DEFAULT_PORT, ge=0, le=65535)  # spamd's; 0: any free port (tests)
    max_message_bytes: int = Field(52_428_800, ge=1024)  # larger: EX_DATAERR
    # The whole request must arrive within this (and the reply be taken); then EX_TEMPFAIL.
    timeout_seconds: float = Field(30.0, gt=0)
    max_connections: int = Field(100, ge=1)  # more: EX_TEMPFAIL at once
    # TELL (spamc -L spam|ham|forget) writes the feedback store; off, as spamd without
    # --allow-tell: every client that can connect could teach the model.
    allow_tell: bool = False


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"


def _places(value: str | None) -> set[str]:
    """`local, remote` -> {"local", "remote"}."""
    return {word.strip().lower() for word in (value or "").split(",") if word.strip()}


def symbols(verdict: Verdict | None) -> str:
    """SYMBOLS' rule names: the label, what decided, the model, the probability in percent
    and the action the thresholds call for, e.g. FILTERD_SPAM,FILTERD_BY_MODEL,
    FILTERD_MODEL_GPT2_TINY,FILTERD_PROB_88,FILTERD_QUARANTINE."""
    if verdict is None:
        return "FILTERD_UNSCORED"

    def name(text: str) -> str:
        return _SYMBOL.sub("_", text.upper()).strip("_")

    found = [f"FILTERD_{verdict.label.upper()}", f"FILTERD_BY_{name(verdict.decided_by)}"]
    found.append(f"FILTERD_MODEL_{name(verdict.model)}")
    if verdict.probability is not None:
        found.append(f"FILTERD_PROB_{int(verdict.probability * 100)}")
    if verdict.action != "tag":
        found.append(f"FILTERD_{verdict.action.upper()}")
    return ",".join(found)


class SpamdSource(Source):
    """The listening side: the server socket, a task per connection, a drain on stop."""

    Options = SpamdOptions
    options: SpamdOptions

    def __init__(self, options: SpamdOptions, config: Config):
        super().__init__(options, config)
        self._server: asyncio.Server | None = None
        self._handle: Handler | None = None
        self._context: Context | None = None
        self._tasks: set[asyncio.Task] = set()
        self._socket: tuple[Path, int] | None = None  # our Unix socket and its inode
        # `required` of a reply with no verdict (unscored): the last verdict's threshold.
        threshold = config.scoring.threshold
        self._required = 10 * (0.5 if threshold is None else threshold)
        self.port = 0  # once started: the TCP port (the system's choice for port 0)

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self, handle: Handler, context: Context) -> None:
        self._handle, self._context = handle, context
        where, settings = self.where or "spamd", self.options
        try:
            self._server = await serve(settings, self._client, "spamd", limit=HEADER_LIMIT)
        except OSError as e:
            raise ConfigError(self._cannot_listen(where, e)) from e
        self.port = bound_port(self._server)
        if settings.socket is not None:
            path = settings.socket.expanduser()
            self._socket = socket_identity(path)
        shown = settings.where() if settings.socket else f"{settings.host}:{self.port}"
        log.info("source=spamd listening on %s (%s)", shown, where)

    def _cannot_listen(self, where: str, e: OSError) -> str:
        settings = self.options
        if settings.socket is not None:
            return f"{where}.socket: cannot listen on {settings.socket}: {e.strerror or e}"
        place = f"{settings.host}:{settings.port}"
        if e.errno in (errno.EACCES, errno.EPERM):
            return (
                f"{where}.port: cannot listen on {place}: {e.strerror or e}: a port below 1024 "
                "needs root or CAP_NET_BIND_SERVICE; set port to one above 1023 (and tell "
                f"the clients: spamc -p PORT) or listen on a Unix socket ({where}.socket)"
            )
        return f"{where}.host, {where}.port: cannot listen on {place}: {e.strerror or e}"

    async def stop_accepting(self) -> None:
        """Close the listener (and remove our Unix socket); requests in hand carry on."""
        if self._server is not None:
            self._server.close()
        if self._socket is not None:
            remove_socket(self._socket)

    async def drain(self, timeout: float) -> None:
        """Wait (at most `timeout`) for every connection to get its answer; then close the
        rest, saying how many."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            if pending:
                log.warning("source=spamd stopping with %d requests unanswered", len(pending))
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    # --- one connection ------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        began = time.monotonic()
        if len(self._tasks) >= self.options.max_connections:
            why = f"too many connections (max_connections {self.options.max_connections})"
            self._log(_peer(writer), None, None, None, EX_TEMPFAIL, began, why)
            await self._send(reader, writer, error_reply(EX_TEMPFAIL, why))
            return
        self._tasks.add(task)
        try:
            await self._one(reader, writer, began)
        finally:
            self._tasks.discard(task)
            if not writer.is_closing():  # cancelled by a drain that ran out of time
                writer.transport.abort()

    async def _one(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, began: float
    ) -> None:
        peer, settings, head = _peer(writer), self.options, Head()
        try:
            async with asyncio.timeout(settings.timeout_seconds):
                request = await read_request(reader, settings.max_message_bytes, head)
        except ProtocolError as e:
            self._log(peer, head, None, None, e.code, began, str(e))
            await self._send(reader, writer, error_reply(e.code, str(e)))
            return
        except TimeoutError:
            why = f"no whole request within timeout_seconds ({settings.timeout_seconds:g} s)"
            if "content-length" in head.fields:
                why += f"; it declared Content-length {head.fields['content-length'][:20]}"
            self._log(peer, head, None, None, EX_TEMPFAIL, began, why)
            await self._send(reader, writer, error_reply(EX_TEMPFAIL, why))
            return
        except OSError as e:  # the client reset the connection
            self._log(peer, head, None, None, EX_IOERR, began, f"reading: {e.strerror or e}")
            writer.transport.abort()
            return
        if request.command == "SKIP":
            self._log(peer, request, None, None, EX_OK, began, "skipped")
            await self._send(reader, writer, b"")
            return
        if request.command == "PING":
            await self._send(reader, writer, pong())
            return
        if request.command == "TELL":
            answer, code, note = await self._tell(request)
            self._log(peer, request, None, None, code, began, note)
            await self._send(reader, writer, answer)
            return
        assert self._handle is not None and self._context is not None
        mail = Mail(request.body, origin=peer)
        try:
            outcome = await self._handle(mail, tag_only=True)
        except Exception as e:  # outside the Handler contract: the failure policy still
            outcome = self._context.failure(mail, f"{type(e).__name__}: {e}")
        answer, code = self._scored(request, outcome)
        self._log(peer, request, outcome.verdict, outcome, code, began, outcome.note)
        await self._send(reader, writer, answer)

    async def _send(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
    ) -> None:
        """Write the reply, then linger for the client's end before closing."""
        try:
            async with asyncio.timeout(self.options.timeout_seconds):
                writer.write(data)
                await writer.drain()
            await linger(reader, writer, _LINGER)
        except (TimeoutError, OSError):
            pass  # a client that takes neither the reply nor its end: closed below
        finally:
            writer.close()

    # --- answers -------------------------------------------------------------------------

    def _scored(self, request: Request, outcome: Outcome) -> tuple[bytes, int]:
        """The reply to a scoring command, with its code."""
        if outcome.disposition == "tempfail":
            return error_reply(EX_TEMPFAIL, f"not scored: {outcome.note}"), EX_TEMPFAIL
        if outcome.data is None:  # an action that does not tag: tag_only forbids it
            why = f"the tag action gave {outcome.disposition} without a message"
            return error_reply(EX_SOFTWARE, why), EX_SOFTWARE
        verdict = outcome.verdict
        if verdict is not None:
            self._required = verdict.threshold * 10
        spam = verdict is not None and verdict.is_spam
        field = spam_field(spam, verdict.points if verdict else 0.0, self._required)
        command, version = request.command, request.version
        if command in ("PROCESS", "HEADERS"):
            tagged = outcome.data if command == "PROCESS" else header_block(outcome.data)
            return scored(version, field, tagged, message=True), EX_OK
        if command == "CHECK":
            body = None
        elif command == "SYMBOLS":  # before 1.3 the list ended with a line end
            body = symbols(verdict).encode() + (b"\r\n" if older(version, "1.3") else b"")
        elif command == "REPORT_IFSPAM" and not spam:
            body = b""
        else:
            body = self.report(verdict, outcome.note, request.user).encode("utf-8", "replace")
        return scored(version, field, body, message=False), EX_OK

    def report(self, verdict: Verdict | None, note: str, user: str) -> str:
        """REPORT's text: what decided, with what probability, and what the configured
        thresholds call for (spamd only tags: the caller acts)."""
        scoring = self.config.scoring
        for_user = f"{user} (one model for all users)" if user else "-"
        if verdict is None:
            return (
                "filterd did not score this message (failure_policy fail_open: passed as ham)\n"
                f"  reason:       {note or '-'}\n"
                f"  user:         {for_user}\n"
            )
        p = "-" if verdict.probability is None else f"{verdict.probability:.4f}"

        def at(value: float | None) -> str:
            return "not set" if value is None else f"{value:.4f}"

        return (
            f"filterd scored this message {verdict.label}: {verdict.points:.1f} points, "
            f"{verdict.threshold * 10:.1f} required\n"
            f"  probability:  {p} (spam from {verdict.threshold:.4f})\n"
            f"  decided_by:   {verdict.decided_by}\n"
            f"  reason:       {verdict.reason or '-'}\n"
            f"  model:        {verdict.model}\n"
            f"  action:       {verdict.action} (quarantine_threshold "
            f"{at(scoring.quarantine_threshold)}, reject_threshold "
            f"{at(scoring.reject_threshold)}; spamd only tags: the caller acts)\n"
            f"  user:         {for_user}\n"
        )

    async def _tell(self, request: Request) -> tuple[bytes, int, str]:
        """TELL: Set: local records the Message-class, Remove: local forgets; the reply's
        DidSet/DidRemove say what changed (spamc -L says "already learned" otherwise).
        `remote` (reporting to shared databases) is not done and not claimed."""
        if not self.options.allow_tell:
            why = f"TELL is off here ({self.where or 'spamd'}.allow_tell: false)"
            return error_reply(EX_UNAVAILABLE, why), EX_UNAVAILABLE, why
        sets, removes = _places(request.fields.get("set")), _places(request.fields.get("remove"))
        label = request.fields.get("message-class", "").strip().lower()
        problem = ""
        if "local" in sets and "local" in removes:
            problem = "Set: local and Remove: local together"
        elif "local" in sets and label not in ("spam", "ham"):
            problem = f"Set: local needs Message-class spam or ham, not {label[:20]!r}"
        elif "local" not in sets | removes:
            problem = "nothing to do: only Set: local and Remove: local are supported"
        if problem:
            return error_reply(EX_USAGE, problem), EX_USAGE, problem
        source = f"spamd user={request.user}" if request.user else "spamd"
        try:
            if "local" in sets:
                outcome = await asyncio.to_thread(
                    learn, request.body, label, source=source, config=self.config
                )
                done = [("DidSet", "local")] if outcome in ("added", "replaced") else []
                return reply(done), EX_OK, f"learn {label}: {outcome}"
            try:
                await asyncio.to_thread(forget, request.body, self.config)
            except FeedbackError as e:  # nothing to forget: spamc says "already unlearned"
                return reply([]), EX_OK, f"forget: {e}"
            return reply([("DidRemove", "local")]), EX_OK, "forget: forgotten"
        except FeedbackError as e:
            return error_reply(EX_DATAERR, str(e)), EX_DATAERR, str(e)
        except OSError as e:  # the store: a full disk, permissions
            why = f"cannot write the feedback store: {e.strerror or e}"
            return error_reply(EX_IOERR, why), EX_IOERR, why

    def _log(
        self,
        peer: str,
        request: Request | Head | None,
        verdict: Verdict | None,
        outcome: Outcome | None,
        code: int,
        began: float,
        note: str,
    ) -> None:
        """The line per request: what was asked, for whom, label ham/spam ("-" unscored),
        the model's score ("-" when a check or a marker decided: decided_by says which),
        the action the thresholds call for (not taken), the reply code."""
        body = request.body if isinstance(request, Request) else None
        mail = None if body is None else Mail(body)
        fields = {} if request is None else request.fields
        command = (request.command if request else "") or "-"
        if command == "TELL":
            label = "".join(c for c in fields.get("message-class", "") if c.isalnum())[:20]
            judged = f"label={label or '-'} score=- action=-"
        else:
            judged = log_fields(verdict, "unscored" if outcome else "-")
        log.log(
            logging.INFO if code == EX_OK else logging.WARNING,
            "source=spamd command=%s user=%s peer=%s message_id=%s bytes=%s %s reply=%d "
            "latency_ms=%.0f note=%s",
            command,
            user_of(fields) or "-",
            peer,
            (mail.header("Message-ID") if mail else None) or "-",
            "-" if body is None else len(body),
            judged,
            code,
            (time.monotonic() - began) * 1000,
            " ".join(note.split()) or "-",
        )

"""Prometheus metrics and a health check for `filterd serve` (README "Metrics").

What is counted comes from three places, none of which knows this module: the daemon gives
each source the engine's handler wrapped by `Metrics.wrap` (timed, its Outcome counted
under the source's name), so every source, built-in or a third party's, is counted without
a line of its own; the daemon's Reloader reports each reload; and the engine's queue depth
is read when scraped. Everything lives in a registry of this object's own, not
prometheus-client's global one, so several engines (tests) never share counters.

Served by a small HTTP/1.0 handler on the daemon's own event loop, over
filterd.listen.serve: GET only, a request head of at most 8 KiB read within 5 s, one
answer, then the connection closes. prometheus-client's servers do not fit:
start_http_server answers from a thread of its own (the queue depth belongs to the
event loop), knows nothing of allowed_clients and offers no /healthz tied to the daemon's
state; its ASGI app needs an ASGI server besides. This way the endpoint is checked like
every source (loopback unless allow_remote, allowed_clients at connect) and stopping is
closing one more asyncio server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder

from filterd import listen
from filterd.config import Metrics as MetricsConfig
from filterd.engine import ScoringTimeout
from filterd.mail import Mail
from filterd.model.history import file_sha256
from filterd.plugin_api import Handler, Outcome

log = logging.getLogger("filterd")

OUTCOMES = ("deliver", "quarantine", "reject", "tempfail", "unscored")
DECIDED_BY = ("model", "marker", "check", "no_text")
FAILURES = ("timeout", "error")
PROBABILITY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TIMEOUT_NOTE = f"{ScoringTimeout.__name__}:"  # how engine.handle notes a timeout


class Metrics:
    """filterd's metrics in a registry of their own. `queue_depth` is called at each
    scrape, on the event loop: the engine's count of messages waiting for a verdict."""

    def __init__(self, queue_depth: Callable[[], int] = lambda: 0):
        self.registry = registry = CollectorRegistry()
        self.messages = Counter(
            "filterd_messages",
            "Messages handled, by source and outcome (the disposition; unscored: scoring "
            "failed and the failure policy decided; error: the handler raised)",
            ["source", "outcome"],
            registry=registry,
        )
        self.verdicts = Counter(
            "filterd_verdicts",
            "Verdicts, by label and what decided (model, marker, check, no_text)",
            ["label", "decided_by"],
            registry=registry,
        )
        self.probability = Histogram(
            "filterd_spam_probability",
            "The model's spam probability of each message it scored",
            buckets=PROBABILITY_BUCKETS,
            registry=registry,
        )
        self.latency = Histogram(
            "filterd_message_duration_seconds",
            "Seconds from a source handing a message over to its outcome (queue, model, action)",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        Gauge(
            "filterd_queue_depth",
            "Messages waiting for their verdict: queued or being scored",
            registry=registry,
        ).set_function(queue_depth)
        self.failures = Counter(
            "filterd_scoring_failures",
            "Messages whose scoring (or action) failed, by reason: timeout or error",
            ["reason"],
            registry=registry,
        )
        self.reloads = Counter(
            "filterd_model_reloads",
            "Model reloads (SIGHUP, a new checkpoint file, a retrain), by result: ok or failed",
            ["result"],
            registry=registry,
        )
        self.checkpoint = Info(
            "filterd_checkpoint",
            "The checkpoint in use: its architecture name and the sha256 of its file",
            registry=registry,
        )
        self.loaded_at = Gauge(
            "filterd_checkpoint_loaded_timestamp_seconds",
            "When the checkpoint in use was loaded, in seconds since the epoch",
            registry=registry,
        )
        # Cheap: read from /proc and the interpreter at scrape time only.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        # Series that exist from the start, so rate() and alerts see a 0, not nothing.
        for reason in FAILURES:
            self.failures.labels(reason)
        for result in ("ok", "failed"):
            self.reloads.labels(result)
        for label in ("ham", "spam"):
            for decided_by in DECIDED_BY:
                self.verdicts.labels(label, decided_by)
        self._hashes = 0  # checkpoint_loaded calls begun, so a slow hash never wins late
        self._shown = 0

    # --- counting ------------------------------------------------------------------------

    def wrap(self, handle: Handler, source: str) -> Handler:
        """`handle` timed and its outcomes counted under `source`: what the daemon gives
        that source instead of the engine's handler."""
        for outcome in OUTCOMES:
            self.messages.labels(source, outcome)
        self.latency.labels(source)

        async def counted(
            mail: Mail, *, can_reject: bool = False, tag_only: bool = False
        ) -> Outcome:
            start = time.perf_counter()
            try:
                outcome = await handle(mail, can_reject=can_reject, tag_only=tag_only)
            except Exception:  # not the Handler contract, yet the source has to know
                self.messages.labels(source, "error").inc()
                raise
            self.count(source, outcome, time.perf_counter() - start)
            return outcome

        return counted

    def count(self, source: str, outcome: Outcome, seconds: float) -> None:
        """One message's outcome, which took `seconds`."""
        self.latency.labels(source).observe(seconds)
        verdict = outcome.verdict
        if verdict is None:  # the failure policy's outcome
            self.messages.labels(source, "unscored").inc()
            reason = "timeout" if outcome.note.startswith(_TIMEOUT_NOTE) else "error"
            self.failures.labels(reason).inc()
            return
        self.messages.labels(source, outcome.disposition).inc()
        # "check:NAME" counts as check: one series per check plugin is not worth its cost.
        self.verdicts.labels(verdict.label, verdict.decided_by.partition(":")[0]).inc()
        if verdict.probability is not None:
            self.probability.observe(verdict.probability)

    async def reloaded(self, ok: bool, name: str, path: Path) -> None:
        """A reload's result; after a good one, checkpoint `name` from `path` is in use."""
        self.reloads.labels("ok" if ok else "failed").inc()
        if ok:
            await self.checkpoint_loaded(name, path)

    async def checkpoint_loaded(self, name: str, path: Path) -> None:
        """Checkpoint `name` from `path` is in use from now. Its file is hashed in a thread
        (a second for a large model); a file that cannot be read shows as "unknown"."""
        self._hashes += 1
        ticket = self._hashes
        loaded_at = time.time()
        try:
            digest = await asyncio.to_thread(file_sha256, path)
        except OSError as e:
            log.warning("metrics: cannot hash the checkpoint %s: %s", path, e)
            digest = "unknown"
        if ticket < self._shown:  # a later load finished hashing first
            return
        self._shown = ticket
        self.checkpoint.info({"name": name, "sha256": digest})
        self.loaded_at.set(loaded_at)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The metrics in the format `accept` asks for (OpenMetrics or Prometheus text),
        and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


# --- HTTP --------------------------------------------------------------------------------

HEAD_LIMIT = 8192  # bytes of request line and headers
HEAD_SECONDS = 5.0  # to send them
SEND_SECONDS = 5.0  # to take the answer
MAX_CLIENTS = 16  # at once; more get 503
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}

State = Literal["starting", "serving", "stopping"]


class Answer:
    """One HTTP response."""

    def __init__(
        self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8"
    ) -> None:
        self.status, self.body, self.content_type = status, body, content_type

    def encode(self) -> bytes:
        head = (
            f"HTTP/1.0 {self.status} {REASONS[self.status]}\r\n"
            f"Content-Type: {self.content_type}\r\n"
            f"Content-Length: {len(self.body)}\r\n"
            + ("Allow: GET\r\n" if self.status == 405 else "")
            + "Connection: close\r\n\r\n"
        )
        return head.encode("latin-1") + self.body


class Endpoint:
    """GET /metrics and /healthz where `settings` say. /healthz answers 200 `ok MODEL`
    while `state` is "serving" (the daemon sets it once the sources run), else 503 with
    the state, so a load balancer or a probe sees startup and shutdown."""

    def __init__(self, metrics: Metrics, settings: MetricsConfig, model: Callable[[], str]):
        self.metrics = metrics
        self.listening = settings
        self.model = model
        self.state: State = "starting"
        self._server: asyncio.Server | None = None
        self._clients = 0

    async def start(self) -> str:
        """Listen; returns host:port (the port chosen, for port 0)."""
        self._server = await listen.serve(self.listening, self._client, "metrics", HEAD_LIMIT)
        host = self.listening.host
        return f"{f'[{host}]' if ':' in host else host}:{listen.bound_port(self._server)}"

    async def close(self) -> None:
        """Stop listening; connections still open end within their timeouts."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), SEND_SECONDS)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._clients >= MAX_CLIENTS:
                answer: Answer | None = Answer(503, b"busy\n")
            else:
                self._clients += 1
                try:
                    answer = await self._answer(reader)
                finally:
                    self._clients -= 1
            if answer is not None:
                writer.write(answer.encode())
                await asyncio.wait_for(writer.drain(), SEND_SECONDS)
                if answer.status >= 400:
                    await listen.linger(reader, writer, 1.0)
        except (ConnectionError, TimeoutError) as e:
            log.debug("metrics: client %s: %r", writer.get_extra_info("peername"), e)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), SEND_SECONDS)

    async def _answer(self, reader: asyncio.StreamReader) -> Answer | None:
        """The answer to one request; None when the client left before asking."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_SECONDS)
        except asyncio.LimitOverrunError:
            return Answer(431, b"request head over 8 KiB\n")
        except asyncio.IncompleteReadError:
            return None
        except TimeoutError:
            return Answer(408, b"no complete request within 5 s\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return Answer(400, b"not an HTTP request\n")
        method, target, _ = parts
        if method != "GET":
            return Answer(405, b"GET only\n")
        path = target.partition("?")[0]
        if path == "/metrics":
            accept = None
            for line in header_lines:
                name, _, value = line.partition(":")
                if name.strip().lower() == "accept":
                    accept = value.strip()
            return Answer(200, *self.metrics.exposition(accept))
        if path == "/healthz":
            if self.state == "serving":
                return Answer(200, f"ok {self.model()}\n".encode())
            return Answer(503, f"{self.state}\n".encode())
        return Answer(404, b"not found: /metrics or /healthz\n")

"""`filterd serve`: one asyncio process running the configured sources (`sources:` in the
config: the SMTP proxy, the Maildir watcher, any installed source plugin) around one loaded
model. Sources are found through the plugin registry and all get the engine's handler.

SIGHUP, or a new checkpoint file at the configured path, loads the model in a thread while
mail keeps flowing, then swaps it in between batches; a checkpoint that fails to load (or
breaks the thresholds) keeps the old model and the log says why. SIGTERM or SIGINT stops
the sources: all stop accepting, then messages in progress get their answer (at most
daemon.stop_timeout_seconds), and the process exits 0. Sources log one line per message;
the daemon logs starts, reloads and stops. With `learning.retrain` set it also retrains
from the feedback store now and then, in a child process (filterd.retrainer). With
`metrics.enabled` it serves Prometheus metrics and /healthz (filterd.metrics), counting
each source's messages through a wrapper around the handler it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from filterd import learn_socket, plugin_api
from filterd.config import Config, ConfigError
from filterd.engine import Engine
from filterd.metrics import Endpoint, Metrics
from filterd.model.checkpoint import checkpoint_path
from filterd.plugin_api import Source
from filterd.retrainer import Retrainer

log = logging.getLogger("filterd")


class Reloader:
    """Loads the checkpoint again on request, or when its file changes (a new inode, size or
    mtime: an atomic replace or a copy). One load at a time, off the event loop. `report`
    hears each result (True: the new model is in use), before the next load begins."""

    def __init__(
        self,
        engine: Engine,
        path: Path,
        report: Callable[[bool], Awaitable[None]] | None = None,
    ):
        self.engine = engine
        self.path = checkpoint_path(path)
        self.report = report
        self._lock = asyncio.Lock()
        self._seen = self._stamp()

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    async def reload(self, why: str, changed_only: bool = False) -> bool:
        """Load the checkpoint file anew; with `changed_only`, not if the file in use is
        already this one (the file watch may have loaded it first)."""
        async with self._lock:
            if changed_only and self._stamp() == self._seen:
                return True
            self._seen = self._stamp()  # taken first: a change during the load loads again
            current = self.engine.classifier
            try:
                new = await asyncio.to_thread(current.reload, self.path)
                try:
                    self.engine.swap(new)
                except Exception:
                    new.close()  # refused (it breaks the thresholds): no child may linger
                    raise
            except Exception as e:
                log.error("reload (%s) failed, keeping the old model: %s", why, e)
                ok = False
            else:
                log.info("reload (%s): %s from %s in use", why, new.name, self.path)
                ok = True
            if self.report is not None:
                await self.report(ok)
            return ok

    async def watch(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            if self._stamp() not in (self._seen, None):  # gone: mid-replace, look again later
                await self.reload("checkpoint file changed")


def load_sources(config: Config, serving: bool = False) -> list[Source]:
    """The configured sources, built and checked as far as can be without starting them
    (errors name their config key). `serving`: for `filterd serve`, which needs at least
    one, and none that ends by itself."""
    if serving and not config.sources:
        raise ConfigError("sources: none configured: add smtp, maildir or another source")
    for section, keys in config.disabled_sections().items():
        known = plugin_api.options_of("sources", section)
        for key in sorted(keys - known):
            raise ConfigError(f"{section}.{key}: Extra inputs are not permitted")
    sources = []
    for where, choice, options_key in config.source_choices():
        source = plugin_api.load("sources", choice, where, config, options_key)
        if serving and source.one_shot:
            raise ConfigError(
                f"{where}.name: {choice.name} reads one message and ends (filterd score "
                "--tag): it cannot run under filterd serve"
            )
        source.preflight()
        sources.append(source)
    return sources


async def _start_sources(
    engine: Engine, sources: list[Source], timeout: float, metrics: Metrics | None = None
) -> list[Source]:
    """Start each source; if one fails, stop those already started. With metrics, each
    gets the engine's handler counted under its name."""
    started: list[Source] = []
    try:
        for source in sources:
            handle = engine.handle if metrics is None else metrics.wrap(engine.handle, source.name)
            try:
                await source.start(handle, engine.context)
            except OSError as e:  # a folder it may not read, no inotify watches left, ...
                raise ConfigError(f"{source.where}: {source.name} cannot start: {e}") from e
            started.append(source)
    except BaseException:
        await _stop_all(started, timeout)
        raise
    return started


async def _stop_all(sources: list[Source], timeout: float) -> None:
    """All stop accepting first, so none takes mail while another drains; one that fails
    to stop still lets the others drain."""
    for step in (lambda s: s.stop_accepting(), lambda s: s.drain(timeout)):
        results = await asyncio.gather(*(step(s) for s in sources), return_exceptions=True)
        for source, result in zip(sources, results, strict=True):
            if isinstance(result, Exception):
                log.error("source=%s failed to stop cleanly: %s", source.name, result)


def run(
    engine: Engine,
    config: Config,
    checkpoint: Path,
    sources: list[Source],
    config_path: Path | None = None,
) -> int:
    """serve() on uvloop where it is installed (a dependency except on Windows): its event
    loop costs the daemon about 15% less CPU per message than asyncio's own."""
    try:
        from uvloop import new_event_loop
    except ImportError:
        new_event_loop = None
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(serve(engine, config, checkpoint, sources, config_path))


async def serve(
    engine: Engine,
    config: Config,
    checkpoint: Path,
    sources: list[Source],
    config_path: Path | None = None,
) -> int:
    """Run until SIGTERM or SIGINT; 0 once every source stopped cleanly. `config_path` is
    what a retrain child reads (learning.retrain). The metrics endpoint listens before the
    sources start (a port in use fails the start before any mail is taken; /healthz says
    503 until they run) and closes after they drained (the drain can be watched)."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    metrics = Metrics(lambda: engine.queue_depth) if config.metrics.enabled else None

    async def reported(ok: bool) -> None:
        if metrics is not None:
            await metrics.reloaded(ok, engine.classifier.name, reloader.path)

    reloader = Reloader(engine, checkpoint, reported if metrics is not None else None)
    tasks: set[asyncio.Task] = set()
    learn_server: asyncio.AbstractServer | None = None
    endpoint: Endpoint | None = None
    serving_metrics = ""

    def spawn(coroutine: Awaitable[object]) -> None:
        task = asyncio.ensure_future(coroutine)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: spawn(reloader.reload("SIGHUP")))
    try:
        timeout = config.daemon.stop_timeout_seconds
        if metrics is not None:
            await metrics.checkpoint_loaded(engine.classifier.name, reloader.path)
            endpoint = Endpoint(metrics, config.metrics, lambda: engine.classifier.name)
            try:
                serving_metrics = f", metrics on {await endpoint.start()}"
            except OSError as e:
                where = f"{config.metrics.host}:{config.metrics.port}"
                raise ConfigError(f"metrics: cannot listen on {where}: {e}") from e
        sources = await _start_sources(engine, sources, timeout, metrics)
        if config.daemon.reload_check_seconds:
            spawn(reloader.watch(config.daemon.reload_check_seconds))
        if config.learning.socket:
            learn_server = await learn_socket.start(config)
        retrainer = Retrainer(config, checkpoint, config_path, reloader.reload)
        if retrainer.enabled:
            spawn(retrainer.watch())
        if endpoint is not None:
            endpoint.state = "serving"
        log.info(
            "ready: %s, pid %d, %s event loop%s",
            engine.classifier.name,
            os.getpid(),
            type(loop).__module__.partition(".")[0],
            serving_metrics,
        )
        await stopping.wait()
        if endpoint is not None:
            endpoint.state = "stopping"
        log.info("stopping: finishing messages in progress")
        await _stop_all(sources, timeout)
    finally:
        if endpoint is not None:
            await endpoint.close()
        if learn_server is not None:
            learn_server.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        for task in list(tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        engine.close()
    log.info("stopped")
    return 0

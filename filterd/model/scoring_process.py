"""The model in a child process, so the daemon's event loop keeps a core and a GIL of its own.

Per message, text extraction, tokenizing and the model cost more Python time than the SMTP
dialogue around them; in the daemon's own process they would hold the GIL while clients
wait. `ProcessClassifier` has the Classifier interface the engine uses, but a spawned child
(nothing inherited) loads the checkpoint and scores each batch. The parent keeps only the
checkpoint's metadata. If the child dies, that batch fails (the failure policy decides
what happens to its messages) and the next batch starts a new child.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from filterd.config import Precision
from filterd.model.checkpoint import CheckpointMeta
from filterd.model.classifier import Classifier, Progress, Scorer, load_classifier
from filterd.text import TextLimits, head_and_tail

_child: Classifier | None = None  # in the child process: its one model
RESTART_PAUSE = 10.0
log = logging.getLogger("filterd")


def _child_setup() -> None:
    # systemd signals every process of the unit's cgroup, a terminal its whole group: the
    # daemon drains its messages on SIGTERM (and reloads on SIGHUP), and the child has to
    # keep scoring until the daemon tells it to stop.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    # The parent may die without a word (SIGKILL, OOM killer): no orphan outlives it.
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True).start()


def _exit_with(parent_sentinel: int) -> None:
    try:
        multiprocessing.connection.wait([parent_sentinel])
    except OSError:  # EBADF: this child is exiting and closed its fds; nobody to outlive
        return
    os._exit(1)


def _load(
    path: str, device: str, limits: TextLimits, precision: Precision
) -> tuple[CheckpointMeta, int]:
    global _child
    _child = load_classifier(path, device, limits, precision)
    return _child.meta, os.getpid()


def _score(raws: Sequence[bytes]) -> list[float | None]:
    assert _child is not None, "the scoring process has no model loaded"
    return _child.score_messages(raws)


class ScoringProcessError(RuntimeError):
    """The child process died, or no new one may be started yet."""


class ProcessClassifier(Scorer):
    """A checkpoint loaded and scored in a child process; blocks the calling thread only."""

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "cpu",
        limits: TextLimits = TextLimits(),
        precision: Precision = "float32",
    ):
        self.path = os.fspath(path)
        self.device = device
        self.limits = limits
        self.precision = precision
        self._pool: ProcessPoolExecutor | None
        self._pool, self.meta, self.pid = self._start()
        self._restart_after = 0.0  # monotonic time before which no restart is tried
        self._lock = threading.Lock()  # the engine's two batch threads share the child

    def _start(self) -> tuple[ProcessPoolExecutor, CheckpointMeta, int]:
        # The child inherits this environment. Its OpenMP threads spin between the model's
        # small ops by default, burning a core the daemon and the MTA need (30% of the
        # child's CPU time per message with gpt2-tiny, measured); passive ones sleep.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        pool = ProcessPoolExecutor(
            1, multiprocessing.get_context("spawn"), initializer=_child_setup
        )
        try:
            args = (self.path, self.device, self.limits, self.precision)
            return pool, *pool.submit(_load, *args).result()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise

    def score_messages(
        self, raws: Sequence[bytes], progress: Progress | None = None
    ) -> list[float | None]:
        with self._lock:
            pool = self._pool or self._restart()
        # Only what message_text reads crosses to the child: a 50 MB message costs 2 MB.
        clipped = [head_and_tail(raw, self.limits.max_bytes) for raw in raws]
        try:
            scores = pool.submit(_score, clipped).result()
        except BrokenProcessPool as e:
            with self._lock:
                if self._pool is pool:  # the batch beside this one may have seen it first
                    self._pool = None
                    log.error("scoring process %d died: %s", self.pid, e)
            raise ScoringProcessError(f"the scoring process died: {e}") from e
        if progress:
            progress(len(raws))
        return scores

    def _restart(self) -> ProcessPoolExecutor:
        """A new child with the same checkpoint. A failed start is not tried again for
        RESTART_PAUSE seconds: until then batches fail at once, not after a model load."""
        if time.monotonic() < self._restart_after:
            raise ScoringProcessError("no scoring process (the last start failed)")
        self._restart_after = time.monotonic() + RESTART_PAUSE
        pool, meta, pid = self._start()
        if meta != self.meta:
            pool.shutdown(wait=False)
            raise ScoringProcessError(
                f"{self.path} changed since it was loaded; a reload has to load it"
            )
        log.warning("scoring process %d started in place of %d", pid, self.pid)
        self._pool, self.pid, self._restart_after = pool, pid, 0.0
        return pool

    def reload(self, path: str | os.PathLike) -> ProcessClassifier:
        """Another checkpoint in a new child, loaded the way this one was."""
        return ProcessClassifier(path, self.device, self.limits, self.precision)

    def close(self, wait: float = 0.0) -> None:
        """Stop the child once the batch it is scoring (if any) is done; returns at once,
        or with `wait`, once the pool's own thread has finished (at most `wait` seconds).
        The daemon's last close waits: exiting while that thread still tears the pool
        down races CPython 3.11's exit hook, which then writes to the pool's just-closed
        wakeup pipe (a stray "Bad file descriptor" traceback after "stopped")."""
        if self._pool is None:
            return
        if not wait:
            self._pool.shutdown(wait=False)
            return
        done = threading.Thread(target=self._pool.shutdown, daemon=True)  # joins that thread
        done.start()
        done.join(wait)

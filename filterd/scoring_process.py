"""The model in a child process, so the daemon's event loop keeps a core and a GIL of its own.

Per message, text extraction, tokenizing and the model cost more Python time than the SMTP
dialogue around them; in the daemon's own process they would hold the GIL while clients
wait. `ProcessClassifier` has the Classifier interface the engine uses, but a spawned child
(nothing inherited) loads the checkpoint and scores each batch. The parent keeps only the
checkpoint's metadata. If the child dies, that batch fails (the failure policy decides
what happens to its messages) and the next batch starts a new child.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from filterd.checkpoint import CheckpointMeta
from filterd.classifier import Classifier, load_classifier
from filterd.message import TextLimits

_child: Classifier | None = None  # in the child process: its one model


def _child_setup() -> None:
    # systemd (and a terminal's Ctrl-C) signal the whole group: the daemon drains its
    # messages on SIGTERM, and the child has to keep scoring them until it is told to stop.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The parent may die without a word (SIGKILL, OOM killer): no orphan outlives it.
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True).start()


def _exit_with(parent_sentinel: int) -> None:
    multiprocessing.connection.wait([parent_sentinel])
    os._exit(1)


def _load(path: str, device: str, limits: TextLimits, precision: str) -> tuple[CheckpointMeta, int]:
    global _child
    _child = load_classifier(path, device, limits, precision)
    return _child.meta, os.getpid()


def _score(raws: Sequence[bytes]) -> list[float]:
    assert _child is not None, "the scoring process has no model loaded"
    return _child.score_messages(raws)


class ScoringProcessError(RuntimeError):
    """The child process died or could not start again."""


class ProcessClassifier:
    """A checkpoint loaded and scored in a child process; blocks the calling thread only."""

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "cpu",
        limits: TextLimits = TextLimits(),
        precision: str = "float32",
    ):
        self.path = os.fspath(path)
        self.device = device
        self.limits = limits
        self.precision = precision
        self._pool, self.meta, self.pid = self._start()

    def _start(self) -> tuple[ProcessPoolExecutor, CheckpointMeta, int]:
        pool = ProcessPoolExecutor(
            1, multiprocessing.get_context("spawn"), initializer=_child_setup
        )
        try:
            args = (self.path, self.device, self.limits, self.precision)
            return pool, *pool.submit(_load, *args).result()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise

    @property
    def threshold(self) -> float:
        return float(self.meta.threshold)

    @property
    def name(self) -> str:
        return self.meta.arch

    def score_messages(self, raws: Sequence[bytes]) -> list[float]:
        if self._pool is None:  # the last child died: a new one, with the same checkpoint
            pool, meta, pid = self._start()
            if meta != self.meta:
                pool.shutdown(wait=False)
                raise ScoringProcessError(
                    f"{self.path} changed since it was loaded; waiting for the reload"
                )
            self._pool, self.pid = pool, pid
        try:
            return self._pool.submit(_score, list(raws)).result()
        except BrokenProcessPool as e:
            self._pool = None
            raise ScoringProcessError(f"the scoring process died: {e}") from e

    def reload(self, path: str | os.PathLike) -> ProcessClassifier:
        """Another checkpoint in a new child, loaded the way this one was."""
        return ProcessClassifier(path, self.device, self.limits, self.precision)

    def score_message(self, raw: bytes) -> float:
        return self.score_messages([raw])[0]

    def close(self) -> None:
        """Stop the child once the batch it is scoring (if any) is done; returns at once."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)

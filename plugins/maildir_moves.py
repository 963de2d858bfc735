"""Corrections from mail clients (`learning.maildir_moves`): a person who moves a message
into the Junk folder, or back out of it, is telling filterd it was wrong.

Watched: cur/ and new/ of each watched Maildir and of its Maildir++ Junk folder (the
source's `quarantine_folder`). A message appearing in Junk whose marker says ham, or that
has no valid marker, is learned as spam; one appearing outside Junk whose marker says
spam is learned as ham only if filterd itself filed it in Junk (the index below), so mail
that Sieve filed, or a spam the user keeps in the inbox, teaches nothing. A marker saying
spam in Junk is no correction (filterd or Sieve put it there), and a rename inside one
folder (new/ to cur/ as a client reads it, a flag change) is no move.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

from watchdog.events import FileCreatedEvent, FileMovedEvent, FileSystemEventHandler
from watchdog.observers import Observer

from filterd.config import Config
from filterd.headers import Tagger
from filterd.learning import learn
from filterd.store.feedback import FeedbackError, text_key
from filterd.text import message_text

log = logging.getLogger("filterd.maildir")

INDEX = "filed-in-junk"  # under the feedback store: keys of what filterd filed in Junk
INDEX_LIMIT = 20000  # keys kept; the oldest go first
MAX_LEARN_BYTES = 52_428_800  # a larger message is not learned (the store keeps it whole)


class FiledIndex:
    """Keys (of the model text) of the messages filterd filed in Junk, one per line."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        try:
            self._keys = dict.fromkeys(path.read_text().split())
        except FileNotFoundError:
            self._keys = {}

    def add(self, key: str) -> None:
        with self._lock:
            self._keys[key] = None
            if len(self._keys) > INDEX_LIMIT:
                self._keys = dict.fromkeys(list(self._keys)[-INDEX_LIMIT // 2 :])
            self._save()

    def pop(self, key: str) -> bool:
        """Whether filterd filed it (and forget that it did: one correction per filing)."""
        with self._lock:
            if key not in self._keys:
                return False
            del self._keys[key]
            self._save()
            return True

    def _save(self) -> None:
        from filterd.store.durable import replace_durably

        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        replace_durably(self.path, "".join(f"{k}\n" for k in self._keys).encode())


class MoveLearner(FileSystemEventHandler):
    """Runs its judgements on the source's worker threads; watchdog's thread only hands
    each event to the event loop."""

    def __init__(
        self,
        config: Config,
        tagger: Tagger,
        roots: list[Path],
        junk: str,
        run: Callable[..., Awaitable[object]],
    ):
        self.config = config
        self.tagger = tagger
        self.roots = roots
        self.junk = junk
        self.run = run
        self.index = FiledIndex(config.learning.store_path() / INDEX)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._observer = Observer()
        self._tasks: set[asyncio.Task] = set()

    def folders(self) -> list[Path]:
        return [f for root in self.roots for f in (root, root / self.junk)]

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for folder in self.folders():
            for sub in ("cur", "new"):
                self._observer.schedule(
                    self, str(folder / sub), event_filter=[FileCreatedEvent, FileMovedEvent]
                )
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(10)

    def filed(self, raw: bytes) -> None:
        """filterd put this message in Junk (called from the source's worker thread)."""
        self.index.add(text_key(message_text(raw, self.config.limits.text_limits())))

    def on_created(self, event) -> None:
        self._hand(None, Path(os.fsdecode(event.src_path)))

    def on_moved(self, event) -> None:
        self._hand(Path(os.fsdecode(event.src_path)), Path(os.fsdecode(event.dest_path)))

    def _hand(self, src: Path | None, dest: Path) -> None:
        if dest.name.startswith("."):
            return
        if src is not None and src.parent.parent == dest.parent.parent:
            return  # new/ -> cur/ or a flag change: the same folder
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._spawn, dest)

    def _spawn(self, path: Path) -> None:
        task = asyncio.get_running_loop().create_task(self._judge(path))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _judge(self, path: Path) -> None:
        try:
            label = await self.run(self._learn, path)
        except (OSError, FeedbackError) as e:
            log.warning("source=maildir file=%s move not learned: %s", path, e)
            return
        if label:
            log.info("source=maildir learned=%s from a move: file=%s", label, path)

    def _learn(self, path: Path) -> str | None:
        """The label learned from this message appearing at path, if any."""
        try:
            with open(path, "rb", opener=_no_follow) as f:
                raw = f.read(MAX_LEARN_BYTES + 1)
        except FileNotFoundError:  # moved on meanwhile
            return None
        if len(raw) > MAX_LEARN_BYTES:  # kept whole or not at all
            raise FeedbackError(f"over {MAX_LEARN_BYTES} bytes: not learned")
        previous = self.tagger.previous(raw)
        said_spam = previous is not None and previous[0]
        if path.parent.parent.name == self.junk:
            if said_spam:
                return None  # filed by filterd or Sieve: no correction
            label = "spam"
        else:
            key = text_key(message_text(raw, self.config.limits.text_limits()))
            if not said_spam or not self.index.pop(key):
                return None
            label = "ham"
        learn(raw, label, source="maildir-move", config=self.config)
        return label


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)

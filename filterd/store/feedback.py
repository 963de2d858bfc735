"""The feedback store: messages people labelled ham or spam, kept to retrain on.

Under its root (mode 0700):

    messages/KEY.DIGEST.eml   the message byte for byte (DIGEST: of these bytes)
    labels/KEY.json           label, kind, source, UTC time, host, filterd's verdict, file

KEY is a hash of the model text, so one text is one entry whatever its headers say: a
later label for it replaces the earlier one if it is newer (a person may change their
mind; labels from several hosts are ordered by their UTC time, newest wins). An entry
exists once its label file does. The message is written first, durably, and the label
file is replaced atomically after it, so a crash leaves at worst a message file nobody
names (removed by the next prune), never a label without its message; an older message
file is removed only after the label naming its successor is on disk.

In a fleet each host writes a store of its own and never another's; `newest` reads several
as one. Another host's store, read while its owner writes it or while a copy of it
arrives (rsync sends labels/ before messages/), may name a message that is not there yet
or no longer: readers skip that entry until the next look.

Entries of kind "replay" are examples of what the model should keep knowing (`filterd
learn --replay`), not corrections: they are trained on but never held out or counted as
feedback.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from filterd.store.durable import fsync_dir, replace_durably, write_temp

LABELS = ("ham", "spam")
KINDS = ("feedback", "replay")
_ORPHAN_AGE = 3600  # a message file no label names, this old, is debris of a crash


class FeedbackError(ValueError):
    """A feedback request cannot be carried out; the message says why."""


@dataclass(frozen=True)
class Record:
    key: str
    label: str  # "ham" or "spam"
    kind: str  # "feedback" (a correction or a confirmation) or "replay"
    source: str  # who said so: "learn", "quarantine-release", "maildir-move", "api", ...
    time: str  # UTC, ISO 8601: when the label was given
    host: str  # where it was given (labels from several hosts are ordered by time)
    verdict: dict | None  # what filterd had said (its marker), {"is_spam", "probability"}
    message: str  # the file under messages/
    size: int

    @property
    def timestamp(self) -> float:
        return datetime.datetime.fromisoformat(self.time).timestamp()


def text_key(text: str) -> str:
    """The entry key of a model text."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")


class FeedbackStore:
    def __init__(self, root: Path, max_messages: int = 20000, retention_days: float = 365.0):
        self.root = Path(root)
        self.max_messages = max_messages
        self.retention_days = retention_days

    @property
    def _labels(self) -> Path:
        return self.root / "labels"

    @property
    def _messages(self) -> Path:
        return self.root / "messages"

    def _ensure(self) -> None:
        for folder in (self.root, self._labels, self._messages):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    def add(
        self,
        raw: bytes,
        text: str,
        label: str,
        source: str,
        *,
        kind: str = "feedback",
        verdict: dict | None = None,
        when: str | None = None,
        host: str | None = None,
    ) -> str:
        """Record a label; says what happened: "added", "replaced", "unchanged" or
        "kept newer" (the store holds a later label for this text)."""
        if label not in LABELS:
            raise FeedbackError(f"label must be ham or spam, not {label!r}")
        if kind not in KINDS:
            raise FeedbackError(f"kind must be one of {KINDS}, not {kind!r}")
        if not text.strip():
            raise FeedbackError("the message has no text the model reads: nothing to learn")
        when = when or utc_now()
        key = text_key(text)
        old = self.get(key)
        if old is not None and old.timestamp > datetime.datetime.fromisoformat(when).timestamp():
            return "kept newer"
        digest = hashlib.sha256(raw).hexdigest()[:16]
        record = Record(
            key,
            label,
            kind,
            source,
            when,
            host or socket.gethostname(),
            verdict,
            f"{key}.{digest}.eml",
            len(raw),
        )
        if old is not None and (old.label, old.kind, old.message) == (label, kind, record.message):
            return "unchanged"
        self._ensure()
        target = self._messages / record.message
        if not target.exists():
            tmp = write_temp(self._messages, raw, record.message)
            os.replace(tmp, target)
            fsync_dir(self._messages)
        replace_durably(self._labels / f"{key}.json", json.dumps(asdict(record)).encode())
        if old is not None and old.message != record.message:
            (self._messages / old.message).unlink(missing_ok=True)
        return "added" if old is None else "replaced"

    def get(self, key: str) -> Record | None:
        try:
            data = (self._labels / f"{key}.json").read_bytes()
        except FileNotFoundError:
            return None
        try:
            record = Record(**json.loads(data))
            record.timestamp  # noqa: B018 - a time that is not ISO 8601 is damage too
        except (ValueError, TypeError) as e:
            raise FeedbackError(f"{self._labels / f'{key}.json'}: damaged label ({e})") from e
        return record

    def forget(self, text: str) -> Record:
        """Remove the entry of this model text; FeedbackError if the store has none."""
        key = text_key(text)
        record = self.get(key)
        if record is None:
            raise FeedbackError("not in the feedback store (never labelled, or forgotten)")
        (self._labels / f"{key}.json").unlink()
        fsync_dir(self._labels)
        (self._messages / record.message).unlink(missing_ok=True)
        return record

    def records(self, problems: list[str] | None = None) -> list[Record]:
        """Every entry, oldest label first; a damaged or unreadable one is skipped and said
        so in `problems` (another host's store may belong to another user)."""
        said = problems if problems is not None else []
        try:
            paths = sorted(self._labels.glob("*.json")) if self._labels.is_dir() else []
        except OSError as e:
            said.append(f"{self._labels}: cannot read ({e.strerror or e})")
            return []
        found = []
        for path in paths:
            try:
                record = self.get(path.stem)
            except FeedbackError as e:
                said.append(str(e))
                continue
            except OSError as e:
                said.append(f"{path}: cannot read ({e.strerror or e})")
                continue
            if record is not None:
                found.append(record)
        return sorted(found, key=lambda r: (r.timestamp, r.key))

    def read(self, record: Record) -> bytes:
        return (self._messages / record.message).read_bytes()

    def prune(self, now: float | None = None) -> list[str]:
        """Apply the retention rule: labels older than retention_days go, then the oldest
        beyond max_messages; then message files no label names (crash debris). The keys
        removed."""
        now = time.time() if now is None else now
        records = self.records()
        cutoff = now - self.retention_days * 86400
        doomed = [r for r in records if r.timestamp < cutoff]
        kept = [r for r in records if r.timestamp >= cutoff]
        doomed += kept[: max(0, len(kept) - self.max_messages)]
        for r in doomed:
            (self._labels / f"{r.key}.json").unlink(missing_ok=True)
        if doomed:
            fsync_dir(self._labels)
        for r in doomed:  # after the labels are gone for good
            (self._messages / r.message).unlink(missing_ok=True)
        named = {r.message for r in self.records()}
        if self._messages.is_dir():
            for path in self._messages.iterdir():
                if path.name not in named and path.lstat().st_mtime < now - _ORPHAN_AGE:
                    path.unlink(missing_ok=True)
        return [r.key for r in doomed]


def newest(
    stores: Iterable[FeedbackStore], problems: list[str] | None = None
) -> list[tuple[FeedbackStore, Record]]:
    """Several stores (one per host) read as one: each key's newest label with the store
    that holds it, oldest first. A tie in time goes to the greater host name, then the
    greater store path, so the result does not depend on the order of `stores`."""
    best: dict[str, tuple[tuple[float, str, str], FeedbackStore, Record]] = {}
    for store in stores:
        for record in store.records(problems):
            rank = (record.timestamp, record.host, str(store.root))
            if record.key not in best or rank > best[record.key][0]:
                best[record.key] = (rank, store, record)
    return sorted(((s, r) for _, s, r in best.values()), key=lambda p: (p[1].timestamp, p[1].key))


def stats(records: Iterable[Record]) -> dict:
    """Counts per kind and label, and per source and label."""
    records = list(records)
    return {
        "total": len(records),
        "by_label": dict(Counter(f"{r.kind} {r.label}" for r in records)),
        "by_source": dict(Counter(f"{r.source} {r.label}" for r in records)),
    }

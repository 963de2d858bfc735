"""Labelled messages in, a de-duplicated, balanced, leak-free split out.

Every example keeps an `id` that locates it in its source (a file path, `MBOX#N`,
`SMS#N`), so a split written to split.jsonl can be re-read and re-scored later.
"""

from __future__ import annotations

import hashlib
import json
import random
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from filterd.download import fetch
from filterd.mailfiles import MailFileError, looks_like_mbox, raw_messages, read
from filterd.store.durable import replace_durably
from filterd.text import TextLimits, message_text, normalize_text

LABELS = ("ham", "spam")
SMS_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
SMS_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
SPLITS = (("train", 0.7), ("val", 0.1), ("test", 0.2))


class DataError(ValueError):
    """The training data is unusable; the message names the source and the problem."""


@dataclass(frozen=True)
class Example:
    id: str
    label: str  # "ham" or "spam"
    text: str  # the model text: what filterd.text extracts, identical at run time

    @property
    def y(self) -> int:
        return LABELS.index(self.label)


# --- readers ---------------------------------------------------------------------------


def read_sms(path: Path) -> list[Example]:
    """The SMS Spam Collection: `label<TAB>text` per line, split on the first tab only."""
    path = path.resolve()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read SMS file ({e})") from e
    examples = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        label, sep, text = line.partition("\t")
        if not sep or label not in LABELS:
            raise DataError(f"{path}:{n}: expected 'ham<TAB>text' or 'spam<TAB>text'")
        examples.append(Example(f"{path}#{n}", label, normalize_text(text)))
    if not examples:
        raise DataError(f"{path}: no messages")
    return examples


def download_sms(cache: Path) -> Path:
    """The collection from the UCI archive, checksum verified, cached after the first time."""
    target = cache / "SMSSpamCollection"
    if target.is_file() and _sha256(target.read_bytes()) == SMS_SHA256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / "smsspamcollection.zip"
    try:
        fetch(SMS_URL, archive)
    except OSError as e:
        raise DataError(
            f"could not download the SMS Spam Collection from {SMS_URL}: "
            f"{getattr(e, 'reason', e)}.\nWithout network access, fetch that zip elsewhere, "
            "unpack its SMSSpamCollection file and pass it: --sms PATH"
        ) from e
    with zipfile.ZipFile(archive) as z:
        data = z.read("SMSSpamCollection")
    if _sha256(data) != SMS_SHA256:
        raise DataError(f"{SMS_URL}: SMSSpamCollection does not have the published sha256")
    target.write_bytes(data)
    archive.unlink()
    return target


def read_mail(path: Path, label: str, limits: TextLimits = TextLimits()) -> list[Example]:
    """A Maildir (cur/ and new/), an mbox file, or a folder of message files."""
    path = path.resolve()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    examples = [Example(id, label, message_text(raw, limits)) for id, raw in _messages(path)]
    if not examples:
        raise DataError(f"{path}: no messages found")
    return examples


def read_spamassassin(root: Path, limits: TextLimits = TextLimits()) -> list[Example]:
    """The public corpus layout: folders named *ham* (easy_ham, hard_ham...) and *spam*."""
    root = root.resolve()
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    examples = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        label = "spam" if "spam" in folder.name else "ham" if "ham" in folder.name else None
        if label:
            examples += read_mail(folder, label, limits)
    if not examples:
        raise DataError(f"{root}: no *ham* or *spam* folders with messages")
    return examples


def _messages(path: Path) -> Iterator[tuple[str, bytes]]:
    try:
        yield from raw_messages(path)
    except MailFileError as e:
        raise DataError(str(e)) from e


def _read(path: Path) -> bytes:
    try:
        return read(path)
    except MailFileError as e:
        raise DataError(str(e)) from e


def read_split(
    split_file: Path, limits: TextLimits = TextLimits(), skip_missing: bool = False
) -> list[tuple[Example, str]]:
    """Re-read the messages a split.jsonl names, with the split each was in; with
    `skip_missing`, those no longer readable are left out instead of failing (a retrain
    replays what is still there)."""
    rows = []
    try:
        lines = split_file.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"{split_file}: cannot read ({e.strerror or e})") from e
    sources: dict[Path, dict[int, str]] = {}
    for n, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
            id, label, split = row["id"], row["label"], row["split"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{split_file}:{n}: not a split record ({e})") from e
        if label not in LABELS or split not in dict(SPLITS):
            raise DataError(f"{split_file}:{n}: bad label or split")
        try:
            text = _split_text(id, sources, limits)
        except DataError as e:
            if skip_missing:
                continue
            raise DataError(f"{split_file}:{n}: {e}") from e
        rows.append((Example(id, label, text), split))
    return rows


def _split_text(id: str, sources: dict[Path, dict[int, str]], limits: TextLimits) -> str:
    """The model text of a split.jsonl id: a file, or `FILE#N` of an SMS file or mbox."""
    file, sep, num = id.rpartition("#")
    if sep and num.isdigit() and Path(file).is_file():
        path = Path(file)
        if path not in sources:
            sources[path] = _numbered_texts(path, limits)
        text = sources[path].get(int(num))
        if text is None:
            raise DataError(f"{id} no longer exists")
        return text
    return message_text(_read(Path(id)), limits)


def _numbered_texts(path: Path, limits: TextLimits) -> dict[int, str]:
    """Texts of an SMS file by line number, or of an mbox by message number."""
    if looks_like_mbox(path):
        return {
            int(id.rpartition("#")[2]): message_text(raw, limits) for id, raw in _messages(path)
        }
    return {int(e.id.rpartition("#")[2]): e.text for e in read_sms(path)}


# --- preparation -----------------------------------------------------------------------


@dataclass
class Prepared:
    train: list[Example]
    val: list[Example]
    test: list[Example]
    counts: dict

    def splits(self) -> Iterable[tuple[str, list[Example]]]:
        return (("train", self.train), ("val", self.val), ("test", self.test))

    def fingerprint(self) -> str:
        """Identifies the exact training data: sha256 over ids, labels and texts."""
        h = hashlib.sha256()
        for name, examples in self.splits():
            for e in examples:
                h.update(f"{name}\0{e.label}\0{e.id}\0{e.text}\0".encode())
        return h.hexdigest()


def deduplicate(examples: list[Example]) -> tuple[list[Example], int]:
    """Keep the first message of each model text; refuse one text with both labels."""
    first: dict[str, Example] = {}
    conflicts = []
    for e in examples:
        seen = first.setdefault(e.text, e)
        if seen.label != e.label:
            conflicts.append((seen.id, e.id))
    if conflicts:
        shown = "; ".join(f"{a} vs {b}" for a, b in conflicts[:5])
        raise DataError(
            f"{len(conflicts)} message(s) labelled both ham and spam (same text): {shown}. "
            "Remove them from one side."
        )
    return list(first.values()), len(examples) - len(first)


def prepare(examples: list[Example], seed: int, balance: bool = True) -> Prepared:
    """De-duplicate, undersample the majority class, then a stratified 70/10/20 split."""
    read = Counter(e.label for e in examples)
    unique, dropped = deduplicate(examples)
    per_class = {label: [e for e in unique if e.label == label] for label in LABELS}
    missing = [label for label, items in per_class.items() if not items]
    if missing:
        raise DataError(f"no {missing[0]} messages: training needs both ham and spam")
    rng = random.Random(seed)
    if balance:
        size = min(len(items) for items in per_class.values())
        per_class = {label: rng.sample(items, size) for label, items in per_class.items()}
    parts: dict[str, list[Example]] = {name: [] for name, _ in SPLITS}
    for items in per_class.values():
        items = list(items)
        rng.shuffle(items)
        if len(items) < 3:
            raise DataError(f"only {len(items)} {items[0].label} message(s): need at least 3")
        n_train = round(len(items) * SPLITS[0][1])
        n_val = max(1, round(len(items) * SPLITS[1][1]))
        n_train = min(n_train, len(items) - n_val - 1)
        parts["train"] += items[:n_train]
        parts["val"] += items[n_train : n_train + n_val]
        parts["test"] += items[n_train + n_val :]
    for items in parts.values():
        rng.shuffle(items)
    counts = {
        "read": len(examples),
        "duplicates_dropped": dropped,
        "read_per_class": dict(read),
        "unique_per_class": {label: sum(e.label == label for e in unique) for label in LABELS},
        "used_per_class": {label: len(per_class[label]) for label in LABELS},
        "per_split": {name: len(items) for name, items in parts.items()},
    }
    return Prepared(parts["train"], parts["val"], parts["test"], counts)


def write_split(prepared: Prepared, path: Path) -> None:
    rows = (
        json.dumps({"id": e.id, "label": e.label, "split": name}) + "\n"
        for name, examples in prepared.splits()
        for e in examples
    )
    replace_durably(path, "".join(rows).encode())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

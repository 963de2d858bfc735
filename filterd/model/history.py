"""Earlier checkpoints, kept when a retrain replaces the running one, for `filterd rollback`.

Beside the checkpoint file, history/ holds STAMP-SHA.safetensors (and STAMP-SHA.metrics.json
when the checkpoint had a metrics.json): the file as it was, copied durably before its
successor is written. Installing and rolling back replace the checkpoint atomically, the
way the daemon already watches for, so it reloads and a reader never sees half a file.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from pathlib import Path

from filterd.model.checkpoint import checkpoint_path
from filterd.store.durable import fsync_dir, replace_durably
from filterd.store.maildir import write_durably

METRICS = "metrics.json"


class HistoryError(ValueError):
    """A rollback or install cannot be carried out; the message says why."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def history_dir(checkpoint: str | os.PathLike) -> Path:
    return checkpoint_path(checkpoint).parent / "history"


def entries(checkpoint: str | os.PathLike) -> list[Path]:
    """Kept checkpoints, oldest first."""
    folder = history_dir(checkpoint)
    if not folder.is_dir():
        return []
    return sorted(folder.glob("[0-9]*.safetensors"))


def keep(checkpoint: str | os.PathLike, limit: int) -> Path:
    """Copy the running checkpoint (and its metrics.json) into history, durably; drop the
    oldest entries beyond `limit`. The entry's path."""
    target = checkpoint_path(checkpoint)
    folder = history_dir(target)
    folder.mkdir(mode=0o700, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    name = f"{stamp}-{file_sha256(target)[:12]}"
    entry = _copy(target, folder / f"{name}.safetensors")
    metrics = target.parent / METRICS
    if metrics.is_file():
        _copy(metrics, folder / f"{name}.{METRICS}")
    for old in entries(target)[:-limit]:
        old.unlink()
        old.with_name(old.name.removesuffix(".safetensors") + f".{METRICS}").unlink(missing_ok=True)
    fsync_dir(folder)
    return entry


def rollback(checkpoint: str | os.PathLike) -> Path:
    """Put the newest kept checkpoint back in place (with its metrics.json); the one it
    replaces is kept as history/rolled-back.safetensors. The entry restored."""
    target = checkpoint_path(checkpoint)
    kept = entries(target)
    if not kept:
        raise HistoryError(
            f"no earlier checkpoint in {history_dir(target)}: nothing to roll back to "
            "(a retrain keeps one each time it installs a new model)"
        )
    newest = kept[-1]
    metrics = newest.with_name(newest.name.removesuffix(".safetensors") + f".{METRICS}")
    if target.is_file():
        _copy(target, history_dir(target) / "rolled-back.safetensors", replace=True)
    if metrics.is_file():
        replace_durably(target.parent / METRICS, metrics.read_bytes())
    replace_durably(target, newest.read_bytes())
    newest.unlink()
    metrics.unlink(missing_ok=True)
    fsync_dir(newest.parent)
    return newest


def _copy(source: Path, dest: Path, replace: bool = False) -> Path:
    """A durable copy: complete and fsynced before its name appears."""
    if replace:
        return replace_durably(dest, source.read_bytes())
    return write_durably(dest, source.read_bytes(), dest.parent)

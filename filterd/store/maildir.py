"""Durable delivery into a Maildir: the file is complete and on disk before it is visible.

Written in tmp/, fsynced, linked into new/ (never replacing a file), then the directory
is fsynced, so a crash at any instant leaves either no message or the whole message.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from pathlib import Path

from filterd.store.durable import fsync_dir, write_temp

__all__ = ["deliver", "ensure", "fsync_dir", "unique_name", "write_durably", "write_temp"]


def ensure(root: Path, mode: int = 0o700) -> Path:
    """Create root/{tmp,new,cur} as needed (new folders get `mode`)."""
    for sub in ("tmp", "new", "cur"):
        (root / sub).mkdir(mode=mode, parents=True, exist_ok=True)
    return root


def unique_name() -> str:
    """A Maildir file name: time, something unique, host (slashes and colons replaced)."""
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    return f"{int(time.time())}.{os.getpid()}_{secrets.token_hex(8)}.{host}"


def write_durably(target: Path, data: bytes, tmp_dir: Path) -> Path:
    """Write data to target via tmp_dir (same filesystem): fsync, link, fsync the folder.

    Fails with FileExistsError rather than replace an existing file."""
    tmp = write_temp(tmp_dir, data, target.name)
    try:
        os.link(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(target.parent)
    return target


def deliver(root: Path, data: bytes, name: str | None = None) -> Path:
    """Durably add a message to the Maildir at root (created if missing); its new/ path."""
    ensure(root)
    return write_durably(root / "new" / (name or unique_name()), data, root / "tmp")

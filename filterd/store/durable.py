"""Files that are complete and on disk before anyone can see them.

A reader (a mail client, the daemon watching a checkpoint) sees either the old file or
the whole new one: data goes to a temporary file in the same folder, is fsynced, then
appears by link or rename, and the folder is fsynced so the name survives a crash.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(tmp_dir: Path, data: bytes, name: str, like: os.stat_result | None = None) -> Path:
    """A new file in tmp_dir (named after `name`, hidden) holding data, fsynced. With `like`
    it gets that file's owner, mode and times, so a rewritten message stays readable by the
    same people and keeps the date mail clients show for it (Dovecot reads the mtime)."""
    tmp = tmp_dir / f".{name}.{secrets.token_hex(6)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            if like is not None:
                own = os.fstat(out.fileno())
                if (own.st_uid, own.st_gid) != (like.st_uid, like.st_gid):
                    os.fchown(out.fileno(), like.st_uid, like.st_gid)
                os.fchmod(out.fileno(), stat.S_IMODE(like.st_mode))
                os.utime(out.fileno(), ns=(like.st_atime_ns, like.st_mtime_ns))
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def replace_durably(target: Path, data: bytes) -> Path:
    """Write data over target atomically: readers see the old file or the new, never half."""
    tmp = write_temp(target.parent, data, target.name)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return target

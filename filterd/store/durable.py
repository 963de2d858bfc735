"""Files that are complete and on disk before anyone can see them.

A reader (a mail client, the daemon watching a checkpoint) sees either the old file or
the whole new one: data goes to a temporary file in the same folder, is fsynced, then
appears by link or rename, and the folder is fsynced so the name survives a crash.
"""

from __future__ import annotations

import contextlib
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


def write_temp(
    tmp_dir: Path,
    data: bytes,
    name: str,
    like: os.stat_result | None = None,
    *,
    dir_fd: int | None = None,
    owner: tuple[int, int] | None = None,
) -> Path:
    """A new file in tmp_dir (named after `name`, hidden) holding data, fsynced. With `like`
    it gets that file's owner, mode and times, so a rewritten message stays readable by the
    same people and keeps the date mail clients show for it (Dovecot reads the mtime); with
    `owner` (uid, gid) that owner. With `dir_fd` the file is made in that open folder, which
    tmp_dir only names: a folder opened without following symlinks keeps the write there
    (use the returned name with dir_fd, not the path)."""
    tmp = tmp_dir / f".{name}.{secrets.token_hex(6)}"
    where = tmp.name if dir_fd is not None else tmp
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(where, flags, 0o600, dir_fd=dir_fd)
    if like is not None:
        owner = (like.st_uid, like.st_gid)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            own = os.fstat(out.fileno())
            if owner is not None and (own.st_uid, own.st_gid) != owner:
                os.fchown(out.fileno(), *owner)
            if like is not None:
                os.fchmod(out.fileno(), stat.S_IMODE(like.st_mode))
                os.utime(out.fileno(), ns=(like.st_atime_ns, like.st_mtime_ns))
            os.fsync(out.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):  # gone already: nothing to clean up
            os.unlink(where, dir_fd=dir_fd)
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

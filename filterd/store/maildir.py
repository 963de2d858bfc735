"""Durable delivery into a Maildir: the file is complete and on disk before it is visible.

Written in tmp/, fsynced, linked into new/ (never replacing a file), then the directory
is fsynced, so a crash at any instant leaves either no message or the whole message.

A Maildir written for someone else (filterd run as root) is held by directory descriptors
(`open_maildir`): its tmp/ and new/ are opened without following symlinks and every file is
made, linked and renamed relative to them, so a link its user made cannot lead a write into
another user's Maildir.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from filterd.store.durable import fsync_dir, write_temp

__all__ = [
    "Dirs",
    "NotAFolder",
    "deliver",
    "ensure",
    "fsync_dir",
    "open_folder",
    "open_maildir",
    "unique_name",
    "write_durably",
    "write_temp",
]


class NotAFolder(OSError):
    """A Maildir folder that is a symlink, or no folder at all: refused, since a write through
    a link the mailbox's user made could land in someone else's Maildir."""


def open_folder(path: Path, *, at: int | None = None, follow: bool = False) -> int:
    """A descriptor of the folder at path, or of the one named path.name in the open folder
    `at`. Unless `follow`, a symlink is refused (NotAFolder): what is made through the
    descriptor lands in that very folder, not where a link points."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        return os.open(path if at is None else path.name, flags, dir_fd=at)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise NotAFolder(e.errno, "a symlink or not a folder, refused", str(path)) from e
        raise


@dataclass
class Dirs:
    """A Maildir held open: descriptors of its folder, its tmp/ and its new/ (a context
    manager that closes them). `path` only names it in messages."""

    path: Path
    root: int
    tmp: int
    new: int

    def __enter__(self) -> Dirs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in (self.new, self.tmp, self.root):
            os.close(fd)

    def names(self, sub: str) -> list[str]:
        """The file names in sub/ (new, cur); none if it is missing or a symlink."""
        try:
            fd = open_folder(self.path / sub, at=self.root)
        except (FileNotFoundError, NotAFolder):
            return []
        try:
            return os.listdir(fd)
        finally:
            os.close(fd)


def open_maildir(
    path: Path,
    *,
    at: int | None = None,
    follow: bool = False,
    mode: int | None = None,
    owner: tuple[int, int] | None = None,
) -> Dirs:
    """The Maildir at path held open; `at` and `follow` as for open_folder, while tmp/ and
    new/ are never reached through a symlink. With `mode`, what is missing (the folder and
    its parents, tmp/, new/, cur/) is made with that mode and given to `owner` (uid, gid)."""
    if mode is not None:
        if at is None:
            path.parent.mkdir(parents=True, exist_ok=True)
        _mkdir(path if at is None else path.name, at, mode, owner)
    fds = [open_folder(path, at=at, follow=follow)]
    try:
        if mode is not None:
            for sub in ("tmp", "new", "cur"):
                _mkdir(sub, fds[0], mode, owner)
        for sub in ("tmp", "new"):
            fds.append(open_folder(path / sub, at=fds[0]))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Dirs(path, *fds)


def _mkdir(name: str | Path, dir_fd: int | None, mode: int, owner: tuple[int, int] | None) -> None:
    """Make the folder unless something is there already; a new one goes to owner."""
    try:
        os.mkdir(name, mode, dir_fd=dir_fd)
    except FileExistsError:
        return
    if owner is not None:
        os.chown(name, *owner, dir_fd=dir_fd, follow_symlinks=False)


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
    """Durably add a message to the Maildir at root (created if missing, mode 0700); its
    new/ path. Neither root nor its tmp/ and new/ may be a symlink (NotAFolder): a link made
    by the mailbox's user could lead into another Maildir. Run as root, the message goes to
    the Maildir's owner, so its user can read it."""
    name = name or unique_name()
    with open_maildir(Path(root), mode=0o700) as dirs:
        st = os.fstat(dirs.root)
        owner = (st.st_uid, st.st_gid) if os.geteuid() == 0 else None
        tmp = write_temp(dirs.path / "tmp", data, name, dir_fd=dirs.tmp, owner=owner).name
        try:
            os.link(tmp, name, src_dir_fd=dirs.tmp, dst_dir_fd=dirs.new, follow_symlinks=False)
        finally:
            os.unlink(tmp, dir_fd=dirs.tmp)
        os.fsync(dirs.new)
    return dirs.path / "new" / name

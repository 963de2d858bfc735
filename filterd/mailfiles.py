"""Messages stored in files, as people keep them: one message per file, a folder of them,
a Maildir (new/ and cur/), or an mbox. The trainer reads its data this way, and `filterd
learn` the messages it is told about."""

from __future__ import annotations

import mailbox
from collections.abc import Iterator
from pathlib import Path


class MailFileError(OSError):
    """A file or folder of messages cannot be read; the message names it."""


def raw_messages(path: Path) -> Iterator[tuple[str, bytes]]:
    """(id, bytes) of each message under path; an id is the file's path, or `MBOX#N` for
    the Nth message of an mbox."""
    if not path.exists():
        raise MailFileError(f"{path}: no such file or folder")
    if path.is_file():
        if not looks_like_mbox(path):
            yield str(path), read(path)
            return
        box = mailbox.mbox(path, create=False)
        for n, key in enumerate(box.iterkeys(), start=1):
            yield f"{path}#{n}", box.get_bytes(key)
        return
    if (path / "cur").is_dir() and (path / "new").is_dir():
        files = [f for sub in ("new", "cur") for f in sorted((path / sub).iterdir())]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        # Skip dotfiles (Maildir's .Junk etc. are folders; dovecot keeps index files)
        # and the public corpus's `cmds` listing.
        if f.is_file() and not f.name.startswith(".") and f.name != "cmds":
            yield str(f), read(f)


def looks_like_mbox(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(5)
    if head != b"From ":
        return False
    # A single message saved with its mbox separator is still one file, one message; a
    # separator follows an empty line, so a body line "From the team" is none.
    separators, previous = 0, b""
    with open(path, "rb") as f:
        for n, line in enumerate(f):
            if line.startswith(b"From ") and (n == 0 or not previous.strip()):
                separators += 1
            previous = line
    return separators > 1


def read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise MailFileError(f"{path}: cannot read ({e.strerror or e})") from e

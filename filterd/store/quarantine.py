"""The quarantine: a Maildir (mode 0700) of held messages, exactly as they were received.

Each message sits in new/ (or cur/, once a mail client has seen it) byte for byte as it
arrived; what filterd knows about it (envelope, score, reason, time) sits beside it in
filterd-meta/ID.json, which mail clients ignore. Both are written durably. A release
removes a message only after its destination has it durably; IDs are checked against a
strict pattern and files are opened without following symlinks, so no request reaches
outside the store; anything in it that is not a regular file (a FIFO, a folder, a link) is
refused alone, never blocking on it, and `list` and `expire` skip it and go on.

A released message is re-tagged as ham by a person's decision (`released=ID`, a fresh
marker): the sender's own X-Spam-* fields never reach the mailbox, and neither Sieve nor the
Maildir watcher files it back into Junk.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import smtplib
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from filterd.headers import Tagger
from filterd.mail import Mail
from filterd.store import maildir
from filterd.verdict import Verdict

ID_PATTERN = re.compile(r"[0-9]{10,12}\.[0-9a-f]{16}")
_META = "filterd-meta"
_TMP_MAX_AGE = 36 * 3600  # Maildir convention: tmp/ files older than this are debris


class QuarantineError(ValueError):
    """A quarantine request cannot be carried out; the message says why."""


def _read_regular(path: Path) -> bytes:
    """The bytes of the regular file at path. Opened without following a symlink and without
    blocking (a FIFO would wait for a writer for ever), then checked on the descriptor."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise QuarantineError(f"{path}: not a regular file in the store (symlink, FIFO?)")
        return f.read()


@dataclass(frozen=True)
class Entry:
    id: str
    time: float
    mail_from: str | None
    rcpt_tos: list[str]
    probability: float | None
    reason: str
    size: int


class Store:
    def __init__(self, root: Path, retention_days: float = 30.0):
        self.root = Path(root)
        self.retention_days = retention_days

    def _ensure(self) -> None:
        maildir.ensure(self.root)
        (self.root / _META).mkdir(mode=0o700, exist_ok=True)
        for sub in ("tmp", "new", "cur", _META):
            self._folder(sub)
        os.chmod(self.root, 0o700)

    def _folder(self, sub: str) -> Path:
        """root/sub, refused if it is a symlink (or anything but a folder): what we read,
        write or delete must lie in the store. A missing folder is returned as it is."""
        path = self.root / sub
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return path
        if not stat.S_ISDIR(mode):
            raise QuarantineError(f"{path}: not a folder of the store (symlink?); refused")
        return path

    def add(self, mail: Mail, verdict: Verdict, now: float | None = None) -> str:
        """Store durably; the ID only exists once message and details are on disk."""
        self._ensure()
        now = time.time() if now is None else now
        qid = f"{int(now)}.{secrets.token_hex(8)}"
        reason = verdict.reason or f"{verdict.decided_by}: {verdict.label}"
        entry = Entry(
            qid,
            now,
            mail.mail_from,
            list(mail.rcpt_tos),
            verdict.probability,
            reason,
            len(mail.raw),
        )
        meta = json.dumps(asdict(entry), indent=1).encode()
        maildir.write_durably(self.root / _META / f"{qid}.json", meta, self.root / "tmp")
        maildir.write_durably(self.root / "new" / qid, mail.raw, self.root / "tmp")
        return qid

    def _message_path(self, qid: str) -> Path:
        if not ID_PATTERN.fullmatch(qid):
            raise QuarantineError(
                f"{qid!r} is not a quarantine ID (like 1700000000.0123456789abcdef)"
            )
        candidates = [self._folder("new") / qid]
        cur = self._folder("cur")
        if cur.is_dir():  # a mail client may have moved it and added flags
            candidates += sorted(p for p in cur.iterdir() if p.name.split(":", 1)[0] == qid)
        for path in candidates:
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(mode):
                raise QuarantineError(
                    f"{qid}: {path} is not a regular file in the store (symlink, FIFO, folder?)"
                )
            return path
        raise QuarantineError(f"{qid}: no such message in {self.root}")

    def read(self, qid: str) -> bytes:
        """The message bytes exactly as received."""
        return _read_regular(self._message_path(qid))

    def released(self, qid: str, tagger: Tagger, threshold: float = 0.5) -> bytes:
        """The message as it leaves the quarantine: tagged ham by a person's decision
        (`X-Spam-Status: No, ... released=ID`, no Flag, a fresh marker), so no X-Spam-*
        field of the sender's survives and a Sieve rule does not file it back into Junk.
        The body stays byte for byte. `threshold` is the `required=` shown."""
        verdict = Verdict(
            probability=None,
            is_spam=False,
            action="tag",
            threshold=threshold,
            model="-",
            decided_by="release",
            reason=f"released={qid}",
        )
        return tagger.tag(self.read(qid), verdict)

    def get(self, qid: str) -> Entry:
        path = self._message_path(qid)
        meta = self._folder(_META) / f"{qid}.json"
        try:
            return Entry(**json.loads(_read_regular(meta)))
        except (OSError, ValueError, TypeError):  # details lost: the message still counts
            st = path.stat()
            return Entry(qid, st.st_mtime, None, [], None, "details missing", st.st_size)

    def list(self, problems: list[str] | None = None) -> list[Entry]:
        """Every held message, oldest first. An entry that cannot be read (not a regular
        file, gone meanwhile) is skipped, and said so in `problems` when given: one bad
        entry must not hide the others."""
        ids = set()
        for sub in ("new", "cur"):
            folder = self._folder(sub)
            if folder.is_dir():
                ids |= {p.name.split(":", 1)[0] for p in folder.iterdir()}
        entries = []
        for qid in sorted(i for i in ids if ID_PATTERN.fullmatch(i)):
            try:
                entries.append(self.get(qid))
            except (QuarantineError, OSError) as e:
                _report(problems, f"skipped {e}")
        return sorted(entries, key=lambda e: (e.time, e.id))

    def delete(self, qid: str) -> None:
        path = self._message_path(qid)
        meta = self._folder(_META) / f"{qid}.json"
        path.unlink()
        meta.unlink(missing_ok=True)
        maildir.fsync_dir(path.parent)

    def release_to_maildir(
        self, qid: str, dest: Path, tagger: Tagger, threshold: float = 0.5
    ) -> Path:
        """Deliver durably (re-tagged, see `released`) into the Maildir dest, then delete
        from the store. dest, dest/tmp and dest/new must not be symlinks (refused)."""
        try:
            target = maildir.deliver(Path(dest), self.released(qid, tagger, threshold))
        except maildir.NotAFolder as e:
            raise QuarantineError(f"{qid}: not released: {e.filename}: {e.strerror}") from e
        self.delete(qid)
        return target

    def release_smtp(
        self,
        qid: str,
        host: str,
        port: int,
        timeout: float,
        tagger: Tagger,
        threshold: float = 0.5,
    ) -> None:
        """Re-inject (re-tagged, see `released`) to the next hop with the original envelope;
        deleted only once every recipient was accepted."""
        entry, data = self.get(qid), self.released(qid, tagger, threshold)
        if not entry.rcpt_tos or entry.mail_from is None:
            raise QuarantineError(
                f"{qid}: no envelope recorded (it came from stdin or a Maildir); "
                "release it --to a Maildir or to stdout instead"
            )
        try:
            with smtplib.SMTP(host, port, timeout=timeout) as smtp:
                smtp.ehlo_or_helo_if_needed()
                eight_bit = not data.isascii() and smtp.has_extn("8bitmime")
                options = ["BODY=8BITMIME"] if eight_bit else []
                refused = smtp.sendmail(entry.mail_from, entry.rcpt_tos, data, options)
        except (OSError, smtplib.SMTPException) as e:
            raise QuarantineError(f"{qid}: next hop {host}:{port} did not take it: {e}") from e
        if refused:
            raise QuarantineError(f"{qid}: delivered only in part, refused: {refused}; kept")
        self.delete(qid)

    def expire(self, now: float | None = None, problems: list[str] | None = None) -> list[str]:
        """Delete messages older than the retention, and stale debris; the expired IDs.
        What cannot be read or removed is skipped (and said so in `problems`)."""
        now = time.time() if now is None else now
        cutoff = now - self.retention_days * 86400
        expired = [e.id for e in self.list(problems) if e.time < cutoff]
        for qid in expired:
            self.delete(qid)
        held = {e.id for e in self.list()}
        for path in self._debris():
            try:
                if path.stem not in held and path.lstat().st_mtime < now - _TMP_MAX_AGE:
                    path.unlink()
            except FileNotFoundError:  # another expire (or a release) got there first
                continue
            except OSError as e:  # a folder among the debris, a file not ours: the rest goes on
                _report(problems, f"not removed {path}: {e.strerror or e}")
        return expired

    def _debris(self) -> list[Path]:
        folders = [self._folder("tmp"), self._folder(_META)]
        return [p for f in folders if f.is_dir() for p in f.iterdir()]


def _report(problems: list[str] | None, text: str) -> None:
    """Note a skipped entry where the caller asked for them."""
    if problems is not None:
        problems.append(text)

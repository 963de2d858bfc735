"""The Maildir source: each message that arrives in a watched new/ is scored where it lies.

It is then tagged in place, or moved, tagged, to the quarantine folder: a Maildir++
subfolder such as .Junk (so every mail client shows it) or the quarantine store.

Mail is never at risk. The successor is written in tmp/ and fsynced first (with the
original's owner, mode and mtime). Then the original is claimed by renaming it from new/
into tmp/, which fails if the delivery agent or a mail client moved or removed it meanwhile:
then it stays where it went and our copy is dropped, so nothing is recreated. Then the
successor is linked into place (never replacing a file), its folder is fsynced, and only
then is the claimed original deleted. A crash in between leaves `NAME.filterd-held` in
tmp/; the next start puts it back unless its successor is in place.

A valid marker means "scored already", so our own files appearing in new/ are left alone;
names we write are also remembered, so a fail_open copy is not sent again to a failing
model. watchdog's thread hands paths to the event loop with call_soon_threadsafe; the
engine runs the model off the loop. A periodic rescan of new/ retries what tempfail left
there and picks up anything the watcher missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field
from watchdog.events import (
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from filterd.config import Config, ConfigError
from filterd.mail import Mail
from filterd.plugin_api import Context, Handler, Options, Outcome, Source
from filterd.store import maildir
from filterd.verdict import Verdict

log = logging.getLogger("filterd.maildir")

HELD = ".filterd-held"  # suffix of an original claimed into tmp/ while its successor is placed
_SIZE_FIELD = re.compile(r",([SW])=[0-9]+")


def successor_name(name: str, data: bytes) -> str:
    """`name` with size fields true for data: `,S=` bytes (added if missing), `,W=` bytes with
    CRLF line ends. IMAP servers read sizes from the name, and a changed name tells them
    the content changed (Dovecot would otherwise serve what it cached of the original)."""
    base, sep, info = name.partition(":")
    sizes = {"S": len(data), "W": len(data) + data.count(b"\n") - data.count(b"\r\n")}
    if ",S=" not in base:
        base += f",S={len(data)}"
    return _SIZE_FIELD.sub(lambda m: f",{m[1]}={sizes[m[1]]}", base) + sep + info


def _unique(name: str) -> str:
    """What identifies a message in a Maildir name: the part before any `,` field or `:` info."""
    return re.split("[,:]", name, maxsplit=1)[0]


def _put_back(held: Path, path: Path) -> None:
    """Return a claimed original to new/, under a fresh name if its own is taken."""
    try:
        os.link(held, path)
    except FileExistsError:
        os.link(held, path.with_name(maildir.unique_name()))
    maildir.fsync_dir(path.parent)
    held.unlink()


def _ensure_folder(folder: Path, like: Path) -> None:
    """Create the quarantine Maildir if missing, with the watched Maildir's mode and
    owner (so its user can read it); a Maildir++ subfolder gets its `maildirfolder` file."""
    if all((folder / sub).is_dir() for sub in ("tmp", "new", "cur")):
        return
    st = like.stat()
    maildir.ensure(folder, stat.S_IMODE(st.st_mode))
    made = [folder, folder / "tmp", folder / "new", folder / "cur"]
    if folder.parent == like:
        (folder / "maildirfolder").touch(mode=0o600)
        made.append(folder / "maildirfolder")
    if os.geteuid() != st.st_uid:
        for path in made:
            os.chown(path, st.st_uid, st.st_gid)


@dataclass(frozen=True)
class _Found:
    path: Path  # <maildir>/new/<name>
    raw: bytes
    stat: os.stat_result
    scored: bool  # it carries a valid marker: scored here already

    @property
    def root(self) -> Path:
        return self.path.parent.parent


class _Events(FileSystemEventHandler):
    """Runs in watchdog's thread, so it only hands each new path to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, submit: Callable[[Path], None]):
        self._loop = loop
        self._submit = submit

    def on_created(self, event: FileSystemEvent) -> None:  # link, or rename from tmp/
        self._loop.call_soon_threadsafe(self._submit, Path(os.fsdecode(event.src_path)))

    def on_moved(self, event: FileSystemEvent) -> None:  # renamed within new/
        self._loop.call_soon_threadsafe(self._submit, Path(os.fsdecode(event.dest_path)))


class MaildirOptions(Options):
    """Maildirs watched: each message arriving in new/ is scored where it lies."""

    paths: list[Path] = Field(min_length=1)
    # ".Name": that Maildir++ subfolder of each watched Maildir; an absolute path: one Maildir
    # for all; "store": the quarantine store.
    quarantine_folder: str = Field(".Junk", pattern=r"^(store|\.[^./][^/]*|[/~].*)$")
    rescan_seconds: float = Field(60.0, gt=0)  # tempfailed messages are retried this often


class MaildirSource(Source):
    """Watches the Maildirs in `paths`. `start()` returns once the backlog in new/ is in
    hand; `drain()` once the messages in hand are settled (the rest wait in new/)."""

    Options = MaildirOptions
    options: MaildirOptions

    def __init__(self, options: MaildirOptions, config: Config):
        super().__init__(options, config)
        self.settings = options
        self.roots = [p.expanduser() for p in options.paths]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle_mail: Handler | None = None
        self._context: Context | None = None
        self._observer: BaseObserver | None = None
        self._rescans: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._busy: set[Path] = set()  # in hand
        self._settled: set[Path] = set()  # in new/ and needing nothing more (pruned on rescan)
        # A large backlog waits here, unread: two micro-batches' worth are in hand at once.
        self._slots = asyncio.Semaphore(2 * config.scoring.max_batch)
        self._stopping = False

    async def start(self, handle: Handler, context: Context) -> None:
        """Repair what a crash left, watch every new/, then take what was already waiting."""
        where = self.where or "maildir"
        for i, root in enumerate(self.roots):
            if not all((root / sub).is_dir() for sub in ("tmp", "new", "cur")):
                raise ConfigError(f"{where}.paths[{i}]: {root}: not a Maildir (tmp/, new/, cur/)")
        self._handle_mail, self._context = handle, context
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._recover)
        observer = Observer()
        events = _Events(self._loop, self._submit)
        for root in self.roots:
            observer.schedule(
                events, str(root / "new"), event_filter=[FileCreatedEvent, FileMovedEvent]
            )
        await asyncio.to_thread(observer.start)
        self._observer = observer
        await self._rescan()  # after the watch began, so nothing falls in between
        self._rescans = asyncio.create_task(self._rescan_periodically())
        log.info("source=%s watching %s", self.name or "maildir", ", ".join(map(str, self.roots)))

    async def stop_accepting(self) -> None:
        """Stop watching and rescanning; what arrives from now on waits in new/."""
        self._stopping = True
        if self._rescans is not None:
            self._rescans.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rescans
        if self._observer is not None:
            self._observer.stop()
            await asyncio.to_thread(self._observer.join)

    async def drain(self, timeout: float) -> None:
        """Finish the messages being scored (at most `timeout`; the rest stay in new/)."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)

    # --- finding messages ------------------------------------------------------------------

    def _submit(self, path: Path) -> None:
        """Handle a message in new/ unless it is in hand, settled or not a message (dotfile)."""
        if self._stopping or path.name.startswith("."):
            return
        if path in self._busy or path in self._settled:
            return
        self._busy.add(path)
        task = asyncio.get_running_loop().create_task(self._handle(path))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _listing(self) -> list[Path]:
        return [
            path
            for root in self.roots
            for path in sorted((root / "new").iterdir())
            if not path.name.startswith(".")
        ]

    async def _rescan(self) -> None:
        known = set(self._settled)
        waiting = await asyncio.to_thread(self._listing)
        self._settled -= known - set(waiting)  # forget what left new/ (not what came since)
        for path in waiting:
            self._submit(path)

    async def _rescan_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.rescan_seconds)
            try:
                await self._rescan()
            except OSError as e:  # a Maildir went away: say so, keep watching the others
                log.error("source=maildir rescan failed: %s", e)

    # --- one message -----------------------------------------------------------------------

    async def _handle(self, path: Path) -> None:
        """Score one message and settle it. Whatever fails, the original stays where it is
        and the next rescan tries again."""
        assert self._handle_mail is not None and self._context is not None
        began = time.monotonic()
        try:
            async with self._slots:
                if self._stopping:  # not started: it waits in new/ for the next start
                    return
                found = await asyncio.to_thread(self._load, path)
                if found is None:
                    return
                if found.scored:
                    self._settled.add(path)
                    return
                mail = Mail(found.raw, origin=str(path))
                outcome = await self._handle_mail(mail, can_reject=False)
                where = ""
                if outcome.disposition != "tempfail":
                    try:
                        where = await asyncio.to_thread(self._settle, found, outcome)
                    except OSError as e:  # e.g. the quarantine's disk full or read-only
                        if outcome.disposition == "deliver":
                            raise
                        why = f"{outcome.disposition} failed: {type(e).__name__}: {e}"
                        outcome = self._context.failure(mail, why)
                        if outcome.disposition != "tempfail":
                            where = await asyncio.to_thread(self._settle, found, outcome)
                if outcome.disposition == "tempfail":
                    log.warning(
                        "source=maildir file=%s action=tempfail reason=%s (retried in %g s)",
                        path,
                        outcome.note,
                        self.settings.rescan_seconds,
                    )
                    return
                verdict = outcome.verdict
                p = None if verdict is None else verdict.probability
                log.info(
                    "source=maildir message_id=%s file=%s score=%s action=%s to=%s latency_ms=%.0f",
                    mail.header("Message-ID") or "-",
                    path,
                    "-" if p is None else f"{p:.4f}",
                    "unscored" if verdict is None else verdict.action,
                    where,
                    (time.monotonic() - began) * 1000,
                )
        except Exception:
            log.exception("source=maildir file=%s failed; left in place for the next rescan", path)
        finally:
            self._busy.discard(path)

    def _load(self, path: Path) -> _Found | None:
        """The message at path; None if it is gone or not a regular file."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:  # a symlink: not ours to rewrite
                return None
            raise
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return None
            raw = f.read()
        assert self._context is not None
        return _Found(path, raw, st, self._context.tagger.previous(raw) is not None)

    def _settle(self, found: _Found, outcome: Outcome) -> str:
        """Carry out the outcome on disk (in a worker thread); says where the message went.
        A Maildir cannot refuse delivered mail, so a `reject` is quarantined too."""
        data = found.raw if outcome.data is None else outcome.data
        dest = found.root
        if outcome.disposition in ("quarantine", "reject"):
            folder = self._quarantine_folder(found.root)
            if folder is None:
                return self._to_store(found, data, outcome.verdict)
            _ensure_folder(folder, found.root)
            dest = folder
        target = self._replace(found, data, dest)
        return "gone (moved or removed meanwhile, left there)" if target is None else str(target)

    def _quarantine_folder(self, root: Path) -> Path | None:
        """The quarantine Maildir for messages from root; None for the quarantine store."""
        to = self.settings.quarantine_folder
        if to == "store":
            return None
        return root / to if to.startswith(".") else Path(to).expanduser()

    def _replace(self, found: _Found, data: bytes, dest: Path) -> Path | None:
        """Put data into Maildir dest's new/ in place of the original; None if the original
        was moved or removed meanwhile (it stays where it went, our copy is dropped)."""
        name = successor_name(found.path.name, data)
        tmp = maildir.write_temp(dest / "tmp", data, name, like=found.stat)
        try:
            held = found.root / "tmp" / (found.path.name + HELD)
            try:
                os.rename(found.path, held)  # the claim: fails if the original is gone
            except FileNotFoundError:
                return None
            try:
                target = self._link(tmp, dest / "new" / name, len(data))
                maildir.fsync_dir(target.parent)
                if target.parent != found.path.parent:
                    maildir.fsync_dir(found.path.parent)
            except BaseException:
                _put_back(held, found.path)
                raise
            held.unlink()
            return target
        finally:
            tmp.unlink(missing_ok=True)

    def _link(self, tmp: Path, target: Path, size: int) -> Path:
        """Link tmp in as target, never replacing a file (a name taken in a shared quarantine
        folder gets a fresh one). Each name is marked settled first, so the watcher's event
        for our own file is ignored."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._settled.add, target)
        try:
            os.link(tmp, target)
        except FileExistsError:
            target = target.with_name(f"{maildir.unique_name()},S={size}")
            self._loop.call_soon_threadsafe(self._settled.add, target)
            os.link(tmp, target)
        return target

    def _to_store(self, found: _Found, data: bytes, verdict: Verdict | None) -> str:
        """Hold the tagged copy in the quarantine store, then remove the original; undone if
        a mail client took the original meanwhile."""
        assert self._context is not None
        store = self._context.store
        qid = store.add(Mail(data, origin=str(found.path)), verdict)
        try:
            found.path.unlink()
        except FileNotFoundError:
            store.delete(qid)
            return "gone (moved or removed meanwhile, left there)"
        maildir.fsync_dir(found.path.parent)
        return f"quarantine:{qid}"

    # --- after a crash ---------------------------------------------------------------------

    def _recover(self) -> None:
        """Put back each original a crash left claimed in tmp/, unless its successor is in
        new/ or cur/ of its Maildir or quarantine folder (then the held copy is a spare)."""
        for root in self.roots:
            held = [p for p in (root / "tmp").iterdir() if p.name.endswith(HELD)]
            if not held:
                continue
            folders = [root, self._quarantine_folder(root)]
            present = {
                _unique(p.name)
                for folder in folders
                if folder is not None
                for sub in ("new", "cur")
                if (folder / sub).is_dir()
                for p in (folder / sub).iterdir()
            }
            for path in held:
                name = path.name.removesuffix(HELD)
                if _unique(name) in present:
                    path.unlink()
                else:
                    _put_back(path, root / "new" / name)
                    log.warning("source=maildir file=%s put back after a crash", name)

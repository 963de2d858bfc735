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

Hostile files: what is not a regular file in new/ (a FIFO, a device, a folder, a symlink)
is never read, only logged once and left alone; a message over `max_message_bytes` is
scored from its head and tail (read from the file, never whole) and left untagged where it
lies; destination folders are written through descriptors opened without following
symlinks (filterd.store.maildir.open_maildir), so a link the mailbox's user made cannot
lead a write into another Maildir. Blocking file work runs on this source's own few
threads, never on asyncio's default executor that other sources share, and drain() ends
at its timeout whatever those threads are stuck on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import queue
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field
from watchdog.events import (
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from filterd.builtin.maildir_moves import MoveLearner
from filterd.config import Config, ConfigError
from filterd.mail import Mail
from filterd.plugin_api import Context, Handler, Options, Outcome, Source
from filterd.store import maildir
from filterd.verdict import Verdict, log_fields

log = logging.getLogger("filterd.maildir")

HELD = ".filterd-held"  # suffix of an original claimed into tmp/ while its successor is placed
_SIZE_FIELD = re.compile(r",([SW])=[0-9]+")
_WORKERS = 4  # threads for this source's file work: a few suffice, the model is the bottleneck
MAX_MESSAGE_BYTES = 52_428_800  # the SMTP source's default (smtp.max_message_bytes)
_T = TypeVar("_T")


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


def _put_back(here: maildir.Dirs, held: str, name: str) -> None:
    """Return a claimed original (tmp/held) to new/, under a fresh name if its own is taken."""
    link = {"src_dir_fd": here.tmp, "dst_dir_fd": here.new, "follow_symlinks": False}
    try:
        os.link(held, name, **link)
    except FileExistsError:
        os.link(held, maildir.unique_name(), **link)
    os.fsync(here.new)
    os.unlink(held, dir_fd=here.tmp)


def read_head_and_tail(fd: int, size: int, max_bytes: int) -> bytes:
    """At most max_bytes of the file's `size`: the first 3/4 and the last 1/4, each cut at a
    line start, as filterd.text.head_and_tail cuts a message in memory (without the MIME
    headers it brings back from the middle: finding them would read the whole file). Only
    the parts kept are read (max_bytes + 1 bytes), so a huge or sparse file costs no more
    memory than a small one; pread, not mmap, so a file truncated meanwhile reads short
    instead of killing the process with SIGBUS."""
    if size <= max_bytes:
        return _pread(fd, size, 0)
    head = _pread(fd, max_bytes * 3 // 4, 0)
    cut = head.rfind(b"\n") + 1 or len(head)
    tail = size - (max_bytes - cut)
    last = _pread(fd, size - tail + 1, tail - 1)  # from one byte before, as head_and_tail
    return head[:cut] + last[last.find(b"\n") + 1 or 1 :]


def _pread(fd: int, length: int, offset: int) -> bytes:
    """length bytes at offset, fewer only at the end of the file."""
    parts = []
    while length > 0 and (part := os.pread(fd, min(length, 1 << 24), offset)):
        parts.append(part)
        length -= len(part)
        offset += len(part)
    return b"".join(parts)


def _kind(mode: int) -> str:
    """What a file that is not a message is, for the log."""
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


class _NotAMessage(Exception):
    """A file in new/ that is no message (a FIFO, a device, a folder, a symlink)."""


class _Workers:
    """This source's own threads for its blocking file work, a fixed few: a file that
    blocks (a hung network filesystem) stalls this source alone, never asyncio's default
    executor that other sources share. Daemon threads: one stuck for good neither holds up
    drain() nor keeps the process from exiting."""

    def __init__(self, count: int, name: str = "filterd-maildir"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._count = count
        for i in range(count):
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True).start()

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """fn(*args) in one of the threads. Cancelling the wait does not stop a call that
        began (each is safe to finish alone); one not begun yet is dropped."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        return await future

    def close(self) -> None:
        """Each thread ends once free; calls still queued are dropped (none waits for them)."""
        for _ in range(self._count):
            self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, fn, args = job
            if future.cancelled():  # its waiter gave up (drain's timeout): never begun
                continue
            try:
                result, error = fn(*args), None
            except BaseException as e:  # handed to the waiting task, which raises it
                result, error = None, e
            try:
                loop.call_soon_threadsafe(_resolve, future, result, error)
            except RuntimeError:  # the event loop is closed: nobody waits any more
                log.debug("source=maildir result of %s dropped: event loop closed", fn)


def _resolve(future: asyncio.Future, result: object, error: BaseException | None) -> None:
    if future.done():  # cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


async def _in_own_thread(fn: Callable[[], object]) -> None:
    """fn() on a thread of its own: the watcher's start and join must not queue behind
    file work that may be stuck."""
    once = _Workers(1, "filterd-maildir-watch")
    try:
        await once.run(fn)
    finally:
        once.close()


@dataclass(frozen=True)
class _Found:
    path: Path  # <maildir>/new/<name>
    raw: bytes  # the whole message, or its head and tail if over max_message_bytes
    stat: os.stat_result
    scored: bool  # it carries a valid marker: scored here already
    whole: bool = True  # False: over max_message_bytes, raw is only its head and tail

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
    # Larger messages are scored from their head and tail (limits.max_bytes) and left
    # untagged where they lie, never read whole or rewritten.
    max_message_bytes: int = Field(MAX_MESSAGE_BYTES, ge=1024)


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
        self._workers: _Workers | None = None
        self._rescans: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._busy: set[Path] = set()  # in hand
        self._settled: set[Path] = set()  # in new/ and needing nothing more (pruned on rescan)
        # A large backlog waits here, unread: two micro-batches' worth are in hand at once.
        self._slots = asyncio.Semaphore(2 * config.scoring.max_batch)
        self._stopping = False
        self._moves: MoveLearner | None = None  # learning.maildir_moves

    def preflight(self) -> None:
        """Every watched path must be a Maildir already: filterd never creates the mailbox."""
        where = self.where or "maildir"
        for i, root in enumerate(self.roots):
            if not all((root / sub).is_dir() for sub in ("tmp", "new", "cur")):
                raise ConfigError(f"{where}.paths[{i}]: {root}: not a Maildir (tmp/, new/, cur/)")
        if self.config.learning.maildir_moves and not self.settings.quarantine_folder.startswith(
            "."
        ):
            raise ConfigError(
                f"learning.maildir_moves needs {where}.quarantine_folder to be a Maildir++ "
                "folder such as .Junk (with store, a correction is `filterd quarantine release`)"
            )

    async def start(self, handle: Handler, context: Context) -> None:
        """Repair what a crash left, watch every new/, then take what was already waiting."""
        self.preflight()
        self._handle_mail, self._context = handle, context
        self._loop = asyncio.get_running_loop()
        self._workers = _Workers(_WORKERS)
        try:
            await self._workers.run(self._recover)
            observer = Observer()
            events = _Events(self._loop, self._submit)
            for root in self.roots:
                observer.schedule(
                    events, str(root / "new"), event_filter=[FileCreatedEvent, FileMovedEvent]
                )
            await _in_own_thread(observer.start)
        except BaseException:
            self._workers.close()
            raise
        self._observer = observer
        if self.config.learning.maildir_moves:
            junk = self.settings.quarantine_folder
            await self._run(self._make_junk_folders)
            self._moves = MoveLearner(self.config, context.tagger, self.roots, junk, self._run)
            await _in_own_thread(lambda: self._moves.start(self._loop))
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
            await _in_own_thread(self._observer.join)
        if self._moves is not None:
            await _in_own_thread(self._moves.stop)

    async def drain(self, timeout: float) -> None:
        """Finish the messages being scored, at most `timeout` whatever a file read is stuck
        on; the rest stay in new/ for the next start."""
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=timeout)
            if late:
                log.warning(
                    "source=maildir %d messages not settled within %g s; left in new/",
                    len(late),
                    timeout,
                )
            for task in late:
                task.cancel()
        if self._workers is not None:
            self._workers.close()

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        assert self._workers is not None
        return await self._workers.run(fn, *args)

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
        """What waits in each new/ (dotfiles aside); a new/ that is a symlink is not read."""
        waiting = []
        for root in self.roots:
            try:
                fd = maildir.open_folder(root / "new")
            except maildir.NotAFolder as e:
                log.error("source=maildir %s not scanned: %s", root, e)
                continue
            try:
                names = sorted(os.listdir(fd))
            finally:
                os.close(fd)
            waiting += [root / "new" / n for n in names if not n.startswith(".")]
        return waiting

    async def _rescan(self) -> None:
        known = set(self._settled)
        waiting = await self._run(self._listing)
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
                try:
                    found = await self._run(self._load, path)
                except _NotAMessage as e:  # logged once: settled until it leaves new/
                    self._settled.add(path)
                    log.warning("source=maildir file=%s is %s, not a message; left alone", path, e)
                    return
                except maildir.NotAFolder as e:  # new/ is a symlink: never read through it
                    self._settled.add(path)
                    log.error("source=maildir file=%s not read: %s", path, e)
                    return
                if found is None:
                    return
                if found.scored:
                    self._settled.add(path)
                    return
                mail = Mail(found.raw, origin=str(path))
                outcome = await self._handle_mail(mail, can_reject=False)
                where = ""
                if not found.whole and outcome.disposition != "tempfail":
                    self._settled.add(path)
                    size, limit = found.stat.st_size, self.settings.max_message_bytes
                    where = f"left untagged ({size} bytes, over max_message_bytes {limit})"
                elif outcome.disposition != "tempfail":
                    try:
                        where = await self._run(self._settle, found, outcome)
                    except maildir.NotAFolder as e:  # the user's symlink: not until restart
                        self._settled.add(path)
                        log.error("source=maildir file=%s left as it is: %s", path, e)
                        return
                    except OSError as e:  # e.g. the quarantine's disk full or read-only
                        if outcome.disposition == "deliver":
                            raise
                        why = f"{outcome.disposition} failed: {type(e).__name__}: {e}"
                        outcome = self._context.failure(mail, why)
                        if outcome.disposition != "tempfail":
                            where = await self._run(self._settle, found, outcome)
                if outcome.disposition == "tempfail":
                    log.warning(
                        "source=maildir file=%s action=tempfail reason=%s (retried in %g s)",
                        path,
                        outcome.note,
                        self.settings.rescan_seconds,
                    )
                    return
                log.log(
                    logging.INFO if found.whole else logging.WARNING,
                    "source=maildir message_id=%s file=%s %s to=%s latency_ms=%.0f",
                    mail.header("Message-ID") or "-",
                    path,
                    log_fields(outcome.verdict),
                    where,
                    (time.monotonic() - began) * 1000,
                )
        except Exception:
            log.exception("source=maildir file=%s failed; left in place for the next rescan", path)
        finally:
            self._busy.discard(path)

    def _load(self, path: Path) -> _Found | None:
        """The message at path (its head and tail only if over max_message_bytes); None if
        it is gone. Read through new/ opened without following a symlink (NotAFolder if
        it is one). Anything but a regular file raises _NotAMessage unread: a FIFO is
        opened only without blocking (else a thread would wait for a writer for ever), a
        device, socket or folder not at all."""
        folder = maildir.open_folder(path.parent)
        try:
            try:
                mode = os.stat(path.name, dir_fd=folder, follow_symlinks=False).st_mode
                if not stat.S_ISREG(mode):
                    raise _NotAMessage(_kind(mode))
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
                fd = os.open(path.name, flags, dir_fd=folder)
            except FileNotFoundError:
                return None
            except OSError as e:
                if e.errno == errno.ELOOP:  # became a symlink since the stat
                    raise _NotAMessage("a symlink") from e
                raise
        finally:
            os.close(folder)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # swapped in since the stat
                raise _NotAMessage(_kind(st.st_mode))
            limit = self.settings.max_message_bytes
            raw = f.read(limit + 1) if st.st_size <= limit else b""
            whole = len(raw) <= limit and st.st_size <= limit
            if not whole:  # over the limit (or grown past it since the fstat)
                st = os.fstat(fd)
                raw = read_head_and_tail(fd, st.st_size, self.config.limits.max_bytes)
        assert self._context is not None
        scored = self._context.tagger.previous(raw) is not None
        return _Found(path, raw, st, scored, whole)

    def _settle(self, found: _Found, outcome: Outcome) -> str:
        """Carry out the outcome on disk (in a worker thread); says where the message went.
        A Maildir cannot refuse delivered mail, so a `reject` is quarantined too. A
        quarantine folder that is a symlink is refused: the message is tagged in place."""
        data = found.raw if outcome.data is None else outcome.data
        with maildir.open_maildir(found.root, follow=True) as here:
            dest = here
            if outcome.disposition in ("quarantine", "reject"):
                folder = self._quarantine_folder(found.root)
                if folder is None:
                    return self._to_store(found, here, outcome.verdict)
                try:
                    dest = self._open_folder(folder, here)
                except maildir.NotAFolder as e:
                    log.error(
                        "source=maildir file=%s quarantine folder %s refused: %s; tagged in place",
                        found.path,
                        folder,
                        e,
                    )
            try:
                target = self._replace(found, data, here, dest)
            finally:
                if dest is not here:
                    dest.close()
            if self._moves is not None and dest is not here and target is not None:
                self._moves.filed(data)  # moving it back out is then a correction
        return "gone (moved or removed meanwhile, left there)" if target is None else str(target)

    def _quarantine_folder(self, root: Path) -> Path | None:
        """The quarantine Maildir for messages from root; None for the quarantine store."""
        to = self.settings.quarantine_folder
        if to == "store":
            return None
        return root / to if to.startswith(".") else Path(to).expanduser()

    def _make_junk_folders(self) -> None:
        """Each Junk folder made now, if missing, so its moves can be watched."""
        for root in self.roots:
            with maildir.open_maildir(root, follow=True) as here:
                self._open_folder(root / self.settings.quarantine_folder, here).close()

    def _open_folder(self, folder: Path, here: maildir.Dirs) -> maildir.Dirs:
        """The quarantine Maildir held open, made if missing with the watched Maildir's mode
        and owner (so its user can read it); a Maildir++ subfolder (opened inside the
        watched one, never through a symlink) gets its `maildirfolder` file."""
        st = os.fstat(here.root)
        mode = stat.S_IMODE(st.st_mode)
        owner = (st.st_uid, st.st_gid) if os.geteuid() != st.st_uid else None
        inside = folder.parent == here.path
        dest = maildir.open_maildir(
            folder, at=here.root if inside else None, follow=not inside, mode=mode, owner=owner
        )
        if inside:
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open("maildirfolder", flags, 0o600, dir_fd=dest.root)
            except FileExistsError:
                return dest
            except BaseException:
                dest.close()
                raise
            try:
                if owner is not None:
                    os.fchown(fd, *owner)
            finally:
                os.close(fd)
        return dest

    def _replace(
        self, found: _Found, data: bytes, here: maildir.Dirs, dest: maildir.Dirs
    ) -> Path | None:
        """Put data into dest's new/ in place of the original in here's new/; None if the
        original was moved or removed meanwhile (it stays where it went, our copy is
        dropped). Every step goes through the folders' descriptors."""
        name = successor_name(found.path.name, data)
        tmp = maildir.write_temp(
            dest.path / "tmp", data, name, like=found.stat, dir_fd=dest.tmp
        ).name
        try:
            held = found.path.name + HELD
            try:  # the claim: fails if the original is gone
                os.rename(found.path.name, held, src_dir_fd=here.new, dst_dir_fd=here.tmp)
            except FileNotFoundError:
                return None
            try:
                target = self._link(tmp, dest, name, len(data))
                os.fsync(dest.new)
                if dest is not here:
                    os.fsync(here.new)
            except BaseException:
                _put_back(here, held, found.path.name)
                raise
            os.unlink(held, dir_fd=here.tmp)
            return target
        finally:
            with contextlib.suppress(FileNotFoundError):  # not there if write_temp failed
                os.unlink(tmp, dir_fd=dest.tmp)

    def _link(self, tmp: str, dest: maildir.Dirs, name: str, size: int) -> Path:
        """Link dest's tmp/tmp in as new/name, never replacing a file (a name taken in a
        shared quarantine folder gets a fresh one). Each name is marked settled first, so
        the watcher's event for our own file is ignored."""
        assert self._loop is not None
        link = {"src_dir_fd": dest.tmp, "dst_dir_fd": dest.new, "follow_symlinks": False}
        target = dest.path / "new" / name
        self._loop.call_soon_threadsafe(self._settled.add, target)
        try:
            os.link(tmp, name, **link)
        except FileExistsError:
            target = target.with_name(f"{maildir.unique_name()},S={size}")
            self._loop.call_soon_threadsafe(self._settled.add, target)
            os.link(tmp, target.name, **link)
        return target

    def _to_store(self, found: _Found, here: maildir.Dirs, verdict: Verdict | None) -> str:
        """Hold the original in the quarantine store, byte for byte as the SMTP source does
        (a release re-tags it), then remove it here; undone if a mail client took the
        original meanwhile."""
        assert self._context is not None
        store = self._context.store
        qid = store.add(Mail(found.raw, origin=str(found.path)), verdict)
        try:
            os.unlink(found.path.name, dir_fd=here.new)
        except FileNotFoundError:
            store.delete(qid)
            return "gone (moved or removed meanwhile, left there)"
        os.fsync(here.new)
        return f"quarantine:{qid}"

    # --- after a crash ---------------------------------------------------------------------

    def _recover(self) -> None:
        """Put back each original a crash left claimed in tmp/, unless its successor is in
        new/ or cur/ of its Maildir or quarantine folder (then the held copy is a spare)."""
        for root in self.roots:
            try:
                here = maildir.open_maildir(root, follow=True)
            except maildir.NotAFolder as e:  # one user's symlink must not stop the others
                log.error("source=maildir %s not recovered: %s", root, e)
                continue
            with here:
                held = [n for n in os.listdir(here.tmp) if n.endswith(HELD)]
                if held:
                    self._put_back_held(here, held)

    def _put_back_held(self, here: maildir.Dirs, held: list[str]) -> None:
        """Put back or (where the successor is present) delete the held originals."""
        present = {_unique(n) for sub in ("new", "cur") for n in here.names(sub)}
        folder = self._quarantine_folder(here.path)
        if folder is not None:  # a missing or symlinked one holds nothing of ours
            try:
                inside = folder.parent == here.path
                at = here.root if inside else None
                with maildir.open_maildir(folder, at=at, follow=not inside) as there:
                    present |= {_unique(n) for sub in ("new", "cur") for n in there.names(sub)}
            except (FileNotFoundError, maildir.NotAFolder) as e:
                log.info("source=maildir %s not searched for successors: %s", folder, e)
        for spare in held:
            name = spare.removesuffix(HELD)
            if _unique(name) in present:
                os.unlink(spare, dir_fd=here.tmp)
            else:
                _put_back(here, spare, name)
                log.warning("source=maildir file=%s put back after a crash", name)

"""The Maildir source against hostile files: FIFOs and other non-files in new/, a worker stuck
for good, a huge (sparse) message, and symlinked destination folders (issue 12)."""

import asyncio
import logging
import os
import random
import stat
import threading
import time
import tracemalloc

import pytest

from filterd.builtin.maildir_source import MaildirOptions, MaildirSource, read_head_and_tail
from filterd.builtin.smtp_proxy import SmtpOptions
from filterd.store import maildir
from filterd.text import head_and_tail
from tests.test_maildir_source import (
    assert_tagged,
    files,
    message,
    source,
    tagged_files,
    until,
)

FIFOS = 8  # more than asyncio's default executor has threads on this 2-core machine (6)


def tagged_regular(folder):
    """tagged_files, never opening what is not a regular file (reading a FIFO blocks)."""
    regular = [p for p in folder.iterdir() if stat.S_ISREG(os.lstat(p).st_mode)]
    return [p for p in regular if b"X-Spam-Marker: v" in p.read_bytes()]


def unblock(paths) -> None:
    """Open each FIFO for writing and close it: a reader stuck in open() or read() (the
    defect) gets EOF and returns, so a failing test ends instead of hanging."""
    for path in paths:
        try:
            os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))
        except OSError as e:
            logging.getLogger(__name__).info("unblock %s: %s", path, e)


def test_fifos_in_new_are_skipped_once_and_starve_nothing(tmp_path, ham, caplog):
    md = maildir.ensure(tmp_path / "Maildir")
    fifos = [md / "new" / f"17000001{i:02d}.F{i}.host" for i in range(FIFOS)]
    for path in fifos:
        os.mkfifo(path)
    os.symlink(md / "cur", md / "new" / "1700000200.L1.host")  # a symlink: skipped as well
    caplog.set_level(logging.INFO, "filterd.maildir")
    src = source(tmp_path, ham)
    stopped_in = []

    async def main():
        try:
            await asyncio.wait_for(src.start(), 10)
            maildir.deliver(md, message(1), "1700000300.M1P1.host")
            await until(lambda: len(tagged_regular(md / "new")) == 1)
            # asyncio's default executor, which other sources share, is free meanwhile
            assert await asyncio.wait_for(asyncio.to_thread(lambda: 42), 5) == 42
            await asyncio.sleep(0.35)  # several rescans: each FIFO is still logged only once
            began = time.monotonic()
            await src.source.stop_accepting()
            await src.source.drain(2)
            stopped_in.append(time.monotonic() - began)
        finally:
            unblock(fifos)

    asyncio.run(main())
    print(f"measured: stop with {FIFOS} FIFOs in new/ took {stopped_in[0]:.3f} s")
    assert stopped_in[0] < 2  # drain's timeout; measured: 0.14 s
    for path in fifos:  # left alone: still FIFOs, under their own names
        assert stat.S_ISFIFO(os.lstat(path).st_mode)
    skipped = [r.getMessage() for r in caplog.records if "not a message" in r.getMessage()]
    assert len(skipped) == FIFOS + 1  # once per path, not on every rescan
    assert all("FIFO" in line for line in skipped if ".F" in line)
    assert src.engine.classifier.calls == 1
    (tagged,) = tagged_regular(md / "new")
    assert_tagged(tagged.read_bytes(), message(1), flag=False)


def test_drain_returns_within_its_timeout_whatever_a_worker_is_stuck_on(tmp_path, ham, monkeypatch):
    """Every file read hangs (a dead network filesystem): the source's own threads are stuck,
    asyncio's default executor is not, and drain gives up at its timeout."""
    md = maildir.ensure(tmp_path / "Maildir")
    release = threading.Event()
    entered = []

    def hung_load(self, path):
        entered.append(path)
        release.wait(60)
        return None

    monkeypatch.setattr(MaildirSource, "_load", hung_load)
    src = source(tmp_path, ham)
    timings = {}

    async def main():
        try:
            await src.start()
            for i in range(10):
                maildir.deliver(md, message(i), f"17000004{i:02d}.M{i}P{i}.host")
            await until(lambda: len(entered) >= 4)
            began = time.monotonic()
            assert await asyncio.wait_for(asyncio.to_thread(lambda: 42), 5) == 42
            timings["to_thread"] = time.monotonic() - began
            began = time.monotonic()
            await asyncio.wait_for(src.source.stop_accepting(), 10)
            await asyncio.wait_for(src.source.drain(1.0), 10)
            timings["stop"] = time.monotonic() - began
        finally:
            release.set()

    asyncio.run(main())
    print(
        f"measured: to_thread {timings['to_thread']:.3f} s, stop+drain(1) {timings['stop']:.3f} s"
    )
    assert timings["to_thread"] < 1.0  # not blocked (it would wait for ever); measured: 3 ms
    assert timings["stop"] < 2.0  # drain(1.0); measured: 1.003 s
    assert len(entered) == 4  # its own pool of 4 threads: the other 6 reads never began
    assert len(files(md / "new")) == 10  # untouched, there for the next start


def test_a_huge_sparse_message_is_scored_from_head_and_tail_and_left_as_it_is(
    tmp_path, spam, caplog
):
    md = maildir.ensure(tmp_path / "Maildir")
    path = md / "new" / "1700000500.M5P5.host"
    size = 1 << 30  # 1 GiB, all but the first and last kilobytes a hole
    with open(path, "wb") as f:
        f.write(message(5) + b"\r\n")
        f.seek(size - 1024)
        f.write(b"tail line\r\n" * 93)
        f.truncate(size)
    os.utime(path, (1_600_000_000, 1_600_000_000))
    before = os.stat(path)
    caplog.set_level(logging.INFO, "filterd.maildir")
    src = source(tmp_path, spam, {"quarantine_threshold": 0.8})
    sizes = []
    score_messages = src.engine.classifier.score_messages

    def measured(raws, progress=None):
        sizes.extend(len(raw) for raw in raws)
        return score_messages(raws, progress)

    src.engine.classifier.score_messages = measured

    async def main():
        await src.start()
        await until(lambda: "max_message_bytes" in caplog.text, timeout=30)
        await asyncio.sleep(0.35)  # rescans: not read again
        await src.stop()

    tracemalloc.start()
    began = time.monotonic()
    try:
        asyncio.run(main())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"measured: 1 GiB sparse: peak {peak / 2**20:.1f} MiB, {time.monotonic() - began:.2f} s")
    assert peak < 32 * 2**20, f"peak {peak / 2**20:.1f} MiB"  # measured: 3.4 MiB
    assert sizes == [len(message(5)) + 2 + 1013]  # the head, and the tail from a line start
    after = os.stat(path)  # untouched: same file, still sparse, not rewritten
    assert (after.st_ino, after.st_size, after.st_mtime) == (before.st_ino, size, 1_600_000_000)
    assert after.st_blocks * 512 < 1 << 20
    assert files(md / "new") == [path.name] and files(md / "tmp") == []
    assert not (md / ".Junk").exists()
    (line,) = [r for r in caplog.records if "max_message_bytes" in r.getMessage()]
    assert line.levelno == logging.WARNING and "score=0.8808" in line.getMessage()
    assert "action=quarantine" in line.getMessage() and "left untagged" in line.getMessage()


def test_max_message_bytes_option(tmp_path, ham, caplog):
    default = MaildirOptions.model_fields["max_message_bytes"].default
    assert default == SmtpOptions.model_fields["max_message_bytes"].default == 52_428_800
    md = maildir.ensure(tmp_path / "Maildir")
    small, big = message(6), message(7) + b"x" * 5000
    caplog.set_level(logging.INFO, "filterd.maildir")
    src = source(tmp_path, ham, max_message_bytes=4096)

    async def main():
        await src.start()
        maildir.deliver(md, small, "1700000600.M6P6.host")
        maildir.deliver(md, big, "1700000700.M7P7.host")
        await until(lambda: tagged_files(md / "new") and "max_message_bytes" in caplog.text)
        await src.stop()

    asyncio.run(main())
    (tagged,) = tagged_files(md / "new")
    assert_tagged(tagged.read_bytes(), small, flag=False)
    assert (md / "new" / "1700000700.M7P7.host").read_bytes() == big
    assert src.engine.classifier.calls == 2


def head_and_tail_at_lines(data: bytes, max_bytes: int) -> bytes:
    """The rule read_head_and_tail follows, on bytes in memory: the first 3/4 and the last
    1/4, each cut at a line start."""
    if len(data) <= max_bytes:
        return data
    head = max_bytes * 3 // 4
    cut = data.rfind(b"\n", 0, head) + 1 or head
    tail = len(data) - (max_bytes - cut)
    resume = data.find(b"\n", tail - 1) + 1 or tail
    return data[:cut] + data[resume:]


@pytest.mark.parametrize("size", [0, 10, 999, 1000, 1001, 1500, 4000, 20_000])
@pytest.mark.parametrize("seed", [1, 2])
def test_read_head_and_tail_reads_the_head_and_the_tail_at_line_starts(tmp_path, size, seed):
    rng = random.Random(seed)
    data = bytes(rng.choice(b"ab\n" if seed == 1 else b"abcdefgh") for _ in range(size))
    path = tmp_path / "m"
    path.write_bytes(data)
    with open(path, "rb") as f:
        sample = read_head_and_tail(f.fileno(), size, 1000)
    assert sample == head_and_tail_at_lines(data, 1000)
    assert len(sample) <= 1000
    if size <= 1000:
        assert sample == data == head_and_tail(data, 1000)


@pytest.mark.parametrize("link", [".Junk", ".Junk/new", ".Junk/tmp"])
def test_symlinked_quarantine_folder_is_refused(tmp_path, spam, caplog, link):
    """The mailbox's user points .Junk (or its new/ or tmp/) at another user's Maildir: run
    as root, the watcher must not write there. The message is tagged in place instead."""
    md = maildir.ensure(tmp_path / "Maildir")
    other = maildir.ensure(tmp_path / "other")
    if link == ".Junk":
        os.symlink(other, md / ".Junk")
    else:
        maildir.ensure(md / ".Junk")
        sub = link.rpartition("/")[2]
        os.rmdir(md / ".Junk" / sub)
        os.symlink(other / sub, md / ".Junk" / sub)
    caplog.set_level(logging.INFO, "filterd.maildir")
    src = source(tmp_path, spam, {"quarantine_threshold": 0.8})

    async def main():
        await src.start()
        maildir.deliver(md, message(8), "1700000800.M8P8.host")
        await until(lambda: tagged_files(md / "new"))
        await src.stop()

    asyncio.run(main())
    assert files(other / "new") == files(other / "tmp") == files(other / "cur") == []
    assert not (other / "maildirfolder").exists()
    (tagged,) = tagged_files(md / "new")
    assert_tagged(tagged.read_bytes(), message(8), flag=True)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    errors = [e for e in errors if e.startswith("source=maildir")]  # not watchdog's own
    assert len(errors) == 1 and "refused" in errors[0] and "tagged in place" in errors[0]
    assert src.engine.classifier.calls == 1


def test_symlinked_folder_of_the_watched_maildir_is_not_written_through(tmp_path, ham, caplog):
    """new/ is watched; tmp/ is the user's symlink to another Maildir's tmp/: nothing is
    claimed into it or written through it; the message stays as it is."""
    md = maildir.ensure(tmp_path / "Maildir")
    other = maildir.ensure(tmp_path / "other")
    os.rmdir(md / "tmp")
    os.symlink(other / "tmp", md / "tmp")
    seen = []
    real = maildir.write_temp

    def watched(tmp_dir, data, name, like=None, **kw):
        seen.append(os.path.realpath(tmp_dir))
        return real(tmp_dir, data, name, like, **kw)

    src = source(tmp_path, ham)

    async def main():
        maildir.write_temp = watched
        try:
            await src.start()
            (md / "new" / "1700000900.M9P9.host").write_bytes(message(9))
            await until(lambda: src.engine.classifier.calls == 1)
            await asyncio.sleep(0.3)
            await src.stop()
        finally:
            maildir.write_temp = real

    asyncio.run(main())
    assert str(other / "tmp") not in seen
    assert files(other / "tmp") == files(other / "new") == []
    assert (md / "new" / "1700000900.M9P9.host").read_bytes() == message(9)
    assert src.engine.classifier.calls == 1  # said once, not scored again at each rescan
    assert "a symlink or not a folder, refused" in caplog.text

"""The Maildir source with the real watchdog observer, real files and a tiny real model."""

import asyncio
import contextlib
import logging
import os
import re
import time

import pytest

from filterd.builtin.maildir_source import HELD, MaildirSource, successor_name
from filterd.config import Config, ConfigError
from filterd.daemon import load_sources
from filterd.engine import Engine
from filterd.headers import Tagger
from filterd.store import maildir

KEY = b"k" * 32
OLD = 1_600_000_000  # an mtime well in the past, to see it kept


def message(n: int) -> bytes:
    """Mixed line ends, 8-bit bytes, no final newline: all must survive tagging unchanged."""
    return (
        b"From: Ann <ann@example.org>\r\nSubject: note %d\r\nMessage-ID: <%d@example.org>\r\n"
        b"\r\nBody line one.\r\ncaf\xc3\xa9 line two\nno final newline" % (n, n)
    )


class Counted:
    """The tiny classifier, counting every message sent to it; `fail` makes it raise."""

    def __init__(self, clf):
        self.clf, self.name, self.threshold = clf, clf.name, clf.threshold
        self.calls = 0
        self.fail = False

    def score_messages(self, raws, progress=None):
        self.calls += len(raws)
        if self.fail:
            raise RuntimeError("model down")
        return self.clf.score_messages(raws, progress)


class Running:
    """A Maildir source with the engine behind its handler, started and stopped the way the
    daemon does it."""

    def __init__(self, source: MaildirSource, engine: Engine):
        self.source, self.engine = source, engine

    async def start(self) -> None:
        await self.source.start(self.engine.handle, self.engine.context)

    async def stop(self) -> None:
        await self.source.stop_accepting()
        await self.source.drain(30)


def source(tmp_path, clf, scoring=None, actions=None, **settings) -> Running:
    config = Config.model_validate(
        {
            "scoring": scoring or {},
            "quarantine": {"path": str(tmp_path / "store")},
            "sources": [
                {
                    "name": "maildir",
                    "options": {
                        "paths": [str(tmp_path / "Maildir")],
                        "rescan_seconds": 0.1,
                        **settings,
                    },
                }
            ],
        }
    )
    (maildir_source,) = load_sources(config)
    return Running(maildir_source, Engine(Counted(clf), config, Tagger(KEY), actions=actions))


def files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def tagged_files(folder):
    found = []
    for p in folder.iterdir():
        with contextlib.suppress(FileNotFoundError):  # renamed by the source meanwhile
            if b"X-Spam-Marker: v" in p.read_bytes():
                found.append(p)
    return found


def assert_tagged(data: bytes, original: bytes, flag: bool) -> None:
    """Only our headers added on top, in the message's line ends; every original byte kept."""
    assert data.endswith(original)
    lines = data[: len(data) - len(original)].split(b"\r\n")
    assert lines[-1] == b"" and all(line.startswith(b"X-Spam-") for line in lines[:-1])
    assert lines[-2].startswith(b"X-Spam-Marker: v")  # any marker version
    assert (lines[0] == b"X-Spam-Flag: YES") == flag


def test_tags_in_place_backlog_and_arrivals_scored_once(tmp_path, ham):
    md = maildir.ensure(tmp_path / "Maildir")
    waiting = md / "new" / f"1600000000.M1P1.host,S={len(message(0))}"
    waiting.write_bytes(message(0))
    os.chmod(waiting, 0o640)
    os.utime(waiting, (OLD, OLD))
    src = source(tmp_path, ham)

    async def main():
        await src.start()
        maildir.deliver(md, message(1), f"1700000001.M2P2.host,S={len(message(1))},W=1")
        (md / "tmp" / "1700000002.M3P3.host").write_bytes(message(2))  # an MDA's rename
        os.rename(md / "tmp" / "1700000002.M3P3.host", md / "new" / "1700000002.M3P3.host")
        await until(lambda: len(tagged_files(md / "new")) == 3)
        await asyncio.sleep(0.35)  # our own renames and several rescans go by
        await src.stop()

    asyncio.run(main())
    assert src.engine.classifier.calls == 3  # each message once: none rescored
    before = {p.name: (p.read_bytes(), p.stat().st_ino) for p in (md / "new").iterdir()}
    again = source(tmp_path, ham)  # a restart: the markers alone keep them from rescoring

    async def restart():
        await again.start()
        await asyncio.sleep(0.15)
        await again.stop()

    asyncio.run(restart())
    assert again.engine.classifier.calls == 0
    assert {p.name: (p.read_bytes(), p.stat().st_ino) for p in (md / "new").iterdir()} == before
    by_id = {p.read_bytes().split(b"Message-ID: <")[1][:1]: p for p in (md / "new").iterdir()}
    assert sorted(by_id) == [b"0", b"1", b"2"] and len(files(md / "new")) == 3
    for n, path in by_id.items():
        data = path.read_bytes()
        assert_tagged(data, message(int(n)), flag=False)
        assert path.name == successor_name(path.name, data)
    assert by_id[b"0"].name == f"1600000000.M1P1.host,S={len(by_id[b'0'].read_bytes())}"
    crlf = len(by_id[b"1"].read_bytes()) + 1  # the one bare LF becomes CRLF
    assert by_id[b"1"].name == f"1700000001.M2P2.host,S={crlf - 1},W={crlf}"
    assert by_id[b"2"].name == f"1700000002.M3P3.host,S={len(by_id[b'2'].read_bytes())}"
    st = by_id[b"0"].stat()
    assert (st.st_mode & 0o777, st.st_mtime, st.st_uid) == (0o640, OLD, os.getuid())
    assert files(md / "tmp") == files(md / "cur") == [] and not (md / ".Junk").exists()


@pytest.mark.parametrize("folder", [".Junk", "store"])
def test_quarantine_moves_the_tagged_message(tmp_path, spam, folder):
    md = maildir.ensure(tmp_path / "Maildir")
    name = f"1700000003.M4P4.host,S={len(message(3))}"
    src = source(tmp_path, spam, {"quarantine_threshold": 0.8}, quarantine_folder=folder)

    async def main():
        await src.start()
        path = maildir.deliver(md, message(3), name)
        os.utime(path, (OLD, OLD))  # before the event is handled: the event loop is ours
        await until(lambda: not (md / "new" / name).exists())
        await src.stop()

    asyncio.run(main())
    assert files(md / "new") == files(md / "tmp") == files(md / "cur") == []
    if folder == "store":  # the original, byte for byte, as the SMTP source stores it
        (entry,) = src.engine.context.store.list()
        assert src.engine.context.store.read(entry.id) == message(3)
        assert entry.probability == pytest.approx(0.8808, abs=1e-4)
    else:
        junk = md / ".Junk"
        (moved,) = (junk / "new").iterdir()
        data = moved.read_bytes()
        assert moved.name == successor_name(name, data) != name
        assert moved.stat().st_mtime == OLD and moved.stat().st_mode & 0o777 == 0o600
        assert (junk / "maildirfolder").is_file() and files(junk / "tmp") == []
        assert_tagged(data, message(3), flag=True)
    assert src.engine.classifier.calls == 1


@pytest.mark.parametrize(
    ("change", "folder"), [("move", "in place"), ("remove", "in place"), ("move", ".Junk")]
)
def test_message_taken_meanwhile_is_left_where_it_went(
    tmp_path, ham, spam, monkeypatch, caplog, change, folder
):
    """The mail client moves it to cur/ (or deletes it) after scoring, before our rename."""
    md = maildir.ensure(tmp_path / "Maildir")
    name = "1700000004.M5P5.host"
    original = md / "new" / name
    write_temp = maildir.write_temp

    def client_acts_first(*args, like=None, **kwargs):
        if like is not None:  # the source's successor copy, not the test's own delivery
            if change == "move":
                os.rename(original, md / "cur" / f"{name}:2,S")
            else:
                original.unlink()
        return write_temp(*args, like=like, **kwargs)

    monkeypatch.setattr(maildir, "write_temp", client_acts_first)
    caplog.set_level(logging.INFO, "filterd.maildir")
    clf, scoring = (spam, {"quarantine_threshold": 0.8}) if folder == ".Junk" else (ham, {})
    src = source(tmp_path, clf, scoring)

    async def main():
        await src.start()
        maildir.deliver(md, message(4), name)
        await until(lambda: "gone (moved or removed" in caplog.text)
        await asyncio.sleep(0.25)  # rescans: nothing reappears
        await src.stop()

    asyncio.run(main())
    label = "spam" if folder == ".Junk" else "ham"
    assert re.search(
        rf"source=maildir message_id=<4@example.org> .* label={label} score=0\.", caplog.text
    )
    assert files(md / "new") == files(md / "tmp") == []
    assert files(md / ".Junk" / "new") == []
    if change == "move":
        assert (md / "cur" / f"{name}:2,S").read_bytes() == message(4)  # untouched
    else:
        assert files(md / "cur") == []
    assert src.engine.classifier.calls == 1


def test_failure_policies(tmp_path, ham):
    md = maildir.ensure(tmp_path / "Maildir")
    name = "1700000005.M6P6.host"
    src = source(tmp_path, ham, {"failure_policy": "tempfail"})
    src.engine.classifier.fail = True

    async def tempfail():
        await src.start()
        maildir.deliver(md, message(5), name)
        await until(lambda: src.engine.classifier.calls >= 3)  # the event, then rescans
        assert files(md / "new") == [name]
        assert (md / "new" / name).read_bytes() == message(5)  # untouched while failing
        src.engine.classifier.fail = False
        await until(lambda: tagged_files(md / "new"))
        await src.stop()

    asyncio.run(tempfail())
    (tagged,) = (md / "new").iterdir()
    assert_tagged(tagged.read_bytes(), message(5), flag=False)

    tagged.unlink()
    src = source(tmp_path, ham, {"failure_policy": "fail_open"})
    src.engine.classifier.fail = True

    async def fail_open():
        await src.start()
        maildir.deliver(md, message(6), name + ",S=1")
        await until(lambda: b"Unscored" in b"".join(p.read_bytes() for p in (md / "new").iterdir()))
        await asyncio.sleep(0.35)  # several rescans: the unscored copy is not sent again
        await src.stop()

    asyncio.run(fail_open())
    (path,) = (md / "new").iterdir()
    data = path.read_bytes()
    assert data.startswith(b"X-Spam-Status: Unscored, reason=RuntimeError: model down\r\n")
    assert data.endswith(message(6)) and path.name == f"{name},S={len(data)}"
    assert src.engine.classifier.calls == 1 and files(md / "tmp") == []


def test_start_puts_back_what_a_crash_left_held(tmp_path, ham):
    md = maildir.ensure(tmp_path / "Maildir")
    (md / "tmp" / ("1700000007.M7P7.host" + HELD)).write_bytes(message(7))  # before the link
    (md / "tmp" / ("1700000008.M8P8.host,S=9" + HELD)).write_bytes(message(8))  # after it
    (md / "cur" / "1700000008.M8P8.host,S=99:2,S").write_bytes(b"the tagged successor")
    src = source(tmp_path, ham)

    async def main():
        await src.start()
        await until(lambda: tagged_files(md / "new"))
        await src.stop()

    asyncio.run(main())
    (restored,) = (md / "new").iterdir()
    assert restored.name == f"1700000007.M7P7.host,S={restored.stat().st_size}"
    assert_tagged(restored.read_bytes(), message(7), flag=False)
    assert files(md / "tmp") == [] and files(md / "cur") == ["1700000008.M8P8.host,S=99:2,S"]


def test_settings_are_checked(tmp_path, ham):
    for bad in ("Junk", "..", "./x", ".a/b"):  # an older config's section names itself
        legacy = Config.model_validate({"maildir": {"paths": ["/x"], "quarantine_folder": bad}})
        with pytest.raises(ConfigError, match=r"^maildir\.quarantine_folder: String should"):
            load_sources(legacy)
    (tmp_path / "Maildir").mkdir()
    with pytest.raises(ConfigError, match=r"sources\[0\]\.options\.paths\[0\]: .*not a Maildir"):
        asyncio.run(source(tmp_path, ham).start())

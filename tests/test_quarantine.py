import os
import signal
import socket
import time
from datetime import datetime
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from filterd.headers import Tagger, load_secret
from filterd.mail import Mail
from filterd.store.quarantine import QuarantineError, Store
from filterd.verdict import Verdict
from tests.test_cli_score import run

RAW = b"From a@b Sat Jan  1 00:00:00 2000\r\nSubject: caf\xc3\xa9\r\n\r\nbody \xff no final EOL"
VERDICT = Verdict(0.97, True, "quarantine", 0.5, "gpt2-tiny")
TAGGER = Tagger(b"k" * 32)
# The sender's own spam headers, which must never reach the mailbox on release.
FORGED_HEAD = (
    b"X-Spam-Flag: NO\r\n"
    b"Subject: offer\r\n"
    b"x-spam-status: No, score=0.0 required=5.0\r\n"
    b"X-Spam-Marker: v1 0123456789abcdef\r\n"
    b"From: Sender <sender@example.org>\r\n"
)
FORGED_BODY = b"\r\nbody \xff\r\nX-Spam-Flag: NO (in the body it stays)\r\nno final EOL"
FORGED = FORGED_HEAD + FORGED_BODY


def stored(tmp_path, **kw):
    store = Store(tmp_path / "q", retention_days=7)
    mail = Mail(RAW, "sender@example.org", ("a@here.example", "b@here.example"))
    return store, store.add(mail, VERDICT, **kw)


def store_released(raw: bytes, qid: str) -> bytes:
    """What a release of raw must deliver (checked in detail by the tests below)."""
    verdict = Verdict(None, False, "tag", 0.5, "-", "release", f"released={qid}")
    return TAGGER.tag(raw, verdict)


def test_store_keeps_exact_bytes_envelope_and_details(tmp_path):
    store, qid = stored(tmp_path)
    assert os.stat(store.root).st_mode & 0o777 == 0o700
    assert (store.root / "new" / qid).read_bytes() == RAW
    assert os.stat(store.root / "new" / qid).st_mode & 0o777 == 0o600
    assert list((store.root / "tmp").iterdir()) == []
    assert store.read(qid) == RAW
    entry = store.get(qid)
    assert (entry.mail_from, entry.rcpt_tos, entry.probability) == (
        "sender@example.org",
        ["a@here.example", "b@here.example"],
        0.97,
    )
    assert entry.reason == "model: spam" and entry.size == len(RAW)
    assert abs(entry.time - time.time()) < 60
    assert [e.id for e in store.list()] == [qid]


def test_ids_are_validated_and_symlinks_refused(tmp_path):
    store, qid = stored(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("not mail")
    for bad in ("../../secret.txt", "/etc/passwd", f"{qid}/..", f"{qid}\n", "", qid + "0"):
        with pytest.raises(QuarantineError):
            store.read(bad)
        with pytest.raises(QuarantineError):
            store.delete(bad)
    fake = "1700000000.0123456789abcdef"
    os.symlink(secret, store.root / "new" / fake)
    with pytest.raises(QuarantineError, match="not a regular file"):
        store.read(fake)
    assert secret.exists()
    with pytest.raises(QuarantineError, match="no such message"):
        store.read("1700000000.ffffffffffffffff")


def test_message_moved_to_cur_by_a_mail_client_is_still_found(tmp_path):
    store, qid = stored(tmp_path)
    os.rename(store.root / "new" / qid, store.root / "cur" / f"{qid}:2,S")
    assert store.read(qid) == RAW and [e.id for e in store.list()] == [qid]
    store.delete(qid)
    assert store.list() == []


def test_release_to_maildir_then_deleted(tmp_path):
    store, qid = stored(tmp_path)
    target = store.release_to_maildir(qid, tmp_path / "inbox", TAGGER)
    assert target.parent == tmp_path / "inbox" / "new"
    assert target.read_bytes() == store_released(RAW, qid)
    assert store.list() == [] and not (store.root / "filterd-meta" / f"{qid}.json").exists()
    with pytest.raises(QuarantineError):
        store.read(qid)


def test_release_that_fails_keeps_the_message(tmp_path):
    store, qid = stored(tmp_path)
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    with pytest.raises(QuarantineError, match=r"not released: .*file-not-dir: a symlink or not"):
        store.release_to_maildir(qid, blocked, TAGGER)
    with pytest.raises(QuarantineError, match="did not take it"):
        store.release_smtp(qid, "127.0.0.1", 1, timeout=2, tagger=TAGGER)  # nothing on port 1
    assert store.read(qid) == RAW


class Sink:
    def __init__(self, refuse: str = ""):
        self.received = []
        self.refuse = refuse

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address == self.refuse:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.received.append((envelope.mail_from, envelope.rcpt_tos, envelope.original_content))
        return "250 OK"


@pytest.fixture
def sink():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    handler = Sink()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    yield handler, port
    controller.stop()


def test_release_over_smtp_keeps_the_envelope(tmp_path, sink):
    handler, port = sink
    store, qid = stored(tmp_path)
    handler.refuse = "b@here.example"
    with pytest.raises(QuarantineError, match=r"in part.*kept"):
        store.release_smtp(qid, "127.0.0.1", port, timeout=5, tagger=TAGGER)
    assert store.read(qid) == RAW
    handler.refuse, handler.received = "", []
    store.release_smtp(qid, "127.0.0.1", port, timeout=5, tagger=TAGGER)
    ((sender, rcpts, data),) = handler.received
    assert (sender, rcpts) == ("sender@example.org", ["a@here.example", "b@here.example"])
    released = store_released(RAW, qid)
    assert data.replace(b"\r\n", b"\n") == released.replace(b"\r\n", b"\n") + b"\n"
    assert store.list() == []


def test_expire_by_retention(tmp_path):
    store, old = stored(tmp_path, now=time.time() - 8 * 86400)
    new = store.add(Mail(b"Subject: x\n\ny"), VERDICT)
    debris = store.root / "tmp" / "leftover"
    debris.write_bytes(b"half")
    os.utime(debris, (0, 0))
    assert store.expire() == [old]
    assert [e.id for e in store.list()] == [new]
    assert not debris.exists()


# --- release: re-tagged as ham by a person's decision ---------------------------------------


def assert_released(data: bytes, qid: str, tagger: Tagger = TAGGER) -> None:
    """No X-Spam-Flag, one status saying released=ID, the sender's X-Spam-* fields gone, a
    fresh marker that verifies, the other fields and the whole body byte for byte."""
    head = data[: len(data) - len(FORGED_BODY)]
    assert data.endswith(FORGED_BODY)
    fields = head.split(b"\r\n")[:-1]
    ours = [f for f in fields if f.lower().startswith(b"x-spam-")]
    assert [f for f in fields if f not in ours] == [
        b"Subject: offer",
        b"From: Sender <sender@example.org>",
    ]
    assert not [f for f in ours if f.lower().startswith(b"x-spam-flag")]
    status = [f for f in ours if f.lower().startswith(b"x-spam-status")]
    assert status == [
        b"X-Spam-Status: No, score=0.0 required=5.0 released=%s model=-" % qid.encode()
    ]
    assert b"v1 0123456789abcdef" not in data and b"x-spam-status" not in data
    assert tagger.previous(data) == (False, None)  # our fresh marker vouches for it


def test_release_is_retagged_as_ham_and_forged_fields_are_gone(tmp_path):
    store = Store(tmp_path / "q")
    qid = store.add(Mail(FORGED, "s@example.org", ("r@example.org",)), VERDICT)
    assert store.read(qid) == FORGED  # the store keeps the original as received
    assert_released(store.released(qid, TAGGER), qid)
    target = store.release_to_maildir(qid, tmp_path / "inbox", TAGGER)
    assert_released(target.read_bytes(), qid)


@pytest.fixture
def cli_state(tmp_path, monkeypatch):
    """The CLI's state under tmp_path (its secret and quarantine), no system config."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setattr("filterd.config.DEFAULT_PATH", tmp_path / "no-default.yaml")
    return Store(tmp_path / "state" / "filterd" / "quarantine")


def test_cli_release_to_stdout_maildir_and_smtp_is_retagged(
    tmp_path, monkeypatch, capsysbinary, cli_state, sink
):
    handler, port = sink
    config = tmp_path / "config.yaml"
    config.write_text(f"relay:\n  host: 127.0.0.1\n  port: {port}\n")
    mail = Mail(FORGED, "s@example.org", ("r@example.org",))
    ids = [cli_state.add(mail, VERDICT) for _ in range(3)]
    code, out, _ = run(monkeypatch, capsysbinary, ["quarantine", "release", ids[0]])
    tagger = Tagger(load_secret(tmp_path / "state" / "filterd" / "secret"))
    assert code == 0
    assert_released(out, ids[0], tagger)
    argv = ["quarantine", "release", ids[1], "--to", tmp_path / "inbox", "--config", config]
    code, out, _ = run(monkeypatch, capsysbinary, argv)
    assert code == 0
    assert_released(Path(out.decode().strip()).read_bytes(), ids[1], tagger)
    argv = ["quarantine", "release", ids[2], "--smtp", "--config", config]
    code, out, err = run(monkeypatch, capsysbinary, argv)
    assert code == 0, err
    ((_, _, data),) = handler.received
    assert_released(data.removesuffix(b"\r\n"), ids[2], tagger)  # the final CRLF of DATA
    assert [e.id for e in cli_state.list()] == [ids[0]]  # stdout: kept


@pytest.mark.parametrize("link", ["D", "D/new", "D/tmp"])
def test_cli_release_to_a_symlinked_maildir_is_refused(
    tmp_path, monkeypatch, capsysbinary, cli_state, link
):
    """`release --to D` run as root: D (or its new/ or tmp/) is the mailbox user's symlink
    into another user's Maildir. Refused, nothing written there, the message kept."""
    victim = tmp_path / "victim"
    for sub in ("tmp", "new", "cur"):
        (victim / sub).mkdir(parents=True)
    dest = tmp_path / "D"
    if link == "D":
        os.symlink(victim, dest)
    else:
        for sub in ("tmp", "new", "cur"):
            (dest / sub).mkdir(parents=True)
        sub = link.partition("/")[2]
        os.rmdir(dest / sub)
        os.symlink(victim / sub, dest / sub)
    qid = cli_state.add(Mail(FORGED), VERDICT)
    code, out, err = run(monkeypatch, capsysbinary, ["quarantine", "release", qid, "--to", dest])
    assert (code, out) == (5, b"") and "refused" in err
    assert [list((victim / sub).iterdir()) for sub in ("tmp", "new", "cur")] == [[], [], []]
    assert cli_state.read(qid) == FORGED


# --- entries that are not regular files ---------------------------------------------------------


class Blocked(BaseException):
    """Not an OSError (as TimeoutError is), so no `except OSError` swallows it."""


@pytest.fixture
def alarm():
    """A test that regresses into blocking on a FIFO fails after 20 s instead of hanging."""

    def expired(signum, frame):
        raise Blocked("blocked for 20 s: opened a FIFO?")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


BAD_IDS = [
    "1700000001.0123456789abcdef",
    "1700000002.0123456789abcdef",
    "1700000003.0123456789abcdef",
]


def test_list_and_expire_skip_entries_that_are_not_regular_files(
    tmp_path, monkeypatch, capsysbinary, cli_state, alarm
):
    good = cli_state.add(Mail(RAW, "s@example.org", ("r@example.org",)), VERDICT)
    old = cli_state.add(Mail(RAW), VERDICT, now=time.time() - 40 * 86400)
    root = cli_state.root
    os.mkfifo(root / "new" / BAD_IDS[0])
    outside = tmp_path / "outside"
    outside.write_text("victim")
    os.symlink(outside, root / "cur" / f"{BAD_IDS[1]}:2,S")
    (root / "new" / BAD_IDS[2]).mkdir()
    (root / "filterd-meta" / f"{good}.json").unlink()
    os.mkfifo(root / "filterd-meta" / f"{good}.json")  # its details: read without blocking
    (root / "tmp" / "stale-folder").mkdir()
    os.utime(root / "tmp" / "stale-folder", (0, 0))

    code, out, err = run(monkeypatch, capsysbinary, ["quarantine", "list"])
    assert code == 0
    assert [line.split(b"\t")[0] for line in out.splitlines()] == [old.encode(), good.encode()]
    for bad in BAD_IDS:
        assert [line for line in err.splitlines() if bad in line], err
    assert "victim" not in err

    problems = []
    assert [e.id for e in cli_state.list(problems)] == [old, good]
    assert cli_state.get(good).reason == "details missing"
    assert len(problems) == 3 and all(any(b in p for p in problems) for b in BAD_IDS)

    code, out, err = run(monkeypatch, capsysbinary, ["quarantine", "expire"])
    assert (code, out) == (0, old.encode() + b"\n")
    assert all(bad in err for bad in BAD_IDS) and "stale-folder" in err
    assert [e.id for e in cli_state.list()] == [good]
    assert outside.read_text() == "victim"


def test_a_fifo_in_the_store_is_refused_without_blocking(tmp_path, alarm):
    """A FIFO as a message's details (filterd-meta/ID.json) or as a message: opened
    without blocking and refused, where a plain open would wait for a writer for ever."""
    store = Store(tmp_path / "q")
    qid = store.add(Mail(RAW), VERDICT)
    (store.root / "filterd-meta" / f"{qid}.json").unlink()
    os.mkfifo(store.root / "filterd-meta" / f"{qid}.json")
    assert store.get(qid).reason == "details missing"  # the message still counts
    os.mkfifo(store.root / "new" / BAD_IDS[0])
    with pytest.raises(QuarantineError, match="not a regular file"):
        store.read(BAD_IDS[0])


# --- CLI rough edges ------------------------------------------------------------------------


def test_cli_config_after_the_action_iso_times_and_an_empty_list(
    tmp_path, monkeypatch, capsysbinary, cli_state
):
    code, out, err = run(monkeypatch, capsysbinary, ["quarantine", "list"])
    assert (code, out) == (0, b"") and "the quarantine is empty" in err
    other = Store(tmp_path / "other")
    qid = other.add(Mail(RAW), VERDICT, now=1_700_000_000.5)
    config = tmp_path / "config.yaml"
    config.write_text(f"quarantine:\n  path: {other.root}\n")
    for argv in (["--config", config, "list"], ["list", "--config", config]):
        code, out, err = run(monkeypatch, capsysbinary, ["quarantine", *argv])
        assert code == 0 and out.startswith(qid.encode() + b"\t"), err
    code, out, _ = run(monkeypatch, capsysbinary, ["quarantine", "show", qid, "--config", config])
    (line,) = [x for x in out.decode().splitlines() if x.startswith("time: ")]
    when = datetime.fromisoformat(line.removeprefix("time: "))
    assert when.tzinfo is not None and when.timestamp() == 1_700_000_000
    assert line == f"time: {datetime.fromtimestamp(1_700_000_000).astimezone().isoformat()}"

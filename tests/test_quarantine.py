import os
import socket
import time

import pytest
from aiosmtpd.controller import Controller

from filterd.mail import Mail
from filterd.store.quarantine import QuarantineError, Store
from filterd.verdict import Verdict

RAW = b"From a@b Sat Jan  1 00:00:00 2000\r\nSubject: caf\xc3\xa9\r\n\r\nbody \xff no final EOL"
VERDICT = Verdict(0.97, True, "quarantine", 0.5, "gpt2-tiny")


def stored(tmp_path, **kw):
    store = Store(tmp_path / "q", retention_days=7)
    mail = Mail(RAW, "sender@example.org", ("a@here.example", "b@here.example"))
    return store, store.add(mail, VERDICT, **kw)


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
    target = store.release_to_maildir(qid, tmp_path / "inbox")
    assert target.parent == tmp_path / "inbox" / "new" and target.read_bytes() == RAW
    assert store.list() == [] and not (store.root / "filterd-meta" / f"{qid}.json").exists()
    with pytest.raises(QuarantineError):
        store.read(qid)


def test_release_that_fails_keeps_the_message(tmp_path):
    store, qid = stored(tmp_path)
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    with pytest.raises(OSError):
        store.release_to_maildir(qid, blocked)
    with pytest.raises(QuarantineError, match="did not take it"):
        store.release_smtp(qid, "127.0.0.1", 1, timeout=2)  # nothing listens on port 1
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
        store.release_smtp(qid, "127.0.0.1", port, timeout=5)
    assert store.read(qid) == RAW
    handler.refuse, handler.received = "", []
    store.release_smtp(qid, "127.0.0.1", port, timeout=5)
    ((sender, rcpts, data),) = handler.received
    assert (sender, rcpts) == ("sender@example.org", ["a@here.example", "b@here.example"])
    assert data.replace(b"\r\n", b"\n") == RAW.replace(b"\r\n", b"\n") + b"\n"
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

"""filterd behind a real Postfix (a throwaway instance on loopback ports, tests/postfix.py):
as its milter over TCP and over a Unix socket, and as its SMTP proxy in both modes, with
the README's main.cf and master.cf lines. What arrives in the Maildir is checked: headers,
the body byte for byte, the marker; and what does not: 550 at reject, the hold queue or
filterd's store at quarantine, 451 while filterd is down."""

from __future__ import annotations

import re
import shutil
import smtplib
import tempfile
import uuid
from pathlib import Path

import pytest

from filterd.headers import Tagger, load_secret
from filterd.store.quarantine import Store
from tests import postfix
from tests.postfix import (
    AFTER_QUEUE_MAIN_CF,
    AFTER_QUEUE_MASTER_CF,
    BEFORE_QUEUE_MAIN_CF,
    BEFORE_QUEUE_MASTER_CF,
    MILTER_MAIN_CF,
    Postfix,
    free_port,
)
from tests.test_daemon import Daemon, settings, wait_until

if why := postfix.available():  # CI runs as root with Postfix installed: these always run
    pytest.fail(f"tests/test_postfix.py needs a throwaway Postfix: {why}", pytrace=False)

BODY = b"Caf\xc3\xa9 at noon?\r\n.a line with a leading dot\r\n..two\r\n\r\nend\r\n"


def message(sender: str, mid: str, extra: bytes = b"") -> bytes:
    return (
        f"From: Ann <{sender}>\r\nTo: box@example.test\r\nSubject: lunch\r\n"
        f"Date: Mon, 30 Nov 2026 12:00:00 +0000\r\nMessage-ID: {mid}\r\n".encode()
        + extra
        + b"X-Spam-Flag: NO\r\nX-Spam-Status: No, score=0.0 required=5.0\r\n\r\n"
        + BODY
    )


def new_id() -> str:
    return f"<{uuid.uuid4().hex}@example.org>"


LISTS = [  # the sender's domain picks what becomes of a message: the model says ham
    {"name": "lists", "options": {"block": ["reject.example"], "block_action": "reject"}},
    {"name": "lists", "options": {"block": ["hold.example"], "block_action": "quarantine"}},
]


class Stack:
    """Three throwaway Postfix instances, each set up as the README says for one way in:
    filterd as milter (with a second listener whose milter is filterd over a Unix socket,
    quarantining to Postfix's hold queue), as after-queue and as before-queue proxy. Two
    `filterd serve`: one with both milters and the after-queue proxy, one with the
    before-queue proxy (a daemon has one next hop, and each proxy setup its own)."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        p = self.ports = {
            k: free_port()
            for k in ("milter", "in_milter", "in_hold", "aq", "in_aq", "aq_back", "bq", "in_bq")
        }
        p["bq_back"] = free_port()
        # Postfix's smtpd runs as the postfix user: the socket's folder must be reachable.
        self.sockets = Path(tempfile.mkdtemp(prefix="filterd-milter-"))
        self.sockets.chmod(0o755)
        self.socket = self.sockets / "milter.sock"
        listen = "127.0.0.1:{} inet n - n - - smtpd\n"
        self.postfix = {
            "milter": Postfix(
                listen.format(p["in_milter"])
                + listen.format(p["in_hold"])
                + f"  -o smtpd_milters=unix:{self.socket}\n",
                MILTER_MAIN_CF.format(milter_port=p["milter"]),
            ),
            "aq": Postfix(
                listen.format(p["in_aq"])
                + AFTER_QUEUE_MASTER_CF.format(reinject_port=p["aq_back"]),
                AFTER_QUEUE_MAIN_CF.format(proxy_port=p["aq"]),
            ),
            "bq": Postfix(
                BEFORE_QUEUE_MASTER_CF.format(
                    listen=f"127.0.0.1:{p['in_bq']}", proxy_port=p["bq"], reinject_port=p["bq_back"]
                ),
                BEFORE_QUEUE_MAIN_CF,
            ),
        }
        self.settings = settings(tmp_path, p["aq_back"]) | {
            "checks": LISTS,
            "sources": [
                {"name": "milter", "options": {"port": p["milter"]}},
                {
                    "name": "milter",
                    "options": {
                        "socket": str(self.socket),
                        "socket_group": "postfix",
                        "quarantine": "hold",
                    },
                },
                {"name": "smtp", "options": {"port": p["aq"], "mode": "after_queue"}},
            ],
        }
        self.daemon = Daemon(tmp_path, self.settings, smtp=False)
        before = tmp_path / "before_queue"
        before.mkdir()
        self.before = Daemon(
            before,
            self.settings
            | {
                "relay": {"port": p["bq_back"]},
                "sources": [{"name": "smtp", "options": {"port": p["bq"], "mode": "before_queue"}}],
            },
            smtp=False,
        )
        self.tagger = Tagger(load_secret(tmp_path / "secret"))

    def send(self, listener: str, raw: bytes, sender: str = "ann@example.org") -> None:
        with smtplib.SMTP("127.0.0.1", self.ports[listener], timeout=60) as smtp:
            smtp.sendmail(sender, ["box@example.test"], raw)

    def arrived(self, mid: str, timeout: float = 30) -> list[bytes]:
        wait_until(lambda: self.find(mid), timeout, lambda: self.context())
        return self.find(mid)

    def find(self, mid: str) -> list[bytes]:
        everything = [m for p in self.postfix.values() for m in p.delivered()]
        return [m for m in everything if mid.encode() in m]

    def quarantined(self, mid: str) -> bool:
        store = Store(self.tmp / "quarantine")
        return any(mid.encode() in store.read(entry.id) for entry in store.list())

    def context(self) -> str:
        logs = "".join(f"postfix {k}:\n{p.log()[-3000:]}\n" for k, p in self.postfix.items())
        daemons = "".join(self.daemon.lines) + "".join(self.before.lines)
        return f"{logs}filterd:\n{daemons}"

    def close(self) -> None:
        self.daemon.kill()
        self.before.kill()
        for instance in self.postfix.values():
            instance.stop()
        shutil.rmtree(self.sockets, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("postfix"))
    yield s
    s.close()


def header_and_body(delivered: bytes) -> tuple[bytes, bytes]:
    head, _, body = delivered.partition(b"\n\n")
    return head, body


def test_milter_tags_mail_postfix_delivers_and_the_marker_verifies(stack):
    mid = new_id()
    stack.send("in_milter", message("ann@example.org", mid))
    (delivered,) = stack.arrived(mid)
    head, body = header_and_body(delivered)
    assert body == BODY.replace(b"\r\n", b"\n")  # byte for byte (Maildir stores LF)
    assert b"X-Spam-Flag: NO" not in head  # the spoofed ones are gone
    assert head.count(b"X-Spam-Status:") == 1
    assert re.search(rb"X-Spam-Status: No, score=1\.2 required=5\.0 probability=0\.119", head)
    assert b"X-Spam-Marker: v2 " in head
    assert stack.tagger.previous(delivered) == (False, pytest.approx(0.119, abs=1e-3))
    line = stack.daemon.wait_for(rf"source=milter queue_id=(\w+) message_id={re.escape(mid)}")
    assert line[1] in stack.postfix["milter"].log()  # the MTA's queue id in filterd's log


def test_several_messages_on_one_connection(stack):
    mids = [new_id() for _ in range(3)]
    with smtplib.SMTP("127.0.0.1", stack.ports["in_milter"], timeout=60) as smtp:
        for mid in mids:
            smtp.sendmail("ann@example.org", ["box@example.test"], message("a@example.org", mid))
        smtp.rset()  # an abort between messages, as clients send it
    for mid in mids:
        (delivered,) = stack.arrived(mid)
        assert stack.tagger.previous(delivered) is not None


def test_milter_reject_answers_550_and_nothing_arrives(stack):
    mid = new_id()
    with pytest.raises(smtplib.SMTPDataError) as refused:
        stack.send("in_milter", message("x@reject.example", mid))
    assert refused.value.smtp_code == 550
    assert b"5.7.1" in refused.value.smtp_error
    stack.daemon.wait_for(rf"message_id={re.escape(mid)} .*action=reject reply=550")
    assert stack.find(mid) == []


def test_milter_quarantine_in_filterds_store(stack):
    mid = new_id()
    stack.send("in_milter", message("x@hold.example", mid))  # 250: accepted, then held
    stack.daemon.wait_for(rf"message_id={re.escape(mid)} .*action=quarantine reply=discard")
    assert stack.quarantined(mid)
    wait_until(lambda: stack.postfix["milter"].logged(r"milter-discard"), 10, stack.context)
    assert stack.find(mid) == []


def test_milter_over_a_unix_socket_quarantines_in_postfixs_hold_queue(stack):
    mid = new_id()
    stack.send("in_hold", message("x@hold.example", mid))
    wait_until(
        lambda: any(q["queue_name"] == "hold" for q in stack.postfix["milter"].queue()),
        10,
        stack.context,
    )
    assert stack.postfix["milter"].logged(r"milter-hold: END-OF-MESSAGE")
    assert stack.find(mid) == []


@pytest.mark.parametrize("listener", ["in_aq", "in_bq"])
def test_smtp_proxy_both_modes_behind_postfix(stack, listener):
    mid = new_id()
    stack.send(listener, message("ann@example.org", mid))
    (delivered,) = stack.arrived(mid)
    assert header_and_body(delivered)[1] == BODY.replace(b"\r\n", b"\n")
    assert stack.tagger.previous(delivered) == (False, pytest.approx(0.119, abs=1e-3))
    assert b"X-Spam-Flag: NO" not in delivered
    rejected = new_id()
    if listener == "in_bq":  # before the queue: the client hears 550
        with pytest.raises(smtplib.SMTPDataError) as refused:
            stack.send(listener, message("x@reject.example", rejected))
        assert refused.value.smtp_code == 550
    else:  # after the queue: Postfix already said 250; filterd quarantines instead
        stack.send(listener, message("x@reject.example", rejected))
        wait_until(
            lambda: stack.quarantined(rejected),
            30,
            stack.context,
        )
    assert stack.find(rejected) == []


def test_filterd_down_means_451_then_delivery_once_it_is_back(stack):
    """milter_default_action = tempfail: nothing is queued while filterd is down; the
    client's retry once it is back arrives exactly once."""
    assert stack.daemon.stop() == 0
    mid = new_id()
    raw = message("ann@example.org", mid)
    with pytest.raises(smtplib.SMTPResponseException) as deferred:
        stack.send("in_milter", raw)
    assert deferred.value.smtp_code == 451
    assert stack.postfix["milter"].queue() == [] or all(
        mid not in str(q) for q in stack.postfix["milter"].queue()
    )
    stack.daemon = Daemon(stack.tmp, stack.settings, smtp=False)
    stack.send("in_milter", raw)
    stack.arrived(mid)
    assert len(stack.find(mid)) == 1


def test_readme_holds_the_tested_snippets():
    """The README shows them with the default ports, as a reader pastes them."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for snippet in (
        MILTER_MAIN_CF.format(milter_port=10029),
        AFTER_QUEUE_MAIN_CF.format(proxy_port=10025),
        AFTER_QUEUE_MASTER_CF.format(reinject_port=10026),
        BEFORE_QUEUE_MAIN_CF,
        BEFORE_QUEUE_MASTER_CF.format(listen="smtp", proxy_port=10025, reinject_port=10026),
    ):
        assert f"```\n{snippet}```\n" in readme

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
    AFTER_QUEUE_MASTER_CF,
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


def without_milter(snippet: str) -> str:
    """A proxy setup's master.cf lines, its listener told not to use the milter that
    main.cf sets for this instance (a server uses one way or the other)."""
    lines = snippet.splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    lines.insert(first + 1, "  -o smtpd_milters=\n")
    return "".join(lines)


class Stack:
    """One Postfix, one `filterd serve` with four sources: a milter keeping quarantined
    mail in filterd's store (TCP), a milter using Postfix's hold queue (Unix socket), and
    the SMTP proxy after and before the queue."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.ports = {k: free_port() for k in ("milter", "aq", "bq", "reinject", "in_aq")}
        self.ports |= {k: free_port() for k in ("in_milter", "in_hold", "in_bq")}
        # Postfix's smtpd runs as the postfix user: the socket's folder must be reachable.
        self.sockets = Path(tempfile.mkdtemp(prefix="filterd-milter-"))
        self.sockets.chmod(0o755)
        self.socket = self.sockets / "milter.sock"
        p = self.ports
        services = (
            f"127.0.0.1:{p['in_milter']} inet n - n - - smtpd\n"
            f"127.0.0.1:{p['in_hold']} inet n - n - - smtpd\n"
            f"  -o smtpd_milters=unix:{self.socket}\n"
            + without_milter(
                AFTER_QUEUE_MASTER_CF.format(
                    listen=f"127.0.0.1:{p['in_aq']}",
                    proxy_port=p["aq"],
                    reinject_port=p["reinject"],
                )
            )
            + without_milter(
                BEFORE_QUEUE_MASTER_CF.format(listen=f"127.0.0.1:{p['in_bq']}", proxy_port=p["bq"])
            )
        )
        self.postfix = Postfix(services, MILTER_MAIN_CF.format(milter_port=p["milter"]))
        self.settings = settings(tmp_path, p["reinject"]) | {
            "checks": [
                {
                    "name": "lists",
                    "options": {"block": ["reject.example"], "block_action": "reject"},
                },
                {
                    "name": "lists",
                    "options": {"block": ["hold.example"], "block_action": "quarantine"},
                },
            ],
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
                {"name": "smtp", "options": {"port": p["bq"], "mode": "before_queue"}},
            ],
        }
        self.daemon = Daemon(tmp_path, self.settings, smtp=False)
        self.tagger = Tagger(load_secret(tmp_path / "secret"))

    def send(self, port_name: str, raw: bytes, sender: str = "ann@example.org") -> None:
        with smtplib.SMTP("127.0.0.1", self.ports[port_name], timeout=60) as smtp:
            smtp.sendmail(sender, ["box@example.test"], raw)

    def arrived(self, mid: str, timeout: float = 30) -> list[bytes]:
        wait_until(lambda: self.find(mid), timeout, lambda: self.context())
        return self.find(mid)

    def find(self, mid: str) -> list[bytes]:
        return [m for m in self.postfix.delivered() if mid.encode() in m]

    def quarantined(self, mid: str) -> bool:
        store = Store(self.tmp / "quarantine")
        return any(mid.encode() in store.read(entry.id) for entry in store.list())

    def context(self) -> str:
        return f"postfix:\n{self.postfix.log()[-4000:]}\nfilterd:\n{''.join(self.daemon.lines)}"

    def close(self) -> None:
        self.daemon.kill()
        self.postfix.stop()
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
    assert line[1] in stack.postfix.log()  # the MTA's queue id in filterd's log


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
    wait_until(lambda: stack.postfix.logged(r"milter-discard"), 10, stack.context)
    assert stack.find(mid) == []


def test_milter_over_a_unix_socket_quarantines_in_postfixs_hold_queue(stack):
    mid = new_id()
    stack.send("in_hold", message("x@hold.example", mid))
    wait_until(
        lambda: any(q["queue_name"] == "hold" for q in stack.postfix.queue()), 10, stack.context
    )
    assert stack.postfix.logged(r"milter-hold: END-OF-MESSAGE")
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
    assert stack.postfix.queue() == [] or all(mid not in str(q) for q in stack.postfix.queue())
    stack.daemon = Daemon(stack.tmp, stack.settings, smtp=False)
    stack.send("in_milter", raw)
    stack.arrived(mid)
    assert len(stack.find(mid)) == 1


def test_readme_holds_the_tested_snippets():
    """The README shows the snippets with the default ports, as a reader pastes them."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert MILTER_MAIN_CF.format(milter_port=10029) in readme
    assert (
        AFTER_QUEUE_MASTER_CF.format(listen="smtp", proxy_port=10025, reinject_port=10026) in readme
    )
    assert BEFORE_QUEUE_MASTER_CF.format(listen="smtp", proxy_port=10025) in readme

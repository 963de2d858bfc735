"""`filterd serve` as a real process: reloads and SIGTERM never lose a message."""

import contextlib
import json
import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time

import pytest

from filterd import cli
from filterd.model.checkpoint import checkpoint_path
from filterd.store import maildir
from tests.test_engine import make_checkpoint
from tests.test_smtp_proxy import MSG, sink_running


class Daemon:
    """`filterd serve --config FILE` in a subprocess, its stderr collected line by line."""

    def __init__(self, tmp_path, settings: dict, smtp: bool = True):
        path = tmp_path / "config.yaml"
        path.write_text(json.dumps(settings))  # JSON is YAML
        env = os.environ | {"XDG_STATE_HOME": str(tmp_path / "state")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "filterd.cli", "serve", "--config", str(path)],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # a process group of its own, as systemd gives it
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        if smtp:
            listening = self.wait_for(r"source=smtp listening on 127\.0\.0\.1:(\d+)")
            self.port = int(listening[1])
        self.loop = self.wait_for(r"ready: .* (\w+) event loop")[1]

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            assert self.proc.poll() is None, "".join(self.lines)
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in:\n{''.join(self.lines)}")

    def stop(self) -> int:
        """SIGTERM to the whole group, the scoring process too, as systemd stops a unit."""
        os.killpg(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(30)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


class Sender(threading.Thread):
    """Sends numbered messages on one connection until told to stop or refused; records
    each message's answer: 250, an SMTP code, or "disconnected"."""

    def __init__(self, port: int, name: str):
        super().__init__(daemon=True)
        self.port = port
        self.name = name
        self.answers: dict[str, object] = {}
        self.acked_at: dict[str, float] = {}
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=30)
        except (OSError, smtplib.SMTPException):
            return
        n = 0
        while not self.halt.is_set():
            mid = f"<{self.name}.{n}@test>"
            n += 1
            raw = MSG.replace(b"<m1@example.org>", mid.encode())
            try:
                smtp.sendmail("ann@example.org", ["bob@example.net"], raw)
            except smtplib.SMTPResponseException as e:
                self.answers[mid] = e.smtp_code
                return
            except (OSError, smtplib.SMTPException):
                self.answers[mid] = "disconnected"
                return
            self.answers[mid] = 250
            self.acked_at[mid] = time.monotonic()
        smtp.quit()


def received(sink) -> list[str]:
    ids = []
    for _, _, data in sink.messages:
        m = re.search(rb"Message-ID: (<[^>]*>)", data)
        ids.append(m[1].decode())
    return ids


def settings(tmp_path, port: int, **extra) -> dict:
    folder = tmp_path / "model"
    if not folder.exists():
        make_checkpoint(folder, -2.0)  # ham: p = 0.12
    return {
        "checkpoint": str(folder),
        "headers": {"secret_file": str(tmp_path / "secret")},
        "quarantine": {"path": str(tmp_path / "quarantine")},
        "relay": {"port": port},
        "sources": [{"name": "smtp", "options": {"port": 0}}],
    } | extra


def wait_until(condition, timeout: float = 30, context=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, context()
        time.sleep(0.02)


def test_reloads_swap_the_model_while_mail_flows_beside_the_maildir(tmp_path):
    box = maildir.ensure(tmp_path / "Maildir")
    maildir.deliver(box, MSG.replace(b"\r\n", b"\n"))
    with sink_running() as sink:
        daemon = Daemon(
            tmp_path,
            settings(
                tmp_path,
                sink.port,
                maildir={"paths": [str(box)]},
                daemon={"reload_check_seconds": 0.2},
                scoring={"batch_wait_ms": 5},
            ),
        )
        try:
            assert daemon.loop == "uvloop"  # a dependency where CI runs (not on Windows)
            sender = Sender(daemon.port, "r")
            sender.start()
            wait_until(lambda: len(sink.messages) >= 3)
            # A new checkpoint file (written atomically) is picked up and swapped in.
            make_checkpoint(tmp_path / "model", 2.0)  # spam: p = 0.88
            wait_until(lambda: b"X-Spam-Flag: YES" in sink.messages[-1][2])
            daemon.wait_for(r"reload \(checkpoint file changed\): gpt2-tiny")
            # A broken one on SIGHUP: logged, and the model in use stays.
            broken = tmp_path / "broken"
            broken.write_bytes(b"not a checkpoint")
            os.replace(broken, checkpoint_path(tmp_path / "model"))
            daemon.proc.send_signal(signal.SIGHUP)
            daemon.wait_for(r"reload \(SIGHUP\) failed, keeping the old model")
            count = len(sink.messages)
            wait_until(lambda: len(sink.messages) >= count + 3)
            sender.halt.set()
            sender.join(30)
            assert daemon.stop() == 0
        finally:
            daemon.kill()
    # Every message was accepted and relayed exactly once; none scored by half a model.
    assert set(sender.answers.values()) == {250}
    assert sorted(received(sink)) == sorted(sender.answers)
    verdicts = [b"X-Spam-Flag: YES" in data for _, _, data in sink.messages]
    first_spam = verdicts.index(True)
    assert not any(verdicts[:first_spam]) and all(verdicts[first_spam:])
    assert all(b"X-Spam-Status: " in data for _, _, data in sink.messages)
    # One log line per message, and the Maildir source ran alongside.
    logged = [line for line in daemon.lines if "source=smtp message_id=" in line]
    assert len(logged) == len(sender.answers)
    assert re.search(r"score=0\.\d{4} action=tag reply=250 latency_ms=\d+", logged[0])
    (tagged,) = (box / "new").iterdir()  # in place of the waiting one
    assert tagged.read_bytes().startswith(b"X-Spam-Status: No")


def test_sigterm_finishes_messages_in_flight_and_loses_none(tmp_path):
    with sink_running() as sink:
        # Batches wait 500 ms, so most of the time every sender has a message in flight.
        daemon = Daemon(tmp_path, settings(tmp_path, sink.port, scoring={"batch_wait_ms": 500}))
        try:
            senders = [Sender(daemon.port, f"s{i}") for i in range(6)]
            for sender in senders:
                sender.start()
            wait_until(
                lambda: len(sink.messages) >= 6,
                context=lambda: f"{[s.answers for s in senders]}\n{''.join(daemon.lines)}",
            )
            time.sleep(0.2)  # the next messages are in, waiting for their batch
            term = time.monotonic()
            assert daemon.stop() == 0
            for sender in senders:
                sender.join(30)
        finally:
            daemon.kill()
    answers = {mid: a for s in senders for mid, a in s.answers.items()}
    acked = {mid for mid, a in answers.items() if a == 250}
    assert sorted(received(sink)) == sorted(acked)  # acked: relayed, exactly once
    for mid in answers.keys() - acked:  # the rest: the sender keeps them and retries
        assert answers[mid] == "disconnected" or 400 <= answers[mid] < 500, answers[mid]
    after = [t for s in senders for t in s.acked_at.values() if t > term]
    assert after, "no message was in flight at SIGTERM"
    # ... and the model kept scoring them: none went out unscored (fail open).
    assert not [d for _, _, d in sink.messages if b"X-Spam-Status: Unscored" in d]
    assert "stopped" in daemon.lines[-1], "".join(daemon.lines[-40:])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"sources": []}, "sources: none configured"),
        ({"sources": [{"name": "stdin"}]}, "sources[0].name: stdin reads one message and ends"),
        (
            {"sources": [{"name": "maildir", "options": {"paths": ["/nonexistent"]}}]},
            "sources[0].options.paths[0]: /nonexistent: not a Maildir",
        ),
        ({"smtp": {"enabled": False, "prot": 25}}, "smtp.prot: Extra inputs are not permitted"),
        ({"scoring": {"reject_threshold": 0.9}}, "scoring.reject_threshold"),
    ],
)
def test_serve_refuses_a_config_it_cannot_run(tmp_path, capsys, extra, message):
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(settings(tmp_path, 1) | extra))
    assert cli.main(["serve", "--config", str(path)]) == 2
    assert message in capsys.readouterr().err

"""The daemon's model in a child process: same scores, and its death costs one batch."""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from filterd.config import Config
from filterd.engine import Engine
from filterd.mail import Mail
from filterd.model.checkpoint import CheckpointError, CheckpointMeta, save_checkpoint
from filterd.model.classifier import load_classifier
from filterd.model.gpt2 import ARCHITECTURES, GPT2Classifier
from filterd.model.scoring_process import ProcessClassifier, ScoringProcessError
from tests.test_checkpoint import flip_byte

MESSAGES = [
    b"Subject: lunch\n\nSee you at noon by the fountain?\n",
    b"Subject: WIN NOW\nContent-Type: text/html\n\n<p>Claim your <b>free</b> prize!</p>\n",
    b"Subject: minutes\r\n\r\nAttached are the minutes of Tuesday's meeting.\r\n",
]


def random_checkpoint(folder, seed: int):
    """gpt2-tiny with a head whose scores differ from message to message."""
    torch.manual_seed(seed)
    model = GPT2Classifier(ARCHITECTURES["gpt2-tiny"]).eval()
    with torch.no_grad():
        model.score.weight.mul_(50)
    meta = CheckpointMeta(arch="gpt2-tiny", config=model.config.to_dict(), threshold=0.4)
    return save_checkpoint(folder, model, meta)


def alive(pid: int) -> bool:
    # A dead child not yet reaped by its parent is a zombie: gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("ck"), 0)


@pytest.fixture(scope="module")
def child(checkpoint):
    clf = ProcessClassifier(checkpoint)
    yield clf
    clf.close()


def test_child_scores_exactly_as_in_process(checkpoint, child):
    here = load_classifier(checkpoint)
    expected = here.score_messages(MESSAGES)
    assert len({round(p, 3) for p in expected}) == len(MESSAGES)  # really different scores
    assert child.score_messages(MESSAGES) == expected
    assert (child.name, child.threshold) == ("gpt2-tiny", 0.4)
    big = MESSAGES[1] + b"<p>" + b"filler line\n" * 500_000 + b"</p>\n"  # 6 MB, clipped
    assert child.score_message(big) == here.score_message(big)


def test_the_childs_openmp_threads_sleep_when_idle(checkpoint, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "unset")  # restored to what it was afterwards
    monkeypatch.delenv("OMP_WAIT_POLICY")
    clf = ProcessClassifier(checkpoint)
    try:
        environ = Path(f"/proc/{clf.pid}/environ").read_bytes().split(b"\0")
        assert b"OMP_WAIT_POLICY=PASSIVE" in environ
    finally:
        clf.close()


def test_int8_in_the_child_matches_int8_in_process(checkpoint):
    child = ProcessClassifier(checkpoint, precision="int8")
    try:
        assert child.score_messages(MESSAGES) == load_classifier(
            checkpoint, precision="int8"
        ).score_messages(MESSAGES)
    finally:
        child.close()


def test_a_dead_child_fails_its_batch_and_the_next_batch_gets_a_new_one(child):
    expected = child.score_messages(MESSAGES)
    old = child.pid
    os.kill(old, signal.SIGKILL)
    assert wait_gone(old)
    with pytest.raises(ScoringProcessError, match="scoring process died"):
        child.score_messages(MESSAGES)
    assert child.score_messages(MESSAGES) == expected
    assert child.pid != old


def test_engine_fails_open_when_the_child_dies(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))  # the marker secret goes there
    engine = Engine.from_config(Config(checkpoint=checkpoint), child_process=True)
    try:
        os.kill(engine.classifier.pid, signal.SIGKILL)

        outcome = asyncio.run(engine.handle(Mail(MESSAGES[0])))
        assert outcome.disposition == "deliver"
        assert b"X-Spam-Status: Unscored, reason=ScoringProcessError" in outcome.data
    finally:
        engine.close()


def test_bad_checkpoint_error_comes_back_from_the_child(tmp_path):
    path = random_checkpoint(tmp_path, 1)
    flip_byte(path)
    with pytest.raises(CheckpointError, match="corrupt"):
        ProcessClassifier(path)


def test_a_swap_starts_a_new_child_and_stops_the_old(tmp_path, checkpoint):
    engine = Engine(ProcessClassifier(checkpoint))
    old = engine.classifier
    other = random_checkpoint(tmp_path, 2)
    try:
        engine.swap(old.reload(other))
        assert engine.classifier.pid != old.pid
        assert wait_gone(old.pid)
        mails = [Mail(m) for m in MESSAGES]
        assert engine.verdicts(mails) == Engine(load_classifier(other)).verdicts(mails)
    finally:
        engine.close()
    assert wait_gone(engine.classifier.pid)


def test_no_restart_storm_when_the_checkpoint_went_bad(tmp_path):
    path = random_checkpoint(tmp_path, 3)
    clf = ProcessClassifier(path)
    try:
        flip_byte(path)
        os.kill(clf.pid, signal.SIGKILL)
        with pytest.raises(ScoringProcessError, match="died"):
            clf.score_messages(MESSAGES)
        with pytest.raises(CheckpointError, match="corrupt"):  # the restart's load fails
            clf.score_messages(MESSAGES)
        started = time.monotonic()
        with pytest.raises(ScoringProcessError, match="last start failed"):
            clf.score_messages(MESSAGES)  # within the pause: fails at once, no model load
        assert time.monotonic() - started < 0.5
    finally:
        clf.close()


def test_the_child_outlives_neither_sigterm_nor_its_parent(tmp_path, checkpoint):
    """SIGTERM to the group leaves the child scoring; SIGKILL of the parent ends it."""
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, time
        from filterd.model.scoring_process import ProcessClassifier
        if __name__ == "__main__":
            clf = ProcessClassifier({str(checkpoint)!r})
            print(clf.pid, flush=True)
            sys.stdin.readline()
            print(clf.score_message(b"Subject: hi\\n\\nhello\\n"), flush=True)
            time.sleep(60)
        """)
    )
    parent = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        pid = int(parent.stdout.readline())
        os.kill(pid, signal.SIGTERM)  # what systemd's stop sends to every process of the unit
        parent.stdin.write("\n")
        parent.stdin.flush()
        assert 0 <= float(parent.stdout.readline()) <= 1  # still scoring
        parent.kill()
        parent.wait(10)
        assert wait_gone(pid), "the scoring process outlived its parent"
    finally:  # the whole group: a child that outlived the test must not linger
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(10)

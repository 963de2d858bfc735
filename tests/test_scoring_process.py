"""The daemon's model in a child process: same scores, and its death costs one batch."""

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from filterd.checkpoint import CheckpointError, CheckpointMeta, save_checkpoint
from filterd.classifier import load_classifier
from filterd.config import Config
from filterd.engine import Engine
from filterd.mail import Mail
from filterd.model import GPT2Classifier, architecture
from filterd.scoring_process import ProcessClassifier, ScoringProcessError

MESSAGES = [
    b"Subject: lunch\n\nSee you at noon by the fountain?\n",
    b"Subject: WIN NOW\nContent-Type: text/html\n\n<p>Claim your <b>free</b> prize!</p>\n",
    b"Subject: minutes\r\n\r\nAttached are the minutes of Tuesday's meeting.\r\n",
]


def random_checkpoint(folder, seed: int):
    """gpt2-tiny with a head whose scores differ from message to message."""
    torch.manual_seed(seed)
    model = GPT2Classifier(architecture("gpt2-tiny")).eval()
    with torch.no_grad():
        model.score.weight.mul_(50)
    meta = CheckpointMeta(arch="gpt2-tiny", config=model.config.to_dict(), threshold=0.4)
    return save_checkpoint(folder, model, meta)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A dead child not yet reaped by its parent is a zombie: gone for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


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
    assert (child.name, child.threshold, child.pid != os.getpid()) == ("gpt2-tiny", 0.4, True)


def test_a_dead_child_fails_its_batch_and_the_next_batch_gets_a_new_one(child):
    expected = child.score_messages(MESSAGES)
    old = child.pid
    os.kill(old, signal.SIGKILL)
    assert wait_gone(old)
    with pytest.raises(ScoringProcessError, match="scoring process died"):
        child.score_messages(MESSAGES)
    assert child.score_messages(MESSAGES) == expected
    assert child.pid != old


def test_engine_fails_open_when_the_child_dies(checkpoint):
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
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupt"):
        ProcessClassifier(path)


def test_reload_starts_a_new_child_and_close_stops_the_old(tmp_path, child):
    other = random_checkpoint(tmp_path, 2)
    new = child.reload(other)
    try:
        assert new.pid != child.pid
        assert new.score_messages(MESSAGES) == load_classifier(other).score_messages(MESSAGES)
    finally:
        new.close()
    assert wait_gone(new.pid)


def test_the_child_outlives_neither_sigterm_nor_its_parent(tmp_path, checkpoint):
    """SIGTERM to the group leaves the child scoring; SIGKILL of the parent ends it."""
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, time
        from filterd.scoring_process import ProcessClassifier
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
    finally:
        parent.kill()
        parent.wait(10)

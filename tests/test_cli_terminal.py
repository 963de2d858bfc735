"""`filterd score DIR` as a person runs it: stderr a terminal (so the progress bar shows),
stdout redirected to a file or a pipe. The results must land there, not in the display."""

import os
import pty
import select
import subprocess
import sys

import pytest

from tests.test_engine import make_checkpoint

N = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("terminal")
    folder = root / "mail"
    folder.mkdir()
    for i in range(N):
        words = " ".join(f"word{j}" for j in range(i * 7 % 300))
        (folder / f"m{i:02d}.eml").write_bytes(b"Subject: note %d\n\n%s\n" % (i, words.encode()))
    return make_checkpoint(root / "model", 2.0), folder


def run_with_terminal_stderr(argv: list[str], stdout, env=None) -> tuple[int, bytes]:
    """The command with stderr on a pseudo-terminal; returns its status and what the
    terminal showed."""
    leader, follower = pty.openpty()
    env = (env or os.environ) | {"COLUMNS": "100", "TERM": "xterm"}
    proc = subprocess.Popen(argv, stdout=stdout, stderr=follower, env=env)
    os.close(follower)
    screen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            proc.kill()
            raise AssertionError(f"no output for 60 s: {screen[-500:]!r}")
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's other side closed
            break
        if not chunk:
            break
        screen += chunk
    os.close(leader)
    return proc.wait(60), screen


@pytest.mark.parametrize("as_json", [False, True])
def test_results_reach_stdout_when_stderr_is_a_terminal(tmp_path, corpus, as_json):
    checkpoint, folder = corpus
    out = tmp_path / "out.txt"
    argv = [sys.executable, "-m", "filterd.cli", "score", "--checkpoint", str(checkpoint)]
    argv += ["--json"] * as_json + [str(folder)]
    with open(out, "wb") as f:
        code, screen = run_with_terminal_stderr(argv, f)
    assert code == 0
    lines = out.read_bytes().splitlines()
    assert len(lines) == N
    assert all(b"m" in line and (line.startswith(b"{") == as_json) for line in lines)
    assert b"scoring" in screen and b"%" in screen  # the bar was drawn on the terminal
    assert f"{N} messages: {N} spam".encode() in screen
    assert b"note" not in screen  # no result was drawn there instead


def test_results_reach_a_pipe_when_stderr_is_a_terminal(tmp_path, corpus):
    checkpoint, folder = corpus
    cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    argv = [sys.executable, "-m", "filterd.cli", "score", "--json", "--checkpoint"]
    code, _ = run_with_terminal_stderr([*argv, str(checkpoint), str(folder)], cat.stdin)
    cat.stdin.close()
    assert code == 0 and len(cat.stdout.read().splitlines()) == N
    cat.wait(10)

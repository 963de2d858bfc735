import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from filterd.cli import main
from filterd.mail import Mail
from filterd.store.quarantine import Store
from filterd.verdict import Verdict
from tests.test_engine import make_checkpoint

CRLF_MBOX = (
    b"From sender@example.org Sat Jan  1 00:00:00 2000\r\n"
    b"Subject: caf\xc3\xa9 offer\r\n"
    b"X-Spam-Flag: NO\r\n"
    b"From: Sender <sender@example.org>\r\n"
    b"\r\n"
    b"8-bit body \xff\r\nno final line end"
)
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setattr("filterd.config.DEFAULT_PATH", tmp_path / "no-default.yaml")


@pytest.fixture(scope="module")
def spam_ck(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("spam"), 5.0)  # p = 0.9933


@pytest.fixture(scope="module")
def ham_ck(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ham"), -5.0)  # p = 0.0067


def run(monkeypatch, capsysbinary, argv, stdin=b""):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = main([str(a) for a in argv])
    out, err = capsysbinary.readouterr()
    return code, out, err.decode()


def write_config(tmp_path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_one_message_exit_status_is_the_verdict(monkeypatch, capsysbinary, spam_ck, ham_ck):
    code, out, _ = run(monkeypatch, capsysbinary, ["score", "--checkpoint", spam_ck], CRLF_MBOX)
    assert (code, out) == (1, b"spam 0.9933 -\n")
    code, out, _ = run(monkeypatch, capsysbinary, ["score", "--checkpoint", ham_ck], CRLF_MBOX)
    assert (code, out) == (0, b"ham 0.0067 -\n")
    code, out, _ = run(
        monkeypatch, capsysbinary, ["score", "--json", "--checkpoint", spam_ck], CRLF_MBOX
    )
    assert code == 0
    assert json.loads(out) == {
        "label": "spam",
        "probability": pytest.approx(0.9933, abs=1e-4),
        "threshold": 0.5,
    }


def test_files_and_folders_json_with_errors(tmp_path, monkeypatch, capsysbinary, spam_ck):
    folder = tmp_path / "mail"
    (folder / "sub").mkdir(parents=True)
    for name in ("a", "sub/b", "c"):
        (folder / name).write_bytes(CRLF_MBOX)
    (folder / ".hidden").write_bytes(b"skipped")
    missing = tmp_path / "missing.eml"
    argv = ["score", "--json", "--checkpoint", spam_ck, folder, missing]
    code, out, err = run(monkeypatch, capsysbinary, argv)
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in records] == [str(folder / n) for n in ("a", "c", "sub/b")] + [
        str(missing)
    ]
    assert all(r["label"] == "spam" and r["threshold"] == 0.5 for r in records[:3])
    assert "No such file" in records[3]["error"]
    assert code == 4
    assert "4 messages: 3 spam, 0 ham, 1 errors" in err
    code, out, _ = run(monkeypatch, capsysbinary, ["score", "--checkpoint", spam_ck, folder])
    assert code == 0 and out.decode().splitlines()[0] == f"spam 0.9933 {folder / 'a'}"


def test_tag_is_byte_exact_and_never_scores_twice(monkeypatch, capsysbinary, spam_ck, ham_ck):
    code, tagged, err = run(
        monkeypatch, capsysbinary, ["score", "--tag", "--checkpoint", spam_ck], CRLF_MBOX
    )
    assert code == 0, err
    head, rest = CRLF_MBOX.split(b"\r\n", 1)
    assert tagged.startswith(head + b"\r\nX-Spam-Flag: YES\r\nX-Spam-Status: Yes, score=9.9 ")
    assert tagged.endswith(rest.replace(b"X-Spam-Flag: NO\r\n", b""))
    assert tagged.count(b"X-Spam-") == 5 and b"\r\nX-Spam-Marker: v2 " in tagged
    code, again, _ = run(
        monkeypatch, capsysbinary, ["score", "--tag", "--checkpoint", ham_ck], tagged
    )
    assert (code, again) == (0, tagged)  # the marker says: already scored here
    code, out, _ = run(
        monkeypatch, capsysbinary, ["score", "--json", "--checkpoint", ham_ck], tagged
    )
    assert json.loads(out)["decided_by"] == "marker" and json.loads(out)["label"] == "spam"


def test_tag_failure_policies(tmp_path, monkeypatch, capsysbinary):
    missing = tmp_path / "no-checkpoint"
    code, out, err = run(
        monkeypatch, capsysbinary, ["score", "--tag", "--checkpoint", missing], CRLF_MBOX
    )
    assert code == 0 and "not scoring" in err
    head, rest = CRLF_MBOX.split(b"\r\n", 1)
    assert out.startswith(head + b"\r\nX-Spam-Status: Unscored, reason=ConfigError: checkpoint:")
    assert out.endswith(rest.replace(b"X-Spam-Flag: NO\r\n", b""))
    assert b"X-Spam-Flag" not in out
    config = write_config(tmp_path, "scoring:\n  failure_policy: tempfail\n")
    argv = ["score", "--tag", "--config", config, "--checkpoint", missing]
    assert run(monkeypatch, capsysbinary, argv, CRLF_MBOX)[:2] == (75, b"")
    # a broken config cannot name a policy: the default, fail_open, applies
    broken = write_config(tmp_path, "scoring: [\n")
    code, out, _ = run(monkeypatch, capsysbinary, ["score", "--tag", "--config", broken], CRLF_MBOX)
    assert code == 0 and b"Unscored, reason=ConfigError" in out and out.endswith(b"end")


def test_error_exit_codes(tmp_path, monkeypatch, capsysbinary, spam_ck):
    bad = write_config(tmp_path, "scoring:\n  threshhold: 0.5\n")
    code, out, err = run(monkeypatch, capsysbinary, ["score", "--config", bad], b"x")
    assert (code, out) == (2, b"") and "scoring.threshhold" in err
    code, _, err = run(monkeypatch, capsysbinary, ["score"], b"x")
    assert code == 2 and "checkpoint: not set" in err
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\0" * 100)
    code, _, err = run(monkeypatch, capsysbinary, ["score", "--checkpoint", corrupt], b"x")
    assert code == 3 and "corrupt.safetensors" in err
    assert run(monkeypatch, capsysbinary, ["score", "--tag", "--checkpoint", spam_ck, "f"])[0] == 2


def test_check_reports_problems(tmp_path, monkeypatch, capsysbinary, spam_ck):
    lists = "checks:\n  - name: lists\n    options:\n      allow: [a.example]\n"
    config = write_config(tmp_path, f"checkpoint: {spam_ck}\n{lists}")
    code, out, _ = run(monkeypatch, capsysbinary, ["check", "--config", config])
    assert code == 0 and b"checks: lists" in out and out.endswith(b"ok\n")
    bad = write_config(
        tmp_path,
        f"checkpoint: {spam_ck}\nchecks:\n  - name: lists\n    options:\n      allow: [7]\n",
    )
    code, _, err = run(monkeypatch, capsysbinary, ["check", "--config", bad])
    assert code == 2 and "checks[0].options.allow.0" in err
    high = write_config(tmp_path, f"checkpoint: {spam_ck}\nscoring:\n  reject_threshold: 0.2\n")
    code, _, err = run(monkeypatch, capsysbinary, ["check", "--config", high])
    assert code == 2 and "reject_threshold (0.2) must be >= threshold (0.5)" in err


def test_quarantine_commands(tmp_path, monkeypatch, capsysbinary):
    store = Store(tmp_path / "state" / "filterd" / "quarantine")
    verdict = Verdict(0.9, True, "quarantine", 0.5, "gpt2-tiny")
    qid = store.add(Mail(CRLF_MBOX, "s@example.org", ("r@example.org",)), verdict)
    code, out, _ = run(monkeypatch, capsysbinary, ["quarantine", "list"])
    assert code == 0 and out.startswith(qid.encode() + b"\t") and b"s@example.org" in out
    code, out, _ = run(monkeypatch, capsysbinary, ["quarantine", "show", qid])
    assert code == 0 and b"rcpt_tos: ['r@example.org']" in out
    # Released re-tagged as ham by a person: no forged Flag, a status naming the release.
    head, rest = CRLF_MBOX.split(b"\r\n", 1)
    code, out, _ = run(monkeypatch, capsysbinary, ["quarantine", "release", qid])
    assert code == 0 and store.read(qid) == CRLF_MBOX  # stdout: the store keeps it
    assert b"X-Spam-Flag" not in out and f"released={qid}".encode() in out
    assert out.startswith(head + b"\r\nX-Spam-Status: No, ")
    assert out.endswith(rest.replace(b"X-Spam-Flag: NO\r\n", b""))
    released = out
    code, out, _ = run(
        monkeypatch, capsysbinary, ["quarantine", "release", qid, "--to", tmp_path / "in"]
    )
    assert code == 0 and Path(out.decode().strip()).read_bytes() == released
    assert store.list() == []
    code, _, err = run(monkeypatch, capsysbinary, ["quarantine", "show", "../../etc/passwd"])
    assert code == 5 and "not a quarantine ID" in err
    qid = store.add(Mail(b"x"), verdict, now=time.time() - 40 * 86400)
    assert run(monkeypatch, capsysbinary, ["quarantine", "expire"])[:2] == (0, qid.encode() + b"\n")
    qid = store.add(Mail(b"x"), verdict)
    assert run(monkeypatch, capsysbinary, ["quarantine", "delete", qid])[0] == 0
    assert store.list() == []


def test_console_script_pipes_a_message(tmp_path, spam_ck):
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    cmd = [VENV_BIN / "filterd", "score", "--tag", "--checkpoint", spam_ck]
    done = subprocess.run(cmd, input=CRLF_MBOX, capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith(b"8-bit body \xff\r\nno final line end")
    assert b"X-Spam-Flag: YES\r\n" in done.stdout


def test_trained_checkpoint_scores_its_test_split_as_metrics_say(
    tmp_path, monkeypatch, capsysbinary
):
    """filterd-train on a SpamAssassin-layout corpus, then `filterd score --json` over its
    test split: the verdicts agree with what metrics.json reports."""
    from filterd.trainer import cli as train_cli
    from tests.conftest import SPAMASSASSIN

    corpus = tmp_path / "corpus"
    for folder in ("easy_ham", "hard_ham", "spam_2"):
        (corpus / folder).mkdir(parents=True)
        for f in sorted((SPAMASSASSIN / folder).iterdir())[:50]:
            (corpus / folder / f.name).symlink_to(f)
    out = tmp_path / "run"
    argv = ["--spamassassin", str(corpus), "--init", "random", "--arch", "gpt2-tiny"]
    argv += ["--epochs", "2", "--lr", "3e-3", "--max-tokens", "64", "--out", str(out)]
    assert train_cli.main(argv) == 0
    capsysbinary.readouterr()  # the trainer's report
    rows = [json.loads(line) for line in (out / "split.jsonl").read_text().splitlines()]
    test = {r["id"]: r["label"] for r in rows if r["split"] == "test"}
    code, stdout, _ = run(
        monkeypatch, capsysbinary, ["score", "--json", "--checkpoint", out, *test]
    )
    results = [json.loads(line) for line in stdout.splitlines()]
    assert code == 0 and len(results) == len(test) >= 19
    right = sum(r["label"] == test[r["path"]] for r in results)
    expected = json.loads((out / "metrics.json").read_text())["test"]["accuracy"]
    assert right / len(test) == pytest.approx(expected, abs=1e-9)


def test_check_validates_sources_and_notes_old_sections(
    tmp_path, monkeypatch, capsysbinary, spam_ck
):
    md = tmp_path / "Maildir"
    old = write_config(
        tmp_path,
        f"checkpoint: {spam_ck}\nsmtp:\n  enabled: true\n  port: 2525\nmaildir:\n  paths: [{md}]\n",
    )
    md.mkdir()
    for sub in ("tmp", "new", "cur"):
        (md / sub).mkdir()
    code, out, err = run(monkeypatch, capsysbinary, ["check", "--config", old])
    assert code == 0 and b"sources: smtp, maildir" in out
    assert err.count("filterd: note: the ") == 2 and "sources: [{name: smtp" in err
    # Pipes and cron jobs with the same config are not told each time.
    code, _, err = run(monkeypatch, capsysbinary, ["score", "--config", old], b"Subject: x\n\ny")
    assert code == 1 and "note" not in err
    (md / "new").rmdir()  # what serve would refuse, check refuses too
    code, _, err = run(monkeypatch, capsysbinary, ["check", "--config", old])
    assert code == 2 and "maildir.paths[0]: " in err and "not a Maildir" in err
    bad = write_config(
        tmp_path,
        f"checkpoint: {spam_ck}\nsources:\n  - name: smtp\n    options: {{port: 99999}}\n"
        "  - name: nntp\n",
    )
    code, _, err = run(monkeypatch, capsysbinary, ["check", "--config", bad])
    assert code == 2 and "sources[0].options.port: Input should be less than" in err
    fixed = write_config(tmp_path, f"checkpoint: {spam_ck}\nsources:\n  - name: nntp\n")
    code, _, err = run(monkeypatch, capsysbinary, ["check", "--config", fixed])
    assert code == 2 and "sources[0].name: no sources plugin 'nntp' (installed: " in err

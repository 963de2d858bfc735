"""Learning from corrections: the feedback store, `filterd learn`, quarantine release,
`filterd retrain` with its gate, `filterd rollback`, the daemon's learn socket and its
own retraining. Real files, real `filterd` processes, a gpt2-tiny model."""

from __future__ import annotations

import errno
import fcntl
import json
import mailbox
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from filterd import learn_socket
from filterd.config import Config
from filterd.headers import Tagger
from filterd.learning import learn, open_store
from filterd.model.checkpoint import checkpoint_path
from filterd.store import durable
from filterd.store.feedback import FeedbackError, FeedbackStore, stats, text_key
from filterd.store.quarantine import Store
from filterd.verdict import Verdict
from tests.conftest import SPAMASSASSIN
from tests.test_daemon import Daemon
from tests.test_engine import make_checkpoint

SPAM = sorted((SPAMASSASSIN / "spam").iterdir())
HAM = sorted((SPAMASSASSIN / "easy_ham").iterdir())


def mail(subject: str, body: str = "hello there", extra: str = "") -> bytes:
    return f"From: a@example.org\nSubject: {subject}\n{extra}\n{body}\n".encode()


def filterd(*args, config=None, stdin: bytes = b"", **kw) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "filterd.cli", *map(str, args)]
    if config is not None:
        command += ["--config", str(config)]
    return subprocess.run(command, input=stdin, capture_output=True, timeout=300, **kw)


def write_config(tmp_path: Path, **settings) -> Path:
    path = tmp_path / "config.yaml"
    base = {
        "headers": {"secret_file": str(tmp_path / "secret")},
        "quarantine": {"path": str(tmp_path / "quarantine")},
        "learning": {"store": str(tmp_path / "feedback")},
    }
    for key, value in settings.items():
        base[key] = base.get(key, {}) | value if isinstance(value, dict) else value
    path.write_text(json.dumps(base))
    return path


# --- the store ----------------------------------------------------------------------------


def test_one_entry_per_text_newest_label_wins_and_forget_removes_it(tmp_path):
    store = FeedbackStore(tmp_path / "fb")
    first = mail("win a prize", extra="Received: by relay1\n")
    again = mail("win a prize", extra="Received: by relay2\n")  # other headers, same text
    assert store.add(first, "text", "spam", "t", when="2026-01-01T00:00:00+00:00") == "added"
    assert store.add(first, "text", "spam", "t", when="2026-01-01T00:00:00+00:00") == "unchanged"
    # An older label for the same text loses; a newer one (another host) replaces it.
    assert store.add(again, "text", "ham", "t", when="2025-12-31T00:00:00+00:00") == "kept newer"
    assert store.add(again, "text", "ham", "t", when="2026-01-02T00:00:00+00:00", host="b") == (
        "replaced"
    )
    [record] = store.records()
    assert (record.label, record.host) == ("ham", "b")
    assert store.read(record) == again  # byte for byte
    assert len(list((tmp_path / "fb" / "messages").iterdir())) == 1  # the old file is gone
    assert oct((tmp_path / "fb").stat().st_mode & 0o777) == "0o700"
    store.forget("text")
    assert store.records() == []
    with pytest.raises(FeedbackError, match="not in the feedback store"):
        store.forget("text")


def test_retention_drops_the_oldest_and_old_debris(tmp_path):
    store = FeedbackStore(tmp_path / "fb", max_messages=2, retention_days=10)
    for n, day in enumerate(("01", "15", "16", "17")):
        store.add(mail(f"m{n}"), f"text {n}", "spam", "t", when=f"2026-01-{day}T00:00:00+00:00")
    debris = tmp_path / "fb" / "messages" / "crashed.eml"
    debris.write_bytes(b"x")
    os.utime(debris, (0, 0))
    now = 1768608000.0  # 2026-01-17
    removed = store.prune(now)
    assert removed == [text_key("text 0"), text_key("text 1")]  # too old; then over the cap
    assert [r.key for r in store.records()] == [text_key("text 2"), text_key("text 3")]
    assert not debris.exists()
    assert len(list((tmp_path / "fb" / "messages").iterdir())) == 2


def test_a_full_disk_loses_nothing_already_stored(tmp_path, monkeypatch):
    store = FeedbackStore(tmp_path / "fb")
    store.add(mail("kept"), "kept", "spam", "t")
    before = store.records()

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("filterd.store.feedback.write_temp", full)
    monkeypatch.setattr(durable, "write_temp", full)
    with pytest.raises(OSError, match="No space"):
        store.add(mail("new"), "new", "spam", "t")
    with pytest.raises(OSError, match="No space"):
        store.add(mail("kept", "other bytes"), "kept", "ham", "t", when="2099-01-01T00:00:00+00:00")
    assert store.records() == before
    assert store.read(before[0]) == mail("kept")
    assert not [p for p in (tmp_path / "fb").rglob(".*")]  # no temporary left


def test_the_verdict_comes_from_a_marker_this_host_wrote(tmp_path):
    config = Config.model_validate(
        {
            "headers": {"secret_file": str(tmp_path / "secret")},
            "learning": {"store": str(tmp_path / "fb")},
        }
    )
    (tmp_path / "secret").write_bytes(os.urandom(32))
    os.chmod(tmp_path / "secret", 0o600)
    tagger = Tagger((tmp_path / "secret").read_bytes())
    tagged = tagger.tag(mail("cheap meds"), Verdict(0.91, True, "tag", 0.5, "gpt2-tiny"))
    learn(tagged, "ham", config=config)
    forged = mail("other", extra="X-Spam-Status: Yes, score=9.1 required=5.0\n")
    learn(forged, "ham", config=config)
    verdicts = {r.verdict and r.verdict["is_spam"] for r in open_store(config).records()}
    assert verdicts == {True, None}  # the forged status is no verdict


# --- filterd learn ------------------------------------------------------------------------


def test_learn_reads_files_folders_maildirs_mboxes_and_stdin(tmp_path):
    config = write_config(tmp_path)
    box = tmp_path / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (box / sub).mkdir(parents=True)
    shutil.copy(SPAM[0], box / "new" / "1")
    shutil.copy(SPAM[1], box / "cur" / "2:2,S")
    mbox = mailbox.mbox(tmp_path / "spam.mbox")
    for path in SPAM[2:5]:
        mbox.add(path.read_bytes())
    mbox.close()
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(SPAM[5], folder / "a")
    run = filterd("learn", "--spam", box, tmp_path / "spam.mbox", folder, SPAM[6], config=config)
    assert run.returncode == 0, run.stderr
    assert b"7 added" in run.stderr
    run = filterd("learn", "--ham", config=config, stdin=HAM[0].read_bytes())
    assert run.returncode == 0, run.stderr
    # A message relabelled (a person changed their mind) is replaced, not doubled.
    assert b"1 replaced" in filterd("learn", "--ham", SPAM[6], config=config).stderr
    stats = json.loads(filterd("learn", "--stats", "--json", config=config).stdout)
    assert stats == {
        "total": 8,
        "by_label": {"feedback spam": 6, "feedback ham": 2},
        "by_source": {"learn spam": 6, "learn ham": 2},
    }
    assert filterd("learn", "--forget", SPAM[6], config=config).returncode == 0
    assert json.loads(filterd("learn", "--stats", "--json", config=config).stdout)["total"] == 7


def test_learn_says_what_is_wrong_and_records_the_rest(tmp_path):
    config = write_config(tmp_path)
    (tmp_path / "binary").write_bytes(b"\x00\x01 not mail")
    run = filterd(
        "learn", "--spam", tmp_path / "binary", tmp_path / "missing", SPAM[0], config=config
    )
    assert run.returncode == 4
    assert b"not a mail message" in run.stderr
    assert b"missing: no such file or folder" in run.stderr
    assert b"1 added, 2 failed" in run.stderr
    run = filterd("learn", "--forget", SPAM[1], config=config)
    assert run.returncode == 4 and b"not in the feedback store" in run.stderr
    assert json.loads(filterd("learn", "--stats", "--json", config=config).stdout)["total"] == 1


def test_quarantine_release_records_a_confirmed_false_positive(tmp_path):
    config = write_config(tmp_path)
    store = Store(tmp_path / "quarantine")
    from filterd.mail import Mail

    verdict = Verdict(0.97, True, "quarantine", 0.5, "gpt2-tiny")
    first = store.add(Mail(HAM[1].read_bytes()), verdict)
    second = store.add(Mail(HAM[2].read_bytes()), verdict)
    assert (
        filterd("quarantine", "release", first, "--to", tmp_path / "in", config=config).returncode
        == 0
    )
    run = filterd(
        "quarantine", "release", second, "--to", tmp_path / "in", "--no-learn", config=config
    )
    assert run.returncode == 0
    stats = json.loads(filterd("learn", "--stats", "--json", config=config).stdout)
    assert stats["by_source"] == {"quarantine-release ham": 1}


# --- retrain, the gate, rollback ----------------------------------------------------------


def parent_checkpoint(folder: Path, lr: float) -> Path:
    """An always-ham gpt2-tiny whose split.jsonl replays spam and tests on ham."""
    path = make_checkpoint(folder, -2.0)
    rows = [{"id": str(p), "label": "spam", "split": "train"} for p in SPAM[10:40]]
    rows += [{"id": str(p), "label": "ham", "split": "test"} for p in HAM[10:30]]
    (folder / "split.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "metrics.json").write_text(json.dumps({"settings": {"lr": lr}}))
    return path


def feed(config: Path, n: int = 12) -> None:
    run = filterd("learn", "--spam", *SPAM[50 : 50 + n], config=config)
    assert run.returncode == 0, run.stderr


def retrain_with(tmp_path, fpr_tolerance: float):
    """`filterd retrain` of an always-ham parent on 12 spam corrections: the candidate
    learns "spam" everywhere, more right on the held-out spam, more false positives on
    the test ham. (checkpoint file, its bytes before, config, the finished process)"""
    path = parent_checkpoint(tmp_path / "model", lr=1e-2)
    before = path.read_bytes()
    config = write_config(
        tmp_path,
        checkpoint=str(tmp_path / "model"),
        learning={"holdout_min": 5, "fpr_tolerance": fpr_tolerance, "epochs": 3},
    )
    feed(config)
    return path, before, config, filterd("retrain", config=config)


def test_retrain_installs_what_the_gate_accepts_and_rollback_restores(tmp_path):
    path, before, config, run = retrain_with(tmp_path, fpr_tolerance=1.0)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["installed"] and report["gate"]["install"]
    assert report["feedback"] == {
        "train": {"ham": 0, "spam": 7},
        "holdout": {"ham": 0, "spam": 5},
        "replay": {"ham": 0, "spam": 30},
    }
    assert report["gate"]["current"]["holdout"]["accuracy"] == 0.0
    assert report["gate"]["candidate"]["holdout"]["accuracy"] > 0.0
    assert path.read_bytes() != before
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert metrics["parent"]["sha256"] == report["parent"]["sha256"]
    [kept] = (tmp_path / "model" / "history").glob("2*.safetensors")
    assert kept.read_bytes() == before
    run = filterd("rollback", config=config)
    assert run.returncode == 0, run.stderr
    assert path.read_bytes() == before
    assert json.loads((tmp_path / "model" / "metrics.json").read_text()) == {
        "settings": {"lr": 1e-2}
    }
    run = filterd("rollback", config=config)
    assert run.returncode == 3 and b"nothing to roll back to" in run.stderr


def test_the_gate_keeps_the_running_model_when_false_positives_rise(tmp_path):
    path, before, _, run = retrain_with(tmp_path, fpr_tolerance=0.0)
    assert run.returncode == 1, run.stderr
    report = json.loads(run.stdout)
    assert not report["installed"]
    reason = report["gate"]["reason"]
    assert reason.startswith("false-positive rate on the original test ham 0.0000 -> ")
    assert reason.endswith("rises (tolerance 0.0)")
    assert b"kept the running model" in run.stderr
    assert path.read_bytes() == before
    assert not (tmp_path / "model" / "history").exists()


def test_retrain_refuses_without_replay_data_too_few_labels_or_a_second_run(tmp_path):
    make_checkpoint(tmp_path / "model", -2.0)  # no split.jsonl beside it
    config = write_config(tmp_path, checkpoint=str(tmp_path / "model"), learning={"holdout_min": 5})
    feed(config, 3)
    run = filterd("retrain", config=config)
    assert run.returncode == 2 and b"a retrain needs at least 6" in run.stderr
    feed(config, 12)
    run = filterd("retrain", config=config)
    assert run.returncode == 2 and b"no replay data" in run.stderr and b"--replay" in run.stderr
    with open(tmp_path / "feedback" / "retrain.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        run = filterd("retrain", "--no-replay", config=config)
    assert run.returncode == 75 and b"already running" in run.stderr


def test_a_checkpoint_replaced_during_the_retrain_is_left_alone(tmp_path, monkeypatch):
    from filterd.trainer import retrain

    path = parent_checkpoint(tmp_path / "model", lr=1e-2)
    config = Config.model_validate(
        {
            "checkpoint": str(tmp_path / "model"),
            "learning": {"store": str(tmp_path / "fb"), "holdout_min": 5, "fpr_tolerance": 1.0},
        }
    )
    for p in SPAM[50:62]:
        learn(p.read_bytes(), "spam", config=config)
    by_hand = make_checkpoint(tmp_path / "other", 2.0).read_bytes()
    real_gate = retrain.gate

    def gate_then_replace(*args):
        decision = real_gate(*args)
        path.write_bytes(by_hand)  # an admin copies a checkpoint in meanwhile
        return decision

    monkeypatch.setattr(retrain, "gate", gate_then_replace)
    report = retrain.retrain(config, path)
    assert not report["installed"]
    assert report["gate"]["reason"] == "the checkpoint was replaced during the retrain"
    assert path.read_bytes() == by_hand


# --- the daemon: learn socket and its own retraining ---------------------------------------


def test_the_daemon_takes_labels_on_its_socket_and_retrains_on_its_own(tmp_path):
    before = parent_checkpoint(tmp_path / "model", lr=1e-2).read_bytes()
    sockets = Path(tempfile.mkdtemp(prefix="filterd-"))  # a socket path under 108 bytes
    inbox = tmp_path / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (inbox / sub).mkdir(parents=True)
    config_path = write_config(
        tmp_path,
        checkpoint=str(tmp_path / "model"),
        learning={
            "holdout_min": 5,
            "fpr_tolerance": 1.0,
            "socket": str(sockets / "learn.sock"),
            "socket_mode": "0666",
            "retrain": {"after_labels": 12},
        },
    )
    settings = json.loads(config_path.read_text())
    settings["sources"] = [{"name": "maildir", "options": {"paths": [str(inbox)]}}]
    daemon = Daemon(tmp_path, settings, smtp=False)
    try:
        daemon.wait_for(r"ready: ")
        # Straight to the socket, as a script would.
        assert learn_socket.send(sockets / "learn.sock", "spam", SPAM[50].read_bytes()) == "added"
        with pytest.raises(FeedbackError, match="not a mail message"):
            learn_socket.send(sockets / "learn.sock", "spam", b"\x00junk")
        # `filterd learn` through the daemon, as an IMAPSieve script running as the mail
        # user does (there by default, as it cannot write the store).
        learn_args = ("learn", "--spam", "--via-daemon", "--source", "imapsieve")
        run = filterd(*learn_args, *SPAM[51:62], config=config_path)
        assert run.returncode == 0, run.stderr
        assert b"11 added" in run.stderr
        store = FeedbackStore(tmp_path / "feedback")
        uid = os.getuid()
        assert {r.source for r in store.records()} == {
            f"socket uid={uid}",
            f"imapsieve (socket uid={uid})",
        }
        daemon.wait_for(r"retrain \(12 new labels\): started", timeout=30)
        daemon.wait_for(r"retrain installed a new model in \d+ s", timeout=240)
        # Loaded once: by the retrainer, or by the file watch if that saw the file first.
        daemon.wait_for(r"reload \((retrain installed a new model|checkpoint file changed)\)")
    finally:
        assert daemon.stop() == 0
        shutil.rmtree(sockets)
    assert sum("reload (" in line for line in daemon.lines) == 1, "".join(daemon.lines)
    assert checkpoint_path(tmp_path / "model").read_bytes() != before
    [kept] = (tmp_path / "model" / "history").glob("2*.safetensors")
    assert kept.read_bytes() == before


# --- moves in a mail client -----------------------------------------------------------------


def test_moves_into_and_out_of_junk_are_learned(tmp_path, spam):
    """With the real watcher: filterd files a message in Junk and the user moves it back
    (ham); the user moves a message filterd passed into Junk (spam); renames within a
    folder, mail filed by someone else, and Junk mail that says spam teach nothing."""
    import asyncio

    from filterd.daemon import load_sources
    from filterd.engine import Engine
    from filterd.store import maildir
    from tests.test_maildir_source import KEY, Running, message, until

    md = maildir.ensure(tmp_path / "Maildir")
    config = Config.model_validate(
        {
            "scoring": {"quarantine_threshold": 0.8},
            "quarantine": {"path": str(tmp_path / "store")},
            "learning": {"store": str(tmp_path / "fb"), "maildir_moves": True},
            "sources": [{"name": "maildir", "options": {"paths": [str(md)]}}],
        }
    )
    tagger = Tagger(KEY)
    (maildir_source,) = load_sources(config)
    running = Running(maildir_source, Engine(spam, config, tagger))
    store = FeedbackStore(tmp_path / "fb")
    junk = md / ".Junk"
    passed = tagger.tag(message(2), Verdict(0.1, False, "tag", 0.5, "gpt2-tiny"))
    sieve_filed = tagger.tag(message(3), Verdict(0.99, True, "tag", 0.5, "gpt2-tiny"))

    def labels():
        return sorted((r.label, r.source) for r in store.records())

    async def main():
        await running.start()
        maildir.deliver(md, message(1), "1.M1.host")  # filterd files it in Junk
        await until(lambda: list((junk / "new").iterdir()))
        (filed,) = (junk / "new").iterdir()
        os.rename(filed, junk / "cur" / (filed.name + ":2,S"))  # read in Junk: no move
        os.rename(junk / "cur" / (filed.name + ":2,S"), md / "cur" / "back:2,S")  # out: ham
        await until(lambda: labels() == [("ham", "maildir-move")])
        (md / "cur" / "passed:2,S").write_bytes(passed)
        os.rename(md / "cur" / "passed:2,S", junk / "cur" / "passed:2,S")  # in: spam
        (junk / "cur" / "sieve:2,S").write_bytes(sieve_filed)  # Sieve's: says spam already
        os.rename(junk / "cur" / "sieve:2,S", md / "cur" / "sieve:2,S")  # not filed by us
        await until(lambda: len(labels()) == 2)
        await asyncio.sleep(1.0)  # time for a wrong third label to appear
        await running.stop()

    asyncio.run(main())
    assert labels() == [("ham", "maildir-move"), ("spam", "maildir-move")]
    texts = {r.label: store.read(r) for r in store.records()}
    assert texts["spam"] == passed
    assert message(1) in texts["ham"]  # the copy the user moved back, tagged by filterd


def test_the_gate_scores_both_models_over_one_pass_of_the_frozen_blocks(tiny_model):
    """The shared cache gives each model the probabilities it gives on its own."""
    import copy

    import torch

    from filterd.model.checkpoint import CheckpointMeta
    from filterd.model.classifier import Classifier
    from filterd.trainer.retrain import score_both

    candidate = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in candidate.blocks[-1].parameters():  # as training the top block would
            p.add_(torch.randn_like(p) * 0.05)
        candidate.score.bias.add_(torch.tensor([0.0, 0.5]))
    texts = [f"message number {n} " * n for n in range(1, 20)]
    meta = CheckpointMeta(arch="gpt2-tiny", config=tiny_model.config.to_dict(), max_tokens=64)
    alone = [Classifier(m, meta).score_texts(texts) for m in (tiny_model, candidate)]
    tokenizer = Classifier(tiny_model, meta).tokenizer
    tokens = [tokenizer.encode(t, 64) for t in texts]
    first = len(tiny_model.blocks) - 1
    shared = score_both(tiny_model, candidate, first, tokens, tokenizer.pad_id)
    assert alone[0] != alone[1]
    for a, b in zip(alone, shared, strict=True):
        assert b == pytest.approx(a, abs=1e-5)


def test_a_damaged_label_is_skipped_and_named_not_a_crash(tmp_path):
    store = FeedbackStore(tmp_path / "fb")
    store.add(mail("one"), "one", "spam", "t")
    store.add(mail("two"), "two", "ham", "t")
    damaged = tmp_path / "fb" / "labels" / f"{text_key('one')}.json"
    record = json.loads((tmp_path / "fb" / "labels" / f"{text_key('two')}.json").read_text())
    damaged.write_text(json.dumps(record | {"key": text_key("one"), "time": "yesterday"}))
    problems: list[str] = []
    assert [r.label for r in store.records(problems)] == ["ham"]
    assert "damaged label" in problems[0] and damaged.name in problems[0]
    assert stats(store.records())["total"] == 1
    store.prune()  # no crash either


def test_a_saved_message_with_a_from_line_in_its_body_is_one_message(tmp_path):
    from filterd.mailfiles import raw_messages

    saved = tmp_path / "single.eml"
    saved.write_bytes(b"From a@b Thu Jan 1 00:00:00 2026\nSubject: hi\n\nhello\nFrom the team\n")
    assert [m for _, m in raw_messages(saved)] == [saved.read_bytes()]
    box = tmp_path / "box.mbox"  # in an mbox a body's "From " is escaped
    first = saved.read_bytes().replace(b"\nFrom the", b"\n>From the")
    box.write_bytes(first + b"\nFrom c@d Thu Jan 1 00:00:00 2026\nSubject: 2\n\nx\n")
    assert len(list(raw_messages(box))) == 2


def test_learn_reads_dash_as_stdin_and_stops_when_the_daemon_is_away(tmp_path):
    config = write_config(tmp_path, learning={"socket": str(tmp_path / "none.sock")})
    run = filterd("learn", "--spam", "-", config=config, stdin=SPAM[0].read_bytes())
    assert run.returncode == 0 and b"1 added" in run.stderr
    run = filterd("learn", "--spam", "--via-daemon", SPAM[1], SPAM[2], config=config)
    assert run.returncode == 4
    assert b"learn socket" in run.stderr and b"stopped" in run.stderr
    assert b"cannot write the feedback store" not in run.stderr

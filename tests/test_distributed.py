"""filterd-train under torchrun: two CPU ranks (gloo) against one process."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import filterd
from filterd.model.gpt2 import ARCHITECTURES, GPT2Classifier
from filterd.model.tokenizer import ENDOFTEXT, gpt2_tokenizer
from filterd.trainer.distributed import Group
from filterd.trainer.train import Batcher, Settings, logits, set_trainable, train, train_batches

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
TRAIN = [sys.executable, "-m", "filterd.trainer.cli"]
# The stated tolerance (README, "Distributed training"): two ranks of 8 against one process
# of 16 see the same messages per step but in other batches, so the weights differ a little.
ACCURACY_TOLERANCE, AUC_TOLERANCE = 0.03, 0.01


def test_every_rank_takes_the_same_number_of_messages_and_all_are_used():
    for n, world in ((10, 4), (397, 2), (8, 8), (9, 2)):
        shards = [Group(rank, world).train_shard(n) for rank in range(world)]
        assert len({len(s) for s in shards}) == 1
        assert set().union(*shards) == set(range(n))
        assert all(i % world == rank for rank, s in enumerate(shards) for i in s)
    with pytest.raises(ValueError, match="3 training messages cannot be shared by 4 ranks"):
        Group(3, 4).train_shard(3)


def _model() -> GPT2Classifier:
    torch.manual_seed(0)
    return GPT2Classifier(ARCHITECTURES["gpt2-tiny"])  # dropout 0: no randomness per rank


SETTINGS = Settings(epochs=1, batch_size=4, lr=1e-2, trainable=None, evaluate_epochs=False)


def _one_ddp_step(rank: int, port: int, tokens, labels, out: str) -> None:
    os.environ.update(
        {"WORLD_SIZE": "2", "RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)
    group = Group.from_env("cpu")
    model = _model()
    train(model, tokens, labels, [], [], SETTINGS, max_steps=1, pad_id=ENDOFTEXT, group=group)
    if group.main:
        torch.save(model.state_dict(), out)
    group.close()


def test_a_step_on_two_ranks_is_a_step_on_both_their_batches_in_one_process(sms_lines, tmp_path):
    """DDP averages the ranks' gradients: one step of two ranks of 4 gives the weights one
    process gets from the mean loss of the same 8 messages."""
    tokens = [gpt2_tokenizer().encode(t, 48) for _, t in sms_lines[:40]]
    labels = [int(label == "spam") for label, _ in sms_lines[:40]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(_one_ddp_step, (port, tokens, labels, str(out)), nprocs=2)
    ranked = torch.load(out)

    model = _model()
    set_trainable(model, None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=SETTINGS.lr, weight_decay=0.1, fused=True)
    batcher = Batcher(model, tokens, 0, False, ENDOFTEXT)
    loss = 0
    for rank in (0, 1):
        shard = Group(rank, 2).train_shard(len(labels))
        lengths = [len(tokens[i]) for i in shard]
        first = train_batches(lengths, SETTINGS.batch_size, random.Random(SETTINGS.seed))[0]
        batch = [shard[p] for p in first]
        loss = (
            loss + F.cross_entropy(logits(model, batcher, batch), torch.tensor(labels)[batch]) / 2
        )
    loss.backward()
    optimizer.step()
    moved = 0
    for name, value in model.state_dict().items():
        assert torch.allclose(value, ranked[name], atol=1e-6), name
        moved += not torch.equal(value, _model().state_dict()[name])
    assert moved > 10  # the step changed the weights: the comparison is not of two inits


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sms_lines) -> tuple[Path, Path]:
    """300 ham and 300 spam SMS, and a gpt2-tiny checkpoint trained on them to start from."""
    ham = [t for label, t in sms_lines if label == "ham"][:300]
    spam = [t for label, t in sms_lines if label == "spam"][:300]
    folder = tmp_path_factory.mktemp("ddp")
    sms = folder / "sms600"
    sms.write_text("".join(f"ham\t{t}\n" for t in ham) + "".join(f"spam\t{t}\n" for t in spam))
    base = folder / "base"
    tiny = ["--init", "random", "--arch", "gpt2-tiny", "--epochs", "3", "--lr", "3e-3"]
    subprocess.run(
        [*TRAIN, "--sms", str(sms), *tiny, "--seed", "7", "--out", str(base)], check=True
    )
    return sms, base


def _args(corpus, out: Path) -> list[str]:
    sms, base = corpus
    return [
        "--sms",
        str(sms),
        "--init",
        str(base),
        "--epochs",
        "2",
        "--lr",
        "1e-3",
        "--out",
        str(out),
    ]


def test_two_ranks_train_a_checkpoint_that_agrees_with_one_process(corpus, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([*TRAIN, *_args(corpus, one), "--batch-size", "16"], check=True)
    run = subprocess.run(
        [*TORCHRUN, "2", "-m", "filterd.trainer.cli", *_args(corpus, two), "--batch-size", "8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    # Rank 0 alone speaks: one progress report, one metrics table.
    stderr = " ".join(run.stderr.split())  # rich wraps lines at 80 columns off a terminal
    assert stderr.count("read 600 messages") == 1
    assert "cpu x 2 ranks" in stderr
    assert run.stdout.count("filterd-train metrics") == 1

    assert (one / "split.jsonl").read_bytes() == (two / "split.jsonl").read_bytes()
    single, ranked = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert ranked["settings"]["ranks"] == 2 and single["settings"]["ranks"] == 1
    assert abs(ranked["test"]["accuracy"] - single["test"]["accuracy"]) <= ACCURACY_TOLERANCE
    assert abs(ranked["test"]["roc_auc"] - single["test"]["roc_auc"]) <= AUC_TOLERANCE

    # The gathered scores are the whole split's: one process re-scoring the checkpoint on the
    # written split finds the metrics the two ranks reported.
    evaluated = subprocess.run(
        [*TRAIN, "--evaluate", str(two), "--split", str(two / "split.jsonl"), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    again = json.loads(evaluated.stdout)
    assert again["n"] == ranked["test"]["n"] == single["test"]["n"]
    assert again["accuracy"] == pytest.approx(ranked["test"]["accuracy"])
    assert again["roc_auc"] == pytest.approx(ranked["test"]["roc_auc"], abs=1e-4)
    assert again["threshold"] == ranked["threshold"]
    clf = filterd.load_classifier(two)
    assert clf.score_texts(["WINNER!! Claim your free prize now, txt WIN to 80086"])[0] > 0.5


def _rank_pid(torchrun: int, rank: int) -> int | None:
    """The process of that rank among torchrun's children (not another run's)."""
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == torchrun and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_a_rank_that_dies_fails_the_run_and_writes_no_checkpoint(corpus, tmp_path):
    out = tmp_path / "killed"
    argv = [*_args(corpus, out), "--epochs", "50", "--patience", "0"]
    run = subprocess.Popen(
        [*TORCHRUN, "2", "-m", "filterd.trainer.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for line in run.stdout:
            lines.append(line)
            if line.startswith("epoch 1:"):  # both ranks are in the training loop
                break
        pid = _rank_pid(run.pid, 1)
        assert pid is not None, "".join(lines)
        os.kill(pid, signal.SIGKILL)
        started = time.monotonic()
        output = "".join(lines) + run.stdout.read()
        assert run.wait(timeout=60) != 0
        assert time.monotonic() - started < 60  # no hang in a collective
    finally:
        run.kill()
        run.wait()
    assert "rank      : 1" in output and "SIGKILL" in output, output
    assert not (out / "model.safetensors").exists()


def test_more_ranks_than_training_messages_is_said_once(tmp_path, sms_lines):
    sms = tmp_path / "sms6"
    ham = [t for label, t in sms_lines if label == "ham"][:3]
    spam = [t for label, t in sms_lines if label == "spam"][:3]
    sms.write_text("".join(f"ham\t{t}\n" for t in ham) + "".join(f"spam\t{t}\n" for t in spam))
    argv = ["--sms", str(sms), "--init", "random", "--arch", "gpt2-tiny", "--out", str(tmp_path)]
    run = subprocess.run(
        [*TORCHRUN, "3", "-m", "filterd.trainer.cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0
    said = " ".join(run.stderr.split()).count("2 training messages cannot be shared by 3 ranks")
    assert said == 1, run.stderr
    assert not (tmp_path / "model.safetensors").exists()

import itertools
import json

import pytest
import torch

import filterd
from filterd.model.checkpoint import CheckpointError
from filterd.model.gpt2 import ARCHITECTURES, GPT2Classifier
from filterd.model.tokenizer import ENDOFTEXT, gpt2_tokenizer
from filterd.text import TEXT_VERSION
from filterd.trainer import cli
from filterd.trainer.metrics import binary_metrics, choose_threshold, roc_auc
from filterd.trainer.train import Settings, lr_schedule, set_trainable, train
from tests.conftest import SMS_FILE
from tests.test_checkpoint import _rewrite_meta


def _tokens(sms_lines, n):
    rows = sms_lines[:n]
    return [gpt2_tokenizer().encode(t, 64) for _, t in rows], [
        int(label == "spam") for label, _ in rows
    ]


@pytest.mark.parametrize("arch", ["gpt2-tiny", "gpt2-mini"])
def test_cached_frozen_blocks_give_the_same_losses_as_recomputing(arch, sms_lines):
    tokens, labels = _tokens(sms_lines, 48)
    losses = []
    for cache in (True, False):
        torch.manual_seed(0)
        model = GPT2Classifier(ARCHITECTURES[arch])
        settings = Settings(epochs=2, trainable=1, cache_frozen=cache, lr=1e-3)
        history = train(
            model, tokens, labels, tokens[:8], labels[:8], settings, max_steps=8, pad_id=ENDOFTEXT
        )
        losses.append(history.step_losses)
    assert len(losses[0]) == 8
    assert max(abs(a - b) for a, b in zip(*losses, strict=True)) <= 1e-5
    assert losses[0][0] != losses[0][-1]  # it really trained


def test_only_the_last_blocks_norm_and_head_train(sms_lines):
    tokens, labels = _tokens(sms_lines, 24)
    torch.manual_seed(0)
    model = GPT2Classifier(ARCHITECTURES["gpt2-mini"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(
        model,
        tokens,
        labels,
        tokens[:4],
        labels[:4],
        Settings(epochs=1, trainable=2, lr=1e-3),
        pad_id=ENDOFTEXT,
    )
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed
    assert all(k.startswith(("h.2.", "h.3.", "ln_f.", "score.")) for k in changed)
    assert any(k.startswith("h.2.") for k in changed)
    with pytest.raises(ValueError, match="has 4 blocks"):
        set_trainable(model, 5)


def test_threshold_respects_the_false_positive_bound():
    probs = [0.1, 0.2, 0.3, 0.6, 0.65, 0.7, 0.8, 0.9]
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    t = choose_threshold(probs, labels, max_fpr=0.0)
    assert 0.6 < t <= 0.65
    assert binary_metrics(probs, labels, t)["false_positives"] == 0
    loose = choose_threshold(probs, labels, max_fpr=0.5)
    assert binary_metrics(probs, labels, loose)["accuracy"] == 1.0
    assert roc_auc(probs, labels) == 1.0
    assert roc_auc([0.5, 0.5], [0, 1]) == 0.5


def test_metrics_counts():
    m = binary_metrics([0.9, 0.8, 0.2, 0.6], [1, 0, 1, 0], threshold=0.7)
    assert (m["false_positives"], m["false_negatives"], m["n"]) == (1, 1, 4)
    assert m["accuracy"] == 0.5
    assert m["accuracy_argmax"] == 0.25


def test_end_to_end_tiny_run_writes_a_checkpoint_filterd_loads(tmp_path, sms_slice, capsys):
    out = tmp_path / "run"
    args = ["--sms", str(sms_slice), "--init", "random", "--arch", "gpt2-tiny"]
    code = cli.main([*args, "--out", str(out), "--epochs", "2", "--lr", "3e-3", "--plot"])
    assert code == 0
    assert {p.name for p in out.iterdir()} >= {
        "model.safetensors",
        "metrics.json",
        "split.jsonl",
        "loss.png",
        "accuracy.png",
        "roc.png",
    }
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["arch"] == "gpt2-tiny" and metrics["epochs"] == 2
    assert set(metrics["test"]) >= {"n", "accuracy", "accuracy_argmax", "roc_auc", "f1"}
    assert metrics["counts"]["read"] == 240
    splits = [json.loads(line) for line in (out / "split.jsonl").read_text().splitlines()]
    assert sum(r["split"] == "test" for r in splits) == metrics["test"]["n"]

    clf = filterd.load_classifier(out)
    assert clf.threshold == metrics["threshold"]
    assert clf.meta.data_fingerprint
    p = clf.score_texts(["Free entry! Text WIN to 80086 now", "ok see you later"])
    assert all(0.0 <= x <= 1.0 for x in p)

    capsys.readouterr()
    assert cli.main(["--evaluate", str(out), "--split", str(out / "split.jsonl"), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["n"] == metrics["test"]["n"]
    assert evaluated["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert evaluated["false_positives"] == metrics["test"]["false_positives"]


def test_retraining_from_a_checkpoint(tmp_path, sms_slice):
    first, second = tmp_path / "a", tmp_path / "b"
    base = ["--sms", str(sms_slice), "--epochs", "1"]
    assert cli.main([*base, "--init", "random", "--arch", "gpt2-tiny", "--out", str(first)]) == 0
    # A checkpoint from a newer text extraction can't score here, but it can be retrained.
    _rewrite_meta(first / "model.safetensors", text_version=TEXT_VERSION + 1)
    with pytest.raises(CheckpointError, match="text extraction"):
        filterd.load_classifier(first)
    assert cli.main([*base, "--init", str(first), "--out", str(second), "--max-tokens", "48"]) == 0
    metrics = json.loads((second / "metrics.json").read_text())
    assert metrics["settings"]["trainable"] == "last-2"
    assert filterd.load_classifier(second).meta.max_tokens == 48


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--init", "random", "--out", "x"], "give one data source"),
        (["--ham", "/nonexistent", "--out", "x", "--init", "random"], "--ham and --spam"),
        (["--sms", str(SMS_FILE), "--init", "random"], "--out DIR is required"),
        (
            ["--sms", str(SMS_FILE), "--init", "random", "--out", "x", "--trainable", "some"],
            "last-N",
        ),
        (["--sms", str(SMS_FILE), "--init", "/no/such/weights", "--out", "x"], "neither a file"),
        (["--sms", str(SMS_FILE), "--out", "x", "--patience", "-1"], "--patience -1"),
        pytest.param(
            ["--sms", str(SMS_FILE), "--out", "x", "--device", "cuda"],
            "sees no CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present"),
        ),
    ],
)
def test_cli_errors_are_clear(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")


def test_missing_pretrained_weights_never_fall_back_silently(tmp_path, monkeypatch, capsys):
    from filterd.model import pretrained

    monkeypatch.setattr(pretrained, "HUB_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("FILTERD_CACHE", str(tmp_path))
    argv = ["--sms", str(SMS_FILE), "--init", "gpt2", "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    assert "could not download gpt2" in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "o").exists()


def test_metrics_table_fits_80_columns_with_whole_headers():
    import io

    from rich.console import Console

    m = {
        "n": 730,
        "accuracy": 0.9479,
        "accuracy_argmax": 0.9603,
        "precision": 0.99,
        "recall": 0.9,
        "f1": 0.94,
        "roc_auc": 0.9951,
        "false_positives": 5,
        "false_negatives": 33,
        "true_negatives": 360,
        "true_positives": 332,
    }
    buf = io.StringIO()
    cli.print_metrics({"train": m, "val": m, "test": m}, 0.792, Console(file=buf, width=80))
    text = buf.getvalue()
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    header = next(line for line in text.splitlines() if "split" in line).split()
    assert header == ["split", "n", "acc", "acc@.5", "prec", "recall", "f1", "auc", "FP", "FN"]


@pytest.mark.parametrize("command", ["filterd", "filterd-train"])
def test_version(command):
    import subprocess
    import sys
    from pathlib import Path

    run = subprocess.run(
        [Path(sys.executable).parent / command, "--version"], capture_output=True, text=True
    )
    assert (run.returncode, run.stdout) == (0, f"{command} {filterd.__version__}\n")


def test_patience_stops_once_validation_loss_stops_falling(sms_lines):
    tokens, labels = _tokens(sms_lines, 24)
    flipped = [1 - y for y in labels]  # validation that only gets worse as training learns
    torch.manual_seed(0)
    model = GPT2Classifier(ARCHITECTURES["gpt2-tiny"])
    settings = Settings(epochs=8, trainable=1, lr=3e-3, patience=2)
    history = train(model, tokens, labels, tokens, flipped, settings, pad_id=ENDOFTEXT)
    best = history.val_loss.index(min(history.val_loss)) + 1
    assert history.stopped_epoch == best + 2 < 8
    assert len(history.val_loss) == history.stopped_epoch and history.best_epoch == best


def test_linear_schedule_warms_up_then_decays_to_zero():
    rates = {}
    for schedule in ("constant", "linear"):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        scheduler = lr_schedule(optimizer, Settings(epochs=2, schedule=schedule), 400)
        rates[schedule] = []
        for _ in range(100):  # 2 epochs of 400 messages in batches of 8
            rates[schedule].append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
    assert rates["constant"] == [1.0] * 100
    linear = rates["linear"]
    assert linear[:6] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])
    assert all(a > b > 0 for a, b in itertools.pairwise(linear[5:]))  # falls after warm-up
    assert linear[-1] == pytest.approx(1 / 95)  # one step before reaching zero
    with pytest.raises(ValueError, match="cosine"):
        lr_schedule(optimizer, Settings(schedule="cosine"), 400)


def test_class_weights_change_the_loss(sms_lines):
    tokens, labels = _tokens(sms_lines, 24)
    runs = []
    for weights in (None, (0.6, 3.0)):
        torch.manual_seed(0)
        model = GPT2Classifier(ARCHITECTURES["gpt2-tiny"])
        settings = Settings(epochs=1, trainable=1, lr=1e-3, class_weights=weights)
        runs.append(train(model, tokens, labels, tokens, labels, settings, pad_id=ENDOFTEXT))
    # A batch of one class has the same weighted mean; mixed batches do not.
    assert runs[0].step_losses != pytest.approx(runs[1].step_losses, rel=1e-3)


def test_balance_weight_keeps_every_message_and_weights_the_loss(tmp_path, sms_lines):
    ham = [t for label, t in sms_lines if label == "ham"][:150]
    spam = [t for label, t in sms_lines if label == "spam"][:50]
    path = tmp_path / "SMSSlice"
    path.write_text("".join(f"ham\t{t}\n" for t in ham) + "".join(f"spam\t{t}\n" for t in spam))
    out = tmp_path / "run"
    argv = ["--sms", str(path), "--init", "random", "--arch", "gpt2-tiny", "--epochs", "1"]
    assert cli.main([*argv, "--balance", "weight", "--patience", "1", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    used = report["counts"]["used_per_class"]
    assert used["ham"] > 2 * used["spam"]  # nothing undersampled
    ham_w, spam_w = report["settings"]["class_weights"]
    assert spam_w > 1 > ham_w and report["settings"]["balance"] == "weight"
    assert filterd.load_classifier(out).score_texts(["hello"])[0] >= 0


def test_defaults_weight_mail_and_undersample_sms(tmp_path, sms_lines):
    """Mail keeps every message with a class-weighted loss, SMS is undersampled; both stop
    early after DEFAULT_PATIENCE epochs without a lower validation loss."""
    from tests.conftest import SPAMASSASSIN

    folders = {"ham": tmp_path / "ham", "spam": tmp_path / "spam"}
    for label, source, n in (("ham", "easy_ham", 60), ("spam", "spam", 20)):
        folders[label].mkdir()
        for f in sorted((SPAMASSASSIN / source).iterdir())[:n]:
            (folders[label] / f.name).write_bytes(f.read_bytes())
    sms = tmp_path / "SMSSlice"
    sms.write_text("".join(f"{label}\t{t}\n" for label, t in sms_lines[:120]))
    tiny = ["--init", "random", "--arch", "gpt2-tiny", "--epochs", "1", "--max-tokens", "32"]
    mail = ["--ham", str(folders["ham"]), "--spam", str(folders["spam"])]
    for data, expected in ((mail, "weight"), (["--sms", str(sms)], "undersample")):
        out = tmp_path / expected
        assert cli.main([*data, *tiny, "--out", str(out)]) == 0
        report = json.loads((out / "metrics.json").read_text())
        assert report["settings"]["balance"] == expected
        assert report["settings"]["patience"] == cli.DEFAULT_PATIENCE
        used = report["counts"]["used_per_class"]
        assert (used["ham"] == used["spam"]) == (expected == "undersample")
        train = report["train"]  # per-epoch and final train figures: a fixed sample
        assert train["n"] == min(512, report["counts"]["per_split"]["train"])
        assert train.get("sample_of", train["n"]) == report["counts"]["per_split"]["train"]


def test_final_scores_reuse_the_cached_frozen_blocks(sms_lines):
    """The splits are scored from what the frozen blocks computed during training: the
    same probabilities as running the whole model again."""
    from filterd.trainer.train import Batcher, predict

    tokens, labels = _tokens(sms_lines, 16)
    torch.manual_seed(0)
    model = GPT2Classifier(ARCHITECTURES["gpt2-tiny"])
    first = set_trainable(model, 1)
    cached = Batcher(model, tokens, first, True, ENDOFTEXT)
    settings = Settings(epochs=1, trainable=1, lr=1e-3)
    val = Batcher(model, tokens, first, True, ENDOFTEXT)
    train(model, tokens, labels, tokens, labels, settings, pad_id=ENDOFTEXT, batchers=(cached, val))
    assert len(cached.cache) == len(tokens)  # filled while training
    fresh = Batcher(model, tokens, first, False, ENDOFTEXT)
    assert predict(model, cached) == pytest.approx(predict(model, fresh), abs=1e-6)


def test_train_figures_on_a_fixed_sample_score_as_the_full_pass(sms_lines):
    from filterd.trainer.train import Batcher, predict, train_sample

    tokens, _ = _tokens(sms_lines, 16)
    torch.manual_seed(0)
    model = GPT2Classifier(ARCHITECTURES["gpt2-tiny"]).eval()
    batcher = Batcher(model, tokens, set_trainable(model, 1), True, ENDOFTEXT)
    sample = train_sample(len(tokens), Settings(train_eval_sample=5))
    assert len(sample) == 5 and sample == sorted(set(sample))
    assert sample == train_sample(len(tokens), Settings(train_eval_sample=5))  # seeded
    full = predict(model, batcher)
    assert predict(model, batcher, sample) == pytest.approx([full[i] for i in sample], abs=1e-6)

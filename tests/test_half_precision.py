"""Half precision, the GPU's dtype logic, exercised on the CPU (bfloat16 runs there too):
bfloat16 autocast in training with float32 weights, half-precision scoring, and a config
that refuses half precision where it would only be slow."""

import json

import pytest
import torch

from filterd.config import Config
from filterd.model.checkpoint import CheckpointMeta
from filterd.model.classifier import Classifier
from filterd.model.gpt2 import ARCHITECTURES, GPT2Classifier
from filterd.model.tokenizer import ENDOFTEXT
from filterd.trainer import cli
from filterd.trainer.train import Settings, train
from tests.test_train import _tokens


def test_bfloat16_autocast_trains_float32_weights_and_changes_the_arithmetic(sms_lines):
    tokens, labels = _tokens(sms_lines, 32)
    runs = {}
    for autocast in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = GPT2Classifier(ARCHITECTURES["gpt2-tiny"])
        settings = Settings(epochs=2, trainable=1, lr=1e-3, autocast=autocast)
        runs[autocast] = train(model, tokens, labels, tokens, labels, settings, pad_id=ENDOFTEXT)
        assert {p.dtype for p in model.parameters()} == {torch.float32}  # master weights
    half, full = runs[torch.bfloat16].step_losses, runs[None].step_losses
    assert all(loss == loss for loss in half)  # finite, no NaN
    assert half != full  # bfloat16 really ran...
    assert half == pytest.approx(full, abs=0.05)  # ...and learned the same thing


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_half_precision_scores_close_to_float32(precision, sms_lines):
    tokens, _ = _tokens(sms_lines, 16)
    torch.manual_seed(0)
    config = ARCHITECTURES["gpt2-tiny"]
    meta = CheckpointMeta(arch="gpt2-tiny", config=config.to_dict(), max_tokens=64)
    scores = {}
    for p in ("float32", precision):
        torch.manual_seed(0)
        clf = Classifier(GPT2Classifier(config), meta, precision=p)
        scores[p] = clf.score_tokens(tokens)
        if p != "float32":
            assert next(clf.model.parameters()).dtype == getattr(torch, p)
    assert scores[precision] != scores["float32"]
    assert scores[precision] == pytest.approx(scores["float32"], abs=0.02)


def test_config_keeps_half_precision_for_a_gpu():
    assert Config.model_validate({"device": "cuda", "precision": "bfloat16"}).precision
    assert Config.model_validate({"device": "auto", "precision": "float16"}).precision
    with pytest.raises(ValueError, match="for a CUDA GPU"):
        Config.model_validate({"device": "cpu", "precision": "bfloat16"})


def test_filterd_train_precision_bfloat16_on_the_cpu(tmp_path, sms_slice):
    argv = ["--sms", str(sms_slice), "--init", "random", "--arch", "gpt2-tiny", "--epochs", "1"]
    argv += ["--device", "cpu"]
    runs = {}
    for precision in ("auto", "bfloat16"):
        out = tmp_path / precision
        assert cli.main([*argv, "--precision", precision, "--out", str(out)]) == 0
        runs[precision] = json.loads((out / "metrics.json").read_text())
    assert runs["auto"]["settings"]["autocast"] is None  # float32 on a CPU unless asked
    assert runs["bfloat16"]["settings"]["autocast"] == "bfloat16"
    half, full = (runs[p]["history"]["step_losses"] for p in ("bfloat16", "auto"))
    assert half != full
    assert half == pytest.approx(full, abs=0.05)

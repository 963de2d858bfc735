"""int8 scoring: close to float32, and a message's score never depends on its batch-mates."""

import json

import pytest
import torch
from torch import nn

from filterd.config import Config, ConfigError, load_config
from filterd.model.batching import pad_batch
from filterd.model.checkpoint import CheckpointMeta, save_checkpoint
from filterd.model.classifier import Classifier, load_classifier
from filterd.model.gpt2 import ARCHITECTURES, GPT2Classifier
from filterd.model.quantize import Int8Linear, quantize_int8
from filterd.model.tokenizer import ENDOFTEXT, gpt2_tokenizer
from tests.test_cli_score import run, write_config


def mini_model(seed: int = 3) -> GPT2Classifier:
    torch.manual_seed(seed)
    model = GPT2Classifier(ARCHITECTURES["gpt2-mini"]).eval()
    with torch.no_grad():  # a head with real spread, so probabilities are not all 0.5
        model.score.weight.mul_(5)
    return model


def test_int8_linear_is_close_to_float_and_rows_are_slices():
    torch.manual_seed(0)
    layer = nn.Linear(256, 768)
    x = torch.randn(2, 37, 256)
    q = Int8Linear(layer)
    with torch.no_grad():
        ref = layer(x)
        got = q(x)
    assert got.shape == ref.shape
    assert (got - ref).norm() / ref.norm() < 0.02
    assert torch.equal(q.rows(x, 256, 768), got[..., 256:])


def test_int8_scores_track_float32(sms_lines):
    texts = [t for _, t in sms_lines[:40]]
    meta = CheckpointMeta(arch="gpt2-mini", config=ARCHITECTURES["gpt2-mini"].to_dict())
    fp32 = torch.logit(torch.tensor(Classifier(mini_model(), meta).score_texts(texts)))
    int8 = torch.logit(
        torch.tensor(Classifier(mini_model(), meta, precision="int8").score_texts(texts))
    )
    spread = fp32.std().item()
    assert spread > 1.0  # the scores really differ between messages
    assert (fp32 - int8).abs().max().item() < 0.15 * spread
    assert torch.corrcoef(torch.stack([fp32, int8]))[0, 1] > 0.995


def test_int8_message_scores_the_same_alone_and_in_any_batch(sms_lines):
    meta = CheckpointMeta(arch="gpt2-mini", config=ARCHITECTURES["gpt2-mini"].to_dict())
    clf = Classifier(mini_model(), meta, precision="int8")
    tokens = [gpt2_tokenizer().encode(t, 128) for _, t in sms_lines[:12]]
    alone = [clf.score_tokens([t])[0] for t in tokens]
    assert clf.score_tokens(tokens) == alone
    assert clf.score_tokens(tokens[::-1]) == alone[::-1]


def test_padded_batches_would_make_int8_scores_depend_on_batch_mates(sms_lines):
    """Why Classifier runs int8 one message at a time: the activation scale is per tensor."""
    model = quantize_int8(mini_model())
    tokens = [gpt2_tokenizer().encode(t, 128) for _, t in sms_lines[:12]]
    with torch.inference_mode():
        alone = torch.cat([model(*pad_batch([t], ENDOFTEXT)) for t in tokens])
        batched = model(*pad_batch(tokens, ENDOFTEXT))
    assert (alone - batched).abs().max().item() > 1e-4


def test_int8_needs_the_cpu(tmp_path):
    path = write_config(tmp_path, "precision: int8\ndevice: auto\n")
    with pytest.raises(ConfigError, match="precision: int8 runs on the CPU only"):
        load_config(path)
    assert Config.model_validate({"precision": "int8"}).precision == "int8"
    with pytest.raises(ValueError, match="precision"):
        Classifier(mini_model(), CheckpointMeta(arch="gpt2-mini", config={}), precision="int4")


def test_score_with_int8_from_the_config(tmp_path, monkeypatch, capsysbinary):
    model = mini_model()
    meta = CheckpointMeta(arch="gpt2-mini", config=model.config.to_dict())
    checkpoint = save_checkpoint(tmp_path / "ck", model, meta)
    message = tmp_path / "msg.eml"
    message.write_bytes(b"Subject: win a prize\n\nClaim your free cruise now, call 0800 123\n")
    config = write_config(tmp_path, f"checkpoint: {checkpoint}\nprecision: int8\n")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    code, out, err = run(
        monkeypatch, capsysbinary, ["score", "--json", "--config", config, message]
    )
    assert code == 0, err
    got = json.loads(out)["probability"]
    expected = load_classifier(checkpoint, precision="int8").score_message(message.read_bytes())
    fp32 = load_classifier(checkpoint).score_message(message.read_bytes())
    assert got == pytest.approx(expected, abs=1e-4)
    assert got == pytest.approx(fp32, abs=0.03)
    code, out, _ = run(monkeypatch, capsysbinary, ["check", "--config", config])
    assert code == 0 and b"(gpt2-mini, int8, threshold 0.5000)" in out

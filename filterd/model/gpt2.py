"""GPT-2 with a two-class head: the whole network in one file, and its model family.

Module names follow the public GPT-2 checkpoints (wte, wpe, h.N.attn.c_attn, ...), so
pretrained weights map onto it with no renaming beyond a transpose. The language-model
head is replaced by `score`, a Linear(n_embd -> n_classes) read at each sequence's last
real token. Batches are right-padded: with causal attention a real token never sees
the padding to its right, so a message scores the same alone or in any batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from filterd.model.family import ArchConfig, Backbone, Family
from filterd.model.layers import MLP, SelfAttention
from filterd.model.tokenizer import Tokenizer, gpt2_tokenizer


@dataclass(frozen=True)
class GPTConfig(ArchConfig):
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_positions: int = 1024
    vocab_size: int = 50257
    layer_norm_epsilon: float = 1e-5


# The public GPT-2 sizes, plus small ones that train from scratch on a CPU (mini) and
# keep tests fast (tiny).
ARCHITECTURES: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
    "gpt2-mini": GPTConfig(n_layer=4, n_head=4, n_embd=256),
    "gpt2-tiny": GPTConfig(n_layer=2, n_head=2, n_embd=64, n_positions=512),
}


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = SelfAttention(config, causal=True)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config.n_embd, 4 * config.n_embd, config.dropout, "tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Classifier(Backbone):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.score = nn.Linear(config.n_embd, config.n_classes)
        self.apply(self.init_weights)
        # GPT-2's scaled init of the projections that feed the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.h

    @property
    def final_norm(self) -> nn.Module:
        return self.ln_f

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = self.positions(input_ids)
        return self.drop(self.wte(input_ids) + self.wpe(pos))

    def run_blocks(
        self, x: torch.Tensor, lengths: torch.Tensor, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """Causal attention: a real token never sees the padding to its right, so no mask."""
        for block in self.h[start:stop]:
            x = block(x)
        return x

    def pool(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Each row's last real token: the only one that has read the whole message."""
        return hidden[torch.arange(len(hidden), device=hidden.device), lengths - 1]

    def classify(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits from the output of all blocks but the last (lengths count real tokens).

        Only each sequence's last real token is read, so the last block computes keys and
        values for every position but queries, attention output and MLP for that one
        token alone: the same logits as the full block for a fraction of its work.
        """
        block, attn = self.h[-1], self.h[-1].attn
        B, T, C = x.shape
        H = attn.n_head
        rows, last = torch.arange(B, device=x.device), lengths - 1
        h = block.ln_1(x)
        k, v = attn.c_attn.rows(h, C, 3 * C).split(C, dim=2)
        q = attn.c_attn.rows(h[rows, last], 0, C)
        q = q.view(B, 1, H, C // H).transpose(1, 2)
        k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (k, v))
        visible = torch.arange(T, device=x.device)[None, :] <= last[:, None]
        p = attn.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=visible[:, None, None, :], dropout_p=p
        )
        y = x[rows, last] + attn.resid_dropout(attn.c_proj(y.reshape(B, C)))
        y = y + block.mlp(block.ln_2(y))
        return self.score(self.ln_f(y))

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states of every position, as GPT-2 reference code returns them."""
        lengths = torch.full((len(input_ids),), input_ids.shape[1], device=input_ids.device)
        return self.ln_f(self.run_blocks(self.embed(input_ids), lengths))


class GPT2(Family):
    name = "gpt2"
    tokenizer_name = "gpt2"
    architectures = ARCHITECTURES

    def config_from_dict(self, data: dict) -> GPTConfig:
        return GPTConfig.from_dict(data)

    def build(self, config: GPTConfig) -> GPT2Classifier:
        return GPT2Classifier(config)

    def tokenizer(self, files: dict[str, bytes]) -> Tokenizer:
        if files:
            raise ValueError(f"GPT-2's tokenizer ships with filterd; unexpected {sorted(files)}")
        return gpt2_tokenizer()

    def size_problem(self, config: GPTConfig, shapes: dict[str, tuple[int, ...]]) -> str | None:
        blocks = {k.split(".", 2)[1] for k in shapes if k.startswith("h.")}
        found = (shapes.get("wte.weight", ()), shapes.get("wpe.weight", ()), len(blocks))
        wanted = ((config.vocab_size, config.n_embd), (config.n_positions, config.n_embd))
        if found != (*wanted, config.n_layer):
            return f"(wte, wpe, blocks) are {found}, the metadata says {(*wanted, config.n_layer)}"
        return None

    def architecture_name(self, config: GPTConfig) -> str:
        """By the dimensions that fix the weights' shapes: a pretrained config.json may
        spell the rest (epsilon, positions) its own way."""
        shape = (config.n_layer, config.n_head, config.n_embd, config.vocab_size)
        for name, known in ARCHITECTURES.items():
            if (known.n_layer, known.n_head, known.n_embd, known.vocab_size) == shape:
                return name
        return "custom"

"""The transformer pieces GPT-2 and BERT share: self-attention and the MLP, with the
parameter names of the public checkpoints (c_attn, c_proj, c_fc), so weights map onto
either family with no renaming beyond a transpose."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from filterd.model.family import ArchConfig


class Linear(nn.Linear):
    """nn.Linear that can also compute a slice of its outputs (the int8 twin has it too)."""

    def rows(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return F.linear(x, self.weight[start:stop], self.bias[start:stop])


class SelfAttention(nn.Module):
    """Multi-head self-attention: causal (GPT-2), or both ways with the padding masked out
    by `mask` (batch, 1, 1, time; True at real tokens) for an encoder."""

    def __init__(self, config: ArchConfig, causal: bool):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.causal = causal
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # query, key, value
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p, is_causal=self.causal
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Two Linear layers around a GELU: "tanh" approximates it as GPT-2 does, "none" is
    the exact (erf) one BERT uses."""

    def __init__(self, n_embd: int, n_inner: int, dropout: float, approximate: str):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, n_inner)
        self.c_proj = nn.Linear(n_inner, n_embd)
        self.dropout = nn.Dropout(dropout)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))

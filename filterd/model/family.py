"""The model-family interface: what the trainer, the checkpoint loader, the int8 path and
the scorer need from a backbone, named in one place.

A family (GPT-2 in gpt2.py) supplies its architecture configs, a network with a 2-class
head (`Backbone`), its tokenizer (tokenizer.py) and a cheap size check for checkpoints;
registry.py lists the families. A second backbone is then one module plus one entry there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Self

import torch
from torch import nn

from filterd.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class ArchConfig:
    """What every family's architecture has; a family's config subclasses it (a frozen
    dataclass) and adds its own dimensions. Every int field must be positive."""

    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int  # the longest input: checkpoints' max_tokens is checked against it
    vocab_size: int
    layer_norm_epsilon: float
    dropout: float = 0.0
    n_classes: int = 2

    def __post_init__(self) -> None:
        name = type(self).__name__
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int) and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}.{f.name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        for key in ("layer_norm_epsilon", "dropout"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{key} is {value!r}, not a number")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        """What a checkpoint stores."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Self:
        """Back from a checkpoint; an unknown field is an error, not ignored."""
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown architecture fields: {sorted(unknown)}")
        return cls(**data)


class Backbone(nn.Module, ABC):
    """A family's network with its 2-class head. Inputs are right-padded token ids and
    each row's number of real tokens (`lengths`); padding must never change a row's logits.

    The forward pass is split so a trainer can cache what frozen blocks produce: `embed`,
    then `run_blocks` over any range of `blocks`, then `classify` (the last block, the final
    norm, the family's pooling and `score`, the head)."""

    config: ArchConfig  # the family's subclass of it
    score: nn.Linear  # the head: hidden size -> 2 classes

    @staticmethod
    def init_weights(module: nn.Module) -> None:
        """Random weights as GPT-2 and BERT start from (std 0.02, zero biases)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """0..T-1 for the inputs' length; longer than the model's context is an error."""
        T = input_ids.shape[1]
        if self.config.n_positions < T:
            raise ValueError(
                f"sequence of {T} tokens exceeds n_positions={self.config.n_positions}"
            )
        return torch.arange(T, device=input_ids.device)

    @property
    @abstractmethod
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, lowest first: frozen from the bottom when fine-tuning;
        int8 replaces the Linear layers inside them."""

    @property
    @abstractmethod
    def final_norm(self) -> nn.Module:
        """The norm before pooling (trained with the last blocks and the head)."""

    @abstractmethod
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (batch, time) to the first block's input (batch, time, hidden)."""

    @abstractmethod
    def run_blocks(
        self, x: torch.Tensor, lengths: torch.Tensor, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """Blocks [start, stop). `lengths` gives the attention mask of the padding, for
        families whose tokens attend both ways (a causal model may ignore it)."""

    @abstractmethod
    def pool(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One vector per row from the final-norm hidden states: the last real token for
        GPT-2, the mean over real tokens for an encoder."""

    def classify(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits from the input of the last block. A family may override it with a
        cheaper path that gives the same logits."""
        h = self.run_blocks(x, lengths, len(self.blocks) - 1)
        return self.score(self.pool(self.final_norm(h), lengths))

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.run_blocks(self.embed(input_ids), lengths, 0, len(self.blocks) - 1)
        return self.classify(x, lengths)


class Family(ABC):
    """One model family: its named sizes, how to build and check one, its tokenizer."""

    name: ClassVar[str]  # stored in checkpoints
    tokenizer_name: ClassVar[str]  # the tokenizer its checkpoints name
    architectures: ClassVar[dict[str, Any]]  # named sizes -> architecture configs

    @abstractmethod
    def config_from_dict(self, data: dict) -> Any:
        """The architecture a checkpoint's metadata describes; ValueError or TypeError
        naming the field when it is not one."""

    @abstractmethod
    def build(self, config: Any) -> Backbone:
        """A freshly initialised network of that architecture."""

    @abstractmethod
    def tokenizer(self, files: dict[str, bytes]) -> Tokenizer:
        """The family's tokenizer from the files a checkpoint carries ({} when the
        tokenizer ships with filterd)."""

    @abstractmethod
    def size_problem(self, config: Any, shapes: dict[str, tuple[int, ...]]) -> str | None:
        """What is wrong with the main dimensions of a checkpoint's tensors for `config`,
        or None; it runs before anything is built, so a forged `n_layer: 100000` fails at
        once instead of after minutes of building."""

    def architecture_name(self, config: Any) -> str:
        """The named size this config has (dropout aside), or "custom"."""
        shape = asdict(config) | {"dropout": 0.0}
        for name, known in self.architectures.items():
            if asdict(known) | {"dropout": 0.0} == shape:
                return name
        return "custom"

"""A loaded checkpoint that turns texts and raw messages into spam probabilities.

This is the one scoring path: the CLI, the daemon and scripts all call it, so what a
user tests by hand is what the mail server runs.
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import get_args

import torch

from filterd.config import Precision
from filterd.model.batching import batch_tokens, length_batches, pad_batch
from filterd.model.checkpoint import CheckpointMeta, load_checkpoint
from filterd.model.family import Backbone
from filterd.model.quantize import quantize_int8
from filterd.model.tokenizer import Tokenizer
from filterd.text import TextLimits, message_text

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_BATCH = 64

Progress = Callable[[int], None]  # told how many more messages are done


class Scorer(ABC):
    """A loaded checkpoint as the engine uses it, wherever its model runs: here
    (Classifier) or in a child process (filterd.model.scoring_process.ProcessClassifier)."""

    meta: CheckpointMeta

    @property
    def threshold(self) -> float:
        return float(self.meta.threshold)

    @property
    def name(self) -> str:
        return self.meta.arch

    @abstractmethod
    def score_messages(
        self, raws: Sequence[bytes], progress: Progress | None = None
    ) -> list[float | None]:
        """Spam probability of each raw RFC 5322 message; None for one with no text to
        read (the model would judge nothing at all). `progress(n)` is told as each group
        of n messages is done, for a progress bar."""

    def score_message(self, raw: bytes) -> float | None:
        return self.score_messages([raw])[0]

    @abstractmethod
    def reload(self, path: str | os.PathLike) -> Scorer:
        """Another checkpoint, loaded the way this one was (for the daemon's reloads)."""

    @abstractmethod
    def close(self, wait: float = 0.0) -> None:
        """Release what the model holds; a batch being scored still finishes. `wait`: at
        most this many seconds for it to be released (the last close before exiting)."""


class Classifier(Scorer):
    def __init__(
        self,
        model: Backbone,
        meta: CheckpointMeta,
        limits: TextLimits = TextLimits(),
        device: str | torch.device = "cpu",
        precision: Precision = "float32",
        tokenizer: Tokenizer | None = None,
    ):
        if precision not in get_args(Precision):
            raise ValueError(f"precision must be one of {get_args(Precision)}, got {precision!r}")
        self.model = model.to(device).eval()
        self.meta = meta
        # The family's own, unless the checkpoint carried its files.
        self.tokenizer = tokenizer or meta.model_family.tokenizer({})
        self.limits = limits
        self.device = torch.device(device)
        self.precision = precision
        # The daemon reads the next batch while this one is scored; the model itself runs
        # one batch at a time, which is all the cores anyway.
        self._model_lock = threading.Lock()
        # int8 quantizes activations per input tensor: one message per batch keeps each
        # score independent of its batch-mates (and it wastes no work on padding).
        self.max_batch = MAX_BATCH
        # Micro-batches of similar lengths, at most this many padded tokens each, so one
        # long message never drags a whole batch to its length.
        self.batch_tokens = batch_tokens(self.device)
        if precision == "int8":
            quantize_int8(self.model)
            self.max_batch = 1
        elif precision in HALF:  # weights and activations in half precision; scores in float64
            self.model.to(HALF[precision])

    def tokens(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, self.meta.max_tokens)

    def score_texts(self, texts: Sequence[str], progress: Progress | None = None) -> list[float]:
        """Spam probability of each model text (already extracted or an SMS)."""
        return self.score_tokens([self.tokens(t) for t in texts], progress)

    def reload(self, path: str | os.PathLike) -> Classifier:
        return load_classifier(path, self.device, self.limits, self.precision)

    def close(self, wait: float = 0.0) -> None:
        """Nothing to release: the model lives in this process until it is dropped."""

    def score_messages(
        self, raws: Sequence[bytes], progress: Progress | None = None
    ) -> list[float | None]:
        texts = [message_text(r, self.limits) for r in raws]
        if progress and not all(texts):
            progress(len(texts) - sum(map(bool, texts)))
        scores = iter(self.score_texts([t for t in texts if t], progress))
        return [next(scores) if t else None for t in texts]

    @torch.inference_mode()
    def score_tokens(
        self, token_lists: Sequence[list[int]], progress: Progress | None = None
    ) -> list[float]:
        scores = [0.0] * len(token_lists)
        lengths = [len(t) for t in token_lists]
        batches = length_batches(lengths, self.batch_tokens, self.max_batch)
        with self._model_lock:
            for batch in batches:
                tokens = [token_lists[i] for i in batch]
                ids, lengths = pad_batch(tokens, self.tokenizer.pad_id, self.device)
                probs = torch.softmax(self.model(ids, lengths).double(), dim=-1)[:, 1]
                for i, p in zip(batch, probs.tolist(), strict=True):
                    scores[i] = p
                if progress:
                    progress(len(batch))
        return scores


def load_classifier(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    limits: TextLimits = TextLimits(),
    precision: Precision = "float32",
) -> Classifier:
    """Load a filterd checkpoint (file or folder) ready to score."""
    model, meta, tokenizer = load_checkpoint(path, device)
    return Classifier(model, meta, limits, device, precision, tokenizer)

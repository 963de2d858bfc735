"""Batches that waste no work on padding: similar lengths together, padded per batch.

Padding every message to the model's context (1,024 tokens) cost the reference recipe
17 points of accuracy and most of its time; here a batch is padded to its own longest
message, and messages are grouped so that is close to every member's length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def batch_tokens(device: torch.device | str) -> int:
    """Padded tokens per forward batch. On a CPU a batch's activations should stay in
    cache: 2,048 scored MiniLM 1.3x faster than 8,192 on 2 cores (gpt2 no slower); an
    accelerator wants big batches."""
    return 2048 if torch.device(device).type == "cpu" else 8192


def length_batches(lengths: Sequence[int], max_tokens: int, max_batch: int) -> list[list[int]]:
    """Indices grouped by similar length, each group's padded size within max_tokens."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Sorted ascending, so the newcomer sets the padded length of the group.
        if current and (len(current) >= max_batch or (len(current) + 1) * lengths[i] > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_batch(
    token_lists: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence in this batch (never to the context length)."""
    lengths = [len(t) for t in token_lists]
    if min(lengths) < 1:
        raise ValueError("every sequence needs at least one token")
    ids = torch.full((len(token_lists), max(lengths)), pad_id, dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return ids.to(device), torch.tensor(lengths, dtype=torch.long, device=device)

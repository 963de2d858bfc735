"""Tokenizers: text to the token ids a model family reads, with one rule for long texts.

`Tokenizer` is the interface the model families implement (family.py names it). GPT-2's
byte-pair encoding is built from files shipped in the package: tiktoken's own
`get_encoding("gpt2")` downloads its files on first use, and a mail filter must start and
score with no network, so the same files live in `assets/gpt2/`.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from importlib import resources

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

ENDOFTEXT = 50256
# sha256 of the published files: a damaged install fails loudly instead of mis-tokenizing.
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    assets = resources.files("filterd") / "assets" / "gpt2"
    with (
        resources.as_file(assets / "vocab.bpe") as bpe,
        resources.as_file(assets / "encoder.json") as enc,
    ):
        ranks = data_gym_to_mergeable_bpe_ranks(
            str(bpe), str(enc), _VOCAB_BPE_SHA256, _ENCODER_JSON_SHA256
        )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": ENDOFTEXT},
        explicit_n_vocab=50257,
    )


class Tokenizer(ABC):
    """Text to token ids for one model family."""

    name: str  # stored in checkpoints, checked against the family's
    pad_id: int  # what batches are right-padded with (never read: lengths mask it)

    @abstractmethod
    def ids(self, text: str) -> list[int]:
        """Every token of text, no special tokens."""

    def files(self) -> dict[str, bytes]:
        """The files a checkpoint must carry to rebuild this tokenizer (its vocabulary);
        none when filterd ships them."""
        return {}

    def encode(self, text: str, max_tokens: int) -> list[int]:
        """Token ids for the model: head and tail of a long text, never empty.

        Keeping the last quarter as well as the first three quarters means a long harmless
        preamble cannot push a payload at the end out of view.
        """
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
        # Cutting a huge text first bounds the work; texts under the cut are untouched and
        # the cut is deterministic, so trainer and runtime still see the same tokens.
        if len(text) > 64 * max_tokens:
            text = text[: 48 * max_tokens] + text[-16 * max_tokens :]
        tokens = self.ids(text)
        if not tokens:
            return [self.pad_id]
        if len(tokens) > max_tokens:
            tail = max_tokens // 4
            tokens = tokens[: max_tokens - tail] + tokens[-tail:]
        return tokens


class GPT2Tokenizer(Tokenizer):
    name = "gpt2"
    pad_id = ENDOFTEXT

    def ids(self, text: str) -> list[int]:
        return gpt2_encoding().encode_ordinary(text)


@functools.cache
def gpt2_tokenizer() -> GPT2Tokenizer:
    return GPT2Tokenizer()

"""Messages/second of filterd's scoring path against Hugging Face's same model.

Not a test: a few minutes on a CPU. Both models have the same architecture (`--arch gpt2`,
124M, or `minilm-l6`, 22.7M: all-MiniLM-L6-v2's shape with its real vocabulary from the
`filterd[minilm]` extra) with random weights (speed does not depend on their values), read
the same token ids at the same max_tokens and batch size. For BERT the Hugging Face side is
`BertModel` with the same mean pooling and a linear head, as filterd's `bert` family reads
it. filterd's number includes what `filterd score DIR` does per message: text extraction,
tokenizing, length-bucketed batches. Hugging Face gets the token ids ready-made in batches
of the same size, in arrival order, right-padded with an attention mask, as a user of its
model classes would run it.

    .venv/bin/python benchmarks/score_bench.py [--arch minilm-l6] [--messages 300]
        [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2ForSequenceClassification

from filterd.model.batching import batch_tokens
from filterd.model.checkpoint import CheckpointMeta
from filterd.model.classifier import Classifier
from filterd.model.registry import architecture
from filterd.text import message_text

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "spamassassin-public-corpus"


def corpus_sample(root: Path, n: int) -> list[bytes]:
    """n messages spread evenly over the whole corpus (ham and spam folders alike)."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "cmds")
    if len(files) < n:
        raise SystemExit(f"{root}: {len(files)} messages, {n} wanted")
    step = len(files) / n
    return [files[int(i * step)].read_bytes() for i in range(n)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class HFMeanPooled(torch.nn.Module):
    """BertModel, the mean of its real tokens' last hidden states, a 2-class head."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.bert = BertModel(config, add_pooling_layer=False)
        self.score = torch.nn.Linear(config.hidden_size, 2)

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.score((hidden * mask).sum(1) / mask.sum(1))


def hf_model(arch: str, config, pad_id: int) -> torch.nn.Module:
    if arch.startswith("gpt2"):
        return GPT2ForSequenceClassification(
            GPT2Config(
                n_layer=config.n_layer,
                n_head=config.n_head,
                n_embd=config.n_embd,
                num_labels=2,
                pad_token_id=pad_id,
            )
        )
    return HFMeanPooled(
        BertConfig(
            num_hidden_layers=config.n_layer,
            num_attention_heads=config.n_head,
            hidden_size=config.n_embd,
            intermediate_size=config.n_inner,
            vocab_size=config.vocab_size,
            max_position_embeddings=config.n_positions,
        )
    )


def hf_batch(chunk: list[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, ...]:
    """Right-padded ids and attention mask, as a transformers user builds them."""
    width = max(map(len, chunk))
    x = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for row, t in enumerate(chunk):
        x[row, : len(t)] = torch.tensor(t)
        mask[row, : len(t)] = 1
    return x.to(device), mask.to(device)


def hf_scores(
    model: torch.nn.Module, ids: list[list[int]], batch: int, pad_id: int, device: str = "cpu"
) -> list[float]:
    scores = []
    with torch.inference_mode():
        for i in range(0, len(ids), batch):
            x, mask = hf_batch(ids[i : i + batch], pad_id, device)
            out = model(input_ids=x, attention_mask=mask)
            scores += torch.softmax(getattr(out, "logits", out).float(), -1)[:, 1].tolist()
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="gpt2", help="gpt2 or minilm-l6 (default gpt2)")
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    args = parser.parse_args()

    raws = corpus_sample(args.corpus, args.messages)
    torch.manual_seed(0)
    family, config = architecture(args.arch)
    ours = family.build(config).eval()
    tokenizer = family.tokenizer({})
    if args.arch.startswith("minilm"):
        from filterd.model.bert import packaged_tokenizer

        tokenizer = packaged_tokenizer()
    meta = CheckpointMeta(arch=args.arch, config={}, family=family.name, max_tokens=args.max_tokens)
    clf8 = Classifier(copy.deepcopy(ours), meta, precision="int8", tokenizer=tokenizer)
    clf = Classifier(ours, meta, tokenizer=tokenizer)
    ids = [clf.tokens(message_text(r)) for r in raws]
    batch = batch_tokens("cpu") // args.max_tokens  # what filterd's batches hold at full length
    hf = hf_model(args.arch, config, tokenizer.pad_id).eval()

    tokens = sum(map(len, ids))
    print(
        f"{args.arch}: {len(raws)} messages, {tokens} tokens "
        f"(mean {tokens / len(ids):.0f}), batch {batch}"
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    clf.score_tokens(ids[:8])  # warm up all
    clf8.score_tokens(ids[:8])
    hf_scores(hf, ids[:8], 8, tokenizer.pad_id)

    t_ours = timed(lambda: clf.score_messages(raws))
    t_model = timed(lambda: clf.score_tokens(ids))
    t_hf = timed(lambda: hf_scores(hf, ids, batch, tokenizer.pad_id))
    t_int8 = timed(lambda: clf8.score_messages(raws))
    clf.batch_tokens = 8192  # the size used before batch_tokens() chose 2,048 on a CPU
    clf.score_tokens(ids[:40])
    t_8192 = timed(lambda: clf.score_messages(raws))
    clf.batch_tokens = batch_tokens("cpu")
    n = len(raws)
    print(f"filterd (extract + tokenize + model):      {n / t_ours:7.2f} msgs/s  ({t_ours:.1f} s)")
    print(
        f"filterd (model only, same ids):            {n / t_model:7.2f} msgs/s  ({t_model:.1f} s)"
    )
    print(f"filterd int8 (extract + tokenize + model): {n / t_int8:7.2f} msgs/s  ({t_int8:.1f} s)")
    print(f"filterd, 8,192-token batches (before):     {n / t_8192:7.2f} msgs/s  ({t_8192:.1f} s)")
    print(f"transformers {type(hf).__name__ + ':':29}{n / t_hf:7.2f} msgs/s  ({t_hf:.1f} s)")
    print(
        f"ratio filterd / transformers: {t_hf / t_ours:.2f}x end to end, "
        f"{t_hf / t_model:.2f}x model only; int8: {t_hf / t_int8:.2f}x end to end"
    )
    print(f"ratio batches of {clf.batch_tokens} / 8,192 tokens: {t_8192 / t_ours:.2f}x end to end")


if __name__ == "__main__":
    main()

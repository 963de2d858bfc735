"""Messages/second of filterd's scoring path against Hugging Face's GPT-2 classifier.

Not a test: a few minutes on a CPU. Both models have the `gpt2` (124M) architecture with
random weights (speed does not depend on their values), read the same token ids at the
same max_tokens and batch size. filterd's number includes what `filterd score DIR` does
per message: text extraction, tokenizing, length-bucketed batches. Hugging Face gets the
token ids ready-made in batches of the same size, in arrival order, right-padded with an
attention mask, as a user of GPT2ForSequenceClassification would run it.

    .venv/bin/python benchmarks/score_bench.py [--messages 300] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from filterd.model.checkpoint import CheckpointMeta
from filterd.model.classifier import BATCH_TOKENS, Classifier
from filterd.model.gpt2 import ARCHITECTURES, GPT2Classifier
from filterd.model.tokenizer import ENDOFTEXT
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


def hf_scores(model: GPT2ForSequenceClassification, ids: list[list[int]], batch: int) -> None:
    with torch.inference_mode():
        for i in range(0, len(ids), batch):
            chunk = ids[i : i + batch]
            width = max(map(len, chunk))
            x = torch.full((len(chunk), width), ENDOFTEXT, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, t in enumerate(chunk):
                x[row, : len(t)] = torch.tensor(t)
                mask[row, : len(t)] = 1
            torch.softmax(model(input_ids=x, attention_mask=mask).logits.float(), -1)[:, 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    args = parser.parse_args()

    raws = corpus_sample(args.corpus, args.messages)
    torch.manual_seed(0)
    config = ARCHITECTURES["gpt2"]
    ours = GPT2Classifier(config).eval()
    meta = CheckpointMeta(arch="gpt2", config=config.to_dict(), max_tokens=args.max_tokens)
    clf8 = Classifier(copy.deepcopy(ours), meta, precision="int8")
    clf = Classifier(ours, meta)
    ids = [clf.tokens(message_text(r)) for r in raws]
    batch = BATCH_TOKENS // args.max_tokens  # what filterd's batches hold at full length
    hf = GPT2ForSequenceClassification(
        GPT2Config(
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_embd=config.n_embd,
            num_labels=2,
            pad_token_id=ENDOFTEXT,
        )
    ).eval()

    tokens = sum(map(len, ids))
    print(f"{len(raws)} messages, {tokens} tokens (mean {tokens / len(ids):.0f}), batch {batch}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    clf.score_tokens(ids[:8])  # warm up all
    clf8.score_tokens(ids[:8])
    hf_scores(hf, ids[:8], 8)

    t_ours = timed(lambda: clf.score_messages(raws))
    t_model = timed(lambda: clf.score_tokens(ids))
    t_hf = timed(lambda: hf_scores(hf, ids, batch))
    t_int8 = timed(lambda: clf8.score_messages(raws))
    n = len(raws)
    print(f"filterd (extract + tokenize + model):      {n / t_ours:7.2f} msgs/s  ({t_ours:.1f} s)")
    print(
        f"filterd (model only, same ids):            {n / t_model:7.2f} msgs/s  ({t_model:.1f} s)"
    )
    print(f"filterd int8 (extract + tokenize + model): {n / t_int8:7.2f} msgs/s  ({t_int8:.1f} s)")
    print(f"transformers GPT2ForSequenceClass.:        {n / t_hf:7.2f} msgs/s  ({t_hf:.1f} s)")
    print(
        f"ratio filterd / transformers: {t_hf / t_ours:.2f}x end to end, "
        f"{t_hf / t_model:.2f}x model only; int8: {t_hf / t_int8:.2f}x end to end"
    )


if __name__ == "__main__":
    main()

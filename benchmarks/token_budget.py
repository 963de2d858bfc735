"""Does reading more of each message help? 256 against 512 tokens, on validation only.

A cheap stand-in for two full fine-tuning runs (a 512-token run costs about 2.3x a
256-token one): pretrained all-MiniLM-L6-v2, frozen, read each message cut to the budget
by filterd's own head+tail cut; its mean-pooled embedding (the `bert` family's `pool`)
feeds a logistic regression trained on a sample of the checkpoint's train split and
scored on the whole val split. Nothing from the test split is used.

    .venv/bin/python benchmarks/token_budget.py runs/sa-minilm [--train 1000]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from sklearn.linear_model import LogisticRegression

from filterd.model.batching import batch_tokens, length_batches, pad_batch
from filterd.model.bert import load_pretrained_bert
from filterd.trainer.data import read_split
from filterd.trainer.metrics import binary_metrics, choose_threshold, roc_auc


@torch.inference_mode()
def embeddings(model, tokens: list[list[int]], pad_id: int) -> torch.Tensor:
    out = torch.zeros(len(tokens), model.config.n_embd)
    for batch in length_batches([len(t) for t in tokens], batch_tokens("cpu"), 64):
        ids, lengths = pad_batch([tokens[i] for i in batch], pad_id, "cpu")
        out[batch] = model.sentence_embedding(ids, lengths)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a filterd-train --out folder (its split)")
    p.add_argument("--train", type=int, default=1000, help="train messages sampled")
    p.add_argument("--budgets", type=int, nargs="+", default=[256, 512])
    p.add_argument("--max-fpr", type=float, default=0.01)
    args = p.parse_args(argv)

    rows = read_split(args.checkpoint / "split.jsonl")
    train = [e for e, split in rows if split == "train"]
    train = random.Random(0).sample(train, min(args.train, len(train)))
    val = [e for e, split in rows if split == "val"]
    model, tokenizer = load_pretrained_bert("minilm-l6")
    model.eval()
    print(f"{len(train)} train (sampled), {len(val)} val; frozen minilm-l6, mean-pooled")
    print("| max tokens | messages cut | val accuracy (t on val) | val acc at 0.5 | val AUC | s |")
    print("| --- | --- | --- | --- | --- | --- |")
    full = [len(tokenizer.ids(e.text)) + 2 for e in train + val]
    for budget in args.budgets:
        started = time.monotonic()
        x = {
            name: embeddings(
                model, [tokenizer.encode(e.text, budget) for e in ex], tokenizer.pad_id
            )
            for name, ex in (("train", train), ("val", val))
        }
        lr = LogisticRegression(C=10.0, max_iter=5000).fit(x["train"], [e.y for e in train])
        probs = lr.predict_proba(x["val"])[:, 1].tolist()
        y = [e.y for e in val]
        m = binary_metrics(probs, y, choose_threshold(probs, y, args.max_fpr))
        cut = sum(n > budget for n in full) / len(full)
        print(
            f"| {budget} | {cut:.0%} | {m['accuracy']:.4f} | {m['accuracy_argmax']:.4f} "
            f"| {roc_auc(probs, y):.5f} | {time.monotonic() - started:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

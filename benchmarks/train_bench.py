"""Fine-tuning speed: the reference recipe's way against filterd's, same data, same process.

Both train the `gpt2` architecture (random weights: speed does not depend on their
values) with the last 2 blocks, final norm and head trainable, batch 8, AdamW, on the
de-duplicated, balanced SMS train split.

- reference: every message padded to the longest training message, all 12 blocks run
  every step, logits read at the last position;
- filterd: length-bucketed batches padded to their own longest message, the 10 frozen
  blocks run once per message and cached, logits at the last real token.

    .venv/bin/python benchmarks/train_bench.py [--epochs 2] [--limit N] [--arch gpt2]
"""

from __future__ import annotations

import argparse
import functools
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from filterd.model.gpt2 import ARCHITECTURES, GPT2Classifier
from filterd.model.tokenizer import ENDOFTEXT, gpt2_tokenizer
from filterd.trainer.data import prepare, read_sms
from filterd.trainer.train import Settings, set_trainable, train

SMS = Path(__file__).resolve().parents[2] / "shared/datasets/sms-spam-collection/SMSSpamCollection"


def reference_epochs(model, tokens, labels, epochs, batch_size, seed, longest) -> list[float]:
    set_trainable(model, 2)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.1, fused=True)
    ids = torch.full((len(tokens), longest), ENDOFTEXT, dtype=torch.long)
    for i, t in enumerate(tokens):
        ids[i, : len(t)] = torch.tensor(t)
    y = torch.tensor(labels)
    rng = random.Random(seed)
    times = []
    model.train()
    for _ in range(epochs):
        start = time.perf_counter()
        order = list(range(len(tokens)))
        rng.shuffle(order)
        for b in range(0, len(order), batch_size):
            batch = order[b : b + batch_size]
            x = model.embed(ids[batch])
            h = model.ln_f(model.run_blocks(x, torch.full((len(x),), x.shape[1])))
            loss = F.cross_entropy(model.score(h[:, -1]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def filterd_epochs(model, tokens, labels, epochs, batch_size, seed) -> list[float]:
    stamps: dict[int, float] = {}
    settings = Settings(
        epochs=epochs, batch_size=batch_size, trainable=2, seed=seed, evaluate_epochs=False
    )
    start = time.perf_counter()
    train(
        model,
        tokens,
        labels,
        tokens[:1],
        labels[:1],
        settings,
        on_step=lambda epoch, step, loss: stamps.__setitem__(epoch, time.perf_counter()),
        pad_id=ENDOFTEXT,
    )
    ends = [stamps[e] for e in range(epochs)]
    return [b - a for a, b in zip([start, *ends[:-1]], ends, strict=True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="gpt2")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument(
        "--limit",
        type=int,
        help="time only the first N training messages (the reference still pads them to the "
        "longest message of the whole train split, as it would in the full run)",
    )
    p.add_argument("--sms", type=Path, default=SMS)
    args = p.parse_args()
    data = prepare(read_sms(args.sms), seed=123)
    longest = max(len(gpt2_tokenizer().encode(e.text, 256)) for e in data.train)
    train_set = data.train[: args.limit] if args.limit else data.train
    tokens = [gpt2_tokenizer().encode(e.text, 256) for e in train_set]
    labels = [e.y for e in train_set]
    n_tokens = sum(map(len, tokens))
    print(
        f"{args.arch}, {len(tokens)} messages, {n_tokens} real tokens, the train split's "
        f"longest {longest} (reference pads all to it), {args.epochs} epochs, "
        f"{torch.get_num_threads()} threads"
    )
    results = {}
    reference = functools.partial(reference_epochs, longest=longest)
    for name, run in (("reference", reference), ("filterd", filterd_epochs)):
        torch.manual_seed(0)
        model = GPT2Classifier(ARCHITECTURES[args.arch])
        times = run(model, tokens, labels, args.epochs, 8, 123)
        results[name] = sum(times) / len(times)
        per_epoch = ", ".join(f"{t:.1f}" for t in times)
        print(f"{name:>9}: {results[name]:.1f} s/epoch (epochs: {per_epoch})")
    print(f"    ratio: filterd is {results['reference'] / results['filterd']:.2f}x faster")


if __name__ == "__main__":
    main()

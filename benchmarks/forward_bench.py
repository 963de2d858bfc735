"""Forward-pass throughput of a named architecture: tokens/s for batch x length.

    .venv/bin/python benchmarks/forward_bench.py [--arch gpt2] [--batch 8] [--tokens 128]

Random weights (speed does not depend on their values), inference mode, float32, the
default number of torch threads. Prints the median of several timed runs after warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from filterd.model.gpt2 import ARCHITECTURES, GPT2Classifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="gpt2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=7)
    args = p.parse_args()
    torch.manual_seed(0)
    model = GPT2Classifier(ARCHITECTURES[args.arch]).eval()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens))
    lengths = torch.full((args.batch,), args.tokens)
    times = []
    with torch.inference_mode():
        model(ids, lengths)  # warm-up
        for _ in range(args.runs):
            start = time.perf_counter()
            model(ids, lengths)
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    n = args.batch * args.tokens
    print(
        f"{args.arch}: batch {args.batch} x {args.tokens} tokens, {torch.get_num_threads()} "
        f"threads: median {median * 1000:.0f} ms, {n / median:.0f} tokens/s "
        f"(min {n / max(times):.0f}, max {n / min(times):.0f})"
    )


if __name__ == "__main__":
    main()

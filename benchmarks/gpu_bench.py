"""GPU figures: fine-tuning tokens/s and scoring msgs/s, filterd against transformers.

One prepared run for a lent GPU (its time is short). For `gpt2` and `minilm-l6` with
random weights (speed does not depend on their values; the pretrained package is too big
to carry to such a machine), on SpamAssassin messages cut to 256 tokens:

- training: filterd's `train()` (last 2 blocks trained, frozen blocks run once and cached,
  length-bucketed batches of 8, bfloat16 autocast over float32 weights) against the same
  architecture in transformers trained the plain way (the same parameters trainable, the
  same autocast and fused AdamW, batches of 8 in arrival order, right-padded with an
  attention mask): real tokens per second over all epochs, the cache's pass included;
- scoring: filterd with `precision: bfloat16` and `float32` (text extraction + tokenizing +
  model, and the model alone) against transformers in bfloat16 on the same ids in batches
  of 32: messages per second.

    python benchmarks/gpu_bench.py --corpus DIR [--vocab vocab.txt] [--messages 512]
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from score_bench import corpus_sample, hf_batch, hf_model, hf_scores

from filterd.model.bert import WordPieceTokenizer, packaged_tokenizer
from filterd.model.checkpoint import CheckpointMeta
from filterd.model.classifier import Classifier
from filterd.model.registry import architecture
from filterd.text import message_text
from filterd.trainer.train import Settings, train


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def hf_train(model, ids, labels, epochs: int, pad_id: int, device: str) -> None:
    """The plain loop: arrival order, batches of 8 padded to their longest, every block run."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.1, fused=True)
    model.train()
    for _ in range(epochs):
        for i in range(0, len(ids), 8):
            x, mask = hf_batch(ids[i : i + 8], pad_id, device)
            y = torch.tensor(labels[i : i + 8], device=device)
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                out = model(input_ids=x, attention_mask=mask)
            loss = F.cross_entropy(getattr(out, "logits", out).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def train_last_two(model: torch.nn.Module, arch: str) -> None:
    """Freeze all but the last 2 blocks, the final norm and the head (transformers' names)."""
    model.requires_grad_(False)
    if arch.startswith("gpt2"):
        parts = [*model.transformer.h[-2:], model.transformer.ln_f, model.score]
    else:
        parts = [*model.bert.encoder.layer[-2:], model.score]
    for part in parts:
        part.requires_grad_(True)


def measure(arch: str, raws: list[bytes], args: argparse.Namespace) -> list[tuple]:
    device = args.device
    family, config = architecture(arch)
    if family.name == "bert":
        vocab = args.vocab.read_bytes() if args.vocab else None
        tokenizer = WordPieceTokenizer(vocab) if vocab else packaged_tokenizer()
    else:
        tokenizer = family.tokenizer({})
    ids = [tokenizer.encode(message_text(r), args.max_tokens) for r in raws]
    labels = [i % 2 for i in range(len(raws))]  # speed only: any labels do
    tokens = sum(map(len, ids)) * args.epochs
    pad = tokenizer.pad_id

    torch.manual_seed(0)
    ours = family.build(config).to(device)
    fresh = copy.deepcopy(ours).cpu()
    settings = Settings(
        epochs=args.epochs, trainable=2, autocast=torch.bfloat16, evaluate_epochs=False
    )
    warm = replace(settings, epochs=1)  # CUDA start-up and kernels, as transformers gets below
    train(copy.deepcopy(ours), ids[:16], labels[:16], ids[:8], labels[:8], warm, pad_id=pad)
    t_ours = timed(partial(train, ours, ids, labels, ids[:8], labels[:8], settings, pad_id=pad))
    hf = hf_model(arch, config, pad).to(device)
    train_last_two(hf, arch)
    hf_train(hf, ids[:16], labels[:16], 1, pad, device)  # warm-up
    t_hf = timed(partial(hf_train, hf, ids, labels, args.epochs, pad, device))
    rows = [(arch, "training tokens/s (bf16 autocast)", tokens / t_ours, tokens / t_hf)]

    n = len(raws)
    hf = hf.eval().to(torch.bfloat16)
    hf_scores(hf, ids[:32], 32, pad, device)  # warm-up
    hf_rate = n / timed(partial(hf_scores, hf, ids, 32, pad, device))
    meta = CheckpointMeta(arch=arch, config={}, family=family.name, max_tokens=args.max_tokens)
    for precision in ("bfloat16", "float32"):
        model = copy.deepcopy(fresh)
        clf = Classifier(model, meta, device=device, precision=precision, tokenizer=tokenizer)
        clf.score_messages(raws[:32])  # warm-up, text extraction included
        t_e2e = timed(partial(clf.score_messages, raws))
        t_model = timed(partial(clf.score_tokens, ids))
        theirs = hf_rate if precision == "bfloat16" else None
        rows.append((arch, f"scoring msgs/s {precision}, extract+tokenize+model", n / t_e2e, None))
        rows.append((arch, f"scoring msgs/s {precision}, model only", n / t_model, theirs))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, required=True, help="a folder of raw messages")
    p.add_argument("--vocab", type=Path, help="BERT vocab.txt (default: the minilm package's)")
    p.add_argument("--messages", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--archs", nargs="+", default=["gpt2", "minilm-l6"])
    p.add_argument("--device", default="cuda", help="cpu: a quick check of the script itself")
    args = p.parse_args()
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(torch.__version__, gpu, flush=True)
    raws = corpus_sample(args.corpus, args.messages)
    rows = []
    for arch in args.archs:
        rows += measure(arch, raws, args)
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    print(f"\n{len(raws)} messages, max {args.max_tokens} tokens, {args.epochs} epochs")
    print("| architecture | what | filterd | transformers |\n| --- | --- | --- | --- |")
    for arch, what, ours, theirs in rows:
        cells = [f"{v:,.0f}" if v is not None else "" for v in (ours, theirs)]
        print(f"| `{arch}` | {what} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()

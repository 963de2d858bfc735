"""Retraining from the feedback store: a candidate, a gate, and an atomic install.

`filterd retrain` and the daemon run this module as a process of its own (`python -m
filterd.trainer.retrain`), so a crash or a kill leaves the running model untouched: the
checkpoint is replaced only at the end, atomically, after the gate said yes and after
checking nobody replaced it meanwhile.

The candidate is fine-tuned from the running checkpoint on the feedback (less a held-out
slice) plus a replay sample of what the checkpoint was trained on, so new corrections do
not make it forget the old spam. The gate scores both models on the held-out feedback and
on the original test split: the candidate is installed only if it is more accurate on the
held-out feedback by more than a margin and its false-positive rate on the original test
ham (the held-out ham when there is no test split) is not higher, within a tolerance.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import random
import resource
import sys
import time
from pathlib import Path

from filterd.config import Config, ConfigError, load_config
from filterd.learning import stores
from filterd.model.checkpoint import CheckpointMeta, checkpoint_path, save_checkpoint
from filterd.model.history import METRICS, file_sha256, keep
from filterd.store.durable import replace_durably
from filterd.store.feedback import newest
from filterd.text import message_text
from filterd.trainer.data import LABELS, DataError, Example, read_split

EX_INSTALLED, EX_KEPT, EX_ERROR, EX_BUSY = 0, 1, 2, os.EX_TEMPFAIL


class RetrainError(RuntimeError):
    """A retrain cannot run; the message says why and what to do."""


class Busy(RetrainError):
    """Another retrain holds the lock."""


def _log(text: str) -> None:
    print(f"filterd retrain: {text}", file=sys.stderr, flush=True)


def lock(config: Config):
    """An exclusive lock beside the feedback store: one retrain at a time per store."""
    root = config.learning.store_path()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    f = open(root / "retrain.lock", "a+")  # noqa: SIM115 - held until the process ends
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise Busy(f"a retrain is already running ({f.read().strip() or 'pid ?'})") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()}")
    f.flush()
    return f


def idle_priority() -> None:
    """Before torch loads: run only when the CPU has nothing else to do (the daemon's
    retrains), so scoring never waits for training."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)


def _holdout_rank(key: str) -> str:
    """A fixed order of the feedback: a message stays held out (or not) from one retrain
    to the next, so the gate never scores what an earlier candidate trained on."""
    return hashlib.sha256(f"holdout\0{key}".encode()).hexdigest()


def gather(config: Config, checkpoint: Path, replay: bool) -> dict[str, list[Example]]:
    """Examples for training (feedback + replay), the gate (held-out feedback, original
    test) and the threshold (original val). The feedback is every store of the fleet
    (learning.fleet_store) merged, each message's newest label winning."""
    problems: list[str] = []
    found = stores(config, problems)
    limits = config.limits.text_limits()
    feedback, stored_replay = [], []
    missing = 0
    for store, record in newest(found, problems):
        try:
            raw = store.read(record)
        except FileNotFoundError:  # another host's store, caught mid-write: next time
            missing += 1
            continue
        example = Example(f"feedback:{record.key}", record.label, message_text(raw, limits))
        (feedback if record.kind == "feedback" else stored_replay).append((record.key, example))
    for problem in problems:
        _log(f"skipped: {problem}")
    if missing:
        _log(f"skipped {missing} label(s) whose message is not in its store (yet)")
    learning = config.learning
    need = learning.holdout_min + 1
    if len(feedback) < need:
        where = ", ".join(str(s.root) for s in found)
        raise RetrainError(
            f"{len(feedback)} labelled messages in {where}: a retrain needs at least "
            f"{need} ({learning.holdout_min} held out for the gate, the rest to learn from)"
        )
    feedback.sort(key=lambda pair: _holdout_rank(pair[0]))
    n_hold = max(learning.holdout_min, round(len(feedback) * learning.holdout_fraction))
    held = [e for _, e in feedback[:n_hold]]
    train = [e for _, e in feedback[n_hold:]]
    split_file = checkpoint.parent / "split.jsonl"
    original: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
    if split_file.is_file():
        for example, split in read_split(split_file, limits, skip_missing=True):
            original[split].append(example)
    pool = original["train"] + [e for _, e in stored_replay]
    if replay and not pool:
        raise RetrainError(
            f"no replay data: {split_file} names no training message that can still be read, "
            "and the store holds none. Add some with `filterd learn --replay --ham DIR` and "
            "`filterd learn --replay --spam DIR` (mail like what the model was trained on), "
            "or retrain with --no-replay (it may then forget what it knew)"
        )
    sample = random.Random(0).sample(pool, min(len(pool), learning.replay_messages))
    return {
        "feedback": train,
        "replay": sample if replay else [],
        "holdout": held,
        "val": original["val"],
        "test": original["test"],
    }


def _counts(examples: list[Example]) -> dict[str, int]:
    return {label: sum(e.label == label for e in examples) for label in LABELS}


def _figures(probs: list[float], examples: list[Example], threshold: float) -> dict:
    pairs = list(zip(probs, examples, strict=True))
    right = sum((p >= threshold) == (e.label == "spam") for p, e in pairs)
    ham = [p for p, e in pairs if e.label == "ham"]
    false_pos = sum(p >= threshold for p in ham)
    return {
        "n": len(examples),
        "accuracy": right / len(examples) if examples else None,
        "false_positives": false_pos,
        "fpr": false_pos / len(ham) if ham else None,
    }


def gate(
    config: Config,
    probs: dict[str, dict[str, list[float]]],
    thresholds: dict[str, float],
    data: dict[str, list[Example]],
) -> dict:
    """The decision and why, from both models' probabilities (`probs[model][split]`) on
    the held-out feedback and the original test ham ("fpr")."""
    figures = {
        name: {
            split: _figures(probs[name][split], data[split], thresholds[name])
            for split in ("holdout", "fpr")
        }
        for name in ("current", "candidate")
    }
    cur, cand = figures["current"], figures["candidate"]
    on = "the original test ham" if data["fpr"] is data["test_ham"] else "the held-out ham"
    learning = config.learning
    accuracy = f"held-out accuracy {cur['holdout']['accuracy']:.4f} -> "
    accuracy += f"{cand['holdout']['accuracy']:.4f}"
    fpr = f"false-positive rate on {on} {cur['fpr']['fpr']:.4f} -> {cand['fpr']['fpr']:.4f}"
    if cand["fpr"]["fpr"] - cur["fpr"]["fpr"] > learning.fpr_tolerance + 1e-12:
        install, why = False, f"{fpr} rises (tolerance {learning.fpr_tolerance})"
    elif cand["holdout"]["accuracy"] - cur["holdout"]["accuracy"] <= learning.accuracy_margin:
        install, why = False, f"{accuracy}: not higher by more than {learning.accuracy_margin}"
    else:
        install, why = True, f"{accuracy}; {fpr}"
    return {"install": install, "reason": why, "fpr_on": on, **figures}


def score_both(current, candidate, first: int, tokens: list[list[int]], pad_id: int):
    """Both models' probabilities on the same messages. The candidate was trained from the
    current model with blocks below `first` frozen, so those blocks' output is the same for
    both: it is computed once and each model runs only its own upper blocks."""
    from filterd.trainer.train import Batcher, predict

    batcher = Batcher(candidate, tokens, first, cache=True, pad_id=pad_id)
    return predict(current, batcher), predict(candidate, batcher)


def retrain(config: Config, checkpoint: Path, replay: bool = True) -> dict:
    """Train a candidate and install it if the gate says so; the report either way."""
    import torch

    from filterd.model.checkpoint import load_checkpoint
    from filterd.trainer.cli import PRETRAINED_DEFAULTS, class_weights, initial_model
    from filterd.trainer.metrics import choose_threshold
    from filterd.trainer.train import Settings, train

    started = time.monotonic()
    checkpoint = checkpoint_path(checkpoint)
    parent_sha = file_sha256(checkpoint)
    current, parent_meta, _ = load_checkpoint(checkpoint)
    data = gather(config, checkpoint, replay)
    data["test_ham"] = [e for e in data["test"] if e.label == "ham"]
    data["fpr"] = data["test_ham"] or [e for e in data["holdout"] if e.label == "ham"]
    examples = data["feedback"] + data["replay"]
    _log(
        f"{len(data['feedback'])} feedback + {len(data['replay'])} replay messages to train on, "
        f"{len(data['holdout'])} held out, {len(data['test_ham'])} original test ham"
    )
    model, arch, _, fam, tokenizer = initial_model(str(checkpoint), "", None)
    # The parent's step size when its metrics.json says it (a model trained from random
    # weights took larger steps than a fine-tuned one); the last 2 blocks train.
    lr = PRETRAINED_DEFAULTS[fam.name]["lr"]
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        lr = float(json.loads((checkpoint.parent / METRICS).read_text())["settings"]["lr"])
    settings = Settings(
        epochs=config.learning.epochs,
        lr=lr,
        trainable=min(2, len(model.blocks)),
        evaluate_epochs=False,
        keep_best=False,
        class_weights=class_weights(examples) if len({e.label for e in examples}) == 2 else None,
    )
    max_tokens = parent_meta.max_tokens
    tokens = [tokenizer.encode(e.text, max_tokens) for e in examples]
    torch.manual_seed(settings.seed)
    train(model, tokens, [e.y for e in examples], [], [], settings, pad_id=tokenizer.pad_id)
    # One pass of the frozen blocks for every message the gate and the threshold read.
    splits = ("holdout", "fpr", "val")
    texts = [e.text for split in splits for e in data[split]]
    first = len(model.blocks) - settings.trainable
    both = score_both(
        current,
        model.eval(),
        first,
        [tokenizer.encode(t, max_tokens) for t in texts],
        tokenizer.pad_id,
    )
    probs: dict[str, dict[str, list[float]]] = {"current": {}, "candidate": {}}
    at = 0
    for split in splits:
        n = len(data[split])
        probs["current"][split] = both[0][at : at + n]
        probs["candidate"][split] = both[1][at : at + n]
        at += n
    threshold = parent_meta.threshold
    if data["val"]:  # the parent's rule on the parent's validation split
        threshold = choose_threshold(probs["candidate"]["val"], [e.y for e in data["val"]], 0.01)
    thresholds = {"current": parent_meta.threshold, "candidate": threshold}
    decision = gate(config, probs, thresholds, data)
    meta = CheckpointMeta(
        arch=arch,
        config={},
        family=fam.name,
        tokenizer=tokenizer.name,
        threshold=threshold,
        max_tokens=max_tokens,
        data_fingerprint=parent_meta.data_fingerprint,
    )
    report = {
        "parent": {
            "path": str(checkpoint),
            "sha256": parent_sha,
            "created_at": parent_meta.created_at,
        },
        "feedback": {
            "train": _counts(data["feedback"]),
            "holdout": _counts(data["holdout"]),
            "replay": _counts(data["replay"]),
        },
        "gate": decision,
        "threshold": threshold,
        "seconds": round(time.monotonic() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "installed": False,
    }
    if not decision["install"]:
        _log(f"kept the running model: {decision['reason']}")
        return report
    if file_sha256(checkpoint) != parent_sha:
        report["gate"]["reason"] = "the checkpoint was replaced during the retrain"
        _log(f"not installed: {checkpoint} was replaced during the retrain; it stays")
        return report
    keep(checkpoint, config.learning.keep_checkpoints)
    meta.metrics = {"retrain": report}
    report["installed"] = True
    save_checkpoint(checkpoint, model.cpu(), meta, tokenizer)
    replace_durably(checkpoint.parent / METRICS, (json.dumps(report, indent=2) + "\n").encode())
    _log(f"installed a new model: {decision['reason']}")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="filterd retrain", description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path)
    p.add_argument("--checkpoint", type=Path, help="overrides the config's checkpoint")
    p.add_argument("--no-replay", action="store_true", help="train on the feedback alone")
    p.add_argument("--idle", action="store_true", help="at idle CPU priority (the daemon's)")
    args = p.parse_args(argv)
    if args.idle:
        idle_priority()
    try:
        config = load_config(args.config)
        checkpoint = args.checkpoint or config.checkpoint
        if checkpoint is None:
            raise RetrainError("no checkpoint: set `checkpoint:` in the config or --checkpoint")
        held = lock(config)
        try:
            report = retrain(config, Path(checkpoint), replay=not args.no_replay)
        finally:
            held.close()
    except RetrainError as e:
        _log(str(e))
        return EX_BUSY if isinstance(e, Busy) else EX_ERROR
    except (ConfigError, DataError, OSError, ValueError) as e:
        _log(str(e))
        return EX_ERROR
    print(json.dumps(report), flush=True)
    return EX_INSTALLED if report["installed"] else EX_KEPT


if __name__ == "__main__":
    sys.exit(main())

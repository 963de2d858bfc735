"""filterd-train: labelled mail in, a checkpoint the daemon serves out."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from filterd import __version__
from filterd.trainer.data import DataError, Example, prepare, read_mail, read_sms, read_spamassassin

if TYPE_CHECKING:
    from filterd.trainer.distributed import Group

err = Console(stderr=True)
out = Console()

# From pretrained weights, per family: GPT-2 follows the reference recipe; MiniLM was
# measured on the SpamAssassin validation split (README, model quality). From random
# weights (SMS, gpt2-mini) the whole network trains, with a larger step and dropout.
PRETRAINED_DEFAULTS = {
    "gpt2": {"lr": 5e-5, "epochs": 5, "trainable": "last-2"},
    "bert": {"lr": 5e-5, "epochs": 3, "trainable": "last-2", "max_tokens": 512},
}
RANDOM_DEFAULTS = {"lr": 3e-4, "epochs": 5, "trainable": "all", "dropout": 0.2}
# Measured per data kind (README, model quality): short SMS texts train best balanced by
# undersampling; mail keeps every message with a class-weighted loss.
DEFAULT_BALANCE = {"sms": "undersample", "mail": "weight"}
DEFAULT_PATIENCE = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="filterd-train",
        description="Fine-tune GPT-2 or BERT (MiniLM) as a ham/spam classifier and write a "
        "filterd checkpoint.",
    )
    p.add_argument("--version", action="version", version=f"filterd-train {__version__}")
    data = p.add_argument_group("data (one source, or --ham and --spam together)")
    data.add_argument(
        "--sms",
        nargs="?",
        const="download",
        metavar="FILE",
        help="SMS Spam Collection (label<TAB>text); with no FILE, download it from UCI",
    )
    data.add_argument("--ham", nargs="+", action="extend", default=[], type=Path, metavar="PATH")
    data.add_argument("--spam", nargs="+", action="extend", default=[], type=Path, metavar="PATH")
    data.add_argument("--spamassassin", type=Path, metavar="DIR", help="public corpus layout")
    data.add_argument("--split", type=Path, metavar="FILE", help="split.jsonl (with --evaluate)")
    model = p.add_argument_group("model")
    model.add_argument(
        "--init",
        default="gpt2",
        help="gpt2|gpt2-medium|gpt2-large|gpt2-xl (hub), minilm-l6 (the installed "
        "filterd[minilm] extra), a weights PATH (GPT-2, or BERT with config.json and vocab.txt), "
        "a filterd checkpoint to retrain, or random (default: gpt2)",
    )
    model.add_argument(
        "--arch",
        default="gpt2-mini",
        help="architecture for --init random: gpt2-mini, gpt2-tiny, bert-tiny, minilm-l6, ... "
        "(default: gpt2-mini)",
    )
    model.add_argument(
        "--max-tokens",
        type=int,
        help="token budget per message (default 512 from pretrained BERT/MiniLM, 256 "
        "otherwise; a checkpoint's own when retraining)",
    )
    model.add_argument(
        "--dropout", type=float, help="dropout while training from random weights (default 0.2)"
    )
    train = p.add_argument_group("training")
    train.add_argument("--out", type=Path, metavar="DIR")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--lr", type=float)
    train.add_argument(
        "--schedule",
        choices=("constant", "linear"),
        default="constant",
        help="learning rate: constant (default), or linear warm-up over 6%% of the steps "
        "then decay to 0",
    )
    train.add_argument("--weight-decay", type=float, default=0.1)
    train.add_argument(
        "--trainable",
        help="last-N blocks, blocks (every block, embeddings frozen) or all (default: "
        "last-2; all for random weights)",
    )
    train.add_argument("--seed", type=int, default=123)
    train.add_argument(
        "--balance",
        choices=["undersample", "weight", "none"],
        help="undersample the majority class (default for --sms), keep it whole and weight the "
        "loss by inverse class frequency (default for mail), or neither",
    )
    train.add_argument(
        "--no-balance", action="store_const", const="none", dest="balance", help="--balance none"
    )
    train.add_argument(
        "--patience",
        type=int,
        default=DEFAULT_PATIENCE,
        help="stop after N epochs without a lower validation loss; 0: never "
        f"(default {DEFAULT_PATIENCE})",
    )
    train.add_argument("--max-fpr", type=float, default=0.01, help="threshold's bound on FPR")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    train.add_argument(
        "--precision",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="forward passes in bfloat16 (autocast; weights and optimizer stay float32) or "
        "float32; auto: bfloat16 on a GPU, float32 on a CPU (default: auto)",
    )
    train.add_argument("--plot", action="store_true", help="PNG plots next to the checkpoint")
    ev = p.add_argument_group("evaluation")
    ev.add_argument("--evaluate", type=Path, metavar="CHECKPOINT", help="re-score, don't train")
    ev.add_argument("--json", action="store_true", help="--evaluate prints JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.evaluate:
            return evaluate(args)
        return run_training(args)
    except (DataError, ValueError, OSError, RuntimeError) as e:
        # Under torchrun every rank meets bad input alike and rank 0 says it; any other
        # failure is said by the rank it happened on.
        rank = int(os.environ.get("RANK", "0"))
        if rank and isinstance(e, DataError):
            return 2
        err.quiet = False
        where = f"rank {rank}: " if rank else ""
        err.print(f"[bold red]filterd-train:[/] {where}{escape(str(e))}", highlight=False)
        return 2


def read_examples(args: argparse.Namespace) -> list[Example]:
    from filterd.download import cache_dir

    sources = [bool(args.sms), bool(args.ham or args.spam), bool(args.spamassassin)]
    if sum(sources) != 1:
        raise DataError("give one data source: --sms, --ham/--spam, or --spamassassin")
    if args.sms:
        if args.sms == "download":
            from filterd.trainer.data import download_sms

            return read_sms(download_sms(cache_dir() / "sms-spam-collection"))
        return read_sms(Path(args.sms))
    if args.spamassassin:
        return read_spamassassin(args.spamassassin)
    if not (args.ham and args.spam):
        raise DataError("--ham and --spam are needed together: training needs both classes")
    return [e for path in args.ham for e in read_mail(path, "ham")] + [
        e for path in args.spam for e in read_mail(path, "spam")
    ]


def run_training(args: argparse.Namespace) -> int:
    import torch

    from filterd.trainer.distributed import Group

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    if device == "cuda" and not torch.cuda.is_available():
        raise DataError(
            f"--device cuda: torch {torch.__version__} sees no CUDA GPU (a CPU-only build, or "
            "no driver); use --device cpu or auto"
        )
    group = Group.from_env(device)
    # Under torchrun, rank 0 speaks for all: progress, the metrics table, the checkpoint.
    err.quiet = out.quiet = not group.main
    try:
        result = train_and_save(args, group.device(device), group)
    except BaseException:
        group.close(wait=False)  # the other ranks fail on their next exchange with this one
        raise
    group.close()
    return result


def train_and_save(args: argparse.Namespace, device: str, group: Group) -> int:
    import torch

    from filterd.model.checkpoint import CheckpointMeta, save_checkpoint
    from filterd.store.durable import replace_durably
    from filterd.trainer.data import write_split
    from filterd.trainer.metrics import binary_metrics, choose_threshold
    from filterd.trainer.train import (
        Batcher,
        Settings,
        planned_steps,
        predict_shared,
        set_trainable,
        train,
        train_sample,
    )

    if not args.out:
        raise DataError("--out DIR is required to train")
    if not 0.0 <= args.max_fpr <= 1.0:
        raise DataError(f"--max-fpr {args.max_fpr} is not a rate in [0, 1]")
    if args.patience < 0:
        raise DataError(f"--patience {args.patience}: must be 0 (never stop early) or more")
    if args.batch_size < 1:
        raise DataError(f"--batch-size {args.batch_size}: must be 1 or more")
    started = time.monotonic()
    examples = read_examples(args)
    args.balance = args.balance or DEFAULT_BALANCE["sms" if args.sms else "mail"]
    data = prepare(examples, seed=args.seed, balance=args.balance == "undersample")
    err.print(f"read {len(examples)} messages: {json.dumps(data.counts)}", highlight=False)
    if len(data.train) < group.world:
        raise DataError(
            f"{len(data.train)} training messages cannot be shared by {group.world} ranks"
        )

    torch.manual_seed(args.seed)
    model, arch, base_meta, fam, tokenizer = initial_model(args.init, args.arch, args.dropout)
    model.to(device)
    defaults = RANDOM_DEFAULTS if args.init == "random" else PRETRAINED_DEFAULTS[fam.name]
    max_tokens = args.max_tokens or (
        base_meta.max_tokens
        if base_meta
        else min(defaults.get("max_tokens", 256), model.config.n_positions)
    )
    if not 2 <= max_tokens <= model.config.n_positions:
        raise DataError(f"--max-tokens {max_tokens} must be in 2..{model.config.n_positions}")
    settings = Settings(
        epochs=args.epochs or defaults["epochs"],
        batch_size=args.batch_size,
        lr=args.lr or defaults["lr"],
        weight_decay=args.weight_decay,
        trainable=parse_trainable(args.trainable or defaults["trainable"], len(model.blocks)),
        seed=args.seed,
        patience=args.patience or None,
        schedule=args.schedule,
        class_weights=class_weights(data.train) if args.balance == "weight" else None,
        # bfloat16 forward passes, float32 master weights: the GPU default (README, GPU); a
        # CPU gains only with bfloat16 matrix units (AMX), so there it is asked for.
        autocast=torch.bfloat16
        if args.precision == "bfloat16" or (args.precision == "auto" and device.startswith("cuda"))
        else None,
    )
    # Each rank tokenizes and runs the frozen blocks over its own messages only.
    owned = {
        "train": group.train_shard(len(data.train)),
        "val": group.mine(range(len(data.val))),
        "test": group.mine(range(len(data.test))),
    }
    split_tokens = {
        name: {i: tokenizer.encode(ex[i].text, max_tokens) for i in owned[name]}
        for name, ex in data.splits()
    }
    split_labels = {name: [e.y for e in ex] for name, ex in data.splits()}
    steps = planned_steps(settings, len(owned["train"]))
    ranks = f" x {group.world} ranks" if group.world > 1 else ""
    err.print(
        f"training {arch} from {args.init} on {device}{ranks}: {settings.epochs} epochs, "
        f"{steps} steps of {settings.batch_size}{ranks}, lr {settings.lr} "
        f"({settings.schedule}), "
        f"trainable {args.trainable or defaults['trainable']}",
        highlight=False,
    )
    # The frozen blocks' output for each message, computed once: for every epoch and again
    # for the final scores of all three splits. Dropout would make it differ run to run.
    first = set_trainable(model, settings.trainable)
    cache = settings.cache_frozen and model.config.dropout == 0
    batchers = {
        name: Batcher(
            model,
            split_tokens[name],
            first,
            cache,
            tokenizer.pad_id,
            settings.autocast,
            owned[name],
        )
        for name in ("train", "val", "test")
    }
    with Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}  loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not group.main,
    ) as progress:
        task = progress.add_task("train", total=steps, epoch=1, loss=float("nan"))
        history = train(
            model,
            split_tokens["train"],
            split_labels["train"],
            split_tokens["val"],
            split_labels["val"],
            settings,
            on_step=lambda epoch, step, loss: progress.update(
                task, completed=step, epoch=f"{epoch + 1}/{settings.epochs}", loss=loss
            ),
            on_epoch=lambda epoch, h: progress.console.print(
                f"epoch {epoch + 1}: train loss {h.train_loss[-1]:.4f} acc "
                f"{h.train_accuracy[-1]:.4f}, val loss {h.val_loss[-1]:.4f} acc "
                f"{h.val_accuracy[-1]:.4f}, {time.monotonic() - started:.0f} s",
                highlight=False,
            ),
            pad_id=tokenizer.pad_id,
            batchers=(batchers["train"], batchers["val"]),
            group=group,
        )
    train_seconds = time.monotonic() - started
    # Train figures on a fixed sample: scoring all of it took 90 s of a 20-minute run.
    sample = train_sample(len(data.train), settings)
    split_labels["train"] = [split_labels["train"][i] for i in sample]
    probs = {"train": predict_shared(model, batchers["train"], sample, group)}
    probs |= {
        name: predict_shared(model, batchers[name], range(len(split_labels[name])), group)
        for name in ("val", "test")
    }
    threshold = choose_threshold(probs["val"], split_labels["val"], args.max_fpr)
    metrics = {
        name: binary_metrics(probs[name], split_labels[name], threshold)
        for name in ("train", "val", "test")
    }
    if len(sample) < len(data.train):
        metrics["train"]["sample_of"] = len(data.train)
    report = {
        **metrics,
        "threshold": threshold,
        "init": args.init,
        "arch": arch,
        "epochs": settings.epochs,
        "best_epoch": history.best_epoch,
        "train_seconds": round(train_seconds, 1),
        "counts": data.counts,
        "settings": {
            "lr": settings.lr,
            "schedule": settings.schedule,
            "batch_size": settings.batch_size,
            "weight_decay": settings.weight_decay,
            "trainable": args.trainable or defaults["trainable"],
            "max_tokens": max_tokens,
            "max_fpr": args.max_fpr,
            "seed": args.seed,
            "balance": args.balance,
            "class_weights": settings.class_weights,
            "patience": settings.patience,
            "device": device,
            "ranks": group.world,  # batch_size is per rank
            "autocast": str(settings.autocast).removeprefix("torch.")
            if settings.autocast
            else None,
        },
        "history": history.__dict__ | {"step_losses": history.step_losses[-50:]},
    }
    if not group.main:
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    write_split(data, args.out / "split.jsonl")
    meta = CheckpointMeta(
        arch=arch,
        config={},
        family=fam.name,
        tokenizer=tokenizer.name,
        threshold=threshold,
        max_tokens=max_tokens,
        data_fingerprint=data.fingerprint(),
        metrics={k: report[k] for k in ("train", "val", "test", "counts")},
    )
    replace_durably(args.out / "metrics.json", (json.dumps(report, indent=2) + "\n").encode())
    # The checkpoint last, whole or not at all: a run killed before it leaves none.
    path = save_checkpoint(args.out, model.cpu(), meta, tokenizer)
    if args.plot:
        from filterd.trainer.plot import write_plots

        for png in write_plots(args.out, history, probs["test"], split_labels["test"]):
            err.print(f"wrote {png}", highlight=False)
    print_metrics(metrics, threshold)
    err.print(f"checkpoint: {path}  ({train_seconds:.0f} s)", highlight=False)
    return 0


def initial_model(init: str, arch: str, dropout: float | None):
    """(model, architecture name, base checkpoint metadata or None, family, tokenizer) for
    --init.

    Dropout is for random weights only: with frozen blocks, their cached output must be
    what they compute, so fine-tuning runs without it.
    """
    from dataclasses import replace

    from filterd.model.bert import Bert, is_bert_folder, load_pretrained_bert
    from filterd.model.checkpoint import is_checkpoint, load_checkpoint
    from filterd.model.pretrained import load_pretrained
    from filterd.model.registry import architecture, family

    if init == "random":
        fam, config = architecture(arch)
        default = RANDOM_DEFAULTS["dropout"]
        config = replace(config, dropout=default if dropout is None else dropout)
        return fam.build(config), arch, None, fam, fam.tokenizer({})
    if dropout:
        raise DataError("--dropout applies to --init random only")
    if Path(init).exists() and is_checkpoint(init):
        trained, meta, tokenizer = load_checkpoint(init, retrain=True)
        fam = meta.model_family
        model = fam.build(replace(trained.config, dropout=0.0))
        model.load_state_dict(trained.state_dict())
        return model, meta.arch, meta, fam, tokenizer
    if init in Bert.pretrained or is_bert_folder(init):  # config.json says model_type bert
        model, tokenizer = load_pretrained_bert(init)
        fam = family("bert")
        return model, fam.architecture_name(model.config), None, fam, tokenizer
    model = load_pretrained(init)  # GPT-2 weights
    fam = family("gpt2")
    return model, fam.architecture_name(model.config), None, fam, fam.tokenizer({})


def class_weights(train: list[Example]) -> tuple[float, float]:
    """Loss weights of ham and spam, inverse to their share of the training split, so each
    class counts as much as the other without dropping any message."""
    spam = sum(e.y for e in train)
    ham = len(train) - spam
    return (len(train) / (2 * ham), len(train) / (2 * spam))


def parse_trainable(value: str, n_layer: int) -> int | None:
    """The number of last blocks to train (None: everything, embeddings included)."""
    if value == "all":
        return None
    if value == "blocks":
        return n_layer
    prefix, _, n = value.partition("-")
    if prefix != "last" or not n.isdigit() or int(n) < 1:
        raise DataError(f"--trainable {value!r}: expected last-N (N >= 1), blocks or all")
    return int(n)


# Column headers short enough for an 80-column terminal (the caption spells them out).
METRIC_COLUMNS = {
    "n": "n",
    "accuracy": "acc",
    "accuracy_argmax": "acc@.5",
    "precision": "prec",
    "recall": "recall",
    "f1": "f1",
    "roc_auc": "auc",
}


def print_metrics(metrics: dict, threshold: float, console: Console | None = None) -> None:
    from rich import box

    console = console or out
    table = Table(
        title=f"filterd-train metrics (threshold {threshold:.4f})",
        caption="acc: accuracy at the threshold; acc@.5: at p >= 0.5; prec: precision; "
        "auc: ROC AUC; FP/FN: false positives/negatives at the threshold",
        box=box.SIMPLE_HEAD,
    )
    for header in ("split", *METRIC_COLUMNS.values(), "FP", "FN"):
        table.add_column(header, justify="right", no_wrap=True)
    for name, m in metrics.items():
        cells = [str(m[c]) if c == "n" else _fmt(m[c]) for c in METRIC_COLUMNS]
        label = f"{name}*" if m.get("sample_of") else name
        table.add_row(label, *cells, str(m["false_positives"]), str(m["false_negatives"]))
    if any(m.get("sample_of") for m in metrics.values()):
        table.caption += "; *: on a fixed sample of that split"
    console.print(table)
    if "test" in metrics:
        m = metrics["test"]
        confusion = Table(title="test confusion matrix (rows: truth)", box=box.SIMPLE_HEAD)
        for c in ("", "predicted ham", "predicted spam"):
            confusion.add_column(c, justify="right")
        confusion.add_row("ham", str(m["true_negatives"]), str(m["false_positives"]))
        confusion.add_row("spam", str(m["false_negatives"]), str(m["true_positives"]))
        console.print(confusion)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def evaluate(args: argparse.Namespace) -> int:
    import filterd
    from filterd.trainer.data import deduplicate, read_split
    from filterd.trainer.metrics import binary_metrics

    clf = filterd.load_classifier(args.evaluate)
    if args.split:
        examples = [e for e, split in read_split(args.split) if split == "test"]
        name = "test"
    else:
        examples, _ = deduplicate(read_examples(args))
        name = "all"
    if not examples:
        raise DataError("nothing to evaluate")
    probs = clf.score_texts([e.text for e in examples])
    metrics = {name: binary_metrics(probs, [e.y for e in examples], clf.threshold)}
    if args.json:
        print(json.dumps(metrics[name] | {"threshold": clf.threshold}))
    else:
        print_metrics(metrics, clf.threshold)
    return 0


if __name__ == "__main__":
    sys.exit(main())

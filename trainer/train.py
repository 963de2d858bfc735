"""Fine-tuning: which parts train, length-bucketed batches, and cached frozen blocks.

With the lower blocks frozen (and dropout 0), their output for a message never changes,
so it is computed once and reused in every epoch: each step then runs only the blocks
that train. Batches group messages of similar length and pad only to the longest in the
batch, so short messages never pay for long ones.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from filterd.model.batching import batch_tokens, length_batches, pad_batch
from filterd.model.family import Backbone
from filterd.trainer.distributed import Group

# Token lists by message index: a list, or (on one of several ranks) a mapping that holds
# only the messages this rank works on.
Tokens = Sequence[list[int]] | Mapping[int, list[int]]


@dataclass
class Settings:
    epochs: int = 5
    batch_size: int = 8
    lr: float = 5e-5
    weight_decay: float = 0.1
    trainable: int | None = 2  # the last N blocks (plus final norm and head); None = all
    seed: int = 123
    cache_frozen: bool = True
    evaluate_epochs: bool = True  # per-epoch train/val loss and accuracy (for reports, plots)
    # Per-epoch train figures come from a fixed sample this large: scoring the whole train
    # split after every epoch cost a third of each epoch (MiniLM, SpamAssassin).
    train_eval_sample: int = 512
    keep_best: bool = True  # end with the weights of the epoch with the lowest validation loss
    # Stop once the validation loss has not improved for this many epochs (None: never).
    patience: int | None = None
    # Forward passes in this dtype under autocast (bfloat16 on a GPU), weights and optimizer
    # state in float32; None: float32 throughout.
    autocast: torch.dtype | None = None
    # Loss weight of ham and spam (e.g. inverse class frequency when nothing is
    # undersampled); None: equal.
    class_weights: tuple[float, float] | None = None
    # "constant" (the reference recipe) or "linear": the rate rises over the first 6% of
    # the steps, then falls to zero at the last planned step (BERT's fine-tuning schedule).
    schedule: str = "constant"


@dataclass
class History:
    # Per epoch; the train figures are on Settings.train_eval_sample train messages.
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    best_epoch: int | None = None  # 1-based; the epoch whose weights were kept
    stopped_epoch: int | None = None  # 1-based; set when patience ended the run early


def set_trainable(model: Backbone, last: int | None) -> int:
    """Freeze all but the last `last` blocks, final norm and head; return the first trained block.

    `None` trains everything, embeddings included (what random weights need).
    """
    n_layer = len(model.blocks)
    if last is None:
        model.requires_grad_(True)
        return 0
    if not 1 <= last <= n_layer:
        raise ValueError(f"--trainable last-{last}: this model has {n_layer} blocks")
    model.requires_grad_(False)
    for module in (*model.blocks[n_layer - last :], model.final_norm, model.score):
        module.requires_grad_(True)
    return n_layer - last


class Batcher:
    """Turns message indices into the input of the first trained block.

    Frozen blocks run once per message, for all of them at the first call (in batches of
    up to 64 similar lengths, cheaper than the training batches), then cached; with caching
    off they run every time, which is what the tests compare against. `indices` are the
    messages this process works on (one rank's shard; default all of `tokens`).
    """

    def __init__(
        self,
        model: Backbone,
        tokens: Tokens,
        first: int,
        cache: bool,
        pad_id: int,
        autocast: torch.dtype | None = None,
        indices: Sequence[int] | None = None,
    ):
        self.model, self.tokens, self.first, self.pad_id = model, tokens, first, pad_id
        # Each once, in order (a padded training shard names some twice).
        self.indices = list(dict.fromkeys(range(len(tokens)) if indices is None else indices))
        self.cache: dict[int, torch.Tensor] | None = {} if cache and first > 0 else None
        self.device = next(model.parameters()).device
        self.autocast = autocast

    def amp(self) -> torch.autocast:
        """The forward passes' autocast context (a no-op without a dtype)."""
        dtype = self.autocast or torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.autocast is not None)

    def __call__(self, batch: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is None:
            ids, lengths = pad_batch([self.tokens[i] for i in batch], self.pad_id, self.device)
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.first == 0):
                x = self.model.run_blocks(self.model.embed(ids), lengths, 0, self.first)
            return x, lengths
        if not self.cache:
            self._fill(self.indices)
        rows = [self.cache[i] for i in batch]
        lengths = torch.tensor([len(r) for r in rows], device=self.device)
        x = torch.zeros(len(rows), int(lengths.max()), rows[0].shape[-1], device=self.device)
        for j, r in enumerate(rows):
            x[j, : len(r)] = r
        return x, lengths

    @torch.no_grad()
    def _fill(self, indices: list[int]) -> None:
        lengths = [len(self.tokens[i]) for i in indices]
        for group in length_batches(lengths, batch_tokens(self.device), 64):
            chosen = [indices[g] for g in group]
            ids, lens = pad_batch([self.tokens[i] for i in chosen], self.pad_id, self.device)
            x = self.model.run_blocks(self.model.embed(ids), lens, 0, self.first)
            for row, i in enumerate(chosen):
                self.cache[i] = x[row, : lens[row]].clone()


def logits(model: Backbone, batcher: Batcher, batch: Sequence[int]) -> torch.Tensor:
    """float32 logits, whatever dtype the forward pass ran in."""
    with batcher.amp():
        x, lengths = batcher(batch)
        x = model.run_blocks(x, lengths, batcher.first, len(model.blocks) - 1)
        return model.classify(x, lengths).float()


def train_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar length: sort within random chunks, then shuffle batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lengths.__getitem__)
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def planned_steps(settings: Settings, n_train: int) -> int:
    """Optimizer steps of a whole run over n_train messages (the last batch may be short)."""
    return settings.epochs * -(-n_train // settings.batch_size)


def lr_schedule(
    optimizer: torch.optim.Optimizer, settings: Settings, n_train: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The factor on the learning rate at each step (see Settings.schedule)."""
    if settings.schedule not in ("constant", "linear"):
        raise ValueError(f"schedule {settings.schedule!r}: expected constant or linear")
    total = planned_steps(settings, n_train)
    warmup = max(1, round(0.06 * total))

    def factor(step: int) -> float:
        if settings.schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / (total - warmup + 1))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_sample(n: int, settings: Settings) -> list[int]:
    """The fixed train messages that the train figures (per epoch and final) are on."""
    size = min(n, settings.train_eval_sample)
    return sorted(random.Random(settings.seed).sample(range(n), size))


@torch.no_grad()
def predict(model: Backbone, batcher: Batcher, indices: Sequence[int] | None = None) -> list[float]:
    """Spam probability of every message the batcher works on, or of those at `indices`."""
    was_training = model.training
    model.eval()
    indices = batcher.indices if indices is None else indices
    lengths = [len(batcher.tokens[i]) for i in indices]
    probs = [0.0] * len(lengths)
    for batch in length_batches(lengths, batch_tokens(batcher.device), 64):
        chosen = [indices[j] for j in batch]
        p = torch.softmax(logits(model, batcher, chosen).double(), dim=-1)[:, 1]
        for j, value in zip(batch, p.tolist(), strict=True):
            probs[j] = value
    model.train(was_training)
    return probs


def predict_shared(
    model: Backbone, batcher: Batcher, indices: Sequence[int], group: Group
) -> list[float]:
    """`predict` of `indices` with the work shared by the ranks: each scores its own."""
    mine = group.mine(indices)
    scores = group.gather(mine, predict(model, batcher, mine))
    return [scores[i] for i in indices]


class TrainStep(torch.nn.Module):
    """A training batch's forward pass as a module's, the shape DistributedDataParallel
    wraps: it averages the gradients of the trainable parameters over the ranks."""

    def __init__(self, model: Backbone, batcher: Batcher):
        super().__init__()
        self.model, self.batcher = model, batcher

    def forward(self, batch: list[int]) -> torch.Tensor:
        return logits(self.model, self.batcher, batch)


def _mean_loss(probs: Sequence[float], labels: Sequence[int]) -> float:
    p = torch.tensor(probs, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    y = torch.tensor(labels, dtype=torch.float64)
    return float(F.binary_cross_entropy(p, y))


def _accuracy(probs: Sequence[float], labels: Sequence[int]) -> float:
    return sum((p >= 0.5) == (y == 1) for p, y in zip(probs, labels, strict=True)) / len(labels)


def train(
    model: Backbone,
    train_tokens: Tokens,
    train_labels: Sequence[int],
    val_tokens: Tokens,
    val_labels: Sequence[int],
    settings: Settings,
    on_step: Callable[[int, int, float], None] | None = None,
    max_steps: int | None = None,
    on_epoch: Callable[[int, History], None] | None = None,
    *,
    pad_id: int,
    batchers: tuple[Batcher, Batcher] | None = None,
    group: Group | None = None,
) -> History:
    """AdamW over the trainable parameters; returns per-epoch and per-step losses.

    `on_step(epoch, step, loss)` and `on_epoch(epoch, history)` let a caller show
    progress; `max_steps` stops early (for tests that compare a few steps). `pad_id` is the
    tokenizer's padding token. `batchers` (train, val) lets the caller keep what the frozen
    blocks computed, to score the splits afterwards without running them again. With a
    `group` of several ranks, each trains on its shard, `batch_size` messages per rank and
    step, and the validation figures are the whole split's.
    """
    group = group or Group()
    torch.manual_seed(settings.seed + group.rank)  # dropout differs between ranks
    rng = random.Random(settings.seed)
    first = set_trainable(model, settings.trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel: on a CPU the per-tensor loop of the default spent 10x longer on a
    # from-scratch model's 13M-parameter embedding than on forward and backward together.
    optimizer = torch.optim.AdamW(
        params, lr=settings.lr, weight_decay=settings.weight_decay, fused=True
    )
    shard = group.train_shard(len(train_labels))
    cache, amp = settings.cache_frozen, settings.autocast
    val_mine = group.mine(range(len(val_labels)))
    train_batcher, val_batcher = batchers or (
        Batcher(model, train_tokens, first, cache, pad_id, amp, shard),
        Batcher(model, val_tokens, first, cache, pad_id, amp, val_mine),
    )
    step_module: torch.nn.Module = TrainStep(model, train_batcher)
    if group.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_module = DistributedDataParallel(step_module, gradient_as_bucket_view=True)
    targets = torch.tensor(train_labels, device=train_batcher.device)
    weight = None
    if settings.class_weights is not None:
        weight = torch.tensor(settings.class_weights, device=train_batcher.device)
    history = History()
    lengths = [len(train_tokens[i]) for i in shard]
    sample = train_sample(len(train_labels), settings)
    scheduler = lr_schedule(optimizer, settings, len(shard))
    step = 0
    best: dict[str, torch.Tensor] | None = None
    for epoch in range(settings.epochs):
        step_module.train()
        for positions in train_batches(lengths, settings.batch_size, rng):
            batch = [shard[p] for p in positions]
            out = step_module(batch)
            loss = F.cross_entropy(out, targets[batch], weight=weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            history.step_losses.append(loss.item())
            step += 1
            if on_step:
                on_step(epoch, step, loss.item())
            if max_steps is not None and step >= max_steps:
                return history
        if not settings.evaluate_epochs:
            continue
        train_probs = predict_shared(model, train_batcher, sample, group)
        val_probs = predict_shared(model, val_batcher, range(len(val_labels)), group)
        sample_labels = [train_labels[i] for i in sample]
        history.train_loss.append(_mean_loss(train_probs, sample_labels))
        history.val_loss.append(_mean_loss(val_probs, val_labels))
        history.train_accuracy.append(_accuracy(train_probs, sample_labels))
        history.val_accuracy.append(_accuracy(val_probs, val_labels))
        if settings.keep_best and history.val_loss[-1] <= min(history.val_loss):
            history.best_epoch = epoch + 1
            best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if on_epoch:
            on_epoch(epoch, history)
        since_best = len(history.val_loss) - 1 - history.val_loss.index(min(history.val_loss))
        if settings.patience is not None and since_best >= settings.patience:
            history.stopped_epoch = epoch + 1
            break
    if best is not None:
        # Small data sets overfit within a few epochs: the validation loss picks the epoch.
        model.load_state_dict(best)
    model.eval()
    return history

"""Training on several processes or hosts: this process's rank among those torchrun started.

`filterd-train` under `torchrun --nproc-per-node N` (and `--nnodes` for several hosts)
reads torchrun's environment, joins the process group (`gloo` on CPU, `nccl` on GPU) and
takes its shard of the work: message i of a split belongs to rank i mod N. Every rank
reads the corpus and makes the same split (the seed fixes it); only its own messages are
tokenized and run through the frozen blocks. Scores of the validation and test splits
are gathered, so the threshold and metrics are those of the whole split. Run without
torchrun, it is rank 0 of 1 and nothing here talks to anything.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, device: str) -> Group:
        """Join torchrun's process group when started by it (WORLD_SIZE > 1)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        return cls(rank, world, local)

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints progress and writes the checkpoint."""
        return self.rank == 0

    def device(self, device: str) -> str:
        """This rank's device: its own GPU under torchrun (LOCAL_RANK), else `device`."""
        return f"cuda:{self.local_rank}" if device == "cuda" and self.world > 1 else device

    def mine(self, indices: Sequence[int]) -> list[int]:
        """Those of `indices` this rank works on."""
        return [i for i in indices if i % self.world == self.rank]

    def train_shard(self, n: int) -> list[int]:
        """This rank's training messages, padded to the same count on every rank by
        repeating its first ones: length-bucketed batches of unequal shards would give the
        ranks unequal step counts, and a rank waiting for a gradient all-reduce that never
        comes hangs the run."""
        own = self.mine(range(n))
        if not own:
            raise ValueError(f"{n} training messages cannot be shared by {self.world} ranks")
        size = -(-n // self.world)
        return own + own[: size - len(own)]

    def gather(self, indices: Sequence[int], values: Sequence[float]) -> dict[int, float]:
        """Every rank's (index, value) pairs, on every rank."""
        pairs = list(zip(indices, values, strict=True))
        if self.world == 1:
            return dict(pairs)
        parts: list[list[tuple[int, float]] | None] = [None] * self.world
        dist.all_gather_object(parts, pairs)
        return {i: v for part in parts for i, v in part or ()}

    def close(self, wait: bool = True) -> None:
        """Leave the group; with `wait`, only once every rank is done (rank 0 writes the
        checkpoint while the others wait here)."""
        if self.world > 1:
            if wait:
                dist.barrier()
            dist.destroy_process_group()

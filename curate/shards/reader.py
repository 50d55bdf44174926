"""The training-shard reader: a PyTorch IterableDataset of bucketed batches, resumable from its state."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np

from curate.sd3 import join_sd3, text_embeddings
from curate.shards.cache import SCALARS, RowGroupCache, batch_buffer, contiguous, gather
from curate.shards.index import Batch, ShardInfo, dataloader_skips, index_shards, plan_slot, shard_files
from curate.tensors import to_torch

try:
    from torch.utils.data import IterableDataset as _Base
except ImportError:  # the reader's planning works without torch; iterating needs it
    _Base = object  # type: ignore[misc,assignment]


class ShardDataset(_Base):  # type: ignore[misc,valid-type]
    """An IterableDataset over encode shards yielding whole batches, each from one bucket.

    Row groups are split between distributed ranks (round robin after a seeded shuffle) and then between
    DataLoader workers; use it with `ShardLoader` (or `DataLoader(ds, batch_size=None)`).
    Each batch is a dict (B rows, shapes for SD3; see docs/training-shards.md):
      key (list[str]), bucket (str), latent [B,C,H/8,W/8], latent_std (when stored),
      clip_l [B,77,768], clip_g [B,77,1280], pooled [B,2048], t5 [B,L,4096] (when stored),
      the same four with suffix `_synthetic` (zeros where `has_synthetic` is false), has_synthetic [B] bool,
      has_caption [B] bool (text tensors are zeros where the row had no original caption),
      original_size [B,2] and crop_top_left [B,2] and target_size [B,2] (int64, height first),
      epoch, position (batches of this rank's epoch before this one).
    """

    def __init__(
        self,
        source: str | list[str],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        synthetic: bool = True,
        shuffle_rows: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        even_ranks: bool = True,
        prefetch: int = 1,
        verify: bool = False,
    ):
        self.files = shard_files(source)
        self.groups, self.info = index_shards(self.files)
        self.batch_size = batch_size
        self.shuffle = shuffle
        # False: rows keep their order inside a row group, so a batch is a slice of one row group and its
        # tensors are views of Arrow's buffers (no copy); row groups are still shuffled. True: each batch
        # is a random pick of a row group's rows (one copy to gather them).
        self.shuffle_rows = shuffle_rows
        self.seed = seed
        self.drop_last = drop_last
        self.synthetic = synthetic
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        # every rank yields as many batches as the rank with the fewest (DDP hangs on uneven ranks);
        # the few batches left over change with the epoch's shuffle
        self.even_ranks = even_ranks
        self.prefetch = prefetch  # row groups read ahead on a background thread (0: read when needed)
        # check each file's size, CRC32C and rows against its completion marker when it is first opened (one more
        # sequential read of the file; ShardDamaged names a damaged one): for shards copied or kept a long time
        self.verify = verify
        self.epoch = 0
        self.start = 0  # batches of this rank's current epoch already consumed (set by load_state_dict)
        self._served = 0
        self._files: tuple[int, dict[str, Any]] | None = None  # (pid, opened shard files) between epochs

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers started by spawn open their own files
        return {**self.__dict__, "_files": None}

    # -- plan ---------------------------------------------------------------------------------------
    def _rank_groups(self, epoch: int, rank: int) -> list[int]:
        order = list(range(len(self.groups)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}:groups").shuffle(order)
        return order[rank :: self.world_size]

    def _count(self, group_ids: list[int]) -> int:
        """Batches plan_slot makes from these row groups, from row counts alone."""
        rows: dict[str, int] = {}
        for g in group_ids:
            rows[self.groups[g].bucket] = rows.get(self.groups[g].bucket, 0) + self.groups[g].rows
        full = sum(n // self.batch_size for n in rows.values())
        return full + (0 if self.drop_last else sum(1 for n in rows.values() if n % self.batch_size))

    def limit(self, epoch: int, num_workers: int = 1) -> int | None:
        """Batches every rank yields in ``epoch`` with even_ranks (None: no limit)."""
        if not self.even_ranks or self.world_size == 1:
            return None
        totals = []
        for rank in range(self.world_size):
            mine = self._rank_groups(epoch, rank)
            totals.append(sum(self._count(mine[w::num_workers]) for w in range(num_workers)))
        return min(totals)

    def plan(self, epoch: int, num_workers: int = 1) -> list[list[Batch]]:
        """The batches of each DataLoader worker of this rank for ``epoch`` (from metadata only)."""
        mine = self._rank_groups(epoch, self.rank)
        plans = []
        for w in range(num_workers):
            rng = None
            if self.shuffle and self.shuffle_rows:
                rng = np.random.default_rng(random.Random(f"{self.seed}:{epoch}:{self.rank}:{w}").getrandbits(128))
            plans.append(plan_slot(self.groups, mine[w::num_workers], self.batch_size, self.drop_last, rng))
        return plans

    def num_batches(self, num_workers: int = 1) -> int:
        """Batches of this rank's current epoch (the split between workers changes the partial batches)."""
        total = sum(len(p) for p in self.plan(self.epoch, num_workers))
        limit = self.limit(self.epoch, num_workers)
        return total if limit is None else min(total, limit)

    # -- state --------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start, self._served = epoch, 0, 0

    def state_dict(self) -> dict[str, int]:
        """Position after the batches served in this process (num_workers=0); with workers use ShardLoader."""
        return {"epoch": self.epoch, "position": self.start + self._served, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, this dataset has seed {self.seed}")
        self.epoch, self.start, self._served = int(state["epoch"]), int(state["position"]), 0

    # -- iteration ----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        import torch.utils.data

        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        plans = self.plan(self.epoch, num_workers)
        counts = [len(p) for p in plans]
        skips = dataloader_skips(counts, self.start)
        limit = self.limit(self.epoch, num_workers)
        todo: list[tuple[int, Batch]] = []
        for local in range(skips[worker_id], counts[worker_id]):
            # this batch's place in the rank's epoch order: (local index, worker) as the DataLoader yields
            position = sum(min(c, local) for c in counts) + sum(1 for c in counts[:worker_id] if c > local)
            if limit is not None and position >= limit:
                break
            todo.append((position, plans[worker_id][local]))
        remaining: dict[int, int] = {}
        for _, batch in todo:
            for g, rows in batch:
                remaining[g] = remaining.get(g, 0) + len(rows)
        order = list(dict.fromkeys(g for _, batch in todo for g, _ in batch))
        # an iterator owns the opened files while it runs (a second iterator at the same time opens its own)
        files = self._files[1] if self._files is not None and self._files[0] == os.getpid() else {}
        self._files = None
        # use_threads: Arrow decodes a row group's columns on its threads in the main process; in DataLoader
        # workers the workers are the parallelism
        cache = RowGroupCache(
            self.groups, self._columns(), self.info, remaining, order, self.prefetch, worker is None, files, self.verify
        )
        try:
            for position, batch in todo:
                yield self._assemble(batch, cache, position, shared=worker is not None)
                self._served += 1
        finally:
            cache.close()
            self._files = (os.getpid(), files)

    def _columns(self) -> list[str]:
        wanted = list(SCALARS)
        tensors = [c for c in self.info.columns if self.synthetic or not c.endswith("_synthetic")]
        return wanted + tensors

    def _assemble(self, batch: Batch, cache: RowGroupCache, position: int, shared: bool) -> dict[str, Any]:
        """One batch's dict; ``shared``: in a DataLoader worker (tensors gathered into shared memory)."""
        import torch

        group = self.groups[batch[0][0]]
        n = sum(len(rows) for _, rows in batch)
        out: dict[str, Any] = {"bucket": group.bucket, "epoch": self.epoch, "position": position}
        tables = {g: cache.get(g) for g, _ in batch}
        for name in self._columns():
            if name not in self.info.columns:
                continue
            parts = [(tables[g][name], rows) for g, rows in batch]
            view = contiguous(parts)
            if view is not None:  # a run of one row group's rows: a view of Arrow's buffer
                out[name] = to_torch(view, self.info.dtype)
            else:  # one copy, straight into the batch's memory
                first = parts[0][0]
                out[name], array = batch_buffer((n, *first.shape[1:]), first.dtype, self.info.dtype, shared)
                gather(parts, array)
        scalars = {name: [tables[g][name][r] for g, rows in batch for r in rows] for name in SCALARS}
        for g, rows in batch:
            cache.served(g, len(rows))
        out["key"], out["caption"] = scalars["key"], scalars["caption"]
        out["caption_synthetic"] = scalars["caption_synthetic"]
        out["has_caption"] = torch.tensor([c is not None for c in scalars["caption"]])
        out["has_synthetic"] = torch.tensor([c is not None for c in scalars["caption_synthetic"]])
        out["original_size"] = torch.tensor(
            list(zip(scalars["original_height"], scalars["original_width"], strict=True))
        )
        out["crop_top_left"] = torch.tensor(list(zip(scalars["crop_top"], scalars["crop_left"], strict=True)))
        out["target_size"] = torch.tensor([[group.height, group.width]] * n)
        out["joint_attention_dim"] = int(self.info.encode["joint_attention_dim"])
        out["max_sequence_length"] = int(self.info.encode["max_sequence_length"])
        return out


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    return 0, 1


class ShardLoader:
    """A DataLoader over a ShardDataset that knows its position: state_dict() / load_state_dict()
    resume mid-epoch with the same remaining batches, whatever num_workers is."""

    def __init__(self, dataset: ShardDataset, num_workers: int = 0, pin_memory: bool = False, **kwargs: Any):
        self.dataset = dataset
        self.num_workers = num_workers
        self.kwargs = {"pin_memory": pin_memory, **kwargs}
        self.position = dataset.start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from torch.utils.data import DataLoader

        self.dataset.start, self.dataset._served = self.position, 0
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
            **self.kwargs,
        )
        for batch in loader:
            self.position += 1
            yield batch
        self.dataset.set_epoch(self.dataset.epoch + 1)
        self.position = 0

    def __len__(self) -> int:
        return self.dataset.num_batches(max(1, self.num_workers))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.dataset.epoch, "position": self.position, "seed": self.dataset.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.dataset.load_state_dict(state)
        self.position = self.dataset.start


def sd3_conditioning(batch: dict[str, Any], synthetic: Any = False) -> tuple[Any, Any]:
    """(prompt_embeds [B, 77 + L, D], pooled [B, 768 + 1280]) exactly as
    StableDiffusion3Pipeline.encode_prompt returns them for the stored captions.

    CLIP-L and bigG penultimate states are concatenated on channels, zero-padded to D (T5's width,
    4096), and T5's states (zeros when T5 was absent) appended along the sequence. ``synthetic``:
    False (original captions), True (synthetic), or a bool tensor [B] choosing per row; rows without a
    synthetic caption always use the original one.
    """
    import torch

    def pick(name: str) -> Any:
        original = batch.get(name)
        if synthetic is False or f"{name}_synthetic" not in batch:
            return original
        choice = batch["has_synthetic"] & (
            synthetic if isinstance(synthetic, torch.Tensor) else torch.tensor(bool(synthetic))
        )
        if original is None:
            return None
        mask = choice.view(-1, *([1] * (original.dim() - 1))).to(original.device)
        return torch.where(mask, batch[f"{name}_synthetic"], original)

    picked = {name: pick(name) for name in ("clip_l", "clip_g", "pooled", "t5")}
    return join_sd3(
        text_embeddings(picked), t5_tokens=int(batch["max_sequence_length"]), width=int(batch["joint_attention_dim"])
    )


def sd3_latents(
    batch: dict[str, Any], info: ShardInfo | None = None, scaling: float = 1.5305, shift: float = 0.0609
) -> Any:
    """What the SD3 trainer diffuses: (latent - shift_factor) * scaling_factor (values from the shards'
    metadata when ``info`` is given)."""
    if info is not None:
        scaling, shift = float(info.encode["scaling_factor"]), float(info.encode["shift_factor"])
    return (batch["latent"].float() - shift) * scaling

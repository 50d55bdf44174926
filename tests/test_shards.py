"""The shard reader: one bucket per batch, documented shapes and dtypes, zero-copy views, resumable."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from curate.runfolder import RunDir, StageDir
from curate.shards import RowGroup, ShardDataset, ShardLoader, dataloader_skips, plan_slot
from curate.tensors import column_view

pytest_plugins = ["encode_helpers"]  # fixtures: tiny_sd3, full_sd3_vae, encoded_run


def stage_uri(run, name="encode16") -> str:
    return RunDir(run["run"]).stage(name).uri


def ok_keys(uri: str) -> set[str]:
    keys = set()
    for f in StageDir(uri).shard_uris():
        table = pq.read_table(f, columns=["key", "status"])
        keys |= {k for k, s in zip(table["key"].to_pylist(), table["status"].to_pylist(), strict=True) if s == "ok"}
    return keys


def test_batches_hold_one_bucket_with_documented_shapes_and_dtypes(encoded_run):
    seen = []
    for batch in ShardLoader(ShardDataset(stage_uri(encoded_run), batch_size=3, seed=7)):
        width, height = (int(x) for x in batch["bucket"].split("x"))
        n = len(batch["key"])
        assert 1 <= n <= 3
        assert batch["latent"].shape == (n, 16, height // 8, width // 8) and batch["latent"].dtype == torch.float16
        assert batch["clip_l"].shape == (n, 77, 32) and batch["clip_g"].shape == (n, 77, 48)
        assert batch["t5"].shape == (n, 77, 128) and batch["pooled"].shape == (n, 80)
        assert batch["clip_l_synthetic"].shape == (n, 77, 32) and batch["has_synthetic"].dtype == torch.bool
        assert (batch["target_size"] == torch.tensor([height, width])).all()
        assert batch["original_size"].shape == batch["crop_top_left"].shape == (n, 2)
        assert not batch["clip_l_synthetic"][~batch["has_synthetic"]].any()
        seen += batch["key"]
    assert len(seen) == len(set(seen)) and set(seen) == ok_keys(stage_uri(encoded_run))


def test_bfloat16_comes_back_as_bfloat16(encoded_run):
    batch = next(iter(ShardDataset(stage_uri(encoded_run, "encodebf"), batch_size=2)))
    assert batch["latent"].dtype == batch["clip_g"].dtype == torch.bfloat16 and "t5" not in batch


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_a_position_gives_the_same_remaining_batches(encoded_run, num_workers):
    def run(state=None, stop=None):
        loader = ShardLoader(ShardDataset(stage_uri(encoded_run), batch_size=2, seed=3), num_workers=num_workers)
        if state:
            loader.load_state_dict(state)
        out = []
        for batch in loader:
            out.append((batch["key"], batch["latent"].clone()))
            if stop is not None and len(out) == stop:
                return out, loader.state_dict()
        return out, loader.state_dict()

    full, _ = run()
    assert len(full) >= 6
    head, state = run(stop=4)
    assert state == {"epoch": 0, "position": 4, "seed": 3}
    rest, _ = run(state)
    assert [k for k, _ in head + rest] == [k for k, _ in full]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(head + rest, full, strict=True))


def test_epochs_reshuffle_and_seeds_repeat(encoded_run):
    a = ShardDataset(stage_uri(encoded_run), batch_size=2, seed=1)
    b = ShardDataset(stage_uri(encoded_run), batch_size=2, seed=1)
    assert a.plan(0) == b.plan(0) and a.plan(0) != a.plan(1)


def test_ranks_split_the_rows_without_overlap(encoded_run):
    keys = []
    for rank in range(2):
        ds = ShardDataset(stage_uri(encoded_run), batch_size=2, seed=5, rank=rank, world_size=2, even_ranks=False)
        keys.append([k for batch in ds for k in batch["key"]])
    assert not set(keys[0]) & set(keys[1])
    assert set(keys[0]) | set(keys[1]) == ok_keys(stage_uri(encoded_run))


def test_drop_last_keeps_only_full_batches(encoded_run):
    sizes = [len(b["key"]) for b in ShardDataset(stage_uri(encoded_run), batch_size=3, drop_last=True)]
    assert sizes and set(sizes) == {3}


def test_dataloader_order_is_local_index_then_worker():
    assert dataloader_skips([3, 1, 2], 0) == [0, 0, 0]
    assert dataloader_skips([3, 1, 2], 4) == [2, 1, 1]  # w0 w1 w2 w0 | w2 w0
    assert dataloader_skips([3, 1, 2], 6) == [3, 1, 2]


def test_plain_pyarrow_and_numpy_read_tensors_without_copies(encoded_run):
    uri = RunDir(encoded_run["run"]).stage("encode16").shard_uris()[0]
    f = pq.ParquetFile(uri)
    table = f.read_row_group(0)
    column = table["latent"].chunk(0)
    bucket = table["bucket"][0].as_py()
    width, height = (int(x) for x in bucket.split("x"))
    view = column_view(column, "float16", (16, height // 8, width // 8))
    assert view.shape == (table.num_rows, 16, height // 8, width // 8)
    buffer = np.frombuffer(column.buffers()[2], dtype=np.uint8)
    assert np.shares_memory(view, buffer)  # a view over Arrow's buffer, not a copy
    # and without curate: np.frombuffer on each value
    first = np.frombuffer(column[0].as_buffer(), dtype=np.float16).reshape(16, height // 8, width // 8)
    assert np.array_equal(first, view[0])


def test_ray_data_reads_the_shards(encoded_run):
    import ray.data

    uris = RunDir(encoded_run["run"]).stage("encode16").shard_uris()
    rows = ray.data.read_parquet(uris).filter(lambda r: r["status"] == "ok").take(2)
    assert len(rows) == 2 and isinstance(rows[0]["latent"], bytes)


@pytest.mark.parametrize("world_size", [2, 3])
def test_even_ranks_yield_the_same_number_of_batches(encoded_run, world_size):
    counts = []
    for rank in range(world_size):
        ds = ShardDataset(stage_uri(encoded_run), batch_size=2, seed=5, rank=rank, world_size=world_size)
        batches = list(ds)
        assert len(batches) == ds.num_batches()
        counts.append(len(batches))
    assert len(set(counts)) == 1 and counts[0] > 0
    uneven = [
        ShardDataset(stage_uri(encoded_run), batch_size=2, seed=5, rank=r, world_size=world_size, even_ranks=False)
        for r in range(world_size)
    ]
    assert counts[0] == min(sum(len(p) for p in ds.plan(0)) for ds in uneven)


def test_plans_serve_every_row_once_in_one_bucket_batches():
    sizes = [5, 7, 3, 8, 1, 6, 9]
    groups = [RowGroup("f", i, "64x32" if i % 3 else "32x64", 64, 32, n) for i, n in enumerate(sizes)]
    everything = sorted((g, r) for g, n in enumerate(sizes) for r in range(n))
    order = [3, 0, 6, 2, 5, 1, 4]
    for rng in (np.random.default_rng(0), None):
        batches = plan_slot(groups, order, 4, False, rng)
        assert sorted((g, r) for b in batches for g, rows in b for r in rows) == everything
        assert all(len({groups[g].bucket for g, _ in b}) == 1 for b in batches)
        assert all(len({g for g, _ in b}) == len(b) for b in batches)  # a row group once per batch
        assert sorted(sum(len(rows) for _, rows in b) for b in batches)[2:] == [4] * (len(batches) - 2)
        in_order = all(list(rows) == sorted(rows) for b in batches for _, rows in b)
        assert in_order == (rng is None)
    full = plan_slot(groups, order, 4, True, np.random.default_rng(0))
    assert {sum(len(rows) for _, rows in b) for b in full} == {4} and len(full) == len(batches) - 2
    assert plan_slot(groups, order, 4, False, np.random.default_rng(1)) == plan_slot(
        groups, order, 4, False, np.random.default_rng(1)
    )


def test_read_ahead_gives_the_same_batches(encoded_run):
    def batches(prefetch):
        ds = ShardDataset(stage_uri(encoded_run), batch_size=3, seed=2, prefetch=prefetch)
        return [(b["key"], b["latent"].clone(), b["t5_synthetic"].clone()) for b in ds]

    ahead, inline = batches(2), batches(0)
    assert [k for k, _, _ in ahead] == [k for k, _, _ in inline] and len(ahead) >= 4
    assert all(torch.equal(a, b) and torch.equal(c, d) for (_, a, c), (_, b, d) in zip(ahead, inline, strict=True))
    partial = iter(ShardDataset(stage_uri(encoded_run), batch_size=3, seed=2))
    assert next(partial)["key"] == ahead[0][0]
    partial.close()  # an abandoned epoch stops its reader thread


class _SharedProbe(torch.utils.data.IterableDataset):
    """Inside a DataLoader worker: is each gathered batch tensor already in shared memory?"""

    def __init__(self, dataset: ShardDataset):
        self.dataset = dataset

    def __iter__(self):
        for batch in self.dataset:
            yield torch.tensor([batch[n].is_shared() for n in ("latent", "clip_l", "pooled", "t5_synthetic")])


def test_workers_gather_into_shared_memory(encoded_run):
    """torch copies a worker's ordinary tensors into shared memory to send them; gathered batches are
    allocated there, as default_collate does, so that copy is not made."""
    ds = ShardDataset(stage_uri(encoded_run), batch_size=3, seed=4, drop_last=True)
    flags = list(torch.utils.data.DataLoader(_SharedProbe(ds), batch_size=None, num_workers=1))
    assert flags and all(bool(f.all()) for f in flags)

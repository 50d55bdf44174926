"""Synthetic embeddings shaped like real SSCD embeddings, for the dedup tests and benchmarks (no model involved).

Uniform random vectors (``cluster.planted_vectors``) are the worst case for clustering but nothing like a real
crawl. This generator adds what real data has and what stresses incremental dedup:

- **topics of very uneven sizes**: each row leans towards one of ``topics`` centres drawn with Zipf weights (a few
  topics hold a large share of rows, most are small); the lean varies by topic, so same-topic rows sit at cosine
  ~0.1-0.5 (related images, not copies);
- **copies across shards**: ``copy_fraction`` of the rows are near copies (cosine 0.80-0.99) of a row of the
  previous shard or of their own shard;
- **copies across runs**: a later batch (``Batch.copies_of``) holds near copies of rows of an earlier one;
- **a placeholder group**: ``placeholder_fraction`` of the rows are near one image (pairwise cosine ~0.9), as
  LAION's "image not available" pictures are;
- **drift**: a later batch can draw ``new_topics`` of its rows from topics the earlier batch never had.

Every shard is a function of (world seed, batch seed, shard index), so a benchmark writes a batch of any size one
shard at a time, and can regenerate any shard of an earlier batch to plant copies of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _near(base: np.ndarray, cosine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors at exactly ``cosine`` to each (unit) ``base`` row, in a random direction."""
    noise = rng.standard_normal(base.shape, dtype=np.float32)
    noise -= (noise * base).sum(-1, keepdims=True) * base
    noise = _unit(noise)
    c = np.asarray(cosine, np.float32)[:, None]
    return c * base + np.sqrt(1 - c**2) * noise


@dataclass(frozen=True)
class World:
    """The topics every batch draws from (shared centres, so batches of one world look alike)."""

    seed: int = 0
    d: int = 512
    topics: int = 2000
    zipf: float = 1.1  # topic weight ~ 1 / rank^zipf

    @cached_property
    def centres(self) -> np.ndarray:
        return _unit(np.random.default_rng([self.seed, 1]).standard_normal((2 * self.topics, self.d), np.float32))

    @cached_property
    def lean(self) -> np.ndarray:
        """Each topic's weight on its centre (same-topic rows then sit at cosine ~lean^2)."""
        return np.random.default_rng([self.seed, 2]).uniform(0.3, 0.7, 2 * self.topics).astype(np.float32)

    @cached_property
    def weights(self) -> np.ndarray:
        w = 1.0 / np.arange(1, self.topics + 1) ** self.zipf
        return w / w.sum()

    @cached_property
    def placeholder(self) -> np.ndarray:
        return _unit(np.random.default_rng([self.seed, 3]).standard_normal(self.d, np.float32))


@dataclass(frozen=True)
class Batch:
    """One run's rows: ``shards`` shards of ``shard_rows`` rows. ``copies_of``: an earlier batch whose rows this
    one copies (``run_copy_fraction`` of its rows, each a near copy of a row of that batch's shards)."""

    world: World
    seed: int
    shards: int
    shard_rows: int
    copy_fraction: float = 0.1  # near copies of rows of this batch (half from the previous shard)
    placeholder_fraction: float = 0.01
    new_topics: float = 0.0  # share of rows from topics the world's other batches do not use (drift)
    copies_of: Batch | None = None
    run_copy_fraction: float = 0.0
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def rows(self) -> int:
        return self.shards * self.shard_rows

    def _base(self, shard: int) -> np.ndarray:
        """The shard's rows before copies and placeholders are planted: topic rows."""
        rng = np.random.default_rng([self.world.seed, self.seed, shard, 0])
        n, w = self.shard_rows, self.world
        topic = rng.choice(w.topics, n, p=w.weights)
        fresh = rng.random(n) < self.new_topics
        topic[fresh] = w.topics + rng.integers(0, w.topics, int(fresh.sum()))  # the world's unused half
        lean = w.lean[topic][:, None]
        noise = _unit(rng.standard_normal((n, w.d), np.float32))
        return _unit(lean * w.centres[topic] + np.sqrt(1 - lean**2) * noise)

    def plan(self, shard: int) -> dict[str, np.ndarray]:
        """Which rows of the shard are planted: copies (row -> (source shard, source row)), placeholders, copies
        of the earlier batch (row -> (its shard, its row)). Rows planted over are never a copy's source."""
        rng = np.random.default_rng([self.world.seed, self.seed, shard, 1])
        n = self.shard_rows
        order = rng.permutation(n)
        copies = int(n * self.copy_fraction)
        holders = int(n * self.placeholder_fraction)
        across = int(n * self.run_copy_fraction) if self.copies_of is not None else 0
        planted = order[: copies + holders + across]
        sources = order[copies + holders + across :]  # rows that stay what they are
        copy_rows = planted[:copies]
        from_previous = rng.random(copies) < 0.5 if self.shards > 1 else np.zeros(copies, bool)
        copy_shard = np.where(from_previous, (shard - 1) % self.shards, shard)
        copy_source = rng.choice(sources, copies)  # the same positions stay sources in every shard
        out = {
            "copy_rows": copy_rows,
            "copy_shard": copy_shard,
            "copy_source": copy_source,
            "copy_cosine": rng.uniform(0.80, 0.99, copies).astype(np.float32),
            "placeholder_rows": planted[copies : copies + holders],
            "run_rows": planted[copies + holders :],
        }
        if across:
            earlier = self.copies_of
            assert earlier is not None
            # from two shards of the earlier batch (regenerating each costs a shard's worth of work)
            pair = np.array([shard % earlier.shards, (shard * 7 + 3) % earlier.shards])
            out["run_shard"] = pair[rng.integers(0, 2, across)]
            out["run_source"] = np.array([earlier.source_row(int(s), rng) for s in out["run_shard"]], np.int64)
            out["run_cosine"] = rng.uniform(0.80, 0.99, across).astype(np.float32)
        return out

    def source_row(self, shard: int, rng: np.random.Generator) -> int:
        """A row of ``shard`` that is not planted over (a copy of it copies what the shard really holds)."""
        planted = self._planted(shard)
        while True:
            row = int(rng.integers(0, self.shard_rows))
            if row not in planted:
                return row

    def _planted(self, shard: int) -> set[int]:
        key = ("planted", shard)
        if key not in self._cache:
            p = self.plan(shard)
            self._cache[key] = set(np.concatenate([p["copy_rows"], p["placeholder_rows"], p["run_rows"]]).tolist())
        return self._cache[key]

    def vectors(self, shard: int) -> np.ndarray:
        """The shard's final (shard_rows, d) float32 unit vectors."""
        p = self.plan(shard)
        x = self._base(shard)
        rng = np.random.default_rng([self.world.seed, self.seed, shard, 2])
        for source_shard in np.unique(p["copy_shard"]).tolist():
            mine = p["copy_shard"] == source_shard
            base = x if source_shard == shard else self._base(source_shard)
            x_src = base[p["copy_source"][mine]]
            x[p["copy_rows"][mine]] = _near(x_src, p["copy_cosine"][mine], rng)
        holders = p["placeholder_rows"]
        x[holders] = _unit(
            self.world.placeholder + 0.015 * rng.standard_normal((len(holders), self.world.d), np.float32)
        )
        if len(p["run_rows"]):
            earlier = self.copies_of
            assert earlier is not None
            for source_shard in np.unique(p["run_shard"]).tolist():
                mine = p["run_shard"] == source_shard
                x_src = earlier.cached_vectors(source_shard)[p["run_source"][mine]]
                x[p["run_rows"][mine]] = _near(x_src, p["run_cosine"][mine], rng)
        return x

    def cached_vectors(self, shard: int) -> np.ndarray:
        """``vectors``, kept for the next call (a later batch copies from a few shards again and again)."""
        key = ("vectors", shard)
        if key not in self._cache:
            if len([k for k in self._cache if k[0] == "vectors"]) >= 4:  # bounded: a few shards at a time
                for k in [k for k in self._cache if k[0] == "vectors"]:
                    del self._cache[k]
            self._cache[key] = self.vectors(shard)
        return self._cache[key]

    def all_vectors(self) -> np.ndarray:
        return np.concatenate([self.vectors(s) for s in range(self.shards)]) if self.shards else np.zeros((0, 0))

"""The run folder: one subfolder per stage, shard files, per-shard completion markers, stage records.

    RUN/
      pipeline.yaml                 the resolved pipeline (presets merged, paths absolute)
      _lease.json                   who is running on this folder now (curate.lease)
      runs.jsonl                    one line per `curate run` invocation
      <stage>/
        _stage.json                 kind, config fingerprint, shard count (written with the plan)
        _plan.parquet               shard -> inputs, fixed on the stage's first run
        shard-00000.parquet         output shards, each renamed into place when complete
        _shards/shard-00000.json    completion marker: the shard's statistics, size and checksum (written last)
        _global/                    a global step's results (dedup's clustering), _global/_DONE.json last
        _SUCCESS.json               the stage's record once every shard has its marker

A shard counts as done only when its marker exists, so a crash between writing a shard and its marker
makes the shard be redone (its file is overwritten by the same content), never counted twice.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate import storage
from curate.checksums import Streamed, TailFile


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: inputs in, one output shard out."""

    index: int
    inputs: tuple[str, ...]


@dataclass
class ShardStats:
    shard: int
    rows: int
    status: dict[str, int]
    seconds: float
    bytes: int
    extra: dict[str, Any] = field(default_factory=dict)
    checksum: str | None = None  # of the file's bytes, "crc32c:<hex>" (curate.checksums); None in older runs

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ShardStats:
        return ShardStats(
            d["shard"], d["rows"], dict(d["status"]), d["seconds"], d["bytes"], d.get("extra", {}),
            d.get("checksum"),
        )  # fmt: skip


def footer_rows(uri: str, streamed: Streamed) -> int | None:
    """Rows in a Parquet file's footer, from the bytes kept while streaming it (a second read only for footers
    larger than those); None when the file has no readable footer."""
    try:
        return pq.ParquetFile(pa.PythonFile(TailFile(streamed.tail, streamed.size), mode="r")).metadata.num_rows
    except Exception:  # a footer longer than the kept bytes, or none at all
        pass
    try:
        return storage.parquet_file(uri).metadata.num_rows
    except Exception:
        return None


def check_shard_file(uri: str, stats: ShardStats) -> list[str]:
    """What is wrong with a shard file against its marker: its size, its checksum (every byte read once, in large
    sequential reads) and the row count in its footer. Empty when all match. Markers written before checksums
    existed (no `checksum`) are checked for size and rows only, and hand-made ones with `bytes` 0 for rows."""
    try:
        streamed = storage.read_digest(uri)
    except FileNotFoundError:
        return ["the file is missing"]
    problems = []
    if (stats.checksum is not None or stats.bytes) and streamed.size != stats.bytes:
        problems.append(f"{streamed.size:,} bytes, the marker says {stats.bytes:,}")
    elif stats.checksum is not None and streamed.checksum != stats.checksum:
        problems.append(f"checksum {streamed.checksum}, the marker says {stats.checksum}")
    rows = footer_rows(uri, streamed)
    if rows is None:
        problems.append("no readable Parquet footer")
    elif rows != stats.rows:
        problems.append(f"{rows:,} rows in its footer, the marker says {stats.rows:,}")
    return problems


class ShardDamaged(ValueError):
    """A shard file that does not match its completion marker."""


def marker_of(shard_uri: str) -> str:
    """The completion marker of a shard file inside a stage folder."""
    folder, name = shard_uri.rstrip("/").rsplit("/", 1)
    return storage.join(folder, "_shards", name.removesuffix(".parquet") + ".json")


def verify_shard_file(uri: str) -> None:
    """Raise ShardDamaged unless the file matches its marker (the reader's `verify` option)."""
    marker = marker_of(uri)
    if not storage.exists(marker):
        raise ShardDamaged(f"{uri}: no completion marker at {marker} to verify it against")
    problems = check_shard_file(uri, ShardStats.from_dict(storage.read_json(marker)))
    if problems:
        raise ShardDamaged(f"{uri}: {'; '.join(problems)} (`curate verify RUN --repair` redoes it)")


@dataclass(frozen=True)
class StageDir:
    uri: str

    def shard(self, index: int) -> str:
        return storage.join(self.uri, shard_name(index) + ".parquet")

    def marker(self, index: int) -> str:
        return storage.join(self.uri, "_shards", shard_name(index) + ".json")

    @property
    def plan_uri(self) -> str:
        return storage.join(self.uri, "_plan.parquet")

    @property
    def record_uri(self) -> str:
        return storage.join(self.uri, "_stage.json")

    @property
    def success_uri(self) -> str:
        return storage.join(self.uri, "_SUCCESS.json")

    # -- plan -------------------------------------------------------------------------------------
    def write_plan(self, tasks: list[ShardTask], record: dict[str, Any]) -> None:
        shards, inputs = [], []
        for task in tasks:
            for item in task.inputs:
                shards.append(task.index)
                inputs.append(item)
        table = pa.table({"shard": pa.array(shards, pa.int64()), "input": pa.array(inputs, pa.string())})
        storage.write_parquet_atomic(self.plan_uri, table, compression="zstd")
        storage.write_json(self.record_uri, {**record, "shards": len(tasks)})

    def read_plan(self) -> list[ShardTask] | None:
        if not storage.exists(self.plan_uri) or not storage.exists(self.record_uri):
            return None
        record = self.read_record()
        table = storage.read_parquet(self.plan_uri)
        grouped: dict[int, list[str]] = {i: [] for i in range(record["shards"])}
        for shard, item in zip(table["shard"].to_pylist(), table["input"].to_pylist(), strict=True):
            grouped[shard].append(item)
        return [ShardTask(i, tuple(items)) for i, items in sorted(grouped.items())]

    def read_record(self) -> dict[str, Any]:
        return storage.read_json(self.record_uri)

    @property
    def global_uri(self) -> str:
        """Results of a stage's global step (StageSpec.prepare), read by its shard tasks."""
        return storage.join(self.uri, "_global")

    @property
    def global_marker_uri(self) -> str:
        return storage.join(self.uri, "_global", "_DONE.json")

    # -- progress ---------------------------------------------------------------------------------
    def done_shards(self) -> set[int]:
        names = storage.list_names(storage.join(self.uri, "_shards"))
        return {int(n[len("shard-") : -len(".json")]) for n in names if n.startswith("shard-") and n.endswith(".json")}

    def shard_stats(self) -> list[ShardStats]:
        return [ShardStats.from_dict(storage.read_json(self.marker(i))) for i in sorted(self.done_shards())]

    def write_marker(self, stats: ShardStats) -> None:
        storage.write_json(self.marker(stats.shard), asdict(stats))

    def is_complete(self) -> bool:
        return storage.exists(self.success_uri)

    def shard_uris(self) -> list[str]:
        """Completed shards, in shard order."""
        return [self.shard(i) for i in sorted(self.done_shards())]


def summarize(stats: list[ShardStats]) -> dict[str, Any]:
    """Totals over shards: rows, status counts, bytes, and throughput per worker-second."""
    status: Counter[str] = Counter()
    for s in stats:
        status.update(s.status)
    rows = sum(s.rows for s in stats)
    seconds = sum(s.seconds for s in stats)
    extra: Counter[str] = Counter()
    for s in stats:
        extra.update({k: v for k, v in s.extra.items() if isinstance(v, int | float)})
    return {
        "shards": len(stats),
        "rows": rows,
        "status": dict(sorted(status.items())),
        "ok_fraction": (status.get("ok", 0) / rows) if rows else 0.0,
        "bytes": sum(s.bytes for s in stats),
        "worker_seconds": round(seconds, 3),
        "rows_per_worker_second": round(rows / seconds, 2) if seconds > 0 else None,
        "extra": dict(extra),
        "bytes_per_sample": _bytes_per_sample(extra),
    }


def _bytes_per_sample(extra: Counter[str]) -> dict[str, float]:
    """Counters `bytes.<column>` and `rows.<column>` (non-null rows) -> bytes per sample of each column."""
    return {
        name[len("bytes.") :]: round(value / extra[f"rows.{name[len('bytes.') :]}"], 1)
        for name, value in sorted(extra.items())
        if name.startswith("bytes.") and extra.get(f"rows.{name[len('bytes.') :]}")
    }


@dataclass(frozen=True)
class RunDir:
    uri: str

    def stage(self, name: str) -> StageDir:
        return StageDir(storage.join(self.uri, name))

    @property
    def pipeline_uri(self) -> str:
        return storage.join(self.uri, "pipeline.yaml")

    @property
    def log_uri(self) -> str:
        return storage.join(self.uri, "runs.jsonl")

    def append_log(self, entry: dict[str, Any]) -> None:
        previous = storage.read_text(self.log_uri) if storage.exists(self.log_uri) else ""
        storage.write_atomic(self.log_uri, (previous + json.dumps(entry, default=str) + "\n").encode())

"""Searching the references of ``against:`` (docs/dedup.md, "Incremental dedup and decontamination").

Every embedded row of the run is searched against each reference's dedup index (curate.dedup.index) before the
run's own dedup; a row with a reference row above that reference's threshold leaves the run's dedup
(curate.dedup.resolve). A reference is searched one of two ways:

- **clusters** (an earlier run): each row goes to its ``probes`` nearest frozen centroids of every round of the
  reference, and only the clusters new rows land in are read and searched:

      probe   one task per group of this run's shards       -> probe entries (row, round, cluster, vector) by
                                                               the reference's bucket, sorted by cluster
      plan    one task                                      -> search tasks over the touched clusters only
      search  one task per group of touched clusters         -> matches by this run's map group
              (a cluster above the task's rows: one task per block of its entries, the index rows streamed)

- **exact** (a small reference set, e.g. an eval set): every row against every indexed row, one task per
  (group of this run's shards, index file), the index file read in chunks.

Each task holds a bounded share (entries of ``Settings.probe_task_rows`` rows, or search tasks of
``Settings.search_task_rows`` rows); the driver holds counts and the plan. The in-memory variant
(``search_in_memory``) is what the single-process step calls: the same probes and the same kernel
(curate.dedup.matches), so both paths find the same matches.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from curate import storage
from curate.dedup import index
from curate.dedup.cluster import DedupParams, faiss_gpu, nearest_centroids, normalize
from curate.dedup.layout import (
    Reference,
    Settings,
    Where,
    folder_files,
    group_of,
    hash_part,
    name,
    read_shard,
    vector_array,
    vectors_of,
    write_table,
)
from curate.dedup.matches import Found, best_of, match_table, search_groups, search_vectors
from curate.dedup.order import Order
from curate.dedup.products import ASSIGN_ROWS, Vectors, resolve_precision
from curate.steps import read_array, write_array

EXACT, CLUSTERS = "exact", "clusters"
GALLERY_SAMPLE = 2_000  # new rows sampled for the gallery's bands below the threshold (near misses)
GALLERY_FLOOR = 0.15  # near misses are recorded down to threshold - this


def root(where: Where, i: int, *parts: str) -> str:
    return where.path("against", name("x", i), *parts)


def default_probes(rounds: int) -> int:
    """Nearest clusters per new row and round: measured on structured synthetic embeddings at 500k rows (pairs at
    cosine 0.75-0.99): one round needs ~24 probes for 0.99 pair recall, two rounds 8 (0.995)."""
    return 24 if rounds <= 1 else 8


# -- before any data is read: the model identity and every reference's manifest ---------------------------------


def identify(where: Where, settings: Settings, run_uri: str, stage_name: str) -> dict[str, Any]:
    """The SSCD model's identity, where this run's rows came from, and each reference checked and planned.
    Raises (failing the step before any data work) for a reference that is not a dedup index, was made with
    another SSCD model or another embedding width, or is this stage itself."""
    identity = index.model_identity(settings.model) if settings.model else None
    source = index.describe_source(run_uri, stage_name, where.upstream)
    stage_uri = storage.join(run_uri, stage_name)
    references = []
    for i, ref in enumerate(settings.references):
        label = f"against[{i}] ({ref.name}): {ref.path}"
        if storage.absolute(ref.path).rstrip("/") == stage_uri.rstrip("/"):
            raise ValueError(f"{label}: this is the stage itself; a run is never its own reference")
        try:
            manifest = index.read_manifest(ref.path)
        except index.NotAnIndex as e:
            raise ValueError(f"{label}: {e}") from None
        if identity is None:
            raise ValueError(f"{label}: this pipeline defines no `sscd` model, so the references cannot be checked")
        problem = index.model_problem(manifest, identity)
        if problem:
            raise ValueError(f"{label}: {problem}")
        references.append(plan_reference(ref, manifest, settings))
    return {"identity": identity, "source": source, "references": references}


def plan_reference(ref: Reference, manifest: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """A reference as the later phases need it (plain data): its index, search mode and probes."""
    rows = int(manifest["rows"]["indexed"])
    rounds = int(manifest.get("rounds") or 0)
    search = ref.search
    if search == "auto":
        search = EXACT if rows <= settings.exact_rows else CLUSTERS
    if rounds == 0:
        search = EXACT  # nothing indexed: no clusters (and nothing to find)
    k = int(manifest.get("k") or 0)
    probes = min(ref.probes or default_probes(rounds), max(1, k))
    return {
        "name": ref.name,
        "path": ref.path,
        "index": index.folder(ref.path),
        "threshold": ref.threshold,
        "reason": ref.reason,
        "search": search,
        "probes": probes if search == CLUSTERS else 0,
        "rounds": rounds,
        "k": k,
        "d": int(manifest.get("d") or 0),
        "rows": rows,
        "model": manifest.get("model"),
        "source": manifest.get("source"),
        "created_at": manifest.get("created_at"),
        "nearest_similarity": index.read_histogram(index.folder(ref.path)),
        "references": [r.get("name") for r in manifest.get("references", [])],
    }


def reference_rows(info: dict[str, Any] | None) -> int:
    """Index rows the references' search may read (every round's copy): the single-process step reads them in one
    task, so beyond ten times its own row limit the step is distributed even for a small batch."""
    return sum(r["rows"] * max(1, r["rounds"]) for r in (info or {}).get("references", []))


def check_width(info: dict[str, Any], d: int) -> None:
    if info["rows"] and info["d"] != d:
        raise ValueError(f"against {info['name']}: its embeddings have {info['d']} dimensions, this run's {d}")


# -- clusters search: probe ------------------------------------------------------------------------------------


def _nearest_vectors(x16: np.ndarray, params: DedupParams) -> Vectors:
    device = params.product_device()
    nearest, _ = resolve_precision(params.precision, device)
    return Vectors.of(normalize(x16), bf16=nearest == "bf16", int8=nearest == "int8", device=device)


def _gpu(params: DedupParams) -> bool:
    """FAISS's GPU flat index for the probes (as the run's own nearest-centroid passes)."""
    return faiss_gpu(params)


def probes_of(x: Vectors, centroids: list[np.ndarray], probes: int, params: DedupParams) -> list[np.ndarray]:
    """Each row's ``probes`` nearest centroids in every round (nearest first)."""
    return [nearest_centroids(x, c, min(probes, len(c)), params, _gpu(params)) for c in centroids]


def probe(where: Where, i: int, info: dict[str, Any], task: str, shards: list[tuple[int, int]], order: Order,
          params: DedupParams, flush_rows: int) -> dict[str, Any]:  # fmt: skip
    """The probe entries of a group of this run's shards: every embedded row once per (round, probed cluster),
    written by the reference's bucket and sorted by cluster; counts per cluster; the histogram of the rows'
    similarity to their nearest round-0 centroid (drift). Entries are held as small integer arrays and their
    vectors gathered once, in order, when written (``flush_rows`` rows at a time)."""
    small = index.load(info["index"], {"rounds": info["rounds"]})
    centroids, buckets = small["centroids"], small["buckets"]
    counts = np.zeros((info["rounds"], info["k"]), np.int64)
    histogram = np.zeros(index.HISTOGRAM_BINS, np.int64)
    held_ids: list[np.ndarray] = []
    held_x: list[np.ndarray] = []
    pending: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}  # rows, clusters, ranks
    held, flushes, rows_seen = 0, 0, 0
    flush_rows = max(ASSIGN_ROWS, flush_rows // ASSIGN_ROWS * ASSIGN_ROWS)  # chunks never split a product block

    def flush() -> None:
        nonlocal held, flushes
        if held_x:
            ids, x16 = np.concatenate(held_ids), np.concatenate(held_x)
            for (r, b), parts in sorted(pending.items()):
                rows, cluster, rank = (np.concatenate(p) for p in zip(*parts, strict=True))
                order_ = np.lexsort((ids[rows], cluster))
                rows, cluster, rank = rows[order_], cluster[order_], rank[order_]
                index.write_rows(root(where, i, f"r{r}", name("b", b), f"{task}-{flushes:04d}.parquet"),
                                 _entries(ids[rows], cluster, rank, x16[rows]))  # fmt: skip
        pending.clear()
        held_ids.clear()
        held_x.clear()
        held, flushes = 0, flushes + 1

    for shard, _ in shards:
        rows, _ = read_shard(where, shard, order, with_vectors=True, with_codes=False)
        assert rows.vectors is not None
        ok = np.flatnonzero(rows.ok)
        rows_seen += len(ok)
        for start in range(0, len(ok), flush_rows):
            sel = ok[start : start + flush_rows]
            x = _nearest_vectors(rows.vectors[sel], params)
            tops = probes_of(x, centroids, info["probes"], params)
            histogram += index.nearest_histogram(np.einsum("ij,ij->i", x.f32, centroids[0][tops[0][:, 0]]))
            first = held  # this chunk's first position among the held rows
            held_ids.append(rows.ids[sel])
            held_x.append(rows.vectors[sel])
            for r, top in enumerate(tops):
                p = top.shape[1]
                cluster = top.reshape(-1)
                member = first + np.repeat(np.arange(len(sel)), p)
                rank = np.tile(np.arange(p, dtype=np.int8), len(sel))
                counts[r] += np.bincount(cluster, minlength=info["k"])
                bucket = buckets[r][cluster]
                by_bucket = np.argsort(bucket, kind="stable")
                edges = np.flatnonzero(np.r_[True, np.diff(bucket[by_bucket]) != 0, True])
                for s0, s1 in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
                    part = by_bucket[s0:s1]
                    pending.setdefault((r, int(bucket[part[0]])), []).append((member[part], cluster[part], rank[part]))
            held += len(sel)
            if held >= flush_rows:
                flush()
    flush()
    write_array(root(where, i, "counts", task + ".npy"), counts)
    return {"rows": rows_seen, "histogram": histogram.tolist()}


def _entries(ids: np.ndarray, cluster: np.ndarray, rank: np.ndarray, x16: np.ndarray) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "cluster": pa.array(cluster.astype(np.int32), pa.int32()),
            "probe": pa.array(rank, pa.int8()),
            "vector": vector_array(x16),
        }
    )


# -- clusters search: plan -------------------------------------------------------------------------------------


def plan(where: Where, i: int, info: dict[str, Any], search_rows: int) -> dict[str, Any]:
    """Search tasks over the touched clusters only: a reference bucket's touched clusters packed into tasks of
    at most ``search_rows`` rows (index rows + probe entries); a cluster above that gets one task per block of
    its entries (``search_rows / 2`` each), streaming its index rows."""
    counts = np.zeros((info["rounds"], info["k"]), np.int64)
    for uri in folder_files(root(where, i, "counts"), ".npy"):
        counts += read_array(uri)
    small = index.load(info["index"], {"rounds": info["rounds"]})
    tasks: list[dict[str, Any]] = []
    blocks: list[dict[str, Any]] = []
    touched, read, products = [], 0, 0
    half = max(1, search_rows // 2)
    for r in range(info["rounds"]):
        sizes, buckets = small["sizes"][r], small["buckets"][r]
        hit = np.flatnonzero((counts[r] > 0) & (sizes > 0))
        touched.append(len(hit))
        read += int(sizes[hit].sum())
        products += int((counts[r, hit] * sizes[hit]).sum())
        for b in np.unique(buckets[hit]).tolist():
            current: list[int] = []
            load = 0
            for c in hit[buckets[hit] == b].tolist():
                size = int(sizes[c] + counts[r, c])
                if size > search_rows:
                    n_blocks = -(-int(counts[r, c]) // half)
                    blocks.append({"round": r, "bucket": b, "cluster": c, "blocks": n_blocks, "chunk": half})
                    continue
                if current and load + size > search_rows:
                    tasks.append({"round": r, "bucket": b, "clusters": current})
                    current, load = [], 0
                current.append(c)
                load += size
            if current:
                tasks.append({"round": r, "bucket": b, "clusters": current})
    result = {
        "tasks": tasks,
        "blocks": blocks,
        "touched": touched,
        "clusters": info["k"],
        "index_rows_read": read,
        "entries": int(counts.sum()),
        "products": products,  # vector products of the search: probe entries x index rows, per cluster
    }
    storage.write_json(root(where, i, "plan.json"), result)
    return {k: v for k, v in result.items() if k not in ("tasks", "blocks")} | {
        "search_tasks": len(tasks) + sum(b["blocks"] for b in blocks)
    }


def read_plan(where: Where, i: int) -> dict[str, Any]:
    return json.loads(storage.read_text(root(where, i, "plan.json")))


# -- clusters search: search -----------------------------------------------------------------------------------


def _groups_by_cluster(new_cluster: np.ndarray, ref_cluster: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(new positions, reference positions) per cluster present on both sides."""
    groups = []
    order_new = np.argsort(new_cluster, kind="stable")
    order_ref = np.argsort(ref_cluster, kind="stable")
    sorted_new, sorted_ref = new_cluster[order_new], ref_cluster[order_ref]
    for c in np.intersect1d(sorted_new, sorted_ref).tolist():
        a0, a1 = np.searchsorted(sorted_new, c), np.searchsorted(sorted_new, c, side="right")
        b0, b1 = np.searchsorted(sorted_ref, c), np.searchsorted(sorted_ref, c, side="right")
        groups.append((order_new[a0:a1], order_ref[b0:b1]))
    return groups


def _write_found(where: Where, i: int, kind: str, task: str, table: pa.Table, firsts: np.ndarray) -> int:
    """Matches (or near misses) by the map group of this run's row, for the resolve phase."""
    if not table.num_rows:
        return 0
    group = group_of(table["id"].to_numpy(), firsts)
    for g in np.unique(group).tolist():
        write_table(root(where, i, kind, name("g", g), task + ".parquet"), table.filter(pa.array(group == g)))
    return table.num_rows


def sample_every(rows: int) -> int:
    """1 in how many new rows the gallery's near misses are recorded for (about GALLERY_SAMPLE rows)."""
    return max(1, rows // GALLERY_SAMPLE)


def sampled(ids: np.ndarray, every: int) -> np.ndarray:
    """The rows whose near misses the gallery records (a deterministic 1 in ``every``)."""
    return hash_part(ids, max(1, every)) == 0


def search(where: Where, i: int, info: dict[str, Any], task: str, spec: dict[str, Any], d: int,
           params: DedupParams, firsts: np.ndarray, sample_every: int) -> dict[str, Any]:  # fmt: skip
    """One search task of a clusters search: a group of touched clusters of a bucket, or one block of a large
    cluster's entries against all its index rows (streamed in chunks)."""
    r, b = spec["round"], spec["bucket"]
    entry_files = folder_files(root(where, i, f"r{r}", name("b", b)), ".parquet")
    index_files = index.bucket_files(info["index"], r, b)
    clusters = np.array(spec["clusters"] if "clusters" in spec else [spec["cluster"]], np.int64)
    tables = list(index.read_clusters(entry_files, clusters))
    entries = pa.concat_tables(tables) if tables else None
    if entries is None or not entries.num_rows:
        return {"entries": 0, "matches": 0}
    chunk = None
    if "blocks" in spec:  # one block of a large cluster's entries
        entries = entries.filter(pa.array(hash_part(entries["id"].to_numpy(), spec["blocks"]) == spec["block"]))
        chunk = spec["chunk"]
    ids = entries["id"].to_numpy()
    found, near = search_entries(
        search_vectors(vectors_of(entries["vector"], d), params),
        np.arange(len(ids)),
        entries["cluster"].to_numpy(),
        index.read_clusters(index_files, clusters, chunk_rows=chunk),
        d,
        params,
        info["threshold"],
        sampled(ids, sample_every),
    )
    hit = found.hit
    probe = entries["probe"].to_numpy()[hit]
    matches = match_table(ids[hit], found.sim[hit], found.codes[hit], found.ref[hit], probe=probe,
                          round=np.full(int(hit.sum()), r, np.int8))  # fmt: skip
    written = _write_found(where, i, "match", task, matches, firsts)
    close = near.hit
    _write_found(where, i, "near", task, match_table(ids[close], near.sim[close], near.codes[close], near.ref[close]),
                 firsts)  # fmt: skip
    return {"entries": len(ids), "matches": written}


def search_entries(rows_x: Vectors, entry_rows: np.ndarray, entry_cluster: np.ndarray, chunks, d: int,
                   params: DedupParams, threshold: float, sample: np.ndarray) -> tuple[Found, Found]:  # fmt: skip
    """Probe entries (the row each stands for, in ``rows_x``, and its cluster) against index rows arriving in
    chunks: the best match of each entry in its cluster (and, for ``sample`` entries, the most similar index row
    above the gallery's floor). A row probes a cluster once, so (cluster, row) names an entry. Order-free (a
    maximum), so chunks may split a cluster anywhere."""
    n = len(entry_rows)
    found, near = Found.empty(n), Found.empty(n)
    row_sample = np.zeros(len(rows_x), bool)
    row_sample[entry_rows[sample]] = True
    for chunk in chunks:
        ref = search_vectors(vectors_of(chunk["vector"], d), params)
        groups = _groups_by_cluster(entry_cluster, chunk["cluster"].to_numpy())  # entry positions, chunk positions
        as_rows = [(entry_rows[e], c) for e, c in groups]
        hits, misses = search_groups(rows_x, ref, chunk, as_rows, threshold, params.threads, row_sample,
                                     threshold - GALLERY_FLOOR)  # fmt: skip
        for into, (g, rows, sim, codes, refs) in ((found, hits), (near, misses)):
            if len(g):
                into.merge(_entry_of(groups, entry_rows, g, rows), sim, codes, refs)
    return found, near


def _entry_of(groups: list[tuple[np.ndarray, np.ndarray]], entry_rows: np.ndarray, g: np.ndarray,
              rows: np.ndarray) -> np.ndarray:  # fmt: skip
    """The entry of each (group, row) result: the group's entry whose row it is."""
    group_of_entry = np.concatenate([np.full(len(e), k, np.int64) for k, (e, _) in enumerate(groups)])
    entries = np.concatenate([e for e, _ in groups])
    keys = group_of_entry * (int(entry_rows.max()) + 1) + entry_rows[entries]
    order = np.argsort(keys)
    wanted = g * (int(entry_rows.max()) + 1) + rows
    return entries[order[np.searchsorted(keys[order], wanted)]]


# -- exact search ---------------------------------------------------------------------------------------------


def exact_tasks(info: dict[str, Any]) -> list[str]:
    """The index files an exact search reads (round 0 holds every indexed row once)."""
    if not info["rounds"]:
        return []
    buckets = read_array(storage.join(info["index"], "buckets-r0.npy"))
    files = []
    for b in range(int(buckets.max()) + 1 if len(buckets) else 0):
        files += index.bucket_files(info["index"], 0, b)
    return files


def exact(where: Where, i: int, info: dict[str, Any], task: str, shards: list[tuple[int, int]], file: str,
          order: Order, d: int, params: DedupParams, firsts: np.ndarray, sample_every: int,
          chunk_rows: int) -> dict[str, Any]:  # fmt: skip
    """A group of this run's shards against one index file, read in chunks: every row against every indexed row."""
    ids, vectors = [], []
    for shard, _ in shards:
        rows, _ = read_shard(where, shard, order, with_vectors=True, with_codes=False)
        assert rows.vectors is not None
        ok = np.flatnonzero(rows.ok)
        ids.append(rows.ids[ok])
        vectors.append(rows.vectors[ok])
    if not ids or not sum(len(x) for x in ids):
        return {"rows": 0, "matches": 0}
    all_ids = np.concatenate(ids)
    x = search_vectors(np.concatenate(vectors), params)
    found, near = search_entries(x, np.arange(len(all_ids)), np.zeros(len(all_ids), np.int64),
                                 _as_one_cluster(index.read_chunks(file, chunk_rows)),
                                 d, params, info["threshold"], sampled(all_ids, sample_every))  # fmt: skip
    hit, close = found.hit, near.hit
    written = _write_found(where, i, "match", task,
                           match_table(all_ids[hit], found.sim[hit], found.codes[hit], found.ref[hit],
                                       probe=np.full(int(hit.sum()), -1, np.int8),
                                       round=np.zeros(int(hit.sum()), np.int8)), firsts)  # fmt: skip
    _write_found(where, i, "near", task,
                 match_table(all_ids[close], near.sim[close], near.codes[close], near.ref[close]), firsts)  # fmt: skip
    return {"rows": len(all_ids), "matches": written}


def _as_one_cluster(chunks):
    """Index chunks with every row in cluster 0 (an exact search is one group: all against all)."""
    for chunk in chunks:
        yield chunk.set_column(chunk.schema.get_field_index("cluster"), "cluster",
                               pa.array(np.zeros(chunk.num_rows, np.int32), pa.int32()))  # fmt: skip


# -- the single-process step: the same search in one task --------------------------------------------------------


def search_in_memory(info: dict[str, Any], ids: np.ndarray, x16: np.ndarray, starts: np.ndarray, d: int,
                     params: DedupParams, sample_every: int, chunk_rows: int) -> dict[str, Any]:  # fmt: skip
    """One reference searched for rows held in memory (``starts``: where each upstream shard's rows begin, so the
    probes are computed in the distributed probe tasks' blocks). Returns per-row arrays: the best match and its
    probe rank (for drift), the near misses, and the histogram of nearest-centroid similarities."""
    n = len(ids)
    found, near = Found.empty(n), Found.empty(n)
    probe_rank = np.full(n, -1, np.int64)
    histogram = np.zeros(index.HISTOGRAM_BINS, np.int64)
    sample = sampled(ids, sample_every)
    x = search_vectors(x16, params)
    summary: dict[str, Any] = {"touched": [], "index_rows_read": 0, "entries": 0, "products": 0}
    if info["search"] == EXACT:
        everyone = np.arange(n)
        for file in exact_tasks(info):
            chunks = _as_one_cluster(index.read_chunks(file, chunk_rows))
            f, m = search_entries(x, everyone, np.zeros(n, np.int64), chunks, d, params, info["threshold"], sample)
            _merge(found, f)
            _merge(near, m)
        summary["index_rows_read"] = info["rows"]
        summary["products"] = n * info["rows"]
        return {"found": found, "near": near, "probe": probe_rank, "histogram": histogram, **summary}
    small = index.load(info["index"], {"rounds": info["rounds"]})
    centroids = small["centroids"]
    bounds = np.r_[starts, n]
    tops: list[list[np.ndarray]] = [[] for _ in centroids]
    for s0, s1 in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):  # per shard: the probe tasks' blocks
        if s1 > s0:
            xs = _nearest_vectors(x16[s0:s1], params)
            for r, top in enumerate(probes_of(xs, centroids, info["probes"], params)):
                tops[r].append(top)
                if r == 0:
                    histogram += index.nearest_histogram(np.einsum("ij,ij->i", xs.f32, centroids[0][top[:, 0]]))
    for r in range(info["rounds"]):
        top = np.concatenate(tops[r]) if tops[r] else np.zeros((0, info["probes"]), np.int64)
        p = top.shape[1]
        sizes, buckets = small["sizes"][r], small["buckets"][r]
        cluster = top.reshape(-1)
        member = np.repeat(np.arange(n), p)
        rank = np.tile(np.arange(p), n)
        live = sizes[cluster] > 0
        cluster, member, rank = cluster[live], member[live], rank[live]
        summary["entries"] += len(cluster)
        hit = np.unique(cluster)
        summary["touched"].append(len(hit))
        summary["index_rows_read"] += int(sizes[hit].sum())
        summary["products"] += int((np.bincount(cluster, minlength=len(sizes))[hit] * sizes[hit]).sum())
        for b in np.unique(buckets[hit]).tolist():
            clusters = hit[buckets[hit] == b]
            mine = np.isin(cluster, clusters)
            entry_rows, entry_cluster, entry_rank = member[mine], cluster[mine], rank[mine]
            f, m = search_entries(x, entry_rows, entry_cluster,
                                  index.read_clusters(index.bucket_files(info["index"], r, b), clusters,
                                                      chunk_rows=chunk_rows),
                                  d, params, info["threshold"], sample[entry_rows])  # fmt: skip
            at = np.flatnonzero(f.hit)
            _merge_rows(found, entry_rows[at], f, at)
            first = np.full(n, np.iinfo(np.int64).max)
            np.minimum.at(first, entry_rows[at], entry_rank[at])
            seen = first < np.iinfo(np.int64).max
            probe_rank[seen] = np.where(probe_rank[seen] < 0, first[seen], np.minimum(probe_rank[seen], first[seen]))
            at = np.flatnonzero(m.hit)
            _merge_rows(near, entry_rows[at], m, at)
    return {"found": found, "near": near, "probe": probe_rank, "histogram": histogram, **summary}


def _merge(into: Found, other: Found) -> None:
    at = np.flatnonzero(other.hit)
    into.merge(at, other.sim[at], other.codes[at], other.ref[at])


def _merge_rows(into: Found, rows: np.ndarray, other: Found, at: np.ndarray) -> None:
    """Entries' finds (``at`` in ``other``) into per-row finds (``rows``), best per row first."""
    rows, sim, codes, ref = best_of(rows, other.sim[at], other.codes[at], other.ref[at])
    into.merge(rows, sim, codes, ref)

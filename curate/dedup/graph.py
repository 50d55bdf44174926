"""The decision phases of the distributed global step: SD3's greedy rule over the sparse pair graph, split by
connected component. Nodes are int64 row ids; a row's place in keep order travels as its four uint64 codes.

1. ``prune`` (one task per hash partition of the later row): drop pairs found twice, keep each row's first
   ``max_neighbors`` earlier neighbours (exactly what the single-process path keeps), and write the pruned graph:
   forward edges, node codes, and adjacency lists partitioned by node.
2. ``components`` (rounds, one task per node partition): label propagation, every node taking the smallest
   label among itself and its neighbours, with messages only from nodes whose label changed; it stops when a
   round sends nothing (rounds: the graph's diameter + 1; near-duplicate groups have small diameters).
3. ``route``: nodes and edges to the greedy partition of their component (a hash of its label).
4. ``greedy`` (one task per partition): the rule on whole components, so the result is the global one; the
   rows it removes, by the map group of the row, for the write phase.
Each task holds only its partition (sized from the embedded rows: ``Settings.graph_task_rows``); a single
component must fit one task (with ``max_neighbors`` = 32 about 100 bytes per row of it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from curate import storage
from curate.dedup.cluster import bound_neighbours, greedy_rule
from curate.dedup.layout import (
    Where,
    code_columns,
    codes_of,
    folder_files,
    group_of,
    hash_part,
    name,
    read_files,
    read_folder,
    write_table,
)
from curate.dedup.order import dense_rank
from curate.steps import read_array, write_array


def prune(where: Where, q: int, rounds: int, parts: int, max_neighbors: int) -> dict[str, Any]:
    """Partition ``q`` of the pairs (by later row): dedupe, bound each row's earlier neighbours, write the graph."""
    found = [read_folder(where.round(r, "search", name("q", q))) for r in range(rounds)]
    found = [t for t in found if t is not None]
    table = pa.concat_tables(found) if found else None
    if table is None or not table.num_rows:
        return {"pairs": 0, "edges": 0, "cut": 0}
    a, b = table["a"].to_numpy(), table["b"].to_numpy()
    a_codes, b_codes = codes_of(table, "a_"), codes_of(table, "b_")
    sim = table["sim"].to_numpy()
    order = np.lexsort((a, a_codes[:, 3], a_codes[:, 2], a_codes[:, 1], a_codes[:, 0], b))
    a, b, sim, a_codes = a[order], b[order], sim[order], a_codes[order]
    b_codes = b_codes[order]
    fresh = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])]
    a, b, sim, a_codes, b_codes = a[fresh], b[fresh], sim[fresh], a_codes[fresh], b_codes[fresh]
    pairs = len(a)
    starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
    place = np.arange(len(b)) - np.repeat(starts, np.diff(np.r_[starts, len(b)]))
    cut = np.unique(b[place >= max_neighbors]) if max_neighbors > 0 else np.zeros(0, np.int64)
    if max_neighbors > 0:
        keep = place < max_neighbors
        a, b, sim, a_codes, b_codes = a[keep], b[keep], sim[keep], a_codes[keep], b_codes[keep]
    write_table(where.path("graph", "edges", name("q", q) + ".parquet"),
                pa.table({"a": a, "b": b, "sim": pa.array(sim, pa.float32())}))  # fmt: skip
    nodes = np.concatenate([b, a])
    codes = np.concatenate([b_codes, a_codes])
    unique, first = np.unique(nodes, return_index=True)
    node_table = pa.table({"id": unique, **code_columns(codes[first]), "cut": np.isin(unique, cut)})
    node_part = hash_part(unique, parts)
    x = np.concatenate([b, a])  # adjacency both ways: x's neighbour y
    y = np.concatenate([a, b])
    adj_part = hash_part(x, parts)
    for p in range(parts):
        write_table(where.path("graph", "nodes", name("p", p), name("q", q) + ".parquet"),
                    node_table.filter(pa.array(node_part == p)))  # fmt: skip
        mine = adj_part == p
        adjacency = where.path("graph", "adjacency", name("p", p), name("q", q) + ".npy")
        write_array(adjacency, np.stack([x[mine], y[mine]]))
    return {"pairs": pairs, "edges": len(a), "cut": len(cut)}


def _send(where: Where, round_: int, p: int, x_labels: np.ndarray, y: np.ndarray, parts: int) -> int:
    """Messages (neighbour, label): the smallest label per neighbour, one file per destination partition."""
    if len(y):
        order = np.lexsort((x_labels, y))
        y, x_labels = y[order], x_labels[order]
        first = np.r_[True, y[1:] != y[:-1]]
        y, x_labels = y[first], x_labels[first]
    dest = hash_part(y, parts)
    for t in range(parts):
        mine = dest == t
        write_array(where.path("graph", "cc", name("r", round_), name("to", t), name("p", p) + ".npy"),
                    np.stack([y[mine], x_labels[mine]]))  # fmt: skip
    return len(y)


def components(where: Where, round_: int, p: int, parts: int) -> dict[str, Any]:
    """One round of label propagation for node partition ``p`` (round 0 also gathers the partition's nodes and
    adjacency from every prune task)."""
    folder = where.path("graph", "cc")
    if round_ == 0:
        nodes = read_folder(where.path("graph", "nodes", name("p", p)))
        if nodes is None or not nodes.num_rows:
            nodes = pa.table({"id": pa.array([], pa.int64()), **code_columns(np.zeros((0, 4), np.uint64)),
                              "cut": pa.array([], pa.bool_())})  # fmt: skip
        nodes = nodes.sort_by([("id", "ascending"), ("cut", "descending")])
        ids = nodes["id"].to_numpy()
        first = np.r_[True, ids[1:] != ids[:-1]] if len(ids) else np.zeros(0, bool)
        nodes = nodes.filter(pa.array(first))
        write_table(storage_path(folder, p, "nodes.parquet"), nodes)
        adj = [read_array(u) for u in folder_files(where.path("graph", "adjacency", name("p", p)), ".npy")]
        adjacency = np.concatenate(adj, axis=1) if adj else np.zeros((2, 0), np.int64)
        write_array(storage_path(folder, p, "adj.npy"), adjacency)
        ids = nodes["id"].to_numpy()
        labels = ids.copy()
        changed = np.ones(len(ids), bool)
    else:
        ids = read_files([storage_path(folder, p, "nodes.parquet")], ["id"])["id"].to_numpy()
        adjacency = read_array(storage_path(folder, p, "adj.npy"))
        previous = read_array(storage_path(folder, p, f"labels-{round_ - 1}.npy"))
        labels = previous.copy()
        for inbox in folder_files(where.path("graph", "cc", name("r", round_ - 1), name("to", p)), ".npy"):
            msg = read_array(inbox)
            if msg.shape[1]:
                at = np.searchsorted(ids, msg[0])
                np.minimum.at(labels, at, msg[1])
        changed = labels < previous
    write_array(storage_path(folder, p, f"labels-{round_}.npy"), labels)
    x, y = adjacency
    at = np.searchsorted(ids, x)
    active = changed[at] if len(at) else np.zeros(0, bool)
    sent = _send(where, round_, p, labels[at[active]], y[active], parts)
    return {"sent": sent, "changed": int(changed.sum()), "nodes": len(ids)}


def storage_path(folder: str, p: int, file: str) -> str:
    return storage.join(folder, name("p", p), file)


def route(where: Where, p: int, last_round: int, parts: int, greedy_parts: int) -> dict[str, Any]:
    """Nodes of partition ``p`` and the edges into them, to the greedy partition of their component."""
    folder = where.path("graph", "cc")
    nodes = read_files([storage_path(folder, p, "nodes.parquet")])
    labels = read_array(storage_path(folder, p, f"labels-{last_round}.npy"))
    ids = nodes["id"].to_numpy()
    target = hash_part(labels, greedy_parts)
    edges = read_files([where.path("graph", "edges", name("q", p) + ".parquet")])
    edge_target = (target[np.searchsorted(ids, edges["b"].to_numpy())] if edges is not None
                   else np.zeros(0, np.int64))  # fmt: skip
    for g in range(greedy_parts):
        write_table(where.path("graph", "route", "nodes", name("g", g), name("p", p) + ".parquet"),
                    nodes.filter(pa.array(target == g)))  # fmt: skip
        if edges is not None:
            write_table(where.path("graph", "route", "edges", name("g", g), name("p", p) + ".parquet"),
                        edges.filter(pa.array(edge_target == g)))  # fmt: skip
    return {"components": len(np.unique(labels))}


def greedy(where: Where, g: int, first_shards: np.ndarray) -> dict[str, Any]:
    """SD3's rule on the components of greedy partition ``g``; removed rows (and kept rows whose neighbour list
    was cut) written by the map group of the row."""
    nodes = read_folder(where.path("graph", "route", "nodes", name("g", g)))
    edges = read_folder(where.path("graph", "route", "edges", name("g", g)))
    if nodes is None or not nodes.num_rows:
        return {"removed": 0, "bounded": 0}
    nodes = nodes.sort_by("id")
    ids, codes = nodes["id"].to_numpy(), codes_of(nodes)
    rank = dense_rank(codes, ids)
    n = len(ids)
    if edges is not None and edges.num_rows:
        a = np.searchsorted(ids, edges["a"].to_numpy())
        b = np.searchsorted(ids, edges["b"].to_numpy())
        graph = bound_neighbours(a, b, edges["sim"].to_numpy(), rank, 0)
    else:
        graph = bound_neighbours(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), rank, 0)
    keep, dup_of, similarity = greedy_rule(n, graph, rank)
    cut = nodes["cut"].to_numpy(zero_copy_only=False)
    out = np.flatnonzero(~keep | cut)
    removed = ~keep[out]
    dup = np.where(removed, dup_of[out], 0)
    table = pa.table(
        {
            "id": pa.array(ids[out], pa.int64()),
            "dup_of": pa.array(np.where(removed, ids[dup], -1), pa.int64()),
            "similarity": pa.array(similarity[out], pa.float32()),
            **code_columns(codes[dup], "dup_"),
            "bounded": pa.array(cut[out] & keep[out], pa.bool_()),
        }
    )
    group = group_of(ids[out], first_shards)
    for m in np.unique(group).tolist():
        write_table(where.path("graph", "greedy", name("m", m), name("g", g) + ".parquet"),
                    table.filter(pa.array(group == m)))  # fmt: skip
    return {"removed": int(removed.sum()), "bounded": int((cut & keep).sum()), "nodes": n}

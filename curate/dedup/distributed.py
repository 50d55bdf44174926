"""The dedup global step as a chain of Ray task phases with bounded memory (driven by the runner, curate.steps).

    scan      one task per map group (consecutive upstream shards, up to Settings.map_task_rows rows)
    exact     one task per sha256 hash partition                        -> exact copies
    per round (independent clusterings, seeds seed, seed+1, ...):
      sample  one task per map group                                    -> the k-means training rows
      kmeans  one task                                                  -> centroids (GPU when the stage has one)
      refine  one task per map group, then a tree of sum tasks           -> centroids, per Lloyd pass
      assign  one task per map group                                    -> rows by bucket of clusters
      plan    one task                                                  -> search tasks
      split   one task per cluster over the cap                          -> its keep-order blocks
      search  one task per cluster group / per block of a large cluster -> pairs by hash of the later row
      cleanup one task                                                  -> the round's rows by bucket deleted
    cache-cleanup                                                       -> the embeddings cache deleted
    prune     one task per pair partition                               -> the bounded pair graph
    ccN       label propagation rounds, one task per node partition      -> connected components
    route, greedy  one task per partition of components                 -> rows removed by SD3's rule
    write     one task per map group                                    -> a decision file per upstream shard
    report    one task                                                  -> _report/

The driver (this generator) holds only small results: counts per group, the sample positions of k-means
(``points_per_centroid`` x K integers) and the search plan (one entry per cluster). Nothing is collected from the
data; every phase exchanges files under ``_global/`` (curate.dedup.layout).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import replace
from typing import Any

import numpy as np

from curate.dedup import against, assign, decisions, exact, graph, index, index_write, resolve, search, single
from curate.dedup.cluster import cluster_count, default_clusters, sample_plan
from curate.dedup.layout import MIN_GROUP_ROWS, MIN_GROUPS, Group, Settings, Where, first_shards, group_shards, name
from curate.steps import GlobalPhase, GlobalSteps, GlobalTask, PhaseResults

FAN_IN = 32  # Lloyd partial sums added per task of the sum tree


def _phase(label: str, tasks: list[GlobalTask]) -> GlobalPhase:
    return GlobalPhase(label, tuple(tasks))


def plan(
    settings: Settings,
    where: Where,
    shards: list[tuple[int, int]],
    d: int,
    info: dict[str, Any] | None = None,
    stage_uri: str | None = None,
) -> GlobalSteps:
    """The phases, each yielded once the previous one's results are in (see the module docstring). ``info``: the
    identify phase's result (references, model identity, where the rows came from); ``stage_uri``: the stage's
    folder, whose ``_index/`` the index phases write."""
    params, order = settings.params, settings.order
    groups = group_shards(shards, settings.map_task_rows())
    firsts = first_shards(groups)
    exact_parts = exact.parts_for(sum(rows for _, rows in shards)) if settings.exact else 1
    seconds: dict[str, float] = {}
    tasks_run = 0

    def timed(phase: GlobalPhase):
        nonlocal tasks_run
        started = time.perf_counter()
        results: PhaseResults = yield phase
        seconds[phase.name] = round(time.perf_counter() - started, 3)
        tasks_run += len(phase.tasks)
        return results

    refs = (info or {}).get("references", [])
    against_out = None
    if refs:
        against_out = yield from against_phases(settings, where, shards, groups, firsts, d, refs, timed)
        where = replace(where, against=True)
    writing_index = settings.index and stage_uri is not None and info is not None
    scanned = yield from timed(_phase("scan", [
        GlobalTask(name("g", g.index), exact.scan, (where, g, order, settings.exact, exact_parts)) for g in groups
    ]))  # fmt: skip
    ok_rows = np.array([scanned[name("g", g.index)]["ok"] for g in groups], np.int64)
    embedded = int(sum(scanned[name("g", g.index)]["embedded"] for g in groups))
    copies = np.zeros(len(groups), np.int64)
    if settings.exact:
        resolved = yield from timed(_phase("exact", [
            GlobalTask(name("p", p), exact.resolve, (where, p, firsts)) for p in range(exact_parts)
        ]))  # fmt: skip
        for result in resolved.values():
            for g, count in result["copies"].items():
                copies[int(g)] += count
    reps = ok_rows - copies
    offsets = np.concatenate([[0], np.cumsum(reps)])
    n = int(reps.sum())
    params = params.resolved(n)
    settings = replace(settings, params=params)
    k = cluster_count(n, params)
    top = min(params.assign_top, k)
    search_rows = settings.search_task_rows()
    parts = max(1, -(-n // settings.graph_task_rows()))
    # buckets of search_rows (one that came out larger gives two search tasks), but at least MIN_GROUPS of them
    # (of MIN_GROUP_ROWS or more) so that a small run's search still spreads over the cluster's cores
    target = min(search_rows, max(MIN_GROUP_ROWS, n * top // MIN_GROUPS))
    bucket_plan = {"top": top, "target": target}
    pairs_found = 0
    for r in range((params.rounds or 1) if n else 0):
        pr = assign.round_params(params, r)
        label = f"r{r}-"
        if k > 1:
            rows, _ = sample_plan(n, k, pr)
            yield from timed(_phase(label + "sample", [
                GlobalTask(name("g", g.index), assign.sample,
                           (where, g, order, int(offsets[g.index]), {r: _takes(rows, offsets, g)}))
                for g in groups if reps[g.index]
            ]))  # fmt: skip
        last = bucket_plan if params.refine_iters == 0 or k == 1 else None
        yield from timed(_phase(label + "kmeans", [
            GlobalTask("centroids", assign.kmeans, (where, r, n, k, d, pr, last), settings.central_cpus)
        ]))  # fmt: skip
        for i in range(1, params.refine_iters + 1 if k > 1 else 1):
            yield from timed(_phase(f"{label}refine{i}", [
                GlobalTask(name("g", g.index), assign.refine, (where, r, i, g, order, pr))
                for g in groups
            ]))  # fmt: skip
            inputs = [where.round(r, f"refine-{i}", name("g", g.index) + ".npy") for g in groups]
            level = 0
            while len(inputs) > FAN_IN:
                chunks = [inputs[j : j + FAN_IN] for j in range(0, len(inputs), FAN_IN)]
                outputs = [where.round(r, f"refine-{i}", f"sum{level}-{j:05d}.npy") for j in range(len(chunks))]
                yield from timed(_phase(f"{label}refine{i}-sum{level}", [
                    GlobalTask(name("s", j), assign.add_sums, (chunk, out))
                    for j, (chunk, out) in enumerate(zip(chunks, outputs, strict=True))
                ]))  # fmt: skip
                inputs, level = outputs, level + 1
            yield from timed(_phase(f"{label}refine{i}-update", [
                GlobalTask("centroids", assign.update,
                           (where, r, i, inputs, bucket_plan if i == params.refine_iters else None))
            ]))  # fmt: skip
        final = where.round(r, f"centroids-{params.refine_iters if k > 1 else 0}.npy")
        yield from timed(_phase(label + "assign", [
            GlobalTask(name("g", g.index), assign.assign, (where, r, g, order, final, pr, r == 0,
                                                          writing_index and r > 0))
            for g in groups
        ]))  # fmt: skip
        yield from timed(_phase(label + "plan", [
            GlobalTask("plan", assign.plan_search, (where, r, k, search_rows, settings.analysis_clusters))
        ]))  # fmt: skip
        search_plan = assign.read_plan(where, r)
        giant = search_plan["giant"]
        if giant:
            yield from timed(_phase(label + "split", [
                GlobalTask(name("c", c["cluster"]), search.split,
                           (where, r, c["cluster"], c["bucket"], c["block"]))
                for c in giant
            ]))  # fmt: skip
        analysed = set(search_plan["analysed"])
        tasks = [
            GlobalTask(name("t", i), search.search,
                       (where, r, name("t", i), t["bucket"], t["clusters"], d, pr, parts,
                        sorted(analysed.intersection(t["clusters"]))))
            for i, t in enumerate(search_plan["tasks"])
        ]  # fmt: skip
        for c in giant:
            for j in range(c["blocks"]):
                task = f"{name('c', c['cluster'])}-{name('b', j)}"
                tasks.append(GlobalTask(task, search.search_block,
                                        (where, r, task, c["cluster"], j, c["block"], d, pr, parts)))  # fmt: skip
        searched = yield from timed(_phase(label + "search", tasks))
        pairs_found += sum(res["pairs"] for res in searched.values())
        # the round's rows by bucket (assign_top x 1 KB per row) are read by its search only: free the disk
        yield from timed(_phase(label + "cleanup", [GlobalTask("assign", assign.remove_rows, (where, r))]))
    if n and not writing_index:  # the last vector pass has run (the index reads the vectors once more)
        yield from timed(_phase("cache-cleanup", [GlobalTask("cache", assign.remove_cache, (where,))]))
    removed = bounded = unique_pairs = 0
    if pairs_found:
        pruned = yield from timed(_phase("prune", [
            GlobalTask(name("q", q), graph.prune, (where, q, params.rounds or 1, parts, params.max_neighbors))
            for q in range(parts)
        ]))  # fmt: skip
        unique_pairs = sum(res["pairs"] for res in pruned.values())
        round_ = 0
        while True:
            labelled = yield from timed(_phase(f"cc{round_}", [
                GlobalTask(name("p", p), graph.components, (where, round_, p, parts)) for p in range(parts)
            ]))  # fmt: skip
            if not sum(res["sent"] for res in labelled.values()):
                break
            round_ += 1
        yield from timed(_phase("route", [
            GlobalTask(name("p", p), graph.route, (where, p, round_, parts, parts)) for p in range(parts)
        ]))  # fmt: skip
        decided = yield from timed(_phase("greedy", [
            GlobalTask(name("g", g), graph.greedy, (where, g, firsts)) for g in range(parts)
        ]))  # fmt: skip
        removed = sum(res["removed"] for res in decided.values())
        bounded = sum(res["bounded"] for res in decided.values())
    names = tuple((r["name"], r["reason"]) for r in refs)
    written = yield from timed(_phase("write", [
        GlobalTask(name("g", g.index), decisions.write,
                   (where, g, n > 0, names))
        for g in groups
    ]))  # fmt: skip
    against_removed = int(sum(res["seen_before"] + res["eval_overlap"] for res in written.values()))
    index_result = None
    if writing_index:
        assert info is not None and stage_uri is not None
        index_result = yield from index_phases(settings, where, groups, info, stage_uri, timed,
                                               k if n else 0, (params.rounds or 1) if n else 0, d,
                                               {"upstream": int(sum(rows for _, rows in shards)),
                                                "embedded": embedded,
                                                "kept": int(sum(res["kept"] for res in written.values()))})  # fmt: skip
        if n:
            yield from timed(_phase("cache-cleanup", [GlobalTask("cache", assign.remove_cache, (where,))]))
    totals = {
        "rows": int(sum(rows for _, rows in shards)),
        "ok": embedded,
        "against_removed": against_removed,
        **{r: int(sum(res[r] for res in written.values())) for r in ("seen_before", "eval_overlap")},
        "exact_duplicates": int(copies.sum()),
        "near_duplicates": int(removed),
        "pairs_found": int(unique_pairs),
        "bounded": int(bounded),
        "k": int(k) if n else 0,
        "k_default": default_clusters(n),
        "searched": n > 0,
        "path": f"distributed ({len(groups)} map groups, {parts} graph partitions, {tasks_run} tasks before report)",
        "seconds": dict(seconds),
    }
    counted = sum(res["near_duplicate"] for res in written.values())  # fmt: skip
    if counted != removed:
        raise RuntimeError(f"the write phase found {counted} near duplicates, the greedy phase removed {removed}")
    if index_result is not None:
        totals["index"] = index_result
    extra = None
    if refs:
        assert info is not None and against_out is not None
        extra = {"references": refs, "images": info["source"].get("images"), **against_out}
    report = GlobalTask("report", decisions.report, (where, settings, d, totals, extra), settings.central_cpus)
    yield from timed(_phase("report", [report]))
    removed_all = totals["exact_duplicates"] + totals["near_duplicates"] + against_removed
    return {
        "removed": removed_all,
        "fraction_removed": removed_all / max(1, totals["ok"]),
        "against_removed": against_removed,
        "k": totals["k"],
        "path": "distributed",
        "tasks": tasks_run,
        "phase_seconds": seconds,
    }


def _takes(rows: np.ndarray | None, offsets: np.ndarray, group: Group) -> np.ndarray:
    """The k-means sample positions inside ``group`` (positions among its embedded rows)."""
    start, end = int(offsets[group.index]), int(offsets[group.index + 1])
    if rows is None:
        return np.arange(end - start, dtype=np.int64)
    return rows[(rows >= start) & (rows < end)] - start


Timed = Callable[[GlobalPhase], Generator[GlobalPhase, PhaseResults, PhaseResults]]


def searched_then_single(settings: Settings, where: Where, shards: list[tuple[int, int]], d: int,
                         info: dict[str, Any], stage_uri: str) -> GlobalSteps:  # fmt: skip
    """A batch small enough for one task against references too large for one task to read: the references
    searched by the distributed phases, then the batch's own dedup (and index, and report) in one task."""
    groups = group_shards(shards, settings.map_task_rows())

    def timed(phase: GlobalPhase):
        return (yield phase)

    searched = yield from against_phases(settings, where, shards, groups, first_shards(groups), d,
                                         info["references"], timed)  # fmt: skip
    task = GlobalTask("single", single.run, (replace(where, against=True), settings, shards, info, stage_uri, searched))
    results = yield _phase("single", [task])
    return {**results["single"], "path": "references distributed, then single-process"}


def against_phases(settings: Settings, where: Where, shards: list[tuple[int, int]], groups: list[Group],
                   firsts: np.ndarray, d: int, refs: list[dict[str, Any]], timed: Timed):  # fmt: skip
    """Each reference searched (curate.dedup.against), then the removals per map group (curate.dedup.resolve).
    Returns what the report needs: counts, probe ranks, histograms, what each search touched."""
    params, order = settings.params, settings.order
    every = against.sample_every(sum(rows for _, rows in shards))
    search_rows = settings.search_task_rows()
    searched, histograms = [], []
    for i, info in enumerate(refs):
        against.check_width(info, d)
        label = f"x{i}-"
        if info["search"] == against.CLUSTERS:
            flush = settings.probe_task_rows(info["rounds"] * info["probes"])
            probed = yield from timed(_phase(label + "probe", [
                GlobalTask(name("a", a.index), against.probe,
                           (where, i, info, name("a", a.index), list(a.shards), order, params, flush))
                for a in group_shards(shards, flush)
            ]))  # fmt: skip
            histograms.append(np.sum([res["histogram"] for res in probed.values()], axis=0).astype(int).tolist())
            planned = yield from timed(_phase(label + "plan", [
                GlobalTask("plan", against.plan, (where, i, info, search_rows))
            ]))  # fmt: skip
            searched.append(planned["plan"])
            search_plan = against.read_plan(where, i)
            tasks = [
                GlobalTask(name("t", j), against.search, (where, i, info, name("t", j), spec, d, params, firsts, every))
                for j, spec in enumerate(search_plan["tasks"])
            ]
            for block in search_plan["blocks"]:
                for j in range(block["blocks"]):
                    task = f"r{block['round']}-{name('c', block['cluster'])}-{name('b', j)}"
                    spec = {**block, "block": j}
                    tasks.append(
                        GlobalTask(task, against.search, (where, i, info, task, spec, d, params, firsts, every))
                    )
            yield from timed(_phase(label + "search", tasks))
        else:
            files = against.exact_tasks(info)
            tasks = [
                GlobalTask(f"{name('a', a.index)}-{name('f', j)}", against.exact,
                           (where, i, info, f"{name('a', a.index)}-{name('f', j)}", list(a.shards), file, order, d,
                            params, firsts, every, search_rows // 2))
                for a in group_shards(shards, search_rows // 2) for j, file in enumerate(files)
            ]  # fmt: skip
            if tasks:
                yield from timed(_phase(label + "exact", tasks))
            rows = sum(r for _, r in shards)
            searched.append(
                {"touched": [], "index_rows_read": info["rows"], "entries": 0, "products": rows * info["rows"]}
            )
            histograms.append([0] * index.HISTOGRAM_BINS)
    resolved = yield from timed(_phase("x-resolve", [
        GlobalTask(name("g", g.index), resolve.resolve, (where, g.index, refs, settings.gallery)) for g in groups
    ]))  # fmt: skip
    counts = [{"matched": 0, "removed": 0} for _ in refs]
    by_rank = [np.zeros(max(1, info["probes"]), np.int64) for info in refs]
    for res in resolved.values():
        for i in range(len(refs)):
            counts[i]["matched"] += res["counts"][i]["matched"]
            counts[i]["removed"] += res["counts"][i]["removed"]
            ranks = np.asarray(res["probes"][i], np.int64)
            by_rank[i][: len(ranks)] += ranks[: len(by_rank[i])]
    return {"counts": counts, "by_rank": [r.tolist() for r in by_rank], "histograms": histograms, "searched": searched}


def index_phases(settings: Settings, where: Where, groups: list[Group], info: dict[str, Any], stage_uri: str,
                 timed: Timed, k: int, rounds: int, d: int, rows: dict[str, int]):  # fmt: skip
    """The dedup index of the kept rows (curate.dedup.index_write), its manifest written last."""
    index_uri = index.folder(stage_uri)
    target = settings.search_task_rows()
    final = [where.round(r, f"centroids-{settings.params.refine_iters if k > 1 else 0}.npy") for r in range(rounds)]
    histogram = np.zeros(index.HISTOGRAM_BINS, np.int64)
    if rounds:
        planned = yield from timed(_phase("index-plan", [
            GlobalTask("plan", index_write.plan, (where, index_uri, rounds, target))
        ]))  # fmt: skip
        buckets = planned["plan"]["buckets"]
        written = yield from timed(_phase("index-rows", [
            GlobalTask(name("g", g.index), index_write.rows_task,
                       (where, index_uri, g, rounds, k, settings.order, final))
            for g in groups
        ]))  # fmt: skip
        for res in written.values():
            histogram += np.asarray(res["histogram"], np.int64)
        yield from timed(_phase("index-compact", [
            GlobalTask(f"r{r}-{name('b', b)}", index.compact, (index_uri, r, b, target))
            for r in range(rounds) for b in range(buckets[r])
        ]))  # fmt: skip
    document = index_write.manifest(settings, info["identity"], info["source"], info["references"], k, rounds,
                                    {"d": d, **rows}, histogram.tolist(), "distributed")  # fmt: skip
    finished = yield from timed(_phase("index-finish", [
        GlobalTask("manifest", index_write.finish, (index_uri, rounds, k, final, document, histogram.tolist()))
    ]))  # fmt: skip
    return finished["manifest"]

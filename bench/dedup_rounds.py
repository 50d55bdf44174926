"""Pair recall after each independent clustering (`rounds`) and for each `assign_top`, with the CPU seconds of
each: which default buys recall most cheaply as N grows (docs/dedup.md, "Method and defaults").

    python bench/dedup_rounds.py --n 1000000                  # K = 3 sqrt(N), the default
    python bench/dedup_rounds.py --n 1000000 --clusters 949   # clusters of ~1,054 rows, as K = 3 sqrt(N) at 10M

One clustering per round (seed, seed+1, ... as the stage's rounds) with the largest `assign_top` asked for; a
smaller top uses the first columns of the same assignment (nearest first), so top-3 and top-4 are compared on the
same centroids. Truth: every pair above the threshold inside the planted groups (bench/dedup.py planted_truth,
equal to the brute force on these vectors). Memory: ~4.5 KB per row (float32 and bf16 copies, assignment).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--clusters", type=int, help="K (default: 3 sqrt(N), the stage's default)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tops", default="3,4", help="assign_top values to compare")
    parser.add_argument("--threshold", type=float, default=0.75)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from dedup import cpu_header, planted_truth

    from curate.dedup.cluster import Clustering, DedupParams, cluster, clustered_pairs, normalize, planted_vectors
    from curate.dedup.products import Vectors

    cpu_header()
    print(f"# load average {os.getloadavg()}", flush=True)
    tops = sorted(int(t) for t in args.tops.split(","))
    x, group = planted_vectors(args.n, seed=args.seed)
    truth = planted_truth(x, group, args.threshold).keys(args.n)
    vectors = Vectors.for_precision(normalize(x), "auto")
    del x
    params = DedupParams(threshold=args.threshold, clusters=args.clusters, assign_top=tops[-1], rounds=1)
    found = {top: np.zeros(0, np.int64) for top in tops}
    total = dict.fromkeys(tops, 0.0)
    print(f"# N = {args.n:,}, {len(truth):,} true pairs; CPU seconds (all threads) per round: clustering (shared by "
          f"every top: sample k-means, {params.refine_iters} refine passes, one assignment) and search")  # fmt: skip
    print(f"{'round':>5} {'K':>6} {'top':>4} {'cluster s':>10} {'search s':>9} {'total s':>8} {'recall':>7} "
          f"{'missed':>7} {'load':>5}")  # fmt: skip
    for round_ in range(args.rounds):
        started = time.process_time()
        clustering = cluster(vectors, replace(params, seed=params.seed + round_))
        cluster_seconds = time.process_time() - started
        k = len(clustering.centroids)
        for top in tops:
            started = time.process_time()
            pairs = clustered_pairs(vectors, Clustering(clustering.centroids, clustering.assignment[:, :top]), params)
            search_seconds = time.process_time() - started
            found[top] = np.union1d(found[top], pairs.keys(args.n))
            total[top] += cluster_seconds + search_seconds
            recall = float(np.isin(truth, found[top]).mean())
            print(f"{round_ + 1:>5} {k:>6} {top:>4} {cluster_seconds:>10.1f} {search_seconds:>9.1f} "
                  f"{total[top]:>8.1f} {recall:>7.4f} {1 - recall:>7.4f} {os.getloadavg()[0]:>5.1f}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

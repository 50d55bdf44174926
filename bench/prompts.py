"""Benchmark: prompt decontamination (the filter's `exclude_prompts`, curate/filter/prompts.py) at scale.

    python bench/prompts.py                       # 30k COCO-like prompts, 1M DiffusionDB-like prompts
    python bench/prompts.py --large 0             # the 30k set only

Prompts and captions are made of synthetic words drawn from a Zipf vocabulary (frequency ~ 1/rank; there is
no corpus on these machines): COCO-like prompts of 8-14 words, DiffusionDB-like ones of 10-40 words,
LAION-like captions of 4-20 words and synthetic (VLM) captions of 50-110 words. Some captions are planted
copies of prompts (exact with changed case and punctuation, or a prompt's 8 words in a row inside other
words), so the bench also checks that every planted copy is found.

Printed per prompt set: the index's bytes per prompt and CPU seconds to build it, and per caption kind the rows
per CPU second of `match` (one core; CPU time is steadier than wall time on a shared machine) against two
references measured in the same run: normalising the same captions alone (`words`, the floor any matcher
pays), and the naive scan that compares each row with every prompt's n-grams (sampled rows, and at most
50,000 prompts, scaled to all; what the index replaces). "other" counts rows that share 8 words in a row with
a prompt without being planted: random texts over a Zipf vocabulary sometimes do, as real captions share
common phrases.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import time

import numpy as np

from curate.filter.prompts import PromptFile, PromptRules, build_index, match, words

N = 8


def vocabulary(size: int, rng: np.random.Generator) -> np.ndarray:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return np.array(["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(size)])


def texts(count: int, lo: int, hi: int, vocab: np.ndarray, rng: np.random.Generator) -> list[str]:
    weights = 1.0 / np.arange(1, len(vocab) + 1)  # Zipf's law: the commonest word ~9% of words, as "the" ~6%
    ranks = rng.choice(len(vocab), size=count * hi, p=weights / weights.sum())
    lengths = rng.integers(lo, hi + 1, size=count)
    out, at = [], 0
    for n in lengths.tolist():
        out.append(" ".join(vocab[ranks[at : at + n]].tolist()).capitalize() + ".")
        at += n
    return out


def plant(captions: list[str], prompts: list[str], rng: np.random.Generator, every: int = 100) -> set[int]:
    """Every `every`-th caption becomes a copy of a prompt: exact (upper case, extra punctuation) or the
    prompt's first 8 words inside other words. Returns the planted rows."""
    planted = set()
    for row in range(0, len(captions), every):
        prompt = prompts[int(rng.integers(len(prompts)))]
        if len(words(prompt)) < N or row % (2 * every) == 0:
            captions[row] = "  " + prompt.upper().replace(" ", ",  ") + "!"
        else:
            captions[row] = "photo: " + " ".join(words(prompt)[:N]) + " " + captions[row]
        planted.add(row)
    return planted


NAIVE_PROMPTS = 50_000


def naive_rows_per_second(prompts: list[str], captions: list[str], seconds: float = 10.0) -> float:
    """Each row against every prompt: the row's n-grams (a set) tested against each prompt's n-gram set. Measured
    on at most NAIVE_PROMPTS prompts (their sets take ~200 B per n-gram) and scaled to all: the scan is linear
    in the prompts."""
    scale = min(1.0, NAIVE_PROMPTS / len(prompts))
    grams = [{tuple(w[i : i + N]) for i in range(len(w) - N + 1)} for w in (words(p) for p in prompts[:NAIVE_PROMPTS])]
    started, done = time.process_time(), 0
    for caption in captions:
        w = words(caption)
        mine = {tuple(w[i : i + N]) for i in range(len(w) - N + 1)}
        any(mine & g for g in grams)
        done += 1
        if time.process_time() - started > seconds:
            break
    return done / (time.process_time() - started) * scale


def bench_set(label: str, count: int, lo: int, hi: int, captions: dict[str, list[str]], vocab, rng, folder) -> None:
    prompts = texts(count, lo, hi, vocab, rng)
    path = os.path.join(folder, f"{label}.txt")
    with open(path, "w") as f:
        f.write("\n".join(prompts) + "\n")
    started = time.process_time()
    index = build_index(PromptRules((PromptFile(path),), ngram=N))
    build = time.process_time() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"\n## {label}: {count:,} prompts of {lo}-{hi} words; index {index.nbytes / 2**20:.1f} MiB = "
          f"{index.nbytes / count:.0f} B per prompt ({len(index.grams):,} n-grams, {len(index.exact):,} texts); "
          f"built in {build:.1f} CPU s ({build / count * 1e6:.1f} us per prompt; process peak RSS so far "
          f"{peak / 2**30:.2f} GiB)", flush=True)  # fmt: skip
    print(f"{'captions':<12} {'rows':>8} {'words':>6} {'match rows/s':>13} {'normalise rows/s':>17} "
          f"{'vs normalise':>13} {'naive rows/s':>13} {'speedup':>9} {'planted found':>14}")  # fmt: skip
    for kind, rows in captions.items():
        rows = list(rows)
        planted = plant(rows, prompts, np.random.default_rng(1))
        started = time.process_time()
        found = match(index, {"caption": rows})
        rate = len(rows) / (time.process_time() - started)
        started = time.process_time()
        for caption in rows:
            words(caption)
        floor = len(rows) / (time.process_time() - started)
        naive = naive_rows_per_second(prompts, rows[1:200])
        hits = {i for i, f in enumerate(found) if f is not None}
        mean_words = np.mean([len(r.split()) for r in rows[:2000]])
        print(f"{kind:<12} {len(rows):>8,} {mean_words:>6.0f} {rate:>13,.0f} {floor:>17,.0f} {rate / floor:>12.2f}x "
              f"{naive:>13,.1f} {rate / naive:>8,.0f}x {len(planted & hits):>6,}/{len(planted):<6,}"
              f" (+{len(hits - planted)} other)", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coco", type=int, default=30_000, help="COCO-like prompts (8-14 words)")
    parser.add_argument("--large", type=int, default=1_000_000, help="DiffusionDB-like prompts (10-40 words); 0: skip")
    parser.add_argument("--rows", type=int, default=50_000, help="captions of each kind")
    parser.add_argument("--folder", default="/tmp/curate-prompts-bench")
    args = parser.parse_args()
    os.makedirs(args.folder, exist_ok=True)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    print(f"# CPU: {model}, {os.cpu_count()} CPUs; {platform.node()}; one core (plain Python + numpy); "
          f"load average {os.getloadavg()}")  # fmt: skip
    rng = np.random.default_rng(0)
    vocab = vocabulary(30_000, rng)
    captions = {"original": texts(args.rows, 4, 20, vocab, rng)}
    captions["synthetic"] = texts(args.rows // 5, 50, 110, vocab, rng)
    bench_set("coco-like", args.coco, 8, 14, captions, vocab, rng, args.folder)
    if args.large:
        bench_set("diffusiondb-like", args.large, 10, 40, captions, vocab, rng, args.folder)
    print(f"# load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()

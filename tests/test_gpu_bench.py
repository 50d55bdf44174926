"""bench/gpu.py --size tiny: every GPU stage's benchmark row runs on the CPU with tiny models, through the same
code the real-size GPU run uses (bench/gpu.py; docs/performance.md), so the script cannot rot unnoticed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tiny_run_prints_every_row(tmp_path, tiny_models, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # its sibling modules (gpu_common, gpu_images, ...)
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "gpu.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gpu.md"
    rows = bench.main(
        ["--size", "tiny", "--cpus", "1", "--models", str(tiny_models), "--work", str(tmp_path), "--out", str(out)]
    )
    assert [r.error for r in rows if r.error] == []
    by_stage = {r.stage.strip(): r for r in rows}
    for name in ("sscd", "score", "encode 64", "caption", "train", "dedup"):  # the stage beside its bare model
        row = by_stage[name]
        assert row.items > 0 and row.stage_rate > 0 and row.bare_rate > 0, row
    for name in ("vae 64", "clip_l", "clip_g", "t5"):  # encode's models one by one
        assert by_stage[name].bare_rate > 0 and by_stage[name].flops > 0
    assert all(r.flops > 0 for r in rows if r.stage != "dedup")  # FlopCounterMode counted every model
    assert "decisions identical: True" in by_stage["dedup"].note
    table = out.read_text()
    assert table.count("\n| ") == len(rows) + 2  # the heading, its rule and one line per row
    assert "utilisation below is against" in table and "load average" in table


def test_the_budget_cuts_items_and_says_so(tmp_path, monkeypatch):
    """The sizing a real run does after its first batch (the tiny run measures one batch and skips it)."""
    import time

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from gpu import REAL
    from gpu_common import Ctx
    from gpu_images import measure

    calls = []

    def side(name: str):
        def run(n: int):
            calls.append((name, n))
            return (0.1 * n, {}) if name == "stage" else 0.1 * n

        return run

    ctx = Ctx(sizes=REAL, device="cpu", work=tmp_path, cpus=1, deadline=time.perf_counter() + 60)
    got = measure(ctx, time.perf_counter() + 1.0, 2, 10, side("stage"), side("bare"))
    # 0.2 s per item and side pair, 2 repeats: 1 s fits 2 items (one batch) of the 10 asked for
    assert got.items == 2 and "cut to 2 of 10" in got.note
    assert calls[:4] == [("stage", 2), ("bare", 2), ("stage", 2), ("bare", 2)]  # warm-up, then the sizing batch
    assert sorted(calls[4:]) == [("bare", 2), ("bare", 2), ("stage", 2), ("stage", 2)]
    got = measure(ctx, time.perf_counter() + 100.0, 2, 10, side("stage"), side("bare"))
    assert got.items == 10 and got.note == ""

"""The training-shards section: the bucket distribution (exact, from the markers' `bucket.<name>` counters), a
few latents (channels, and decoded with the run's VAE), and the validate stage's loss curve and samples.
"""

from __future__ import annotations

from typing import Any

from curate import storage
from curate.report.charts import buckets_png
from curate.report.funnel import Stage
from curate.report.latents import centre_crop, channels_png, decode_png, read_latents
from curate.report.pictures import ImageFolder, safe_name
from curate.runfolder import RunDir

SAMPLES = 8


def bucket_counts(info: Stage) -> dict[str, int]:
    extra = info.summary.get("extra") or {}
    return {k[len("bucket.") :]: int(v) for k, v in extra.items() if k.startswith("bucket.")}


def _load_vae(spec: dict[str, Any]) -> Any:
    from curate.config import ModelSpec
    from curate.encode.models import load_vae

    return load_vae(ModelSpec(**spec), "cpu")


def latent_rows(
    run: RunDir, info: Stage, pictures: ImageFolder, models: dict[str, Any] | None, decode: bool
) -> tuple[list[dict[str, Any]], str]:
    """(rows with channel and decoded pictures, a note on how they were made). Decoding needs torch and diffusers
    in this process and the VAE loaded (about 20 s on 2 cores even for the demo's tiny VAE, more for SD3's), so
    it is asked for (`curate report --decode-latents`), never done by the runner's builds; a latent decoded once
    stays in `_report/img/` and is shown by later builds too."""
    shard = next((m.shard for m in info.markers if (m.extra or {}).get("encoded")), None)
    if shard is None:
        return [], "no encoded rows in the scanned markers"
    rows = read_latents(run.stage(info.name).shard(shard))
    spec = models.get("vae") if isinstance(models, dict) else None  # the run's VAE, as RUN/pipeline.yaml names it
    vae: Any = None
    note = "decoded with the run's VAE (centre crop of at most 256 x 256 pixels)"
    if not decode:
        note = "not decoded by this build (`curate report --decode-latents` decodes them with the run's VAE)"
    out = []
    for row in rows:
        name = safe_name(row["key"])
        channels = pictures.reuse(f"latent-{name}.png") or pictures.put(
            f"latent-{name}.png", channels_png(row["latent"])
        )
        decoded = pictures.reuse(f"decoded-{name}.png")
        if decoded is None and decode and spec is not None and note.startswith("decoded"):
            try:
                vae = vae if vae is not None else _load_vae(spec)
                decoded = pictures.put(f"decoded-{name}.png", decode_png(vae, centre_crop(row["latent"])))
            except Exception as e:  # no torch/diffusers here, or the VAE cannot be loaded: channels only
                note = f"not decoded ({type(e).__name__}: {str(e)[:200]}); channels shown instead"
        out.append(
            {
                "key": row["key"],
                "bucket": row["bucket"],
                "shape": "x".join(map(str, row["latent"].shape)),
                "channels": channels,
                "decoded": decoded,
            }
        )
    if spec is None:
        note = "no VAE in the run's models: channels only"
    elif not decode and any(r["decoded"] for r in out):
        note = "decoded with the run's VAE by an earlier `curate report --decode-latents` (centre crop, at most 256 px)"
    return out, note


def encode_section(
    run: RunDir, info: Stage, pictures: ImageFolder, models: dict[str, Any] | None, decode: bool = False
) -> dict[str, Any]:
    counts = bucket_counts(info)
    latents, note = latent_rows(run, info, pictures, models, decode) if info.summary.get("shards") else ([], "")
    chart = pictures.put(f"{info.name}-buckets.png", buckets_png(counts)) if counts else None
    total = sum(counts.values())
    return {
        "name": info.name,
        "buckets": [(b, n, n / max(1, total)) for b, n in sorted(counts.items(), key=lambda kv: -kv[1])],
        "chart": chart,
        "encoded": total,
        "latents": latents,
        "latent_note": note,
        "bytes_per_sample": info.summary.get("bytes_per_sample") or {},
    }


def validate_section(run: RunDir, info: Stage, pictures: ImageFolder) -> dict[str, Any]:
    stage = run.stage(info.name)
    loss = pictures.copy(storage.join(stage.uri, "loss.png"), f"{info.name}-loss.png")
    samples = []
    if stage.is_complete() and storage.exists(stage.shard(0)):
        from curate.images import thumbnail
        from curate.report.pictures import jpeg

        file = storage.parquet_file(stage.shard(0))
        table = (
            file.read_row_group(0, columns=["key", "prompt", "prompt_source", "image"]) if file.num_row_groups else None
        )
        for row in table.slice(0, SAMPLES).to_pylist() if table is not None else []:
            name = f"sample-{safe_name(row['key'])}.jpg"
            src = pictures.reuse(name)
            if src is None and row["image"]:
                src = pictures.put(name, jpeg(thumbnail(row["image"], 192)))
            samples.append({**{k: row[k] for k in ("key", "prompt", "prompt_source")}, "src": src})
    return {"name": info.name, "loss": loss, "samples": samples, "links": info.links}


__all__ = ["encode_section", "validate_section"]

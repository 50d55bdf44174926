"""The validate stage's report: one Markdown page with the loss curve, the samples and every stage's numbers."""

from __future__ import annotations

import io
from typing import Any

from curate import storage
from curate.inspect import format_status, run_summary
from curate.stages.spec import WorkContext


def _figure_png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def loss_plot(losses: list[float]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axis = plt.subplots(figsize=(7, 3.2))
    steps = np.arange(1, len(losses) + 1)
    axis.plot(steps, losses, lw=0.6, alpha=0.45, label="loss per step")
    window = max(1, len(losses) // 20)
    if len(losses) >= window:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axis.plot(steps[window - 1 :], smooth, lw=1.8, label=f"mean of {window} steps")
    axis.set_xlabel("step")
    axis.set_ylabel("rectified-flow loss")
    axis.set_yscale("log")
    axis.legend()
    axis.grid(alpha=0.3)
    data = _figure_png(figure)
    plt.close(figure)
    return data


def sample_grid(prompts: list[str], images: list[Any], columns: int = 4) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(images) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, prompt, image in zip(axes.flat, prompts, images, strict=False):
        axis.imshow(image)
        axis.set_title(prompt[:48] + ("…" if len(prompt) > 48 else ""), fontsize=7)
    data = _figure_png(figure)
    plt.close(figure)
    return data


def _data_table(run_uri: str) -> list[str]:
    lines = ["| stage | kind | state | rows | ok | status |", "| --- | --- | --- | ---: | ---: | --- |"]
    for s in run_summary(run_uri):
        ok = f"{100 * s.get('ok_fraction', 0):.1f}%" if s["rows"] else "-"
        status = format_status(s["status"])
        lines.append(f"| {s['stage']} | {s.get('kind') or '-'} | {s['state']} | {s['rows']:,} | {ok} | {status} |")
    return lines


def write_report(context: WorkContext, config: Any, result: Any, prompts: list[str], images: list[Any]) -> str:
    """Write RUN/<stage>/report.md, loss.png and samples.png; returns the report's URI."""
    folder = storage.join(context.run_uri, context.stage_name)
    storage.write_atomic(storage.join(folder, "loss.png"), loss_plot(result.losses))
    if images:
        storage.write_atomic(storage.join(folder, "samples.png"), sample_grid(prompts, images))
    train = config.train
    losses = result.losses
    first, last = losses[: min(10, len(losses))], losses[-min(10, len(losses)) :]
    lines = [
        f"# Validation of run `{context.run_uri}`",
        "",
        "A small SD3-style MMDiT trained with rectified flow on this run's training shards, then sampled.",
        "",
        "## Data",
        "",
        *_data_table(context.run_uri),
        "",
        "## Training",
        "",
        f"- model: MMDiT depth {train.depth} (hidden {64 * train.depth}, {train.depth} heads, patch 2, QK RMSNorm)",
        f"- steps: {len(losses)} of batch {train.batch_size}, AdamW lr {train.learning_rate:g}, EMA {train.ema_decay}",
        f"- timesteps: {train.timestep_sampling} (m={train.logit_mean}, s={train.logit_std}), shift {train.shift}",
        f"- text encoder dropout {train.encoder_dropout:.1%} each; synthetic captions {train.synthetic_ratio:.0%}",
        f"- loss: mean of the first 10 steps {sum(first) / max(1, len(first)):.4f}, "
        f"of the last 10 steps {sum(last) / max(1, len(last)):.4f}",
        f"- speed: {result.steps_per_second:.2f} steps/s",
        "",
        "![loss curve](loss.png)",
        "",
        "## Samples",
        "",
    ]
    if images:
        lines += [
            f"Euler, {config.sample_steps} steps, shift {config.sample_shift}, guidance {config.guidance_scale}, "
            f"seed {config.seed}, negative prompt: {config.negative_prompt!r} (None: zero conditioning).",
            "",
            "![samples](samples.png)",
            "",
            *[f"{i + 1}. {prompt}" for i, prompt in enumerate(prompts)],
        ]
    else:
        lines.append("No prompts were configured (`shard_prompts: 0` and no `prompts`).")
    uri = storage.join(folder, "report.md")
    storage.write_atomic(uri, ("\n".join(lines) + "\n").encode())
    return uri

"""The filters section: each filter stage's own report (`<stage>/_report/filter_report.json`, written by
`curate.filter.report` in the stage's closing step) shown with images.

Reused as it is: the rows removed per rule, the histograms with the thresholds drawn (its PNG, copied), and
its example rows nearest each threshold (the configured one and the population's quantiles, from the stage's
first shards). The report only adds the thumbnails, read from the image stage's shards that hold those rows.
"""

from __future__ import annotations

from typing import Any

from curate import storage
from curate.report.pictures import ImageFolder
from curate.report.samples import image_stage
from curate.runfolder import RunDir


def filter_section(run: RunDir, name: str, pictures: ImageFolder) -> dict[str, Any]:
    stage = run.stage(name)
    folder = storage.join(stage.uri, "_report")
    uri = storage.join(folder, "filter_report.json")
    if not storage.exists(uri):
        return {"name": name, "ready": False}
    report = storage.read_json(uri)
    rows = max(1, int(report["rows"]))
    source = image_stage(run, name)
    wanted = [
        (int(r["shard"]), r["key"])
        for groups in report.get("examples", {}).values()
        for g in groups
        for r in g["rows"]
        if "shard" in r
    ]
    thumbs = pictures.thumbnails(run.stage(source), wanted) if source else {}
    measures = []
    for measure, info in report.get("measures", {}).items():
        configured = info.get("configured")
        groups = []
        for group in report.get("examples", {}).get(measure, []):
            threshold = float(group["threshold"])
            groups.append(
                {
                    "threshold": threshold,
                    "configured": configured is not None and abs(threshold - float(configured)) < 1e-6,
                    "rows": [
                        {
                            "key": r["key"],
                            "value": r["value"],
                            "side": "above" if r["value"] >= threshold else "below",
                            "verdict": r["removed_by"] or "kept",
                            "src": thumbs.get(r["key"]),
                        }
                        for r in group["rows"]
                    ],
                }
            )
        measures.append(
            {
                "name": measure,
                "rule": info["rule"],
                "kind": info["kind"],
                "configured": configured,
                "population": info["population"],
                "quantiles": info.get("quantiles", {}),
                "table": info.get("table", []),
                "groups": groups,
            }
        )
    return {
        "name": name,
        "ready": True,
        "rows": report["rows"],
        "kept": report["kept"],
        "fraction_kept": report["fraction_kept"],
        "removed": [(rule, n, n / rows) for rule, n in report.get("removed", {}).items()],
        "top_fraction": report.get("top_fraction"),
        "warnings": report.get("warnings", []),
        "histograms": pictures.copy(storage.join(folder, "filter_histograms.png"), f"{name}-filter_histograms.png"),
        "measures": measures,
        "image_stage": source,
    }


__all__ = ["filter_section"]

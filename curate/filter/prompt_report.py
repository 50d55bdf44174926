"""The prompt rule's part of the filter report: rows removed per prompt file and per caption column, the
prompts matched most often, and example matches, accumulated shard by shard (memory: one counter per distinct
prompt matched, and a bounded list of examples)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

COLUMNS = ["matched_prompt", "matched_prompt_file", "matched_prompt_line", "matched_column", "matched_words"]
RULES = ("prompt_exact", "prompt_ngram")
TOP_PROMPTS = 20


@dataclass
class PromptMatches:
    examples: int
    by_file: dict[str, Counter] = field(default_factory=dict)  # file -> rule -> rows
    by_column: Counter = field(default_factory=Counter)
    by_prompt: Counter = field(default_factory=Counter)  # (file, line) -> rows
    prompts: dict[tuple[str, int], str] = field(default_factory=dict)
    shown: list[dict[str, Any]] = field(default_factory=list)

    def add(self, table: pa.Table, shard: int) -> None:
        """A filter shard's rows (key, removed_by and COLUMNS)."""
        matched = table.filter(pc.is_in(table["removed_by"], pa.array(RULES)))
        for row in matched.to_pylist():
            file, line = row["matched_prompt_file"], row["matched_prompt_line"]
            self.by_file.setdefault(file, Counter())[row["removed_by"]] += 1
            self.by_column[row["matched_column"]] += 1
            self.by_prompt[(file, line)] += 1
            self.prompts.setdefault((file, line), row["matched_prompt"])
            if sum(1 for e in self.shown if e["file"] == file) < self.examples:
                self.shown.append(
                    {"key": row["key"], "shard": shard, "rule": row["removed_by"], "column": row["matched_column"],
                     "prompt": row["matched_prompt"], "file": file, "line": line, "words": row["matched_words"]}
                )  # fmt: skip

    def summary(self) -> dict[str, Any]:
        return {
            "files": {f: {"rows": sum(c.values()), **{r: c.get(r, 0) for r in RULES}} for f, c in self.by_file.items()},
            "columns": dict(self.by_column),
            "distinct_prompts": len(self.by_prompt),
            "top_prompts": [
                {"file": f, "line": line, "prompt": self.prompts[(f, line)], "rows": n}
                for (f, line), n in self.by_prompt.most_common(TOP_PROMPTS)
            ],
            "examples": self.shown,
        }


def check_one_index(digests: dict[int, str | None]) -> None:
    """Every shard (index -> digest of its prompts) was checked against the same prompts: files changed during a
    run would mix two sets."""
    shards: dict[str, list[int]] = {}
    for index, digest in sorted(digests.items()):
        if digest is not None:
            shards.setdefault(digest, []).append(index)
    if len(shards) > 1:
        sets = "; ".join(f"{d[:12]}: {len(s)} shards, e.g. {', '.join(map(str, s[:5]))}" for d, s in shards.items())
        raise ValueError(
            f"the prompt files changed during the run: shards were checked against {len(shards)} different sets of "
            f"prompts ({sets}); run the stage again on one set (curate run PIPELINE --redo NAME)"
        )


def markdown(summary: dict[str, Any]) -> list[str]:
    lines = ["", "## Prompt matches (`exclude_prompts`)", ""]
    if not summary["files"]:
        return [*lines, "No row matched a prompt."]
    lines += ["| prompt file | rows removed | exact | n-gram |", "|---|---:|---:|---:|"]
    for file, c in summary["files"].items():
        lines.append(f"| `{file}` | {c['rows']:,} | {c['prompt_exact']:,} | {c['prompt_ngram']:,} |")
    columns = ", ".join(f"`{c}` {n:,}" for c, n in summary["columns"].items())
    lines += ["", f"By caption column: {columns}. Distinct prompts matched: {summary['distinct_prompts']:,}.", ""]
    lines += ["Prompts matched most often:", "", "| rows | prompt | where |", "|---:|---|---|"]
    for p in summary["top_prompts"]:
        lines.append(f"| {p['rows']:,} | {_cell(p['prompt'])} | `{p['file'].rsplit('/', 1)[-1]}:{p['line']}` |")
    lines += ["", "Examples:", "", "| key | rule | column | shared words | prompt |", "|---|---|---|---|---|"]
    for e in summary["examples"]:
        lines.append(f"| `{e['key']}` | `{e['rule']}` | `{e['column']}` | {_cell(e['words'])} | {_cell(e['prompt'])} |")
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")

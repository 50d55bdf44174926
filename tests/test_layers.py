"""The package's import layers (pyproject's import-linter contracts) hold, and the check catches a planted break."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports over the `curate` package found at ``root`` (first on the path), with root's contracts."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT), str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def planted(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of the package with one import line added to ``module``."""
    root = tmp_path / "copy"
    shutil.copytree(REPO / "curate", root / "curate", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    target = root / module
    target.write_text(target.read_text() + f"\n{line}\n")
    return root


def test_contracts_hold():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_planted_cycle_fails(tmp_path):
    # the cycle this layout removed: the base config reaching up to the stage registry
    root = planted(tmp_path, "curate/config.py", "from curate.stages import STAGES  # noqa")
    result = lint(root)
    assert result.returncode != 0
    assert "curate.config is not allowed to import curate.stages" in result.stdout, result.stdout


def test_a_planted_cycle_inside_a_package_fails(tmp_path):
    # two modules of one capability importing each other, even lazily inside a function
    root = planted(tmp_path, "curate/shards/index.py", "def _late():\n    from curate.shards import cache  # noqa")
    result = lint(root)
    assert result.returncode != 0
    assert "No import cycles between sibling modules, at any depth BROKEN" in result.stdout, result.stdout


def test_capability_packages_do_not_import_each_other(tmp_path):
    root = planted(tmp_path, "curate/dedup/report.py", "from curate.filter import rules  # noqa")
    result = lint(root)
    assert result.returncode != 0
    assert "curate.dedup is not allowed to import curate.filter" in result.stdout, result.stdout


def test_architecture_table_names_every_module_and_package():
    """docs/architecture.md's module table lists exactly the package's top-level modules and packages."""
    import re

    text = (REPO / "docs" / "architecture.md").read_text()
    table = text[text.index("## Modules") :]
    table = table[: table.index("\n## ")]
    listed = set(re.findall(r"^\| `curate/([\w]+)(?:\.py|/)` \|", table, re.M))
    tree = {p.stem for p in (REPO / "curate").glob("*.py") if p.stem != "__init__"}
    tree |= {p.name for p in (REPO / "curate").iterdir() if (p / "__init__.py").is_file()}
    assert listed == tree, f"missing from the table: {sorted(tree - listed)}; not in the tree: {sorted(listed - tree)}"

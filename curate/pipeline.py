"""A pipeline file checked against the stage registry: each stage's own config class, the graph of stages
(inputs, joins, names), the models each stage needs and the stages' checks against the outside world.

It sits above `curate.stages` (it needs the registry); `curate.config` holds the base types every stage
uses and knows no stage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from curate import storage
from curate.config import (
    ConfigError,
    ModelSpec,
    Pipeline,
    PipelineFile,
    Source,
    StageConfig,
    format_path,
    load_yaml,
    pydantic_problems,
    resolve_models,
)
from curate.model_paths import package_file
from curate.stages import STAGES


def _local_model_exists(spec: ModelSpec) -> bool:
    if spec.path is not None and spec.path.startswith("package://"):  # a file inside an installed package
        try:
            package_file(spec.path)
        except FileNotFoundError:
            return False
        return True
    if spec.path is None or not storage.is_local(spec.path):
        return True  # hub ids and remote URLs are checked when loaded, on the machine that loads them
    return storage.exists(spec.path)


def parse_pipeline(text: str, name: str = "<pipeline>", base_dir: Path | None = None) -> Pipeline:
    """Validate a pipeline's text. Raises ConfigError listing every problem found."""
    pipeline_file = (base_dir or Path.cwd()) / Path(name).name
    data, source = load_yaml(text, name)
    if not isinstance(data, dict):
        raise ConfigError(name, [f"{name}: a pipeline is a mapping with name, output and stages"])
    try:
        top = PipelineFile(**data)
    except ValidationError as e:
        raise ConfigError(name, pydantic_problems(e, (), source, PipelineFile.model_fields)) from None

    problems: list[str] = []
    models, preset, model_problems = resolve_models(top.models, pipeline_file, source)
    problems += model_problems

    stages: list[StageConfig] = []
    for i, raw in enumerate(top.stages):
        path: tuple[Any, ...] = ("stages", i)
        kind = raw.get("kind")
        if kind not in STAGES:
            known = ", ".join(sorted(STAGES))
            where = (*path, "kind") if "kind" in raw else path
            problems.append(
                f"{source.where(where)}: {format_path(where)}: unknown stage kind {kind!r} (known: {known})"
            )
            continue
        config_class = STAGES[kind].config
        try:
            stages.append(config_class(**raw))
        except ValidationError as e:
            problems += pydantic_problems(e, path, source, config_class.model_fields)

    if not problems:
        problems += _check_graph(stages, models, source)
    if problems:
        raise ConfigError(name, problems)
    return Pipeline(top.name, name, top.output, top.ray, models, preset, tuple(stages), top.lease, top.storage)


def _check_graph(stages: list[StageConfig], models: dict[str, ModelSpec], source: Source) -> list[str]:
    problems = []
    seen: list[str] = []
    reported: set[str] = set()  # a missing model file is named once, however many stages use it
    for i, stage in enumerate(stages):
        path = ("stages", i)
        name = stage.stage_name
        if name in seen:
            problems.append(
                f"{source.where(path)}: {format_path(path)}: stage name {name!r} is used twice; give one a `name`"
            )
        if stage.is_source and stage.input is not None:
            problems.append(
                f"{source.where((*path, 'input'))}: {format_path((*path, 'input'))}: "
                f"a {stage.kind} stage is a source and reads no earlier stage"
            )
        if not stage.is_source:
            if stage.input is not None and stage.input not in seen:
                problems.append(
                    f"{source.where((*path, 'input'))}: {format_path((*path, 'input'))}: "
                    f"no earlier stage named {stage.input!r} (earlier: {', '.join(seen) or 'none'})"
                )
            elif stage.input is None and not seen:
                problems.append(
                    f"{source.where(path)}: {format_path(path)}: a {stage.kind} stage needs an earlier stage to read"
                )
        if stage.is_source and stage.join:
            where = (*path, "join")
            problems.append(f"{source.where(where)}: {format_path(where)}: a source stage joins no other stage")
        for j, joined in enumerate(() if stage.is_source else stage.join):
            if joined not in seen:
                where = (*path, "join", j)
                problems.append(
                    f"{source.where(where)}: {format_path(where)}: no earlier stage named {joined!r} to join "
                    f"(earlier: {', '.join(seen) or 'none'})"
                )
        roles = stage.model_roles + tuple(r for r in stage.optional_model_roles if r in models)
        for role in roles:
            if role not in models:
                problems.append(
                    f"{source.where(path)}: {format_path(path)}: stage {name!r} needs model {role!r}, "
                    f"which the pipeline's models do not define (defined: {', '.join(sorted(models)) or 'none'})"
                )
            elif role not in reported and not _local_model_exists(models[role]):
                reported.add(role)
                problems.append(
                    f"{source.where(('models', role))}: models.{role}.path: no such file or folder: {models[role].path}"
                )
            elif models[role].architecture is not None and role not in stage.architecture_roles:
                problems.append(
                    f"{source.where(('models', role))}: models.{role}.architecture: stage {name!r} "
                    f"({stage.kind}) loads {role} from its own files and takes no architecture"
                )
        if all(role in models and _local_model_exists(models[role]) for role in roles):
            for field_path, message in stage.check_models(models):
                full = path + tuple(field_path)
                problems.append(f"{source.where(full)}: {format_path(full)}: {message}")
        for field_path, message in stage.check_inputs():
            full = path + tuple(field_path)
            problems.append(f"{source.where(full)}: {format_path(full)}: {message}")
        seen.append(name)
    return problems


def load_pipeline(path: str | os.PathLike[str]) -> Pipeline:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), [f"{path}: no such pipeline file"])
    return parse_pipeline(path.read_text(), str(path), base_dir=path.parent.resolve())

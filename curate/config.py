"""The config types every stage shares, and YAML read with line numbers so errors name file, line and field.

A pipeline names a run folder, Ray settings, a model set (a preset from configs/models/ plus
per-role overrides) and an ordered list of stages. Each stage kind brings its own pydantic model
(see curate/stages/); unknown keys are errors everywhere. This module knows no stage kind:
`curate.pipeline` checks a file against the stage registry.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from curate import storage
from curate.lease import DEFAULT_RENEW_SECONDS, DEFAULT_TTL_SECONDS


class ConfigError(Exception):
    """A pipeline that cannot run; the message lists every problem as `file:line: field: problem`."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid pipeline\n" + "\n".join(f"  {p}" for p in problems))


def _as_tuple(value: Any) -> Any:
    return (value,) if isinstance(value, str) else value


def _absolute(value: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(storage.absolute(v) for v in value)


# one location or a list of them (files, globs, brace lists; local, s3://, ...), kept as absolute URIs so a run
# resumed from another working directory reads the same inputs
Uris = Annotated[tuple[str, ...], BeforeValidator(_as_tuple), AfterValidator(_absolute)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# resource names Ray sets itself (a `custom` request may not use them)
RAY_OWN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory", "bundle")


class Resources(Strict):
    """Ray resources of one stage; what a worker (task or actor) reserves and how many run at once."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    concurrency: PositiveInt | None = None  # at most this many workers; None: as many as fit
    batch_size: PositiveInt | None = None  # rows per model call, for model stages
    memory: PositiveInt | None = None  # bytes of heap reserved per worker
    # a node's accelerator (Ray's `accelerator_type`: A100, H100, TPU-V5E, ...), and custom resources a node
    # declares (`ray start --resources`); both are requests Ray matches against a node's resources
    accelerator_type: str | None = Field(None, min_length=1)
    custom: dict[str, PositiveFloat] | None = None

    @field_validator("custom")
    @classmethod
    def _custom_names(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        reserved = [n for n in value or () if n in RAY_OWN_RESOURCES or n.startswith(("accelerator_type:", "node:"))]
        if reserved:
            raise ValueError(
                f"{', '.join(reserved)}: set by Ray itself; use num_cpus, num_gpus, memory or accelerator_type"
            )
        return value


class ModelSpec(Strict):
    """A model by Hugging Face id (with optional revision/subfolder) or by local path / URL."""

    id: str | None = None
    path: str | None = None
    revision: str | None = None
    subfolder: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    # The architecture the weights go into, for model families whose files may not name it: an open_clip
    # model name (ViT-L-14-quickgelu) or model-config JSON file. Only roles listed in a stage's
    # `architecture_roles` accept it.
    architecture: str | None = None

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        """Local paths are made absolute here: Ray workers do not share the command's working directory."""
        return None if value is None else storage.absolute(value)

    @field_validator("architecture")
    @classmethod
    def _absolute_config_file(cls, value: str | None) -> str | None:
        return storage.absolute(value) if value is not None and value.endswith(".json") else value

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.id is None) == (self.path is None):
            raise ValueError("give exactly one of `id` (a hub id) or `path` (a local folder, file or URL)")
        return self

    def describe(self) -> str:
        where = self.id if self.id is not None else self.path
        bits = [str(where)]
        if self.subfolder:
            bits.append(f"subfolder={self.subfolder}")
        if self.revision:
            bits.append(f"revision={self.revision}")
        if self.dtype:
            bits.append(self.dtype)
        if self.architecture:
            bits.append(f"architecture={self.architecture}")
        return " ".join(bits)


class RayConfig(Strict):
    address: str | None = None  # existing cluster; --address and RAY_ADDRESS take precedence
    num_cpus: PositiveInt | None = None  # only for the embedded local Ray
    num_gpus: int | None = Field(None, ge=0)
    object_store_memory: PositiveInt | None = None
    # A stage that finishes no shard for this long while Ray holds demands of its shape that no node can
    # meet is stopped with a message (curate.watchdog), instead of waiting forever.
    stall_timeout_s: PositiveFloat = 600.0
    # With an autoscaler that could add a node for such a demand: keep waiting for it (true) or stop (false).
    wait_for_autoscaler: bool = False
    # Times a shard is run again after its worker or node died while running it (Ray restarts the worker);
    # then it is reported as that shard's failure (curate.attempts). Errors raised by the stage are not
    # retried: they are reported at once.
    shard_retries: NonNegativeInt = 3


class LeaseConfig(Strict):
    """The run folder's lease (curate.lease): how long a run's hold lasts without renewal, and how often the
    running driver renews it. A crashed run blocks the folder for at most `ttl_seconds`."""

    ttl_seconds: float = Field(DEFAULT_TTL_SECONDS, gt=0)
    renew_seconds: float = Field(DEFAULT_RENEW_SECONDS, gt=0)

    @field_validator("renew_seconds")
    @classmethod
    def _renewed_within_ttl(cls, renew: float, info: ValidationInfo) -> float:
        ttl = info.data.get("ttl_seconds")
        if ttl is not None and renew * 2 > ttl:
            raise ValueError(
                f"must be at most half of ttl_seconds ({ttl:g}), so that one late renewal does not let another run "
                "take the folder over"
            )
        return renew


_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class StorageConfig(Strict):
    """Where s3:// URIs lead (an S3-compatible store: MinIO, Ceph, R2) and which of the driver's environment
    variables every Ray worker gets (credentials), so workers on every node reach the same store
    (docs/operations.md#object-stores). Secrets stay in the environment, never in the pipeline file."""

    endpoint_url: str | None = Field(None, pattern=r"^https?://[^/\s]+/?$")  # e.g. http://minio.internal:9000
    region: str | None = None
    env: tuple[Annotated[str, Field(pattern=_ENV_NAME)], ...] = ()  # e.g. [AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY]

    @field_validator("env")
    @classmethod
    def _set_here(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        missing = [n for n in names if n not in os.environ]
        if missing:
            raise ValueError(f"not set in this environment: {', '.join(missing)}")
        return names

    def environment(self) -> dict[str, str]:
        """The variables to set on the driver and hand to every worker."""
        out = {name: os.environ[name] for name in self.env if name in os.environ}
        if self.endpoint_url:
            out["AWS_ENDPOINT_URL"] = self.endpoint_url.rstrip("/")
        if self.region:
            out["AWS_REGION"] = out["AWS_DEFAULT_REGION"] = self.region
        return out


class StageConfig(Strict):
    """Fields every stage has. A stage kind subclasses this with `kind: Literal[...]`."""

    kind: str
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]+$")
    resources: Resources = Resources()

    # Set by subclasses: model roles the stage loads, and whether it reads an upstream stage.
    model_roles: ClassVar[tuple[str, ...]] = ()
    # Roles used when the pipeline defines them (T5 in SD3 is optional): checked like the others if present.
    optional_model_roles: ClassVar[tuple[str, ...]] = ()
    # Roles whose model spec may carry an `architecture` (open_clip models); elsewhere it is an error.
    architecture_roles: ClassVar[tuple[str, ...]] = ()
    is_source: ClassVar[bool] = False
    input: str | None = None  # upstream stage name; default: the stage before this one
    # Earlier stages whose shard i is read beside upstream shard i and joined on `key` (shards keep 1:1
    # lineage), e.g. an encode stage reading images from `ingest`, keep flags from `dedup` and
    # synthetic captions from `caption`.
    join: tuple[str, ...] = ()

    @property
    def stage_name(self) -> str:
        return self.name or self.kind

    def fingerprint(self) -> str:
        """What decides a stage's output; resource settings are excluded so they can change on resume."""
        data = self.model_dump(exclude={"resources", "name"}, mode="json")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def check_inputs(self) -> list[tuple[tuple[Any, ...], str]]:
        """Problems with the world outside the config (missing input folders, ...): (field path, message)."""
        return []

    def check_models(self, models: dict[str, ModelSpec]) -> list[tuple[tuple[Any, ...], str]]:
        """Problems between the stage's settings and the models it loads (formats, embedding widths): (field
        path, message). Called only when every role the stage uses is defined and its local files exist."""
        return []


@dataclass(frozen=True)
class Pipeline:
    name: str
    source: str  # the file it came from
    output: str
    ray: RayConfig
    models: dict[str, ModelSpec]
    model_preset: str | None
    stages: tuple[StageConfig, ...]
    lease: LeaseConfig = field(default_factory=LeaseConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def stage(self, name: str) -> StageConfig:
        for stage in self.stages:
            if stage.stage_name == name:
                return stage
        raise KeyError(name)

    def dependencies(self, stage: StageConfig) -> list[StageConfig]:
        """Every stage this one reads: its upstream, then the joined stages."""
        upstream = self.upstream(stage)
        return ([upstream] if upstream else []) + [self.stage(name) for name in stage.join]

    def upstream(self, stage: StageConfig) -> StageConfig | None:
        if stage.is_source:
            return None
        if stage.input is not None:
            return self.stage(stage.input)
        index = self.stages.index(stage)
        return self.stages[index - 1] if index > 0 else None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "output": self.output,
            "ray": self.ray.model_dump(exclude_none=True),
            "models": {role: spec.model_dump(exclude_none=True) for role, spec in self.models.items()},
            "stages": [s.model_dump(exclude_none=True, mode="json") for s in self.stages],
        }
        for name in ("lease", "storage"):  # only where the file set them
            if values := getattr(self, name).model_dump(exclude_defaults=True, mode="json"):
                out[name] = values
        return out

    def to_yaml(self) -> str:
        header = f"# resolved from {self.source}" + (
            f" with model preset {self.model_preset}" if self.model_preset else ""
        )
        return header + "\n" + yaml.safe_dump(self.to_dict(), sort_keys=False)


class PipelineFile(Strict):
    name: str
    output: str
    ray: RayConfig = RayConfig()
    lease: LeaseConfig = LeaseConfig()
    storage: StorageConfig = StorageConfig()
    models: str | dict[str, Any] | None = None
    stages: list[dict[str, Any]] = Field(min_length=1)


# ----------------------------------------------------------------------------------------------------
# YAML with line numbers


def _line_index(node: yaml.Node, path: tuple[Any, ...] = ()) -> Iterable[tuple[tuple[Any, ...], int]]:
    yield path, node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield (*path, key.value), key.start_mark.line + 1
            yield from _line_index(value, (*path, key.value))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _line_index(item, (*path, i))


@dataclass
class Source:
    name: str
    lines: dict[tuple[Any, ...], int]

    def where(self, path: tuple[Any, ...]) -> str:
        while path and path not in self.lines:
            path = path[:-1]
        line = self.lines.get(path)
        return f"{self.name}:{line}" if line else self.name


def load_yaml(text: str, name: str) -> tuple[Any, Source]:
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark else name
        raise ConfigError(name, [f"{where}: not valid YAML: {getattr(e, 'problem', e)}"]) from None
    lines = dict(_line_index(node)) if node is not None else {}
    return data, Source(name, lines)


def format_path(path: Iterable[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _describe_error(error: dict[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required field is missing"
    got = error.get("input")
    shown = repr(got) if not isinstance(got, dict | list) else type(got).__name__
    return f"{error['msg']} (got {shown})"


def pydantic_problems(
    error: ValidationError, prefix: tuple[Any, ...], source: Source, allowed: Iterable[str] = ()
) -> list[str]:
    problems = []
    for e in error.errors():
        path = prefix + tuple(p for p in e["loc"] if p != "__root__")
        message = _describe_error(e)
        if e["type"] == "extra_forbidden" and allowed:
            message += f" (allowed: {', '.join(sorted(allowed))})"
        problems.append(f"{source.where(path)}: {format_path(path)}: {message}")
    return problems


# ----------------------------------------------------------------------------------------------------
# model presets


def preset_search_path(pipeline_file: Path) -> list[Path]:
    """configs/models/ folders to look in: $CURATE_CONFIGS, then next to the pipeline file and its parents."""
    folders = []
    if os.environ.get("CURATE_CONFIGS"):
        folders.append(Path(os.environ["CURATE_CONFIGS"]) / "models")
    for parent in [pipeline_file.parent, *pipeline_file.parent.parents]:
        candidate = parent / "configs" / "models"
        if candidate.is_dir():
            folders.append(candidate)
    return folders


def available_presets(pipeline_file: Path) -> list[str]:
    names = set()
    for folder in preset_search_path(pipeline_file):
        names.update(p.stem for p in folder.glob("*.yaml"))
    return sorted(names)


def _find_preset(ref: str, pipeline_file: Path) -> Path | None:
    as_path = (pipeline_file.parent / ref) if not os.path.isabs(ref) else Path(ref)
    if ref.endswith((".yaml", ".yml")) and as_path.is_file():
        return as_path
    for folder in preset_search_path(pipeline_file):
        if (folder / f"{ref}.yaml").is_file():
            return folder / f"{ref}.yaml"
    return None


def resolve_models(raw: Any, pipeline_file: Path, source: Source) -> tuple[dict[str, ModelSpec], str | None, list[str]]:
    """Preset (by name or path) merged with per-role overrides; an override replaces the whole role."""
    problems: list[str] = []
    if raw is None:
        return {}, None, problems
    preset_ref = raw if isinstance(raw, str) else raw.get("preset")
    overrides = {} if isinstance(raw, str) else {k: v for k, v in raw.items() if k != "preset"}
    entries: dict[str, tuple[Any, Source, tuple[Any, ...]]] = {}
    if preset_ref is not None:
        preset_path = _find_preset(str(preset_ref), pipeline_file)
        field = ("models",) if isinstance(raw, str) else ("models", "preset")
        if preset_path is None:
            known = ", ".join(available_presets(pipeline_file)) or "none found"
            problems.append(
                f"{source.where(field)}: {format_path(field)}: no model preset {preset_ref!r} "
                f"(looked for configs/models/{preset_ref}.yaml; available: {known})"
            )
        else:
            preset_data, preset_source = load_yaml(preset_path.read_text(), str(preset_path))
            if not isinstance(preset_data, dict):
                problems.append(f"{preset_path}: a model preset is a mapping of role -> model")
            else:
                for role, spec in preset_data.items():
                    entries[role] = (spec, preset_source, (role,))
    for role, spec in overrides.items():
        entries[role] = (spec, source, ("models", role))
    models = {}
    for role, (spec, where, path) in entries.items():
        if not isinstance(spec, dict):
            problems.append(f"{where.where(path)}: {format_path(path)}: expected a mapping with `id` or `path`")
            continue
        try:
            models[role] = ModelSpec(**spec)
        except ValidationError as e:
            problems += pydantic_problems(e, path, where, ModelSpec.model_fields)
    return models, (str(preset_ref) if preset_ref is not None else None), problems

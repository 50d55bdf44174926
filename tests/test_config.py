"""A bad pipeline fails before any work, naming the file, the line, the field and what was expected."""

from __future__ import annotations

import textwrap
from typing import ClassVar, Literal

import pytest
from conftest import REPO, curate_cli

from curate.cli import main
from curate.config import ConfigError, StageConfig
from curate.pipeline import load_pipeline
from curate.serve import write_url_list
from curate.stages import STAGES, StageSpec


@pytest.fixture(autouse=True)
def _presets(monkeypatch):
    monkeypatch.setenv("CURATE_CONFIGS", str(REPO / "configs"))


def write(tmp_path, text: str):
    path = tmp_path / "pipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems(tmp_path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_pipeline(write(tmp_path, text))
    return info.value.problems


GOOD = """\
name: t
output: {out}
stages:
  - kind: local
    path: {images}
    shard_size: 4
"""


def test_good_pipeline_parses_with_defaults(tmp_path, sample_images):
    pipeline = load_pipeline(write(tmp_path, GOOD.format(out=tmp_path / "run", images=sample_images)))
    (stage,) = pipeline.stages
    assert stage.stage_name == "local"
    assert stage.shard_size == 4
    assert stage.captions == "txt"
    assert stage.resources.num_cpus == 1.0


def test_unknown_key_names_file_line_and_field(tmp_path, sample_images):
    text = GOOD.format(out=tmp_path / "run", images=sample_images) + "    colour: blue\n"
    (problem,) = problems(tmp_path, text)
    assert problem.startswith(f"{tmp_path / 'pipe.yaml'}:7: stages[0].colour: unknown key")
    assert "shard_size" in problem  # the allowed keys are listed


def test_unknown_top_level_key(tmp_path, sample_images):
    text = GOOD.format(out=tmp_path / "run", images=sample_images) + "extra_thing: 1\n"
    (problem,) = problems(tmp_path, text)
    assert ":7: extra_thing: unknown key" in problem


def test_wrong_type_says_what_was_expected(tmp_path, sample_images):
    text = GOOD.format(out=tmp_path / "run", images=sample_images).replace("shard_size: 4", "shard_size: many")
    (problem,) = problems(tmp_path, text)
    assert ":6: stages[0].shard_size:" in problem
    assert "valid integer" in problem and "'many'" in problem


def test_nested_resource_error(tmp_path, sample_images):
    text = GOOD.format(out=tmp_path / "run", images=sample_images) + "    resources: {num_gpus: -1}\n"
    (problem,) = problems(tmp_path, text)
    assert "stages[0].resources.num_gpus:" in problem and "greater than or equal to 0" in problem


def test_missing_required_fields(tmp_path):
    found = problems(tmp_path, "name: t\n")
    assert any("output: required field is missing" in p for p in found)
    assert any("stages: required field is missing" in p for p in found)


def test_unknown_stage_kind_lists_known_kinds(tmp_path):
    (problem,) = problems(tmp_path, "name: t\noutput: o\nstages:\n  - kind: teleport\n")
    assert ":4: stages[0].kind: unknown stage kind 'teleport'" in problem
    assert "local" in problem


def test_missing_input_folder(tmp_path):
    (problem,) = problems(tmp_path, f"name: t\noutput: o\nstages:\n  - kind: local\n    path: {tmp_path}/nope\n")
    assert ":5: stages[0].path: no such folder" in problem


def test_duplicate_stage_names_and_bad_input_reference(tmp_path, sample_images):
    text = f"""\
    name: t
    output: o
    stages:
      - kind: local
        path: {sample_images}
      - kind: local
        path: {sample_images}
    """
    (problem,) = problems(tmp_path, text)
    assert "stages[1]: stage name 'local' is used twice" in problem


def test_yaml_syntax_error_has_a_line(tmp_path):
    (problem,) = problems(tmp_path, "name: t\noutput: [unclosed\nstages: []\n")
    assert "pipe.yaml:3: not valid YAML" in problem


def test_missing_model_preset_lists_available_ones(tmp_path, sample_images):
    text = GOOD.format(out=tmp_path / "run", images=sample_images) + "models: sd4-ultra\n"
    (problem,) = problems(tmp_path, text)
    assert ":7: models: no model preset 'sd4-ultra'" in problem
    assert "sd3-medium" in problem


def test_model_spec_needs_exactly_one_source(tmp_path, sample_images):
    text = GOOD.format(out=tmp_path / "run", images=sample_images) + "models:\n  vae: {id: a/b, path: /x}\n"
    (problem,) = problems(tmp_path, text)
    assert "models.vae: Value error, give exactly one of `id`" in problem


def test_preset_with_override_replaces_the_role(tmp_path, sample_images):
    text = GOOD.format(out=tmp_path / "run", images=sample_images)
    text += f"models:\n  preset: sd3-medium\n  vae: {{path: {tmp_path}}}\n"
    pipeline = load_pipeline(write(tmp_path, text))
    assert pipeline.model_preset == "sd3-medium"
    assert pipeline.models["vae"].path == str(tmp_path) and pipeline.models["vae"].subfolder is None
    assert pipeline.models["clip_g"].subfolder == "text_encoder_2"
    assert "sd3-medium" in pipeline.to_yaml()


class _NeedsVae(StageConfig):
    """A stage kind that declares a model role, to test the missing-model checks of the config layer."""

    kind: Literal["needs_vae"]
    model_roles: ClassVar[tuple[str, ...]] = ("vae",)


@pytest.fixture
def needs_vae_kind(monkeypatch):
    spec = StageSpec("needs_vae", _NeedsVae, "test", STAGES["local"].schema, plan=None, process=None)  # type: ignore[arg-type]
    monkeypatch.setitem(STAGES, "needs_vae", spec)


def test_stage_model_role_missing_from_models(tmp_path, sample_images, needs_vae_kind):
    text = (
        GOOD.format(out=tmp_path / "run", images=sample_images) + "  - kind: needs_vae\nmodels:\n  clip_l: {id: a/b}\n"
    )
    (problem,) = problems(tmp_path, text)
    assert "stages[1]: stage 'needs_vae' needs model 'vae'" in problem and "defined: clip_l" in problem


def test_stage_model_local_path_missing(tmp_path, sample_images, needs_vae_kind):
    text = GOOD.format(out=tmp_path / "run", images=sample_images)
    text += f"  - kind: needs_vae\nmodels:\n  vae: {{path: {tmp_path}/no-such-vae}}\n"
    (problem,) = problems(tmp_path, text)
    assert ":9: models.vae.path: no such file or folder" in problem


def test_hub_ids_are_not_checked_offline(tmp_path, sample_images, needs_vae_kind):
    text = GOOD.format(out=tmp_path / "run", images=sample_images) + "  - kind: needs_vae\nmodels: sd3-medium\n"
    pipeline = load_pipeline(write(tmp_path, text))
    assert pipeline.models["vae"].id == "stabilityai/stable-diffusion-3-medium-diffusers"


def test_cli_bad_config_exits_2_before_any_work(tmp_path, sample_images):
    out = tmp_path / "run"
    path = write(tmp_path, GOOD.format(out=out, images=sample_images).replace("shard_size: 4", "shard_size: 0"))
    result = curate_cli("run", str(path))
    assert result.returncode == 2, result.stderr
    assert "stages[0].shard_size: Input should be greater than 0" in result.stderr
    assert not out.exists()


def test_shipped_pipelines_check_without_work(tmp_path, sample_images, tiny_models, monkeypatch, capsys):
    """`curate check` validates every shipped pipeline and prints its plan, touching nothing. In this process
    (the command's own `main`): a subprocess per pipeline spent ~8 s each importing torch and open_clip again."""
    (tmp_path / "demo-data").mkdir()
    (tmp_path / "demo-data" / "images").symlink_to(sample_images)
    (tmp_path / "demo-data" / "models").symlink_to(tiny_models)
    write_url_list(sample_images, "http://127.0.0.1:8000", tmp_path / "demo-data" / "urls.parquet")  # curate serve's
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for path in sorted((REPO / "pipelines").glob("*.yaml")):
        code = main(["check", str(path)])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert f"pipeline {path.stem}" in out and ": valid" in out
        assert "resources:" in out and "output:" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-data"]  # no run folder was made


def test_missing_demo_models_are_named_once_each(tmp_path, sample_images):
    (tmp_path / "demo-data").mkdir()
    (tmp_path / "demo-data" / "images").symlink_to(sample_images)
    result = curate_cli("check", str(REPO / "pipelines" / "demo.yaml"), cwd=tmp_path)
    assert result.returncode == 2
    problems = [line for line in result.stderr.splitlines() if "no such file or folder" in line]
    assert sorted(p.split(": ")[1] for p in problems) == [
        "models.aesthetic_head.path",
        "models.captioner.path",
        "models.clip_g.path",
        "models.clip_l.path",
        "models.clip_scorer.path",
        "models.nsfw_head.path",
        "models.t5.path",
        "models.vae.path",
        "models.watermark_head.path",
    ]


def test_caption_table_columns_are_checked(tmp_path, sample_images):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"file": ["a.jpg"], "text": ["x"]}), tmp_path / "captions.parquet")
    text = GOOD.format(out=tmp_path / "run", images=sample_images)
    text += f"    captions: {{table: {tmp_path / 'captions.parquet'}, caption_column: caption}}\n"
    (problem,) = problems(tmp_path, text)
    assert "stages[0].captions.caption_column: no column 'caption'" in problem and "columns: file, text" in problem


def test_join_must_name_an_earlier_stage(tmp_path, sample_images, needs_vae_kind):
    text = GOOD.format(out=tmp_path / "run", images=sample_images)
    text += "  - {kind: needs_vae, join: [local, later]}\nmodels: {vae: {id: a/b}}\n"
    (problem,) = problems(tmp_path, text)
    assert "stages[1].join[1]: no earlier stage named 'later' to join (earlier: local)" in problem
    source_join = GOOD.format(out=tmp_path / "run", images=sample_images) + "    join: [local]\n"
    (problem,) = problems(tmp_path, source_join)
    assert "stages[0].join: a source stage joins no other stage" in problem


def test_remote_inputs_are_not_contacted_by_check(tmp_path):
    """`curate check` runs where the cluster's storage may be unreachable; remote inputs are checked at plan time."""
    pipeline = load_pipeline(
        write(tmp_path, "name: t\noutput: s3://bucket/run\nstages:\n  - {kind: local, path: s3://bucket/images}\n")
    )
    assert pipeline.stages[0].path == "s3://bucket/images"


def test_validate_prompts_need_the_clip_encoders(tmp_path, sample_images):
    text = GOOD.format(out=tmp_path / "run", images=sample_images)
    text += "  - kind: validate\n    prompts: [a cat]\nmodels:\n  vae: {id: a/vae}\n  clip_l: {id: a/clip}\n"
    (problem,) = problems(tmp_path, text)
    assert "stages[1].prompts: encoding prompts needs the models clip_g, not defined" in problem
    without_prompts = GOOD.format(out=tmp_path / "run", images=sample_images)
    without_prompts += "  - kind: validate\nmodels:\n  vae: {id: a/vae}\n"
    assert load_pipeline(write(tmp_path, without_prompts)).stages[1].kind == "validate"

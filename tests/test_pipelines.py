"""Pipeline files: every committed one validates, a bad one is refused whole, demo.yaml runs."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from conftest import REPO

from meddx.cli import main
from meddx.errors import ConfigError
from meddx.pipelines import DEMO_YAML, Pipeline, read_pipeline

PIPELINES = sorted((REPO / "pipelines").glob("*.yaml"))
SCHEMA = json.loads((REPO / "schemas" / "pipeline.schema.json").read_text())


def test_the_four_pipelines_are_there() -> None:
    assert {p.name for p in PIPELINES} == {"demo.yaml", "batch_diagnosis.yaml", "finetune.yaml", "pretrain.yaml"}


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_every_pipeline_file_validates(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    jsonschema.validate(data, SCHEMA)
    resolved = read_pipeline(path, out="runs/somewhere", check_inputs=False)
    assert resolved.steps
    assert not resolved.problems(check_inputs=False)
    assert all("{" not in str(v) for step in resolved.steps for _, v in step)  # every placeholder filled


def test_demo_yaml_is_what_meddx_demo_runs() -> None:
    committed = Pipeline.model_validate(yaml.safe_load((REPO / "pipelines" / "demo.yaml").read_text()))
    assert committed == Pipeline.model_validate(yaml.safe_load(DEMO_YAML))


def test_a_bad_pipeline_is_refused_before_any_work_with_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 2\nname: bad\nout: x\nsteps:\n"
        "  - step: finetune\n    manifest: m.csv\n    out: '{out}/model'\n    mode: fast\n"
        "  - step: evaluate\n    predictions: p.parquet\n    manifest: m.csv\n    out: e\n    extra: 1\n"
        "  - step: transmogrify\n"
    )
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", str(bad), "--out", str(out)])
    assert result.exit_code == 2, result.output
    for says in (
        "4 problems",
        "version: Input should be 1",
        "steps.0.finetune.mode",
        "steps.1.evaluate.extra",
        "steps.2: Input tag 'transmogrify'",
    ):
        assert says in result.output
    assert not out.exists()

    missing = tmp_path / "missing.yaml"
    missing.write_text(
        "version: 1\nname: m\nout: x\nsteps:\n"
        f"  - step: diagnose\n    manifest: {tmp_path / 'none.csv'}\n    model: '{{out}}/model'\n    out: '{{outt}}'\n"
        "  - step: evaluate\n    predictions: '{out}/d/predictions.parquet'\n    manifest: m.csv\n    out: '{out}/e'\n"
    )
    with pytest.raises(ConfigError) as caught:
        read_pipeline(missing, out=out)
    message = str(caught.value)
    assert "5 problems" in message
    assert "unknown placeholder(s) {outt}" in message
    assert "steps.0.manifest" in message
    assert "steps.0.model" in message
    assert "steps.1.predictions" in message
    assert not out.exists()


@pytest.mark.slow
def test_demo_yaml_runs(tmp_path: Path, sample_cache: Path) -> None:
    """demo.yaml as committed but smaller: 60 patients, as sample_data, and 2 epochs (the full demo takes minutes;
    tests/test_cli.py runs `meddx demo --patients 60` with the demo's own training settings)."""
    data = yaml.safe_load((REPO / "pipelines" / "demo.yaml").read_text())
    assert [s["step"] for s in data["steps"]] == ["sample-data", "finetune", "diagnose", "evaluate"]
    data["steps"][0]["patients"] = 60
    data["steps"][1]["epochs"] = 2
    smaller = tmp_path / "demo.yaml"
    smaller.write_text(yaml.safe_dump(data))
    out = tmp_path / "demo"
    args = ["run", str(smaller), "--out", str(out), "--cache", str(sample_cache), "--workers", "2", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "[4/4] evaluate" in result.output
    assert "pipeline demo done" in result.output
    predictions = pd.read_parquet(out / "diagnose" / "predictions.parquet")
    assert len(predictions) == 12
    assert (predictions.status == "ok").all()
    assert (out / "evaluation" / "report.html").is_file()
    assert (out / "model" / "calibration.json").is_file()
    # The evaluation says what it rests on: the model diagnose used, and that 12 rows are too few.
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert metrics["model"]["name"] == "model"
    assert metrics["model"]["path"] == str(out / "model")
    assert metrics["model"]["training_rows"]["train"] > 0
    disease = metrics["tasks"]["disease"]
    assert sum(disease["class_counts"].values()) == 12
    assert disease["warnings"][0].startswith("Too few rows")


def test_finetune_defaults_are_the_library_defaults() -> None:
    """The CLI and the pipeline step repeat meddx.training's batch size (they must not import torch to show it)."""
    from meddx.pipelines import FinetuneStep
    from meddx.training import DEFAULT_BATCH_SIZE

    finetune_command = main.commands["finetune"]
    cli_default = next(p.default for p in finetune_command.params if p.name == "batch_size")
    assert cli_default == FinetuneStep.model_fields["batch_size"].default == DEFAULT_BATCH_SIZE


def test_steps_offer_the_library_choices_with_its_defaults() -> None:
    import inspect
    from typing import get_args

    from meddx.batch import diagnose
    from meddx.models.diagnosis import HEAD_INPUTS
    from meddx.pipelines import DiagnoseStep, FinetuneStep
    from meddx.training import SCHEDULES, finetune

    fields = FinetuneStep.model_fields
    assert set(get_args(fields["schedule"].annotation)) == set(SCHEDULES)
    assert set(get_args(fields["head_input"].annotation)) == set(HEAD_INPUTS)
    library = inspect.signature(finetune).parameters
    for name in ("schedule", "head_input", "head_dropout", "device", "resume", "patience", "alpha", "calibration"):
        assert fields[name].default == library[name].default, name
    library = inspect.signature(diagnose).parameters
    for name in ("engine", "device", "batch_size", "chunk_size", "contributions", "store_sr", "store_fhir"):
        assert DiagnoseStep.model_fields[name].default == library[name].default, name


def test_engine_and_training_choices_reach_the_library(tmp_path: Path, monkeypatch) -> None:
    import meddx.batch.run
    import meddx.training
    from meddx.batch import RayOptions
    from meddx.pipelines import run_pipeline

    calls: dict[str, dict] = {}

    class Ran:
        training_info = {"mode": "full", "rows": {"train": 1, "val": 1}, "fit_seconds": 0.0}
        counts = {"diagnosed_rows": 1, "rows": 1}
        predictions = "p"

    def record(name):
        return lambda *args, **kwargs: calls.setdefault(name, kwargs) and Ran()

    monkeypatch.setattr(meddx.training, "finetune", record("finetune"))
    monkeypatch.setattr(meddx.batch.run, "diagnose", record("diagnose"))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("patient_id,index_time\np1,2024-01-01T00:00:00Z\n")
    (tmp_path / "pipeline.yaml").write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "name": "choices",
                "out": str(tmp_path / "run"),
                "steps": [
                    {
                        "step": "finetune",
                        "manifest": str(manifest),
                        "out": "{out}/model",
                        "mode": "full",
                        "schedule": "constant",
                        "head_input": "summary+modalities",
                    },
                    {
                        "step": "diagnose",
                        "manifest": str(manifest),
                        "model": "{out}/model",
                        "out": "{out}/diagnose",
                        "engine": "ray",
                        "ray": {"actors": 2, "address": "auto"},
                    },
                ],
            }
        )
    )
    run_pipeline(read_pipeline(tmp_path / "pipeline.yaml"), progress=False, echo=lambda line: None)
    assert calls["finetune"]["schedule"] == "constant"
    assert calls["finetune"]["head_input"] == "summary+modalities"
    assert calls["diagnose"]["engine"] == "ray"
    assert calls["diagnose"]["ray_options"] == RayOptions(address="auto", actors=2)
    with pytest.raises(ConfigError, match="actorz"):
        bad = yaml.safe_load((tmp_path / "pipeline.yaml").read_text())
        bad["steps"][1]["ray"] = {"actorz": 2}
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        read_pipeline(tmp_path / "bad.yaml")

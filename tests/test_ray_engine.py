"""Batch diagnosis on Ray (``--engine ray``): the local engine's results, error rows, resume, a dead worker.

One local Ray instance with 2 CPUs serves the module (the engine joins a running Ray instead of
starting its own) and is shut down after it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import REPO, SAMPLE_MANIFEST

from meddx.batch import diagnose
from meddx.batch.options import RayOptions
from meddx.cli import main
from meddx.errors import ConfigError, MeddxError

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'meddx[distributed]'); the engine needs it")

MODALITY_COLUMNS = ["imaging", "ehr", "notes", "device_logs", "audio", "video"]
KEY = ["patient_id", "index_time", "task"]


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A local Ray with 2 CPUs for the module (1 for the model actor, 1 for ingestion tasks).

    Yields a folder on the workers' import path, for plugins the tests write.
    """
    plugins = tmp_path_factory.mktemp("ray-plugins")
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), str(plugins), os.environ.get("PYTHONPATH", "")])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    yield plugins
    ray.shutdown()


def _manifest(rows: pd.DataFrame, path: Path) -> Path:
    """A manifest elsewhere naming sample_data's files by absolute path."""
    rows = rows.copy()
    for column in MODALITY_COLUMNS:
        rows[column] = [v if not v or Path(v).is_absolute() else str(SAMPLE_MANIFEST.parent / v) for v in rows[column]]
    path.parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(path, index=False)
    return path


def _sample_rows() -> pd.DataFrame:
    return pd.read_csv(SAMPLE_MANIFEST, dtype=str, keep_default_na=False)


def test_ray_predictions_equal_the_local_engines(
    tmp_path: Path, tiny_model: Path, sample_cache: Path, local_ray: Path
) -> None:
    local = diagnose(
        SAMPLE_MANIFEST,
        tiny_model,
        tmp_path / "local",
        split="test",
        cache_dir=sample_cache,
        workers=0,
        chunk_size=5,
        progress=False,
    )
    on_ray = diagnose(
        SAMPLE_MANIFEST,
        tiny_model,
        tmp_path / "ray",
        split="test",
        cache_dir=sample_cache,
        chunk_size=5,
        engine="ray",
        progress=False,
    )
    expected, got = pd.read_parquet(local.predictions), pd.read_parquet(on_ray.predictions)
    assert list(got.columns) == list(expected.columns)
    assert got[KEY].equals(expected[KEY])
    assert len(got) == 12
    assert (got.status == "ok").all()
    pd.testing.assert_frame_equal(got, expected, check_exact=False, atol=1e-5, rtol=0)
    assert pd.read_csv(on_ray.predictions_csv, dtype=str).shape == got.shape
    assert on_ray.risk_assessments.read_text().count("\n") == 12
    assert on_ray.errors.read_text() == local.errors.read_text()

    run = json.loads(on_ray.run.read_text())
    assert run["complete"]
    assert run["settings"]["engine"] == "ray"
    assert run["settings"]["actors"] == 1
    assert run["counts"]["prediction_rows"] == 12
    assert run["counts"]["chunks"] == 3
    assert not (tmp_path / "ray" / "parts").exists()
    # the sharded Parquet: one part per chunk, together the same rows as predictions.parquet
    shards = sorted((tmp_path / "ray" / "predictions").glob("part-*.parquet"))
    assert [p.name for p in shards] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "ray" / "predictions"), got)
    assert not (tmp_path / "local" / "predictions").exists()


def test_the_cli_runs_the_ray_engine(tmp_path: Path, tiny_model: Path, sample_cache: Path, local_ray: Path) -> None:
    out = tmp_path / "run"
    args = [
        "diagnose",
        str(SAMPLE_MANIFEST),
        "--model",
        str(tiny_model),
        "--out",
        str(out),
        "--split",
        "test",
        "--cache",
        str(sample_cache),
        "--chunk-size",
        "6",
        "--engine",
        "ray",
        "--actors",
        "1",
        "--cpus-per-actor",
        "0.5",
        "--quiet",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "diagnosed 12 of 12 rows" in result.output
    assert "12 FHIR RiskAssessments" in result.output
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["engine"] == "ray"
    assert settings["cpus_per_actor"] == 0.5
    assert settings["ray_cpus"] == 2


def test_a_corrupt_file_gives_one_error_row(
    tmp_path: Path, tiny_model: Path, sample_cache: Path, local_ray: Path
) -> None:
    rows = _sample_rows().query("split == 'test'").head(4).reset_index(drop=True)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00not really a wave file")
    victim = next(i for i in range(len(rows)) if rows.audio[i])
    for column in MODALITY_COLUMNS:  # this row names only the corrupt file
        rows.loc[victim, column] = ""
    rows.loc[victim, "audio"] = str(broken)
    manifest = _manifest(rows, tmp_path / "cohort" / "manifest.csv")

    result = diagnose(
        manifest,
        tiny_model,
        tmp_path / "run",
        cache_dir=sample_cache,
        chunk_size=2,
        engine="ray",
        workers=1,
        progress=False,
    )  # one ingestion task at a time
    assert json.loads(result.run.read_text())["settings"]["workers"] == 1
    frame = pd.read_parquet(result.predictions)
    assert list(frame.patient_id) == list(rows.patient_id)
    error = frame[frame.status == "error"]
    assert len(error) == 1
    assert error.patient_id.iloc[0] == rows.patient_id[victim]
    assert error.modality_errors.iloc[0] == "audio"
    assert pd.isna(error.probability.iloc[0])
    errors = pd.read_csv(result.errors, dtype=str, keep_default_na=False)
    assert sorted(errors.modality) == ["", "audio"]
    assert str(broken.name) in errors.path.str.cat()
    assert result.counts["undiagnosed_rows"] == 1
    assert result.counts["risk_assessments"] == 3


def test_a_file_that_crashes_its_reader_fails_one_modality(
    tmp_path: Path, tiny_model: Path, sample_cache: Path, local_ray: Path
) -> None:
    rows = _sample_rows().query("split == 'test'").head(3).reset_index(drop=True)
    rows["audio"] = ""
    crash = tmp_path / "crash.txt"
    crash.write_text("crash")  # the test plugin's audio reader segfaults on it
    rows.loc[0, "audio"] = str(crash)
    manifest = _manifest(rows, tmp_path / "cohort" / "manifest.csv")

    result = diagnose(
        manifest,
        tiny_model,
        tmp_path / "run",
        cache_dir=sample_cache,
        engine="ray",
        plugins=("echo_ingest_plugin",),
        progress=False,
    )
    frame = pd.read_parquet(result.predictions)
    assert len(frame) == 3
    assert (frame.status == "ok").all()
    assert list(frame.modality_errors) == ["audio", "", ""]
    assert "audio" not in frame.modalities[0]
    errors = pd.read_csv(result.errors, dtype=str, keep_default_na=False)
    assert len(errors) == 1
    assert "crashed the worker process" in errors.error[0]


def test_an_interrupted_run_resumes_with_every_row_once(
    tmp_path: Path, tiny_model: Path, sample_cache: Path, local_ray: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meddx.batch import run_folder

    rows = _sample_rows().query("split == 'test'").head(8)
    manifest = _manifest(rows, tmp_path / "cohort" / "manifest.csv")
    out = tmp_path / "run"
    write = run_folder.write_chunk
    written: list[int] = []

    def write_two_then_fail(parts: Path, number: int, *args) -> None:
        if len(written) == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C after two chunks
        write(parts, number, *args)
        written.append(number)

    monkeypatch.setattr(run_folder, "write_chunk", write_two_then_fail)
    with pytest.raises(KeyboardInterrupt):
        diagnose(manifest, tiny_model, out, cache_dir=sample_cache, chunk_size=2, engine="ray", progress=False)
    assert len(list((out / "parts").glob("chunk-*.parquet"))) == 2
    assert not (out / "run.json").exists()
    monkeypatch.setattr(run_folder, "write_chunk", write)

    result = diagnose(
        manifest, tiny_model, out, cache_dir=sample_cache, chunk_size=2, engine="ray", resume=True, progress=False
    )
    frame = pd.read_parquet(result.predictions)
    assert len(frame) == 8
    assert not frame.duplicated(KEY).any()
    assert list(frame.patient_id) == list(rows.patient_id)
    assert result.counts["chunks_done_before"] == 2
    assert result.counts["risk_assessments"] == 8
    reference = diagnose(
        manifest, tiny_model, tmp_path / "whole", cache_dir=sample_cache, workers=0, chunk_size=2, progress=False
    )
    pd.testing.assert_frame_equal(frame, pd.read_parquet(reference.predictions), check_exact=False, atol=1e-5, rtol=0)


def test_an_ingestion_worker_that_dies_is_retried(
    tmp_path: Path, tiny_model: Path, sample_cache: Path, local_ray: Path
) -> None:
    rows = _sample_rows().query("split == 'test'").head(2)
    manifest = _manifest(rows, tmp_path / "cohort" / "manifest.csv")
    marker = tmp_path / "died-once"
    # imported by each ingestion worker (never by the driver): the first to import it marks the file and dies
    (local_ray / "die_once_plugin.py").write_text(
        f"import os, pathlib\nm = pathlib.Path({str(marker)!r})\nif not m.exists():\n    m.touch()\n    os._exit(1)\n"
    )
    result = diagnose(
        manifest,
        tiny_model,
        tmp_path / "run",
        cache_dir=sample_cache,
        chunk_size=1,
        engine="ray",
        plugins=("die_once_plugin",),
        progress=False,
        ray_options=RayOptions(max_retries=2),
    )
    assert marker.exists()
    frame = pd.read_parquet(result.predictions)
    assert len(frame) == 2
    assert (frame.status == "ok").all()
    assert not frame.duplicated(KEY).any()


def _refuse(batch: dict) -> dict:
    raise ConfigError("the test says no")


def _stumble(batch: dict) -> dict:
    raise ValueError("not a number")


def test_an_error_raised_in_a_stage_reaches_the_caller_as_a_meddx_error(local_ray: Path) -> None:
    from meddx.batch.engines.on_ray import _results

    with pytest.raises(ConfigError, match="^the test says no$"):  # ours, as raised: the CLI's exit status 2
        list(_results(ray, ray.data.from_items([{"a": 1}]).map_batches(_refuse)))
    with pytest.raises(MeddxError, match="ValueError: not a number.*--resume"):
        list(_results(ray, ray.data.from_items([{"a": 1}]).map_batches(_stumble)))


def test_ray_settings_are_refused_where_they_cannot_work(tmp_path: Path, tiny_model: Path) -> None:
    with pytest.raises(ConfigError, match="--device cuda"):
        RayOptions(gpus_per_actor=1).check("cpu")
    with pytest.raises(ConfigError, match="need --engine ray"):
        diagnose(SAMPLE_MANIFEST, tiny_model, tmp_path / "run", ray_options=RayOptions(actors=2))
    result = CliRunner().invoke(
        main,
        [
            "diagnose",
            str(SAMPLE_MANIFEST),
            "--model",
            str(tiny_model),
            "--out",
            str(tmp_path / "run"),
            "--actors",
            "2",
            "--quiet",
        ],
    )
    assert result.exit_code == 2
    assert "--actors only apply to --engine ray" in result.output
    assert issubclass(ConfigError, MeddxError)


def test_meddx_never_imports_ray_for_the_local_engine() -> None:
    code = (
        "import sys, meddx, meddx.cli, meddx.batch.run, meddx.batch.engines.on_ray\n"
        "from meddx.batch import RayOptions\nRayOptions().check('cpu')\n"
        "print('ray' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.stdout.strip() == "False"


def test_without_ray_the_engine_says_how_to_install_it(tmp_path: Path) -> None:
    blocker = tmp_path / "ray"  # a package named ray that cannot be imported, ahead of the real one
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('No module named ray (blocked by the test)')\n")
    code = (
        "from meddx.batch.engines.on_ray import import_ray\nfrom meddx.errors import ConfigError\n"
        "try:\n    import_ray()\nexcept ConfigError as exc:\n    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"},
    )
    assert "pip install 'meddx[distributed]'" in done.stdout


def test_ray_scores_and_reports_out_of_distribution_rows_as_the_local_engine_does(
    tmp_path: Path, tiny_model: Path, sample_cache: Path, local_ray: Path
) -> None:
    """A model with OOD scorers and acquisition ranges: the Ray engine's ood columns and run.json's
    shift report (the MMD tests need the actors' embeddings) equal the local engine's."""
    import shutil

    import numpy as np

    from meddx.data import prepare_cohort
    from meddx.models.diagnosis import DiagnosisModel
    from meddx.models.ood import fit_ood
    from meddx.training.ood_fit import dataset_embeddings, fit_input_ranges

    folder = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    model = DiagnosisModel.from_pretrained(folder)
    prepared = prepare_cohort(SAMPLE_MANIFEST, cache_dir=sample_cache, aligner=model.aligner, workers=0, progress=False)
    train, every = prepared.dataset(split="train"), prepared.dataset()
    train_x, train_have, labels = dataset_embeddings(model, train)
    val_x, val_have, _ = dataset_embeddings(model, every)  # sample_data's 12 validation rows are too few at 10%
    ood = fit_ood(train_x, labels, val_x, train_present=train_have, val_present=val_have, rate=0.1)
    assert ood is not None
    ood.input_ranges = fit_input_ranges((train,))
    ood.save(folder)

    settings = {"split": "test", "cache_dir": sample_cache, "chunk_size": 5, "progress": False}
    local = diagnose(SAMPLE_MANIFEST, folder, tmp_path / "local", workers=0, **settings)
    on_ray = diagnose(SAMPLE_MANIFEST, folder, tmp_path / "ray", engine="ray", **settings)
    expected, got = pd.read_parquet(local.predictions), pd.read_parquet(on_ray.predictions)
    assert "ood" in got.columns
    pd.testing.assert_frame_equal(got, expected, check_exact=False, atol=1e-5, rtol=0)
    shift, ray_shift = json.loads(local.run.read_text())["shift"], json.loads(on_ray.run.read_text())["shift"]
    assert set(ray_shift) == set(shift)
    tested = [s for s in shift if "p_value" in shift[s]]
    assert tested  # the local engine tests its embeddings...
    for space in tested:  # ...and so does Ray, on the same rows
        assert ray_shift[space]["rows"] == shift[space]["rows"]
        assert np.isclose(ray_shift[space]["mmd"], shift[space]["mmd"], atol=1e-4)

"""The `meddx` command end to end on generated cohorts."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import REPO, process_alive

from meddx.cli import main
from meddx.config import IngestConfig
from meddx.synth import generate_cohort


@pytest.mark.slow
def test_ingest_reports_coverage_and_keeps_going_past_a_bad_file(tmp_path: Path) -> None:
    manifest = generate_cohort(tmp_path / "cohort", n_patients=6, seed=11)
    rows = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    broken = next(p for p in rows["audio"] if p)
    (manifest.parent / broken).write_bytes(b"RIFF\x00\x00not really a wave file")
    cache, run = tmp_path / "cache", tmp_path / "run"
    args = ["ingest", str(manifest), "--cache", str(cache), "--out", str(run), "--workers", "0", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "coverage per modality" in result.output
    assert "1 ingest error" in result.output
    errors = pd.read_csv(run / "errors.csv")
    assert len(errors) == 1
    assert errors.loc[0, "modality"] == "audio"
    assert errors.loc[0, "path"] == broken
    assert broken in errors.loc[0, "error"]
    assert any(cache.rglob("*.safetensors"))
    assert not list(cache.rglob("*.csv"))  # the shared cache holds cache entries only


def test_record_warnings_go_to_the_runs_own_folder_also_from_the_cache(tmp_path: Path) -> None:
    manifest = generate_cohort(tmp_path / "cohort", n_patients=3, seed=11)
    cache = tmp_path / "cache"
    runner = CliRunner()
    outputs = {}
    for run in ("first", "second"):  # the second run finds every record in the shared cache
        args = [
            "ingest",
            str(manifest),
            "--cache",
            str(cache),
            "--out",
            str(tmp_path / run),
            "--workers",
            "0",
            "--quiet",
        ]
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
        outputs[run] = pd.read_csv(tmp_path / run / "warnings.csv")
    first, second = outputs["first"], outputs["second"]
    assert list(first.columns) == ["patient_id", "index_time", "modality", "path", "warning"]
    # the synthetic monitor logs hold a few impossible SpO2 values, masked and reported
    assert len(first) >= 1
    assert set(first.modality) == {"device_logs"}
    assert first["warning"].str.contains("physiologically impossible").all()
    pd.testing.assert_frame_equal(first, second)
    assert f"{len(first)} record warning" in result.output
    assert (tmp_path / "first" / "errors.csv").is_file()
    assert (tmp_path / "first" / "ingest_config.json").is_file()


def test_ingest_without_out_makes_a_new_run_folder(tmp_path: Path, monkeypatch) -> None:
    manifest = generate_cohort(tmp_path / "cohort", n_patients=1, seed=3)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        result = CliRunner().invoke(main, ["ingest", str(manifest), "--cache", "cache", "--workers", "0", "--quiet"])
        assert result.exit_code == 0, result.output
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2
    assert all(r.name.startswith("ingest-") and (r / "errors.csv").is_file() for r in runs)


def test_ingest_config_file_sets_the_shapes(tmp_path: Path) -> None:
    manifest = generate_cohort(tmp_path / "cohort", n_patients=1, seed=3)
    config = tmp_path / "ingest.yaml"
    config.write_text("audio:\n  duration_s: 1.0\n  n_mels: 16\nvideo:\n  n_frames: 4\n  size: [16, 16]\n")
    run = tmp_path / "run"
    args = [
        "ingest",
        str(manifest),
        "--cache",
        str(tmp_path / "cache"),
        "--config",
        str(config),
        "--out",
        str(run),
        "--workers",
        "0",
        "--quiet",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    used = IngestConfig.model_validate_json((run / "ingest_config.json").read_text())
    assert used.audio.n_mels == 16
    assert used.video.size == (16, 16)
    assert used.imaging == IngestConfig().imaging
    as_json = tmp_path / "ingest.json"
    as_json.write_text(used.model_dump_json())
    assert IngestConfig.from_file(as_json) == used


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("video:\n  n_frame: 4\n", "video.n_frame: Extra inputs are not permitted"),
        ("imaging:\n  windows:\n    CT: [1000, -1000]\n", "imaging.windows['CT'] is (1000, -1000)"),
        ("audio:\n  duration_s: 0\n", "audio.duration_s must be positive"),
        ("device_logs:\n  window_hours: -6\n", "device_logs.window_hours must be positive"),
        ("notes:\n  text_model: /nowhere/model\n", "has no tokenizer that loads offline"),
        ("video: [unclosed\n", "not valid YAML"),
        ("- a list\n", "a mapping of sections"),
    ],
    ids=["unknown-key", "window", "duration", "window-hours", "text-model", "yaml", "not-a-mapping"],
)
def test_an_unusable_config_stops_ingest_before_any_work(tmp_path: Path, text: str, says: str) -> None:
    manifest = generate_cohort(tmp_path / "cohort", n_patients=2, seed=3)
    config = tmp_path / "ingest.yaml"
    config.write_text(text)
    cache, run = tmp_path / "cache", tmp_path / "run"
    args = [
        "ingest",
        str(manifest),
        "--cache",
        str(cache),
        "--config",
        str(config),
        "--out",
        str(run),
        "--workers",
        "0",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert says in result.output
    if "tokenizer" not in says:  # found while reading the file: the message names it
        assert str(config) in result.output
    assert not cache.exists()
    assert not run.exists()  # nothing was read or written


def test_a_cache_that_cannot_be_written_stops_ingest_up_front(tmp_path: Path) -> None:
    manifest = generate_cohort(tmp_path / "cohort", n_patients=2, seed=3)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    run = tmp_path / "run"
    args = ["ingest", str(manifest), "--cache", str(blocker / "cache"), "--out", str(run), "--workers", "0", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert f"--cache {blocker / 'cache'}: cannot write there" in result.output
    assert "coverage" not in result.output
    assert not run.exists()


def test_a_missing_config_file_exits_2(tmp_path: Path) -> None:
    manifest = generate_cohort(tmp_path / "cohort", n_patients=1, seed=3)
    args = ["ingest", str(manifest), "--cache", str(tmp_path / "c"), "--config", str(tmp_path / "none.yaml")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "none.yaml: cannot read it" in result.output


def test_ingest_without_cache_uses_meddx_cache(tmp_path: Path) -> None:
    manifest = generate_cohort(tmp_path / "cohort", n_patients=2, seed=3)
    env = {"MEDDX_CACHE": str(tmp_path / "shared")}
    result = CliRunner(env=env).invoke(
        main, ["ingest", str(manifest), "--workers", "0", "--quiet", "--out", str(tmp_path / "run")]
    )
    assert result.exit_code == 0, result.output
    assert any((tmp_path / "shared").rglob("*.safetensors"))
    # the run's reports go to its own folder, never into the shared cache
    assert (tmp_path / "run" / "errors.csv").is_file()
    assert not (tmp_path / "shared" / "errors.csv").exists()


def test_sample_data_command_and_validate(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["sample-data", "--out", str(tmp_path / "s"), "--patients", "4", "--seed", "2"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["validate", str(tmp_path / "s" / "manifest.csv")])
    assert result.exit_code == 0
    assert "4 rows" in result.output
    assert "disease (binary)" in result.output


def test_bad_arguments_exit_2() -> None:
    result = CliRunner().invoke(main, ["sample-data", "--out", "x", "--patients", "0"])
    assert result.exit_code == 2


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    """The demo at the committed sample cohort's size (the full 600-patient demo takes minutes)."""
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--patients", "60", "--quiet", "--workers", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "diagnosed 12 of 12 rows" in result.output
    assert "0 ingest errors" in result.output
    # the summary says what was trained on how many rows, the figure with its interval, and what it means
    assert "trained: a new backbone, trained from scratch end to end" in result.output
    assert "on the 36 labelled training rows" in result.output
    assert "calibrated on 12 validation rows" in result.output
    assert re.search(
        r"test split, disease: AUROC [01]\.\d{3} \(95% bootstrap interval [01]\.\d{3}-[01]\.\d{3}\), "
        r"n 12 rows",
        result.output,
    )
    assert "what it means: AUROC is the chance" in result.output
    assert f"report: {out / 'evaluation' / 'report.html'}" in result.output
    assert re.search(r"demo time: \d+ s", result.output.strip().splitlines()[-1])
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    auroc = metrics["tasks"]["disease"]["overall"]["after_calibration"]["auroc"]
    interval = f"{auroc['low']:.3f}-{auroc['high']:.3f}"
    assert f"AUROC {auroc['value']:.3f} (95% bootstrap interval {interval})" in result.output
    predictions = pd.read_parquet(out / "diagnose" / "predictions.parquet")
    assert len(predictions) == 12
    assert predictions["probability"].between(0, 1).all()
    assert (out / "diagnose" / "risk_assessments.ndjson").is_file()
    assert (out / "evaluation" / "report.html").is_file()
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "sample_data" / "manifest.csv").is_file()
    assert len(pd.read_csv(out / "sample_data" / "manifest.csv")) == 60


def test_a_killed_ingest_leaves_no_worker_behind(tmp_path: Path) -> None:
    """Workers hold both ends of their task queue; without a parent watch they would wait forever."""
    manifest = generate_cohort(tmp_path / "cohort", n_patients=6, seed=5)
    cache = tmp_path / "cache"
    args = [
        sys.executable,
        "-m",
        "meddx.cli",
        "ingest",
        str(manifest),
        "--cache",
        str(cache),
        "--workers",
        "2",
        "--quiet",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    deadline = time.monotonic() + 600  # the bounds here are only reached by a hang
    children: list[int] = []
    while len(children) < 3:  # both workers spawned (by the main thread), and the resource tracker
        assert process.poll() is None, process.stdout.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.05)
        children = [int(c) for c in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]
    process.send_signal(signal.SIGKILL)  # at once: the workers are still starting (tests/test_worker_parent_death.py)
    process.wait()
    deadline = time.monotonic() + 600
    while any(process_alive(child) for child in children):
        assert time.monotonic() < deadline, "an ingest worker outlived the killed ingest run"
        time.sleep(0.2)


# ------------------------------------------------------- bad folders on the command line: exit 2, said in CLI words

SAMPLE_MANIFEST = REPO / "sample_data" / "manifest.csv"


def _backbone_folder(folder: Path, diagnosis: dict | None) -> Path:
    """The two files meddx checks before loading (the weights are never read: the command stops first)."""
    import json

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"format": "meddx-backbone", "diagnosis": diagnosis}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda tmp: tmp / "runs" / "modle", "does not exist; give the folder `meddx finetune --out` wrote"),
        (lambda tmp: (tmp / "notes").mkdir() or tmp / "notes", "is not a model folder (no model.safetensors)"),
        (lambda tmp: _backbone_folder(tmp / "pretrained", None), "holds a pretrained backbone (meddx pretrain)"),
    ],
)
def test_a_wrong_model_folder_exits_2_and_leaves_no_out_folder(tmp_path: Path, make, says: str) -> None:
    model = make(tmp_path)
    out = tmp_path / "runs" / "diagnosis"
    result = CliRunner().invoke(main, ["diagnose", str(SAMPLE_MANIFEST), "--model", str(model), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert f"error: --model {model} " in result.output
    assert says in result.output
    assert not out.exists()
    assert not (tmp_path / "runs").exists()


def test_a_wrong_backbone_folder_exits_2_in_cli_words(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["finetune", str(SAMPLE_MANIFEST), "--backbone", str(tmp_path / "nope"), "--out", str(tmp_path / "m")]
    )
    assert result.exit_code == 2, result.output
    assert "--backbone" in result.output
    assert "`meddx pretrain --out`" in result.output
    assert "save_pretrained" not in result.output
    assert not (tmp_path / "m").exists()


def test_a_failed_evaluate_removes_only_the_folders_it_made(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    for out in (tmp_path / "new" / "eval", mine):
        result = CliRunner().invoke(
            main, ["evaluate", str(tmp_path / "none.parquet"), "--manifest", str(SAMPLE_MANIFEST), "--out", str(out)]
        )
        assert result.exit_code == 2
        assert "not found" in result.output
    assert not (tmp_path / "new").exists()
    assert mine.is_dir()  # the user's own folder stays

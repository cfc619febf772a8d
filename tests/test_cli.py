"""The `meddx` command end to end on generated cohorts."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from click.testing import CliRunner

from meddx.cli import main
from meddx.synth import generate_cohort


def test_ingest_reports_coverage_and_keeps_going_past_a_bad_file(tmp_path: Path) -> None:
    manifest = generate_cohort(tmp_path / "cohort", n_patients=6, seed=11)
    rows = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    broken = next(p for p in rows["audio"] if p)
    (manifest.parent / broken).write_bytes(b"RIFF\x00\x00not really a wave file")
    result = CliRunner().invoke(main, ["ingest", str(manifest), "--cache", str(tmp_path / "cache"), "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "coverage per modality" in result.output and "1 ingest error" in result.output
    errors = pd.read_csv(tmp_path / "cache" / "errors.csv")
    assert len(errors) == 1 and errors.loc[0, "modality"] == "audio" and errors.loc[0, "path"] == broken
    assert broken in errors.loc[0, "error"]
    assert any((tmp_path / "cache").rglob("*.safetensors"))


def test_ingest_without_cache_uses_meddx_cache(tmp_path: Path) -> None:
    manifest = generate_cohort(tmp_path / "cohort", n_patients=2, seed=3)
    env = {"MEDDX_CACHE": str(tmp_path / "shared")}
    result = CliRunner(env=env).invoke(main, ["ingest", str(manifest), "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert any((tmp_path / "shared").rglob("*.safetensors")) and (tmp_path / "shared" / "errors.csv").is_file()


def test_sample_data_command_and_validate(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["sample-data", "--out", str(tmp_path / "s"), "--patients", "4", "--seed", "2"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["validate", str(tmp_path / "s" / "manifest.csv")])
    assert result.exit_code == 0 and "4 rows" in result.output and "disease (binary)" in result.output


def test_bad_arguments_exit_2() -> None:
    result = CliRunner().invoke(main, ["sample-data", "--out", "x", "--patients", "0"])
    assert result.exit_code == 2


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo"), "--quiet", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "0 ingest errors" in result.output and "aligned 60 patients" in result.output
    assert (tmp_path / "demo" / "aligner.json").is_file() and (tmp_path / "demo" / "errors.csv").is_file()

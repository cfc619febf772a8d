"""`meddx evaluate` on the inputs a report must not gloss over: few rows, one class, NaN, odd names.

The report must say what it rests on (the model, the rows of each class, a small-n warning, the
mean set size beside coverage, the rows per reliability bin) and why a figure is missing.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from meddx.cli import main
from meddx.evaluate import evaluate
from meddx.metrics import MetricSettings, auroc_half_width, rows_for_auroc_line

FAST = MetricSettings(n_resamples=40)


def _write(folder: Path, labels: list[int], probability, extra: dict | None = None, sets=None) -> dict[str, Path]:
    """A manifest and a predictions.csv of one binary task `flu` over len(labels) patients."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(labels)
    ids = [f"Q{i:03d}" for i in range(n)]
    times = pd.date_range("2024-05-01T10:00:00Z", periods=n, freq="D").strftime("%Y-%m-%dT%H:%M:%SZ")
    pd.DataFrame({"patient_id": ids, "index_time": times, "label:flu": labels, **(extra or {})}).to_csv(
        folder / "manifest.csv", index=False
    )
    predictions = pd.DataFrame(
        {"patient_id": ids, "index_time": times, "task": "flu", "status": "ok", "probability": probability}
    )
    if sets is not None:
        predictions["prediction_set"] = sets
    predictions.to_csv(folder / "predictions.csv", index=False)
    return {"manifest": folder / "manifest.csv", "predictions": folder / "predictions.csv"}


def _run_json(folder: Path, model: Path, training: dict | None) -> None:
    """What meddx diagnose writes beside its predictions (the parts of run.json evaluate reads)."""
    run = {
        "format": "meddx-diagnose-run/1",
        "complete": True,
        "model": {"name": model.name, "path": str(model), "sha256": "ab" * 32, "training": training},
    }
    (folder / "run.json").write_text(json.dumps(run))


def test_twelve_rows_say_what_they_rest_on(tmp_path: Path) -> None:
    labels = [0, 1] * 6
    files = _write(tmp_path / "run", labels, np.linspace(0.05, 0.95, 12), sets=["0|1"] * 12)
    model = tmp_path / "models" / "flu-v3"
    _run_json(tmp_path / "run", model, {"mode": "head", "rows": {"train": 480, "val": 120}})
    result = evaluate(files["predictions"], files["manifest"], tmp_path / "out", settings=FAST)

    metrics = json.loads(result.metrics_path.read_text())
    assert metrics["model"] == {
        "name": "flu-v3",
        "path": str(model),
        "sha256": "ab" * 32,
        "training_rows": {"train": 480, "val": 120},
        "run": str(tmp_path / "run" / "run.json"),
    }
    flu = metrics["tasks"]["flu"]
    assert flu["class_counts"] == {"positives": 6, "negatives": 6}
    assert flu["overall"]["class_counts"] == [6, 6]
    small, full_sets = flu["warnings"]
    width = auroc_half_width(6, 6)
    assert f"6 positives and 6 negatives a 95% interval on AUROC is about +/-{width:.2f}" in small
    assert f"about {rows_for_auroc_line()} rows of each class" in small
    assert "+/-0.10" in small
    assert "12 of the 12 prediction sets hold every class" in full_sets
    conformal = flu["overall"]["conformal"]
    assert conformal["coverage"]["value"] == 1.0
    assert conformal["mean_set_size"]["value"] == 2.0

    report = html.unescape(result.report_path.read_text())
    for text in (
        "flu-v3",
        str(model),
        "480 train, 120 val rows",
        "6 positives, 6 negatives",
        "Too few rows",
        "12 of the 12 prediction sets hold every class",
        "mean set size",
        "Rows per bin",
    ):
        assert text in report, text
    # the summary row: coverage with the mean set size beside it
    assert "<td>1.000 [1.000, 1.000]</td><td>2.00 [2.00, 2.00]</td><td>small n: see the task</td>" in report
    # rows per bin of the calibrated diagram: 12 probabilities in 10 equal-width bins
    counts = np.histogram(np.linspace(0.05, 0.95, 12), bins=np.linspace(0, 1, 11))[0]
    for b, count in enumerate(counts):
        assert f"<td>[{b / 10:.2f}, {(b + 1) / 10:.2f}{']' if b == 9 else ')'}</td><td>{count}</td>" in report


def test_enough_rows_give_no_small_n_warning(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    labels = (rng.random(400) < 0.5).astype(int)
    files = _write(tmp_path, labels.tolist(), np.clip(0.3 * labels + rng.random(400) * 0.7, 0, 1))
    result = evaluate(files["predictions"], files["manifest"], tmp_path / "out", settings=FAST)
    flu = result.metrics["tasks"]["flu"]
    assert min(flu["class_counts"].values()) >= rows_for_auroc_line()
    assert flu["warnings"] == []
    assert "Too few rows" not in result.report_path.read_text()
    assert result.metrics["model"] is None
    assert "no meddx diagnose run.json" in result.metrics["notes"][0]
    assert "Model: unknown" in result.report_path.read_text()


def test_training_rows_come_from_the_model_folder_when_run_json_lacks_them(tmp_path: Path) -> None:
    files = _write(tmp_path / "run", [0, 1] * 30, np.linspace(0, 1, 60))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"diagnosis": {"training": {"rows": {"train": 77, "val": 11}}}}))
    _run_json(tmp_path / "run", model, {})
    result = evaluate(files["predictions"], files["manifest"], tmp_path / "out", settings=FAST)
    assert result.metrics["model"]["training_rows"] == {"train": 77, "val": 11}


def test_one_class_gives_n_a_with_the_reason(tmp_path: Path) -> None:
    files = _write(tmp_path, [0] * 12, np.linspace(0.05, 0.5, 12))
    result = CliRunner().invoke(
        main,
        [
            "evaluate",
            str(files["predictions"]),
            "--manifest",
            str(files["manifest"]),
            "--out",
            str(tmp_path / "out"),
            "--bootstrap",
            "40",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "AUROC n/a" in result.output
    after = json.loads((tmp_path / "out" / "metrics.json").read_text())["tasks"]["flu"]["overall"]["after_calibration"]
    reason = "only one class among the 12 rows (12 negatives, no positive)"
    assert after["auroc"]["value"] is None
    assert after["auroc"]["reason"] == reason
    assert after["auprc"]["reason"] == reason
    assert after["brier"]["value"] is not None
    assert after["brier"]["reason"] is None
    report = html.unescape((tmp_path / "out" / "report.html").read_text())
    assert f"n/a — {reason}" in report


def test_no_interval_says_why(tmp_path: Path) -> None:
    files = _write(tmp_path, [0, 1] * 10, np.linspace(0.05, 0.95, 20))
    result = evaluate(files["predictions"], files["manifest"], tmp_path / "out", settings=MetricSettings(n_resamples=0))
    auroc = result.metrics["tasks"]["flu"]["overall"]["after_calibration"]["auroc"]
    assert auroc["value"] is not None
    assert auroc["low"] is None
    assert auroc["reason"] == "no interval: the bootstrap was turned off (0 resamples)"


def test_every_probability_nan_exits_2_and_says_why(tmp_path: Path) -> None:
    files = _write(tmp_path, [0, 1] * 6, [np.nan] * 12)
    frame = pd.read_csv(files["predictions"])
    parquet = tmp_path / "predictions.parquet"
    frame.assign(probability=np.nan, **{"ablation:imaging": np.nan}).to_parquet(parquet, index=False)
    result = CliRunner().invoke(
        main, ["evaluate", str(parquet), "--manifest", str(files["manifest"]), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2, (result.output, result.exception)
    assert "nothing to evaluate" in result.output
    assert "12 no probability (empty or NaN)" in result.output


def test_a_task_without_evaluable_rows_is_explained_beside_one_that_has_them(tmp_path: Path) -> None:
    files = _write(tmp_path, [0, 1] * 10, np.linspace(0.05, 0.95, 20))
    manifest = pd.read_csv(files["manifest"]).assign(**{"label:cough": [0, 1] * 10})
    manifest.to_csv(files["manifest"], index=False)
    frame = pd.read_csv(files["predictions"])
    cough = frame.assign(task="cough", probability=np.nan, **{"ablation:imaging": 0.5})  # reshape(0, -1) once
    pd.concat([frame.assign(**{"ablation:imaging": 0.5}), cough]).to_parquet(tmp_path / "p.parquet", index=False)
    result = evaluate(tmp_path / "p.parquet", files["manifest"], tmp_path / "out", settings=FAST)
    cough_metrics = result.metrics["tasks"]["cough"]
    assert cough_metrics["overall"]["n"] == 0
    assert cough_metrics["overall"]["after_calibration"]["auroc"]["reason"] == "no rows to compute it on"
    assert cough_metrics["ablation"]["imaging"]["n"] == 0
    assert any("no row of task 'cough' could be evaluated" in note for note in cough_metrics["notes"])
    assert "n/a — no rows to compute it on" in html.unescape(result.report_path.read_text())


@pytest.mark.parametrize("name", ["$\\frac{1}{$", "$x$", "\\$a$b", "_^{}"])
def test_subgroup_and_task_names_are_drawn_as_plain_text(tmp_path: Path, name: str) -> None:
    labels = [0, 1] * 8
    files = _write(tmp_path, labels, np.linspace(0.05, 0.95, 16), extra={"ward": [name, "b"] * 8}, sets=["1"] * 16)
    result = CliRunner().invoke(
        main,
        [
            "evaluate",
            str(files["predictions"]),
            "--manifest",
            str(files["manifest"]),
            "--out",
            str(tmp_path / "out"),
            "--by",
            "ward",
            "--bootstrap",
            "20",
        ],
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert (tmp_path / "out" / "subgroups_flu.png").stat().st_size > 0
    assert "<h4>ward</h4>" in (report := (tmp_path / "out" / "report.html").read_text())
    assert html.escape(name) in report

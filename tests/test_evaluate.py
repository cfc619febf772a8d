"""`meddx evaluate` on predictions written here the way a model writes them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from meddx.calibration import ConformalClassifier, TemperatureScaler, availability_groups
from meddx.cli import main
from meddx.evaluate import evaluate
from meddx.metrics import MetricSettings, coverage
from meddx.predictions import load_task_rows

MODALITIES = ["imaging", "ehr", "notes", "audio"]
STAGES = ["early", "late", "mid"]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _cohort(rng: np.random.Generator, n: int):
    """Rows with a hidden severity; the model's logits are overconfident and noisier with fewer modalities."""
    present = rng.random((n, len(MODALITIES))) < [0.9, 0.85, 0.8, 0.75]
    present[:, 1] |= ~present.any(axis=1)  # every row has at least one modality
    n_missing = (~present).sum(axis=1)
    severity = rng.normal(0, 1.5, n)
    disease = (rng.random(n) < 1 / (1 + np.exp(-severity))).astype(int)
    stage_logits = np.stack([-severity, np.zeros(n), severity], axis=1)
    stage = np.asarray([rng.choice(3, p=p) for p in _softmax(stage_logits)])
    noise = rng.normal(0, 1, n) * (0.3 + 0.6 * n_missing)
    logit = 2.0 * (severity + noise)  # overconfident: temperature ~2 fixes it
    stage_model = 2.0 * (stage_logits + noise[:, None] * rng.normal(0, 1, (n, 3)))
    withheld = 2.0 * (0.5 * severity + noise)  # what the model says with imaging withheld
    return present, n_missing, disease, stage, logit, stage_model, withheld


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("evaluation")
    rng = np.random.default_rng(0)
    # Calibrate on validation rows, predict on test rows: as a fitted DiagnosisModel would.
    val = _cohort(rng, 600)
    present, n_missing, disease, stage, logit, stage_model, withheld = _cohort(rng, 400)
    scaler = TemperatureScaler().fit(val[4], val[2])
    conformal = ConformalClassifier(alpha=0.1, min_group_size=50).fit(scaler.transform(val[4]), val[2], val[1])
    stage_scaler = TemperatureScaler().fit(val[5], val[3])
    stage_conformal = ConformalClassifier(alpha=0.1).fit(stage_scaler.transform(val[5]), val[3], val[1])

    n = len(disease)
    ids = [f"P{i:04d}" for i in range(n)]
    times = pd.date_range("2024-01-01T08:00:00Z", periods=n, freq="7h").strftime("%Y-%m-%dT%H:%M:%SZ")
    manifest = pd.DataFrame(
        {
            "patient_id": ids,
            "index_time": times,
            "split": "test",
            "label:disease": disease.astype(str),
            "label:stage": np.asarray(STAGES)[stage],
            "sex": rng.choice(["F", "M"], n),
            "site": rng.choice(["north", "south", "east"], n),
        }
    )
    manifest.loc[:4, "label:disease"] = ""  # unknown labels are left out, not counted as negatives
    manifest.to_csv(folder / "manifest.csv", index=False)

    modalities = ["|".join(m for m, p in zip(MODALITIES, row, strict=True) if p) for row in present]
    calibrated = scaler.transform(logit)
    sets = conformal.predict_set(calibrated, availability=n_missing)
    binary = pd.DataFrame(
        {
            "patient_id": ids,
            "index_time": times,
            "task": "disease",
            "probability": calibrated,
            "raw_probability": 1 / (1 + np.exp(-logit)),
            "prediction": (calibrated >= 0.5).astype(int).astype(str),
            "prediction_set": ["|".join(c for c, keep in zip("01", row, strict=True) if keep) for row in sets],
            "modalities": modalities,
            "modality_errors": "",
            "status": "ok",
            "ablation:imaging": np.where(present[:, 0], scaler.transform(withheld), np.nan),
        }
    )
    binary.loc[5:7, ["probability", "raw_probability", "prediction", "prediction_set"]] = [np.nan, np.nan, "", ""]
    binary.loc[5:7, "status"] = "error"
    stage_probabilities = stage_scaler.transform(stage_model)
    stage_raw = _softmax(stage_model)
    stage_sets = stage_conformal.predict_set(stage_probabilities, availability=n_missing)
    multiclass = pd.DataFrame(
        {
            "patient_id": ids,
            "index_time": times,
            "task": "stage",
            "probability": stage_probabilities.max(axis=1),
            "raw_probability": stage_raw.max(axis=1),
            "prediction": np.asarray(STAGES)[stage_probabilities.argmax(axis=1)],
            "prediction_set": ["|".join(c for c, keep in zip(STAGES, row, strict=True) if keep) for row in stage_sets],
            "modalities": modalities,
            "modality_errors": "",
            "status": "ok",
            **{f"probability:{c}": stage_probabilities[:, i] for i, c in enumerate(STAGES)},
            **{f"raw_probability:{c}": stage_raw[:, i] for i, c in enumerate(STAGES)},
        }
    )
    predictions = pd.concat([binary, multiclass], ignore_index=True)
    predictions["sex"] = ""  # copied manifest columns may be present; the manifest's values win
    predictions.to_csv(folder / "predictions.csv", index=False)
    predictions.to_parquet(folder / "predictions.parquet", index=False)
    return {
        "folder": folder,
        "manifest": folder / "manifest.csv",
        "csv": folder / "predictions.csv",
        "parquet": folder / "predictions.parquet",
    }


def test_evaluate_command_writes_every_file_and_section(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = CliRunner().invoke(
        main,
        [
            "evaluate",
            str(files["csv"]),
            "--manifest",
            str(files["manifest"]),
            "--out",
            str(out),
            "--by",
            "sex,site",
            "--bootstrap",
            "100",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "disease: n 392" in result.output  # 400 - 5 unknown labels - 3 errors
    for name in (
        "metrics.json",
        "report.html",
        "roc_disease.png",
        "reliability_disease.png",
        "subgroups_disease.png",
        "ablation_disease.png",
        "roc_stage.png",
        "reliability_stage.png",
        "subgroups_stage.png",
    ):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0, name
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "ablation_stage.png").exists()

    report = (out / "report.html").read_text()
    for task in ("disease", "stage"):
        for section in ("overall", "roc", "calibration", "conformal", "availability", "subgroups", "ablation"):
            assert f'id="{task}-{section}"' in report, (task, section)
    assert 'id="summary"' in report
    assert not re.search(r"https?://", report), "the report must open with no network"
    assert not re.search(r"<script|<link", report)
    assert report.count('src="data:image/png;base64,') == 7  # 4 for disease, 3 for stage
    assert "No modality-ablation columns" in report  # the stage task has none
    assert "P0001" not in report  # no patient identifiers in the report


def test_metrics_json_holds_every_table(files: dict[str, Path], tmp_path: Path) -> None:
    result = evaluate(
        files["parquet"], files["manifest"], tmp_path, by=["sex", "site"], settings=MetricSettings(n_resamples=100)
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result.metrics))
    disease = metrics["tasks"]["disease"]
    assert disease["counts"] == {
        "rows": 400,
        "status_error": 3,
        "unlabelled": 5,
        "without_probability": 0,
        "evaluated": 392,
    }
    overall = disease["overall"]
    for phase in ("before_calibration", "after_calibration"):
        for metric in ("auroc", "auprc", "brier", "ece"):
            estimate = overall[phase][metric]
            assert estimate["n"] == 392
            assert estimate["n_resamples"] == 100
            assert estimate["low"] < estimate["high"], (phase, metric)
            if metric != "ece":  # ECE is biased upwards on resamples: its interval may sit above the value
                assert estimate["low"] <= estimate["value"] <= estimate["high"], (phase, metric)
    # Temperature scaling keeps the ranking and repairs the overconfidence.
    assert overall["after_calibration"]["auroc"]["value"] == pytest.approx(
        overall["before_calibration"]["auroc"]["value"]
    )
    assert overall["after_calibration"]["ece"]["value"] < overall["before_calibration"]["ece"]["value"]
    assert 0.85 <= overall["conformal"]["coverage"]["value"] <= 0.97
    groups = disease["availability"]["groups"]
    assert set(groups) == {"all present", "one missing", "two or more missing"}
    assert sum(g["n"] for g in groups.values()) == 392
    assert disease["availability"]["modalities"] == MODALITIES
    assert set(disease["subgroups"]) == {"sex", "site"}
    assert set(disease["subgroups"]["sex"]) == {"F", "M"}
    imaging = disease["ablation"]["imaging"]
    assert imaging["withheld"]["auroc"]["value"] < imaging["full"]["auroc"]["value"]
    assert imaging["auroc_drop"]["value"] > 0
    stage = metrics["tasks"]["stage"]
    assert stage["kind"] == "multiclass"
    assert stage["classes"] == STAGES
    assert stage["ablation"] is None
    assert any("ablation" in note for note in stage["notes"])
    assert stage["overall"]["conformal"]["mean_set_size"]["value"] > 1


def test_csv_and_parquet_give_the_same_rows(files: dict[str, Path]) -> None:
    from_csv = load_task_rows(files["csv"], files["manifest"], by=["site"])
    from_parquet = load_task_rows(files["parquet"], files["manifest"], by=["site"])
    for a, b in zip(from_csv, from_parquet, strict=True):
        assert a.name == b.name
        assert a.classes == b.classes
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_allclose(a.probabilities, b.probabilities)
        np.testing.assert_array_equal(a.sets, b.sets)
        np.testing.assert_array_equal(a.n_missing, b.n_missing)
        np.testing.assert_array_equal(a.subgroups["site"], b.subgroups["site"])
    disease = from_csv[0]
    groups = availability_groups(disease.n_missing)
    for group in np.unique(groups):  # per-group coverage recomputed by hand
        rows = groups == group
        assert 0.8 <= coverage(disease.labels[rows], disease.sets[rows]) <= 1.0


def test_bad_predictions_exit_2_with_rows_not_patients(files: dict[str, Path], tmp_path: Path) -> None:
    frame = pd.read_csv(files["csv"], dtype=str, keep_default_na=False)
    frame.loc[3, "patient_id"] = "P9999"
    bad = tmp_path / "bad.csv"
    frame.to_csv(bad, index=False)
    runner = CliRunner()
    args = ["--manifest", str(files["manifest"]), "--out", str(tmp_path / "out")]
    result = runner.invoke(main, ["evaluate", str(bad), *args])
    assert result.exit_code == 2
    assert "data row(s) 4" in result.output
    assert "P9999" not in result.output
    result = runner.invoke(main, ["evaluate", str(files["csv"]), *args, "--by", "ward"])
    assert result.exit_code == 2
    assert "'ward'" in result.output
    assert "sex" in result.output
    frame = pd.read_csv(files["csv"], dtype=str, keep_default_na=False).drop(columns=["status"])
    frame.to_csv(bad, index=False)
    result = runner.invoke(main, ["evaluate", str(bad), *args])
    assert result.exit_code == 2
    assert "status" in result.output
    frame = pd.read_csv(files["csv"], dtype=str, keep_default_na=False)
    frame.loc[0, "probability"] = "1.7"
    frame.to_csv(bad, index=False)
    result = runner.invoke(main, ["evaluate", str(bad), *args])
    assert result.exit_code == 2
    assert "[0, 1]" in result.output
    assert "rows 1" in result.output


def _minimal_files(tmp_path: Path) -> None:
    """Only the required columns: no raw probabilities, no sets, no modalities, one-class subgroup."""
    times = [f"2024-05-{day:02d}T10:00:00+02:00" for day in range(1, 13)]
    labels = [0, 1, 0, 1, 1, 0, 0, 1, 0, 0, 0, 0]
    pd.DataFrame(
        {
            "patient_id": [f"Q{i}" for i in range(12)],
            "index_time": times,
            "label:flu": labels,
            "ward": ["a"] * 8 + ["b"] * 4,  # ward b has only negatives: its AUROC is undefined
        }
    ).to_csv(tmp_path / "manifest.csv", index=False)
    # The same instants written in UTC: the join is on the moment, not the text.
    utc = pd.to_datetime(times, utc=True).strftime("%Y-%m-%dT%H:%M:%SZ")
    pd.DataFrame(
        {
            "patient_id": [f"Q{i}" for i in range(12)],
            "index_time": utc,
            "task": "flu",
            "status": "ok",
            "probability": np.linspace(0.05, 0.95, 12),
        }
    ).to_csv(tmp_path / "predictions.csv", index=False)


def test_a_minimal_predictions_file_still_gives_every_section(tmp_path: Path) -> None:
    _minimal_files(tmp_path)
    result = evaluate(
        tmp_path / "predictions.csv",
        tmp_path / "manifest.csv",
        tmp_path / "out",
        by=["ward"],
        settings=MetricSettings(n_resamples=50),
    )
    flu = result.metrics["tasks"]["flu"]
    assert flu["overall"]["n"] == 12
    assert flu["overall"]["before_calibration"] is None
    assert flu["overall"]["conformal"] is None
    assert flu["availability"] is None
    assert flu["ablation"] is None
    assert len(flu["notes"]) == 4
    assert flu["subgroups"]["ward"]["b"]["after_calibration"]["auroc"] == {
        "value": None,
        "low": None,
        "high": None,
        "n": 4,
        "n_resamples": 0,
        "reason": "only one class among the 4 rows (4 negatives, no positive)",
    }
    report = result.report_path.read_text()
    for section in ("overall", "roc", "calibration", "conformal", "availability", "subgroups", "ablation"):
        assert f'id="flu-{section}"' in report
    assert not re.search(r"https?://", report)


def test_the_bootstrap_shows_a_bar_of_every_interval_and_quiet_hides_it(tmp_path: Path) -> None:
    _minimal_files(tmp_path)
    args = ["evaluate", str(tmp_path / "predictions.csv"), "--manifest", str(tmp_path / "manifest.csv"), "--by", "ward"]
    shown = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a"), "--bootstrap", "5"])
    quiet = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "b"), "--bootstrap", "5", "--quiet"])
    assert shown.exit_code == 0, shown.output + quiet.output
    assert quiet.exit_code == 0, shown.output + quiet.output
    # AUROC, AUPRC, Brier, ECE overall and in wards a and b: counted before the bar starts
    assert re.search(r"evaluate: 100%\|.*?\| 12/12 ", shown.stderr), shown.stderr
    assert quiet.stderr == ""

"""Out-of-distribution scores: the false-alarm rate holds on unshifted rows, a shifted modality is
flagged and named, the files are checked on load and fingerprinted, and abstained rows reach every
output (predictions table, FHIR RiskAssessments) with their status."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from meddx.errors import ModelError
from meddx.models.folder import check_model_folder
from meddx.models.ood import OOD_JSON, OOD_TENSORS, SUMMARY, fit_ood, load_ood, mmd_test


def _cohort(rng: np.random.Generator, n: int, shift: dict[str, float] | None = None):
    """Two classes; ``ehr`` and ``audio`` embeddings (8 and 12 dims) and a summary mixing them."""
    labels = rng.integers(0, 2, n)
    ehr = rng.normal(size=(n, 8)) + labels[:, None] * 1.5
    audio = rng.normal(size=(n, 12)) * np.linspace(0.5, 2, 12) + labels[:, None]
    for name, amount in (shift or {}).items():
        if name == "audio":
            audio = audio + amount
        else:
            ehr = ehr * amount
    summary = np.c_[ehr[:, :4], audio[:, :4]] * 0.1 + rng.normal(size=(n, 8))
    return {"ehr": ehr, "audio": audio, SUMMARY: summary}, labels


@pytest.mark.parametrize("method", ["mahalanobis", "knn"])
def test_unshifted_rows_are_flagged_at_about_the_rate_and_a_shifted_modality_is_named(method: str) -> None:
    rng = np.random.default_rng(0)
    train, labels = _cohort(rng, 600)
    val, _ = _cohort(rng, 400)
    ood = fit_ood(train, labels, val, method=method, rate=0.05)
    test, _ = _cohort(rng, 2000)
    ratios, fused = ood.score(test)
    assert 0.025 <= np.mean(fused > 1) <= 0.09  # binomial spread on 400 validation rows
    for space in ("ehr", "audio"):
        assert 0.025 <= np.mean(ratios[space] > 1) <= 0.09

    shifted, _ = _cohort(rng, 300, shift={"audio": 4.0})
    ratios, fused = ood.score(shifted)
    assert np.mean(fused > 1) > 0.9
    flagged = fused > 1
    assert np.mean(ratios["audio"][flagged] > 1) > 0.95  # the flag names the shifted modality
    assert np.mean(ratios["ehr"] > 1) < 0.12  # and not the untouched one


def test_absent_modalities_get_no_score_and_do_not_raise_the_fused_one() -> None:
    rng = np.random.default_rng(1)
    train, labels = _cohort(rng, 300)
    val, _ = _cohort(rng, 200)
    present = {s: np.ones(200, dtype=bool) for s in val}
    present["audio"][:100] = False
    ood = fit_ood(train, labels, val, val_present=present)
    assert ood.rows["val"]["audio"] == 100
    test, _ = _cohort(rng, 50)
    test["audio"] = test["audio"] + 50.0  # garbage where the rows have no audio
    have = {s: np.ones(50, dtype=bool) for s in test}
    have["audio"][:] = False  # the shifted audio is not there: nothing to flag
    ratios, fused = ood.score(test, have)
    assert np.isnan(ratios["audio"]).all()
    assert np.mean(fused > 1) < 0.2


def test_too_few_rows_give_no_scores() -> None:
    rng = np.random.default_rng(2)
    train, labels = _cohort(rng, 8)
    val, _ = _cohort(rng, 30)
    assert fit_ood(train, labels, val) is None
    train, labels = _cohort(rng, 100)
    val, _ = _cohort(rng, 15)  # the 95% quantile of 15 rows would be their largest: the rate cannot hold
    assert fit_ood(train, labels, val, rate=0.05) is None
    assert fit_ood(train, labels, val, rate=0.1) is not None


def test_the_shift_test_tells_a_moved_sample_from_a_drawn_one() -> None:
    rng = np.random.default_rng(3)
    reference = rng.normal(size=(200, 6))
    same = mmd_test(reference, rng.normal(size=(100, 6)), seed=0)
    moved = mmd_test(reference, rng.normal(size=(100, 6)) + 1.0, seed=0)
    assert same["p_value"] > 0.05
    assert moved["p_value"] < 0.01
    assert moved["mmd"] > 3 * same["mmd"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A generated cohort of 150 patients (about 30 validation rows: enough for a 5% threshold), a tiny
    model fine-tuned on it for one epoch, and their ingest cache."""
    from meddx.models import BackboneConfig
    from meddx.synth import generate_cohort
    from meddx.training import finetune

    root = tmp_path_factory.mktemp("ood-cohort")
    manifest = generate_cohort(root / "cohort", n_patients=150, seed=11)
    cache = root / "cache"
    finetune(
        manifest,
        root / "model",
        mode="full",
        epochs=1,
        seed=0,
        cache_dir=cache,
        workers=2,
        progress=False,
        backbone_config=BackboneConfig(d_model=16, n_layers=1, n_heads=2),
    )
    return manifest, root / "model", cache


def _ood_folder(model: Path, tmp_path: Path) -> Path:
    folder = Path(shutil.copytree(model, tmp_path / "model"))
    assert (folder / OOD_JSON).is_file(), "finetune writes the OOD files"
    assert (folder / OOD_TENSORS).is_file(), "finetune writes the OOD files"
    return folder


@pytest.mark.slow
def test_too_few_validation_rows_leave_a_model_without_ood_files(tiny_model: Path) -> None:
    # sample_data has 12 validation rows: a 5% threshold cannot be set, so finetune writes none
    assert not (tiny_model / OOD_JSON).exists()
    assert not (tiny_model / OOD_TENSORS).exists()
    assert check_model_folder(tiny_model).ood is None


@pytest.mark.slow
def test_finetune_saves_checked_and_fingerprinted_ood_files(generated, tmp_path: Path) -> None:
    folder = _ood_folder(generated[1], tmp_path)
    summary = json.loads((folder / OOD_JSON).read_text())
    assert summary["method"] == "mahalanobis"
    assert summary["false_alarm_rate"] == 0.05
    assert SUMMARY in summary["thresholds"]
    assert set(summary["dims"]) == set(summary["thresholds"])
    assert all(n >= 10 for n in summary["rows"]["train"].values())
    checked = check_model_folder(folder, fingerprint=True)
    assert checked.ood is not None
    assert OOD_JSON in checked.sha256
    assert OOD_TENSORS in checked.sha256

    document = json.loads((folder / OOD_JSON).read_text())
    document["fused_threshold"] *= 2
    (folder / OOD_JSON).write_text(json.dumps(document))
    assert check_model_folder(folder, fingerprint=True).fingerprint != checked.fingerprint

    document["thresholds"][SUMMARY] = -1.0
    (folder / OOD_JSON).write_text(json.dumps(document))
    with pytest.raises(ModelError, match=r"ood.json: thresholds.summary"):
        check_model_folder(folder)
    (folder / OOD_JSON).unlink()
    with pytest.raises(ModelError, match="without the other"):
        check_model_folder(folder)
    (folder / OOD_TENSORS).unlink()  # an older folder: neither file; it loads, with no scores
    assert check_model_folder(folder).ood is None
    assert load_ood(folder) is None


def _set_fused_threshold(folder: Path, factor: float) -> None:
    document = json.loads((folder / OOD_JSON).read_text())
    document["fused_threshold"] *= factor
    (folder / OOD_JSON).write_text(json.dumps(document))


@pytest.mark.slow
def test_abstained_rows_are_in_the_predictions_and_the_risk_assessments(generated, tmp_path: Path) -> None:
    from meddx.batch import diagnose

    manifest, model, cache = generated
    folder = _ood_folder(model, tmp_path)
    plain = pd.read_parquet(
        diagnose(
            manifest, folder, tmp_path / "plain", split="test", cache_dir=cache, workers=1, progress=False
        ).predictions
    )
    assert "ood" in plain.columns
    assert any(c.startswith("ood:") for c in plain.columns)
    expected = np.where(plain["ood"] > 1, "abstain", "ok")
    assert (plain["status"].to_numpy() == expected).all()

    _set_fused_threshold(folder, 1e-6)  # every row is now far above the fused threshold
    result = diagnose(manifest, folder, tmp_path / "abstain", split="test", cache_dir=cache, workers=1, progress=False)
    frame = pd.read_parquet(result.predictions)
    assert len(frame) == len(plain)
    assert (frame["status"] == "abstain").all()
    assert frame["probability"].notna().all()  # the prediction is still written
    resources = [json.loads(line) for line in result.risk_assessments.read_text().splitlines()]
    assert len(resources) == len(frame)
    assert all(r["status"] == "preliminary" for r in resources)
    notes = [n["text"] for r in resources for n in r["note"] if n["text"].startswith("Out of distribution")]
    assert len(notes) == len(resources)
    assert all("flagged:" in n and "abstains" in n for n in notes)
    run = json.loads(result.run.read_text())
    assert run["settings"]["abstain"] is True
    shift = run["shift"]
    assert shift["fused"]["flagged_share"] == 1.0
    assert shift["fused"]["rows"] == frame["patient_id"].nunique()
    assert 0 < shift["summary"]["p_value"] <= 1
    assert shift["summary"]["mmd"] >= 0

    kept = pd.read_parquet(
        diagnose(
            manifest, folder, tmp_path / "kept", split="test", cache_dir=cache, workers=1, progress=False, abstain=False
        ).predictions
    )
    assert (kept["status"] == "ok").all()
    assert (kept["ood"] > 1).all()

    # the Python API marks the same rows
    from meddx.batch import predict_cohort
    from meddx.models.diagnosis import DiagnosisModel

    api = predict_cohort(DiagnosisModel.from_pretrained(folder), manifest, split="test", cache_dir=cache, workers=0)
    assert (api["status"] == "abstain").all()
    assert (
        predict_cohort(
            DiagnosisModel.from_pretrained(folder), manifest, split="test", cache_dir=cache, workers=0, abstain=False
        )["status"]
        == "ok"
    ).all()


@pytest.mark.slow
def test_a_folder_without_ood_files_predicts_without_ood_columns(generated, tmp_path: Path) -> None:
    from meddx.batch import diagnose

    manifest, model, cache = generated
    folder = _ood_folder(model, tmp_path)
    (folder / OOD_JSON).unlink()
    (folder / OOD_TENSORS).unlink()
    frame = pd.read_parquet(
        diagnose(
            manifest, folder, tmp_path / "run", split="test", cache_dir=cache, workers=1, progress=False
        ).predictions
    )
    assert not any(c == "ood" or c.startswith("ood:") for c in frame.columns)
    assert (frame["status"] == "ok").all()


def _tone(folder: Path, patients: set[str]) -> None:
    """Replace the lung sounds of ``patients`` with a loud 1 kHz tone (another device, strongly)."""
    import soundfile

    for wav in folder.glob("patients/*/*.wav"):
        if wav.parent.name not in patients:
            continue
        info = soundfile.info(wav)
        tone = 0.8 * np.sin(2 * np.pi * 1000.0 * np.arange(info.frames) / info.samplerate)
        soundfile.write(wav, np.stack([tone] * info.channels, axis=1) if info.channels > 1 else tone, info.samplerate)


@pytest.mark.slow
def test_an_unshifted_test_split_is_flagged_rarely_and_a_shifted_modality_for_most_rows(
    generated, tmp_path: Path
) -> None:
    from meddx.batch import diagnose

    manifest, model, cache = generated
    plain = diagnose(manifest, model, tmp_path / "plain", split="test", cache_dir=cache, workers=1, progress=False)
    frame = pd.read_parquet(plain.predictions)
    assert frame["ood"].notna().all()
    assert (frame["ood"] > 1).mean() <= 0.2  # 5% configured; about 30 test rows

    shifted_folder = Path(shutil.copytree(manifest.parent, tmp_path / "shifted"))
    test_patients = set(frame["patient_id"])
    _tone(shifted_folder, test_patients)
    shifted = diagnose(
        shifted_folder / "manifest.csv",
        model,
        tmp_path / "shifted-run",
        split="test",
        cache_dir=tmp_path / "cache",
        workers=1,
        progress=False,
    )
    moved = pd.read_parquet(shifted.predictions)
    with_audio = moved[moved["modalities"].str.contains("audio")]
    assert len(with_audio) >= 10
    assert (with_audio["status"] == "abstain").mean() >= 0.8
    flagged = with_audio[with_audio["status"] == "abstain"]
    assert (flagged["ood:audio"] > 1).all()  # the flag names the shifted modality
    resources = [json.loads(line) for line in shifted.risk_assessments.read_text().splitlines()]
    notes = [n["text"] for r in resources if r["status"] == "preliminary" for n in r["note"][1:]]
    assert notes
    assert all("audio" in n for n in notes)
    shift = json.loads(shifted.run.read_text())["shift"]
    assert shift["audio"]["flagged_share"] >= 0.8
    assert shift["audio"]["p_value"] < 0.05
    assert json.loads(plain.run.read_text())["shift"]["audio"]["flagged_share"] <= 0.25
    # evaluate reports the same: each space's flagged share from the table, the test from run.json
    from meddx.evaluate import evaluate
    from meddx.metrics import MetricSettings

    quick = MetricSettings(n_resamples=20)
    moved_report = evaluate(
        shifted.predictions, shifted_folder / "manifest.csv", tmp_path / "eval", settings=quick, progress=False
    )
    assert moved_report.metrics["shift"]["audio"]["p_value"] == shift["audio"]["p_value"]
    rows_with_audio = moved.drop_duplicates(["patient_id", "index_time"])["ood:audio"].dropna()
    assert moved_report.metrics["shift"]["audio"]["flagged_share"] == pytest.approx(
        (rows_with_audio > 1).mean(), abs=1e-4
    )
    assert "Out-of-distribution rows and batch shift" in moved_report.report_path.read_text()
    plain_report = evaluate(plain.predictions, manifest, tmp_path / "eval-plain", settings=quick, progress=False)
    assert plain_report.metrics["shift"]["fused"]["flagged_share"] <= 0.2


@pytest.mark.slow
def test_a_scan_reconstructed_with_thicker_slices_is_flagged_by_its_acquisition(generated, tmp_path: Path) -> None:
    """The imaging tensorizer resamples every series to one grid, so no embedding sees 10 mm slices
    where training had 5-6 mm; the acquisition check does, and names the fact."""
    from meddx.batch import diagnose
    from meddx.synth import Shift, generate_cohort

    manifest, model, cache = generated
    ranges = load_ood(model).input_ranges  # type: ignore[union-attr]
    assert ranges is not None
    assert "slice_spacing_mm" in ranges.ranges["imaging"]
    assert "| imaging | slice_spacing_mm |" in (model / "README.md").read_text()  # the card shows what is checked
    plain = pd.read_parquet(
        diagnose(
            manifest, model, tmp_path / "plain", split="test", cache_dir=cache, workers=1, progress=False
        ).predictions
    )
    assert "ood_inputs" not in plain.columns or plain["ood_inputs"].fillna("").eq("").mean() >= 0.9

    thick = generate_cohort(tmp_path / "thick", n_patients=150, seed=11, shift=Shift(ct_slice_thickness=10.0))
    result = diagnose(
        thick, model, tmp_path / "run", split="test", cache_dir=tmp_path / "cache", workers=1, progress=False
    )
    frame = pd.read_parquet(result.predictions)
    with_ct = frame["modalities"].str.contains("imaging")
    assert with_ct.sum() >= 10
    assert (frame.loc[with_ct, "ood_inputs"] == "imaging.slice_spacing_mm").all()
    assert (frame.loc[with_ct, "ood:imaging"] > 1).all()
    assert (frame.loc[with_ct, "status"] == "abstain").all()
    assert frame.loc[~with_ct, "ood_inputs"].fillna("").eq("").all()
    notes = [
        n["text"]
        for line in result.risk_assessments.read_text().splitlines()
        for n in json.loads(line)["note"]
        if "slice_spacing_mm" in n["text"]
    ]
    assert len(notes) == with_ct.sum()

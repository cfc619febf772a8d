"""The model card ``README.md`` (meddx.model_card) and the training summary it rests on (meddx.data.summary)."""

from __future__ import annotations

import json
import shutil
import statistics
from collections import Counter
from pathlib import Path

import pytest
import soundfile
import yaml

from meddx.batch import diagnose
from meddx.cohort import load_cohort
from meddx.data.summary import input_summaries
from meddx.errors import ModelError
from meddx.evaluate import evaluate
from meddx.metrics import MetricSettings
from meddx.model_card import CARD_FILE, SECTIONS, card_sections, refresh_card_metrics, write_model_card
from meddx.models.folder import TRAINING_SUMMARY_FILE, check_model_folder
from meddx.records import Event, Modality, ModalityRecord

SAMPLE_MANIFEST = Path(__file__).resolve().parents[1] / "sample_data" / "manifest.csv"


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_finetune_writes_a_card_with_every_section_and_the_folders_figures(tiny_model: Path) -> None:
    text = (tiny_model / CARD_FILE).read_text()
    front = _front_matter(text)
    assert front["library_name"] == "meddx"
    sections = card_sections(text)
    assert list(sections) == list(SECTIONS)

    metrics = json.loads((tiny_model / "metrics.json").read_text())
    for task, f in metrics["validation"]["per_task"].items():
        row = f"| {task} | {f['val_rows']} | {f['auroc']:.3f} | {f['ece_before']:.3f} | {f['ece_after']:.3f} |"
        assert row in sections["Metrics"]
        (result,) = [r for r in front["model-index"][0]["results"] if r["task"]["name"] == task]
        assert result["metrics"][0] == {"type": "roc_auc", "value": round(f["auroc"], 4), "name": "validation AUROC"}
    assert "Test split: not evaluated yet" in sections["Metrics"]

    # training_summary.json against the manifest, counted here independently
    summary = json.loads((tiny_model / TRAINING_SUMMARY_FILE).read_text())
    cohort = load_cohort(SAMPLE_MANIFEST)
    assert summary["rows"] == dict(Counter(r.split for r in cohort.rows))  # every sample row has a readable input
    trained = json.loads((tiny_model / "config.json").read_text())["diagnosis"]["training"]["rows"]
    assert {s: summary["rows"][s] for s in ("train", "val")} == trained
    for split in ("train", "val", "test"):
        rows = cohort.split(split)
        assert f"{split} {len(rows)}" in sections["Training data"]
        classes = Counter(r.labels["disease"] for r in rows)
        assert summary["labels"]["disease"][split]["classes"] == {c: classes.get(c, 0) for c in ("0", "1")}
        for modality in (Modality.IMAGING, Modality.DEVICE_LOGS, Modality.AUDIO, Modality.VIDEO):
            assert summary["modalities"][split][modality.value] == sum(modality in r.paths for r in rows)
    assert summary["subgroups"]["sex"]["counts"] == dict(Counter(r.extras["sex"] for r in cohort.rows))
    ages = summary["subgroups"]["age"]  # many distinct numbers: percentiles only, never one patient's age
    assert "min" not in ages
    assert ages["median"] == statistics.median(float(r.extras["age"]) for r in cohort.rows)
    assert summary["sites"] is None
    assert "no `site` column" in sections["Known limits"]
    rates = [
        soundfile.info(str(r.paths[Modality.AUDIO])).samplerate
        for r in cohort.rows
        if r.split in ("train", "val") and Modality.AUDIO in r.paths
    ]
    audio = summary["inputs"]["audio"]["sample_rate_hz"]
    assert (audio["n"], audio["median"], audio["max"]) == (len(rates), statistics.median(rates), max(rates))
    assert f"| audio | sample_rate_hz | {len(rates)} |" in sections["Training data"]
    videos = [r for r in cohort.rows if r.split in ("train", "val") and Modality.VIDEO in r.paths]
    assert summary["inputs"]["video"]["fps"]["n"] == len(videos)  # every sample clip is a file announcing its rate

    calibration = json.loads((tiny_model / "calibration.json").read_text())
    threshold = calibration["tasks"]["disease"]["conformal"]["threshold"]
    assert f"| 0.100 | {threshold:.3f} |" in sections["Calibration and conformal settings"]
    if (tiny_model / "ood.json").is_file():  # the out-of-distribution fit ran
        ood = json.loads((tiny_model / "ood.json").read_text())
        assert f"{ood['fused_threshold']:.3f}" in sections["Out-of-distribution thresholds"]
    else:
        assert "no readable ood.json" in sections["Out-of-distribution thresholds"]
    assert "meddx " in sections["meddx version and config"]


def test_evaluate_refreshes_only_the_metrics_and_shows_the_inputs_side_by_side(
    tiny_model: Path, sample_cache: Path, tmp_path: Path
) -> None:
    folder = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    before = (folder / CARD_FILE).read_text()
    run = diagnose(
        SAMPLE_MANIFEST, folder, tmp_path / "run", split="test", cache_dir=sample_cache, workers=0, progress=False
    )
    result = evaluate(
        run.predictions,
        SAMPLE_MANIFEST,
        tmp_path / "eval",
        by=["sex"],
        settings=MetricSettings(n_resamples=50),
        progress=False,
        model_card=folder,
        cache_dir=sample_cache,
    )
    after = (folder / CARD_FILE).read_text()
    old, new = card_sections(before), card_sections(after)
    assert [t for t in SECTIONS if old[t] != new[t]] == ["Metrics"]
    assert (
        before.split("\n---\n", 1)[1].split("<!-- meddx:metrics:begin")[0]
        == after.split("\n---\n", 1)[1].split("<!-- meddx:metrics:begin")[0]
    )

    overall = result.metrics["tasks"]["disease"]["overall"]
    auroc = overall["after_calibration"]["auroc"]
    coverage = overall["conformal"]["coverage"]
    assert (
        f"| all | {overall['n']} | {auroc['value']:.3f} [{auroc['low']:.3f}, {auroc['high']:.3f}] |" in new["Metrics"]
    )
    assert f"{coverage['value']:.3f} [{coverage['low']:.3f}, {coverage['high']:.3f}]" in new["Metrics"]
    for sex, table in result.metrics["tasks"]["disease"]["subgroups"]["sex"].items():
        assert f"| sex = {sex} | {table['n']} |" in new["Metrics"]
    tested = _front_matter(after)["model-index"][0]["results"][0]["metrics"]
    assert {"type": "roc_auc", "value": round(auroc["value"], 4), "name": "test AUROC"} in tested

    # the evaluated rows' inputs, from the cache diagnose filled, beside the training ones
    inputs = result.metrics["inputs"]
    test_rows = load_cohort(SAMPLE_MANIFEST).split("test")
    assert inputs["batch_rows"] == len(test_rows)
    assert inputs["batch"]["audio"]["sample_rate_hz"]["n"] == sum(Modality.AUDIO in r.paths for r in test_rows)
    assert inputs["training"] == json.loads((folder / TRAINING_SUMMARY_FILE).read_text())["inputs"]
    assert "Inputs: training rows and these rows" in result.report_path.read_text()
    assert "| modality | input | rows (training) |" in new["Metrics"]
    # diagnose's run.json sets the same summaries beside the training ones (read from the records it read)
    in_run = json.loads(run.run.read_text())["inputs"]
    assert in_run["training"] == inputs["training"]
    assert in_run["batch_rows"] == len(test_rows)
    assert in_run["batch"] == inputs["batch"]

    refresh_card_metrics(folder, result.metrics)  # the same figures again: the same card
    assert (folder / CARD_FILE).read_text() == after


def test_a_folder_without_card_or_summary_loads_and_a_bad_summary_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    fingerprint = check_model_folder(folder, fingerprint=True).fingerprint
    (folder / CARD_FILE).unlink()
    (folder / TRAINING_SUMMARY_FILE).unlink()
    checked = check_model_folder(folder, fingerprint=True)
    assert checked.training_summary is None
    assert checked.fingerprint == fingerprint  # they change no output
    card = card_sections(write_model_card(folder).read_text())
    assert "no training_summary.json" in card["Training data"]

    bad = {"format": "meddx-training-summary/1", "rows": {"train": -1}}
    (folder / TRAINING_SUMMARY_FILE).write_text(json.dumps(bad))
    with pytest.raises(ModelError, match=r"training_summary\.json: rows must map each split"):
        check_model_folder(folder)
    (folder / TRAINING_SUMMARY_FILE).write_text("[1, 2]")
    with pytest.raises(ModelError, match=r"training_summary\.json: format"):
        check_model_folder(folder)


def test_input_summaries_take_each_readers_facts() -> None:
    notes = [
        ModalityRecord(
            "notes",
            "n.txt",
            arrays={"attention_mask": [[1] * k + [0] * (8 - k)]},
            events=[Event(None, "note", "n.txt", text="x" * (10 * k))],
            meta={"n_notes": 1, "truncated": False},
        )
        for k in (2, 4, 6)
    ]
    ct = ModalityRecord(
        "imaging", "ct/", meta={"spacing_mm": [5.0, 0.7, 0.8], "window": [-1000, 1000], "modality": "CT"}
    )
    monitor = ModalityRecord(
        "device_logs",
        "v.csv",
        meta={"channels": ["hr", "spo2"], "n_samples": 240, "window_hours": 2.0, "step_minutes": 1.0},
    )
    ehr = [ModalityRecord("ehr", "e.json", meta={"age_years": age, "sex": "female"}) for age in (30, 50, 97)]
    summary = input_summaries([*notes, ct, monitor, *ehr])
    assert set(summary["ehr"]["age_years"]) == {"n", "p05", "median", "p95"}  # no one patient's own age
    assert summary["ehr"]["age_years"]["median"] == 50
    assert summary["notes"]["tokens"]["median"] == 4
    assert summary["notes"]["characters"]["max"] == 60
    assert summary["notes"]["truncated"]["counts"] == {"false": 3}
    assert summary["imaging"]["slice_spacing_mm"]["median"] == 5.0
    assert summary["imaging"]["pixel_spacing_mm"]["median"] == pytest.approx(0.75)
    assert summary["imaging"]["dicom_modality"]["counts"] == {"CT": 1}
    assert summary["device_logs"]["samples_per_channel_hour"]["median"] == 60.0
    assert list(summary) == ["imaging", "ehr", "notes", "device_logs"]  # the fixed modality order


def test_the_summary_counts_sites_and_keeps_dates_to_the_month(sample_cache: Path, tmp_path: Path) -> None:
    import pandas as pd

    from meddx.cache import RecordCache
    from meddx.data import prepare_cohort
    from meddx.data.summary import cohort_summary

    table = pd.read_csv(SAMPLE_MANIFEST, dtype=str, keep_default_na=False)
    for column in ("imaging", "ehr", "notes", "device_logs", "audio", "video"):
        table[column] = [str(SAMPLE_MANIFEST.parent / v) if v else "" for v in table[column]]
    table["site"] = ["north" if i % 3 else "south" for i in range(len(table))]
    table.to_csv(tmp_path / "manifest.csv", index=False)
    prepared = prepare_cohort(tmp_path / "manifest.csv", cache_dir=sample_cache, workers=0, progress=False)
    summary = cohort_summary(prepared.dataset().index, RecordCache(sample_cache), ["disease"])
    for split in ("train", "val", "test"):
        expected = Counter(table.site[table.split == split])
        assert summary["sites"][split] == dict(expected)
    assert "site" not in summary["subgroups"]  # shown as sites, not again as a subgroup
    months = sorted(t[:7] for t in table.index_time)
    assert summary["index_months"] == {"first": months[0], "last": months[-1]}
    assert not any(t in json.dumps(summary) for t in table.index_time)  # no row's own time
    assert not any(p in json.dumps(summary) for p in table.patient_id)

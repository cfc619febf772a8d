"""Acquisition checks: a row acquired outside the training rows' range (slice spacing, sampling
rate, an unseen DICOM modality) is flagged and named; rows inside it are not; ood.json keeps the
ranges and refuses bad ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from meddx.batch.predict import check_acquisition
from meddx.errors import ModelError
from meddx.models.input_ranges import UNSEEN_RATIO, InputRanges
from meddx.models.ood import OOD_JSON, fit_ood, load_ood
from meddx.predictions.types import TaskPrediction


def _ranges() -> InputRanges:
    rng = np.random.default_rng(0)
    return InputRanges.fit(
        {
            "imaging": [
                {"slice_spacing_mm": float(rng.choice([5.0, 6.0])), "pixel_spacing_mm": 0.7, "dicom_modality": "CT"}
                for _ in range(40)
            ],
            "device_logs": [{"channels": 3.0, "samples_per_channel_hour": float(v)} for v in rng.uniform(20, 60, 40)],
        }
    )


def test_rows_inside_the_training_range_are_not_flagged() -> None:
    ranges = _ranges()
    ratios, beyond = ranges.check(
        {
            "imaging": {"slice_spacing_mm": 6.0, "pixel_spacing_mm": 0.7, "dicom_modality": "CT"},
            "device_logs": {"channels": 3.0, "samples_per_channel_hour": 41.0},
        }
    )
    assert ratios == {"imaging": 0.0, "device_logs": 0.0}
    assert beyond == ()
    # a little beyond the range is tolerated (10% of its width plus 1% of its size)
    ratios, beyond = ranges.check({"imaging": {"slice_spacing_mm": 6.1, "pixel_spacing_mm": 0.7}})
    assert 0 < ratios["imaging"] < 1
    assert beyond == ()


def test_another_protocol_is_flagged_and_named() -> None:
    ranges = _ranges()
    ratios, beyond = ranges.check(
        {
            "imaging": {"slice_spacing_mm": 10.0, "pixel_spacing_mm": 0.7, "dicom_modality": "MR"},
            "device_logs": {"channels": 3.0, "samples_per_channel_hour": 240.0},
        }
    )
    assert ratios["imaging"] > 1
    assert ratios["device_logs"] > 1
    assert beyond == ("imaging.dicom_modality", "imaging.slice_spacing_mm", "device_logs.samples_per_channel_hour")
    assert ranges.check({"imaging": {"dicom_modality": "MR"}})[0]["imaging"] == UNSEEN_RATIO
    # a modality the ranges do not cover, or a fact the reader did not give, is not judged
    assert ranges.check({"audio": {"sample_rate_hz": 1.0}, "imaging": {"slice_spacing_mm": None}}) == (
        {"imaging": 0.0},
        (),
    )


def test_a_fact_seen_in_too_few_rows_is_not_checked() -> None:
    ranges = InputRanges.fit({"audio": [{"sample_rate_hz": 4000.0}] * 5})
    assert ranges.ranges == {}


def test_the_check_raises_the_modality_and_fused_scores_and_names_the_facts() -> None:
    ranges = _ranges()
    prediction = TaskPrediction(
        "P1", "2024-03-05T14:00:00Z", "disease", "binary", ("0", "1"), 3, (0.2, 0.8), (0.3, 0.7), "1",
        ood_scores={"imaging": 0.4, "ehr": 0.9}, ood=0.6,
    )  # fmt: skip
    same = check_acquisition([prediction], {3: {"imaging": {"slice_spacing_mm": 5.0}}}, ranges)[0]
    assert same.ood_scores == {"imaging": 0.4, "ehr": 0.9}
    assert same.ood == 0.6
    assert same.ood_inputs == ()
    moved = check_acquisition([prediction], {3: {"imaging": {"slice_spacing_mm": 10.0}}}, ranges)[0]
    assert moved.ood_scores["imaging"] > 1
    assert moved.ood_scores["ehr"] == 0.9
    assert moved.ood == moved.ood_scores["imaging"]
    assert moved.ood_inputs == ("imaging.slice_spacing_mm",)
    assert check_acquisition([prediction], {}, ranges)[0].ood_inputs == ()  # a row without facts


def test_ood_json_keeps_the_ranges_and_refuses_bad_ones(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    ood = fit_ood({"ehr": rng.normal(size=(60, 4))}, np.zeros(60, dtype=int), {"ehr": rng.normal(size=(40, 4))})
    assert ood is not None
    ood.input_ranges = _ranges()
    ood.save(tmp_path)
    loaded = load_ood(tmp_path)
    assert loaded is not None
    assert loaded.input_ranges is not None
    assert loaded.input_ranges.ranges == ood.input_ranges.ranges
    meta = json.loads((tmp_path / OOD_JSON).read_text())
    for bad in (
        {"imaging": {"slice_spacing_mm": {"low": 6.0, "high": 5.0}}},
        {"imaging": {"slice_spacing_mm": {"low": "5", "high": 6.0}}},
        {"imaging": {"dicom_modality": {"seen": []}}},
        {"imaging": {"slice_spacing_mm": {"low": 5.0}}},
        ["imaging"],
    ):
        (tmp_path / OOD_JSON).write_text(json.dumps({**meta, "input_ranges": bad}))
        with pytest.raises(ModelError, match="input_ranges"):
            load_ood(tmp_path)
    del meta["input_ranges"]  # a folder fitted before the ranges were kept still loads, unchecked
    (tmp_path / OOD_JSON).write_text(json.dumps(meta))
    old = load_ood(tmp_path)
    assert old is not None
    assert old.input_ranges is None

"""Typed predictions: what DiagnosisModel.task_predictions makes of a batch's logits, the table rows
they become, and their trip through JSON (the Ray engine's actors hand them back so)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from model_batches import MODALITIES, fitted_aligner, random_patient, tiny_backbone_config

from meddx.calibration import ConformalClassifier, TaskCalibration, TemperatureScaler
from meddx.cohort import TaskSpec
from meddx.models import FoundationBackbone
from meddx.models.diagnosis import DiagnosisModel
from meddx.predictions import SET_SEPARATOR, TaskPrediction, error_row, prediction_frame, prediction_row
from meddx.predictions.columns import HEAD_COLUMNS, column_order
from meddx.records import Modality, collate

MIXES = [MODALITIES, (Modality.EHR, Modality.AUDIO), (Modality.NOTES,)]


@pytest.fixture(scope="module")
def model_and_batch(tmp_path_factory):
    aligner, _ = fitted_aligner()
    torch.manual_seed(0)
    backbone = FoundationBackbone.from_aligner(tiny_backbone_config(), aligner, tmp_path_factory.mktemp("text"))
    tasks = {"d": TaskSpec("d", "binary", ("0", "1")), "s": TaskSpec("s", "multiclass", ("a", "b", "c"))}
    model = DiagnosisModel(backbone, tasks).eval()
    rng = np.random.default_rng(0)
    binary_logits, binary_labels = rng.normal(size=200), rng.integers(0, 2, 200)
    multi_logits, multi_labels = rng.normal(size=(200, 3)), rng.integers(0, 3, 200)
    binary = TemperatureScaler().fit(binary_logits, binary_labels)
    multi = TemperatureScaler().fit(multi_logits, multi_labels)
    model.calibration = {
        "d": TaskCalibration(("0", "1"), binary, None),
        "s": TaskCalibration(
            ("a", "b", "c"), multi, ConformalClassifier(alpha=0.2).fit(multi.transform(multi_logits), multi_labels)
        ),
    }
    spec = aligner.array_spec()
    items = [random_patient(spec, mods, 10 + i, f"p{i}") for i, mods in enumerate(MIXES)]
    for i, item in enumerate(items):
        item.row = 7 + i
    return model, collate(items, aligner.tensor_spec())


def test_task_predictions_are_the_calibrated_logits_with_sets_and_contributions(model_and_batch) -> None:
    model, batch = model_and_batch
    logits, withheld = model.batch_logits(batch)
    predictions = model.task_predictions(batch)
    assert [(p.task, p.patient_id, p.row) for p in predictions] == [
        (t, f"p{i}", 7 + i) for t in ("d", "s") for i in range(len(MIXES))
    ]  # task by task, each in batch order (as the table writer and the cohort predictor expect)
    for i, p in enumerate(predictions[:3]):  # binary
        calibrated = float(model.calibration["d"].calibrator.transform(logits["d"])[i])
        assert p.kind == "binary"
        assert p.is_binary
        assert p.classes == ("0", "1")
        assert p.probability == calibrated
        assert p.probabilities == (1 - calibrated, calibrated)
        assert p.raw_probability == pytest.approx(1 / (1 + np.exp(-logits["d"][i])))
        assert p.prediction == ("1" if calibrated >= 0.5 else "0")
        assert p.prediction_set is None
        assert p.modalities == tuple(m.value for m in MODALITIES if m in MIXES[i])
        assert list(p.contributions) == list(p.modalities) == list(p.ablations)  # present ones only, in order
        for name, change in p.contributions.items():
            without = withheld[Modality(name)]["d"]
            assert change == pytest.approx(logits["d"][i] - without[i])
            assert p.ablations[name][1] == pytest.approx(model.calibration["d"].calibrator.transform(without)[i])
    present = batch.present.numpy()
    sets = model.calibration["s"].conformal.predict_set(model.calibrated("s", logits["s"]), present)
    for i, p in enumerate(predictions[3:]):  # multiclass
        calibrated = model.calibrated("s", logits["s"])[i]
        chosen = int(calibrated.argmax())
        assert p.kind == "multiclass"
        assert p.prediction == "abc"[chosen]
        assert p.probability == pytest.approx(calibrated.max())
        assert sum(p.probabilities) == pytest.approx(1)
        assert p.prediction_set == tuple(c for k, c in enumerate("abc") if sets[i, k])
        for name, change in p.contributions.items():  # on the predicted class's logit
            assert change == pytest.approx(logits["s"][i, chosen] - withheld[Modality(name)]["s"][i, chosen])
    plain = model.task_predictions(batch, contributions=False)
    assert all(p.contributions == {} == p.ablations for p in plain)
    for without, full in zip(plain, predictions, strict=True):
        assert np.allclose(without.probabilities, full.probabilities, atol=1e-6)


def test_prediction_rows_hold_the_contract_columns(model_and_batch) -> None:
    model, batch = model_and_batch
    predictions = model.task_predictions(batch)
    binary, multi = prediction_row(predictions[0]), prediction_row(predictions[3])
    assert binary["status"] == "ok"
    assert binary["modalities"] == SET_SEPARATOR.join(predictions[0].modalities)
    assert binary["probability"] == predictions[0].probability
    assert "prediction_set" not in binary
    assert not any(c.startswith("probability:") for c in binary)
    assert {f"ablation:{m}" for m in predictions[0].modalities} <= set(binary)
    assert [multi[f"probability:{c}"] for c in "abc"] == list(predictions[3].probabilities)
    assert multi["prediction_set"] == SET_SEPARATOR.join(predictions[3].prediction_set)
    assert {f"ablation:{m}:{c}" for m in predictions[3].modalities for c in "abc"} <= set(multi)
    assert "modality_errors" not in binary  # not known outside a diagnose run
    frame = prediction_frame(predictions)
    assert len(frame) == 6
    assert list(frame["task"]) == ["d"] * 3 + ["s"] * 3
    order = column_order(list(frame.columns))
    assert order[: len([c for c in HEAD_COLUMNS if c in frame.columns])] == [c for c in HEAD_COLUMNS if c in frame]
    assert order[-1] == "_row"
    error = error_row("p9", "2024-03-05T14:00:00Z", "d", 12, ["audio", "video"])
    assert error["status"] == "error"
    assert error["modality_errors"] == "audio|video"
    assert error["modalities"] == ""


def test_a_prediction_goes_through_json_bit_for_bit(model_and_batch) -> None:
    model, batch = model_and_batch
    for p in model.task_predictions(batch):
        back = TaskPrediction.from_json(json.loads(json.dumps(p.to_json())))
        assert back == p
        assert prediction_row(back) == prediction_row(p)

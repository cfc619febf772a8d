"""FHIR RiskAssessments made from typed predictions: valid R4, the model's provenance, the
patient only as a logical identifier, the outcome per class, the reasons in order."""

from __future__ import annotations

import hashlib

import pytest
from fhir.resources.R4B.riskassessment import RiskAssessment

from meddx.export.fhir import EXTENSION_BASE, ModelProvenance, risk_assessment, risk_assessments
from meddx.predictions import TaskPrediction

MODEL = ModelProvenance(
    "chest-ct",
    "ab" * 32,
    "0.1.0",
    {"disease": 0.1, "stage": None},
    {"disease": "TemperatureScaler", "stage": "IsotonicCalibrator"},
)


def _binary(**changes) -> TaskPrediction:
    fields = dict(
        patient_id="P7",
        index_time="2024-03-05T14:00:00Z",
        task="disease",
        kind="binary",
        classes=("0", "1"),
        row=3,
        probabilities=(0.25, 0.75),
        raw_probabilities=(0.4, 0.6),
        prediction="1",
        prediction_set=("1",),
        modalities=("imaging", "ehr"),
        contributions={"imaging": 0.2, "ehr": -0.9},
        ablations={"imaging": (0.5, 0.5), "ehr": (0.1, 0.9)},
    )
    return TaskPrediction(**{**fields, **changes})


def _extensions(resource: dict) -> dict[str, object]:
    return {
        e["url"].removeprefix(EXTENSION_BASE): next(v for k, v in e.items() if k != "url")
        for e in resource["extension"]
    }


def test_a_binary_prediction_becomes_one_valid_outcome_with_its_provenance() -> None:
    resource = risk_assessment(_binary(), MODEL)
    RiskAssessment.model_validate(resource)
    assert resource["subject"] == {
        "type": "Patient",
        "identifier": {"system": "urn:meddx:manifest-patient-id", "value": "P7"},
    }
    assert resource["occurrenceDateTime"] == "2024-03-05T14:00:00Z"
    assert resource["status"] == "final"
    [outcome] = resource["prediction"]
    assert outcome["outcome"]["coding"][0]["code"] == "1"
    assert outcome["probabilityDecimal"] == 0.75
    # the modality that moved the logit most comes first
    assert outcome["rationale"] == "change of the logit when each modality is withheld: ehr -0.900, imaging +0.200"
    assert [b["display"] for b in resource["basis"]] == ["imaging", "ehr"]
    extensions = _extensions(resource)
    assert extensions == {
        "model-version": "meddx 0.1.0",
        "model-sha256": "ab" * 32,
        "predicted-class": "1",
        "raw-probability": 0.6,
        "calibration-alpha": 0.1,
        "conformal-set": "1",
    }
    note = resource["note"][0]["text"]
    assert "conformal set {1} (holds the true class with probability 90%)" in note
    assert "calibrated by TemperatureScaler" in note
    identity = hashlib.sha256(b"P7\x1f2024-03-05T14:00:00Z\x1fdisease\x1f" + ("ab" * 32).encode()).hexdigest()
    assert resource["identifier"][0]["value"] == identity
    assert resource["id"] == identity[:64]


def test_a_multiclass_prediction_gives_every_class_its_probability() -> None:
    prediction = _binary(
        task="stage",
        kind="multiclass",
        classes=("0", "1", "2"),
        probabilities=(0.2, 0.5, 0.3),
        raw_probabilities=(0.3, 0.4, 0.3),
        prediction="1",
        prediction_set=("1", "2"),
        contributions={},
        ablations={},
    )
    resource = risk_assessment(prediction, MODEL)
    RiskAssessment.model_validate(resource)
    assert [(o["outcome"]["coding"][0]["code"], o["probabilityDecimal"]) for o in resource["prediction"]] == [
        ("0", 0.2),
        ("1", 0.5),
        ("2", 0.3),
    ]  # not taken for binary although it has classes 0 and 1
    assert not any("rationale" in o for o in resource["prediction"])
    extensions = _extensions(resource)
    assert extensions["raw-probability"] == 0.4  # of the predicted class
    assert "conformal-set" not in extensions
    assert "calibration-alpha" not in extensions
    assert "no conformal set" in resource["note"][0]["text"]


def test_a_prediction_without_modalities_or_set_leaves_them_out() -> None:
    resource = risk_assessment(_binary(modalities=(), prediction_set=None, contributions={}, ablations={}), MODEL)
    RiskAssessment.model_validate(resource)
    assert "basis" not in resource
    assert "conformal-set" not in _extensions(resource)
    assert "no conformal set" in resource["note"][0]["text"]


def test_resources_follow_the_predictions_and_differ_per_task_and_time() -> None:
    predictions = [_binary(), _binary(index_time="2024-03-06T14:00:00Z"), _binary(task="stage")]
    resources = list(risk_assessments(predictions, MODEL))
    assert [r["code"]["coding"][0]["code"] for r in resources] == ["disease", "disease", "stage"]
    assert len({r["id"] for r in resources}) == 3
    assert "P7" not in resources[0]["id"]


def test_an_unknown_time_does_not_validate() -> None:
    from meddx.errors import ModelError

    with pytest.raises(ModelError, match="does not validate as FHIR R4"):
        risk_assessment(_binary(index_time="not a time"), MODEL)

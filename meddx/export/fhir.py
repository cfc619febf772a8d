"""Prediction rows as FHIR R4 ``RiskAssessment`` resources, validated before they are written.

One resource per :class:`~meddx.predictions.types.TaskPrediction` (a diagnosed row and task):

* ``subject``: the patient, as a logical reference by the manifest's ``patient_id`` (no name,
  no birth date, nothing else about the patient);
* ``occurrenceDateTime``: the index time (the moment the assessment speaks for);
* ``code``: the task; ``method``: the model (its folder name, meddx version, model hash);
* ``prediction``: per class its calibrated probability (binary tasks: class ``1``), with the
  contributions of the modalities as ``rationale``;
* ``basis``: one reference (by display) per modality the prediction used;
* provenance as extensions: model version and SHA-256, calibration alpha, the conformal set,
  the predicted class and the uncalibrated probability; the same in words in ``note``;
* a row flagged out of distribution (``ood`` above 1, :mod:`meddx.models.ood`) gets a second
  ``note`` naming the flagged modalities, and ``status`` ``preliminary`` when the run abstains on it.

The resources are validated with ``fhir.resources`` (its R4B models: R4 and R4B share this
resource) and any that does not validate is a :class:`~meddx.errors.ModelError`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from meddx.errors import ModelError
from meddx.predictions.columns import SET_SEPARATOR
from meddx.predictions.types import TaskPrediction

EXTENSION_BASE = "https://meddx.dev/fhir/StructureDefinition/"
PATIENT_ID_SYSTEM = "urn:meddx:manifest-patient-id"
MODEL_SYSTEM = "urn:meddx:model"
PREDICTION_ID_SYSTEM = "urn:meddx:prediction"


@dataclass(frozen=True)
class ModelProvenance:
    """What the resources say about the model that made them.

    Attributes:
        name: the model folder's name.
        sha256: SHA-256 of its ``model.safetensors``.
        meddx_version: the meddx that ran it.
        alpha: conformal miscoverage per task (None: the task has no conformal sets).
        calibration: calibration method per task (``temperature``, ``isotonic``).
    """

    name: str
    sha256: str
    meddx_version: str
    alpha: Mapping[str, float | None]
    calibration: Mapping[str, str]


def _extension(name: str, **value: Any) -> dict[str, Any]:
    return {"url": EXTENSION_BASE + name, **value}


def risk_assessment(prediction: TaskPrediction, model: ModelProvenance) -> dict[str, Any]:
    """The RiskAssessment (a validated JSON-able dict) of one prediction.

    Args:
        prediction: one task's prediction for one patient at one index time.
        model: the model's provenance.

    Raises:
        ModelError: the resource does not validate.

    Example:
        >>> model = ModelProvenance("model", "ab" * 32, "0.1.0", {"disease": 0.1}, {"disease": "temperature"})
        >>> prediction = TaskPrediction("P1", "2024-03-05T14:00:00Z", "disease", "binary", ("0", "1"), 1,
        ...     (0.2, 0.8), (0.3, 0.7), "1", ("1",), ("imaging", "ehr"), {"imaging": 0.4}, {"imaging": (0.5, 0.5)})
        >>> resource = risk_assessment(prediction, model)
        >>> resource["prediction"][0]["probabilityDecimal"], [b["display"] for b in resource["basis"]]
        (0.8, ['imaging', 'ehr'])
    """
    from fhir.resources.R4B.riskassessment import RiskAssessment
    from pydantic import ValidationError

    task = prediction.task
    patient_id, index_time = prediction.patient_id, prediction.index_time
    contributions = sorted(prediction.contributions.items(), key=lambda item: -abs(item[1]))
    rationale = (
        "change of the logit when each modality is withheld: "
        + ", ".join(f"{name} {value:+.3f}" for name, value in contributions)
        if contributions
        else None
    )
    if prediction.is_binary:
        outcomes = [("1", prediction.probability)]
    else:
        outcomes = list(zip(prediction.classes, prediction.probabilities, strict=True))
    predictions = []
    for name, probability in outcomes:
        entry: dict[str, Any] = {
            "outcome": {"coding": [{"system": f"urn:meddx:task:{task}", "code": name}], "text": f"{task} = {name}"},
        }
        if probability is not None and not math.isnan(probability):
            entry["probabilityDecimal"] = round(float(probability), 6)
        if rationale:
            entry["rationale"] = rationale
        predictions.append(entry)

    alpha = model.alpha.get(task)
    prediction_set = None if prediction.prediction_set is None else SET_SEPARATOR.join(prediction.prediction_set)
    extensions = [
        _extension("model-version", valueString=f"meddx {model.meddx_version}"),
        _extension("model-sha256", valueString=model.sha256),
        _extension("predicted-class", valueString=prediction.prediction),
    ]
    raw = prediction.raw_probability
    if not math.isnan(raw):
        extensions.append(_extension("raw-probability", valueDecimal=round(float(raw), 6)))
    if alpha is not None:
        extensions.append(_extension("calibration-alpha", valueDecimal=alpha))
    if prediction_set is not None and alpha is not None:
        extensions.append(_extension("conformal-set", valueString=str(prediction_set)))
    set_text = (
        f"conformal set {{{', '.join(filter(None, str(prediction_set).split(SET_SEPARATOR)))}}} "
        f"(holds the true class with probability {1 - alpha:.0%})"
        if alpha is not None and prediction_set is not None
        else "no conformal set"
    )
    note = (
        f"Predicted {task} = {prediction.prediction} by meddx model {model.name} (sha256 {model.sha256[:12]}..., "
        f"meddx {model.meddx_version}); probabilities calibrated by {model.calibration.get(task, 'nothing')}; "
        f"{set_text}."
    )
    notes = [{"text": note}]
    if prediction.ood is not None and prediction.ood > 1:
        notes.append({"text": _ood_note(prediction)})
    identity = hashlib.sha256(f"{patient_id}\x1f{index_time}\x1f{task}\x1f{model.sha256}".encode()).hexdigest()
    modalities = list(prediction.modalities)
    resource = {
        "resourceType": "RiskAssessment",
        "id": identity[:64],
        "identifier": [{"system": PREDICTION_ID_SYSTEM, "value": identity}],
        "extension": extensions,
        "status": "preliminary" if prediction.abstain else "final",
        "code": {"coding": [{"system": "urn:meddx:task", "code": task}], "text": task},
        "subject": {"type": "Patient", "identifier": {"system": PATIENT_ID_SYSTEM, "value": patient_id}},
        "occurrenceDateTime": index_time,
        "method": {
            "coding": [{"system": MODEL_SYSTEM, "code": model.name, "version": model.meddx_version}],
            "text": f"meddx DiagnosisModel {model.name} (model.safetensors sha256 {model.sha256})",
        },
        "basis": [{"display": m} for m in modalities],
        "prediction": predictions,
        "note": notes,
    }
    if not resource["basis"]:
        del resource["basis"]
    try:
        RiskAssessment.model_validate(resource)
    except ValidationError as exc:
        raise ModelError(f"the RiskAssessment of task {task!r} does not validate as FHIR R4: {exc}") from None
    return resource


def _ood_note(prediction: TaskPrediction) -> str:
    """What a RiskAssessment says of a row flagged out of distribution (``ood`` above 1)."""
    names = [("the fused patient summary" if s == "summary" else s) for s in prediction.flagged]
    where = ", ".join(names) if names else "no single modality (only their combination)"
    if prediction.ood_inputs:
        where += f" (acquired outside the training rows' range: {', '.join(prediction.ood_inputs)})"
    action = "the model abstains: review before use" if prediction.abstain else "use with care"
    return (
        f"Out of distribution: this row looks unlike the model's training rows (fused OOD score "
        f"{prediction.ood:.2f} x its threshold); flagged: {where}; {action}."
    )


def risk_assessments(predictions: Iterable[TaskPrediction], model: ModelProvenance) -> Iterator[dict[str, Any]]:
    """One validated RiskAssessment per prediction, in their order."""
    for prediction in predictions:
        yield risk_assessment(prediction, model)

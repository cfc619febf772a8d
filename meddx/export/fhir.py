"""Prediction rows as FHIR R4 ``RiskAssessment`` resources, validated before they are written.

One resource per prediction row with status ``ok``:

* ``subject``: the patient, as a logical reference by the manifest's ``patient_id`` (no name,
  no birth date, nothing else about the patient);
* ``occurrenceDateTime``: the index time (the moment the assessment speaks for);
* ``code``: the task; ``method``: the model (its folder name, meddx version, model hash);
* ``prediction``: per class its calibrated probability (binary tasks: class ``1``), with the
  contributions of the modalities as ``rationale``;
* ``basis``: one reference (by display) per modality the prediction used;
* provenance as extensions: model version and SHA-256, calibration alpha, the conformal set,
  the predicted class and the uncalibrated probability; the same in words in ``note``.

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

EXTENSION_BASE = "https://meddx.dev/fhir/StructureDefinition/"
PATIENT_ID_SYSTEM = "urn:meddx:manifest-patient-id"
MODEL_SYSTEM = "urn:meddx:model"
PREDICTION_ID_SYSTEM = "urn:meddx:prediction"
SET_SEPARATOR = "|"


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


def _cell(row: Mapping[str, Any], column: str) -> Any:
    value = row.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _extension(name: str, **value: Any) -> dict[str, Any]:
    return {"url": EXTENSION_BASE + name, **value}


def risk_assessment(row: Mapping[str, Any], classes: tuple[str, ...], model: ModelProvenance) -> dict[str, Any]:
    """The RiskAssessment (a validated JSON-able dict) of one ``ok`` prediction row.

    Args:
        row: one row of the predictions table (column -> value).
        classes: the task's classes (``("0", "1")`` for a binary task).
        model: the model's provenance.

    Raises:
        ModelError: the row is not ``ok``, or the resource does not validate.

    Example:
        >>> model = ModelProvenance("model", "ab" * 32, "0.1.0", {"disease": 0.1}, {"disease": "temperature"})
        >>> row = {"patient_id": "P1", "index_time": "2024-03-05T14:00:00Z", "task": "disease", "status": "ok",
        ...        "probability": 0.8, "raw_probability": 0.7, "prediction": "1", "prediction_set": "1",
        ...        "modalities": "imaging|ehr", "contribution:imaging": 0.4}
        >>> resource = risk_assessment(row, ("0", "1"), model)
        >>> resource["prediction"][0]["probabilityDecimal"], [b["display"] for b in resource["basis"]]
        (0.8, ['imaging', 'ehr'])
    """
    from fhir.resources.R4B.riskassessment import RiskAssessment
    from pydantic import ValidationError

    if row.get("status") != "ok":
        raise ModelError(f"a RiskAssessment is only made for rows with status ok, not {row.get('status')!r}")
    task = str(row["task"])
    patient_id, index_time = str(row["patient_id"]), str(row["index_time"])
    binary = tuple(classes) == ("0", "1")
    contributions = sorted(
        (
            (column.removeprefix("contribution:"), float(v))
            for column, v in row.items()
            if column.startswith("contribution:") and _cell(row, column) is not None
        ),
        key=lambda item: -abs(item[1]),
    )
    rationale = (
        "change of the logit when each modality is withheld: "
        + ", ".join(f"{name} {value:+.3f}" for name, value in contributions)
        if contributions
        else None
    )
    if binary:
        outcomes = [("1", _cell(row, "probability"))]
    else:
        outcomes = [(c, _cell(row, f"probability:{c}")) for c in classes]
    predictions = []
    for name, probability in outcomes:
        entry: dict[str, Any] = {
            "outcome": {"coding": [{"system": f"urn:meddx:task:{task}", "code": name}], "text": f"{task} = {name}"},
        }
        if probability is not None:
            entry["probabilityDecimal"] = round(float(probability), 6)
        if rationale:
            entry["rationale"] = rationale
        predictions.append(entry)

    alpha = model.alpha.get(task)
    prediction_set = _cell(row, "prediction_set")
    extensions = [
        _extension("model-version", valueString=f"meddx {model.meddx_version}"),
        _extension("model-sha256", valueString=model.sha256),
        _extension("predicted-class", valueString=str(row["prediction"])),
    ]
    raw = _cell(row, "raw_probability")
    if raw is not None:
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
        f"Predicted {task} = {row['prediction']} by meddx model {model.name} (sha256 {model.sha256[:12]}..., "
        f"meddx {model.meddx_version}); probabilities calibrated by {model.calibration.get(task, 'nothing')}; "
        f"{set_text}."
    )
    identity = hashlib.sha256(f"{patient_id}\x1f{index_time}\x1f{task}\x1f{model.sha256}".encode()).hexdigest()
    modalities = [m for m in str(row.get("modalities") or "").split(SET_SEPARATOR) if m]
    resource = {
        "resourceType": "RiskAssessment",
        "id": identity[:64],
        "identifier": [{"system": PREDICTION_ID_SYSTEM, "value": identity}],
        "extension": extensions,
        "status": "final",
        "code": {"coding": [{"system": "urn:meddx:task", "code": task}], "text": task},
        "subject": {"type": "Patient", "identifier": {"system": PATIENT_ID_SYSTEM, "value": patient_id}},
        "occurrenceDateTime": index_time,
        "method": {
            "coding": [{"system": MODEL_SYSTEM, "code": model.name, "version": model.meddx_version}],
            "text": f"meddx DiagnosisModel {model.name} (model.safetensors sha256 {model.sha256})",
        },
        "basis": [{"display": m} for m in modalities],
        "prediction": predictions,
        "note": [{"text": note}],
    }
    if not resource["basis"]:
        del resource["basis"]
    try:
        RiskAssessment.model_validate(resource)
    except ValidationError as exc:
        raise ModelError(f"the RiskAssessment of task {task!r} does not validate as FHIR R4: {exc}") from None
    return resource


def risk_assessments(
    rows: Iterable[Mapping[str, Any]], tasks: Mapping[str, tuple[str, ...]], model: ModelProvenance
) -> Iterator[dict[str, Any]]:
    """One validated RiskAssessment per ``ok`` row (others are skipped).

    Args:
        rows: prediction rows (e.g. ``frame.to_dict("records")``).
        tasks: task -> its classes.
        model: the model's provenance.
    """
    for row in rows:
        if row.get("status") == "ok":
            yield risk_assessment(row, tasks[str(row["task"])], model)

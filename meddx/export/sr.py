"""Predictions back to the PACS: one DICOM Structured Report per prediction, stored with STOW-RS.

:func:`build_prediction_sr` writes a Comprehensive 3D SR (``highdicom``) holding a TID 1500
Measurement Report with one measurement group for the prediction:

* the **task** (the group's tracking identifier, ``meddx <task>``, and the measurement's name);
* the **calibrated probability** (a numeric measurement, UCUM unit ``1``) of class ``1`` for a
  binary task, of the predicted class for a multiclass one, as the predictions contract says;
* the **predicted class** and each member of the **conformal set** (qualitative evaluations;
  an empty set is written as such);
* the **model's name and version** (TID 4019 algorithm identification on the group and the
  measurement, and the device observer of the observation context);
* the **source**: every instance of the source series in the SR's evidence
  (``CurrentRequestedProcedureEvidenceSequence``); the SR joins the source study as a new
  series, so the radiologist's viewer shows it beside the images.

The codes meddx invents (task, probability, set member) use the private coding scheme
``99MEDDX``. The SR copies the patient and study module from the source images; nothing is
logged about them. :func:`store_srs` sends SRs with STOW-RS through a ``dicomweb-client``
client (see :func:`meddx.dicomweb.client.connect`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meddx.errors import MeddxError, PredictionsError
from meddx.predictions.columns import (
    ABSTAIN,
    OK,
    PATIENT_ID,
    PREDICTION,
    PREDICTION_SET,
    PROBABILITY,
    SET_SEPARATOR,
    STATUS,
    TASK,
)

if TYPE_CHECKING:
    import highdicom
    from dicomweb_client import DICOMwebClient
    from pydicom.dataset import Dataset

SCHEME = "99MEDDX"
SR_SERIES_NUMBER = 9901
SR_SERIES_DESCRIPTION = "meddx prediction"


class SRStoreError(MeddxError):
    """The PACS did not store a Structured Report (STOW-RS failed or refused instances)."""


@dataclass(frozen=True)
class ModelInfo:
    """Which model made the predictions, as written into each SR.

    Example:
        >>> ModelInfo("meddx-chest-ct", "0.1.0").version
        '0.1.0'
    """

    name: str
    version: str
    manufacturer: str = "meddx"


def _cell(row: Mapping[str, Any], column: str) -> str:
    value = row.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _concept(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning[:64])


def build_prediction_sr(
    source_series_datasets: Sequence[Dataset],
    prediction_row: Mapping[str, Any],
    model_info: ModelInfo,
    *,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
) -> highdicom.sr.Comprehensive3DSR:
    """One Comprehensive 3D SR for one prediction row, referencing the source series' instances.

    Args:
        source_series_datasets: the instances of the series the prediction was made on (pixel
            data is not needed; headers read with ``stop_before_pixels`` do).
        prediction_row: a row of the predictions contract (``patient_id``, ``index_time``,
            ``task``, ``probability``, ``prediction``, ``prediction_set``, ``status``...), e.g. a
            ``dict`` or a pandas row. An ``abstain`` row (out of distribution) gets an
            "Out-of-distribution flag" evaluation saying so.
        model_info: the model's name and version.
        series_instance_uid: the SR series (pass the same one for every SR of a run); a new one
            when None.
        sop_instance_uid: the SR's own UID; a new one when None. Deriving it from the run and
            the row makes storing it again (a resumed run) replace it rather than add a copy.
        instance_number: the SR's number within its series.

    Raises:
        PredictionsError: the row is not an ``ok`` or ``abstain`` prediction with a probability, or its
            ``patient_id`` is not the source images' PatientID (named by column, not by value).

    Example:
        >>> from pathlib import Path
        >>> from meddx.ingest.dicom_io import read_dicom
        >>> series = [read_dicom(path) for path in sorted(Path("sample_data/patients/P0001/ct").iterdir())]
        >>> sr = build_prediction_sr(series, {"patient_id": "P0001", "index_time": "2024-12-03T08:27:00Z",
        ...     "task": "disease", "probability": 0.83, "prediction": "1", "prediction_set": "1",
        ...     "status": "ok"}, ModelInfo("meddx-demo", "0.1.0"))
        >>> sr.Modality, sr.StudyInstanceUID == series[0].StudyInstanceUID  # a new series in the source study
        ('SR', True)
    """
    from highdicom.sr import (
        AlgorithmIdentification,
        Comprehensive3DSR,
        DeviceObserverIdentifyingAttributes,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        ObservationContext,
        ObserverContext,
        QualitativeEvaluation,
        TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    if not source_series_datasets:
        raise PredictionsError("a prediction SR needs the source series' instances; none were given")
    status = _cell(prediction_row, STATUS)
    if status not in ("", OK, ABSTAIN):
        raise PredictionsError("only rows with status 'ok' or 'abstain' become SRs; this row failed")
    task = _cell(prediction_row, TASK)
    if not task:
        raise PredictionsError("the prediction row has no task")
    try:
        probability = float(_cell(prediction_row, PROBABILITY))
    except ValueError:
        raise PredictionsError(f"the prediction row of task {task!r} has no probability") from None
    if not 0.0 <= probability <= 1.0:
        raise PredictionsError(f"the probability of task {task!r} is outside [0, 1]")
    first = source_series_datasets[0]
    if _cell(prediction_row, PATIENT_ID) != str(first.get("PatientID", "")).strip():
        raise PredictionsError(
            "the prediction row's patient_id is not the source series' PatientID; pair each row with its own series"
        )
    prediction = _cell(prediction_row, PREDICTION)
    members = [c for c in _cell(prediction_row, PREDICTION_SET).split(SET_SEPARATOR) if c]

    algorithm = AlgorithmIdentification(name=model_info.name, version=model_info.version)
    tracking = TrackingIdentifier(uid=generate_uid(), identifier=f"meddx {task}")
    measurement = Measurement(
        name=_concept(f"p-{task}"[:16], f"Calibrated probability of {task}"),
        value=probability,
        unit=_unit_one(),
        algorithm_id=algorithm,
    )
    evaluations = []
    if prediction:
        evaluations.append(
            QualitativeEvaluation(_concept("prediction", "Predicted class"), _concept(prediction[:16], prediction))
        )
    set_name = _concept("conformal-set", "Conformal prediction set member")
    if members:
        evaluations += [QualitativeEvaluation(set_name, _concept(c[:16], c)) for c in members]
    else:
        evaluations.append(QualitativeEvaluation(set_name, _concept("empty-set", "Empty conformal set")))
    if status == ABSTAIN:  # out of distribution: the prediction is kept, and says it should not be relied on
        evaluations.append(
            QualitativeEvaluation(
                _concept("ood-flag", "Out-of-distribution flag"),
                _concept("abstain", "Abstained: inputs unlike the model's training data"),
            )
        )
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        measurements=[measurement],
        qualitative_evaluations=evaluations,
        algorithm_id=algorithm,
    )
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=generate_uid(),
            name=model_info.name,
            manufacturer_name=model_info.manufacturer,
            model_name=f"{model_info.name} {model_info.version}",
        ),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=_concept("imaging", "Imaging procedure"),
        imaging_measurements=[group],
    )
    return Comprehensive3DSR(
        evidence=[_evidence(ds) for ds in source_series_datasets],
        content=report[0],
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=instance_number,
        manufacturer=model_info.manufacturer,
        series_description=SR_SERIES_DESCRIPTION,
        is_complete=True,
    )


# What the SR copies from its evidence: identity of each instance, and the patient and study
# modules (type 2: present, maybe empty, which many real files and the synthetic ones are not).
_IDENTITY = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def _evidence(source: Dataset) -> Dataset:
    """A header-only copy of a source instance with what the SR needs (no pixels, no other attributes)."""
    from pydicom.dataset import Dataset

    copy = Dataset()
    for keyword in _IDENTITY:
        if keyword not in source:
            raise PredictionsError(f"a source instance lacks {keyword}; pass the series' DICOM instances")
        setattr(copy, keyword, getattr(source, keyword))
    for keyword in _TYPE_2:
        setattr(copy, keyword, getattr(source, keyword) if keyword in source else "")
    return copy


def _unit_one():
    from highdicom.sr import CodedConcept

    return CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")


def store_srs(client: DICOMwebClient, srs: Sequence[Dataset]) -> list[str]:
    """Store SRs on the PACS with STOW-RS; returns their SOPInstanceUIDs.

    Raises:
        SRStoreError: the request failed, or the server refused some instances
            (its ``FailedSOPSequence``); the message gives the HTTP status or the count.

    Example:
        >>> store_srs(connect(config.dicomweb), [sr])  # doctest: +SKIP
        ['1.2.826.0.1.3680043.8.498.1']
    """
    import requests

    if not srs:
        return []
    try:
        answer = client.store_instances(list(srs))
    except requests.RequestException as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        why = f"HTTP {status}" if status is not None else type(exc).__name__
        raise SRStoreError(f"STOW-RS of {len(srs)} SR(s) failed ({why}); nothing may have been stored") from None
    failed = answer.get("FailedSOPSequence") if answer is not None else None
    if failed:
        raise SRStoreError(f"the PACS refused {len(failed)} of {len(srs)} SR(s) (FailedSOPSequence)")
    return [str(sr.SOPInstanceUID) for sr in srs]

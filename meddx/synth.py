"""Synthetic multimodal cohort in the real file formats (used for ``sample_data`` and tests).

Every patient has a hidden *severity* ``s ~ N(0, 1)``. The binary label ``label:disease``
(a pneumonia-like illness, prevalence about 40 %) is ``1`` when ``s`` plus a little noise
crosses a threshold. Each modality then sees its own *view* of the severity,
``s + VIEW_NOISE[modality] * e`` with independent ``e ~ N(0, 1)``, and every writer adds
nuisance of its own (anatomy, units, sample rates, artefacts). So each modality alone is a
weak predictor of the label (cross-validated AUROC about 0.7-0.83 for one simple feature
and a logistic regression), while combining the six noisy views averages their noise away
(AUROC about 0.88-0.92; see ``tests/test_synth.py``). The evidence per modality:

- **imaging**: a CT-like DICOM series (int16 stored values, rescale to Hounsfield units,
  shuffled random file names, one series in three RLE-compressed) with a hyperdense lesion
  (+60..+150 HU in ~40 HU soft tissue) whose radius grows with severity;
- **ehr**: a FHIR R4 Bundle (``collection``) whose CRP, WBC, temperature, heart rate and
  SpO2 rise or fall with severity, in mixed units (CRP in mg/L or mg/dL, temperature in Cel
  or [degF]); resources dated *after* the index time that give the label away are planted
  on purpose and tagged ``meta.tag = urn:meddx:synth|post-index`` (:data:`POST_INDEX_TAG`),
  so tests can check that ingestors drop them;
- **notes**: a clinician note whose symptom phrases are present more often with severity,
  and negated ("denies cough", "no fever") when absent;
- **device_logs**: a long CSV ``timestamp,channel,value`` (heart_rate, spo2, resp_rate each
  minute over the hours before the index time) with gaps, impossible values, unsorted rows
  and rows after the index time (which leak the label); severity lowers spo2 and raises
  the respiratory rate a little;
- **audio**: a lung-sound WAV (PCM 16, 4-22 kHz, some stereo) of breath-like filtered noise
  with crackles whose rate grows with severity;
- **video**: a pulsating bright disc (MP4 ``mp4v`` or AVI ``MJPG``) whose pulsation weakens
  with severity.

About 10 % of patients miss each modality (independently). Output is byte-for-byte
deterministic for a seed: every random draw comes from a generator derived from
``(seed, patient, stream)``, dates are fixed, UIDs are hashed from seeded entropy, and
JSON keys are sorted. Changing one writer does not shift the others' draws.

Example:
    >>> import tempfile
    >>> from meddx.cohort import load_cohort
    >>> from meddx.synth import generate_cohort
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     cohort = load_cohort(generate_cohort(folder, n_patients=3, seed=7))
    >>> len(cohort), cohort.tasks["disease"].classes
    (3, ('0', '1'))
"""

from __future__ import annotations

import base64
import csv
import json
import logging
import math
import shutil
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

logger = logging.getLogger(__name__)

__all__ = [
    "DISEASE_SNOMED",
    "LABEL_COLUMN",
    "MANIFEST_COLUMNS",
    "MISSING_RATE",
    "POST_INDEX_TAG",
    "VIEW_NOISE",
    "generate_cohort",
    "write_ct_series",
    "write_device_log",
    "write_fhir_bundle",
    "write_lung_sound",
    "write_note",
    "write_pulse_video",
]

LABEL_COLUMN = "label:disease"
MANIFEST_COLUMNS = (
    "patient_id",
    "index_time",
    "split",
    "imaging",
    "ehr",
    "notes",
    "device_logs",
    "audio",
    "video",
    LABEL_COLUMN,
    "sex",
    "age",
)
MODALITY_COLUMNS = ("imaging", "ehr", "notes", "device_logs", "audio", "video")

# Standard deviation of the nuisance each modality's view adds to the hidden severity.
# Tuned so that one simple feature per modality gives AUROC ~0.7-0.83 and all six ~0.88-0.92.
VIEW_NOISE: dict[str, float] = {
    "imaging": 1.0,
    "ehr": 1.15,
    "notes": 1.1,
    "device_logs": 1.1,
    "audio": 1.1,
    "video": 1.0,
}
MISSING_RATE = 0.10
LABEL_NOISE = 0.3
LABEL_THRESHOLD = 0.265  # P(s + 0.3 e > 0.265) ~ 0.40

# meta.tag on every FHIR resource planted after the index time (a leakage trap).
POST_INDEX_TAG: dict[str, str] = {
    "system": "urn:meddx:synth",
    "code": "post-index",
    "display": "dated after the index time: must never reach a tensor",
}
DISEASE_SNOMED = ("233604007", "Pneumonia (disorder)")

_BASE_DATE = datetime(2024, 1, 1, tzinfo=timezone.utc)
_UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root; entropy makes each UID deterministic
_IMPLEMENTATION_UID = UID(_UID_ROOT + "8842.1")
_SNOMED = "http://snomed.info/sct"
_LOINC = "http://loinc.org"
_UCUM = "http://unitsofmeasure.org"
_RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"

_FAMILY_NAMES = ("Okafor", "Lindqvist", "García", "Nakamura", "Dubois", "Kowalski", "Singh", "Brennan")
_GIVEN_NAMES = ("Ada", "Björn", "Chen", "Dara", "Elif", "Femi", "Greta", "Hugo", "Inès", "Jonas")

# Streams of per-patient random draws (see _patient_rng): one per modality, so that
# changing how one writer draws does not shift any other writer's output.
_STREAMS = {"patient": 0, "imaging": 1, "ehr": 2, "notes": 3, "device_logs": 4, "audio": 5, "video": 6}


def _patient_rng(seed: int, patient: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, patient + 1, _STREAMS[stream]])


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _label_from_severity(severity: float) -> int:
    return int(severity > LABEL_THRESHOLD)


# --------------------------------------------------------------------------- imaging


def write_ct_series(
    folder: str | Path,
    *,
    severity: float,
    rng: np.random.Generator,
    acquisition_time: datetime,
    patient_id: str,
    n_slices: int = 12,
    size: int = 48,
    rle: bool = False,
    drop_slice: int | None = None,
    shuffle: bool = True,
    patient_name: str | None = None,
) -> list[Path]:
    """Write a CT-like axial DICOM series (Part 10 files) with a severity-sized lesion.

    The volume is a soft-tissue body ellipse (~40 HU) in air (~-1000 HU) with a vertebra
    (~400-700 HU) and a spherical hyperdense lesion (+60..+150 HU) whose radius grows with
    ``severity`` (none below about -1.4). Stored values are int16 with RescaleSlope 1 and
    RescaleIntercept -1024 or 0. Geometry tags are complete; z runs up or down the table
    with InstanceNumber depending on the patient. The random draws do not depend on ``rle``,
    ``drop_slice`` or ``shuffle``, so two calls with equally seeded generators write twin
    series differing only in those options.

    Args:
        folder: the series folder (created; files already there are left alone).
        severity: the severity this modality sees (about N(0, 1)).
        rng: the random generator of this series.
        acquisition_time: when the series was acquired (aware datetime).
        patient_id: written to PatientID.
        n_slices: slices in the full series.
        size: rows and columns of every slice.
        rle: RLE Lossless transfer syntax instead of explicit VR little endian.
        drop_slice: index (in InstanceNumber order) of a slice to leave out, making a gap.
        shuffle: random hex file names (order not revealed); otherwise ``slice_000.dcm``...
        patient_name: DICOM PN ``Family^Given``; a fake one when None.

    Returns:
        The written files in InstanceNumber order (whatever their names).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     files = write_ct_series(Path(folder, "ct"), severity=1.5, rng=np.random.default_rng(0),
        ...         acquisition_time=datetime(2024, 3, 5, 9, tzinfo=timezone.utc), patient_id="P0001")
        >>> len(files), files[0].suffix
        (12, '.dcm')
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    acquisition_time = acquisition_time.astimezone(timezone.utc)

    spacing = round(float(rng.uniform(6.5, 7.5)), 3)  # mm per pixel (a coarse, tiny CT)
    thickness = float(rng.choice([5.0, 6.0]))
    descending = bool(rng.random() < 0.5)  # head-first series often run down the table
    intercept = float(rng.choice([-1024.0, 0.0]))
    z0 = round(float(rng.uniform(-200.0, -100.0)), 2)

    # Anatomy in voxel units (z, y, x).
    cy, cx = size / 2 + rng.uniform(-1.5, 1.5, size=2)
    ay, ax = size * rng.uniform(0.28, 0.34), size * rng.uniform(0.38, 0.45)
    bone_r = size * rng.uniform(0.05, 0.08)
    bone_hu = rng.uniform(400.0, 700.0)
    lesion_r_mm = max(0.0, 13.0 + 9.5 * severity) * rng.uniform(0.85, 1.15)
    lesion_hu = rng.uniform(60.0, 150.0)
    lesion_c = (
        rng.uniform(0.35, 0.65) * (n_slices - 1),
        cy - ay * rng.uniform(0.1, 0.45),
        cx + ax * rng.uniform(-0.45, 0.45),
    )
    tissue_noise = rng.normal(0.0, 12.0, size=(n_slices, size, size))
    air_noise = rng.normal(0.0, 8.0, size=(n_slices, size, size))

    zz, yy, xx = np.mgrid[0:n_slices, 0:size, 0:size].astype(np.float64)
    body = ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= 1.0
    bone = (yy - (cy + 0.65 * ay)) ** 2 + (xx - cx) ** 2 <= bone_r**2
    lesion_d2 = (
        ((zz - lesion_c[0]) * thickness) ** 2
        + ((yy - lesion_c[1]) * spacing) ** 2
        + ((xx - lesion_c[2]) * spacing) ** 2
    )
    lesion = body & ~bone & (lesion_d2 <= lesion_r_mm**2)

    hu = np.where(body, 40.0 + tissue_noise, -1000.0 + air_noise)
    hu[bone & body] = bone_hu + tissue_noise[bone & body]
    hu[lesion] += lesion_hu
    stored = np.clip(np.rint(hu - intercept), -32768, 32767).astype(np.int16)

    study_uid = generate_uid(_UID_ROOT, [patient_id, _iso(acquisition_time), "study", str(rng.integers(2**62))])
    series_uid = generate_uid(_UID_ROOT, [study_uid, "series"])
    frame_uid = generate_uid(_UID_ROOT, [study_uid, "frame"])
    names = [rng.bytes(8).hex() for _ in range(n_slices)]
    name = patient_name or f"{rng.choice(_FAMILY_NAMES)}^{rng.choice(_GIVEN_NAMES)}"
    study_time = acquisition_time - timedelta(minutes=int(rng.integers(3, 15)))
    accession = f"A{int(rng.integers(10**6, 10**7))}"

    written: list[Path] = []
    for i in range(n_slices):
        if drop_slice is not None and i == drop_slice:
            continue
        z = z0 + (n_slices - 1 - i if descending else i) * thickness
        k = n_slices - 1 - i if descending else i  # volume index of this slice
        t_slice = acquisition_time + timedelta(milliseconds=500 * i)
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid(_UID_ROOT, [series_uid, str(i)])
        ds.StudyDate, ds.StudyTime = study_time.strftime("%Y%m%d"), study_time.strftime("%H%M%S")
        ds.SeriesDate, ds.SeriesTime = acquisition_time.strftime("%Y%m%d"), acquisition_time.strftime("%H%M%S")
        ds.AcquisitionDate, ds.AcquisitionTime = t_slice.strftime("%Y%m%d"), t_slice.strftime("%H%M%S.%f")
        ds.ContentDate, ds.ContentTime = ds.AcquisitionDate, ds.AcquisitionTime
        ds.TimezoneOffsetFromUTC = "+0000"
        ds.AccessionNumber = accession
        ds.Modality = "CT"
        ds.Manufacturer = "meddx-synth"
        ds.StudyDescription = "CT CHEST"
        ds.SeriesDescription = f"Axial {thickness:g}mm soft tissue"
        ds.PatientName = name
        ds.PatientID = patient_id
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = thickness
        ds.SpacingBetweenSlices = thickness
        ds.KVP = 120
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [round(-size / 2 * spacing, 3), round(-size / 2 * spacing, 3), round(z, 3)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = round(z, 3)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = size
        ds.Columns = size
        ds.PixelSpacing = [spacing, spacing]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.PixelData = stored[k].tobytes()

        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        # Fixed, so the bytes do not change with the installed pydicom version.
        ds.file_meta.ImplementationClassUID = _IMPLEMENTATION_UID
        ds.file_meta.ImplementationVersionName = "MEDDX_SYNTH_1"
        if rle:
            # Keep our deterministic SOPInstanceUID (compress() would otherwise mint one).
            ds.compress(RLELossless, stored[k], generate_instance_uid=False)
        path = folder / (f"{names[i]}.dcm" if shuffle else f"slice_{i:03d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


# --------------------------------------------------------------------------- ehr


def _coding(system: str, code: str, display: str) -> dict[str, Any]:
    return {"system": system, "code": code, "display": display}


def _quantity(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": _UCUM, "code": unit}


def _category(code: str, system: str) -> list[dict[str, Any]]:
    return [{"coding": [{"system": system, "code": code}]}]


_OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
_COND_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
_COND_VERIFY = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
_COND_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"

_COMORBIDITIES = (
    ("38341003", "Hypertensive disorder, systemic arterial (disorder)", ("314076", "lisinopril 10 MG Oral Tablet")),
    ("44054006", "Diabetes mellitus type 2 (disorder)", ("861007", "metformin hydrochloride 500 MG Oral Tablet")),
    ("195967001", "Asthma (disorder)", ("745679", "albuterol 0.09 MG/ACTUAT Metered Dose Inhaler")),
    ("55822004", "Hyperlipidemia (disorder)", ("617312", "atorvastatin 20 MG Oral Tablet")),
    (
        "13645005",
        "Chronic obstructive lung disease (disorder)",
        ("896209", "tiotropium 0.0025 MG/ACTUAT Inhalation Spray"),
    ),
)


def _birth_date(index_time: datetime, age: int, rng: np.random.Generator) -> date:
    anchor = index_time.date()
    try:
        anchor = anchor.replace(year=anchor.year - age)
    except ValueError:  # 29 February
        anchor = anchor.replace(year=anchor.year - age, day=28)
    return anchor - timedelta(days=int(rng.integers(0, 365)))


def write_fhir_bundle(
    path: str | Path,
    *,
    patient_id: str,
    severity: float,
    rng: np.random.Generator,
    index_time: datetime,
    sex: str,
    age: int,
    crp_unit: str = "mg/L",
    temperature_unit: str = "Cel",
    label: int | None = None,
    patient_name: str | None = None,
) -> Path:
    """Write a FHIR R4 ``collection`` Bundle for one patient (valid for fhir.resources R4B).

    Holds a Patient (``id`` = ``patient_id``), an Encounter, LOINC Observations in UCUM
    units (WBC 6690-2, CRP 1988-5, heart rate 8867-4, body temperature 8310-5, SpO2 59408-5
    and a blood-pressure panel 85354-9 with 8480-6/8462-4 components), SNOMED Conditions,
    MedicationRequests and a triage DocumentReference (base64 text/plain), all dated before
    ``index_time``. It also plants three resources dated after ``index_time`` that give the
    label away (a Pneumonia Condition confirmed or refuted, an extreme or normal CRP, a
    discharge-summary DocumentReference), each tagged with :data:`POST_INDEX_TAG`.

    Args:
        path: the ``.json`` file to write.
        patient_id: Patient.id and the subject of every resource.
        severity: the severity this modality sees; raises CRP, WBC, temperature, heart rate.
        rng: the random generator of this bundle.
        index_time: the moment of prediction (aware datetime).
        sex: ``"F"``/``"female"`` or ``"M"``/``"male"``.
        age: age in whole years at ``index_time``.
        crp_unit: ``"mg/L"`` or ``"mg/dL"``.
        temperature_unit: ``"Cel"`` or ``"[degF]"``.
        label: the true label, for the planted post-index resources; from ``severity`` if None.
        patient_name: ``Family^Given``; a fake one when None.

    Example:
        >>> import json, tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = write_fhir_bundle(Path(folder, "p.json"), patient_id="P0001", severity=0.3,
        ...         rng=np.random.default_rng(0), index_time=datetime(2024, 3, 5, 14, tzinfo=timezone.utc),
        ...         sex="F", age=64)
        ...     bundle = json.loads(path.read_text())
        >>> bundle["resourceType"], bundle["entry"][0]["resource"]["resourceType"]
        ('Bundle', 'Patient')
    """
    if crp_unit not in ("mg/L", "mg/dL"):
        raise ValueError(f"crp_unit must be 'mg/L' or 'mg/dL', got {crp_unit!r}")
    if temperature_unit not in ("Cel", "[degF]"):
        raise ValueError(f"temperature_unit must be 'Cel' or '[degF]', got {temperature_unit!r}")
    gender = {"f": "female", "female": "female", "m": "male", "male": "male"}.get(sex.lower())
    if gender is None:
        raise ValueError(f"sex must be F/M/female/male, got {sex!r}")
    label = _label_from_severity(severity) if label is None else int(label)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    index_time = index_time.astimezone(timezone.utc)
    subject = {"reference": f"Patient/{patient_id}"}
    family, given = (patient_name or f"{rng.choice(_FAMILY_NAMES)}^{rng.choice(_GIVEN_NAMES)}").split("^")
    resources: list[dict[str, Any]] = []

    def new_id() -> str:
        return str(uuid.UUID(bytes=rng.bytes(16), version=4))

    def before(min_h: float, max_h: float) -> datetime:
        return index_time - timedelta(minutes=int(rng.integers(int(min_h * 60), int(max_h * 60))))

    resources.append(
        {
            "resourceType": "Patient",
            "id": patient_id,
            "identifier": [{"system": "urn:meddx:synth:mrn", "value": f"MRN{int(rng.integers(10**6, 10**7))}"}],
            "name": [{"family": family, "given": [given]}],
            "gender": gender,
            "birthDate": _birth_date(index_time, age, rng).isoformat(),
        }
    )
    arrival = before(4, 10)
    resources.append(
        {
            "resourceType": "Encounter",
            "id": new_id(),
            "status": "in-progress",
            "class": _coding("http://terminology.hl7.org/CodeSystem/v3-ActCode", "EMER", "emergency"),
            "subject": subject,
            "period": {"start": _iso(arrival)},
        }
    )

    def observation(code: str, display: str, when: datetime, category: str, **value: Any) -> dict[str, Any]:
        obs: dict[str, Any] = {
            "resourceType": "Observation",
            "id": new_id(),
            "status": "final",
            "category": _category(category, _OBS_CATEGORY),
            "code": {"coding": [_coding(_LOINC, code, display)], "text": display},
            "subject": subject,
            "effectiveDateTime": _iso(when),
        }
        if category == "laboratory":
            obs["issued"] = _iso(when + timedelta(minutes=40))
        obs.update(value)
        return obs

    # Labs: a few draws over the 3 days before the index time (issued 40 min later, still before it).
    patient_crp = rng.normal(0.0, 0.5)
    for _ in range(int(rng.integers(1, 4))):
        when = before(1, 72)
        wbc = max(1.0, 8.0 + 2.2 * severity + rng.normal(0.0, 1.8))
        resources.append(
            observation(
                "6690-2",
                "Leukocytes [#/volume] in Blood by Automated count",
                when,
                "laboratory",
                valueQuantity=_quantity(round(wbc, 1), "10*3/uL"),
            )
        )
        crp_mg_l = math.exp(2.3 + 0.8 * severity + patient_crp + rng.normal(0.0, 0.4))
        crp = crp_mg_l / 10.0 if crp_unit == "mg/dL" else crp_mg_l
        resources.append(
            observation(
                "1988-5",
                "C reactive protein [Mass/volume] in Serum or Plasma",
                when,
                "laboratory",
                valueQuantity=_quantity(round(crp, 2), crp_unit),
            )
        )
    # Vital signs since arrival.
    for _ in range(int(rng.integers(2, 5))):
        when = arrival + timedelta(minutes=int(rng.integers(0, int((index_time - arrival).total_seconds() // 60))))
        temp_c = 37.0 + 0.45 * severity + rng.normal(0.0, 0.35)
        temp = temp_c * 9 / 5 + 32 if temperature_unit == "[degF]" else temp_c
        heart_rate = 82 + 7 * severity + rng.normal(0.0, 8.0)
        spo2 = min(100.0, 96.5 - 1.2 * severity + rng.normal(0.0, 1.2))
        resources.append(
            observation(
                "8310-5",
                "Body temperature",
                when,
                "vital-signs",
                valueQuantity=_quantity(round(temp, 1), temperature_unit),
            )
        )
        resources.append(
            observation("8867-4", "Heart rate", when, "vital-signs", valueQuantity=_quantity(round(heart_rate), "/min"))
        )
        resources.append(
            observation(
                "59408-5",
                "Oxygen saturation in Arterial blood by Pulse oximetry",
                when,
                "vital-signs",
                valueQuantity=_quantity(round(spo2), "%"),
            )
        )
        systolic = 128 + rng.normal(0.0, 14.0)
        diastolic = 0.6 * systolic + rng.normal(0.0, 6.0)
        resources.append(
            observation(
                "85354-9",
                "Blood pressure panel with all children optional",
                when,
                "vital-signs",
                component=[
                    {
                        "code": {"coding": [_coding(_LOINC, "8480-6", "Systolic blood pressure")]},
                        "valueQuantity": _quantity(round(systolic), "mm[Hg]"),
                    },
                    {
                        "code": {"coding": [_coding(_LOINC, "8462-4", "Diastolic blood pressure")]},
                        "valueQuantity": _quantity(round(diastolic), "mm[Hg]"),
                    },
                ],
            )
        )
    # Chronic conditions (independent of severity) and their medications.
    for snomed, display, (rxnorm, drug) in _COMORBIDITIES:
        if rng.random() >= 0.25:
            continue
        onset = index_time - timedelta(days=int(rng.integers(200, 4000)))
        resources.append(
            {
                "resourceType": "Condition",
                "id": new_id(),
                "clinicalStatus": {"coding": [{"system": _COND_CLINICAL, "code": "active"}]},
                "verificationStatus": {"coding": [{"system": _COND_VERIFY, "code": "confirmed"}]},
                "category": _category("problem-list-item", _COND_CATEGORY),
                "code": {"coding": [_coding(_SNOMED, snomed, display)], "text": display},
                "subject": subject,
                "onsetDateTime": _iso(onset),
                "recordedDate": _iso(onset + timedelta(days=int(rng.integers(0, 30)))),
            }
        )
        resources.append(
            {
                "resourceType": "MedicationRequest",
                "id": new_id(),
                "status": "active",
                "intent": "order",
                "medicationCodeableConcept": {"coding": [_coding(_RXNORM, rxnorm, drug)], "text": drug},
                "subject": subject,
                "authoredOn": _iso(index_time - timedelta(days=int(rng.integers(5, 180)))),
            }
        )
    complaints = ["cough", "fever", "shortness of breath", "fatigue", "chest pain"]
    n_complaints = int(np.clip(round(1.5 + 0.8 * severity + rng.normal(0.0, 0.8)), 0, len(complaints)))
    chosen = [complaints[j] for j in sorted(rng.choice(len(complaints), size=n_complaints, replace=False))]
    triage = (
        f"Triage note. Chief complaint: {', '.join(chosen)}."
        if chosen
        else "Triage note. Chief complaint: follow-up visit, feels well."
    )
    resources.append(_document(new_id(), subject, before(0.5, 3.0), "Triage note", triage))

    # Planted after the index time: each one alone would give the label away.
    post = [
        {
            "resourceType": "Condition",
            "id": new_id(),
            "clinicalStatus": {"coding": [{"system": _COND_CLINICAL, "code": "active" if label else "inactive"}]},
            "verificationStatus": {"coding": [{"system": _COND_VERIFY, "code": "confirmed" if label else "refuted"}]},
            "category": _category("encounter-diagnosis", _COND_CATEGORY),
            "code": {"coding": [_coding(_SNOMED, *DISEASE_SNOMED)], "text": "Pneumonia"},
            "subject": subject,
            "onsetDateTime": _iso(index_time + timedelta(hours=int(rng.integers(2, 48)))),
        },
        observation(
            "1988-5",
            "C reactive protein [Mass/volume] in Serum or Plasma",
            index_time + timedelta(hours=int(rng.integers(6, 30))),
            "laboratory",
            valueQuantity=_quantity(250.0 if label else 2.0, "mg/L"),
        ),
        _document(
            new_id(),
            subject,
            index_time + timedelta(days=int(rng.integers(2, 7))),
            "Discharge summary",
            "Discharge summary. Final diagnosis: community-acquired pneumonia, treated with antibiotics."
            if label
            else "Discharge summary. Pneumonia was ruled out; discharged home.",
        ),
    ]
    for resource in post:
        resource["meta"] = {"tag": [dict(POST_INDEX_TAG)]}
    resources.extend(post)

    bundle = {
        "resourceType": "Bundle",
        "id": new_id(),
        "type": "collection",
        "entry": [
            {"fullUrl": f"https://meddx.example/fhir/{r['resourceType']}/{r['id']}", "resource": r} for r in resources
        ],
    }
    path.write_text(json.dumps(bundle, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _document(doc_id: str, subject: dict[str, str], when: datetime, title: str, text: str) -> dict[str, Any]:
    return {
        "resourceType": "DocumentReference",
        "id": doc_id,
        "status": "current",
        "type": {"coding": [_coding(_LOINC, "34111-5", "Emergency department Note")], "text": title},
        "subject": subject,
        "date": _iso(when),
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain; charset=utf-8",
                    "language": "en",
                    "title": title,
                    "data": base64.b64encode(text.encode("utf-8")).decode("ascii"),
                }
            }
        ],
    }


# --------------------------------------------------------------------------- notes

# (positive phrase, negated phrase, offset): more severe patients report more symptoms.
_SYMPTOMS = (
    ("productive cough", "denies cough", 0.3),
    ("fever", "no fever", 0.0),
    ("shortness of breath", "denies shortness of breath", -0.3),
    ("pleuritic chest pain", "no chest pain", -0.8),
    ("chills", "denies chills", -0.4),
    ("fatigue", "no fatigue", 0.4),
)
_NOTE_FILLERS = (
    "Lives with spouse; independent in daily activities.",
    "Former smoker (20 pack-years), quit 2015.",
    "Never smoker.",
    "Allergies: penicillin → rash.",
    "History obtained with an interpreter – patient's daughter Zoë present.",
    "Works as a school teacher.",
    "Vaccinations up to date per patient.",
    "Drinks alcohol socially.",
)


def write_note(path: str | Path, *, severity: float, rng: np.random.Generator) -> Path:
    """Write a UTF-8 clinician note whose symptom phrases depend on severity.

    Each symptom is reported with probability ``sigmoid(1.3 * severity + offset)``;
    otherwise it is written negated ("denies cough", "no fever") or not mentioned. The
    examination line reads "crackles" or "clear to auscultation" in the same way.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     text = write_note(Path(folder, "note.txt"), severity=1.0, rng=np.random.default_rng(0)).read_text()
        >>> text.splitlines()[:3]
        ['EMERGENCY DEPARTMENT NOTE', '', 'Chief complaint: productive cough.']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    positives: list[str] = []
    negatives: list[str] = []
    for positive, negative, offset in _SYMPTOMS:
        p = 1.0 / (1.0 + math.exp(-(1.3 * severity + offset)))
        draw, mention = rng.random(), rng.random()
        if draw < p:
            positives.append(positive)
        elif mention < 0.7:
            negatives.append(negative)
    days = int(rng.integers(1, 8))
    lines = ["EMERGENCY DEPARTMENT NOTE", ""]
    if positives:
        lines.append(f"Chief complaint: {positives[0]}.")
        hpi = f"HPI: Patient presents after {days} day(s) of {', '.join(positives)}."
    else:
        lines.append("Chief complaint: general malaise.")
        hpi = f"HPI: Patient presents feeling unwell for {days} day(s) without specific complaints."
    lines += ["", hpi]
    lines += [f"{n[0].upper()}{n[1:]}." for n in negatives]
    fillers = rng.choice(len(_NOTE_FILLERS), size=int(rng.integers(1, 4)), replace=False)
    lines += ["", "Social history: " + " ".join(_NOTE_FILLERS[j] for j in sorted(fillers))]
    crackles = rng.random() < 1.0 / (1.0 + math.exp(-(1.3 * severity - 0.5)))
    side = str(rng.choice(["right", "left"]))
    lines += [
        "",
        "Exam: " + (f"crackles at the {side} lung base." if crackles else "lungs clear to auscultation bilaterally."),
        "",
        "Assessment/Plan: "
        + str(
            rng.choice(
                ["Labs and imaging ordered.", "Chest imaging and bloods sent.", "Observe; reassess after results."]
            )
        ),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- device logs

_DEVICE_CHANNELS = ("heart_rate", "spo2", "resp_rate")


def write_device_log(
    path: str | Path,
    *,
    severity: float,
    rng: np.random.Generator,
    index_time: datetime,
    hours: float = 8.0,
    label: int | None = None,
    post_index_minutes: int = 30,
) -> Path:
    """Write a long monitor log CSV ``timestamp,channel,value`` ending after ``index_time``.

    One row per channel (heart_rate, spo2, resp_rate) per minute over ``hours`` before the
    index time, with missing stretches (all channels or one), impossible values (spo2 0 or
    127, heart_rate -1, resp_rate 0), a few rows out of order, and ``post_index_minutes``
    of rows after the index time whose values give ``label`` away (an ingestor must drop
    them). Severity lowers spo2 and raises resp_rate a little.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = write_device_log(Path(folder, "vitals.csv"), severity=0.5, rng=np.random.default_rng(0),
        ...         index_time=datetime(2024, 3, 5, 14, tzinfo=timezone.utc))
        ...     lines = path.read_text().splitlines()
        >>> lines[:2]
        ['timestamp,channel,value', '2024-03-05T06:00:00Z,heart_rate,86']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    label = _label_from_severity(severity) if label is None else int(label)
    index_time = index_time.astimezone(timezone.utc).replace(second=0, microsecond=0)
    n_before = int(round(hours * 60))
    minutes = np.arange(-n_before, post_index_minutes + 1)
    n = len(minutes)

    def walk(scale: float) -> np.ndarray:  # slow drift, as physiology wanders
        steps = rng.normal(0.0, scale, size=n)
        return np.cumsum(steps) - np.cumsum(steps).mean()

    base_hr = 78 + 6 * severity + rng.normal(0.0, 7.0)
    base_spo2 = 97.0 - 0.9 * severity + rng.normal(0.0, 0.6)
    base_rr = 16.5 + 1.6 * severity + rng.normal(0.0, 1.6)
    values = {
        "heart_rate": base_hr + np.clip(walk(0.4), -12, 12) + rng.normal(0.0, 2.0, size=n),
        "spo2": np.minimum(100.0, base_spo2 + np.clip(walk(0.08), -1.5, 1.5) + rng.normal(0.0, 0.7, size=n)),
        "resp_rate": base_rr + np.clip(walk(0.1), -3, 3) + rng.normal(0.0, 1.2, size=n),
    }
    after = minutes > 0
    values["spo2"][after] = (86.0 if label else 99.0) + rng.normal(0.0, 0.5, size=int(after.sum()))
    values["heart_rate"][after] = (125.0 if label else 70.0) + rng.normal(0.0, 2.0, size=int(after.sum()))

    present = {c: np.ones(n, dtype=bool) for c in _DEVICE_CHANNELS}
    for _ in range(int(rng.integers(1, 4))):  # the monitor unplugged: every channel missing
        start, length = int(rng.integers(0, n)), int(rng.integers(10, 60))
        for c in _DEVICE_CHANNELS:
            present[c][start : start + length] = False
    for c in _DEVICE_CHANNELS:  # one probe off for a while
        if rng.random() < 0.5:
            start, length = int(rng.integers(0, n)), int(rng.integers(5, 40))
            present[c][start : start + length] = False
    for c in _DEVICE_CHANNELS:  # the leaking rows after the index time are always there
        present[c][after] = True

    artefacts = {"heart_rate": (-1.0, 0.0), "spo2": (0.0, 127.0), "resp_rate": (0.0,)}
    rows: list[tuple[int, str, str]] = []
    for c in _DEVICE_CHANNELS:
        v = np.rint(values[c])
        bad = rng.random(n) < 0.004
        v[bad] = rng.choice(artefacts[c], size=int(bad.sum()))
        rows += [(int(minutes[j]), c, str(int(v[j]))) for j in range(n) if present[c][j]]
    rows.sort(key=lambda r: (r[0], _DEVICE_CHANNELS.index(r[1])))
    for _ in range(int(rng.integers(2, 6))):  # late-arriving batches written out of order
        j = int(rng.integers(0, len(rows) - 12))
        k = int(rng.integers(0, len(rows)))
        block = rows[j : j + 6]
        del rows[j : j + 6]
        rows[k:k] = block

    lines = ["timestamp,channel,value"]
    lines += [f"{_iso(index_time + timedelta(minutes=m))},{c},{v}" for m, c, v in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- audio


def write_lung_sound(
    path: str | Path,
    *,
    severity: float,
    rng: np.random.Generator,
    sample_rate: int = 4000,
    seconds: float = 3.0,
    channels: int = 1,
) -> Path:
    """Write a lung-sound WAV (PCM 16): breath-like band-passed noise plus crackles.

    Crackles are short damped oscillations, several times louder than the breath sound,
    arriving as a Poisson process whose rate (per second) is ``2 * exp(0.7 * severity)``.
    With two channels the second one hears the crackles fainter, with its own noise.

    Example:
        >>> import tempfile
        >>> import soundfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = write_lung_sound(Path(folder, "lung.wav"), severity=1.0, rng=np.random.default_rng(0),
        ...         sample_rate=8000)
        ...     info = soundfile.info(path)
        >>> info.samplerate, info.channels
        (8000, 1)
    """
    import soundfile
    from scipy.signal import butter, sosfilt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if channels not in (1, 2):
        raise ValueError(f"channels must be 1 or 2, got {channels}")
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    sos = butter(4, [100.0, min(800.0, 0.45 * sample_rate)], btype="bandpass", fs=sample_rate, output="sos")
    breath_hz = rng.uniform(0.25, 0.45)
    envelope = 0.7 + 0.3 * np.sin(2 * np.pi * breath_hz * t + rng.uniform(0, 2 * np.pi))

    def breath() -> np.ndarray:
        x = sosfilt(sos, rng.normal(0.0, 1.0, size=n))
        return x / x.std() * envelope

    rate = 2.0 * math.exp(0.7 * severity)
    crackles = np.zeros(n)
    for _ in range(int(rng.poisson(rate * seconds))):
        start = int(rng.integers(0, n))
        freq = rng.uniform(250.0, min(1200.0, 0.4 * sample_rate))
        tau = rng.uniform(0.0015, 0.004)
        length = min(n - start, int(6 * tau * sample_rate) + 1)
        tt = np.arange(length) / sample_rate
        amplitude = rng.uniform(8.0, 14.0) * rng.choice([-1.0, 1.0])  # in units of the breath sound's std
        crackles[start : start + length] += amplitude * np.exp(-tt / tau) * np.cos(2 * np.pi * freq * tt)
    mix = [breath() + crackles]
    if channels == 2:
        mix.append(breath() + 0.6 * crackles)
    audio = np.stack(mix, axis=1)
    audio *= rng.uniform(0.5, 0.9) / max(1e-9, float(np.abs(audio).max()))
    soundfile.write(str(path), audio if channels == 2 else audio[:, 0], sample_rate, subtype="PCM_16", format="WAV")
    return path


# --------------------------------------------------------------------------- video


def write_pulse_video(
    path: str | Path,
    *,
    severity: float,
    rng: np.random.Generator,
    n_frames: int = 24,
    size: int = 64,
    fps: float = 12.0,
) -> Path:
    """Write a short clip of a pulsating bright disc on a dark background.

    The disc radius oscillates at a heart-rate-like 1-1.7 Hz with a relative amplitude of
    ``0.2 * exp(-0.45 * severity)``: the sicker the patient, the weaker the pulsation.
    ``.mp4`` files use the ``mp4v`` codec, ``.avi`` files ``MJPG`` (both deterministic
    and readable by opencv-python-headless); frames are written as 8-bit BGR.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = write_pulse_video(Path(folder, "echo.mp4"), severity=0.0, rng=np.random.default_rng(0))
        ...     import cv2
        ...     capture = cv2.VideoCapture(str(path))
        ...     frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        ...     capture.release()
        >>> frames > 0
        True
    """
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codecs = {".mp4": "mp4v", ".avi": "MJPG"}
    fourcc = codecs.get(path.suffix.lower())
    if fourcc is None:
        raise ValueError(f"video path must end in .mp4 or .avi, got {path.name!r}")
    r0 = size * rng.uniform(0.17, 0.24)
    amplitude = float(np.clip(0.2 * math.exp(-0.45 * severity) * rng.uniform(0.85, 1.15), 0.01, 0.45))
    freq, phase = rng.uniform(1.0, 1.7), rng.uniform(0.0, 2 * np.pi)
    cy, cx = size / 2 + rng.uniform(-3.0, 3.0, size=2)
    fg, bg = rng.uniform(170.0, 230.0), rng.uniform(15.0, 35.0)
    yy, xx = np.mgrid[0:size, 0:size]
    dist = np.hypot(yy - cy, xx - cx)

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*fourcc), fps, (size, size), True)
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {fourcc} video to {path}")
    try:
        for i in range(n_frames):
            radius = r0 * (1.0 + amplitude * math.sin(2 * np.pi * freq * i / fps + phase))
            edge = np.clip(radius - dist + 0.5, 0.0, 1.0)  # anti-aliased rim
            frame = bg + (fg - bg) * edge + rng.normal(0.0, 3.0, size=(size, size))
            gray = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
            writer.write(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))
    finally:
        writer.release()
    return path


# --------------------------------------------------------------------------- cohort


def _splits(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng([seed, 0, 0])
    n_val, n_test = int(round(0.2 * n)), int(round(0.2 * n))
    names = ["val"] * n_val + ["test"] * n_test + ["train"] * (n - n_val - n_test)
    return [names[j] for j in rng.permutation(n)]


@dataclass(frozen=True)
class _PatientPlan:
    """Everything drawn for one patient before any file is written."""

    patient_id: str
    label: int
    views: dict[str, float]  # the severity each modality sees
    missing: dict[str, bool]
    sex: str
    age: int
    index_time: datetime
    name: str
    rle: bool
    crp_unit: str
    temperature_unit: str
    sample_rate: int
    audio_channels: int
    video_suffix: str
    acquisition_time: datetime


def _plan_patient(seed: int, i: int) -> _PatientPlan:
    rng = _patient_rng(seed, i, "patient")
    severity = float(rng.normal())
    label = _label_from_severity(severity + LABEL_NOISE * float(rng.normal()))
    views = {m: severity + VIEW_NOISE[m] * float(rng.normal()) for m in MODALITY_COLUMNS}
    missing = {m: bool(rng.random() < MISSING_RATE) for m in MODALITY_COLUMNS}
    if all(missing.values()):
        missing["ehr"] = False
    sex = str(rng.choice(["F", "M"]))
    age = int(rng.integers(22, 91))
    index_time = _BASE_DATE + timedelta(
        days=int(rng.integers(0, 365)), hours=int(rng.integers(0, 24)), minutes=int(rng.integers(0, 60))
    )
    return _PatientPlan(
        patient_id=f"P{i + 1:04d}",
        label=label,
        views=views,
        missing=missing,
        sex=sex,
        age=age,
        index_time=index_time,
        name=f"{rng.choice(_FAMILY_NAMES)}^{rng.choice(_GIVEN_NAMES)}",
        rle=bool(rng.random() < 1 / 3),
        crp_unit="mg/dL" if rng.random() < 0.3 else "mg/L",
        temperature_unit="[degF]" if rng.random() < 0.3 else "Cel",
        sample_rate=int(rng.choice([4000, 8000, 11025, 22050], p=[0.45, 0.35, 0.12, 0.08])),
        audio_channels=2 if rng.random() < 0.15 else 1,
        video_suffix=".avi" if rng.random() < 0.25 else ".mp4",
        acquisition_time=index_time - timedelta(minutes=int(rng.integers(30, 36 * 60))),
    )


def _write_modality(modality: str, plan: _PatientPlan, folder: Path, rng: np.random.Generator) -> Path:
    """Write one modality of a planned patient; returns the path the manifest names."""
    severity = plan.views[modality]
    if modality == "imaging":
        write_ct_series(
            folder / "ct",
            severity=severity,
            rng=rng,
            acquisition_time=plan.acquisition_time,
            patient_id=plan.patient_id,
            rle=plan.rle,
            patient_name=plan.name,
        )
        return folder / "ct"
    if modality == "ehr":
        return write_fhir_bundle(
            folder / "ehr.json",
            patient_id=plan.patient_id,
            severity=severity,
            rng=rng,
            index_time=plan.index_time,
            sex=plan.sex,
            age=plan.age,
            crp_unit=plan.crp_unit,
            temperature_unit=plan.temperature_unit,
            label=plan.label,
            patient_name=plan.name,
        )
    if modality == "notes":
        return write_note(folder / "note.txt", severity=severity, rng=rng)
    if modality == "device_logs":
        return write_device_log(
            folder / "vitals.csv", severity=severity, rng=rng, index_time=plan.index_time, label=plan.label
        )
    if modality == "audio":
        return write_lung_sound(
            folder / "lung_sound.wav",
            severity=severity,
            rng=rng,
            sample_rate=plan.sample_rate,
            seconds=2.5,
            channels=plan.audio_channels,
        )
    if modality == "video":
        return write_pulse_video(folder / f"echo{plan.video_suffix}", severity=severity, rng=rng)
    raise ValueError(f"unknown modality {modality!r}")


def generate_cohort(out: str | Path, n_patients: int = 60, seed: int = 7) -> Path:
    """Generate a synthetic cohort in the real formats and write its ``manifest.csv``.

    Files go under ``out/patients/<id>/``; the manifest holds paths relative to ``out``,
    empty cells for missing modalities, ``split`` (about 60/20/20), ``label:disease``,
    ``sex`` (F/M) and ``age``. A patient's files depend only on ``(seed, patient number)``.
    The folders of the generated patients are replaced; nothing else in ``out`` is touched.

    Args:
        out: the output folder (created).
        n_patients: how many patients (one index time each).
        seed: the seed of every random draw.

    Returns:
        The path of ``manifest.csv``.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     manifest = generate_cohort(folder, n_patients=2, seed=7)
        ...     header = manifest.read_text().splitlines()[0]
        >>> manifest.name, header.split(",")[:3]
        ('manifest.csv', ['patient_id', 'index_time', 'split'])
    """
    if n_patients < 1:
        raise ValueError(f"n_patients must be at least 1, got {n_patients}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = _splits(n_patients, seed)
    rows: list[dict[str, str]] = []
    for i in range(n_patients):
        plan = _plan_patient(seed, i)
        folder = out / "patients" / plan.patient_id
        if folder.exists():  # stale files (e.g. old CT slices) would join the new series
            shutil.rmtree(folder)
        row = {
            "patient_id": plan.patient_id,
            "index_time": _iso(plan.index_time),
            "split": splits[i],
            LABEL_COLUMN: str(plan.label),
            "sex": plan.sex,
            "age": str(plan.age),
        }
        for modality in MODALITY_COLUMNS:
            if plan.missing[modality]:
                row[modality] = ""
                continue
            written = _write_modality(modality, plan, folder, _patient_rng(seed, i, modality))
            relative = written.relative_to(out).as_posix()
            row[modality] = relative + "/" if written.is_dir() else relative
        rows.append(row)

    manifest = out / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(MANIFEST_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    logger.info("wrote a synthetic cohort of %d patients to %s", n_patients, out)
    return manifest

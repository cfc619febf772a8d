"""The synthetic cohort: per-patient severity, views and labels, one writer per modality, the manifest."""

from __future__ import annotations

import csv
import logging
import shutil
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from meddx.synth.audio import write_lung_sound
from meddx.synth.common import (
    FAMILY_NAMES,
    GIVEN_NAMES,
    LABEL_NOISE,
    MISSING_RATE,
    MODALITY_COLUMNS,
    VIEW_NOISE,
    iso,
    label_from_severity,
)
from meddx.synth.ct import write_ct_series
from meddx.synth.device_logs import write_device_log
from meddx.synth.fhir import write_fhir_bundle
from meddx.synth.interactions import NOTE_HISTORY, draw_context, interacting_views
from meddx.synth.notes import write_note
from meddx.synth.shift import Shift
from meddx.synth.video import write_pulse_video

logger = logging.getLogger(__name__)

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

_BASE_DATE = datetime(2024, 1, 1, tzinfo=timezone.utc)

# Streams of per-patient random draws (see _patient_rng): one per modality, so that
# changing how one writer draws does not shift any other writer's output.
_STREAMS = {"patient": 0, "imaging": 1, "ehr": 2, "notes": 3, "device_logs": 4, "audio": 5, "video": 6, "context": 7}


def _patient_rng(seed: int, patient: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, patient + 1, _STREAMS[stream]])


def _splits(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng([seed, 0, 0])
    n_val, n_test = int(round(0.2 * n)), int(round(0.2 * n))
    names = ["val"] * n_val + ["test"] * n_test + ["train"] * (n - n_val - n_test)
    return [names[j] for j in rng.permutation(n)]


@dataclass(frozen=True)
class _PatientPlan:
    """Everything drawn for one patient before any file is written."""

    patient_id: str
    severity: float
    label: int
    views: dict[str, float]  # the severity each modality sees (and "heart_rate" with interactions)
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
    context: dict[str, bool] | None = None  # the interacting cohort's (meddx.synth.interactions)


def _plan_patient(seed: int, i: int, ages: tuple[int, int] = (22, 90)) -> _PatientPlan:
    rng = _patient_rng(seed, i, "patient")
    severity = float(rng.normal())
    label = label_from_severity(severity + LABEL_NOISE * float(rng.normal()))
    views = {m: severity + VIEW_NOISE[m] * float(rng.normal()) for m in MODALITY_COLUMNS}
    missing = {m: bool(rng.random() < MISSING_RATE) for m in MODALITY_COLUMNS}
    if all(missing.values()):
        missing["ehr"] = False
    sex = str(rng.choice(["F", "M"]))
    age = int(rng.integers(22, 91))
    if ages != (22, 90):  # mapped, not redrawn: another range must not move the later draws
        age = ages[0] + (age - 22) * (ages[1] - ages[0] + 1) // 69
    index_time = _BASE_DATE + timedelta(
        days=int(rng.integers(0, 365)), hours=int(rng.integers(0, 24)), minutes=int(rng.integers(0, 60))
    )
    return _PatientPlan(
        patient_id=f"P{i + 1:04d}",
        severity=severity,
        label=label,
        views=views,
        missing=missing,
        sex=sex,
        age=age,
        index_time=index_time,
        name=f"{rng.choice(FAMILY_NAMES)}^{rng.choice(GIVEN_NAMES)}",
        rle=bool(rng.random() < 1 / 3),
        crp_unit="mg/dL" if rng.random() < 0.3 else "mg/L",
        temperature_unit="[degF]" if rng.random() < 0.3 else "Cel",
        sample_rate=int(rng.choice([4000, 8000, 11025, 22050], p=[0.45, 0.35, 0.12, 0.08])),
        audio_channels=2 if rng.random() < 0.15 else 1,
        video_suffix=".avi" if rng.random() < 0.25 else ".mp4",
        acquisition_time=index_time - timedelta(minutes=int(rng.integers(30, 36 * 60))),
    )


def _with_interactions(plan: _PatientPlan, seed: int, i: int) -> _PatientPlan:
    """The plan of the interacting cohort: context drawn from its own stream, views it moves replaced."""
    rng = _patient_rng(seed, i, "context")
    context = draw_context(rng, plan.age)
    return replace(plan, context=context, views=interacting_views(plan.severity, plan.views, context, rng))


def _write_modality(modality: str, plan: _PatientPlan, folder: Path, rng: np.random.Generator, shift: Shift) -> Path:
    """Write one modality of a planned patient; returns the path the manifest names."""
    severity = plan.views[modality]
    heart_rate = plan.views.get("heart_rate")  # only the interacting cohort has one
    context = plan.context
    history = None if context is None else [text for name, text in NOTE_HISTORY.items() if context[name]]
    if modality == "imaging":
        write_ct_series(
            folder / "ct",
            severity=severity,
            rng=rng,
            acquisition_time=plan.acquisition_time,
            patient_id=plan.patient_id,
            rle=plan.rle,
            patient_name=plan.name,
            kernel=shift.ct_kernel,
            slice_thickness=shift.ct_slice_thickness,
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
            context=context,
            heart_rate_severity=heart_rate,
        )
    if modality == "notes":
        return write_note(
            folder / "note.txt", severity=severity, rng=rng, template=shift.note_template, history=history
        )
    if modality == "device_logs":
        return write_device_log(
            folder / "vitals.csv",
            severity=severity,
            rng=rng,
            index_time=plan.index_time,
            label=plan.label,
            interval_s=shift.device_interval_s,
            offset=shift.device_offset,
            heart_rate_severity=heart_rate,
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


def cohort_truth(
    n_patients: int = 60, seed: int = 7, *, interactions: bool = False
) -> list[dict[str, str | int | float | bool]]:
    """What :func:`generate_cohort` draws for each patient before it writes a file, one dict a patient.

    Keys: ``patient_id``, ``severity``, ``label``, ``view:<name>`` (each modality's view and, with
    interactions, ``view:heart_rate``) and, with interactions, ``context:<name>``. The same
    ``(n_patients, seed, interactions)`` give the hidden truth of the cohort
    ``generate_cohort`` writes with them (and no ``shift``), which benchmarks compare with what
    the readers recover from its files.

    Example:
        >>> truth = cohort_truth(3, seed=7, interactions=True)
        >>> truth[0]["patient_id"], sorted(k for k in truth[0] if k.startswith("context:"))[:2]
        ('P0001', ['context:beta_blocker', 'context:copd'])
    """
    rows: list[dict[str, str | int | float | bool]] = []
    for i in range(n_patients):
        plan = _plan_patient(seed, i)
        if interactions:
            plan = _with_interactions(plan, seed, i)
        row: dict[str, str | int | float | bool] = {
            "patient_id": plan.patient_id,
            "severity": plan.severity,
            "label": plan.label,
        }
        row.update({f"view:{name}": value for name, value in plan.views.items()})
        row.update({f"context:{name}": held for name, held in (plan.context or {}).items()})
        rows.append(row)
    return rows


def generate_cohort(
    out: str | Path, n_patients: int = 60, seed: int = 7, *, shift: Shift | None = None, interactions: bool = False
) -> Path:
    """Generate a synthetic cohort in the real formats and write its ``manifest.csv``.

    Files go under ``out/patients/<id>/``; the manifest holds paths relative to ``out``,
    empty cells for missing modalities, ``split`` (about 60/20/20), ``label:disease``,
    ``sex`` (F/M) and ``age``. A patient's files depend only on ``(seed, patient number)``.
    The folders of the generated patients are replaced; nothing else in ``out`` is touched.

    Args:
        out: the output folder (created).
        n_patients: how many patients (one index time each).
        seed: the seed of every random draw.
        shift: generate as another site would (see :class:`~meddx.synth.shift.Shift`): the
            same patients, severities, labels and splits as without it, with one modality's
            files (or the ages) changed; None (or ``Shift()``) writes the default output.
        interactions: write the interacting cohort (:mod:`meddx.synth.interactions`): the same
            patients, severities, labels, missing modalities and splits, plus clinical context
            (heart failure, COPD, a beta-blocker in the EHR and the note; age) that changes
            what the CT, the monitor, the lung sound and the note mean. False: the additive
            default, byte for byte as before.

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
    shift = Shift() if shift is None else shift
    ages = shift.age_range or (22, 90)
    splits = _splits(n_patients, seed)
    rows: list[dict[str, str]] = []
    for i in range(n_patients):
        plan = _plan_patient(seed, i, ages)
        if interactions:
            plan = _with_interactions(plan, seed, i)
        folder = out / "patients" / plan.patient_id
        if folder.exists():  # stale files (e.g. old CT slices) would join the new series
            shutil.rmtree(folder)
        row = {
            "patient_id": plan.patient_id,
            "index_time": iso(plan.index_time),
            "split": splits[i],
            LABEL_COLUMN: str(plan.label),
            "sex": plan.sex,
            "age": str(plan.age),
        }
        for modality in MODALITY_COLUMNS:
            if plan.missing[modality]:
                row[modality] = ""
                continue
            written = _write_modality(modality, plan, folder, _patient_rng(seed, i, modality), shift)
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

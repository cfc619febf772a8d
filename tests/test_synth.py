"""The synthetic cohort: real formats, determinism, missing modalities, leakage traps, signal.

Every check reads the generated files with the reference libraries (pydicom, fhir.resources,
pandas, soundfile, OpenCV), never with meddx's own ingestors, so a bug in either side
cannot hide the other.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
import soundfile
from fhir.resources.R4B.bundle import Bundle
from pydicom.uid import ExplicitVRLittleEndian, RLELossless
from scipy.ndimage import binary_erosion
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from meddx.cohort import load_cohort
from meddx.synth import (
    LABEL_COLUMN,
    MANIFEST_COLUMNS,
    POST_INDEX_TAG,
    SITE_SHIFTS,
    Shift,
    generate_cohort,
    write_ct_series,
    write_fhir_bundle,
    write_lung_sound,
    write_pulse_video,
)

MODALITIES = ("imaging", "ehr", "notes", "device_logs", "audio", "video")
INDEX = datetime(2024, 3, 5, 14, 0, tzinfo=timezone.utc)


def _manifest(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _time(text: str) -> pd.Timestamp:
    return pd.Timestamp(text)


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _is_post_index(resource: dict) -> bool:
    return any(
        t.get("system") == POST_INDEX_TAG["system"] and t.get("code") == POST_INDEX_TAG["code"]
        for t in resource.get("meta", {}).get("tag", [])
    )


def _resource_time(resource: dict) -> str | None:
    for key in ("effectiveDateTime", "onsetDateTime", "authoredOn", "date"):
        if key in resource:
            return resource[key]
    if "period" in resource:
        return resource["period"]["start"]
    return None


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_cohort(tmp_path_factory.mktemp("cohort"), n_patients=24, seed=11)


# --------------------------------------------------------------------------- manifest


def test_manifest_follows_the_contract(cohort: Path) -> None:
    frame = _manifest(cohort)
    assert tuple(frame.columns) == MANIFEST_COLUMNS
    assert len(frame) == 24
    assert frame["patient_id"].is_unique
    assert set(frame["split"]) == {"train", "val", "test"}
    assert (frame["split"] == "train").sum() == 14  # 60/20/20 of 24
    assert set(frame["sex"]) <= {"F", "M"}
    assert set(frame[LABEL_COLUMN]) == {"0", "1"}
    assert frame["age"].astype(int).between(18, 100).all()
    assert frame["index_time"].str.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ").all()
    assert frame["index_time"].nunique() > 20
    # Some modalities are missing, none is missing for everyone.
    empty = frame[list(MODALITIES)] == ""
    assert empty.to_numpy().sum() >= 1
    assert (~empty).sum().min() >= 12
    # meddx's own manifest validation accepts it (relative paths that exist).
    loaded = load_cohort(cohort)
    assert len(loaded.rows) == 24


@pytest.fixture(scope="module")
def large_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_cohort(tmp_path_factory.mktemp("large"), n_patients=200, seed=7)


@pytest.mark.slow
def test_missing_rate_is_about_ten_percent(large_cohort: Path) -> None:
    frame = _manifest(large_cohort)
    rate = (frame[list(MODALITIES)] == "").to_numpy().mean()
    assert 0.06 < rate < 0.14
    assert (frame[list(MODALITIES)] == "").sum().between(8, 35).all()  # each modality, independently


# --------------------------------------------------------------------------- formats


def test_ct_series_are_part10_ct_with_geometry_and_hounsfield_units(cohort: Path) -> None:
    frame = _manifest(cohort)
    syntaxes: set[str] = set()
    shuffled = 0
    for _, row in frame[frame["imaging"] != ""].iterrows():
        files = sorted((cohort.parent / row["imaging"]).iterdir())
        assert len(files) == 12
        assert all(f.read_bytes()[128:132] == b"DICM" for f in files)
        slices = [pydicom.dcmread(f) for f in files]
        syntaxes |= {str(ds.file_meta.TransferSyntaxUID) for ds in slices}
        numbers = [int(ds.InstanceNumber) for ds in slices]
        shuffled += numbers != sorted(numbers)  # names sorted do not give the slice order
        assert {ds.SOPClassUID for ds in slices} == {pydicom.uid.CTImageStorage}
        assert {ds.Modality for ds in slices} == {"CT"}
        assert {ds.PatientID for ds in slices} == {row["patient_id"]}
        assert len({ds.SeriesInstanceUID for ds in slices}) == 1
        assert len({ds.SOPInstanceUID for ds in slices}) == 12
        acquired = datetime.strptime(slices[0].AcquisitionDate + slices[0].AcquisitionTime, "%Y%m%d%H%M%S.%f")
        assert acquired.replace(tzinfo=timezone.utc) < _time(row["index_time"])
        # Positions step along the slice normal by SpacingBetweenSlices.
        z = sorted(float(ds.ImagePositionPatient[2]) for ds in slices)
        assert np.allclose(np.diff(z), float(slices[0].SpacingBetweenSlices))
        assert [float(v) for v in slices[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        volume = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices])
        assert volume.shape == (12, 48, 48)
        assert slices[0].pixel_array.dtype == np.int16
        assert -1060 < np.median(volume[:, 0, :]) < -940  # air at the edge
        assert -10 < np.median(volume[:, 24, :][:, 18:30]) < 90  # soft tissue at the centre
    assert syntaxes == {ExplicitVRLittleEndian, RLELossless}
    assert shuffled >= 5


def test_fhir_bundles_validate_and_plant_post_index_resources(cohort: Path) -> None:
    frame = _manifest(cohort)
    units: set[str] = set()
    for _, row in frame[frame["ehr"] != ""].iterrows():
        text = (cohort.parent / row["ehr"]).read_text(encoding="utf-8")
        bundle = Bundle.model_validate_json(text)
        assert bundle.type == "collection"
        data = json.loads(text)
        resources = [e["resource"] for e in data["entry"]]
        patient = next(r for r in resources if r["resourceType"] == "Patient")
        assert patient["id"] == row["patient_id"]
        assert patient["gender"] == {"F": "female", "M": "male"}[row["sex"]]
        index_time = _time(row["index_time"])
        age = (index_time.date() - pd.Timestamp(patient["birthDate"]).date()).days / 365.25
        assert int(age) in (int(row["age"]) - 1, int(row["age"]))
        planted = [r for r in resources if _is_post_index(r)]
        assert {r["resourceType"] for r in planted} == {"Condition", "Observation", "DocumentReference"}
        # The tag marks exactly the resources dated after the index time.
        for resource in resources:
            when = _resource_time(resource)
            if when is not None:
                assert (_time(when) > index_time) == _is_post_index(resource), resource["resourceType"]
        confirmed = next(r for r in planted if r["resourceType"] == "Condition")["verificationStatus"]
        assert confirmed["coding"][0]["code"] == ("confirmed" if row[LABEL_COLUMN] == "1" else "refuted")
        for resource in resources:
            if resource["resourceType"] == "Observation" and "valueQuantity" in resource:
                units.add(resource["valueQuantity"]["unit"])
            if resource["resourceType"] == "DocumentReference":
                base64.b64decode(resource["content"][0]["attachment"]["data"]).decode("utf-8")
    assert {"mg/L", "mg/dL", "10*3/uL", "Cel", "[degF]", "/min", "%"} <= units


def test_notes_logs_audio_and_video_open_with_their_libraries(cohort: Path) -> None:
    frame = _manifest(cohort)
    root = cohort.parent
    notes = [(root / path).read_bytes().decode("utf-8") for path in frame.loc[frame["notes"] != "", "notes"]]
    assert all(text.startswith("EMERGENCY DEPARTMENT NOTE\n") and "Exam: " in text for text in notes)
    assert any(re.search(r"^(Denies|No) ", text, re.MULTILINE) for text in notes)  # negated symptoms
    assert any("presents after" in text for text in notes)  # reported symptoms

    unsorted = artefacts = after = 0
    for _, row in frame[frame["device_logs"] != ""].iterrows():
        log = pd.read_csv(root / row["device_logs"])
        assert list(log.columns) == ["timestamp", "channel", "value"]
        assert set(log["channel"]) == {"heart_rate", "spo2", "resp_rate"}
        assert log["timestamp"].str.endswith("Z").all()
        times = pd.to_datetime(log["timestamp"], utc=True)
        index_time = _time(row["index_time"])
        assert times.min() >= index_time - pd.Timedelta(hours=8)
        assert (times <= index_time).sum() > 1000
        after += int((times > index_time).any())
        unsorted += int(not times.is_monotonic_increasing)
        bad = ((log["channel"] == "spo2") & ~log["value"].between(50, 100)) | (log["value"] < 0)
        artefacts += int(bad.any())
        spacing = times[log["channel"] == "spo2"].sort_values().diff().dropna()
        assert spacing.max() > pd.Timedelta(minutes=5)  # a gap
    n_logs = int((frame["device_logs"] != "").sum())
    assert after == n_logs
    assert unsorted == n_logs
    assert artefacts >= n_logs // 3

    rates: set[int] = set()
    for path in frame.loc[frame["audio"] != "", "audio"]:
        info = soundfile.info(str(root / path))
        assert info.format == "WAV"
        assert info.subtype == "PCM_16"
        samples, rate = soundfile.read(str(root / path))
        assert 2.0 <= len(samples) / rate <= 4.0
        assert np.abs(samples).max() > 0.3
        rates.add(rate)
    assert len(rates) >= 3

    for path in frame.loc[frame["video"] != "", "video"]:
        capture = cv2.VideoCapture(str(root / path))
        frames = []
        while True:
            ok, image = capture.read()
            if not ok:
                break
            frames.append(image)
        capture.release()
        assert len(frames) == 24
        assert frames[0].shape == (64, 64, 3)


# --------------------------------------------------------------------------- writers alone


def test_rle_series_is_the_pixel_twin_of_the_uncompressed_one(tmp_path: Path) -> None:
    common = dict(severity=2.0, acquisition_time=INDEX, patient_id="P9", shuffle=False)
    plain = write_ct_series(tmp_path / "plain", rng=np.random.default_rng(3), **common)
    rle = write_ct_series(tmp_path / "rle", rng=np.random.default_rng(3), rle=True, **common)
    assert [p.name for p in plain] == [f"slice_{i:03d}.dcm" for i in range(12)]
    for a, b in zip(plain, rle, strict=True):
        da, db = pydicom.dcmread(a), pydicom.dcmread(b)
        assert da.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert db.file_meta.TransferSyntaxUID == RLELossless
        assert da.SOPInstanceUID == db.SOPInstanceUID
        assert np.array_equal(da.pixel_array, db.pixel_array)
    assert sum(p.stat().st_size for p in rle) < sum(p.stat().st_size for p in plain)


def test_drop_slice_leaves_a_gap_and_severity_grows_the_lesion(tmp_path: Path) -> None:
    files = write_ct_series(
        tmp_path / "gap",
        severity=0.0,
        rng=np.random.default_rng(1),
        acquisition_time=INDEX,
        patient_id="P1",
        drop_slice=5,
    )
    numbers = sorted(int(pydicom.dcmread(f).InstanceNumber) for f in files)
    assert numbers == [n for n in range(1, 13) if n != 6]

    def lesion_voxels(severity: float) -> int:
        series = write_ct_series(
            tmp_path / f"s{severity}",
            severity=severity,
            rng=np.random.default_rng(2),
            acquisition_time=INDEX,
            patient_id="P2",
        )
        total = 0
        for f in series:
            ds = pydicom.dcmread(f)
            hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            total += int(((hu > 90) & (hu < 350)).sum())
        return total

    assert lesion_voxels(-2.5) == 0 < lesion_voxels(0.5) < lesion_voxels(2.5)


def test_bundle_units_follow_the_arguments(tmp_path: Path) -> None:
    path = write_fhir_bundle(
        tmp_path / "b.json",
        patient_id="P7",
        severity=0.0,
        rng=np.random.default_rng(0),
        index_time=INDEX,
        sex="female",
        age=70,
        crp_unit="mg/dL",
        temperature_unit="[degF]",
        label=1,
    )
    Bundle.model_validate_json(path.read_text(encoding="utf-8"))
    observations = [
        e["resource"] for e in json.loads(path.read_text())["entry"] if e["resource"]["resourceType"] == "Observation"
    ]
    pre = [o for o in observations if not _is_post_index(o)]
    crp_units = {o["valueQuantity"]["unit"] for o in pre if o["code"]["coding"][0]["code"] == "1988-5"}
    temps = [o["valueQuantity"] for o in pre if o["code"]["coding"][0]["code"] == "8310-5"]
    assert crp_units == {"mg/dL"}
    assert {t["unit"] for t in temps} == {"[degF]"}
    assert all(95 < t["value"] < 106 for t in temps)
    panel = next(o for o in pre if o["code"]["coding"][0]["code"] == "85354-9")
    assert {c["code"]["coding"][0]["code"] for c in panel["component"]} == {"8480-6", "8462-4"}
    with pytest.raises(ValueError, match="crp_unit"):
        write_fhir_bundle(
            tmp_path / "x.json",
            patient_id="P7",
            severity=0.0,
            rng=np.random.default_rng(0),
            index_time=INDEX,
            sex="F",
            age=70,
            crp_unit="g/L",
        )


def test_stereo_audio_and_avi_video(tmp_path: Path) -> None:
    wav = write_lung_sound(
        tmp_path / "s.wav", severity=1.0, rng=np.random.default_rng(0), sample_rate=11025, channels=2
    )
    samples, rate = soundfile.read(str(wav))
    assert rate == 11025
    assert samples.shape == (33075, 2)
    avi = write_pulse_video(tmp_path / "v.avi", severity=0.0, rng=np.random.default_rng(0), n_frames=10, size=32)
    capture = cv2.VideoCapture(str(avi))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 10
    ok, image = capture.read()
    capture.release()
    assert ok
    assert image.shape == (32, 32, 3)
    with pytest.raises(ValueError, match=r"\.mp4 or \.avi"):
        write_pulse_video(tmp_path / "v.mkv", severity=0.0, rng=np.random.default_rng(0))


# --------------------------------------------------------------------------- determinism


def test_generation_is_byte_for_byte_deterministic(tmp_path: Path) -> None:
    first = _hashes(generate_cohort(tmp_path / "a", n_patients=6, seed=3).parent)
    again = _hashes(generate_cohort(tmp_path / "b", n_patients=6, seed=3).parent)
    assert first == again
    assert len(first) > 40
    other = _hashes(generate_cohort(tmp_path / "c", n_patients=6, seed=4).parent)
    shared = set(first) & set(other)
    assert shared
    assert all(first[k] != other[k] for k in shared)
    # A patient's files depend on the seed and the patient number only, not on the cohort size.
    fewer = _hashes(generate_cohort(tmp_path / "d", n_patients=4, seed=3).parent)
    fewer.pop("manifest.csv")
    assert fewer
    assert all(first[k] == v for k, v in fewer.items())
    # Re-generating into the same folder replaces the patients' files (no stale slices).
    assert _hashes(generate_cohort(tmp_path / "a", n_patients=6, seed=3).parent) == first


# --------------------------------------------------------------------------- signal


def _ct_feature(folder: Path) -> list[float]:
    count = 0
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        count += int(((hu > 90) & (hu < 350)).sum())  # hyperdense, below bone
    return [np.log1p(count)]


def _ehr_feature(path: Path, index_time: pd.Timestamp) -> list[float]:
    crp, wbc = [], []
    for entry in json.loads(path.read_text(encoding="utf-8"))["entry"]:
        r = entry["resource"]
        if r["resourceType"] != "Observation" or _time(r["effectiveDateTime"]) > index_time:
            continue
        code, quantity = r["code"]["coding"][0]["code"], r.get("valueQuantity")
        if code == "1988-5":
            crp.append(quantity["value"] * (10.0 if quantity["unit"] == "mg/dL" else 1.0))
        elif code == "6690-2":
            wbc.append(quantity["value"])
    return [float(np.log(np.mean(crp))), float(np.mean(wbc))]


_NEGATION = re.compile(r"\b(no|denies|without)\b")
_SYMPTOM_WORDS = ("cough", "fever", "shortness of breath", "chest pain", "chills", "fatigue", "crackles")


def _note_feature(path: Path) -> list[float]:
    score = 0
    for clause in re.split(r"[.;\n]", path.read_text(encoding="utf-8").lower()):
        hits = sum(clause.count(word) for word in _SYMPTOM_WORDS)
        score += -hits if _NEGATION.search(clause) else hits
    return [float(score)]


def _device_feature(path: Path, index_time: pd.Timestamp) -> list[float]:
    log = pd.read_csv(path)
    log = log[pd.to_datetime(log["timestamp"], utc=True) <= index_time]
    spo2 = log.loc[(log["channel"] == "spo2") & log["value"].between(50, 100), "value"].median()
    resp = log.loc[(log["channel"] == "resp_rate") & log["value"].between(4, 60), "value"].median()
    return [float(spo2), float(resp)]


def _audio_feature(path: Path) -> list[float]:
    samples, rate = soundfile.read(str(path), always_2d=True)
    mono = samples.mean(axis=1)
    sigma = np.median(np.abs(mono)) / 0.6745
    loud = np.flatnonzero(np.abs(mono) > 8 * sigma)
    events = 0 if len(loud) == 0 else 1 + int((np.diff(loud) > 0.02 * rate).sum())  # 20 ms apart
    return [float(np.log1p(events / (len(mono) / rate)))]


def _video_feature(path: Path) -> list[float]:
    capture = cv2.VideoCapture(str(path))
    brightness = []
    while True:
        ok, image = capture.read()
        if not ok:
            break
        brightness.append(float(image.mean()))
    capture.release()
    series = np.asarray(brightness)
    return [float(np.log(series.std() / series.mean()))]


@pytest.mark.slow
def test_each_modality_is_weak_alone_and_strong_together(large_cohort: Path) -> None:
    frame = _manifest(large_cohort)
    root = large_cohort.parent
    widths = {"imaging": 1, "ehr": 2, "notes": 1, "device_logs": 2, "audio": 1, "video": 1}
    features: dict[str, np.ndarray] = {m: np.full((len(frame), w), np.nan) for m, w in widths.items()}
    for i, row in frame.iterrows():
        index_time = _time(row["index_time"])
        if row["imaging"]:
            features["imaging"][i] = _ct_feature(root / row["imaging"])
        if row["ehr"]:
            features["ehr"][i] = _ehr_feature(root / row["ehr"], index_time)
        if row["notes"]:
            features["notes"][i] = _note_feature(root / row["notes"])
        if row["device_logs"]:
            features["device_logs"][i] = _device_feature(root / row["device_logs"], index_time)
        if row["audio"]:
            features["audio"][i] = _audio_feature(root / row["audio"])
        if row["video"]:
            features["video"][i] = _video_feature(root / row["video"])
    y = frame[LABEL_COLUMN].astype(int).to_numpy()
    assert 0.3 < y.mean() < 0.55
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)

    alone: dict[str, float] = {}
    for modality, x in features.items():
        present = ~np.isnan(x).any(axis=1)
        model = make_pipeline(StandardScaler(), LogisticRegression())
        p = cross_val_predict(model, x[present], y[present], cv=folds, method="predict_proba")[:, 1]
        alone[modality] = roc_auc_score(y[present], p)
    combined_x = np.hstack(list(features.values()))
    model = make_pipeline(SimpleImputer(), StandardScaler(), LogisticRegression())
    p = cross_val_predict(model, combined_x, y, cv=folds, method="predict_proba")[:, 1]
    together = roc_auc_score(y, p)

    for modality, auroc in alone.items():
        assert 0.55 < auroc < 0.85, (modality, alone)
    assert together >= 0.85, (together, alone)
    assert together > max(alone.values()) + 0.03, (together, alone)


# --------------------------------------------------------------------------- site shifts

_SHIFT_PATIENTS = 6
_MODALITY_FILES = (("imaging", "/ct/"), ("ehr", "/ehr.json"), ("notes", "/note.txt"), ("device_logs", "/vitals.csv"))
_MODALITY_FILES += (("audio", "/lung_sound.wav"), ("video", "/echo."))


def _modality_of(name: str) -> str:
    return next(m for m, part in _MODALITY_FILES if part in name)


def _shifted(cohort: Path, tmp_path: Path, shift: Shift) -> tuple[Path, set[str]]:
    """A shifted twin of the cohort fixture's first patients, and the modalities whose files differ."""
    manifest = generate_cohort(tmp_path / "shifted", n_patients=_SHIFT_PATIENTS, seed=11, shift=shift)
    base = generate_cohort(tmp_path / "base", n_patients=_SHIFT_PATIENTS, seed=11)
    before, after = _hashes(base.parent), _hashes(manifest.parent)
    before.pop("manifest.csv")
    after.pop("manifest.csv")
    assert {_modality_of(k) for k in before} == {_modality_of(k) for k in after}
    changed = {_modality_of(k) for k in set(before) | set(after) if before.get(k) != after.get(k)}
    kept = _manifest(base).drop(columns="age")
    assert _manifest(manifest).drop(columns="age").equals(kept)  # same patients, files, splits, labels
    # The unshifted cohort is the cohort fixture's first patients (files depend on seed and patient only).
    assert all(_hashes(cohort.parent)[k] == v for k, v in before.items())
    return manifest, changed


def _series(folder: Path) -> list[pydicom.Dataset]:
    return sorted((pydicom.dcmread(p) for p in folder.iterdir()), key=lambda ds: int(ds.InstanceNumber))


def _first_with(manifest: Path, modality: str) -> list[str]:
    frame = _manifest(manifest)
    return [v for v in frame[modality] if v]


def test_default_shift_changes_nothing(tmp_path: Path) -> None:
    plain = _hashes(generate_cohort(tmp_path / "a", n_patients=3, seed=5).parent)
    assert _hashes(generate_cohort(tmp_path / "b", n_patients=3, seed=5, shift=Shift()).parent) == plain
    assert Shift().modalities == ()
    assert {name: s.modalities for name, s in SITE_SHIFTS.items()} == {
        "ct-sharp-kernel": ("imaging",),
        "ct-thick-slices": ("imaging",),
        "monitor-15s-offset": ("device_logs",),
        "notes-ward-template": ("notes",),
        "children": ("ehr",),
    }


@pytest.mark.parametrize(
    "bad",
    [
        {"ct_kernel": "bone"},
        {"note_template": "icu"},
        {"ct_slice_thickness": 0.0},
        {"device_interval_s": 0},
        {"age_range": (30, 20)},
    ],
)
def test_shift_refuses_values_it_cannot_write(bad: dict) -> None:
    with pytest.raises(ValueError, match="Shift"):
        Shift(**bad)


def test_sharp_kernel_shifts_only_the_ct_texture(cohort: Path, tmp_path: Path) -> None:
    manifest, changed = _shifted(cohort, tmp_path, Shift(ct_kernel="sharp"))
    assert changed == {"imaging"}
    for relative in _first_with(manifest, "imaging"):
        plain, sharp = _series(tmp_path / "base" / relative), _series(tmp_path / "shifted" / relative)
        assert "ConvolutionKernel" not in plain[0]
        assert sharp[0].ConvolutionKernel == "SHARP"
        assert [ds.SliceThickness for ds in sharp] == [ds.SliceThickness for ds in plain]
        assert sharp[0].PixelSpacing == plain[0].PixelSpacing
        hu = [
            np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in s])
            for s in (plain, sharp)
        ]
        # Soft tissue away from any edge: its in-plane texture roughens.
        tissue = binary_erosion((hu[0] > -200) & (hu[0] < 200), np.ones((1, 5, 5), dtype=bool))
        rough = [np.std(np.diff(v, axis=2)[tissue[:, :, 1:] & tissue[:, :, :-1]]) for v in hu]
        assert rough[1] > 2.5 * rough[0]
        assert abs(np.median(hu[1][tissue]) - np.median(hu[0][tissue])) < 15  # same tissue, same HU level


def test_slice_thickness_shift_writes_the_geometry(cohort: Path, tmp_path: Path) -> None:
    manifest, changed = _shifted(cohort, tmp_path, Shift(ct_slice_thickness=10.0))
    assert changed == {"imaging"}
    for relative in _first_with(manifest, "imaging"):
        sharp = _series(tmp_path / "shifted" / relative)
        assert {float(ds.SliceThickness) for ds in sharp} == {10.0}
        assert {float(ds.SpacingBetweenSlices) for ds in sharp} == {10.0}
        z = np.array([float(ds.ImagePositionPatient[2]) for ds in sharp])
        assert np.allclose(np.abs(np.diff(z)), 10.0)


def test_monitor_shift_samples_at_another_rate_with_an_offset(cohort: Path, tmp_path: Path) -> None:
    manifest, changed = _shifted(cohort, tmp_path, Shift(device_interval_s=15, device_offset=6.0))
    assert changed == {"device_logs"}
    frame = _manifest(manifest)
    differences = []
    for relative, index_time in zip(frame["device_logs"], frame["index_time"], strict=True):
        if not relative:
            continue
        logs = [pd.read_csv(tmp_path / root / relative) for root in ("base", "shifted")]
        steps = []
        for log in logs:
            hr = log[log["channel"] == "heart_rate"]
            times = pd.to_datetime(hr["timestamp"]).sort_values().diff().dt.total_seconds().dropna()
            steps.append(times.mode().iloc[0])
        assert steps == [60.0, 15.0]
        before = [
            log[(pd.to_datetime(log["timestamp"]) <= _time(index_time)) & (log["channel"] == "heart_rate")]
            for log in logs
        ]
        values = [b["value"][(b["value"] > 0)].median() for b in before]
        differences.append(values[1] - values[0])
    assert differences
    assert 3.0 < np.mean(differences) < 9.0


def test_ward_template_rewrites_the_notes_only(cohort: Path, tmp_path: Path) -> None:
    manifest, changed = _shifted(cohort, tmp_path, Shift(note_template="ward"))
    assert changed == {"notes"}
    for relative in _first_with(manifest, "notes"):
        plain = (tmp_path / "base" / relative).read_text(encoding="utf-8")
        ward = (tmp_path / "shifted" / relative).read_text(encoding="utf-8")
        assert plain.startswith("EMERGENCY DEPARTMENT NOTE")
        assert re.match(r"WARD ROUND - DAY [1-7]\n", ward)
        assert [line[:2] for line in ward.splitlines() if line[:2] in ("S:", "O:", "A:", "P:")] == [
            "S:",
            "O:",
            "A:",
            "P:",
        ]
        assert "Chief complaint" not in ward
        # The same findings: what the ED note reports, the ward note reports.
        reported = re.search(r"Chief complaint: (.*)\.", plain).group(1)
        assert (reported == "general malaise") == ("feeling generally unwell" in ward)
        assert ("crackles at the" in plain) == ("basal crepitations" in ward)


def test_age_shift_moves_the_ages_and_the_birth_dates(cohort: Path, tmp_path: Path) -> None:
    manifest, changed = _shifted(cohort, tmp_path, Shift(age_range=(2, 15)))
    assert changed == {"ehr"}
    frame = _manifest(manifest)
    ages = frame["age"].astype(int)
    assert ages.between(2, 15).all()
    assert _manifest(tmp_path / "base" / "manifest.csv")["age"].astype(int).between(22, 90).all()
    for relative, age, index_time in zip(frame["ehr"], ages, frame["index_time"], strict=True):
        if not relative:
            continue
        bundle = json.loads((tmp_path / "shifted" / relative).read_text(encoding="utf-8"))
        patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
        born = pd.Timestamp(patient["birthDate"])
        years = (_time(index_time).tz_localize(None) - born).days / 365.25
        assert abs(years - age) <= 1.5

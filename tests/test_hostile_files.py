"""Hostile and broken files, tried as an attacker would (issue 9).

Readers that could eat memory run in a child process under ``RLIMIT_AS``, and readers
that could hang run in a child process with a timeout, so a regression fails the test
instead of taking the machine down or stalling the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import scipy.io.wavfile

from meddx.config import (
    AudioConfig,
    DeviceLogConfig,
    EhrConfig,
    ImagingConfig,
    IngestConfig,
    NotesConfig,
    VideoConfig,
)
from meddx.errors import IngestError
from meddx.ingest.audio import AudioIngestor
from meddx.ingest.base import IngestRequest
from meddx.ingest.device_logs import read_device_log
from meddx.ingest.dicom import ImagingIngestor
from meddx.ingest.dicom_io import decode_frames, looks_like_dicom, read_dicom
from meddx.ingest.ehr_tensorizer import EhrTensorizer
from meddx.ingest.fhir import FhirIngestor
from meddx.ingest.notes import NotesIngestor, bundled_text_model
from meddx.ingest.registry import build_ingestors
from meddx.ingest.video import VideoIngestor
from meddx.records import Event, Modality, ModalityRecord, parse_time
from meddx.synth import write_ct_series

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "patients"
P1 = SAMPLE / "P0001"  # imaging, ehr, notes, audio, video
P2 = SAMPLE / "P0002"  # device logs
P1_INDEX = "2024-12-03T08:27:00Z"  # P0001's index time in the sample manifest
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
SMALL_NOTES = IngestConfig(notes=NotesConfig(max_length=32, max_chunks=4))

# The child process: read each case, print one JSON line per case (flushed, so a hang
# still shows which cases finished).
_CHILD = r"""
import json, resource, sys
limit = int(sys.argv[1])
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from pathlib import Path
from meddx.errors import IngestError
from meddx.ingest.base import IngestRequest
from meddx.ingest.registry import build_ingestors
from meddx.records import Modality, parse_time
readers = build_ingestors()
for reader, paths in json.loads(sys.argv[2]):
    request = IngestRequest("P0001", parse_time(sys.argv[3]), {Modality(m): Path(p) for m, p in paths.items()})
    try:
        record = readers[Modality(reader)].read(request)
        out = {"outcome": "record", "warnings": list(record.warnings) if record is not None else []}
    except IngestError as exc:
        out = {"outcome": "IngestError", "path": exc.path, "modality": exc.modality, "reason": exc.reason}
    except BaseException as exc:
        out = {"outcome": type(exc).__name__, "reason": str(exc)[:300]}
    print(json.dumps(out), flush=True)
"""


# Timeouts here only catch a hang (a FIFO opened for reading blocks for ever): generous, for a loaded machine.
def run_readers(cases: list[tuple[str, dict[str, str]]], memory_limit: int = 0, timeout: float = 600) -> list[dict]:
    """Run ``(reader modality, {modality: path})`` cases in a child process; one result per case."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",  # thread pools reserve address space per thread
        "OPENBLAS_NUM_THREADS": "1",
    }
    command = [sys.executable, "-c", _CHILD, str(memory_limit), json.dumps(cases), P1_INDEX]
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired as exc:
        finished = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        n = len(finished.splitlines())
        pytest.fail(f"a reader hung: case {n} ({cases[n] if n < len(cases) else '?'}) did not finish in {timeout} s")
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(cases), f"the child died (status {done.returncode}): {done.stderr[-2000:]}"
    return results


ALL_READERS = ["imaging", "ehr", "notes", "device_logs", "audio", "video"]


# ---------------------------------------------------------------- memory is bounded


def test_dev_zero_is_refused_by_every_reader_under_a_memory_limit() -> None:
    cases = [(m, {m: "/dev/zero"}) for m in ALL_READERS]
    cases.append(("notes", {"ehr": "/dev/zero"}))  # notes read FHIR DocumentReferences too
    results = run_readers(cases, memory_limit=2 << 30)
    for (reader, _), result in zip(cases, results, strict=True):
        assert result["outcome"] == "IngestError", (reader, result)
        assert result["path"] == "/dev/zero"
        assert result["modality"] == reader
        assert "a character device, not a regular file" in result["reason"]
        assert "folder" not in result["reason"].split(";")[0]  # never called "a folder"


def test_a_40_mb_note_is_refused_before_reading_under_a_memory_limit(tmp_path: Path) -> None:
    line = "Productive cough for three days, crackles at the right base, afebrile, SpO2 94 % on room air.\n"
    note = tmp_path / "huge_note.txt"
    with open(note, "w", encoding="utf-8") as handle:
        handle.write(line * (40 * 1024 * 1024 // len(line) + 1))  # real text, just over 40 MiB
    [result] = run_readers([("notes", {"notes": str(note)})], memory_limit=2 << 30)
    assert result["outcome"] == "IngestError"
    assert result["path"] == str(note)
    assert "40.0 MB, over the 32 MB limit" in result["reason"]
    assert "notes.max_file_mb" in result["reason"]


@pytest.mark.parametrize(
    ("modality", "path", "config"),
    [
        ("imaging", P1 / "ct", IngestConfig(imaging=ImagingConfig(max_file_mb=0.001))),
        ("ehr", P1 / "ehr.json", IngestConfig(ehr=EhrConfig(max_file_mb=0.001))),
        ("notes", P1 / "note.txt", IngestConfig(notes=NotesConfig(max_file_mb=0.0001))),
        ("device_logs", P2 / "vitals.csv", IngestConfig(device_logs=DeviceLogConfig(max_file_mb=0.001))),
        ("audio", P1 / "lung_sound.wav", IngestConfig(audio=AudioConfig(max_file_mb=0.001))),
        ("video", P1 / "echo.mp4", IngestConfig(video=VideoConfig(max_file_mb=0.001))),
    ],
)
def test_each_modality_refuses_a_file_over_its_configured_size(modality: str, path: Path, config: IngestConfig) -> None:
    reader = build_ingestors(config)[Modality(modality)]
    with pytest.raises(
        IngestError, match=rf"over the .* MB limit for {modality} files.*{modality}\.max_file_mb"
    ) as caught:
        reader.read(IngestRequest("P0001", parse_time(P1_INDEX), {Modality(modality): path}))
    refused = Path(caught.value.path)
    assert refused == path or refused.parent == path  # the file itself, or the file of the series folder
    assert build_ingestors()[Modality(modality)].config.model_dump()[modality]["max_file_mb"] >= 32


# --------------------------------------------------------------- not a regular file


def test_a_fifo_is_refused_by_every_reader_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    notes_folder = tmp_path / "notes"
    notes_folder.mkdir()
    shutil.copy(P1 / "note.txt", notes_folder / "visit.txt")
    os.mkfifo(notes_folder / "zz_pipe.txt")  # a FIFO inside a notes folder is not a note
    cases = [(m, {m: str(fifo)}) for m in ALL_READERS]
    cases.append(("notes", {"notes": str(notes_folder)}))
    cases.append(("notes", {"notes": str(P1 / "note.txt"), "ehr": str(fifo)}))
    results = run_readers(cases)
    for (reader, _), result in zip(cases[:6], results[:6], strict=True):
        assert result["outcome"] == "IngestError", (reader, result)
        assert result["path"] == str(fifo), (reader, result)
        assert "is a named pipe (FIFO), not a regular file" in result["reason"]
    assert results[6]["outcome"] == "record"
    assert results[6]["warnings"] == []
    assert results[7]["outcome"] == "record"
    assert any(str(fifo) in w and "named pipe" in w for w in results[7]["warnings"])


# ------------------------------------------------------------------ patient identity


def test_a_series_folder_with_another_patients_series_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "ct"
    shutil.copytree(TEST_FILES / "dicomdirtests" / "77654033" / "CT2", folder / "a")  # PatientID 77654033
    shutil.copytree(TEST_FILES / "dicomdirtests" / "98892001" / "CT5N", folder / "b")  # PatientID 98890234
    with pytest.raises(IngestError, match="2 different PatientID values") as caught:
        ImagingIngestor().read(IngestRequest("P0001", parse_time("2100-01-01T00:00:00Z"), {Modality.IMAGING: folder}))
    assert caught.value.path == str(folder)
    assert "77654033" not in str(caught.value)
    assert "98890234" not in str(caught.value)  # identifiers never printed


@pytest.mark.parametrize("differs_in", ["StudyInstanceUID", "FrameOfReferenceUID"])
def test_two_series_sharing_a_series_uid_are_not_merged(tmp_path: Path, differs_in: str) -> None:
    folder = tmp_path / "ct"
    acquired = parse_time("2024-03-05T09:00:00Z")
    first = write_ct_series(
        folder / "first",
        severity=1.0,
        rng=np.random.default_rng(1),
        acquisition_time=acquired,
        patient_id="P0001",
        n_slices=10,
    )
    second = write_ct_series(
        folder / "second",
        severity=1.0,
        rng=np.random.default_rng(2),
        acquisition_time=acquired,
        patient_id="P0001",
        n_slices=6,
    )
    shared_uid = str(pydicom.dcmread(first[0]).SeriesInstanceUID)
    other = pydicom.uid.generate_uid()
    for file in second:
        ds = pydicom.dcmread(file)
        ds.SeriesInstanceUID = shared_uid  # the same UID in another study / frame of reference
        setattr(ds, differs_in, other)
        ds.save_as(file)
    record = ImagingIngestor().read(
        IngestRequest("P0001", parse_time("2100-01-01T00:00:00Z"), {Modality.IMAGING: folder})
    )
    assert record.meta["n_series"] == 2
    assert record.meta["n_slices"] == 10  # the 10-slice series alone
    assert record.meta["series_uid"] == shared_uid
    assert any("kept apart, not merged" in w for w in record.warnings)
    differ = "StudyInstanceUID" if differs_in == "StudyInstanceUID" else "FrameOfReferenceUID"
    first_value = str(getattr(pydicom.dcmread(first[0]), differ))
    if differ == "StudyInstanceUID":
        assert record.meta["study_uid"] == first_value


# ----------------------------------------------------- one reader's failure stays its own


def _broken_bundles(folder: Path) -> dict[str, Path]:
    bundle = json.loads((P1 / "ehr.json").read_text())
    capability = {"resource": {"resourceType": "CapabilityStatement", "fhirVersion": 4}}  # a number, not "4.0.1"
    cases = {
        "truncated": (P1 / "ehr.json").read_bytes()[:700],
        "nested": b"[" * 100_000 + b"]" * 100_000,
        "numeric_version": json.dumps({**bundle, "entry": bundle["entry"] + [capability]}).encode(),
    }
    paths = {}
    for name, data in cases.items():
        paths[name] = folder / f"{name}.json"
        paths[name].write_bytes(data)
    return paths


def test_a_broken_ehr_file_does_not_fail_the_good_note_file(tmp_path: Path) -> None:
    reader = NotesIngestor(SMALL_NOTES)
    index = parse_time(P1_INDEX)
    for name, broken in _broken_bundles(tmp_path).items():
        record = reader.read(IngestRequest("P0001", index, {Modality.NOTES: P1 / "note.txt", Modality.EHR: broken}))
        assert record is not None, name
        assert record.meta["from_files"] == 1, name
        assert record.source == str(P1 / "note.txt")
        assert any(str(broken) in w for w in record.warnings), (name, record.warnings)
        with pytest.raises(IngestError) as caught:  # without note files, the error names the broken EHR file
            reader.read(IngestRequest("P0001", index, {Modality.EHR: broken}))
        assert caught.value.path == str(broken), name
        assert caught.value.modality == "notes", name
        with pytest.raises(IngestError) as caught:  # and the EHR reader's own error is typed too
            FhirIngestor().read(IngestRequest("P0001", index, {Modality.EHR: broken}))
        assert caught.value.path == str(broken), name


# ------------------------------------------------------------------------------ values


def _bundle_with_value(source: Path, target: Path, value: float) -> Path:
    """The patient's Bundle with the first numeric Observation value replaced."""
    bundle = json.loads(source.read_text())
    for entry in bundle["entry"]:
        quantity = entry["resource"].get("valueQuantity")
        if entry["resource"]["resourceType"] == "Observation" and quantity is not None:
            quantity["value"] = value
            break
    else:
        raise AssertionError(f"{source} has no Observation with a valueQuantity")
    target.write_text(json.dumps(bundle))
    return target


def test_a_lab_value_of_1e308_is_masked_and_counted_and_keeps_every_patient_finite(tmp_path: Path) -> None:
    manifest = pd.read_csv(REPO / "sample_data" / "manifest.csv").dropna(subset=["ehr"]).head(6)
    reader = FhirIngestor()
    records = []
    for i, row in enumerate(manifest.itertuples()):
        path = REPO / "sample_data" / row.ehr
        if i == 0:
            path = _bundle_with_value(path, tmp_path / "poisoned.json", 1e308)
        records.append(reader.read(IngestRequest(row.patient_id, parse_time(row.index_time), {Modality.EHR: path})))
    assert records[0].meta["implausible_values"] == 1
    assert any("masked 1 lab value" in w for w in records[0].warnings)
    assert all(r.meta["implausible_values"] == 0 for r in records[1:])
    tensorizer = EhrTensorizer(IngestConfig()).fit(records)
    assert np.all(np.isfinite(tensorizer.lab_mean_))
    assert np.all(np.isfinite(tensorizer.lab_std_))
    for record in records:
        arrays = tensorizer.transform(record)
        assert np.all(np.isfinite(arrays["lab_values"])), record.source


def test_the_ehr_tensorizer_masks_non_finite_and_implausible_values_itself() -> None:
    index = parse_time("2024-03-05T14:00:00Z")
    glucose = "http://loinc.org|2345-7"

    def record(values: list[float]) -> ModalityRecord:
        events = [
            Event(parse_time(f"2024-03-0{d + 1}T08:00:00Z"), "observation", glucose, value=v, unit="mg/dL")
            for d, v in enumerate(values)
        ]
        return ModalityRecord(Modality.EHR, "hand-made", events=events, meta={"index_time": index.isoformat()})

    train = [record([90.0, 110.0]), record([100.0, float("inf")]), record([95.0, 1e308]), record([105.0, -40.0])]
    tensorizer = EhrTensorizer(IngestConfig()).fit(train)
    row = tensorizer.lab_codes_.index(glucose)
    assert 90.0 <= tensorizer.lab_mean_[row] <= 110.0
    assert tensorizer.lab_std_[row] < 50.0
    arrays = tensorizer.transform(record([100.0, float("nan"), 1e308]))
    assert np.all(np.isfinite(arrays["lab_values"]))
    assert arrays["lab_counts"][row].sum() == 1


def test_an_audio_header_claiming_2_ghz_is_refused(tmp_path: Path) -> None:
    samples = (np.random.default_rng(0).standard_normal(11_000) * 1000).astype(np.int16)
    forged = tmp_path / "forged.wav"
    scipy.io.wavfile.write(forged, 2_000_000_000, samples)
    with pytest.raises(IngestError, match="sample rate of 2000000000 Hz, outside the 500-1000000 Hz") as caught:
        AudioIngestor().read(IngestRequest("P0001", parse_time(P1_INDEX), {Modality.AUDIO: forged}))
    assert caught.value.path == str(forged)


def test_multichannel_audio_mixes_down_block_by_block_to_the_channel_mean(tmp_path: Path) -> None:
    rate = 16_000  # 4 s at 16 kHz: 64000 frames, read in blocks
    channels = np.random.default_rng(1).uniform(-0.5, 0.5, size=(70_000, 3)).astype(np.float32)
    path = tmp_path / "array.wav"
    scipy.io.wavfile.write(path, rate, channels)
    wave, got_rate, meta, _ = AudioIngestor().load(path)
    wanted = 4 * rate
    start = (70_000 - wanted) // 2
    assert got_rate == rate
    assert meta["orig_channels"] == 3
    np.testing.assert_allclose(wave, channels[start : start + wanted].mean(axis=1), atol=1e-6)


@pytest.mark.parametrize("index_time", ["0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z"])
def test_an_index_time_pandas_cannot_hold_is_a_typed_error_in_every_reader(index_time: str) -> None:
    when = parse_time(index_time)
    readers = build_ingestors(SMALL_NOTES)
    paths = {
        Modality.IMAGING: P1 / "ct",
        Modality.EHR: P1 / "ehr.json",
        Modality.NOTES: P1 / "note.txt",
        Modality.AUDIO: P1 / "lung_sound.wav",
        Modality.VIDEO: P1 / "echo.mp4",
        Modality.DEVICE_LOGS: P2 / "vitals.csv",
    }
    for modality, reader in readers.items():
        try:
            reader.read(IngestRequest("P0001", when, {modality: paths[modality]}))
        except IngestError as exc:
            assert exc.modality == modality.value
    with pytest.raises(IngestError, match="index_time .* is outside the years 1678-2261"):
        read_device_log(P2 / "vitals.csv", when, DeviceLogConfig())


# ------------------------------------------------------------------ messages that mislead


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"])
def test_utf16_and_utf32_notes_read_like_utf8(tmp_path: Path, encoding: str) -> None:
    text = (P1 / "note.txt").read_text(encoding="utf-8") + "\nTemperatur 38,5 °C, Sättigung 94 %.\n"
    plain, other = tmp_path / "plain.txt", tmp_path / f"{encoding}.txt"
    plain.write_text(text, encoding="utf-8")
    other.write_bytes(text.encode(encoding))  # "utf-16" and "utf-32" write a byte order mark
    reader = NotesIngestor(SMALL_NOTES)
    index = parse_time(P1_INDEX)
    expected = reader.read(IngestRequest("P0001", index, {Modality.NOTES: plain})).arrays["input_ids"]
    got = reader.read(IngestRequest("P0001", index, {Modality.NOTES: other})).arrays["input_ids"]
    np.testing.assert_array_equal(got, expected)


def test_a_binary_note_says_what_it_is(tmp_path: Path) -> None:
    binary = tmp_path / "scan.txt"
    binary.write_bytes((TEST_FILES / "CT_small.dcm").read_bytes())
    with pytest.raises(IngestError, match="neither UTF-8 nor UTF-16/32 text: a binary file") as caught:
        NotesIngestor(SMALL_NOTES).read(IngestRequest("P0001", parse_time(P1_INDEX), {Modality.NOTES: binary}))
    assert caught.value.path == str(binary)


def test_a_long_note_tokenised_from_a_prefix_equals_the_whole_note(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    words = (P1 / "note.txt").read_text(encoding="utf-8").split()
    rng = np.random.default_rng(3)
    note = tmp_path / "long.txt"
    note.write_text(" ".join(rng.choice(words, size=60_000)), encoding="utf-8")  # ~100x what 4 chunks need
    record = NotesIngestor(SMALL_NOTES).read(IngestRequest("P0001", parse_time(P1_INDEX), {Modality.NOTES: note}))
    tokenizer = AutoTokenizer.from_pretrained(str(bundled_text_model()), local_files_only=True)
    whole = tokenizer(
        note.read_text(encoding="utf-8"),
        max_length=32,
        truncation=True,
        padding="max_length",
        return_overflowing_tokens=True,
    )["input_ids"]
    np.testing.assert_array_equal(record.arrays["input_ids"], np.asarray(whole[:4]))
    assert record.meta["truncated"]


def test_nan_slice_positions_are_called_not_finite_not_missing(tmp_path: Path) -> None:
    files = write_ct_series(
        tmp_path / "ct",
        severity=1.0,
        rng=np.random.default_rng(4),
        acquisition_time=parse_time("2024-03-05T09:00:00Z"),
        patient_id="P0001",
        n_slices=6,
    )
    ds = pydicom.dcmread(files[0])
    ds["ImagePositionPatient"].value = b"NaN\\NaN\\NaN "  # DS bytes as a broken modality writes them
    ds.save_as(files[0])
    record = ImagingIngestor().read(
        IngestRequest("P0001", parse_time("2100-01-01T00:00:00Z"), {Modality.IMAGING: tmp_path / "ct"})
    )
    note = next(w for w in record.warnings if "ordered by InstanceNumber" in w)
    assert "1 slice(s) have ImagePositionPatient/ImageOrientationPatient values that are not finite" in note
    assert "lack" not in note


def test_timestamps_mixing_epoch_and_iso_name_a_row_of_each_kind(tmp_path: Path) -> None:
    path = tmp_path / "vitals.csv"
    pd.DataFrame(
        {
            "timestamp": ["1709647140", "1709647200", "2024-03-05T14:01:00Z", "2024-03-05T14:02:00Z"],
            "channel": ["heart_rate"] * 4,
            "value": [80, 81, 82, 83],
        }
    ).to_csv(path, index=False)
    with pytest.raises(IngestError, match=r"mix epoch seconds \(first in row 1\) and ISO 8601 text \(first in row 3\)"):
        read_device_log(path, parse_time("2024-03-05T15:00:00Z"), DeviceLogConfig())


def test_an_unusable_pixel_array_shape_says_what_was_found_and_expected(tmp_path: Path) -> None:
    palette = pydicom.dcmread(TEST_FILES / "examples_palette.dcm")
    ds = pydicom.dcmread(TEST_FILES / "SC_rgb_small_odd.dcm")  # 3 samples per pixel, 3x3
    for colour in ("Red", "Green", "Blue"):  # a palette on an RGB image: the header contradicts the pixels
        for part in ("Descriptor", "Data"):
            keyword = f"{colour}PaletteColorLookupTable{part}"
            setattr(ds, keyword, getattr(palette, keyword))
            ds[keyword].VR = palette[keyword].VR
    ds.PhotometricInterpretation = "PALETTE COLOR"
    path = tmp_path / "palette_on_rgb.dcm"
    ds.save_as(path)
    with pytest.raises(IngestError) as caught:
        decode_frames(read_dicom(path), path)
    reason = caught.value.reason
    assert caught.value.path == str(path)
    assert "decodes to an array of shape (1, 3, 3, 3, 3)" in reason
    assert "needs (frames, 3, 3, 3)" in reason
    assert "SamplesPerPixel=3" in reason
    assert "PALETTE COLOR" in reason


# ------------------------------------------------------------------ one DICOM sniffing rule


def test_one_sniffing_rule_finds_dicom_without_a_preamble(tmp_path: Path) -> None:
    for name in ("ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm", "rtstruct.dcm"):  # no preamble in pydicom
        assert (TEST_FILES / name).read_bytes()[128:132] != b"DICM", name
        assert looks_like_dicom(TEST_FILES / name), name
    for other in (P1 / "echo.mp4", P1 / "lung_sound.wav", P1 / "note.txt", P1 / "ehr.json"):
        assert not looks_like_dicom(other), other
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    answer: list[bool] = []
    sniffing = threading.Thread(target=lambda: answer.append(looks_like_dicom(fifo)), daemon=True)
    sniffing.start()
    sniffing.join(timeout=600)  # opening a FIFO would block until a writer comes: the check must not open it
    if sniffing.is_alive():
        with open(fifo, "wb"):  # let the blocked reader go before failing
            pass
        pytest.fail("looks_like_dicom opened a FIFO and blocked")
    assert answer == [False]


def test_video_reads_a_preamble_less_cine_without_a_dicom_suffix(tmp_path: Path) -> None:
    cine = TEST_FILES / "examples_ybr_color.dcm"  # 30-frame ultrasound cine
    bare = tmp_path / "cine"
    bare.write_bytes(cine.read_bytes()[132:])  # no preamble, no DICM prefix, no suffix
    assert looks_like_dicom(bare)
    reader = VideoIngestor()
    index = parse_time("2100-01-01T00:00:00Z")
    got = reader.read(IngestRequest("P0001", index, {Modality.VIDEO: bare}))
    expected = reader.read(IngestRequest("P0001", index, {Modality.VIDEO: cine}))
    assert got.meta["source_format"] == "dicom"
    np.testing.assert_array_equal(got.arrays["frames"], expected.arrays["frames"])


def test_a_gzipped_log_is_held_to_the_size_limit_by_what_it_decompresses_to(tmp_path: Path) -> None:
    import gzip

    source = (P2 / "vitals.csv").read_text()
    small = tmp_path / "vitals.csv.gz"
    with gzip.open(small, "wt") as handle:
        handle.write(source)
    limit_mb = 2 * len(source.encode()) / 2**20  # room for the real log
    config = IngestConfig(device_logs=DeviceLogConfig(max_file_mb=limit_mb))
    index = parse_time("2024-11-06T23:20:00Z")  # P0002's index time in the sample manifest
    assert read_device_log(small, index, config.device_logs) is not None  # within the limit: read
    bomb = tmp_path / "bomb.csv.gz"
    header, first_row = source.splitlines()[:2]
    with gzip.open(bomb, "wt") as handle:  # a few kB on disk, 64x the limit once decompressed
        handle.write(header + "\n" + (first_row + "\n") * int(64 * limit_mb * 2**20 / len(first_row)))
    assert bomb.stat().st_size < limit_mb * 2**20
    with pytest.raises(IngestError, match=r"decompresses to more than .*device_logs\.max_file_mb"):
        read_device_log(bomb, index, config.device_logs)


def test_a_bulk_line_over_the_limit_is_skipped_without_being_read_whole(tmp_path: Path) -> None:
    from meddx.ingest.fhir_bulk import BulkIndex

    synthea = Path(__file__).resolve().parent / "data" / "synthea-bulk"
    folder = tmp_path / "bulk"
    folder.mkdir()
    shutil.copy(synthea / "Patient.000.ndjson", folder / "Patient.000.ndjson")
    lines = (synthea / "Condition.000.ndjson").read_text().splitlines()
    huge = lines[1][:-1] + ', "note": [{"text": "' + "x" * (3 * 2**20) + '"}]}'  # one 3 MB resource
    (folder / "Condition.000.ndjson").write_text("\n".join([lines[0], huge, *lines[2:]]) + "\n")
    index = BulkIndex.build(folder, {"Patient", "Condition"}, max_line_bytes=2**20)
    [conditions] = [f for f in index.files if f.resource_type == "Condition"]
    assert [(number, reason) for _, number, reason in conditions.broken] == [
        (2, "longer than ehr.max_file_mb (1 MB): not read")
    ]
    assert conditions.n_lines == len(lines)  # the lines after it are indexed at their own offsets
    assert sum(len(o) for o in conditions.offsets.values()) == len(lines) - 1
    reader = FhirIngestor(IngestConfig(ehr=EhrConfig(max_file_mb=1)))
    record = reader.read_patient(folder, "6a4160eb-a793-2f86-2302-378626f46cce", parse_time("2030-01-01T00:00:00Z"))
    assert record.meta["resources"]["Condition"] >= 1

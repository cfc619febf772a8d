"""The imaging ingestor on real DICOM (pydicom's own test files) and on generated series."""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG4HP41, JPEGLSLossless

from meddx.config import ImagingConfig, IngestConfig
from meddx.dicom_times import dicom_time
from meddx.errors import ConfigError, IngestError
from meddx.ingest.base import IngestRequest
from meddx.ingest.dicom import ImagingIngestor
from meddx.ingest.dicom_io import decode_frames, read_dicom
from meddx.ingest.dicom_series import load_series
from meddx.records import Modality, PatientRecord, parse_time
from meddx.synth import write_ct_series

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"  # only what ships locally: no downloads
# The larger test files pydicom would download live in the pydicom-data package (a test extra).
EXTERNAL_TEST_FILES = Path(importlib.import_module("data_store").__file__).parent
LATE = parse_time("2100-01-01T00:00:00Z")
ACQUIRED = datetime(2024, 3, 5, 9, 0, tzinfo=timezone.utc)
INDEX = parse_time("2024-03-05T14:00:00Z")


def read(path: Path, config: IngestConfig | None = None, index_time: datetime = LATE):
    return ImagingIngestor(config or IngestConfig()).read(IngestRequest("p1", index_time, {Modality.IMAGING: path}))


def ct_series(folder: Path, seed: int = 3, **options) -> list[Path]:
    options.setdefault("acquisition_time", ACQUIRED)
    return write_ct_series(folder, severity=1.0, rng=np.random.default_rng(seed), patient_id="P0001", **options)


def written_hu(files: list[Path]) -> np.ndarray:
    """The HU volume the files hold, ordered along z, decoded with plain pydicom (independent of meddx)."""
    slices = []
    for file in files:
        ds = pydicom.dcmread(file)
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        slices.append((float(ds.ImagePositionPatient[2]), hu))
    return np.stack([hu for _, hu in sorted(slices, key=lambda item: item[0])])


def pydicom_decodes(path: Path) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, force=True)
            return "Rows" in ds and ds.pixel_array.size > 0
        except Exception:
            return False


# --------------------------------------------------------------------- real DICOM files


@pytest.mark.slow
def test_every_local_pydicom_test_file_gives_a_volume_or_an_ingest_error() -> None:
    files = sorted(TEST_FILES.rglob("*.dcm")) + sorted(EXTERNAL_TEST_FILES.rglob("*.dcm"))
    assert len(files) >= 140, f"pydicom and pydicom-data ship {len(files)} .dcm test files here"
    spec = ImagingIngestor().tensorizer().spec()
    volumes, errors = [], []
    for path in files:
        try:
            record = read(path)
        except IngestError as exc:
            assert exc.path == str(path)
            assert exc.modality == "imaging"
            assert exc.reason
            errors.append(path)
            continue
        assert record is not None
        for name, (shape, dtype, *_) in spec.items():
            assert record.arrays[name].shape == shape, path.name
            assert record.arrays[name].dtype == np.dtype(dtype), path.name
        volume = record.arrays["volume"]
        assert np.isfinite(volume).all(), path.name
        assert volume.min() >= 0.0, path.name
        assert volume.max() <= 1.0, path.name
        assert record.arrays["slice_mask"].any(), path.name
        json.dumps(record.meta)
        volumes.append(path)
    decodable = sorted(p for p in files if pydicom_decodes(p))
    # Every file whose pixels pydicom (with the pylibjpeg plugins) decodes becomes a volume; a
    # few more do (OT-PAL-8-face.dcm lacks its transfer syntax, which the reader infers).
    missed = sorted(set(decodable) - set(volumes))
    assert not missed, f"pydicom decodes these but the ingestor refused them: {missed}"
    assert len(volumes) >= 70, f"{len(volumes)} of {len(files)} files gave a volume"


def test_compressed_transfer_syntaxes_match_their_uncompressed_original() -> None:
    reference = read(TEST_FILES / "MR_small.dcm").arrays["volume"]
    for name in (
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ):
        np.testing.assert_allclose(read(TEST_FILES / name).arrays["volume"], reference, atol=1e-6, err_msg=name)


def test_a_file_without_preamble_reads_like_the_original(tmp_path: Path) -> None:
    original = TEST_FILES / "MR_small.dcm"
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(original.read_bytes()[132:])  # no preamble, no DICM prefix
    np.testing.assert_array_equal(read(bare).arrays["volume"], read(original).arrays["volume"])


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    ds = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = tmp_path / "mono1.dcm"
    ds.save_as(inverted)
    original = read(TEST_FILES / "MR_small.dcm").arrays["volume"][0]
    np.testing.assert_allclose(read(inverted).arrays["volume"][0], 1.0 - original, atol=1e-6)


def test_a_single_image_takes_the_2d_path() -> None:
    record = read(TEST_FILES / "CT_small.dcm")
    assert record.meta["kind"] == "2d"
    assert record.meta["modality"] == "CT"
    assert record.arrays["slice_mask"].tolist() == [True] + [False] * 31
    assert record.arrays["volume"][1:].max() == 0.0
    assert record.arrays["volume"][0].std() > 0.05
    assert record.meta["window"] == [-1000.0, 1000.0]  # the CT preset, not a percentile window


def test_radiograph_views_of_different_sizes_are_separate_slices(tmp_path: Path) -> None:
    source = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    folder = tmp_path / "dx"
    folder.mkdir()
    for instance, (rows, columns) in ((2, (64, 64)), (1, (40, 48))):  # the lateral view written first
        ds = source.copy()
        ds.Modality = "DX"
        ds.InstanceNumber = instance
        ds.Rows, ds.Columns = rows, columns
        ramp = np.arange(rows * columns, dtype=np.int16).reshape(rows, columns)
        ds.PixelData = (ramp if instance == 1 else ramp[::-1, ::-1].copy()).tobytes()  # rising vs falling
        ds.save_as(folder / f"view{instance}.dcm")
    record = read(folder)
    assert record.meta["kind"] == "2d"
    assert record.arrays["slice_mask"].tolist() == [True, True] + [False] * 30
    volume = record.arrays["volume"]
    # InstanceNumber 1 (the rising 40x48 ramp) comes first; both views fill the (H, W) plane.
    assert volume[0, 0, 0] < volume[0, -1, -1]
    assert volume[1, 0, 0] > volume[1, -1, -1]
    assert volume[2:].max() == 0.0


def test_area_shrink_matches_monai_for_integer_factors() -> None:
    import torch
    from monai.transforms import Resize

    from meddx.ingest.image_resize import resize_in_plane

    slices = np.random.default_rng(0).normal(size=(3, 48, 60)).astype(np.float32)
    expected = Resize((16, 20), mode="area")(torch.from_numpy(slices)).numpy()
    np.testing.assert_allclose(resize_in_plane(slices, (16, 20)), expected, atol=1e-5)


def test_multiframe_rt_dose_becomes_a_volume_ordered_by_grid_offsets() -> None:
    series = load_series(TEST_FILES / "rtdose.dcm")
    assert series.shape == (15, 10, 10)
    assert not series.is_2d
    record = read(TEST_FILES / "rtdose.dcm")
    assert record.meta["kind"] == "3d"
    assert record.arrays["slice_mask"].all()


def write_enhanced_ct(path: Path, z_positions: list[float], intercepts: list[float], stored: np.ndarray) -> None:
    """A multi-frame (enhanced-style) CT whose geometry and rescale live in per-frame functional groups."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", generate_uid(), generate_uid()
    ds.NumberOfFrames = len(z_positions)
    ds.Rows, ds.Columns = stored.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    shared = Dataset()
    orientation, measures = Dataset(), Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.PixelSpacing, measures.SliceThickness = [0.5, 0.5], 2.0
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = Sequence([orientation]), Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for z, intercept in zip(z_positions, intercepts, strict=True):
        item, position, transform = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [0.0, 0.0, z]
        transform.RescaleSlope, transform.RescaleIntercept = 1, intercept
        item.PlanePositionSequence, item.PixelValueTransformationSequence = Sequence([position]), Sequence([transform])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = stored.astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_enhanced_multiframe_uses_per_frame_positions_and_rescale(tmp_path: Path) -> None:
    stored = np.stack([np.full((8, 8), value, dtype=np.int16) for value in (10, 20, 30, 40)])
    path = tmp_path / "enhanced.dcm"
    write_enhanced_ct(path, z_positions=[6.0, 0.0, 4.0, 2.0], intercepts=[-1000, -1024, -1000, -1024], stored=stored)
    series = load_series(path)
    assert [float(f.position[2]) for f in series.frames] == [0.0, 2.0, 4.0, 6.0]
    assert series.spacing == (2.0, 0.5, 0.5)
    # Frame i holds stored[i] + intercept[i]; sorted by z: frames 1, 3, 2, 0.
    np.testing.assert_array_equal(series.values()[:, 0, 0], [20 - 1024, 40 - 1024, 30 - 1000, 10 - 1000])


def test_folder_with_several_series_keeps_one_by_the_rule() -> None:
    folder = TEST_FILES / "dicomdirtests" / "77654033"  # three one-image CR series and a 4-slice CT series
    uids = {str(pydicom.dcmread(f).SeriesInstanceUID) for f in folder.rglob("*") if f.is_file()}
    record = read(folder)
    assert record.meta["n_series"] == 4
    assert record.meta["modality"] == "CT"
    assert record.meta["n_slices"] == 4
    assert any("4 series" in w for w in record.warnings)
    first = read(folder, IngestConfig(imaging=ImagingConfig(series_rule="first_uid")))
    assert first.meta["series_uid"] == min(uids) != record.meta["series_uid"]


@pytest.mark.parametrize("series", ["98892003/MR700", "98892001/CT2N"], ids=["radial", "scouts"])
def test_slices_in_several_orientations_are_an_inconsistent_series(series: str) -> None:
    folder = TEST_FILES / "dicomdirtests" / series  # MR700: planes rotating about an axis; CT2N: two scouts
    with pytest.raises(IngestError, match="ImageOrientationPatient") as caught:
        read(folder)
    assert caught.value.path == str(folder)


def test_projection_radiograph_takes_the_2d_path() -> None:
    record = read(TEST_FILES / "dicomdirtests" / "77654033" / "CR1")
    assert record.meta["kind"] == "2d"
    assert record.meta["modality"] == "CR"
    assert record.arrays["slice_mask"].sum() == 1


# ---------------------------------------------------------------- generated series


def test_shuffled_series_comes_back_sorted_with_hounsfield_units(tmp_path: Path) -> None:
    for seed in (3, 4, 5, 6):  # the generator runs z up or down the table with InstanceNumber
        folder = tmp_path / f"ct{seed}"
        files = ct_series(folder, seed=seed, shuffle=True)
        series = load_series(folder)
        positions = [float(f.position[2]) for f in series.frames]
        assert positions == sorted(positions)
        expected = written_hu(files)
        np.testing.assert_array_equal(series.values(), expected)
        assert series.spacing[0] == pytest.approx(abs(positions[1] - positions[0]))

    # Through the ingestor at the native shape and a wide window, the volume maps back to HU.
    lower, upper = -1500.0, 1500.0
    config = IngestConfig(imaging=ImagingConfig(spatial_size=(12, 48, 48), windows={"CT": (lower, upper)}))
    record = read(folder, config)
    volume = record.arrays["volume"]
    assert 0.0 < volume.min()
    assert volume.max() < 1.0  # nothing clipped
    np.testing.assert_allclose(volume * (upper - lower) + lower, expected, atol=1e-2)
    assert record.meta["spacing_mm"][0] == pytest.approx(series.spacing[0])
    assert record.meta["n_slices"] == 12
    assert record.warnings == []


def test_rle_series_equals_its_uncompressed_twin(tmp_path: Path) -> None:
    ct_series(tmp_path / "plain", seed=8)
    ct_series(tmp_path / "rle", seed=8, rle=True)
    plain, rle = read(tmp_path / "plain"), read(tmp_path / "rle")
    assert rle.meta["transfer_syntax_name"] == "RLE Lossless"
    assert plain.meta["transfer_syntax_name"] == "Explicit VR Little Endian"
    np.testing.assert_array_equal(rle.arrays["volume"], plain.arrays["volume"])


def test_missing_slice_is_flagged(tmp_path: Path) -> None:
    ct_series(tmp_path / "gap", drop_slice=5)
    record = read(tmp_path / "gap")
    assert record.meta["n_slices"] == 11
    assert any("missing slices" in w and "about 1 slice" in w for w in record.warnings)
    assert record.meta["geometry_warnings"]


def test_duplicate_positions_are_dropped_and_reported(tmp_path: Path) -> None:
    files = ct_series(tmp_path / "dup", shuffle=False)
    shutil.copy(files[3], tmp_path / "dup" / "copy_of_slice_3.dcm")
    series = load_series(tmp_path / "dup")
    assert series.shape[0] == 12
    assert any("repeat a position" in w for w in series.warnings)


def test_series_acquired_after_the_index_time_is_excluded(tmp_path: Path) -> None:
    ct_series(tmp_path / "late", acquisition_time=INDEX + timedelta(hours=2))
    assert read(tmp_path / "late", index_time=INDEX) is None

    # Slices are 0.5 s apart (the last at +5.5 s): an index time during the acquisition drops
    # the whole series, never the slices acquired after it alone.
    ct_series(tmp_path / "during")
    assert read(tmp_path / "during", index_time=ACQUIRED + timedelta(seconds=2.2)) is None
    assert read(tmp_path / "during", index_time=ACQUIRED + timedelta(seconds=5.4)) is None
    index = ACQUIRED + timedelta(seconds=5.5)
    record = read(tmp_path / "during", index_time=index)
    assert record.meta["n_slices"] == 12
    assert record.meta["n_dropped_after_index"] == 0
    assert record.time == index  # the series is dated by its last slice
    PatientRecord("p1", index).add(record)


def _strip_times(path: Path) -> None:
    """Remove every date and time element from a DICOM file (an undated instance)."""
    ds = pydicom.dcmread(path)
    for keyword in (
        "StudyDate",
        "StudyTime",
        "SeriesDate",
        "SeriesTime",
        "AcquisitionDate",
        "AcquisitionTime",
        "ContentDate",
        "ContentTime",
        "AcquisitionDateTime",
    ):
        if keyword in ds:
            delattr(ds, keyword)
    ds.save_as(path)


def test_undated_instances_take_their_series_time_and_straddle_nothing(tmp_path: Path) -> None:
    files = sorted(ct_series(tmp_path / "mixed", shuffle=False))
    undated = files[-4:]  # the last slices (by name) lose every date: their series dates them
    for path in undated:
        _strip_times(path)
    dated_times = sorted(dicom_time(pydicom.dcmread(p)) for p in files[:-4])
    assert all(dicom_time(pydicom.dcmread(p)) is None for p in undated)
    last_dated = dated_times[-1]
    # An index time between the dated slices: the whole series (dated and undated slices) goes.
    assert read(tmp_path / "mixed", index_time=dated_times[2]) is None
    # At the series' time the whole series is kept, undated slices included, at that time.
    record = read(tmp_path / "mixed", index_time=last_dated)
    assert record.meta["n_slices"] == 12
    assert record.meta["n_undated_slices"] == 4
    assert record.time == last_dated
    PatientRecord("p1", last_dated).add(record)
    series = load_series(tmp_path / "mixed")
    assert {f.time for f in series.frames} == {last_dated}


def test_a_later_series_is_dropped_whole_and_the_rule_picks_among_the_rest(tmp_path: Path) -> None:
    ct_series(tmp_path / "two" / "early", seed=1, n_slices=6)
    ct_series(tmp_path / "two" / "late", seed=2, n_slices=10, acquisition_time=INDEX + timedelta(minutes=5))
    everything = read(tmp_path / "two")  # index time far away: most slices wins
    assert everything.meta["n_slices"] == 10
    assert everything.meta["n_series"] == 2
    record = read(tmp_path / "two", index_time=INDEX)
    assert record.meta["n_slices"] == 6
    assert record.meta["n_series_dropped_after_index"] == 1
    assert record.meta["n_dropped_after_index"] == 10
    assert any("dropped whole" in w for w in record.warnings)


def _ct_small_at(folder: Path, study_time: str, offset: str | None) -> Path:
    """pydicom's CT_small.dcm, re-dated: the same wall time in its Study/Series/Acquisition fields."""
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    for date_kw, time_kw in (
        ("StudyDate", "StudyTime"),
        ("SeriesDate", "SeriesTime"),
        ("AcquisitionDate", "AcquisitionTime"),
        ("ContentDate", "ContentTime"),
    ):
        setattr(ds, date_kw, "20240115")
        setattr(ds, time_kw, study_time)
    if "AcquisitionDateTime" in ds:
        del ds.AcquisitionDateTime
    if offset is None:
        if "TimezoneOffsetFromUTC" in ds:
            del ds.TimezoneOffsetFromUTC
    else:
        ds.TimezoneOffsetFromUTC = offset
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ct.dcm"
    ds.save_as(path)
    return path


def test_zone_less_dicom_times_use_the_site_time_zone(tmp_path: Path) -> None:
    path = _ct_small_at(tmp_path / "plain", "100000", offset=None)  # 10:00 wall time, no zone
    berlin = IngestConfig(site_timezone="Europe/Berlin")  # UTC+1 in January: 09:00Z
    index = parse_time("2024-01-15T09:30:00Z")
    assert read(path, index_time=index) is None  # read as UTC (the default), 10:00Z is after 09:30Z
    record = read(path, berlin, index_time=index)
    assert record.time == parse_time("2024-01-15T09:00:00Z")
    assert record.meta["time_zone"] == "site"
    assert read(path, index_time=parse_time("2024-01-15T10:00:00Z")).meta["time_zone"] == "assumed UTC"
    assert read(path, IngestConfig(site_timezone="America/New_York"), index_time=index) is None  # 15:00Z

    # TimezoneOffsetFromUTC wins over the site zone
    offset = _ct_small_at(tmp_path / "offset", "100000", offset="-0500")
    record = read(offset, berlin, index_time=parse_time("2024-01-15T15:00:00Z"))
    assert record.time == parse_time("2024-01-15T15:00:00Z")
    assert record.meta["time_zone"] == "TimezoneOffsetFromUTC"
    assert read(offset, berlin, index_time=index) is None


def test_site_time_zone_follows_daylight_saving_and_is_validated() -> None:
    ds = pydicom.Dataset()
    ds.StudyDate, ds.StudyTime = "20240715", "100000"
    from zoneinfo import ZoneInfo

    assert dicom_time(ds, site_zone=ZoneInfo("Europe/Berlin")) == parse_time("2024-07-15T08:00:00Z")  # CEST
    ds.StudyDate, ds.StudyTime = "20241027", "023000"  # happens twice in Berlin: the later instant
    assert dicom_time(ds, site_zone=ZoneInfo("Europe/Berlin")) == parse_time("2024-10-27T01:30:00Z")
    with pytest.raises(ConfigError, match="not an IANA time zone"):
        IngestConfig.from_dict({"site_timezone": "Berlin"})


def test_resampling_to_a_spacing_pads_and_masks(tmp_path: Path) -> None:
    ct_series(tmp_path / "ct")
    native = load_series(tmp_path / "ct")
    config = IngestConfig(imaging=ImagingConfig(spatial_size=(16, 32, 32), spacing_mm=(12.0, 14.0, 14.0)))
    record = read(tmp_path / "ct", config)
    depth = round(12 * native.spacing[0] / 12.0)
    rows = round(48 * native.spacing[1] / 14.0)
    assert record.arrays["slice_mask"].sum() == depth < 16
    assert record.meta["voxel_spacing_mm"][0] == pytest.approx(12 * native.spacing[0] / depth)
    volume = record.arrays["volume"]
    border = (32 - rows) // 2
    assert volume[:, :border].max() == 0.0
    assert volume[record.arrays["slice_mask"], 16].max() > 0.0


def test_nifti_file_loads_with_its_axes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(-900, 900, size=(20, 16, 6)).astype(np.int16)  # (i, j, k)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.9, 2.5, 1.0])), path)
    config = IngestConfig(
        imaging=ImagingConfig(spatial_size=(6, 16, 20), windows={"CT": (-1000.0, 1000.0)}, nifti_modality="CT")
    )
    record = read(path, config)
    assert record.time is None
    assert record.meta["source_format"] == "nifti"
    assert record.meta["spacing_mm"] == pytest.approx([2.5, 0.9, 0.8])
    np.testing.assert_allclose(record.arrays["volume"] * 2000.0 - 1000.0, data.transpose(2, 1, 0), atol=1e-3)
    default = read(path)
    assert default.arrays["volume"].shape == (32, 64, 64)
    assert default.arrays["slice_mask"].all()


def test_non_dicom_and_truncated_files_name_the_file(tmp_path: Path) -> None:
    text = tmp_path / "report.dcm"
    text.write_text("not an image\n" * 20)
    with pytest.raises(IngestError, match="not a DICOM file") as caught:
        read(text)
    assert caught.value.path == str(text)

    files = ct_series(tmp_path / "ct", n_slices=2, shuffle=False)
    data = files[0].read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 1000])  # pixel data cut short
    with pytest.raises(IngestError, match="truncated pixel data") as caught:
        read(cut)
    assert caught.value.path == str(cut)
    header_only = tmp_path / "header_only.dcm"
    header_only.write_bytes(data[:400])  # cut inside the header
    with pytest.raises(IngestError) as caught:
        read(header_only)
    assert caught.value.path == str(header_only)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(IngestError, match="no DICOM image"):
        read(empty)


def test_non_dicom_files_in_a_series_folder_are_skipped(tmp_path: Path) -> None:
    ct_series(tmp_path / "ct")
    (tmp_path / "ct" / "notes.txt").write_text("scanner export log")
    (tmp_path / "ct" / "DICOMDIR").write_bytes(b"\0" * 200)
    record = read(tmp_path / "ct")
    assert record.meta["n_slices"] == 12
    assert record.meta["n_skipped_files"] == 2


def test_differing_slice_sizes_are_an_inconsistent_series(tmp_path: Path) -> None:
    files = ct_series(tmp_path / "ct")
    ds = pydicom.dcmread(files[4])
    ds.Rows = ds.Columns = 32
    ds.PixelData = np.zeros((32, 32), dtype=np.int16).tobytes()
    ds.save_as(files[4])
    with pytest.raises(IngestError, match="Rows x Columns"):
        read(tmp_path / "ct")


def test_undecodable_transfer_syntax_names_syntax_and_plugins(tmp_path: Path) -> None:
    ds = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    ds.PixelData = encapsulate([b"\xff\xd8 not a JPEG-LS codestream \xff\xd9"])
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    broken = tmp_path / "broken_jls.dcm"
    ds.save_as(broken)
    with pytest.raises(IngestError, match="JPEG-LS Lossless") as caught:
        read(broken)
    assert "pylibjpeg-libjpeg" in caught.value.reason
    assert caught.value.path == str(broken)

    ds.file_meta.TransferSyntaxUID = MPEG4HP41
    video = tmp_path / "mpeg.dcm"
    ds.save_as(video)
    with pytest.raises(IngestError, match="MPEG-4") as caught:
        decode_frames(read_dicom(video), video)
    assert "MP4" in caught.value.reason
    assert "video stream" in caught.value.reason


def test_phi_never_reaches_meta_warnings_or_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "ct"
    files = write_ct_series(
        folder,
        severity=0.5,
        rng=np.random.default_rng(1),
        acquisition_time=ACQUIRED,
        patient_id="MRN-8675309",
        patient_name="Quixote^Dulcinea",
        drop_slice=4,
    )
    for file in files:
        ds = pydicom.dcmread(file)
        ds.PatientBirthDate = "19610704"
        ds.OtherPatientIDs = "ALT-55501"
        ds.save_as(file)
    caplog.set_level(logging.DEBUG)
    record = read(folder)
    assert record.warnings  # the gap is reported, so warnings were written and logged
    text = json.dumps(record.meta) + " ".join(record.warnings) + caplog.text + repr(record.meta)
    for phi in ("MRN-8675309", "Quixote", "Dulcinea", "19610704", "ALT-55501"):
        assert phi not in text


def test_dicom_time_rules() -> None:
    ds = pydicom.Dataset()
    ds.StudyDate, ds.StudyTime = "20240305", "101500"
    assert dicom_time(ds) == parse_time("2024-03-05T10:15:00Z")
    ds.SeriesDate = "20240305"  # a date without a time: the end of that day
    assert dicom_time(ds) == parse_time("2024-03-05T23:59:59.999999Z")
    ds.AcquisitionDate, ds.AcquisitionTime = "20240305", "120000.5"
    ds.TimezoneOffsetFromUTC = "+0100"
    assert dicom_time(ds) == parse_time("2024-03-05T11:00:00.5Z")
    ds.AcquisitionDateTime = "20240305130000-0500"  # its own offset wins
    assert dicom_time(ds) == parse_time("2024-03-05T18:00:00Z")
    assert dicom_time(pydicom.Dataset()) is None

"""The video ingestor on generated clips and on multi-frame DICOM from pydicom's test files."""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from meddx.config import IngestConfig, VideoConfig
from meddx.errors import IngestError
from meddx.ingest.base import IngestRequest
from meddx.ingest.video import VideoIngestor, sample_indices
from meddx.records import Modality, parse_time
from meddx.synth import write_pulse_video

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
CINE = TEST_FILES / "examples_ybr_color.dcm"  # ultrasound, 30 frames, JPEG baseline, YBR_FULL_422
INDEX = parse_time("2024-03-05T14:00:00Z")


def read(path: Path, config: IngestConfig | None = None, index_time: datetime = INDEX):
    return VideoIngestor(config or IngestConfig()).read(IngestRequest("p1", index_time, {Modality.VIDEO: path}))


def clip(path: Path, n_frames: int = 24) -> Path:
    return write_pulse_video(path, severity=0.3, rng=np.random.default_rng(2), n_frames=n_frames)


def every_frame(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def expected_gray(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    return cv2.resize(gray, size[::-1], interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


@pytest.mark.parametrize("suffix", [".mp4", ".avi"])
def test_clip_gives_the_configured_shapes(tmp_path: Path, suffix: str) -> None:
    path = clip(tmp_path / f"echo{suffix}")
    record = read(path)
    frames, mask = record.arrays["frames"], record.arrays["frame_mask"]
    assert frames.shape == (16, 1, 64, 64)
    assert frames.dtype == np.float32
    assert mask.dtype == bool
    assert mask.all()
    assert 0.0 <= frames.min()
    assert frames.max() <= 1.0
    assert frames.std() > 0.05
    assert record.time is None
    assert record.meta["n_source_frames"] == 24
    assert record.meta["fps"] == pytest.approx(12.0)  # write_pulse_video's rate, as the container announces it

    config = IngestConfig(video=VideoConfig(n_frames=6, size=(32, 40), color="rgb"))
    rgb = read(path, config)
    assert rgb.arrays["frames"].shape == (6, 3, 32, 40)
    assert rgb.arrays["frame_mask"].all()
    tensorizer = VideoIngestor(config).tensorizer()
    assert {k: v.shape for k, v in tensorizer.transform(rgb).items()} == {"frames": (6, 3, 32, 40), "frame_mask": (6,)}


def test_frames_are_sampled_uniformly_over_the_clip(tmp_path: Path) -> None:
    path = clip(tmp_path / "echo.avi")
    source = every_frame(path)
    wanted = sample_indices(len(source), 16)
    assert wanted[0] == 0
    assert wanted[-1] == len(source) - 1
    assert len(wanted) == 16
    record = read(path)
    for t, index in enumerate(wanted):
        np.testing.assert_allclose(record.arrays["frames"][t, 0], expected_gray(source[index], (64, 64)), atol=1e-6)


def test_short_clip_is_padded_and_masked(tmp_path: Path) -> None:
    record = read(clip(tmp_path / "short.avi", n_frames=5))
    assert record.arrays["frame_mask"].tolist() == [True] * 5 + [False] * 11
    assert record.arrays["frames"][5:].max() == 0.0
    assert record.arrays["frames"][:5].min() > 0.0
    assert any("fewer than 16" in w for w in record.warnings)


def test_unknown_frame_count_decodes_everything_then_samples(tmp_path: Path) -> None:
    path = tmp_path / "raw.mjpeg"  # a raw MJPEG stream: FFmpeg cannot tell its frame count
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for _ in range(20)]
    path.write_bytes(b"".join(cv2.imencode(".jpg", image)[1].tobytes() for image in images))
    record = read(path)
    assert record.meta["n_source_frames"] == 20
    assert record.arrays["frame_mask"].all()
    source = every_frame(path)
    np.testing.assert_allclose(record.arrays["frames"][-1, 0], expected_gray(source[-1], (64, 64)), atol=1e-6)


def test_truncated_avi_keeps_the_frames_that_decode(tmp_path: Path) -> None:
    path = clip(tmp_path / "echo.avi")
    data = path.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    decodable = len(every_frame(cut))
    assert 0 < decodable < 24
    record = read(cut)
    assert record.meta["n_source_frames"] == decodable
    assert record.arrays["frame_mask"].sum() == min(decodable, 16)
    assert any("announces 24 frames" in w for w in record.warnings)


def test_truncated_mp4_and_bad_files_name_the_file(tmp_path: Path) -> None:
    data = clip(tmp_path / "echo.mp4").read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])  # the index (moov atom) is written last, so it is lost
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    garbage = tmp_path / "noise.avi"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    for path, reason in [
        (cut, "cannot open"),
        (empty, "empty file"),
        (garbage, "cannot open"),
        (tmp_path / "missing.mp4", "no such file"),
    ]:
        with pytest.raises(IngestError, match=reason) as caught:
            read(path)
        assert caught.value.path == str(path)
        assert caught.value.modality == "video"


def test_multiframe_dicom_becomes_video() -> None:
    record = read(CINE, index_time=parse_time("2030-01-01T00:00:00Z"))
    frames = record.arrays["frames"]
    assert frames.shape == (16, 1, 64, 64)
    assert record.arrays["frame_mask"].all()
    assert record.meta["source_format"] == "dicom"
    assert record.meta["n_source_frames"] == 30
    assert record.time == dicom_acquired(CINE)
    # The sampled frames are pydicom's frames, as luminance.
    rgb = pydicom.dcmread(CINE).pixel_array  # (30, H, W, 3) RGB
    for t, index in enumerate(sample_indices(30, 16)):
        gray = rgb[index].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32) / 255.0
        np.testing.assert_allclose(frames[t, 0], cv2.resize(gray, (64, 64), interpolation=cv2.INTER_AREA), atol=1e-5)
    colour = read(CINE, IngestConfig(video=VideoConfig(color="rgb")), index_time=parse_time("2030-01-01T00:00:00Z"))
    assert colour.arrays["frames"].shape == (16, 3, 64, 64)


def dicom_acquired(path: Path) -> datetime:
    """SeriesDate/SeriesTime (this file has no acquisition date), read as UTC."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert "AcquisitionDate" not in ds
    assert "AcquisitionDateTime" not in ds
    return datetime.strptime(f"{ds.SeriesDate}{ds.SeriesTime}", "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc)


def test_dicom_cine_is_found_by_its_magic_and_respects_the_index_time(tmp_path: Path) -> None:
    unnamed = tmp_path / "cine.bin"
    shutil.copy(CINE, unnamed)
    acquired = dicom_acquired(CINE)
    assert read(unnamed, index_time=acquired).meta["source_format"] == "dicom"
    assert read(unnamed, index_time=parse_time("2000-01-01T00:00:00Z")) is None  # acquired after the index time


def test_a_cine_is_dated_by_its_last_frame_and_the_site_time_zone(tmp_path: Path) -> None:
    """Per-frame acquisition times (an enhanced cine) date the clip whole: never some frames only."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(CINE)
    for keyword in (
        "StudyDate",
        "StudyTime",
        "SeriesDate",
        "SeriesTime",
        "AcquisitionDateTime",
        "TimezoneOffsetFromUTC",
    ):
        if keyword in ds:
            delattr(ds, keyword)
    frames = []
    for i in range(int(ds.NumberOfFrames)):  # 30 frames, one second apart from 10:00:00 wall time
        content = Dataset()
        content.FrameAcquisitionDateTime = f"202403051000{i:02d}"
        item = Dataset()
        item.FrameContentSequence = Sequence([content])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    path = tmp_path / "cine.dcm"
    ds.save_as(path)
    last = parse_time("2024-03-05T10:00:29Z")
    assert read(path, index_time=last - timedelta(seconds=1)) is None  # 29 of 30 frames were known: not enough
    record = read(path, index_time=last)
    assert record.time == last
    assert record.meta["time_zone"] == "assumed UTC"
    assert record.arrays["frame_mask"].all()
    # the same wall times at a site in New York (UTC-5 in March before the switch)
    site = IngestConfig(site_timezone="America/New_York")
    assert read(path, site, index_time=last) is None
    record = read(path, site, index_time=last + timedelta(hours=5))
    assert record.time == last + timedelta(hours=5)
    assert record.meta["time_zone"] == "site"
    ds.TimezoneOffsetFromUTC = "+0100"  # the file's own offset wins over the site zone
    ds.save_as(path)
    assert read(path, site, index_time=last - timedelta(hours=1)).time == last - timedelta(hours=1)

"""Video ingestor: MP4/AVI clips (OpenCV) and multi-frame DICOM cine into fixed frame stacks.

What the ``video`` column may name:

* a video file OpenCV's FFmpeg backend opens (MP4, AVI...). The file is decoded once:
  ``grab()`` walks the frames and only the kept ones are ``retrieve()``d. When the
  container's frame count (``CAP_PROP_FRAME_COUNT``) is 0 or missing, every frame is
  decoded (kept small) and sampled afterwards; when the stream ends before the count it
  announced (a truncated or damaged file), the clip is read again over the frames that
  do decode, and a warning says how many did (a count lower than the truth cannot be
  noticed without decoding the rest: frames past it are then not sampled). Video files
  are undated (``record.time`` is None, so they are available at the index time);
* a multi-frame DICOM (cine ultrasound, XA...): a ``.dcm``/``.dicom`` suffix, or what
  the imaging reader recognises as DICOM (:func:`meddx.ingest.dicom_io.looks_like_dicom`:
  the ``DICM`` prefix, or a Part 10 file without its preamble), chooses this path. Frames
  are decoded with the imaging ingestor's decoder
  (:func:`meddx.ingest.dicom_io.decode_frames`, only the sampled frames of compressed
  data). The clip is dated as a whole: ``record.time`` is its latest time, of the file or
  of any frame (:func:`meddx.dicom_times.latest_time`; zone-less DICOM times use
  ``TimezoneOffsetFromUTC``, else ``IngestConfig.site_timezone``, else UTC, as
  ``meta["time_zone"]`` says). A cine acquired after the index time gives ``None`` (the
  modality is missing for that row), never some of its frames.

**Output record** (shapes from :class:`~meddx.config.VideoConfig`):

* ``frames``: float32 ``(T, C, H, W)`` in [0, 1], ``T = n_frames``, ``C`` 1 (``gray``) or 3
  (``rgb``, in RGB order), ``(H, W) = size`` (OpenCV area interpolation);
* ``frame_mask``: bool ``(T,)``. ``n_frames`` frames are sampled uniformly over the clip
  (first and last included). A clip with fewer frames keeps all of them in order, then
  zero frames with the mask False.

Intensities: 8-bit frames are divided by 255; DICOM frames with more bits go through
a robust percentile window (``VideoConfig.percentiles``), and MONOCHROME1 is inverted.

Errors (:class:`~meddx.errors.IngestError` naming the file): missing or empty file, a path
that is not a regular file (a FIFO, a device), a file over ``VideoConfig.max_file_mb``, a file
OpenCV cannot open, a clip with no decodable frame, and the DICOM errors of the imaging
reader. Nothing loops without bound: the frame loop stops at the end of the stream, and
OpenCV's open/read timeouts are set.

Example:
    >>> from meddx.ingest.base import IngestRequest
    >>> from meddx.records import parse_time
    >>> reader = VideoIngestor()
    >>> record = reader.read(IngestRequest("P0001", parse_time("2024-12-03T08:27:00Z"),
    ...                                    {Modality.VIDEO: Path("sample_data/patients/P0001/echo.mp4")}))
    >>> record.arrays["frames"].shape  # (T, C, H, W)
    (16, 1, 64, 64)
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from meddx.config import ImagingConfig, VideoConfig
from meddx.dicom_times import latest_time, time_zone_rule
from meddx.errors import IngestError
from meddx.ingest.base import ArrayTensorizer, Ingestor, IngestRequest, register_ingestor
from meddx.ingest.dicom import apply_window, window_bounds
from meddx.ingest.dicom_io import (
    decode_frames,
    looks_like_dicom,
    quiet_pydicom,
    read_dicom,
    to_gray,
    transfer_syntax,
)
from meddx.ingest.file_checks import check_source
from meddx.records import Modality, ModalityRecord, is_available
from meddx.specs import ArrayField, ArraySpec

logger = logging.getLogger(__name__)

_VIDEO = Modality.VIDEO.value
_DICOM_SUFFIXES = (".dcm", ".dicom")
_TIMEOUT_MS = 30_000  # OpenCV/FFmpeg open and read timeouts


def sample_indices(n_available: int, n_wanted: int) -> np.ndarray:
    """Frame indices spread uniformly over a clip (first and last included), ascending, unique.

    Example:
        >>> sample_indices(10, 4).tolist()
        [0, 3, 6, 9]
        >>> sample_indices(3, 5).tolist()
        [0, 1, 2]
    """
    if n_available <= n_wanted:
        return np.arange(n_available)
    return np.unique(np.round(np.linspace(0, n_available - 1, n_wanted)).astype(int))


class _FrameShaper:
    """Turns one decoded frame into ``(C, H, W)`` float32 at the configured size and colour."""

    def __init__(self, config: VideoConfig):
        import cv2

        self._cv2 = cv2
        self.size = (config.size[1], config.size[0])  # OpenCV wants (width, height)
        self.rgb = config.color == "rgb"

    def from_bgr8(self, frame: np.ndarray) -> np.ndarray:
        """An OpenCV BGR (or grey) uint8 frame → ``(C, H, W)`` in [0, 1]."""
        cv2 = self._cv2
        if frame.ndim == 2:
            if self.rgb:
                frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
        elif self.rgb:
            frame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        else:
            frame = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        small = cv2.resize(frame, self.size, interpolation=cv2.INTER_AREA).astype(np.float32)
        small *= 1.0 / 255.0
        return small.transpose(2, 0, 1) if small.ndim == 3 else small[None]

    def from_float(self, frame: np.ndarray) -> np.ndarray:
        """A grey ``(H, W)`` or RGB ``(H, W, 3)`` float frame already in [0, 1] → ``(C, H, W)``."""
        cv2 = self._cv2
        small = cv2.resize(np.asarray(frame, dtype=np.float32), self.size, interpolation=cv2.INTER_AREA)
        if small.ndim == 3 and not self.rgb:
            small = to_gray(small)
        elif small.ndim == 2 and self.rgb:
            small = np.repeat(small[..., None], 3, axis=2)
        return small.transpose(2, 0, 1) if small.ndim == 3 else small[None]


class VideoTensorizer(ArrayTensorizer):
    """``frames`` float32 ``(T, C, H, W)`` and ``frame_mask`` bool ``(T,)``."""

    modality = Modality.VIDEO

    def spec(self) -> ArraySpec:
        video = self.config.video
        channels = 3 if video.color == "rgb" else 1
        return {
            "frames": ArrayField((video.n_frames, channels, *video.size), "float32", "values"),
            "frame_mask": ArrayField((video.n_frames,), "bool", "mask", of=("frames",)),
        }


@register_ingestor
class VideoIngestor(Ingestor):
    """Reads an MP4/AVI clip or a multi-frame DICOM cine (see the module docstring).

    Example:
        >>> VideoIngestor().tensorizer().spec()["frames"].shape
        (16, 1, 64, 64)
    """

    modality = Modality.VIDEO
    tensorizer_class = VideoTensorizer

    def read(self, request: IngestRequest) -> ModalityRecord | None:
        path = Path(request.paths[Modality.VIDEO])
        config = self.config.video
        check_source(path, _VIDEO, max_file_mb=config.max_file_mb, expected="one video file (MP4, AVI) or a DICOM cine")
        if path.stat().st_size == 0:
            raise IngestError(path, _VIDEO, "empty file")
        shaper = _FrameShaper(config)
        if path.suffix.lower() in _DICOM_SUFFIXES or looks_like_dicom(path):
            return self._read_dicom(path, request, shaper)
        frames, n_total, notes, fps = _read_video(path, config.n_frames, shaper)
        meta = {
            "source_format": path.suffix.lower().lstrip(".") or "video",
            "fps": fps,
            "n_source_frames": n_total,
            "n_kept_frames": len(frames),
            "warnings": notes,
        }
        for note in notes:
            logger.info("video %s: %s", path.name, note)
        return self._record(path, frames, None, meta, notes)

    def _read_dicom(self, path: Path, request: IngestRequest, shaper: _FrameShaper) -> ModalityRecord | None:
        config = self.config.video
        ds = read_dicom(path, _VIDEO)
        with quiet_pydicom():
            site_zone = self.config.site_zone()
            acquired = latest_time(ds, site_zone)
            if not is_available(acquired, request.index_time):
                logger.info("video %s: cine acquired after the index time; skipped", path.name)
                return None
            try:
                n_total = max(1, int(ds.get("NumberOfFrames") or 1))
                bits = int(ds.get("BitsStored") or 8)
            except (TypeError, ValueError):
                raise IngestError(path, _VIDEO, "invalid NumberOfFrames or BitsStored") from None
            wanted = sample_indices(n_total, config.n_frames)
            raw = decode_frames(ds, path, _VIDEO, frames=wanted.tolist())
            photometric = str(ds.get("PhotometricInterpretation", "")).upper()
            syntax = transfer_syntax(ds)
            meta: dict[str, Any] = {
                "source_format": "dicom",
                "modality": str(ds.get("Modality", "") or "") or None,
                "study_uid": str(ds.get("StudyInstanceUID", "")) or None,
                "series_uid": str(ds.get("SeriesInstanceUID", "")) or None,
                "transfer_syntax": str(syntax) if syntax else None,
                "n_source_frames": n_total,
                "n_kept_frames": len(wanted),
                "frame_time_ms": _float_or_none(ds.get("FrameTime")),
                "time_zone": time_zone_rule(ds, site_zone),
            }
        values = raw.astype(np.float32)
        if bits <= 8 and raw.dtype.kind == "u":
            values *= 1.0 / 255.0
            if photometric == "MONOCHROME1":
                np.subtract(1.0, values, out=values)
        else:
            gray = to_gray(values) if values.ndim == 4 else values
            robust = ImagingConfig(windows={}, percentiles=config.percentiles)  # no presets: percentiles
            lower, upper, how = window_bounds(gray, None, robust)
            values = apply_window(values, lower, upper, invert=photometric == "MONOCHROME1")
            meta["window"], meta["window_rule"] = [lower, upper], how
        notes: list[str] = []
        if n_total == 1:
            notes.append("DICOM holds a single frame, not a cine; kept as a one-frame clip")
        meta["warnings"] = notes
        frames = [shaper.from_float(frame) for frame in values]
        return self._record(path, frames, acquired, meta, notes)

    def _record(
        self, path: Path, frames: list[np.ndarray], when: Any, meta: dict[str, Any], notes: list[str]
    ) -> ModalityRecord:
        config = self.config.video
        channels = 3 if config.color == "rgb" else 1
        out = np.zeros((config.n_frames, channels, *config.size), dtype=np.float32)
        mask = np.zeros(config.n_frames, dtype=bool)
        kept = frames[: config.n_frames]
        if kept:
            out[: len(kept)] = np.stack(kept)
            mask[: len(kept)] = True
        if len(kept) < config.n_frames:
            notes.append(f"clip has {len(kept)} frame(s), fewer than {config.n_frames}; the rest is padding (masked)")
        return ModalityRecord(
            modality=Modality.VIDEO,
            source=str(path),
            arrays={"frames": out, "frame_mask": mask},
            time=when,
            meta=meta,
            warnings=notes,
        )


def _float_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _open(path: Path):
    import cv2

    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, _TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, _TIMEOUT_MS]
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, params)
    if not capture.isOpened():
        capture.release()
        raise IngestError(
            path,
            _VIDEO,
            "OpenCV (FFmpeg) cannot open it: not a video file, a truncated one (an MP4 whose index is cut off), "
            "or a codec FFmpeg does not have",
        )
    return capture


def _read_video(
    path: Path, n_frames: int, shaper: _FrameShaper
) -> tuple[list[np.ndarray], int, list[str], float | None]:
    """Sampled, shaped frames of a clip, the number of frames it has, warnings, and the frame rate it announces."""
    import cv2

    capture = _open(path)
    try:
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        rate = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        fps = rate if math.isfinite(rate) and 0 < rate <= 10_000 else None
        complete = False
        if count > 0:
            frames, complete = _grab_wanted(capture, sample_indices(count, n_frames), shaper)
    finally:
        capture.release()
    notes: list[str] = []
    if complete:  # the announced count held (its last frame decoded): one pass was enough
        return frames, count, notes, fps
    # Unknown or wrong count: decode every frame (kept small), then sample.
    capture = _open(path)
    try:
        every = []
        while capture.grab():
            ok, frame = capture.retrieve()
            if ok and frame is not None:
                every.append(shaper.from_bgr8(frame))
    finally:
        capture.release()
    if not every:
        raise IngestError(path, _VIDEO, "no frame could be decoded (empty, truncated or corrupt stream)")
    if count > 0:
        notes.append(
            f"the container announces {count} frames but only {len(every)} decode (truncated or damaged file); "
            "sampled over those"
        )
    return [every[i] for i in sample_indices(len(every), n_frames)], len(every), notes, fps


def _grab_wanted(capture: Any, wanted: np.ndarray, shaper: _FrameShaper) -> tuple[list[np.ndarray], bool]:
    """Walk the stream up to the last wanted frame, retrieving only the wanted ones.

    Returns the frames, and whether every wanted frame decoded (False: the stream ended
    or broke before the frame count it announced).
    """
    targets = set(int(i) for i in wanted)
    last = int(wanted[-1])
    frames = []
    index = 0
    while index <= last and capture.grab():
        if index in targets:
            ok, frame = capture.retrieve()
            if not ok or frame is None:
                break
            frames.append(shaper.from_bgr8(frame))
        index += 1
    return frames, len(frames) == len(wanted)

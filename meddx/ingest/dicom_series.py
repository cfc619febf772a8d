"""Assembling a DICOM series: files into slices sorted along the slice normal, checked, not decoded.

:func:`load_series` reads a DICOM file or a folder into a :class:`DicomSeries`; its
:meth:`~DicomSeries.values` decodes the pixels into modality values (HU for CT).

**Which files.** Files that are not DICOM, and DICOM files without pixel data (DICOMDIR,
SR, RT plans...), are skipped. When the folder holds several series, ``series_rule`` picks
one: ``most_slices`` (default: the series with the most slices, ties to the smallest
SeriesInstanceUID) or ``first_uid`` (the smallest SeriesInstanceUID). ``info`` says which
one and how many there were. A series is one SeriesInstanceUID within one
StudyInstanceUID and FrameOfReferenceUID: a UID reused by another study or frame of
reference is another series, kept apart (with a warning), never merged. Images of more
than one PatientID in a folder are an :class:`~meddx.errors.IngestError` (the IDs are
compared, never printed), so the rule never picks across patients.

**Time.** A series is dated as a whole, at its last dated slice (when it was complete):
slices without any date or time take the series' time, and a series acquired after the
index time is dropped whole (:func:`meddx.records.keep_available` over series, before one
is chosen), never kept in part. Times are read by :func:`meddx.dicom_times.dicom_time`
(``TimezoneOffsetFromUTC``, else the site time zone, else UTC).

**Order and checks.** Slices are sorted by their position along the slice normal
(``ImagePositionPatient · (row × column direction cosines)``), never by file name or
InstanceNumber (those are the fallback only when a series has no position/orientation,
with a warning). Multi-frame files contribute one slice per frame (positions from the
per-frame functional groups of enhanced images, or ``GridFrameOffsetVector``). Duplicate
positions (the later ones are dropped), missing slices (a gap of 1.5x the median spacing
or more) and uneven spacing are reported in ``warnings`` and ``info["geometry_warnings"]``.
Slices of differing Rows/Columns or orientation in one 3D series make an
:class:`~meddx.errors.IngestError`. A single frame, and every image of a projection
radiography series (CR, DX, MG, IO, PX), is a 2D series: separate views in InstanceNumber
order, not slices of one volume.

**Values.** Rescale slope/intercept (or the Modality LUT; ``DoseGridScaling`` for RT dose)
give modality values; colour images (RGB, YBR, palette colour) become luminance.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any, cast

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from meddx.dicom_times import dicom_time, element_strings, first_value, time_zone_rule
from meddx.errors import IngestError, short_reason
from meddx.ingest.dicom_io import (
    decode_frames,
    frame_count,
    has_pixels,
    looks_like_dicom,
    quiet_pydicom,
    read_dicom,
    to_gray,
    transfer_syntax,
)
from meddx.ingest.file_checks import check_source
from meddx.ingest.image_resize import area_resize, resize_in_plane, shrinks_to
from meddx.records import Modality, keep_available

logger = logging.getLogger(__name__)

_IMAGING = Modality.IMAGING.value
_PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "IO", "PX"})
_GAP_FACTOR = 1.5  # a step this many times the median spacing means missing slices
_UNEVEN_TOLERANCE = 0.1  # relative deviation from the median spacing reported as uneven
_DUPLICATE_MM = 0.01


# ------------------------------------------------------------------- series assembly


@dataclass
class _File:
    path: Path
    ds: Dataset
    series_uid: str
    rows: int
    columns: int
    samples: int
    study_uid: str = ""
    frame_of_reference: str = ""

    @property
    def series_key(self) -> tuple[str, str, str]:
        """What makes a series one series.

        A SeriesInstanceUID reused in another study or frame of reference is not the same series.
        """
        return (self.series_uid, self.study_uid, self.frame_of_reference)


@dataclass
class _Frame:
    file: int  # index into DicomSeries.files
    frame: int  # frame index inside that file
    n_frames: int  # frames in that file
    position: np.ndarray | None  # ImagePositionPatient (3,)
    orientation: np.ndarray | None  # ImageOrientationPatient (6,)
    pixel_spacing: tuple[float, float] | None  # (row spacing = y, column spacing = x)
    slope: float
    intercept: float
    time: datetime | None
    instance: int | None
    modality_lut: bool = False


@dataclass
class DicomSeries:
    """An assembled DICOM series: slices sorted and checked, pixels not decoded yet.

    Attributes:
        files: the DICOM files the kept slices come from.
        frames: one entry per kept slice, in order along the slice normal.
        modality: the DICOM Modality (``CT``, ``MR``...).
        spacing: native voxel spacing ``(z, y, x)`` in mm (z = median slice step).
        orientation: ImageOrientationPatient (6 direction cosines) or None.
        origin: ImagePositionPatient of the first slice, or None.
        time: when the series was complete, its latest slice time (aware UTC), or None.
        is_2d: True for a single frame or a projection radiograph series (the 2D path).
        warnings: what a user should know (missing slices, dropped duplicates...).
        info: JSON-able facts for ``record.meta`` (UIDs, counts, transfer syntax; no PHI).
    """

    files: list[_File]
    frames: list[_Frame]
    modality: str
    spacing: tuple[float, float, float]
    orientation: tuple[float, ...] | None
    origin: tuple[float, ...] | None
    time: datetime | None
    is_2d: bool
    pixel_spacing_known: bool
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Native ``(slices, rows, columns)`` (of the first file, for projection views of differing sizes)."""
        return (len(self.frames), self.files[0].rows, self.files[0].columns)

    @property
    def monochrome1(self) -> bool:
        return str(self.files[0].ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"

    def values(self, in_plane: tuple[int, int] | None = None) -> np.ndarray:
        """Modality values (HU for CT) as float32 ``(slices, h, w)``, each file decoded once.

        Args:
            in_plane: resize every slice to ``(h, w)`` while stacking (see
                :func:`resize_in_plane`); None keeps the native size.

        Raises:
            IngestError: a file's pixel data cannot be decoded.

        Example:
            >>> series = load_series(Path("sample_data/patients/P0001/ct"))
            >>> hu = series.values()  # (slices, rows, columns), Hounsfield units
            >>> hu.shape, hu.dtype
            ((12, 48, 48), dtype('float32'))
        """
        n, rows, columns = self.shape
        size: tuple[int, int] = (in_plane[0], in_plane[1]) if in_plane else (rows, columns)
        uniform = len({(f.rows, f.columns) for f in self.files}) == 1
        # Shrinking happens slice by slice as files are decoded, so the full-resolution float
        # volume never exists; growing (small images) resizes the whole stack afterwards.
        stack_later = uniform and not shrinks_to((rows, columns), size)
        out = np.empty((n, *((rows, columns) if stack_later else size)), dtype=np.float32)
        decoded: dict[int, np.ndarray] = {}
        left = Counter(f.file for f in self.frames)
        for i, frame in enumerate(self.frames):
            pixels = self._pixels(frame, decoded, left)
            if stack_later or pixels.shape == size:
                out[i] = pixels
            elif shrinks_to(pixels.shape, size):
                out[i] = area_resize(pixels, size)
            else:  # projection views of differing sizes
                out[i] = resize_in_plane(np.asarray(pixels, dtype=np.float32)[None], size)[0]
        if stack_later:
            out = resize_in_plane(out, size)
        slope = np.array([f.slope for f in self.frames], dtype=np.float32)
        intercept = np.array([f.intercept for f in self.frames], dtype=np.float32)
        if not (np.all(slope == 1) and np.all(intercept == 0)):
            out *= slope[:, None, None]
            out += intercept[:, None, None]
        return out

    def _pixels(self, frame: _Frame, decoded: dict[int, np.ndarray], left: Counter) -> np.ndarray:
        source = self.files[frame.file]
        if frame.file not in decoded:
            array = decode_frames(source.ds, source.path)
            if array.shape[0] != frame.n_frames:
                raise IngestError(
                    source.path,
                    _IMAGING,
                    f"NumberOfFrames says {frame.n_frames} but the pixel data holds {array.shape[0]}",
                )
            decoded[frame.file] = array
        pixels = decoded[frame.file][frame.frame]
        left[frame.file] -= 1
        if left[frame.file] == 0:  # free each file's pixels once its last slice is stacked
            del decoded[frame.file]
        if frame.modality_lut:
            with quiet_pydicom():
                pixels = pydicom.pixels.apply_modality_lut(pixels, source.ds)
        return to_gray(pixels) if pixels.ndim == 3 else pixels


def _floats(ds: Dataset | None, keyword: str, n: int) -> np.ndarray | None:
    """``n`` finite numbers from a DS/IS element, or None when absent or malformed."""
    if ds is None:
        return None
    try:
        array = np.asarray([float(v) for v in element_strings(ds, keyword)], dtype=np.float64)
    except ValueError:
        return None
    return array if array.shape == (n,) and np.all(np.isfinite(array)) else None


def _group_floats(items: Sequence[Dataset | None], sequence: str, keyword: str, n: int) -> np.ndarray | None:
    """Numbers from the first functional group (per-frame before shared) that has them."""
    for item in items:
        seq = item.get(sequence) if item is not None else None
        if seq:
            found = _floats(seq[0], keyword, n)
            if found is not None:
                return found
    return None


def _number(ds: Dataset, keyword: str, default: float) -> float:
    found = _floats(ds, keyword, 1)
    return float(found[0]) if found is not None else default


def _instance(ds: Dataset) -> int | None:
    found = _floats(ds, "InstanceNumber", 1)
    return int(found[0]) if found is not None else None


def _frames_of(ds: Dataset, file_index: int, site_zone: tzinfo | None = None) -> list[_Frame]:
    """One :class:`_Frame` per frame, with its geometry, rescale and time."""
    n = frame_count(ds)
    ipp = _floats(ds, "ImagePositionPatient", 3)
    iop = _floats(ds, "ImageOrientationPatient", 6)
    spacing = _floats(ds, "PixelSpacing", 2)
    if spacing is None:
        spacing = _floats(ds, "ImagerPixelSpacing", 2)
    slope = _number(ds, "RescaleSlope", 1.0)
    if first_value(ds, "Modality") == "RTDOSE":
        slope *= _number(ds, "DoseGridScaling", 1.0)
    base = _Frame(
        file=file_index,
        frame=0,
        n_frames=n,
        position=ipp,
        orientation=iop,
        pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing is not None else None,
        slope=slope,
        intercept=_number(ds, "RescaleIntercept", 0.0),
        time=dicom_time(ds, site_zone=site_zone),
        instance=_instance(ds),
        modality_lut="ModalityLUTSequence" in ds and "RescaleSlope" not in ds,
    )
    if n == 1:
        return [base]

    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    offsets = _floats(ds, "GridFrameOffsetVector", n)
    frames = []
    for i in range(n):
        item = per_frame[i] if i < len(per_frame) else None
        groups = (item, shared)
        position = _group_floats(groups, "PlanePositionSequence", "ImagePositionPatient", 3)
        orientation = _group_floats(groups, "PlaneOrientationSequence", "ImageOrientationPatient", 6)
        orientation = orientation if orientation is not None else iop
        if position is None and ipp is not None and offsets is not None and orientation is not None:
            position = ipp + offsets[i] * np.cross(orientation[:3], orientation[3:])  # RT dose grids
        frame_spacing = _group_floats(groups, "PixelMeasuresSequence", "PixelSpacing", 2)
        frame_slope = _group_floats(groups, "PixelValueTransformationSequence", "RescaleSlope", 1)
        frame_intercept = _group_floats(groups, "PixelValueTransformationSequence", "RescaleIntercept", 1)
        frames.append(
            _Frame(
                file=file_index,
                frame=i,
                n_frames=n,
                position=position,
                orientation=orientation,
                pixel_spacing=(
                    (float(frame_spacing[0]), float(frame_spacing[1]))
                    if frame_spacing is not None
                    else base.pixel_spacing
                ),
                slope=float(frame_slope[0]) if frame_slope is not None else base.slope,
                intercept=float(frame_intercept[0]) if frame_intercept is not None else base.intercept,
                time=dicom_time(ds, item, site_zone) if item is not None else base.time,
                instance=base.instance,
                modality_lut=base.modality_lut,
            )
        )
    return frames


def _dicom_files(path: Path) -> tuple[list[Path], int]:
    """The candidate DICOM files of a file or folder, and how many other files were skipped."""
    if path.is_file():
        return [path], 0
    found, skipped = [], 0
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        if file.name.upper() == "DICOMDIR" or not looks_like_dicom(file):
            skipped += 1
        else:
            found.append(file)
    return found, skipped


def load_series(
    path: Path,
    *,
    index_time: datetime | None = None,
    series_rule: str = "most_slices",
    site_zone: tzinfo | None = None,
    max_file_mb: float | None = None,
) -> DicomSeries | None:
    """Read a DICOM file or series folder into a sorted, checked :class:`DicomSeries`.

    Args:
        path: a DICOM file or a folder holding one (or several) series.
        index_time: drop series acquired after it, whole (the leakage rule); None keeps all.
        series_rule: ``most_slices`` or ``first_uid`` (see the module docstring).
        site_zone: the zone of DICOM times without ``TimezoneOffsetFromUTC``; None reads them as UTC.
        max_file_mb: refuse DICOM files larger than this (None: no limit).

    Returns:
        The series, or None when every series was acquired after ``index_time``.

    Raises:
        IngestError: nothing readable, no image, an inconsistent series, images of
            several patients in one folder, or a file over ``max_file_mb``.

    Example:
        >>> series = load_series(Path("sample_data/patients/P0001/ct"))
        >>> series.spacing, series.values().shape  # spacing in mm: (slice, row, column)
        ((5.0, 7.245, 7.245), (12, 48, 48))
    """
    path = check_source(path, _IMAGING, max_file_mb=max_file_mb, folder_ok=True, expected="a DICOM file or folder")
    with quiet_pydicom():  # header values are read lazily; keep pydicom from quoting them
        return _load_series(path, index_time, series_rule, site_zone, max_file_mb)


def _load_series(
    path: Path, index_time: datetime | None, series_rule: str, site_zone: tzinfo | None, max_file_mb: float | None
) -> DicomSeries | None:
    candidates, skipped = _dicom_files(path)
    files: list[_File] = []
    frames: list[_Frame] = []
    no_pixels = 0
    patient_ids: set[str] = set()  # compared, never logged or kept: PatientID identifies a person
    for file in candidates:
        if max_file_mb is not None:  # an oversized image fails the series rather than vanish from it
            check_source(file, _IMAGING, max_file_mb=max_file_mb, expected="DICOM files")
        try:
            ds = read_dicom(file)
        except IngestError:
            if path.is_file():
                raise
            skipped += 1
            continue
        if not has_pixels(ds) or "Rows" not in ds or "Columns" not in ds:
            if path.is_file():
                decode_frames(ds, file)  # raises the precise reason
                raise IngestError(file, _IMAGING, "holds no image (Rows/Columns missing)")
            no_pixels += 1
            continue
        try:
            entry = _File(
                file,
                ds,
                first_value(ds, "SeriesInstanceUID"),
                int(ds.Rows),
                int(ds.Columns),
                int(ds.get("SamplesPerPixel") or 1),
                first_value(ds, "StudyInstanceUID"),
                first_value(ds, "FrameOfReferenceUID"),
            )
            file_frames = _frames_of(ds, len(files), site_zone)
        except (TypeError, ValueError) as exc:
            if path.is_file():
                raise IngestError(file, _IMAGING, f"invalid image attributes: {short_reason(exc)}") from None
            skipped += 1
            continue
        files.append(entry)
        frames.extend(file_frames)
        patient_ids.add(first_value(ds, "PatientID"))
    if not files:
        raise IngestError(
            path,
            _IMAGING,
            f"folder holds no DICOM image ({len(candidates)} DICOM-like file(s), {no_pixels} without pixel data, "
            f"{skipped} other file(s) skipped)",
        )

    if len(patient_ids) > 1:
        empty = " (one of them empty)" if "" in patient_ids else ""
        raise IngestError(
            path,
            _IMAGING,
            f"the folder holds images of {len(patient_ids)} different PatientID values{empty}: another patient's "
            "series is mixed in; a series folder must hold one patient's images, so move the others out",
        )
    n_undated = _date_series_whole(frames, files)
    n_before = len(frames)
    late_series = 0
    if index_time is not None:
        series_times = {files[f.file].series_key: f.time for f in frames}  # one time per series now
        available, late_series = keep_available(sorted(series_times), index_time, time_of=series_times.__getitem__)
        kept_uids = set(available)
        frames = [f for f in frames if files[f.file].series_key in kept_uids]
    dropped_late = n_before - len(frames)
    if not frames:
        logger.info("imaging: every series of %s was acquired after the index time", path.name)
        return None

    # One series per (SeriesInstanceUID, StudyInstanceUID, FrameOfReferenceUID): a UID reused
    # by another study or frame of reference (a copy, a bad export) is another series.
    counts = Counter(files[f.file].series_key for f in frames)
    keys = sorted(counts)
    if series_rule == "first_uid":
        chosen_key = keys[0]
    else:
        chosen_key = min(keys, key=lambda key: (-counts[key], key))
    chosen = chosen_key[0]
    frames = [f for f in frames if files[f.file].series_key == chosen_key]
    series_files = sorted({f.file for f in frames})
    remap = {old: new for new, old in enumerate(series_files)}
    files = [files[i] for i in series_files]
    for f in frames:
        f.file = remap[f.file]

    first = files[0].ds
    modality = (first_value(first, "Modality") or "OT").upper()
    if len(frames) == 1 or modality in _PROJECTION_MODALITIES:
        # Projection images are separate views (of any size), not slices of one volume.
        frames = sorted(frames, key=lambda f: _stored_order(f, files))
        geometry_warnings: list[str] = []
        z_spacing = _fallback_spacing(first)
    else:
        _check_consistent(files, frames, path)
        frames, geometry_warnings, z_spacing = _sort_frames(frames, files, first)
    is_2d = len(frames) == 1 or modality in _PROJECTION_MODALITIES
    pixel_spacing = next((f.pixel_spacing for f in frames if f.pixel_spacing is not None), None)
    times = [f.time for f in frames if f.time is not None]
    syntaxes = sorted({str(transfer_syntax(f.ds) or "") for f in files} - {""})
    syntax_names = [UID(s).name for s in syntaxes]
    warnings_out = list(geometry_warnings)
    if dropped_late:
        warnings_out.append(
            f"{late_series} series acquired after the index time dropped whole ({dropped_late} slice(s))"
        )
    info: dict[str, Any] = {
        "study_uid": first_value(first, "StudyInstanceUID") or None,
        "series_uid": chosen or None,
        "series_rule": series_rule,
        "n_series": len(keys),
        "n_files": len(files),
        "n_skipped_files": skipped + no_pixels,
        "n_dropped_after_index": dropped_late,
        "n_series_dropped_after_index": late_series,
        "n_undated_slices": n_undated.get(chosen_key, 0),
        "time_zone": time_zone_rule(first, site_zone),
        "transfer_syntax": syntaxes[0] if len(syntaxes) == 1 else (syntaxes or None),
        "transfer_syntax_name": syntax_names[0] if len(syntax_names) == 1 else (syntax_names or None),
        "photometric": str(first.get("PhotometricInterpretation", "")),
        "geometry_warnings": geometry_warnings,
    }
    if len(keys) > 1:
        warnings_out.append(f"folder holds {len(keys)} series; kept {chosen} by the rule {series_rule!r}")
    reused = Counter(key[0] for key in keys)
    for uid, n in sorted(reused.items()):
        if n > 1:
            warnings_out.append(
                f"SeriesInstanceUID {uid} is used by {n} series of different StudyInstanceUID or "
                "FrameOfReferenceUID; they were kept apart, not merged"
            )
    orientation = frames[0].orientation
    origin = frames[0].position
    return DicomSeries(
        files=files,
        frames=frames,
        modality=modality,
        spacing=(z_spacing, *(pixel_spacing or (1.0, 1.0))),
        orientation=tuple(float(v) for v in orientation) if orientation is not None else None,
        origin=tuple(float(v) for v in origin) if origin is not None else None,
        time=max(times) if times else None,
        is_2d=is_2d,
        pixel_spacing_known=pixel_spacing is not None,
        warnings=warnings_out,
        info=info,
    )


def _date_series_whole(frames: list[_Frame], files: list[_File]) -> dict[tuple[str, str, str], int]:
    """Give every slice its series' time (its latest slice time); returns undated slices per series.

    A series is one acquisition: it is known once its last slice is, and a slice without a
    date of its own belongs to it, so it takes that time too.
    """
    latest: dict[tuple[str, str, str], datetime | None] = {}
    for f in frames:
        uid = files[f.file].series_key
        known = latest.get(uid)
        latest[uid] = f.time if known is None else (known if f.time is None else max(known, f.time))
    undated: Counter = Counter()
    for f in frames:
        uid = files[f.file].series_key
        if f.time is None and latest[uid] is not None:
            undated[uid] += 1
        f.time = latest[uid]
    return dict(undated)


def _check_consistent(files: list[_File], frames: list[_Frame], where: Path) -> None:
    sizes = Counter((f.rows, f.columns) for f in files)
    if len(sizes) > 1:
        listed = ", ".join(f"{r}x{c} in {n} file(s)" for (r, c), n in sizes.most_common())
        raise IngestError(where, _IMAGING, f"inconsistent series: slices differ in Rows x Columns ({listed})")
    samples = Counter(f.samples for f in files)
    if len(samples) > 1:
        raise IngestError(where, _IMAGING, "inconsistent series: slices differ in SamplesPerPixel")
    orientations = [f.orientation for f in frames if f.orientation is not None]
    if orientations and any(np.max(np.abs(o - orientations[0])) > 1e-3 for o in orientations):
        raise IngestError(
            where, _IMAGING, "inconsistent series: slices differ in ImageOrientationPatient (a localizer mixed in?)"
        )


def _unplaced_note(unplaced: list[_Frame], files: list[_File]) -> str:
    """Why slices cannot be placed along the normal: elements missing, or present but not finite numbers."""
    keywords = ("ImagePositionPatient", "ImageOrientationPatient")
    invalid = sum(1 for f in unplaced if f.n_frames == 1 and any(k in files[f.file].ds for k in keywords))
    missing = len(unplaced) - invalid
    parts = []
    if missing:
        parts.append(f"{missing} slice(s) lack ImagePositionPatient/ImageOrientationPatient")
    if invalid:
        parts.append(
            f"{invalid} slice(s) have ImagePositionPatient/ImageOrientationPatient values that are not "
            "finite numbers (NaN, inf, text or the wrong count)"
        )
    return "; ".join(parts) + "; ordered by InstanceNumber"


def _stored_order(frame: _Frame, files: list[_File]) -> tuple[int, str, int]:
    return (frame.instance if frame.instance is not None else 1 << 30, str(files[frame.file].path), frame.frame)


def _fallback_spacing(ds: Dataset) -> float:
    """Slice spacing from the header, for slices without positions."""
    spacing = abs(_number(ds, "SpacingBetweenSlices", 0.0)) or abs(_number(ds, "SliceThickness", 0.0))
    return spacing or 1.0


def _sort_frames(frames: list[_Frame], files: list[_File], first: Dataset) -> tuple[list[_Frame], list[str], float]:
    """Order slices along the normal; drop duplicate positions; report gaps and uneven steps."""
    notes: list[str] = []
    fallback = _fallback_spacing(first)
    unplaced = [f for f in frames if f.position is None or f.orientation is None]
    if unplaced:
        if len(files) > 1:  # frames of one multi-frame file keep their stored order silently
            notes.append(_unplaced_note(unplaced, files))
        return sorted(frames, key=lambda f: _stored_order(f, files)), notes, fallback

    orientation = cast(np.ndarray, frames[0].orientation)  # every frame has one (checked above)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([float(f.position @ normal) for f in frames])
    order = np.argsort(positions, kind="stable")
    ordered = [frames[i] for i in order]
    positions = positions[order]
    keep = np.ones(len(ordered), dtype=bool)
    keep[1:] = np.diff(positions) > _DUPLICATE_MM
    if not keep.all():
        notes.append(f"{int((~keep).sum())} slice(s) repeat a position already present and were dropped")
        ordered = [f for f, k in zip(ordered, keep, strict=True) if k]
        positions = positions[keep]
    if len(ordered) < 2:
        return ordered, notes, fallback
    steps = np.diff(positions)
    spacing = float(np.median(steps))
    gaps = steps >= _GAP_FACTOR * spacing
    if gaps.any():
        missing = int(sum(round(s / spacing) - 1 for s in steps[gaps]))
        where = ", ".join(f"{positions[i]:.1f}->{positions[i + 1]:.1f} mm" for i in np.flatnonzero(gaps)[:5])
        notes.append(
            f"missing slices: {int(gaps.sum())} gap(s) ({where}) against a median spacing of {spacing:.2f} mm; "
            f"about {max(missing, 1)} slice(s) missing"
        )
    regular = steps[~gaps]
    if regular.size and np.max(np.abs(regular - spacing)) > _UNEVEN_TOLERANCE * spacing:
        notes.append(f"uneven slice spacing: steps from {regular.min():.2f} to {regular.max():.2f} mm")
    return ordered, notes, spacing

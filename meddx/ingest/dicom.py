"""Imaging ingestor: DICOM files and series, and NIfTI volumes, into fixed-shape volumes.

What the ``imaging`` column may name:

* a DICOM file (Part 10, also without the 128-byte preamble), single- or multi-frame;
* a folder holding a DICOM series. Files that are not DICOM, and DICOM files without
  pixel data (DICOMDIR, SR, RT plans...), are skipped. When the folder holds several
  series, ``ImagingConfig.series_rule`` picks one: ``most_slices`` (default: the series
  with the most slices, ties to the smallest SeriesInstanceUID) or ``first_uid`` (the
  smallest SeriesInstanceUID). ``record.meta`` says which one and how many there were;
* a NIfTI file (``.nii``, ``.nii.gz``), read with MONAI's ``NibabelReader``.
  Voxel axes (i, j, k) become (W, H, D); NIfTI files are undated and use the window named
  by ``ImagingConfig.nifti_modality``.

**Output record** (shapes from :class:`~meddx.config.ImagingConfig`, ``spatial_size = (D, H, W)``):

* ``volume``: float32 ``(D, H, W)`` in [0, 1];
* ``slice_mask``: bool ``(D,)``, True where a slice holds image data.

**Series assembly.** Slices are sorted by their position along the slice normal
(``ImagePositionPatient · (row × column direction cosines)``), never by file name or
InstanceNumber (those are the fallback only when a series has no position/orientation,
with a warning). Multi-frame files contribute one slice per frame (positions from the
per-frame functional groups of enhanced images, or ``GridFrameOffsetVector``). Duplicate
positions (the later ones are dropped), missing slices (a gap of 1.5x the median spacing
or more) and uneven spacing are reported in ``record.warnings`` and ``meta["geometry_warnings"]``.
Slices of differing Rows/Columns or orientation in one 3D series make an :class:`IngestError`.

**Intensities.** Rescale slope/intercept (or the Modality LUT; ``DoseGridScaling`` for RT
dose) give modality values (HU for CT). A window per DICOM Modality from
``ImagingConfig.windows`` maps ``[lower, upper]`` to ``[0, 1]`` (clipped). A modality without
its own entry uses ``windows["default"]``; a window whose upper bound is not above its
lower bound (the default ``(0, 0)``) is a *robust percentile window*: the
``ImagingConfig.percentiles`` (0.5th and 99.5th by default) of the image's own values,
computed after the in-plane resize. MONOCHROME1 images are inverted after windowing, so
bright always means dense. Colour images (RGB, YBR, palette colour) become luminance
(0.299 R + 0.587 G + 0.114 B).

**Geometry.** ``meta`` keeps the native spacing ``(z, y, x)`` in mm, the orientation
(``ImageOrientationPatient``), the origin and the output voxel spacing. Without
``spacing_mm`` each axis of a 3D series is resized to ``spatial_size`` (the aspect ratio is
not kept; every slice is real, so ``slice_mask`` is all True). With ``spacing_mm`` the
series is resampled to that voxel size (MONAI ``Resize`` to the shape the spacing implies,
the same grid as ``monai.transforms.Spacing`` up to half a voxel at the edges, but
anti-aliased) and then centre-padded or cropped to ``spatial_size``
(``ResizeWithPadOrCrop``); padded slices have ``slice_mask`` False. Shrinking uses area
averaging, growing uses (tri)linear interpolation. In-plane shrinking happens slice by
slice while the files are decoded (OpenCV ``INTER_AREA``, equal to MONAI's ``area`` mode
for integer factors and faster), so a 512x512 series never exists as a float volume;
the slice axis, growing and padding use MONAI transforms.

**The 2D path.** A single 2D frame (of any modality), and every image of a projection
radiography series (CR, DX, MG, IO, PX), is resized to fill ``(H, W)`` (``spacing_mm`` is not
applied to 2D images) and placed as its own slice from index 0 on, without
interpolation between slices; ``slice_mask`` is True for those slices only (a PA and a
lateral view give ``[True, True, False, ...]``); ``meta["kind"]`` is ``"2d"``. More images
than ``D`` slices: the first ``D`` by InstanceNumber are kept, with a warning.
``ImagingConfig.size_2d`` is not used by this volume contract.

**Time and leakage.** A slice is placed in time by ``AcquisitionDateTime``, else
``AcquisitionDate``/``AcquisitionTime``, else ``SeriesDate``/``SeriesTime``, else
``StudyDate``/``StudyTime`` (enhanced multi-frame images: ``FrameAcquisitionDateTime`` per
frame first). DICOM times carry no zone: they are read as UTC unless
``TimezoneOffsetFromUTC`` (or an offset inside a DT value) says otherwise. A date without a
time is taken as the end of that day, so a same-day image is never assumed to precede the
index time. Slices dated after the index time are dropped (before a series is chosen)
via :func:`meddx.records.keep_available`; when none remain the ingestor returns ``None``
(the modality is missing for that row), it does not raise. ``record.time`` is the latest
kept slice time, or None when undated.

**Privacy.** ``meta`` holds only StudyInstanceUID, SeriesInstanceUID, Modality, geometry,
counts, transfer syntax and warnings; names, IDs and birth dates are never read into
meta, warnings or logs, and pydicom's value warnings (which may quote element values)
are silenced while reading.

**Errors.** Every failure is an :class:`~meddx.errors.IngestError` naming the file and the
reason: not a DICOM file, no pixel data, truncated pixel data, a transfer syntax no
installed plugin decodes (the message names the syntax and the plugins that would), an
inconsistent series.

Example:
    >>> from meddx.ingest.base import IngestRequest
    >>> from meddx.records import Modality, parse_time
    >>> reader = ImagingIngestor()
    >>> record = reader.read(IngestRequest("p1", parse_time("2024-03-05T14:00:00Z"),
    ...                                    {Modality.IMAGING: Path("ct_series/")}))  # doctest: +SKIP
    >>> record.arrays["volume"].shape  # doctest: +SKIP
    (32, 64, 64)
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID

from meddx.config import ImagingConfig, IngestConfig
from meddx.errors import IngestError
from meddx.ingest.base import ArraySpec, ArrayTensorizer, Ingestor, IngestRequest, register_ingestor
from meddx.records import Modality, ModalityRecord, keep_available

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_IMAGING = Modality.IMAGING.value
_PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "IO", "PX"})
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_GAP_FACTOR = 1.5  # a step this many times the median spacing means missing slices
_UNEVEN_TOLERANCE = 0.1  # relative deviation from the median spacing reported as uneven
_DUPLICATE_MM = 0.01

# Which plugins decode each family of compressed transfer syntaxes (for error messages).
_DECODER_HINTS: dict[str, str] = {
    "jpeg": "pylibjpeg with pylibjpeg-libjpeg, Pillow, or python-gdcm (12-bit JPEG needs pylibjpeg-libjpeg or gdcm)",
    "jpeg-lossless": "pylibjpeg with pylibjpeg-libjpeg, or python-gdcm",
    "jpeg-ls": "pylibjpeg with pylibjpeg-libjpeg, pyjpegls, or python-gdcm",
    "jpeg2000": "pylibjpeg with pylibjpeg-openjpeg, Pillow, or python-gdcm",
    "htj2k": "pylibjpeg with pylibjpeg-openjpeg",
    "rle": "pydicom's own RLE decoder or pylibjpeg with pylibjpeg-rle",
    "video": "no pydicom plugin: MPEG-2/H.264/H.265 pixel data is an encapsulated video stream, which meddx "
    "does not extract; export the clip as MP4 and name it in the `video` column",
}


def _decoder_family(uid: UID) -> str | None:
    name = uid.name.lower()
    if "mpeg" in name or "hevc" in name:
        return "video"
    if "high-throughput" in name:
        return "htj2k"
    if "jpeg 2000" in name:
        return "jpeg2000"
    if "jpeg-ls" in name:
        return "jpeg-ls"
    if "jpeg lossless" in name:
        return "jpeg-lossless"
    if "jpeg" in name:
        return "jpeg"
    if "rle" in name:
        return "rle"
    return None


# ------------------------------------------------------------------ reading one file


def is_nifti(path: Path) -> bool:
    """Whether ``path`` names a NIfTI file (by suffix)."""
    return path.is_file() and path.name.lower().endswith(_NIFTI_SUFFIXES)


def looks_like_dicom(path: Path) -> bool:
    """Cheap check of the first bytes: a ``DICM`` prefix, or a DICOM tag where a preamble-less file starts.

    Example:
        >>> looks_like_dicom(Path("notes.txt"))  # doctest: +SKIP
        False
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    return _starts_with_tag(head)


def _starts_with_tag(head: bytes) -> bool:
    # Files without the preamble start straight with an element: group 0x0002 (file meta),
    # or 0x0008 (the identifying group) for bare datasets, in either byte order.
    if len(head) < 8:
        return False
    little = int.from_bytes(head[0:2], "little")
    big = int.from_bytes(head[0:2], "big")
    return little in (0x0002, 0x0008) or big == 0x0008


def read_dicom(path: Path, modality: str = _IMAGING) -> Dataset:
    """Read one DICOM file, also without the preamble; pixel data is kept but not decoded.

    Args:
        path: the file.
        modality: the meddx modality reading it (named in errors).

    Raises:
        IngestError: not a DICOM file, or unreadable.

    Example:
        >>> ds = read_dicom(Path("CT_small.dcm"))  # doctest: +SKIP
        >>> ds.Modality  # doctest: +SKIP
        'CT'
    """
    path = Path(path)
    if not path.exists():
        raise IngestError(path, modality, "no such file")
    if path.stat().st_size == 0:
        raise IngestError(path, modality, "empty file")
    try:
        with quiet_pydicom():
            try:
                return pydicom.dcmread(path)
            except InvalidDicomError:
                with open(path, "rb") as handle:
                    head = handle.read(8)
                if not _starts_with_tag(head):
                    raise
                ds = pydicom.dcmread(path, force=True)
                if len(ds) == 0:
                    raise InvalidDicomError("no data elements") from None
                return ds
    except InvalidDicomError:
        raise IngestError(
            path, modality, "not a DICOM file (no DICM prefix and no DICOM element at the start)"
        ) from None
    except Exception as exc:  # pydicom raises many types on damaged files
        raise IngestError(path, modality, f"not a readable DICOM file: {_short(exc)}") from None


def has_pixels(ds: Dataset) -> bool:
    """Whether the dataset holds (float, double or integer) pixel data."""
    return any(kw in ds for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def transfer_syntax(ds: Dataset) -> UID | None:
    """The dataset's transfer syntax UID, or None when the file meta lacks it."""
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(uid)) if uid else None


def decode_frames(
    ds: Dataset, path: Path, modality: str = _IMAGING, frames: Sequence[int] | None = None
) -> np.ndarray:
    """Decode pixel data to ``(F, H, W)`` or ``(F, H, W, 3)`` (RGB); shared by imaging and video.

    YBR colour becomes RGB (pydicom does it), palette colour is looked up to RGB. No
    rescale or windowing is applied: the values are the stored ones.

    Args:
        ds: a dataset from :func:`read_dicom`.
        path: its file (named in errors).
        modality: the meddx modality reading it.
        frames: frame indices to decode (compressed multi-frame data decodes only those);
            None decodes every frame.

    Raises:
        IngestError: no pixel data, truncated pixel data, or a transfer syntax that no
            installed plugin decodes (the message names the syntax and the plugins).

    Example:
        >>> decode_frames(read_dicom(Path("MR_small.dcm")), Path("MR_small.dcm")).shape  # doctest: +SKIP
        (1, 64, 64)
    """
    if not has_pixels(ds):
        sop = ds.get("SOPClassUID")
        what = f" ({UID(str(sop)).name})" if sop else ""
        raise IngestError(path, modality, f"holds no pixel data{what}; it is not an image (or the file is truncated)")
    n_frames = _n_frames(ds)
    uid = transfer_syntax(ds)
    if uid is None and "PixelData" in ds:
        # Preamble-less files sometimes lack the file meta; their encoding is known from how they parsed.
        implicit, little = ds.original_encoding
        uid = UID("1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1" if little else "1.2.840.10008.1.2.2")
        ds.file_meta = getattr(ds, "file_meta", None) or pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = uid
    try:
        with quiet_pydicom():
            # pydicom.pixels.pixel_array rather than ds.pixel_array: it does not keep a second
            # copy of the pixels in the dataset, and decodes single frames of compressed data.
            if frames is not None and uid is not None and uid.is_encapsulated and n_frames > 1:
                array = np.stack([pydicom.pixels.pixel_array(ds, index=int(i)) for i in frames])
            else:
                array = pydicom.pixels.pixel_array(ds)
                if n_frames == 1:
                    array = array[None]
                if frames is not None:
                    array = array[np.asarray(frames, dtype=int)]
    except IngestError:
        raise
    except Exception as exc:
        raise IngestError(path, modality, _decode_failure(uid, exc)) from None
    if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
        try:
            array = pydicom.pixels.apply_color_lut(array, ds)
        except Exception as exc:
            raise IngestError(path, modality, f"palette colour lookup failed: {_short(exc)}") from None
    if array.ndim == 2:  # a single frame that came back without its frame axis
        array = array[None]
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[-1] != 3):
        raise IngestError(path, modality, f"unexpected pixel array shape {array.shape}")
    return array


def _decode_failure(uid: UID | None, exc: BaseException) -> str:
    text = _short(exc)
    if "less than expected" in text or "truncated" in text.lower():
        return f"truncated pixel data: {text}"
    if uid is None:
        return f"cannot decode pixel data (no transfer syntax in the file meta): {text}"
    family = _decoder_family(uid)
    if uid.is_encapsulated or family is not None:
        hint = _DECODER_HINTS.get(family or "", "no known plugin")
        try:
            decoder = pydicom.pixels.get_decoder(uid)
            installed = ", ".join(decoder.available_plugins) or "none"
        except Exception:
            installed = "none (pydicom has no decoder for it)"
        return (
            f"cannot decode transfer syntax {uid.name} ({uid}): {text}. Installed plugins tried: {installed}; "
            f"this syntax is decoded by {hint}"
        )
    return f"cannot decode pixel data ({uid.name}): {text}"


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


_DROP_ALL = _DropAll()
_quiet_depth = 0


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and log records while meddx reads a file.

    pydicom reports invalid element values by quoting them (``warn_and_log``), which could
    put patient data into logs; meddx turns real problems into :class:`IngestError` instead.

    Example:
        >>> with quiet_pydicom():
        ...     pass
    """
    global _quiet_depth
    pydicom_logger = logging.getLogger("pydicom")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if _quiet_depth == 0:
            pydicom_logger.addFilter(_DROP_ALL)
        _quiet_depth += 1
        try:
            yield
        finally:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                pydicom_logger.removeFilter(_DROP_ALL)


def _n_frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """Luminance (float32) of RGB pixels shaped ``(..., 3)``.

    Example:
        >>> to_gray(np.array([[255, 255, 255]], np.uint8)).round(1).tolist()
        [255.0]
    """
    return rgb.astype(np.float32, copy=False) @ _LUMA


# ------------------------------------------------------------------------------ time


_DA = re.compile(r"^(\d{4})\.?(\d{2})\.?(\d{2})$")
_TM = re.compile(r"^(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{1,6}))?)?)?$")
_DT = re.compile(r"^(\d{4})(\d{2})(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?)?([+-]\d{4})?$")
_END_OF_DAY = time(23, 59, 59, 999999)
_DATE_TIME_PAIRS = (("AcquisitionDate", "AcquisitionTime"), ("SeriesDate", "SeriesTime"), ("StudyDate", "StudyTime"))


def _text(value: Any) -> str:
    if value is None:
        return ""
    return str(getattr(value, "original_string", None) or value).strip()


def _strings(ds: Dataset, keyword: str) -> list[str]:
    """The values of a text-encoded element (DS, IS, DA, TM, DT, UI, CS, SH) as strings.

    Reads the raw bytes when pydicom has not converted the element yet: building DSfloat
    and friends for every header field is a large share of the time to read a series.
    """
    element = ds.get_item(tag_for_keyword(keyword))  # type: ignore[arg-type]
    if element is None or element.value is None:
        return []
    value = element.value
    if isinstance(value, (bytes, bytearray)):
        return [part.strip(" \x00") for part in bytes(value).decode("latin-1").split("\\")]
    if isinstance(value, (list, tuple, MultiValue)):
        return [_text(v) for v in value]
    return [_text(value)]


def _first(ds: Dataset, keyword: str) -> str:
    values = _strings(ds, keyword)
    return values[0] if values else ""


def _offset(text: str) -> timezone | None:
    match = re.fullmatch(r"([+-])(\d{2})(\d{2})", text.strip())
    if not match:
        return None
    sign = -1 if match.group(1) == "-" else 1
    return timezone(sign * timedelta(hours=int(match.group(2)), minutes=int(match.group(3))))


def _parse_da_tm(da: str, tm: str, zone: timezone) -> datetime | None:
    day = _DA.match(da)
    if not day:
        return None
    try:
        on = date(int(day.group(1)), int(day.group(2)), int(day.group(3)))
        clock = _END_OF_DAY
        match = _TM.match(tm) if tm else None
        if match:
            frac = (match.group(4) or "").ljust(6, "0")
            clock = time(int(match.group(1)), int(match.group(2) or 0), int(match.group(3) or 0), int(frac or 0))
    except ValueError:
        return None
    return datetime.combine(on, clock, tzinfo=zone).astimezone(timezone.utc)


def _parse_dt(dt: str, zone: timezone) -> datetime | None:
    match = _DT.match(dt)
    if not match:
        return None
    year, month, day, hour, minute, second, frac, offset = match.groups()
    try:
        on = date(int(year), int(month), int(day))
        clock = _END_OF_DAY if hour is None else time(
            int(hour), int(minute or 0), int(second or 0), int((frac or "").ljust(6, "0") or 0)
        )
    except ValueError:
        return None
    return datetime.combine(on, clock, tzinfo=_offset(offset) if offset else zone).astimezone(timezone.utc)


def dicom_time(ds: Dataset, frame_item: Dataset | None = None) -> datetime | None:
    """When an image was acquired (aware UTC), or None when undated.

    The order is ``FrameAcquisitionDateTime`` (of ``frame_item``, an enhanced image's
    per-frame group), ``AcquisitionDateTime``, ``AcquisitionDate``/``Time``,
    ``SeriesDate``/``Time``, ``StudyDate``/``Time``. Zone-less values are UTC unless
    ``TimezoneOffsetFromUTC`` is present; a date without a time means the end of that day.

    Example:
        >>> ds = Dataset(); ds.StudyDate = "20240305"; ds.StudyTime = "140000"
        >>> dicom_time(ds).isoformat()
        '2024-03-05T14:00:00+00:00'
    """
    zone = _offset(_first(ds, "TimezoneOffsetFromUTC")) or timezone.utc
    if frame_item is not None:
        content = frame_item.get("FrameContentSequence")
        if content:
            found = _parse_dt(_first(content[0], "FrameAcquisitionDateTime"), zone)
            if found is not None:
                return found
    found = _parse_dt(_first(ds, "AcquisitionDateTime"), zone)
    if found is not None:
        return found
    for date_kw, time_kw in _DATE_TIME_PAIRS:
        day = _first(ds, date_kw)
        found = _parse_da_tm(day, _first(ds, time_kw), zone) if day else None
        if found is not None:
            return found
    return None


# ------------------------------------------------------------------- series assembly


@dataclass
class _File:
    path: Path
    ds: Dataset
    series_uid: str
    rows: int
    columns: int
    samples: int


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
        time: latest acquisition time of the kept slices (aware UTC), or None.
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
            >>> series = load_series(Path("ct_series/"))  # doctest: +SKIP
            >>> hu = series.values()  # doctest: +SKIP
        """
        n, rows, columns = self.shape
        size = tuple(in_plane or (rows, columns))
        uniform = len({(f.rows, f.columns) for f in self.files}) == 1
        # Shrinking happens slice by slice as files are decoded, so the full-resolution float
        # volume never exists; growing (small images) resizes the whole stack afterwards.
        stack_later = uniform and not _shrinks((rows, columns), size)
        out = np.empty((n, *((rows, columns) if stack_later else size)), dtype=np.float32)
        decoded: dict[int, np.ndarray] = {}
        left = Counter(f.file for f in self.frames)
        for i, frame in enumerate(self.frames):
            pixels = self._pixels(frame, decoded, left)
            if stack_later or pixels.shape == size:
                out[i] = pixels
            elif _shrinks(pixels.shape, size):
                out[i] = _area_resize(pixels, size)
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
        array = np.asarray([float(v) for v in _strings(ds, keyword)], dtype=np.float64)
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


def _frames_of(ds: Dataset, file_index: int) -> list[_Frame]:
    """One :class:`_Frame` per frame, with its geometry, rescale and time."""
    n = _n_frames(ds)
    ipp = _floats(ds, "ImagePositionPatient", 3)
    iop = _floats(ds, "ImageOrientationPatient", 6)
    spacing = _floats(ds, "PixelSpacing", 2)
    if spacing is None:
        spacing = _floats(ds, "ImagerPixelSpacing", 2)
    slope = _number(ds, "RescaleSlope", 1.0)
    if _first(ds, "Modality") == "RTDOSE":
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
        time=dicom_time(ds),
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
                time=dicom_time(ds, item) if item is not None else base.time,
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
) -> DicomSeries | None:
    """Read a DICOM file or series folder into a sorted, checked :class:`DicomSeries`.

    Args:
        path: a DICOM file or a folder holding one (or several) series.
        index_time: drop slices acquired after it (the leakage rule); None keeps all.
        series_rule: ``most_slices`` or ``first_uid`` (see the module docstring).

    Returns:
        The series, or None when every slice was acquired after ``index_time``.

    Raises:
        IngestError: nothing readable, no image, or an inconsistent series.

    Example:
        >>> series = load_series(Path("ct_series/"))  # doctest: +SKIP
        >>> series.spacing, series.values().shape  # doctest: +SKIP
        ((2.5, 0.7, 0.7), (12, 48, 48))
    """
    path = Path(path)
    if not path.exists():
        raise IngestError(path, _IMAGING, "no such file or folder")
    with quiet_pydicom():  # header values are read lazily; keep pydicom from quoting them
        return _load_series(path, index_time, series_rule)


def _load_series(path: Path, index_time: datetime | None, series_rule: str) -> DicomSeries | None:
    candidates, skipped = _dicom_files(path)
    files: list[_File] = []
    frames: list[_Frame] = []
    no_pixels = 0
    for file in candidates:
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
            entry = _File(file, ds, _first(ds, "SeriesInstanceUID"), int(ds.Rows), int(ds.Columns),
                          int(ds.get("SamplesPerPixel") or 1))
            file_frames = _frames_of(ds, len(files))
        except (TypeError, ValueError) as exc:
            if path.is_file():
                raise IngestError(file, _IMAGING, f"invalid image attributes: {_short(exc)}") from None
            skipped += 1
            continue
        files.append(entry)
        frames.extend(file_frames)
    if not files:
        raise IngestError(
            path, _IMAGING,
            f"folder holds no DICOM image ({len(candidates)} DICOM-like file(s), {no_pixels} without pixel data, "
            f"{skipped} other file(s) skipped)",
        )

    n_before = len(frames)
    if index_time is not None:
        frames, _ = keep_available(frames, index_time, time_of=lambda f: f.time)
    dropped_late = n_before - len(frames)
    if not frames:
        logger.info("imaging: all %d slice(s) of %s were acquired after the index time", n_before, path.name)
        return None

    counts = Counter(files[f.file].series_uid for f in frames)
    uids = sorted(counts)
    if series_rule == "first_uid":
        chosen = uids[0]
    else:
        chosen = min(uids, key=lambda uid: (-counts[uid], uid))
    frames = [f for f in frames if files[f.file].series_uid == chosen]
    series_files = sorted({f.file for f in frames})
    remap = {old: new for new, old in enumerate(series_files)}
    files = [files[i] for i in series_files]
    for f in frames:
        f.file = remap[f.file]

    first = files[0].ds
    modality = (_first(first, "Modality") or "OT").upper()
    if len(frames) == 1 or modality in _PROJECTION_MODALITIES:
        # Projection images are separate views (of any size), not slices of one volume.
        frames = sorted(frames, key=lambda f: _stored_order(f, files))
        geometry_warnings, z_spacing = [], _fallback_spacing(first)
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
        warnings_out.append(f"{dropped_late} slice(s) acquired after the index time were dropped")
    info: dict[str, Any] = {
        "study_uid": _first(first, "StudyInstanceUID") or None,
        "series_uid": chosen or None,
        "series_rule": series_rule,
        "n_series": len(uids),
        "n_files": len(files),
        "n_skipped_files": skipped + no_pixels,
        "n_dropped_after_index": dropped_late,
        "transfer_syntax": syntaxes[0] if len(syntaxes) == 1 else (syntaxes or None),
        "transfer_syntax_name": syntax_names[0] if len(syntax_names) == 1 else (syntax_names or None),
        "photometric": str(first.get("PhotometricInterpretation", "")),
        "geometry_warnings": geometry_warnings,
    }
    if len(uids) > 1:
        warnings_out.append(f"folder holds {len(uids)} series; kept {chosen} by the rule {series_rule!r}")
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
    if any(f.position is None or f.orientation is None for f in frames):
        if len(files) > 1:  # frames of one multi-frame file keep their stored order silently
            notes.append("slices have no ImagePositionPatient/ImageOrientationPatient; ordered by InstanceNumber")
        return sorted(frames, key=lambda f: _stored_order(f, files)), notes, fallback

    normal = np.cross(frames[0].orientation[:3], frames[0].orientation[3:])
    positions = np.array([float(f.position @ normal) for f in frames])
    order = np.argsort(positions, kind="stable")
    ordered = [frames[i] for i in order]
    positions = positions[order]
    keep = np.ones(len(ordered), dtype=bool)
    keep[1:] = np.diff(positions) > _DUPLICATE_MM
    if not keep.all():
        notes.append(f"{int((~keep).sum())} slice(s) repeat a position already present and were dropped")
        ordered = [f for f, k in zip(ordered, keep) if k]
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


# ----------------------------------------------------------------------------- NIfTI


def load_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float, float], list[str]]:
    """Read a NIfTI file with MONAI's nibabel reader as float32 ``(D, H, W)`` = voxel axes (k, j, i).

    ``NibabelReader`` is used directly rather than through ``LoadImage``, which would also
    set up every other reader (and warn about GPU codecs) for each file.

    Returns:
        ``(values, spacing (z, y, x) in mm, warnings)``; a 2D image has ``D == 1``.

    Raises:
        IngestError: nibabel cannot read it.

    Example:
        >>> values, spacing, _ = load_nifti(Path("brain.nii.gz"))  # doctest: +SKIP
    """
    from monai.data import NibabelReader

    reader = NibabelReader()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array, meta = reader.get_data(reader.read(str(path)))
    except Exception as exc:
        raise IngestError(path, _IMAGING, f"not a readable NIfTI file: {_short(exc)}") from None
    array = np.asarray(array, dtype=np.float32)
    affine = np.asarray(meta.get("affine", np.eye(4)), dtype=np.float64)
    notes = []
    if array.ndim > 3:
        extra = int(np.prod(array.shape[3:]))
        if extra > 1:
            notes.append(f"NIfTI holds {extra} volumes (time or channels); kept the first")
        array = array.reshape(*array.shape[:3], -1)[..., 0]
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or min(array.shape) < 1:
        raise IngestError(path, _IMAGING, f"unexpected NIfTI shape {tuple(array.shape)}")
    zooms = np.linalg.norm(affine[:3, :3], axis=0)  # voxel size along i, j, k
    zooms = np.where(np.isfinite(zooms) & (zooms > 0), zooms, 1.0)
    values = np.ascontiguousarray(array.transpose(2, 1, 0))  # (k, j, i) = (D, H, W)
    return values, (float(zooms[2]), float(zooms[1]), float(zooms[0])), notes


# -------------------------------------------------------------- resizing and windowing


def _interp_mode(source: Sequence[int], target: Sequence[int]) -> str:
    if all(t <= s for s, t in zip(source, target)):
        return "area"
    return {1: "linear", 2: "bilinear", 3: "trilinear"}[len(source)]


def _shrinks(source: Sequence[int], target: Sequence[int]) -> bool:
    return tuple(source) != tuple(target) and all(t <= s for s, t in zip(source, target))


def _to_numpy(tensor: "torch.Tensor") -> np.ndarray:
    plain = tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor
    return plain.detach().cpu().numpy()


def _area_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-average one 2D image down to ``size`` (OpenCV ``INTER_AREA``), as float32."""
    import cv2

    return cv2.resize(np.asarray(image, dtype=np.float32), (size[1], size[0]), interpolation=cv2.INTER_AREA)


def resize_in_plane(slices: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize ``(N, H, W)`` slices to ``(N, h, w)``.

    Shrinking averages areas slice by slice with OpenCV's ``INTER_AREA`` (the same
    values as MONAI ``Resize(mode="area")`` for integer factors, and about 3x faster on
    CPU, which matters for 512x512 CT); growing, or shrinking one axis while growing the
    other, uses MONAI ``Resize`` (bilinear, anti-aliased where it shrinks).

    Example:
        >>> resize_in_plane(np.ones((2, 8, 8), np.float32), (4, 4)).shape
        (2, 4, 4)
    """
    if tuple(slices.shape[1:]) == tuple(size):
        return slices
    if _shrinks(slices.shape[1:], size):
        out = np.empty((slices.shape[0], *size), dtype=np.float32)
        for i, image in enumerate(slices):
            out[i] = _area_resize(image, size)
        return out
    import torch
    from monai.transforms import Resize

    anti_alias = any(t < s for s, t in zip(slices.shape[1:], size))
    tensor = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))
    return _to_numpy(Resize(size, mode="bilinear", anti_aliasing=anti_alias)(tensor))


def _resize_volume(values: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    import torch
    from monai.transforms import Resize

    if tuple(values.shape) == tuple(shape):
        return values
    mode = _interp_mode(values.shape, shape)
    anti_alias = mode != "area" and any(t < s for s, t in zip(values.shape, shape))
    resized = Resize(shape, mode=mode, anti_aliasing=anti_alias)(torch.from_numpy(values)[None])
    return _to_numpy(resized)[0]


def window_bounds(values: np.ndarray, modality: str | None, config: ImagingConfig) -> tuple[float, float, str]:
    """The ``(lower, upper)`` intensity window for an image, and how it was chosen.

    Example:
        >>> window_bounds(np.zeros(3), "CT", ImagingConfig())
        (-1000.0, 1000.0, 'preset CT')
    """
    key = modality if modality and modality in config.windows else "default"
    preset = config.windows.get(key)
    if preset is not None and preset[1] > preset[0]:
        return float(preset[0]), float(preset[1]), f"preset {key}"
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0, "empty"
    lower, upper = np.percentile(finite, config.percentiles)
    if not upper > lower:
        lower, upper = float(finite.min()), float(finite.max())
        if not upper > lower:
            upper = lower + 1.0
    return float(lower), float(upper), f"percentiles {config.percentiles[0]}-{config.percentiles[1]}"


def apply_window(values: np.ndarray, lower: float, upper: float, invert: bool = False) -> np.ndarray:
    """Map ``[lower, upper]`` to ``[0, 1]`` (clipped, NaN to 0), in place; invert for MONOCHROME1.

    Example:
        >>> apply_window(np.array([-2000.0, 0.0, 2000.0], np.float32), -1000.0, 1000.0).tolist()
        [0.0, 0.5, 1.0]
    """
    values -= lower
    values *= 1.0 / (upper - lower)
    np.clip(values, 0.0, 1.0, out=values)
    np.nan_to_num(values, copy=False, nan=0.0)
    if invert:
        np.subtract(1.0, values, out=values)
    return values


@dataclass
class _Fitted:
    volume: np.ndarray  # (D, H, W) float32 in [0, 1]
    slice_mask: np.ndarray  # (D,) bool
    voxel_spacing: tuple[float, float, float]


def _in_plane_target(
    native: tuple[int, int, int], spacing: tuple[float, float, float], config: ImagingConfig, is_2d: bool
) -> tuple[int, int]:
    _, height, width = config.spatial_size
    if is_2d or config.spacing_mm is None:
        return height, width
    _, rows, columns = native
    return (
        max(1, round(rows * spacing[1] / config.spacing_mm[1])),
        max(1, round(columns * spacing[2] / config.spacing_mm[2])),
    )


def _fit_volume(
    windowed: np.ndarray,
    spacing: tuple[float, float, float],
    native: tuple[int, int, int],
    config: ImagingConfig,
    is_2d: bool,
) -> tuple[_Fitted, list[str]]:
    """Place windowed ``(N, h, w)`` slices (already at their in-plane target) into ``spatial_size``."""
    depth, height, width = config.spatial_size
    n, rows, columns = native
    notes: list[str] = []
    if is_2d:
        keep = min(n, depth)
        if n > depth:
            notes.append(f"{n} 2D images but the volume holds {depth} slices; kept the first {depth}")
        volume = np.zeros((depth, height, width), dtype=np.float32)
        volume[:keep] = windowed[:keep]
        mask = np.zeros(depth, dtype=bool)
        mask[:keep] = True
        return _Fitted(volume, mask, (spacing[0], spacing[1] * rows / height, spacing[2] * columns / width)), notes
    if config.spacing_mm is None:
        volume = _resize_volume(windowed, (depth, height, width))
        out_spacing = (spacing[0] * n / depth, spacing[1] * rows / height, spacing[2] * columns / width)
        return _Fitted(volume.astype(np.float32, copy=False), np.ones(depth, dtype=bool), out_spacing), notes

    import torch
    from monai.transforms import ResizeWithPadOrCrop

    d = max(1, round(n * spacing[0] / config.spacing_mm[0]))
    resampled = _resize_volume(windowed, (d, windowed.shape[1], windowed.shape[2]))
    fit = ResizeWithPadOrCrop((depth, height, width), mode="constant", value=0.0)
    volume = _to_numpy(fit(torch.from_numpy(np.ascontiguousarray(resampled))[None]))[0]
    # The same pad/crop along D applied to ones tells which output slices hold data.
    real = _to_numpy(ResizeWithPadOrCrop((depth, 1, 1))(torch.ones((1, d, 1, 1))))[0, :, 0, 0] > 0.5
    if d > depth or resampled.shape[1] > height or resampled.shape[2] > width:
        notes.append(
            f"resampled volume {d}x{resampled.shape[1]}x{resampled.shape[2]} at {tuple(config.spacing_mm)} mm "
            f"was centre-cropped to {depth}x{height}x{width}"
        )
    out_spacing = (
        n * spacing[0] / d,
        rows * spacing[1] / resampled.shape[1],
        columns * spacing[2] / resampled.shape[2],
    )
    return _Fitted(volume.astype(np.float32, copy=False), real, out_spacing), notes


# --------------------------------------------------------------------------- ingestor


class ImagingTensorizer(ArrayTensorizer):
    """``volume`` float32 ``(D, H, W)`` in [0, 1] and ``slice_mask`` bool ``(D,)``."""

    modality = Modality.IMAGING

    def spec(self) -> ArraySpec:
        depth, height, width = self.config.imaging.spatial_size
        return {"volume": ((depth, height, width), "float32"), "slice_mask": ((depth,), "bool")}


@register_ingestor
class ImagingIngestor(Ingestor):
    """Reads a DICOM file, a DICOM series folder or a NIfTI file (see the module docstring).

    Example:
        >>> reader = ImagingIngestor(IngestConfig())
        >>> reader.tensorizer().spec()["volume"]
        ((32, 64, 64), 'float32')
    """

    modality = Modality.IMAGING
    tensorizer_class = ImagingTensorizer

    def read(self, request: IngestRequest) -> ModalityRecord | None:
        path = Path(request.paths[Modality.IMAGING])
        config = self.config.imaging
        if not path.exists():
            raise IngestError(path, _IMAGING, "no such file or folder")
        if is_nifti(path):
            return self._read_nifti(path, config)
        series = load_series(path, index_time=request.index_time, series_rule=config.series_rule)
        if series is None:
            return None
        native = series.shape
        in_plane = _in_plane_target(native, series.spacing, config, series.is_2d)
        values = series.values(in_plane)
        lower, upper, how = window_bounds(values, series.modality, config)
        windowed = apply_window(values, lower, upper, invert=series.monochrome1)
        fitted, notes = _fit_volume(windowed, series.spacing, native, config, series.is_2d)
        record_warnings = series.warnings + notes
        if config.spacing_mm is not None and not series.is_2d and not series.pixel_spacing_known:
            record_warnings.append("no PixelSpacing in the files: 1 mm assumed for resampling")
        meta = {
            **series.info,
            "source_format": "dicom",
            "modality": series.modality,
            "kind": "2d" if series.is_2d else "3d",
            "n_slices": native[0],
            "native_shape": list(native),
            "spacing_mm": list(series.spacing),
            "pixel_spacing_known": series.pixel_spacing_known,
            "orientation": list(series.orientation) if series.orientation else None,
            "origin_mm": list(series.origin) if series.origin else None,
            "voxel_spacing_mm": [float(v) for v in fitted.voxel_spacing],
            "window": [lower, upper],
            "window_rule": how,
            "warnings": record_warnings,
        }
        for note in record_warnings:
            logger.info("imaging %s: %s", path.name, note)
        return ModalityRecord(
            modality=Modality.IMAGING,
            source=str(path),
            arrays={"volume": fitted.volume, "slice_mask": fitted.slice_mask},
            time=series.time,
            meta=meta,
            warnings=record_warnings,
        )

    def _read_nifti(self, path: Path, config: ImagingConfig) -> ModalityRecord:
        values, spacing, notes = load_nifti(path)
        native = tuple(int(v) for v in values.shape)
        is_2d = native[0] == 1
        in_plane = _in_plane_target(native, spacing, config, is_2d)  # type: ignore[arg-type]
        values = resize_in_plane(values, in_plane)
        window_key = config.nifti_modality
        lower, upper, how = window_bounds(values, window_key, config)
        windowed = apply_window(np.array(values, dtype=np.float32, copy=True), lower, upper)
        fitted, more = _fit_volume(windowed, spacing, native, config, is_2d)  # type: ignore[arg-type]
        record_warnings = notes + more
        meta = {
            "source_format": "nifti",
            "modality": window_key,
            "kind": "2d" if is_2d else "3d",
            "n_slices": native[0],
            "native_shape": list(native),
            "spacing_mm": list(spacing),
            "voxel_spacing_mm": [float(v) for v in fitted.voxel_spacing],
            "window": [lower, upper],
            "window_rule": how,
            "warnings": record_warnings,
        }
        return ModalityRecord(
            modality=Modality.IMAGING,
            source=str(path),
            arrays={"volume": fitted.volume, "slice_mask": fitted.slice_mask},
            time=None,
            meta=meta,
            warnings=record_warnings,
        )

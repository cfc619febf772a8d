"""Imaging ingestor: DICOM files and series, and NIfTI volumes, into fixed-shape volumes.

Reading one DICOM file (decoding, transfer syntaxes, acquisition times) is
:mod:`meddx.ingest.dicom_io`; assembling a series is :mod:`meddx.ingest.dicom_series`;
resizing is :mod:`meddx.ingest.image_resize`. This module reads NIfTI files, windows and
fits the values into the configured volume, and registers :class:`ImagingIngestor`.

What the ``imaging`` column may name:

* a DICOM file (Part 10, also without the 128-byte preamble), single- or multi-frame;
* a folder holding a DICOM series. Files that are not DICOM, and DICOM files without
  pixel data (DICOMDIR, SR, RT plans...), are skipped. When the folder holds several
  series, ``ImagingConfig.series_rule`` picks one: ``most_slices`` (default: the series
  with the most slices, ties to the smallest SeriesInstanceUID) or ``first_uid`` (the
  smallest SeriesInstanceUID). ``record.meta`` says which one and how many there were.
  A series is one SeriesInstanceUID within one StudyInstanceUID and FrameOfReferenceUID:
  two series that share a SeriesInstanceUID but not those are kept apart, never merged.
  A folder holding images of more than one PatientID is an error (another patient's
  series mixed in), so the rule never picks across patients; the IDs are never printed;
* ``dicomweb:studies/<uid>[/series/<uid>]``: a study or series on the configured DICOMweb
  server (``IngestConfig.dicomweb``). QIDO-RS lists the study's image series, ordered by the
  same ``series_rule`` (instances counted as slices); WADO-RS retrieves the first one acquired
  by the index time into the series store (:mod:`meddx.dicomweb.store`, under the ingest cache),
  which is then read exactly as a folder, so the tensors equal those of the same files on
  disk. A stored series is never fetched again. Errors (server unreachable, HTTP 404, 401)
  are an :class:`IngestError` for that row naming the reference, never the credentials;
* a NIfTI file (``.nii``, ``.nii.gz``), read with MONAI's ``NibabelReader``.
  Voxel axes (i, j, k) become (W, H, D); NIfTI files are undated and use the window named
  by ``ImagingConfig.nifti_modality``.

**Output record** (shapes from :class:`~meddx.config.ImagingConfig`, ``spatial_size = (D, H, W)``):

* ``volume``: float32 ``(D, H, W)`` in [0, 1];
* ``slice_mask``: bool ``(D,)``, True where a slice holds image data.

**Series assembly** (:mod:`meddx.ingest.dicom_series`). Slices are sorted by their position
along the slice normal, never by file name; duplicate positions, missing slices and uneven
spacing are reported in ``record.warnings`` and ``meta["geometry_warnings"]``. Slices of
differing Rows/Columns or orientation in one 3D series make an :class:`IngestError`.

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

**Time and leakage.** A slice is placed in time by its acquisition, else series, else
study date and time (:func:`meddx.dicom_times.dicom_time`). DICOM times carry no zone:
``TimezoneOffsetFromUTC`` gives it when present, else ``IngestConfig.site_timezone``, else
they are read as UTC (``meta["time_zone"]`` says which); a date without a time is the end
of that day. A series is dated as a whole, by its last slice; undated slices of a dated
series take its time, and a series acquired after the index time is dropped whole (before
one is chosen) via :func:`meddx.records.keep_available`, never kept in part
(``meta["n_series_dropped_after_index"]``). When no series remains the ingestor returns
``None`` (the modality is missing for that row), it does not raise. ``record.time`` is the
kept series' time, or None when undated.

**Privacy.** ``meta`` holds only StudyInstanceUID, SeriesInstanceUID, Modality, geometry,
counts, transfer syntax and warnings; names, IDs and birth dates are never read into
meta, warnings or logs, and pydicom's value warnings (which may quote element values)
are silenced while reading.

**Errors.** Every failure is an :class:`~meddx.errors.IngestError` naming the file and the
reason: not a DICOM file, no pixel data, truncated pixel data, a transfer syntax no
installed plugin decodes (the message names the syntax and the plugins that would), an
inconsistent series, several patients in one folder, a path that is not a regular file
or folder (a FIFO, a device), a file over ``ImagingConfig.max_file_mb``.

Example:
    >>> from meddx.ingest.base import IngestRequest
    >>> from meddx.records import Modality, parse_time
    >>> reader = ImagingIngestor()
    >>> record = reader.read(IngestRequest("P0001", parse_time("2024-12-03T08:27:00Z"),
    ...                                    {Modality.IMAGING: Path("sample_data/patients/P0001/ct")}))
    >>> record.arrays["volume"].shape, record.arrays["slice_mask"].shape  # IngestConfig().imaging.spatial_size
    ((32, 64, 64), (32,))
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from meddx.config import ImagingConfig, IngestConfig
from meddx.dicomweb.ref import DicomWebRef
from meddx.errors import IngestError, short_reason
from meddx.fhirclient.ref import FhirRef
from meddx.ingest.base import ArrayTensorizer, Ingestor, IngestRequest, register_ingestor
from meddx.ingest.dicom_series import DicomSeries, load_series
from meddx.ingest.file_checks import check_source
from meddx.ingest.image_resize import resize_in_plane, resize_volume, tensor_to_numpy
from meddx.records import Modality, ModalityRecord
from meddx.specs import ArrayField, ArraySpec

if TYPE_CHECKING:
    from meddx.dicomweb.store import SeriesStore

logger = logging.getLogger(__name__)

_IMAGING = Modality.IMAGING.value
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


# ----------------------------------------------------------------------------- NIfTI


def is_nifti(path: Path) -> bool:
    """Whether ``path`` names a NIfTI file (by suffix)."""
    return path.is_file() and path.name.lower().endswith(_NIFTI_SUFFIXES)


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
        raise IngestError(path, _IMAGING, f"not a readable NIfTI file: {short_reason(exc)}") from None
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


# -------------------------------------------------------------- windowing and fitting


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
        volume = resize_volume(windowed, (depth, height, width))
        out_spacing = (spacing[0] * n / depth, spacing[1] * rows / height, spacing[2] * columns / width)
        return _Fitted(volume.astype(np.float32, copy=False), np.ones(depth, dtype=bool), out_spacing), notes

    import torch
    from monai.transforms import ResizeWithPadOrCrop

    d = max(1, round(n * spacing[0] / config.spacing_mm[0]))
    resampled = resize_volume(windowed, (d, windowed.shape[1], windowed.shape[2]))
    fit = ResizeWithPadOrCrop((depth, height, width), mode="constant", value=0.0)
    volume = tensor_to_numpy(fit(torch.from_numpy(np.ascontiguousarray(resampled))[None]))[0]
    # The same pad/crop along D applied to ones tells which output slices hold data.
    real = tensor_to_numpy(ResizeWithPadOrCrop((depth, 1, 1))(torch.ones((1, d, 1, 1))))[0, :, 0, 0] > 0.5
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
        return {
            "volume": ArrayField((depth, height, width), "float32", "values"),
            "slice_mask": ArrayField((depth,), "bool", "mask", of=("volume",)),
        }


@register_ingestor
class ImagingIngestor(Ingestor):
    """Reads a DICOM file, a DICOM series folder or a NIfTI file (see the module docstring).

    Example:
        >>> reader = ImagingIngestor(IngestConfig())
        >>> reader.tensorizer().spec()["volume"].shape
        (32, 64, 64)
    """

    modality = Modality.IMAGING
    tensorizer_class = ImagingTensorizer

    def __init__(self, config: IngestConfig | None = None):
        super().__init__(config)
        self._store: SeriesStore | None = None  # made on the first dicomweb: row

    def wants(self, request: IngestRequest) -> bool:
        return Modality.IMAGING in request.paths or Modality.IMAGING in request.remote

    def sources(self, request: IngestRequest) -> Sequence[Path | DicomWebRef | FhirRef]:
        if Modality.IMAGING in request.remote:
            return [request.remote[Modality.IMAGING]]
        return super().sources(request)

    def read(self, request: IngestRequest) -> ModalityRecord | None:
        config = self.config.imaging
        if Modality.IMAGING in request.remote:
            return self._read_dicomweb(cast(DicomWebRef, request.remote[Modality.IMAGING]), request)
        path = Path(request.paths[Modality.IMAGING])
        check_source(
            path,
            _IMAGING,
            max_file_mb=config.max_file_mb,
            folder_ok=True,
            expected="a DICOM file or series folder, or a NIfTI file",
        )
        if is_nifti(path):
            return self._read_nifti(path, config)
        series = load_series(
            path,
            index_time=request.index_time,
            series_rule=config.series_rule,
            site_zone=self.config.site_zone(),
            max_file_mb=config.max_file_mb,
        )
        if series is None:
            return None
        return self._record(series, str(path), path.name)

    def _read_dicomweb(self, ref: DicomWebRef, request: IngestRequest) -> ModalityRecord | None:
        """A study or series on the PACS: retrieved into the series store (once), then read as a folder.

        The candidates are the study's image series in ``series_rule`` order (or the one series
        named); the first acquired by the index time is kept, as the rule keeps for a folder.
        """
        if self._store is None:
            from meddx.dicomweb.store import SeriesStore

            self._store = SeriesStore(self.config.dicomweb)
        candidates = self._store.candidates(ref, self.config.imaging.series_rule)
        for tried, series_uid in enumerate(candidates):
            folder = self._store.fetch(ref.study_uid, series_uid, patient_id=request.patient_id)
            series = load_series(
                folder,
                index_time=request.index_time,
                series_rule=self.config.imaging.series_rule,
                site_zone=self.config.site_zone(),
            )
            if series is None:  # acquired after the index time: the rule's next choice
                continue
            if tried:
                series.warnings.append(f"{tried} series of the study acquired after the index time passed over")
            if len(candidates) > 1:
                series.warnings.append(
                    f"study holds {len(candidates)} image series; kept {series_uid} by the rule"
                    f" {self.config.imaging.series_rule!r}"
                )
            record = self._record(series, str(ref), f"series {series_uid}")
            record.meta["dicomweb"] = {"n_image_series": len(candidates), "n_passed_over": tried}
            return record
        return None

    def _record(self, series: DicomSeries, source: str, name: str) -> ModalityRecord:
        """Window and fit an assembled series into the configured volume."""
        config = self.config.imaging
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
            logger.info("imaging %s: %s", name, note)
        return ModalityRecord(
            modality=Modality.IMAGING,
            source=source,
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

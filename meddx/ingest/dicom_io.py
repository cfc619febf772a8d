"""Reading one DICOM file: parsing, pixel decoding, and when the image was acquired.

Shared by the imaging ingestor (:mod:`meddx.ingest.dicom`, through
:mod:`meddx.ingest.dicom_series`) and the multi-frame DICOM path of the video ingestor
(:mod:`meddx.ingest.video`).

* :func:`read_dicom` reads a Part 10 file, also without the 128-byte preamble; the pixel
  data is kept but not decoded.
* :func:`decode_frames` decodes uncompressed and compressed transfer syntaxes (RLE, JPEG
  baseline/extended/lossless, JPEG-LS, JPEG 2000 via the pylibjpeg plugins), also only
  some frames of a compressed multi-frame file. A syntax that no installed plugin decodes
  gives an :class:`~meddx.errors.IngestError` naming the syntax and the plugins that would.
* :func:`quiet_pydicom` silences pydicom's value warnings and log records while meddx
  reads: they may quote element values, hence patient data.

Times (``dicom_time``, ``latest_time``, ``time_zone_rule``) are read by :mod:`meddx.dicom_times`,
which the DICOMweb query shares.
"""

from __future__ import annotations

import logging
import os
import stat
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from meddx.errors import IngestError, short_reason
from meddx.ingest.file_checks import check_source
from meddx.records import Modality

_IMAGING = Modality.IMAGING.value
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

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


def looks_like_dicom(path: Path) -> bool:
    """Cheap check of the first bytes: a ``DICM`` prefix, or a DICOM tag where a preamble-less file starts.

    The one DICOM sniffing rule of meddx: the imaging reader uses it to pick the DICOM
    files of a folder, the video reader to tell a DICOM cine from a video file. Only 132
    bytes are read, and only from a regular file (never from a FIFO or a device).

    Example:
        >>> looks_like_dicom(Path("sample_data/patients/P0001/note.txt"))
        False
        >>> looks_like_dicom(sorted(Path("sample_data/patients/P0001/ct").iterdir())[0])
        True
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
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


def read_dicom(path: Path, modality: str = _IMAGING, max_file_mb: float | None = None) -> Dataset:
    """Read one DICOM file, also without the preamble; pixel data is kept but not decoded.

    Args:
        path: the file.
        modality: the meddx modality reading it (named in errors).
        max_file_mb: refuse a larger file before reading it (None: no limit).

    Raises:
        IngestError: not a regular file, over the size limit, not a DICOM file, or unreadable.

    Example:
        >>> ds = read_dicom(sorted(Path("sample_data/patients/P0001/ct").iterdir())[0])
        >>> ds.Modality
        'CT'
    """
    path = check_source(path, modality, max_file_mb=max_file_mb, expected="a DICOM file")
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
        raise IngestError(path, modality, f"not a readable DICOM file: {short_reason(exc)}") from None


def has_pixels(ds: Dataset) -> bool:
    """Whether the dataset holds (float, double or integer) pixel data."""
    return any(kw in ds for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def transfer_syntax(ds: Dataset) -> UID | None:
    """The dataset's transfer syntax UID, or None when the file meta lacks it."""
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(uid)) if uid else None


def decode_frames(ds: Dataset, path: Path, modality: str = _IMAGING, frames: Sequence[int] | None = None) -> np.ndarray:
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
        >>> path = sorted(Path("sample_data/patients/P0001/ct").iterdir())[0]
        >>> decode_frames(read_dicom(path), path).shape  # (frames, rows, columns)
        (1, 48, 48)
    """
    if not has_pixels(ds):
        sop = ds.get("SOPClassUID")
        what = f" ({UID(str(sop)).name})" if sop else ""
        raise IngestError(path, modality, f"holds no pixel data{what}; it is not an image (or the file is truncated)")
    n_frames = frame_count(ds)
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
            raise IngestError(path, modality, f"palette colour lookup failed: {short_reason(exc)}") from None
    if array.ndim == 2:  # a single frame that came back without its frame axis
        array = array[None]
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[-1] != 3):
        raise IngestError(path, modality, _shape_mismatch(ds, array.shape))
    return array


def _shape_mismatch(ds: Dataset, shape: tuple[int, ...]) -> str:
    """Why decoded pixels have a shape meddx cannot use: what was found, what the header implies."""
    rows, columns = ds.get("Rows", "?"), ds.get("Columns", "?")
    samples = ds.get("SamplesPerPixel", 1)
    expected = f"(frames, {rows}, {columns})" if str(samples) == "1" else f"(frames, {rows}, {columns}, 3)"
    return (
        f"pixel data decodes to an array of shape {tuple(shape)}, but meddx needs {expected}: "
        f"NumberOfFrames={frame_count(ds)}, Rows={rows}, Columns={columns}, SamplesPerPixel={samples}, "
        f"PhotometricInterpretation={ds.get('PhotometricInterpretation', '?')}; the header does not match the pixels"
    )


def _decode_failure(uid: UID | None, exc: BaseException) -> str:
    text = short_reason(exc)
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


def frame_count(ds: Dataset) -> int:
    """``NumberOfFrames`` of a dataset; 1 when absent or unreadable."""
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

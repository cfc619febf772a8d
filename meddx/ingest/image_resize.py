"""Resizing image stacks: OpenCV area averaging to shrink, MONAI ``Resize`` otherwise.

Used while a DICOM series is decoded (:meth:`meddx.ingest.dicom_series.DicomSeries.values`
shrinks slice by slice, so a 512x512 series never exists as a float volume) and when the
imaging ingestor fits a volume to its configured shape (:mod:`meddx.ingest.dicom`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def _interp_mode(source: Sequence[int], target: Sequence[int]) -> str:
    if all(t <= s for s, t in zip(source, target, strict=True)):
        return "area"
    return {1: "linear", 2: "bilinear", 3: "trilinear"}[len(source)]


def shrinks_to(source: Sequence[int], target: Sequence[int]) -> bool:
    """Whether ``target`` is a different shape no larger than ``source`` on every axis (area-average it)."""
    return tuple(source) != tuple(target) and all(t <= s for s, t in zip(source, target, strict=True))


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A (MONAI meta) tensor's values as a NumPy array on the CPU."""
    plain = tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor
    return plain.detach().cpu().numpy()


def area_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
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
    if shrinks_to(slices.shape[1:], size):
        out = np.empty((slices.shape[0], *size), dtype=np.float32)
        for i, image in enumerate(slices):
            out[i] = area_resize(image, size)
        return out
    import torch
    from monai.transforms import Resize

    anti_alias = any(t < s for s, t in zip(slices.shape[1:], size, strict=True))
    tensor = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))
    return tensor_to_numpy(Resize(size, mode="bilinear", anti_aliasing=anti_alias)(tensor))


def resize_volume(values: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Resize a ``(D, H, W)`` volume to ``shape`` with MONAI ``Resize`` (area when shrinking every axis)."""
    import torch
    from monai.transforms import Resize

    if tuple(values.shape) == tuple(shape):
        return values
    mode = _interp_mode(values.shape, shape)
    anti_alias = mode != "area" and any(t < s for s, t in zip(values.shape, shape, strict=True))
    resized = Resize(shape, mode=mode, anti_aliasing=anti_alias)(torch.from_numpy(values)[None])
    return tensor_to_numpy(resized)[0]

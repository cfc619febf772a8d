"""What every modality encoder shares: its output, role lookups in the array spec, masked pooling.

Encoders find their arrays by **role** (see :class:`~meddx.specs.ArrayField`), never by
name, so a custom reader with other array names works as long as it declares roles.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from torch import nn

from meddx.errors import ConfigError
from meddx.models.config import BackboneConfig
from meddx.records import Modality
from meddx.specs import ArrayField, ArraySpec


class EncoderOutput(NamedTuple):
    """A modality's tokens for the patients that have it.

    Attributes:
        tokens: float ``(P, T, D)``.
        token_mask: bool ``(P, T)``, True for real tokens.
        token_age_hours: float ``(P, T)``, hours before the index time of what each token shows.
    """

    tokens: torch.Tensor
    token_mask: torch.Tensor
    token_age_hours: torch.Tensor


def find_arrays(
    spec: ArraySpec, role: str, *, of: str | None = None, ndim: int | None = None, record_level: bool | None = None
) -> list[str]:
    """Names of the arrays with ``role`` (optionally describing ``of``, of ``ndim`` dims), in spec order.

    ``record_level`` True keeps only fields that describe the whole record (empty ``of``), False only
    those that describe some array.
    """
    names = []
    for name, field in spec.items():
        if field.role != role:
            continue
        if of is not None and of not in field.of:
            continue
        if ndim is not None and len(field.shape) != ndim:
            continue
        if record_level is not None and (not field.of) != record_level:
            continue
        names.append(name)
    return names


def find_one(modality: Modality, spec: ArraySpec, role: str, **where) -> str:
    """The single array with ``role`` (see :func:`find_arrays`); ConfigError when none or several."""
    names = find_arrays(spec, role, **where)
    if len(names) != 1:
        found = ", ".join(names) or "none"
        raise ConfigError(
            f"{modality} encoder needs exactly one array with role {role!r} {where or ''} in its spec, found {found}; "
            "declare roles in the reader's tensorizer spec"
        )
    return names[0]


def find_optional(spec: ArraySpec, role: str, **where) -> str | None:
    """The first array with ``role`` (see :func:`find_arrays`), or None."""
    names = find_arrays(spec, role, **where)
    return names[0] if names else None


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean of ``x`` over ``dim`` where ``mask`` is True (0 where nothing is); masked values never matter."""
    weight = mask.to(x.dtype)
    while weight.dim() < x.dim():
        weight = weight.unsqueeze(-1)
    total = torch.where(weight > 0, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim)
    return total / weight.sum(dim).clamp_min(1.0)


def average_pool(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``(N, C, [D,] H, W)`` averaged over ``factor``-wide cells (a ragged edge keeps its own cell).

    The imaging and video encoders' ``input_pool``: the network sees the same field of view at a
    lower resolution.
    """
    if factor == 1:
        return x
    axes = range(2, x.dim())
    if any(x.shape[axis] % factor for axis in axes):
        pool = nn.functional.avg_pool3d if x.dim() == 5 else nn.functional.avg_pool2d
        return pool(x, factor, ceil_mode=True)
    # Sums of strided views, one axis at a time: the same averages 2-2.5x faster than avg_pool3d/2d on
    # the CPU, where pooling the default volume was the imaging encoder's largest single operation.
    for axis in axes:
        views = [x[(slice(None),) * axis + (slice(offset, None, factor),)] for offset in range(factor)]
        x = views[0] + views[1]
        for view in views[2:]:
            x += view
    return x * (1.0 / factor ** len(axes))


def zero_where_not(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with masked-out entries set to 0 (``where``, so NaN or inf there cannot leak through).

    On the CPU, when nothing is masked out, ``x`` itself comes back: whole volumes and clips are
    the common case, and the copy (29 MB for a batch of 64 default volumes) bought nothing. (On a
    GPU, asking whether anything is masked would wait for the device, so the copy is made.)
    """
    if x.device.type == "cpu" and bool(mask.all()):
        return x
    while mask.dim() < x.dim():
        mask = mask.unsqueeze(-1)
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


class ModalityEncoder(nn.Module):
    """Base of the encoders: built from ``(config, spec)``; ``forward(arrays)`` gives :class:`EncoderOutput`.

    The spec is read once at construction (it sizes the layers and resolves array names by role);
    ``forward`` takes the modality's arrays of a batch, each ``(P, ...)``.
    """

    modality: ClassVar[Modality]
    # True where the encoder's heavy part (text model, imaging or video trunk) is frozen and its
    # outputs are cached, so that a row costs little from the second time it is seen.
    frozen: bool = False

    def __init__(self, config: BackboneConfig, spec: ArraySpec):
        super().__init__()
        self.d_model = config.d_model
        self.spec = dict(spec)
        self.record_age = find_optional(spec, "age_hours", record_level=True)

    def field(self, name: str) -> ArrayField:
        return self.spec[name]

    def record_age_hours(self, arrays: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """The record's age ``(P, 1)`` (0 when the spec has none), as ``like``'s dtype and device."""
        if self.record_age is None:
            return torch.zeros(like.shape[0], 1, dtype=torch.float32, device=like.device)
        return arrays[self.record_age].reshape(-1, 1).float()


def mask_like(mask: torch.Tensor, mask_axis: int, values: torch.Tensor) -> torch.Tensor:
    """A ``(P, ...)`` mask whose axes line up with ``values``' axes from ``mask_axis`` on, broadcast to them."""
    shape = [mask.shape[0]] + [1] * mask_axis + list(mask.shape[1:])
    shape += [1] * (values.dim() - len(shape))
    return mask.reshape(shape).expand_as(values)

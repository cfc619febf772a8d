"""What the arrays and tensors are: the modalities, array fields and tensor specs every layer shares.

These types sit at the bottom of meddx so that readers (``meddx.ingest``), the data path and
the models describe the same arrays without importing one another: a model encoder reads an
:class:`ArrayField` from here, not from the ingest package (which would load every reader).
Nothing heavy is imported: torch appears only in a type annotation.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Literal, NamedTuple

if TYPE_CHECKING:  # torch only names a dtype in TensorSpec; it is not imported at run time
    import torch


class Modality(str, Enum):
    """The six input modalities, in the fixed order of every presence mask."""

    IMAGING = "imaging"
    EHR = "ehr"
    NOTES = "notes"
    DEVICE_LOGS = "device_logs"
    AUDIO = "audio"
    VIDEO = "video"

    def __str__(self) -> str:
        return self.value


MODALITIES: tuple[Modality, ...] = tuple(Modality)


ArrayRole = Literal["values", "mask", "token_mask", "ids", "age_hours"]
ARRAY_ROLES: tuple[str, ...] = ("values", "mask", "token_mask", "ids", "age_hours")


class ArrayField(NamedTuple):
    """What one array of a modality is, so that encoders never hard-code array names.

    Attributes:
        shape: the fixed shape of one patient's array.
        dtype: numpy dtype name (``float32``, ``bool``, ``int64``).
        role: ``values`` (numbers to encode); ``mask`` (bool, True where the values in ``of`` were
            observed; its axes are the values' axes starting at ``axis``); ``token_mask`` (bool,
            True for real items/tokens of the arrays in ``of``, False for padding); ``ids``
            (int64 indices into a vocabulary of ``vocab_size`` rows, 0 = padding); ``age_hours``
            (float32 hours before the index time of the items of ``of``, or of the whole record when
            ``of`` is empty).
        of: the arrays a mask, token mask or age describes.
        axis: for masks, the first axis of the described array that the mask's axes line up with.
        vocab_size: for ids, the rows an embedding needs.

    Example:
        >>> ArrayField((8, 360), "bool", "mask", of=("values",)).role
        'mask'
    """

    shape: tuple[int, ...]
    dtype: str
    role: ArrayRole = "values"
    of: tuple[str, ...] = ()
    axis: int = 0
    vocab_size: int | None = None


ArraySpec = dict[str, ArrayField]  # array name -> what it is

# modality -> array name -> (shape, torch dtype) of one patient's tensor
TensorSpec = dict[Modality, dict[str, tuple[tuple[int, ...], "torch.dtype"]]]

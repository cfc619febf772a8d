"""Device-log encoder (PatchTST style): each channel cut into patches; each patch with its mask is a token.

Arrays by role: the 2-D ``values`` grid ``(channels, steps)`` and its ``mask``. A patch is a token
when any of its steps was observed; unobserved steps are zeroed and the mask is an input, so the
model knows a gap from a zero. Tokens carry the record's age; where a patch lies inside the
look-back window is in its position embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from meddx.models.config import BackboneConfig
from meddx.models.encoders.base import EncoderOutput, ModalityEncoder, find_one, mask_like, zero_where_not
from meddx.records import Modality
from meddx.specs import ArraySpec


class DeviceLogEncoder(ModalityEncoder):
    """Channel grid ``(P, C, T)`` with its mask → ``(P, C * ceil(T / patch_length), d_model)`` tokens.

    Example:
        >>> from meddx.specs import ArrayField
        >>> spec = {"values": ArrayField((2, 60), "float32"),
        ...         "mask": ArrayField((2, 60), "bool", "mask", of=("values",))}
        >>> encoder = DeviceLogEncoder(BackboneConfig(d_model=16, n_heads=2, device_logs={"patch_length": 30}), spec)
        >>> out = encoder({"values": torch.zeros(3, 2, 60), "mask": torch.ones(3, 2, 60, dtype=torch.bool)})
        >>> tuple(out.tokens.shape)  # 2 channels x 2 patches of 30 steps
        (3, 4, 16)
    """

    modality = Modality.DEVICE_LOGS

    def __init__(self, config: BackboneConfig, spec: ArraySpec):
        super().__init__(config, spec)
        self.values = find_one(self.modality, spec, "values", ndim=2)
        self.mask = find_one(self.modality, spec, "mask", of=self.values)
        channels, steps = self.field(self.values).shape
        self.patch = min(config.device_logs.patch_length, steps)
        self.n_patches = math.ceil(steps / self.patch)
        self.embed = nn.Linear(2 * self.patch, config.d_model)  # values and mask of one patch
        self.channel_embedding = nn.Parameter(torch.zeros(channels, 1, config.d_model))
        self.patch_embedding = nn.Parameter(torch.zeros(1, self.n_patches, config.d_model))

    def forward(self, arrays: dict[str, torch.Tensor]) -> EncoderOutput:
        values = arrays[self.values].float()  # (P, C, T)
        mask = mask_like(arrays[self.mask].bool(), self.field(self.mask).axis, values)
        values = zero_where_not(values, mask)
        pad = self.n_patches * self.patch - values.shape[-1]
        values = F.pad(values, (0, pad))  # (P, C, N*p)
        observed = F.pad(mask, (0, pad)).float()
        P, C, _ = values.shape
        patches = torch.cat(
            [values.reshape(P, C, self.n_patches, self.patch), observed.reshape(P, C, self.n_patches, self.patch)],
            dim=-1,
        )  # (P, C, N, 2p)
        tokens = self.embed(patches) + self.channel_embedding + self.patch_embedding  # (P, C, N, D)
        token_mask = observed.reshape(P, C, self.n_patches, self.patch).amax(dim=-1) > 0  # (P, C, N)
        T = C * self.n_patches
        age = self.record_age_hours(arrays, values).expand(P, T)
        return EncoderOutput(tokens.reshape(P, T, -1), token_mask.reshape(P, T), age)

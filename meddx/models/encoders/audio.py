"""Audio encoder (AST style): the log-mel spectrogram cut into patches; each patch is a token.

Arrays by role: the 2-D ``values`` ``(mels, frames)`` and its frame ``mask`` (over axis 1). Frames
past the end of the recording are zeroed; a patch is a token when any of its frames is real.
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


class AudioEncoder(ModalityEncoder):
    """Log-mel ``(P, M, T)`` with its frame mask → ``(P, ceil(M/pm) * ceil(T/pf), d_model)`` tokens.

    Example:
        >>> from meddx.specs import ArrayField
        >>> spec = {"log_mel": ArrayField((16, 40), "float32"),
        ...         "frame_mask": ArrayField((40,), "bool", "mask", of=("log_mel",), axis=1)}
        >>> encoder = AudioEncoder(BackboneConfig(d_model=16, n_heads=2), spec)
        >>> out = encoder({"log_mel": torch.zeros(1, 16, 40), "frame_mask": torch.ones(1, 40, dtype=torch.bool)})
        >>> tuple(out.tokens.shape)  # 2 mel bands x 3 time patches
        (1, 6, 16)
    """

    modality = Modality.AUDIO

    def __init__(self, config: BackboneConfig, spec: ArraySpec):
        super().__init__(config, spec)
        self.values = find_one(self.modality, spec, "values", ndim=2)
        self.mask = find_one(self.modality, spec, "mask", of=self.values)
        mels, frames = self.field(self.values).shape
        self.pm = min(config.audio.patch_mels, mels)
        self.pf = min(config.audio.patch_frames, frames)
        self.n_mel_patches, self.n_time_patches = math.ceil(mels / self.pm), math.ceil(frames / self.pf)
        self.embed = nn.Linear(self.pm * self.pf + self.pf, config.d_model)  # values and the patch's frame mask
        self.mel_embedding = nn.Parameter(torch.zeros(self.n_mel_patches, 1, config.d_model))
        self.time_embedding = nn.Parameter(torch.zeros(1, self.n_time_patches, config.d_model))

    def forward(self, arrays: dict[str, torch.Tensor]) -> EncoderOutput:
        values = arrays[self.values].float()  # (P, M, T)
        observed = mask_like(arrays[self.mask].bool(), self.field(self.mask).axis, values)  # (P, M, T)
        values = zero_where_not(values, observed)
        P = values.shape[0]
        nm, nt, pm, pf = self.n_mel_patches, self.n_time_patches, self.pm, self.pf
        pad_m, pad_t = nm * pm - values.shape[1], nt * pf - values.shape[2]
        values = F.pad(values, (0, pad_t, 0, pad_m))  # (P, nm*pm, nt*pf)
        observed = F.pad(observed, (0, pad_t, 0, pad_m)).float()
        patches = values.reshape(P, nm, pm, nt, pf).permute(0, 1, 3, 2, 4).reshape(P, nm, nt, pm * pf)
        frame_real = observed.reshape(P, nm, pm, nt, pf).amax(dim=2)  # (P, nm, nt, pf): real frames of the patch
        tokens = self.embed(torch.cat([patches, frame_real], dim=-1))  # (P, nm, nt, D)
        tokens = tokens + self.mel_embedding + self.time_embedding
        T = nm * nt
        token_mask = frame_real.amax(dim=-1).reshape(P, T) > 0
        age = self.record_age_hours(arrays, values).expand(P, T)
        return EncoderOutput(tokens.reshape(P, T, -1), token_mask, age)

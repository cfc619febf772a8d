"""Video encoder: a small CNN per frame and per frame difference, then temporal layers over frames.

Appearance alone cannot tell how much a structure moves; the difference between consecutive real
frames can, so each frame token holds both. Arrays by role: the 4-D ``values`` ``(frames, C, H, W)``
and the frame ``mask``. Unreal frames are zeroed, give no difference and take no part in the
temporal attention.
"""

from __future__ import annotations

import torch
from torch import nn

from meddx.models.attention import encoder_on_attended
from meddx.models.config import BackboneConfig
from meddx.models.encoders.base import EncoderOutput, ModalityEncoder, average_pool, find_one, zero_where_not
from meddx.models.frozen import FrozenOutputs
from meddx.records import Modality
from meddx.specs import ArraySpec


def _frame_cnn(channels: int, width: int) -> nn.Sequential:
    """``(N, C, H, W)`` → ``(N, width)``: two strided convolutions and a global average."""
    return nn.Sequential(
        nn.Conv2d(channels, max(width // 2, 1), kernel_size=5, stride=2, padding=2),
        nn.GELU(),
        nn.Conv2d(max(width // 2, 1), width, kernel_size=3, stride=2, padding=1),
        nn.GELU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


class VideoEncoder(ModalityEncoder):
    """Frames ``(P, F, C, H, W)`` with their mask → ``(P, F, d_model)`` tokens, one per frame.

    Example:
        >>> from meddx.specs import ArrayField
        >>> spec = {"frames": ArrayField((4, 1, 16, 16), "float32"),
        ...         "frame_mask": ArrayField((4,), "bool", "mask", of=("frames",))}
        >>> encoder = VideoEncoder(BackboneConfig(d_model=16, n_heads=2), spec).eval()
        >>> out = encoder({"frames": torch.rand(2, 4, 1, 16, 16), "frame_mask": torch.ones(2, 4, dtype=torch.bool)})
        >>> tuple(out.tokens.shape)
        (2, 4, 16)
    """

    modality = Modality.VIDEO

    def __init__(self, config: BackboneConfig, spec: ArraySpec):
        super().__init__(config, spec)
        self.frames = find_one(self.modality, spec, "values", ndim=4)
        self.mask = find_one(self.modality, spec, "mask", of=self.frames)
        n_frames, channels, _, _ = self.field(self.frames).shape
        width = config.video.frame_features
        self.input_pool = config.video.input_pool
        self.appearance = _frame_cnn(channels, width)
        self.motion = _frame_cnn(channels, width)
        self.cached: dict[str, FrozenOutputs] = {}
        if config.video.frozen:
            self.freeze()
        self.project = nn.Linear(2 * width, config.d_model)
        self.frame_embedding = nn.Parameter(torch.zeros(1, n_frames, config.d_model))
        self.temporal = None
        if config.video.temporal_layers:
            layer = nn.TransformerEncoderLayer(
                config.d_model, config.n_heads, 2 * config.d_model, config.dropout, batch_first=True, norm_first=True
            )
            layer.self_attn.dropout = config.attention_dropout
            self.temporal = nn.TransformerEncoder(layer, config.video.temporal_layers, enable_nested_tensor=False)

    def freeze(self) -> VideoEncoder:
        """Stop training the frame CNNs (projection and temporal layers still train); cache their outputs."""
        self.frozen = True
        self.cached = {"appearance": FrozenOutputs(), "motion": FrozenOutputs()}
        self.appearance.requires_grad_(False)
        self.motion.requires_grad_(False)
        return self

    def _cnn(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One frame CNN on pooled frames ``(N, C, H, W)`` → ``(N, w)``; a frozen one runs once per frame."""
        cnn = getattr(self, name)
        return self.cached[name](cnn, x) if self.frozen else cnn(x)

    def forward(self, arrays: dict[str, torch.Tensor]) -> EncoderOutput:
        mask = arrays[self.mask].bool()  # (P, F)
        P, F = mask.shape
        # Pooling is linear, so the difference of pooled frames is the pooled difference: pool once, first.
        frames = average_pool(arrays[self.frames].float().flatten(0, 1), self.input_pool).unflatten(0, (P, F))
        frames = zero_where_not(frames, mask)
        both_real = torch.zeros_like(mask)
        both_real[:, 1:] = mask[:, 1:] & mask[:, :-1]  # a difference needs this frame and the one before
        diffs = torch.zeros_like(frames)
        diffs[:, 1:] = zero_where_not(frames[:, 1:] - frames[:, :-1], both_real[:, 1:])
        look = self._cnn("appearance", frames.flatten(0, 1)).reshape(P, F, -1)  # (P, F, w)
        move = self._cnn("motion", diffs.flatten(0, 1)).reshape(P, F, -1)  # (P, F, w)
        tokens = self.project(torch.cat([look, move], dim=-1)) + self.frame_embedding  # (P, F, D)
        if self.temporal is not None:
            padding = ~mask
            padding[:, 0] &= mask.any(dim=1)  # a clip with no real frame keeps one key (its tokens are masked anyway)
            tokens = encoder_on_attended(self.temporal, tokens, ~padding)
        age = self.record_age_hours(arrays, tokens).expand(P, F)
        return EncoderOutput(tokens, mask, age)

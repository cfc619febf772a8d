"""A hospital's own Hugging Face vision model over CT slices (imaging) or video frames: one token each.

Set ``imaging.hf_model`` or ``video.hf_model`` in the backbone config to a local folder written by
``save_pretrained`` (ViT ``ViTModel``, DINOv2 ``Dinov2Model``, a CLIP vision tower
``CLIPVisionModel``...), with its image processor's ``preprocessor_config.json``; it is checked and
loaded offline by :mod:`meddx.models.hf_folder`. How meddx adapts its tensors (``docs/encoders.md``):

1. imaging: every *observed* slice of the resampled, windowed volume (values in [0, 1]: the CT
   window of the ingest config maps -1000..1000 HU to 0..1) is one image; video: every real frame
   (8-bit values divided by 255, so also [0, 1]). Values in [0, 1] are what the processor's
   ``rescale_factor`` (1/255) makes of 8-bit pixels, so no rescaling is applied again;
2. one channel is repeated to the model's ``num_channels`` (3 for RGB models);
3. resized (bilinear, or bicubic where the processor's ``resample`` is 3; antialiased) to the
   processor's ``size`` (``height`` x ``width``, or the shorter edge to ``shortest_edge`` keeping the
   aspect ratio), then centre-cropped to ``crop_size`` where ``do_center_crop`` (CLIP);
4. normalised with the processor's ``image_mean`` and ``image_std`` where ``do_normalize``;
5. the model's ``last_hidden_state``: its first token (the CLS token of ViT, DINOv2 and CLIP), or
   for a convolutional model's feature map its spatial mean, is the image's feature;
6. a LayerNorm and a linear projection to ``d_model`` (trained), plus a learned embedding of the
   slice or frame position, give the token. Video tokens then go through the encoder's temporal
   layers (``video.temporal_layers``).

Frozen (the default for these models: ``frozen`` None), the model runs in eval mode without
gradients and its outputs are cached by the slice or frame's bytes and the weights' digest
(:class:`meddx.models.frozen.FrozenOutputs`), in memory and, with a cache folder, on disk: each
slice is computed once across epochs and runs. Fine-tuned (``frozen: false``), it trains with
the rest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from meddx.errors import ConfigError
from meddx.models.attention import encoder_on_attended
from meddx.models.config import BackboneConfig
from meddx.models.encoders.base import EncoderOutput, ModalityEncoder, find_one, zero_where_not
from meddx.models.frozen import FrozenOutputs
from meddx.models.hf_folder import load_hf_model, load_hf_processor
from meddx.records import Modality
from meddx.specs import ArraySpec


def _setting(size: Any, key: str) -> int | None:
    """``size[key]`` of a processor's size setting (a dict, or transformers 5's ``SizeDict``)."""
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return None if value is None else int(value)


def _pair(size: Any, what: str) -> tuple[int, int] | int:
    """``(height, width)`` of a size setting, or the ``shortest_edge`` length."""
    height, width = _setting(size, "height"), _setting(size, "width")
    if height and width:
        return height, width
    edge = _setting(size, "shortest_edge")
    if edge:
        return edge
    raise ConfigError(f"the image processor's {what} {size!r} has neither height/width nor shortest_edge")


class VisionTrunk(nn.Module):
    """Images ``(N, C, H, W)`` in [0, 1] → ``(N, hidden)`` features, adapted as the processor says (see above)."""

    def __init__(self, model: nn.Module, processor: Any):
        super().__init__()
        self.model = model
        self.channels = int(getattr(model.config, "num_channels", 3))
        self.size = _pair(processor.size, "size") if getattr(processor, "do_resize", True) else None
        crop = getattr(processor, "crop_size", None)
        self.crop = _pair(crop, "crop_size") if getattr(processor, "do_center_crop", False) and crop else None
        self.mode = "bicubic" if int(getattr(processor, "resample", 2) or 2) == 3 else "bilinear"
        normalize = getattr(processor, "do_normalize", True)
        mean = processor.image_mean if normalize else [0.0] * self.channels
        std = processor.image_std if normalize else [1.0] * self.channels
        mean = [float(m) for m in (mean if isinstance(mean, (list, tuple)) else [mean] * self.channels)]
        std = [float(s) for s in (std if isinstance(std, (list, tuple)) else [std] * self.channels)]
        if len(mean) != self.channels or len(std) != self.channels:
            raise ConfigError(f"the image processor's mean {mean} and std {std} do not have {self.channels} channels")
        self.settings = json.dumps([self.channels, self.size, self.crop, self.mode, mean, std])  # keys frozen outputs
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(1, -1, 1, 1), persistent=False)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` in [0, 1] → the model's ``pixel_values``: channels, size, crop, normalisation."""
        if x.shape[1] != self.channels:
            if x.shape[1] == 1:
                x = x.expand(-1, self.channels, -1, -1)
            elif self.channels == 1:
                x = x.mean(dim=1, keepdim=True)
            else:
                raise ConfigError(f"images of {x.shape[1]} channels cannot feed a model of {self.channels}")
        if isinstance(self.size, tuple):
            target: tuple[int, int] | None = self.size
        elif self.size is not None:  # the shorter edge to `size`, keeping the aspect ratio
            scale = self.size / min(x.shape[-2:])
            target = (max(round(x.shape[-2] * scale), 1), max(round(x.shape[-1] * scale), 1))
        else:
            target = None
        if target is not None and tuple(x.shape[-2:]) != target:
            x = F.interpolate(x, size=target, mode=self.mode, align_corners=False, antialias=True)
        if self.crop is not None:
            ch, cw = self.crop if isinstance(self.crop, tuple) else (self.crop, self.crop)
            top, left = max((x.shape[-2] - ch) // 2, 0), max((x.shape[-1] - cw) // 2, 0)
            x = x[..., top : top + ch, left : left + cw]
        mean, std = self.get_buffer("mean"), self.get_buffer("std")
        return (x - mean) / std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.model(pixel_values=self.adapt(x.float())).last_hidden_state
        if hidden.dim() == 3:  # (N, tokens, hidden): the CLS token
            return hidden[:, 0]
        return hidden.flatten(2).mean(dim=2)  # (N, C, h, w) feature map: its spatial mean


class HfVisionEncoder(ModalityEncoder):
    """The shared part: a :class:`VisionTrunk`, its frozen cache, the projection of each image to a token."""

    def _build(self, folder: str, frozen: bool | None, n_positions: int, cache_dir: str | Path | None) -> None:
        what = f"{self.modality}.hf_model"
        self.trunk = VisionTrunk(load_hf_model(folder, what), load_hf_processor(folder, "image", what))
        self.trunk.eval()
        with torch.no_grad():  # one blank image: the feature width, and a model that cannot take the size fails here
            try:
                hidden = self.trunk(torch.zeros(1, 1, 8, 8)).shape[-1]
            except (RuntimeError, ValueError) as exc:
                raise ConfigError(
                    f"{what} {folder} does not run on its processor's image size: {str(exc)[:200]}"
                ) from None
        self.cache_dir = cache_dir
        self.trunk_outputs: FrozenOutputs | None = None
        if frozen is None or frozen:
            self.freeze()
        self.project = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, self.d_model))
        self.position = nn.Parameter(torch.zeros(1, n_positions, self.d_model))

    def freeze(self) -> HfVisionEncoder:
        """Stop training the vision model (the projection still trains); its outputs are cached from now on."""
        self.frozen = True
        self.trunk_outputs = FrozenOutputs(self.cache_dir)
        self.trunk.requires_grad_(False).eval()
        return self

    def train(self, mode: bool = True) -> HfVisionEncoder:
        super().train(mode)
        if self.frozen:
            self.trunk.eval()  # no dropout: a frozen model's output is a function of its input, so caching is exact
        return self

    def _tokens(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Images ``(P, K, C, H, W)`` with their mask ``(P, K)`` → ``(P, K, d_model)`` (only real ones run)."""
        P, K = mask.shape
        real = mask.nonzero()  # (N, 2)
        items = images[real[:, 0], real[:, 1]]  # (N, C, H, W)
        if self.trunk_outputs is not None:
            features = self.trunk_outputs(self.trunk, items)
        else:
            features = self.trunk(items)
        grid = features.new_zeros(P, K, features.shape[-1])
        grid[real[:, 0], real[:, 1]] = features.to(grid.dtype)
        return self.project(grid) + self.position


class HfImagingEncoder(HfVisionEncoder):
    """Volume ``(P, D, H, W)`` with its slice mask → ``(P, D, d_model)``: one token per observed slice."""

    modality = Modality.IMAGING

    def __init__(self, config: BackboneConfig, spec: ArraySpec, cache_dir: str | Path | None = None):
        super().__init__(config, spec)
        cfg = config.imaging
        assert cfg.hf_model is not None
        self.volume = find_one(self.modality, spec, "values", ndim=3)
        self.slice_mask = find_one(self.modality, spec, "mask", of=self.volume)
        self._build(cfg.hf_model, cfg.frozen, self.field(self.volume).shape[0], cache_dir)

    def forward(self, arrays: dict[str, torch.Tensor]) -> EncoderOutput:
        slices = arrays[self.slice_mask].bool()  # (P, D)
        volume = zero_where_not(arrays[self.volume].float(), slices)  # (P, D, H, W)
        tokens = self._tokens(volume.unsqueeze(2), slices)  # (P, D, d_model)
        age = self.record_age_hours(arrays, tokens).expand(-1, tokens.shape[1])
        return EncoderOutput(tokens, slices, age)


class HfVideoEncoder(HfVisionEncoder):
    """Frames ``(P, F, C, H, W)`` with their mask → ``(P, F, d_model)``: one token per real frame."""

    modality = Modality.VIDEO

    def __init__(self, config: BackboneConfig, spec: ArraySpec, cache_dir: str | Path | None = None):
        super().__init__(config, spec)
        cfg = config.video
        assert cfg.hf_model is not None
        self.frames = find_one(self.modality, spec, "values", ndim=4)
        self.mask = find_one(self.modality, spec, "mask", of=self.frames)
        self._build(cfg.hf_model, cfg.frozen, self.field(self.frames).shape[0], cache_dir)
        self.temporal = None
        if cfg.temporal_layers:
            layer = nn.TransformerEncoderLayer(
                config.d_model, config.n_heads, 2 * config.d_model, config.dropout, batch_first=True, norm_first=True
            )
            layer.self_attn.dropout = config.attention_dropout
            self.temporal = nn.TransformerEncoder(layer, cfg.temporal_layers, enable_nested_tensor=False)

    def forward(self, arrays: dict[str, torch.Tensor]) -> EncoderOutput:
        mask = arrays[self.mask].bool()  # (P, F)
        frames = zero_where_not(arrays[self.frames].float(), mask)  # (P, F, C, H, W)
        tokens = self._tokens(frames, mask)
        if self.temporal is not None:
            padding = ~mask
            padding[:, 0] &= mask.any(dim=1)  # a clip with no real frame keeps one key (its tokens are masked anyway)
            tokens = encoder_on_attended(self.temporal, tokens, ~padding)
        age = self.record_age_hours(arrays, tokens).expand(-1, tokens.shape[1])
        return EncoderOutput(tokens, mask, age)

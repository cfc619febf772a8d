"""Imaging encoder: a MONAI network over the volume; its last feature map pooled to a few tokens.

3D (default): the volume ``(D, H, W)`` with unobserved slices zeroed goes through a 3D network.
2D (radiographs): each observed slice goes through a 2D network and the tokens are averaged over
observed slices, so a radiograph (one slice) and a stack of 2D images both work.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from meddx.errors import ConfigError, ModelError
from meddx.models.config import BackboneConfig, ImagingEncoderConfig
from meddx.models.encoders.base import (
    EncoderOutput,
    ModalityEncoder,
    average_pool,
    find_one,
    masked_mean,
    zero_where_not,
)
from meddx.models.frozen import FrozenOutputs
from meddx.records import Modality
from meddx.specs import ArraySpec

logger = logging.getLogger(__name__)


class _ResNetTrunk(nn.Module):
    """A MONAI ResNet up to its last stage, with the average pool replaced by a pool to the token grid."""

    def __init__(self, net: nn.Module, grid: tuple[int, ...], channels: int, spatial_dims: int):
        super().__init__()
        net.avgpool = (nn.AdaptiveAvgPool3d if spatial_dims == 3 else nn.AdaptiveAvgPool2d)(grid)
        self.net = net
        self.channels = channels
        self.n_tokens = int(torch.tensor(grid).prod())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(x.shape[0], self.channels, self.n_tokens)  # (N, C, T): MONAI flattens C first


class _DenseNetTrunk(nn.Module):
    """A MONAI DenseNet's ``features`` (then ReLU, as its classifier does) pooled to the token grid."""

    def __init__(self, net: nn.Module, grid: tuple[int, ...], channels: int, spatial_dims: int):
        super().__init__()
        self.features: nn.Module = net.features  # type: ignore[assignment]
        self.pool = (nn.AdaptiveAvgPool3d if spatial_dims == 3 else nn.AdaptiveAvgPool2d)(grid)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.features(x))).flatten(2)  # (N, C, T)


class _MonaiTrunk(nn.Module):
    """Any ``monai.networks.nets`` class (``network: monai``): its output, pooled to the token grid.

    A network that ends in a vector ``(N, C)`` (``resnet10`` with ``feed_forward: false``,
    ``DenseNet121`` with ``out_channels`` features) gives one token; one that ends in a feature map
    ``(N, C, ...)`` is average-pooled to ``token_grid``. ``channels`` is set by the encoder's dry pass.
    """

    def __init__(self, net: nn.Module, grid: tuple[int, ...], spatial_dims: int):
        super().__init__()
        self.net = net
        self.pool = (nn.AdaptiveAvgPool3d if spatial_dims == 3 else nn.AdaptiveAvgPool2d)(grid)
        self.channels = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if isinstance(out, (tuple, list)):  # some networks return (features, ...) or per-stage maps
            out = out[-1] if isinstance(out, list) else out[0]
        if out.dim() == 2:
            return out.unsqueeze(2)  # (N, C, 1)
        return self.pool(out).flatten(2)  # (N, C, T)


def _monai_network(cfg: ImagingEncoderConfig) -> nn.Module:
    """``monai.networks.nets.<monai_class>(**monai_kwargs)``; ConfigError naming what is wrong."""
    from monai.networks import nets

    name = cfg.monai_class or ""
    network = None if name.startswith("_") else getattr(nets, name, None)
    is_class = isinstance(network, type) and issubclass(network, nn.Module)
    is_factory = callable(network) and str(getattr(network, "__module__", "")).startswith("monai.networks.nets")
    if network is None or not (is_class or is_factory):  # classes, and factories such as resnet10
        raise ConfigError(f"imaging.monai_class {name!r} is not a network class of monai.networks.nets")
    kwargs: dict = {"spatial_dims": cfg.spatial_dims, **(cfg.monai_kwargs or {})}
    try:
        net = network(**kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise ConfigError(
            f"imaging: monai.networks.nets.{name}(**{kwargs}) cannot be built: {str(exc)[:200]}"
        ) from None
    if not isinstance(net, nn.Module):
        raise ConfigError(f"imaging.monai_class {name!r} does not build a network")
    return net


def build_trunk(cfg: ImagingEncoderConfig) -> _ResNetTrunk | _DenseNetTrunk | _MonaiTrunk:
    """The MONAI network named by ``cfg.network``, returning ``(N, C, T)`` feature tokens."""
    from monai.networks import nets

    dims = cfg.spatial_dims
    grid = cfg.token_grid if dims == 3 else cfg.token_grid[1:]
    net: nn.Module
    if cfg.network == "monai":
        return _MonaiTrunk(_monai_network(cfg), grid, dims)
    if cfg.network == "densenet121":
        net = nets.DenseNet121(spatial_dims=dims, in_channels=1, out_channels=1, norm=cfg.norm)
        channels = 1024
    elif cfg.network == "densenet":
        net = nets.DenseNet(
            spatial_dims=dims,
            in_channels=1,
            out_channels=1,
            init_features=cfg.init_features,
            growth_rate=cfg.growth_rate,
            block_config=cfg.block_config,
            norm=cfg.norm,
        )
        channels = cfg.init_features
        for i, n_layers in enumerate(cfg.block_config):
            channels += n_layers * cfg.growth_rate
            if i < len(cfg.block_config) - 1:
                channels //= 2  # each transition halves the channels
    else:
        widths, layers = ((64, 128, 256, 512), (2, 2, 2, 2)) if cfg.network == "resnet18" else (cfg.widths, cfg.layers)
        net = nets.ResNet(
            "basic",
            list(layers),
            list(widths),
            spatial_dims=dims,
            n_input_channels=1,
            feed_forward=False,
            norm=cfg.norm,
        )
        return _ResNetTrunk(net, grid, widths[-1], dims)
    return _DenseNetTrunk(net, grid, channels, dims)


def load_network_weights(trunk: _ResNetTrunk | _DenseNetTrunk | _MonaiTrunk, path: str | Path) -> None:
    """Load a local safetensors file into the network; a pickle file or a mismatch raises ModelError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelError(f"imaging.weights {path} is not a .safetensors file; meddx never loads pickle checkpoints")
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise ModelError(f"imaging.weights {path} cannot be read as safetensors: {exc}") from None
    target = trunk.net if isinstance(trunk, (_ResNetTrunk, _MonaiTrunk)) else trunk
    try:
        missing, unexpected = target.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that differ
        raise ModelError(
            f"imaging.weights {path} do not fit the configured {type(target).__name__}: {str(exc)[:300]}; "
            "check imaging.network and its widths"
        ) from None
    if missing or unexpected:
        raise ModelError(
            f"imaging.weights {path} do not fit the configured {type(target).__name__}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); "
            "check imaging.network and its widths"
        )
    logger.info("imaging network weights loaded from %s", path)


class ImagingEncoder(ModalityEncoder):
    """Volume ``(P, D, H, W)`` with its slice mask → ``(P, T, d_model)`` tokens (T = cells of ``token_grid``).

    Example:
        >>> from meddx.specs import ArrayField
        >>> spec = {"volume": ArrayField((8, 16, 16), "float32"),
        ...         "slice_mask": ArrayField((8,), "bool", "mask", of=("volume",))}
        >>> config = BackboneConfig(d_model=16, n_heads=2, imaging={"block_config": (1, 1), "input_pool": 1})
        >>> encoder = ImagingEncoder(config, spec).eval()
        >>> out = encoder({"volume": torch.rand(2, 8, 16, 16), "slice_mask": torch.ones(2, 8, dtype=torch.bool)})
        >>> tuple(out.tokens.shape), tuple(out.token_mask.shape)
        ((2, 4, 16), (2, 4))
    """

    modality = Modality.IMAGING

    def __init__(self, config: BackboneConfig, spec: ArraySpec, load_weights: bool = True):
        super().__init__(config, spec)
        cfg = config.imaging
        self.spatial_dims = cfg.spatial_dims
        self.input_pool = cfg.input_pool
        self.volume = find_one(self.modality, spec, "values", ndim=3)
        self.slice_mask = find_one(self.modality, spec, "mask", of=self.volume)
        self.trunk = build_trunk(cfg)
        self._check_fits(cfg)
        if cfg.weights is not None and load_weights:
            load_network_weights(self.trunk, cfg.weights)
        self.trunk_outputs: FrozenOutputs | None = None
        if cfg.frozen if cfg.frozen is not None else cfg.weights is not None:
            self.freeze()
        self.project = nn.Linear(self.trunk.channels, config.d_model)

    def freeze(self) -> ImagingEncoder:
        """Stop training the network (the projection still trains); its outputs are cached from now on."""
        self.frozen = True
        self.trunk_outputs = FrozenOutputs()
        self.trunk.requires_grad_(False).eval()
        return self

    def train(self, mode: bool = True) -> ImagingEncoder:
        super().train(mode)
        if self.frozen:
            self.trunk.eval()  # running statistics: a frozen network's output depends on its input alone
        return self

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """The network on pooled input ``(N, 1, ...)`` → ``(N, C, T)``; a frozen one runs once per input."""
        x = average_pool(x, self.input_pool)
        return self.trunk_outputs(self.trunk, x) if self.trunk_outputs is not None else self.trunk(x)

    def _check_fits(self, cfg: ImagingEncoderConfig) -> None:
        """One dry pass of a blank volume, so a network too deep for the volume fails here, by name."""
        depth, height, width = self.field(self.volume).shape
        blank = torch.zeros(1, 1, depth, height, width) if self.spatial_dims == 3 else torch.zeros(1, 1, height, width)
        self.trunk.eval()
        try:
            with torch.no_grad():
                out = self.trunk(average_pool(blank, self.input_pool))  # (1, C, T)
            if isinstance(self.trunk, _MonaiTrunk):
                self.trunk.channels = int(out.shape[1])
        except (RuntimeError, ValueError) as exc:
            if cfg.network == "monai":
                raise ConfigError(
                    f"imaging: monai.networks.nets.{cfg.monai_class} does not run on a {depth}x{height}x{width} "
                    f"volume of one channel ({str(exc)[:160]}); check imaging.monai_kwargs (one input channel, "
                    "spatial_dims) and imaging.input_pool"
                ) from None
            raise ConfigError(
                f"imaging volume {depth}x{height}x{width} is too small for the {cfg.network} network "
                f"({str(exc)[:120]}); use a larger imaging.spatial_size, a smaller imaging.input_pool "
                "or fewer stages (block_config / layers)"
            ) from None
        finally:
            self.trunk.train()

    def forward(self, arrays: dict[str, torch.Tensor]) -> EncoderOutput:
        volume = arrays[self.volume].float()  # (P, D, H, W)
        slices = arrays[self.slice_mask].bool()  # (P, D)
        volume = zero_where_not(volume, slices)  # unobserved slices cannot matter
        P, D = slices.shape
        if self.spatial_dims == 3:
            features = self._features(volume.unsqueeze(1))  # (P, C, T)
        else:
            observed = slices.nonzero()  # (N, 2): (patient, slice) of every observed slice
            per_slice = self._features(volume[observed[:, 0], observed[:, 1]].unsqueeze(1))  # (N, C, T)
            grid = per_slice.new_zeros(P, D, *per_slice.shape[1:])  # (P, D, C, T)
            grid[observed[:, 0], observed[:, 1]] = per_slice
            features = masked_mean(grid, slices, dim=1)  # (P, C, T)
        tokens = self.project(features.transpose(1, 2))  # (P, T, d_model)
        mask = slices.any(dim=1, keepdim=True).expand(-1, tokens.shape[1])  # (P, T)
        age = self.record_age_hours(arrays, tokens).expand(-1, tokens.shape[1])  # (P, T)
        return EncoderOutput(tokens, mask, age)

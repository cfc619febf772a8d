"""Frozen imaging and video trunks: cached outputs equal running the trunk; new weights invalidate them."""

from __future__ import annotations

import torch
from model_batches import tiny_backbone_config
from safetensors.torch import save_file

from meddx.models.encoders import ImagingEncoder, VideoEncoder
from meddx.models.frozen import FrozenOutputs
from meddx.specs import ArrayField

VOLUME_SPEC = {
    "volume": ArrayField((8, 16, 16), "float32"),
    "slice_mask": ArrayField((8,), "bool", "mask", of=("volume",)),
}
FRAMES_SPEC = {
    "frames": ArrayField((4, 1, 16, 16), "float32"),
    "frame_mask": ArrayField((4,), "bool", "mask", of=("frames",)),
}


def _volumes(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"volume": torch.rand(3, 8, 16, 16, generator=generator), "slice_mask": torch.ones(3, 8, dtype=torch.bool)}


def _counting(module: torch.nn.Module) -> list[int]:
    """Rows the module is run on, call by call."""
    calls: list[int] = []
    module.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    return calls


def test_a_frozen_imaging_trunk_runs_once_per_volume_and_matches_running_it() -> None:
    torch.manual_seed(0)
    frozen = ImagingEncoder(tiny_backbone_config(imaging={"block_config": [1, 1], "frozen": True}), VOLUME_SPEC)
    plain = ImagingEncoder(tiny_backbone_config(imaging={"block_config": [1, 1]}), VOLUME_SPEC)
    plain.load_state_dict(frozen.state_dict())
    frozen.train(), plain.eval()  # a frozen trunk keeps its running statistics even in training
    assert not frozen.trunk.training
    assert not any(p.requires_grad for p in frozen.trunk.parameters())
    assert all(p.requires_grad for p in frozen.project.parameters())
    calls = _counting(frozen.trunk)
    arrays, other = _volumes(1), _volumes(2)
    first = frozen(arrays).tokens
    again = frozen(arrays).tokens  # second epoch: nothing to run
    mixed = frozen({k: torch.cat([arrays[k][:1], other[k][:2]]) for k in arrays}).tokens
    assert calls == [3, 2]  # only the two volumes it had not seen
    with torch.no_grad():
        assert torch.allclose(first, plain(arrays).tokens, atol=1e-6)
        assert torch.equal(first, again)
        assert torch.allclose(mixed[1:], plain(other).tokens[:2], atol=1e-6)
    first.sum().backward()  # the projection still trains
    assert frozen.project.weight.grad is not None


def test_new_weights_invalidate_the_cached_outputs() -> None:
    torch.manual_seed(0)
    encoder = ImagingEncoder(tiny_backbone_config(imaging={"block_config": [1, 1], "frozen": True}), VOLUME_SPEC).eval()
    arrays = _volumes(1)
    with torch.no_grad():
        before = encoder(arrays).tokens
        torch.manual_seed(5)
        other = ImagingEncoder(tiny_backbone_config(imaging={"block_config": [1, 1]}), VOLUME_SPEC).eval()
        encoder.trunk.load_state_dict(other.trunk.state_dict())  # e.g. a checkpoint loaded after the first epoch
        other.project.load_state_dict(encoder.project.state_dict())
        after = encoder(arrays).tokens
        assert not torch.allclose(before, after)
        assert torch.allclose(after, other(arrays).tokens, atol=1e-6)


def test_imaging_weights_freeze_the_network_by_default(tmp_path) -> None:
    config = tiny_backbone_config(imaging={"block_config": [1, 1]})
    source = ImagingEncoder(config, VOLUME_SPEC)
    path = tmp_path / "imaging.safetensors"
    save_file({k: v.contiguous() for k, v in source.trunk.state_dict().items()}, str(path))
    assert not source.frozen
    given = tiny_backbone_config(imaging={"block_config": [1, 1], "weights": str(path)})
    assert ImagingEncoder(given, VOLUME_SPEC).frozen
    trainable = tiny_backbone_config(imaging={"block_config": [1, 1], "weights": str(path), "frozen": False})
    assert not ImagingEncoder(trainable, VOLUME_SPEC).frozen


def test_frozen_video_cnns_match_running_them_and_run_once_per_frame() -> None:
    torch.manual_seed(0)
    frozen = VideoEncoder(tiny_backbone_config(video={"frame_features": 8, "frozen": True}), FRAMES_SPEC).eval()
    plain = VideoEncoder(tiny_backbone_config(), FRAMES_SPEC).eval()
    plain.load_state_dict(frozen.state_dict())
    assert not any(p.requires_grad for p in [*frozen.appearance.parameters(), *frozen.motion.parameters()])
    calls = _counting(frozen.appearance)
    clip = {"frames": torch.rand(2, 4, 1, 16, 16), "frame_mask": torch.tensor([[True] * 4, [True, True, False, False]])}
    with torch.no_grad():
        first, again, expected = frozen(clip).tokens, frozen(clip).tokens, plain(clip).tokens
    assert torch.allclose(first, expected, atol=1e-6)
    assert torch.equal(first, again)
    assert calls == [8]  # the second pass ran nothing


def test_frozen_outputs_of_an_empty_batch() -> None:
    outputs = FrozenOutputs()
    assert outputs(torch.nn.Linear(3, 2).requires_grad_(False), torch.zeros(0, 3)).shape == (0, 2)


def test_freeze_trunks_freezes_imaging_and_video_and_survives_a_round_trip(tmp_path) -> None:
    from model_batches import fitted_aligner

    from meddx.models import FoundationBackbone

    aligner, _ = fitted_aligner()
    backbone = FoundationBackbone.from_aligner(tiny_backbone_config(), aligner).freeze_trunks()
    imaging, video = backbone.encoders["imaging"], backbone.encoders["video"]
    frozen = [*imaging.trunk.parameters(), *video.appearance.parameters(), *video.motion.parameters()]
    assert not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in [*imaging.project.parameters(), *backbone.fusion.parameters()])
    assert backbone.config.imaging.frozen
    assert backbone.config.video.frozen
    loaded = FoundationBackbone.from_pretrained(backbone.save_pretrained(tmp_path / "model"))
    assert loaded.encoders["imaging"].frozen
    assert loaded.encoders["video"].frozen

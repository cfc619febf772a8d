"""Modality encoders on their own: role lookup, the 2D imaging path, imaging weights, EHR token modes."""

from __future__ import annotations

import pytest
import torch
from model_batches import fitted_aligner, random_patient, tiny_backbone_config
from safetensors.torch import save_file

from meddx.errors import ConfigError, ModelError
from meddx.models.encoders import EhrEncoder, ImagingEncoder, VideoEncoder
from meddx.records import Modality, collate
from meddx.specs import ArrayField

VOLUME_SPEC = {
    "volume": ArrayField((8, 16, 16), "float32"),
    "slice_mask": ArrayField((8,), "bool", "mask", of=("volume",)),
    "age_hours": ArrayField((1,), "float32", "age_hours"),
}


def _volume_arrays(n_slices_real: int = 3):
    torch.manual_seed(0)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, :n_slices_real] = True
    mask[1, :1] = True  # a radiograph: one slice
    return {"volume": torch.rand(2, 8, 16, 16), "slice_mask": mask, "age_hours": torch.tensor([[2.0], [30.0]])}


@pytest.mark.parametrize("network", ["densenet", "resnet"])
@pytest.mark.parametrize("dims", [2, 3])
def test_imaging_encoder_ignores_unobserved_slices(network, dims) -> None:
    config = tiny_backbone_config(
        imaging={"network": network, "spatial_dims": dims, "widths": [4, 4, 8, 8], "block_config": [1, 1]}
    )
    encoder = ImagingEncoder(config, VOLUME_SPEC).eval()
    arrays = _volume_arrays()
    noisy = dict(arrays, volume=torch.where(arrays["slice_mask"][..., None, None], arrays["volume"], torch.nan))
    with torch.no_grad():
        out, again = encoder(arrays), encoder(noisy)
    assert out.tokens.shape == (2, 4, 16)
    assert out.token_mask.all()
    assert torch.equal(out.token_age_hours, torch.tensor([[2.0] * 4, [30.0] * 4]))
    assert torch.allclose(out.tokens, again.tokens, atol=1e-6)


def test_imaging_weights_load_from_safetensors_only(tmp_path) -> None:
    config = tiny_backbone_config()
    torch.manual_seed(1)
    source = ImagingEncoder(config, VOLUME_SPEC).eval()
    path = tmp_path / "imaging.safetensors"
    save_file({k: v.contiguous() for k, v in source.trunk.state_dict().items()}, str(path))
    torch.manual_seed(2)
    loaded = ImagingEncoder(
        config.model_copy(update={"imaging": config.imaging.model_copy(update={"weights": str(path)})}), VOLUME_SPEC
    )
    for key, value in source.trunk.state_dict().items():
        assert torch.equal(loaded.trunk.state_dict()[key], value)
    pickled = tmp_path / "imaging.pt"
    torch.save(source.trunk.state_dict(), pickled)
    with pytest.raises(ModelError, match="never loads pickle"):
        ImagingEncoder(
            config.model_copy(update={"imaging": config.imaging.model_copy(update={"weights": str(pickled)})}),
            VOLUME_SPEC,
        )
    other = tiny_backbone_config(imaging={"init_features": 6, "block_config": [1, 1]})
    with pytest.raises(ModelError, match="do not fit"):
        ImagingEncoder(
            other.model_copy(update={"imaging": other.imaging.model_copy(update={"weights": str(path)})}), VOLUME_SPEC
        )


def test_a_network_too_deep_for_the_volume_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="too small for the densenet network"):
        ImagingEncoder(tiny_backbone_config(imaging={"block_config": [2, 2, 2, 2]}), VOLUME_SPEC)


def test_an_encoder_names_the_role_it_cannot_find() -> None:
    spec = {"volume": ArrayField((8, 16, 16), "float32")}  # no slice mask declared
    with pytest.raises(ConfigError, match="role 'mask'"):
        ImagingEncoder(tiny_backbone_config(), spec)


@pytest.mark.parametrize("lab_tokens", ["feature", "feature_bin"])
def test_ehr_tokens_from_the_fitted_spec(lab_tokens) -> None:
    aligner, _ = fitted_aligner()
    spec = aligner.array_spec()[Modality.EHR]
    encoder = EhrEncoder(tiny_backbone_config(ehr={"lab_tokens": lab_tokens}), spec).eval()
    batch = collate([random_patient(aligner.array_spec(), [Modality.EHR], s) for s in range(2)], aligner.tensor_spec())
    arrays = batch.tensors[Modality.EHR]
    out = encoder(arrays)
    n_labs, n_bins = spec["lab_mask"].shape
    lab_count = n_labs * n_bins if lab_tokens == "feature_bin" else n_labs
    assert out.tokens.shape == (2, 1 + lab_count + spec["code_ids"].shape[0], 16)
    codes = out.token_mask[:, 1 + lab_count :]
    assert torch.equal(codes, arrays["code_mask"])
    assert out.token_mask[:, 0].all()
    assert torch.equal(out.token_age_hours[:, 1 + lab_count :], arrays["code_age_hours"])
    if lab_tokens == "feature":  # a lab token is as old as its newest observed bin
        labs = arrays["lab_mask"]
        newest = torch.where(labs, arrays["lab_age_hours"][:, None, :], torch.inf).amin(dim=-1)
        seen = labs.any(dim=-1)
        assert torch.equal(out.token_age_hours[:, 1 : 1 + n_labs][seen], newest[seen])


def test_video_tokens_see_motion_not_only_appearance() -> None:
    spec = {
        "frames": ArrayField((4, 1, 16, 16), "float32"),
        "frame_mask": ArrayField((4,), "bool", "mask", of=("frames",)),
    }
    torch.manual_seed(0)
    encoder = VideoEncoder(tiny_backbone_config(), spec).eval()
    for p in encoder.appearance.parameters():  # blind the appearance path: only motion can tell clips apart
        torch.nn.init.zeros_(p)
    mask = torch.ones(1, 4, dtype=torch.bool)

    def clip(image, shift):
        return torch.stack([torch.roll(image, shifts=shift * t, dims=-1) for t in range(4)])[None]

    first, second = torch.rand(1, 16, 16), torch.rand(1, 16, 16)
    with torch.no_grad():
        still_a = encoder({"frames": clip(first, 0), "frame_mask": mask}).tokens
        still_b = encoder({"frames": clip(second, 0), "frame_mask": mask}).tokens
        moving = encoder({"frames": clip(first, 3), "frame_mask": mask}).tokens
    assert torch.allclose(still_a, still_b, atol=1e-6)  # appearance is invisible here
    assert not torch.allclose(still_a, moving, atol=1e-4)  # motion is not


def test_imaging_input_pool_averages_the_volume_before_the_network() -> None:
    spec = {
        "volume": ArrayField((16, 32, 32), "float32"),
        "slice_mask": ArrayField((16,), "bool", "mask", of=("volume",)),
    }
    pooled_spec = {
        **spec,
        "volume": ArrayField((8, 16, 16), "float32"),
        "slice_mask": ArrayField((8,), "bool", "mask", of=("volume",)),
    }
    imaging = {"init_features": 4, "growth_rate": 4, "block_config": [1, 1]}
    torch.manual_seed(0)
    pooling = ImagingEncoder(tiny_backbone_config(imaging={**imaging, "input_pool": 2}), spec).eval()
    plain = ImagingEncoder(tiny_backbone_config(imaging=imaging), pooled_spec).eval()
    plain.load_state_dict(pooling.state_dict())
    volume = torch.rand(2, 16, 32, 32)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 6:] = False  # unobserved slices count as zeros in their cell, whatever they hold
    by_hand = torch.where(mask[..., None, None], volume, 0.0).reshape(2, 8, 2, 16, 2, 16, 2).mean(dim=(2, 4, 6))
    noisy = torch.where(mask[..., None, None], volume, torch.nan)
    with torch.no_grad():
        out = pooling({"volume": noisy, "slice_mask": mask})
        expected = plain({"volume": by_hand, "slice_mask": torch.ones(2, 8, dtype=torch.bool)})
    assert out.tokens.shape == (2, 4, 16)
    assert torch.allclose(out.tokens, expected.tokens, atol=1e-5)


def test_video_input_pool_averages_frames_before_the_cnns() -> None:
    spec = {
        "frames": ArrayField((4, 1, 32, 32), "float32"),
        "frame_mask": ArrayField((4,), "bool", "mask", of=("frames",)),
    }
    small = {"frames": ArrayField((4, 1, 16, 16), "float32"), "frame_mask": spec["frame_mask"]}
    torch.manual_seed(0)
    pooling = VideoEncoder(tiny_backbone_config(video={"frame_features": 8, "input_pool": 2}), spec).eval()
    plain = VideoEncoder(tiny_backbone_config(), small).eval()
    plain.load_state_dict(pooling.state_dict())
    frames, mask = torch.rand(2, 4, 1, 32, 32), torch.tensor([[True, True, True, False], [True] * 4])
    by_hand = frames.reshape(2, 4, 1, 16, 2, 16, 2).mean(dim=(4, 6))
    with torch.no_grad():
        out = pooling({"frames": frames, "frame_mask": mask})
        expected = plain({"frames": by_hand, "frame_mask": mask})
    assert out.tokens.shape == (2, 4, 16)
    assert torch.allclose(out.tokens, expected.tokens, atol=1e-5)


def test_attention_dropout_is_its_own_rate() -> None:
    spec = {
        "frames": ArrayField((4, 1, 16, 16), "float32"),
        "frame_mask": ArrayField((4,), "bool", "mask", of=("frames",)),
    }
    encoder = VideoEncoder(tiny_backbone_config(dropout=0.1, attention_dropout=0.0), spec)
    layer = encoder.temporal.layers[0]
    assert layer.self_attn.dropout == 0.0
    assert layer.dropout1.p == 0.1


def test_zero_where_not_zeroes_masked_entries_even_nan_and_skips_the_copy_when_nothing_is_masked() -> None:
    from meddx.models.encoders.base import zero_where_not

    x = torch.tensor([[1.0, float("nan")], [float("inf"), 4.0]])
    out = zero_where_not(x, torch.tensor([[True, False], [False, True]]))
    assert out.tolist() == [[1.0, 0.0], [0.0, 4.0]]
    volume = torch.rand(2, 3, 4, 4)
    assert zero_where_not(volume, torch.ones(2, 3, dtype=torch.bool)) is volume  # nothing masked: no copy
    assert zero_where_not(volume, torch.tensor([[True, True, False]] * 2))[:, 2].abs().sum() == 0


@pytest.mark.parametrize(
    "shape, factor",
    [((3, 1, 8, 16, 16), 2), ((3, 1, 9, 16, 16), 2), ((4, 1, 12, 12), 3), ((2, 1, 16, 16), 4), ((2, 1, 5, 7), 2)],
)
def test_average_pool_gives_avg_pool_including_ragged_edges(shape, factor) -> None:
    from meddx.models.encoders.base import average_pool

    x = torch.randn(shape)
    pool = torch.nn.functional.avg_pool3d if len(shape) == 5 else torch.nn.functional.avg_pool2d
    assert torch.allclose(average_pool(x, factor), pool(x, factor, ceil_mode=True), atol=1e-6)

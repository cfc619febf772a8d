"""The encoders a hospital brings: local Hugging Face vision and audio folders, a MONAI network with its
safetensors file; frozen outputs computed once; pickle-only folders refused. Tiny models are built from
their configs and saved to tmp folders: nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from hf_folders import tiny_ast, tiny_clip_vision, tiny_dinov2, tiny_vit, tiny_wav2vec2
from model_batches import SAMPLE, tiny_backbone_config, tiny_ingest_config

from meddx.batch import diagnose
from meddx.config import AudioConfig
from meddx.errors import ConfigError, ModelError
from meddx.models import BackboneConfig, FoundationBackbone
from meddx.models.encoders.hf_audio import AudioTrunk, HfAudioEncoder
from meddx.models.encoders.hf_vision import HfImagingEncoder, HfVideoEncoder, VisionTrunk
from meddx.models.encoders.imaging import ImagingEncoder
from meddx.models.frozen import FrozenOutputs
from meddx.models.hf_folder import check_hf_folder, load_hf_model
from meddx.specs import ArrayField
from meddx.training import finetune

VOLUME_SPEC = {
    "volume": ArrayField((4, 16, 16), "float32"),
    "slice_mask": ArrayField((4,), "bool", "mask", of=("volume",)),
}
VIDEO_SPEC = {
    "frames": ArrayField((3, 1, 16, 16), "float32"),
    "frame_mask": ArrayField((3,), "bool", "mask", of=("frames",)),
}
AUDIO_SPEC = {
    "log_mel": ArrayField((8, 63), "float32"),
    "frame_mask": ArrayField((63,), "bool", "mask", of=("log_mel",), axis=1),
    "waveform": ArrayField((4000,), "float32"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {"vit": tiny_vit(root / "vit"), "wav2vec2": tiny_wav2vec2(root / "w2v"), "ast": tiny_ast(root / "ast")}


@pytest.fixture(scope="module")
def ingest_cache(tmp_path_factory) -> Path:
    """The sample cohort's ingest cache, shared by the end-to-end tests (each file read once per config)."""
    return tmp_path_factory.mktemp("ingest-cache")


def _rows_counter(monkeypatch: pytest.MonkeyPatch, trunk_class: type) -> list[int]:
    """Count the rows that reach the trunk's model (a list of per-call row counts)."""
    calls: list[int] = []
    forward = trunk_class.forward

    def counted(self, x):
        calls.append(int(x.shape[0]))
        return forward(self, x)

    monkeypatch.setattr(trunk_class, "forward", counted)
    return calls


# ------------------------------------------------------------------ adapting tensors


def test_vision_trunk_adapts_slices_as_the_processor_does(folders: dict[str, Path]) -> None:
    """One channel to three, resized to the processor's size, normalised with its mean and std: what
    ViTImageProcessor itself gives for the same image as 8-bit RGB pixels."""
    import numpy as np
    from transformers import AutoImageProcessor, ViTImageProcessor

    processor = AutoImageProcessor.from_pretrained(folders["vit"], local_files_only=True)
    trunk = VisionTrunk(load_hf_model(folders["vit"]), processor)
    image = torch.rand(1, 1, 32, 32)  # already the processor's size: no resampling difference
    ours = trunk.adapt(image)
    pixels = (image[0, 0].numpy() * 255).round().astype(np.uint8)
    theirs = processor(np.stack([pixels] * 3, axis=-1), return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    assert torch.allclose(ours, theirs.float(), atol=2.5 / 255 / 0.5)  # 8-bit rounding of the processor's input
    small = trunk.adapt(torch.rand(2, 1, 16, 16))
    assert small.shape == (2, 3, 32, 32)
    # the processor's settings are part of a frozen output's key: other statistics, other keys
    other = VisionTrunk(trunk.model, ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=0.4, image_std=0.2))
    assert FrozenOutputs().version(other) != FrozenOutputs().version(trunk)
    assert FrozenOutputs().version(VisionTrunk(trunk.model, processor)) == FrozenOutputs().version(trunk)


@pytest.mark.parametrize("build", [tiny_dinov2, tiny_clip_vision], ids=["dinov2", "clip"])
def test_dinov2_and_clip_towers_crop_and_normalise_as_their_processors(build, tmp_path: Path) -> None:
    """The shorter edge resized, the centre cropped, their own mean and std: the processor's own pixels
    (for an image already at the shorter edge, so the PIL and torch resamplers play no part)."""
    import numpy as np
    from transformers import AutoImageProcessor

    folder = build(tmp_path / "model")
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    trunk = VisionTrunk(load_hf_model(folder), processor)
    edge = processor.size.shortest_edge
    image = torch.rand(1, 1, edge, edge + 6)
    pixels = (image[0, 0].numpy() * 255).round().astype(np.uint8)
    theirs = processor(np.stack([pixels] * 3, axis=-1), return_tensors="pt")["pixel_values"]
    ours = trunk.adapt(image)
    assert ours.shape == theirs.shape == (1, 3, 28, 28)
    assert torch.allclose(ours, theirs.float(), atol=1.5 / 255 / min(processor.image_std))
    config = BackboneConfig(d_model=16, n_heads=2, imaging={"hf_model": str(folder)})
    out = HfImagingEncoder(config, VOLUME_SPEC).eval()(
        {"volume": torch.rand(2, 4, 16, 16), "slice_mask": torch.ones(2, 4, dtype=torch.bool)}
    )
    assert out.tokens.shape == (2, 4, 16)


def test_audio_trunk_resamples_to_the_extractors_rate_and_uses_its_features(folders: dict[str, Path]) -> None:
    from transformers import AutoFeatureExtractor

    extractor = AutoFeatureExtractor.from_pretrained(folders["ast"], local_files_only=True)
    trunk = AudioTrunk(load_hf_model(folders["ast"]), extractor, sample_rate=4000, tokens=1)
    inputs = trunk.features(torch.randn(2, 4000))  # one second at 4 kHz
    assert inputs["input_values"].shape == (2, 64, 32)  # AST: max_length frames x its mel bins
    wav = AudioTrunk(
        load_hf_model(folders["wav2vec2"]), AutoFeatureExtractor.from_pretrained(folders["wav2vec2"]), 4000, 2
    )
    inputs = wav.features(torch.randn(2, 4000))
    assert inputs["input_values"].shape == (2, 16000)  # resampled to 16 kHz
    assert torch.allclose(inputs["input_values"].mean(dim=1), torch.zeros(2), atol=1e-4)  # do_normalize


def test_vision_encoders_give_one_token_per_observed_slice_and_frame(folders: dict[str, Path]) -> None:
    config = BackboneConfig(d_model=16, n_heads=2, imaging={"hf_model": str(folders["vit"])})
    encoder = HfImagingEncoder(config, VOLUME_SPEC).eval()
    slices = torch.tensor([[True, True, False, False], [True, True, True, True]])
    out = encoder({"volume": torch.rand(2, 4, 16, 16), "slice_mask": slices})
    assert out.tokens.shape == (2, 4, 16)
    assert torch.equal(out.token_mask, slices)
    assert encoder.frozen
    assert len(encoder.trunk_outputs) == 6
    video = BackboneConfig(d_model=16, n_heads=2, video={"hf_model": str(folders["vit"]), "frozen": False})
    video_encoder = HfVideoEncoder(video, VIDEO_SPEC)
    assert not video_encoder.frozen
    assert any(p.requires_grad for p in video_encoder.trunk.parameters())
    out = video_encoder({"frames": torch.rand(2, 3, 1, 16, 16), "frame_mask": torch.ones(2, 3, dtype=torch.bool)})
    assert out.tokens.shape == (2, 3, 16)
    out.tokens.sum().backward()  # fine-tuned: the gradient reaches the vision model
    assert video_encoder.trunk.model.embeddings.patch_embeddings.projection.weight.grad is not None


def test_audio_encoder_needs_the_waveform(folders: dict[str, Path]) -> None:
    config = BackboneConfig(d_model=16, n_heads=2, audio={"hf_model": str(folders["wav2vec2"]), "hf_tokens": 2})
    without = {k: v for k, v in AUDIO_SPEC.items() if k != "waveform"}
    with pytest.raises(ConfigError, match="keep_waveform"):
        HfAudioEncoder(config, without, sample_rate=4000)
    encoder = HfAudioEncoder(config, AUDIO_SPEC, sample_rate=4000).eval()
    frames = torch.ones(2, 63, dtype=torch.bool)
    frames[1] = False  # no recording
    out = encoder({"log_mel": torch.zeros(2, 8, 63), "frame_mask": frames, "waveform": torch.randn(2, 4000)})
    assert out.tokens.shape == (2, 2, 16)
    assert out.token_mask.tolist() == [[True, True], [False, False]]
    assert len(encoder.trunk_outputs) == 1


# ------------------------------------------------------------------ folders refused


def test_a_pickle_only_folder_is_refused_with_how_to_resave(folders: dict[str, Path], tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((folders["vit"] / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(
        ModelError, match=r"pickled.*only pickle weights.*save_pretrained\(folder, safe_serialization=True\)"
    ):
        check_hf_folder(pickled)
    config = BackboneConfig(d_model=16, n_heads=2, imaging={"hf_model": str(pickled)})
    with pytest.raises(ModelError, match="only pickle weights"):
        HfImagingEncoder(config, VOLUME_SPEC)


def test_bad_folders_are_refused_by_name(folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="is not a folder"):
        check_hf_folder(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        check_hf_folder(empty)
    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "config.json").write_text(" " * (1 << 20) + "{}")
    with pytest.raises(ModelError, match="above the"):
        check_hf_folder(huge)
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "config.json").write_text((folders["vit"] / "config.json").read_text())
    (forged / "model.safetensors").write_bytes(b"\x80\x04\x95pickle in disguise")
    with pytest.raises(ModelError, match="pickle"):
        check_hf_folder(forged)
    no_processor = tmp_path / "no-processor"
    no_processor.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_processor / name).write_bytes((folders["vit"] / name).read_bytes())
    config = BackboneConfig(d_model=16, n_heads=2, imaging={"hf_model": str(no_processor)})
    with pytest.raises(ModelError, match="preprocessor_config.json"):
        HfImagingEncoder(config, VOLUME_SPEC)


def test_config_refuses_contradictions() -> None:
    with pytest.raises(ConfigError, match="monai_class"):
        BackboneConfig.from_dict({"imaging": {"network": "monai"}})
    with pytest.raises(ConfigError, match="exclude"):
        BackboneConfig.from_dict({"imaging": {"hf_model": "x", "weights": "y.safetensors"}})
    with pytest.raises(ConfigError, match="audio.frozen"):
        BackboneConfig.from_dict({"audio": {"frozen": True}})
    with pytest.raises(ConfigError, match="monai_kwargs"):
        BackboneConfig.from_dict({"imaging": {"monai_kwargs": {"in_channels": 1}}})
    assert BackboneConfig().video.frozen is None
    assert BackboneConfig().audio.hf_model is None


# ------------------------------------------------------------------ a MONAI network with its safetensors


@pytest.mark.parametrize(
    ("monai_class", "kwargs", "dims"),
    [
        ("resnet10", {"n_input_channels": 1, "feed_forward": False}, 3),
        ("DenseNet121", {"in_channels": 1, "out_channels": 8}, 2),
    ],
)
def test_a_monai_network_loads_its_safetensors(tmp_path: Path, monai_class: str, kwargs: dict, dims: int) -> None:
    from monai.networks import nets
    from safetensors.torch import save_file

    torch.manual_seed(1)
    trained = getattr(nets, monai_class)(spatial_dims=dims, **kwargs)
    weights = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(weights))
    imaging = {"network": "monai", "monai_class": monai_class, "monai_kwargs": kwargs, "spatial_dims": dims}
    imaging |= {"weights": str(weights), "input_pool": 1}
    config = BackboneConfig(d_model=16, n_heads=2, imaging=imaging)
    spec = {
        "volume": ArrayField((16, 32, 32), "float32"),
        "slice_mask": VOLUME_SPEC["slice_mask"]._replace(shape=(16,)),
    }
    encoder = ImagingEncoder(config, spec).eval()
    assert encoder.frozen  # weights given: frozen unless told otherwise
    loaded = encoder.trunk.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trained.state_dict().items())
    out = encoder({"volume": torch.rand(2, 16, 32, 32), "slice_mask": torch.ones(2, 16, dtype=torch.bool)})
    assert out.tokens.shape == (2, 1, 16)
    pickled = tmp_path / "net.pt"
    torch.save(trained.state_dict(), pickled)
    with pytest.raises(ModelError, match="never loads pickle"):
        ImagingEncoder(
            config.model_copy(update={"imaging": config.imaging.model_copy(update={"weights": str(pickled)})}), spec
        )
    with pytest.raises(ConfigError, match="not a network class"):
        ImagingEncoder(BackboneConfig(imaging={"network": "monai", "monai_class": "os"}), spec)


# ------------------------------------------------------------------ end to end, and computed once


def _finetune(out: Path | None, cache: Path, backbone: BackboneConfig, epochs: int = 2, **ingest_audio):
    ingest = tiny_ingest_config()
    if ingest_audio:
        ingest = ingest.model_copy(update={"audio": AudioConfig(duration_s=0.5, n_mels=8, **ingest_audio)})
    return finetune(
        SAMPLE,
        out,
        mode="full",
        epochs=epochs,
        patience=epochs,
        seed=0,
        backbone_config=backbone,
        ingest_config=ingest,
        cache_dir=cache,
        workers=0,
        progress=False,
    )


def test_a_vision_encoder_from_a_local_folder_fine_tunes_and_diagnoses(
    folders: dict[str, Path], tmp_path: Path, ingest_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDDX_CACHE", str(tmp_path / "meddx-cache"))
    backbone = tiny_backbone_config(imaging={"hf_model": str(folders["vit"])}, video={"hf_model": str(folders["vit"])})
    model = _finetune(tmp_path / "model", ingest_cache, backbone)
    assert isinstance(model.backbone.encoders["imaging"], HfImagingEncoder)
    assert isinstance(model.backbone.encoders["video"], HfVideoEncoder)
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["backbone"]["imaging"]["hf_model"] == str(folders["vit"])
    reloaded = FoundationBackbone.from_pretrained(tmp_path / "model")
    before, after = model.backbone.state_dict(), reloaded.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("encoders.imaging."))
    result = diagnose(
        SAMPLE, tmp_path / "model", tmp_path / "run", split="test", cache_dir=ingest_cache, workers=0, progress=False
    )
    frame = pd.read_parquet(result.predictions)
    assert len(frame) == 12
    assert (frame.status == "ok").all()
    assert frame.probability.between(0, 1).all()
    with_imaging = frame[frame.modalities.str.contains("imaging")]
    assert len(with_imaging)
    assert with_imaging["contribution:imaging"].notna().all()


def test_an_audio_encoder_from_a_local_folder_fine_tunes_and_diagnoses(
    folders: dict[str, Path], tmp_path: Path, ingest_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDDX_CACHE", str(tmp_path / "meddx-cache"))
    backbone = tiny_backbone_config(audio={"hf_model": str(folders["wav2vec2"]), "hf_tokens": 2, "frozen": False})
    model = _finetune(tmp_path / "model", ingest_cache, backbone, keep_waveform=True)
    encoder = model.backbone.encoders["audio"]
    assert isinstance(encoder, HfAudioEncoder)
    assert not encoder.frozen
    start = load_hf_model(folders["wav2vec2"]).state_dict()
    trained = encoder.trunk.model.state_dict()
    assert any(not torch.equal(start[k], trained[k]) for k in start)  # the audio model itself trained
    result = diagnose(
        SAMPLE, tmp_path / "model", tmp_path / "run", split="test", cache_dir=ingest_cache, workers=0, progress=False
    )
    frame = pd.read_parquet(result.predictions)
    assert len(frame) == 12
    assert (frame.status == "ok").all()
    with_audio = frame[frame.modalities.str.contains("audio")]
    assert len(with_audio)
    assert with_audio["contribution:audio"].notna().all()


def test_frozen_outputs_are_computed_once_across_epochs_and_runs(
    folders: dict[str, Path], tmp_path: Path, ingest_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frozen AST (audio) and ViT (imaging): one epoch or two compute the same rows, and a second
    run over the same cache folder computes none."""
    monkeypatch.setenv("MEDDX_CACHE", str(tmp_path / "meddx-cache"))
    vision, audio = _rows_counter(monkeypatch, VisionTrunk), _rows_counter(monkeypatch, AudioTrunk)
    backbone = tiny_backbone_config(imaging={"hf_model": str(folders["vit"])}, audio={"hf_model": str(folders["ast"])})
    _finetune(None, ingest_cache, backbone, epochs=1, keep_waveform=True)
    one_epoch = (sum(vision) - 1, sum(audio) - 1)  # less the construction's dry pass
    assert one_epoch[0] > 0
    assert one_epoch[1] > 0
    monkeypatch.setenv("MEDDX_CACHE", str(tmp_path / "other-cache"))
    vision.clear(), audio.clear()
    _finetune(None, ingest_cache, backbone, epochs=2, keep_waveform=True)
    assert (sum(vision) - 1, sum(audio) - 1) == one_epoch  # epoch 2 ran neither model
    vision.clear(), audio.clear()
    _finetune(None, ingest_cache, backbone, epochs=1, keep_waveform=True)
    assert (sum(vision), sum(audio)) == (1, 1)  # the next run read every output from disk: only the dry passes

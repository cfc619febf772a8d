"""save_pretrained / from_pretrained: exact round trips, and refusals that say what to do."""

from __future__ import annotations

import json

import pytest
import torch
from model_batches import fitted_aligner, random_patient, tiny_backbone_config
from safetensors.torch import load_file

from meddx.align import Aligner
from meddx.errors import ModelError
from meddx.models import FoundationBackbone
from meddx.models.checkpoint import TEXT_PREFIX, read_aligner
from meddx.records import MODALITIES, Modality, collate


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    aligner, patients = fitted_aligner()
    torch.manual_seed(0)
    backbone = FoundationBackbone.from_aligner(tiny_backbone_config(), aligner).eval()
    folder = backbone.save_pretrained(tmp_path_factory.mktemp("model"))
    batch = collate([aligner.transform(p) for p in patients], aligner.tensor_spec())
    return backbone, folder, batch, aligner


def _copy(folder, tmp_path):
    target = tmp_path / "copy"
    target.mkdir(parents=True)
    for path in folder.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_round_trip_gives_identical_outputs(saved) -> None:
    backbone, folder, batch, aligner = saved
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = FoundationBackbone.from_pretrained(folder).eval()
    with torch.no_grad():
        a, b = backbone(batch), loaded(batch)
    for field in ("pooled", "modality_embeddings", "encoder_embeddings", "tokens"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    restored = loaded.aligner()
    assert isinstance(restored, Aligner)
    assert restored.array_spec() == aligner.array_spec()
    assert loaded.config == backbone.config


def test_the_aligner_is_read_without_building_the_network(saved) -> None:
    """diagnose starts ingesting with it while the network loads; it must be the one the network uses."""
    backbone, folder, batch, aligner = saved
    read = read_aligner(folder)
    assert (
        read.state_dict() == aligner.state_dict() == FoundationBackbone.from_pretrained(folder).aligner().state_dict()
    )
    patient = aligner.transform(fitted_aligner()[1][0])
    again = read.transform(fitted_aligner()[1][0])
    for modality, arrays in patient.tensors.items():
        for name, value in arrays.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(again.tensors[modality][name]))


def test_the_bundled_frozen_text_model_is_not_copied(saved) -> None:
    _, folder, _, _ = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["text_weights"] == "bundled"
    assert config["text_model_version"]
    assert not any(k.startswith(TEXT_PREFIX) for k in load_file(str(folder / "model.safetensors")))


def test_a_trainable_text_model_travels_with_the_weights(tmp_path) -> None:
    aligner, _ = fitted_aligner()
    spec = {m: s for m, s in aligner.array_spec().items() if m == Modality.NOTES}
    torch.manual_seed(0)
    backbone = FoundationBackbone(tiny_backbone_config(text={"frozen": False}), spec).eval()
    with torch.no_grad():  # make its weights differ from the bundled ones
        next(backbone.encoders["notes"].text_model.parameters()).add_(0.5)
    backbone.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["text_weights"] == "included"
    loaded = FoundationBackbone.from_pretrained(tmp_path).eval()
    batch = collate([random_patient(aligner.array_spec(), [Modality.NOTES], 3)], aligner.tensor_spec())
    with torch.no_grad():
        assert torch.equal(backbone(batch).pooled, loaded(batch).pooled)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "weights.pt", "state.pkl"])
def test_a_folder_holding_pickle_is_refused(saved, tmp_path, name) -> None:
    folder = _copy(saved[1], tmp_path)
    torch.save({"x": torch.zeros(1)}, folder / name)
    with pytest.raises(ModelError, match=f"{name}.*never loads pickle"):
        FoundationBackbone.from_pretrained(folder)


def test_a_pickle_named_safetensors_is_refused(saved, tmp_path) -> None:
    folder = _copy(saved[1], tmp_path)
    torch.save(saved[0].state_dict(), folder / "model.safetensors")
    with pytest.raises(ModelError, match="never loads pickle"):
        FoundationBackbone.from_pretrained(folder)


def test_corrupt_or_mismatched_weights_are_refused(saved, tmp_path) -> None:
    folder = _copy(saved[1], tmp_path)
    (folder / "model.safetensors").write_bytes(b"{not safetensors")
    with pytest.raises(ModelError, match="not a readable safetensors"):
        FoundationBackbone.from_pretrained(folder)
    other = _copy(saved[1], tmp_path / "b")
    config = json.loads((other / "config.json").read_text())
    config["backbone"]["d_model"] = 32
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="does not fit"):
        FoundationBackbone.from_pretrained(other)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format_version": 3}, "format_version 3"),
        ({"meddx_version": "9.0.0"}, "upgrade meddx"),
        ({"format": "something-else"}, "not a meddx backbone config"),
        ({"unexpected": 1}, "schema"),
        ({"backbone": {"d_model": 64, "n_layer": 2}}, "schema"),
    ],
)
def test_a_config_it_does_not_understand_is_refused(saved, tmp_path, change, message) -> None:
    folder = _copy(saved[1], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=message):
        FoundationBackbone.from_pretrained(folder)


def test_a_format_1_folder_loads_with_the_settings_it_was_trained_with(saved, tmp_path) -> None:
    folder = _copy(saved[1], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["format_version"] = 1
    backbone_config = config["backbone"]
    backbone_config["dropout"] = 0.2
    for key in ("attention_dropout",):
        del backbone_config[key]
    for section in ("imaging", "video"):
        del backbone_config[section]["input_pool"]
    (folder / "config.json").write_text(json.dumps(config))
    loaded = FoundationBackbone.from_pretrained(folder)
    assert loaded.config.imaging.input_pool == loaded.config.video.input_pool == 1
    assert loaded.config.attention_dropout == 0.2


def test_missing_files_are_named(saved, tmp_path) -> None:
    folder = _copy(saved[1], tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="has no model.safetensors"):
        FoundationBackbone.from_pretrained(folder)
    with pytest.raises(ModelError, match="does not exist"):
        FoundationBackbone.from_pretrained(tmp_path / "nowhere")


def test_every_modality_is_saved(saved) -> None:
    config = json.loads((saved[1] / "config.json").read_text())
    assert set(config["array_spec"]) == {m.value for m in MODALITIES}

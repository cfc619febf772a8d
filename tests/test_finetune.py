"""Fine-tuning: the three modes, the model folder, predictions, resume, LoRA, splits, torchrun DDP."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from model_batches import SAMPLE, tiny_backbone_config, tiny_ingest_config
from safetensors.torch import load_file

from meddx.batch import predict_cohort
from meddx.cli import main
from meddx.cohort import TaskSpec, load_cohort
from meddx.errors import ConfigError, ModelError
from meddx.models import FoundationBackbone
from meddx.models.diagnosis import DiagnosisModel
from meddx.models.heads import DiagnosisHeads, class_weights_from, task_loss
from meddx.splits import with_splits
from meddx.training import finetune, pretrain
from meddx.training.batch_norm import recompute_batch_norm_statistics

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny pretrained backbone (one epoch) and the cache it was made with."""
    root = tmp_path_factory.mktemp("finetune")
    cache = root / "cache"
    pretrain(
        SAMPLE,
        root / "backbone",
        epochs=1,
        batch_size=16,
        backbone_config=tiny_backbone_config(),
        ingest_config=tiny_ingest_config(),
        cache_dir=cache,
        workers=0,
        progress=False,
    )
    return root, cache


def test_unknown_labels_stay_out_of_the_loss() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5])
    labels = torch.tensor([1, -1, 0])
    known = labels >= 0
    loss = task_loss(logits, labels, known, "binary", None)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[[0, 2]], torch.tensor([1.0, 0.0]))
    assert loss == pytest.approx(float(expected))
    assert task_loss(logits, labels, torch.zeros(3, dtype=torch.bool), "binary", None) is None
    weights = class_weights_from(torch.tensor([0, 0, 0, 1, -1]), 2)
    assert weights[1] > weights[0]  # the rare class weighs more


@pytest.mark.slow
def test_heads_remove_the_class_weight_shift_outside_training() -> None:
    """A weighted loss learns log-odds + log(pos_weight); eval-mode logits estimate the real probability."""
    torch.manual_seed(0)
    labels = (torch.rand(20000) < 0.3).long()
    pooled = torch.zeros(20000, 4)  # nothing to learn but the base rate
    heads = DiagnosisHeads(4, {"t": TaskSpec("t", "binary", ("0", "1"))}, dropout=0.0)
    weights = torch.tensor([0.5, 1.5])
    heads.set_class_weights("t", weights)
    optimizer = torch.optim.Adam([p for p in heads.parameters() if p.requires_grad], lr=0.05)
    for _ in range(300):
        heads.train()
        loss = task_loss(heads(pooled)["t"], labels, labels >= 0, "binary", weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    heads.train()
    assert torch.sigmoid(heads(pooled)["t"]).mean() > 0.5  # the weighted optimum: odds tripled
    heads.eval()
    assert float(torch.sigmoid(heads(pooled)["t"]).mean()) == pytest.approx(float(labels.float().mean()), abs=0.01)


@pytest.mark.slow
def test_head_mode_gives_a_calibrated_model_and_contract_predictions(base) -> None:
    root, cache = base
    model = finetune(
        SAMPLE,
        root / "head",
        mode="head",
        epochs=40,
        backbone=root / "backbone",
        cache_dir=cache,
        workers=0,
        progress=False,
    )
    saved = {p.name for p in (root / "head").iterdir()}
    assert {"config.json", "model.safetensors", "calibration.json", "metrics.json"} <= saved
    calibration = json.loads((root / "head" / "calibration.json").read_text())["tasks"]["disease"]
    assert calibration["calibrator"]["n_fitted"] > 0
    assert calibration["conformal"]["alpha"] == 0.1
    predictions = predict_cohort(model, SAMPLE, split="test", cache_dir=cache, workers=0)
    test_rows = [r for r in load_cohort(SAMPLE) if r.split == "test"]
    assert len(predictions) == len(test_rows)  # one row per (patient, index time, task)
    for column in (
        "patient_id",
        "index_time",
        "task",
        "probability",
        "raw_probability",
        "prediction",
        "prediction_set",
        "modalities",
        "status",
        "sex",
    ):
        assert column in predictions.columns, column
    assert predictions["probability"].between(0, 1).all()
    assert (predictions["status"] == "ok").all()
    # a contribution for each present modality, empty where the modality was absent
    for _, row in predictions.iterrows():
        used = set(row["modalities"].split("|"))
        for modality in ("imaging", "ehr", "notes", "device_logs", "audio", "video"):
            value = row.get(f"contribution:{modality}")
            assert (modality in used) == (value is not None and not pd.isna(value)), (modality, used)
    # the head mode leaves the backbone as it was
    before = FoundationBackbone.from_pretrained(root / "backbone").state_dict()
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("encoders.notes.text_model."))


@pytest.mark.slow
def test_a_model_folder_round_trip_gives_identical_predictions(base) -> None:
    root, cache = base
    model = finetune(
        SAMPLE,
        root / "full",
        mode="full",
        epochs=2,
        backbone=root / "backbone",
        cache_dir=cache,
        workers=0,
        progress=False,
    )
    first = predict_cohort(model, SAMPLE, split="test", cache_dir=cache, workers=0)
    again = predict_cohort(
        DiagnosisModel.from_pretrained(root / "full"), SAMPLE, split="test", cache_dir=cache, workers=0
    )
    pd.testing.assert_frame_equal(first, again, check_exact=False, atol=1e-6)
    # the fine-tuned folder is also a backbone folder
    assert FoundationBackbone.from_pretrained(root / "full").config == model.backbone.config


@pytest.mark.slow
def test_full_mode_keeps_batch_norm_statistics_of_the_final_weights(base) -> None:
    """Eval mode must normalise as training did: the statistics of the training rows under the kept weights.

    The running average that batch norm keeps during training trails the weights AdamW moves; left
    as it is, eval-mode logits shift (the cause of the miscalibrated fused benchmark model).
    """
    from meddx.data import prepare_cohort
    from meddx.records import Modality

    root, cache = base
    model = finetune(
        SAMPLE,
        mode="full",
        epochs=3,
        batch_size=8,
        learning_rate=3e-3,
        backbone=root / "backbone",
        cache_dir=cache,
        workers=0,
        progress=False,
    )
    prepared = prepare_cohort(SAMPLE, cache_dir=cache, aligner=model.aligner, workers=0, progress=False)
    train = prepared.dataset(split="train", tasks=["disease"]).with_inputs()
    encoder = model.backbone.encoders["imaging"]
    norm = next(m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm3d))
    batch_means: list[torch.Tensor] = []
    hook = norm.register_forward_hook(lambda _m, inputs, _o: batch_means.append(inputs[0].mean(dim=(0, 2, 3, 4))))
    encoder.eval()
    try:
        with torch.no_grad():
            for batch in torch.utils.data.DataLoader(train, batch_size=8, collate_fn=train.collate):
                if Modality.IMAGING in batch.tensors and len(batch.rows_with(Modality.IMAGING)) > 1:
                    encoder(batch.tensors[Modality.IMAGING])
    finally:
        hook.remove()
    # the layers before this one are batch norm free, so eval mode gives them the training inputs
    expected = torch.stack(batch_means).mean(dim=0)
    torch.testing.assert_close(norm.running_mean, expected, atol=1e-5, rtol=1e-4)
    # rows without imaging leave its statistics as they were, instead of resetting them
    no_imaging = [item.row for item in train if Modality.IMAGING not in item.tensors]
    assert no_imaging
    before = norm.running_mean.clone()
    assert recompute_batch_norm_statistics(model, prepared.dataset(rows=no_imaging), batch_size=8) == 0
    torch.testing.assert_close(norm.running_mean, before, atol=0, rtol=0)


@pytest.mark.slow
def test_heads_can_read_the_summary_and_the_modality_embeddings(base) -> None:
    root, cache = base
    model = finetune(
        SAMPLE,
        root / "wide",
        mode="head",
        epochs=10,
        backbone=root / "backbone",
        cache_dir=cache,
        workers=0,
        progress=False,
        head_input="summary+modalities",
    )
    width = 2 * model.backbone.config.d_model
    assert model.heads.heads["disease"][-1].in_features == width
    first = predict_cohort(model, SAMPLE, split="test", cache_dir=cache, workers=0)
    loaded = DiagnosisModel.from_pretrained(root / "wide")
    assert loaded.head_input == "summary+modalities"
    pd.testing.assert_frame_equal(
        first, predict_cohort(loaded, SAMPLE, split="test", cache_dir=cache, workers=0), check_exact=False, atol=1e-6
    )
    with pytest.raises(ConfigError, match="head_input"):
        DiagnosisModel(model.backbone, model.tasks, head_input="everything")


@pytest.mark.slow
def test_lora_leaves_the_saved_base_weights_unchanged(base) -> None:
    root, cache = base
    model = finetune(
        SAMPLE,
        root / "lora",
        mode="lora",
        epochs=2,
        backbone=root / "backbone",
        cache_dir=cache,
        workers=0,
        progress=False,
        lora={"r": 2, "alpha": 4},
    )
    base_weights = load_file(str(root / "backbone" / "model.safetensors"))
    tuned = load_file(str(root / "lora" / "model.safetensors"))
    for key, value in base_weights.items():
        assert torch.equal(tuned[key], value), key  # every base weight as it was
    adapter = load_file(str(root / "lora" / "adapter.safetensors"))
    assert adapter
    assert all("lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # the adapters did learn
    loaded = DiagnosisModel.from_pretrained(root / "lora")
    np.testing.assert_allclose(
        predict_cohort(loaded, SAMPLE, split="test", cache_dir=cache, workers=0)["probability"],
        predict_cohort(model, SAMPLE, split="test", cache_dir=cache, workers=0)["probability"],
        atol=1e-6,
    )


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(base) -> None:
    root, cache = base
    finetune(
        SAMPLE,
        root / "resume",
        mode="full",
        epochs=1,
        patience=5,
        backbone=root / "backbone",
        cache_dir=cache,
        workers=0,
        progress=False,
    )
    model = finetune(
        SAMPLE,
        root / "resume",
        mode="full",
        epochs=2,
        patience=5,
        backbone=root / "backbone",
        cache_dir=cache,
        workers=0,
        progress=False,
        resume=True,
    )
    assert model.training_info["epochs_run"] == 2
    checkpoint = root / "resume" / "checkpoint"
    assert {p.suffix for p in checkpoint.iterdir()} <= {".safetensors", ".json"}
    # the bundled frozen text model is kept by reference (its hash), not copied: neither in the
    # checkpoint's weights nor in the model folder's
    for name in ("last.safetensors", "best.safetensors"):
        assert not any(".text_model." in k for k in load_file(str(checkpoint / name))), name
    assert not any(".text_model." in k for k in load_file(str(root / "resume" / "model.safetensors")))
    by_reference = json.loads((checkpoint / "progress.json").read_text())["text_models_by_reference"]
    assert by_reference == {"backbone.encoders.notes.text_model.": model.backbone.notes_encoder.version}


@pytest.mark.slow
def test_bad_requests_are_refused_with_what_to_do(base, tmp_path: Path) -> None:
    root, cache = base
    with pytest.raises(ConfigError, match="unknown task"):
        finetune(SAMPLE, tasks=["sepsis"], cache_dir=cache, workers=0, progress=False)
    with pytest.raises(ConfigError, match="mode"):
        finetune(SAMPLE, mode="everything", cache_dir=cache, workers=0, progress=False)
    with pytest.raises(ModelError, match="without diagnostic heads"):
        DiagnosisModel.from_pretrained(root / "backbone")


def test_a_seeded_split_keeps_each_patient_in_one_split(tmp_path: Path) -> None:
    frame = pd.read_csv(SAMPLE, dtype=str, keep_default_na=False)
    frame = frame.drop(columns=["split"])
    twice = frame.copy()
    twice["index_time"] = "2024-06-01T00:00:00Z"  # every patient again, at a later index time
    manifest = SAMPLE.parent / "no_split_test_manifest.csv"
    try:
        pd.concat([frame, twice]).to_csv(manifest, index=False)
        cohort = with_splits(load_cohort(manifest), seed=1)
    finally:
        manifest.unlink()
    split_of: dict[str, set] = {}
    for row in cohort:
        split_of.setdefault(row.patient_id, set()).add(row.split)
    assert all(len(s) == 1 for s in split_of.values())
    assert {s for v in split_of.values() for s in v} == {"train", "val", "test"}


@pytest.mark.slow
def test_finetune_command(base, tmp_path: Path) -> None:
    """Also: the epoch message counts epochs (head mode validates every 2nd of 100), files follow the umask."""
    root, cache = base
    before = os.umask(0o027)
    try:
        result = CliRunner().invoke(
            main,
            [
                "finetune",
                str(SAMPLE),
                "--out",
                str(tmp_path / "model"),
                "--backbone",
                str(root / "backbone"),
                "--mode",
                "head",
                "--epochs",
                "100",
                "--cache",
                str(cache),
                "--workers",
                "0",
                "--quiet",
            ],
        )
    finally:
        os.umask(before)
    assert result.exit_code == 0, result.output
    assert "validation AUROC" in result.output
    assert (tmp_path / "model" / "calibration.json").is_file()
    best, run = (int(n) for n in re.search(r"best epoch (\d+) of (\d+)", result.output).groups())
    history = json.loads((tmp_path / "model" / "metrics.json").read_text())["history"]
    assert best <= run
    assert len(history) == run // 2  # a check every 2nd epoch: 100 // 50
    assert run == 100 or run - best >= 5 * 2  # patience 5 checks
    for name in ("model.safetensors", "metrics.json", "calibration.json", "config.json"):
        assert stat.S_IMODE((tmp_path / "model" / name).stat().st_mode) == 0o640, name


DDP_SCRIPT = """
import sys
from meddx.training import finetune
from meddx.training.batch_norm import recompute_batch_norm_statistics
from meddx.models import BackboneConfig
import json
if __name__ == "__main__":
    out, cache, manifest, config = sys.argv[1:5]
    finetune(manifest, out, mode="full", epochs=2, batch_size=8, seed=0, cache_dir=cache, workers=0,
             progress=False, backbone_config=BackboneConfig.model_validate_json(config), head_dropout=0.0)
"""


@pytest.mark.slow
def test_torchrun_ddp_gives_the_single_process_result(tmp_path: Path) -> None:
    """2 processes (gloo, CPU) with half of each global batch each make the same updates as one process.

    Without imaging (its encoder uses batch norm, whose statistics are per process) and without dropout
    (each process draws its own), the averaged gradients equal the single process's: the validation AUROC
    of every epoch agrees to 1e-6, the weights to within a few Adam steps of float rounding (5e-3).
    """
    frame = pd.read_csv(SAMPLE, dtype=str, keep_default_na=False)
    frame["imaging"] = ""
    manifest = SAMPLE.parent / "ddp_test_manifest.csv"
    config = tiny_backbone_config(modality_dropout=0.0).model_dump_json()
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "TMPDIR": str(tmp_path),
    }  # torchrun leaves its rendezvous files there
    try:
        frame.to_csv(manifest, index=False)
        cache = tmp_path / "cache"
        single = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "one"), str(cache), str(manifest), config],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert single.returncode == 0, single.stderr[-3000:]
        ddp = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                "2",
                str(script),
                str(tmp_path / "two"),
                str(cache),
                str(manifest),
                config,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert ddp.returncode == 0, ddp.stderr[-3000:]
    finally:
        manifest.unlink()
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert json.loads((tmp_path / "two" / "config.json").read_text())["diagnosis"]["training"]["world_size"] == 2
    a, b = (
        load_file(str(tmp_path / "one" / "model.safetensors")),
        load_file(str(tmp_path / "two" / "model.safetensors")),
    )
    # Adam turns rounding-level gradient differences of near-zero gradients into steps of up to lr (1e-3)
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 5e-3
    assert one["history"] == pytest.approx(two["history"], abs=1e-6)


HEAD_DDP_SCRIPT = """
import logging
import sys
from meddx.training import finetune
from meddx.models import BackboneConfig
if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    out, cache, config = sys.argv[1:4]
    finetune(sys.argv[4], out, mode="head", epochs=30, batch_size=8, seed=0, cache_dir=cache, workers=0,
             progress=False, backbone_config=BackboneConfig.model_validate_json(config), head_dropout=0.0)
"""


@pytest.mark.slow
def test_torchrun_head_mode_embeds_one_shard_per_rank_and_gives_the_single_process_result(tmp_path: Path) -> None:
    """``head`` mode under torchrun: each of 2 ranks runs the backbone over half the rows, then both fit the
    heads on every row's embeddings: the same validation history and heads as one process."""
    config = tiny_backbone_config().model_dump_json()
    script = tmp_path / "ddp_head.py"
    script.write_text(HEAD_DDP_SCRIPT)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "TMPDIR": str(tmp_path),
    }  # torchrun leaves its rendezvous files there
    cache = tmp_path / "cache"
    single = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one"), str(cache), config, str(SAMPLE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(tmp_path / "two"),
            str(cache),
            config,
            str(SAMPLE),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    train_rows = json.loads((tmp_path / "one" / "config.json").read_text())["diagnosis"]["training"]["rows"]["train"]
    for rank, rows in ((0, (train_rows + 1) // 2), (1, train_rows // 2)):
        assert f"rank {rank} embeds {rows} of {train_rows} rows" in ddp.stderr
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert one["history"] == pytest.approx(two["history"], abs=1e-5)
    one_weights, two_weights = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("one", "two"))
    assert max(float((one_weights[k].float() - two_weights[k].float()).abs().max()) for k in one_weights) < 1e-4

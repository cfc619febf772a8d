"""Self-supervised pretraining: the objectives, the loop, checkpoints, resume, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from model_batches import SAMPLE, tiny_backbone_config, tiny_ingest_config

from meddx.cli import main
from meddx.errors import ModelError
from meddx.models import FoundationBackbone
from meddx.models.pretraining import choose_hidden_modalities, info_nce
from meddx.training import pretrain


def test_one_present_modality_is_hidden_per_patient_with_two_or_more() -> None:
    present = torch.tensor(
        [[True, True, False, True, False, False], [False, True, False, False, False, False], [True] * 6]
    )
    for seed in range(20):
        hidden = choose_hidden_modalities(present, torch.Generator().manual_seed(seed))
        assert hidden.sum(dim=1).tolist() == [1, 0, 1]  # a lone modality is never hidden
        assert not (hidden & ~present).any()  # only present ones


def test_info_nce_prefers_matched_pairs() -> None:
    a = torch.nn.functional.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    matched = info_nce(a, a, temperature=0.1)
    shuffled = info_nce(a, a[torch.randperm(16, generator=torch.Generator().manual_seed(1))], temperature=0.1)
    assert matched < shuffled


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Path, list]:
    """Two epochs straight through, and the cache they share."""
    root = tmp_path_factory.mktemp("pretrain")
    cache = root / "cache"
    result = pretrain(
        SAMPLE,
        root / "straight",
        epochs=2,
        batch_size=16,
        seed=3,
        backbone_config=tiny_backbone_config(modality_dropout=0.3),
        ingest_config=tiny_ingest_config(),
        cache_dir=cache,
        workers=0,
        progress=False,
    )
    return root, cache, result.epochs


@pytest.mark.slow
def test_pretraining_writes_a_loadable_backbone_and_safe_checkpoints(pretrained) -> None:
    root, _, epochs = pretrained
    assert len(epochs) == 2
    assert all(torch.isfinite(torch.tensor([e["masked"], e["contrastive"]])).all() for e in epochs)
    out = root / "straight"
    assert {"config.json", "model.safetensors", "pretraining.json"} <= {p.name for p in out.iterdir()}
    backbone = FoundationBackbone.from_pretrained(out)
    assert backbone.aligner() is not None  # the fitted tensorizers travel with the weights
    checkpoint = {p.suffix for p in (out / "checkpoint").iterdir()}
    assert checkpoint <= {".safetensors", ".json"}  # no pickle anywhere


@pytest.mark.slow
def test_a_resumed_run_goes_on_exactly_as_an_uninterrupted_one(pretrained) -> None:
    root, cache, straight = pretrained
    common = dict(
        batch_size=16,
        seed=3,
        backbone_config=tiny_backbone_config(modality_dropout=0.3),
        ingest_config=tiny_ingest_config(),
        cache_dir=cache,
        workers=0,
        progress=False,
    )
    pretrain(SAMPLE, root / "resumed", epochs=1, **common)
    resumed = pretrain(SAMPLE, root / "resumed", epochs=2, resume=True, **common).epochs
    for a, b in zip(straight, resumed, strict=True):
        assert a["total"] == pytest.approx(b["total"], rel=1e-5)
    first = FoundationBackbone.from_pretrained(root / "straight").state_dict()
    second = FoundationBackbone.from_pretrained(root / "resumed").state_dict()
    # equal up to float rounding (thread reduction order differs between runs)
    assert all(torch.allclose(first[k], second[k], atol=1e-3) for k in first)


@pytest.mark.slow
def test_resume_without_a_checkpoint_is_refused(tmp_path: Path, pretrained) -> None:
    _, cache, _ = pretrained
    with pytest.raises(ModelError, match="no checkpoint"):
        pretrain(
            SAMPLE,
            tmp_path / "new",
            epochs=1,
            resume=True,
            backbone_config=tiny_backbone_config(),
            ingest_config=tiny_ingest_config(),
            cache_dir=cache,
            workers=0,
            progress=False,
        )


@pytest.mark.slow
def test_pretrain_command(tmp_path: Path, pretrained) -> None:
    _, cache, _ = pretrained
    backbone_config = tmp_path / "backbone.json"
    backbone_config.write_text(tiny_backbone_config().model_dump_json())
    ingest_config = tmp_path / "ingest.json"
    ingest_config.write_text(tiny_ingest_config().model_dump_json())
    result = CliRunner().invoke(
        main,
        [
            "pretrain",
            str(SAMPLE),
            "--out",
            str(tmp_path / "out"),
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--cache",
            str(cache),
            "--config",
            str(ingest_config),
            "--backbone-config",
            str(backbone_config),
            "--workers",
            "0",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "epoch 1: loss" in result.output
    assert json.loads((tmp_path / "out" / "pretraining.json").read_text())["epochs"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"d_model": 3}')
    result = CliRunner().invoke(
        main, ["pretrain", str(SAMPLE), "--out", str(tmp_path / "x"), "--backbone-config", str(bad), "--quiet"]
    )
    assert result.exit_code == 2
    assert "backbone config" in result.output

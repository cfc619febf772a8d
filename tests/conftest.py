"""Shared fixtures: one tiny model fine-tuned on the bundled sample cohort, for every test that needs one."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_MANIFEST = REPO / "sample_data" / "manifest.csv"


@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory) -> Path:
    """An ingest cache shared by the tests that read sample_data (each file is read once)."""
    return tmp_path_factory.mktemp("sample-cache")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, sample_cache: Path) -> Path:
    """A model folder: a new tiny backbone fine-tuned end to end for two epochs on sample_data, calibrated."""
    from meddx.models import BackboneConfig
    from meddx.train import finetune

    out = tmp_path_factory.mktemp("tiny-model")
    finetune(SAMPLE_MANIFEST, out, mode="full", epochs=2, seed=0, cache_dir=sample_cache, workers=2, progress=False,
             backbone_config=BackboneConfig(d_model=16, n_layers=1, n_heads=2))
    return out

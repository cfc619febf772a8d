"""The generated cohorts the model benchmarks share (3000 patients, seed 11; additive or interacting), made once.

It lives under ``benchmarks/out/`` (ignored by git); delete the folder to make it again.
Generating and ingesting it the first time takes several minutes on a 2-core machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

OUT = Path(__file__).resolve().parent / "out"
N_PATIENTS = 3000
SEED = 11


def bench_cohort(n_patients: int = N_PATIENTS, seed: int = SEED, *, interactions: bool = False) -> Path:
    """The manifest of the shared cohort, generating it when absent.

    ``interactions=True``: the same patients with interacting modalities
    (``generate_cohort(..., interactions=True)``, :mod:`meddx.synth.interactions`), in a folder of its own.
    """
    from meddx.synth import generate_cohort

    folder = OUT / (f"cohort-{n_patients}-seed{seed}" + ("-interaction" if interactions else ""))
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        generate_cohort(folder, n_patients=n_patients, seed=seed, interactions=interactions)
    return manifest


def sub_manifest(manifest: Path, name: str, rows: slice, keep_labels: bool = True, split: str | None = None) -> Path:
    """A manifest of some rows of ``manifest``, written beside it (paths stay relative)."""
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False).iloc[rows].copy()
    if not keep_labels:
        frame = frame.drop(columns=[c for c in frame.columns if c.startswith("label:")])
    if split is None:
        frame = frame.drop(columns=["split"], errors="ignore")
    else:
        frame["split"] = split
    path = manifest.parent / f"{name}.csv"
    frame.to_csv(path, index=False)
    return path


def pretrained_backbone(
    manifest: Path, folder: Path, epochs: int, cache: Path, workers: int, backbone_config=None
) -> Path:
    """``folder``: a backbone pretrained (``meddx.pretrain``, seed 0) on the manifest's train rows with
    labels and split withheld; a finished run of as many epochs is reused.

    The unlabelled rows are written beside the manifest (its paths are relative to that folder) as
    ``<folder name>-unlabelled.csv``.
    """
    from meddx.training import pretrain

    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    labels = [c for c in frame.columns if c.startswith("label:")]
    unlabelled = frame[frame["split"] == "train"].drop(columns=["split", *labels])
    pool = manifest.parent / f"{folder.name}-unlabelled.csv"
    unlabelled.to_csv(pool, index=False)
    done = folder / "pretraining.json"
    started = time.perf_counter()
    if done.is_file() and len(json.loads(done.read_text())["epochs"]) == epochs:
        print(f"pretraining: reusing {folder}")
        losses = json.loads(done.read_text())["epochs"]
    else:
        losses = pretrain(
            pool,
            folder,
            epochs=epochs,
            seed=0,
            backbone_config=backbone_config,
            cache_dir=cache,
            workers=workers,
            progress=False,
        ).epochs
    print(f"pretraining: {len(unlabelled)} unlabelled rows, {epochs} epochs, {time.perf_counter() - started:.0f} s")
    for i, e in enumerate(losses, 1):
        print(f"  epoch {i}: masked {e['masked']:.4f}  contrastive {e['contrastive']:.4f}  ({e['seconds']:.0f} s)")
    return folder

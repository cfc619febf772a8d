"""The self-supervised pretraining loop behind ``meddx pretrain`` (no labels needed).

It reads a prepared cohort's cached tensors (:class:`meddx.data.CohortDataset`), so every
epoch reads tensors only, never a source file, and minimises the objectives of
:mod:`meddx.models.pretraining`. After every epoch it writes a checkpoint (backbone, the
objectives' own heads, optimizer state, progress; safetensors and JSON only) to
``OUT/checkpoint/``, and ``resume=True`` carries on from it. The final backbone is written
to ``OUT/`` with ``save_pretrained`` and loads with ``FoundationBackbone.from_pretrained``.

The manifest you pretrain on should not hold the patients you will test on: pretraining
sees no labels, but it does see their inputs.

Example:
    >>> if __name__ == "__main__":  # ingestion spawns worker processes  # doctest: +SKIP
    ...     result = pretrain("cohort/manifest.csv", "runs/backbone", epochs=5)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from meddx.cohort import Cohort
from meddx.config import IngestConfig
from meddx.errors import ConfigError, ModelError
from meddx.training.checkpoints import CHECKPOINT

if TYPE_CHECKING:
    from meddx.models import BackboneConfig

logger = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    """What :func:`pretrain` did: where the backbone is, and the mean losses of every epoch."""

    out_dir: Path
    epochs: list[dict[str, float]] = field(default_factory=list)


def pretrain(
    cohort: Cohort | str | Path,
    out_dir: str | Path,
    *,
    epochs: int = 5,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    backbone_config: BackboneConfig | None = None,
    ingest_config: IngestConfig | None = None,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    loader_workers: int = 0,
    resume: bool = False,
    progress: bool = True,
    device: str | None = None,
) -> PretrainResult:
    """Pretrain a :class:`~meddx.models.FoundationBackbone` on a cohort without labels.

    Args:
        cohort: a cohort or the path of its manifest (labels, if any, are ignored).
        out_dir: where the backbone and the checkpoint go.
        epochs: passes over the cohort (the total, also when resuming).
        batch_size: patients per step; the contrastive loss wants a few dozen.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        seed: seeds the weights, the shuffling and the masking; CPU runs are reproducible.
        backbone_config: sizes of the model (default: :class:`~meddx.models.BackboneConfig` ``()``).
        ingest_config: how files are read (default: :class:`~meddx.config.IngestConfig` ``()``).
        cache_dir: the ingest cache (default: ``MEDDX_CACHE`` or the user cache directory).
        workers: ingestion worker processes.
        loader_workers: ``DataLoader`` worker processes.
        resume: carry on from ``out_dir/checkpoint`` (written after every epoch).
        progress: show progress bars.
        device: ``cpu`` or ``cuda``; default CUDA when available.

    Raises:
        ConfigError: bad arguments, or nothing to pretrain on.
        ModelError: ``resume`` without a usable checkpoint.
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from meddx.data import prepare_cohort
    from meddx.data.store import aligner_hash
    from meddx.models import BackboneConfig, FoundationBackbone
    from meddx.models.pretraining import PretrainingObjectives
    from meddx.progress import show_library_bars
    from meddx.training.checkpoints import load_module, load_optimizer, save_module, save_optimizer, write_progress

    show_library_bars(progress)  # transformers' "Loading weights" too
    if epochs < 1 or batch_size < 2:
        raise ConfigError(f"need epochs >= 1 and batch_size >= 2, got epochs={epochs}, batch_size={batch_size}")
    out_dir = Path(out_dir)
    checkpoint = out_dir / CHECKPOINT
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)

    prepared = prepare_cohort(cohort, cache_dir=cache_dir, config=ingest_config, workers=workers, progress=progress)
    dataset = prepared.dataset(split=None).with_inputs()
    if len(dataset) < 2:
        raise ConfigError(f"pretraining needs at least 2 rows with some modality; the cohort has {len(dataset)}")

    done: list[dict[str, float]] = []
    if resume:
        if not (checkpoint / "progress.json").is_file():
            raise ModelError(f"--resume: no checkpoint in {checkpoint}; run without --resume to start")
        backbone = FoundationBackbone.from_pretrained(checkpoint)
        saved_aligner = backbone.aligner()
        if saved_aligner is None or aligner_hash(saved_aligner) != aligner_hash(prepared.aligner):
            raise ModelError(
                f"--resume: the checkpoint in {checkpoint} was made for other tensors (another cohort fit or "
                "config); start again without --resume or in a new --out folder"
            )
    else:
        backbone = FoundationBackbone.from_aligner(backbone_config or BackboneConfig(), prepared.aligner)
    objectives = PretrainingObjectives(backbone).to(device)
    optimizer = torch.optim.AdamW(objectives.parameters_to_train(), lr=learning_rate, weight_decay=weight_decay)
    if resume:
        import json

        load_module(objectives.heads, checkpoint / "objectives.safetensors")
        load_optimizer(optimizer, checkpoint / "optimizer.safetensors")
        done = json.loads((checkpoint / "progress.json").read_text())["epochs"]
        logger.info("resuming after epoch %d of %d", len(done), epochs)

    generator = torch.Generator().manual_seed(seed)
    use_amp = device.startswith("cuda")
    for epoch in range(len(done), epochs):
        # each epoch's shuffle, masks and dropout depend on (seed, epoch) only, so a resumed run
        # goes on exactly as an uninterrupted one would
        generator.manual_seed(seed * 100_003 + epoch)
        torch.manual_seed(seed * 100_003 + epoch)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            drop_last=len(dataset) > batch_size,  # a last batch of 1 has nothing to contrast
            generator=generator,
            num_workers=loader_workers,
            pin_memory=use_amp,
            collate_fn=dataset.collate,
        )
        objectives.train()
        sums = {"total": 0.0, "masked": 0.0, "contrastive": 0.0}
        steps = 0
        started = time.perf_counter()
        bar = tqdm(loader, desc=f"pretrain {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for batch in bar:
            batch = batch.to(device, non_blocking=True)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
                losses = objectives(batch, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            losses.total.backward()
            torch.nn.utils.clip_grad_norm_(objectives.parameters_to_train(), 1.0)
            optimizer.step()
            steps += 1
            for name in sums:
                sums[name] += float(getattr(losses, name).detach())
            bar.set_postfix(masked=f"{float(losses.masked):.3f}", contrastive=f"{float(losses.contrastive):.3f}")
        if steps == 0 or not math.isfinite(sums["total"]):
            raise ModelError(f"pretraining epoch {epoch + 1} gave no finite loss; lower the learning rate")
        means = {name: value / steps for name, value in sums.items()}
        means["seconds"] = time.perf_counter() - started
        done.append(means)
        logger.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in means.items()})
        # the checkpoint: everything needed to carry on, safetensors and JSON only
        backbone.save_pretrained(checkpoint)
        save_module(objectives.heads, checkpoint / "objectives.safetensors")
        save_optimizer(optimizer, checkpoint / "optimizer.safetensors")
        write_progress({"epochs": done, "seed": seed, "of": epochs}, checkpoint / "progress.json")

    backbone.save_pretrained(out_dir)
    write_progress({"epochs": done, "seed": seed, "rows": len(dataset)}, out_dir / "pretraining.json")
    return PretrainResult(out_dir=out_dir, epochs=done)

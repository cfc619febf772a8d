"""The self-supervised pretraining loop behind ``meddx pretrain`` (no labels needed).

It reads a prepared cohort's cached tensors (:class:`meddx.data.CohortDataset`), so every
epoch reads tensors only, never a source file, and minimises the objectives of
:mod:`meddx.models.pretraining`. After every epoch it writes a checkpoint (backbone, the
objectives' own heads, optimizer state, progress; safetensors and JSON only) to
``OUT/checkpoint/``, and ``resume=True`` carries on from it. The final backbone is written
to ``OUT/`` with ``save_pretrained`` and loads with ``FoundationBackbone.from_pretrained``.

The loop is :class:`~meddx.training.trainer.Trainer` without validation (every epoch runs, the
last weights stay) over :class:`MaskedAndContrastive`; :class:`PretrainCheckpoint` is its
checkpoint.

The manifest you pretrain on should not hold the patients you will test on: pretraining
sees no labels, but it does see their inputs.

Example:
    >>> if __name__ == "__main__":  # ingestion spawns worker processes  # doctest: +SKIP
    ...     result = pretrain("cohort/manifest.csv", "runs/backbone", epochs=5)
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meddx.cohort import Cohort
from meddx.config import IngestConfig
from meddx.errors import ConfigError, ModelError
from meddx.training.checkpoints import CHECKPOINT

if TYPE_CHECKING:
    import torch

    from meddx.data import CohortDataset
    from meddx.models import BackboneConfig, FoundationBackbone
    from meddx.models.pretraining import PretrainingObjectives
    from meddx.training.early_stopping import EarlyStopping

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

    from meddx.cache import aligner_hash
    from meddx.data import prepare_cohort
    from meddx.models import BackboneConfig, FoundationBackbone
    from meddx.models.pretraining import PretrainingObjectives
    from meddx.progress import show_library_bars
    from meddx.training.checkpoints import write_progress
    from meddx.training.trainer import LoopConfig, Trainer

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
    task = MaskedAndContrastive(objectives, dataset, batch_size, seed, device, loader_workers)
    loop = LoopConfig(
        epochs=epochs,
        patience=epochs,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        validate_every=None,
        clip_norm=1.0,
        progress=progress,
        description="pretrain",
    )
    Trainer(task, loop, PretrainCheckpoint(checkpoint, task, {"seed": seed, "of": epochs})).fit(resume=resume)

    backbone.save_pretrained(out_dir)
    write_progress({"epochs": task.done, "seed": seed, "rows": len(dataset)}, out_dir / "pretraining.json")
    return PretrainResult(out_dir=out_dir, epochs=task.done)


class MaskedAndContrastive:
    """The pretraining objectives as the loop's task: shuffled batches, their losses, the means of every epoch.

    Each epoch's shuffle, masks and dropout depend on (seed, epoch) only, so a resumed run goes on
    exactly as an uninterrupted one would.

    Args:
        objectives: the backbone with its objectives' heads.
        dataset: every row with some modality.
        batch_size: patients per step.
        seed: seeds shuffling, masking and dropout per epoch.
        device: where the objectives are.
        loader_workers: ``DataLoader`` worker processes.
    """

    def __init__(
        self,
        objectives: PretrainingObjectives,
        dataset: CohortDataset,
        batch_size: int,
        seed: int,
        device: str,
        loader_workers: int,
    ):
        import torch

        self.module = objectives
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.device, self.loader_workers = device, loader_workers
        self.generator = torch.Generator().manual_seed(seed)
        self.done: list[dict[str, float]] = []  # the mean losses of every epoch run
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.started = 0.0
        self.last: Any = None

    @property
    def steps_per_epoch(self) -> int:
        size, rows = self.batch_size, len(self.dataset)
        return rows // size if rows > size else 1

    def parameters(self) -> list:
        return self.module.parameters_to_train()

    def batches(self, epoch: int) -> Iterator[Any]:
        import torch
        from torch.utils.data import DataLoader

        self.generator.manual_seed(self.seed * 100_003 + epoch)
        torch.manual_seed(self.seed * 100_003 + epoch)
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=len(self.dataset) > self.batch_size,  # a last batch of 1 has nothing to contrast
            generator=self.generator,
            num_workers=self.loader_workers,
            pin_memory=self.device.startswith("cuda"),
            collate_fn=self.dataset.collate,
        )
        self.module.train()
        self.sums = {"total": 0.0, "masked": 0.0, "contrastive": 0.0}
        self.steps = 0
        self.started = time.perf_counter()
        # Before issue 20 the loop wrapped this loader in tqdm.auto's bar, which calls iter() on it once
        # when made (tqdm/asyncio.py) and drops that iterator: a DataLoader iterator draws its base seed,
        # one int64, from the generator. The same draw here keeps every shuffle and mask as they were, so
        # a checkpoint written before goes on exactly as it would have (without starting loader workers).
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        yield from loader

    def loss(self, batch) -> torch.Tensor:
        import torch

        batch = batch.to(self.device, non_blocking=True)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.device.startswith("cuda")):
            losses = self.module(batch, generator=self.generator)
        self.steps += 1
        for name in self.sums:
            self.sums[name] += float(getattr(losses, name).detach())
        self.last = losses
        return losses.total

    def step_figures(self) -> dict[str, str]:
        return {"masked": f"{float(self.last.masked):.3f}", "contrastive": f"{float(self.last.contrastive):.3f}"}

    def end_epoch(self, epoch: int) -> None:
        if self.steps == 0 or not math.isfinite(self.sums["total"]):
            raise ModelError(f"pretraining epoch {epoch + 1} gave no finite loss; lower the learning rate")
        means = {name: value / self.steps for name, value in self.sums.items()}
        means["seconds"] = time.perf_counter() - self.started
        self.done.append(means)
        logger.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in means.items()})

    def validate(self) -> float:
        return math.nan  # not called: the loop runs without validation


class PretrainCheckpoint:
    """Pretraining's checkpoint in ``folder``: the backbone, the objectives' heads, the optimizer, the epochs' losses.

    Safetensors and JSON only; :meth:`resume` expects the backbone already loaded from ``folder``
    (``pretrain`` checks it was made for the same tensors).
    """

    def __init__(self, folder: Path, task: MaskedAndContrastive, fields: dict[str, Any]):
        self.folder, self.task, self.fields = folder, task, fields  # fields: also written to progress.json

    def save(self, module: PretrainingObjectives, optimizer, stopper: EarlyStopping, epoch: int) -> None:
        from meddx.training.checkpoints import save_module, save_optimizer, write_progress

        backbone: FoundationBackbone = module.backbone
        backbone.save_pretrained(self.folder)
        save_module(module.heads, self.folder / "objectives.safetensors")
        save_optimizer(optimizer, self.folder / "optimizer.safetensors")
        write_progress({"epochs": self.task.done, **self.fields}, self.folder / "progress.json")

    def resume(self, module: PretrainingObjectives, optimizer, stopper: EarlyStopping) -> int:
        from meddx.training.checkpoints import load_module, load_optimizer

        load_module(module.heads, self.folder / "objectives.safetensors")
        load_optimizer(optimizer, self.folder / "optimizer.safetensors")
        self.task.done = json.loads((self.folder / "progress.json").read_text())["epochs"]
        logger.info("resuming after epoch %d of %s", len(self.task.done), self.fields.get("of"))
        return len(self.task.done)

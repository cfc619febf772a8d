"""Fine-tuning: heads (and optionally the backbone) on a hospital's labelled rows, then calibration.

``finetune`` prepares the cohort (ingest once, cached tensors after), splits it (the manifest's
``split`` column, else a seeded split grouped by patient), trains, keeps the epoch with the best
validation AUROC (early stopping), fits each task's calibrator and conformal sets on the
validation rows only, and saves the model folder.

Modes:

* ``auto`` (default): ``head`` when a pretrained backbone is given, else ``full`` (a backbone with
  fresh weights has nothing worth freezing); see ``docs/training.md`` for the measurements.
* ``head``: the backbone is frozen; its embeddings are computed once and the heads are trained on
  them, so an epoch costs microseconds per patient.
* ``full``: everything trains (modality dropout on), one backbone pass per patient and epoch.
* ``lora``: LoRA adapters (``peft``) on the fusion transformer (and optionally the text encoder);
  base weights untouched, so one backbone serves many tasks and sites.

The loop is :class:`~meddx.training.trainer.Trainer` over the fits of :mod:`meddx.training.fits`.
It runs unchanged under ``torchrun --nproc_per_node N``: gloo on CPU, nccl on GPU; each rank
takes ``batch_size / N`` of every global batch, so the updates match a single process; rank 0
writes the files. Scripts that call it need ``if __name__ == "__main__":`` (ingestion spawns
worker processes).

Example:
    >>> if __name__ == "__main__":  # doctest: +SKIP
    ...     model = finetune("sample_data/manifest.csv", "runs/model", tasks=["disease"])
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from meddx.cohort import Cohort, TaskSpec, load_cohort
from meddx.config import IngestConfig
from meddx.errors import ConfigError
from meddx.splits import with_splits
from meddx.training.checkpoints import CHECKPOINT
from meddx.training.trainer import SCHEDULES

if TYPE_CHECKING:
    from meddx.models import BackboneConfig, FoundationBackbone
    from meddx.models.diagnosis import DiagnosisModel

Mode = Literal["auto", "head", "full", "lora"]
MODES: tuple[str, ...] = ("auto", "head", "full", "lora")
# Chosen on the fine-tuning benchmark (benchmarks/bench_finetune.py): see docs/training.md, "Epochs".
# At batch 32 validation AUROC still rose at epoch 14; at batch 64 it peaks near epoch 8 and early
# stopping (patience 5) ends the fused fit near epoch 13, in 3 to 4 minutes on an idle 2-core CPU.
DEFAULT_EPOCHS = {"head": 200, "full": 15, "lora": 15}
DEFAULT_LEARNING_RATE = {"head": 3e-3, "full": 1e-3, "lora": 2e-3}
# 64 rather than 32: on 2 CPU cores a step's small operations cost per call, so an epoch of 64-patient
# steps is about a third faster, and the fused model scored as well or better (docs/training.md).
DEFAULT_BATCH_SIZE = 64
__all__ = ["CHECKPOINT", "DEFAULT_BATCH_SIZE", "MODES", "SCHEDULES", "Mode", "finetune"]


def finetune(
    cohort: Cohort | str | Path,
    out_dir: str | Path | None = None,
    *,
    tasks: Sequence[str] | None = None,
    mode: Mode = "auto",
    epochs: int | None = None,
    backbone: str | Path | FoundationBackbone | None = None,
    backbone_config: BackboneConfig | None = None,
    ingest_config: IngestConfig | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    learning_rate: float | None = None,
    patience: int = 5,
    seed: int = 0,
    alpha: float = 0.1,
    calibration: str = "temperature",
    min_group_size: int = 50,
    ood_false_alarm: float = 0.05,
    lora: dict[str, Any] | None = None,
    head_dropout: float = 0.1,
    head_input: str = "summary",
    schedule: str = "cosine",
    workers: int | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | None = None,
) -> DiagnosisModel:
    """Fine-tune a :class:`~meddx.models.diagnosis.DiagnosisModel` on a labelled cohort.

    Args:
        cohort: a cohort or the path of its manifest, with ``label:<task>`` columns.
        out_dir: where the model folder goes (None: nothing is written; no checkpoints).
        tasks: which tasks (default: every label column).
        mode: ``auto``, ``head``, ``full`` or ``lora`` (module docstring).
        epochs: at most this many (early stopping may stop sooner); default per mode.
        backbone: a pretrained backbone folder or object; default: a new one (``backbone_config``).
        backbone_config: sizes of a new backbone.
        ingest_config: how files are read (ignored with a pretrained backbone: its own is used).
        cache_dir: the ingest cache.
        batch_size: patients per step (the global batch under torchrun).
        learning_rate: AdamW learning rate; default per mode.
        patience: epochs without a better validation AUROC before stopping.
        seed: seeds the split, weights, shuffling and dropout.
        alpha: conformal miscoverage (0.1: sets hold the truth 90% of the time).
        calibration: ``temperature`` or ``isotonic``.
        min_group_size: fewest validation rows for a Mondrian group's own conformal threshold.
        ood_false_alarm: share of validation rows the out-of-distribution thresholds flag
            (:mod:`meddx.models.ood`; saved as ``ood.json`` and ``ood.safetensors``).
        lora: LoRA settings (``r``, ``alpha``, ``dropout``, ``text_encoder``) in ``lora`` mode.
        head_dropout: dropout inside each head.
        head_input: what the heads read: ``summary`` or ``summary+modalities`` (see
            :class:`~meddx.models.diagnosis.DiagnosisModel`).
        schedule: learning rate over the steps of ``full`` and ``lora``: ``cosine`` (linear
            warm-up over the first 5% of the planned steps, then a cosine decay to zero at
            ``epochs``) or ``constant``. ``head`` mode always uses a constant rate.
        workers: ingestion worker processes.
        resume: carry on from ``out_dir/checkpoint``.
        progress: show progress bars.
        device: ``cpu`` or ``cuda`` (default CUDA when available).

    Returns:
        The calibrated model (also saved in ``out_dir`` when given).

    Raises:
        ConfigError: unknown tasks or mode, no training or validation rows with labels.
        ModelError: a bad backbone folder, or ``resume`` without a checkpoint.
    """
    import torch

    from meddx.data import prepare_cohort
    from meddx.models import BackboneConfig, FoundationBackbone
    from meddx.models.diagnosis import DiagnosisModel
    from meddx.progress import show_library_bars
    from meddx.training.calibration_fit import calibrate
    from meddx.training.checkpoints import CheckpointFolder
    from meddx.training.distributed import init_distributed, teardown_distributed
    from meddx.training.fits import FitSettings, fit

    show_library_bars(progress)  # transformers' "Loading weights" too
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    if mode == "auto":
        mode = "head" if backbone is not None else "full"
    epochs = DEFAULT_EPOCHS[mode] if epochs is None else epochs
    learning_rate = DEFAULT_LEARNING_RATE[mode] if learning_rate is None else learning_rate
    if epochs < 1 or batch_size < 1 or patience < 1:
        raise ConfigError(f"epochs, batch_size and patience must be >= 1; got {epochs}, {batch_size}, {patience}")
    if resume and out_dir is None:
        raise ConfigError("resume needs out_dir (the checkpoint lives in out_dir/checkpoint)")
    ranks = init_distributed(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        torch.manual_seed(seed)

        cohort = load_cohort(cohort) if not isinstance(cohort, Cohort) else cohort
        chosen = _chosen_tasks(cohort, tasks)
        cohort = with_splits(cohort, seed=seed)

        if isinstance(backbone, (str, Path)):
            backbone = FoundationBackbone.from_pretrained(backbone)
        aligner = backbone.aligner() if backbone is not None else None
        prepared = prepare_cohort(
            cohort,
            cache_dir=cache_dir,
            config=ingest_config,
            aligner=aligner,
            workers=workers,
            progress=progress and ranks.is_main,
        )
        train = prepared.dataset(split="train", tasks=list(chosen)).with_inputs()
        val = prepared.dataset(split="val", tasks=list(chosen)).with_inputs()
        for name, part in (("train", train), ("val", val)):
            if len(part) == 0:
                raise ConfigError(f"{cohort.path}: no {name} rows with any usable modality; check the split column")
        if backbone is None:
            backbone = FoundationBackbone.from_aligner(backbone_config or BackboneConfig(), prepared.aligner)
        model = DiagnosisModel(backbone, chosen, head_dropout=head_dropout, head_input=head_input).to(ranks.device)
        if mode == "lora":
            from meddx.models.adapters import add_lora

            add_lora(model, lora or {})
        elif mode == "head":
            for parameter in model.backbone.parameters():
                parameter.requires_grad = False

        settings = FitSettings(epochs, batch_size, learning_rate, patience, seed, schedule, resume, progress)
        checkpoints = None if out_dir is None else CheckpointFolder(Path(out_dir) / CHECKPOINT, ranks.is_main)
        started = time.perf_counter()
        history = fit(model, mode, (train, val), settings, ranks, checkpoints)
        fit_seconds = time.perf_counter() - started

        calibration_figures = calibrate(model, val, calibration, alpha, min_group_size, device=ranks.device)
        model.ood = _fit_ood(model, (train, val), ood_false_alarm, ranks.device)
        model.training_info = {
            "mode": mode,
            "epochs_run": history["epochs_run"],  # epochs, not validation checks (head mode checks every few)
            "best_epoch": history["best_epoch"],
            "learning_rate": learning_rate,
            "head_input": head_input,
            "schedule": schedule if mode != "head" else "constant",
            "batch_size": batch_size,
            "seed": seed,
            "world_size": ranks.world,
            "rows": {"train": len(train), "val": len(val)},
            "calibration": calibration,
            "alpha": alpha,
            "fit_seconds": round(fit_seconds, 2),
        }
        model.metrics = {
            "validation": {"mean_auroc": history["best_val_auroc"], "per_task": calibration_figures},
            "history": history["val_auroc"],
        }
        if out_dir is not None and ranks.is_main:
            model.save_pretrained(out_dir)
            _describe(out_dir, train, cache_dir, chosen)
    finally:
        teardown_distributed(ranks)
    model.eval()
    return model


def _fit_ood(model: DiagnosisModel, parts: tuple, rate: float, device: str):
    """The OOD scorers on the training rows, thresholds on the validation rows, and both's acquisition
    ranges (:mod:`meddx.training.ood_fit`)."""
    from meddx.training.ood_fit import fit_input_ranges, fit_ood_scores

    if not 0 < rate <= 0.5:
        raise ConfigError(f"ood_false_alarm must be in (0, 0.5]; got {rate!r}")
    train, val = parts
    ood = fit_ood_scores(model, train, val, rate=rate, device=device)
    if ood is not None:
        ood.input_ranges = fit_input_ranges((train, val))
    return ood


def _describe(out_dir: str | Path, train: Any, cache_dir: str | Path | None, tasks: dict[str, TaskSpec]) -> None:
    """training_summary.json and the model card README.md (meddx.model_card)."""
    from meddx.cache import default_cache_dir
    from meddx.model_card import describe_training

    describe_training(out_dir, train.index, default_cache_dir(cache_dir), tasks)


def _chosen_tasks(cohort: Cohort, tasks: Sequence[str] | None) -> dict[str, TaskSpec]:
    if not cohort.tasks:
        raise ConfigError(f"{cohort.path} has no label:<task> column; fine-tuning needs labels")
    names = list(tasks) if tasks else list(cohort.tasks)
    unknown = [t for t in names if t not in cohort.tasks]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; the manifest has {sorted(cohort.tasks)}")
    return {name: cohort.tasks[name] for name in names}

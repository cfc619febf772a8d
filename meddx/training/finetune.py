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

It runs unchanged under ``torchrun --nproc_per_node N``: gloo on CPU, nccl on GPU; each rank
takes ``batch_size / N`` of every global batch, so the updates match a single process; rank 0
writes the files. Scripts that call it need ``if __name__ == "__main__":`` (ingestion spawns
worker processes).

Example:
    >>> if __name__ == "__main__":  # doctest: +SKIP
    ...     model = finetune("sample_data/manifest.csv", "runs/model", tasks=["disease"])
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from meddx.cohort import Cohort, TaskSpec, load_cohort
from meddx.config import IngestConfig
from meddx.errors import ConfigError, ModelError
from meddx.splits import with_splits

if TYPE_CHECKING:
    import torch

    from meddx.data import CohortDataset
    from meddx.models import BackboneConfig, FoundationBackbone
    from meddx.models.diagnosis import DiagnosisModel

logger = logging.getLogger(__name__)

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
CHECKPOINT = "checkpoint"
SCHEDULES: tuple[str, ...] = ("cosine", "constant")
WARMUP_FRACTION = 0.05  # of the planned steps, linear warm-up before the cosine decay
WEIGHT_DECAY = 0.01


# ----------------------------------------------------------------- distributed


def _init_distributed(device: str) -> tuple[int, int, str]:
    """``(rank, world_size, device)``; starts the process group when launched by ``torchrun``.

    On GPUs each process takes the GPU of its local rank (``device="cuda"`` becomes
    ``cuda:LOCAL_RANK``): ``--nproc_per_node`` processes for as many GPUs on each node.
    """
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


# ----------------------------------------------------------------- evaluation


def mean_auroc(tasks: dict[str, TaskSpec], logits: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> float:
    """Mean over tasks of the validation AUROC (one-vs-rest macro for multiclass); nan if none is defined."""
    from meddx.metrics import auroc
    from meddx.models.diagnosis import probabilities_from_logits

    scores = []
    for task, spec in tasks.items():
        known = labels[task] >= 0
        if known.sum() < 2 or len(np.unique(labels[task][known])) < 2:
            continue
        value = auroc(labels[task][known], probabilities_from_logits(logits[task][known], spec.kind))
        if math.isfinite(value):
            scores.append(value)
    return float(np.mean(scores)) if scores else float("nan")


def dataset_outputs(model: DiagnosisModel, dataset: CohortDataset, batch_size: int, device: str):
    """Logits, labels and presence of every row (eval mode, no gradient)."""
    import torch
    from torch.utils.data import DataLoader

    model.eval()
    logits: dict[str, list] = {t: [] for t in model.tasks}
    labels: dict[str, list] = {t: [] for t in model.tasks}
    present = []
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=dataset.collate):
            out = model(batch.to(device))
            for task in model.tasks:
                logits[task].append(out[task].float().cpu().numpy())
                labels[task].append(batch.labels[task].numpy() if task in batch.labels else np.full(len(batch), -1))
            present.append(batch.present.numpy())
    return (
        {t: np.concatenate(v) for t, v in logits.items()},
        {t: np.concatenate(v) for t, v in labels.items()},
        np.concatenate(present),
    )


# ----------------------------------------------------------------- calibration


def calibrate(
    model: DiagnosisModel,
    val: CohortDataset,
    method: str = "temperature",
    alpha: float = 0.1,
    min_group_size: int = 50,
    batch_size: int = 64,
    device: str = "cpu",
) -> dict[str, Any]:
    """Fit each task's calibrator and conformal sets on the validation rows; returns their figures."""
    from meddx.calibration import ConformalClassifier, IsotonicCalibrator, TaskCalibration, TemperatureScaler
    from meddx.metrics import auroc, ece
    from meddx.models.diagnosis import probabilities_from_logits

    if method not in ("temperature", "isotonic"):
        raise ConfigError(f"calibration must be 'temperature' or 'isotonic', got {method!r}")
    logits, labels, present = dataset_outputs(model, val, batch_size, device)
    figures: dict[str, Any] = {}
    for task, spec in model.tasks.items():
        known = labels[task] >= 0
        if known.sum() < 10 or len(np.unique(labels[task][known])) < 2:
            logger.warning(
                "task %s: %d validation labels; left uncalibrated and without conformal sets", task, int(known.sum())
            )
            continue
        x, y = logits[task][known], labels[task][known]
        calibrator = (TemperatureScaler() if method == "temperature" else IsotonicCalibrator()).fit(x, y)
        raw = probabilities_from_logits(x, spec.kind)
        calibrated = calibrator.transform(x)
        conformal = ConformalClassifier(alpha=alpha, min_group_size=min_group_size).fit(
            calibrated, y, availability=present[known]
        )
        model.calibration[task] = TaskCalibration(spec.classes, calibrator, conformal)
        figures[task] = {
            "val_rows": int(known.sum()),
            "auroc": float(auroc(y, raw)),
            "ece_before": float(ece(y, raw)),
            "ece_after": float(ece(y, calibrated)),
        }
    return figures


# ----------------------------------------------------------------- training


def _class_weights(train: CohortDataset, tasks: dict[str, TaskSpec]) -> dict[str, torch.Tensor]:
    import torch

    from meddx.models.heads import class_weights_from, n_outputs

    labels = train.label_array()  # task -> (N,) int64, -1 unknown
    return {
        task: class_weights_from(torch.as_tensor(labels[task]), max(2, n_outputs(spec))) for task, spec in tasks.items()
    }


def _loss(model, logits: dict, labels: dict, weights: dict) -> torch.Tensor | None:
    from meddx.models.heads import task_loss

    losses = []
    for task, spec in model.tasks.items():
        if task not in labels:
            continue
        value = task_loss(logits[task], labels[task], labels[task] >= 0, spec.kind, weights.get(task))
        if value is not None:
            losses.append(value)
    if not losses:
        return None
    import torch

    return torch.stack(losses).sum()


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
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, device = _init_distributed(device)
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
        progress=progress and rank == 0,
    )
    train = prepared.dataset(split="train", tasks=list(chosen)).with_inputs()
    val = prepared.dataset(split="val", tasks=list(chosen)).with_inputs()
    for name, part in (("train", train), ("val", val)):
        if len(part) == 0:
            raise ConfigError(f"{cohort.path}: no {name} rows with any usable modality; check the split column")
    if backbone is None:
        backbone = FoundationBackbone.from_aligner(backbone_config or BackboneConfig(), prepared.aligner)
    model = DiagnosisModel(backbone, chosen, head_dropout=head_dropout, head_input=head_input).to(device)
    if mode == "lora":
        from meddx.models.adapters import add_lora

        add_lora(model, lora or {})
    elif mode == "head":
        for parameter in model.backbone.parameters():
            parameter.requires_grad = False

    weights = {t: w.to(device) for t, w in _class_weights(train, chosen).items()}
    for task, task_weights in weights.items():
        model.heads.set_class_weights(task, task_weights)
    started = time.perf_counter()
    history = (
        _fit_heads_on_embeddings(
            model,
            train,
            val,
            epochs,
            batch_size,
            learning_rate,
            patience,
            seed,
            weights,
            device,
            world,
            rank,
            out_dir,
            resume,
            progress,
        )
        if mode == "head"
        else _fit_end_to_end(
            model,
            train,
            val,
            epochs,
            batch_size,
            learning_rate,
            patience,
            seed,
            weights,
            device,
            world,
            rank,
            out_dir,
            resume,
            progress,
            schedule,
        )
    )
    fit_seconds = time.perf_counter() - started

    calibration_figures = calibrate(model, val, calibration, alpha, min_group_size, device=device)
    model.training_info = {
        "mode": mode,
        "epochs_run": history["epochs_run"],  # epochs, not validation checks (head mode checks every few)
        "best_epoch": history["best_epoch"],
        "learning_rate": learning_rate,
        "head_input": head_input,
        "schedule": schedule if mode != "head" else "constant",
        "batch_size": batch_size,
        "seed": seed,
        "world_size": world,
        "rows": {"train": len(train), "val": len(val)},
        "calibration": calibration,
        "alpha": alpha,
        "fit_seconds": round(fit_seconds, 2),
    }
    model.metrics = {
        "validation": {"mean_auroc": history["best_val_auroc"], "per_task": calibration_figures},
        "history": history["val_auroc"],
    }
    if out_dir is not None and rank == 0:
        model.save_pretrained(out_dir)
    model.eval()
    return model


def _chosen_tasks(cohort: Cohort, tasks: Sequence[str] | None) -> dict[str, TaskSpec]:
    if not cohort.tasks:
        raise ConfigError(f"{cohort.path} has no label:<task> column; fine-tuning needs labels")
    names = list(tasks) if tasks else list(cohort.tasks)
    unknown = [t for t in names if t not in cohort.tasks]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; the manifest has {sorted(cohort.tasks)}")
    return {name: cohort.tasks[name] for name in names}


class _EarlyStopping:
    """Keeps the best weights by validation AUROC and says when to stop."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best = -math.inf
        self.best_epoch = -1
        self.last_epoch = -1  # the last epoch run (0-based); head mode checks validation every few epochs
        self.best_state: dict | None = None
        self.history: list[float] = []

    def update(self, epoch: int, value: float, module) -> bool:
        """Record an epoch; True when training should stop."""
        self.history.append(value)
        self.last_epoch = epoch
        score = value if math.isfinite(value) else -math.inf
        if score > self.best or self.best_state is None:
            self.best, self.best_epoch = score, epoch
            self.best_state = copy.deepcopy(module.state_dict())
        return epoch - self.best_epoch >= self.patience

    def summary(self) -> dict[str, Any]:
        return {
            "val_auroc": self.history,
            "epochs_run": self.last_epoch + 1,
            "best_epoch": self.best_epoch + 1,
            "best_val_auroc": self.best if math.isfinite(self.best) else None,
        }


def _checkpoint(out_dir, module, optimizer, stopper: _EarlyStopping, epoch: int, rank: int) -> None:
    """Write what training needs to carry on (the trained module, the best weights, optimizer, progress).

    A bundled frozen text model's weights are left out (the package ships them; progress.json
    names them by hash and resuming checks it), so the checkpoint holds no copy of them.
    """
    from meddx.models.checkpoint import reference_text_keys, reference_text_models
    from meddx.training_state import save_module, save_optimizer, write_progress

    if out_dir is None or rank != 0:
        return
    folder = Path(out_dir) / CHECKPOINT
    folder.mkdir(parents=True, exist_ok=True)
    by_reference, left_out = reference_text_models(module), reference_text_keys(module)
    save_module(module, folder / "last.safetensors", leave_out=left_out)
    if stopper.best_state is not None:
        from meddx.training_state import atomic_save_tensors

        best = {k: v for k, v in stopper.best_state.items() if k not in left_out}
        atomic_save_tensors(best, folder / "best.safetensors")
    save_optimizer(optimizer, folder / "optimizer.safetensors")
    write_progress(
        {
            "epoch": epoch + 1,
            "history": stopper.history,
            "best_epoch": stopper.best_epoch,
            "best": stopper.best if math.isfinite(stopper.best) else None,
            "text_models_by_reference": by_reference,
        },
        folder / "progress.json",
    )


def _resume(out_dir, module, optimizer, stopper: _EarlyStopping) -> int:
    """Load the checkpoint; returns the first epoch still to run."""
    from safetensors.torch import load_file

    from meddx.models.checkpoint import check_safetensors, reference_text_keys, reference_text_models
    from meddx.training_state import load_module, load_optimizer

    folder = Path(out_dir) / CHECKPOINT
    path = folder / "progress.json"
    if not path.is_file():
        raise ModelError(f"--resume: no checkpoint in {folder}; run without --resume to start")
    by_reference = reference_text_models(module)
    try:
        progress = json.loads(path.read_text())
        history = [float(v) for v in progress["history"]]
        epoch, best_epoch = int(progress["epoch"]), int(progress["best_epoch"])
        best = -math.inf if progress["best"] is None else float(progress["best"])
        saved_reference = dict(progress.get("text_models_by_reference", {}))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"--resume: {path} is damaged ({exc}); run without --resume to start over") from None
    if not best_epoch < epoch or epoch < 1:
        raise ModelError(f"--resume: {path} is damaged (epochs do not agree); run without --resume to start over")
    if saved_reference != by_reference:
        raise ModelError(
            f"--resume: {path} names the frozen text model {saved_reference or 'none'} (prefix: SHA-256) but this "
            f"model has {by_reference or 'none'}; install the text model it was trained with, or start over"
        )
    left_out = reference_text_keys(module)
    load_module(module, folder / "last.safetensors", left_out=left_out)
    load_optimizer(optimizer, folder / "optimizer.safetensors")
    stopper.history = history
    stopper.best_epoch = best_epoch
    stopper.last_epoch = epoch - 1
    stopper.best = best
    if (folder / "best.safetensors").is_file():
        check_safetensors(folder / "best.safetensors")
        stopper.best_state = load_file(str(folder / "best.safetensors"))
        stopper.best_state.update(  # the weights kept by reference are the ones just built
            {k: v.clone() for k, v in module.state_dict().items() if k in left_out}
        )
    logger.info("resuming at epoch %d", epoch + 1)
    return epoch


def _keep_frozen_statistics(module) -> None:
    """Batch-norm layers whose weights are frozen keep their running statistics too (eval mode).

    Otherwise LoRA training would still change the base model through its running means.
    """
    import torch

    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in layer.parameters()
        ):
            layer.eval()


def learning_rate_factor(step: int, total_steps: int, schedule: str = "cosine") -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``.

    ``cosine``: linear warm-up over the first :data:`WARMUP_FRACTION` of the steps (attention
    layers trained from scratch diverge easily under full-size Adam steps at the start), then a
    cosine decay to zero, so the last epochs refine instead of jumping around the optimum.

    Example:
        >>> round(learning_rate_factor(50, 100), 3), learning_rate_factor(50, 100, "constant")
        (0.541, 1.0)
    """
    if schedule == "constant" or total_steps <= 1:
        return 1.0
    warmup = max(1, int(WARMUP_FRACTION * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


BATCH_NORM_ROWS = 512  # training rows the batch-norm statistics are re-estimated on after each epoch


def recompute_batch_norm_statistics(
    model, dataset: CohortDataset, batch_size: int = 32, max_rows: int = BATCH_NORM_ROWS, device: str = "cpu"
) -> int:
    """Re-estimate the running statistics of every trainable batch-norm layer with the current weights.

    In training a batch-norm layer normalises with the statistics of its batch and keeps an
    exponential average of them (momentum 0.1) for eval mode. While AdamW moves every weight by
    about the learning rate per step, that average trails the weights by some ten steps: the
    eval-mode encoders then see other statistics than training did, and the fused logits shift
    (on the shared benchmark cohort, a mean logit of +0.44 instead of -0.92; AUROC 0.83 instead
    of 0.85). This pass ("precise BN") replaces the average with the plain mean of the batch
    statistics over at most ``max_rows`` rows spread evenly over ``dataset``, in a fixed
    order, so every DDP rank computes the same statistics. Only the encoders that hold such layers run; the
    others, and the layers frozen in ``lora`` mode, are left as they are.

    Args:
        model: a :class:`~meddx.models.diagnosis.DiagnosisModel`.
        dataset: training rows.
        batch_size: rows per forward pass (batch statistics depend on it: use the training one).
        max_rows: at most this many rows are read (every ``ceil(len / max_rows)``-th).
        device: where the model is.

    Returns:
        The most batches any encoder was re-estimated on (0: nothing to update; an encoder whose
        modality none of the rows has keeps its statistics).

    Example:
        >>> recompute_batch_norm_statistics(model, train)  # doctest: +SKIP
        16
    """
    import torch
    from torch.utils.data import DataLoader, Subset

    from meddx.records import Modality

    def trainable_norms(module) -> list:
        return [
            layer
            for layer in module.modules()
            if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)
            and layer.track_running_stats
            and any(p.requires_grad for p in layer.parameters())
        ]

    encoders = {name: enc for name, enc in model.backbone.encoders.items() if trainable_norms(enc)}
    if not encoders or len(dataset) == 0:
        return 0
    was_training = model.training
    model.eval()
    norms = {name: trainable_norms(enc) for name, enc in encoders.items()}
    saved = {name: [copy.deepcopy(layer.state_dict()) for layer in layers] for name, layers in norms.items()}
    momenta = {name: [layer.momentum for layer in layers] for name, layers in norms.items()}
    for layer in (layer for layers in norms.values() for layer in layers):
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average: every batch counts the same
        layer.train()  # normalise with the batch statistics and record them; dropout etc. stay off
    stride = math.ceil(len(dataset) / max_rows)  # rows spread over the dataset, not its first ones
    subset = Subset(dataset, range(0, len(dataset), stride))
    seen = dict.fromkeys(encoders, 0)
    try:
        with torch.no_grad():
            for batch in DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=dataset.collate):
                batch = batch.to(device)
                for name, encoder in encoders.items():
                    arrays = batch.tensors.get(Modality(name))
                    if arrays is not None and len(batch.rows_with(Modality(name))) > 1:
                        encoder(arrays)
                        seen[name] += 1
    finally:
        for name, layers in norms.items():
            for layer, state, momentum in zip(layers, saved[name], momenta[name], strict=True):
                if not seen[name]:  # no rows of this modality to estimate from: keep what it had
                    layer.load_state_dict(state)
                layer.momentum = momentum
        model.train(was_training)
    return max(seen.values())


def _fit_end_to_end(
    model,
    train,
    val,
    epochs,
    batch_size,
    learning_rate,
    patience,
    seed,
    weights,
    device,
    world,
    rank,
    out_dir,
    resume,
    progress,
    schedule="cosine",
) -> dict[str, Any]:
    """``full`` and ``lora``: backbone passes every step; DDP when launched by torchrun."""
    import torch
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler
    from tqdm.auto import tqdm

    from meddx.data.prefetch import prefetched

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=WEIGHT_DECAY)
    stepper = model
    if world > 1:
        stepper = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    # the same sampler with one replica gives a single process the same global batches as N ranks
    sampler: DistributedSampler[int] = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    per_rank = max(1, batch_size // world)
    loader = DataLoader(
        train, batch_size=per_rank, sampler=sampler, collate_fn=train.collate, pin_memory=device.startswith("cuda")
    )
    stopper = _EarlyStopping(patience)
    start = _resume(out_dir, model, optimizer, stopper) if resume else 0
    use_amp = device.startswith("cuda")
    total_steps = epochs * len(loader)
    for epoch in range(start, epochs):
        sampler.set_epoch(epoch)
        torch.manual_seed(seed * 1_000 + epoch * 10 + rank)  # modality dropout and dropout, per epoch and rank
        model.train()
        if model.adapter is not None:
            _keep_frozen_statistics(model.backbone)
        for step, batch in enumerate(
            tqdm(
                prefetched(loader),
                desc=f"epoch {epoch + 1}/{epochs}",
                total=len(loader),
                disable=not progress or rank != 0,
                leave=False,
            )
        ):
            for group in optimizer.param_groups:  # a function of the step alone, so --resume needs no state
                group["lr"] = learning_rate * learning_rate_factor(epoch * len(loader) + step, total_steps, schedule)
            batch = batch.to(device, non_blocking=True)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
                logits = stepper(batch)
            loss = _loss(model, logits, batch.labels, weights)
            if loss is None:
                loss = sum(v.sum() for v in logits.values()) * 0.0  # every rank must join the all-reduce
            # zeros, not None: DDP gives a parameter unused in a batch a zero gradient, so a single
            # process must too (AdamW treats "no gradient" and "zero gradient" differently)
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
        if model.adapter is None:  # LoRA leaves batch norm frozen; otherwise eval mode needs fresh statistics
            recompute_batch_norm_statistics(model, train, per_rank, device=device)
        val_logits, val_labels, _ = dataset_outputs(model, val, 64, device)
        stop = stopper.update(epoch, mean_auroc(model.tasks, val_logits, val_labels), model)
        _checkpoint(out_dir, model, optimizer, stopper, epoch, rank)
        if stop:
            break
    model.load_state_dict(stopper.best_state)
    return stopper.summary()


def _sharded_embeddings(
    backbone, dataset, device: str, world: int, rank: int, head_input: str = "summary", progress: bool = False
):
    """The embeddings of every row of ``dataset``, in order; each rank computes every ``world``-th row."""
    import torch

    from meddx.data import CohortDataset
    from meddx.embeddings import CohortEmbeddings, compute_embeddings

    if world <= 1 or len(dataset) < world:
        return compute_embeddings(backbone, dataset, device=device, head_input=head_input, progress=progress)
    import torch.distributed as dist

    rows = dataset.rows[rank::world]
    logger.info("rank %d embeds %d of %d rows", rank, len(rows), len(dataset))
    shard = CohortDataset(dataset.index_path, split=dataset.split, tasks=list(dataset.tasks), rows=rows)
    gathered: list[Any] = [None] * world
    embedded = compute_embeddings(backbone, shard, device=device, head_input=head_input, progress=progress)
    dist.all_gather_object(gathered, embedded)
    # rank r holds rows r, r + world, ...: back to dataset order
    order = torch.cat([torch.arange(r, len(dataset), world) for r in range(world)]).argsort()
    return CohortEmbeddings(
        pooled=torch.cat([g.pooled for g in gathered])[order],
        present=torch.cat([g.present for g in gathered])[order],
        rows=torch.cat([g.rows for g in gathered])[order],
        labels={t: torch.cat([g.labels[t] for g in gathered])[order] for t in gathered[0].labels},
    )


def _fit_heads_on_embeddings(
    model,
    train,
    val,
    epochs,
    batch_size,
    learning_rate,
    patience,
    seed,
    weights,
    device,
    world,
    rank,
    out_dir,
    resume,
    progress,
) -> dict[str, Any]:
    """``head``: embeddings once (frozen backbone, eval mode), then many cheap epochs over them.

    Under torchrun each rank embeds its own shard of the rows (the backbone pass is the cost of
    this mode) and gets every rank's embeddings back; every rank then fits the heads on the same
    embeddings (they take seconds; splitting them would only add communication) and gets the
    same result; rank 0 writes.
    """
    import torch

    shown = progress and rank == 0
    train_emb = _sharded_embeddings(model.backbone, train, device, world, rank, model.head_input, shown)
    val_emb = _sharded_embeddings(model.backbone, val, device, world, rank, model.head_input, shown)
    heads = model.heads
    optimizer = torch.optim.AdamW(heads.parameters(), lr=learning_rate, weight_decay=WEIGHT_DECAY)
    stopper = _EarlyStopping(patience)
    start = _resume(out_dir, heads, optimizer, stopper) if resume else 0
    generator = torch.Generator().manual_seed(seed)
    x = train_emb.pooled.to(device)
    labels = {t: v.to(device) for t, v in train_emb.labels.items()}
    val_labels = {t: v.numpy() for t, v in val_emb.labels.items()}
    # heads are tiny: check validation every `every` epochs so early stopping costs nothing
    every = max(1, epochs // 50)
    for epoch in range(start, epochs):
        heads.train()
        order = torch.randperm(len(x), generator=generator).to(device)
        for begin in range(0, len(x), batch_size):
            rows = order[begin : begin + batch_size]
            logits = heads(x[rows])
            loss = _loss(model, logits, {t: v[rows] for t, v in labels.items()}, weights)
            if loss is None:
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if (epoch + 1) % every and epoch + 1 != epochs:
            continue
        heads.eval()
        with torch.no_grad():
            val_logits = {t: v.float().cpu().numpy() for t, v in heads(val_emb.pooled.to(device)).items()}
        stop = stopper.update(epoch, mean_auroc(model.tasks, val_logits, val_labels), heads)
        if stop and epoch - stopper.best_epoch >= patience * every:
            break
    _checkpoint(out_dir, heads, optimizer, stopper, epoch, rank)
    heads.load_state_dict(stopper.best_state)
    return stopper.summary()

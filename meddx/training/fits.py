"""The two things ``finetune`` trains with :class:`~meddx.training.trainer.Trainer`.

* :class:`EndToEnd` (``full`` and ``lora``): the whole model on patient batches, one backbone pass
  per patient and step; DDP when launched by ``torchrun`` (each rank takes ``batch_size / N`` of
  every global batch through a ``DistributedSampler``, which with one replica gives a single
  process the same global batches); batch-norm statistics re-estimated after each epoch.
* :class:`HeadsOnEmbeddings` (``head``): the backbone is frozen, its embeddings computed once
  (each rank embeds its own shard under ``torchrun``), then many cheap epochs of the heads alone.

:func:`fit` picks one, configures the loop for it, and runs it.

Example:
    >>> settings = FitSettings(epochs=15, batch_size=64, learning_rate=1e-3, patience=5)
    >>> history = fit(model, "full", (train, val), settings, Ranks())  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meddx.cohort import TaskSpec
from meddx.training.distributed import Ranks, sharded_embeddings
from meddx.training.trainer import LoopConfig, Trainer
from meddx.training.validation import dataset_outputs, mean_auroc

if TYPE_CHECKING:
    import torch

    from meddx.data import CohortDataset
    from meddx.models.diagnosis import DiagnosisModel
    from meddx.training.checkpoints import CheckpointFolder

VALIDATION_BATCH = 64  # rows per forward pass when scoring the validation rows
HEAD_CHECKS = 50  # head mode checks validation about this many times over its epochs


@dataclass(frozen=True)
class FitSettings:
    """What ``finetune`` was asked for, as the fits need it.

    Attributes:
        epochs: at most this many.
        batch_size: patients per (global) step.
        learning_rate: AdamW's base rate.
        patience: validation checks without a better AUROC before stopping.
        seed: seeds shuffling, dropout and modality dropout.
        schedule: ``cosine`` or ``constant`` (``full`` and ``lora``; ``head`` is always constant).
        resume: carry on from the checkpoint.
        progress: show progress bars (on the main process).
    """

    epochs: int
    batch_size: int
    learning_rate: float
    patience: int
    seed: int = 0
    schedule: str = "cosine"
    resume: bool = False
    progress: bool = False


def class_weights(train: CohortDataset, tasks: dict[str, TaskSpec]) -> dict[str, torch.Tensor]:
    """Each task's class weights from the training labels (:func:`~meddx.models.heads.class_weights_from`)."""
    import torch

    from meddx.models.heads import class_weights_from, n_outputs

    labels = train.label_array()  # task -> (N,) int64, -1 unknown
    return {
        task: class_weights_from(torch.as_tensor(labels[task]), max(2, n_outputs(spec))) for task, spec in tasks.items()
    }


def total_loss(model, logits: dict, labels: dict, weights: dict) -> torch.Tensor | None:
    """The sum over tasks of the weighted loss on the rows with a label; None when no row has one."""
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


class EndToEnd:
    """``full`` and ``lora``: backbone passes every step; DDP when launched by torchrun."""

    def __init__(
        self, model: DiagnosisModel, data: tuple[CohortDataset, CohortDataset], settings: FitSettings, ranks: Ranks
    ):
        import torch
        from torch.utils.data import DataLoader
        from torch.utils.data.distributed import DistributedSampler

        self.module = model
        self.train, self.val = data
        self.settings, self.ranks = settings, ranks
        self.weights: dict[str, torch.Tensor] = {}
        self.stepper: torch.nn.Module = model
        if ranks.world > 1:
            self.stepper = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        # the same sampler with one replica gives a single process the same global batches as N ranks
        self.sampler: DistributedSampler[int] = DistributedSampler(
            self.train, num_replicas=ranks.world, rank=ranks.rank, shuffle=True, seed=settings.seed
        )
        self.per_rank = max(1, settings.batch_size // ranks.world)
        self.loader = DataLoader(
            self.train,
            batch_size=self.per_rank,
            sampler=self.sampler,
            collate_fn=self.train.collate,
            pin_memory=ranks.device.startswith("cuda"),
        )
        self.steps_per_epoch = len(self.loader)

    def parameters(self) -> list:
        return [p for p in self.module.parameters() if p.requires_grad]

    def batches(self, epoch: int) -> Iterator[Any]:
        import torch

        from meddx.data.prefetch import prefetched
        from meddx.training.batch_norm import keep_frozen_statistics

        self.sampler.set_epoch(epoch)
        torch.manual_seed(self.settings.seed * 1_000 + epoch * 10 + self.ranks.rank)  # dropout, per epoch and rank
        self.module.train()
        if self.module.adapter is not None:
            keep_frozen_statistics(self.module.backbone)
        yield from prefetched(self.loader)

    def loss(self, batch) -> torch.Tensor:
        import torch

        batch = batch.to(self.ranks.device, non_blocking=True)
        use_amp = self.ranks.device.startswith("cuda")
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
            logits = self.stepper(batch)
        loss = total_loss(self.module, logits, batch.labels, self.weights)
        if loss is None:
            loss = sum(v.sum() for v in logits.values()) * 0.0  # every rank must join the all-reduce
        return loss

    def end_epoch(self, epoch: int) -> None:
        from meddx.training.batch_norm import recompute_batch_norm_statistics

        if self.module.adapter is None:  # LoRA leaves batch norm frozen; otherwise eval mode needs fresh statistics
            recompute_batch_norm_statistics(self.module, self.train, self.per_rank, device=self.ranks.device)

    def step_figures(self) -> dict[str, str]:
        return {}

    def validate(self) -> float:
        logits, labels, _ = dataset_outputs(self.module, self.val, VALIDATION_BATCH, self.ranks.device)
        return mean_auroc(self.module.tasks, logits, labels)


class HeadsOnEmbeddings:
    """``head``: embeddings once (frozen backbone, eval mode), then many cheap epochs over them.

    The heads standardise their input by the training rows' per-feature statistics
    (:meth:`~meddx.models.heads.DiagnosisHeads.standardise_inputs`).

    Under torchrun each rank embeds its own shard of the rows (the backbone pass is the cost of
    this mode) and gets every rank's embeddings back; every rank then fits the heads on the same
    embeddings (they take seconds; splitting them would only add communication) and gets the
    same result; rank 0 writes.
    """

    def __init__(
        self, model: DiagnosisModel, data: tuple[CohortDataset, CohortDataset], settings: FitSettings, ranks: Ranks
    ):
        import torch

        shown = settings.progress and ranks.is_main
        train, val = data
        train_emb = sharded_embeddings(model.backbone, train, ranks, model.head_input, shown)
        self.val_emb = sharded_embeddings(model.backbone, val, ranks, model.head_input, shown)
        self.model, self.module = model, model.heads
        self.settings, self.ranks = settings, ranks
        self.weights: dict[str, torch.Tensor] = {}
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.x = train_emb.pooled.to(ranks.device)
        model.heads.standardise_inputs(self.x)  # every rank holds the same embeddings, so the same statistics
        self.labels = {t: v.to(ranks.device) for t, v in train_emb.labels.items()}
        self.val_labels = {t: v.numpy() for t, v in self.val_emb.labels.items()}
        self.steps_per_epoch = -(-len(self.x) // settings.batch_size)

    def parameters(self) -> list:
        return list(self.module.parameters())

    def batches(self, epoch: int) -> Iterator[Any]:
        import torch

        self.module.train()
        order = torch.randperm(len(self.x), generator=self.generator).to(self.ranks.device)
        for begin in range(0, len(self.x), self.settings.batch_size):
            yield order[begin : begin + self.settings.batch_size]

    def loss(self, rows) -> torch.Tensor | None:
        logits = self.module(self.x[rows])
        return total_loss(self.model, logits, {t: v[rows] for t, v in self.labels.items()}, self.weights)

    def end_epoch(self, epoch: int) -> None:
        return None

    def step_figures(self) -> dict[str, str]:
        return {}

    def validate(self) -> float:
        import torch

        self.module.eval()
        with torch.no_grad():
            logits = {
                t: v.float().cpu().numpy() for t, v in self.module(self.val_emb.pooled.to(self.ranks.device)).items()
            }
        return mean_auroc(self.model.tasks, logits, self.val_labels)


def fit(
    model: DiagnosisModel,
    mode: str,
    data: tuple[CohortDataset, CohortDataset],
    settings: FitSettings,
    ranks: Ranks,
    checkpoints: CheckpointFolder | None = None,
) -> dict[str, Any]:
    """Train ``model`` in ``mode`` on ``data`` (train, val rows) with class weights from the training rows.

    Returns:
        The early-stopping summary: ``val_auroc`` (every check), ``epochs_run``, ``best_epoch``
        (1-based) and ``best_val_auroc``; the model holds the best weights.
    """
    chosen = model.tasks
    weights = {t: w.to(ranks.device) for t, w in class_weights(data[0], chosen).items()}
    for name, task_weights in weights.items():
        model.heads.set_class_weights(name, task_weights)
    if mode == "head":
        task: EndToEnd | HeadsOnEmbeddings = HeadsOnEmbeddings(model, data, settings, ranks)
        # heads are tiny: check validation every few epochs so early stopping costs nothing
        loop = LoopConfig(
            epochs=settings.epochs,
            patience=settings.patience,
            learning_rate=settings.learning_rate,
            validate_every=max(1, settings.epochs // HEAD_CHECKS),
            checkpoint_every_check=False,
        )
    else:
        task = EndToEnd(model, data, settings, ranks)
        loop = LoopConfig(
            epochs=settings.epochs,
            patience=settings.patience,
            learning_rate=settings.learning_rate,
            schedule=settings.schedule,
            clip_norm=1.0,
            # zeros, not None: DDP gives a parameter unused in a batch a zero gradient, so a single
            # process must too (AdamW treats "no gradient" and "zero gradient" differently)
            zero_to_none=False,
            progress=settings.progress and ranks.is_main,
        )
    task.weights = weights
    return Trainer(task, loop, checkpoints).fit(resume=settings.resume)

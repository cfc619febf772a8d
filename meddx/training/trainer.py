"""One training loop: epochs of steps, validation, early stopping, checkpoints and progress.

:class:`Trainer` runs a :class:`FitTask` (what to train, its batches, its loss, its validation
score) under a :class:`LoopConfig` (how: epochs, patience, learning rate and schedule, how often to
validate, gradient clipping). In the manner of PyHealth's ``Trainer``: the loop is written once,
the tasks differ only in what they feed it. ``finetune`` has two tasks (:mod:`meddx.training.fits`):
the whole model on patient batches (``full``, ``lora``) and the heads alone on embeddings
computed once (``head``).

Each epoch: the task's batches, each with a learning rate set from the step alone (so resuming
needs no scheduler state), a loss, a backward pass, optional clipping and an AdamW step; then
the task's end-of-epoch work (batch-norm statistics), and every ``validate_every`` epochs (and
after the last) the validation score, which :class:`~meddx.training.early_stopping.EarlyStopping`
follows; the checkpoint (:class:`~meddx.training.checkpoints.CheckpointFolder`) is written after
every validation or once at the end. The best weights are loaded back when the loop ends.

Example:
    >>> config = LoopConfig(epochs=15, patience=5, learning_rate=1e-3, schedule="cosine")
    >>> Trainer(task, config, checkpoints).fit()["best_epoch"]  # doctest: +SKIP
    8
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from meddx.training.early_stopping import EarlyStopping

if TYPE_CHECKING:
    import torch


SCHEDULES: tuple[str, ...] = ("cosine", "constant")
WARMUP_FRACTION = 0.05  # of the planned steps, linear warm-up before the cosine decay
WEIGHT_DECAY = 0.01


@dataclass(frozen=True)
class LoopConfig:
    """How the loop runs.

    Attributes:
        epochs: at most this many (early stopping may stop sooner).
        patience: epochs after the best validation score before stopping.
        learning_rate: AdamW's base learning rate.
        schedule: ``cosine`` or ``constant`` (:func:`learning_rate_factor`), set before every
            step; None leaves the optimizer's rate alone.
        weight_decay: AdamW's weight decay.
        validate_every: epochs between validation checks (the last epoch is always checked);
            None: no validation and no early stopping, every epoch runs and the last weights stay.
        checkpoint_every_check: write the checkpoint after every check (every epoch without
            validation), else once at the end.
        clip_norm: clip the gradients' norm to this (None: no clipping).
        zero_to_none: ``set_to_none`` of ``zero_grad`` (False: a parameter unused in a step
            gets a zero gradient, as DDP gives it).
        progress: show a bar over each epoch's steps.
        description: the bar's label before ``epoch/epochs``.
    """

    epochs: int
    patience: int
    learning_rate: float
    schedule: str | None = None
    weight_decay: float = WEIGHT_DECAY
    validate_every: int | None = 1
    checkpoint_every_check: bool = True
    clip_norm: float | None = None
    zero_to_none: bool = True
    progress: bool = False
    description: str = "epoch"


class FitTask(Protocol):
    """What :class:`Trainer` trains: a module, its trainable parameters, batches, a loss and a score."""

    module: Any  # what early stopping keeps and the checkpoint holds

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch (sets the learning-rate schedule)."""

    def parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates (and clipping bounds)."""

    def batches(self, epoch: int) -> Iterable[Any]:
        """Put the module in training mode and yield the epoch's batches (seeded by the epoch)."""

    def loss(self, batch: Any) -> torch.Tensor | None:
        """The training loss of one batch (None: no label in it, the step is skipped)."""

    def end_epoch(self, epoch: int) -> None:
        """Work after an epoch's steps and before validation."""

    def validate(self) -> float:
        """The validation score (higher is better; nan when undefined)."""

    def step_figures(self) -> dict[str, str]:
        """Figures shown beside the progress bar after a step (may be empty)."""


class Checkpoints(Protocol):
    """Where the loop's state goes after a check and comes back from on resume."""

    def save(self, module: Any, optimizer: Any, stopper: EarlyStopping, epoch: int) -> None:
        """Write the state after ``epoch`` (0-based)."""

    def resume(self, module: Any, optimizer: Any, stopper: EarlyStopping) -> int:
        """Load the state; returns the first epoch still to run."""


class Trainer:
    """The loop: builds the optimizer, resumes, runs the epochs, keeps the best weights.

    Args:
        task: what to train (:class:`FitTask`).
        config: how (:class:`LoopConfig`).
        checkpoints: where the checkpoint goes (:class:`~meddx.training.checkpoints.CheckpointFolder`
            or another :class:`Checkpoints`; None: none is written, and ``resume`` is refused).
    """

    def __init__(self, task: FitTask, config: LoopConfig, checkpoints: Checkpoints | None = None):
        import torch

        self.task = task
        self.config = config
        self.checkpoints = checkpoints
        self.trainable = task.parameters()
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.stopper = EarlyStopping(config.patience * (config.validate_every or 1))

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train; returns :meth:`EarlyStopping.summary` (history, epochs run, best epoch and score).

        Raises:
            ConfigError: ``resume`` without checkpoints.
            ModelError: ``resume`` without a usable checkpoint.
        """
        from meddx.errors import ConfigError

        task, config, stopper = self.task, self.config, self.stopper
        start = 0
        if resume:
            if self.checkpoints is None:
                raise ConfigError("resume needs out_dir (the checkpoint lives in out_dir/checkpoint)")
            start = self.checkpoints.resume(task.module, self.optimizer, stopper)
        epoch = start - 1
        for epoch in range(start, config.epochs):
            self._run_epoch(epoch)
            task.end_epoch(epoch)
            if config.validate_every is None:
                stopper.last_epoch = epoch
                if config.checkpoint_every_check:
                    self._checkpoint(epoch)
                continue
            if (epoch + 1) % config.validate_every and epoch + 1 != config.epochs:
                continue
            stop = stopper.update(epoch, task.validate(), task.module)
            if config.checkpoint_every_check:
                self._checkpoint(epoch)
            if stop:
                break
        if not config.checkpoint_every_check:
            self._checkpoint(epoch)
        if config.validate_every is not None:
            task.module.load_state_dict(stopper.best_state)
        return stopper.summary()

    def _run_epoch(self, epoch: int) -> None:
        import torch
        from tqdm.auto import tqdm

        task, config, optimizer = self.task, self.config, self.optimizer
        total_steps = config.epochs * task.steps_per_epoch
        batches = tqdm(
            task.batches(epoch),
            desc=f"{config.description} {epoch + 1}/{config.epochs}",
            total=task.steps_per_epoch,
            disable=not config.progress,
            leave=False,
        )
        for step, batch in enumerate(batches):
            if config.schedule is not None:  # a function of the step alone, so --resume needs no state
                factor = learning_rate_factor(epoch * task.steps_per_epoch + step, total_steps, config.schedule)
                for group in optimizer.param_groups:
                    group["lr"] = config.learning_rate * factor
            loss = task.loss(batch)
            if loss is None:
                continue
            optimizer.zero_grad(set_to_none=config.zero_to_none)
            loss.backward()
            if config.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.trainable, config.clip_norm)
            optimizer.step()
            if config.progress:
                batches.set_postfix(task.step_figures())

    def _checkpoint(self, epoch: int) -> None:
        if self.checkpoints is not None:
            self.checkpoints.save(self.task.module, self.optimizer, self.stopper, epoch)


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

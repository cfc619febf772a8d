"""The training loop on its own: early stopping, validation cadence, best weights, checkpoints, resume, schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from meddx.errors import ConfigError, ModelError
from meddx.training.checkpoints import CheckpointFolder
from meddx.training.early_stopping import EarlyStopping
from meddx.training.trainer import LoopConfig, Trainer, learning_rate_factor


class LinearTask:
    """A least-squares fit of a 2-input linear module: batches, loss and validation score without a cohort.

    ``scores`` (optional) replaces the validation score of the n-th check, to steer early stopping.
    """

    def __init__(self, scores: list[float] | None = None, batches_per_epoch: int = 4):
        torch.manual_seed(0)
        self.module = torch.nn.Linear(2, 1)
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(batches_per_epoch * 8, 2, generator=generator)
        self.y = self.x @ torch.tensor([[1.5], [-2.0]]) + 0.3
        self.steps_per_epoch = batches_per_epoch
        self.scores = scores
        self.checks = 0
        self.epochs_seen: list[int] = []
        self.ended: list[int] = []

    def parameters(self) -> list:
        return list(self.module.parameters())

    def batches(self, epoch: int):
        self.epochs_seen.append(epoch)
        self.module.train()
        for begin in range(0, len(self.x), 8):
            yield slice(begin, begin + 8)

    def loss(self, rows):
        return torch.nn.functional.mse_loss(self.module(self.x[rows]), self.y[rows])

    def end_epoch(self, epoch: int) -> None:
        self.ended.append(epoch)

    def validate(self) -> float:
        self.checks += 1
        if self.scores is not None:
            return self.scores[self.checks - 1]
        with torch.no_grad():
            return -float(torch.nn.functional.mse_loss(self.module(self.x), self.y))


def test_the_loop_stops_after_patience_and_keeps_the_best_weights(monkeypatch) -> None:
    task = LinearTask(scores=[0.5, 0.8, 0.7, 0.6, 0.9])
    kept: dict[int, dict] = {}
    update = EarlyStopping.update

    def spy(self, epoch, value, module):
        kept[epoch] = {k: v.clone() for k, v in module.state_dict().items()}
        return update(self, epoch, value, module)

    monkeypatch.setattr(EarlyStopping, "update", spy)
    summary = Trainer(task, LoopConfig(epochs=10, patience=2, learning_rate=0.05)).fit()
    # best at epoch 2 (1-based), then two epochs without a better score: epoch 5's 0.9 is never seen
    assert summary == {"val_auroc": [0.5, 0.8, 0.7, 0.6], "epochs_run": 4, "best_epoch": 2, "best_val_auroc": 0.8}
    assert task.epochs_seen == task.ended == [0, 1, 2, 3]
    for name, value in task.module.state_dict().items():
        assert torch.equal(value, kept[1][name]), name
    assert not torch.equal(kept[1]["weight"], kept[3]["weight"])  # training did move on after the best


def test_validation_every_few_epochs_and_patience_counts_checks() -> None:
    task = LinearTask(scores=[0.9, 0.1, 0.1, 0.1, 0.1])
    summary = Trainer(task, LoopConfig(epochs=20, patience=2, learning_rate=0.05, validate_every=3)).fit()
    # checks after epochs 3, 6, 9 (1-based); the best is the first; 2 checks later (6 epochs) it stops
    assert task.checks == 3
    assert summary["epochs_run"] == 9
    assert summary["best_epoch"] == 3
    last = LinearTask()
    Trainer(last, LoopConfig(epochs=7, patience=5, learning_rate=0.05, validate_every=3)).fit()
    assert last.checks == 3  # after epochs 3, 6 and the last one, 7


def test_a_resumed_loop_ends_as_an_uninterrupted_one(tmp_path: Path) -> None:
    config = LoopConfig(epochs=6, patience=10, learning_rate=0.05, schedule="cosine", clip_norm=1.0)
    whole = LinearTask()
    whole_summary = Trainer(whole, config, CheckpointFolder(tmp_path / "whole")).fit()

    stopped = CheckpointFolder(tmp_path / "stopped")
    interrupted = LinearTask()
    trainer = Trainer(interrupted, config, stopped)
    original = interrupted.validate

    def stop_after_three() -> float:  # stopped in epoch 4 of 6, after the checkpoint of epoch 3
        if interrupted.checks == 3:
            raise KeyboardInterrupt
        return original()

    interrupted.validate = stop_after_three
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert json.loads((tmp_path / "stopped" / "progress.json").read_text())["epoch"] == 3

    resumed = LinearTask()
    summary = Trainer(resumed, config, CheckpointFolder(tmp_path / "stopped")).fit(resume=True)
    assert resumed.epochs_seen == [3, 4, 5]
    assert summary == whole_summary
    for name, value in whole.module.state_dict().items():
        assert torch.equal(value, resumed.module.state_dict()[name]), name


def test_resume_needs_a_checkpoint(tmp_path: Path) -> None:
    config = LoopConfig(epochs=2, patience=1, learning_rate=0.05)
    with pytest.raises(ConfigError, match="resume needs out_dir"):
        Trainer(LinearTask(), config).fit(resume=True)
    with pytest.raises(ModelError, match="no checkpoint in"):
        Trainer(LinearTask(), config, CheckpointFolder(tmp_path / "none")).fit(resume=True)


def test_only_the_writer_writes_checkpoints(tmp_path: Path) -> None:
    config = LoopConfig(epochs=2, patience=1, learning_rate=0.05)
    Trainer(LinearTask(), config, CheckpointFolder(tmp_path / "rank1", writer=False)).fit()
    assert not (tmp_path / "rank1").exists()
    Trainer(
        LinearTask(),
        LoopConfig(**{**config.__dict__, "checkpoint_every_check": False}),
        CheckpointFolder(tmp_path / "rank0"),
    ).fit()
    names = sorted(p.name for p in (tmp_path / "rank0").iterdir())
    assert names == ["best.safetensors", "last.safetensors", "optimizer.json", "optimizer.safetensors", "progress.json"]


def test_the_schedule_sets_the_rate_of_every_step() -> None:
    task = LinearTask(batches_per_epoch=5)
    seen: list[float] = []
    trainer = Trainer(task, LoopConfig(epochs=2, patience=5, learning_rate=0.1, schedule="cosine"))
    loss = task.loss
    task.loss = lambda rows: seen.append(trainer.optimizer.param_groups[0]["lr"]) or loss(rows)
    trainer.fit()
    assert seen == pytest.approx([0.1 * learning_rate_factor(step, 10, "cosine") for step in range(10)])
    constant = LinearTask()
    kept = Trainer(constant, LoopConfig(epochs=1, patience=1, learning_rate=0.1))  # schedule None: left alone
    kept.optimizer.param_groups[0]["lr"] = 0.02
    kept.fit()
    assert kept.optimizer.param_groups[0]["lr"] == 0.02


def test_a_step_without_a_loss_is_skipped() -> None:
    task = LinearTask()
    before = {k: v.clone() for k, v in task.module.state_dict().items()}
    task.loss = lambda rows: None
    Trainer(task, LoopConfig(epochs=2, patience=5, learning_rate=0.1)).fit()
    assert all(torch.equal(before[k], v) for k, v in task.module.state_dict().items())


def test_without_validation_every_epoch_runs_and_the_last_weights_stay(tmp_path: Path) -> None:
    task = LinearTask(scores=[])  # validate() would fail: no score to give
    saved: list[int] = []
    weights: dict[int, torch.Tensor] = {}

    class Recorder:
        def save(self, module, optimizer, stopper, epoch) -> None:
            saved.append(epoch)
            weights[epoch] = module.weight.detach().clone()

        def resume(self, module, optimizer, stopper) -> int:
            return 2

    summary = Trainer(task, LoopConfig(epochs=4, patience=1, learning_rate=0.05, validate_every=None), Recorder()).fit()
    assert task.checks == 0
    assert task.epochs_seen == [0, 1, 2, 3]
    assert saved == [0, 1, 2, 3]
    assert summary["epochs_run"] == 4
    assert summary["val_auroc"] == []
    assert torch.equal(task.module.weight, weights[3])
    assert not torch.equal(weights[0], weights[3])  # the last ones
    resumed = LinearTask(scores=[])
    Trainer(resumed, LoopConfig(epochs=4, patience=1, learning_rate=0.05, validate_every=None), Recorder()).fit(
        resume=True
    )
    assert resumed.epochs_seen == [2, 3]
    assert saved[-2:] == [2, 3]

"""Diagnostic heads on the backbone's pooled embedding, one per task.

A binary task has one logit (the positive class), a multiclass task one per class. Several
binary tasks on one backbone make a multilabel problem; each head's loss leaves out the rows
whose label for that task is unknown (an empty manifest cell), never treating them as
negatives. Class weights (inverse frequency on the training rows) counter imbalance.

Example:
    >>> import torch
    >>> heads = DiagnosisHeads(64, {"disease": TaskSpec("disease", "binary", ("0", "1")),
    ...                             "grade": TaskSpec("grade", "multiclass", ("0", "1", "2"))})
    >>> logits = heads(torch.zeros(4, 64))  # the backbone's pooled embedding (B, D)
    >>> {task: tuple(value.shape) for task, value in logits.items()}
    {'disease': (4,), 'grade': (4, 3)}
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from meddx.cohort import TaskSpec


def n_outputs(task: TaskSpec) -> int:
    """Logits a task's head gives: 1 for binary, one per class for multiclass."""
    return 1 if task.kind == "binary" else len(task.classes)


STANDARDISE_EPS = 1e-6  # added to each feature's variance before the square root


class DiagnosisHeads(nn.Module):
    """One small head per task: LayerNorm, dropout and a linear map of the pooled embedding.

    The embedding is first standardised per feature, ``(x - input_mean) / input_scale``: the
    identity (mean 0, scale 1) unless :meth:`standardise_inputs` set them from the training
    rows, as ``head`` mode does. A pretrained backbone's embedding can be nearly the same vector
    for every patient (what varies is small beside what all share), and a LayerNorm, which
    normalises each row across its features, keeps that shared part; per-feature
    standardisation removes it, so the heads see what tells patients apart.

    Class weights shift what a weighted loss learns: its optimal logit is the true log-odds plus
    ``log(pos_weight)`` (binary), or the true log-probability plus ``log(w_c)`` (multiclass). A
    temperature cannot undo a shift, so each task keeps that offset (``logit_offset``, set by
    :meth:`set_class_weights`) and the heads subtract it outside training: the logits that
    calibration and predictions see estimate the real class probabilities.

    Args:
        d_model: width of the pooled embedding.
        tasks: task name -> :class:`~meddx.cohort.TaskSpec`.
        dropout: before the linear map.
    """

    input_mean: torch.Tensor  # (D,) buffers, saved with the weights
    input_scale: torch.Tensor

    def __init__(self, d_model: int, tasks: Mapping[str, TaskSpec], dropout: float = 0.1):
        super().__init__()
        self.tasks = dict(tasks)
        self.heads = nn.ModuleDict(
            {
                name: nn.Sequential(nn.LayerNorm(d_model), nn.Dropout(dropout), nn.Linear(d_model, n_outputs(task)))
                for name, task in self.tasks.items()
            }
        )
        self.logit_offset = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(n_outputs(task)), requires_grad=False) for name, task in self.tasks.items()}
        )
        self.register_buffer("input_mean", torch.zeros(d_model))
        self.register_buffer("input_scale", torch.ones(d_model))

    def standardise_inputs(self, pooled: torch.Tensor) -> None:
        """Standardise every later input by these ``(N, D)`` training embeddings' per-feature mean and
        standard deviation (the variance floored by :data:`STANDARDISE_EPS`)."""
        if pooled.ndim != 2 or pooled.shape[1] != self.input_mean.numel() or len(pooled) < 2:
            raise ValueError(f"need (N >= 2, {self.input_mean.numel()}) embeddings, got {tuple(pooled.shape)}")
        x = pooled.detach().double()
        self.input_mean.copy_(x.mean(0).to(self.input_mean))
        self.input_scale.copy_((x.var(0, unbiased=False) + STANDARDISE_EPS).sqrt().to(self.input_scale))

    def set_class_weights(self, task: str, weights: torch.Tensor) -> None:
        """Record the class weights a task is trained with (see the class docstring)."""
        if self.tasks[task].kind == "binary":
            offset = torch.log(weights[1] / weights[0]).reshape(1)
        else:
            offset = torch.log(weights)
        self.logit_offset[task].data.copy_(offset.to(self.logit_offset[task].device))

    def forward(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per task: ``(B,)`` binary, ``(B, C)`` multiclass (class-weight offset removed outside training)."""
        out = {}
        pooled = (pooled - self.input_mean) / self.input_scale
        for name, head in self.heads.items():
            logits = head(pooled)  # (B, 1) or (B, C)
            if not self.training:
                logits = logits - self.logit_offset[name]
            out[name] = logits.squeeze(-1) if self.tasks[name].kind == "binary" else logits
        return out


def task_loss(
    logits: torch.Tensor, labels: torch.Tensor, known: torch.Tensor, kind: str, class_weights: torch.Tensor | None
) -> torch.Tensor | None:
    """Mean loss of one task over the rows whose label is known; None when there are none.

    Binary: weighted BCE (``class_weights[1] / class_weights[0]`` as the positive weight);
    multiclass: weighted cross-entropy.
    """
    if not known.any():
        return None
    logits, labels = logits[known], labels[known]
    if kind == "binary":
        pos_weight = None if class_weights is None else (class_weights[1] / class_weights[0]).reshape(1)
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=pos_weight)
    return F.cross_entropy(logits.float(), labels, weight=class_weights)


def class_weights_from(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights from known training labels (``-1`` = unknown), mean 1.

    A class absent from the training rows gets weight 1 (it cannot be learnt anyway).
    """
    known = labels[labels >= 0]
    counts = torch.bincount(known, minlength=n_classes).float()
    weights = torch.where(counts > 0, counts.sum() / (n_classes * counts.clamp(min=1)), torch.ones_like(counts))
    return weights / weights.mean()

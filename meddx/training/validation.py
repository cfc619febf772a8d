"""Validation outputs and the score early stopping follows (mean AUROC over tasks).

Example:
    >>> import numpy as np
    >>> from meddx.cohort import TaskSpec
    >>> tasks = {"disease": TaskSpec("disease", "binary", ("0", "1"))}
    >>> mean_auroc(tasks, {"disease": np.array([-1.0, 2.0, 0.5, -2.0])}, {"disease": np.array([0, 1, 1, 0])})
    1.0
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from meddx.cohort import TaskSpec

if TYPE_CHECKING:
    from meddx.data import CohortDataset
    from meddx.models.diagnosis import DiagnosisModel


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

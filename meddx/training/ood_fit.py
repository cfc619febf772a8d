"""Fitting the out-of-distribution scores after training (:mod:`meddx.models.ood`): the scorers on
the training rows' embeddings, the thresholds on the validation rows' at the false-alarm rate.

Example:
    >>> model.ood = fit_ood_scores(model, train, val, rate=0.05)  # doctest: +SKIP
    >>> model.ood.thresholds  # doctest: +SKIP
    {'imaging': 11.2, 'ehr': 9.8, 'summary': 12.5}
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from meddx.models.input_ranges import InputRanges
from meddx.models.ood import DEFAULT_FALSE_ALARM, OodModel, fit_ood

if TYPE_CHECKING:
    from meddx.data import CohortDataset
    from meddx.models.diagnosis import DiagnosisModel

logger = logging.getLogger(__name__)


def dataset_embeddings(
    model: DiagnosisModel, dataset: CohortDataset, batch_size: int = 64, device: str = "cpu"
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """Every row's OOD embeddings and presence per space, and its class index of the model's first task (-1: none)."""
    import torch
    from torch.utils.data import DataLoader

    model.eval()
    first = next(iter(model.tasks))
    parts: list[tuple[dict, dict]] = []
    labels = []
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=dataset.collate):
            parts.append(model.ood_embeddings(batch.to(device)))
            known = batch.labels.get(first)
            labels.append(known.numpy() if known is not None else np.full(len(batch), -1))
    spaces = dict.fromkeys(s for embeddings, _ in parts for s in embeddings)
    embeddings, present = {}, {}
    for space in spaces:
        dim = next(e[space].shape[1] for e, _ in parts if space in e)
        embeddings[space] = np.concatenate(
            [e[space] if space in e else np.zeros((len(h[next(iter(h))]), dim)) for e, h in parts]
        )
        present[space] = np.concatenate(
            [h[space] if space in h else np.zeros(len(h[next(iter(h))]), dtype=bool) for _, h in parts]
        )
    return embeddings, present, np.concatenate(labels) if labels else np.zeros(0, dtype=int)


def fit_ood_scores(
    model: DiagnosisModel,
    train: CohortDataset,
    val: CohortDataset,
    rate: float = DEFAULT_FALSE_ALARM,
    method: str = "mahalanobis",
    batch_size: int = 64,
    device: str = "cpu",
) -> OodModel | None:
    """The fitted OOD scorers of a trained model (None, logged, when no space has enough rows)."""
    train_x, train_have, labels = dataset_embeddings(model, train, batch_size, device)
    val_x, val_have, _ = dataset_embeddings(model, val, batch_size, device)
    shared = [s for s in train_x if s in val_x]
    ood = fit_ood(
        {s: train_x[s] for s in shared},
        labels,
        {s: val_x[s] for s in shared},
        train_present={s: train_have[s] for s in shared},
        val_present={s: val_have[s] for s in shared},
        method=method,
        rate=rate,
    )
    if ood is None:
        from meddx.models.ood import MIN_TRAIN_ROWS, min_val_rows

        logger.warning(
            "out-of-distribution scores need %d training and %d validation rows with a modality (false-alarm "
            "rate %.3f); this cohort has too few, so the model has none and diagnose will not abstain",
            MIN_TRAIN_ROWS,
            min_val_rows(rate),
            rate,
        )
    else:
        logger.info("ood: %s thresholds at false-alarm rate %.3f: %s", method, rate, ood.thresholds)
    return ood


def fit_input_ranges(datasets: tuple[CohortDataset, ...]) -> InputRanges:
    """The acquisition ranges (:mod:`meddx.models.input_ranges`) of the datasets' rows."""
    facts: dict[str, list[dict]] = {}
    for dataset in datasets:
        for row in dataset.acquisition_facts().values():
            for modality, values in row.items():
                facts.setdefault(modality, []).append(values)
    return InputRanges.fit(facts)

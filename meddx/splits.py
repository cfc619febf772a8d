"""Train/val/test splits for fine-tuning: the manifest's ``split`` column, else a seeded one.

A seeded split is grouped by patient, so one patient's rows (several index times) never
straddle two splits: otherwise the model would be validated on a patient it trained on.

Example:
    >>> from collections import Counter
    >>> from meddx.cohort import load_cohort
    >>> cohort = with_splits(load_cohort("sample_data/manifest.csv"), seed=0)  # its split column is kept
    >>> sorted(Counter(row.split for row in cohort).items())
    [('test', 12), ('train', 36), ('val', 12)]
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from meddx.cohort import Cohort
from meddx.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)  # train, val, test


def with_splits(cohort: Cohort, seed: int = 0, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> Cohort:
    """The cohort with every row's split set.

    Rows that already have a split keep it. When no row has one, patients are shuffled with
    ``seed`` and cut by ``fractions``; all rows of a patient go to the same split.

    Raises:
        ConfigError: some rows have a split and others do not (say which is meant), or the
            fractions do not add up to 1.
    """
    given = [row.split is not None for row in cohort]
    if all(given):
        return cohort
    if any(given):
        raise ConfigError(
            f"{cohort.path}: {sum(given)} of {len(cohort)} rows have a split and the others none; "
            "give every row a split (train, val or test) or leave the column empty everywhere"
        )
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ConfigError(f"split fractions must be three non-negative numbers adding up to 1, got {fractions}")
    patients = sorted({row.patient_id for row in cohort})
    order = np.random.default_rng(seed).permutation(len(patients))
    n_train = int(round(fractions[0] * len(patients)))
    n_val = int(round(fractions[1] * len(patients)))
    split_of = {}
    for rank, index in enumerate(order):
        split_of[patients[index]] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    rows = [dataclasses.replace(row, split=split_of[row.patient_id]) for row in cohort]
    logger.info("no split column: %d patients split %s by seed %d, grouped by patient", len(patients), fractions, seed)
    return dataclasses.replace(cohort, rows=rows)

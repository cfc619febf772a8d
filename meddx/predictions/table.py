"""The predictions table's writer: :class:`~meddx.predictions.types.TaskPrediction` -> rows.

The columns are the predictions contract (README, ``schemas/prediction_row.schema.json``):
identity, calibrated and raw probability, prediction, conformal set, modalities used,
status, per-class probabilities for multiclass tasks, and per present modality its
contribution (logit change when withheld) and ablation probability (calibrated probability
when withheld).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from meddx.predictions.columns import (
    ABLATION_PREFIX,
    ABSTAIN,
    CLASS_PROBABILITY_PREFIX,
    CONTRIBUTION_PREFIX,
    ERROR,
    INDEX_TIME,
    MODALITIES_COLUMN,
    MODALITY_ERRORS,
    OK,
    OOD,
    OOD_INPUTS,
    OOD_PREFIX,
    PATIENT_ID,
    PREDICTION,
    PREDICTION_SET,
    PROBABILITY,
    RAW_CLASS_PROBABILITY_PREFIX,
    RAW_PROBABILITY,
    ROW,
    SET_SEPARATOR,
    STATUS,
    TASK,
)
from meddx.predictions.types import TaskPrediction

if TYPE_CHECKING:
    import pandas as pd


def prediction_row(p: TaskPrediction) -> dict[str, Any]:
    """The table row of one prediction (with the manifest row in ``_row``).

    Example:
        >>> p = TaskPrediction("P1", "2024-03-05T14:00:00Z", "disease", "binary", ("0", "1"), 3,
        ...                    (0.2, 0.8), (0.3, 0.7), "1", ("1",), ("imaging",), {"imaging": 0.5},
        ...                    {"imaging": (0.6, 0.4)})
        >>> row = prediction_row(p)
        >>> row["probability"], row["prediction_set"], row["contribution:imaging"], row["ablation:imaging"]
        (0.8, '1', 0.5, 0.4)
    """
    row: dict[str, Any] = {
        PATIENT_ID: p.patient_id,
        INDEX_TIME: p.index_time,
        TASK: p.task,
        STATUS: ABSTAIN if p.abstain else OK,
        MODALITIES_COLUMN: SET_SEPARATOR.join(p.modalities),
        PREDICTION: p.prediction,
        ROW: p.row,
        PROBABILITY: p.probability,
        RAW_PROBABILITY: p.raw_probability,
    }
    if not p.is_binary:
        for c, name in enumerate(p.classes):
            row[CLASS_PROBABILITY_PREFIX + name] = p.probabilities[c]
            row[RAW_CLASS_PROBABILITY_PREFIX + name] = p.raw_probabilities[c]
    if p.prediction_set is not None:
        row[PREDICTION_SET] = SET_SEPARATOR.join(p.prediction_set)
    for modality, change in p.contributions.items():
        row[CONTRIBUTION_PREFIX + modality] = change
        ablated = p.ablations[modality]
        if p.is_binary:
            row[ABLATION_PREFIX + modality] = ablated[1]
        else:
            for c, name in enumerate(p.classes):
                row[f"{ABLATION_PREFIX}{modality}:{name}"] = ablated[c]
    if p.modality_errors is not None:
        row[MODALITY_ERRORS] = SET_SEPARATOR.join(p.modality_errors)
    if p.ood is not None:
        row[OOD] = p.ood
        for space, ratio in p.ood_scores.items():
            row[OOD_PREFIX + space] = ratio
        if p.ood_inputs:
            row[OOD_INPUTS] = SET_SEPARATOR.join(p.ood_inputs)
    return row


def error_row(patient_id: str, index_time: str, task: str, row: int, modality_errors: Sequence[str]) -> dict[str, Any]:
    """The table row of a task not diagnosed (no modality of the manifest row could be used)."""
    return {
        PATIENT_ID: patient_id,
        INDEX_TIME: index_time,
        TASK: task,
        STATUS: ERROR,
        MODALITIES_COLUMN: "",
        MODALITY_ERRORS: SET_SEPARATOR.join(modality_errors),
        ROW: row,
    }


def prediction_frame(predictions: Iterable[TaskPrediction]) -> pd.DataFrame:
    """The table rows of ``predictions`` in their order, as a DataFrame (``_row`` kept)."""
    import pandas as pd

    return pd.DataFrame([prediction_row(p) for p in predictions])

"""The predictions table's column names, defined once (README "Predictions",
``schemas/prediction_row.schema.json``).

One row per (patient_id, index_time, task). Per-class, contribution and ablation columns are
a prefix and a name: ``probability:<class>``, ``contribution:<modality>``,
``ablation:<modality>`` (binary) or ``ablation:<modality>:<class>``.
"""

from __future__ import annotations

from collections.abc import Sequence

PATIENT_ID = "patient_id"
INDEX_TIME = "index_time"
TASK = "task"
STATUS = "status"
PROBABILITY = "probability"
RAW_PROBABILITY = "raw_probability"
PREDICTION = "prediction"
PREDICTION_SET = "prediction_set"
MODALITIES_COLUMN = "modalities"
MODALITY_ERRORS = "modality_errors"
OOD = "ood"  # the fused OOD score over its threshold (above 1: flagged)
OOD_INPUTS = "ood_inputs"  # acquisition facts beyond the training rows' range (modality.fact, joined by SET_SEPARATOR)
ROW = "_row"  # the manifest row (1-based) while a run is written; not in the final files

CLASS_PROBABILITY_PREFIX = "probability:"
RAW_CLASS_PROBABILITY_PREFIX = "raw_probability:"
CONTRIBUTION_PREFIX = "contribution:"
ABLATION_PREFIX = "ablation:"
OOD_PREFIX = "ood:"  # ood:<modality> (and ood:summary): that space's OOD score over its threshold
NUMERIC_PREFIXES = (PROBABILITY, RAW_PROBABILITY, CONTRIBUTION_PREFIX, ABLATION_PREFIX, OOD)

SET_SEPARATOR = "|"  # joins class names (prediction_set) and modality names (modalities, modality_errors)
OK, ERROR, ABSTAIN = "ok", "error", "abstain"  # abstain: flagged out of distribution, prediction kept
STATUSES = (OK, ERROR, ABSTAIN)
REQUIRED_COLUMNS = (PATIENT_ID, INDEX_TIME, TASK, STATUS)
HEAD_COLUMNS = (
    PATIENT_ID,
    INDEX_TIME,
    TASK,
    STATUS,
    PROBABILITY,
    RAW_PROBABILITY,
    PREDICTION,
    PREDICTION_SET,
    MODALITIES_COLUMN,
    MODALITY_ERRORS,
    OOD,
)


def column_order(columns: Sequence[str]) -> list[str]:
    """The contract's columns first, then per-class, contribution and ablation columns, then the manifest's.

    Example:
        >>> column_order(["sex", "ablation:ehr", "task", "probability:a", "patient_id"])
        ['patient_id', 'task', 'probability:a', 'ablation:ehr', 'sex']
    """
    groups: list[list[str]] = [[c for c in HEAD_COLUMNS if c in columns], [], [], [], [], []]
    for column in columns:
        if column in HEAD_COLUMNS:
            continue
        if column.startswith((CLASS_PROBABILITY_PREFIX, RAW_CLASS_PROBABILITY_PREFIX)):
            groups[1].append(column)
        elif column.startswith(CONTRIBUTION_PREFIX):
            groups[2].append(column)
        elif column.startswith(ABLATION_PREFIX):
            groups[3].append(column)
        elif column == ROW:
            groups[5].append(column)
        else:
            groups[4].append(column)
    return [c for group in groups for c in group]

"""Predictions with a type: :class:`TaskPrediction` (``types``), the table's column names
(``columns``), its writer (``table``) and its reader (``reader``: :func:`read_predictions`,
:func:`load_task_rows` -> :class:`TaskRows`, what evaluation reads)."""

from meddx.predictions.columns import SET_SEPARATOR
from meddx.predictions.reader import TaskRows, load_task_rows, read_predictions
from meddx.predictions.table import error_row, prediction_frame, prediction_row
from meddx.predictions.types import TaskPrediction

__all__ = [
    "SET_SEPARATOR",
    "TaskPrediction",
    "TaskRows",
    "error_row",
    "load_task_rows",
    "prediction_frame",
    "prediction_row",
    "read_predictions",
]

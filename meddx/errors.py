"""The meddx error hierarchy.

Every error meddx raises on purpose is a :class:`MeddxError`, so a caller can catch
one type. Messages say what was received and how to fix it, and never carry patient
identifiers (names, birth dates, MRNs): only file paths, modalities and reasons.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class MeddxError(Exception):
    """Base class of every error meddx raises on purpose."""


def short_reason(exc: BaseException, limit: int = 300) -> str:
    """A library exception's message on one line, cut to ``limit`` characters, for a meddx message.

    Example:
        >>> short_reason(ValueError("bad\\n  header"))
        'bad header'
    """
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class ManifestProblem:
    """One thing wrong with a manifest: where (row, column) and why."""

    row: int | None  # 1-based data row (header excluded); None for the whole file
    column: str | None
    reason: str

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column {self.column!r}")
        prefix = ", ".join(where)
        return f"{prefix}: {self.reason}" if prefix else self.reason


class ManifestError(MeddxError):
    """A cohort manifest is unusable; ``problems`` lists every problem found at once."""

    def __init__(self, path: str | Path, problems: list[ManifestProblem]):
        self.path = str(path)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        n = len(self.problems)
        super().__init__(
            f"manifest {self.path} has {n} problem{'s' if n != 1 else ''}; fix them and run again:\n{lines}"
        )


class IngestError(MeddxError):
    """A file could not be read into a record.

    Attributes:
        path: the file (or folder) that failed.
        modality: the modality being read (``imaging``, ``ehr``, ...).
        reason: what was wrong and, where possible, how to fix it.
    """

    def __init__(self, path: str | Path, modality: str, reason: str):
        self.path = str(path)
        self.modality = str(modality)
        self.reason = reason
        super().__init__(f"{self.modality}: cannot read {self.path}: {reason}")

    def __reduce__(self):  # keep the three fields when sent between worker processes
        return (type(self), (self.path, self.modality, self.reason))


class LeakageError(IngestError):
    """An ingestor produced data dated after the index time (a bug in that ingestor)."""


class ConfigError(MeddxError):
    """A configuration (pipeline file, model config, arguments) is invalid."""


class ModelError(MeddxError):
    """A model folder is missing, corrupt, or from an unknown meddx version."""


class NotFittedError(ModelError):
    """A tensorizer, aligner, calibrator or conformal classifier was used before ``fit`` (or
    before loading a fitted state).

    Every fitted meddx object raises this one type, whatever it is.
    """


class PredictionsError(MeddxError):
    """A predictions file (the input of ``meddx evaluate``) is unusable; the message says what to fix."""

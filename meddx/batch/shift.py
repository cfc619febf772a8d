"""The batch shift report of ``diagnose`` (``run.json``'s ``"shift"``): per OOD space (a modality,
or ``summary``: what the heads read), a two-sample test of this batch's embeddings against the
reference sample of training embeddings saved with the model (``ood.safetensors``), and the share
of the batch's rows flagged out of distribution.

Beside it, ``run.json``'s ``"inputs"`` (:class:`InputSample`): what the readers found in this
run's records, per modality, beside what they found in the training rows.

The batch side is a seeded reservoir of at most :data:`~meddx.models.ood.REFERENCE_ROWS` rows per
space over the chunks diagnosed in this run (chunks finished before a ``--resume`` are not in it;
``rows`` says how many were). Both engines feed it: the Ray engine's actors send each chunk's
embeddings back with its predictions.

Example:
    >>> sample = ShiftSample(ood)  # doctest: +SKIP
    >>> for output in outputs: sample.add(output)  # doctest: +SKIP
    >>> sample.report()["audio"]  # doctest: +SKIP
    {'mmd': 0.41, 'p_value': 0.005, 'reference_rows': 512, 'rows': 38, 'flagged_share': 0.89}
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meddx.models.ood import REFERENCE_ROWS, SUMMARY, mmd_test

if TYPE_CHECKING:
    from meddx.batch.predict import ChunkOutput
    from meddx.models.ood import OodModel

MIN_ROWS = 10  # fewer batch rows in a space: no test, only its counts


class ShiftSample:
    """Collects a batch's embeddings (a reservoir per space) and flags, and reports the shift test."""

    def __init__(self, ood: OodModel, seed: int = 0, permutations: int = 200):
        self.ood = ood
        self.rng = np.random.default_rng(seed)
        self.permutations = permutations
        self.kept: dict[str, list[np.ndarray]] = {}
        self.seen: dict[str, int] = {}
        self.flags: dict[str, list[bool]] = {}

    def add(self, output: ChunkOutput) -> None:
        """One finished chunk: its embeddings (if any) and its rows' flags (first task of each row)."""
        for space, parts in output.embeddings.items():
            for values in parts:
                for row in np.asarray(values):
                    self._keep(space, row)
        first: dict[int, Any] = {}
        for p in output.predictions:
            first.setdefault(p.row, p)
        for p in first.values():
            if p.ood is None:
                continue
            self.flags.setdefault("fused", []).append(p.ood > 1)
            for space, ratio in p.ood_scores.items():
                self.flags.setdefault(space, []).append(ratio > 1)

    def _keep(self, space: str, row: np.ndarray) -> None:
        kept = self.kept.setdefault(space, [])
        self.seen[space] = self.seen.get(space, 0) + 1
        if len(kept) < REFERENCE_ROWS:
            kept.append(row)
        else:
            k = int(self.rng.integers(0, self.seen[space]))
            if k < REFERENCE_ROWS:
                kept[k] = row

    def report(self) -> dict[str, Any]:
        """Space -> ``rows`` flagged and seen, ``flagged_share``, and (with enough rows) ``mmd``, ``p_value``."""
        found: dict[str, Any] = {}
        for space, flags in self.flags.items():
            found[space] = {"rows": len(flags), "flagged_share": round(float(np.mean(flags)), 4)}
        for space, kept in self.kept.items():
            reference = self.ood.references.get(space)
            entry = found.setdefault(space, {})
            entry["embedding_rows"] = self.seen[space]
            if reference is None or len(kept) < MIN_ROWS or len(reference) < MIN_ROWS:
                continue
            test = mmd_test(reference, np.stack(kept), permutations=self.permutations)
            entry.update(
                test="mmd-permutation",
                mmd=round(test["mmd"], 4),
                p_value=round(test["p_value"], 4),
                reference_rows=test["reference_rows"],
                sampled_rows=test["rows"],
            )
        order = [s for s in (*self.ood.spaces, "fused") if s in found and s != SUMMARY] + [
            s for s in (SUMMARY,) if s in found
        ]
        return {s: found[s] for s in order}


class InputSample:
    """The records a run read, for their per-modality input summaries beside the training rows'.

    ``run.json``'s ``"inputs"``: ``training`` (the model folder's ``training_summary.json``),
    ``batch`` (:func:`meddx.data.summary.input_summaries` of the records this run read: spacing,
    intensity window, note length, sampling and frame rates), so a user sees *what* changed. The
    records are read back from the ingest cache (headers only, notes whole) after the run.
    """

    def __init__(self, training: dict[str, Any], cache_root: Path):
        self.training = training
        self.cache_root = cache_root
        self.keys: list[tuple[str, str]] = []
        self.rows = 0

    def add(self, output: ChunkOutput) -> None:
        """One finished chunk: the cache keys of every record its rows read."""
        for ready in output.ready.rows:
            self.rows += 1
            self.keys += [(o.modality.value, o.key) for o in ready.outcomes if o.status == "ok" and o.key]

    def report(self) -> dict[str, Any]:
        """``{"training", "training_of", "batch", "batch_rows"}`` (as ``meddx evaluate --model-card`` gives)."""
        from meddx.cache import RecordCache
        from meddx.data.summary import cached_records, input_summaries

        return {
            "training": self.training.get("inputs"),
            "training_of": self.training.get("inputs_of"),
            "batch": input_summaries(cached_records(RecordCache(self.cache_root), self.keys)),
            "batch_rows": self.rows,
        }

"""Out-of-distribution scores: how unlike the training rows a row looks, per modality and fused.

Fitted at fine-tuning time on the training rows' embeddings (one *space* per modality: the mean
of that modality's own encoder tokens before fusion; and ``summary``: what the heads read),
thresholded on the validation rows:

* ``mahalanobis`` (default): the distance to the nearest class-conditional Gaussian (classes of
  the model's first task; rows without a label only shape nothing), with one covariance shared by
  the classes and shrunk by Ledoit-Wolf (``sklearn.covariance.LedoitWolf``): stable when a space
  has more dimensions than rows;
* ``knn``: the distance to the ``k``-th nearest training embedding (each dimension standardised
  on the training rows);
* :func:`energy_score` of the logits is measured beside them (``docs/design.md``) but not saved:
  it sees only what the heads see.

Each space's threshold is the conformal ``1 - rate`` quantile of its validation scores, so an
unshifted row is flagged with probability about ``rate`` (``ood_false_alarm``, default 0.05). A
row's fused score is the largest of its spaces' score-to-threshold ratios; its threshold is the
same quantile of the validation rows' fused scores *cross-fitted* (each half's ratios against
thresholds set on the other half: ratios against thresholds set on the same rows would never
pass 1 and the fused flag would fire far more often than ``rate``). A space needs at least
``ceil((1 - rate) / rate)`` validation rows (19 at 5%), fewer cannot honour the rate; with
no space left the model has no OOD scores (logged). What a row gets
(:meth:`OodModel.score`) are ratios: ``ood:<space>`` = score / threshold and ``ood`` = fused /
fused threshold; above 1 is flagged.

Saved in the model folder as ``ood.safetensors`` (per space its class means and shrunk precision,
or its standardised neighbour bank, and a reference sample of at most :data:`REFERENCE_ROWS` training
embeddings for the batch shift test :func:`mmd_test`) and ``ood.json`` (method, thresholds,
rate, rows fitted on, dimensions, and the training rows' acquisition ranges:
:mod:`meddx.models.input_ranges`); :func:`load_ood` checks both whole.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> train = {"ehr": rng.normal(size=(300, 4))}
    >>> val = {"ehr": rng.normal(size=(200, 4))}
    >>> ood = fit_ood(train, np.zeros(300, dtype=int), val, rate=0.05)
    >>> ratios, fused = ood.score({"ehr": rng.normal(size=(5, 4)) + 10})
    >>> bool((fused > 1).all()), bool((ratios["ehr"] > 1).all())
    (True, True)
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from meddx.errors import ModelError
from meddx.models.input_ranges import InputRanges

logger = logging.getLogger(__name__)

OOD_TENSORS = "ood.safetensors"
OOD_JSON = "ood.json"
OOD_FORMAT = "meddx.ood/1"
SUMMARY = "summary"  # the space of what the heads read (the fused summary)
METHODS = ("mahalanobis", "knn")
DEFAULT_FALSE_ALARM = 0.05
REFERENCE_ROWS = 512
KNN_BANK_ROWS = 4096
KNN_K = 10
MIN_TRAIN_ROWS = 10
MAX_DIM = 65_536


def conformal_quantile(scores: np.ndarray, rate: float) -> float:
    """The ``ceil((n + 1)(1 - rate))``-th smallest score (the largest when that is past ``n``).

    Example:
        >>> conformal_quantile(np.arange(1.0, 20.0), 0.1)
        18.0
    """
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    k = min(math.ceil((len(ordered) + 1) * (1 - rate)), len(ordered))
    return float(ordered[k - 1])


def energy_score(logits: np.ndarray, kind: str) -> np.ndarray:
    """The negative free energy ``-logsumexp(logits)`` per row (higher: more in-distribution).

    A binary head's one logit ``l`` is read as the two logits ``(0, l)``. Returned negated
    (``logsumexp``) so that, like the other scores, higher means more unusual.
    """
    values = np.asarray(logits, dtype=np.float64)
    if kind == "binary":
        values = np.stack([np.zeros_like(values), values], axis=1)
    top = values.max(axis=1, keepdims=True)
    return -(top[:, 0] + np.log(np.exp(values - top).sum(axis=1)))


@dataclass
class SpaceScorer:
    """One space's fitted scorer (``mahalanobis``: class ``means`` and ``precision``; ``knn``: ``bank``)."""

    method: str
    tensors: dict[str, np.ndarray]

    def score(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self.method == "mahalanobis":
            means, precision = self.tensors["means"], self.tensors["precision"]
            distances = []
            for mean in means:
                d = x - mean
                distances.append(np.einsum("nd,de,ne->n", d, precision, d))
            return np.sqrt(np.maximum(np.min(distances, axis=0), 0.0))
        bank = self.tensors["bank"]
        z = (x - self.tensors["center"]) / self.tensors["scale"]
        squared = (z**2).sum(1)[:, None] + (bank**2).sum(1)[None, :] - 2 * z @ bank.T
        distances = np.sqrt(np.maximum(squared, 0.0))  # (n, N)
        k = min(KNN_K, bank.shape[0])
        return np.partition(distances, k - 1, axis=1)[:, k - 1]


def fit_space(x: np.ndarray, labels: np.ndarray, method: str, seed: int = 0) -> SpaceScorer:
    """Fit one space's scorer on its training embeddings ``x`` (``labels``: class index, -1 unknown)."""
    x = np.asarray(x, dtype=np.float64)
    if method == "knn":
        rng = np.random.default_rng(seed)
        center, scale = x.mean(axis=0, keepdims=True), np.maximum(x.std(axis=0, keepdims=True), 1e-6)
        bank = (x[rng.permutation(len(x))[:KNN_BANK_ROWS]] - center) / scale
        return SpaceScorer(method, {"bank": bank, "center": center, "scale": scale})
    from sklearn.covariance import LedoitWolf

    classes = [c for c in np.unique(labels) if c >= 0 and (labels == c).sum() >= 2]
    if not classes:  # no labels here: one Gaussian
        means = x.mean(axis=0, keepdims=True)
        residuals = x - means[0]
    else:
        means = np.stack([x[labels == c].mean(axis=0) for c in classes])
        kept = np.isin(labels, classes)
        index = np.searchsorted(np.asarray(classes), labels[kept])
        residuals = x[kept] - means[index]
    shrunk = LedoitWolf(assume_centered=True).fit(residuals)
    return SpaceScorer(method, {"means": means, "precision": shrunk.precision_})


@dataclass
class OodModel:
    """Fitted OOD scorers with their thresholds (see the module docstring).

    Attributes:
        method: ``mahalanobis`` or ``knn``.
        rate: the false-alarm rate the thresholds were set at.
        scorers: space -> its scorer.
        thresholds: space -> the threshold of its score.
        fused_threshold: the threshold of the fused score (the largest ratio).
        rows: rows fitted on: ``{"train": {space: n}, "val": {space: n}}``.
        references: space -> at most :data:`REFERENCE_ROWS` training embeddings (the shift test's reference).
        input_ranges: the training rows' acquisition ranges (:mod:`meddx.models.input_ranges`); None:
            rows are not checked against them (a model fitted before they were kept).
    """

    method: str
    rate: float
    scorers: dict[str, SpaceScorer]
    thresholds: dict[str, float]
    fused_threshold: float
    rows: dict[str, dict[str, int]] = field(default_factory=dict)
    references: dict[str, np.ndarray] = field(default_factory=dict)
    input_ranges: InputRanges | None = None

    @property
    def spaces(self) -> list[str]:
        return list(self.scorers)

    def raw_scores(self, embeddings: dict[str, np.ndarray], present: dict[str, np.ndarray] | None = None):
        """Space -> its score per row (nan where the row lacks the space)."""
        scores: dict[str, np.ndarray] = {}
        for space, scorer in self.scorers.items():
            if space not in embeddings:
                continue
            x = np.asarray(embeddings[space])
            have = np.ones(len(x), dtype=bool) if present is None or space not in present else present[space]
            values = np.full(len(x), np.nan)
            if have.any():
                values[have] = scorer.score(x[have])
            scores[space] = values
        return scores

    def score(
        self, embeddings: dict[str, np.ndarray], present: dict[str, np.ndarray] | None = None
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Per space the score-to-threshold ratio (nan where absent), and the fused ratio per row.

        Args:
            embeddings: space -> ``(B, D)`` embeddings.
            present: space -> bool ``(B,)`` rows that have it (default: every row).
        """
        ratios = {s: v / self.thresholds[s] for s, v in self.raw_scores(embeddings, present).items()}
        n = len(next(iter(embeddings.values()))) if embeddings else 0
        fused = _largest(ratios, n) / self.fused_threshold
        return ratios, fused

    def summary(self) -> dict[str, Any]:
        """What ``ood.json`` holds."""
        dims = {}
        for space, scorer in self.scorers.items():
            key = "means" if self.method == "mahalanobis" else "bank"
            dims[space] = int(scorer.tensors[key].shape[1])
        return {
            "format": OOD_FORMAT,
            "method": self.method,
            "false_alarm_rate": self.rate,
            "thresholds": {s: float(v) for s, v in self.thresholds.items()},
            "fused_threshold": float(self.fused_threshold),
            "rows": self.rows,
            "dims": dims,
            "reference_rows": {s: int(len(v)) for s, v in self.references.items()},
            **({"input_ranges": self.input_ranges.to_json()} if self.input_ranges is not None else {}),
        }

    def save(self, folder: str | Path) -> None:
        """Write ``ood.safetensors`` and ``ood.json`` into a model folder."""
        from safetensors.numpy import save

        from meddx.files import write_atomic

        tensors = {
            f"{space}.{name}": np.ascontiguousarray(value, dtype=np.float32)
            for space, scorer in self.scorers.items()
            for name, value in scorer.tensors.items()
        }
        tensors.update(
            {f"{space}.reference": np.ascontiguousarray(v, dtype=np.float32) for space, v in self.references.items()}
        )
        folder = Path(folder)
        write_atomic(folder / OOD_TENSORS, save(tensors, metadata={"format": OOD_FORMAT}))
        write_atomic(folder / OOD_JSON, json.dumps(self.summary(), indent=2, sort_keys=True))


def _largest(ratios: dict[str, np.ndarray], n: int) -> np.ndarray:
    if not ratios:
        return np.zeros(n)
    stacked = np.stack(list(ratios.values()), axis=1)  # (B, S)
    with np.errstate(all="ignore"):
        largest = np.where(np.isnan(stacked).all(axis=1), 0.0, np.nanmax(np.nan_to_num(stacked, nan=-np.inf), axis=1))
    return largest


def fit_ood(
    train: dict[str, np.ndarray],
    labels: np.ndarray,
    val: dict[str, np.ndarray],
    *,
    train_present: dict[str, np.ndarray] | None = None,
    val_present: dict[str, np.ndarray] | None = None,
    method: str = "mahalanobis",
    rate: float = DEFAULT_FALSE_ALARM,
    seed: int = 0,
) -> OodModel | None:
    """Fit the scorers on the training embeddings, the thresholds on the validation ones.

    Args:
        train, val: space -> ``(N, D)`` embeddings of the training / validation rows.
        labels: ``(N_train,)`` class index of each training row (-1: unknown).
        train_present, val_present: space -> bool ``(N,)`` rows that have it (default: all).
        method: ``mahalanobis`` or ``knn``.
        rate: the false-alarm rate of the thresholds, in (0, 0.5].
        seed: picks the reference sample and the kNN bank.

    Returns:
        The model, or None when no space has enough rows (at least 10 training rows and
        :func:`min_val_rows` validation rows).
    """
    if method not in METHODS:
        raise ValueError(f"ood method must be one of {', '.join(METHODS)}; got {method!r}")
    if not 0 < rate <= 0.5:
        raise ValueError(f"ood_false_alarm must be in (0, 0.5]; got {rate!r}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    scorers, thresholds, references = {}, {}, {}
    rows: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    val_scores = {}
    for space, x in train.items():
        have = np.ones(len(x), dtype=bool) if train_present is None else train_present[space]
        vhave = np.ones(len(val[space]), dtype=bool) if val_present is None else val_present[space]
        if have.sum() < MIN_TRAIN_ROWS or vhave.sum() < min_val_rows(rate):
            logger.info("ood: %s has %d training and %d validation rows; not scored", space, have.sum(), vhave.sum())
            continue
        scorer = fit_space(x[have], labels[have], method, seed)
        scores = scorer.score(np.asarray(val[space])[vhave])
        threshold = conformal_quantile(scores, rate)
        if not math.isfinite(threshold) or threshold <= 0:
            logger.info("ood: %s gave a threshold of %r; not scored", space, threshold)
            continue
        scorers[space], thresholds[space] = scorer, threshold
        references[space] = np.asarray(x[have])[rng.permutation(int(have.sum()))[:REFERENCE_ROWS]]
        rows["train"][space], rows["val"][space] = int(have.sum()), int(vhave.sum())
        full = np.full(len(vhave), np.nan)
        full[vhave] = scores
        val_scores[space] = full
    if not scorers:
        return None
    fused = _cross_fitted_fused(val_scores, rate, seed)
    if (fused > 0).sum() < min_val_rows(rate):
        return None
    fused_threshold = conformal_quantile(fused[fused > 0], rate)
    return OodModel(method, rate, scorers, thresholds, fused_threshold, rows, references)


def min_val_rows(rate: float) -> int:
    """The fewest validation rows whose conformal quantile at ``rate`` is not simply their largest score.

    Example:
        >>> min_val_rows(0.05), min_val_rows(0.1)
        (19, 9)
    """
    return math.ceil((1 - rate) / rate - 1e-9)


def _cross_fitted_fused(val_scores: dict[str, np.ndarray], rate: float, seed: int) -> np.ndarray:
    """Each validation row's fused score against per-space thresholds set on the other half of the rows."""
    n = len(next(iter(val_scores.values())))
    half = np.random.default_rng(seed).permutation(n) < n // 2
    ratios: dict[str, np.ndarray] = {}
    for space, scores in val_scores.items():
        ratio = np.full(n, np.nan)
        for fold in (half, ~half):
            other = ~fold & ~np.isnan(scores)
            if other.sum() == 0:
                continue
            ratio[fold] = scores[fold] / conformal_quantile(scores[other], rate)
        ratios[space] = ratio
    return _largest(ratios, n)


def _positive(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ModelError(f"{where} must be a positive finite number; got {value!r}")
    return float(value)


def load_ood(folder: str | Path) -> OodModel | None:
    """``ood.json`` and ``ood.safetensors`` of a model folder, checked whole; None when the folder has neither.

    Raises:
        ModelError: one without the other, or any field out of its bounds (naming file and field).
    """
    from meddx.models.checkpoint import check_safetensors

    folder = Path(folder)
    meta_path, tensor_path = folder / OOD_JSON, folder / OOD_TENSORS
    if not meta_path.exists() and not tensor_path.exists():
        return None
    if not (meta_path.is_file() and tensor_path.is_file()):
        raise ModelError(f"{folder} holds one of {OOD_JSON} and {OOD_TENSORS} without the other; copy the whole folder")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"{meta_path} is not readable JSON ({exc}); copy the model folder again") from None
    if not isinstance(meta, dict) or meta.get("format") != OOD_FORMAT:
        raise ModelError(f"{meta_path}: format must be {OOD_FORMAT!r}; fine-tune again with this meddx")
    method = meta.get("method")
    if method not in METHODS:
        raise ModelError(f"{meta_path}: method must be one of {', '.join(METHODS)}; got {method!r}")
    rate = meta.get("false_alarm_rate")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 0.5:
        raise ModelError(f"{meta_path}: false_alarm_rate must be in (0, 0.5]; got {rate!r}")
    fused_threshold = _positive(meta.get("fused_threshold"), f"{meta_path}: fused_threshold")
    thresholds, dims = meta.get("thresholds"), meta.get("dims")
    if not isinstance(thresholds, dict) or not thresholds or not isinstance(dims, dict) or set(dims) != set(thresholds):
        raise ModelError(f"{meta_path}: thresholds and dims must map the same spaces (modalities, summary)")
    rows = meta.get("rows", {})
    if not isinstance(rows, dict):
        raise ModelError(f"{meta_path}: rows must be a mapping")
    ranges = meta.get("input_ranges")
    input_ranges = None if ranges is None else InputRanges.from_json(ranges, str(meta_path))
    check_safetensors(tensor_path)
    from safetensors.numpy import load_file

    tensors = load_file(str(tensor_path))
    scorers, checked, references = {}, {}, {}
    for space, threshold in thresholds.items():
        checked[space] = _positive(threshold, f"{meta_path}: thresholds.{space}")
        dim = dims[space]
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= MAX_DIM:
            raise ModelError(f"{meta_path}: dims.{space} must be an integer from 1 to {MAX_DIM}; got {dim!r}")
        names = ("means", "precision") if method == "mahalanobis" else ("bank", "center", "scale")
        found = {}
        for name in names:
            key = f"{space}.{name}"
            value = tensors.get(key)
            if value is None or value.ndim != 2 or value.shape[1] != dim or not np.isfinite(value).all():
                raise ModelError(f"{tensor_path}: {key} is missing, not (n, {dim}) or not finite; fine-tune again")
            found[name] = value.astype(np.float64)
        if method == "mahalanobis" and found["precision"].shape != (dim, dim):
            raise ModelError(f"{tensor_path}: {space}.precision must be ({dim}, {dim})")
        scorers[space] = SpaceScorer(method, found)
        reference = tensors.get(f"{space}.reference")
        if reference is not None:
            if reference.ndim != 2 or reference.shape[1] != dim or len(reference) > REFERENCE_ROWS:
                raise ModelError(f"{tensor_path}: {space}.reference must be at most ({REFERENCE_ROWS}, {dim})")
            references[space] = reference.astype(np.float64)
    return OodModel(method, float(rate), scorers, checked, fused_threshold, rows, references, input_ranges)


def mmd_test(reference: np.ndarray, sample: np.ndarray, permutations: int = 200, seed: int = 0) -> dict[str, float]:
    """A two-sample test of ``sample`` against ``reference``: RBF-kernel MMD with a permutation p-value.

    The bandwidth is the median pairwise distance of the pooled rows. ``mmd`` (the effect size)
    is the square root of the (biased, so never negative) squared MMD: 0 for the same
    distribution, up to sqrt(2).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> same = mmd_test(rng.normal(size=(80, 3)), rng.normal(size=(60, 3)))
        >>> moved = mmd_test(rng.normal(size=(80, 3)), rng.normal(size=(60, 3)) + 2)
        >>> same["p_value"] > 0.05, moved["p_value"] < 0.05
        (True, True)
    """
    x, y = np.asarray(reference, dtype=np.float64), np.asarray(sample, dtype=np.float64)
    pooled = np.concatenate([x, y])
    squared = np.maximum((pooled**2).sum(1)[:, None] + (pooled**2).sum(1)[None, :] - 2 * pooled @ pooled.T, 0.0)
    median = float(np.median(squared[np.triu_indices(len(pooled), 1)])) if len(pooled) > 1 else 1.0
    kernel = np.exp(-squared / max(median, 1e-12))
    n = len(x)
    weights = np.r_[np.full(n, 1.0 / n), np.full(len(y), -1.0 / len(y))]

    def statistic(w: np.ndarray) -> float:  # (biased) MMD^2 = w'Kw
        return float(w @ kernel @ w)

    observed = statistic(weights)
    rng = np.random.default_rng(seed)
    at_least = sum(statistic(rng.permutation(weights)) >= observed - 1e-12 for _ in range(permutations))
    return {
        "mmd": math.sqrt(max(observed, 0.0)),
        "p_value": (1 + at_least) / (1 + permutations),
        "reference_rows": int(n),
        "rows": int(len(y)),
    }

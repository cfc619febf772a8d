"""How should the per-space OOD scores be fused? Today's largest ratio vs p-value fusions, offline.

Reads the folder ``benchmarks/bench_shift.py --out`` wrote (its model, base cohort, held-out and
shifted cohorts, ingest cache), scores every space of the base cohort's validation rows and of
each held-out cohort with the model's own scorers (:meth:`meddx.models.ood.OodModel.raw_scores`),
and fuses them by each rule below. As ``fit_ood`` does, a space's fit and the fused threshold are
set on the validation rows, the fused threshold on halves cross-fitted against each other, at 5%
false alarm; the acquisition ratios (:mod:`meddx.models.input_ranges`) are folded in as
``batch.predict.check_acquisition`` does. Rules (each space's score turned into ``log p``):

* ``ratio``: score / its conformal threshold, the largest one (what ``OodModel.score`` does);
* ``lognormal``: a normal fit of the log scores; ``chi2``: a scaled chi-square fit (moments) of the
  squared scores; ``upper-normal``: a normal of the log scores around their median, its spread
  from the scores above it (the right tail only); ``exp-tail``: empirical p-values, with an
  exponential tail fitted to the top quarter beyond it;
* each fused by min-p (Sidak over the spaces a row has) or Fisher's combination;
* ``oracle``: empirical p-values against the validation *and the unshifted held-out rows* (the
  rows being scored, so not a usable rule: a bound on what calibrating each space can buy),
  fused by min-p.

Printed per rule: the unshifted held-out rows' flagged share and, per shift, the fused AUROC of
shifted vs unshifted rows over the same rows as ``bench_shift.py`` (patients whose manifest has
the shifted modality).

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_ood_fusion.py --from /tmp/meddx-bench-shift``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

RATE = 0.05
SHIFTED = {"ct-sharp-kernel": "imaging", "ct-thick-slices": "imaging", "monitor-15s-offset": "device_logs"}
SHIFTED |= {"notes-ward-template": "notes", "children": "ehr"}


def scores_of(model, manifest: Path, split: str | None, cache: Path):
    """Space -> raw score per row (nan: absent), modality -> acquisition ratio, and the patient ids."""
    from meddx.data import prepare_cohort
    from meddx.training.ood_fit import dataset_embeddings

    dataset = prepare_cohort(manifest, cache_dir=cache, aligner=model.aligner, workers=0, progress=False).dataset(
        split=split
    )
    x, have, _ = dataset_embeddings(model, dataset)
    raw = model.ood.raw_scores(x, have)
    facts = dataset.acquisition_facts()
    rows = [int(r) for r in dataset.table()["row"]]
    acquisition: dict[str, np.ndarray] = {}
    for i, row in enumerate(rows):
        for modality, ratio in model.ood.input_ranges.check(facts.get(row, {}))[0].items():
            acquisition.setdefault(modality, np.zeros(len(rows)))[i] = ratio
    return raw, acquisition, dataset.table()["patient_id"].astype(str).to_numpy()


def fit_tail(kind: str, v: np.ndarray):
    """A function: scores -> ``log p`` against the (validation) scores ``v``."""
    from scipy import stats

    from meddx.models.ood import conformal_quantile

    if kind == "ratio":
        threshold = conformal_quantile(v, RATE)
        return lambda x: -x / threshold
    if kind == "lognormal":
        mu, sd = np.log(v).mean(), np.log(v).std(ddof=1)
        return lambda x: stats.norm.logsf((np.log(x) - mu) / sd)
    if kind == "chi2":
        q = v**2
        scale, dof = q.var(ddof=1) / (2 * q.mean()), 2 * q.mean() ** 2 / q.var(ddof=1)
        return lambda x: stats.chi2.logsf(x**2 / scale, dof)
    if kind == "upper-normal":
        mu = np.median(np.log(v))
        sd = np.sqrt(np.mean((np.log(v)[np.log(v) > mu] - mu) ** 2))
        return lambda x: stats.norm.logsf((np.log(x) - mu) / sd)
    ordered, n = np.sort(v), len(v)
    k = max(5, round(0.25 * n))
    start = ordered[n - k - 1]
    beta = max(float((ordered[n - k :] - start).mean()), 1e-12)

    def exp_tail(x):
        empirical = np.log((1 + (ordered[None, :] >= x[:, None]).sum(1)) / (n + 1))
        return np.where(x > start, np.log(k / (n + 1)) - (x - start) / beta, empirical)

    return exp_tail


def fuse(logp: np.ndarray, how: str) -> np.ndarray:
    """Rows x spaces ``log p`` (nan: absent) -> the fused score (higher: more unusual; 0: no space)."""
    from scipy import stats

    have = np.isfinite(logp)
    n = have.sum(1)
    if how == "fisher":
        return np.where(n > 0, -stats.chi2.logsf(-2 * np.where(have, logp, 0.0).sum(1), 2 * np.maximum(n, 1)), 0.0)
    smallest = np.min(np.where(have, logp, np.inf), axis=1)
    if how == "max":
        return np.where(n > 0, -smallest, 0.0)
    p = np.exp(np.minimum(smallest, 0.0))  # Sidak: 1 - (1 - p)^n, its log; small p: log n + log p
    exact = np.log(np.maximum(-np.expm1(n * np.log1p(-np.minimum(p, 1 - 1e-16))), 1e-300))
    return np.where(n > 0, -np.where(p < 1e-8, np.log(np.maximum(n, 1)) + smallest, exact), 0.0)


def log_ps(scores: dict[str, np.ndarray], tails: dict) -> np.ndarray:
    out = np.full((len(next(iter(scores.values()))), len(tails)), np.nan)
    for j, (space, tail) in enumerate(tails.items()):
        ok = np.isfinite(scores[space])
        out[ok, j] = tail(scores[space][ok])
    return out


def fused_threshold(val: dict[str, np.ndarray], kind: str, how: str) -> float:
    """The conformal quantile of the validation rows' fused scores, each half's tails fitted on the other half."""
    from meddx.models.ood import conformal_quantile

    n = len(next(iter(val.values())))
    half = np.random.default_rng(0).permutation(n) < n // 2
    fused = np.zeros(n)
    for fold in (half, ~half):
        tails = {s: fit_tail(kind, v[~fold & np.isfinite(v)]) for s, v in val.items()}
        fused[fold] = fuse(log_ps({s: v[fold] for s, v in val.items()}, tails), how)
    return conformal_quantile(fused[fused > 0], RATE)


def _by_score(tail):
    return lambda x: tail(x) - 1e-6 * x


def _fused(cohort, tails: dict, how: str, threshold: float) -> np.ndarray:
    """A cohort's fused score over its threshold, with the acquisition ratios folded in as check_acquisition does."""
    fused = fuse(log_ps(cohort[0], tails), how) / threshold
    for ratio in cohort[1].values():
        fused = np.fmax(fused, ratio)
    return fused


def main() -> None:
    import pandas as pd

    from meddx.metrics import auroc
    from meddx.models.diagnosis import DiagnosisModel

    parser = argparse.ArgumentParser()
    parser.add_argument("--from", dest="source", default="/tmp/meddx-bench-shift", help="bench_shift.py's --out")
    out = Path(parser.parse_args().source)
    model = DiagnosisModel.from_pretrained(out / "model").eval()
    val, _, _ = scores_of(model, out / "base" / "manifest.csv", "val", out / "cache")
    cohorts = {
        name: scores_of(model, out / "eval" / name / "manifest.csv", None, out / "cache") for name in ["none", *SHIFTED]
    }
    rules = [("ratio", "max")] + [
        (k, h) for k in ("lognormal", "chi2", "upper-normal", "exp-tail") for h in ("sidak", "fisher")
    ]
    print("| rule | fusion | flagged (unshifted) | " + " | ".join(SHIFTED) + " |")
    print("|---|---|---|" + "---|" * len(SHIFTED))
    for kind, how in rules + [("oracle", "sidak")]:
        if kind == "oracle":
            pooled = {s: np.r_[v, cohorts["none"][0][s]] for s, v in val.items()}
            tails = {s: fit_tail("exp-tail", v[np.isfinite(v)]) for s, v in pooled.items()}
            tails = {s: _by_score(t) for s, t in tails.items()}  # ties at the floor: by score
            threshold = 1.0
        else:
            tails = {s: fit_tail(kind, v[np.isfinite(v)]) for s, v in val.items()}
            threshold = fused_threshold(val, kind, how)

        base = _fused(cohorts["none"], tails, how, threshold)
        row = [kind, how, "-" if kind == "oracle" else f"{np.mean(base > 1):.2f}"]
        for name, modality in SHIFTED.items():
            manifest = pd.read_csv(out / "eval" / name / "manifest.csv", dtype=str).set_index("patient_id")
            have = manifest.loc[cohorts[name][2], modality].fillna("").str.len().to_numpy() > 0
            y = np.r_[np.zeros(have.sum()), np.ones(have.sum())]
            row.append(f"{auroc(y, np.r_[base[have], _fused(cohorts[name], tails, how, threshold)[have]]):.3f}")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

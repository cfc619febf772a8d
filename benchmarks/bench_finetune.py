"""Is the fused model worth it, and can its probabilities be trusted? One table.

On the shared generated cohort (``bench_cohort.py``: 3000 patients, its split column gives
1800 train / 600 val / 600 test), everything fitted on train, calibrated on val, scored on test:

* **fused**: ``meddx.finetune`` on all six modalities;
* **each single modality**, trained the same way on a manifest that names only that modality;
* **late fusion**: one logistic regression per modality on its flattened (pooled) tensors, C picked on
  val, logits averaged over the modalities a patient has (HAIM-style baseline).

For the fused model it also reports ECE (10 bins) before and after temperature scaling and the
conformal coverage at alpha 0.1, overall and per availability group with at least 100 test rows.

Run: ``.venv/bin/python benchmarks/bench_finetune.py [--mode full] [--epochs 6]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from bench_cohort import OUT, bench_cohort

MODALITIES = ("imaging", "ehr", "notes", "device_logs", "audio", "video")


def only(manifest, modality: str):
    """A manifest naming only one modality (the other cells emptied), beside the original."""
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    for other in MODALITIES:
        if other != modality:
            frame[other] = ""
    path = manifest.parent / f"only-{modality}.csv"
    frame.to_csv(path, index=False)
    return path


def test_scores(model, manifest, cache) -> dict:
    """AUROC, ECE before/after calibration and conformal coverage on the test split."""
    from meddx.batch import predict_cohort
    from meddx.metrics import auroc, coverage, ece

    predictions = predict_cohort(model, manifest, split="test", cache_dir=cache, workers=2, contributions=False)
    labels = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    labels = labels.set_index("patient_id")["label:disease"]
    y = predictions["patient_id"].map(labels).astype(int).to_numpy()
    p, raw = predictions["probability"].to_numpy(), predictions["raw_probability"].to_numpy()
    sets = np.stack(
        [predictions["prediction_set"].fillna("").map(lambda s, c=c: c in s.split("|")) for c in ("0", "1")], axis=1
    )
    n_missing = predictions["modalities"].map(lambda s: 6 - len(s.split("|")))
    groups = np.where(n_missing == 0, "all present", np.where(n_missing == 1, "one missing", "two or more missing"))
    per_group = {g: (int((groups == g).sum()), coverage(y[groups == g], sets[groups == g])) for g in np.unique(groups)}
    return {
        "auroc": auroc(y, p),
        "ece_before": ece(y, raw),
        "ece_after": ece(y, p),
        "coverage": coverage(y, sets),
        "groups": per_group,
        "rows": len(y),
        "mean_raw_p": float(raw.mean()),
        "prevalence": float(y.mean()),
    }


def pooled_features(dataset) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """Flattened, average-pooled tensors of every modality, each row read once.

    Returns ``({modality: (features, has_modality)}, labels)``.
    """
    from meddx.records import Modality

    rows: dict[str, list] = {m: [] for m in MODALITIES}
    labels = []
    for i in range(len(dataset)):
        item = dataset[i]
        labels.append(item.labels["disease"])
        for modality in MODALITIES:
            arrays = item.tensors.get(Modality(modality))
            rows[modality].append(None if arrays is None else _flat(arrays))
    features = {}
    for modality, values in rows.items():
        has = np.array([r is not None for r in values])
        width = next((len(r) for r in values if r is not None), 0)
        features[modality] = (np.stack([r if r is not None else np.zeros(width, np.float32) for r in values]), has)
    return features, np.array(labels)


def _flat(arrays: dict) -> np.ndarray:
    """One modality's tensors, average-pooled where large, flattened into one vector."""
    import torch
    import torch.nn.functional as F

    parts = []
    for name, tensor in sorted(arrays.items()):
        t = tensor.float()
        if name == "volume":
            t = F.avg_pool3d(t[None, None], 4)[0, 0]
        elif name == "frames":
            t = F.avg_pool2d(t[:, 0], 8)
        elif name == "input_ids":  # token ids are categories: a hashed bag of tokens
            ids = tensor[tensor > 0].long() % 2048
            t = torch.bincount(ids, minlength=2048).float()
        elif name == "attention_mask":
            continue
        elif name in ("values", "mask") and t.dim() == 2 and t.shape[1] > 60:
            t = F.avg_pool1d(t[None], 10)[0]
        elif name == "log_mel":
            t = F.avg_pool1d(t[None], 4)[0]
        elif name == "code_ids":
            t = torch.bincount(tensor.long(), minlength=600).float()
        parts.append(t.flatten())
    return torch.cat(parts).numpy()


def late_fusion(prepared) -> float:
    """Test AUROC of per-modality logistic regressions with averaged logits."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = {s: pooled_features(prepared.dataset(split=s)) for s in ("train", "val", "test")}
    (_, yt), (_, yv), (_, ys) = data["train"], data["val"], data["test"]
    total, count, y_test = None, None, ys
    for modality in MODALITIES:
        (xt, ht), (xv, hv), (xs, hs) = (data[s][0][modality] for s in ("train", "val", "test"))
        best = None
        for c in (0.001, 0.01, 0.1):
            model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))
            model.fit(xt[ht], yt[ht])
            score = roc_auc_score(yv[hv], model.decision_function(xv[hv]))
            if best is None or score > best[0]:
                best = (score, model)
        logits = np.where(hs, best[1].decision_function(xs), 0.0)
        total = logits if total is None else total + logits
        count = hs.astype(float) if count is None else count + hs
        print(f"  late fusion: {modality} logistic regression, val AUROC {best[0]:.3f}")
    return float(roc_auc_score(y_test, total / np.maximum(count, 1)))


def bayes_ceiling(n: int = 400_000, seed: int = 0) -> float:
    """The test AUROC of the best possible model on cohorts from ``meddx.synth``, by simulation.

    The generator is additive: each modality sees the hidden severity plus its own independent
    noise (``VIEW_NOISE``), about 10 % of each is missing, and the label is the severity plus
    label noise past a threshold. A model that read every present view without error could do no
    better than the exact posterior ``P(label | views)``; its AUROC is the ceiling for any model
    (fused or not) on the real files, which add nuisance of their own. Because the views are
    conditionally independent given the severity, averaging per-modality evidence (late fusion)
    can already approach it.
    """
    from scipy.stats import norm
    from sklearn.metrics import roc_auc_score

    from meddx.synth import LABEL_NOISE, LABEL_THRESHOLD, MISSING_RATE, VIEW_NOISE

    rng = np.random.default_rng(seed)
    severity = rng.normal(size=n)
    label = severity + LABEL_NOISE * rng.normal(size=n) > LABEL_THRESHOLD
    precision, weighted = np.ones(n), np.zeros(n)  # the N(0, 1) prior, then each present view
    for noise in VIEW_NOISE.values():
        present = rng.random(n) > MISSING_RATE
        view = severity + noise * rng.normal(size=n)
        precision += present / noise**2
        weighted += present * view / noise**2
    mean, variance = weighted / precision, 1.0 / precision  # the Gaussian posterior of the severity
    posterior = norm.sf((LABEL_THRESHOLD - mean) / np.sqrt(variance + LABEL_NOISE**2))
    return float(roc_auc_score(label, posterior))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="full", choices=["head", "full", "lora"])
    parser.add_argument("--epochs", type=int, default=None, help="at most this many epochs (default: the mode's)")
    parser.add_argument("--skip-singles", action="store_true", help="only the fused model and late fusion")
    parser.add_argument("--batch-size", type=int, default=None, help="default: meddx.finetune's")
    parser.add_argument("--learning-rate", type=float, default=None, help="default: the mode's")
    parser.add_argument("--dropout", type=float, default=None, help="the backbone's; default: BackboneConfig's")
    args = parser.parse_args()

    import torch

    from meddx.data import prepare_cohort
    from meddx.models import BackboneConfig
    from meddx.training import finetune

    torch.set_num_threads(2)
    manifest = bench_cohort()
    cache = OUT / "cache"
    prepared = prepare_cohort(manifest, cache_dir=cache, workers=2, progress=False)
    print(f"cohort: {manifest} (train/val/test from its split column)")

    # the same settings for the fused model and every single; those left at None keep meddx's defaults
    chosen = {"batch_size": args.batch_size, "learning_rate": args.learning_rate}
    settings = {name: value for name, value in chosen.items() if value is not None}
    settings.update(mode=args.mode, epochs=args.epochs, cache_dir=cache, workers=2, progress=False, seed=0)
    if args.dropout is not None:
        settings["backbone_config"] = BackboneConfig(dropout=args.dropout)
    table = []
    started = time.perf_counter()
    fused = finetune(manifest, OUT / "fused", **settings)
    fused_seconds = time.perf_counter() - started
    scores = test_scores(fused, manifest, cache)
    print(
        f"fused: test AUROC {scores['auroc']:.3f}, ECE {scores['ece_before']:.3f} -> {scores['ece_after']:.3f}, "
        f"coverage {scores['coverage']:.3f}, fit {fused_seconds:.0f} s",
        flush=True,
    )
    table.append(
        (
            "fused (all six)",
            scores["auroc"],
            scores["ece_before"],
            scores["ece_after"],
            scores["coverage"],
            fused_seconds,
        )
    )
    started = time.perf_counter()
    late = late_fusion(prepared)
    table.append(
        ("late fusion (LR per modality)", late, float("nan"), float("nan"), float("nan"), time.perf_counter() - started)
    )

    print(f"late fusion: test AUROC {late:.3f}", flush=True)
    if not args.skip_singles:
        for modality in MODALITIES:
            single_manifest = only(manifest, modality)
            started = time.perf_counter()
            model = finetune(single_manifest, OUT / f"single-{modality}", **settings)
            seconds = time.perf_counter() - started
            s = test_scores(model, single_manifest, cache)
            table.append((modality, s["auroc"], s["ece_before"], s["ece_after"], s["coverage"], seconds))
            print(f"single {modality}: test AUROC {s['auroc']:.3f}, fit {seconds:.0f} s", flush=True)
    print()
    info = fused.training_info
    print(
        f"mode={args.mode}, at most {args.epochs or 'the default number of'} epochs; test split of {scores['rows']} "
        f"patients; fused: best epoch {info['best_epoch']} of {info['epochs_run']}, lr {info['learning_rate']}, "
        f"batch {info['batch_size']}, dropout {fused.backbone.config.dropout}, "
        f"schedule {info.get('schedule')}, validation AUROC by epoch {[round(v, 3) for v in fused.metrics['history']]}"
    )
    print(f"{'model':<32}{'AUROC':>8}{'ECE raw':>9}{'ECE cal':>9}{'cover':>8}{'fit s':>8}")
    for name, auc, e0, e1, cov, seconds in table:
        print(f"{name:<32}{auc:>8.3f}{e0:>9.3f}{e1:>9.3f}{cov:>8.3f}{seconds:>8.0f}")
    print(
        f"\nfused, test: mean uncalibrated probability {scores['mean_raw_p']:.3f}, "
        f"prevalence {scores['prevalence']:.3f}"
    )
    print("conformal coverage of the fused model per availability group (alpha 0.1):")
    for group, (n, cov) in scores["groups"].items():
        note = "" if n >= 100 else "  (fewer than 100 rows: not judged)"
        print(f"  {group:<22} {n:>4} rows  coverage {cov:.3f}{note}")
    singles = table[2:]
    if singles:
        best_single = max(singles, key=lambda r: r[1])
        print(f"\nfused - best single ({best_single[0]}): {table[0][1] - best_single[1]:+.3f}")
    print(f"fused - late fusion: {table[0][1] - late:+.3f}")
    print(
        f"no model can exceed AUROC {bayes_ceiling():.3f} on this cohort (the exact posterior from error-free "
        "views; see bayes_ceiling)"
    )


if __name__ == "__main__":  # ingestion spawns worker processes
    main()

"""Is the fused model worth it, and can its probabilities be trusted? One table.

On a shared generated cohort (``bench_cohort.py``: 3000 patients, its split column gives
1800 train / 600 val / 600 test; ``--cohort additive``, the default, or ``interaction``, whose
modalities interact: :mod:`meddx.synth.interactions`), everything fitted on train, calibrated on
val, scored on test:

* **fused**: ``meddx.finetune`` on all six modalities;
* **each single modality**, trained the same way on a manifest that names only that modality;
* **late fusion**: one logistic regression per modality on its flattened (pooled) tensors, C picked on
  val, logits averaged over the modalities a patient has (HAIM-style baseline), or **stacked** (a
  second logistic regression on the per-modality logits and presence indicators, fitted on val);
* **the Bayes ceiling**: the AUROC of the cohort's exact posterior, by simulation.

For the fused model it also reports ECE (10 bins) before and after temperature scaling and the
conformal coverage at alpha 0.1, overall and per availability group with at least 100 test rows,
and whether the issue-21 targets are met.

Run: ``.venv/bin/python benchmarks/bench_finetune.py [--cohort interaction] [--mode full] [--epochs 6]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from bench_cohort import N_PATIENTS, OUT, bench_cohort, pretrained_backbone

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


def best_logistic(train: tuple, val: tuple) -> tuple:
    """``(validation AUROC, model)`` of the standardised logistic regression whose C (0.001, 0.01, 0.1)
    scores best on ``val``; ``train`` and ``val`` are ``(x, y)``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best = None
    for c in (0.001, 0.01, 0.1):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))
        model.fit(*train)
        score = roc_auc_score(val[1], model.decision_function(val[0]))
        if best is None or score > best[0]:
            best = (score, model)
    return best


def late_fusion(prepared) -> dict:
    """Test AUROC of per-modality logistic regressions, their logits averaged or stacked.

    One logistic regression per modality on its pooled tensors (fitted on train, C picked on
    val). **Averaged**: the mean logit over the modalities a patient has (HAIM-style).
    **Stacked**: a second logistic regression on the per-modality logits, fitted on the
    validation rows; a missing modality's logit is 0 and a presence indicator per modality
    lets the stacker shift its intercept for it, so it learns both how much to trust each
    modality and what a missing one says. Also returns each modality's own logistic regression's
    test AUROC (``singles``, on the test rows that have the modality).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    data = {s: pooled_features(prepared.dataset(split=s)) for s in ("train", "val", "test")}
    (_, yt), (_, yv), (_, ys) = data["train"], data["val"], data["test"]
    singles: dict[str, float] = {}
    logits: dict[str, list[np.ndarray]] = {"val": [], "test": []}
    present: dict[str, list[np.ndarray]] = {"val": [], "test": []}
    for modality in MODALITIES:
        (xt, ht), (xv, hv), (xs, hs) = (data[s][0][modality] for s in ("train", "val", "test"))
        best = best_logistic((xt[ht], yt[ht]), (xv[hv], yv[hv]))
        singles[modality] = float(roc_auc_score(ys[hs], best[1].decision_function(xs[hs])))
        for split, x, has in (("val", xv, hv), ("test", xs, hs)):
            logits[split].append(np.where(has, best[1].decision_function(x), 0.0))
            present[split].append(has.astype(float))
        print(f"  late fusion: {modality} logistic regression, val AUROC {best[0]:.3f}")
    val_logits, test_logits = np.stack(logits["val"], 1), np.stack(logits["test"], 1)
    val_has, test_has = np.stack(present["val"], 1), np.stack(present["test"], 1)
    averaged = test_logits.sum(1) / np.maximum(test_has.sum(1), 1)
    stacker = LogisticRegression(C=1.0, max_iter=3000).fit(np.hstack([val_logits, val_has]), yv)
    stacked = stacker.decision_function(np.hstack([test_logits, test_has]))
    weights = ", ".join(f"{m} {w:+.2f}" for m, w in zip(MODALITIES, stacker.coef_[0], strict=False))
    print(f"  stacked late fusion: weights on the logits {weights}")
    return {
        "averaged": float(roc_auc_score(ys, averaged)),
        "stacked": float(roc_auc_score(ys, stacked)),
        "singles": singles,
    }


def variant_suffix(args) -> str:
    """The fused model's folder suffix: each setting given on the command line (``-epochs30-lr0.0003``)."""
    given = {
        "pretrained": args.pretrain_epochs or None,
        "epochs": args.epochs,
        "lr": args.learning_rate,
        "batch": args.batch_size,
        "dropout": args.dropout,
        "layers": args.n_layers,
        "modality-dropout": args.modality_dropout,
    }
    return "".join(f"-{name}{value}" for name, value in given.items() if value is not None)


def bayes_ceiling(
    cohort: str = "additive",
    n: int = 400_000,
    seed: int = 0,
    posterior: str = "exact",
    reader_noise: dict[str, float] | None = None,
) -> float:
    """The test AUROC of the best possible model on a cohort from ``meddx.synth``, by simulation.

    The exact posterior ``P(label | every present view and stated context)`` of the generator
    (:func:`meddx.synth.bayes_ceiling`, which shares its constants with the generator): no
    model, fused or not, can beat it on the real files, which add nuisance of their own. On the
    additive cohort each modality sees the hidden severity plus its own independent noise, so
    averaging per-modality evidence (late fusion) can approach it; on the interaction cohort
    context in one modality changes what another means, and ``posterior="additive"`` gives the
    most a posterior that ignores the context can do. ``reader_noise`` (view -> sd): the
    posterior when each view is known only up to that much extra noise (``bench_reader_ceiling.py``).
    """
    from meddx.synth import bayes_ceiling as simulate

    return simulate(n, seed, interactions=cohort == "interaction", posterior=posterior, reader_noise=reader_noise)


def error_free_late_fusion(
    cohort: str, n: int = 60_000, seed: int = 0, reader_noise: dict[str, float] | None = None
) -> dict[str, float]:
    """Late fusion on the error-free views: what averaging or stacking per-modality evidence can do at most.

    Simulates the cohort (:func:`meddx.synth.interactions.simulate`), fits one logistic regression
    per modality on its view (the EHR's on its view, the heart rate and every context flag; the
    notes' on its view and the flags the note states; the monitor's on its view and the heart rate)
    on 60 % of the patients, stacks on the next 20 % and scores the last 20 %, as the benchmark does
    with the files. The gap between this and the Bayes ceiling is what fusion can add over late fusion.
    ``reader_noise`` (view -> sd): the views as a reader that adds that much noise sees them.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from meddx.synth.interactions import CONTEXT_PREVALENCE, simulate

    sim = simulate(n, seed, interactions=cohort == "interaction", reader_noise=reader_noise)
    extra: dict[str, list[str]] = {"ehr": [], "notes": [], "device_logs": []}
    if "heart_rate" in sim.views:
        extra = {"ehr": ["heart_rate"], "notes": [], "device_logs": ["heart_rate"]}
    flags = {"ehr": list(sim.context), "notes": list(CONTEXT_PREVALENCE) if sim.context else []}
    train, val = np.arange(n) < 0.6 * n, (np.arange(n) >= 0.6 * n) & (np.arange(n) < 0.8 * n)
    test = np.arange(n) >= 0.8 * n
    logits, present = [], []
    for modality in MODALITIES:
        columns = [sim.views[modality]] + [sim.views[v] for v in extra.get(modality, [])]
        columns += [sim.context[c].astype(float) for c in flags.get(modality, [])]
        x, has = np.stack(columns, 1), sim.present[modality]
        model = LogisticRegression(max_iter=2000).fit(x[train & has], sim.label[train & has])
        logits.append(np.where(has, model.decision_function(x), 0.0))
        present.append(has.astype(float))
    z, has = np.stack(logits, 1), np.stack(present, 1)
    averaged = z.sum(1) / np.maximum(has.sum(1), 1)
    stacker = LogisticRegression(max_iter=2000).fit(np.hstack([z, has])[val], sim.label[val])
    stacked = stacker.decision_function(np.hstack([z, has]))
    return {
        "averaged": float(roc_auc_score(sim.label[test], averaged[test])),
        "stacked": float(roc_auc_score(sim.label[test], stacked[test])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="full", choices=["head", "full", "lora"])
    parser.add_argument(
        "--cohort",
        default="additive",
        choices=["additive", "interaction"],
        help="the additive generator, or the one whose modalities interact (meddx.synth.interactions)",
    )
    parser.add_argument("--n-patients", type=int, default=N_PATIENTS, help="cohort size (default: the shared 3000)")
    parser.add_argument("--epochs", type=int, default=None, help="at most this many epochs (default: the mode's)")
    parser.add_argument("--skip-singles", action="store_true", help="only the fused model and late fusion")
    parser.add_argument("--reuse", action="store_true", help="score the fused model an earlier run saved")
    parser.add_argument("--batch-size", type=int, default=None, help="default: meddx.finetune's")
    parser.add_argument("--learning-rate", type=float, default=None, help="default: the mode's")
    parser.add_argument("--dropout", type=float, default=None, help="the backbone's; default: BackboneConfig's")
    parser.add_argument("--n-layers", type=int, default=None, help="fusion layers; default: BackboneConfig's")
    parser.add_argument(
        "--modality-dropout",
        type=float,
        default=None,
        help="chance a modality is hidden in training; default: BackboneConfig's",
    )
    parser.add_argument(
        "--pretrain-epochs",
        type=int,
        default=0,
        help="first pretrain the backbone this many epochs on the train rows, labels withheld (meddx.pretrain), "
        "and fine-tune the fused model from it (0: from scratch)",
    )
    args = parser.parse_args()

    import torch

    from meddx.data import prepare_cohort
    from meddx.models import BackboneConfig
    from meddx.training import finetune

    torch.set_num_threads(2)
    manifest = bench_cohort(args.n_patients, interactions=args.cohort == "interaction")
    cache = OUT / "cache"
    runs = OUT / f"finetune-{args.cohort}-{args.n_patients}"
    prepared = prepare_cohort(manifest, cache_dir=cache, workers=2, progress=False)
    print(f"cohort: {manifest} (train/val/test from its split column)")

    # the same settings for the fused model and every single; those left at None keep meddx's defaults
    chosen = {"batch_size": args.batch_size, "learning_rate": args.learning_rate}
    settings = {name: value for name, value in chosen.items() if value is not None}
    settings.update(mode=args.mode, epochs=args.epochs, cache_dir=cache, workers=2, progress=False, seed=0)
    backbone = {"dropout": args.dropout, "n_layers": args.n_layers, "modality_dropout": args.modality_dropout}
    if any(value is not None for value in backbone.values()):
        settings["backbone_config"] = BackboneConfig(**{k: v for k, v in backbone.items() if v is not None})
    fused_folder = runs / ("fused" + variant_suffix(args))
    reuse = args.reuse and (fused_folder / "model.safetensors").is_file()
    fused_settings = dict(settings)
    if args.pretrain_epochs and not reuse:
        epochs = args.pretrain_epochs
        config = settings.get("backbone_config")
        fused_settings["backbone"] = pretrained_backbone(
            manifest, runs / f"pretrained-{epochs}ep", epochs, cache, 2, config
        )
        fused_settings.pop("backbone_config", None)
    table = []
    started = time.perf_counter()
    if reuse:
        from meddx.models.diagnosis import DiagnosisModel

        fused = DiagnosisModel.from_pretrained(fused_folder, cache_dir=cache / "text-embeddings").eval()
        fused_seconds = float("nan")  # fitted by an earlier run, which printed its fit time
    else:
        fused = finetune(manifest, fused_folder, **fused_settings)
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
    late_seconds = time.perf_counter() - started
    nan = float("nan")
    table.append(("late fusion, averaged logits", late["averaged"], nan, nan, nan, late_seconds))
    table.append(("late fusion, stacked logits", late["stacked"], nan, nan, nan, late_seconds))
    for modality, value in late["singles"].items():
        table.append((f"{modality} alone (LR, as in late fusion)", value, nan, nan, nan, nan))
    print(f"late fusion: test AUROC averaged {late['averaged']:.3f}, stacked {late['stacked']:.3f}", flush=True)
    if not args.skip_singles:
        for modality in MODALITIES:
            single_manifest = only(manifest, modality)
            started = time.perf_counter()
            model = finetune(single_manifest, runs / f"single-{modality}", **settings)
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
        f"fusion layers {fused.backbone.config.n_layers}, modality dropout {fused.backbone.config.modality_dropout}, "
        f"schedule {info.get('schedule')}, validation AUROC by epoch {[round(v, 3) for v in fused.metrics['history']]}"
    )
    print(f"{'model':<44}{'AUROC':>8}{'ECE raw':>9}{'ECE cal':>9}{'cover':>8}{'fit s':>8}")
    for name, auc, e0, e1, cov, seconds in table:
        print(f"{name:<44}{auc:>8.3f}{e0:>9.3f}{e1:>9.3f}{cov:>8.3f}{seconds:>8.0f}")
    print(
        f"\nfused, test: mean uncalibrated probability {scores['mean_raw_p']:.3f}, "
        f"prevalence {scores['prevalence']:.3f}"
    )
    print("conformal coverage of the fused model per availability group (alpha 0.1):")
    for group, (n, cov) in scores["groups"].items():
        note = "" if n >= 100 else "  (fewer than 100 rows: not judged)"
        print(f"  {group:<22} {n:>4} rows  coverage {cov:.3f}{note}")
    singles = [row for row in table[3:] if "(LR" not in row[0]]
    if singles:
        best_single = max(singles, key=lambda r: r[1])
        print(f"\nfused - best single ({best_single[0]}): {table[0][1] - best_single[1]:+.3f}")
    ceiling = bayes_ceiling(args.cohort)
    best_late = max(late["averaged"], late["stacked"])
    fused_auroc = table[0][1]
    gaps = {name: fused_auroc - late[name] for name in ("averaged", "stacked")}
    print(f"fused - late fusion: averaged {gaps['averaged']:+.3f}, stacked {gaps['stacked']:+.3f}")
    print(
        f"Bayes ceiling of the {args.cohort} cohort: {ceiling:.3f} (the exact posterior from error-free views and "
        f"stated context; see meddx.synth.bayes_ceiling); fused - ceiling {table[0][1] - ceiling:+.3f}"
    )
    reference = error_free_late_fusion(args.cohort)
    print(
        f"  late fusion of the error-free views (simulated): averaged {reference['averaged']:.3f}, "
        f"stacked {reference['stacked']:.3f}"
    )
    if args.cohort == "interaction":
        ignoring = bayes_ceiling(args.cohort, posterior="additive")
        print(f"  the additive model's posterior on the same views (context ignored): {ignoring:.3f}")
        targets = {"fused >= best late fusion + 0.04": table[0][1] >= best_late + 0.04}
    else:
        targets = {"fused >= averaged late fusion - 0.005": table[0][1] >= late["averaged"] - 0.005}
    targets["fused >= ceiling - 0.03"] = table[0][1] >= ceiling - 0.03
    targets["ECE after calibration <= 0.06"] = scores["ece_after"] <= 0.06
    judged = [cov for n, cov in scores["groups"].values() if n >= 100] + [scores["coverage"]]
    targets["coverage in [0.85, 1] overall and per group"] = all(0.85 <= c <= 1.0 for c in judged)
    for name, met in targets.items():
        print(f"  target {name}: {'met' if met else 'MISSED'}")


if __name__ == "__main__":  # ingestion spawns worker processes
    main()

"""Does the pretrained backbone learn from fewer labels? Test AUROC against labelled rows: a table and a plot.

On the shared generated cohort (``bench_cohort.py``, seed 11; ``--patients`` of them, 3000 by
default) and its split column (about 60 % train, 20 % val, 20 % test):

* **pretraining**, once: ``meddx.pretrain`` on every train-split row with its labels withheld
  (``--pretrain-epochs``, seed 0). Its aligner (the tensorizers, fitted on those rows without labels)
  makes the tensors of every method below, so only the weights differ.
* for each label count ``n`` (``--labels``) and seed (``--seeds``), the seed draws ``n`` train rows,
  stratified by label; the same val rows (early stopping, calibration, C of the regressions) and the
  same test rows (the score) serve every fit:

  - **pretrained**: ``meddx.finetune`` on the ``n`` rows with ``backbone=`` the pretrained folder,
    mode ``--pretrained-mode``: ``head`` by default, what ``auto`` picks with a pretrained backbone
    (the backbone frozen, the heads trained on its embeddings), or ``full`` (the pretrained weights
    fine-tuned end to end), the meddx defaults otherwise;
  - **scratch**: the same architecture with fresh weights (seeded), ``mode="full"`` (everything
    trains, as ``auto`` does without a pretrained backbone), the meddx defaults otherwise;
  - **late fusion**: a logistic regression per modality on its pooled tensors of the ``n`` rows,
    C picked on val, logits averaged over the modalities a patient has (``bench_finetune.late_fusion``
    on these rows);
  - diagnostics: a linear probe (standardised logistic regression, C 0.1, as ``bench_pretrain``) on the
    frozen pooled embeddings of the ``n`` rows, of the pretrained backbone and of a randomly
    initialised one (seed 0): does the pretraining objective put the label's signal in the embedding?

  Both fine-tunes use batch ``min(64, max(8, n // 4))`` (meddx's 64 would make one step an epoch at
  60 rows); everything else is meddx's default. AUROC is read from the raw logits (calibration is
  monotone and does not change it).

It prints one line per fit, then the table (mean ± sd over seeds) and the targets of issue 21, and
writes the plot (AUROC against labelled rows, log x, error bars one sd) to ``--plot``.

Run (the full configuration): ``.venv/bin/python benchmarks/bench_label_efficiency.py --plot
docs/label_efficiency.png``; smaller: ``--patients 400 --labels 60 150 --seeds 0 --pretrain-epochs 3``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from bench_cohort import OUT, bench_cohort, pretrained_backbone
from bench_finetune import MODALITIES, best_logistic, pooled_features

TASK = "disease"
METHODS = ("pretrained", "scratch", "late fusion")
PROBES = ("probe: pretrained", "probe: random init")


def batch_size_for(n: int) -> int:
    """Fine-tuning batch: meddx's 64, smaller for few rows so that an epoch is several steps."""
    return min(64, max(8, n // 4))


def write_manifest(frame: pd.DataFrame, folder: Path, name: str) -> Path:
    """``frame`` as a manifest beside the cohort's (its paths are relative to that folder)."""
    path = folder / f"{name}.csv"
    frame.to_csv(path, index=False)
    return path


def choose_rows(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Positions of ``n`` rows stratified by label (all rows when ``n`` is not smaller), drawn by ``seed``."""
    from sklearn.model_selection import train_test_split

    positions = np.arange(len(labels))
    if n >= len(labels):
        return positions
    chosen, _ = train_test_split(positions, train_size=n, stratify=labels, random_state=seed)
    return np.sort(chosen)


def test_auroc(model, test_set) -> float:
    """Test AUROC of a fine-tuned model from its raw logits."""
    import torch
    from sklearn.metrics import roc_auc_score
    from torch.utils.data import DataLoader

    model.eval()
    logits = []
    with torch.no_grad():
        for batch in DataLoader(test_set, batch_size=128, collate_fn=test_set.collate):
            logits.append(np.asarray(model.batch_logits(batch, ablations=False)[0][TASK]).reshape(-1))
    return float(roc_auc_score(test_set.label_array()[TASK], np.concatenate(logits)))


def late_fusion_auroc(train: tuple, val: tuple, test: tuple) -> float:
    """``bench_finetune.late_fusion`` on given rows: each argument is ``({modality: (x, has)}, y)``."""
    from sklearn.metrics import roc_auc_score

    (ft, yt), (fv, yv), (fs, ys) = train, val, test
    total, count = np.zeros(len(ys)), np.zeros(len(ys))
    for modality in MODALITIES:
        (xt, ht), (xv, hv), (xs, hs) = ft[modality], fv[modality], fs[modality]
        if len(np.unique(yt[ht])) < 2:  # too few labelled rows with this modality to fit anything
            continue
        best = best_logistic((xt[ht], yt[ht]), (xv[hv], yv[hv]))
        total += np.where(hs, best[1].decision_function(xs), 0.0)
        count += hs
    return float(roc_auc_score(ys, total / np.maximum(count, 1)))


def probe_auroc(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """Linear probe on frozen embeddings (``bench_pretrain.probe_auroc``'s settings)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    probe.fit(x_train, y_train)
    return float(roc_auc_score(y_test, probe.predict_proba(x_test)[:, 1]))


def subset(features: tuple, positions: np.ndarray) -> tuple:
    """Rows ``positions`` of ``({modality: (x, has)}, y)``."""
    by_modality, y = features
    return {m: (x[positions], has[positions]) for m, (x, has) in by_modality.items()}, y[positions]


def spread(x: np.ndarray) -> str:
    """How far apart patients' embeddings are: a summary that barely varies gives a head little to read."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    ratio = np.linalg.norm(x.std(axis=0)) / np.linalg.norm(x.mean(axis=0))
    cosine = float((unit @ unit.T).mean())
    return f"sd across patients / norm of the mean {ratio:.3f}, mean pairwise cosine {cosine:.3f}"


class Setting:
    """What every fit shares: the cohort frame, the fixed splits' datasets, the pretrained backbone."""

    def __init__(self, manifest: Path, backbone_folder: Path, cache: Path, workers: int, mode: str = "head"):
        from meddx.data import prepare_cohort
        from meddx.embeddings import compute_embeddings
        from meddx.models import BackboneConfig, FoundationBackbone

        self.manifest, self.backbone_folder, self.cache, self.workers = manifest, backbone_folder, cache, workers
        self.mode = mode  # how the pretrained backbone is fine-tuned
        self.frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
        pretrained = FoundationBackbone.from_pretrained(backbone_folder)
        self.aligner = pretrained.aligner()
        prepared = prepare_cohort(manifest, cache_dir=cache, aligner=self.aligner, workers=workers, progress=False)
        self.sets = {s: prepared.dataset(split=s, tasks=[TASK]).with_inputs() for s in ("train", "val", "test")}
        table = self.sets["train"].table()
        self.train_ids = table["patient_id"].to_numpy()
        self.train_labels = self.sets["train"].label_array()[TASK]
        self.pooled = {s: pooled_features(d) for s, d in self.sets.items()}
        import torch

        torch.manual_seed(0)
        random_init = FoundationBackbone.from_aligner(BackboneConfig(), self.aligner)
        self.embeddings = {
            name: {s: compute_embeddings(b, self.sets[s]).pooled.numpy() for s in ("train", "test")}
            for name, b in ((PROBES[0], pretrained), (PROBES[1], random_init))
        }
        for name, parts in self.embeddings.items():
            print(f"{name[7:]} embeddings of the train rows: {spread(parts['train'])}")

    def fit_manifest(self, positions: np.ndarray, name: str) -> Path:
        """A manifest of the chosen train rows and every val row (test rows are scored apart)."""
        chosen = set(self.train_ids[positions])
        keep = self.frame["patient_id"].isin(chosen) & (self.frame["split"] == "train") | (self.frame["split"] == "val")
        return write_manifest(self.frame[keep], self.manifest.parent, name)


def run_fits(setting: Setting, n: int, seed: int) -> dict[str, tuple[float, float]]:
    """Every method on ``n`` labelled rows drawn by ``seed``: method -> (test AUROC, seconds)."""
    import torch

    from meddx.models import BackboneConfig, FoundationBackbone
    from meddx.training import finetune

    positions = choose_rows(setting.train_labels, n, seed)
    manifest = setting.fit_manifest(positions, f"labeleff-n{n}-seed{seed}")
    shared = {
        "cache_dir": setting.cache,
        "workers": setting.workers,
        "progress": False,
        "seed": seed,
        "batch_size": batch_size_for(len(positions)),
        "tasks": [TASK],
    }
    test_set = setting.sets["test"]
    out: dict[str, tuple[float, float]] = {}

    started = time.perf_counter()
    model = finetune(manifest, None, backbone=setting.backbone_folder, mode=setting.mode, **shared)
    out["pretrained"] = (test_auroc(model, test_set), time.perf_counter() - started)

    started = time.perf_counter()
    torch.manual_seed(seed)
    fresh = FoundationBackbone.from_aligner(BackboneConfig(), setting.aligner)
    model = finetune(manifest, None, backbone=fresh, mode="full", **shared)
    out["scratch"] = (test_auroc(model, test_set), time.perf_counter() - started)

    started = time.perf_counter()
    train = subset(setting.pooled["train"], positions)
    out["late fusion"] = (
        late_fusion_auroc(train, setting.pooled["val"], setting.pooled["test"]),
        time.perf_counter() - started,
    )
    y_train, y_test = setting.train_labels[positions], setting.sets["test"].label_array()[TASK]
    for name in PROBES:
        started = time.perf_counter()
        x = setting.embeddings[name]
        out[name] = (probe_auroc(x["train"][positions], y_train, x["test"], y_test), time.perf_counter() - started)
    manifest.unlink()
    return out


def print_table(results: dict[int, list[dict]], seeds: list[int]) -> dict[int, dict[str, tuple[float, float]]]:
    """The table: mean ± sd over seeds per label count and method; returns it as numbers."""
    columns = (*METHODS, *PROBES)
    summary = {}
    print(f"\ntest AUROC, mean ± sd over seeds {seeds}")
    print(f"{'labelled':>9} " + "".join(f"{c:>20}" for c in columns))
    for n, fits in results.items():
        scores = {c: [f[c][0] for f in fits] for c in columns}
        summary[n] = {c: (float(np.mean(v)), float(np.std(v))) for c, v in scores.items()}
        print(f"{n:>9} " + "".join(f"{summary[n][c][0]:>13.3f} ± {summary[n][c][1]:.3f}" for c in columns))
    return summary


def print_targets(summary: dict[int, dict[str, tuple[float, float]]]) -> None:
    """The targets of issue 21 on the means."""
    print("\ntargets (issue 21), on the means:")
    if 150 in summary:
        gap = summary[150]["pretrained"][0] - summary[150]["scratch"][0]
        verdict = "met" if gap >= 0.05 else "MISSED"
        print(f"  150 labels: pretrained - scratch = {gap:+.3f} (target >= +0.050): {verdict}")
    for n in sorted(k for k in summary if k <= 300):
        gap = summary[n]["pretrained"][0] - summary[n]["late fusion"][0]
        print(f"  {n} labels: pretrained - late fusion = {gap:+.3f} (target >= 0): {'met' if gap >= 0 else 'MISSED'}")


def plot(summary: dict[int, dict[str, tuple[float, float]]], path: Path, title: str) -> None:
    """AUROC against labelled rows (log x), error bars one sd over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted(summary)
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for method, style in zip((*METHODS, *PROBES), ("o-", "s-", "^-", "o:", "x:"), strict=True):
        means = [summary[n][method][0] for n in counts]
        sds = [summary[n][method][1] for n in counts]
        axes.errorbar(counts, means, yerr=sds, fmt=style, capsize=3, label=method)
    axes.set_xscale("log")
    axes.set_xticks(counts, [str(n) for n in counts])
    axes.minorticks_off()
    axes.set_xlabel("labelled training rows")
    axes.set_ylabel("test AUROC")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=3000, help="cohort size (bench_cohort, seed 11)")
    parser.add_argument("--labels", type=int, nargs="+", default=[60, 150, 300, 600, 1800])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument(
        "--pretrained-mode",
        default="head",
        choices=["head", "full", "lora"],
        help="how the pretrained backbone is fine-tuned (head: meddx's default with a pretrained backbone)",
    )
    parser.add_argument("--plot", type=Path, default=OUT / "label_efficiency.png")
    parser.add_argument("--workers", type=int, default=2, help="ingestion workers")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    manifest = bench_cohort(args.patients)
    cache = OUT / "cache"
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    print(f"cohort: {manifest} ({args.patients} patients; {frame['split'].value_counts().to_dict()})")
    folder = pretrained_backbone(
        manifest,
        manifest.parent / f"labeleff-backbone-{args.pretrain_epochs}ep",
        args.pretrain_epochs,
        cache,
        args.workers,
    )
    setting = Setting(manifest, folder, cache, args.workers, mode=args.pretrained_mode)
    sizes = {s: len(d) for s, d in setting.sets.items()}
    print(f"rows with inputs: {sizes}; prepared in {time.perf_counter() - started:.0f} s so far")

    results: dict[int, list[dict]] = {}
    for n in args.labels:
        if n > sizes["train"]:
            print(f"{n} labels: only {sizes['train']} train rows; skipped")
            continue
        for seed in args.seeds:
            fits = run_fits(setting, n, seed)
            results.setdefault(n, []).append(fits)
            line = "  ".join(f"{m} {a:.3f} ({s:.0f} s)" for m, (a, s) in fits.items())
            print(f"n={n} seed={seed}: {line}", flush=True)
    summary = print_table(results, args.seeds)
    print_targets(summary)
    title = (
        f"{args.patients} patients ({sizes['val']} val, {sizes['test']} test rows), seeds {args.seeds}\n"
        f"pretrained {args.pretrain_epochs} epochs on {sizes['train']} unlabelled rows, fine-tuned in "
        f"{args.pretrained_mode} mode; mean ± sd over seeds"
    )
    plot(summary, args.plot, title)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":  # ingestion spawns worker processes
    main()

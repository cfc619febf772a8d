"""How much of each hidden view do meddx's readers recover, and what ceiling does that leave?

``meddx.synth.bayes_ceiling`` scores the exact posterior given the *error-free* views (each
modality's view of the hidden severity). A model never sees those: it sees the files, as the
readers turn them into aligned tensors and the encoders into embeddings, and every writer adds
nuisance of its own (Poisson crackles, a lesion on anatomy, phrases drawn at random). This
script measures that loss per view and carries it into the ceiling:

1. On the shared cohort (``bench_cohort.py``: 3000 patients, seed 11, its split column), the
   hidden truth of every patient comes from :func:`meddx.synth.cohort_truth` (the generator's
   own draws).
2. For each view, a ridge regression (alpha by cross-validation) is fitted on the train rows
   that have the modality, from two readers: the pooled aligned tensors (as late fusion reads
   them, ``bench_finetune.pooled_features``) and, given ``--model`` (default: the fused model
   ``bench_finetune.py`` saved for this cohort, when there), that model's own encoder
   embeddings. The heart rate's view is read from the EHR and the monitor together.
3. The better reader's test R^2 gives each view's **reader noise**: if a reader held the view
   plus independent Gaussian noise ``r``, its best linear read would have
   ``R^2 = var(v) / (var(v) + var(r))``, so ``sd(r) = sd(v) * sqrt((1 - R^2) / R^2)``.
4. With those noises, :func:`meddx.synth.bayes_ceiling` gives **the ceiling at these readers**
   (the exact posterior when each view is known only as well as it was read) and
   ``bench_finetune.error_free_late_fusion`` the **late fusion at these readers**. Their gap is
   what fusing can add over late fusion with these readers; the simulated late fusion is checked
   against the measured one on the files.

The reader noise is a Gaussian summary (a reader's errors need not be Gaussian nor the same
under every context), and a better reader (a stronger encoder) would raise the ceiling, so the
figures bound what *these* readers allow, not what the files allow.

Run (after ``bench_finetune.py --cohort interaction``, whose cached tensors and fused model it reuses;
``--model`` names the folder of a model fitted with other settings, such as ``fused-epochs30``):
``.venv/bin/python benchmarks/bench_reader_ceiling.py --cohort interaction``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from bench_cohort import N_PATIENTS, OUT, SEED, bench_cohort
from bench_finetune import MODALITIES, bayes_ceiling, error_free_late_fusion, pooled_features

SPLITS = ("train", "val", "test")


def encoder_embeddings(model, dataset) -> dict[str, np.ndarray]:
    """Each modality's encoder embedding (before fusion) from a fitted model: modality -> ``(N, D)``."""
    import torch
    from torch.utils.data import DataLoader

    from meddx.records import MODALITIES as ORDER

    loader = DataLoader(dataset, batch_size=64, shuffle=False, collate_fn=dataset.collate)
    parts = []
    model.eval()
    with torch.no_grad():
        for batch in loader:
            parts.append(model.backbone.encode(batch).encoder_embeddings.float().numpy())
    stacked = np.concatenate(parts)  # (N, M, D)
    return {str(m.value): stacked[:, i] for i, m in enumerate(ORDER) if str(m.value) in MODALITIES}


def read_split(prepared, split: str, model) -> tuple[pd.Series, dict, dict]:
    """Patient ids, ``{reader: {view: features}}`` and ``{view: has}`` of one split."""
    dataset = prepared.dataset(split=split)
    ids = dataset.table()["patient_id"].reset_index(drop=True)
    pooled, _ = pooled_features(dataset)
    has = {m: pooled[m][1] for m in MODALITIES}
    readers = {"pooled tensors": {m: pooled[m][0] for m in MODALITIES}}
    if model is not None:
        readers["fused model's encoders"] = encoder_embeddings(model, dataset)
    for features in readers.values():  # the heart rate: the EHR and the monitor read together
        features["heart_rate"] = np.hstack(
            [features["ehr"], features["device_logs"], has["ehr"][:, None], has["device_logs"][:, None]]
        )
    has["heart_rate"] = has["ehr"] | has["device_logs"]
    return ids, readers, has


def fit_reader(train: tuple):
    """A standardised ridge regression (alpha by 5-fold CV) fitted on ``train`` = ``(x, y)``."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-1, 5, 13))).fit(*train)


def r2_score(model, rows: tuple) -> float:
    """R^2 of ``model`` on ``rows`` = ``(x, y)``."""
    residual = rows[1] - model.predict(rows[0])
    return float(1.0 - residual.var() / rows[1].var())


def reader_noise(r2: float, view_sd: float) -> float:
    """The Gaussian reader noise that leaves a best linear read with this R^2 (R^2 floored at 0.01)."""
    r2 = min(max(r2, 0.01), 0.9999)
    return float(view_sd * np.sqrt((1.0 - r2) / r2))


def on_view_scale(model, val: tuple, x: np.ndarray) -> tuple[np.ndarray, float]:
    """A reader's reads of ``x`` put back on the view's scale, and their noise there.

    On the validation rows ``val`` = ``(x, v)`` the reads are regressed on the true view,
    ``read = a + b v + eps``; ``(read - a) / b`` is then the view plus noise of sd ``sd(eps) / b``.
    """
    read_val = model.predict(val[0])
    b, a = np.polyfit(val[1], read_val, 1)
    spread = float((read_val - (a + b * val[1])).std())
    return (model.predict(x) - a) / b, spread / b


def plug_in_posterior(truth: pd.DataFrame, ids: pd.Series, has: dict, reads: dict, noise: dict, posterior: str):
    """The generator's exact posterior on real test rows, each view replaced by its read (``posterior_scores``)."""
    from meddx.synth.interactions import CONTEXT_SOURCES, Simulation, posterior_scores

    rows = truth.loc[ids]
    context = {c.removeprefix("context:"): rows[c].to_numpy(bool) for c in rows if c.startswith("context:")}
    known = {c: np.any([has[m] for m in CONTEXT_SOURCES[c]], axis=0) for c in context}
    sim = Simulation(rows["label"].to_numpy(int), reads, {v: has[v] for v in reads}, context, known)
    return posterior_scores(sim, posterior=posterior, reader_noise=noise)


def fused_probabilities(model, manifest: Path, cache: Path, ids: pd.Series) -> np.ndarray:
    """The fitted model's calibrated probability for each test patient, in ``ids`` order."""
    from meddx.batch import predict_cohort

    predictions = predict_cohort(model, manifest, split="test", cache_dir=cache, workers=2, contributions=False)
    return predictions.set_index("patient_id").loc[ids, "probability"].to_numpy(float)


def subgroup_table(truth: pd.DataFrame, ids: pd.Series, scores: dict[str, np.ndarray]) -> None:
    """Test AUROC of each score with and without each context."""
    from meddx.metrics import auroc

    rows = truth.loc[ids]
    label = rows["label"].to_numpy(int)
    print(f"\n{'test rows':<26}{'n':>5}" + "".join(f"{name:>22}" for name in scores))
    groups = {"all": np.ones(len(rows), bool)}
    for column in (c for c in rows if c.startswith("context:")):
        held = rows[column].to_numpy(bool)
        groups[column.removeprefix("context:")] = held
        groups[f"no {column.removeprefix('context:')}"] = ~held
    for name, chosen in groups.items():
        cells = "".join(f"{auroc(label[chosen], s[chosen]):>22.3f}" for s in scores.values())
        print(f"{name:<26}{int(chosen.sum()):>5}{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohort", default="interaction", choices=["additive", "interaction"])
    parser.add_argument("--n-patients", type=int, default=N_PATIENTS)
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a fitted model folder (default: the fused model bench_finetune.py saves with its default settings)",
    )
    args = parser.parse_args()

    import torch

    from meddx.data import prepare_cohort
    from meddx.models.diagnosis import DiagnosisModel
    from meddx.synth import cohort_truth

    torch.set_num_threads(2)
    interactions = args.cohort == "interaction"
    manifest = bench_cohort(args.n_patients, interactions=interactions)
    cache = OUT / "cache"
    prepared = prepare_cohort(manifest, cache_dir=cache, workers=2, progress=False)
    folder = args.model or OUT / f"finetune-{args.cohort}-{args.n_patients}" / "fused"
    model = None
    if (folder / "model.safetensors").is_file():
        model = DiagnosisModel.from_pretrained(folder, cache_dir=cache / "text-embeddings")
        print(f"model: {folder}")
    truth = pd.DataFrame(cohort_truth(args.n_patients, SEED, interactions=interactions)).set_index("patient_id")
    data = {split: read_split(prepared, split, model) for split in SPLITS}
    views = [c.removeprefix("view:") for c in truth.columns if c.startswith("view:")]

    print(f"\n{args.cohort} cohort: test R^2 of each view read back by ridge regression")
    print(f"{'view':<14}" + "".join(f"{name:>24}" for name in data["train"][1]) + f"{'view sd':>9}{'reader noise':>14}")
    noise: dict[str, float] = {}
    reads: dict[str, np.ndarray] = {}  # each view's best read on the test rows, on the view's scale
    plug_noise: dict[str, float] = {}
    for view in views:
        xy: dict[str, dict[str, tuple]] = {}
        for split in SPLITS:
            ids, readers, has = data[split]
            y = truth.loc[ids, f"view:{view}"].to_numpy()
            xy[split] = {reader: (features[view][has[view]], y[has[view]]) for reader, features in readers.items()}
        fits = {reader: fit_reader(xy["train"][reader]) for reader in xy["train"]}
        r2 = {reader: r2_score(fit, xy["test"][reader]) for reader, fit in fits.items()}
        best = max(r2, key=r2.__getitem__)
        view_sd = float(xy["test"][best][1].std())
        noise[view] = reader_noise(r2[best], view_sd)
        test_ids, test_readers, _ = data["test"]
        reads[view], plug_noise[view] = on_view_scale(fits[best], xy["val"][best], test_readers[best][view])
        print(f"  {view}: noise of the calibrated read {plug_noise[view]:.2f}")
        print(f"{view:<14}" + "".join(f"{v:>24.3f}" for v in r2.values()) + f"{view_sd:>9.2f}{noise[view]:>14.2f}")

    test_ids, _, test_has = data["test"]
    plug_in = plug_in_posterior(truth, test_ids, test_has, reads, plug_noise, "exact")
    hidden = {view: truth.loc[test_ids, f"view:{view}"].to_numpy() for view in views}
    scores = {"error-free views": plug_in_posterior(truth, test_ids, test_has, hidden, {}, "exact")}
    scores["plug-in posterior"] = plug_in
    if interactions:
        scores["context ignored"] = plug_in_posterior(truth, test_ids, test_has, reads, plug_noise, "additive")
    if model is not None:
        scores["fused model"] = fused_probabilities(model, manifest, cache, test_ids)
    print(
        "\nmeasured on the 600 test rows: the exact posterior on the hidden views (this sample's Bayes ceiling) "
        "and with each view replaced by its best read (the readers trained on the hidden views: an "
        "oracle-supervised reader, not a model meddx can fit)"
    )
    subgroup_table(truth, test_ids, scores)

    exact = bayes_ceiling(args.cohort)
    at_readers = bayes_ceiling(args.cohort, reader_noise=noise)
    late_free = error_free_late_fusion(args.cohort)
    late_readers = error_free_late_fusion(args.cohort, reader_noise=noise)
    print("\nsimulated (400 000 patients for the ceilings, 60 000 for late fusion):")
    print(f"{'':<32}{'error-free views':>18}{'at these readers':>18}")
    print(f"{'Bayes ceiling':<32}{exact:>18.3f}{at_readers:>18.3f}")
    print(f"{'late fusion, averaged':<32}{late_free['averaged']:>18.3f}{late_readers['averaged']:>18.3f}")
    print(f"{'late fusion, stacked':<32}{late_free['stacked']:>18.3f}{late_readers['stacked']:>18.3f}")
    best_late = max(late_readers.values())
    print(
        f"\nat these readers, the most any fusion can add over the better late fusion: {at_readers - best_late:+.3f}"
        " (compare late fusion measured on the files: bench_finetune.py)"
    )
    if interactions:
        ignoring = bayes_ceiling(args.cohort, posterior="additive", reader_noise=noise)
        print(f"the additive posterior at these readers (context ignored): {ignoring:.3f}")


if __name__ == "__main__":  # ingestion spawns worker processes
    main()

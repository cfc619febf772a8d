"""Site shifts: does the row OOD score tell another site's rows apart, and does the flag mean something?

A base cohort (``meddx.synth.generate_cohort``, seed 7, default 300 patients, its 60/20/20 split
column) fine-tunes a tiny model (``full``, BackboneConfig d_model 16, 1 layer, 2 heads, 10 epochs;
OOD scores fitted on the training rows, thresholds on the validation rows at 5% false alarm: what
``finetune`` does). A held-out cohort of other patients (seed 8, default 100 patients, every row) is
diagnosed as it is and once per site shift in :data:`meddx.synth.SITE_SHIFTS`: the same patients,
labels and files except for the one modality the shift changes (``children``: ages 2-15, which only
the EHR's birth date shows).

Per shift, over the held-out patients that have the shifted modality:

* ``AUROC ood`` / ``AUROC ood:<m>``: the fused row score / the shifted modality's own score at telling
  the shifted rows from the same patients' unshifted rows;
* ``flagged``: the share of shifted rows with ``ood`` > 1 (``status = abstain``); the base line's
  ``flagged`` is the false-alarm rate on unshifted rows (target 0.05);
* ``by acquisition``: the share of those rows whose acquisition lies beyond the training rows' range
  (``ood_inputs``, :mod:`meddx.models.input_ranges`), and the facts named; both scores above
  include it (a modality's score is the larger of its embedding score and its acquisition ratio);
* on the shifted cohort's flagged / unflagged rows: the disease AUROC of the calibrated probability,
  the conformal sets' coverage of the true label and their mean size (n: rows in each group).

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_shift.py [--patients 300] [--eval-patients 100]
[--epochs 10] [--out /tmp/meddx-bench-shift] [--reuse]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def diagnosed(manifest: Path, model: Path, out: Path, cache: Path):
    """The prediction rows of one cohort joined with its labels, by patient id."""
    import pandas as pd

    from meddx.batch import diagnose

    result = diagnose(manifest, model, out, cache_dir=cache, workers=2, progress=False, contributions=False)
    frame = pd.read_parquet(result.predictions)
    labels = pd.read_csv(manifest, dtype=str)
    joined = frame.merge(labels, on="patient_id", how="left", suffixes=("_predicted", ""))
    return joined.sort_values("patient_id").reset_index(drop=True)


def _auroc(y: np.ndarray, score: np.ndarray) -> float:
    from meddx.metrics import auroc

    if len(np.unique(y)) < 2:
        return float("nan")
    return float(auroc(y, score))


def _group(frame) -> str:
    """``AUROC / coverage / mean set size (n)`` of the disease task on these rows."""
    if len(frame) == 0:
        return "- (0)"
    y = frame["label:disease"].astype(int).to_numpy()
    sets = frame["prediction_set"].fillna("").astype(str).str.split("|")
    covered = np.mean([str(label) in s for label, s in zip(y, sets, strict=True)])
    size = np.mean([len([c for c in s if c]) for s in sets])
    value = _auroc(y, frame["probability"].to_numpy(dtype=float))
    return f"{value:.2f} / {covered:.2f} / {size:.2f} ({len(frame)})"


def main() -> None:
    import pandas as pd

    from meddx.models import BackboneConfig
    from meddx.synth import SITE_SHIFTS, generate_cohort
    from meddx.training import finetune

    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--eval-patients", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", default="/tmp/meddx-bench-shift")
    parser.add_argument("--reuse", action="store_true", help="diagnose with OUT/model if it is there")
    args = parser.parse_args()
    out = Path(args.out)
    cache = out / "cache"
    started = time.perf_counter()
    if not (args.reuse and (out / "model" / "ood.json").is_file()):
        base = generate_cohort(out / "base", n_patients=args.patients, seed=7)
        finetune(
            base,
            out / "model",
            mode="full",
            epochs=args.epochs,
            seed=0,
            cache_dir=cache,
            workers=2,
            progress=False,
            backbone_config=BackboneConfig(d_model=16, n_layers=1, n_heads=2),
        )
        print(f"fine-tuned on {args.patients} patients in {time.perf_counter() - started:.0f} s")
    if not (out / "model" / "ood.json").is_file():
        raise SystemExit("the model has no OOD scores (too few validation rows): raise --patients")

    cohorts = {"none (held-out base)": (None, None)} | {name: (s, s.modalities[0]) for name, s in SITE_SHIFTS.items()}
    frames = {}
    for name, (shift, _) in cohorts.items():
        folder = out / "eval" / name.split(" ")[0]
        manifest = generate_cohort(folder, n_patients=args.eval_patients, seed=8, shift=shift)
        frames[name] = diagnosed(manifest, out / "model", folder / "run", cache)
    print(f"all done in {time.perf_counter() - started:.0f} s")

    reference = frames["none (held-out base)"]
    print()
    print(
        "| shift | modality | AUROC ood | AUROC ood:<m> | flagged | by acquisition (facts) "
        "| flagged: AUROC / coverage / set size (n) | unflagged: AUROC / coverage / set size (n) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, (_, modality) in cohorts.items():
        frame = frames[name]
        flagged = frame["ood"].to_numpy(dtype=float) > 1
        facts = frame.get("ood_inputs", pd.Series("", index=frame.index)).fillna("").astype(str)
        own = own_fused = "-"
        if modality is not None:
            have = frame[modality].fillna("").astype(str).str.len().to_numpy() > 0
            y = np.r_[np.zeros(have.sum()), np.ones(have.sum())]
            fused = np.r_[reference["ood"].to_numpy(dtype=float)[have], frame["ood"].to_numpy(dtype=float)[have]]
            own_fused = f"{_auroc(y, fused):.3f}"
            column = f"ood:{modality}"
            if column in frame:
                scores = np.r_[reference[column].to_numpy(dtype=float)[have], frame[column].to_numpy(dtype=float)[have]]
                own = f"{_auroc(y, np.nan_to_num(scores, nan=0.0)):.3f}"
            flagged_share = f"{np.mean(flagged[have]):.2f}"
            facts = facts[have]
        else:
            flagged_share = f"{np.mean(flagged):.2f}"
        named = sorted({f for cell in facts for f in cell.split("|") if f})
        by_acquisition = f"{np.mean(facts.str.len() > 0):.2f} ({', '.join(named) or '-'})"
        print(
            f"| {name} | {modality or '-'} | {own_fused} | {own} | {flagged_share} | {by_acquisition} | "
            f"{_group(frame[flagged])} | {_group(frame[~flagged])} |"
        )


if __name__ == "__main__":
    main()

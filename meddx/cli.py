"""The ``meddx`` command.

Exit status: 0 on success, 2 on bad input (manifest, config, arguments), 1 on other
failures; the message says what to fix. Heavy libraries are imported inside the
commands so that ``meddx --help`` starts fast.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from meddx._version import __version__
from meddx.arguments import RAY_SETTINGS, DiagnoseArgs, EvaluateArgs, FinetuneArgs, IngestArgs, PretrainArgs
from meddx.cli_errors import handle_errors, removed_if_left_empty
from meddx.cli_options import arguments, option
from meddx.cli_remote import fhir, pacs
from meddx.errors import ConfigError


def _model_folder(path: Path, option: str) -> Path:
    """Check that ``path``, given as ``option`` (``--model``, ``--backbone``), is a folder meddx wrote.

    Cheap checks (the files, ``config.json``'s kind) before any work, worded for the command line
    (exit status 2); what they let through is checked in full when the model loads.

    Raises:
        ConfigError: the folder is missing, holds no model, or (``--model``) holds a backbone without heads.
    """
    import json

    from meddx.models.checkpoint import CONFIG_FILE, FORMAT, WEIGHTS_FILE

    expected = (
        "give the folder `meddx finetune --out` wrote"
        if option == "--model"
        else "give the folder `meddx pretrain --out` (or `meddx finetune --out`) wrote"
    )
    if not path.is_dir():
        raise ConfigError(f"{option} {path} does not exist; {expected}")
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise ConfigError(f"{option} {path} is not a model folder (no {name}); {expected}")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{option} {path}: its {CONFIG_FILE} is not readable JSON ({exc}); {expected}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ConfigError(f"{option} {path} is not a meddx model folder ({CONFIG_FILE} is not meddx's); {expected}")
    if option == "--model" and config.get("diagnosis") is None:
        raise ConfigError(
            f"--model {path} holds a pretrained backbone (meddx pretrain), not a fine-tuned model; fine-tune it "
            f"first (meddx finetune MANIFEST --backbone {path} --out MODEL) and give --model MODEL"
        )
    return path


quiet_option = option(IngestArgs, "progress")  # --quiet: progress=False
workers_option = option(IngestArgs, "workers")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meddx")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """meddx: multimodal medical diagnosis on a foundation model."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command("sample-data")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write.")
@click.option("--patients", default=60, show_default=True, type=click.IntRange(min=1), help="Number of patients.")
@click.option("--seed", default=7, show_default=True, type=int, help="Random seed (same seed, same bytes).")
@handle_errors
def sample_data(out: Path, patients: int, seed: int) -> None:
    """Write a synthetic multimodal cohort in the real formats, with its manifest.csv."""
    from meddx.synth import generate_cohort

    manifest = generate_cohort(out, n_patients=patients, seed=seed)
    click.echo(f"wrote {patients} patients; manifest: {manifest}")


@main.command("validate")
@click.argument("manifest", type=click.Path(path_type=Path))
@handle_errors
def validate(manifest: Path) -> None:
    """Check a manifest and list every problem (exit status 2 if any)."""
    from meddx.cohort import load_cohort

    cohort = load_cohort(manifest)
    click.echo(_cohort_summary(cohort))


def _cohort_summary(cohort) -> str:
    splits = {s: len(cohort.split(s)) for s in ("train", "val", "test")}
    tasks = ", ".join(f"{t.name} ({t.kind})" for t in cohort.tasks.values()) or "none"
    named = ", ".join(f"{m.value} {n}" for m, n in cohort.coverage().items())
    warnings = "".join(f"\nwarning: {w}" for w in cohort.warnings)
    return (
        f"{cohort.path}: {len(cohort)} rows, splits {splits}, tasks: {tasks}\n"
        f"files named per modality: {named}{warnings}"
    )


def _run_ingest(args: IngestArgs, cache: Path, out: Path):
    from meddx.cohort import load_cohort
    from meddx.config import IngestConfig
    from meddx.ingest.runner import ingest_cohort

    config = IngestConfig.from_file(args.config) if args.config is not None else IngestConfig()
    cohort = load_cohort(args.manifest)
    click.echo(_cohort_summary(cohort))
    report = ingest_cohort(
        cohort,
        cache,
        config,
        workers=args.workers,
        progress=args.progress,
        task_timeout=args.task_timeout or None,  # 0: no limit
        out_dir=out,
    )
    click.echo("\ncoverage per modality:")
    click.echo(report.coverage_table())
    n_errors, n_warnings = len(report.errors), len(report.warnings)
    click.echo(f"\n{n_errors} ingest error{'s' if n_errors != 1 else ''}; details in {out / 'errors.csv'}")
    for outcome in report.errors[:10]:
        click.echo(f"  row {outcome.row}: {outcome.error}")
    if n_errors > 10:
        click.echo(f"  ... and {n_errors - 10} more")
    click.echo(f"{n_warnings} record warning{'s' if n_warnings != 1 else ''}; details in {out / 'warnings.csv'}")
    return cohort, report


@main.command("ingest")
@handle_errors
@arguments(IngestArgs)
def ingest(args: IngestArgs) -> None:
    """Read every modality of every row into a cache; print coverage, errors and warnings.

    Everything that would fail every file (the config, the text model, the folders) is
    checked before any file is read (exit status 2).
    """
    from meddx.cache import default_cache_dir
    from meddx.ingest.preflight import new_run_folder

    run_folder = args.out_dir or new_run_folder()
    with removed_if_left_empty(run_folder):
        _run_ingest(args, default_cache_dir(args.cache_dir), run_folder)


def _load_mapping(path: Path, what: str) -> dict:
    """A JSON or YAML file holding one mapping (a config), or ConfigError saying what is wrong."""
    from meddx.config_files import read_config_data

    data = read_config_data(path, what)  # bounded: size, UTF-8, nesting depth
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of settings, not {type(data).__name__}")
    return data


def _backbone_config(path: Path | None):
    """A BackboneConfig from a JSON/YAML file, or None for the defaults."""
    if path is None:
        return None
    from pydantic import ValidationError

    from meddx.models import BackboneConfig

    try:
        return BackboneConfig.model_validate(_load_mapping(path, "--backbone-config"))
    except ValidationError as exc:
        raise ConfigError(f"--backbone-config {path} is not a valid backbone config: {exc}") from None


@main.command("pretrain")
@handle_errors
@arguments(PretrainArgs)
def pretrain_command(args: PretrainArgs) -> None:
    """Self-supervised pretraining of the backbone on a cohort (labels not needed)."""
    from meddx.config import IngestConfig
    from meddx.training import pretrain

    result = pretrain(
        args.manifest,
        args.out_dir,
        ingest_config=IngestConfig.from_file(args.ingest_config) if args.ingest_config else None,
        backbone_config=_backbone_config(args.backbone_config),
        **args.values("manifest", "out_dir", "ingest_config", "backbone_config"),
    )
    for number, figures in enumerate(result.epochs, start=1):
        click.echo(
            f"epoch {number}: loss {figures['total']:.4f} (masked {figures['masked']:.4f}, "
            f"contrastive {figures['contrastive']:.4f}), {figures['seconds']:.1f} s"
        )
    click.echo(f"pretrained backbone written to {result.out_dir} (load it with FoundationBackbone.from_pretrained)")


@main.command("finetune")
@handle_errors
@arguments(FinetuneArgs)
def finetune_command(args: FinetuneArgs) -> None:
    """Fine-tune diagnostic heads on a labelled cohort, then calibrate them on its validation rows."""
    from meddx.config import IngestConfig
    from meddx.training import finetune

    if args.backbone is not None:
        _model_folder(args.backbone, "--backbone")
    model = finetune(
        args.manifest,
        args.out_dir,
        ingest_config=IngestConfig.from_file(args.ingest_config) if args.ingest_config else None,
        backbone_config=_backbone_config(args.backbone_config),
        **args.values("manifest", "out_dir", "ingest_config", "backbone_config"),
    )
    info = model.training_info
    click.echo(
        f"fine-tuned ({info['mode']}) on {info['rows']['train']} training rows in {info['fit_seconds']:.1f} s; "
        f"best epoch {info['best_epoch']} of {info['epochs_run']}"
    )
    for task, figures in model.metrics["validation"]["per_task"].items():
        click.echo(
            f"  {task}: validation AUROC {figures['auroc']:.3f}, ECE {figures['ece_before']:.3f} -> "
            f"{figures['ece_after']:.3f} after calibration ({figures['val_rows']} rows)"
        )
    click.echo(f"model written to {args.out_dir}")


@main.command("diagnose")
@handle_errors
@arguments(DiagnoseArgs)
def diagnose_command(args: DiagnoseArgs) -> None:
    """Calibrated diagnoses for every row of a cohort: predictions, FHIR RiskAssessments, errors.

    The cohort streams through in chunks (memory does not grow with it); ingestion runs in
    worker processes (or Ray tasks) while the model runs. A killed run finishes with --resume.
    """
    from meddx.batch import diagnose

    _model_folder(args.model, "--model")
    given = args.ray_settings()
    ray_options = None
    if given:
        if args.engine != "ray":
            raise click.UsageError(f"{', '.join('--' + k.replace('_', '-') for k in given)} only apply to --engine ray")
        from meddx.batch.options import RayOptions  # imports no Ray itself

        ray_options = RayOptions(**given)
    result = diagnose(
        args.manifest,
        args.model,
        args.out_dir,
        task_timeout=args.task_timeout or None,  # 0: no limit
        ray_options=ray_options,
        **args.values("manifest", "model", "out_dir", "task_timeout", *RAY_SETTINGS),
    )
    click.echo(_diagnose_summary(result))


def _diagnose_summary(result) -> str:
    counts, timings = result.counts, result.timings
    return (
        f"diagnosed {counts.get('diagnosed_rows', 0)} of {counts.get('rows', 0)} rows "
        f"({counts.get('undiagnosed_rows', 0)} without any usable input); "
        f"{counts.get('ingest_errors', 0)} ingest error{'s' if counts.get('ingest_errors', 0) != 1 else ''} "
        f"in {result.errors}\n"
        f"predictions: {result.predictions} and {result.predictions_csv.name}; "
        f"{counts.get('risk_assessments', 0)} FHIR RiskAssessments: {result.risk_assessments}\n"
        f"run details: {result.run} ({timings.get('total', 0.0):.1f} s)"
        + (
            f"\nDICOM SRs stored on the PACS: {counts['structured_reports_stored']}"
            f" ({counts.get('structured_report_errors', 0)} failed): {result.out_dir / 'structured_reports.csv'}"
            if "structured_reports_stored" in counts
            else ""
        )
        + (
            f"\nRiskAssessments on the FHIR server: {counts['fhir_writes_stored']}"
            f" ({counts.get('fhir_write_errors', 0)} failed): {result.out_dir / 'fhir_writes.csv'}"
            if "fhir_writes_stored" in counts
            else ""
        )
    )


@main.command("demo")
@click.option(
    "--out",
    "out",
    default=Path("runs/demo"),
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder.",
)
@option(IngestArgs, "cache_dir", help="Ingest cache (default: OUT/cache).")
@workers_option
@click.option(
    "--patients",
    type=click.IntRange(min=10),
    default=None,
    help="Size of the generated cohort (default 600: 360 training, 120 validation, 120 test rows).",
)
@quiet_option
@handle_errors
def demo(out: Path, cache_dir: Path | None, workers: int | None, patients: int | None, progress: bool) -> None:
    """The whole job on a synthetic cohort: generate it, fine-tune, calibrate, diagnose the test split, evaluate.

    The same steps as pipelines/demo.yaml (meddx run pipelines/demo.yaml). About 3 minutes on
    2 idle CPU cores; --patients 60 is the committed sample cohort's size (a test AUROC near chance).
    """
    import time

    from meddx.demo import demo_summary
    from meddx.pipelines import demo_pipeline, run_pipeline

    started = time.perf_counter()
    resolved = demo_pipeline(out, cache_dir, patients)
    results = run_pipeline(resolved, workers=workers, progress=progress, echo=click.echo)
    diagnosed = next(r for k, r in results.items() if k.endswith("-diagnose"))
    click.echo("")
    click.echo(_diagnose_summary(diagnosed))
    click.echo(demo_summary(results, time.perf_counter() - started))


@main.command("run")
@click.argument("pipeline", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="The run folder, {out} in the file (default: the file's out).",
)
@option(
    IngestArgs, "cache_dir", help="The ingest cache, {cache} in the file (default: the file's cache, else OUT/cache)."
)
@workers_option
@click.option("--check", is_flag=True, help="Only check the file (exit status 2 listing every problem).")
@quiet_option
@handle_errors
def run_command(
    pipeline: Path, out: Path | None, cache_dir: Path | None, workers: int | None, check: bool, progress: bool
) -> None:
    """Run a pipeline file (pipelines/*.yaml): its steps in order, after checking all of it.

    Every problem of the file (schema: schemas/pipeline.schema.json; inputs that no earlier step
    writes; unknown placeholders) is listed before any step runs (exit status 2).
    """
    from meddx.pipelines import read_pipeline, run_pipeline

    resolved = read_pipeline(pipeline, out=out, cache=cache_dir)
    if check:
        click.echo(f"{pipeline}: {len(resolved.steps)} step(s), no problems")
        return
    run_pipeline(resolved, workers=workers, progress=progress, echo=click.echo)
    click.echo(f"pipeline {resolved.pipeline.name} done; outputs in {resolved.out}")


@main.command("evaluate")
@handle_errors
@arguments(EvaluateArgs)
def evaluate(args: EvaluateArgs) -> None:
    """Metrics (with bootstrap intervals), report.html and plots of a predictions file against its manifest."""
    from meddx.evaluate import evaluate as run_evaluation
    from meddx.metrics import MetricSettings

    settings = MetricSettings(
        **args.values("predictions", "manifest", "out", "by", "progress", "model_card", "cache_dir")
    )
    result = run_evaluation(
        args.predictions,
        args.manifest,
        args.out,
        by=args.by,
        settings=settings,
        progress=args.progress,
        model_card=args.model_card,
        cache_dir=args.cache_dir,
    )
    for name, task in result.metrics["tasks"].items():
        after = task["overall"]["after_calibration"]
        conformal = task["overall"]["conformal"] or {}
        coverage = conformal.get("coverage", {}).get("value")
        set_size = conformal.get("mean_set_size", {}).get("value")
        counts = ", ".join(f"{v} {k}" for k, v in task["class_counts"].items())
        click.echo(
            f"{name}: n {task['overall']['n']} ({counts}), AUROC {_number(after['auroc']['value'])}, "
            f"ECE {_number(after['ece']['value'])}, coverage {_number(coverage)}, mean set size {_number(set_size)}"
        )
        for warning in task["warnings"]:
            click.echo(f"  warning: {warning}")
    click.echo(f"wrote {result.metrics_path}, {result.report_path} and {len(result.plots)} plots")
    if args.model_card is not None:
        click.echo(f"refreshed the metrics of the model card {args.model_card / 'README.md'}")


main.add_command(pacs)
main.add_command(fhir)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()

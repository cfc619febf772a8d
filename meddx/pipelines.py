"""Declarative pipelines: a YAML file of steps (sample data, pretrain, fine-tune, diagnose, evaluate).

A pipeline file is checked whole before any step runs: its shape against the pydantic models
here (exported as ``schemas/pipeline.schema.json``), then that every input a step names exists
or is made by an earlier step, and that every ``{placeholder}`` is known. Every problem is
listed at once in one :class:`~meddx.errors.ConfigError` (``meddx run`` exits with status 2).

Paths: ``{out}`` stands for the run folder (the file's ``out``, or ``meddx run --out``);
``{cache}`` for the cache folder (the file's ``cache``, else ``{out}/cache``). Other relative
paths are taken from the folder ``meddx run`` is started in.

Example (``pipelines/batch_diagnosis.yaml``)::

    version: 1
    name: batch-diagnosis
    out: runs/batch
    steps:
      - step: diagnose
        manifest: sample_data/manifest.csv
        model: runs/demo/model
        out: "{out}"
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from meddx.batch.options import RayOptions
from meddx.config import IngestConfig
from meddx.errors import ConfigError
from meddx.models.config import BackboneConfig

logger = logging.getLogger(__name__)

PLACEHOLDERS = ("out", "cache")


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SampleDataStep(_Step):
    """Write the synthetic sample cohort (``meddx sample-data``)."""

    step: Literal["sample-data"]
    out: str = Field(description="folder to write; its manifest is <out>/manifest.csv")
    patients: int = Field(60, ge=1)
    seed: int = 7


class PretrainStep(_Step):
    """Self-supervised pretraining of a new backbone (``meddx pretrain``)."""

    step: Literal["pretrain"]
    manifest: str
    out: str = Field(description="folder for the pretrained backbone")
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=2)
    learning_rate: float = Field(1e-3, gt=0)
    seed: int = 0
    backbone_config: BackboneConfig | None = None
    ingest_config: IngestConfig | None = None


class FinetuneStep(_Step):
    """Fine-tune and calibrate diagnostic heads (``meddx finetune``)."""

    step: Literal["finetune"]
    manifest: str
    out: str = Field(description="folder for the model")
    tasks: list[str] | None = Field(None, description="default: every label:<task> column")
    mode: Literal["head", "full", "lora"] = "head"
    backbone: str | None = Field(None, description="a pretrained backbone folder; default: a new backbone")
    backbone_config: BackboneConfig | None = None
    ingest_config: IngestConfig | None = None
    epochs: int | None = Field(None, ge=1)
    batch_size: int = Field(64, ge=1)  # meddx.train.DEFAULT_BATCH_SIZE
    learning_rate: float | None = Field(None, gt=0)
    patience: int = Field(5, ge=1)
    alpha: float = Field(0.1, gt=0, lt=1)
    calibration: Literal["temperature", "isotonic"] = "temperature"
    lora: dict[str, Any] | None = Field(None, description="mode lora: r, alpha, dropout, text_encoder")
    head_dropout: float = Field(0.1, ge=0, lt=1)
    head_input: Literal["summary", "summary+modalities"] = "summary"
    schedule: Literal["cosine", "constant"] = "cosine"
    device: str | None = Field(None, description="cpu or cuda; default: cuda when available")
    resume: bool = False
    seed: int = 0


class DiagnoseStep(_Step):
    """Batch diagnosis (``meddx diagnose``)."""

    step: Literal["diagnose"]
    manifest: str
    model: str = Field(description="a fine-tuned model folder")
    out: str = Field(description="folder for predictions, RiskAssessments, errors.csv and run.json")
    split: str | None = None
    batch_size: int = Field(64, ge=1)
    chunk_size: int = Field(64, ge=1)
    contributions: bool = True
    resume: bool = False
    store_sr: bool = Field(False, description="store a DICOM SR per prediction made on PACS images on the server")
    store_fhir: bool = Field(False, description="write each RiskAssessment to the FHIR server (once, resume included)")
    engine: Literal["local", "ray"] = "local"
    ray: RayOptions | None = Field(None, description="engine ray: address, actors, cpus_per_actor, gpus_per_actor...")
    device: str = "cpu"


class EvaluateStep(_Step):
    """Metrics, report.html and plots (``meddx evaluate``)."""

    step: Literal["evaluate"]
    predictions: str
    manifest: str
    out: str
    by: list[str] = Field(default_factory=list, description="subgroup columns")
    bootstrap: int = Field(1000, ge=0)
    bins: int = Field(10, ge=1)
    seed: int = 0


Step = Annotated[
    SampleDataStep | PretrainStep | FinetuneStep | DiagnoseStep | EvaluateStep, Field(discriminator="step")
]


class Pipeline(BaseModel):
    """A pipeline file (``pipelines/*.yaml``): steps run in order by ``meddx run``.

    Example:
        >>> Pipeline.model_validate({"version": 1, "name": "p", "out": "runs/p", "steps": [
        ...     {"step": "sample-data", "out": "{out}/cohort", "patients": 4}]}).steps[0].patients
        4
    """

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = Field(description="pipeline file format")
    name: str = Field(min_length=1)
    description: str = ""
    out: str = Field(description="the run folder, {out} in the steps (meddx run --out replaces it)")
    cache: str | None = Field(None, description="ingest cache, {cache} in the steps; default {out}/cache")
    workers: int | None = Field(None, ge=0, description="ingestion worker processes (default up to 4)")
    steps: list[Step] = Field(min_length=1)


# ----------------------------------------------------------------- reading and checking

_INPUTS = {"manifest", "backbone", "model", "predictions"}


def _where(location: tuple) -> str:
    return ".".join(str(part) for part in location)


def _problems_of(error: ValidationError) -> list[str]:
    return [f"{_where(e['loc'])}: {e['msg']}" if e["loc"] else e["msg"] for e in error.errors()]


def read_pipeline(
    path: str | Path, out: str | Path | None = None, cache: str | Path | None = None, check_inputs: bool = True
) -> ResolvedPipeline:
    """Read, validate and resolve a pipeline file; every problem is listed in one error.

    Args:
        path: the YAML (or JSON) file.
        out: the run folder; default the file's ``out``.
        cache: the cache folder; default the file's ``cache``, else ``<out>/cache``.
        check_inputs: also require every input to exist or to be made by an earlier step.

    Raises:
        ConfigError: the file cannot be read or has problems (all of them, one per line).

    Example:
        >>> read_pipeline("pipelines/demo.yaml", out="runs/demo").steps[0].step  # doctest: +SKIP
        'sample-data'
    """
    from meddx.config_files import read_config_data

    path = Path(path)
    data = read_config_data(path, "pipeline")  # bounded: size, UTF-8, nesting depth
    if not isinstance(data, dict):
        raise ConfigError(
            f"the pipeline {path} must hold a mapping (version, name, out, steps), not {type(data).__name__}"
        )
    try:
        pipeline = Pipeline.model_validate(data)
    except ValidationError as exc:
        raise _refuse(path, _problems_of(exc)) from None
    resolved = resolve(pipeline, out, cache)
    problems = resolved.problems(check_inputs)
    if problems:
        raise _refuse(path, problems)
    return resolved


def _refuse(path: Path, problems: list[str]) -> ConfigError:
    lines = "\n".join(f"  - {p}" for p in problems)
    n = len(problems)
    return ConfigError(f"pipeline {path} has {n} problem{'s' if n != 1 else ''}; fix them and run again:\n{lines}")


@dataclass
class ResolvedPipeline:
    """A validated pipeline whose placeholders are filled in.

    Attributes:
        pipeline: as written.
        out: the run folder; cache: the cache folder.
        steps: the steps with ``{out}``/``{cache}`` replaced.
        unknown: problems with placeholders, found while resolving.
    """

    pipeline: Pipeline
    out: Path
    cache: Path
    steps: list[Any]
    unknown: list[str]

    def problems(self, check_inputs: bool = True) -> list[str]:
        """Placeholder problems, and inputs neither on disk nor made by an earlier step."""
        problems = list(self.unknown)
        if not check_inputs:
            return problems
        made: list[Path] = []
        for number, step in enumerate(self.steps):
            for name in _INPUTS:
                value = getattr(step, name, None)
                if value is None:
                    continue
                wanted = Path(value)
                if "{" in value:  # an unknown placeholder, reported already
                    continue
                if not wanted.exists() and not any(wanted == m or m in wanted.parents for m in made):
                    problems.append(f"steps.{number}.{name}: {value} does not exist and no earlier step writes it")
            made.append(Path(step.out))
        return problems


def resolve(pipeline: Pipeline, out: str | Path | None = None, cache: str | Path | None = None) -> ResolvedPipeline:
    """Fill in ``{out}`` and ``{cache}`` in every path of every step (``out``/``cache`` override the file's)."""
    run_out = Path(out) if out is not None else Path(pipeline.out)
    if cache is not None:
        cache = Path(cache)
    else:
        cache = Path(pipeline.cache.replace("{out}", str(run_out))) if pipeline.cache else run_out / "cache"
    values = {"out": str(run_out), "cache": str(cache)}
    unknown: list[str] = []
    steps = []
    for number, step in enumerate(pipeline.steps):
        changes = {}
        for name, value in step:
            if isinstance(value, str) and "{" in value:
                changes[name] = _fill(value, values, f"steps.{number}.{name}", unknown)
        steps.append(step.model_copy(update=changes))
    return ResolvedPipeline(pipeline, run_out, cache, steps, unknown)


def _fill(text: str, values: dict[str, str], where: str, unknown: list[str]) -> str:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as exc:
        unknown.append(f"{where}: {text!r} is not a valid path template ({exc})")
        return text
    missing = [n for n in names if n not in values]
    if missing:
        unknown.append(
            f"{where}: unknown placeholder(s) {', '.join('{' + n + '}' for n in missing)}; "
            f"known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}"
        )
        return text
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], text)


# ----------------------------------------------------------------- running


def run_pipeline(
    resolved: ResolvedPipeline,
    workers: int | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = logger.info,
) -> dict[str, Any]:
    """Run every step in order; returns each step's result by ``<number>-<step>``.

    Args:
        resolved: from :func:`read_pipeline`.
        workers: ingestion worker processes (overrides the file's).
        progress: show progress bars.
        echo: where one line per step goes (``click.echo`` in the CLI).
    """
    workers = workers if workers is not None else resolved.pipeline.workers
    results: dict[str, Any] = {}
    for number, step in enumerate(resolved.steps):
        echo(f"[{number + 1}/{len(resolved.steps)}] {step.step}")
        results[f"{number}-{step.step}"] = _RUNNERS[step.step](step, resolved.cache, workers, progress, echo)
    return results


def _sample_data(step: SampleDataStep, cache: Path, workers, progress, echo) -> Path:
    from meddx.synth import generate_cohort

    manifest = generate_cohort(step.out, n_patients=step.patients, seed=step.seed)
    echo(f"  wrote {step.patients} patients; manifest: {manifest}")
    return manifest


def _pretrain(step: PretrainStep, cache: Path, workers, progress, echo):
    from meddx.pretrain import pretrain

    result = pretrain(
        step.manifest,
        step.out,
        epochs=step.epochs,
        batch_size=step.batch_size,
        learning_rate=step.learning_rate,
        seed=step.seed,
        backbone_config=step.backbone_config,
        ingest_config=step.ingest_config,
        cache_dir=cache,
        workers=workers,
        progress=progress,
    )
    echo(f"  pretrained backbone written to {result.out_dir}")
    return result


def _finetune(step: FinetuneStep, cache: Path, workers, progress, echo):
    from meddx.train import finetune

    model = finetune(
        step.manifest,
        step.out,
        tasks=step.tasks,
        mode=step.mode,
        epochs=step.epochs,
        backbone=step.backbone,
        backbone_config=step.backbone_config,
        ingest_config=step.ingest_config,
        cache_dir=cache,
        batch_size=step.batch_size,
        learning_rate=step.learning_rate,
        patience=step.patience,
        seed=step.seed,
        alpha=step.alpha,
        calibration=step.calibration,
        lora=step.lora,
        head_dropout=step.head_dropout,
        head_input=step.head_input,
        schedule=step.schedule,
        device=step.device,
        resume=step.resume,
        workers=workers,
        progress=progress,
    )
    info = model.training_info
    echo(
        f"  fine-tuned ({info['mode']}) on {info['rows']['train']} rows in {info['fit_seconds']:.1f} s; "
        f"calibrated on {info['rows']['val']} validation rows; model: {step.out}"
    )
    return model


def _diagnose(step: DiagnoseStep, cache: Path, workers, progress, echo):
    from meddx.batch import diagnose

    result = diagnose(
        step.manifest,
        step.model,
        step.out,
        split=step.split,
        cache_dir=cache,
        workers=workers,
        resume=step.resume,
        batch_size=step.batch_size,
        chunk_size=step.chunk_size,
        contributions=step.contributions,
        store_sr=step.store_sr,
        store_fhir=step.store_fhir,
        engine=step.engine,
        ray_options=step.ray,
        device=step.device,
        progress=progress,
    )
    counts = result.counts
    echo(f"  diagnosed {counts['diagnosed_rows']} of {counts['rows']} rows; predictions: {result.predictions}")
    return result


def _evaluate(step: EvaluateStep, cache: Path, workers, progress, echo):
    from meddx.evaluate import evaluate
    from meddx.metrics import MetricSettings

    settings = MetricSettings(n_bins=step.bins, n_resamples=step.bootstrap, seed=step.seed)
    result = evaluate(step.predictions, step.manifest, step.out, by=step.by, settings=settings, progress=progress)
    echo(f"  wrote {result.metrics_path} and {result.report_path}")
    return result


_RUNNERS: dict[str, Callable[..., Any]] = {
    "sample-data": _sample_data,
    "pretrain": _pretrain,
    "finetune": _finetune,
    "diagnose": _diagnose,
    "evaluate": _evaluate,
}


# The pipeline `meddx demo` runs; pipelines/demo.yaml holds the same (a test keeps them equal).
DEMO_YAML = """\
# The whole job on a synthetic cohort, as `meddx demo` runs it: generate 600 patients
# (360 train, 120 validation, 120 test rows), train a new backbone end to end on the training
# rows (the fine-tuning defaults: at most 15 epochs of 64 rows), calibrate it on the validation
# rows, diagnose the test split, evaluate (README, "make demo": its figures and time).
# `meddx demo --patients 60` runs it at the committed sample cohort's size: a few dozen
# training rows give a test AUROC near chance.
version: 1
name: demo
description: sample data, fine-tune and calibrate, diagnose the test split, evaluate
out: runs/demo
steps:
  - step: sample-data
    out: "{out}/sample_data"
    patients: 600
    seed: 7
  - step: finetune
    manifest: "{out}/sample_data/manifest.csv"
    out: "{out}/model"
    mode: full
    epochs: 15
    patience: 5
  - step: diagnose
    manifest: "{out}/sample_data/manifest.csv"
    model: "{out}/model"
    out: "{out}/diagnose"
    split: test
  - step: evaluate
    predictions: "{out}/diagnose/predictions.parquet"
    manifest: "{out}/sample_data/manifest.csv"
    out: "{out}/evaluation"
    by: [sex]
    bootstrap: 1000
"""


def demo_pipeline(out: str | Path, cache: str | Path | None = None, patients: int | None = None) -> ResolvedPipeline:
    """The demo pipeline (:data:`DEMO_YAML`) resolved for a run folder.

    Args:
        out: the run folder.
        cache: the ingest cache (default ``<out>/cache``).
        patients: the size of the generated cohort (default the file's, 600).
    """
    import yaml

    pipeline = Pipeline.model_validate(yaml.safe_load(DEMO_YAML))
    if patients is not None:
        steps = [s.model_copy(update={"patients": patients}) if s.step == "sample-data" else s for s in pipeline.steps]
        pipeline = pipeline.model_copy(update={"steps": steps})
    return resolve(pipeline, out, cache)

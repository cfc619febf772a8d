"""Declarative pipelines: a YAML file of steps (sample data, pretrain, fine-tune, diagnose, evaluate).

A pipeline file is checked whole before any step runs: its shape against the pydantic models
here (exported as ``schemas/pipeline.schema.json``), then that every input a step names exists
or is made by an earlier step, and that every ``{placeholder}`` is known. Every problem is
listed at once in one :class:`~meddx.errors.ConfigError` (``meddx run`` exits with status 2).

A step's keys are its job's arguments (:mod:`meddx.arguments`: the names, defaults, choices and
bounds of ``meddx <job>`` and of the Python function), less the cache, the workers and the
progress bars, which the pipeline sets once; where the command line takes a config file, a step
holds the config itself (``backbone_config``, ``ingest_config``, ``ray``).

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
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from meddx.arguments import (
    RAY_SETTINGS,
    Arguments,
    DiagnoseArgs,
    EvaluateArgs,
    FinetuneArgs,
    PretrainArgs,
)
from meddx.batch.options import RayOptions
from meddx.config import IngestConfig
from meddx.errors import ConfigError
from meddx.models.config import BackboneConfig

logger = logging.getLogger(__name__)

PLACEHOLDERS = ("out", "cache")


class _Step(Arguments):
    """A step of a pipeline file: the fields of its job's arguments model (:mod:`meddx.arguments`)."""

    step: str  # each kind of step narrows it to its name


# Set once for the whole pipeline (the file's cache and workers, meddx run --quiet), not per step.
PIPELINE_LEVEL = ("cache_dir", "workers", "progress")


def _step_model(step: str, args: type[Arguments], doc: str, leave_out: tuple[str, ...] = (), **own: Any) -> type[_Step]:
    """The model of one kind of step: ``step: <step>``, the fields of ``args`` but ``leave_out``, then ``own``."""
    fields: dict[str, Any] = {"step": (Literal[step], ...)}
    for name, info in args.model_fields.items():
        if name not in PIPELINE_LEVEL and name not in leave_out:
            fields[name] = own.pop(name) if name in own else (info.annotation, info)
    fields.update(own)
    name = "".join(part.title() for part in step.split("-")) + "Step"
    return create_model(name, __base__=_Step, __doc__=doc, __module__=__name__, **fields)


class SampleDataStep(_Step):
    """Write the synthetic sample cohort (``meddx sample-data``)."""

    step: Literal["sample-data"]
    out: str = Field(description="folder to write; its manifest is <out>/manifest.csv")
    patients: int = Field(60, ge=1)
    seed: int = 7


_BACKBONE_CONFIG = (BackboneConfig | None, Field(None, description="sizes of a new backbone (see BackboneConfig)"))
_INGEST_CONFIG = (IngestConfig | None, Field(None, description="how files are read (see IngestConfig)"))

PretrainStep = _step_model(
    "pretrain",
    PretrainArgs,
    "Self-supervised pretraining of a new backbone (``meddx pretrain``).",
    backbone_config=_BACKBONE_CONFIG,
    ingest_config=_INGEST_CONFIG,
)
FinetuneStep = _step_model(
    "finetune",
    FinetuneArgs,
    "Fine-tune and calibrate diagnostic heads (``meddx finetune``).",
    backbone_config=_BACKBONE_CONFIG,
    ingest_config=_INGEST_CONFIG,
)
DiagnoseStep = _step_model(
    "diagnose",
    DiagnoseArgs,
    "Batch diagnosis (``meddx diagnose``).",
    leave_out=RAY_SETTINGS,
    ray=(RayOptions | None, Field(None, description="engine ray: address, actors, cpus_per_actor, gpus_per_actor...")),
)
EvaluateStep = _step_model("evaluate", EvaluateArgs, "Metrics, report.html and plots (``meddx evaluate``).")


if TYPE_CHECKING:  # the step models are made at run time: checkers see their base
    Step = _Step
else:
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
                if "{" in str(value):  # an unknown placeholder, reported already
                    continue
                if not wanted.exists() and not any(wanted == m or m in wanted.parents for m in made):
                    problems.append(f"steps.{number}.{name}: {value} does not exist and no earlier step writes it")
            made.append(Path(_written(step)))
        return problems


def _written(step: Any) -> str | Path:
    """The folder (or file) a step writes: its ``out``."""
    return step.out_dir if hasattr(step, "out_dir") else step.out


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
            if isinstance(value, str | Path) and "{" in str(value):
                where = f"steps.{number}.{type(step).model_fields[name].alias or name}"
                filled = _fill(str(value), values, where, unknown)
                changes[name] = Path(filled) if isinstance(value, Path) else filled
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


def _pretrain(step: Any, cache: Path, workers, progress, echo):
    from meddx.training import pretrain

    result = pretrain(
        step.manifest,
        step.out_dir,
        cache_dir=cache,
        workers=workers,
        progress=progress,
        **step.values("step", "manifest", "out_dir"),
    )
    echo(f"  pretrained backbone written to {result.out_dir}")
    return result


def _finetune(step: Any, cache: Path, workers, progress, echo):
    from meddx.training import finetune

    model = finetune(
        step.manifest,
        step.out_dir,
        cache_dir=cache,
        workers=workers,
        progress=progress,
        **step.values("step", "manifest", "out_dir"),
    )
    info = model.training_info
    echo(
        f"  fine-tuned ({info['mode']}) on {info['rows']['train']} rows in {info['fit_seconds']:.1f} s; "
        f"calibrated on {info['rows']['val']} validation rows; model: {step.out_dir}"
    )
    return model


def _diagnose(step: Any, cache: Path, workers, progress, echo):
    from meddx.batch import diagnose

    result = diagnose(
        step.manifest,
        step.model,
        step.out_dir,
        cache_dir=cache,
        workers=workers,
        progress=progress,
        task_timeout=step.task_timeout or None,  # 0: no limit
        ray_options=step.ray,
        **step.values("step", "manifest", "model", "out_dir", "task_timeout", "ray"),
    )
    counts = result.counts
    echo(f"  diagnosed {counts['diagnosed_rows']} of {counts['rows']} rows; predictions: {result.predictions}")
    return result


def _evaluate(step: Any, cache: Path, workers, progress, echo):
    from meddx.evaluate import evaluate
    from meddx.metrics import MetricSettings

    settings = MetricSettings(**step.values("step", "predictions", "manifest", "out", "by", "model_card"))
    result = evaluate(
        step.predictions,
        step.manifest,
        step.out,
        by=step.by,
        settings=settings,
        progress=progress,
        model_card=step.model_card,
        cache_dir=cache,
    )
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

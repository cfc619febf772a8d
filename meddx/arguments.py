"""The arguments of meddx's jobs, declared once: ingest, pretrain, finetune, diagnose, evaluate.

Each job has one pydantic model here (:class:`IngestArgs`, :class:`PretrainArgs`,
:class:`FinetuneArgs`, :class:`DiagnoseArgs`, :class:`EvaluateArgs`) holding each parameter's
name, type, default, choices (``Literal``), bounds and help once. The command line
(:mod:`meddx.cli`) makes its options from the fields, the pipeline steps
(:mod:`meddx.pipelines`) are made from the same fields, and ``tests/test_arguments.py`` checks
that the Python functions (``meddx.finetune`` ...) take the same names with the same defaults.

A field's name is the Python function's parameter name; its alias, where it has one, is the
name outside Python (``out_dir`` is ``--out`` and ``out:`` in a pipeline file, ``n_bins`` is
``--bins``). How a field looks on the command line, where that is not the default, is said by a
:class:`Cli` in its ``Annotated`` metadata.

This module imports only pydantic (no click, no torch): the library and the pipelines use it too.

Example:
    >>> FinetuneArgs(manifest="m.csv", out="runs/model").mode
    'auto'
    >>> DiagnoseArgs(manifest="m.csv", model="runs/model", out="runs/d").task_timeout
    600.0
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class Cli:
    """How a field appears on the command line, where the default rule does not fit.

    The default rule: an option ``--<alias or name, dashes for underscores>``; a ``bool`` is a
    flag that turns it on; ``list[str]`` is one comma-separated value; a ``Path`` may be a file
    or a folder.

    Attributes:
        name: the option's name when it is not the default one (``--lr``, ``--cache``).
        argument: a positional argument (``MANIFEST``) instead of an option.
        folder: ``Path`` fields: True a folder, False a file, None either.
        turns_off: a ``bool`` that defaults to True; giving the option (``--quiet``) makes it False.
        hidden: not on the command line at all (set in pipeline files or from Python only).
        help: the option's help where the field's description does not fit it (``--quiet``).
    """

    name: str | None = None
    argument: bool = False
    folder: bool | None = None
    turns_off: bool = False
    hidden: bool = False
    help: str | None = None


# Options several jobs share, declared once.
Manifest = Annotated[Path, Field(description="The cohort manifest (CSV)."), Cli(argument=True)]
CacheDir = Annotated[
    Path | None,
    Field(
        description="Ingest cache, shared by runs on the same files "
        "(default: $MEDDX_CACHE, else the user cache directory)."
    ),
    Cli(name="--cache", folder=True),
]
Workers = Annotated[
    int | None, Field(ge=0, description="Ingestion worker processes (default: up to 4; 0 = in this process).")
]
Progress = Annotated[
    bool, Field(description="Show progress bars."), Cli(name="--quiet", turns_off=True, help="No progress bars.")
]
TaskTimeout = Annotated[
    float,
    Field(ge=0, description="Seconds one file may take before it is stopped and reported (0 = no limit)."),
]
Seed = Annotated[int, Field(description="Random seed (same seed, same result).")]
Device = Annotated[str | None, Field(description="Where the model runs: cpu or cuda (default: cuda when available).")]
IngestConfigFile = Annotated[
    Path | None,
    Field(
        description="Ingest config (JSON or YAML; see schemas/ingest_config.schema.json): tensor shapes and "
        "reading rules (default: CPU shapes).",
    ),
    Cli(name="--config", folder=False),
]
BackboneConfigFile = Annotated[
    Path | None,
    Field(description="Backbone config (JSON or YAML): model sizes of a new backbone (see BackboneConfig)."),
    Cli(folder=False),
]


class Arguments(BaseModel):
    """The common base: unknown names are refused; fields are given by name or alias."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())

    def values(self, *leave_out: str) -> dict[str, Any]:
        """The fields by name (the Python function's keywords), without ``leave_out``; objects kept as they are."""
        return {name: getattr(self, name) for name in type(self).model_fields if name not in leave_out}


class IngestArgs(Arguments):
    """``meddx ingest`` / :func:`meddx.ingest_cohort`: read every modality of every row into the cache."""

    manifest: Manifest
    cache_dir: CacheDir = None
    config: IngestConfigFile = None
    out_dir: Annotated[
        Path | None,
        Field(
            alias="out",
            description="This run's folder for errors.csv, warnings.csv and the config used "
            "(default: a new runs/ingest-*).",
        ),
        Cli(folder=True),
    ] = None
    workers: Workers = None
    task_timeout: TaskTimeout = 600.0
    progress: Progress = True


class PretrainArgs(Arguments):
    """``meddx pretrain`` / :func:`meddx.pretrain`: self-supervised pretraining of a new backbone."""

    manifest: Manifest
    out_dir: Annotated[
        Path,
        Field(
            alias="out",
            description="Folder for the pretrained backbone (config.json, model.safetensors) and its checkpoint.",
        ),
        Cli(folder=True),
    ]
    epochs: Annotated[int, Field(ge=1, description="Passes over the cohort.")] = 5
    batch_size: Annotated[
        int, Field(ge=2, description="Patients per step; the contrastive loss wants a few dozen.")
    ] = 32
    learning_rate: Annotated[float, Field(gt=0, description="AdamW learning rate."), Cli(name="--lr")] = 1e-3
    weight_decay: Annotated[float, Field(ge=0, description="AdamW weight decay.")] = 0.01
    seed: Annotated[int, Field(description="Seeds weights, shuffling and masking.")] = 0
    cache_dir: CacheDir = None
    ingest_config: IngestConfigFile = None
    backbone_config: BackboneConfigFile = None
    workers: Workers = None
    loader_workers: Annotated[int, Field(ge=0, description="DataLoader worker processes.")] = 0
    resume: Annotated[bool, Field(description="Carry on from OUT/checkpoint (written after every epoch).")] = False
    device: Device = None
    progress: Progress = True


Mode = Literal["auto", "head", "full", "lora"]


class FinetuneArgs(Arguments):
    """``meddx finetune`` / :func:`meddx.finetune`: fine-tune diagnostic heads, then calibrate them."""

    manifest: Manifest
    out_dir: Annotated[
        Path,
        Field(
            alias="out",
            description="Folder for the model (config.json, model.safetensors, calibration.json, metrics.json).",
        ),
        Cli(folder=True),
    ]
    tasks: Annotated[
        list[str] | None, Field(description="Comma-separated tasks (default: every label:<task> column).")
    ] = None
    backbone: Annotated[
        Path | None,
        Field(description="A pretrained backbone folder (meddx pretrain); default: a new backbone."),
        Cli(folder=True),
    ] = None
    mode: Annotated[
        Mode,
        Field(
            description="head: frozen backbone; full: train everything; lora: LoRA adapters; "
            "auto: head with --backbone, else full."
        ),
    ] = "auto"
    epochs: Annotated[int | None, Field(ge=1, description="At most this many epochs (default per mode).")] = None
    batch_size: Annotated[int, Field(ge=1, description="Patients per step.")] = 64
    learning_rate: Annotated[
        float | None, Field(gt=0, description="AdamW learning rate (default per mode)."), Cli(name="--lr")
    ] = None
    patience: Annotated[int, Field(ge=1, description="Epochs without a better validation AUROC before stopping.")] = 5
    alpha: Annotated[
        float, Field(gt=0, lt=1, description="Conformal miscoverage: sets hold the true class 1-alpha of the time.")
    ] = 0.1
    calibration: Annotated[
        Literal["temperature", "isotonic"], Field(description="How the heads' probabilities are calibrated.")
    ] = "temperature"
    min_group_size: Annotated[
        int, Field(ge=1, description="Fewest validation rows for a subgroup's own conformal threshold.")
    ] = 50
    ood_false_alarm: Annotated[
        float,
        Field(
            gt=0,
            le=0.5,
            description="Share of validation rows the out-of-distribution thresholds flag (per modality and fused).",
        ),
    ] = 0.05
    head_dropout: Annotated[float, Field(ge=0, lt=1, description="Dropout inside each head.")] = 0.1
    head_input: Annotated[
        Literal["summary", "summary+modalities"],
        Field(description="What the heads read: the patient summary, or it and one vector per modality."),
    ] = "summary"
    schedule: Annotated[
        Literal["cosine", "constant"],
        Field(description="Learning rate over the steps of full and lora (head mode: constant)."),
    ] = "cosine"
    lora: Annotated[
        dict[str, Any] | None,
        Field(description="Mode lora: r, alpha, dropout, text_encoder."),
        Cli(hidden=True),
    ] = None
    seed: Annotated[int, Field(description="Seeds the split, weights, shuffling and dropout.")] = 0
    cache_dir: CacheDir = None
    ingest_config: IngestConfigFile = None
    backbone_config: BackboneConfigFile = None
    workers: Workers = None
    resume: Annotated[bool, Field(description="Carry on from OUT/checkpoint.")] = False
    device: Device = None
    progress: Progress = True


class DiagnoseArgs(Arguments):
    """``meddx diagnose`` / :func:`meddx.diagnose`: calibrated diagnoses for every row of a cohort.

    The Ray engine's settings (``address``, ``actors``, ``gpus_per_actor``, ``cpus_per_actor``)
    are None unless given; :meth:`ray_settings` lists the given ones.
    """

    manifest: Manifest
    model: Annotated[
        Path, Field(description="A fine-tuned model folder (meddx finetune)."), Cli(name="--model", folder=True)
    ]
    out_dir: Annotated[
        Path,
        Field(
            alias="out",
            description="Folder for predictions.parquet/.csv, risk_assessments.ndjson, errors.csv and run.json.",
        ),
        Cli(folder=True),
    ]
    split: Annotated[str | None, Field(description="Only rows of this split (e.g. test); default: every row.")] = None
    cache_dir: CacheDir = None
    workers: Workers = None
    resume: Annotated[bool, Field(description="Keep the finished chunks of a killed run in OUT and do the rest.")] = (
        False
    )
    batch_size: Annotated[int, Field(ge=1, description="Patients per forward pass.")] = 64
    chunk_size: Annotated[
        int, Field(ge=1, description="Rows ingested ahead of the model at a time (the unit of --resume).")
    ] = 64
    contributions: Annotated[
        bool,
        Field(description="Add the contribution:<modality> and ablation:<modality> columns."),
        Cli(name="--no-contributions", turns_off=True, help="Skip the contribution:/ablation: columns (faster)."),
    ] = True
    task_timeout: TaskTimeout = 600.0
    abstain: Annotated[
        bool,
        Field(description="Rows above the model's fused out-of-distribution threshold get status abstain."),
        Cli(
            name="--no-abstain",
            turns_off=True,
            help="Keep status ok on out-of-distribution rows (their ood columns are still written).",
        ),
    ] = True
    engine: Annotated[
        Literal["local", "ray"],
        Field(
            description="local: worker processes on this machine; ray: ingestion as Ray tasks, the model in Ray "
            "actors (pip install 'meddx[distributed]'; see docs/scaling.md)."
        ),
    ] = "local"
    address: Annotated[
        str | None,
        Field(
            description="--engine ray: the Ray cluster to join (auto, HOST:6379, ray://HOST:10001); "
            "default: start a local Ray."
        ),
    ] = None
    actors: Annotated[int | None, Field(ge=1, description="--engine ray: model actors (default 1).")] = None
    gpus_per_actor: Annotated[
        float | None,
        Field(ge=0, description="--engine ray: GPUs per model actor (fractions share a GPU; needs --device cuda)."),
    ] = None
    cpus_per_actor: Annotated[
        float | None, Field(ge=0, description="--engine ray: CPUs Ray reserves per model actor (default 1).")
    ] = None
    device: Annotated[str, Field(description="Where the model runs (cpu, cuda).")] = "cpu"
    store_sr: Annotated[
        bool,
        Field(
            description="Store a DICOM Structured Report per prediction made on PACS images back on the DICOMweb "
            "server."
        ),
    ] = False
    store_fhir: Annotated[
        bool,
        Field(
            description="Write each RiskAssessment to the FHIR server (fhir.url or MEDDX_FHIR_URL), once; "
            "see fhir_writes.csv."
        ),
    ] = False
    progress: Progress = True

    def ray_settings(self) -> dict[str, Any]:
        """The Ray engine's settings that were given (the others keep the engine's defaults)."""
        return {name: value for name in RAY_SETTINGS if (value := getattr(self, name)) is not None}


RAY_SETTINGS = ("address", "actors", "gpus_per_actor", "cpus_per_actor")


class EvaluateArgs(Arguments):
    """``meddx evaluate`` / :func:`meddx.evaluate`: metrics, report.html and plots of a predictions file.

    ``n_bins``, ``n_resamples``, ``confidence`` and ``seed`` are the fields of
    :class:`meddx.metrics.MetricSettings`.
    """

    predictions: Annotated[Path, Field(description="predictions.parquet or .csv (meddx diagnose)."), Cli(argument=True)]
    manifest: Annotated[
        Path,
        Field(description="The cohort manifest with the label:<task> columns (joined on patient_id, index_time)."),
        Cli(name="--manifest"),
    ]
    out: Annotated[Path, Field(description="Folder for metrics.json, report.html and the PNG plots."), Cli(folder=True)]
    by: Annotated[list[str], Field(description="Subgroup columns, comma-separated (e.g. sex,site).")] = []
    n_resamples: Annotated[
        int, Field(ge=0, alias="bootstrap", description="Bootstrap resamples per interval (0: no intervals).")
    ] = 1000
    confidence: Annotated[float, Field(gt=0, lt=1, description="Level of the intervals.")] = 0.95
    n_bins: Annotated[
        int, Field(ge=1, alias="bins", description="Equal-width bins of the ECE and the reliability diagram.")
    ] = 10
    seed: Annotated[int, Field(description="Seed of the bootstrap.")] = 0
    model_card: Annotated[
        Path | None,
        Field(
            description="The model folder that made the predictions: refresh the metrics section of its card "
            "(README.md) and show the evaluated rows' inputs beside the training ones."
        ),
        Cli(folder=True),
    ] = None
    cache_dir: CacheDir = None
    progress: Progress = True


JOBS: dict[str, type[Arguments]] = {
    "ingest": IngestArgs,
    "pretrain": PretrainArgs,
    "finetune": FinetuneArgs,
    "diagnose": DiagnoseArgs,
    "evaluate": EvaluateArgs,
}


def cli_of(field_info: Any) -> Cli:
    """The :class:`Cli` of a field (``model.model_fields[name]``), or the default one."""
    return next((m for m in field_info.metadata if isinstance(m, Cli)), Cli())


def outward_name(name: str, field_info: Any) -> str:
    """The field's name outside Python: its alias, else its name."""
    return field_info.alias or name


def option_name(name: str, field_info: Any) -> str:
    """The field's command-line name: ``--lr``, ``--out``, or ``MANIFEST`` for an argument."""
    cli = cli_of(field_info)
    if cli.argument:
        return outward_name(name, field_info).upper()
    return cli.name or "--" + outward_name(name, field_info).replace("_", "-")

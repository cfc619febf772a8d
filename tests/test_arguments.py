"""Parameters declared once: the Python API, the arguments models, the CLI and the pipeline steps agree."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import meddx
from meddx.arguments import (
    JOBS,
    RAY_SETTINGS,
    Arguments,
    DiagnoseArgs,
    EvaluateArgs,
    FinetuneArgs,
    cli_of,
    option_name,
    outward_name,
)
from meddx.cli import main
from meddx.cli_options import arguments

# The Python entry point of each job, in one place. ingest_cohort, pretrain, finetune and diagnose are
# the package's lazy names; evaluate is not: `meddx.evaluate` is the module of the same name, and a lazy
# function of a module's name would hide the module.
API = {
    "ingest": "meddx:ingest_cohort",
    "pretrain": "meddx:pretrain",
    "finetune": "meddx:finetune",
    "diagnose": "meddx:diagnose",
    "evaluate": "meddx.evaluate:evaluate",
}

# The manifest is the first parameter of every job; the API calls it `cohort` where it also takes a loaded Cohort.
POSITIONAL = {"manifest": "cohort"}

# API parameters that are not arguments, and why.
NOT_ARGUMENTS = {
    "ingest": {"plugins": "modules to import in each worker: Python callers only"},
    "diagnose": {
        "plugins": "modules to import in each worker: Python callers only",
        "ray_options": "made from the flat RAY_SETTINGS (CLI) or a pipeline step's `ray`",
    },
    "evaluate": {"settings": "a MetricSettings made from n_bins, n_resamples, confidence, seed"},
}

# Arguments with a default where the API needs a value: the CLI fills it in.
FILLED_IN = {("ingest", "cache_dir"): "the default cache folder (meddx.cache.default_cache_dir)"}


def api(job: str):
    module, name = API[job].split(":")
    return getattr(importlib.import_module(module), name)


def _elsewhere(job: str) -> dict[str, typing.Any]:
    """Fields that the API takes inside an object: name -> that object's default for it."""
    if job == "diagnose":
        from meddx.batch.options import RayOptions

        return {f.name: f.default for f in dataclasses.fields(RayOptions) if f.name in RAY_SETTINGS}
    if job == "evaluate":
        from meddx.metrics import MetricSettings

        return {f.name: f.default for f in dataclasses.fields(MetricSettings)}
    return {}


def _choices(annotation) -> tuple | None:
    plain = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    literal = [a for a in plain if typing.get_origin(a) is typing.Literal]
    return typing.get_args(literal[0]) if literal else None


def _same(a, b) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return list(a) == list(b)
    return a == b


@pytest.mark.parametrize("job", JOBS)
def test_every_api_parameter_is_an_argument_with_its_default(job: str) -> None:
    model = JOBS[job]
    parameters = inspect.signature(api(job)).parameters
    elsewhere = _elsewhere(job)
    fields = model.model_fields
    for name, info in fields.items():
        api_name = POSITIONAL.get(name, name) if name not in parameters else name
        if name in elsewhere:
            if info.default is not None:  # None: the object's own default (the help says which)
                assert _same(info.default, elsewhere[name]), f"{job}: {name} {info.default!r} != {elsewhere[name]!r}"
            continue
        assert api_name in parameters, f"{job}: argument {name} is no parameter of {API[job]}"
        default = parameters[api_name].default
        if info.is_required():
            continue  # the CLI and the pipelines want it where Python may leave it out (finetune's out_dir)
        if default is inspect.Parameter.empty:
            assert (job, name) in FILLED_IN, f"{job}: {name} has a default the API does not have"
            continue
        assert _same(info.default, default), f"{job}: {name} defaults to {info.default!r}, the API to {default!r}"
    named = {POSITIONAL.get(n, n) for n in fields} | set(fields) | set(NOT_ARGUMENTS.get(job, {}))
    missing = [p for p in parameters if p not in named]
    assert not missing, f"{API[job]} takes {missing}, which {model.__name__} does not declare"


@pytest.mark.parametrize("job", JOBS)
def test_choices_are_the_apis(job: str) -> None:
    function = api(job)
    parameters = inspect.signature(function).parameters
    for name, info in JOBS[job].model_fields.items():
        choices = _choices(info.annotation)
        if choices is None:
            continue
        annotation = parameters[name].annotation if name in parameters else None
        if isinstance(annotation, str):  # `from __future__ import annotations`: a name such as "Mode", else no Literal
            annotation = function.__globals__.get(annotation)
        library = _choices(annotation) if annotation is not None else None
        if library is not None:
            assert set(choices) == set(library), f"{job}: {name}"
        for choice in choices:  # each documented in the API's docstring
            assert f"``{choice}``" in (function.__doc__ or ""), f"{job}: {name} choice {choice!r} not in the docstring"


@pytest.mark.parametrize("job", JOBS)
def test_the_command_has_exactly_the_arguments_options(job: str) -> None:
    command = main.commands[job]
    params = {p.name: p for p in command.params if p.name != "help"}
    fields = {n: f for n, f in JOBS[job].model_fields.items() if not cli_of(f).hidden}
    assert set(params) == set(fields), f"meddx {job}: options beside its arguments model"
    for name, info in fields.items():
        param, cli = params[name], cli_of(info)
        shown = param.human_readable_name if isinstance(param, click.Argument) else param.opts[0]
        assert shown == option_name(name, info)
        assert param.required == (info.is_required() or cli.argument), name
        if isinstance(param, click.Option) and param.is_flag:
            assert param.default is False, name
            assert info.default is cli.turns_off, name
            continue
        if not info.is_required() and info.default not in (None, []):
            assert param.default == info.default, name
        choices = _choices(info.annotation)
        if choices is not None:
            assert isinstance(param.type, click.Choice), name
            assert list(param.type.choices) == list(choices), name
        assert (param.help if isinstance(param, click.Option) else info.description) == (
            cli.help or info.description
        ), name


@pytest.mark.parametrize("job", ["pretrain", "finetune", "diagnose", "evaluate"])
def test_the_pipeline_step_is_the_arguments_model(job: str) -> None:
    from meddx import pipelines

    step = {
        "pretrain": pipelines.PretrainStep,
        "finetune": pipelines.FinetuneStep,
        "diagnose": pipelines.DiagnoseStep,
        "evaluate": pipelines.EvaluateStep,
    }[job]
    model = JOBS[job]
    own = {"step", "ray", "backbone_config", "ingest_config"}  # inline objects where the CLI takes a file
    expected = (
        set(model.model_fields) - set(pipelines.PIPELINE_LEVEL) - (set(RAY_SETTINGS) if job == "diagnose" else set())
    )
    assert set(step.model_fields) - own == expected - own
    for name in expected - own:
        mine, theirs = step.model_fields[name], model.model_fields[name]
        assert outward_name(name, mine) == outward_name(name, theirs)
        assert mine.is_required() == theirs.is_required(), name
        assert _same(mine.default, theirs.default), name


def test_the_finetune_step_takes_the_librarys_mode_default() -> None:
    from meddx.pipelines import FinetuneStep

    step = FinetuneStep.model_validate({"step": "finetune", "manifest": "m.csv", "out": "model"})
    assert step.mode == "auto" == inspect.signature(meddx.finetune).parameters["mode"].default
    assert FinetuneStep.model_validate({"step": "finetune", "manifest": "m.csv", "out": "m", "mode": "auto"})


def test_names_outside_python_are_the_aliases() -> None:
    args = EvaluateArgs.model_validate({"predictions": "p.csv", "manifest": "m.csv", "out": "e", "bins": 5})
    assert args.n_bins == 5
    assert args.n_resamples == 1000
    assert EvaluateArgs(predictions="p.csv", manifest="m.csv", out="e", n_bins=5).n_bins == 5
    assert FinetuneArgs.model_validate({"manifest": "m.csv", "out": "model"}).out_dir == Path("model")
    with pytest.raises(ValueError, match="epoch"):
        FinetuneArgs.model_validate({"manifest": "m.csv", "out": "model", "epoch": 3})


def test_the_command_line_turns_into_one_model() -> None:
    seen: list[Arguments] = []

    @click.command()
    @arguments(DiagnoseArgs)
    def show(args: DiagnoseArgs) -> None:
        seen.append(args)

    given = ["m.csv", "--model", "model", "--out", "d", "--no-contributions", "--quiet", "--actors", "2"]
    result = CliRunner().invoke(show, given)
    assert result.exit_code == 0, result.output
    args = seen[0]
    assert isinstance(args, DiagnoseArgs)
    assert (args.contributions, args.progress, args.engine, args.task_timeout) == (False, False, "local", 600.0)
    assert args.ray_settings() == {"actors": 2}
    assert args.values("manifest", "model", "out_dir", *RAY_SETTINGS)["batch_size"] == 64

    result = CliRunner().invoke(show, ["m.csv", "--model", "model", "--out", "d", "--engine", "spark"])
    assert result.exit_code == 2
    assert "'spark' is not one of 'local', 'ray'" in result.output


def test_finetune_tasks_are_split_on_commas() -> None:
    seen: list[FinetuneArgs] = []

    @click.command()
    @arguments(FinetuneArgs)
    def show(args: FinetuneArgs) -> None:
        seen.append(args)

    result = CliRunner().invoke(show, ["m.csv", "--out", "o", "--tasks", " a, b,,", "--mode", "lora"])
    assert result.exit_code == 0, result.output
    assert seen[0].tasks == ["a", "b"]
    assert seen[0].mode == "lora"
    assert seen[0].lora is None

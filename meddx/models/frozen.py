"""Frozen trunks compute each input once: their outputs are cached by input content and weights.

A trunk whose weights do not train (pretrained imaging or video CNNs under a trainable projection)
gives the same output for the same input, so after the first epoch it need not run at all. The
key of each input row is a hash of the trunk's weights and the row's bytes: new weights (loading
a checkpoint, another pretraining run) make new keys, so a stale output is never reused. The
encoder keeps a frozen trunk in eval mode (batch-norm running statistics, no dropout), which is
what makes its output a function of the input alone. By default the cache lives in memory, for the
life of the encoder. Given a folder, it is kept on disk too, as the frozen text encoder's chunk
embeddings are (:mod:`meddx.models.text_cache`, one subfolder per weights digest): a hospital's own
Hugging Face model is slow even once per run, so a later run reads its outputs back.

Example:
    >>> import torch
    >>> trunk, outputs = torch.nn.Linear(3, 2).requires_grad_(False), FrozenOutputs()
    >>> x = torch.ones(4, 3)
    >>> torch.equal(outputs(trunk, x), trunk(x)), len(outputs)
    (True, 1)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from meddx.models.text_cache import EmbeddingCache


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        if data.numel():
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def row_keys(version: str, x: torch.Tensor) -> list[str]:
    """One key per row of ``x`` ``(N, ...)``: hash of ``version``, the dtype, the row shape and its bytes."""
    rows = x.detach().to("cpu").contiguous()
    prefix = f"{version}:{rows.dtype}:{tuple(rows.shape[1:])}".encode()
    if rows.numel() == 0:
        return [hashlib.sha256(prefix).hexdigest() for _ in range(rows.shape[0])]
    flat = rows.reshape(rows.shape[0], -1).view(torch.uint8).numpy()
    return [hashlib.sha256(prefix + row.tobytes()).hexdigest() for row in flat]


class FrozenOutputs:
    """The outputs of one frozen trunk, by input row; a trunk is run only on rows it has not seen.

    The trunk must map ``(N, ...)`` to ``(N, ...)`` row by row in eval mode (convolutions, batch
    norm with running statistics and pooling do) and must not train. A trunk whose output depends on
    more than its weights (a processor's sizes and statistics) says so in a ``settings`` string, which
    enters the version.
    """

    def __init__(self, folder: str | Path | None = None) -> None:
        self._outputs: dict[str, torch.Tensor] = {}
        self._digest: tuple[tuple[int, ...], str] | None = None
        self._folder = folder
        self._stores: dict[str, EmbeddingCache] = {}  # weights digest -> its on-disk outputs

    def __len__(self) -> int:
        return len(self._outputs) + sum(len(store) for store in self._stores.values())

    def _stored(self, version: str, keys: list[str], found: list[torch.Tensor | None]) -> EmbeddingCache | None:
        """With a folder: fill ``found`` from the outputs kept on disk for ``version``; returns that store."""
        if self._folder is None:
            return None
        store = self._stores.get(version)
        if store is None:
            store = self._stores[version] = EmbeddingCache(self._folder, version)
        for n, out in enumerate(store.get(keys)):
            if out is not None:
                found[n] = out
        return store

    def version(self, trunk: nn.Module) -> str:
        """The weights' digest, recomputed only when a weight was replaced or written in place since."""
        tensors = [*trunk.parameters(), *trunk.buffers()]
        stamp = tuple(t._version for t in tensors) + tuple(t.data_ptr() for t in tensors)
        if self._digest is None or self._digest[0] != stamp:
            digest = weights_digest(trunk)
            settings = getattr(trunk, "settings", None)  # what else decides the output (a processor's settings)
            if settings is not None:
                digest = hashlib.sha256(f"{digest}:{settings}".encode()).hexdigest()
            self._digest = (stamp, digest)
        return self._digest[1]

    def __call__(self, trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``trunk(x)``, from the cache where a row was seen with these weights."""
        if x.shape[0] == 0:
            with torch.no_grad():
                return trunk(x)
        version = self.version(trunk)
        keys = row_keys(version, x)
        found = [self._outputs.get(key) for key in keys]
        store = self._stored(version, keys, found)
        todo = [n for n, out in enumerate(found) if out is None]
        if todo:
            with torch.no_grad():
                fresh = trunk(x[torch.tensor(todo, device=x.device)])  # (len(todo), ...)
            computed = {}
            for n, out in zip(todo, fresh, strict=True):
                found[n] = computed[keys[n]] = out.detach().to("cpu", copy=True)  # not a view of the batch
            if store is None:
                self._outputs.update(computed)
            else:
                store.put(computed)  # float32 on disk and in the store's memory
        return torch.stack([out for out in found if out is not None]).to(x.device)

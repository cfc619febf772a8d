"""Distributed setup for ``torchrun``: the process group, this process's rank and device, sharded embeddings.

``finetune`` runs unchanged under ``torchrun --nproc_per_node N``: gloo on CPU, nccl on GPU; rank 0
writes the files. Without ``torchrun`` (``WORLD_SIZE`` unset or 1) nothing is started.

Example:
    >>> ranks = init_distributed("cpu")
    >>> ranks.rank, ranks.world, ranks.device, ranks.is_main
    (0, 1, 'cpu', True)
    >>> teardown_distributed(ranks)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meddx.data import CohortDataset
    from meddx.embeddings import CohortEmbeddings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: its rank, the number of processes, its device, whether it started the group."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    started_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return self.rank == 0


def init_distributed(device: str) -> Ranks:
    """This process's :class:`Ranks`; starts the process group when launched by ``torchrun``.

    On GPUs each process takes the GPU of its local rank (``device="cuda"`` becomes
    ``cuda:LOCAL_RANK``): ``--nproc_per_node`` processes for as many GPUs on each node.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(device=device)
    import torch
    import torch.distributed as dist

    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    started = not dist.is_initialized()
    if started:
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), device, started)


def teardown_distributed(ranks: Ranks) -> None:
    """End the process group :func:`init_distributed` started (one the caller started stays up)."""
    if not ranks.started_group:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def sharded_embeddings(
    backbone, dataset: CohortDataset, ranks: Ranks, head_input: str = "summary", progress: bool = False
) -> CohortEmbeddings:
    """The embeddings of every row of ``dataset``, in order; each rank computes every ``world``-th row."""
    from meddx.data import CohortDataset
    from meddx.embeddings import CohortEmbeddings, compute_embeddings

    world, rank = ranks.world, ranks.rank
    if world <= 1 or len(dataset) < world:
        return compute_embeddings(backbone, dataset, device=ranks.device, head_input=head_input, progress=progress)
    import torch
    import torch.distributed as dist

    rows = dataset.rows[rank::world]
    logger.info("rank %d embeds %d of %d rows", rank, len(rows), len(dataset))
    shard = CohortDataset(dataset.index_path, split=dataset.split, tasks=list(dataset.tasks), rows=rows)
    gathered: list[Any] = [None] * world
    embedded = compute_embeddings(backbone, shard, device=ranks.device, head_input=head_input, progress=progress)
    dist.all_gather_object(gathered, embedded)
    # rank r holds rows r, r + world, ...: back to dataset order
    order = torch.cat([torch.arange(r, len(dataset), world) for r in range(world)]).argsort()
    return CohortEmbeddings(
        pooled=torch.cat([g.pooled for g in gathered])[order],
        present=torch.cat([g.present for g in gathered])[order],
        rows=torch.cat([g.rows for g in gathered])[order],
        labels={t: torch.cat([g.labels[t] for g in gathered])[order] for t in gathered[0].labels},
    )

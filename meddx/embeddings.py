"""Patient embeddings from a backbone over a prepared cohort (for linear probes and head-only fits).

Example:
    >>> embeddings = compute_embeddings(backbone, prepared.dataset(split="train"))  # doctest: +SKIP
    >>> embeddings.pooled.shape  # doctest: +SKIP
    torch.Size([600, 64])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from meddx.data import CohortDataset
    from meddx.models import FoundationBackbone


@dataclass
class CohortEmbeddings:
    """Embeddings of every row of a dataset, in dataset order.

    Attributes:
        pooled: float32 ``(N, D)`` the patient embedding.
        present: bool ``(N, M)`` which modalities each row had.
        rows: int64 ``(N,)`` manifest rows.
        labels: task -> int64 ``(N,)`` class index, -1 where unknown.
    """

    pooled: torch.Tensor
    present: torch.Tensor
    rows: torch.Tensor
    labels: dict[str, torch.Tensor]


def compute_embeddings(
    backbone: FoundationBackbone,
    dataset: CohortDataset,
    batch_size: int = 64,
    device: str = "cpu",
    loader_workers: int = 0,
    head_input: str = "summary",
    progress: bool = False,
) -> CohortEmbeddings:
    """Run the backbone in eval mode (no modality dropout, no gradients) over ``dataset``.

    ``head_input`` says what ``pooled`` holds (see :func:`meddx.models.diagnosis.head_features`);
    ``progress`` shows a bar over the rows.
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from meddx.models.diagnosis import head_features

    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=loader_workers, collate_fn=dataset.collate
    )
    was_training = backbone.training
    backbone.eval()
    pooled, present, rows = [], [], []
    labels: dict[str, list] = {}
    with torch.no_grad(), tqdm(total=len(dataset), desc="embed", unit="row", disable=not progress) as bar:
        for batch in loader:
            out = backbone(batch.to(device))
            bar.update(len(batch.present))
            pooled.append(head_features(out, head_input).float().cpu())
            present.append(batch.present.cpu())
            rows.append(batch.rows.cpu())
            for task, values in batch.labels.items():
                labels.setdefault(task, []).append(values.cpu())
    backbone.train(was_training)
    return CohortEmbeddings(
        pooled=torch.cat(pooled),
        present=torch.cat(present),
        rows=torch.cat(rows),
        labels={task: torch.cat(values) for task, values in labels.items()},
    )

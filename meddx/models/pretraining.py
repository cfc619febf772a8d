"""Self-supervised pretraining of the backbone: no labels needed.

Two objectives, summed:

* **Masked-modality modelling** (as in MultiMAE): for every patient with at least two
  modalities, one present modality is withheld from the fusion transformer, and a small
  predictor must recover that modality's own encoder embedding from the fused summary of
  the others. The target is the encoder embedding computed on the full input, with its
  gradient stopped. This teaches the fusion to carry what one modality says about another.
* **Cross-modal contrastive alignment** (as in ConVIRT/CLIP): the encoder embeddings of two
  modalities of the same patient are pulled together and pushed away from the other
  patients' in the batch (symmetric InfoNCE over every pair of modalities that at least two
  patients share). This keeps the encoder embeddings from collapsing to a constant, which
  the first objective alone would allow.

Example:
    >>> objectives = PretrainingObjectives(backbone)  # doctest: +SKIP
    >>> losses = objectives(batch, generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
    >>> losses.total.backward()  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from meddx.records import MODALITIES, PatientBatch

if TYPE_CHECKING:
    from meddx.models.backbone import FoundationBackbone


@dataclass
class PretrainingLosses:
    """The losses of one batch (scalars); ``total`` is what is minimised."""

    total: torch.Tensor
    masked: torch.Tensor
    contrastive: torch.Tensor


def choose_hidden_modalities(present: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One present modality per patient to withhold, for patients with two or more.

    Args:
        present: bool ``(B, M)``.
        generator: for a reproducible choice.

    Returns:
        bool ``(B, M)`` with at most one True per row, and none for patients with a single modality.

    Example:
        >>> present = torch.tensor([[True, True, False], [False, True, False]])
        >>> choose_hidden_modalities(present, torch.Generator().manual_seed(0)).sum(dim=1).tolist()
        [1, 0]
    """
    scores = torch.rand(present.shape, generator=generator).to(present.device)  # (B, M)
    scores = scores.masked_fill(~present, -1.0)
    choice = scores.argmax(dim=1)  # (B,)
    hidden = torch.zeros_like(present)
    eligible = present.sum(dim=1) >= 2  # (B,)
    hidden[eligible, choice[eligible]] = True
    return hidden


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between matched rows of ``a`` and ``b`` (both ``(N, D)``, L2-normalised)."""
    logits = a @ b.T / temperature  # (N, N)
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class PretrainingObjectives(nn.Module):
    """The two self-supervised objectives around a :class:`~meddx.models.backbone.FoundationBackbone`.

    Args:
        backbone: the model being pretrained; its ``config.d_model`` sizes the predictors.
        temperature: of the contrastive softmax.
        masked_weight: weight of the masked-modality loss.
        contrastive_weight: weight of the contrastive loss.
    """

    def __init__(
        self,
        backbone: FoundationBackbone,
        temperature: float = 0.1,
        masked_weight: float = 1.0,
        contrastive_weight: float = 1.0,
    ):
        super().__init__()
        self.backbone = backbone
        self.temperature = temperature
        self.masked_weight = masked_weight
        self.contrastive_weight = contrastive_weight
        d = backbone.config.d_model
        self.heads = nn.ModuleDict(
            {
                # one predictor per modality: "what would modality m's encoder have said?"
                "predictors": nn.ModuleDict(
                    {m.value: nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d)) for m in MODALITIES}
                ),
                "projection": nn.Linear(d, d),  # contrastive space, kept apart from the encoder space
            }
        )

    def parameters_to_train(self) -> list[nn.Parameter]:
        """Every parameter that takes gradients (a frozen text encoder's do not)."""
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, batch: PatientBatch, generator: torch.Generator | None = None) -> PretrainingLosses:
        encoded_batch = self.backbone.encode(batch)  # the encoders run once for both objectives
        encoded = encoded_batch.encoder_embeddings.float()  # (B, M, D), each modality from its own encoder only
        present = encoded_batch.present  # (B, M)
        zero = encoded.sum() * 0.0  # keeps the graph (and the device) when a loss has nothing to do

        hidden = choose_hidden_modalities(present, generator)  # (B, M)
        masked = zero
        if hidden.any():
            withheld = self.backbone.fuse(encoded_batch, drop=hidden)
            target = encoded.detach()
            # nn.ModuleDict types its items as plain Module; this entry is the ModuleDict built in __init__
            predictors = cast(nn.ModuleDict, self.heads["predictors"])
            losses = []
            for j, modality in enumerate(MODALITIES):
                who = hidden[:, j]  # (B,)
                if who.any():
                    prediction = predictors[modality.value](withheld.pooled[who])  # (n, D)
                    losses.append(1.0 - F.cosine_similarity(prediction, target[who, j], dim=-1))
            masked = torch.cat(losses).mean()

        z = F.normalize(self.heads["projection"](encoded), dim=-1)  # (B, M, D)
        pair_losses = []
        for i in range(len(MODALITIES)):
            for j in range(i + 1, len(MODALITIES)):
                both = present[:, i] & present[:, j]  # (B,)
                if int(both.sum()) >= 2:
                    pair_losses.append(info_nce(z[both, i], z[both, j], self.temperature))
        contrastive = torch.stack(pair_losses).mean() if pair_losses else zero

        total = self.masked_weight * masked + self.contrastive_weight * contrastive
        return PretrainingLosses(total=total, masked=masked.detach(), contrastive=contrastive.detach())

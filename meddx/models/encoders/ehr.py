"""EHR encoder: binned labs as per-feature tokens (FT-Transformer style), code tokens, a demographics token.

Arrays by role: the 2-D ``mask`` and the ``values`` it covers (lab values and counts, ``(F, B)``);
``age_hours`` of those values (per bin, ``(B,)``); ``ids`` with their ``token_mask`` and
``age_hours`` (codes); every other ``values`` array (demographics) becomes one token of its own.
"""

from __future__ import annotations

import torch
from torch import nn

from meddx.errors import ConfigError
from meddx.models.config import BackboneConfig
from meddx.models.encoders.base import EncoderOutput, ModalityEncoder, find_arrays, find_one, zero_where_not
from meddx.records import Modality
from meddx.specs import ArraySpec


class EhrEncoder(ModalityEncoder):
    """Labs, codes and demographics → ``(P, T, d_model)`` tokens, most informative first.

    Token order: one per context array (demographics), then labs (``F`` tokens, or ``F*B`` with
    ``lab_tokens="feature_bin"``), then codes (``C``, most recent first as the tensorizer keeps them).

    Example:
        >>> from meddx.specs import ArrayField
        >>> spec = {"lab_values": ArrayField((3, 4), "float32"),
        ...         "lab_mask": ArrayField((3, 4), "bool", "mask", of=("lab_values",)),
        ...         "code_ids": ArrayField((5,), "int64", "ids", vocab_size=10),
        ...         "code_mask": ArrayField((5,), "bool", "token_mask", of=("code_ids",)),
        ...         "demographics": ArrayField((4,), "float32")}
        >>> encoder = EhrEncoder(BackboneConfig(d_model=16, n_heads=2), spec)
        >>> arrays = {"lab_values": torch.zeros(2, 3, 4), "lab_mask": torch.ones(2, 3, 4, dtype=torch.bool),
        ...           "code_ids": torch.ones(2, 5, dtype=torch.long), "code_mask": torch.ones(2, 5, dtype=torch.bool),
        ...           "demographics": torch.zeros(2, 4)}
        >>> tuple(encoder(arrays).tokens.shape)  # 1 demographics + 3 labs + 5 codes
        (2, 9, 16)
    """

    modality = Modality.EHR

    def __init__(self, config: BackboneConfig, spec: ArraySpec):
        super().__init__(config, spec)
        d = config.d_model
        self.per_bin = config.ehr.lab_tokens == "feature_bin"
        # labs: the 2-D mask and the values it covers
        self.lab_mask = find_one(self.modality, spec, "mask", ndim=2)
        self.lab_arrays = list(self.field(self.lab_mask).of)
        n_features, n_bins = self.field(self.lab_mask).shape
        for name in self.lab_arrays:
            if self.field(name).shape != (n_features, n_bins):
                raise ConfigError(f"ehr array {name} {self.field(name).shape} does not match its mask {self.lab_mask}")
        ages = find_arrays(spec, "age_hours", of=self.lab_arrays[0])
        self.lab_age = ages[0] if ages else None
        n_values = len(self.lab_arrays)
        if self.per_bin:  # FT-Transformer: token = sum_v value_v * W[f, v] + b[f], one per (feature, bin)
            self.lab_weight = nn.Parameter(torch.randn(n_features, n_values, d) * 0.02)
            self.lab_bias = nn.Parameter(torch.zeros(n_features, d))
            self.bin_embedding = nn.Parameter(torch.zeros(n_bins, d))
        else:  # one token per feature from all its bins and their mask
            self.lab_project = nn.Linear(n_bins * (n_values + 1), d)
            self.feature_embedding = nn.Parameter(torch.zeros(n_features, d))
        # codes
        self.code_ids = find_one(self.modality, spec, "ids")
        self.code_mask = find_one(self.modality, spec, "token_mask", of=self.code_ids)
        code_ages = find_arrays(spec, "age_hours", of=self.code_ids)
        self.code_age = code_ages[0] if code_ages else None
        vocab = self.field(self.code_ids).vocab_size
        if not vocab:
            raise ConfigError(f"ehr ids array {self.code_ids} declares no vocab_size; fit the aligner first")
        self.code_embedding = nn.Embedding(vocab, d, padding_idx=0)
        # context: every values array no mask covers (demographics)
        covered = set(self.lab_arrays)
        self.context = [n for n in find_arrays(spec, "values") if n not in covered]
        self.context_project = nn.ModuleList(
            nn.Linear(int(torch.tensor(self.field(n).shape).prod()), d) for n in self.context
        )

    def _labs(self, arrays: dict[str, torch.Tensor], record_age: torch.Tensor) -> EncoderOutput:
        mask = arrays[self.lab_mask].bool()  # (P, F, B)
        values = torch.stack([zero_where_not(arrays[n].float(), mask) for n in self.lab_arrays], dim=-1)  # (P,F,B,V)
        P, F, B, _ = values.shape
        bin_age = arrays[self.lab_age].float() if self.lab_age else record_age.expand(P, B)  # (P, B)
        if self.per_bin:
            tokens = torch.einsum("pfbv,fvd->pfbd", values, self.lab_weight)  # (P, F, B, D)
            tokens = tokens + self.lab_bias[:, None] + self.bin_embedding
            age = bin_age[:, None, :].expand(P, F, B)
            return EncoderOutput(tokens.reshape(P, F * B, -1), mask.reshape(P, F * B), age.reshape(P, F * B))
        inputs = torch.cat([values, mask.unsqueeze(-1).float()], dim=-1).reshape(P, F, -1)  # (P, F, B*(V+1))
        tokens = self.lab_project(inputs) + self.feature_embedding  # (P, F, D)
        # a lab token is as old as its most recent observed bin
        newest = torch.where(mask, bin_age[:, None, :], torch.full_like(values[..., 0], float("inf"))).amin(dim=-1)
        age = torch.where(torch.isfinite(newest), newest, record_age.expand(P, F))
        return EncoderOutput(tokens, mask.any(dim=-1), age)

    def forward(self, arrays: dict[str, torch.Tensor]) -> EncoderOutput:
        ids = arrays[self.code_ids].long()  # (P, C)
        P = ids.shape[0]
        record_age = self.record_age_hours(arrays, ids)  # (P, 1)
        code_mask = arrays[self.code_mask].bool()
        codes = EncoderOutput(
            self.code_embedding(torch.where(code_mask, ids, torch.zeros_like(ids))),  # (P, C, D)
            code_mask,
            arrays[self.code_age].float() if self.code_age else record_age.expand_as(ids).float(),
        )
        parts = []
        for name, project in zip(self.context, self.context_project, strict=True):
            token = project(arrays[name].float().reshape(P, -1)).unsqueeze(1)  # (P, 1, D)
            parts.append(EncoderOutput(token, torch.ones(P, 1, dtype=torch.bool, device=ids.device), record_age))
        parts += [self._labs(arrays, record_age), codes]
        return EncoderOutput(*(torch.cat(items, dim=1) for items in zip(*parts, strict=True)))

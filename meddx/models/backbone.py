"""The foundation backbone: modality encoders, then one fusion transformer over all their tokens.

Every token gets its modality's type embedding and an embedding of its age (``log1p`` hours before
the index time); a learned summary token is prepended; attention ignores padding and missing or
withheld modalities (``src_key_padding_mask``), so they cannot change the output. In training,
whole present modalities are hidden at random per patient (never all of them), so any subset
works at inference.

Example:
    >>> from meddx.models import BackboneConfig, FoundationBackbone
    >>> backbone = FoundationBackbone.from_aligner(BackboneConfig(), aligner)  # doctest: +SKIP
    >>> out = backbone(batch)  # doctest: +SKIP
    >>> out.pooled.shape, out.modality_embeddings.shape  # doctest: +SKIP
    (torch.Size([8, 64]), torch.Size([8, 6, 64]))
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from meddx.errors import ConfigError
from meddx.models.attention import encoder_on_attended
from meddx.models.config import BackboneConfig
from meddx.models.encoders import ENCODERS, EncoderOutput, ImagingEncoder, ModalityEncoder, NotesEncoder
from meddx.models.encoders.base import masked_mean, zero_where_not
from meddx.records import MODALITIES, Modality, PatientBatch
from meddx.specs import ArraySpec

if TYPE_CHECKING:
    from meddx.align import Aligner

logger = logging.getLogger(__name__)

M = len(MODALITIES)


def default_text_cache_dir() -> Path | None:
    """``$MEDDX_CACHE/text-embeddings`` when ``MEDDX_CACHE`` is set; otherwise None (in memory only)."""
    root = os.environ.get("MEDDX_CACHE")
    return Path(root) / "text-embeddings" if root else None


@dataclass
class EncodedBatch:
    """Every modality's encoder tokens, placed on the batch's rows (what :meth:`FoundationBackbone.fuse` takes).

    Attributes:
        tokens: per modality, ``(B, T_m, D)``; zeros on rows without the modality.
        token_mask: per modality, bool ``(B, T_m)``.
        token_age_hours: per modality, ``(B, T_m)``.
        present: bool ``(B, M)``: the patient has the modality and it gave at least one token.
        encoder_embeddings: ``(B, M, D)`` mean of each modality's own encoder tokens, before fusion.
    """

    tokens: dict[Modality, torch.Tensor]
    token_mask: dict[Modality, torch.Tensor]
    token_age_hours: dict[Modality, torch.Tensor]
    present: torch.Tensor
    encoder_embeddings: torch.Tensor

    def flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every modality's tokens side by side: ``(B, T, D)`` tokens, ``(B, T)`` ages, bool ``(B, T)``
        real-token mask and int64 ``(T,)`` modality index of each column (T is 0 with no modality)."""
        B, device = self.present.shape[0], self.present.device
        if not self.tokens:
            d = self.encoder_embeddings.shape[-1]
            ages = torch.zeros(B, 0, device=device)
            owner = torch.zeros(0, dtype=torch.long, device=device)
            return ages.new_zeros(B, 0, d), ages, self.present.new_zeros(B, 0), owner
        owners = [torch.full((t.shape[1],), MODALITIES.index(m), dtype=torch.long) for m, t in self.tokens.items()]
        return (
            torch.cat(list(self.tokens.values()), dim=1),
            torch.cat([self.token_age_hours[m] for m in self.tokens], dim=1),
            torch.cat([self.token_mask[m] for m in self.tokens], dim=1),
            torch.cat(owners).to(device),
        )


@dataclass
class BackboneOutput:
    """What the backbone gives for a batch of ``B`` patients.

    Attributes:
        pooled: ``(B, D)`` the patient embedding (the fused summary token).
        modality_embeddings: ``(B, M, D)`` mean of each modality's fused tokens (0 where not used).
        modality_mask: bool ``(B, M)`` modalities that took part (present, not dropped or withheld).
        encoder_embeddings: ``(B, M, D)`` mean of each modality's own encoder tokens before fusion,
            for every modality the patient has, dropped or withheld ones included (pretraining targets).
        encoder_mask: bool ``(B, M)`` where ``encoder_embeddings`` hold a modality.
        tokens: ``(B, T, D)`` fused tokens after the summary token, modality by modality.
        token_mask: bool ``(B, T)`` the tokens that took part.
        token_modality: int64 ``(T,)`` index into :data:`~meddx.records.MODALITIES` of each token.
    """

    pooled: torch.Tensor
    modality_embeddings: torch.Tensor
    modality_mask: torch.Tensor
    encoder_embeddings: torch.Tensor
    encoder_mask: torch.Tensor
    tokens: torch.Tensor
    token_mask: torch.Tensor
    token_modality: torch.Tensor


class TimeEmbedding(nn.Module):
    """Hours before the index time → ``(..., D)``: sinusoids of ``log1p(hours)`` and a linear map.

    The log scale tells an hour from a day and a month from a year with the same resolution.
    """

    frequencies: torch.Tensor

    def __init__(self, d_model: int, n_frequencies: int = 16):
        super().__init__()
        self.register_buffer("frequencies", torch.logspace(-1, 1, n_frequencies) * math.pi, persistent=False)
        self.project = nn.Linear(2 * n_frequencies, d_model)

    def forward(self, age_hours: torch.Tensor) -> torch.Tensor:
        x = torch.log1p(age_hours.float().clamp_min(0)).unsqueeze(-1) * self.frequencies  # (..., K)
        return self.project(torch.cat([x.sin(), x.cos()], dim=-1))


def hf_encoder(
    config: BackboneConfig,
    modality: Modality,
    spec: ArraySpec,
    aligner_state: dict[str, Any] | None,
    cache_dir: str | Path | None,
) -> ModalityEncoder:
    """The encoder of a modality whose config names a local Hugging Face model folder (``hf_model``)."""
    from meddx.models.encoders.hf_audio import HfAudioEncoder
    from meddx.models.encoders.hf_vision import HfImagingEncoder, HfVideoEncoder

    if modality is Modality.IMAGING:
        return HfImagingEncoder(config, spec, cache_dir)
    if modality is Modality.VIDEO:
        return HfVideoEncoder(config, spec, cache_dir)
    from meddx.config import AudioConfig

    rate = ((aligner_state or {}).get("config") or {}).get("audio", {}).get("sample_rate", AudioConfig().sample_rate)
    return HfAudioEncoder(config, spec, int(rate), cache_dir)


def _gather_tokens(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Per row, the token positions ``order`` ``(B, L)`` of ``x`` ``(B, T)`` or ``(B, T, D)``."""
    return torch.gather(x, 1, order if x.dim() == 2 else order[..., None].expand(-1, -1, x.shape[-1]))


def _first_real_tokens(out: EncoderOutput, limit: int) -> EncoderOutput:
    """Keep at most ``limit`` tokens per patient: the first real ones, in order."""
    if out.tokens.shape[1] <= limit:
        return out
    order = torch.argsort((~out.token_mask).to(torch.int8), dim=1, stable=True)[:, :limit]  # (P, limit)
    take = _gather_tokens
    return EncoderOutput(take(out.tokens, order), take(out.token_mask, order), take(out.token_age_hours, order))


def _model_path(model: str | None) -> Path | None:
    return None if model is None else Path(model).expanduser().resolve()


def _attended_first(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the token positions with attended ones first, cut after the row with the most.

    The fusion has no positional order (time and modality are in the token embeddings) and
    attends to unmasked tokens only, so running it on tokens gathered in this order computes
    the same as on the full padded sequence, while padding, absent and dropped modalities
    cost nothing (about 200 token slots, of which a patient attends to about 60 in training).

    Returns:
        int64 ``(B, L)`` positions to gather, and bool ``(B, L)`` which of them are attended.
    """
    length = int(mask.sum(dim=1).max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :length]
    return order, torch.gather(mask, 1, order)


def _modality_indices(modalities: Iterable[Modality | str] | None) -> list[int]:
    if not modalities:
        return []
    try:
        return [MODALITIES.index(Modality(m)) for m in modalities]
    except ValueError:
        choices = [m.value for m in MODALITIES]
        raise ConfigError(f"unknown modality in {list(modalities)}; choose from {choices}") from None


class FoundationBackbone(nn.Module):
    """Encoders for every modality of the spec and a fusion transformer over their tokens.

    Args:
        config: the backbone config.
        array_spec: ``{modality: {name: ArrayField}}``, as :meth:`meddx.align.Aligner.array_spec` gives.
        aligner_state: the fitted aligner's ``state_dict()``; saved with the model so that inference
            transforms data exactly as training did.
        cache_dir: where the frozen text encoder keeps chunk embeddings (default:
            :func:`default_text_cache_dir`).

    Example:
        >>> backbone = FoundationBackbone(BackboneConfig(), aligner.array_spec())  # doctest: +SKIP
        >>> backbone.eval()(batch, withhold=["imaging"]).modality_mask[:, 0].any()  # doctest: +SKIP
        tensor(False)
    """

    def __init__(
        self,
        config: BackboneConfig,
        array_spec: dict[Modality, ArraySpec],
        aligner_state: dict[str, Any] | None = None,
        cache_dir: str | Path | None = None,
        *,
        _text_config: dict[str, Any] | None = None,
        _load_external_weights: bool = True,
    ):
        super().__init__()
        self.config = config
        self.array_spec = {Modality(m): dict(s) for m, s in array_spec.items()}
        self.aligner_state = aligner_state
        d = config.d_model
        cache_dir = cache_dir if cache_dir is not None else default_text_cache_dir()
        encoders: dict[str, ModalityEncoder] = {}
        for modality in MODALITIES:
            spec = self.array_spec.get(modality)
            if spec is None:
                continue
            hf_model = getattr(getattr(config, modality.value, None), "hf_model", None)
            if hf_model is not None:  # a hospital's own Hugging Face model (docs/encoders.md)
                encoders[modality.value] = hf_encoder(config, modality, spec, aligner_state, cache_dir)
            elif modality is Modality.NOTES:
                encoders[modality.value] = NotesEncoder(config, spec, cache_dir=cache_dir, text_config=_text_config)
            elif modality is Modality.IMAGING:
                encoders[modality.value] = ImagingEncoder(config, spec, load_weights=_load_external_weights)
            else:
                encoders[modality.value] = ENCODERS[modality](config, spec)
        self.encoders = nn.ModuleDict(encoders)
        self.modality_embedding = nn.Parameter(torch.randn(M, d) * 0.02)  # (M, D)
        self.time_embedding = TimeEmbedding(d)
        self.summary = nn.Parameter(torch.randn(1, 1, d) * 0.02)  # (1, 1, D)
        layer = nn.TransformerEncoderLayer(
            d, config.n_heads, 4 * d, config.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        layer.self_attn.dropout = config.attention_dropout  # the attention weights' own rate
        self.fusion = nn.TransformerEncoder(layer, config.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)

    @classmethod
    def from_aligner(
        cls, config: BackboneConfig, aligner: Aligner, cache_dir: str | Path | None = None
    ) -> FoundationBackbone:
        """A backbone for the tensors a fitted aligner makes (its state is kept for saving).

        Raises:
            ConfigError: the notes were tokenised for another text model than ``config.text.model``.
        """
        tokenizer_model = aligner.config.notes.text_model
        if _model_path(tokenizer_model) != _model_path(config.text.model):
            raise ConfigError(
                f"the aligner tokenises notes for text model {tokenizer_model or 'bundled all-MiniLM-L6-v2'} but "
                f"text.model is {config.text.model or 'the bundled all-MiniLM-L6-v2'}; set both to the same folder"
            )
        return cls(config, aligner.array_spec(), aligner.state_dict(), cache_dir)

    def aligner(self) -> Aligner | None:
        """The fitted aligner saved with this backbone (None when it was built from a bare spec)."""
        from meddx.align import Aligner

        return None if self.aligner_state is None else Aligner.from_state_dict(self.aligner_state)

    def freeze_trunks(self) -> FoundationBackbone:
        """Freeze the imaging network and the video frame CNNs, e.g. to fine-tune a pretrained backbone.

        Their projections, the other encoders and the fusion transformer still train; the frozen
        trunks' outputs are cached by input content and weights (:mod:`meddx.models.frozen`), so
        from the second epoch on they no longer run. The config records it (``imaging.frozen``,
        ``video.frozen``), so a saved model loads frozen.

        Example:
            >>> backbone = FoundationBackbone.from_pretrained("runs/backbone").freeze_trunks()  # doctest: +SKIP
        """
        for name, section in (("imaging", self.config.imaging), ("video", self.config.video)):
            if name in self.encoders:
                self.encoders[name].freeze()  # type: ignore[operator]
            self.config = self.config.model_copy(update={name: section.model_copy(update={"frozen": True})})
        return self

    @property
    def notes_encoder(self) -> NotesEncoder | None:
        """The text encoder of the notes (None when the spec has no notes)."""
        encoder = self.encoders["notes"] if "notes" in self.encoders else None
        return encoder if isinstance(encoder, NotesEncoder) else None

    @property
    def modalities(self) -> list[Modality]:
        """The modalities this backbone has encoders for."""
        return [Modality(m) for m in self.encoders]

    # ---------------------------------------------------------------- encode

    def encode(self, batch: PatientBatch) -> EncodedBatch:
        """Run each modality's encoder on the patients that have it; place tokens on the batch rows."""
        B, device = len(batch), batch.present.device
        d = self.config.d_model
        tokens, masks, ages = {}, {}, {}
        present = torch.zeros(B, M, dtype=torch.bool, device=device)
        own = torch.zeros(B, M, d, device=device)
        for modality, arrays in batch.tensors.items():
            modality = Modality(modality)
            if modality.value not in self.encoders:
                raise ConfigError(
                    f"the batch holds {modality} but this backbone has no encoder for it; "
                    "build the backbone from the aligner that made the batch"
                )
            rows = batch.rows_with(modality)  # (P,)
            out = self.encoders[modality.value](arrays)
            out = _first_real_tokens(out, self.config.max_tokens_per_modality)
            T = out.tokens.shape[1]
            m = MODALITIES.index(modality)
            tokens[modality] = out.tokens.new_zeros(B, T, d).index_copy(0, rows, out.tokens)
            masks[modality] = torch.zeros(B, T, dtype=torch.bool, device=device).index_copy(0, rows, out.token_mask)
            ages[modality] = torch.zeros(B, T, device=device).index_copy(0, rows, out.token_age_hours.float())
            present[:, m] = masks[modality].any(dim=1)
            own[:, m] = masked_mean(tokens[modality], masks[modality], dim=1)  # (B, D)
        return EncodedBatch(tokens, masks, ages, present, own)

    # ------------------------------------------------------------------ fuse

    def _modality_dropout(self, keep: torch.Tensor) -> torch.Tensor:
        """Hide each kept modality with probability ``modality_dropout``, never all of a patient's."""
        hide = (torch.rand(keep.shape, device=keep.device) < self.config.modality_dropout) & keep
        emptied = keep.any(dim=1) & ~(keep & ~hide).any(dim=1)  # (B,) rows that would lose everything
        if emptied.any():
            pick = torch.rand(keep.shape, device=keep.device).masked_fill(~keep, -1.0).argmax(dim=1)  # (B,)
            rows = emptied.nonzero().flatten()
            hide[rows, pick[rows]] = False
        return keep & ~hide

    def fuse(
        self,
        encoded: EncodedBatch,
        drop: set[Modality | str] | list[Modality | str] | torch.Tensor | None = None,
        withhold: Iterable[Modality | str] | None = None,
    ) -> BackboneOutput:
        """The fusion transformer over encoded tokens (see :meth:`forward` for ``drop`` and ``withhold``)."""
        keep = encoded.present.clone()  # (B, M)
        B = keep.shape[0]
        for m in _modality_indices(withhold):
            keep[:, m] = False
        if isinstance(drop, torch.Tensor):
            if drop.shape != keep.shape:
                raise ConfigError(f"drop mask has shape {tuple(drop.shape)}, expected (B, M) = {tuple(keep.shape)}")
            keep &= ~drop.to(keep.device, torch.bool)
        elif drop is not None:
            for m in _modality_indices(drop):
                keep[:, m] = False
        elif self.training and self.config.modality_dropout > 0:
            keep = self._modality_dropout(keep)

        d = self.config.d_model
        tokens, ages, real, token_modality = encoded.flat()  # (B, T, D), (B, T), (B, T), (T,)
        token_mask = real & keep[:, token_modality]  # (B, T)
        # Gather each row's attended tokens first (cut after the longest row); embed only those.
        order, packed = _attended_first(token_mask)  # (B, L)
        x = self._embed(_gather_tokens(tokens, order), _gather_tokens(ages, order), token_modality[order])
        h = self._fuse_gathered(x, packed)  # (B, 1 + L, D)
        scatter_to = order[..., None].expand(-1, -1, d)
        tokens = h.new_zeros(tokens.shape).scatter(1, scatter_to, zero_where_not(h[:, 1:], packed))  # (B, T, D)
        by_modality = torch.zeros(B, M, d, device=h.device)
        used = torch.zeros(B, M, dtype=torch.bool, device=h.device)
        for m in token_modality.unique().tolist():
            columns = token_modality == m
            by_modality[:, m] = masked_mean(tokens[:, columns], token_mask[:, columns], dim=1)
            used[:, m] = token_mask[:, columns].any(dim=1)
        return BackboneOutput(
            pooled=h[:, 0],
            modality_embeddings=by_modality,
            modality_mask=used,
            encoder_embeddings=encoded.encoder_embeddings.float(),
            encoder_mask=encoded.present,
            tokens=tokens,
            token_mask=token_mask,
            token_modality=token_modality,
        )

    def _embed(self, tokens: torch.Tensor, ages: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """Tokens plus their modality's embedding (``owner``: modality index of each) and their time's."""
        kind = nn.functional.embedding(owner, self.modality_embedding)  # backward cheaper than indexing's
        return tokens + kind + self.time_embedding(ages)

    def _fuse_gathered(self, x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """The summary token and packed tokens ``(n, L, D)`` (attended where ``packed``) through the
        fusion transformer and final norm: ``(n, 1 + L, D)``, the summary first."""
        n = x.shape[0]
        x = torch.cat([self.summary.expand(n, -1, -1), zero_where_not(x, packed)], dim=1)
        attend = torch.cat([torch.ones(n, 1, dtype=torch.bool, device=packed.device), packed], dim=1)
        return self.norm(encoder_on_attended(self.fusion, x, attend)).float()

    def pooled_variants(
        self, encoded: EncodedBatch, rows: torch.Tensor, keep: torch.Tensor, max_rows: int = 256
    ) -> torch.Tensor:
        """The pooled summary of many (patient, kept modalities) variants of one encoded batch.

        Variant ``i`` is patient ``rows[i]`` with only the modalities ``keep[i]`` in the fusion: the
        same as ``fuse(encoded, drop=...).pooled[rows[i]]`` (up to float rounding), for a fraction of
        the work when many variants are needed (contributions withhold each present modality in turn).
        The token embeddings are made once; each variant's attended tokens are packed to the front
        (as in :meth:`fuse`), so padding and withheld tokens cost nothing.

        Args:
            encoded: what :meth:`encode` gave for ``B`` patients.
            rows: int64 ``(R,)`` the patient (batch row) of each variant.
            keep: bool ``(R, M)`` the modalities each variant lets into the fusion (absent ones
                stay out either way).
            max_rows: variants per fusion call (bounds memory).

        Returns:
            ``(R, D)`` float32 pooled summaries.

        Example:
            >>> encoded = backbone.encode(batch)  # doctest: +SKIP
            >>> rows = torch.arange(len(batch))  # doctest: +SKIP
            >>> backbone.pooled_variants(encoded, rows, encoded.present).shape  # doctest: +SKIP
            torch.Size([8, 64])
        """
        d = self.config.d_model
        tokens, ages, real, owner = encoded.flat()
        x_all = self._embed(tokens, ages, owner)  # (B, T, D): embedded once for every variant
        pooled = []
        for start in range(0, rows.shape[0], max_rows):
            r, k = rows[start : start + max_rows], keep[start : start + max_rows]  # (n,), (n, M)
            mask = real[r] & (k & encoded.present[r])[:, owner]  # (n, T)
            order, packed = _attended_first(mask)  # (n, L)
            pooled.append(self._fuse_gathered(_gather_tokens(x_all[r], order), packed)[:, 0])
        return torch.cat(pooled) if pooled else self.summary.new_zeros(0, d).float()

    def forward(
        self,
        batch: PatientBatch,
        drop: set[Modality | str] | list[Modality | str] | torch.Tensor | None = None,
        withhold: Iterable[Modality | str] | None = None,
    ) -> BackboneOutput:
        """Encode and fuse a batch.

        Args:
            batch: a :class:`~meddx.records.PatientBatch` (each modality packed over its patients).
            drop: modalities to hide for every patient (a set or list), or a bool ``(B, M)`` mask
                (True = hide); None hides at random in training (``modality_dropout``) and nothing in eval.
            withhold: modalities to leave out for every patient (inference ablations and
                contributions); combined with ``drop``.

        Returns:
            :class:`BackboneOutput`; float32 (under bf16 autocast on CUDA).
        """
        cuda = batch.present.is_cuda
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            if drop is None and self.training and self.config.modality_dropout > 0:
                drop = self._drop_before_encoding(batch, withhold)
                batch = batch.keeping(~drop | self._cached_modalities(drop.device))
            return self.fuse(self.encode(batch), drop=drop, withhold=withhold)

    def _drop_before_encoding(self, batch: PatientBatch, withhold: Iterable[Modality | str] | None) -> torch.Tensor:
        """Modality dropout drawn before encoding: bool ``(B, M)``, True where hidden.

        The encoders are most of a training step; drawn first, the hidden rows of an encoder with
        no cache need not run at all (the fusion would ignore their tokens). Encoders whose outputs
        are cached (a frozen text model or trunk) still see every row, so that their cache fills in
        the first epoch instead of over several.
        """
        keep = batch.present.clone()
        for m in _modality_indices(withhold):
            keep[:, m] = False
        return keep & ~self._modality_dropout(keep)

    def _cached_modalities(self, device: torch.device) -> torch.Tensor:
        """bool ``(M,)``: True for the modalities whose encoder caches its outputs."""
        return torch.tensor(
            [m.value in self.encoders and self.encoders[m.value].frozen for m in MODALITIES], device=device
        )

    # ----------------------------------------------------------- persistence

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``folder`` (see :mod:`meddx.models.checkpoint`)."""
        from meddx.models.checkpoint import save_backbone

        return save_backbone(self, folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path, cache_dir: str | Path | None = None) -> FoundationBackbone:
        """Load what :meth:`save_pretrained` wrote; refuses pickle, unknown formats and newer meddx majors.

        Raises:
            ModelError: the folder is missing a file, holds a pickle file, or was written by a format
                or meddx version this one does not understand; the message says what to do.
        """
        from meddx.models.checkpoint import load_backbone

        return load_backbone(cls, folder, cache_dir)

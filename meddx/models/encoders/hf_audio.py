"""A hospital's own Hugging Face audio model (AST, wav2vec2...) over the recording's waveform.

Set ``audio.hf_model`` in the backbone config to a local folder written by ``save_pretrained`` with
its feature extractor (``preprocessor_config.json``), and ``audio.keep_waveform: true`` in the ingest
config: these models read samples, not meddx's log-mel. How meddx adapts its tensors
(``docs/encoders.md``):

1. the ingest waveform: mono, resampled to ``audio.sample_rate`` (4 kHz by default), centre-cropped
   or zero-padded to ``audio.duration_s``;
2. resampled again to the feature extractor's ``sampling_rate`` (16 kHz for AST and wav2vec2) with
   torchaudio's windowed-sinc resampler. Upsampling adds no content above the ingest rate's Nyquist
   frequency (2 kHz at 4 kHz): read the audio at 16 kHz (``audio.sample_rate: 16000``) to give the
   model everything the recording holds;
3. the feature extractor itself computes the model's input, with its own saved settings: AST's
   128-bin Kaldi log-mel fbank, padded or cut to ``max_length`` frames and normalised with its mean
   and std; wav2vec2's zero-mean, unit-variance samples (``do_normalize``) with an attention mask;
4. the model's ``last_hidden_state`` ``(S, hidden)`` is cut into ``audio.hf_tokens`` contiguous runs,
   each averaged, then a LayerNorm and a linear projection to ``d_model`` (trained) plus a learned
   embedding of the run's place give the tokens.

Frozen (the default: ``frozen`` None) the model runs in eval mode without gradients, and its
outputs are cached by waveform bytes and weights' digest (:class:`meddx.models.frozen.FrozenOutputs`,
on disk with a cache folder): each recording is computed once across epochs and runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from meddx.errors import ConfigError
from meddx.models.config import BackboneConfig
from meddx.models.encoders.base import EncoderOutput, ModalityEncoder, find_arrays, find_one
from meddx.models.frozen import FrozenOutputs
from meddx.models.hf_folder import load_hf_model, load_hf_processor
from meddx.records import Modality
from meddx.specs import ArraySpec


class AudioTrunk(nn.Module):
    """Waveforms ``(N, S)`` at ``sample_rate`` → ``(N, tokens, hidden)``, through the model's own feature extractor."""

    def __init__(self, model: nn.Module, extractor: Any, sample_rate: int, tokens: int):
        super().__init__()
        self.model = model
        self.extractor = extractor
        self.sample_rate = int(sample_rate)
        self.target_rate = int(getattr(extractor, "sampling_rate", sample_rate))
        self.tokens = tokens
        # what decides the output besides the weights (keys frozen outputs): rates, runs, the extractor's settings
        self.settings = f"{self.sample_rate}:{self.target_rate}:{tokens}:{extractor.to_json_string()}"

    def features(self, waves: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's inputs: resampled to the extractor's rate, then the extractor's own computation."""
        if self.target_rate != self.sample_rate:
            from torchaudio.functional import resample

            waves = resample(waves, self.sample_rate, self.target_rate)
        batch = self.extractor(
            [w.numpy() for w in waves.detach().to("cpu", torch.float32)],
            sampling_rate=self.target_rate,
            return_tensors="pt",
        )
        return {k: v.to(waves.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        hidden = self.model(**self.features(waves.float())).last_hidden_state  # (N, S, H)
        return F.adaptive_avg_pool1d(hidden.transpose(1, 2), self.tokens).transpose(1, 2)  # (N, tokens, H)


class HfAudioEncoder(ModalityEncoder):
    """Waveform ``(P, S)`` → ``(P, hf_tokens, d_model)`` tokens (module docstring).

    Args:
        config: the backbone config (``config.audio``).
        spec: the audio array spec; it must hold the 1-D waveform (``audio.keep_waveform``).
        sample_rate: the waveform's rate (the ingest config's ``audio.sample_rate``).
        cache_dir: where frozen outputs persist (None: in memory only).
    """

    modality = Modality.AUDIO

    def __init__(self, config: BackboneConfig, spec: ArraySpec, sample_rate: int, cache_dir: str | Path | None = None):
        super().__init__(config, spec)
        cfg = config.audio
        assert cfg.hf_model is not None
        if not find_arrays(spec, "values", ndim=1):
            raise ConfigError(
                f"audio.hf_model {cfg.hf_model} reads the waveform, which the audio tensors do not hold; "
                "set audio.keep_waveform: true in the ingest config"
            )
        self.waveform = find_one(self.modality, spec, "values", ndim=1)
        log_mel = find_one(self.modality, spec, "values", ndim=2)
        self.frame_mask = find_one(self.modality, spec, "mask", of=log_mel)
        what = "audio.hf_model"
        model = load_hf_model(cfg.hf_model, what)
        self.trunk = AudioTrunk(model, load_hf_processor(cfg.hf_model, "audio", what), sample_rate, cfg.hf_tokens)
        self.trunk.eval()
        with torch.no_grad():  # one silent recording: the feature width; a model that cannot take it fails here
            try:
                hidden = self.trunk(torch.zeros(1, self.field(self.waveform).shape[0])).shape[-1]
            except (RuntimeError, ValueError) as exc:
                raise ConfigError(f"{what} {cfg.hf_model} does not run on the recordings: {str(exc)[:200]}") from None
        self.cache_dir = cache_dir
        self.trunk_outputs: FrozenOutputs | None = None
        if cfg.frozen is None or cfg.frozen:
            self.freeze()
        self.hidden = int(hidden)
        self.project = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, config.d_model))
        self.position = nn.Parameter(torch.zeros(1, cfg.hf_tokens, config.d_model))

    def freeze(self) -> HfAudioEncoder:
        """Stop training the audio model (the projection still trains); its outputs are cached from now on."""
        self.frozen = True
        self.trunk_outputs = FrozenOutputs(self.cache_dir)
        self.trunk.requires_grad_(False).eval()
        return self

    def train(self, mode: bool = True) -> HfAudioEncoder:
        super().train(mode)
        if self.frozen:
            self.trunk.eval()
        return self

    def forward(self, arrays: dict[str, torch.Tensor]) -> EncoderOutput:
        present = arrays[self.frame_mask].bool().any(dim=1)  # (P,): a recording with any real frame
        waves = arrays[self.waveform].float()  # (P, S)
        P, T = waves.shape[0], self.position.shape[1]
        hidden = None
        index = present.nonzero().flatten()
        if len(index):
            items = waves[index]
            out = self.trunk_outputs(self.trunk, items) if self.trunk_outputs is not None else self.trunk(items)
            hidden = out.new_zeros(P, *out.shape[1:])
            hidden[index] = out
        if hidden is None:
            hidden = waves.new_zeros(P, T, self.hidden)
        tokens = self.project(hidden.to(waves.dtype)) + self.position  # (P, T, D)
        mask = present.unsqueeze(1).expand(P, T)
        age = self.record_age_hours(arrays, tokens).expand(P, T)
        return EncoderOutput(tokens, mask, age)

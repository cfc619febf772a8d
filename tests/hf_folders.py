"""Tiny Hugging Face models built from their configs and saved to local folders (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path


def tiny_vit(folder: Path, *, image: int = 32, seed: int = 0) -> Path:
    """A 1-layer ViT (hidden 32, 8-pixel patches) and its image processor, saved with safetensors."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=image,
        patch_size=8,
    )
    ViTModel(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": image, "width": image}).save_pretrained(folder)
    return folder


def tiny_wav2vec2(folder: Path, *, seed: int = 0) -> Path:
    """A 1-layer wav2vec2 (two small convolutions, hidden 32) and its feature extractor at 16 kHz."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(seed)
    config = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(16, 16),
        conv_stride=(5, 4),
        conv_kernel=(10, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    Wav2Vec2Model(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True).save_pretrained(folder)
    return folder


def tiny_ast(folder: Path, *, seed: int = 0) -> Path:
    """A 1-layer Audio Spectrogram Transformer over 32 mel bins x 64 frames, with its feature extractor."""
    import torch
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    torch.manual_seed(seed)
    config = ASTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        num_mel_bins=32,
        max_length=64,
        patch_size=16,
        frequency_stride=16,
        time_stride=16,
    )
    ASTModel(config).save_pretrained(folder)
    ASTFeatureExtractor(num_mel_bins=32, max_length=64).save_pretrained(folder)
    return folder


def tiny_dinov2(folder: Path, *, seed: int = 0) -> Path:
    """A 1-layer DINOv2 over 28-pixel images and a processor like DINOv2's (shorter edge, bicubic, centre crop)."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=28, patch_size=7
    )
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 28, "width": 28},
        do_center_crop=True,
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    return folder


def tiny_clip_vision(folder: Path, *, seed: int = 0) -> Path:
    """A 1-layer CLIP vision tower over 28-pixel images and its CLIPImageProcessor (CLIP's mean and std)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=28, patch_size=7
    )
    CLIPVisionModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(folder)
    return folder

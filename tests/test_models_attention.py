"""The fusion's transformer layers on attended tokens only compute what nn.TransformerEncoder computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meddx.models.attention import encoder_on_attended


def _encoder(norm: bool = False) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, 0.0, activation="gelu", batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16) if norm else None, enable_nested_tensor=False)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("norm", [False, True])
def test_same_outputs_and_gradients_as_the_padded_encoder(training: bool, norm: bool) -> None:
    encoder = _encoder(norm).train(training)
    x = torch.randn(5, 7, 16)
    attend = torch.arange(7) < torch.tensor([7, 1, 3, 5, 2])[:, None]  # (5, 7), ragged rows
    expected_in, got_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = encoder(expected_in, src_key_padding_mask=~attend)
    got = encoder_on_attended(encoder, got_in, attend)
    assert torch.allclose(got[attend], expected[attend], atol=1e-5)
    assert (got[~attend] == 0).all()
    expected[attend].pow(2).sum().backward()
    reference = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    encoder.zero_grad()
    got[attend].pow(2).sum().backward()
    # out_proj.weight has no gradient in the padded encoder's path only if it were bypassed; both use it here.
    for name, parameter in encoder.named_parameters():
        assert torch.allclose(parameter.grad, reference[name], rtol=1e-4, atol=1e-5), name
    assert torch.allclose(got_in.grad, expected_in.grad, rtol=1e-4, atol=1e-5)


def test_padding_and_its_values_change_nothing() -> None:
    encoder = _encoder().eval()
    x = torch.randn(3, 6, 16)
    attend = torch.tensor([[True] * 6, [True, True, False, False, False, False], [True, False] * 3])
    noisy = torch.where(attend[..., None], x, torch.full_like(x, float("nan")))
    assert torch.equal(encoder_on_attended(encoder, x, attend), encoder_on_attended(encoder, noisy, attend))


def test_lora_on_the_attention_output_projection_takes_effect() -> None:
    from peft import LoraConfig, inject_adapter_in_model

    encoder = _encoder()
    model = nn.Module()
    model.fusion = encoder
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["fusion.layers.0.self_attn.out_proj"]), model)
    x, attend = torch.randn(2, 4, 16), torch.ones(2, 4, dtype=torch.bool)
    encoder_on_attended(encoder, x, attend).sum().backward()
    lora_b = encoder.layers[0].self_attn.out_proj.lora_B["default"].weight
    assert lora_b.grad is not None
    assert lora_b.grad.abs().sum() > 0

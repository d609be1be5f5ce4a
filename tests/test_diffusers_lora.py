"""LoRA / DoRA on Stable Diffusion's models, built tiny from configs: a diffusers UNet2DConditionModel
(attention and conv layers) and a transformers CLIP text encoder (attention, MLP and token embedding).
PEFT folders round-trip both ways with PEFT's outputs; merge is exact."""

from __future__ import annotations

import peft
import pytest
import torch
from tiny_models import VOCAB, tiny_clip_text, tiny_unet, unet_inputs

import loraloom as ll
from loraloom.adapters import adapter_layers
from loraloom.adapters.lora import LoraConv2d, LoraEmbedding

# Attention (Linear), the transformer's feed-forward, the 1x1 proj_in/out convs, resnet 3x3 convs and shortcut,
# the down/upsampler convs and the time-embedding projections.
UNET_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
    "conv1",
    "conv2",
    "conv_shortcut",
    "conv",
    "time_emb_proj",
]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "token_embedding"]


@torch.no_grad()
def unet_out(model) -> torch.Tensor:
    sample, t, text = unet_inputs()
    return model(sample, t, text).sample


def clip_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def clip_out(model) -> torch.Tensor:
    out = model(input_ids=clip_ids())
    return torch.cat([out.last_hidden_state.flatten(), out.pooler_output.flatten()])


MODELS = {"unet": (tiny_unet, unet_out, UNET_TARGETS), "clip": (tiny_clip_text, clip_out, CLIP_TARGETS)}


def peft_adapted(kind: str, use_dora: bool) -> peft.PeftModel:
    factory, _, targets = MODELS[kind]
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=targets, init_lora_weights=False, use_dora=use_dora)
    torch.manual_seed(123)
    pm = peft.get_peft_model(factory(), config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    return pm


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_sd_model_adapter_round_trips_with_peft(kind, use_dora, tmp_path):
    factory, run, _ = MODELS[kind]
    pm = peft_adapted(kind, use_dora)
    pm.save_pretrained(tmp_path / "peft")
    expected = run(pm)
    assert (expected - run(factory())).abs().max() > 1e-2

    model = ll.load_adapter(factory(), tmp_path / "peft", verbose=False)
    kinds = {type(layer) for _, layer in adapter_layers(model)}
    assert (LoraConv2d if kind == "unet" else LoraEmbedding) in kinds
    peft_to_ll = (run(model) - expected).abs().max().item()
    ll.save_adapter(model, tmp_path / "loraloom")
    back = peft.PeftModel.from_pretrained(factory(), tmp_path / "loraloom")
    ll_to_peft = (run(back) - expected).abs().max().item()
    print(f"{kind} {'DoRA' if use_dora else 'LoRA'}: PEFT->loraloom {peft_to_ll:.2e}, back to PEFT {ll_to_peft:.2e}")
    assert peft_to_ll <= 1e-5 and ll_to_peft <= 1e-5

    base = {name: layer.base_layer.weight.clone() for name, layer in adapter_layers(model)}
    ll.merge(model)
    torch.testing.assert_close(run(model), expected, atol=1e-5, rtol=0)
    ll.unmerge(model)
    # DoRA's unmerge divides by m/||W + s·B·A|| and subtracts the delta: rounding stays below 1e-5 here.
    for name, layer in adapter_layers(model):
        torch.testing.assert_close(layer.base_layer.weight, base[name], atol=1e-5 if use_dora else 1e-6, rtol=0)


@pytest.mark.parametrize("kind", list(MODELS))
def test_loraloom_sd_adapter_loads_in_peft(kind, tmp_path):
    factory, run, targets = MODELS[kind]
    torch.manual_seed(0)
    model = ll.add_adapter(
        factory(), ll.LoraConfig(r=4, target_modules=targets, init_lora_weights=False), verbose=False
    )
    ll.save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(factory(), tmp_path)
    diff = (run(pm) - run(model)).abs().max().item()
    print(f"{kind}: loraloom-made -> PEFT {diff:.2e}")
    assert diff <= 1e-5

"""LoRA (and DoRA) on nn.Conv2d and nn.Embedding: PEFT's layout and keys, parity both ways, exact merge."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import loraloom as ll
from loraloom.adapters import adapter_layers
from loraloom.adapters.lora import LoraConv2d, LoraEmbedding

TARGETS = ["emb", "conv", "pointwise", "strided", "head"]


class ConvEmbedNet(nn.Module):
    """Token ids on a grid -> embedding -> 3x3 conv -> 1x1 conv -> strided 3x3 conv -> linear head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.pointwise = nn.Conv2d(6, 5, 1, bias=False)
        self.strided = nn.Conv2d(5, 4, (3, 2), stride=2, padding=(1, 0))
        self.head = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        x = h.permute(0, 3, 1, 2)
        x = self.strided(torch.relu(self.pointwise(torch.relu(self.conv(x)))))
        out = self.head(x.permute(0, 2, 3, 1))
        return torch.cat([h.flatten(), x.flatten(), out.flatten()])


def ids() -> torch.Tensor:
    return torch.randint(0, 20, (2, 6, 6), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def run(model) -> torch.Tensor:
    return model(ids())


def perturb_magnitudes(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))


def peft_net(use_dora: bool) -> peft.PeftModel:
    torch.manual_seed(123)
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS, init_lora_weights=False, use_dora=use_dora)
    pm = peft.get_peft_model(ConvEmbedNet(), config)
    perturb_magnitudes(pm)
    return pm


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_conv_embedding_adapter_round_trips(use_dora, tmp_path):
    pm = peft_net(use_dora)
    pm.save_pretrained(tmp_path / "peft")
    expected = run(pm)
    assert (expected - run(ConvEmbedNet())).abs().max() > 1e-2

    model = ll.load_adapter(ConvEmbedNet(), tmp_path / "peft", verbose=False)
    layers = dict(adapter_layers(model))
    assert isinstance(layers["emb"], LoraEmbedding) and isinstance(layers["conv"], LoraConv2d)
    peft_to_ll = (run(model) - expected).abs().max().item()
    ll.save_adapter(model, tmp_path / "loraloom")
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("loraloom", "peft"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert "base_model.model.emb.lora_embedding_A" in ours and "base_model.model.strided.lora_B.weight" in ours
    back = peft.PeftModel.from_pretrained(ConvEmbedNet(), tmp_path / "loraloom")
    ll_to_peft = (run(back) - expected).abs().max().item()
    print(f"conv/embedding {'DoRA' if use_dora else 'LoRA'}: PEFT->loraloom {peft_to_ll:.2e}, back {ll_to_peft:.2e}")
    assert peft_to_ll <= 1e-5 and ll_to_peft <= 1e-5


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_loraloom_conv_embedding_adapter_loads_in_peft(use_dora, tmp_path):
    torch.manual_seed(0)
    config = ll.LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS, init_lora_weights=False, use_dora=use_dora)
    model = ll.add_adapter(ConvEmbedNet(), config, verbose=False)
    perturb_magnitudes(model)
    ll.save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(ConvEmbedNet(), tmp_path)
    diff = (run(pm) - run(model)).abs().max().item()
    print(f"conv/embedding {'DoRA' if use_dora else 'LoRA'}: loraloom-made -> PEFT {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_conv_embedding_merge_is_exact_and_matches_peft(use_dora, tmp_path):
    pm = peft_net(use_dora)
    pm.save_pretrained(tmp_path)
    model = ll.load_adapter(ConvEmbedNet(), tmp_path, verbose=False)
    base = {name: layer.base_layer.weight.clone() for name, layer in adapter_layers(model)}
    unmerged = run(model)
    ll.merge(model)
    torch.testing.assert_close(run(model), unmerged, atol=1e-5, rtol=0)
    pm.merge_adapter()
    for name, layer in adapter_layers(model):
        theirs = pm.base_model.model.get_submodule(name).base_layer.weight
        torch.testing.assert_close(layer.base_layer.weight, theirs, atol=1e-6, rtol=0)
    ll.unmerge(model)
    torch.testing.assert_close(run(model), unmerged, atol=1e-5, rtol=0)
    for name, layer in adapter_layers(model):
        torch.testing.assert_close(layer.base_layer.weight, base[name], atol=1e-6, rtol=0)
    plain = ll.merge_and_unload(model)
    assert isinstance(plain.conv, nn.Conv2d) and isinstance(plain.emb, nn.Embedding)
    torch.testing.assert_close(run(plain), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_conv_embedding_gradients_match_peft(use_dora, tmp_path):
    pm = peft_net(use_dora)
    pm.save_pretrained(tmp_path)
    model = ll.load_adapter(ConvEmbedNet(), tmp_path, verbose=False)
    grads = []
    for m in (pm, model):
        m.zero_grad()
        m(ids()).pow(2).mean().backward()
        grads.append(
            {
                n.removeprefix("base_model.model.").replace(".default", "").replace("vector.weight", "vector"): p.grad
                for n, p in m.named_parameters()
                if "lora_" in n
            }
        )
    theirs, ours = grads
    assert set(ours) == set(theirs) and len(ours) == 10 + 5 * use_dora
    for name, g in theirs.items():
        torch.testing.assert_close(ours[name], g, atol=1e-6, rtol=1e-4)


def test_new_conv_embedding_adapter_is_the_identity():
    expected = run(ConvEmbedNet())
    for init in (True, "gaussian", "zeros"):
        for use_dora in (False, True):
            config = ll.LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=init, use_dora=use_dora)
            model = ll.add_adapter(ConvEmbedNet(), config, verbose=False)
            torch.testing.assert_close(run(model), expected, atol=1e-6, rtol=0)
    layers = dict(adapter_layers(ll.add_adapter(ConvEmbedNet(), ll.LoraConfig(r=2, target_modules=TARGETS))))
    # PEFT's init: conv A kaiming-uniform, B zero; embedding A zero, B normal.
    assert layers["conv"].lora_A.weight.abs().max() > 0 and layers["conv"].lora_B.weight.abs().max() == 0
    assert layers["emb"].lora_embedding_A.abs().max() == 0 and layers["emb"].lora_embedding_B.abs().max() > 0
    assert layers["strided"].lora_A.weight.shape == (2, 5, 3, 2) and layers["strided"].lora_B.weight.shape == (
        4,
        2,
        1,
        1,
    )


def test_unsupported_conv_and_embedding_are_refused_by_layer():
    net = ConvEmbedNet()
    net.conv = nn.Conv2d(8, 6, 3, padding=1, groups=2)
    with pytest.raises(ll.AdapterError, match=r"layer 'conv'.*groups=2"):
        ll.add_adapter(net, ll.LoraConfig(target_modules=["conv"]))
    net = ConvEmbedNet()
    net.emb = nn.Embedding(20, 8, max_norm=1.0)
    with pytest.raises(ll.AdapterError, match=r"layer 'emb'.*max_norm"):
        ll.add_adapter(net, ll.LoraConfig(target_modules=["emb"]))
    net = nn.Sequential(nn.Conv3d(2, 2, 1))
    with pytest.raises(ll.AdapterError, match=r"'0' is a Conv3d; only Linear, Conv1D, Conv2d, Embedding"):
        ll.add_adapter(net, ll.LoraConfig(target_modules=["0"]))
    # Other adapter types still take linear layers only.
    with pytest.raises(ll.AdapterError, match=r"'conv' is a Conv2d; only Linear, Conv1D can be adapted"):
        ll.add_adapter(ConvEmbedNet(), ll.IA3Config(target_modules=["conv"], feedforward_modules=[]))

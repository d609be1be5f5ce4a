"""PEFT as the oracle for the adapter tests: build a PEFT model, compare what two models compute."""

from __future__ import annotations

import peft
import torch
from tiny_models import FACTORIES, model_inputs

import loraloom as ll


def peft_model(arch: str, config: peft.PeftConfig, seed: int = 123) -> peft.PeftModel:
    torch.manual_seed(seed)  # the adapter's random init
    return peft.get_peft_model(FACTORIES[arch](), config)


@torch.no_grad()
def features(model, arch: str) -> torch.Tensor:
    """Logits and last hidden state: BERT's fresh classifier head alone would hide what the adapter does."""
    out = model(**model_inputs(arch), output_hidden_states=True)
    hidden = out.decoder_hidden_states if arch == "t5" else out.hidden_states
    return torch.cat([out.logits.flatten(), hidden[-1].flatten()])


def assert_peft_round_trip(arch: str, config: peft.PeftConfig, tmp_path, atol: float = 1e-5):
    """A PEFT folder loads in loraloom with PEFT's outputs, and loraloom's save loads back in PEFT the same.

    Returns the loraloom model.
    """
    pm = peft_model(arch, config)
    pm.save_pretrained(tmp_path / "peft")
    expected = features(pm, arch)
    assert (expected - features(FACTORIES[arch](), arch)).abs().max() > 1e-2  # the adapter matters

    model = ll.load_adapter(FACTORIES[arch](), tmp_path / "peft", verbose=False)
    torch.testing.assert_close(features(model, arch), expected, atol=atol, rtol=0)
    ll.save_adapter(model, tmp_path / "loraloom")
    back = peft.PeftModel.from_pretrained(FACTORIES[arch](), tmp_path / "loraloom")
    torch.testing.assert_close(features(back, arch), expected, atol=atol, rtol=0)
    return model


def adapter_grads(model, arch: str, suffix: str) -> dict[str, torch.Tensor]:
    """Gradients of the parameters named ``...<suffix>``, keyed by module path (PEFT's prefix and adapter name
    stripped). Eval mode: no dropout, so two models see the same function."""
    model.eval().zero_grad()
    model(**model_inputs(arch)).logits.pow(2).mean().backward()
    grads = {}
    for name, p in model.named_parameters():
        path = name.removeprefix("base_model.model.").removesuffix(".default")
        if path.endswith(suffix):
            grads[path] = p.grad
    return grads

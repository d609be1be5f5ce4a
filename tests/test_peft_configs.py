"""One table of PEFT LoraConfig cases through shared checks (round trip both ways, merge = unmerged, unmerge
restores), one table of refused fields (named with the file), and the field inventory against the installed
PEFT: every field of PEFT's LoraConfig / IA3Config / FourierFTConfig is honoured or refused by name."""

from __future__ import annotations

import dataclasses
import json

import peft
import pytest
import torch
from peft_parity import features
from safetensors.torch import load_file
from tiny_models import FACTORIES

import loraloom as ll
from loraloom.adapters.base import PEFT_METADATA_FIELDS
from loraloom.adapters.inject import adapter_layers
from loraloom.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME

# ---- the field inventory ---------------------------------------------------------------------

PEFT_CLASSES = {"LORA": peft.LoraConfig, "IA3": peft.IA3Config, "FOURIERFT": peft.FourierFTConfig}


@pytest.mark.parametrize("peft_type", sorted(PEFT_CLASSES))
def test_every_peft_field_is_honoured_or_refused(peft_type):
    ours = ll.adapters.ADAPTER_TYPES[peft_type]
    honoured = {f.name for f in dataclasses.fields(ours)} | {"peft_type"}
    accounted = honoured | set(ours.refused_fields) | set(ours.ignored_fields) | set(PEFT_METADATA_FIELDS)
    theirs = {f.name for f in dataclasses.fields(PEFT_CLASSES[peft_type])}
    assert theirs - accounted == set(), f"PEFT {peft_type} fields loraloom neither honours nor refuses"
    # the lists hold no stale names either (old PEFT's enable_lora / merge_weights are the known extras)
    stale = (set(ours.refused_fields) | set(ours.ignored_fields)) - theirs - {"enable_lora", "merge_weights"}
    assert stale == set()


# ---- shared checks ---------------------------------------------------------------------------


def perturb_(model: torch.nn.Module, seed: int = 7) -> None:
    """Stand-in for training: move every adapter parameter (and trained bias) off its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def peft_folder(arch: str, kwargs: dict, folder) -> torch.Tensor:
    """A PEFT adapter made with ``kwargs``, moved off its init, saved; returns its features."""
    torch.manual_seed(123)
    pm = peft.get_peft_model(FACTORIES[arch](), peft.LoraConfig(**kwargs))
    perturb_(pm)
    pm.save_pretrained(folder)
    return features(pm.eval(), arch)  # get_peft_model leaves the model in training mode (dropout on)


def check_round_trip(arch: str, folder, expected: torch.Tensor, tmp_path) -> torch.nn.Module:
    """PEFT folder -> loraloom (same outputs) -> loraloom folder -> PEFT (same outputs)."""
    model = ll.load_adapter(FACTORIES[arch](), folder, verbose=False)
    torch.testing.assert_close(features(model, arch), expected, atol=1e-5, rtol=0)
    ll.save_adapter(model, tmp_path / "loraloom")
    # the same keys, but PEFT's frozen copy of a modules_to_save bias (bias="all"), which loraloom does not keep
    theirs = {k for k in load_file(folder / WEIGHTS_NAME) if ".original_module." not in k}
    assert load_file(tmp_path / "loraloom" / WEIGHTS_NAME).keys() == theirs
    back = peft.PeftModel.from_pretrained(FACTORIES[arch](), tmp_path / "loraloom")
    torch.testing.assert_close(features(back, arch), expected, atol=1e-5, rtol=0)
    return model


def check_merge_unmerge(model: torch.nn.Module, arch: str) -> None:
    """merge = unmerged outputs; unmerge restores the weights and the outputs."""
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = features(model, arch)
    ll.merge(model)
    torch.testing.assert_close(features(model, arch), unmerged, atol=1e-5, rtol=0)
    ll.unmerge(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=0)
    torch.testing.assert_close(features(model, arch), unmerged, atol=1e-5, rtol=0)


def adapted(model) -> list[str]:
    return [name for name, _ in adapter_layers(model)]


# ---- the case table: (id, arch, PEFT LoraConfig kwargs, layers loraloom must adapt (None: PEFT's)) ----

CASES = [
    ("layers_to_transform+pattern", "t5", dict(target_modules=["q", "v"], layers_to_transform=[1], layers_pattern="block")),
    ("layers_to_transform-int", "llama", dict(target_modules=["q_proj", "o_proj"], layers_to_transform=0)),
    ("exclude_modules-list", "llama", dict(target_modules=["q_proj", "v_proj", "k_proj"], exclude_modules=["k_proj"])),
    ("exclude_modules-regex", "llama", dict(target_modules=["q_proj", "down_proj"], exclude_modules=r".*layers\.0\..*")),
    ("target-regex", "llama", dict(target_modules=r"model\.layers\.\d+\.self_attn\.(q|k)_proj")),
    ("all-linear-llama", "llama", dict(target_modules="all-linear")),
    ("all-linear-gpt2", "gpt2", dict(target_modules="all-linear", fan_in_fan_out=True)),
    ("all-linear-bert-seqcls-bias-all", "bert", dict(task_type="SEQ_CLS", target_modules="all-linear", bias="all")),
    ("bias-lora_only+lora_bias", "bert", dict(task_type="SEQ_CLS", bias="lora_only", lora_bias=True)),
    ("rank+alpha-pattern+rslora", "llama", dict(rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3}, use_rslora=True)),
    ("modules_to_save", "llama", dict(modules_to_save=["model.norm"], lora_dropout=0.1)),
    ("init-gaussian-t5", "t5", dict(init_lora_weights="gaussian")),
    ("init-pissa", "llama", dict(init_lora_weights="pissa", target_modules=["q_proj", "o_proj"])),
    ("init-pissa-gpt2", "gpt2", dict(init_lora_weights="pissa")),
    ("init-olora", "t5", dict(init_lora_weights="olora", r=4, lora_alpha=8)),
    ("init-orthogonal", "llama", dict(init_lora_weights="orthogonal", r=4)),
    ("init-eva-on-load", "llama", dict(init_lora_weights="eva")),
    ("init-mica-on-load", "llama", dict(init_lora_weights="mica")),
    ("init-lora_ga-on-load", "llama", dict(init_lora_weights="lora_ga")),
]  # fmt: skip


@pytest.mark.parametrize("arch, kwargs", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_peft_config_case(arch, kwargs, tmp_path):
    expected = peft_folder(arch, kwargs, tmp_path / "peft")
    model = check_round_trip(arch, tmp_path / "peft", expected, tmp_path)
    # The same layers as PEFT, by PEFT's rules.
    torch.manual_seed(123)
    pm = peft.get_peft_model(FACTORIES[arch](), peft.LoraConfig(**kwargs))
    theirs = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A"))
    assert sorted(adapted(model)) == theirs
    if kwargs.get("init_lora_weights") in ("pissa", "olora"):
        assert (features(model, arch) - features(FACTORIES[arch](), arch)).abs().max() > 1e-3  # trained: differs
    check_merge_unmerge(model, arch)


OTHER_TYPES = [
    ("fourierft-layers+exclude+bias", "llama", lambda: peft.FourierFTConfig(
        n_frequency=64, target_modules=["q_proj", "v_proj", "o_proj"], exclude_modules=["o_proj"],
        layers_to_transform=[1], layers_pattern="layers", bias="fourier_only")),
    ("fourierft-bias-all-gpt2", "gpt2", lambda: peft.FourierFTConfig(n_frequency=64, bias="all")),
    ("ia3-exclude-regex", "t5", lambda: peft.IA3Config(exclude_modules=r"decoder\..*")),
]  # fmt: skip


@pytest.mark.parametrize("arch, make", [c[1:] for c in OTHER_TYPES], ids=[c[0] for c in OTHER_TYPES])
def test_other_adapter_types_share_the_field_rules(arch, make, tmp_path):
    torch.manual_seed(123)
    pm = peft.get_peft_model(FACTORIES[arch](), make())
    perturb_(pm)
    pm.save_pretrained(tmp_path / "peft")
    model = check_round_trip(arch, tmp_path / "peft", features(pm.eval(), arch), tmp_path)
    theirs = sorted(
        n.removeprefix("base_model.model.")
        for n, m in pm.named_modules()
        if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)
    )
    assert sorted(adapted(model)) == theirs
    check_merge_unmerge(model, arch)


def test_layer_selection_is_what_the_fields_say(tmp_path):
    """Spelled out for two cases: layers_to_transform with its pattern, and exclude_modules."""
    model = ll.add_adapter(
        FACTORIES["t5"](),
        ll.LoraConfig(target_modules=["q"], layers_to_transform=[1], layers_pattern="block"),
        verbose=False,
    )
    assert adapted(model) == [
        "encoder.block.1.layer.0.SelfAttention.q",
        "decoder.block.1.layer.0.SelfAttention.q",
        "decoder.block.1.layer.1.EncDecAttention.q",
    ]
    model = ll.add_adapter(
        FACTORIES["llama"](),
        ll.LoraConfig(target_modules=["q_proj", "k_proj"], exclude_modules=["k_proj"]),
        verbose=False,
    )
    assert all(name.endswith("q_proj") for name in adapted(model)) and len(adapted(model)) == 2


# ---- new adapters initialised as PEFT defines them -------------------------------------------


@pytest.mark.parametrize("init, arch", [("pissa", "llama"), ("olora", "llama"), ("pissa", "gpt2")])
def test_new_adapter_init_matches_peft(init, arch, tmp_path):
    kwargs = dict(init_lora_weights=init, r=4, lora_alpha=8)
    pm = peft.get_peft_model(FACTORIES[arch](), peft.LoraConfig(**kwargs))
    model = ll.add_adapter(FACTORIES[arch](), ll.LoraConfig(**kwargs), verbose=False)
    ours = {k: v for k, v in model.state_dict().items()}
    for key, theirs in pm.state_dict().items():
        key = key.removeprefix("base_model.model.").replace(".default", "")
        torch.testing.assert_close(ours[key], theirs, atol=1e-5, rtol=1e-4)  # A, B and the residual base
    # Untrained, the model computes what the base did (the residual plus s·B·A is W again).
    torch.testing.assert_close(features(model, arch), features(FACTORIES[arch](), arch), atol=1e-4, rtol=0)
    # Trained and saved by loraloom, it loads in PEFT on the original base (PEFT re-derives the residual).
    perturb_(model)
    assert json.loads((ll.save_adapter(model, tmp_path / "a") / CONFIG_NAME).read_text())["init_lora_weights"] == init
    back = peft.PeftModel.from_pretrained(FACTORIES[arch](), tmp_path / "a")
    torch.testing.assert_close(features(back, arch), features(model, arch), atol=1e-5, rtol=0)


def test_load_only_init_is_refused_for_a_new_adapter():
    with pytest.raises(ll.AdapterError, match="init_lora_weights='eva'.*loading"):
        ll.add_adapter(FACTORIES["llama"](), ll.LoraConfig(init_lora_weights="eva"), verbose=False)


# ---- refused fields: one clear error naming the field and the file, before any weight is touched ----

REFUSED = [
    ("megatron_config", {"tensor_model_parallel_size": 2}),
    ("trainable_token_indices", [1, 2]),
    ("use_qalora", True),
    ("alora_invocation_tokens", [5, 6]),
    ("monteclora_config", {"num_samples": 2}),
    ("layer_replication", [[0, 2]]),
    ("target_parameters", ["mlp.experts.down_proj"]),
    ("use_bdlora", {"nblocks": 2}),
    ("arrow_config", {"top_k": 2}),
    ("kasa_config", {"beta": 0.1}),
    ("ensure_weight_tying", True),
    ("enable_lora", [True, False, True]),
    ("peft_type", "LOHA"),
    ("init_lora_weights", "spectral"),
    ("bias", "some"),
]


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refused") / "adapter"
    model = ll.add_adapter(FACTORIES["llama"](), ll.LoraConfig(r=2, init_lora_weights=False), verbose=False)
    ll.save_adapter(model, folder)
    return folder


@pytest.mark.parametrize("field, value", REFUSED, ids=[f for f, _ in REFUSED])
def test_refused_field_is_named_with_the_file(saved_adapter, field, value, tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / WEIGHTS_NAME).write_bytes((saved_adapter / WEIGHTS_NAME).read_bytes())
    config = json.loads((saved_adapter / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**config, field: value}))
    base = FACTORIES["llama"]()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ll.AdapterError, match=rf"{CONFIG_NAME}.*{field}") as e:
        ll.load_adapter(base, folder)
    assert "\n" not in str(e.value)
    assert not hasattr(base, "loraloom_config")
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


@pytest.mark.parametrize("field, off", [("megatron_config", None), ("use_qalora", False), ("target_parameters", [])])
def test_refused_field_at_its_off_value_loads(saved_adapter, field, off, tmp_path):
    """PEFT writes every field; at PEFT's "off" value a refused feature is simply not used."""
    config = json.loads((saved_adapter / CONFIG_NAME).read_text())
    (saved_adapter / CONFIG_NAME).write_text(json.dumps({**config, field: off}))
    ll.load_adapter(FACTORIES["llama"](), saved_adapter, verbose=False)


def test_olora_on_conv1d_is_refused_before_any_change(saved_adapter, tmp_path):
    """OLoRA factors a linear weight; on GPT-2's Conv1D it is refused, naming the layer, base untouched."""
    model = ll.add_adapter(FACTORIES["gpt2"](), ll.LoraConfig(r=2, init_lora_weights=False), verbose=False)
    folder = ll.save_adapter(model, tmp_path / "a")
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "init_lora_weights": "olora"}))
    base = FACTORIES["gpt2"]()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ll.AdapterError, match=r"c_attn.*'olora' is not supported on Conv1D"):
        ll.load_adapter(base, folder)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    with pytest.raises(ll.AdapterError, match="olora"):
        ll.add_adapter(FACTORIES["gpt2"](), ll.LoraConfig(init_lora_weights="olora"), verbose=False)

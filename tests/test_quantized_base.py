"""A weight-only int8 frozen base (``quantize.Int8Weight``) with adapters on top: trained, saved, loaded, composed;
equal to PEFT on the same quantized base; merging refused by name, as are adapters that need the base weight's values.
"""

from __future__ import annotations

import pytest
import torch
from hub_modules import EXAMPLES, make_modules, tokenizer
from tiny_models import logits, model_inputs, tiny_llama, tiny_word_tokenizer

import loraloom as ll
from loraloom import quantize
from loraloom.adapters.base import is_quantized
from loraloom.cli import main
from loraloom.models import load_base
from loraloom.quantize import Int8Weight

X = model_inputs("llama")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(folder)
    tiny_word_tokenizer(["a b c"]).save_pretrained(folder)
    return folder


def int8(base):
    return load_base(base, quantize="int8")[0]


def test_linear_and_embedding_weights_are_int8_and_outputs_stay_close(base):
    model, full = int8(base), load_base(base)[0]
    for weight in (
        model.model.layers[0].self_attn.q_proj.weight,
        model.model.embed_tokens.weight,
        model.lm_head.weight,
    ):
        assert is_quantized(weight) and weight.data.qdata.dtype == torch.int8 and weight.dtype == torch.float32
    assert not is_quantized(model.model.norm.weight)
    diff = (logits(model, X) - logits(full, X)).abs().max()
    assert 0 < diff < 0.05


def test_lora_on_int8_equals_peft_on_the_same_base_and_trains(base, tmp_path):
    import peft

    torch.manual_seed(0)
    model = ll.add_adapter(int8(base), ll.LoraConfig(r=4, init_lora_weights=False), verbose=False)
    ll.save_adapter(model, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(int8(base), str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(model, X), logits(theirs, X), atol=1e-5, rtol=0)
    ours = ll.load_adapter(int8(base), tmp_path / "adapter", verbose=False)
    torch.testing.assert_close(logits(ours, X), logits(model, X), atol=0, rtol=0)

    data = [{"input": "a b", "target": "c"}] * 8
    result = ll.train(model, tiny_word_tokenizer(["a b c"]), data, None, max_steps=6, lr=1e-2, progress=False)
    assert result.losses[-1] < result.losses[0]
    assert is_quantized(model.model.layers[0].self_attn.q_proj.base_layer.weight)  # the base stayed int8


def test_merging_into_an_int8_base_is_refused_by_layer(base):
    model = ll.add_adapter(int8(base), ll.LoraConfig(r=4, init_lora_weights=False), verbose=False)
    before = logits(model, X)
    with pytest.raises(ll.AdapterError, match=r"layer 'model.layers.0.self_attn.q_proj': the base weight is quantized"):
        ll.merge_and_unload(model)
    torch.testing.assert_close(logits(model, X), before, atol=0, rtol=0)  # nothing half-merged


@pytest.mark.parametrize(
    ("config", "needs"),
    [(ll.LoraConfig(r=4, use_dora=True), "use_dora"), (ll.FourierFTConfig(n_frequency=8), "FourierFT")],
    ids=["dora", "fourierft"],
)
def test_adapters_that_read_the_base_weight_are_refused(base, config, needs):
    with pytest.raises(ll.AdapterError, match=rf"{needs} needs the base weight in full precision"):
        ll.add_adapter(int8(base), config, verbose=False)


def test_int4_on_the_cpu_is_a_clear_error(base):
    with pytest.raises(ValueError, match="int4 needs a CUDA device"):
        load_base(base, quantize="int4", device="cpu")


def test_lorahub_on_an_int8_base(base, tmp_path):
    model = int8(base)
    modules = make_modules(tiny_llama(), tmp_path, 3, targets=["q_proj", "v_proj"])
    tok = tokenizer(add_eos=False)
    result = ll.lorahub(model, modules, EXAMPLES, tokenizer=tok, budget=8)
    full = ll.lorahub(load_base(base)[0], modules, EXAMPLES, tokenizer=tok, budget=8)
    assert result.objective == pytest.approx(full.objective, rel=0.02)
    with pytest.raises(ll.AdapterError, match="the base weight is quantized"):
        result.merge()


def test_cli_train_and_merge_with_quantize(base, tmp_path, capsys):
    (tmp_path / "data.jsonl").write_text('{"input": "a b", "target": "c"}\n' * 4)
    argv = ["train", "--base", str(base), "--train", str(tmp_path / "data.jsonl"), "--max-steps", "2"]
    assert main([*argv, "--quantize", "int8", "--out", str(tmp_path / "adapter")]) == 0
    assert ll.read_adapter(tmp_path / "adapter")[0].peft_type == "LORA"
    capsys.readouterr()
    argv = ["merge", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "m")]
    assert main([*argv, "--quantize", "int8"]) == 2
    assert "the base weight is quantized" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_served_rows_on_an_int8_base_equal_the_adapter_loaded_alone(base, tmp_path):
    from loraloom.serve.cache import AdapterCache
    from loraloom.serve.engine import Engine, Request, SamplingParams

    torch.manual_seed(0)
    ll.save_adapter(
        ll.add_adapter(int8(base), ll.LoraConfig(r=4, init_lora_weights=False), verbose=False), tmp_path / "a"
    )
    engine = Engine(int8(base), tiny_word_tokenizer(["a b c"]), max_batch=4)
    prompt = [5, 6, 7, 8]
    params = SamplingParams(max_tokens=4, temperature=0)
    rows = [Request(prompt, AdapterCache(tmp_path).get("a"), params), Request(prompt, None, params)]
    engine.generate(rows)
    for row, model in zip(rows, (ll.load_adapter(int8(base), tmp_path / "a", verbose=False), int8(base)), strict=True):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0)
        assert row.output_ids == out[0, len(prompt) :].tolist()


def test_a_tied_lm_head_is_quantized_once_and_stays_tied_while_other_weights_stay_intact(tmp_path):
    from transformers import LlamaForCausalLM

    config = tiny_llama().config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tiny_word_tokenizer(["a b c"]).save_pretrained(tmp_path)
    full, model = load_base(tmp_path)[0], load_base(tmp_path, quantize="int8")[0]
    assert model.lm_head.weight is model.model.embed_tokens.weight and is_quantized(model.lm_head.weight)
    for (name, p), q in zip(full.named_parameters(), model.parameters(), strict=True):
        if not is_quantized(q):  # every float weight left is the checkpoint's, byte for byte
            assert torch.equal(p, q), name
    assert (logits(model, X) - logits(full, X)).abs().max() < 0.05


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 3 rows of 16: the block-wise paths split a weight into several blocks and a remainder."""
    monkeypatch.setattr(quantize, "BLOCK", 48)


def test_int8_rows_round_to_within_half_a_step(small_blocks):
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    q = Int8Weight.from_float(w)
    step = w.abs().amax(1, keepdim=True) / 127
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-7).all()
    assert q.qdata.abs().max() == 127


def test_the_int8_linear_and_its_backward_equal_autograd_through_the_dequantized_weight(small_blocks):
    torch.manual_seed(0)
    layer = quantize.quantize_model(torch.nn.Sequential(torch.nn.Linear(16, 8)))[0]
    assert isinstance(layer.weight, Int8Weight) and not layer.weight.requires_grad
    layer.bias.requires_grad_(True)  # bias="all" trains the biases of a frozen base
    x = torch.randn(3, 5, 16, requires_grad=True)
    layer(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, layer.weight.dequantize(), bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.bias.grad, bias.grad)


def test_the_int8_embedding_looks_up_the_dequantized_rows(small_blocks):
    torch.manual_seed(0)
    table = quantize.quantize_model(torch.nn.Embedding(10, 16, padding_idx=0))
    ids = torch.tensor([[0, 3, 9], [9, 9, 1]])
    torch.testing.assert_close(table(ids), table.weight.dequantize()[ids], atol=0, rtol=0)
    with pytest.raises(ValueError, match="max_norm"):  # it would rescale the table's rows in place
        torch.nn.functional.embedding(ids, table.weight, max_norm=1.0)


def test_bf16_autocast_and_a_bf16_move_compute_in_bf16():
    torch.manual_seed(0)
    layer = quantize.quantize_model(torch.nn.Linear(16, 8))
    x = torch.randn(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), atol=0.05, rtol=0.02)
    layer.to(torch.bfloat16)
    assert isinstance(layer.weight, Int8Weight) and layer.weight.dtype == torch.bfloat16
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_writing_into_an_int8_weight_is_refused():
    layer = quantize.quantize_model(torch.nn.Linear(4, 4))
    with pytest.raises(RuntimeError, match="frozen"):
        layer.weight.data.add_(1.0)


def test_int8_needs_no_torchao(base):
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torchao'] = None\n"  # as if not installed: importing it raises, find_spec is None
        "from loraloom.models import load_base\n"
        f"model = load_base({str(base)!r}, quantize='int8')[0]\n"
        "assert type(model.lm_head.weight).__name__ == 'Int8Weight'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)

"""loraloom.train: one trainer for seq2seq, causal and classification models, for every adapter type."""

from __future__ import annotations

import sys

import pytest
import torch
from tiny_models import tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5, tiny_word_tokenizer
from torch import nn
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import loraloom as ll
from loraloom.adapters import ADAPTER_TYPES, AdapterError
from loraloom.data import DataError
from loraloom.evaluate import evaluate
from loraloom.train import lr_factor, train

# A task no base model can know: map each of 8 words to a fixed other word (a permutation).
N = 8
SOURCES = [f"a{i}" for i in range(N)]
TARGETS = [f"b{i}" for i in range(N)]
MAPPING = [{"input": f"map {SOURCES[i]}", "target": TARGETS[3 * i % N]} for i in range(N)]
WORDS = [*SOURCES, *TARGETS, "map"]
CLASSES = ["neg", "neu", "pos"]
# Sequence classification: the class is the first word's index mod 3, whatever the second word.
CLS_DATA = [{"input": f"{SOURCES[i]} {SOURCES[j]}", "target": CLASSES[i % 3]} for i in range(N) for j in range(3)]

T5_ALL = ["q", "k", "v", "o", "wi", "wo"]
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_ALL = ["query", "key", "value", "dense"]


def no_dropout(model: nn.Module) -> nn.Module:
    """Tiny models learn a toy task in a few dozen steps only without dropout noise."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def t5_tokenizer():
    return tiny_word_tokenizer(WORDS, add_eos=True)  # T5's convention: every encoding ends with eos


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def lora(targets: list[str], r: int = 8) -> ll.LoraConfig:
    return ll.LoraConfig(r=r, lora_alpha=r, target_modules=targets)


# ---- learning ----------------------------------------------------------------------------------


def test_seq2seq_lora_learns_the_mapping_and_saves_a_loadable_adapter(tmp_path):
    tok = t5_tokenizer()
    model = no_dropout(tiny_t5())
    base_weight = model.encoder.block[0].layer[0].SelfAttention.q.weight.detach().clone()
    assert evaluate(model, tok, MAPPING, progress=False).score <= 0.25

    res = train(
        model,
        tok,
        MAPPING * 4,
        adapter=lora(T5_ALL),
        lr=1e-2,
        epochs=20,
        batch_size=8,
        eval_data=MAPPING,
        eval_every=40,
        output_dir=tmp_path / "adapter",
        progress=False,
    )
    assert len(res.losses) == 80  # 32 examples / 8 per batch x 20 epochs
    assert mean(res.losses[-5:]) < 0.3 * mean(res.losses[:5])
    assert [step for step, _ in res.evals] == [40, 80]
    assert res.evals[-1][1] >= 7 / 8
    assert not model.training
    assert res.trainable_params == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert res.total_params == sum(p.numel() for p in model.parameters())
    # the frozen base did not move
    assert torch.equal(model.encoder.block[0].layer[0].SelfAttention.q.base_layer.weight, base_weight)

    reloaded = ll.load_adapter(tiny_t5(), res.output_dir, verbose=False)
    inputs = tok(["map a1", "map a5"], return_tensors="pt")
    labels = tok(["b3", "b7"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(**inputs, labels=labels).logits, reloaded(**inputs, labels=labels).logits)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_lm_learns_the_target_only(arch):
    tok = tiny_word_tokenizer(WORDS, add_bos=arch == "llama")  # Llama's tokenizer adds bos, GPT-2's does not
    model = no_dropout(tiny_llama() if arch == "llama" else tiny_gpt2())
    # The tiny models' std-0.02 output layer gives nearly flat logits (loss >= ~4.2 whatever the hidden
    # state); a final norm scaled x20 makes sharp predictions, hence a falling loss, reachable.
    final_norm = model.model.norm if arch == "llama" else model.transformer.ln_f
    with torch.no_grad():
        final_norm.weight.mul_(20.0)
    targets = LLAMA_ALL if arch == "llama" else ["c_attn", "c_proj", "c_fc"]
    assert evaluate(model, tok, MAPPING, max_new_tokens=3, progress=False).score <= 0.25

    res = train(model, tok, MAPPING * 4, adapter=lora(targets), lr=1e-2, epochs=20, progress=False)
    assert mean(res.losses[-5:]) < 0.1 * mean(res.losses[:5])
    result = evaluate(model, tok, MAPPING, max_new_tokens=3, progress=False)
    assert result.score >= 7 / 8, result.predictions


def test_classification_trains_adapter_and_head(tmp_path):
    tok = tiny_word_tokenizer(SOURCES)
    model = no_dropout(tiny_bert_cls(num_labels=3))
    res = train(
        model,
        tok,
        CLS_DATA,
        adapter=lora(BERT_ALL),
        lr=1e-2,
        epochs=10,
        batch_size=9,
        eval_data=CLS_DATA,
        output_dir=tmp_path / "cls",
        progress=False,
    )
    assert res.task == "classification"
    assert res.label2id == {"neg": 0, "neu": 1, "pos": 2}
    assert model.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert mean(res.losses[-3:]) < 0.2 * mean(res.losses[:3])
    assert res.evals == [(30, 1.0)]  # evaluated once, at the end
    # the classifier head trained beside the adapter and travels with it
    reloaded = ll.load_adapter(no_dropout(tiny_bert_cls(num_labels=3)), tmp_path / "cls", verbose=False)
    assert evaluate(reloaded, tok, CLS_DATA, label2id=res.label2id, progress=False).score == 1.0


def test_full_fine_tuning_saves_a_transformers_folder(tmp_path):
    tok = t5_tokenizer()
    model = no_dropout(tiny_t5())
    out = tmp_path / "full"
    res = train(model, tok, MAPPING, adapter="full", lr=1e-2, epochs=3, output_dir=out, progress=False)
    assert res.trainable_params == res.total_params
    assert not hasattr(model, "loraloom_config")
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["full"]  # no temp folder left behind

    loaded = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    loaded_tok = AutoTokenizer.from_pretrained(out)
    inputs = loaded_tok(["map a2"], return_tensors="pt")
    assert inputs["input_ids"].tolist() == tok(["map a2"], return_tensors="pt")["input_ids"].tolist()
    labels = tok(["b6"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(**inputs, labels=labels).logits, loaded(**inputs, labels=labels).logits)


@pytest.mark.parametrize("peft_type", sorted(ADAPTER_TYPES))
def test_every_registered_adapter_type_trains_by_name(tmp_path, peft_type):
    tok = t5_tokenizer()
    model = tiny_t5()
    res = train(
        model, tok, MAPPING, adapter=peft_type.lower(), lr=1e-2, max_steps=3, output_dir=tmp_path, progress=False
    )
    assert len(res.losses) == 3 and all(torch.isfinite(torch.tensor(res.losses)))
    assert ll.read_adapter(tmp_path)[0].peft_type == peft_type
    assert ADAPTER_TYPES[peft_type].default_lr > 0


# ---- the loop's mechanics ----------------------------------------------------------------------


def test_same_seed_same_run_and_other_seed_other_run():
    tok = t5_tokenizer()

    def run(seed):
        model = tiny_t5()  # dropout on: its masks must follow the seed too
        res = train(model, tok, MAPPING, adapter="LoRA", lr=1e-2, max_steps=6, batch_size=4, seed=seed, progress=False)
        return res.losses, ll.adapters.peft_format.adapter_state_dict(model)

    losses_a, state_a = run(0)
    losses_b, state_b = run(0)
    losses_c, _ = run(1)
    assert losses_a == losses_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert losses_a != losses_c


def test_gradient_accumulation_matches_a_larger_batch():
    tok = tiny_word_tokenizer(SOURCES)
    data = CLS_DATA[:8]

    def run(batch_size, grad_accum):
        model = no_dropout(tiny_bert_cls(num_labels=3))
        res = train(
            model,
            tok,
            data,
            adapter=lora(BERT_ALL),
            lr=1e-2,
            epochs=3,
            batch_size=batch_size,
            grad_accum=grad_accum,
            group_by_length=False,  # the same examples per optimizer step either way
            bf16=False,  # exact float32 sums to compare
            progress=False,
        )
        return res.losses, ll.adapters.peft_format.adapter_state_dict(model)

    losses_big, state_big = run(4, 1)
    losses_acc, state_acc = run(2, 2)
    assert len(losses_big) == len(losses_acc) == 6
    assert losses_big == pytest.approx(losses_acc, abs=1e-5)
    assert all(torch.allclose(state_big[k], state_acc[k], atol=1e-5) for k in state_big)


def test_max_steps_runs_across_epochs_and_bf16_opt_in():
    tok = t5_tokenizer()
    res = train(tiny_t5(), tok, MAPPING, lr=1e-2, max_steps=5, batch_size=4, epochs=1, bf16=True, progress=False)
    assert len(res.losses) == 5  # 2 steps per epoch: max_steps carries on into epochs 2 and 3
    assert all(torch.isfinite(torch.tensor(res.losses)))


def test_adapter_none_continues_a_loaded_adapter(tmp_path):
    tok = t5_tokenizer()
    first = train(
        tiny_t5(), tok, MAPPING, adapter=lora(["q", "v"]), lr=1e-2, epochs=2, output_dir=tmp_path / "a", progress=False
    )
    model = ll.load_adapter(tiny_t5(), first.output_dir, verbose=False)
    before = {k: v.clone() for k, v in ll.adapters.peft_format.adapter_state_dict(model).items()}
    res = train(model, tok, MAPPING, adapter=None, lr=1e-2, epochs=1, progress=False)
    after = ll.adapters.peft_format.adapter_state_dict(model)
    assert res.trainable_params == first.trainable_params
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_lr_schedule_warms_up_then_decays_without_a_zero_step():
    factors = [lr_factor(s, total_steps=10, warmup_steps=3) for s in range(10)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a > b for a, b in zip(factors[3:], factors[4:], strict=False))
    assert factors[-1] == pytest.approx(1 / 7) and min(factors) > 0
    assert [lr_factor(s, 4, 0) for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])


# ---- bad input ---------------------------------------------------------------------------------


def test_bad_input_errors():
    tok = t5_tokenizer()
    with pytest.raises(DataError, match="no examples"):
        train(tiny_t5(), tok, [], progress=False)
    with pytest.raises(AdapterError, match=r"unknown adapter 'nope'; available: .*full.*lora"):
        train(tiny_t5(), tok, MAPPING, adapter="nope", progress=False)
    with pytest.raises(AdapterError, match="carries no loraloom adapter"):
        train(tiny_t5(), tok, MAPPING, adapter=None, progress=False)
    adapted = ll.add_adapter(tiny_t5(), ll.LoraConfig(), verbose=False)
    with pytest.raises(AdapterError, match="adapter='full' needs a plain model"):
        train(adapted, tok, MAPPING, adapter="full", progress=False)
    with pytest.raises(ValueError, match="task must be one of"):
        train(tiny_t5(), tok, MAPPING, task="translation", progress=False)
    with pytest.raises(ValueError, match="grad_accum must be a positive integer"):
        train(tiny_t5(), tok, MAPPING, grad_accum=0, progress=False)
    with pytest.raises(DataError, match="do not fit the model's 2 labels"):
        train(tiny_bert_cls(num_labels=2), tiny_word_tokenizer(SOURCES), CLS_DATA, progress=False)


@pytest.mark.parametrize(
    ("bf16", "native", "expected"), [(None, True, True), (None, False, False), (False, True, False)]
)
def test_bf16_autocast_is_on_by_default_where_the_device_has_it(monkeypatch, bf16, native, expected):
    monkeypatch.setattr(sys.modules["loraloom.train"], "fast_bf16", lambda device: native)  # ll.train hides the module
    model = tiny_bert_cls(num_labels=3)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(torch.is_autocast_enabled("cpu")))
    train(
        model,
        tiny_word_tokenizer(SOURCES),
        CLS_DATA[:4],
        adapter=lora(BERT_ALL),
        max_steps=1,
        bf16=bf16,
        progress=False,
    )
    assert seen == [expected]


def test_fast_bf16_reads_the_cpu_flags():
    from pathlib import Path

    from loraloom.devices import fast_bf16

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    assert fast_bf16(torch.device("cpu")) == ("avx512_bf16" in flags or "amx_bf16" in flags)
    assert fast_bf16(torch.device("meta")) is False


@pytest.mark.slow  # ~1 min: two compilations of a tiny T5 on the CPU
def test_compile_trains_the_same_as_eager():
    """``compile=True``: the same losses and adapter weights as the eager loop (fp32, every dropout off,
    T5's attention dropout included), on the model object the caller holds."""
    tok = t5_tokenizer()

    def run(compile_):
        model = no_dropout(tiny_t5())
        for m in model.modules():  # T5's attention reads its dropout rate from a float, not an nn.Dropout
            if hasattr(m, "relative_attention_num_buckets"):
                m.dropout = 0.0
        options = {"lr": 1e-2, "max_steps": 3, "batch_size": 4, "bf16": False, "progress": False}
        res = train(model, tok, MAPPING, adapter=lora(["q", "v"]), compile=compile_, **options)
        return res.losses, ll.adapters.peft_format.adapter_state_dict(model)

    (eager, eager_state), (compiled, compiled_state) = run(False), run(True)
    assert compiled == pytest.approx(eager, rel=1e-4)
    diff = max((compiled_state[k] - eager_state[k]).abs().max().item() for k in eager_state)
    assert diff < 1e-3, diff  # AdamW's first steps move each weight by ~lr whatever the gradient's size
    with pytest.raises(ValueError, match="compile must be True or False"):
        train(tiny_t5(), tok, MAPPING, compile="yes", progress=False)

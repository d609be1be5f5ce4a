"""Embedding selection (hub/embedding.py, select="embedding"): a module's task card is its own greedy answers to
the probe inputs, embedded by the base; cases whose answer is known, determinism, the base left as it came."""

from __future__ import annotations

import pytest
import torch
from hub_modules import EXAMPLES, make_modules, tokenizer
from tiny_models import tiny_llama, tiny_t5

import loraloom as ll
from loraloom.adapters import remove_adapter
from loraloom.hub import encode_few_shot, select_embedding
from loraloom.hub.embedding import eos_ids, greedy_answer, split_pair
from loraloom.tasks import task_of

torch.set_num_threads(1)


def _model(arch: str):
    return tiny_llama() if arch == "llama" else tiny_t5()


def _targets_from(model, module: str | None, features: list[dict]) -> list[dict]:
    """The few-shot features with each target replaced by ``module``'s (None: the base's) greedy answer."""
    seq2seq, eos = task_of(model) == "seq2seq", eos_ids(model)
    if module is not None:
        ll.load_adapter(model, module, verbose=False)
    try:
        out = []
        for f in features:
            prompt, _ = split_pair(f, seq2seq, eos)
            answer = greedy_answer(model, prompt, 4) + sorted(eos)[:1]
            if seq2seq:
                out.append({"input_ids": f["input_ids"], "labels": answer})
            else:
                out.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
        return out
    finally:
        if module is not None:
            remove_adapter(model)


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_the_module_whose_answers_are_the_targets_ranks_first_with_cosine_one(tmp_path, arch):
    model = _model(arch)
    targets = ["q_proj", "v_proj"] if arch == "llama" else ["q", "v"]
    pool = make_modules(model, tmp_path, 5, targets=targets, scale=1.0)
    tok = tokenizer(add_eos=arch != "llama")
    features = encode_few_shot(model, tok, [ll.Example(e["input"], e["target"]) for e in EXAMPLES])
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    for k in (1, 3):
        few_shot = _targets_from(model, pool[k], features)
        chosen = select_embedding(pool, 2, model, few_shot)
        assert chosen.method == "embedding" and chosen.modules[0] == pool[k]
        assert chosen.scores[pool[k]] == pytest.approx(1.0, abs=1e-12)
        assert all(chosen.scores[m] < 1 - 1e-6 for m in pool if m != pool[k]), chosen.scores
        assert select_embedding(pool, 2, model, few_shot).scores == chosen.scores  # deterministic
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())  # the base as it came


def test_a_module_that_changes_nothing_ranks_first_on_the_base_s_own_answers(tmp_path):
    model = tiny_t5()
    pool = make_modules(model, tmp_path / "moving", 4, scale=1.0) + make_modules(
        model, tmp_path / "still", 1, scale=0.0
    )
    features = encode_few_shot(model, tokenizer(), [ll.Example(e["input"], e["target"]) for e in EXAMPLES])
    chosen = select_embedding(pool, 1, model, _targets_from(model, None, features))
    assert chosen.modules == [pool[-1]] and chosen.scores[pool[-1]] == pytest.approx(1.0, abs=1e-12)


def test_a_fixed_probe_set_and_lorahub_select_embedding(tmp_path):
    model = tiny_t5()
    pool = make_modules(model, tmp_path, 4, scale=1.0)
    tok = tokenizer()
    features = encode_few_shot(model, tok, [ll.Example(e["input"], e["target"]) for e in EXAMPLES])
    probe = encode_few_shot(model, tok, [ll.Example("copy: yak vole toad", "x"), ll.Example("reverse: ant", "x")])
    fixed = select_embedding(pool, 2, model, features, probe=probe)
    assert len(fixed.modules) == 2 and set(fixed.scores) == set(pool)
    result = ll.lorahub(model, examples=EXAMPLES, tokenizer=tok, pool=pool, num=2, select="embedding", budget=3)
    assert result.selection.method == "embedding" and len(result.modules) == 2
    assert result.modules == select_embedding(pool, 2, model, features).modules

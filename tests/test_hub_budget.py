"""The search budget is one cost in every mode, counted in forward-pass equivalents (issue 19).

Scoring one candidate (a forward pass over the few-shot examples, no gradient) costs 1; an Adam step
(forward with gradients for w, then backward) costs ``ADAM_STEP_COST``. Every mode spends at most
``budget``, counted here from the passes the objective really ran; compat's ``max_inference_step`` is
the reference's budget, so a ported script runs no more forward passes than the reference did.
"""

from __future__ import annotations

import pytest
import torch
from hub_modules import EXAMPLES, edit_config, make_modules, tokenizer
from tiny_models import tiny_t5

import loraloom as ll
from loraloom.compat import lorahub_learning, reference_search
from loraloom.hub.objective import Objective
from loraloom.hub.search import ADAM_STEP_COST, DEFAULT_BUDGET, MODES, SearchSettings

INPUTS = [e["input"] for e in EXAMPLES]
OUTPUTS = [e["target"] for e in EXAMPLES]


@pytest.fixture
def passes(monkeypatch) -> list[tuple[int, bool]]:
    """Every pass the objective runs: (candidates scored, with gradients), one per call."""
    calls: list[tuple[int, bool]] = []
    original = Objective.token_loss_sums

    def counted(self: Objective, w: torch.Tensor) -> torch.Tensor:
        calls.append((w.shape[0], torch.is_grad_enabled()))
        return original(self, w)

    monkeypatch.setattr(Objective, "token_loss_sums", counted)
    return calls


def forward_equivalents(calls: list[tuple[int, bool]]) -> int:
    return sum(rows * (ADAM_STEP_COST if gradient else 1) for rows, gradient in calls)


@pytest.fixture(scope="module")
def t5_modules(tmp_path_factory):
    model = tiny_t5()
    return model, make_modules(model, tmp_path_factory.mktemp("budget"), 4)


def test_an_adam_step_is_charged_at_least_a_forward_and_a_backward():
    assert ADAM_STEP_COST >= 2  # measured 1.9-2.4 forward passes: benchmarks/lorahub_step_cost.py


def test_every_mode_defaults_to_the_same_budget_and_splits_it_within_it():
    gradient, hybrid, nevergrad = (SearchSettings(mode=mode) for mode in ("gradient", "hybrid", "nevergrad"))
    assert {SearchSettings(mode=mode).budget for mode in MODES} == {DEFAULT_BUDGET} == {40}
    assert (gradient.adam_steps, gradient.evaluations, gradient.cost) == (13, 0, 40)  # 13 x 3 + the last w
    assert (hybrid.adam_steps, hybrid.evaluations, hybrid.cost) == (8, 15, 40)  # 15 + 8 x 3 + 1
    assert (nevergrad.adam_steps, nevergrad.evaluations, nevergrad.cost) == (0, 40, 40)
    for budget in range(1, 61):
        for settings in (
            SearchSettings(mode="gradient", budget=budget),
            SearchSettings(mode="nevergrad", budget=budget),
        ):
            assert budget - ADAM_STEP_COST < settings.cost <= budget  # spends it, never more
        for steps in range(1, (budget - 2) // ADAM_STEP_COST + 1):
            assert SearchSettings(mode="hybrid", budget=budget, gradient_steps=steps).cost == budget
    with pytest.raises(ValueError, match="gradient_steps must lie in 1..12 in hybrid mode with budget 40"):
        SearchSettings(mode="hybrid", budget=40, gradient_steps=13)  # 13 x 3 + 1 leaves nevergrad nothing


@pytest.mark.parametrize(
    ("mode", "budget", "options"),
    [
        ("gradient", 1, {}),
        ("gradient", 4, {}),
        ("gradient", 12, {}),
        ("gradient", 40, {}),
        ("nevergrad", 12, {"population": 1}),
        ("nevergrad", 12, {"population": 4, "optimizer": "TwoPointsDE"}),
        ("hybrid", 12, {"gradient_steps": 2}),
        ("hybrid", 40, {}),
    ],
)
def test_a_search_runs_at_most_its_budget_in_forward_passes(t5_modules, passes, mode, budget, options):
    model, modules = t5_modules
    result = ll.lorahub(model, modules, EXAMPLES, tokenizer=tokenizer(), mode=mode, budget=budget, **options)
    settings = SearchSettings(mode=mode, budget=budget, **options)
    assert result.complete and forward_equivalents(passes) <= result.cost == settings.cost <= budget
    # the records are what ran: one trace entry per candidate scored, Adam steps marked and counted
    assert result.adam_steps == sum(gradient for _, gradient in passes) == settings.adam_steps
    assert len(result.trace) == settings.evaluations + settings.adam_steps + (mode != "nevergrad")
    assert result.to_dict()["cost"] == result.cost and result.to_dict()["adam_steps"] == result.adam_steps


def test_gradient_mode_scores_the_w_its_last_step_led_to(t5_modules):
    model, modules = t5_modules
    result = ll.lorahub(model, modules, EXAMPLES, tokenizer=tokenizer(), mode="gradient", budget=7, lr=0.1)
    steps, last = result.trace[:-1], result.trace[-1]
    assert [e.gradient for e in result.trace] == [True, True, False] and last.cost == 1
    assert last.weights not in [e.weights for e in steps]  # a new point: Adam's last move, not lost


@pytest.fixture(scope="module")
def saved_t5(tmp_path_factory):
    """A tiny T5 + tokenizer folder and 3 modules whose configs name it as their base (as compat needs)."""
    root = tmp_path_factory.mktemp("compat")
    model = tiny_t5()
    model.save_pretrained(root / "base")
    tokenizer().save_pretrained(root / "base")
    modules = make_modules(model, root / "modules", 3)
    for m in modules:
        edit_config(m, base_model_name_or_path=str(root / "base"))
    return modules


def test_compat_max_inference_step_costs_no_more_than_the_reference(saved_t5, passes):
    assert reference_search(40).mode == "nevergrad" and reference_search(40).cost == 40
    lorahub_learning(saved_t5, INPUTS, OUTPUTS, max_inference_step=40, seed=42)
    assert forward_equivalents(passes) <= 40 and not any(gradient for _, gradient in passes)

    calls = []  # a custom get_loss: one call per candidate, as in the reference

    def get_loss(dataset, model, batch_size) -> float:
        calls.append(1)
        return 1.0

    lorahub_learning(saved_t5, INPUTS, OUTPUTS, max_inference_step=12, get_loss=get_loss, seed=42)
    assert 0 < len(calls) <= 12

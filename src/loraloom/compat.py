"""Drop-in replacements for the reference package's API (``lorahub.algorithm``), on loraloom's engine.

``lorahub_learning`` and ``lorahub_inference`` take the reference's arguments and return what it
returns, with the same objective (``get_loss`` / ``get_regular``, the reference's formula by default),
the same optimizer (NGOpt over [-1.5, 1.5]^N from w = 0, one candidate at a time) and the same seeding.
``max_inference_step`` is the search's budget in forward-pass equivalents (``SearchSettings.budget``),
spent as the reference spends it: that many candidates scored, one forward pass over the examples each,
so a ported script never costs more forward passes than the reference did.
What changes is underneath: modules are read once into a bank, composed in place without rebuilding a
state dict, examples are scored without padding, and causal LMs work too. Differences, on purpose:

- no modules raise a ValueError (the reference prints a message and returns ``(None, None)``);
- the returned weights are the best *evaluated* ones (for NGOpt with one worker, i.e. Cobyla, the
  same point nevergrad recommends), and the same weights always score the same;
- the global ``random`` / ``numpy`` seeds are not touched: nevergrad gets the random state that the
  reference's ``numpy.random.seed(seed)`` would have led it to draw;
- candidates are scored in bfloat16 where the hardware computes it natively (``dtype="auto"``, as every
  loraloom search; ``dtype="fp32"`` scores as the reference does), about twice as fast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .adapters import read_adapter
from .data import IGNORE_INDEX, Example, encode_causal, normalise_answer, pad_token_id_of
from .evaluate import generate
from .hub.bank import load_bank
from .hub.compose import Composition
from .hub.objective import DEFAULT_ALPHA, Objective, Scores, parameters_in
from .hub.search import SearchSettings, nevergrad_search
from .models import load_base
from .tasks import task_of

REFERENCE_MAX_LENGTH = 2048  # the reference tokenises with max_length=2048, truncation=True
REFERENCE_MAX_NEW_TOKENS = 256


class FewShotDataset(Dataset):
    """The reference's example dataset without the ``datasets`` package: rows with ``input``, ``output``,
    ``input_ids``, ``attention_mask`` and ``labels`` (padded to the longest, -100 on label padding), and
    column access (``dataset["input"]``), which is what a custom ``get_loss`` gets to read."""

    def __init__(self, inputs: list[str], outputs: list[str], features: list[dict[str, list[int]]], pad_id: int):
        width = max(len(f["input_ids"]) for f in features)
        label_width = max(len(f["labels"]) for f in features)
        self.rows = [
            {
                "input": x,
                "output": y,
                "input_ids": f["input_ids"] + [pad_id] * (width - len(f["input_ids"])),
                "attention_mask": [1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])),
                "labels": f["labels"] + [IGNORE_INDEX] * (label_width - len(f["labels"])),
            }
            for x, y, f in zip(inputs, outputs, features, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return [row[key] for row in self.rows]
        return self.rows[key]


def default_get_loss(example_dataset: FewShotDataset, model: nn.Module, batch_size: int | None) -> float:
    """The reference's loss: the sum over batches of the model's mean token loss, over the number of examples.

    ``lorahub_learning`` computes this value itself (without padding, P candidates a pass) when given
    this function; it is here to be called, wrapped or replaced like the reference's.
    """
    from transformers import default_data_collator

    size = len(example_dataset) if batch_size is None else min(len(example_dataset), batch_size)
    device = next(model.parameters()).device
    total = 0.0
    with torch.no_grad():
        for batch in DataLoader(example_dataset, collate_fn=default_data_collator, batch_size=size):
            total += float(model(**{k: v.to(device) for k, v in batch.items()}).loss)
    return total / len(example_dataset["input"])


def default_l1_regularization(weights: Sequence[float]) -> float:
    """The reference's penalty: 0.05 times the mean absolute weight."""
    return float(DEFAULT_ALPHA * sum(abs(x) for x in weights) / len(weights))


def reference_features(model: nn.Module, tokenizer: Any, inputs: list[str], outputs: list[str]) -> list[dict]:
    """Token ids as the reference makes them (seq2seq); causal LMs, which it lacks, get loraloom's encoding."""
    if task_of(model) == "causal":
        return encode_causal(tokenizer, [Example(x, y) for x, y in zip(inputs, outputs, strict=True)])
    kw = {"max_length": REFERENCE_MAX_LENGTH, "truncation": True}
    sources = tokenizer(inputs, **kw)["input_ids"]
    targets = tokenizer(outputs, **kw)["input_ids"]
    pad = tokenizer.pad_token_id
    return [
        {"input_ids": s, "labels": [IGNORE_INDEX if t == pad else t for t in target]}
        for s, target in zip(sources, targets, strict=True)
    ]


class _CustomScorer:
    """Scores candidates one by one with a user's ``get_loss`` and/or ``get_regular``, as the reference does."""

    def __init__(self, objective: Objective, dataset: FewShotDataset, batch_size, get_loss, get_regular) -> None:
        self.objective, self.dataset, self.batch_size = objective, dataset, batch_size
        self.get_loss, self.get_regular = get_loss, get_regular
        self.n_weights = objective.n_weights

    def __call__(self, w: torch.Tensor) -> Scores:
        if self.get_loss is default_get_loss:
            losses = self.objective(w).losses
        else:
            losses = torch.tensor([self._custom_loss(row) for row in w], dtype=torch.float64)
        if self.get_regular is default_l1_regularization:
            penalties = DEFAULT_ALPHA * w.abs().mean(1).double()
        else:
            penalties = torch.tensor([float(self.get_regular(row.tolist())) for row in w], dtype=torch.float64)
        values = losses + penalties
        values = torch.where(torch.isfinite(values), values, torch.full_like(values, float("inf")))
        return Scores(values, losses, penalties)

    def _custom_loss(self, w: torch.Tensor) -> float:
        composition, model = self.objective.composition, self.objective.model
        model.eval()
        composition.set_weights(w)
        try:
            return float(self.get_loss(self.dataset, model, self.batch_size))
        finally:
            composition.clear()


def reference_search(max_inference_step: int) -> SearchSettings:
    """The reference's search: NGOpt one candidate at a time, ``max_inference_step`` forward passes in all."""
    return SearchSettings(mode="nevergrad", optimizer="NGOpt", budget=max_inference_step, population=1)


def lorahub_learning(
    lora_module_list: list[str],
    example_inputs: list[str],
    example_outputs: list[str],
    max_inference_step: int,
    model_name_or_path: str | None = None,
    batch_size: int | None = None,
    get_loss: Callable[[FewShotDataset, nn.Module, int | None], float] = default_get_loss,
    get_regular: Callable[[Sequence[float]], float] = default_l1_regularization,
    seed: int = 42,
    *,
    dtype: str = "auto",
) -> tuple[np.ndarray, nn.Module, Any]:
    """(weights, merged model, tokenizer), as the reference's ``lorahub_learning`` returns them.

    The search is the reference's, NGOpt in nevergrad mode with ``budget=max_inference_step``: at most
    ``max_inference_step`` candidates scored, each one forward pass over the examples (with a custom
    ``get_loss``, one call of it), as in the reference. ``dtype`` (loraloom's; ``SearchSettings.dtype``):
    candidates are scored in bfloat16 where the CPU or GPU computes it natively ("auto"), or as asked
    ("fp32", "bf16"); the merged model is float32 either way."""
    modules = [str(m) for m in lora_module_list]
    if not modules:
        raise ValueError("no LoRA modules given: lorahub_learning needs at least one module")
    if not example_inputs:
        raise ValueError("no example inputs given")
    if example_outputs is None:
        example_outputs = [""] * len(example_inputs)
    if len(example_outputs) != len(example_inputs):
        raise ValueError(f"{len(example_inputs)} example inputs but {len(example_outputs)} outputs")
    if model_name_or_path is None:
        model_name_or_path = read_adapter(modules[0])[0].base_model_name_or_path
        if not model_name_or_path:
            raise ValueError(f"module {modules[0]}: its config names no base model; pass model_name_or_path")
    model, tokenizer = load_base(model_name_or_path)
    bank = load_bank(modules, base_model=model)
    features = reference_features(model, tokenizer, list(example_inputs), list(example_outputs))
    pad_token_id = pad_token_id_of(tokenizer)
    dataset = FewShotDataset(list(example_inputs), list(example_outputs), features, pad_token_id)
    # The reference seeds numpy's global generator, from which nevergrad then draws its own seed.
    random_state = np.random.RandomState(np.random.RandomState(seed).randint(2**32, dtype=np.uint32))
    settings = SearchSettings.from_options(reference_search(max_inference_step), dtype=dtype).for_model(model)
    with Composition(model, bank) as composition:
        with parameters_in(model, settings.torch_dtype):
            objective = Objective(
                composition,
                features,
                pad_token_id=pad_token_id,
                formula="reference",
                batch_size=batch_size,
                dtype=settings.torch_dtype,
            )
            scorer = _CustomScorer(objective, dataset, batch_size, get_loss, get_regular)
            found = nevergrad_search(scorer, settings, random_state=random_state)
        composition.merge(found.weights)
    return np.asarray(found.weights), model, tokenizer


def lorahub_inference(
    example_inputs: list[str],
    model_or_name_path: nn.Module | str,
    tokenizer_or_tokenizer_path: Any,
    batch_size: int,
    example_outputs: list[str] | None = None,
) -> tuple[list[str], float | None]:
    """(predictions, exact-match accuracy in percent or None), as the reference's ``lorahub_inference``.

    Seq2seq models generate as the reference does: inputs in order, ``batch_size`` at a time, padded to
    the batch's longest, greedy, up to 256 new tokens, decoded without special tokens and returned as
    decoded (not stripped). Causal LMs, which the reference lacks, go through ``evaluate.generate``
    (left padding, the prompt cut off, stripped). Answers are compared as the reference compares them
    (``data.normalise_answer``, the reference's order).
    """
    model = load_base(model_or_name_path)[0] if isinstance(model_or_name_path, str) else model_or_name_path
    tokenizer = tokenizer_or_tokenizer_path
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer  # ~0.3 s to import: only for a tokenizer given by name

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    inputs = list(example_inputs)
    if task_of(model) == "causal":
        predictions = generate(model, tokenizer, inputs, REFERENCE_MAX_NEW_TOKENS, batch_size)
    else:
        predictions = _reference_generate(model, tokenizer, inputs, batch_size)
    if example_outputs is None:
        return predictions, None
    correct = sum(normalise_answer(p) == normalise_answer(t) for p, t in zip(predictions, example_outputs, strict=True))
    return predictions, correct / len(predictions) * 100


@torch.no_grad()
def _reference_generate(model: nn.Module, tokenizer: Any, inputs: list[str], batch_size: int) -> list[str]:
    """The reference's generation loop for seq2seq models, call for call."""
    device = next(model.parameters()).device
    predictions: list[str] = []
    for start in range(0, len(inputs), batch_size):
        batch = tokenizer(
            inputs[start : start + batch_size], max_length=REFERENCE_MAX_LENGTH, return_tensors="pt", padding=True
        ).to(device)
        outputs = model.generate(input_ids=batch["input_ids"], max_new_tokens=REFERENCE_MAX_NEW_TOKENS)
        predictions.extend(tokenizer.batch_decode(outputs.to("cpu"), skip_special_tokens=True))
    return predictions


__all__ = [
    "FewShotDataset",
    "reference_features",
    "default_get_loss",
    "default_l1_regularization",
    "lorahub_inference",
    "lorahub_learning",
    "reference_search",
]

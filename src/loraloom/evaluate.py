"""Score a model on (input, target) examples: greedy generation + exact match, or classification accuracy.

Generation is batched. Inputs are sorted by length first so each batch pads little, and the outputs are
put back in the caller's order. Causal LMs read left-padded prompts (the new tokens then start at the same
column for every row) and only the tokens after the prompt are decoded. Exact match compares answers after
LoraHub's normalisation (``data.normalise_answer``: strip, lower-case, drop ".", in the reference's order).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig

from .data import (
    Example,
    collate,
    encode_classification,
    load_examples,
    normalise_answer,
    pad_token_id_of,
    resolve_label2id,
)
from .files import atomic_write
from .tasks import TASKS, task_of


@dataclass
class EvalResult:
    score: float  # exact match or accuracy, in [0, 1]
    metric: str  # "exact_match" or "accuracy"
    n: int
    predictions: list[dict[str, Any]] = field(default_factory=list)  # {input, target, prediction, correct}

    def __str__(self) -> str:
        return f"{self.metric}: {self.score:.4f} ({sum(p['correct'] for p in self.predictions)}/{self.n})"


def _length_sorted_batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length, longest first (a memory problem shows up at once)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _greedy_config(model: nn.Module, tokenizer: Any, max_new_tokens: int) -> GenerationConfig:
    """Plain greedy decoding, whatever sampling or beam settings the model's own generation config holds."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
    start = getattr(model.generation_config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(model.config, "decoder_start_token_id", None)
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos,
        pad_token_id=pad_token_id_of(tokenizer),
        decoder_start_token_id=start,
    )


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    inputs: list[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    *,
    progress: bool = False,
) -> list[str]:
    """Greedy completions of ``inputs`` (one string each, in order), for seq2seq and causal LMs.

    Prompts are tokenised exactly as ``data.encode_seq2seq`` / ``encode_causal`` tokenise inputs for
    training, so a trained model sees at test time what it saw while learning.
    """
    if not inputs:
        return []
    causal = not getattr(model.config, "is_encoder_decoder", False)
    prompts = tokenizer(list(inputs))["input_ids"]
    config = _greedy_config(model, tokenizer, max_new_tokens)
    device = next(model.parameters()).device
    outputs: list[str] = [""] * len(inputs)
    was_training = model.training
    model.eval()
    try:
        order = list(_length_sorted_batches([len(p) for p in prompts], batch_size))
        for idx in tqdm(order, desc="generate", disable=not progress, dynamic_ncols=True):
            batch = collate(
                [{"input_ids": prompts[i]} for i in idx],
                config.pad_token_id,
                padding_side="left" if causal else "right",
            )
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model.generate(**batch, generation_config=config)
            if causal:  # the prompt is echoed back; keep only what was generated after it
                out = out[:, batch["input_ids"].shape[1] :]
            for i, text in zip(idx, tokenizer.batch_decode(out, skip_special_tokens=True), strict=True):
                outputs[i] = text.strip()
    finally:
        model.train(was_training)
    return outputs


@torch.no_grad()
def classify(
    model: nn.Module, tokenizer: Any, examples: list[Example], label2id: dict[str, int], batch_size: int = 16
) -> list[str]:
    """The argmax label (a name from ``label2id``) of each example's input."""
    id2label = {i: label for label, i in label2id.items()}
    features = encode_classification(tokenizer, examples, label2id)
    pad_id = pad_token_id_of(tokenizer)
    device = next(model.parameters()).device
    predicted: list[str] = [""] * len(examples)
    was_training = model.training
    model.eval()
    try:
        for idx in _length_sorted_batches([len(f["input_ids"]) for f in features], batch_size):
            batch = collate([{"input_ids": features[i]["input_ids"]} for i in idx], pad_id)
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            for i, label_id in zip(idx, logits.argmax(-1).tolist(), strict=True):
                predicted[i] = id2label.get(label_id, str(label_id))
    finally:
        model.train(was_training)
    return predicted


def write_predictions(path: str | os.PathLike, predictions: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    data: Any,
    *,
    task: str | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    input_field: str = "input",
    target_field: str = "target",
    predictions_file: str | os.PathLike | None = None,
    label2id: dict[str, int] | None = None,
    progress: bool = True,
) -> EvalResult:
    """Exact match of greedy generations (seq2seq, causal) or argmax accuracy (classification) on ``data``.

    ``data``: anything ``load_examples`` reads. ``task`` defaults to the model's. For classification the
    label map is ``label2id``, else the model config's if it names every target, else one built from the
    data. With ``predictions_file``, every prediction is written there as one JSON object per line.
    """
    task = task or task_of(model)
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    examples = load_examples(data, input_field, target_field)
    if task == "classification":
        label2id = resolve_label2id(model, examples, label2id)
        predicted = classify(model, tokenizer, examples, label2id, batch_size)
        correct = [p == e.target for p, e in zip(predicted, examples, strict=True)]
        metric = "accuracy"
    else:
        predicted = generate(
            model, tokenizer, [e.input for e in examples], max_new_tokens, batch_size, progress=progress
        )
        correct = [normalise_answer(p) == normalise_answer(e.target) for p, e in zip(predicted, examples, strict=True)]
        metric = "exact_match"
    predictions = [
        {"input": e.input, "target": e.target, "prediction": p, "correct": c}
        for e, p, c in zip(examples, predicted, correct, strict=True)
    ]
    if predictions_file is not None:
        write_predictions(predictions_file, predictions)
    return EvalResult(score=sum(correct) / len(examples), metric=metric, n=len(examples), predictions=predictions)


__all__ = ["EvalResult", "classify", "evaluate", "generate", "write_predictions"]

"""Examples from JSONL / JSON / CSV files or Python lists, and their tokenisation for training.

An example is an (input, target) pair of strings. Three encodings cover the model families:

- seq2seq (T5, BART): ``input_ids`` = the input, ``labels`` = the target (+ eos); the decoder is fed
  the labels shifted right by the model itself.
- causal LM (GPT-2, Llama): the model reads ``input + " " + target`` (+ eos); ``labels`` are -100 on
  the prompt so only the target is learned. The single space separating them belongs to the target's
  tokens, so generating from the bare prompt continues the way the model was trained.
- sequence classification (BERT): ``input_ids`` = the input, ``labels`` = the target's label id.

Every encoder returns plain lists of ints (one dict per example); ``collate`` pads a batch into tensors.
"""

from __future__ import annotations

import csv
import json
import os
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

IGNORE_INDEX = -100  # label value the cross-entropy loss skips


class DataError(ValueError):
    """Bad training / evaluation data; the message names the file (or source) and the line or example."""


@dataclass(frozen=True)
class Example:
    input: str
    target: str  # for classification: the label as a string


# ---- loading ---------------------------------------------------------------------------------


def load_examples(
    source: str | os.PathLike | Iterable[Any], input_field: str = "input", target_field: str = "target"
) -> list[Example]:
    """Examples from a .jsonl / .json / .csv file, or from a list of dicts, (input, target) pairs or Examples.

    A .json file holds a list of objects, or an object with an ``"examples"`` list (the BIG-Bench Hard
    layout). Integer targets (class labels) become strings. Errors name the file and the line (JSONL,
    CSV) or the example's position (JSON, lists).
    """
    if isinstance(source, (str, os.PathLike)):
        return _load_file(Path(source), input_field, target_field)
    if isinstance(source, dict):
        raise DataError("examples: expected a list of examples or a file path, got a dict")
    name = "examples"
    examples = [
        _to_example(item, input_field, target_field, f"{name}: example {i}") for i, item in enumerate(source, 1)
    ]
    if not examples:
        raise DataError(f"{name}: no examples")
    return examples


def _load_file(path: Path, input_field: str, target_field: str) -> list[Example]:
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise DataError(f"{path}: unknown file type {path.suffix!r}; expected .jsonl, .json or .csv")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e

    if suffix == ".jsonl":
        examples = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
            examples.append(_object_to_example(record, input_field, target_field, f"{path}:{lineno}"))
    elif suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
        if isinstance(records, dict) and isinstance(records.get("examples"), list):
            records = records["examples"]
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a list of objects or an object with an 'examples' list")
        examples = [
            _object_to_example(r, input_field, target_field, f"{path}: example {i}") for i, r in enumerate(records, 1)
        ]
    else:
        reader = csv.DictReader(text.splitlines())
        columns = reader.fieldnames or []
        for field in (input_field, target_field):
            if columns and field not in columns:
                raise DataError(f"{path}:1: missing column {field!r} (columns: {', '.join(columns)})")
        examples = []
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:  # DictReader's key for cells beyond the header
                raise DataError(f"{where}: more cells than the header's {len(columns)} columns")
            examples.append(_to_example(row, input_field, target_field, where))

    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def _object_to_example(record: Any, input_field: str, target_field: str, where: str) -> Example:
    """Files hold one JSON object per example; a bare list or value there is a mistake worth naming."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return _to_example(record, input_field, target_field, where)


def _to_example(item: Any, input_field: str, target_field: str, where: str) -> Example:
    if isinstance(item, Example):
        return item
    if isinstance(item, (tuple, list)):
        if len(item) != 2:
            raise DataError(f"{where}: expected an (input, target) pair, got {len(item)} items")
        values = dict(zip((input_field, target_field), item, strict=True))
    elif isinstance(item, dict):
        values = item
    else:
        raise DataError(
            f"{where}: expected an object with fields {input_field!r} and {target_field!r}, got {item!r:.80}"
        )
    for field in (input_field, target_field):
        if values.get(field) is None:
            raise DataError(f"{where}: missing field {field!r} (fields: {', '.join(map(str, values)) or 'none'})")
    source, target = values[input_field], values[target_field]
    if not isinstance(source, str):
        raise DataError(f"{where}: field {input_field!r} must be a string, got {type(source).__name__}")
    if isinstance(target, int) and not isinstance(target, bool):  # class label ids
        target = str(target)
    if not isinstance(target, str):
        raise DataError(f"{where}: field {target_field!r} must be a string, got {type(target).__name__}")
    return Example(source, target)


def few_shot_split(examples: Sequence[Example], k: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(k examples drawn with ``seed``, the rest in their original order): LoraHub's learn / test split."""
    if not 0 < k < len(examples):
        raise DataError(f"cannot draw {k} few-shot examples from {len(examples)} (need 0 < k < n)")
    chosen = set(random.Random(seed).sample(range(len(examples)), k))
    return [examples[i] for i in sorted(chosen)], [e for i, e in enumerate(examples) if i not in chosen]


# ---- tokenisation ----------------------------------------------------------------------------


def pad_token_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to eos (GPT-2 and Llama ship without a pad token)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError(f"{type(tokenizer).__name__} has neither a pad nor an eos token; set tokenizer.pad_token")
    return pad


def _token_ids(tokenizer: Any, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _truncate_right(ids: list[int], max_length: int, eos: int | None) -> list[int]:
    """Cut to ``max_length`` keeping a final eos (T5 inputs and targets end with one)."""
    if len(ids) <= max_length:
        return ids
    if eos is not None and ids[-1] == eos:
        return ids[: max_length - 1] + [eos]
    return ids[:max_length]


def _warn_truncated(what: str, counts: list[tuple[int, str]], total: int) -> None:
    parts = [f"{n} of {total} {label}" for n, label in counts if n]
    if parts:
        warnings.warn(f"{what}: truncated {' and '.join(parts)}", UserWarning, stacklevel=3)


def encode_seq2seq(
    tokenizer: Any, examples: Sequence[Example], max_source_length: int = 512, max_target_length: int = 128
) -> list[dict[str, list[int]]]:
    """``input_ids`` (the input) and ``labels`` (the target ending in eos) per example."""
    eos = tokenizer.eos_token_id
    sources = _token_ids(tokenizer, [e.input for e in examples])
    targets = [_with_eos(t, eos) for t in _token_ids(tokenizer, [e.target for e in examples])]
    n_src = sum(len(s) > max_source_length for s in sources)
    n_tgt = sum(len(t) > max_target_length for t in targets)
    _warn_truncated(
        "encode_seq2seq",
        [
            (n_src, f"inputs to max_source_length={max_source_length}"),
            (n_tgt, f"targets to max_target_length={max_target_length}"),
        ],
        len(examples),
    )
    return [
        {"input_ids": _truncate_right(s, max_source_length, eos), "labels": _truncate_right(t, max_target_length, eos)}
        for s, t in zip(sources, targets, strict=True)
    ]


def encode_causal(tokenizer: Any, examples: Sequence[Example], max_length: int = 512) -> list[dict[str, list[int]]]:
    """``input_ids`` = prompt + " " + target + eos; ``labels`` = -100 on the prompt, the target ids after.

    The prompt is the input tokenised alone, exactly as a generation call would see it (with BOS if the
    tokenizer adds one). The target is what the full text adds after the prompt's tokens; if the
    tokenizer merges across the boundary, the target is tokenised on its own instead. Too-long examples
    lose tokens from the left of the prompt (after BOS) so the target survives; a target alone longer
    than ``max_length`` is cut on the right.
    """
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    prompts = _token_ids(tokenizer, [e.input for e in examples])
    fulls = _token_ids(tokenizer, [f"{e.input} {e.target}" for e in examples])
    features, n_cut = [], 0
    for ex, prompt, full in zip(examples, prompts, fulls, strict=True):
        if full[: len(prompt)] == prompt and len(full) > len(prompt):
            target = full[len(prompt) :]
        else:
            target = _token_ids(tokenizer, [" " + ex.target], add_special_tokens=False)[0]
        target = _with_eos(target, eos)
        if len(prompt) + len(target) > max_length:
            n_cut += 1
            head = prompt[:1] if bos is not None and prompt[:1] == [bos] else []
            body = prompt[len(head) :]
            target = target[: max_length - len(head)]
            keep = max_length - len(head) - len(target)  # 0 <= keep < len(body)
            prompt = head + body[len(body) - keep :]
        features.append({"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target})
    _warn_truncated(
        "encode_causal", [(n_cut, f"examples to max_length={max_length} (prompt cut from the left)")], len(examples)
    )
    return features


def default_label2id(examples: Sequence[Example]) -> dict[str, int]:
    """Integer targets ("0", "1", ...) keep their number; other labels are numbered in sorted order."""
    labels = sorted({e.target for e in examples})
    if all(label.isdigit() for label in labels):
        return {label: int(label) for label in labels}
    return {label: i for i, label in enumerate(labels)}


def resolve_label2id(model: nn.Module, examples: list[Example], label2id: dict[str, int] | None) -> dict[str, int]:
    """The label map: the one given, else the model's own if it names every target, else from the data."""
    if label2id is None:
        model_map = getattr(getattr(model, "config", None), "label2id", None) or {}
        targets = {e.target for e in examples}
        label2id = dict(model_map) if targets <= set(model_map) else default_label2id(examples)
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if num_labels is not None and max(label2id.values()) >= num_labels:
        raise DataError(
            f"label ids {sorted(label2id.values())} do not fit the model's {num_labels} labels; "
            f"build the model with num_labels={max(label2id.values()) + 1} or pass label2id="
        )
    return label2id


def encode_classification(
    tokenizer: Any, examples: Sequence[Example], label2id: dict[str, int], max_length: int = 512
) -> list[dict[str, Any]]:
    """``input_ids`` (the input) and ``labels`` (an int: ``label2id[target]``) per example."""
    unknown = sorted({e.target for e in examples} - set(label2id))
    if unknown:
        raise DataError(f"labels {unknown[:5]} are not in label2id (known labels: {', '.join(map(str, label2id))})")
    eos = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    sources = _token_ids(tokenizer, [e.input for e in examples])
    n_cut = sum(len(s) > max_length for s in sources)
    _warn_truncated("encode_classification", [(n_cut, f"inputs to max_length={max_length}")], len(examples))
    return [
        {"input_ids": _truncate_right(s, max_length, eos), "labels": label2id[e.target]}
        for s, e in zip(sources, examples, strict=True)
    ]


# ---- batching --------------------------------------------------------------------------------


def collate(
    features: Sequence[dict[str, Any]], pad_token_id: int, padding_side: Literal["left", "right"] = "right"
) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest member: input_ids with ``pad_token_id``, attention_mask with 0, labels with -100.

    Token-list labels are padded on their own (seq2seq labels are the decoder's and may differ in
    length from the inputs). Left padding is for causal generation and scoring; there the labels must
    line up with the inputs, which is checked.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not features:
        raise ValueError("collate: empty batch")
    has_labels = "labels" in features[0]
    token_labels = has_labels and isinstance(features[0]["labels"], (list, tuple))
    if padding_side == "left" and token_labels:
        if any(len(f["labels"]) != len(f["input_ids"]) for f in features):
            raise ValueError("left padding needs labels aligned with input_ids (causal features), not seq2seq ones")

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                if padding_side == "right":
                    out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
                else:
                    out[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        return out

    ids = [list(f["input_ids"]) for f in features]
    batch = {"input_ids": pad(ids, pad_token_id), "attention_mask": pad([[1] * len(r) for r in ids], 0)}
    if token_labels:
        batch["labels"] = pad([list(f["labels"]) for f in features], IGNORE_INDEX)
    elif has_labels:
        batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
    return batch


MEGABATCH = 50  # batches sorted by length together (transformers' LengthGroupedSampler uses 50 too)


def batches(
    features: Sequence[Any], batch_size: int, *, shuffle: bool, seed: int = 0, by_length: bool = False
) -> Iterator[list[Any]]:
    """Lists of ``batch_size`` features (one may be shorter), shuffled by ``seed`` if asked.

    ``by_length``: each run of ``MEGABATCH`` batches is sorted by length before it is cut, and the batches
    then shuffled, so a batch holds examples of similar length (little padding) and the order stays random.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(features)))
    if shuffle:
        rng.shuffle(order)
    if by_length:
        size = MEGABATCH * batch_size
        for start in range(0, len(order), size):
            order[start : start + size] = sorted(
                order[start : start + size], key=lambda i: -feature_length(features[i])
            )
    cut = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if by_length and shuffle:
        rng.shuffle(cut)
    for indices in cut:
        yield [features[i] for i in indices]


def feature_length(feature: Any) -> int:
    """Tokens a feature puts in a batch: its input, plus a seq2seq target (a causal LM's labels are its input)."""
    labels = feature.get("labels") if isinstance(feature, dict) else None
    extra = len(labels) if isinstance(labels, list) and len(labels) != len(feature["input_ids"]) else 0
    return len(feature["input_ids"]) + extra


def normalise_answer(s: str) -> str:
    """LoraHub's exact-match normalisation, in the reference's order: strip surrounding whitespace, lower-case,
    drop every "." (so "Yes ." keeps the space the "." leaves: "yes ", as the reference scores it)."""
    return s.strip().lower().replace(".", "")


__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "Example",
    "batches",
    "collate",
    "default_label2id",
    "encode_causal",
    "encode_classification",
    "encode_seq2seq",
    "few_shot_split",
    "load_examples",
    "normalise_answer",
    "pad_token_id_of",
    "resolve_label2id",
]

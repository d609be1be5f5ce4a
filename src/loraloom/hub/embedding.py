"""Task embeddings for modules that carry no text: each module writes its own task card, the base embeds it.

LoraRetriever (Zhao et al., 2024) and LoRAuter embed a few examples of each module's training task with a
sentence encoder and retrieve the modules nearest the new task's examples. A module in a pool usually ships
only its weights (the zoo's, and most hub uploads, have no README or examples), so here the examples are
made from the module's effect: its greedy answers to a set of probe inputs (by default the few-shot inputs,
so both sides answer the same questions). The embedder is the base model itself, with no adapter:

- an (input, answer) pair is embedded as the mean last hidden state over the answer's tokens of the
  sequence input + answer (the encoder's for a seq2seq model, the model's for a causal LM): the answer as
  the base reads it after its question, so the input, shared by both sides, only sets the context;
- the task's embedding is the mean over its pairs: the few-shot (input, target) pairs, or a module's
  (probe input, its answer) pairs; modules are ranked by the cosine of theirs with the task's.

Greedy decoding on token ids, one probe at a time (no padding), at most as many new tokens as the longest
target: deterministic, and a module whose answers equal the targets scores 1. With a fixed probe set
(``probe=``), a module's embedding no longer depends on the task and can be computed once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..data import IGNORE_INDEX
from ..devices import model_device
from ..tasks import task_of

Feature = dict[str, list[int]]


def eos_ids(model: nn.Module) -> set[int]:
    """The model's end-of-sequence token ids (a config may list several)."""
    eos = model.config.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else {eos} if eos is not None else set()


def split_pair(feature: Feature, seq2seq: bool, eos: set[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of an encoded few-shot example, end-of-sequence tokens dropped."""
    if seq2seq:
        prompt, answer = list(feature["input_ids"]), [t for t in feature["labels"] if t != IGNORE_INDEX]
    else:
        cut = next((i for i, t in enumerate(feature["labels"]) if t != IGNORE_INDEX), len(feature["labels"]))
        prompt, answer = list(feature["input_ids"][:cut]), list(feature["input_ids"][cut:])
    while prompt and prompt[-1] in eos and seq2seq:
        prompt.pop()
    while answer and answer[-1] in eos:
        answer.pop()
    return prompt, answer


@torch.no_grad()
def greedy_answer(model: nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The model's greedy continuation of ``prompt`` (token ids), stopping at end-of-sequence."""
    device, seq2seq, eos = model_device(model), task_of(model) == "seq2seq", eos_ids(model)
    answer: list[int] = []
    if seq2seq:
        encoded = model.get_encoder()(input_ids=torch.tensor([prompt + sorted(eos)[:1]], device=device))
        start = model.config.decoder_start_token_id
    for _ in range(max_new_tokens):
        if seq2seq:
            decoder = torch.tensor([[start, *answer]], device=device)
            logits = model(encoder_outputs=encoded, decoder_input_ids=decoder).logits
        else:
            logits = model(input_ids=torch.tensor([prompt + answer], device=device)).logits
        token = int(logits[0, -1].argmax())
        if token in eos:
            break
        answer.append(token)
    return answer


@torch.no_grad()
def embed_pairs(model: nn.Module, pairs: Sequence[tuple[list[int], list[int]]]) -> torch.Tensor:
    """The mean over ``pairs`` of each answer's mean last hidden state read after its prompt (float64)."""
    device, seq2seq = model_device(model), task_of(model) == "seq2seq"
    vectors = []
    for prompt, answer in pairs:
        if not answer:  # nothing answered: no direction (a zero vector, cosine 0 with anything)
            continue
        ids = torch.tensor([prompt + answer], device=device)
        if seq2seq:
            hidden = model.get_encoder()(input_ids=ids).last_hidden_state
        else:
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        vectors.append(hidden[0, len(prompt) :].double().mean(0).cpu())
    if not vectors:
        return torch.zeros(model.config.hidden_size, dtype=torch.float64)
    return torch.stack(vectors).mean(0)


def task_embedding(model: nn.Module, features: Sequence[Feature]) -> torch.Tensor:
    """The few-shot examples' embedding: their (input, target) pairs through ``embed_pairs``."""
    seq2seq, eos = task_of(model) == "seq2seq", eos_ids(model)
    return embed_pairs(model, [split_pair(f, seq2seq, eos) for f in features])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    norm = float(a.norm() * b.norm())
    return float(a @ b) / norm if norm > 0 else 0.0


__all__ = ["Feature", "cosine", "eos_ids", "embed_pairs", "greedy_answer", "split_pair", "task_embedding"]

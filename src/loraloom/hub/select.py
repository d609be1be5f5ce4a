"""Which modules to compose: given, drawn at random from a pool (the paper), or retrieved by a cheap score.

Retrieval scores every pool module on its own (w = one-hot: the module exactly as trained) by its
few-shot loss, and keeps the N lowest. The pool is read in chunks, so a pool of hundreds of modules
never sits in memory at once, and each chunk is scored with the population pass of the objective.

Arrow scores every pool module, without running it, by how strongly the few-shot tokens reaching each
adapted layer align with the module's prototype (the top right-singular vector of its B·A: the input
direction it changes most), and keeps the N that align most. One base-model pass per example per chunk.

Embedding (hub/embedding.py) ranks every pool module by the cosine of two task embeddings made by the base
model: the few-shot (input, target) pairs', and the module's own (probe input, greedy answer) pairs' (its
"task card", written by running it, since pool modules carry no examples). Probes: the few-shot inputs.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters.inject import remove_adapter
from ..adapters.peft_format import load_adapter
from ..tasks import task_of
from .arrow import alignment
from .bank import list_pool, load_bank
from .compose import Composition
from .embedding import Feature, cosine, embed_pairs, eos_ids, greedy_answer, split_pair, task_embedding
from .objective import Objective

METHODS = ("random", "retrieval", "arrow", "embedding")
DEFAULT_NUM = 20  # modules composed (the paper's N)
RETRIEVAL_CHUNK = 32  # modules read and scored together


@dataclass
class Selection:
    """How the composed modules were chosen."""

    method: str  # "given", "random", "retrieval", "arrow" or "embedding"
    modules: list[str]
    pool_size: int
    seed: int | None = None  # random
    scores: dict[str, float] = field(default_factory=dict)  # retrieval: own loss; arrow: alignment; embedding: cos

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "modules": self.modules,
            "pool_size": self.pool_size,
            "seed": self.seed,
            "scores": self.scores,
        }


def pool_modules(pool: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The pool as a list: the module folders inside a directory, or the given list."""
    if isinstance(pool, (str, os.PathLike)):
        return list_pool(pool)
    modules = [str(m) for m in pool]
    if not modules:
        raise ValueError("the module pool is empty")
    return modules


def _check_num(num: int, pool: list[str]) -> None:
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive number of modules, got {num!r}")
    if num > len(pool):
        raise ValueError(f"cannot select {num} modules from a pool of {len(pool)}")


def select_random(pool: Sequence[str], num: int, seed: int) -> Selection:
    """``num`` modules drawn without replacement with ``random.Random(seed)`` (the paper's sampling)."""
    pool = list(pool)
    _check_num(num, pool)
    return Selection("random", random.Random(seed).sample(pool, num), len(pool), seed=seed)


def select_retrieval(
    pool: Sequence[str],
    num: int,
    model: nn.Module,
    features: Sequence[dict[str, list[int]]],
    *,
    pad_token_id: int,
    dtype: torch.dtype | None = None,
    population: int = 8,
    progress: bool = False,
) -> Selection:
    """The ``num`` pool modules with the lowest few-shot loss on their own (ties: pool order)."""
    pool = list(pool)
    _check_num(num, pool)
    scores: dict[str, float] = {}
    chunks = [pool[i : i + RETRIEVAL_CHUNK] for i in range(0, len(pool), RETRIEVAL_CHUNK)]
    with tqdm(total=len(pool), desc="scoring pool", unit="module", disable=not progress) as bar:
        for chunk in chunks:
            with Composition(model, load_bank(chunk, base_model=model)) as composition:
                objective = Objective(composition, features, pad_token_id=pad_token_id, dtype=dtype)
                one_hot = torch.eye(len(chunk))
                for start in range(0, len(chunk), population):
                    losses = objective(one_hot[start : start + population]).losses
                    for name, loss in zip(chunk[start : start + population], losses.tolist(), strict=True):
                        scores[name] = loss
                    bar.update(len(losses))
    ranked = sorted(pool, key=lambda m: (scores[m] != scores[m], scores[m]))  # NaN last
    return Selection("retrieval", ranked[:num], len(pool), scores=scores)


def select_arrow(
    pool: Sequence[str],
    num: int,
    model: nn.Module,
    features: Sequence[dict[str, list[int]]],
    *,
    progress: bool = False,
) -> Selection:
    """The ``num`` pool modules whose Arrow prototypes the few-shot tokens align with most (ties: pool order).

    A module's score is the mean |cos(x, prototype)| over the tokens x reaching each adapted layer, averaged
    over the layers (``arrow.alignment``); it needs no forward pass with the module, only its weights.
    """
    pool = list(pool)
    _check_num(num, pool)
    scores: dict[str, float] = {}
    chunks = [pool[i : i + RETRIEVAL_CHUNK] for i in range(0, len(pool), RETRIEVAL_CHUNK)]
    with tqdm(total=len(pool), desc="aligning pool", unit="module", disable=not progress) as bar:
        for chunk in chunks:
            aligned = alignment(model, load_bank(chunk, base_model=model), features)
            scores.update(zip(chunk, aligned.tolist(), strict=True))
            bar.update(len(chunk))
    ranked = sorted(pool, key=lambda m: (scores[m] != scores[m], -scores[m]))  # NaN last
    return Selection("arrow", ranked[:num], len(pool), scores=scores)


def select_embedding(
    pool: Sequence[str],
    num: int,
    model: nn.Module,
    features: Sequence[Feature],
    *,
    probe: Sequence[Feature] | None = None,
    progress: bool = False,
) -> Selection:
    """The ``num`` pool modules whose task card embeds nearest the few-shot examples (ties: pool order).

    Each module is loaded into ``model`` in turn, answers the probe inputs (default: the few-shot inputs)
    greedily, and is removed (the base comes back bit for bit); the base then embeds the module's (probe,
    answer) pairs and the examples' (input, target) pairs (``hub/embedding.py``). A fixed ``probe`` makes a
    module's embedding independent of the task. Deterministic: greedy answers, float64 cosines.
    """
    pool = list(pool)
    _check_num(num, pool)
    seq2seq, eos = task_of(model) == "seq2seq", eos_ids(model)
    pairs = [split_pair(f, seq2seq, eos) for f in features]
    prompts = [split_pair(f, seq2seq, eos)[0] for f in probe] if probe is not None else [p for p, _ in pairs]
    max_new = max(len(a) for _, a in pairs)  # a card answer as long as the longest target, no longer
    task = task_embedding(model, features)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    scores: dict[str, float] = {}
    for name in tqdm(pool, desc="embedding pool", unit="module", disable=not progress):
        load_adapter(model, name, verbose=False)
        try:
            answers = [greedy_answer(model, p, max_new) for p in prompts]
        finally:
            remove_adapter(model)
        scores[name] = cosine(task, embed_pairs(model, list(zip(prompts, answers, strict=True))))
    for pname, p in model.named_parameters():
        p.requires_grad_(requires_grad[pname])
    ranked = sorted(pool, key=lambda m: -scores[m])
    return Selection("embedding", ranked[:num], len(pool), scores=scores)


__all__ = [
    "METHODS",
    "Selection",
    "pool_modules",
    "select_arrow",
    "select_embedding",
    "select_random",
    "select_retrieval",
]

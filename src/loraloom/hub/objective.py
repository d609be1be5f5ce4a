"""LoraHub's objective, a pure function of the weights: few-shot cross-entropy + an L1 penalty.

Two formulas (``formula``):

- ``"mean"`` (the default): the mean token cross-entropy over every target token of the few-shot
  examples (the loss of the examples as one batch) + ``alpha · mean|w|``, alpha = 0.05. Neither term
  depends on how the examples are batched.
- ``"reference"``: the reference package's value, ``Σ_batches mean_token_loss(batch) / n_examples +
  alpha · mean|w|``, batches being consecutive chunks of ``batch_size`` examples (all of them when None).
  Its loss term shrinks with n and grows with the number of batches; it is here for parity.

Purity: evaluation runs in eval mode under ``torch.inference_mode`` and never writes into the bank or
the model, so the same weights give the same value every time. Speed: examples are grouped by length
into micro-batches without padding, and P candidates are scored in one pass (``Composition``'s
population mode) by repeating each micro-batch P times. A seq2seq model's encoder and decoder run as
calls of their own, each side grouped by its own lengths (the decoder's few target tokens then need few
calls, whatever the inputs' lengths), and no KV cache is built (``use_cache=False``).

Gradients (``gradient``, Adam's steps): both formulas are linear in each example's summed token loss, so
the gradient of the objective is the sum of per-example gradients. By default all examples run as one
graph (fewest forward calls); ``low_memory`` runs one example's forward and backward at a time, so only
that example's activations are kept for the backward pass (measured on FLAN-T5-base's shapes, 5 examples:
benchmarks/README.md). The same w and objective up to float rounding; more, smaller forward calls.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE_INDEX, Example, collate, encode_causal, encode_seq2seq, pad_token_id_of
from ..devices import model_device
from ..tasks import task_of
from .compose import Composition, as_population

FORMULAS = ("mean", "reference")
DEFAULT_ALPHA = 0.05
# Sequence length when the model config states none (the reference's cap).
FALLBACK_MAX_LENGTH = 2048
# What one forward call costs beyond its tokens, in tokens: on CPU a call streams every weight of the
# model once, whatever the batch (FLAN-T5-small shapes: ~50 ms a call, ~0.7 ms a token on one core).
CALL_COST_TOKENS = 64
# (example indices, padded batch) per forward call.
MicroBatches = list[tuple[list[int], dict[str, torch.Tensor]]]


@dataclass
class Scores:
    """Objective values of P candidates: value = loss + penalty (each a tensor of P floats)."""

    values: torch.Tensor
    losses: torch.Tensor
    penalties: torch.Tensor


def model_max_length(model: nn.Module) -> int:
    """The longest sequence the model takes: its position table size, else the reference's 2048."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return FALLBACK_MAX_LENGTH


def encode_few_shot(
    model: nn.Module, tokenizer: Any, examples: Sequence[Example], max_length: int | None = None
) -> list[dict[str, list[int]]]:
    """Token ids and labels (-100 where no loss is taken) per example; too-long examples are truncated
    with a warning (by ``data.encode_*``)."""
    if not examples:
        raise ValueError("no few-shot examples: LoraHub needs at least one (input, target) example")
    max_length = max_length or model_max_length(model)
    task = task_of(model)
    if task == "seq2seq":
        return encode_seq2seq(tokenizer, examples, max_source_length=max_length, max_target_length=max_length)
    if task == "causal":
        return encode_causal(tokenizer, examples, max_length=max_length)
    raise ValueError(f"LoraHub needs a seq2seq or causal LM, got {type(model).__name__} ({task})")


def length_buckets(
    lengths: Sequence[tuple[int, ...]], copies: int = 1, call_cost: float = CALL_COST_TOKENS
) -> list[list[int]]:
    """Split examples into micro-batches that minimise padded tokens plus a fixed cost per forward call.

    ``lengths[i]`` holds each sequence length of example i (encoder and decoder for seq2seq); every
    micro-batch runs ``copies`` times over (one per candidate). A forward call streams all the model's
    weights whatever its batch, which costs about ``call_cost`` tokens; so a few short examples share a
    padded call while long ones of different lengths get calls of their own. Exact over the partitions
    of the length-sorted examples into runs (a small dynamic programme).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j examples in sorted order
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        widths = [0] * len(lengths[order[0]])
        for i in range(j - 1, -1, -1):  # the run order[i:j], grown leftwards
            widths = [max(w, x) for w, x in zip(widths, lengths[order[i]], strict=True)]
            cost = best[i] + call_cost + copies * (j - i) * sum(widths)
            if cost <= best[j]:  # on a tie, fewer calls
                best[j], cut[j] = cost, i
    buckets, j = [], n
    while j > 0:
        buckets.append(order[cut[j] : j])
        j = cut[j]
    return buckets[::-1]


@contextlib.contextmanager
def parameters_in(model: nn.Module, dtype: torch.dtype | None) -> Iterator[nn.Module]:
    """Run ``model`` with its floating-point parameters in ``dtype``; the originals are put back after.

    Buffers keep their dtype: the bank's stacks stay fp32, and so do rotary tables, as in HF's bf16 models.
    """
    if dtype is None:
        yield model
        return
    tensors = [t for t in model.parameters() if t.is_floating_point() and t.dtype != dtype]
    originals = [t.data for t in tensors]
    try:
        for t in tensors:
            t.data = t.data.to(dtype)
        yield model
    finally:
        for t, data in zip(tensors, originals, strict=True):
            t.data = data


class Objective:
    """Few-shot loss + L1 penalty of the composition for weights w, for one or P candidates at once."""

    @classmethod
    def from_settings(
        cls,
        composition: Composition,
        features: Sequence[dict[str, list[int]]],
        pad_token_id: int,
        settings: Any,
        low_memory: bool = False,
    ) -> Objective:
        """The objective a ``SearchSettings`` asks for (its formula, penalty, batch size and dtype)."""
        return cls(
            composition,
            features,
            pad_token_id=pad_token_id,
            formula=settings.formula,
            alpha=settings.alpha,
            batch_size=settings.batch_size,
            dtype=settings.torch_dtype,
            low_memory=low_memory,
        )

    def __init__(
        self,
        composition: Composition,
        features: Sequence[dict[str, list[int]]],
        *,
        pad_token_id: int,
        formula: str = "mean",
        alpha: float = DEFAULT_ALPHA,
        batch_size: int | None = None,
        dtype: torch.dtype | None = None,
        call_cost: float = CALL_COST_TOKENS,
        low_memory: bool = False,
    ) -> None:
        if formula not in FORMULAS:
            raise ValueError(f"formula must be one of {FORMULAS}, got {formula!r}")
        if not features:
            raise ValueError("no few-shot examples: LoraHub needs at least one (input, target) example")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.composition = composition
        self.model = composition.model
        self.task = task_of(self.model)
        self.formula, self.alpha, self.batch_size, self.dtype = formula, alpha, batch_size, dtype
        self.low_memory = low_memory  # gradients one example at a time (see the module's docstring)
        self.n_examples = len(features)
        if self.task == "causal":  # the first token has no prediction: never a target
            features = [{**f, "labels": [IGNORE_INDEX, *f["labels"][1:]]} for f in features]
        counts = [sum(t != IGNORE_INDEX for t in f["labels"]) for f in features]
        if any(c == 0 for c in counts):
            raise ValueError(f"few-shot example {counts.index(0) + 1} has no target tokens (empty target?)")
        self.token_counts = torch.tensor(counts, dtype=torch.float64)
        self.features, self.pad_token_id, self.call_cost = list(features), pad_token_id, call_cost
        # (population, examples) -> micro-batches; examples is None for all of them
        self._micro_batches: dict[tuple[int, tuple[int, ...] | None], MicroBatches] = {}
        self._memo: dict[bytes, torch.Tensor] = {}  # w (float32 bytes) -> its per-example loss sums
        self._logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        # Wall seconds spent composing (A_hat, B_hat per layer), in forward passes and (gradient mode)
        # in backward passes: the time budget ``lorahub`` reports.
        self.seconds = {"composition": 0.0, "forward": 0.0, "backward": 0.0}

    def micro_batches(self, population: int, examples: Sequence[int] | None = None) -> MicroBatches:
        """(example indices, padded batch) per forward call for ``population`` candidates over ``examples``
        (default: all); fixed per size and set of examples.

        Causal LMs: one call per micro-batch of whole examples. Seq2seq: the encoder's calls (``input_ids``,
        ``attention_mask``) and then the decoder's (``decoder_input_ids``, ``labels``, and the
        ``attention_mask`` of the encoder states it reads), each side grouped by its own lengths.
        """
        key = (population, None if examples is None else tuple(examples))
        if key not in self._micro_batches:
            members = list(range(self.n_examples)) if examples is None else list(examples)
            with torch.inference_mode(False):  # plain tensors: gradient mode reuses them
                self._micro_batches[key] = self._build_micro_batches(population, members)
        return self._micro_batches[key]

    def _buckets(
        self, lengths: list[tuple[int, ...]], members: list[int], population: int, call_cost: float
    ) -> list[list[int]]:
        """``length_buckets`` over ``members`` (lengths[j] is members[j]'s), as indices into all examples."""
        return [[members[j] for j in idx] for idx in length_buckets(lengths, population, call_cost)]

    def _build_micro_batches(self, population: int, members: list[int]) -> MicroBatches:
        device = next(self.model.parameters()).device
        if self.task != "seq2seq":
            lengths = [(len(self.features[i]["input_ids"]),) for i in members]
            buckets = self._buckets(lengths, members, population, self.call_cost)
            return [(idx, _to(collate([self.features[i] for i in idx], self.pad_token_id), device)) for idx in buckets]
        # Seq2seq: the encoder reads the inputs and the decoder the (short) targets, so each side gets the
        # grouping that suits its own lengths, and no call pads a short target to the longest input.
        # Each side streams about half the model's weights a call.
        out = []
        sources = {i: len(f["input_ids"]) for i, f in enumerate(self.features)}
        for idx in self._buckets([(sources[i],) for i in members], members, population, self.call_cost / 2):
            batch = collate(
                [{"input_ids": self.features[i]["input_ids"], "labels": [0]} for i in idx], self.pad_token_id
            )
            out.append((idx, _to({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, device)))
        targets = [(len(self.features[i]["labels"]),) for i in members]
        for idx in self._buckets(targets, members, population, self.call_cost / 2):
            labels = collate([{"input_ids": [0], "labels": self.features[i]["labels"]} for i in idx], 0)["labels"]
            width = max(sources[i] for i in idx)
            mask = torch.tensor([[1] * sources[i] + [0] * (width - sources[i]) for i in idx])
            decoder_input_ids = self.model.prepare_decoder_input_ids_from_labels(labels=labels)
            batch = {"decoder_input_ids": decoder_input_ids, "labels": labels, "attention_mask": mask}
            out.append((idx, _to(batch, device)))
        return out

    @property
    def n_weights(self) -> int:
        """Weights per candidate: one per module (per layer group)."""
        return self.composition.n_weights

    # ---- the pure function ------------------------------------------------------------------

    def __call__(self, weights: torch.Tensor | Sequence[float]) -> Scores:
        """Scores of the candidates in ``weights`` (N, or P x N): one forward per micro-batch for all P.

        Each distinct w is computed once and remembered, so a w scores the same wherever it shows up
        (a row's last bits could otherwise depend on its batch-mates through the matmul blocking).
        """
        w = as_population(weights, self.n_weights).detach()
        keys = [row.numpy().tobytes() for row in w]
        fresh = list(dict.fromkeys(k for k in keys if k not in self._memo))
        if fresh:
            rows = torch.stack([w[keys.index(k)] for k in fresh])
            with torch.inference_mode():
                sums = self.token_loss_sums(rows)
            self._memo.update(zip(fresh, sums.clone(), strict=True))
        return self.scores(w, torch.stack([self._memo[k] for k in keys]))

    def token_loss_sums(self, w: torch.Tensor, examples: Sequence[int] | None = None) -> torch.Tensor:
        """P x n_examples summed token cross-entropies (float64); differentiable if grad mode is on.

        ``examples``: run only these (default all); the other columns are 0."""
        was_training = self.model.training
        self.model.eval()
        try:
            start = time.perf_counter()
            self.composition.set_weights(w, self.dtype)
            composed = time.perf_counter()
            p = w.shape[0]
            device = model_device(self.model)
            # Summed on the model's device, in float64 where it has one (MPS does not); one copy back at the end.
            acc = torch.float32 if device.type == "mps" else torch.float64
            sums = torch.zeros(p, self.n_examples, dtype=acc, device=device)
            for idx, per_row in self._row_loss_sums(p, examples):
                sums = sums.index_add(1, torch.tensor(idx, device=device), per_row.view(p, len(idx)).to(acc))
            sums = sums.to("cpu", torch.float64)
            self.seconds["composition"] += composed - start
            self.seconds["forward"] += time.perf_counter() - composed
            return sums
        finally:
            self.composition.clear()
            self.model.train(was_training)

    def _row_loss_sums(self, p: int, examples: Sequence[int] | None) -> Iterator[tuple[list[int], torch.Tensor]]:
        """(example indices, P x len(indices) summed token losses, candidate-major) per decoder call."""
        if self.task == "seq2seq":
            yield from self._seq2seq_loss_sums(p, examples)
            return
        for idx, batch in self.micro_batches(p, examples):
            batch = {k: v.repeat(p, 1) for k, v in batch.items()}
            labels = batch.pop("labels")
            # Only positions that predict a target token need the LM head (vocabularies are large).
            first = int((labels != IGNORE_INDEX).int().argmax(1).min())
            keep = labels.shape[1] - first + 1
            if self._logits_to_keep:
                logits = self.model(**batch, use_cache=False, logits_to_keep=keep).logits
            else:
                logits = self.model(**batch, use_cache=False).logits[:, -keep:]
            yield idx, _token_loss_sums(logits[:, :-1], labels[:, first:])

    def _seq2seq_loss_sums(self, p: int, examples: Sequence[int] | None) -> Iterator[tuple[list[int], torch.Tensor]]:
        """The encoder over its micro-batches, then the decoder over its own, reading the encoder states
        unpadded per example (padding inside a decoder call is masked out of cross-attention)."""
        encoder = self.model.get_encoder()
        states: dict[int, torch.Tensor] = {}  # example -> P x its length x d_model
        for idx, batch in self.micro_batches(p, examples):
            if "input_ids" not in batch:  # a decoder call
                width = batch["attention_mask"].shape[1]
                padded = [F.pad(states[i], (0, 0, 0, width - states[i].shape[1])) for i in idx]
                hidden = torch.stack(padded, 1).flatten(0, 1)  # candidate-major, as the composed layers expect
                logits = self.model(
                    encoder_outputs=(hidden,),
                    attention_mask=batch["attention_mask"].repeat(p, 1),
                    decoder_input_ids=batch["decoder_input_ids"].repeat(p, 1),
                    use_cache=False,
                ).logits
                yield idx, _token_loss_sums(logits, batch["labels"].repeat(p, 1))
                continue
            mask = batch["attention_mask"]
            hidden = encoder(input_ids=batch["input_ids"].repeat(p, 1), attention_mask=mask.repeat(p, 1))[0]
            hidden = hidden.view(p, len(idx), *hidden.shape[1:])
            for j, i in enumerate(idx):
                states[i] = hidden[:, j, : len(self.features[i]["input_ids"])]

    def gradient(self, w: torch.Tensor) -> Scores:
        """Scores of w (P x N, requiring grad) with d(Σ values)/dw added to ``w.grad``; no backward when a
        value is not finite (batched), or only for the examples whose loss is (``low_memory``): the caller
        checks the scores. Returns detached scores. Gradient mode must be on."""
        if not self.low_memory:
            scores = self.scores(w, self.token_loss_sums(w))
            start = time.perf_counter()
            if torch.isfinite(scores.values).all():
                scores.values.sum().backward()
            self.seconds["backward"] += time.perf_counter() - start
            return Scores(scores.values.detach(), scores.losses.detach(), scores.penalties.detach())
        # One example at a time: its column of the sums (the others 0) through the same (linear) formula
        # gives its share of the loss; the shares' gradients add up to the batched gradient.
        sums = torch.zeros(w.shape[0], self.n_examples, dtype=torch.float64)
        for i in range(self.n_examples):
            own = self.token_loss_sums(w, [i])
            start = time.perf_counter()
            if torch.isfinite(own).all():
                self.scores(w, own).losses.sum().backward()
            self.seconds["backward"] += time.perf_counter() - start
            sums += own.detach()
        scores = self.scores(w, sums)  # the penalty's gradient: the loss term is a constant here
        if torch.isfinite(scores.values).all():
            scores.values.sum().backward()
        return Scores(scores.values.detach(), scores.losses.detach(), scores.penalties.detach())

    def scores(self, w: torch.Tensor, sums: torch.Tensor) -> Scores:
        """Objective from the P x n summed token losses; non-finite losses score +inf."""
        if self.formula == "mean":
            losses = sums.sum(1) / self.token_counts.sum()
        else:
            size = self.batch_size or self.n_examples
            losses = sum(
                sums[:, s : s + size].sum(1) / self.token_counts[s : s + size].sum()
                for s in range(0, self.n_examples, size)
            )
            losses = losses / self.n_examples
        penalties = self.alpha * w.abs().mean(1).double()
        values = losses + penalties
        values = torch.where(torch.isfinite(values), values, torch.full_like(values, float("inf")))
        return Scores(values=values, losses=losses, penalties=penalties)


def _token_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy of each row (fp32 logits; -100 labels take no loss)."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return loss.view(labels.shape).sum(1)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


__all__ = [
    "DEFAULT_ALPHA",
    "FORMULAS",
    "Objective",
    "Scores",
    "encode_few_shot",
    "length_buckets",
    "model_max_length",
    "pad_token_id_of",
    "parameters_in",
]

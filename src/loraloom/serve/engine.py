"""Continuous batching for a causal LM with one LoRA adapter (or composition) per request.

``Engine`` owns the model and the running batch. Each ``step`` is one token boundary:

1. rows whose request finished or was cancelled leave the batch (their KV-cache rows are dropped);
2. new requests join: their prompts are prefilled together (left-padded, each row through its own adapter)
   and their caches are appended to the running batch's, left-padded to a common length;
3. every row decodes one token in a single forward pass (each row through its own adapter).

The KV cache is transformers' ``DynamicCache``: rows are left-padded, the attention mask marks the padding
and the position ids count only real tokens, so a row's numbers do not depend on who else is in the
batch. Columns of padding shared by every row are cropped when rows leave, so the cache does not grow
with the batch's history. ``scheduler.Scheduler`` runs the steps from an asyncio loop.

Sampling is per row: each request's ``SamplingParams`` (temperature, top_p, seed, penalties, logit bias,
logprobs) apply to its own row of the batch's logits, so requests with different settings share one batch.
A greedy row without penalties or bias takes the batch's argmax as it always did (bit for bit).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .multi import LoraWeights, MultiLora

MAX_LOGPROBS = 20  # alternatives per token at most (vLLM's default max_logprobs)

# One token's log-probability and its top alternatives: (logprob, [(token id, logprob), ...] best first).
TokenLogprob = tuple[float, list[tuple[int, float]]]


@dataclass
class SamplingParams:
    """How a request decodes (OpenAI's fields and defaults)."""

    max_tokens: int = 16
    """New tokens at most."""
    temperature: float = 1.0
    """0 is greedy; above 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Sample only from the smallest set of tokens whose probability reaches top_p."""
    seed: int | None = None
    """Seed of this request's sampler: same seed, same tokens."""
    stop: list[str] = field(default_factory=list)
    """Generation ends before the first of these strings (not included in the text)."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated (OpenAI's formula), in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was already generated, in [-2, 2]."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Token id -> bias in [-100, 100] added to its logit before sampling (-100 in effect forbids it)."""
    logprobs: int | None = None
    """Record each generated token's log-probability and this many top alternatives (None: nothing)."""
    prompt_logprobs: int | None = None
    """The same for the prompt's tokens (``echo`` with ``logprobs``); the first token has none."""

    def __post_init__(self) -> None:
        scoring = self.max_tokens == 0 and self.prompt_logprobs is not None  # 0 new tokens: score the prompt only
        if (
            isinstance(self.max_tokens, bool)
            or not isinstance(self.max_tokens, int)
            or not (self.max_tokens > 0 or scoring)
        ):
            raise ValueError(
                f"max_tokens must be a positive integer (0 only with echo and logprobs), got {self.max_tokens!r}"
            )
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise ValueError("stop: at most 4 non-empty strings")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        for token, bias in self.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0 or not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias: token ids >= 0 with biases in [-100, 100], got {token!r}: {bias!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (isinstance(k, bool) or not 0 <= k <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {k!r}")

    @property
    def adjusts(self) -> bool:
        """Penalties or a logit bias change this row's logits before a token is chosen."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation: its prompt, adapter and sampling, and what it has produced so far."""

    prompt_ids: list[int]
    adapter: LoraWeights | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # the decoded output, cut before a stop string
    # Incremental detokenization (``new_text``): ``output_ids[prefix_at:read_at]`` are decoded already and give
    # the next token its context; ids after ``read_at`` are not yet in ``text`` (half of a multi-byte character).
    prefix_at: int = 0
    read_at: int = 0
    sent: int = 0  # characters of ``text`` already handed out by ``take_text``
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    error: str | None = None
    cancelled: bool = False
    queue: asyncio.Queue | None = None  # set by the scheduler: gets the request after each step that changed it
    generator: torch.Generator | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output id (params.logprobs set)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # one per prompt id (first: None)
    sent_logprobs: int = 0  # entries of ``logprobs`` already handed out by ``take_logprobs``
    counted: bool = False  # the scheduler has counted its finish (for /metrics)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def new_text(self, tokenizer: Any, final: bool = False) -> str:
        """The text of the ids made since the last call (the caller adds it to ``text``): "" while they end in
        half of a multi-byte character, unless ``final`` (the last token: what is left goes out as is).

        Decodes a few ids each call, not the whole output: the ids after ``prefix_at`` give the tokenizer its
        context (a word's leading space, a WordPiece continuation), and the text before ``read_at`` is cut off."""
        window = self.output_ids[self.prefix_at :]
        seen = tokenizer.decode(window[: self.read_at - self.prefix_at], skip_special_tokens=True)
        full = tokenizer.decode(window, skip_special_tokens=True)
        new = full[len(seen) :] if full.startswith(seen) else full  # a tokenizer whose text is not a prefix: restart
        if not new or (new.endswith("\ufffd") and not final):
            return ""  # no text yet (a skipped special token) or a character still incomplete: keep the context
        self.prefix_at, self.read_at = self.read_at, len(self.output_ids)
        return new

    def take_text(self) -> str:
        """The text made since the last call (held back while it might still turn into a stop string)."""
        end = len(self.text)
        if not self.finished:
            hold = max((len(s) - 1 for s in self.params.stop), default=0)
            end = max(self.sent, end - hold)
            while end > self.sent and self.text[end - 1] == "\ufffd":  # half of a multi-byte character
                end -= 1
        out, self.sent = self.text[self.sent : end], end
        return out

    def take_logprobs(self) -> tuple[list[int], list[TokenLogprob]]:
        """The output ids and logprobs recorded since the last call (a stream sends them with its next piece)."""
        start, self.sent_logprobs = self.sent_logprobs, len(self.logprobs)
        return self.output_ids[start : self.sent_logprobs], self.logprobs[start : self.sent_logprobs]


def max_positions(model: nn.Module) -> int | None:
    config = model.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def check_max_batch(max_batch: int, max_loras: int | None = None, max_lora_rank: int | None = None) -> None:
    """The one check of the batch limits (``Engine`` and ``ServeOptions`` call it)."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    for name, value in (("max_loras", max_loras), ("max_lora_rank", max_lora_rank)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be >= 1, got {value}")


def lora_rank(adapter: LoraWeights) -> int:
    """The largest LoRA rank among an adapter's layers: a layer's first tensor, when it is a matrix, is LoRA's A
    (r x d_in); types without a rank (IA3's scales, FourierFT's spectrum: vectors) count 0, as in vLLM."""
    ranks = [t[0].shape[0] for t in adapter.layers.values() if isinstance(t[0], torch.Tensor) and t[0].ndim == 2]
    return max(ranks, default=0)


class Engine:
    """The model, its multi-adapter layers and the running batch (call from one thread at a time)."""

    seq2seq = False  # Seq2SeqEngine serves encoder-decoders; make_engine picks the class from the config

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        max_batch: int = 32,
        max_loras: int | None = None,
        max_lora_rank: int | None = None,
    ) -> None:
        if getattr(model.config, "is_encoder_decoder", False) != self.seq2seq:
            got = "a causal LM" if self.seq2seq else "an encoder-decoder"
            raise ValueError(f"{type(self).__name__} cannot serve {got}; make_engine picks the engine for a model")
        check_max_batch(max_batch, max_loras, max_lora_rank)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_loras = max_loras  # distinct adapters in the running batch at most (vLLM's --max-loras)
        self.max_lora_rank = max_lora_rank  # adapters of a higher rank are refused (vLLM's --max-lora-rank)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.generated_tokens = 0  # tokens made so far, every row (for /metrics)
        self.multi = MultiLora(model)
        self.device = next(model.parameters()).device
        self.max_positions = max_positions(model)
        # Every end-of-sequence id the model names: the tokenizer's, the config's and generation_config's (a
        # chat model often lists several there, e.g. end-of-turn beside end-of-text).
        self.eos_ids: set[int] = set()
        generation = getattr(model, "generation_config", None)
        for eos in (tokenizer.eos_token_id, model.config.eos_token_id, getattr(generation, "eos_token_id", None)):
            self.eos_ids |= set(eos if isinstance(eos, list) else [eos]) - {None}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        self.pad_id = pad
        # The running batch: rows, their KV cache, attention mask (rows x columns fed) and next input token.
        self.rows: list[Request] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None
        self.next_tokens: torch.Tensor | None = None

    def check_length(self, prompt_len: int, max_tokens: int) -> None:
        """ValueError if the prompt and the tokens to make do not fit the model's positions."""
        if prompt_len < 1:
            raise ValueError("the prompt is empty (no tokens)")
        if self.max_positions is not None and prompt_len + max_tokens > self.max_positions:
            raise ValueError(
                f"this model's maximum context length is {self.max_positions} tokens; the prompt has {prompt_len} "
                f"tokens and max_tokens is {max_tokens} ({prompt_len + max_tokens} in all)"
            )

    def check_tokens(self, ids: Sequence[int], what: str = "prompt") -> None:
        """ValueError unless every id is a token of this model's vocabulary."""
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"{what}: token id {bad[0]!r} is outside the vocabulary [0, {self.vocab_size})")

    def check_adapter(self, adapter: LoraWeights) -> None:
        """AdapterError if ``adapter`` does not fit the base's layers; ValueError over ``max_lora_rank``."""
        self.multi.check(adapter)
        rank = lora_rank(adapter)
        if self.max_lora_rank is not None and rank > self.max_lora_rank:
            raise ValueError(f"adapter {adapter.name!r} has rank {rank}, over --max-lora-rank {self.max_lora_rank}")

    def occupied(self) -> int:
        """Rows that stay in the batch at the next step (finished and cancelled ones leave it first)."""
        return sum(not (r.finished or r.cancelled) for r in self.rows)

    # ---- one token boundary ------------------------------------------------------------------

    @torch.no_grad()
    def step(self, new: Sequence[Request] = ()) -> list[Request]:
        """Drop finished rows, prefill ``new`` into the batch, decode one token for every row.

        Returns the requests that changed (got text or finished)."""
        self._drop_finished()
        new = [r for r in new if not r.cancelled]
        # Rows that want their prompt's logprobs need the logits of every prompt position: a prefill of their own,
        # so the other rows' prefill computes exactly what it did before.
        for group in ([r for r in new if r.params.prompt_logprobs is None],
                      [r for r in new if r.params.prompt_logprobs is not None]):  # fmt: skip
            if group:
                self._prefill(group)  # each new row gets its first token; rows done at once never join
        if self.rows:
            self._decode()
        return list(dict.fromkeys([*new, *self.rows]))

    def fail_all(self, message: str, requests: Sequence[Request] = ()) -> list[Request]:
        """An error in a step: every row and ``requests`` end with ``message``; the batch starts afresh."""
        failed = [r for r in [*self.rows, *requests] if not r.finished]
        for r in failed:
            r.finish_reason, r.error = "error", message
        self.rows, self.cache, self.mask, self.next_tokens = [], None, None, None
        self.multi.clear()
        return failed

    def _prefill(self, new: list[Request]) -> None:
        width = max(len(r.prompt_ids) for r in new)
        ids = torch.full((len(new), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for i, r in enumerate(new):  # left padding: the last column is every row's last prompt token
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
            start_sampler(r)
        ids, mask = ids.to(self.device), mask.to(self.device)
        self.multi.set_rows([r.adapter for r in new])
        cache = DynamicCache(config=self.model.config)
        every = any(r.params.prompt_logprobs is not None for r in new)
        logits = self._forward(ids, mask, cache, every_position=every)
        if every:
            for i, r in enumerate(new):
                r.prompt_logprobs = _prompt_logprobs(logits[i, width - len(r.prompt_ids) :], r.prompt_ids,
                                                     r.params.prompt_logprobs)  # fmt: skip
            logits = logits[:, -1]
        for r in new:
            if r.params.max_tokens == 0:  # only the prompt was to be scored
                r.finish_reason = "length"
        tokens = self._sample(logits, new)
        keep = [i for i, r in enumerate(new) if not r.finished]
        if not keep:
            return
        if len(keep) < len(new):
            cache, mask, tokens = _select(cache, keep, self.model.config), mask[keep], tokens[keep]
        self._append([new[i] for i in keep], cache, mask, tokens)

    def _decode(self) -> None:
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        self.multi.set_rows([r.adapter for r in self.rows])
        logits = self._forward(self.next_tokens[:, None], self.mask, self.cache)
        self.next_tokens = self._sample(logits, self.rows)

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache, every_position: bool = False
    ) -> torch.Tensor:
        """Logits of the last column (rows x vocab) for ``ids`` fed after ``cache`` (``mask`` covers cache and
        ids); with ``every_position`` the logits of every column (rows x columns x vocab)."""
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=0 if every_position else 1,
        )
        return out.logits.float() if every_position else out.logits[:, -1].float()

    def _sample(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """One token per row, each by its own request's settings, recorded in each request; returns the tokens.

        A row whose logits are not finite (an adapter that overflows, say) fails alone: the others go on."""
        tokens = logits.argmax(dim=-1)  # the plain greedy rows' tokens, exactly as before
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        chosen = tokens.tolist()  # one copy to Python ints per step, not one tensor index per row
        for i, r in enumerate(requests):
            if r.finished:
                continue
            if not finite[i]:
                name = r.adapter.name if r.adapter is not None else "base"
                r.finish_reason, r.error = "error", f"generation failed: model {name!r} made non-finite logits"
                continue
            params = r.params
            if params.temperature > 0 or params.adjusts:
                row = _adjusted(logits[i], params, r.output_ids)
                chosen[i] = _sample_row(row, params, r.generator) if params.temperature > 0 else int(row.argmax())
                tokens[i] = chosen[i]
            token = chosen[i]
            logprob = _token_logprob(logits[i], token, params.logprobs) if params.logprobs is not None else None
            self._record(r, token, logprob)
        return tokens

    def _record(self, r: Request, token: int, logprob: TokenLogprob | None = None) -> None:
        # The event loop reads ``text`` and ``finish_reason`` while the next step runs: each is assigned once,
        # the text first, so a reader never sees a stop string's start before the text is cut.
        if r.cancelled:
            r.finish_reason = "cancelled"
            return
        if token in self.eos_ids:
            r.text += r.new_text(self.tokenizer, final=True)  # a last incomplete character, if any, as is
            r.finish_reason = "stop"
            return
        self.generated_tokens += 1
        r.output_ids.append(token)
        if logprob is not None:
            r.logprobs.append(logprob)
        length = len(r.output_ids) >= r.params.max_tokens
        new = r.new_text(self.tokenizer, final=length)
        text = r.text + new
        # A stop string can only end in the new text: search from where one could have started.
        hits = [i for i in (text.find(s, max(len(r.text) - len(s) + 1, 0)) for s in r.params.stop) if new and i >= 0]
        if hits:
            r.text, r.finish_reason = text[: min(hits)], "stop"
            return
        r.text = text
        if length:
            r.finish_reason = "length"

    # ---- the batch's KV cache ----------------------------------------------------------------

    def _append(self, rows: list[Request], cache: DynamicCache, mask: torch.Tensor, tokens: torch.Tensor) -> None:
        """Join prefilled rows to the running batch, left-padding whichever side is shorter."""
        if not self.rows:
            self.rows, self.cache, self.mask, self.next_tokens = rows, cache, mask, tokens
            return
        width = max(self.mask.shape[1], mask.shape[1])
        old_kv, new_kv = _tensors(self.cache), _tensors(cache)
        merged = [(_stack_left(ko, kn, width), _stack_left(vo, vn, width))
                  for (ko, vo), (kn, vn) in zip(old_kv, new_kv, strict=True)]  # fmt: skip
        self.cache = _cache_of(merged, self.model.config)
        self.mask = torch.cat([_pad_left(self.mask, width, dim=1), _pad_left(mask, width, dim=1)])
        self.next_tokens = torch.cat([self.next_tokens, tokens])
        self.rows = self.rows + rows

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self.rows) if not (r.finished or r.cancelled)]
        for r in self.rows:
            if r.cancelled and not r.finished:
                r.finish_reason = "cancelled"
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask, self.next_tokens = [], None, None, None
            return
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.next_tokens = self.mask[keep], self.next_tokens[keep]
        # Columns that are padding in every remaining row carry nothing: crop them.
        shared_pad = int((self.mask.cumsum(dim=1) == 0).all(dim=0).sum())
        self.cache = _select(self.cache, keep, self.model.config, start=shared_pad)
        self.mask = self.mask[:, shared_pad:]

    # ---- without a server --------------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> list[Request]:
        """Run ``requests`` to the end, all admitted together (up to ``max_batch`` at a time)."""
        waiting = list(requests)
        while waiting or self.rows:
            room = self.max_batch - self.occupied()
            new, waiting = waiting[:room], waiting[room:]
            self.step(new)
        self._drop_finished()
        return list(requests)


def start_sampler(r: Request) -> None:
    """Each sampling request its own generator: seeded by its seed, else a fresh random one."""
    if r.params.temperature > 0:
        r.generator = torch.Generator()
        if r.params.seed is not None:
            r.generator.manual_seed(r.params.seed)
        else:
            r.generator.seed()


def _tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache_of(data: list[tuple[torch.Tensor, torch.Tensor]], config: Any) -> DynamicCache:
    """A DynamicCache holding ``data`` (keys, values per layer) as they are.

    ``DynamicCache(ddp_cache_data=...)`` concatenates each layer's tensors onto empty ones: a copy of the whole
    cache every time rows join or leave. Plain layers take the tensors as they are; other kinds (sliding window,
    with state of their own) are filled through ``update`` as before."""
    cache = DynamicCache(config=config)
    if len(cache.layers) != len(data) or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return DynamicCache(ddp_cache_data=data, config=config)
    for layer, (k, v) in zip(cache.layers, data, strict=True):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    return cache


def _select(cache: DynamicCache, rows: list[int], config: Any, start: int = 0) -> DynamicCache:
    index = torch.tensor(rows, device=cache.layers[0].keys.device)
    data = [
        (k[:, :, start:].index_select(0, index), v[:, :, start:].index_select(0, index)) for k, v in _tensors(cache)
    ]
    return _cache_of(data, config)


def _stack_left(old: torch.Tensor, new: torch.Tensor, width: int) -> torch.Tensor:
    """``old``'s rows then ``new``'s, each left-padded with zeros to ``width`` columns (dim 2): one copy."""
    out = old.new_zeros((old.shape[0] + new.shape[0], *old.shape[1:2], width, *old.shape[3:]))
    out[: old.shape[0], :, width - old.shape[2] :] = old
    out[old.shape[0] :, :, width - new.shape[2] :] = new
    return out


def _pad_left(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Zeros before ``t`` along ``dim`` up to ``width`` (keys/values: dim 2; masks: dim 1)."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.ndim - 1 - dim) + [missing, 0]
    return F.pad(t, pad)


def _adjusted(logits: torch.Tensor, params: SamplingParams, output_ids: list[int]) -> torch.Tensor:
    """One row's logits with its logit bias and OpenAI's penalties over the tokens generated so far:
    ``logit[j] + bias[j] - count[j] * frequency_penalty - (count[j] > 0) * presence_penalty``."""
    if not params.adjusts:
        return logits
    logits = logits.clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=logits.device)
        logits[ids] += torch.tensor(list(params.logit_bias.values()), device=logits.device, dtype=logits.dtype)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        ids = torch.tensor(output_ids, device=logits.device)
        counts = torch.bincount(ids, minlength=logits.shape[0])[: logits.shape[0]].to(logits.dtype)
        logits -= counts * params.frequency_penalty + (counts > 0).to(logits.dtype) * params.presence_penalty
    return logits


def _token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The chosen token's log-probability under the model's own distribution (raw logits: before temperature,
    penalties and bias, as vLLM reports by default) and the ``top`` most likely tokens."""
    logprobs = torch.log_softmax(logits, dim=-1)
    best = logprobs.topk(top) if top else None
    alternatives = list(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best is not None else []
    return float(logprobs[token]), alternatives


def _prompt_logprobs(logits: torch.Tensor, ids: list[int], top: int) -> list[TokenLogprob | None]:
    """Each prompt token's logprob given the tokens before it (``logits``: one row per prompt position)."""
    return [None] + [_token_logprob(logits[j - 1], ids[j], top) for j in range(1, len(ids))]


def _sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs >= params.top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    # On the CPU with the request's own CPU generator: same seed, same tokens, whatever device the model is on.
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


__all__ = ["MAX_LOGPROBS", "Engine", "Request", "SamplingParams", "lora_rank", "max_positions"]

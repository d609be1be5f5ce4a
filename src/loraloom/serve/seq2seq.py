"""Continuous batching for an encoder-decoder (T5, BART) with one adapter (or composition) per request.

``Seq2SeqEngine`` is the causal ``Engine`` with a different prefill and forward:

1. a new request's prompt runs through the encoder once, when it joins (right-padded among the new rows, so
   every real token keeps the position it has alone); its encoder output, encoder mask and cross-attention
   keys/values are kept as its rows of the batch's, right-padded to the longest;
2. its decoder starts from ``decoder_start_token_id`` and then steps with every other row, one token a step,
   its self-attention cache left-padded as the causal engine's is.

Why the left-padded decoder cache gives each row what it gets alone: T5's self-attention bias depends only on
the distance between two columns, which padding on the left does not change, and the mask hides the padding;
BART's decoder adds a learned embedding of the absolute position, so a forward hook on ``embed_positions``
replaces transformers' shared positions (cache length + offset) by each row's own count of real tokens.
Other encoder-decoders (sinusoidal or otherwise absolute positions, e.g. Marian, Pegasus) are refused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from ..models import model_source
from .engine import Engine, Request, start_sampler

# Model types whose batched decoding equals decoding alone (the tests check T5 and BART token for token).
RELATIVE_POSITIONS = ("t5", "mt5")  # decoder self-attention: a bias of the distance only
LEARNED_POSITIONS = ("bart",)  # decoder: a learned embedding of the absolute position, offset per row here
SERVABLE = RELATIVE_POSITIONS + LEARNED_POSITIONS


def check_servable_model(model: nn.Module) -> None:
    """ValueError, short, unless ``model`` is an encoder-decoder this engine batches exactly."""
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in SERVABLE:
        raise ValueError(
            f"serving batches encoder-decoders of type {', '.join(SERVABLE)}; {model_type!r} is not supported "
            "(its decoder positions are not batched per row)"
        )


def make_engine(model: nn.Module, tokenizer: Any, **kwargs: Any) -> Engine:
    """An ``Engine`` for a causal LM, a ``Seq2SeqEngine`` for an encoder-decoder (``model.config`` says which)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return Seq2SeqEngine(model, tokenizer, **kwargs)
    return Engine(model, tokenizer, **kwargs)


def served_task(base: str | os.PathLike) -> str:
    """The task ``load_base`` loads a served base for: "seq2seq" for an encoder-decoder, else "causal"."""
    config = AutoConfig.from_pretrained(model_source(base))
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


class Seq2SeqEngine(Engine):
    """An encoder-decoder's running batch: per-row encoder outputs, a shared decoder step (see the module doc)."""

    seq2seq = True

    def __init__(self, model: nn.Module, tokenizer: Any, **kwargs: Any) -> None:
        check_servable_model(model)
        super().__init__(model, tokenizer, **kwargs)
        config = model.config
        start = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
        self.start_id = int(start if start is not None else config.decoder_start_token_id)
        # Per row of the batch: encoder output (rows x enc columns x d), its mask, and the cross-attention cache.
        self.encoder_out: torch.Tensor | None = None
        self.encoder_mask: torch.Tensor | None = None
        self.cross: DynamicCache | None = None
        self.positions: torch.Tensor | None = None  # BART: each row's decoder position in this forward
        if config.model_type in LEARNED_POSITIONS:
            model.get_decoder().embed_positions.register_forward_hook(self._row_positions)

    def check_length(self, prompt_len: int, max_tokens: int) -> None:
        """The encoder takes the prompt, the decoder the start token and the new tokens: each must fit."""
        if prompt_len < 1:
            raise ValueError("the prompt is empty (no tokens)")
        limit = self.max_positions
        if limit is not None and max(prompt_len, max_tokens + 1) > limit:
            raise ValueError(
                f"this model's maximum length is {limit} tokens for the prompt and for max_tokens + 1; the prompt "
                f"has {prompt_len} tokens and max_tokens is {max_tokens}"
            )

    def fail_all(self, message: str, requests: Sequence[Request] = ()) -> list[Request]:
        self.encoder_out, self.encoder_mask, self.cross = None, None, None
        return super().fail_all(message, requests)

    def _row_positions(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        """BART's learned decoder positions, one per row (transformers gives every row the cache's length)."""
        if self.positions is None:  # the encoder's, or a forward outside the engine: unchanged
            return output
        return F.embedding(self.positions + module.offset, module.weight).to(output.dtype)

    def _prefill(self, new: list[Request]) -> None:
        for r in new:  # echo with logprobs: the prompt is the encoder's input, the decoder never scores it
            if r.params.prompt_logprobs is not None:
                r.finish_reason, r.error = "error", "prompt logprobs (echo) are not available for seq2seq models"
        new = [r for r in new if not r.finished]
        if not new:
            return
        width = max(len(r.prompt_ids) for r in new)
        ids = torch.full((len(new), width), self.pad_id, dtype=torch.long)
        enc_mask = torch.zeros((len(new), width), dtype=torch.long)
        for i, r in enumerate(new):  # right padding: each prompt token keeps the position it has alone
            ids[i, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
            enc_mask[i, : len(r.prompt_ids)] = 1
            start_sampler(r)
        ids, enc_mask = ids.to(self.device), enc_mask.to(self.device)
        self.multi.set_rows([r.adapter for r in new])
        encoder_out = self.model.get_encoder()(input_ids=ids, attention_mask=enc_mask).last_hidden_state
        start = torch.full((len(new), 1), self.start_id, dtype=torch.long, device=self.device)
        mask = torch.ones_like(start)
        cache = EncoderDecoderCache(DynamicCache(config=self.model.config), DynamicCache(config=self.model.config))
        logits = self._decoder_logits(start, mask, cache, encoder_out, enc_mask)
        tokens = self._sample(logits, new)
        keep = [i for i, r in enumerate(new) if not r.finished]
        if not keep:
            return
        self._join_encoder(encoder_out[keep], enc_mask[keep], _rows(cache.cross_attention_cache, keep))
        self._append([new[i] for i in keep], _rows(cache.self_attention_cache, keep), mask[keep], tokens[keep])

    def _decode(self) -> None:
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        self.multi.set_rows([r.adapter for r in self.rows])
        cache = EncoderDecoderCache(self.cache, self.cross)
        logits = self._decoder_logits(self.next_tokens[:, None], self.mask, cache, self.encoder_out, self.encoder_mask)
        self.next_tokens = self._sample(logits, self.rows)

    def _decoder_logits(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        cache: EncoderDecoderCache,
        encoder_out: torch.Tensor,
        enc_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (rows x vocab) of the decoder's next token after ``ids`` (``mask`` covers cache and ids)."""
        self.positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        try:
            out = self.model(
                encoder_outputs=BaseModelOutput(last_hidden_state=encoder_out),
                attention_mask=enc_mask,
                decoder_input_ids=ids,
                decoder_attention_mask=mask,
                cache=cache,
                use_cache=True,
            )
        finally:
            self.positions = None
        return out.logits[:, -1].float()

    # ---- the batch's encoder side ------------------------------------------------------------

    def _join_encoder(self, encoder_out: torch.Tensor, enc_mask: torch.Tensor, cross: DynamicCache) -> None:
        """Join new rows' encoder outputs, masks and cross-attention cache, right-padding the shorter side."""
        if not self.rows:
            self.encoder_out, self.encoder_mask, self.cross = encoder_out, enc_mask, cross
            return
        width = max(self.encoder_mask.shape[1], enc_mask.shape[1])
        self.encoder_out = torch.cat([_pad_right(self.encoder_out, width, 1), _pad_right(encoder_out, width, 1)])
        self.encoder_mask = torch.cat([_pad_right(self.encoder_mask, width, 1), _pad_right(enc_mask, width, 1)])
        merged = [
            (torch.cat([_pad_right(ko, width, 2), _pad_right(kn, width, 2)]),
             torch.cat([_pad_right(vo, width, 2), _pad_right(vn, width, 2)]))
            for (ko, vo), (kn, vn) in zip(_kv(self.cross), _kv(cross), strict=True)
        ]  # fmt: skip
        self.cross = DynamicCache(ddp_cache_data=merged, config=self.model.config)

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self.rows) if not (r.finished or r.cancelled)]
        if not keep:
            self.encoder_out, self.encoder_mask, self.cross = None, None, None
        elif len(keep) < len(self.rows):
            enc_mask = self.encoder_mask[keep]
            width = int(enc_mask.sum(dim=1).max())  # right padding: columns past the longest prompt are empty
            self.encoder_out, self.encoder_mask = self.encoder_out[keep, :width], enc_mask[:, :width]
            self.cross = _rows(self.cross, keep, width)
        super()._drop_finished()


def _kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _rows(cache: DynamicCache, rows: list[int], width: int | None = None) -> DynamicCache:
    """Rows ``rows`` of ``cache``, its columns cut at ``width`` (None: all)."""
    index = torch.tensor(rows, device=cache.layers[0].keys.device)
    data = [(k.index_select(0, index)[:, :, :width], v.index_select(0, index)[:, :, :width]) for k, v in _kv(cache)]
    return DynamicCache(ddp_cache_data=data)


def _pad_right(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros after ``t`` along ``dim`` up to ``width``."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    return F.pad(t, [0, 0] * (t.ndim - 1 - dim) + [0, missing])


__all__ = ["Seq2SeqEngine", "check_servable_model", "make_engine", "served_task"]

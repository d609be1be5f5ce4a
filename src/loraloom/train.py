"""One trainer for every adapter type (LoRA, FourierFT, IA3, ...) and for full fine-tuning.

``train`` puts the adapter into the model, encodes the examples for the model's task (seq2seq, causal
LM or sequence classification), and runs one plain loop: AdamW over the trainable parameters, linear
warm-up then linear decay, gradient accumulation, optional evaluation, the adapter saved at the end.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters.base import AdapterConfig, AdapterError
from .adapters.inject import CONFIG_ATTR, add_adapter, count_parameters, get_config, modules_to_save_of
from .adapters.peft_format import atomic_folder, save_adapter
from .adapters.registry import ADAPTER_TYPES
from .data import (
    TASKS,
    Example,
    batches,
    collate,
    encode_causal,
    encode_classification,
    encode_seq2seq,
    load_examples,
    pad_token_id_of,
    resolve_label2id,
    task_of,
)
from .evaluate import evaluate

FULL = "full"  # adapter="full": every parameter trains, no adapter layers

# Default learning rates, keyed by peft_type (or "full"). LoRA 2e-4 and full 3e-5 are the LoraHub
# paper's gradient baselines; IA3 3e-3 is T-Few's; FourierFT 5e-2 sits in the middle of its paper's
# 1e-2..1.2e-1 for the spectral coefficients. Tiny models and tiny data often want more: pass lr=.
DEFAULT_LR: dict[str, float] = {"LORA": 2e-4, "IA3": 3e-3, "FOURIERFT": 5e-2, FULL: 3e-5}


@dataclass
class TrainResult:
    model: nn.Module
    losses: list[float]  # mean training loss of each optimizer step
    evals: list[tuple[int, float]] = field(default_factory=list)  # (optimizer step, exact match or accuracy)
    output_dir: Path | None = None
    trainable_params: int = 0
    total_params: int = 0
    seconds: float = 0.0
    task: str = ""
    label2id: dict[str, int] | None = None


def adapter_config_for(name: str) -> AdapterConfig:
    """A default config of the adapter type named ``name`` ("lora", "fourierft", "ia3"; any case)."""
    cls = ADAPTER_TYPES.get(name.upper())
    if cls is None:
        available = ", ".join(sorted([t.lower() for t in ADAPTER_TYPES] + [FULL]))
        raise AdapterError(f"unknown adapter {name!r}; available: {available}")
    return cls()


def prepare_model(model: nn.Module, adapter: str | AdapterConfig | None, *, verbose: bool = True) -> str:
    """Make ``model`` trainable as asked; returns the kind trained: a peft_type or "full"."""
    if adapter is None:
        return get_config(model).peft_type  # errors clearly if there is no adapter to train
    if isinstance(adapter, str) and adapter.lower() == FULL:
        if getattr(model, CONFIG_ATTR, None) is not None:
            raise AdapterError("adapter='full' needs a plain model, but this one carries an adapter")
        model.requires_grad_(True)
        return FULL
    config = adapter_config_for(adapter) if isinstance(adapter, str) else adapter
    if not isinstance(config, AdapterConfig):
        raise AdapterError(f"adapter must be a name, an AdapterConfig, 'full' or None; got {type(adapter).__name__}")
    add_adapter(model, config, verbose=verbose)
    return config.peft_type


def encode(
    tokenizer: Any,
    examples: list[Example],
    task: str,
    *,
    max_source_length: int,
    max_target_length: int,
    label2id: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Tokenise ``examples`` for ``task``; causal LMs get prompt + target within max_source + max_target."""
    if task == "seq2seq":
        return encode_seq2seq(tokenizer, examples, max_source_length, max_target_length)
    if task == "causal":
        return encode_causal(tokenizer, examples, max_source_length + max_target_length)
    return encode_classification(tokenizer, examples, label2id or {}, max_source_length)


def make_optimizer(groups: list[dict[str, Any]], weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; the fused kernel updates every tensor in one call, several times faster for many small adapters."""
    try:
        return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, weight_decay=weight_decay, foreach=True)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then linear decay towards 0; ``step`` counts from 0 and no step gets lr 0."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return (total_steps - step) / (total_steps - warmup_steps)


def save_full_model(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike) -> Path:
    """A normal transformers folder, written whole into a temp folder beside it and swapped in."""
    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def train(
    model: nn.Module,
    tokenizer: Any,
    train_data: Any,
    *,
    adapter: str | AdapterConfig | None = "lora",
    task: str | None = None,
    input_field: str = "input",
    target_field: str = "target",
    epochs: int = 3,
    max_steps: int | None = None,
    batch_size: int = 8,
    grad_accum: int = 1,
    lr: float | None = None,
    head_lr: float | None = None,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.06,
    seed: int = 0,
    eval_data: Any = None,
    eval_every: int | None = None,
    eval_batch_size: int = 16,
    max_source_length: int = 512,
    max_target_length: int = 128,
    bf16: bool = False,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
    label2id: dict[str, int] | None = None,
) -> TrainResult:
    """Train ``model`` (in place) on ``train_data`` and return the losses, evaluations and counts.

    ``adapter``: a name from the adapter registry ("lora", "fourierft", "ia3"; default config and the
    model type's default targets), an ``AdapterConfig``, "full" for full fine-tuning, or None when the
    model already carries an adapter (e.g. from ``load_adapter``). ``train_data`` / ``eval_data``: anything
    ``load_examples`` reads. ``task``: "seq2seq", "causal" or "classification"; by default from the model.
    For causal LMs the loss is on the target tokens only and a sequence holds at most
    ``max_source_length + max_target_length`` tokens. For classification the targets map to label ids
    through ``label2id`` (default: the model config's if it names every target, else built from the
    data), which is written into ``model.config``. ``lr`` defaults per adapter type (DEFAULT_LR);
    ``head_lr`` (default: ``lr``) is for a classifier head trained beside an adapter. ``max_steps``, if
    given, replaces ``epochs``. With ``eval_data``, the model is scored (exact match, or accuracy for
    classification) every ``eval_every`` optimizer steps and at the end. With ``output_dir`` the adapter
    (or for "full", the whole model and the tokenizer) is saved at the end. The model ends in eval mode.
    """
    t0 = time.perf_counter()
    task = task or task_of(model)
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if batch_size < 1 or grad_accum < 1:
        raise ValueError(f"batch_size and grad_accum must be >= 1, got {batch_size} and {grad_accum}")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    examples = load_examples(train_data, input_field, target_field)
    eval_examples = load_examples(eval_data, input_field, target_field) if eval_data is not None else None
    if task == "classification":
        label2id = resolve_label2id(model, examples + (eval_examples or []), label2id)
        model.config.label2id = label2id
        model.config.id2label = {i: label for label, i in label2id.items()}
    features = encode(
        tokenizer,
        examples,
        task,
        max_source_length=max_source_length,
        max_target_length=max_target_length,
        label2id=label2id,
    )
    pad_id = pad_token_id_of(tokenizer)

    torch.manual_seed(seed)  # adapter init and dropout
    kind = prepare_model(model, adapter, verbose=progress)
    lr = lr if lr is not None else DEFAULT_LR.get(kind)
    if lr is None:
        raise ValueError(f"no default learning rate for adapter type {kind}; pass lr=")
    head_names = set() if kind == FULL else set(modules_to_save_of(model, get_config(model)))
    head_params = [p for n, m in model.named_modules() if n in head_names for p in m.parameters() if p.requires_grad]
    head_ids = {id(p) for p in head_params}
    body_params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": body_params, "lr": lr}]
    if head_params:
        groups.append({"params": head_params, "lr": head_lr if head_lr is not None else lr})
    for g in groups:
        g["base_lr"] = g["lr"]
    optimizer = make_optimizer(groups, weight_decay)

    n_batches = math.ceil(len(features) / batch_size)
    steps_per_epoch = math.ceil(n_batches / grad_accum)
    total_steps = max_steps if max_steps is not None else epochs * steps_per_epoch
    if total_steps < 1:
        raise ValueError(f"nothing to train: epochs={epochs}, max_steps={max_steps}")
    warmup_steps = min(round(warmup_ratio * total_steps), total_steps - 1)
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    no_cache = {} if task == "classification" else {"use_cache": False}  # no KV cache while training

    losses: list[torch.Tensor] = []  # one per optimizer step, kept on the device: no sync per step
    evals: list[tuple[int, float]] = []

    def run_eval(step: int) -> None:
        score = evaluate(
            model,
            tokenizer,
            eval_examples,
            task=task,
            batch_size=eval_batch_size,
            max_new_tokens=max_target_length,
            label2id=label2id,
            progress=False,
        ).score
        evals.append((step, score))
        model.train()

    bar = tqdm(total=total_steps, desc=f"train {kind.lower()}", disable=not progress, dynamic_ncols=True)
    model.train()
    step, epoch = 0, 0
    while step < total_steps:
        epoch_batches = list(batches(features, batch_size, shuffle=True, seed=seed + epoch))
        for start in range(0, len(epoch_batches), grad_accum):
            group = epoch_batches[start : start + grad_accum]
            step_loss = torch.zeros((), device=device)
            for feats in group:
                batch = {k: v.to(device, non_blocking=True) for k, v in collate(feats, pad_id).items()}
                with autocast:
                    loss = model(**batch, **no_cache).loss / len(group)
                loss.backward()
                step_loss += loss.detach()
            factor = lr_factor(step, total_steps, warmup_steps)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * factor
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            step += 1
            bar.update(1)
            if progress and (step % 10 == 0 or step == total_steps):
                bar.set_postfix(loss=f"{torch.stack(losses[-10:]).mean().item():.4f}", refresh=False)
            if eval_examples is not None and eval_every and step % eval_every == 0:
                run_eval(step)
            if step >= total_steps:
                break
        epoch += 1
    bar.close()
    if eval_examples is not None and (not evals or evals[-1][0] != step):
        run_eval(step)
    model.eval()

    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        if kind == FULL:
            save_full_model(model, tokenizer, out)
        else:
            save_adapter(model, out)
    trainable, total = count_parameters(model)
    return TrainResult(
        model=model,
        losses=torch.stack(losses).tolist(),
        evals=evals,
        output_dir=out,
        trainable_params=trainable,
        total_params=total,
        seconds=time.perf_counter() - t0,
        task=task,
        label2id=label2id,
    )


__all__ = ["DEFAULT_LR", "FULL", "TrainResult", "adapter_config_for", "lr_factor", "prepare_model", "train"]

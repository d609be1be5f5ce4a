"""One trainer for every adapter type (LoRA, FourierFT, IA3, ...) and for full fine-tuning.

``train`` puts the adapter into the model, encodes the examples for the model's task (seq2seq, causal
LM or sequence classification), and runs one plain loop: AdamW over the trainable parameters, linear
warm-up then linear decay, gradient accumulation, optional evaluation, the adapter saved at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from .adapters.peft_format import save_adapter
from .adapters.registry import ADAPTER_TYPES, adapter_names, config_for
from .data import (
    Example,
    batches,
    collate,
    encode_causal,
    encode_classification,
    encode_seq2seq,
    load_examples,
    pad_token_id_of,
    resolve_label2id,
)
from .devices import fast_bf16
from .evaluate import evaluate
from .files import atomic_folder, check_writable
from .tasks import TASKS, task_of

FULL = "full"  # adapter="full": every parameter trains, no adapter layers

# Full fine-tuning's default learning rate, the LoraHub paper's (an adapter type's is its config's
# ``default_lr``: LoRA 2e-4, the paper's; IA3 3e-3, T-Few's; FourierFT 5e-2, mid-range of its paper's).
# Tiny models and tiny data often want more: pass lr=.
FULL_LR = 3e-5
# What save_pretrained of a model and its tokenizer writes: a new save replaces all of an older one.
TRANSFORMERS_FILES = (
    "*.safetensors",
    "*.bin",
    "*.safetensors.index.json",
    "*.bin.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "spiece.model",
    "chat_template.*",
)


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


def prepare_model(model: nn.Module, adapter: str | AdapterConfig | None, *, verbose: bool = True) -> str:
    """Make ``model`` trainable as asked; returns the kind trained: a peft_type or "full"."""
    if adapter is None:
        return get_config(model).peft_type  # errors clearly if there is no adapter to train
    if isinstance(adapter, str) and adapter.lower() == FULL:
        if getattr(model, CONFIG_ATTR, None) is not None:
            raise AdapterError("adapter='full' needs a plain model, but this one carries an adapter")
        model.requires_grad_(True)
        return FULL
    if isinstance(adapter, str) and adapter.lower() not in adapter_names():
        raise AdapterError(f"unknown adapter {adapter!r}; available: {', '.join(sorted([*adapter_names(), FULL]))}")
    config = config_for(adapter) if isinstance(adapter, str) else adapter
    if not isinstance(config, AdapterConfig):
        raise AdapterError(f"adapter must be a name, an AdapterConfig, 'full' or None; got {type(adapter).__name__}")
    add_adapter(model, config, verbose=verbose)
    return config.peft_type


def encode(
    tokenizer: Any, examples: list[Example], task: str, args: TrainArgs, label2id: dict[str, int] | None = None
) -> list[dict[str, Any]]:
    """Tokenise ``examples`` for ``task``; causal LMs get prompt + target within max_source + max_target."""
    if task == "seq2seq":
        return encode_seq2seq(tokenizer, examples, args.max_source_length, args.max_target_length)
    if task == "causal":
        return encode_causal(tokenizer, examples, args.max_source_length + args.max_target_length)
    return encode_classification(tokenizer, examples, label2id or {}, args.max_source_length)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then linear decay towards 0; ``step`` counts from 0 and no step gets lr 0."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return (total_steps - step) / (total_steps - warmup_steps)


def save_full_model(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike) -> Path:
    """A normal transformers folder, written whole into a temp folder beside it and swapped in."""
    out_dir = Path(out_dir)
    with atomic_folder(out_dir, owns=TRANSFORMERS_FILES) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


@dataclass(frozen=True)
class TrainArgs:
    """How ``train`` trains: checked once on creation."""

    task: str | None = None
    """"seq2seq", "causal" or "classification"; None: from the model."""
    input_field: str = "input"
    """The input field of JSONL / JSON / CSV examples."""
    target_field: str = "target"
    """The target field of JSONL / JSON / CSV examples."""
    epochs: int = 3
    """Passes over the training data (``max_steps`` replaces it when given)."""
    max_steps: int | None = None
    """Optimizer steps in all; replaces ``epochs``."""
    batch_size: int = 8
    """Examples per forward pass."""
    grad_accum: int = 1
    """Forward passes per optimizer step."""
    lr: float | None = None
    """AdamW's peak learning rate; None: the adapter type's ``default_lr`` (full fine-tuning: FULL_LR)."""
    head_lr: float | None = None
    """For a classifier head trained beside an adapter; None: ``lr``."""
    weight_decay: float = 0.0
    """AdamW's weight decay."""
    warmup_ratio: float = 0.06
    """The share of steps of linear warm-up before the linear decay."""
    seed: int = 0
    """Adapter init, dropout and the order of batches."""
    eval_every: int | None = None
    """Score the eval data every N optimizer steps (and always at the end)."""
    eval_batch_size: int = 16
    """Examples per generation batch when scoring."""
    max_source_length: int = 512
    """Input tokens kept (causal LMs: prompt + target within max_source_length + max_target_length)."""
    max_target_length: int = 128
    """Target tokens kept, and new tokens generated when scoring."""
    bf16: bool | None = None
    """bfloat16 autocast of the forward pass; None: on where the device computes bf16 natively (``fast_bf16``:
    CUDA with bf16, CPUs with AVX512-BF16 or AMX), off elsewhere. The trained weights stay float32."""
    group_by_length: bool = True
    """Batch examples of similar length (shuffled in megabatches of 50 batches, as transformers'
    LengthGroupedSampler): on variable-length data most of a batch is otherwise padding."""
    compile: bool = False
    """``torch.compile`` the training forward pass (dynamic shapes; a C++ compiler on the CPU). Off by default:
    on a 2-core CPU 30 steps on FLAN-T5-small's shapes took 247 s compiled against 34 s eager (README)."""

    def __post_init__(self) -> None:
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        for name in ("epochs", "batch_size", "grad_accum", "eval_batch_size", "max_source_length", "max_target_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "epochs" else 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_steps", "eval_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        for name in ("lr", "head_lr"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number or None, got {value!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be True or False, got {self.compile!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio!r}")

    @classmethod
    def from_options(cls, args: TrainArgs | None = None, **options: Any) -> TrainArgs:
        """``args`` (default: the defaults) with ``options`` replaced; an unknown name is a clear error."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(f"unknown training option(s) {', '.join(unknown)}; TrainArgs has {', '.join(names)}")
        return cls(**options) if args is None else dataclasses.replace(args, **options)


def train(
    model: nn.Module,
    tokenizer: Any,
    train_data: Any,
    adapter: str | AdapterConfig | None = "lora",
    args: TrainArgs | None = None,
    *,
    eval_data: Any = None,
    output_dir: str | os.PathLike | None = None,
    label2id: dict[str, int] | None = None,
    progress: bool = True,
    **options: Any,
) -> TrainResult:
    """Train ``model`` (in place) on ``train_data`` and return the losses, evaluations and counts.

    ``adapter``: a name from the adapter registry ("lora", "fourierft", "ia3"; default config and the
    model type's default targets), an ``AdapterConfig``, "full" for full fine-tuning, or None when the
    model already carries an adapter (e.g. from ``load_adapter``). ``args``: how to train (``TrainArgs``);
    ``**options``: any of its fields by name, overriding ``args`` (``epochs=5, lr=1e-3``).
    ``train_data`` / ``eval_data``: anything ``load_examples`` reads. For classification the targets map to
    label ids through ``label2id`` (default: the model config's if it names every target, else built from
    the data), which is written into ``model.config``. With ``eval_data``, the model is scored (exact match,
    or accuracy for classification) every ``eval_every`` optimizer steps and at the end. With ``output_dir``
    the adapter (or for "full", the whole model and the tokenizer) is saved at the end. The model ends in
    eval mode.
    """
    t0 = time.perf_counter()
    args = TrainArgs.from_options(args, **options)
    if output_dir is not None:
        check_writable(output_dir)  # before training, not after it
    task = args.task or task_of(model)
    examples = load_examples(train_data, args.input_field, args.target_field)
    eval_examples = load_examples(eval_data, args.input_field, args.target_field) if eval_data is not None else None
    if task == "classification":
        label2id = resolve_label2id(model, examples + (eval_examples or []), label2id)
        model.config.label2id = label2id
        model.config.id2label = {i: label for label, i in label2id.items()}
    features = encode(tokenizer, examples, task, args, label2id)

    torch.manual_seed(args.seed)  # adapter init and dropout
    kind = prepare_model(model, adapter, verbose=progress)
    optimizer = adamw_for(model, kind, args)
    n_batches = math.ceil(len(features) / args.batch_size)
    total_steps = args.max_steps if args.max_steps is not None else args.epochs * math.ceil(n_batches / args.grad_accum)
    if total_steps < 1:
        raise ValueError(f"nothing to train: epochs={args.epochs}, max_steps={args.max_steps}")

    def score() -> float:
        generation = {"batch_size": args.eval_batch_size, "max_new_tokens": args.max_target_length}
        return evaluate(
            model, tokenizer, eval_examples, task=task, label2id=label2id, progress=False, **generation
        ).score

    scorer = score if eval_examples is not None else None
    losses, evals = run_steps(
        model, optimizer, features, pad_token_id_of(tokenizer), task, total_steps, args, score=scorer,
        desc=f"train {kind.lower()}", progress=progress,
    )  # fmt: skip
    model.eval()
    check_converging(losses, optimizer)

    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        if kind == FULL:
            save_full_model(model, tokenizer, out)
        else:
            save_adapter(model, out)
    trainable, total = count_parameters(model)
    return TrainResult(
        model=model,
        losses=losses,
        evals=evals,
        output_dir=out,
        trainable_params=trainable,
        total_params=total,
        seconds=time.perf_counter() - t0,
        task=task,
        label2id=label2id,
    )


def check_converging(losses: list[float], optimizer: torch.optim.Optimizer) -> None:
    """ValueError naming the step if a loss is NaN or inf: a run that diverged is not worth saving."""
    bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), None)
    if bad is not None:
        raise ValueError(
            f"training diverged: the loss is {losses[bad]} at step {bad + 1} of {len(losses)} "
            f"(lr {optimizer.param_groups[0]['base_lr']:g}); nothing was saved. Try a smaller --lr"
        )


def adamw_for(model: nn.Module, kind: str, args: TrainArgs) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: the adapter (or the whole model) at ``lr``, a head at ``head_lr``.

    The fused kernel updates every tensor in one call, several times faster for many small adapters.
    """
    lr = args.lr if args.lr is not None else FULL_LR if kind == FULL else ADAPTER_TYPES[kind].default_lr
    head_names = set() if kind == FULL else set(modules_to_save_of(model, get_config(model)))
    head_params = [p for n, m in model.named_modules() if n in head_names for p in m.parameters() if p.requires_grad]
    head_ids = {id(p) for p in head_params}
    body_params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": body_params, "lr": lr}]
    if head_params:
        groups.append({"params": head_params, "lr": args.head_lr if args.head_lr is not None else lr})
    for g in groups:
        g["base_lr"] = g["lr"]
    try:
        return torch.optim.AdamW(groups, weight_decay=args.weight_decay, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, weight_decay=args.weight_decay, foreach=True)


def run_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    features: list[dict[str, Any]],
    pad_id: int,
    task: str,
    total_steps: int,
    args: TrainArgs,
    *,
    score: Any = None,
    desc: str = "train",
    progress: bool = True,
) -> tuple[list[float], list[tuple[int, float]]]:
    """The training loop: ``total_steps`` optimizer steps of ``grad_accum`` batches; (losses, evaluations)."""
    warmup_steps = min(round(args.warmup_ratio * total_steps), total_steps - 1)
    device = next(model.parameters()).device
    bf16 = fast_bf16(device) if args.bf16 is None else args.bf16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    no_cache = {} if task == "classification" else {"use_cache": False}  # no KV cache while training
    forward = torch.compile(model, dynamic=True) if args.compile else model  # shares the model's parameters
    losses: list[torch.Tensor] = []  # one per optimizer step, kept on the device: no sync per step
    evals: list[tuple[int, float]] = []
    bar = tqdm(total=total_steps, desc=desc, disable=not progress, dynamic_ncols=True)
    model.train()
    step, epoch = 0, 0
    while step < total_steps:
        order = {"shuffle": True, "seed": args.seed + epoch, "by_length": args.group_by_length}
        epoch_batches = list(batches(features, args.batch_size, **order))
        for start in range(0, len(epoch_batches), args.grad_accum):
            group = epoch_batches[start : start + args.grad_accum]
            step_loss = torch.zeros((), device=device)
            for feats in group:
                batch = {k: v.to(device, non_blocking=True) for k, v in collate(feats, pad_id).items()}
                with autocast:
                    loss = forward(**batch, **no_cache).loss / len(group)
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
            if score is not None and args.eval_every and step % args.eval_every == 0:
                evals.append((step, score()))
                model.train()
            if step >= total_steps:
                break
        epoch += 1
    bar.close()
    if score is not None and (not evals or evals[-1][0] != step):
        evals.append((step, score()))
    return torch.stack(losses).tolist(), evals


__all__ = ["FULL", "FULL_LR", "TrainArgs", "TrainResult", "adamw_for", "lr_factor", "prepare_model", "train"]

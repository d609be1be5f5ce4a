"""``loraloom zoo build``: the zoo's base model and LoRA hub, rebuilt from seeds, resumably.

Steps (each one skipped when its output is already in the work folder, so an interrupted build goes on
where it stopped):

1. tokenizer: word-level (``tokenizers``), the world's words plus printable characters as a fallback;
2. base: a small T5 multi-task trained from scratch on the upstream instructed tasks. A checkpoint
   (model, optimizer, step) is written every ``chunk_steps`` steps (well under 10 minutes); batches
   depend only on (seed, step), so a resumed run sees the data an uninterrupted one would. At the end
   the weights are rounded to half precision (what ships) and each upstream task is scored;
3. modules: one LoRA (q, v) per upstream task and asking, trained with ``loraloom.train`` on the
   rounded base, scored on its own task, saved in half precision;
4. ship: the base, the modules, the held-out tasks as JSONL and ``manifest.json`` (settings, scores,
   SHA-256 of every file) are written into a temporary folder beside ``out`` and swapped in.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import string
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedTokenizerFast, T5ForConditionalGeneration

from ..adapters import LoraConfig
from ..adapters.inject import get_config
from ..adapters.peft_format import adapter_state_dict, write_adapter_folder
from ..data import Example, collate, encode_seq2seq
from ..evaluate import evaluate
from ..files import atomic_folder, atomic_write, check_writable, sha256_of
from ..train import lr_factor, train
from . import tasks as world
from .base import build_demo_t5, train_tokenizer  # the tokenizer the LoRA walk-through uses too

ARTIFACTS = Path(__file__).parent / "artifacts"
MANIFEST = "manifest.json"
ZOO_ENTRIES = ("base", "modules", "tasks", MANIFEST)  # what a build writes: replaced whole, the rest left
ZOO_VERSION = 1
# The demo's held-out tasks and pool are the bare ones: the task is known only from the 5 examples. The
# instructed held-out tasks ship too, but the base solves them zero-shot (it composes the instruction's
# category and format words by itself: 1.00 on all 8 when measured), so no method can improve on them.
DEMO_ASKING = "bare"
# What the shipped modules name as their base (a name, not a path on the machine that built them).
BASE_NAME = "loraloom-zoo/base"


@dataclass(frozen=True)
class BuildSettings:
    """Every choice of the build; recorded in the manifest. The defaults build the shipped zoo."""

    seed: int = 0
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    d_ff: int = 512
    base_steps: int = 5000
    base_batch_size: int = 64
    base_lr: float = 2e-3
    base_warmup_steps: int = 200
    chunk_steps: int = 500  # a checkpoint every chunk: ~40-60 s of CPU at this size
    module_rank: int = 8
    module_alpha: int = 16
    module_targets: tuple[str, ...] = ("q", "v")
    module_steps: int = 200
    module_batch_size: int = 32
    module_lr: float = 5e-3
    module_train_examples: int = 2000
    module_askings: tuple[str, ...] = world.ASKINGS
    eval_examples: int = 100
    held_out_examples: int = 105  # per held-out task file: 5 shots + 100 test

    def __post_init__(self) -> None:
        for name in (
            "base_steps",
            "base_batch_size",
            "chunk_steps",
            "module_steps",
            "module_batch_size",
            "module_train_examples",
            "eval_examples",
            "held_out_examples",
            "module_rank",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"BuildSettings.{name} must be >= 1, got {getattr(self, name)}")
        bad = set(self.module_askings) - set(world.ASKINGS)
        if bad:
            raise ValueError(f"BuildSettings.module_askings: unknown {sorted(bad)}; choose from {world.ASKINGS}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["module_targets"] = list(self.module_targets)
        d["module_askings"] = list(self.module_askings)
        return d


@dataclass
class BuildReport:
    out: Path
    base_scores: dict[str, float]
    module_scores: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)


# ---- model ---------------------------------------------------------------------------------------


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level over the world's words; printable characters (and ## continuations) spell anything else."""

    chars = " ".join(c for c in string.printable if not c.isspace())
    return train_tokenizer([*world.vocabulary_texts(), chars], vocab_size=10_000)


def make_base(tokenizer: PreTrainedTokenizerFast, settings: BuildSettings) -> T5ForConditionalGeneration:

    return build_demo_t5(
        tokenizer,
        d_model=settings.d_model,
        num_layers=settings.num_layers,
        num_heads=settings.num_heads,
        d_ff=settings.d_ff,
        seed=settings.seed,
    )


def round_to_half(model: torch.nn.Module) -> None:
    """Round every floating parameter to fp16 and back: train and score what ships."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())


def score_tasks(model, tokenizer, specs: list[world.TaskSpec], settings: BuildSettings) -> dict[str, float]:
    return {
        s.name: evaluate(
            model,
            tokenizer,
            world.make_examples(s, settings.eval_examples, settings.seed + 1000),
            batch_size=64,
            max_new_tokens=8,
            progress=False,
        ).score
        for s in specs
    }


# ---- steps ---------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def train_base(work: Path, settings: BuildSettings, progress: bool, log) -> tuple[Any, Any]:
    """Train (or resume, or load) the base; returns (model rounded to fp16 values, tokenizer)."""
    done_dir = work / "base"
    if (done_dir / "config.json").is_file():
        log(f"base: already built in {done_dir}")
        return AutoModelForSeq2SeqLM.from_pretrained(
            done_dir, dtype=torch.float32
        ).eval(), AutoTokenizer.from_pretrained(done_dir)
    tokenizer = make_tokenizer()
    model = make_base(tokenizer, settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.base_lr, weight_decay=0.0, fused=True)
    ckpt_file = work / "base_checkpoint.pt"
    step, losses = 0, []
    if ckpt_file.is_file():
        ckpt = torch.load(ckpt_file, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, losses = int(ckpt["step"]), list(ckpt["losses"])
        log(f"base: resuming at step {step}")
    pad_id = tokenizer.pad_token_id
    model.train()
    bar = tqdm(total=settings.base_steps, initial=step, desc="zoo base", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    while step < settings.base_steps:
        examples = [
            Example(e["input"], e["target"])
            for e in world.base_training_batch(step, settings.base_batch_size, settings.seed)
        ]
        batch = collate(encode_seq2seq(tokenizer, examples, 64, 16), pad_id)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        factor = lr_factor(step, settings.base_steps, settings.base_warmup_steps)
        for g in optimizer.param_groups:
            g["lr"] = settings.base_lr * factor
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.4f}", refresh=False)
        if step % settings.chunk_steps == 0 or step == settings.base_steps:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "losses": losses}
            atomic_write(ckpt_file, lambda tmp, s=state: torch.save(s, tmp))
            log(
                f"base: step {step}/{settings.base_steps} loss {sum(losses[-100:]) / min(len(losses), 100):.4f} "
                f"({time.perf_counter() - t0:.0f}s this run)"
            )
    bar.close()
    model.eval()
    round_to_half(model)
    tmp = Path(tempfile.mkdtemp(dir=work, prefix=".base."))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(done_dir, ignore_errors=True)
    os.replace(tmp, done_dir)
    _write_json(work / "base_losses.json", losses)
    return model, tokenizer


def train_module(base, tokenizer, spec: world.TaskSpec, out_dir: Path, settings: BuildSettings) -> float:
    """One LoRA for ``spec`` on a copy of ``base``; saved in fp16; returns its exact match on its own task."""
    model = copy.deepcopy(base)
    config = LoraConfig(
        r=settings.module_rank,
        lora_alpha=settings.module_alpha,
        target_modules=list(settings.module_targets),
        base_model_name_or_path=BASE_NAME,  # not the build machine's path
    )
    train(
        model,
        tokenizer,
        world.make_examples(spec, settings.module_train_examples, settings.seed),
        adapter=config,
        max_steps=settings.module_steps,
        batch_size=settings.module_batch_size,
        lr=settings.module_lr,
        seed=settings.seed,
        max_source_length=64,
        max_target_length=16,
        progress=False,
    )
    tensors = {k: v.detach().half() for k, v in adapter_state_dict(model).items()}
    with torch.no_grad():  # score what ships: the fp16-rounded adapter
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(p.half().float())
    score = score_tasks(model, tokenizer, [spec], settings)[spec.name]
    write_adapter_folder(out_dir, get_config(model), tensors)  # as resolved for the model: task_type set
    return score


def save_base_fp16(model, tokenizer, out_dir: Path) -> None:
    """The base as a normal HF folder with half-precision weights; it loads as fp32 (config dtype float32)."""
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    weights = out_dir / "model.safetensors"
    tensors = {k: v.half().contiguous() for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})


def ship(out: Path, work: Path, base, tokenizer, settings: BuildSettings, base_scores, module_scores, seconds) -> None:
    """Write the artifacts folder next to ``out`` and swap it in (never a half-written zoo)."""
    with atomic_folder(out, owns=ZOO_ENTRIES) as tmp:
        # A freshly made tokenizer (the same vocabulary) saves without a loaded one's local-path fields.
        save_base_fp16(base, make_tokenizer(), tmp / "base")
        for name in module_scores:
            shutil.copytree(work / "modules" / name, tmp / "modules" / name)
        (tmp / "tasks").mkdir()
        for spec in [*world.held_out_tasks("bare"), *world.held_out_tasks("instructed")]:
            examples = world.make_examples(spec, settings.held_out_examples, settings.seed + 2000)
            (tmp / "tasks" / f"{spec.name}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "zoo_version": ZOO_VERSION,
            "settings": settings.to_json(),
            "upstream": {
                s.name: {
                    "category": s.category,
                    "format": s.format,
                    "asking": s.asking,
                    "family": f"{s.format}/{s.asking}",
                    "base_accuracy": base_scores.get(s.name),
                    "module": f"modules/{s.name}" if s.name in module_scores else None,
                    "module_accuracy": module_scores.get(s.name),
                }
                for asking in world.ASKINGS
                for s in world.upstream_tasks(asking)
            },
            "held_out": [s.name for s in [*world.held_out_tasks("bare"), *world.held_out_tasks("instructed")]],
            "demo": {
                "tasks": [s.name for s in world.held_out_tasks(DEMO_ASKING)],
                "pool": [s.name for s in world.upstream_tasks(DEMO_ASKING) if s.name in module_scores],
            },
            "base_scores": base_scores,
            "seconds": seconds,
            "files": {str(p.relative_to(tmp)): sha256_of(p) for p in files},
        }
        _write_json(tmp / MANIFEST, manifest)


def build(
    out: str | os.PathLike = ARTIFACTS,
    work: str | os.PathLike = "zoo_work",
    settings: BuildSettings | None = None,
    *,
    progress: bool = True,
    log=print,
) -> BuildReport:
    """Build (or resume building) the zoo in ``work`` and ship it to ``out``; see the module docstring."""
    settings = settings or BuildSettings()
    out, work = Path(out), Path(work)
    check_writable(out)  # before the build, not after it
    work.mkdir(parents=True, exist_ok=True)
    recorded = _read_json(work / "settings.json")
    if recorded is not None and recorded != settings.to_json():
        raise ValueError(f"{work}: holds a build with other settings; use a new --work folder or delete it")
    _write_json(work / "settings.json", settings.to_json())
    state = _read_json(work / "state.json") or {"seconds": {}, "module_scores": {}}
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    t0 = time.perf_counter()
    base, tokenizer = train_base(work, settings, progress, log)
    if "base_scores" not in state:
        state["seconds"]["base"] = state["seconds"].get("base", 0.0) + time.perf_counter() - t0
        state["base_scores"] = score_tasks(base, tokenizer, world.upstream_tasks("instructed"), settings)
        _write_json(work / "state.json", state)
    log("base exact match: " + ", ".join(f"{k} {v:.2f}" for k, v in state["base_scores"].items()))

    specs = [s for asking in settings.module_askings for s in world.upstream_tasks(asking)]
    bar = tqdm(specs, desc="zoo modules", disable=not progress, dynamic_ncols=True)
    for spec in bar:
        if spec.name in state["module_scores"]:
            continue
        t1 = time.perf_counter()
        score = train_module(base, tokenizer, spec, work / "modules" / spec.name, settings)
        state["module_scores"][spec.name] = score
        state["seconds"]["modules"] = state["seconds"].get("modules", 0.0) + time.perf_counter() - t1
        _write_json(work / "state.json", state)
        log(f"module {spec.name}: exact match {score:.2f} ({time.perf_counter() - t1:.1f}s)")
    ship(out, work, base, tokenizer, settings, state["base_scores"], state["module_scores"], state["seconds"])
    log(f"zoo shipped to {out}")
    return BuildReport(out, state["base_scores"], state["module_scores"], state["seconds"])


__all__ = ["ARTIFACTS", "MANIFEST", "BuildReport", "BuildSettings", "build", "make_tokenizer"]

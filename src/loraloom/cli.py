"""The ``loraloom`` command: a thin shell over the public API.

Each subcommand is a ``cmd_<name>(args) -> int`` function plus one parser block in ``build_parser``.
Bad input (an adapter file, a data file, a config value) ends with one line ``loraloom: error: ...``
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from .adapters import ADAPTER_TYPES, AdapterConfig, load_adapter, merge_and_unload, read_adapter
from .adapters.base import AdapterError
from .adapters.inject import matches, task_type_of_class
from .adapters.peft_format import (
    CONFIG_NAME,
    KEY_PREFIX,
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    normalise_key,
    read_json_object,
)
from .data import TASKS, Example, default_label2id, load_examples
from .demo import add_demo_arguments
from .evaluate import evaluate
from .experiment import DEFAULT_METHODS, METHODS, ExperimentSettings, experiment, load_results, report
from .hub import DEFAULT_MODE, DEFAULT_POPULATION, MODES, LoraHubResult, list_pool, lorahub
from .hub.search import DEFAULT_BUDGETS, OptimizerError
from .train import FULL, adapter_config_for, save_full_model, train

MODEL_CLASSES = {
    "seq2seq": AutoModelForSeq2SeqLM,
    "causal": AutoModelForCausalLM,
    "classification": AutoModelForSequenceClassification,
}


# ---- base models -------------------------------------------------------------------------------


def task_from_config(config: Any) -> str:
    """ "seq2seq" for encoder-decoders, "classification" for *ForSequenceClassification, else "causal"."""
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or []):
        return "classification"
    return "causal"


def model_source(name_or_path: str) -> str:
    """A local folder (``~`` expanded) or a hub id; a path that is not a folder is an error naming it."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    # A hub id is "name" or "owner/name": anything else is a mistyped path, not worth a hub request.
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ValueError(f"{name_or_path}: not a model folder")
    return name_or_path


# PEFT's task_type -> the CLI's task.
ADAPTER_TASKS = {"SEQ_2_SEQ_LM": "seq2seq", "CAUSAL_LM": "causal", "SEQ_CLS": "classification"}
# Head weights whose first dimension is the number of labels of a saved classifier.
CLASSIFIER_KEYS = ("classifier.weight", "score.weight", "classifier.out_proj.weight")


def task_of_adapter(config: AdapterConfig) -> str | None:
    """The CLI task an adapter was trained for: its task_type, else the class in PEFT's auto_mapping."""
    task_type = config.task_type
    if task_type is None and config.auto_mapping:
        task_type = task_type_of_class(str(config.auto_mapping.get("base_model_class", "")))
    return ADAPTER_TASKS.get(task_type or "")


def load_base(
    name_or_path: str,
    task: str | None = None,
    *,
    examples: Sequence[Example] | None = None,
    adapter: str | None = None,
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a local folder or a hub id, with ``adapter`` (a folder or hub id) loaded.

    The Auto class follows ``task``, else the adapter's task_type, else the base config; an explicit
    ``task`` that contradicts the adapter's is an error naming both. For classification, unless the config
    already names every label of ``examples``, their labels (numbered as ``train`` numbers them) replace
    the config's and the head is built anew for them; without examples a saved head sets the label count.
    """
    source = model_source(name_or_path)
    config = AutoConfig.from_pretrained(source)
    adapter_config, tensors, _ = read_adapter(adapter) if adapter else (None, {}, None)
    adapter_task = task_of_adapter(adapter_config) if adapter_config is not None else None
    if task and adapter_task and task != adapter_task:
        raise ValueError(
            f"--task {task} contradicts the adapter {adapter}: it was trained for {adapter_task} "
            f"(task_type {adapter_config.task_type or adapter_config.auto_mapping})"
        )
    task = task or adapter_task or task_from_config(config)
    if task not in MODEL_CLASSES:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    kwargs: dict[str, Any] = {}
    label2id = default_label2id(examples) if task == "classification" and examples else None
    head = [t for k, t in tensors.items() if normalise_key(k).endswith(CLASSIFIER_KEYS)]
    if task == "classification" and not label2id and head and head[0].shape[0] != config.num_labels:
        config.num_labels = head[0].shape[0]  # the adapter's head decides; labels are then LABEL_0, ...
        kwargs["ignore_mismatched_sizes"] = True
    if label2id and not set(label2id) <= set(config.label2id or {}):
        config.num_labels = max(label2id.values()) + 1
        config.label2id = dict(label2id)
        config.id2label = {i: label for label, i in label2id.items()}
        kwargs["ignore_mismatched_sizes"] = True  # the base's head (if any) has other labels
    model = MODEL_CLASSES[task].from_pretrained(source, config=config, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    if adapter:
        load_adapter(model, adapter)
    return model, tokenizer


# ---- train -------------------------------------------------------------------------------------

# Adapter options of `loraloom train` -> the config field they set, in whichever adapter types have it.
ADAPTER_OPTIONS = {
    "r": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "n_frequency": "n_frequency",
    "scaling": "scaling",
}


def adapter_from_args(args: argparse.Namespace) -> AdapterConfig | str:
    """The AdapterConfig that ``train`` gets (or "full"); an option the adapter type lacks is an error."""
    given = {opt: getattr(args, opt) for opt in ADAPTER_OPTIONS if getattr(args, opt) is not None}
    targets = args.target_regex or ([t.strip() for t in args.targets.split(",")] if args.targets else None)
    if args.adapter == FULL:
        if given or targets:
            flags = ", ".join(f"--{o.replace('_', '-')}" for o in given) or "--targets/--target-regex"
            raise ValueError(f"{flags}: not an option of --adapter full")
        return FULL
    config = adapter_config_for(args.adapter)
    fields = {f.name for f in dataclasses.fields(config)}
    kwargs: dict[str, Any] = {"target_modules": targets}
    for opt, value in given.items():
        if ADAPTER_OPTIONS[opt] not in fields:
            raise ValueError(f"--{opt.replace('_', '-')}: not an option of --adapter {args.adapter}")
        kwargs[ADAPTER_OPTIONS[opt]] = value
    return dataclasses.replace(config, **kwargs)  # re-runs the config's own validation


def cmd_train(args: argparse.Namespace) -> int:
    # Everything the user gave is checked before the model loads: a bad file fails at once.
    adapter = adapter_from_args(args)
    examples = load_examples(args.train, args.input_field, args.target_field)
    eval_examples = load_examples(args.eval, args.input_field, args.target_field) if args.eval else None
    model, tokenizer = load_base(args.base, args.task, examples=examples)
    result = train(
        model,
        tokenizer,
        examples,
        adapter=adapter,
        task=args.task,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        seed=args.seed,
        eval_data=eval_examples,
        eval_every=args.eval_every,
        bf16=args.bf16,
        output_dir=args.out,
    )
    print(
        f"trained {args.adapter} on {args.train}: {len(result.losses)} steps in {result.seconds:.1f}s, "
        f"final loss {result.losses[-1]:.4f}, trainable params {result.trainable_params:,} "
        f"of {result.total_params:,}"
    )
    for step, score in result.evals:
        print(f"  eval at step {step}: {score:.4f}")
    print(f"saved to {result.output_dir}")
    return 0


# ---- eval / merge ------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    examples = load_examples(args.data, args.input_field, args.target_field)
    # (a classifier trained by `loraloom train` numbered its labels by the same rule)
    model, tokenizer = load_base(args.base, args.task, examples=examples, adapter=args.adapter)
    result = evaluate(
        model,
        tokenizer,
        examples,
        task=args.task,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        predictions_file=args.out,
    )
    print(f"{args.data}: {result}")
    if args.out:
        print(f"predictions written to {args.out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    model, tokenizer = load_base(args.base, args.task, adapter=args.adapter)
    merged = merge_and_unload(model)
    save_full_model(merged, tokenizer, Path(args.out))
    print(f"merged {args.adapter} into {args.base}: wrote {args.out}")
    return 0


def cmd_compose(args: argparse.Namespace) -> int:
    """Exit 0 when the search ran its budget; 1 when an optimizer error cut it short, 130 when Ctrl-C did
    (the best weights so far are saved either way, marked in weights.json); 2 on bad input."""
    if args.pool is not None:
        size = len(list_pool(args.pool))
        if args.num > size:
            print(f"loraloom: note: --num {args.num}, but the pool holds {size} modules: using all", file=sys.stderr)
            args.num = size
    examples = load_examples(args.examples, args.input_field, args.target_field)
    model, tokenizer = load_base(args.base, args.task)
    with warnings.catch_warnings():
        warnings.showwarning = _warning_line  # one line each, no source location (restored on exit)
        try:
            result = _compose(args, model, tokenizer, examples)
        except OptimizerError as e:
            print(f"loraloom: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 1
    out = result.save(args.out)
    print(
        f"best objective {result.objective:.4f} after {len(result.trace)} evaluations "
        f"({result.settings['method']}, {len(result.modules)} modules chosen by {result.selection.method})"
        + ("" if result.complete else ", search cut short")
    )
    print(f"wrote {out}/adapter, weights.json, trace.csv, trace.png")
    if args.merge and not result.interrupted:
        save_full_model(result.merge(), tokenizer, out / "merged")
        print(f"merged the composed module into the base: wrote {out / 'merged'}")
    return 130 if result.interrupted else 0 if result.complete else 1


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"loraloom: warning: {' '.join(str(message).split())}", file=sys.stderr)


def _compose(args: argparse.Namespace, model: nn.Module, tokenizer: Any, examples: list[Example]) -> LoraHubResult:
    return lorahub(
        model,
        args.modules,
        examples,
        tokenizer=tokenizer,
        pool=args.pool,
        num=args.num,
        select=args.select,
        budget=args.budget,
        seed=args.seed,
        optimizer=args.optimizer,
        population=args.population,
        objective=args.objective,
        dtype="bf16" if args.bf16 else None,
        mode=args.mode,
        progress=True,
    )


# ---- experiment, report ------------------------------------------------------------------------

# `loraloom experiment` flags for the most used settings; every other one through --set NAME=VALUE.
EXPERIMENT_FLAGS = ("shots", "max_test", "num_modules", "budget", "epochs", "gradient_runs")


def parse_seeds(text: str) -> list[int]:
    """ "1-5" -> [1, 2, 3, 4, 5]; "1,3,7-8" -> [1, 3, 7, 8]."""
    seeds: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"--seeds {text!r}: expected numbers and ranges such as 1-5 or 1,3,7-8")
        seeds += list(range(int(first), int(last) + 1)) if dash else [int(first)]
    return seeds


def experiment_settings(args: argparse.Namespace) -> ExperimentSettings:
    """ExperimentSettings from --set NAME=VALUE (VALUE read as JSON, else as text) and the named flags."""
    values: dict[str, Any] = {}
    for item in args.set or []:
        name, eq, text = item.partition("=")
        if not eq or not name.strip():
            raise ValueError(f"--set {item!r}: expected NAME=VALUE, e.g. --set max_new_tokens=16")
        try:
            values[name.strip().replace("-", "_")] = json.loads(text)
        except json.JSONDecodeError:
            values[name.strip().replace("-", "_")] = text
    values.update({f: getattr(args, f) for f in EXPERIMENT_FLAGS if getattr(args, f) is not None})
    return ExperimentSettings.from_dict(values)


def cmd_experiment(args: argparse.Namespace) -> int:
    results = experiment(
        args.base,
        pool=args.pool,
        tasks=args.tasks,
        methods=args.methods,
        seeds=parse_seeds(args.seeds),
        out=args.out,
        settings=experiment_settings(args),
        task_filter=args.task_filter,
        ray=args.ray,
    )
    print(results.markdown())
    print(f"wrote {report(args.out)}, results.csv and plots/ in {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    path = report(args.run_dir, plots=not args.no_plots)
    print(load_results(args.run_dir)[0].markdown())
    print(f"wrote {path}")
    return 0


# ---- inspect -----------------------------------------------------------------------------------


def _file_size(paths: list[Path]) -> str:
    size = sum(p.stat().st_size for p in paths)
    if size < 1000:
        return f"{size} B"
    for unit in ("kB", "MB", "GB"):
        size /= 1000
        if size < 1000 or unit == "GB":
            break
    return f"{size:.1f} {unit}"


def inspect_adapter(folder: Path) -> dict[str, Any]:
    config, tensors, folder = read_adapter(folder)
    targets = config.target_modules or []
    layers: set[str] = set()
    adapter_params = other_params = 0
    for key, t in tensors.items():
        parts = normalise_key(key).removeprefix(KEY_PREFIX).split(".")
        # The adapted layer is the shortest leading path that the targets match; the rest is the
        # adapter's parameter (lora_A.weight, fourierft_spectrum, ...). No match: a module trained in full.
        layer = next((".".join(parts[:i]) for i in range(1, len(parts)) if matches(targets, ".".join(parts[:i]))), None)
        if layer is None:
            other_params += t.numel()
        else:
            layers.add(layer)
            adapter_params += t.numel()
    common = {f.name for f in dataclasses.fields(AdapterConfig)}
    settings = {
        k: v for k, v in config.to_dict().items() if k not in common and k != "peft_type" and v not in ({}, None)
    }
    weights = [p for p in (folder / WEIGHTS_NAME, folder / LEGACY_WEIGHTS_NAME) if p.is_file()][:1]
    return {
        "folder": str(folder),
        "peft_type": config.peft_type,
        "task_type": config.task_type,
        "base_model": config.base_model_name_or_path,
        "targets": targets,
        "adapted_layers": len(layers),
        "trainable_params": adapter_params + other_params,
        "adapter_params": adapter_params,
        "modules_to_save": config.modules_to_save,
        "modules_to_save_params": other_params,
        "tensors": len(tensors),
        "file": weights[0].name,
        "file_size": _file_size(weights),
        "settings": settings,
    }


def inspect_full_model(folder: Path) -> dict[str, Any]:
    """A full fine-tuning folder: config.json + model.safetensors (or shards); only file headers are read."""
    config = read_json_object(folder / "config.json")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json_object(index).get("weight_map", {}).values()))
        files = [folder / n for n in names]
    else:
        files = [folder / "model.safetensors"]
    params = 0
    for file in files:
        if not file.is_file():
            raise AdapterError(f"{folder}: no {file.name} (loraloom inspects safetensors weights only)")
        try:
            with safe_open(file, framework="pt") as f:
                params += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
        except (SafetensorError, OSError) as e:
            raise AdapterError(f"{file}: cannot read safetensors file: {e}") from e
    return {
        "folder": str(folder),
        "peft_type": "FULL",
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "base_model": config.get("_name_or_path") or None,
        "trainable_params": params,
        "file": files[0].name if len(files) == 1 else f"{len(files)} shards",
        "file_size": _file_size(files),
        "tokenizer": any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")),
    }


def inspect_folder(path: str | Path) -> dict[str, Any]:
    """What an adapter folder (any PEFT type, made by loraloom or PEFT) or a full fine-tuning folder holds."""
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(f"{folder}: not a folder")
    if not (folder / CONFIG_NAME).is_file() and (folder / "config.json").is_file():
        return inspect_full_model(folder)
    return inspect_adapter(folder)


def cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_folder(args.dir)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    settings = info.pop("settings", {})
    for key, value in info.items():
        if isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) if value else "-"
        print(f"{key.replace('_', ' ') + ':':24}{value if value is not None else '-'}")
    for key, value in settings.items():
        print(f"{key.replace('_', ' ') + ':':24}{value}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert  # diffusers (for a UNet --base) is imported only here

    for path in convert(args.source, args.out, base=args.base, component=args.component):
        print(f"loraloom: wrote {path}")
    return 0


# ---- serve -------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve.app import ServeOptions, serve
    except ImportError as e:
        raise ValueError(f"loraloom serve needs FastAPI and uvicorn: pip install 'loraloom[serve]' ({e})") from e
    named = {}
    for item in args.adapter or []:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise ValueError(f"--adapter {item}: expected NAME=FOLDER_OR_HUB_ID")
        named[name] = source
    options = ServeOptions(
        base=args.base,
        adapters=args.adapters,
        named=named,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        cache_mib=args.cache_mib,
        ray_replicas=args.ray_replicas,
    )
    serve(options)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_from_args

    run_from_args(args)
    return 0


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from .zoo.build import ARTIFACTS, build

    build(args.out or ARTIFACTS, args.work, progress=not args.quiet)
    return 0


def cmd_zoo_verify(args: argparse.Namespace) -> int:
    from .zoo.build import ARTIFACTS
    from .zoo.verify import verify

    report = verify(args.dir or ARTIFACTS)
    print(
        f"zoo ok: {report.folder}: {report.files} files ({report.bytes / 1e6:.1f} MB) match the manifest; "
        f"base loads; {report.modules} modules; {report.held_out} held-out tasks"
    )
    return 0


# ---- the parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraloom", description="Train, evaluate, merge and inspect PEFT-format adapters."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    base = argparse.ArgumentParser(add_help=False)
    base.add_argument("--base", required=True, help="base model: a local folder or a hub id")
    base.add_argument("--task", choices=TASKS, help="default: from the model's config")
    fields = argparse.ArgumentParser(add_help=False)
    fields.add_argument("--input-field", default="input", help="default: %(default)s")
    fields.add_argument("--target-field", default="target", help="default: %(default)s")

    p = sub.add_parser("train", parents=[base, fields], help="train an adapter (or the full model)")
    p.add_argument("--train", required=True, metavar="FILE", help=".jsonl, .json or .csv examples")
    p.add_argument("--eval", metavar="FILE", help="examples to score during and after training")
    p.add_argument("--eval-every", type=int, metavar="N", help="score every N optimizer steps")
    p.add_argument("--adapter", default="lora", choices=sorted(t.lower() for t in ADAPTER_TYPES) + [FULL])
    p.add_argument("--r", type=int, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default 8)")
    p.add_argument("--dropout", type=float, help="LoRA dropout (default 0)")
    targets = p.add_mutually_exclusive_group()
    targets.add_argument("--targets", help="comma-separated module names, e.g. q,v (default: per model type)")
    targets.add_argument("--target-regex", help="regex matched against each module's full path")
    p.add_argument("--n-frequency", type=int, help="FourierFT: coefficients per layer (default 1000)")
    p.add_argument("--scaling", type=float, help="FourierFT: scaling (default 150)")
    p.add_argument("--epochs", type=int, default=3, help="default: %(default)s")
    p.add_argument("--max-steps", type=int, help="optimizer steps; replaces --epochs")
    p.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")
    p.add_argument("--grad-accum", type=int, default=1, help="default: %(default)s")
    p.add_argument("--lr", type=float, help="default: per adapter type (LoRA 2e-4, IA3 3e-3, FourierFT 5e-2)")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--out", required=True, metavar="DIR", help="where the adapter (or full model) is saved")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("eval", parents=[base, fields], help="exact match (or accuracy) of a model on examples")
    p.add_argument("--adapter", metavar="DIR", help="adapter folder or hub id to load into the base")
    p.add_argument("--data", required=True, metavar="FILE", help=".jsonl, .json or .csv examples")
    p.add_argument("--out", metavar="FILE", help="write every prediction here (JSONL)")
    p.add_argument("--batch-size", type=int, default=16, help="default: %(default)s")
    p.add_argument("--max-new-tokens", type=int, default=32, help="default: %(default)s")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("merge", parents=[base], help="merge an adapter into the base and save a plain model")
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter folder or hub id")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (model + tokenizer)")
    p.set_defaults(run=cmd_merge)

    p = sub.add_parser(
        "compose",
        parents=[base, fields],
        help="LoraHub: compose LoRA modules for a new task",
        epilog="exit status: 0 the search ran its budget; 1 an optimizer error cut it short; 130 Ctrl-C cut it "
        "short (either way the best weights so far are saved, marked in weights.json); 2 bad input",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--modules", nargs="+", metavar="DIR", help="LoRA module folders or hub ids")
    source.add_argument("--pool", metavar="DIR", help="a folder of module folders to choose --num from")
    p.add_argument(
        "--num",
        type=int,
        default=20,
        help="modules to choose from --pool (default: %(default)s; all of them, with a note, if the pool holds fewer)",
    )
    p.add_argument("--select", choices=("random", "retrieval"), default="random", help="default: %(default)s")
    p.add_argument("--examples", required=True, metavar="FILE", help="few-shot .jsonl, .json or .csv examples")
    p.add_argument(
        "--budget",
        type=int,
        help="objective evaluations, or Adam steps in gradient mode (default: "
        + ", ".join(f"{mode} {n}" for mode, n in DEFAULT_BUDGETS.items())
        + ")",
    )
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--optimizer", default="NGOpt", help="a nevergrad optimizer name (default: %(default)s)")
    p.add_argument(
        "--population", type=int, default=DEFAULT_POPULATION, help="candidates a pass (default: %(default)s)"
    )
    p.add_argument("--objective", choices=("mean", "reference"), default="mean", help="default: %(default)s")
    p.add_argument(
        "--mode",
        choices=MODES,
        default=DEFAULT_MODE,
        help="gradient: Adam on w; nevergrad: gradient-free (the paper); hybrid: nevergrad then Adam "
        "(default: %(default)s)",
    )
    p.add_argument("--bf16", action="store_true", help="evaluate in bfloat16")
    p.add_argument("--out", required=True, metavar="DIR", help="adapter/, weights.json, trace.csv, trace.png")
    p.add_argument("--merge", action="store_true", help="also save the base with the module merged, in OUT/merged")
    p.set_defaults(run=cmd_compose)

    p = sub.add_parser("serve", help="an OpenAI-compatible server for many adapters on one base model")
    p.add_argument("--base", required=True, help="base causal LM: a local folder or a hub id")
    p.add_argument("--adapters", metavar="DIR", help="folder of adapter folders (a request's model names one)")
    p.add_argument("--adapter", action="append", metavar="NAME=SOURCE", help="one more adapter: folder or hub id")
    p.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument("--max-batch", type=int, default=32, help="rows decoded together (default: %(default)s)")
    p.add_argument("--cache-mib", type=float, default=1024.0, help="adapter cache limit (default: %(default)s)")
    p.add_argument("--ray-replicas", type=int, default=0, metavar="N", help="N replicas with Ray Serve")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("inspect", help="describe an adapter folder or a full fine-tuning folder")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser(
        "convert",
        help="kohya / A1111 SD LoRA file -> PEFT folders (one per model), or PEFT folder(s) -> kohya file",
    )
    p.add_argument("source", metavar="SOURCE", help="a kohya .safetensors file, or a PEFT folder (or folder of them)")
    p.add_argument("out", metavar="OUT", help="the folder for PEFT folders, or the kohya .safetensors file to write")
    p.add_argument("--base", help="for a kohya SOURCE: the diffusers pipeline (or UNet / text encoder) folder")
    p.add_argument(
        "--component",
        choices=["unet", "text_encoder", "text_encoder_2"],
        help="for a single PEFT folder: the model it adapts (default: unet)",
    )
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("experiment", help="the LoraHub protocol: methods x tasks x seeds, resumable, into RUN_DIR")
    p.add_argument("--base", required=True, help="base model: a local folder or a hub id")
    p.add_argument("--pool", metavar="DIR", help="folder of LoRA module folders (lorahub*, retrieval-best)")
    p.add_argument("--tasks", required=True, help="bbh:DIR, bbh:download or jsonl:DIR")
    p.add_argument("--task-filter", metavar="GLOB", help="only the tasks whose name matches")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated, from: {', '.join(METHODS)} (default: %(default)s)",
    )
    p.add_argument("--seeds", default="1-5", help="e.g. 1-5 or 1,3 (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="results.sqlite, predictions/, report.md, plots/")
    for name in EXPERIMENT_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"default: {getattr(ExperimentSettings, name)}")
    p.add_argument(
        "--set", action="append", metavar="NAME=VALUE", help="any ExperimentSettings field, VALUE as JSON (repeatable)"
    )
    p.add_argument("--ray", nargs="?", const=True, metavar="ADDRESS", help="run cells on Ray: local, or at ADDRESS")
    p.set_defaults(run=cmd_experiment)

    p = sub.add_parser("report", help="report.md, results.csv and plots from an experiment's RUN_DIR")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(run=cmd_report)

    p = sub.add_parser("demo", help="LoraHub on the built-in zoo (the main job); `demo lora`: the LoRA walk-through")
    add_demo_arguments(p)
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("zoo", help="the built-in demo world: build it from seeds, or verify the shipped one")
    zoo = p.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    q = zoo.add_parser("build", help="rebuild the base model and modules (resumable; ~10 min on 2 cores)")
    q.add_argument("--out", metavar="DIR", help="where the artifacts go (default: the package's zoo/artifacts)")
    q.add_argument("--work", default="zoo_work", metavar="DIR", help="checkpoints, to resume (default: %(default)s)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(run=cmd_zoo_build)
    q = zoo.add_parser("verify", help="check the shipped (or a built) zoo against its manifest's SHA-256s")
    q.add_argument("dir", nargs="?", metavar="DIR", help="default: the package's zoo/artifacts")
    q.set_defaults(run=cmd_zoo_verify)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    except (ValueError, OSError) as e:  # AdapterError and DataError are ValueErrors
        print(f"loraloom: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loraloom: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``loraloom`` command: a thin shell over the public API.

Each subcommand is a pair: ``add_<name>(subparsers)`` declares its options (choices and defaults come from the
library's constants and config fields, never typed twice) and ``cmd_<name>(args) -> int`` calls the library.
Bad input (an adapter file, a data file, a config value) ends with one line ``loraloom: error: ...`` and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from .adapters import ADAPTER_TYPES, AdapterConfig, adapter_names, merge_and_unload
from .adapters.inspect import describe, inspect_folder
from .adapters.registry import cli_option_fields, config_from_options
from .data import load_examples
from .demo import add_demo_arguments
from .devices import add_device_arguments, resolve_device, resolve_dtype
from .evaluate import evaluate
from .files import check_writable
from .harness import DEFAULT_METHODS, METHODS, ExperimentSettings, experiment, load_results, report
from .hub import DEFAULT_MODE, DEFAULT_OPTIMIZER, DEFAULT_POPULATION, MODES, SearchSettings, list_pool, lorahub
from .hub.combine import CombineSettings, add_combine_arguments, combine
from .hub.objective import FORMULAS
from .hub.result import MERGED_DIR
from .hub.search import ADAM_STEP_COST, DEFAULT_BUDGET, OptimizerError
from .hub.select import DEFAULT_NUM
from .hub.select import METHODS as SELECT_METHODS
from .models import QUANTIZE, load_base
from .seeds import parse_seeds
from .serve.options import ServeOptions, add_serve_arguments, named_adapters
from .tasks import TASKS
from .train import FULL, FULL_LR, TrainArgs, save_full_model, train

# Options shared by the commands that load a base model and read examples.
BASE_OPTIONS = argparse.ArgumentParser(add_help=False)
BASE_OPTIONS.add_argument("--base", required=True, help="base model: a local folder or a hub id")
BASE_OPTIONS.add_argument("--task", choices=TASKS, help="default: from the adapter's task_type or the model's config")
PLACE_OPTIONS = add_device_arguments(argparse.ArgumentParser(add_help=False))  # every command that loads a model
DEVICE_OPTIONS = argparse.ArgumentParser(add_help=False, parents=[PLACE_OPTIONS])
DEVICE_OPTIONS.add_argument("--device-map", choices=["auto"], help="spread a large base over every device")
DEVICE_OPTIONS.add_argument("--quantize", choices=QUANTIZE, help="a weight-only quantized base: int8, or int4 on CUDA")
FIELD_OPTIONS = argparse.ArgumentParser(add_help=False)
FIELD_OPTIONS.add_argument("--input-field", default="input", help="default: %(default)s")
FIELD_OPTIONS.add_argument("--target-field", default="target", help="default: %(default)s")


def default_of(cls: type, name: str) -> Any:
    """A dataclass field's default: the one place a CLI default comes from."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def placement(args: argparse.Namespace) -> dict[str, Any]:
    """``load_base``'s device, dtype and device_map from the options, checked before anything loads."""
    resolve_dtype(args.dtype, resolve_device(args.device))  # a missing device or a bad dtype: one line, exit 2
    if getattr(args, "out", None):
        check_writable(args.out)  # an --out that cannot be written fails before the model loads
    return {"device": args.device, "dtype": args.dtype, "device_map": args.device_map, "quantize": args.quantize}


def options_of(cls: type, args: argparse.Namespace, **more: Any) -> Any:
    """An options dataclass (TrainArgs, SearchSettings, ServeOptions) from the parsed options of the same names."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**given, **more})


def adapter_from_args(args: argparse.Namespace) -> AdapterConfig | str:
    """The AdapterConfig that ``train`` gets (or "full"); an option the adapter type lacks is an error."""
    given = {opt: getattr(args, opt) for opt in cli_option_fields() if getattr(args, opt) is not None}
    targets = args.target_regex or ([t.strip() for t in args.targets.split(",")] if args.targets else None)
    if args.adapter != FULL:
        return config_from_options(args.adapter, given, targets)
    if given or targets:
        flags = ", ".join(f"--{o.replace('_', '-')}" for o in given) or "--targets/--target-regex"
        raise ValueError(f"{flags}: not an option of --adapter full")
    return FULL


def add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train", parents=[BASE_OPTIONS, DEVICE_OPTIONS, FIELD_OPTIONS], help="train an adapter (or the full model)"
    )
    p.add_argument("--train", required=True, metavar="FILE", help=".jsonl, .json or .csv examples")
    p.add_argument("--eval", metavar="FILE", help="examples to score during and after training")
    p.add_argument("--eval-every", type=int, metavar="N", help="score every N optimizer steps")
    p.add_argument("--adapter", default="lora", choices=[*adapter_names(), FULL], help="default: %(default)s")
    for option, fields in cli_option_fields().items():
        cls = ADAPTER_TYPES[next(iter(fields))]
        default = default_of(cls, fields[cls.peft_type])
        owners = ", ".join(ADAPTER_TYPES[t].__name__.removesuffix("Config") for t in fields)
        p.add_argument(f"--{option.replace('_', '-')}", type=type(default), help=f"{owners} (default {default})")
    targets = p.add_mutually_exclusive_group()
    targets.add_argument("--targets", help="comma-separated module names, e.g. q,v (default: per model type)")
    targets.add_argument("--target-regex", help="regex matched against each module's full path")
    p.add_argument("--epochs", type=int, default=default_of(TrainArgs, "epochs"), help="default: %(default)s")
    p.add_argument("--max-steps", type=int, help="optimizer steps; replaces --epochs")
    p.add_argument("--batch-size", type=int, default=default_of(TrainArgs, "batch_size"), help="default: %(default)s")
    p.add_argument("--grad-accum", type=int, default=default_of(TrainArgs, "grad_accum"), help="default: %(default)s")
    rates = ", ".join(f"{name} {ADAPTER_TYPES[name.upper()].default_lr:g}" for name in adapter_names())
    p.add_argument("--lr", type=float, help=f"default: per adapter type ({rates}, full {FULL_LR:g})")
    p.add_argument("--seed", type=int, default=default_of(TrainArgs, "seed"), help="default: %(default)s")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bfloat16 autocast (default: where native)")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward pass (slow first steps)")
    p.add_argument("--out", required=True, metavar="DIR", help="where the adapter (or full model) is saved")
    p.set_defaults(run=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    # Everything the user gave is checked before the model loads: a bad file fails at once.
    adapter = adapter_from_args(args)
    options = options_of(TrainArgs, args)
    examples = load_examples(args.train, args.input_field, args.target_field)
    eval_examples = load_examples(args.eval, args.input_field, args.target_field) if args.eval else None
    model, tokenizer = load_base(args.base, args.task, examples=examples, **placement(args))
    result = train(model, tokenizer, examples, adapter, options, eval_data=eval_examples, output_dir=args.out)
    print(
        f"trained {args.adapter} on {args.train}: {len(result.losses)} steps in {result.seconds:.1f}s, final loss "
        f"{result.losses[-1]:.4f}, trainable params {result.trainable_params:,} of {result.total_params:,}"
    )
    for step, score in result.evals:
        print(f"  eval at step {step}: {score:.4f}")
    print(f"saved to {result.output_dir}")
    return 0


def add_eval(sub: Any) -> None:
    p = sub.add_parser(
        "eval", parents=[BASE_OPTIONS, DEVICE_OPTIONS, FIELD_OPTIONS], help="exact match (or accuracy) on examples"
    )
    p.add_argument("--adapter", metavar="DIR", help="adapter folder or hub id to load into the base")
    p.add_argument("--data", required=True, metavar="FILE", help=".jsonl, .json or .csv examples")
    p.add_argument("--out", metavar="FILE", help="write every prediction here (JSONL)")
    p.add_argument("--batch-size", type=int, default=16, help="default: %(default)s")
    p.add_argument("--max-new-tokens", type=int, default=32, help="default: %(default)s")
    p.set_defaults(run=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    examples = load_examples(args.data, args.input_field, args.target_field)
    # (a classifier trained by `loraloom train` numbered its labels by the same rule)
    model, tokenizer = load_base(args.base, args.task, examples=examples, adapter=args.adapter, **placement(args))
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


def add_merge(sub: Any) -> None:
    p = sub.add_parser(
        "merge", parents=[BASE_OPTIONS, DEVICE_OPTIONS], help="merge an adapter into the base and save a plain model"
    )
    p.add_argument("--adapter", required=True, metavar="DIR", help="adapter folder or hub id")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (model + tokenizer)")
    p.set_defaults(run=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    model, tokenizer = load_base(args.base, args.task, adapter=args.adapter, **placement(args))
    save_full_model(merge_and_unload(model), tokenizer, Path(args.out))
    print(f"merged {args.adapter} into {args.base}: wrote {args.out}")
    return 0


def add_compose(sub: Any) -> None:
    p = sub.add_parser(
        "compose",
        parents=[BASE_OPTIONS, DEVICE_OPTIONS, FIELD_OPTIONS],
        help="LoraHub: compose LoRA modules for a new task",
        epilog="exit status: 0 the search ran its budget; 1 an optimizer error cut it short; 130 Ctrl-C cut it "
        "short (either way the best weights so far are saved, marked in weights.json); 2 bad input",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--modules", nargs="+", metavar="DIR", help="LoRA module folders or hub ids")
    source.add_argument("--pool", metavar="DIR", help="a folder of module folders to choose --num from")
    num = "modules to choose from --pool (default: %(default)s; all of them, with a note, if the pool holds fewer)"
    p.add_argument("--num", type=int, default=DEFAULT_NUM, help=num)
    p.add_argument("--select", choices=SELECT_METHODS, default=SELECT_METHODS[0], help="default: %(default)s")
    p.add_argument("--examples", required=True, metavar="FILE", help="few-shot .jsonl, .json or .csv examples")
    budget = f"forward-pass equivalents, in every mode: 1 per candidate scored, {ADAM_STEP_COST} per Adam step"
    p.add_argument("--budget", type=int, help=f"{budget} (default: {DEFAULT_BUDGET})")
    p.add_argument("--seed", type=int, default=default_of(SearchSettings, "seed"), help="default: %(default)s")
    p.add_argument("--optimizer", default=DEFAULT_OPTIMIZER, help="a nevergrad optimizer name (default: %(default)s)")
    p.add_argument("--population", type=int, default=DEFAULT_POPULATION, help="candidates a pass (default %(default)s)")
    formula = default_of(SearchSettings, "formula")
    p.add_argument("--formula", "--objective", choices=FORMULAS, default=formula, help="the loss (default %(default)s)")
    modes = "gradient: Adam on w; nevergrad: gradient-free (the paper); hybrid: nevergrad then Adam"
    p.add_argument("--mode", choices=MODES, default=DEFAULT_MODE, help=f"{modes} (default: %(default)s)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="evaluate in bfloat16 (default: where native)")
    low_memory = "Adam's steps one example at a time: less memory, slower (default: on with --quantize)"
    p.add_argument("--low-memory", action=argparse.BooleanOptionalAction, help=low_memory)
    p.add_argument("--out", required=True, metavar="DIR", help="adapter/, weights.json, trace.csv, trace.png")
    p.add_argument("--merge", action="store_true", help="also save the base with the module merged, in OUT/merged")
    p.set_defaults(run=cmd_compose)


def cmd_compose(args: argparse.Namespace) -> int:
    """Exit 0 when the search ran its budget; 1 when an optimizer error cut it short, 130 when Ctrl-C did
    (the best weights so far are saved either way, marked in weights.json); 2 on bad input."""
    if args.pool is not None:
        size = len(list_pool(args.pool))
        if args.num > size:
            print(f"loraloom: note: --num {args.num}, but the pool holds {size} modules: using all", file=sys.stderr)
            args.num = size
    settings = options_of(SearchSettings, args, dtype={None: "auto", True: "bf16", False: "fp32"}[args.bf16])
    examples = load_examples(args.examples, args.input_field, args.target_field)
    model, tokenizer = load_base(args.base, args.task, **placement(args))
    with warnings.catch_warnings():
        warnings.showwarning = _warning_line  # one line each, no source location (restored on exit)
        try:
            choice = {"pool": args.pool, "num": args.num, "select": args.select, "low_memory": args.low_memory}
            result = lorahub(
                model, args.modules, examples, tokenizer=tokenizer, settings=settings, progress=True, **choice
            )
        except OptimizerError as e:
            print(f"loraloom: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 1
    out = result.save(args.out)
    print(
        f"best objective {result.objective:.4f} after {len(result.trace)} evaluations "
        f"({result.adam_steps} Adam steps, {result.cost} of {result.settings['budget']} forward-pass equivalents; "
        f"{result.settings['method']}, {len(result.modules)} modules chosen by {result.selection.method})"
        + ("" if result.complete else ", search cut short")
    )
    print(f"wrote {out}/adapter, weights.json, trace.csv, trace.png")
    if args.merge and not result.interrupted:
        save_full_model(result.merge(), tokenizer, out / MERGED_DIR)
        print(f"merged the composed module into the base: wrote {out / MERGED_DIR}")
    return 130 if result.interrupted else 0 if result.complete else 1


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"loraloom: warning: {' '.join(str(message).split())}", file=sys.stderr)


def add_combine(sub: Any) -> None:
    p = sub.add_parser("combine", help="merge LoRA modules, one weight each, into one PEFT folder (no base model)")
    add_combine_arguments(p).set_defaults(run=cmd_combine)  # MODULE... --weights --how --density --seed --out


def cmd_combine(args: argparse.Namespace) -> int:
    combine(args.modules, args.weights, out=args.out, **dataclasses.asdict(options_of(CombineSettings, args)))
    print(f"loraloom: combined {len(args.modules)} modules with how={args.how}: wrote {args.out}")
    return 0


# ---- experiment, report ------------------------------------------------------------------------

# `loraloom experiment` flags for the most used settings; every other one through --set NAME=VALUE.
EXPERIMENT_FLAGS = ("shots", "max_test", "num_modules", "budget", "epochs", "gradient_runs")


def add_experiment(sub: Any) -> None:
    p = sub.add_parser(
        "experiment", parents=[PLACE_OPTIONS], help="the LoraHub protocol: methods x tasks x seeds, resumable"
    )
    p.add_argument("--base", required=True, help="base model: a local folder or a hub id")
    p.add_argument("--pool", metavar="DIR", help="folder of LoRA module folders (lorahub*, retrieval-best)")
    p.add_argument("--tasks", required=True, help="bbh:DIR, bbh:download or jsonl:DIR")
    p.add_argument("--task-filter", metavar="GLOB", help="only the tasks whose name matches")
    methods = ", ".join(METHODS)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"from: {methods} (default: %(default)s)")
    p.add_argument("--seeds", default="1-5", help="e.g. 1-5 or 1,3 (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="results.sqlite, predictions/, report.md, plots/")
    for name in EXPERIMENT_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"default: {default_of(ExperimentSettings, name)}")
    p.add_argument(
        "--set", action="append", metavar="NAME=VALUE", help="any ExperimentSettings field, VALUE as JSON (repeatable)"
    )
    p.add_argument("--ray", nargs="?", const=True, metavar="ADDRESS", help="run cells on Ray: local, or at ADDRESS")
    p.add_argument("--num-gpus", type=float, help="Ray: GPUs per cell (fractional allowed; default 0)")
    p.set_defaults(run=cmd_experiment)


def cmd_experiment(args: argparse.Namespace) -> int:
    flags = {f: getattr(args, f) for f in (*EXPERIMENT_FLAGS, "num_gpus") if getattr(args, f) is not None}
    flags.update(device=args.device, dtype=args.dtype)
    results = experiment(
        args.base,
        pool=args.pool,
        tasks=args.tasks,
        methods=args.methods,
        seeds=parse_seeds(args.seeds),
        out=args.out,
        settings=ExperimentSettings.from_assignments(args.set or [], **flags),
        task_filter=args.task_filter,
        ray=args.ray,
    )
    print(results.markdown())
    print(f"wrote {report(args.out)}, results.csv and plots/ in {args.out}")
    return 0


def add_report(sub: Any) -> None:
    p = sub.add_parser("report", help="report.md, results.csv and plots from an experiment's RUN_DIR")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(run=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    path = report(args.run_dir, plots=not args.no_plots)
    print(f"{load_results(args.run_dir)[0].markdown()}\nwrote {path}")
    return 0


def add_inspect(sub: Any) -> None:
    p = sub.add_parser("inspect", help="describe an adapter folder or a full fine-tuning folder")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(run=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_folder(args.dir)
    print(json.dumps(info, indent=2) if args.json else describe(info))
    return 0


def add_convert(sub: Any) -> None:
    p = sub.add_parser(
        "convert", help="kohya / A1111 SD LoRA file -> PEFT folders (one per model), or PEFT folder(s) -> kohya file"
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


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert  # diffusers (for a UNet --base) is imported only here

    for path in convert(args.source, args.out, base=args.base, component=args.component):
        print(f"loraloom: wrote {path}")
    return 0


def add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", parents=[PLACE_OPTIONS], help="an OpenAI-compatible server for many adapters")
    add_serve_arguments(p).set_defaults(run=cmd_serve)  # one flag per ServeOptions field, vLLM's names beside


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve.launch import serve
    except ImportError as e:
        raise ValueError(f"loraloom serve needs FastAPI and uvicorn: pip install 'loraloom[serve]' ({e})") from e
    serve(options_of(ServeOptions, args, named=named_adapters(args.named or [])))
    return 0


def add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo", parents=[PLACE_OPTIONS], help="LoraHub on the built-in zoo; `demo lora`: LoRA from nothing"
    )
    add_demo_arguments(p)
    p.set_defaults(run=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_from_args

    run_from_args(args)
    return 0


def add_zoo(sub: Any) -> None:
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


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from .zoo.build import ARTIFACTS, build

    build(args.out or ARTIFACTS, args.work, progress=not args.quiet)
    return 0


def cmd_zoo_verify(args: argparse.Namespace) -> int:
    from .zoo.build import ARTIFACTS
    from .zoo.verify import verify

    found = verify(args.dir or ARTIFACTS)
    print(
        f"zoo ok: {found.folder}: {found.files} files ({found.bytes / 1e6:.1f} MB) match the manifest; "
        f"base loads; {found.modules} modules; {found.held_out} held-out tasks"
    )
    return 0


SUBCOMMANDS = (add_train, add_eval, add_merge, add_compose, add_combine, add_serve, add_inspect, add_convert)
SUBCOMMANDS += (add_experiment, add_report, add_demo, add_zoo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraloom", description="Train, evaluate, merge and inspect PEFT adapters.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    except Exception as e:  # bad input of any kind: one line, no traceback (LORALOOM_DEBUG=1 shows it)
        if os.environ.get("LORALOOM_DEBUG"):
            raise
        kind = "" if isinstance(e, (ValueError, TypeError, OSError)) else f"{type(e).__name__}: "
        print(f"loraloom: error: {kind}{' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loraloom: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``experiment``: run every (task, method, seed, run) cell once, store each result, skip what is done.

The sweep reads as: check everything given (tasks, methods, pool, the run folder's base model) ->
lay out the cells -> drop the finished ones -> run the rest (in this process, or as Ray tasks) ->
store each as it finishes -> return the results of this call's cells.
"""

from __future__ import annotations

import os
import re
import resource
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import models
from ..adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, read_json_object
from ..data import DataError
from ..evaluate import write_predictions
from ..files import sha256_of
from ..hub import list_pool, load_bank
from .methods import METHODS, POOL_METHODS, Job, Outcome, runs_of
from .results import Results
from .settings import ExperimentSettings, stable_hash
from .store import FINISHED, Store
from .tasks import Task, load_tasks

DEFAULT_METHODS = ("zero-shot", "retrieval-best", "lorahub", "lora", "icl")
PREDICTIONS_DIR = "predictions"
# LoRA config fields that must agree across a pool (LoraHub sums the modules' A and B).
POOL_FIELDS = ("peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "base_model_name_or_path")


def experiment(
    base: str | os.PathLike,
    pool: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    tasks: str | os.PathLike | Sequence[Task] | None = None,
    methods: Sequence[str] | str = DEFAULT_METHODS,
    seeds: Sequence[int] = (1, 2, 3, 4, 5),
    out: str | os.PathLike = "run",
    settings: ExperimentSettings | None = None,
    task_filter: str | None = None,
    ray: bool | str | None = None,
    progress: bool = True,
) -> Results:
    """Run the LoraHub paper's protocol for ``methods`` on ``tasks`` with a base model and a module pool.

    Args:
        base: the base model's folder (or hub id): a seq2seq or causal LM.
        pool: a folder of LoRA module folders, or a list of them (needed by lorahub*, retrieval-best).
        tasks: ``"bbh:DIR"``, ``"bbh:download"``, ``"jsonl:DIR"`` or a list of ``Task``.
        methods: any of zero-shot, icl, lorahub, lorahub-retrieval, lorahub-gradient, retrieval-best,
            lora, ia3, fourierft, full (a list or a comma-separated string).
        seeds: per seed, a learning/test split and a LoraHub module sample.
        out: the run folder: results.sqlite, predictions/; ``report(out)`` adds report.md and plots.
        settings: every protocol setting (default: the paper's); recorded and hashed per cell.
        task_filter: a glob over task names.
        ray: None/False in this process; True on a local Ray instance; "ADDRESS" on a Ray cluster.
        progress: a progress bar over the cells.

    Returns the ``Results`` of this call's cells (finished ones from an earlier call included).
    Bad input (tasks, methods, pool, a run folder of another base model) fails before any cell runs.
    """
    settings = settings if settings is not None else ExperimentSettings()
    if not isinstance(settings, ExperimentSettings):
        raise TypeError(f"settings must be an ExperimentSettings, got {type(settings).__name__}")
    if tasks is None:
        raise ValueError("no tasks given: pass tasks='bbh:DIR', 'bbh:download', 'jsonl:DIR' or a list of Task")
    methods = check_methods(methods)
    seeds = check_seeds(seeds)
    task_list = check_tasks(load_tasks(tasks, task_filter), settings.shots)
    needs_pool = [m for m in methods if m in POOL_METHODS]
    if needs_pool and pool is None:
        raise ValueError(f"methods {needs_pool} need a module pool: pass pool=DIR (--pool)")
    modules = check_pool(pool) if pool is not None else []

    identity = base_identity(base)
    store = Store(out)
    try:
        store.check_base(identity)
        model, tokenizer = load_base(str(base), settings, progress)
        if modules:  # shapes: a pool trained for another architecture fails here, not in a cell
            load_bank(modules[:1], base_model=model)

        jobs = lay_out_jobs(task_list, methods, seeds, settings, modules, store)
        statuses = store.statuses()
        pending = [j for j in jobs if statuses.get(j.key, ("", 0))[0] not in FINISHED]
        run_info = {"base": str(base), "pool_size": len(modules), "methods": methods, "seeds": seeds}
        store.set_latest([j.key for j in jobs], {**run_info, "settings": settings.to_dict()})

        with tqdm(
            total=len(jobs), initial=len(jobs) - len(pending), desc="experiment", unit="cell", disable=not progress
        ) as bar:
            if ray:
                run_on_ray(pending, str(base), ray, store, bar)
            else:
                for job in pending:
                    bar.set_postfix_str(f"{job.task} | {job.method} | seed {job.seed}", refresh=True)
                    store_result(store, job, run_cell(job, model, tokenizer))
                    bar.update(1)
        return Results(store.rows([j.key for j in jobs]), methods=methods, run_dir=Path(out))
    finally:
        store.close()


def lay_out_jobs(
    tasks: list[Task],
    methods: list[str],
    seeds: list[int],
    settings: ExperimentSettings,
    modules: list[str],
    store: Store,
) -> list[Job]:
    """Every cell, task by task and seed by seed, each keyed by the hash of what its method depends on:
    the settings it reads, the task's examples and (for pool methods) the pool's files."""
    pool_hash = pool_fingerprint(modules) if modules else None
    jobs = []
    for task in tasks:
        hashes = {}
        for method in methods:
            cell = {"settings": settings.cell_fields(method), "task": task.fingerprint()}
            if method in POOL_METHODS:
                cell["pool"] = pool_hash
            hashes[method] = stable_hash(cell)
            store.put_settings(hashes[method], {**cell, "all_settings": settings.to_dict()})
        for seed in seeds:
            split_seed = seed if settings.split_seed is None else settings.split_seed
            learn, test = task.split(settings.shots, split_seed, settings.max_test)
            for method in methods:
                for run in range(runs_of(method, settings)):
                    jobs.append(Job(task.name, method, seed, run, hashes[method], learn, test, settings, modules))
    return jobs


def check_tasks(tasks: list[Task], shots: int) -> list[Task]:
    """``tasks``, each with enough examples for ``shots`` to learn from and one to test."""
    for task in tasks:
        if len(task.examples) < shots + 1:
            raise DataError(
                f"task {task.name!r}{f' ({task.source})' if task.source else ''}: {len(task.examples)} examples, "
                f"fewer than shots + 1 = {shots + 1} ({shots} to learn from and at least one to test)"
            )
    return tasks


def check_methods(methods: Sequence[str] | str) -> list[str]:
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    methods = list(methods)
    if not methods:
        raise ValueError(f"no methods given; choose from {', '.join(METHODS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods {methods}: a method is listed twice")
    return methods


def check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {seeds}: a seed is listed twice")
    return seeds


def check_pool(pool: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The pool's module folders, after checking from their configs that they can be composed:
    all LoRA, one rank, alpha and target layers, one base model. Errors name both modules."""
    modules = list_pool(pool) if isinstance(pool, (str, os.PathLike)) else [str(m) for m in pool]
    if not modules:
        raise ValueError("the module pool is empty")
    first = None
    for module in modules:
        config_file = Path(module) / CONFIG_NAME
        if not config_file.is_file():
            raise ValueError(f"pool module {module}: no {CONFIG_NAME}")
        config = read_json_object(config_file)
        values = {f: config.get(f) for f in POOL_FIELDS}
        if isinstance(values["target_modules"], list):
            values["target_modules"] = sorted(values["target_modules"])
        if values["peft_type"] != "LORA":
            raise ValueError(f"pool module {module}: peft_type {values['peft_type']!r}; LoraHub composes LORA modules")
        if first is None:
            first = (module, values)
            continue
        for f in POOL_FIELDS:
            if values[f] != first[1][f]:
                raise ValueError(
                    f"pool module {module}: {f}={values[f]!r} but pool module {first[0]} has {f}={first[1][f]!r}; "
                    "a pool must hold modules of one rank, alpha, target layers and base model"
                )
    return modules


def pool_fingerprint(modules: Sequence[str]) -> str:
    """The modules' names and file contents: a changed pool makes new LoraHub cells."""
    return stable_hash([[Path(m).name, sha256_of(Path(m) / CONFIG_NAME), _weights_sha(Path(m))] for m in modules])


def _weights_sha(folder: Path) -> str | None:
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        path = folder / "adapter_model.bin"
    return sha256_of(path) if path.is_file() else None


def base_identity(base: str | os.PathLike) -> dict[str, Any]:
    """What makes a base model itself: its config (minus paths and versions) and, for a folder, its weights."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(base)).to_dict()
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        config.pop(k, None)
    identity: dict[str, Any] = {"base": str(base), "config": stable_hash(config), "weights": None}
    folder = Path(base).expanduser()
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
        identity["base"] = str(folder.resolve())
        identity["weights"] = stable_hash([[p.name, sha256_of(p)] for p in files])
    return identity


def load_base(base: str, settings: ExperimentSettings, progress: bool) -> tuple[nn.Module, Any]:
    """The base model and tokenizer on the settings' device and dtype; transformers' loading bar only when the
    sweep shows progress."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        return models.load_base(base, device=settings.device, dtype=settings.dtype)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


PROC_STATUS, PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak_memory() -> None:
    """Start a cell's memory peak: CUDA's allocator statistics, or Linux's peak resident set (VmHWM)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        PROC_CLEAR_REFS.write_text("5")  # "5": reset the peak RSS to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def peak_memory_mb() -> float:
    """The cell's peak: CUDA memory allocated; on Linux the process's resident memory (VmHWM, base model
    included); elsewhere the process's peak resident memory so far (a high-water mark over its cells)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", PROC_STATUS.read_text())
        if match:
            return int(match[1]) / 2**10
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def run_cell(job: Job, model: nn.Module, tokenizer: Any) -> dict[str, Any]:
    """Run one cell; a failure is caught and returned as a failed row (the sweep goes on)."""
    reset_peak_memory()
    clock = time.perf_counter()
    try:
        outcome: Outcome = METHODS[job.method](job, model, tokenizer)
    except Exception as e:
        return {
            "status": "failed",
            "error": f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-4)}",
            "seconds": time.perf_counter() - clock,
            "peak_memory_mb": peak_memory_mb(),
        }
    return {
        "status": outcome.status,
        "score": outcome.score,
        "n_test": len(job.test),
        "input_tokens": outcome.input_tokens,
        "seconds": time.perf_counter() - clock,
        "peak_memory_mb": peak_memory_mb(),
        "weights": outcome.weights,
        "modules": outcome.modules,
        "details": outcome.details,
        "error": outcome.reason,
        "predictions": outcome.predictions,
    }


def store_result(store: Store, job: Job, result: dict[str, Any]) -> None:
    """Write the cell's predictions file (if any) and its row; the driver alone calls this."""
    row = dict(result)
    predictions = row.pop("predictions", None)
    if predictions:
        relative = (
            Path(PREDICTIONS_DIR) / job.task / f"{job.method}-seed{job.seed}-run{job.run}-{job.settings_hash}.jsonl"
        )
        write_predictions(store.run_dir / relative, predictions)
        row["predictions"] = str(relative)
    row.update(task=job.task, method=job.method, seed=job.seed, run=job.run, settings_hash=job.settings_hash)
    store.write(row)


# ---- Ray -------------------------------------------------------------------------------------

_WORKER_BASE: dict[str, tuple[nn.Module, Any]] = {}  # per worker process: the base model, loaded once


def _run_remote(base: str, job: Job) -> dict[str, Any]:
    torch.set_num_threads(1)  # one core per Ray task: threads would only fight each other
    if base not in _WORKER_BASE:
        _WORKER_BASE[base] = load_base(base, job.settings, progress=False)
    model, tokenizer = _WORKER_BASE[base]
    return run_cell(job, model, tokenizer)


def run_on_ray(jobs: list[Job], base: str, address: bool | str, store: Store, bar: tqdm) -> None:
    """Each cell a Ray task (workers load the base by path, once each); the driver stores results as they come."""
    try:
        import ray
    except ImportError as e:
        raise ImportError("ray=... needs Ray: pip install 'loraloom[ray]'") from e
    started = not ray.is_initialized()
    if started:
        if address is True:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=str(address), log_to_driver=False)
    try:
        gpus = jobs[0].settings.num_gpus if jobs else 0.0  # per cell; fractional shares a GPU between cells
        remote = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(_run_remote)
        in_flight = {remote.remote(base, job): job for job in jobs}
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            job = in_flight.pop(done[0])
            try:
                result = ray.get(done[0])
            except Exception as e:  # the worker died (out of memory, killed): a failed cell, retried next time
                result = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            store_result(store, job, result)
            bar.set_postfix_str(f"{job.task} | {job.method} | seed {job.seed}", refresh=False)
            bar.update(1)
    finally:
        if started:
            ray.shutdown()


__all__ = ["DEFAULT_METHODS", "base_identity", "check_pool", "experiment", "run_cell"]

"""The experiment harness: every method records a row, resume, retry, new settings, report, bad input, CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import statistics
import urllib.error

import pytest
from experiment_world import BBH_DIR, FAST, build_world, task_examples
from hub_modules import edit_config, make_modules
from tiny_models import tiny_t5

import loraloom as ll
from loraloom.cli import main
from loraloom.data import DataError
from loraloom.harness import METHODS, ExperimentSettings, Task, load_results
from loraloom.harness import tasks as tasks_module
from loraloom.harness.store import DB_NAME, Store
from loraloom.seeds import parse_seeds


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def run(world, out, methods, seeds=(1,), settings=FAST, **kwargs):
    return ll.experiment(
        world["base"],
        pool=world["pool"],
        tasks=f"bbh:{world['tasks']}",
        methods=methods,
        seeds=list(seeds),
        out=out,
        settings=settings,
        progress=False,
        **kwargs,
    )


def test_every_method_records_a_row(world, tmp_path):
    results = run(world, tmp_path / "run", list(METHODS))
    assert len(results) == 2 * len(METHODS)  # 2 tasks x 1 seed x 1 run each (gradient_runs=1)
    by = {(r["task"], r["method"]): r for r in results}
    for (task, method), r in by.items():
        assert r["status"] == "done", (task, method, r["error"])
        assert 0.0 <= r["score"] <= 1.0 and r["n_test"] == 3 and r["seconds"] > 0 and r["peak_memory_mb"] > 0
        assert r["input_tokens"] > 0 and len(r["settings_hash"]) == 12 and r["attempts"] == 1
        lines = (tmp_path / "run" / r["predictions"]).read_text().splitlines()
        assert len(lines) == 3 and {"input", "target", "prediction", "correct"} <= set(json.loads(lines[0]))
    for task in ("copy_words", "reverse_words"):
        assert by[(task, "icl")]["input_tokens"] > 5 * by[(task, "zero-shot")]["input_tokens"]  # 5 demonstrations
        for method in ("lorahub", "lorahub-retrieval", "lorahub-gradient"):
            r = by[(task, method)]
            assert len(r["weights"]) == len(r["modules"]) == 4
            # budget 4 forward passes: 4 candidates scored, or 1 Adam step (3) and the w it led to (1)
            evaluations = 2 if method == "lorahub-gradient" else 4
            assert r["details"]["lorahub_settings"]["budget"] == 4 and len(r["details"]["trace"]) == evaluations
            assert r["details"]["cost"] == 4 and r["details"]["adam_steps"] == (method == "lorahub-gradient")
            # the search that ran is the one the cell's hash covers (dtype "fp32" on every machine included)
            planned = dataclasses.replace(FAST.search_settings(method), seed=1).to_dict()
            assert {k: r["details"]["lorahub_settings"][k] for k in planned} == planned
        assert by[(task, "lorahub-gradient")]["details"]["lorahub_settings"]["mode"] == "gradient"
        assert by[(task, "lorahub-retrieval")]["details"]["selection"]["method"] == "retrieval"
        best = by[(task, "retrieval-best")]
        scores = best["details"]["scores"]
        assert best["weights"] == [1.0] and len(scores) == 6 and best["modules"][0] == min(scores, key=scores.get)
        assert by[(task, "full")]["details"]["adapter"] == "full"


def test_causal_lm_and_a_pool_smaller_than_n(tmp_path):
    world = build_world(tmp_path, arch="llama")
    settings = FAST.replace(num_modules=20)  # the pool holds 6: all of them are used, and that is recorded
    results = run(world, tmp_path / "run", ["zero-shot", "icl", "lorahub", "retrieval-best", "lora"], settings=settings)
    assert [r["status"] for r in results] == ["done"] * 10
    lorahub = [r for r in results if r["method"] == "lorahub"]
    assert all(len(r["modules"]) == 6 and r["details"]["all_modules"] for r in lorahub)


def test_icl_too_long_for_the_context_is_skipped_with_the_reason(world, tmp_path):
    results = run(world, tmp_path / "run", ["zero-shot", "icl"], settings=FAST.replace(max_context=12))
    icl = [r for r in results if r["method"] == "icl"]
    assert all(r["status"] == "skipped" and "context of 12" in r["error"] for r in icl)
    assert "skipped" in results.markdown() and "context of 12" in results.markdown()
    assert all(r["status"] == "done" for r in results if r["method"] == "zero-shot")


def test_resume_skips_finished_cells_and_retries_failed_ones(world, tmp_path, monkeypatch):
    def broken(job, model, tokenizer):
        raise RuntimeError("out of luck")

    monkeypatch.setitem(METHODS, "zero-shot", broken)
    first = run(world, tmp_path / "run", ["zero-shot", "lorahub"])
    status = {(r["task"], r["method"]): r for r in first}
    assert all(status[(t, "zero-shot")]["status"] == "failed" for t in ("copy_words", "reverse_words"))
    assert "RuntimeError: out of luck" in status[("copy_words", "zero-shot")]["error"]
    assert "failed" in first.markdown()

    calls = []
    original = {m: METHODS[m] for m in ("zero-shot", "lorahub")}
    monkeypatch.setitem(METHODS, "zero-shot", lambda *a: calls.append("zero-shot") or ll_zero_shot(*a))
    monkeypatch.setitem(METHODS, "lorahub", lambda *a: calls.append("lorahub") or original["lorahub"](*a))
    second = run(world, tmp_path / "run", ["zero-shot", "lorahub"])
    assert calls == ["zero-shot", "zero-shot"]  # the failed cells ran again, the finished ones did not
    again = {(r["task"], r["method"]): r for r in second}
    assert (
        again[("copy_words", "zero-shot")]["status"] == "done" and again[("copy_words", "zero-shot")]["attempts"] == 2
    )
    assert again[("copy_words", "lorahub")] == status[("copy_words", "lorahub")]  # untouched

    calls.clear()  # a changed LoraHub setting makes new LoraHub cells and keeps the zero-shot ones
    third = run(world, tmp_path / "run", ["zero-shot", "lorahub"], settings=FAST.replace(budget=5))
    assert calls == ["lorahub", "lorahub"]
    new = {(r["task"], r["method"]): r for r in third}
    assert new[("copy_words", "lorahub")]["settings_hash"] != status[("copy_words", "lorahub")]["settings_hash"]
    assert new[("copy_words", "zero-shot")]["settings_hash"] == again[("copy_words", "zero-shot")]["settings_hash"]
    with Store(tmp_path / "run") as store:
        assert len(store.rows()) == 6  # the budget-4 LoraHub cells are still there


def ll_zero_shot(job, model, tokenizer):
    from loraloom.harness.methods import zero_shot

    return zero_shot(job, model, tokenizer)


def test_report_rows_columns_and_files(world, tmp_path):
    settings = FAST.replace(gradient_runs=2, adapter_options={"lora": {"r": 2, "target_modules": ["q", "v"]}})
    results = run(world, tmp_path / "run", ["zero-shot", "lorahub", "lora"], seeds=(1, 2), settings=settings)
    assert len(results) == 2 * 2 * (1 + 1 + 2)
    lora_rows = [r for r in results if r["method"] == "lora"]
    assert {r["details"]["adapter"]["r"] for r in lora_rows} == {2} and len(
        {r["details"]["train_seed"] for r in lora_rows}
    ) == 4
    lines = results.markdown().splitlines()
    assert lines[0] == "| Task | zero-shot | lorahub avg | lorahub best | lora |"
    assert [line.split(" | ")[0] for line in lines[2:5]] == ["| copy_words", "| reverse_words", "| **Average**"]
    # lorahub avg / best: the mean and the best over seeds; lora: the mean over seeds of the mean over runs
    table = {(r["task"], r["method"]): r for r in results.table()}
    lorahub = [r["score"] for r in results if (r["task"], r["method"]) == ("copy_words", "lorahub")]
    assert table[("copy_words", "lorahub")]["mean"] == pytest.approx(statistics.fmean(lorahub))
    assert table[("copy_words", "lorahub")]["best"] == max(lorahub)
    lora = {
        s: [r["score"] for r in results if (r["task"], r["method"], r["seed"]) == ("copy_words", "lora", s)]
        for s in (1, 2)
    }
    assert table[("copy_words", "lora")]["mean"] == pytest.approx(
        statistics.fmean(statistics.fmean(v) for v in lora.values())
    )
    average = lines[4].strip("| ").split(" | ")[1:]
    expected = statistics.fmean(table[(t, "zero-shot")]["mean"] for t in ("copy_words", "reverse_words"))
    assert average[0] == f"{100 * expected:.1f}"
    assert [line.split(" | ")[0] for line in lines[8:11]] == ["| zero-shot", "| lorahub", "| lora"]

    path = ll.report(tmp_path / "run")
    text = path.read_text()
    assert results.markdown() in text and "## Settings" in text
    with open(tmp_path / "run" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(results) and rows[0]["task"] == "copy_words"
    plots = sorted(p.name for p in (tmp_path / "run" / "plots").iterdir())
    assert plots == ["methods.png", "traces-lorahub.png", "weights-lorahub.png"]
    assert all((tmp_path / "run" / "plots" / p).stat().st_size > 1000 for p in plots)
    assert load_results(tmp_path / "run")[0].rows == results.rows


def test_list_of_tasks_and_a_fixed_split(world, tmp_path):
    tasks = [Task("copy", task_examples("copy", 8, seed=3)), Task("rev", task_examples("reverse", 8, seed=4))]
    settings = FAST.replace(split_seed=7, max_test=None)
    results = ll.experiment(
        world["base"],
        tasks=tasks,
        methods=["zero-shot"],
        seeds=[1, 2],
        out=tmp_path / "r",
        settings=settings,
        progress=False,
    )
    assert [r["n_test"] for r in results] == [3, 3, 3, 3]
    first = [json.loads(x)["input"] for x in (tmp_path / "r" / results.rows[0]["predictions"]).read_text().splitlines()]
    second = [
        json.loads(x)["input"] for x in (tmp_path / "r" / results.rows[1]["predictions"]).read_text().splitlines()
    ]
    assert first == second  # split_seed: the same test examples for every seed
    with pytest.raises(DataError, match="names a predictions folder"):
        Task("../elsewhere", task_examples("copy", 8, seed=3))


def _mixed_rank(world, tmp_path):
    pool = tmp_path / "pool"
    shutil.copytree(world["pool"], pool)
    make_modules(tiny_t5(), pool, 1, r=8, prefix="z")
    return {**world, "pool": pool}


def _mixed_base(world, tmp_path):
    pool = tmp_path / "pool"
    shutil.copytree(world["pool"], pool)
    edit_config(pool / "m03", base_model_name_or_path="another-model")
    return {**world, "pool": pool}


def _tasks_with(world, tmp_path, name, content):
    tasks = tmp_path / "tasks"
    shutil.copytree(world["tasks"], tasks)
    (tasks / f"{name}.json").write_text(content)
    return {**world, "tasks": tasks}


BAD_INPUT = {
    "empty task file": (lambda w, p: _tasks_with(w, p, "empty", ""), ["zero-shot"], "empty task file"),
    "too few examples": (
        lambda w, p: _tasks_with(w, p, "few", json.dumps({"examples": task_examples("copy", 5, 0)})),
        ["zero-shot"],
        "fewer than shots + 1 = 6",
    ),
    "mixed ranks": (_mixed_rank, ["lorahub"], "r=8 but pool module"),
    "mixed bases": (_mixed_base, ["lorahub"], "base_model_name_or_path='another-model'"),
    "unknown method": (lambda w, p: w, ["zero-shot", "lorahub-magic"], "unknown method(s) ['lorahub-magic']"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_fails_before_any_work(world, tmp_path, case):
    make, methods, message = BAD_INPUT[case]
    bad_world = make(world, tmp_path)
    with pytest.raises(ValueError) as e:
        run(bad_world, tmp_path / "run", methods)
    assert message in str(e.value)
    assert not (tmp_path / "run").exists()


def test_a_run_folder_of_another_base_model_is_refused(world, tmp_path):
    run(world, tmp_path / "run", ["zero-shot"])
    other = tmp_path / "other-base"
    tiny_t5(seed=5).save_pretrained(other)
    shutil.copy(world["base"] / "tokenizer.json", other)
    shutil.copy(world["base"] / "tokenizer_config.json", other)
    with pytest.raises(ValueError, match="holds results for base model .* weights differ"):
        run({**world, "base": other}, tmp_path / "run", ["zero-shot"])
    with Store(tmp_path / "run") as store:
        assert len(store.rows()) == 2


def test_bbh_download_offline_is_a_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(tasks_module.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="are you offline"):
        tasks_module.download_bbh(tmp_path / "bbh")


@pytest.mark.skipif(not BBH_DIR.is_dir(), reason=f"the BBH files are not at {BBH_DIR} (../shared/data/bbh)")
def test_real_bbh_files(tmp_path):
    from loraloom.zoo.base import build_demo_t5, train_tokenizer

    tasks = tmp_path / "bbh"
    tasks.mkdir()
    for name in ("boolean_expressions", "word_sorting"):
        shutil.copy(BBH_DIR / f"{name}.json", tasks)
    texts = [e["input"] + " " + e["target"] for f in tasks.iterdir() for e in json.loads(f.read_text())["examples"]]
    tok = train_tokenizer(texts, vocab_size=300)
    model = build_demo_t5(tok, d_model=32, d_ff=64)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    make_modules(model, tmp_path / "pool", 6)
    world = {"base": tmp_path / "base", "pool": tmp_path / "pool", "tasks": tasks}
    results = run(world, tmp_path / "run", ["zero-shot", "retrieval-best", "lorahub"])
    assert {(r["task"], r["status"]) for r in results} == {("boolean_expressions", "done"), ("word_sorting", "done")}
    assert all(r["n_test"] == 3 for r in results)


def test_settings_are_validated_and_hashed():
    assert ExperimentSettings().hash() == ExperimentSettings().hash() != ExperimentSettings(budget=41).hash()
    for bad in (
        {"shots": 0},
        {"lr_lora": -1.0},
        {"max_test": 0},
        {"lorahub_options": {"budget": 3}},
        {"adapter_options": {"dora": {}}},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ExperimentSettings.from_dict(bad)
    with pytest.raises(ValueError, match="lorahub_options: unknown search option.s. populaton"):
        ExperimentSettings(lorahub_options={"populaton": 1})
    search = ExperimentSettings(lorahub_options={"population": 1}).cell_fields("lorahub")["search"]
    assert (
        search["population"] == 1 and search["mode"] == "nevergrad" and search["budget"] == 40 and "seed" not in search
    )
    assert "optimizer" in search  # LoraHub's own defaults are hashed too: a changed default makes new cells
    # the budget once counted Adam steps: gradient cells hash the steps it now buys, gradient-free cells are as before
    assert ExperimentSettings().cell_fields("lorahub-gradient")["search"]["adam_steps"] == 13
    assert "adam_steps" not in search
    with pytest.raises(ValueError, match="unknown experiment setting"):
        ExperimentSettings.from_dict({"bugdet": 3})
    lora, lorahub = ExperimentSettings().cell_fields("lora"), ExperimentSettings().cell_fields("lorahub")
    assert "budget" not in lora and "lr_lora" in lora and "search" in lorahub and "epochs" not in lorahub


def test_cli_experiment_and_report(world, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "experiment",
        "--base",
        str(world["base"]),
        "--pool",
        str(world["pool"]),
        "--tasks",
        f"bbh:{world['tasks']}",
    ]
    args += ["--methods", "zero-shot,lorahub", "--seeds", "1", "--out", str(out), "--budget", "4", "--max-test", "3"]
    assert main(args + ["--set", "max_new_tokens=4", "--set", 'lorahub_options={"population": 1}']) == 0
    printed = capsys.readouterr().out
    assert "| Task | zero-shot | lorahub avg | lorahub best |" in printed and (out / "report.md").is_file()
    rows = load_results(out)[0].rows
    assert all(r["details"]["lorahub_settings"]["population"] == 1 for r in rows if r["method"] == "lorahub")
    assert main(["report", str(out), "--no-plots"]) == 0 and "| **Average** |" in capsys.readouterr().out
    assert main(args + ["--set", "bugdet=3"]) == 2
    assert "unknown experiment setting(s) ['bugdet']" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert parse_seeds("1-3,7") == [1, 2, 3, 7]
    assert not (tmp_path / "nowhere" / DB_NAME).exists()


def test_an_interrupted_sweep_keeps_finished_cells_and_a_cut_short_search_is_noted(world, tmp_path, monkeypatch):
    from loraloom.harness import methods

    real_lorahub = methods.lorahub

    def cut_short(*args, **kwargs):
        result = real_lorahub(*args, **kwargs)
        result.complete, result.stopped = False, "the optimizer failed"
        return result

    def interrupt(job, model, tokenizer):
        if job.task == "reverse_words":
            raise KeyboardInterrupt
        return original(job, model, tokenizer)

    original = METHODS["zero-shot"]
    monkeypatch.setitem(METHODS, "zero-shot", interrupt)
    monkeypatch.setattr(methods, "lorahub", cut_short)
    with pytest.raises(KeyboardInterrupt):
        run(world, tmp_path / "run", ["zero-shot", "lorahub"])
    with Store(tmp_path / "run") as store:
        assert [(r["task"], r["method"]) for r in store.rows()] == [
            ("copy_words", "zero-shot"),
            ("copy_words", "lorahub"),
        ]
    monkeypatch.setitem(METHODS, "zero-shot", original)
    results = run(world, tmp_path / "run", ["zero-shot", "lorahub"])
    assert [r["attempts"] for r in results] == [1, 1, 1, 1]
    lorahub = [r for r in results if r["method"] == "lorahub"]
    assert all(
        r["status"] == "done" and "cut short after 4 evaluations: the optimizer failed" in r["error"] for r in lorahub
    )
    assert (
        "2 cell(s) noted" not in results.markdown()
        and "1 cell(s) noted: LoraHub search cut short" in results.markdown()
    )


def test_selection_routing_and_merge_methods(world, tmp_path):
    methods = ["lorahub", "lorahub-arrow", "lorahub-embedding", "arrow", "ties", "dare", "cat"]
    results = run(world, tmp_path / "run", methods, seeds=(1, 2))
    by = {(r["task"], r["method"], r["seed"]): r for r in results}
    assert all(r["status"] == "done" for r in results), [r["error"] for r in results if r["status"] != "done"]
    for (task, method, seed), r in by.items():
        if method in ("ties", "dare", "cat"):
            # lorahub's draw of 4 of the 6 modules for the seed; the weights searched with the same budget
            assert r["modules"] == by[(task, "lorahub", seed)]["modules"] and len(r["weights"]) == 4
            assert r["details"]["operator"] == {"ties": "ties", "dare": "dare_ties", "cat": "cat"}[method]
            assert r["details"]["cost"] == 4 and len(r["details"]["trace"]) == 4
            assert r["details"]["density"] == (None if method == "cat" else 0.5)
        elif method == "arrow":  # Arrow's alignment picks the 4, routing (top 3) uses them: no weights
            assert r["weights"] is None and r["details"]["top_k"] == 3
            assert r["modules"] == by[(task, "lorahub-arrow", seed)]["details"]["selection"]["modules"]
        elif method != "lorahub":
            assert r["details"]["selection"]["method"] == method.removeprefix("lorahub-")
    settings = ExperimentSettings(merge_density=0.3)
    assert settings.cell_fields("ties") != ExperimentSettings().cell_fields("ties")  # density is in ties' hash
    assert settings.cell_fields("cat") == ExperimentSettings().cell_fields("cat")  # ... not in cat's
    assert ExperimentSettings().cell_fields("cat")["search"]["mode"] == "nevergrad"
    for bad in ({"merge_density": 0}, {"merge_density": 1.5}, {"arrow_top_k": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ExperimentSettings.from_dict(bad)

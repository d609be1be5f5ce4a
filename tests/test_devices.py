"""--device / --dtype on every command, and tensors that follow the model's device and dtype.

There is no GPU here: the plumbing is checked on the CPU (bf16 runs, read off the model's parameters, not off an
echoed setting), a missing CUDA device is one line and exit 2, and ``meta`` tensors show that the composed
layers, the server's per-row layers and FourierFT's cache are made on the model's device.
"""

from __future__ import annotations

import json

import pytest
import torch
from hub_modules import EXAMPLES, make_modules, tokenizer
from tiny_models import tiny_llama, tiny_t5

import loraloom as ll
import loraloom.cli as cli
import loraloom.models as models
from loraloom.adapters import adapter_layers
from loraloom.devices import resolve_device, resolve_dtype
from loraloom.hub import Composition, load_bank

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


def test_names_resolve_and_a_missing_device_is_one_clear_error():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype("float16") == torch.float16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    for bad, why in [("tpu", "expected auto"), ("cuda:x", "expected auto")]:
        with pytest.raises(ValueError, match=why):
            resolve_device(bad)
    with pytest.raises(ValueError, match="expected auto, fp32, bf16 or fp16"):
        resolve_dtype("int8")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("devices")
    model = tiny_t5()
    model.save_pretrained(root / "base")
    tokenizer().save_pretrained(root / "base")
    modules = make_modules(model, root / "pool", 2)
    tiny_llama().save_pretrained(root / "llama")  # the server runs causal LMs
    tokenizer(add_eos=False).save_pretrained(root / "llama")
    (root / "few.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    ll.add_adapter(model, ll.LoraConfig(r=2, target_modules=["q", "v"]), verbose=False)
    ll.save_adapter(model, root / "adapter")
    return root, modules


def commands(root, modules) -> dict[str, list[str]]:
    base, few = str(root / "base"), str(root / "few.jsonl")
    return {
        "train": ["train", "--base", base, "--train", few, "--max-steps", "1", "--out", str(root / "out-train")],
        "eval": ["eval", "--base", base, "--data", few, "--adapter", str(root / "adapter")],
        "merge": ["merge", "--base", base, "--adapter", str(root / "adapter"), "--out", str(root / "out-merge")],
        "compose": ["compose", "--base", base, "--modules", *modules, "--examples", few, "--budget", "1",
                    "--out", str(root / "out-compose")],
        "experiment": ["experiment", "--base", base, "--tasks", f"jsonl:{root}", "--methods", "zero-shot",
                       "--seeds", "1", "--shots", "2", "--out", str(root / "out-exp")],
        "demo": ["demo", "--tasks", "animal-the-bare", "--seeds", "1", "--out", str(root / "out-demo"), "--quiet"],
        "demo-lora": ["demo", "lora", "--out", str(root / "out-lora"), "--quiet"],
        "serve": ["serve", "--base", str(root / "llama")],
    }  # fmt: skip


class Loaded(ValueError):
    """Raised by the recording loader once the model is loaded: the command stops there (exit 2)."""


@pytest.mark.parametrize("command", ["train", "eval", "merge", "compose", "experiment", "demo", "demo-lora", "serve"])
def test_every_command_loads_its_model_in_the_dtype_asked_for(world, command, monkeypatch, capsys):
    """--device cpu --dtype bf16: the model each command builds has bf16 parameters on the CPU."""
    seen = []

    def recording(*args, **kwargs):
        model, tok = real_load_base(*args, **kwargs)
        seen.append({(p.device.type, p.dtype) for p in model.parameters()})
        raise Loaded("loaded")

    def recording_demo_t5(*args, **kwargs):
        model = real_build(*args, **kwargs)
        real_to = model.to

        def to(*a, **k):  # what run_lora_demo does with the device and dtype
            moved = real_to(*a, **k)
            seen.append({(p.device.type, p.dtype) for p in moved.parameters()})
            raise Loaded("loaded")

        model.to = to
        return model

    import loraloom.demo as demo

    real_load_base, real_build = models.load_base, demo.build_demo_t5
    monkeypatch.setattr(cli, "load_base", recording)
    monkeypatch.setattr(models, "load_base", recording)
    monkeypatch.setattr("loraloom.serve.app.load_base", recording)
    monkeypatch.setattr(demo, "build_demo_t5", recording_demo_t5)
    argv = commands(*world)[command] + ["--device", "cpu", "--dtype", "bf16"]
    if command.startswith("demo"):
        argv = argv + ["--threads", "1"]
    code, err = cli.main(argv), capsys.readouterr().err
    assert code == 2 and "loraloom: error: loaded" in err, err
    assert seen == [{("cpu", torch.bfloat16)}], (command, seen)


def test_train_really_runs_in_bf16_and_saves_bf16_adapter_weights(world):
    root, _ = world
    argv = commands(*world)["train"] + ["--device", "cpu", "--dtype", "bf16"]
    assert cli.main(argv) == 0
    _, tensors, _ = ll.read_adapter(root / "out-train")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


@NO_CUDA
@pytest.mark.parametrize("command", ["train", "eval", "merge", "compose", "experiment", "demo", "demo-lora", "serve"])
def test_cuda_without_cuda_is_one_line_and_exit_2(world, command, capsys):
    assert cli.main(commands(*world)[command] + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available" in err[0], err


def test_lorahub_takes_a_device_for_a_base_given_by_name(world):
    root, modules = world
    result = ll.lorahub(str(root / "base"), modules, EXAMPLES, budget=1, device="cpu")
    assert result.model.device.type == "cpu"
    with pytest.raises(ValueError, match="device= places a base given by name"):
        ll.lorahub(tiny_t5(), modules, EXAMPLES, tokenizer=tokenizer(), budget=1, device="cpu")


def test_composition_serving_rows_and_fourierft_cache_follow_the_model_device(tmp_path):
    from loraloom.serve import MultiLora
    from loraloom.serve.multi import LoraWeights

    model = tiny_t5()
    bank = load_bank(make_modules(model, tmp_path, 2))
    meta = tiny_t5().to("meta", torch.bfloat16)  # the bank is read on the CPU in fp32: the layers must follow
    composition = Composition(meta, bank)
    composition.set_weights([0.5, 0.5])
    layer = next(iter(composition.layers.values()))
    out = layer(torch.zeros(2, 3, layer.in_features, device="meta", dtype=torch.bfloat16))
    assert layer.A_hat.is_meta and out.is_meta and out.dtype == torch.bfloat16  # w is composed in fp32 on purpose
    composition.remove()

    llama = tiny_llama()
    llama_bank = load_bank(make_modules(llama, tmp_path / "llama", 1, targets=["q_proj", "v_proj"]))
    multi = MultiLora(tiny_llama().to("meta", torch.bfloat16))
    multi.set_rows([LoraWeights.from_bank(llama_bank), None])
    rows = [m for m in multi.layers.values() if m.A is not None]
    assert rows and all(m.A.is_meta and m.A.dtype == torch.bfloat16 for m in rows)

    fourier = ll.add_adapter(tiny_t5().to("meta", torch.bfloat16), ll.FourierFTConfig(n_frequency=50), verbose=False)
    name, ff = next(iter(adapter_layers(fourier)))
    ff.eval()
    out = ff(torch.zeros(1, 2, ff.in_features, device="meta", dtype=torch.bfloat16))
    assert all(b.is_meta for b in ff.buffers()) and out.is_meta and out.dtype == torch.bfloat16


@pytest.mark.slow
def test_gpu_script_runs_on_the_cpu_as_a_smoke_test():
    """benchmarks/gpu.sh --device cpu --quick: every benchmark runs end to end and prints its RESULT lines."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", str(root / "benchmarks" / "gpu.sh"), "--device", "cpu", "--quick"],
        cwd=root, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("RESULT") >= 4, done.stdout[-3000:]

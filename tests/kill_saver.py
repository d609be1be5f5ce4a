"""A zygote for kill -9 tests: imports once, then per stdin line forks a child that saves in a loop.

    python kill_saver.py WRITER TARGET

Each line ``go`` forks a child that writes version 0, 1, 0, ... of WRITER's output into TARGET for ever,
printing ``ready <pid>`` after its first complete save; the test kills that pid with SIGKILL, and the
zygote prints ``reaped`` once it has collected the child. Forking keeps a kill round at milliseconds
(no torch import per round).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from loraloom.adapters import LoraConfig  # noqa: E402
from loraloom.adapters.peft_format import write_adapter_folder  # noqa: E402
from loraloom.files import atomic_write  # noqa: E402
from loraloom.hub.result import LoraHubResult  # noqa: E402
from loraloom.hub.select import Selection  # noqa: E402

WIDTH = 1 << 18  # 1 MiB per rank row: a save lasts long enough to be killed in the middle


def adapter_tensors(version: int) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    r = 2 + version  # the config's r and the tensors' shapes tell the two versions apart
    key = "base_model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{key}.lora_A.weight": torch.full((r, WIDTH), float(version)),
        f"{key}.lora_B.weight": torch.zeros(8, r),
    }
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj"]), tensors


def save_adapter(target: Path, version: int) -> None:
    write_adapter_folder(target, *adapter_tensors(version))


def save_result(target: Path, version: int) -> None:
    result = LoraHubResult(
        weights=[float(version)], objective=1.0, trace=[], modules=["m0"], selection=Selection("given", ["m0"], 1)
    )
    result.save_adapter = lambda out: save_adapter(out, version)
    result.save(target, plot=False)


def save_file(target: Path, version: int) -> None:
    # Encoding inside the save too: nearly all of a round is then between the temp file and the rename, where
    # a kill must leave a leftover (encoding first made a kill land outside the save 20 times running).
    pad = "x" * (8 << 20)
    atomic_write(target, lambda tmp: Path(tmp).write_text(json.dumps({"version": version, "pad": pad})))


WRITERS = {"adapter": save_adapter, "result": save_result, "file": save_file}


def main() -> None:
    writer, target = WRITERS[sys.argv[1]], Path(sys.argv[2])
    for _ in sys.stdin:
        pid = os.fork()
        if pid == 0:
            version = 0
            while True:
                writer(target, version % 2)
                if version == 0:
                    os.write(1, f"ready {os.getpid()}\n".encode())
                version += 1
        os.waitpid(pid, 0)
        print("reaped", flush=True)


if __name__ == "__main__":
    main()

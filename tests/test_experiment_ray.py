"""The experiment harness on a local Ray instance (2 workers) gives the rows the serial run gives."""

from __future__ import annotations

import signal

import pytest
from experiment_world import FAST, build_world

import loraloom as ll

ray = pytest.importorskip("ray")

TIMEOUT_SECONDS = 120  # a hung Ray start-up fails the test instead of the CI job


@pytest.fixture
def ray_local():
    def timed_out(signum, frame):
        raise TimeoutError(f"the Ray test took more than {TIMEOUT_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, timed_out)
    signal.alarm(TIMEOUT_SECONDS)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_ray_run_equals_the_serial_run(tmp_path, ray_local):
    world = build_world(tmp_path)
    methods = ["zero-shot", "retrieval-best", "lorahub", "lora", "icl"]
    kwargs = dict(
        pool=world["pool"], tasks=f"bbh:{world['tasks']}", methods=methods, seeds=[1], settings=FAST, progress=False
    )
    serial = ll.experiment(world["base"], out=tmp_path / "serial", **kwargs)
    on_ray = ll.experiment(world["base"], out=tmp_path / "ray", ray=True, **kwargs)
    assert len(serial) == len(on_ray) == 10 and all(r["status"] == "done" for r in on_ray)
    same = (
        "task",
        "method",
        "seed",
        "run",
        "settings_hash",
        "score",
        "input_tokens",
        "weights",
        "modules",
        "predictions",
    )
    for a, b in zip(serial, on_ray, strict=True):
        assert {k: a[k] for k in same} == {k: b[k] for k in same}
        assert (tmp_path / "serial" / a["predictions"]).read_text() == (tmp_path / "ray" / b["predictions"]).read_text()
    assert ray.is_initialized()  # a Ray instance the caller started is left running


@pytest.mark.slow
def test_ray_true_starts_and_stops_its_own_local_instance(tmp_path):
    assert not ray.is_initialized()
    world = build_world(tmp_path)
    kwargs = dict(
        pool=world["pool"],
        tasks=f"bbh:{world['tasks']}",
        methods=["zero-shot", "lorahub"],
        seeds=[1],
        settings=FAST,
        progress=False,
    )
    serial = ll.experiment(world["base"], out=tmp_path / "serial", **kwargs)
    on_ray = ll.experiment(world["base"], out=tmp_path / "ray", ray=True, **kwargs)
    assert not ray.is_initialized()  # the instance it started is shut down
    same = ("task", "method", "seed", "score", "weights", "modules")
    assert [{k: r[k] for k in same} for r in serial] == [{k: r[k] for k in same} for r in on_ray]

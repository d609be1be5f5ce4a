"""Fuzz the command line: hostile values in any option of train, eval, merge, compose, inspect and convert.

Every run ends in exit 0 (1 for a cut-short compose), an argparse usage error (exit 2), or exactly one
``loraloom: error:`` line with exit 2 and no output written; never a traceback, never a hang. Runs
in-process on the built-in zoo's tiny T5. ~100 cases in CI; ``-m slow`` runs 1,500.
``HF_HUB_OFFLINE=1 python tests/test_fuzz_cli.py N`` prints the outcome counts per class.
"""

from __future__ import annotations

import collections
import contextlib
import io
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraloom.cli import main
from loraloom.zoo.build import ARTIFACTS

FAST = settings(max_examples=100, deadline=10_000, suppress_health_check=list(HealthCheck), database=None)
SLOW = settings(max_examples=1500, deadline=10_000, suppress_health_check=list(HealthCheck), database=None)

BASE, POOL = str(ARTIFACTS / "base"), str(ARTIFACTS / "modules")
DATA = str(ARTIFACTS / "tasks" / "animal-the.jsonl")
MODULE = str(ARTIFACTS / "modules" / "animal-is")
# Each command runs in well under a second as written; OUT is replaced by a fresh path per case.
COMMANDS = {
    "train": ["train", "--base", BASE, "--train", DATA, "--out", "OUT", "--max-steps", "1", "--batch-size", "4"],
    "eval": ["eval", "--base", BASE, "--adapter", MODULE, "--data", DATA, "--out", "OUT"],
    "merge": ["merge", "--base", BASE, "--adapter", MODULE, "--out", "OUT"],
    "compose": ["compose", "--base", BASE, "--pool", POOL, "--num", "2", "--budget", "2", "--examples", DATA, "--out", "OUT"],
    "inspect": ["inspect", MODULE],
    "convert": ["convert", MODULE, "OUT"],
}  # fmt: skip
OPTIONS = {
    "train": ["--lr", "--r", "--alpha", "--dropout", "--adapter", "--targets", "--target-regex", "--seed", "--epochs",
              "--eval", "--eval-every", "--grad-accum", "--n-frequency", "--scaling", "--task", "--dtype", "--device",
              "--input-field", "--target-field", "--batch-size", "--base", "--train"],
    "eval": ["--batch-size", "--max-new-tokens", "--adapter", "--data", "--task", "--device", "--dtype", "--base"],
    "merge": ["--adapter", "--base", "--device", "--dtype", "--task"],
    "compose": ["--num", "--budget", "--mode", "--optimizer", "--population", "--seed", "--select", "--formula",
                "--modules", "--pool", "--examples", "--device", "--dtype", "--input-field"],
    "inspect": ["--json"],
    "convert": ["--component", "--base"],
}  # fmt: skip
HOSTILE = st.one_of(
    st.sampled_from(
        ["", "0", "-1", "nan", "inf", "-inf", "1e309", "0.5", "2", "abc", "🙂", "/", ".", "/dev/null", "/nonexistent/x",
         "/etc/passwd", "5-1", "1-99999999999", '{"a": 1}', "x" * 5000, "q,v", "([", ".*", "cuda", "meta", "fp8",
         "bf16", "lora", "full", "ia3", "fourierft", "seq2seq", "causal", "gradient", "nevergrad", "CMA", "retrieval",
         "--out", "-h?", "a\x00b", DATA, MODULE, BASE, POOL]
    ),
    st.text(max_size=12),
    st.integers(-(10**12), 10).map(str),  # no positive count large enough to run for long
)  # fmt: skip
CASES = st.sampled_from(sorted(COMMANDS)).flatmap(
    lambda cmd: st.tuples(
        st.just(cmd),
        st.lists(st.tuples(st.sampled_from(OPTIONS[cmd]), HOSTILE), min_size=1, max_size=3),
        st.booleans(),  # also drop one of the command's own arguments
    )
)


def cli_outcome(case) -> str:
    """'ok', 'usage' (argparse), 'refused' (one error line, nothing written) or a defect class."""
    cmd, options, drop = case
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = Path(tmp) / "out"
        argv = [str(out) if a == "OUT" else a for a in COMMANDS[cmd]]
        if drop and len(argv) > 2:
            del argv[-2:]
        for option, value in options:
            argv += [option] if option == "--json" else [option, value]
        err = io.StringIO()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                code = main(argv)
        except SystemExit as e:
            return "usage" if e.code == 2 and "error:" in err.getvalue() else f"exit:{e.code}"
        except BaseException as e:  # noqa: BLE001  (what escapes main is the defect)
            return f"raw:{type(e).__name__}"
        text = err.getvalue()
        if "Traceback" in text:
            return "traceback"
        if code in (0, 1):
            return "ok"
        lines = [line for line in text.splitlines() if line.startswith("loraloom: error:")]
        if code != 2 or len(lines) != 1:
            return f"bad-error:{code}:{len(lines)}"
        if out.exists():
            return "refused-left-output"
        return "refused"


def check(case) -> None:
    assert cli_outcome(case) in ("ok", "usage", "refused"), case


@FAST
@given(CASES)
def test_fuzz_cli(case):
    check(case)


@pytest.mark.slow
@SLOW
@given(CASES)
def test_fuzz_cli_slow(case):
    check(case)


def count(n: int) -> collections.Counter:
    counts: collections.Counter = collections.Counter()

    @settings(max_examples=n, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(CASES)
    def run(case):
        counts[cli_outcome(case)] += 1

    run()
    return counts


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(dict(count(int(sys.argv[1]) if len(sys.argv) > 1 else 300).most_common()))

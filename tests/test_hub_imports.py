"""``import loraloom`` and the LoraHub path stay light: the heavy optional libraries load only where used.

nevergrad loads for a gradient-free search, matplotlib for a plot, fastapi / uvicorn / ray for the server
and the Ray runner; none of them on ``import loraloom``, ``import loraloom.compat`` or a gradient-mode
``lorahub`` run. Each check runs in a fresh interpreter, so what the test process imported does not count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HEAVY = ("nevergrad", "matplotlib", "fastapi", "uvicorn", "ray")
TESTS = Path(__file__).resolve().parent


def loaded_after(code: str) -> list[str]:
    """The HEAVY libraries in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    path = os.pathsep.join([str(TESTS), *sys.path])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_import_loraloom_and_compat_load_no_heavy_library():
    assert loaded_after("import loraloom, loraloom.compat, loraloom.hub") == []


def test_a_gradient_mode_search_loads_no_heavy_library(tmp_path):
    code = f"""
from hub_modules import EXAMPLES, make_modules, tokenizer
from tiny_models import tiny_t5
import loraloom as ll
model = tiny_t5()
modules = make_modules(model, __import__("pathlib").Path({str(tmp_path)!r}), 2)
result = ll.lorahub(model, modules, EXAMPLES, tokenizer=tokenizer(), budget=4, mode="gradient")
result.save({str(tmp_path / "out")!r}, plot=False)
"""
    assert loaded_after(code) == []


def test_a_nevergrad_search_leaves_out_bayes_opt_unless_asked(tmp_path):
    """NGOpt's search imports nevergrad without bayes_opt (and its scikit-learn and pandas); asking for BO
    first still gets it, and asking for it after names the fix."""
    code = f"""
import sys
from hub_modules import EXAMPLES, make_modules, tokenizer
from tiny_models import tiny_t5
import loraloom as ll
model = tiny_t5()
modules = make_modules(model, __import__("pathlib").Path({str(tmp_path)!r}), 2)
result = ll.lorahub(model, modules, EXAMPLES, tokenizer=tokenizer(), budget=4, mode="nevergrad", population=1)
assert result.settings["method"].startswith("nevergrad:NGOpt"), result.settings["method"]
assert "NGOpt" in sys.modules["nevergrad"].optimizers.registry
assert "bayes_opt" not in sys.modules and "sklearn" not in sys.modules, "bayes_opt loaded"
try:
    ll.SearchSettings(mode="nevergrad", optimizer="BO")
except ValueError as e:
    assert "import nevergrad" in str(e) or "unknown" in str(e), e
"""
    assert loaded_after(code) == ["nevergrad"]


def test_bo_asked_first_gets_bayes_opt():
    code = """
import importlib.util, sys
import loraloom as ll
ll.SearchSettings(mode="nevergrad", optimizer="BO")
has = importlib.util.find_spec("bayes_opt") is not None
assert ("BO" in sys.modules["nevergrad"].optimizers.registry) == has
"""
    assert loaded_after(code) == ["nevergrad"]

#!/usr/bin/env bash
# Build the reference LoraHub environment used by benchmarks/lorahub_vs_reference.py.
#
#   bash benchmarks/reference_env.sh [VENV_DIR]     (default: benchmarks/.ref-venv, gitignored)
#
# `pip install lorahub` pulls unpinned deps (and a typo'd "dataset" requirement), so the package is
# installed with --no-deps, beside the same torch / transformers / peft / nevergrad versions as
# loraloom's own venv, plus what lorahub/algorithm.py imports at top level (datasets, pandas).
# Nothing from the reference is copied into this repository.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${1:-$here/.ref-venv}"
python="${PYTHON:-python3.11}"

"$python" -m venv "$venv"
echo '*' > "$venv/.gitignore"  # the venv ignores itself (as Python >= 3.13 venvs do)
pip="$venv/bin/pip"
"$pip" install --quiet --upgrade pip
# The CPU build of torch (a local wheel here; PyTorch's CPU index elsewhere); on a GPU machine set
# REF_TORCH_INDEX (e.g. https://download.pytorch.org/whl/cu124) so that the reference runs on the GPU too.
if [ -n "${REF_TORCH_INDEX:-}" ]; then
    "$pip" install --quiet "torch==2.13.0" --index-url "$REF_TORCH_INDEX"
else
    "$pip" install --quiet "torch==2.13.0+cpu" ||
        "$pip" install --quiet "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
"$pip" install --quiet "transformers==5.23.0" "peft==0.21.2" "nevergrad==1.0.12" \
    "safetensors" "tokenizers" "datasets" "pandas" "psutil"
"$pip" install --quiet --no-deps "lorahub==0.1.0"
"$venv/bin/python" -c "import lorahub.algorithm, peft, transformers, torch; print('reference env ready:', torch.__version__, transformers.__version__, peft.__version__)"

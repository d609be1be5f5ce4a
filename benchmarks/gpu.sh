#!/usr/bin/env bash
# The LoraHub, LoRA training, FourierFT and serving benchmarks on a GPU, printing the same RESULT ratios as on the
# CPU (against PEFT and the reference package). About 10 minutes on one CUDA GPU in all.
#
#   bash benchmarks/gpu.sh                   # --device cuda
#   bash benchmarks/gpu.sh --device cuda:1
#   bash benchmarks/gpu.sh --device cpu --quick   # the smoke test the slow test profile runs
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
QUICK=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK=(--quick); shift ;;
    *) echo "usage: benchmarks/gpu.sh [--device cuda|cuda:N|cpu] [--quick]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-.venv/bin/python}
# One clear line and exit 2 when the device does not exist, before any benchmark starts.
"$PY" -c "import sys; from loraloom.devices import resolve_device
try: resolve_device(sys.argv[1])
except ValueError as e: sys.exit(f'benchmarks/gpu.sh: {e}')" "$DEVICE" || exit 2

echo "== LoraHub vs the reference package (FLAN-T5-small shapes) on $DEVICE"
"$PY" benchmarks/lorahub_vs_reference.py --device "$DEVICE" --seeds 3 --variants reference,loraloom,loraloom-fp32,compat "${QUICK[@]}"
echo "== LoRA training vs PEFT on $DEVICE"
"$PY" benchmarks/lora_train.py --device "$DEVICE" "${QUICK[@]}"
echo "== FourierFT vs PEFT on $DEVICE"
"$PY" benchmarks/fourierft.py --device "$DEVICE" "${QUICK[@]}"
echo "== serving: MultiLora vs PEFT adapter_names, and the server, on $DEVICE"
"$PY" benchmarks/serving.py --device "$DEVICE" "${QUICK[@]}"

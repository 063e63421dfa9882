#!/usr/bin/env bash
# The whole GPU path in one command (bench/gpu_check.py lists the steps); the report lands in --out (default $OUT).
#   bash bench/gpu_check.sh                        # a GPU machine: CUDA, bf16 (about 6 minutes on one H200)
#   bash bench/gpu_check.sh --device cpu --quick   # the same steps, tiny, on CPU (CI)
# A machine without megatron-core and DeepSpeed installs them from .whl/ (docs/benchmarks.md, "GPU check").
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
exec "$PYTHON" bench/gpu_check.py "$@"

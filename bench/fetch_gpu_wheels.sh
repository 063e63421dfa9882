#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what bench/gpu_check.sh installs on a GPU machine that has torch but none of our
# dependencies and no network: megatron-core's wheel for that machine's Python, the DeepSpeed sdist (pure Python;
# installed with DS_BUILD_OPS=0), and the packages DeepSpeed needs that such an image lacks (pydantic and its
# compiled core, hjson). About 7 MB. Run it where pip reaches an index:
#   bash bench/fetch_gpu_wheels.sh              # for CPython 3.12 on x86-64 Linux (the lent H200 machine)
#   PYTHON_VERSION=3.11 bash bench/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON_VERSION:-3.12}
DEST=${DEST:-.whl}
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
# The versions constraints.txt pins for megatron-core and DeepSpeed; pydantic's as pip resolves them here.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  "${platforms[@]}" -d "$DEST" \
  "$(grep '^megatron-core==' constraints.txt)" pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \
  typing-inspection==0.4.2 hjson==3.1.0
python3 -m pip download -q --no-deps --no-binary=:all: --no-build-isolation -d "$DEST" \
  "$(grep '^deepspeed==' constraints.txt)"
ls -l "$DEST"

#!/usr/bin/env bash
# Wheels the lent device machine (nvidia-h200, image 'cuda': Python 3.12, CuPy 14 for CUDA 13, nvcc, compute-
# sanitizer, no network) lacks for scripts/gpu_check.py, downloaded here into .whl/ (git-ignored; carried by the
# device call, a few MiB). Versions: the ones this checkout's .venv resolved, so the device runs what CI tests.
#
#   bash scripts/device_wheels.sh            # then run the device command of README "Verify on a GPU host"
#
# Not carried, because they cannot be: onnxruntime-gpu (its 1.26 wheel alone is 277 MB, over the 64 MiB a call may
# carry, and built for CUDA 12 while the device image is CUDA 13) and TensorRT (tensorrt-cu12-libs fetches its
# libraries from pypi.nvidia.com, which neither this machine's index nor the device reaches). On that machine the
# TensorRT and ONNX Runtime GPU rows are SKIPPED with that reason; they need a host with the gpu extra installed,
# e.g. the Docker gpu image (README, "Verify on a GPU host").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
pins=$("$PY" - <<'PY'
import importlib.metadata as md
names = ["pydantic", "pydantic-core", "pydantic-settings", "annotated-types", "typing-inspection", "python-dotenv",
         "fastapi", "starlette", "python-multipart", "annotated-doc", "pytest-asyncio"]
print(" ".join(f"{n}=={md.version(n)}" for n in names))
PY
)
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl $pins
ls .whl && du -sh .whl

# syntax=docker/dockerfile:1.7
#
# snipserve images. Two targets, both multi-stage (a builder makes the wheels and the virtualenv; the
# runtime stage copies only the virtualenv), both run as a non-root user with a HEALTHCHECK on /readyz:
#
#   docker build --target gpu -t snipserve:gpu .   # NVIDIA CUDA + cuDNN runtime, TensorRT, ONNX Runtime GPU
#   docker build --target cpu -t snipserve:cpu .   # python:3.11-slim, ONNX Runtime CPU
#
# GPU hosts need the NVIDIA driver and the NVIDIA Container Toolkit (`docker run --gpus all ...`).
# The model: the shipped default is baked in at /models/snipserve_default.onnx; mount your own at /models
# and point SNIPSERVE_MODEL_PATH at it (model files must lie inside SNIPSERVE_MODELS_DIR=/models).
# Nothing is downloaded at run time.
# Process model: one uvicorn worker per container, one container per GPU (see the README, "Operating snipserve").

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# CUDA 12 + cuDNN 9: the one CUDA major of the gpu extra (onnxruntime-gpu 1.19-1.26, tensorrt-cu12 10.x,
# cupy-cuda12x; see pyproject.toml). PyPI's onnxruntime-gpu 1.27+ and the `tensorrt` meta-package (10.13.2.6+)
# are CUDA 13 builds: moving to them means a 13.x base here, cupy-cuda13x and tensorrt-cu13 (and driver >= 580).
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
# The apt suffix of the base image's CUDA major-minor (12.6 -> 12-6): the header packages below must match it.
ARG CUDA_APT_VERSION=12-6

# ---------------------------------------------------------------------------------------------------
# Shared: the package source (the build context is filtered by .dockerignore).
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY service /src/service
COPY snipserve_client /src/snipserve_client
COPY models /src/models
COPY exporters /src/exporters
COPY loadtest /src/loadtest

# ---------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=source /src /src
WORKDIR /src
# Wheels first (snipserve + every dependency), then an offline install from them into /opt/venv.
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m venv /opt/venv \
 && /opt/venv/bin/pip wheel --wheel-dir /wheels ".[cpu]" \
 && /opt/venv/bin/pip install --no-index --find-links /wheels "snipserve[cpu]" \
 && /opt/venv/bin/python -c "import service.http.app, onnxruntime" \
 && mkdir -p /models \
 && /opt/venv/bin/python -c "import pathlib, shutil, models; \
m = pathlib.Path(models.__file__).parent / 'snipserve_default.onnx'; \
m.is_file() and shutil.copy(m, '/models/')"

FROM ${PYTHON_IMAGE} AS cpu
RUN groupadd --system --gid 10001 snipserve \
 && useradd --system --uid 10001 --gid snipserve --home-dir /home/snipserve --create-home snipserve
COPY --from=cpu-builder /opt/venv /opt/venv
COPY --from=cpu-builder --chown=snipserve:snipserve /models /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SNIPSERVE_HOST=0.0.0.0 \
    SNIPSERVE_PORT=8000 \
    SNIPSERVE_MODELS_DIR=/models \
    SNIPSERVE_MODEL_PATH=/models/snipserve_default.onnx \
    SNIPSERVE_LOG_JSON=true \
    SNIPSERVE_PROVIDERS=cpu
WORKDIR /home/snipserve
VOLUME ["/models"]
EXPOSE 8000
USER 10001:10001
# No curl in the image: Python's urllib does the probe. /readyz is 200 only once the model is warmed up.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"]
ENTRYPOINT ["snipserve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu-base
ARG CUDA_APT_VERSION
# Ubuntu 24.04's Python 3.12; the venv in /opt/venv links to /usr/bin/python3 in both stages below.
# CUDA runtime headers for NVRTC: CuPy compiles every RawKernel/RawModule (and, on CUDA 12.2+, its own kernels,
# which include cuda_fp16.h) at run time, and the cudnn-runtime base ships the NVRTC library but no headers --
# without them CuPy 14 raises "Failed to find CUDA headers" and the GPU pre-processing / soft-NMS cannot start.
# cuda-cudart-dev: cuda_runtime.h, cuda_fp16.h and their include chain; cuda-cccl: nv/target, which those include;
# cuda-nvrtc: libnvrtc + builtins (already in the base; named so a slimmer base cannot drop it). The test fails the
# build if a header is missing.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    cuda-cudart-dev-${CUDA_APT_VERSION} cuda-cccl-${CUDA_APT_VERSION} cuda-nvrtc-${CUDA_APT_VERSION} \
 && rm -rf /var/lib/apt/lists/* \
 && test -f /usr/local/cuda/include/cuda_runtime.h \
 && test -f /usr/local/cuda/include/cuda_fp16.h \
 && test -e /usr/local/cuda/include/nv/target \
 && ls /usr/local/cuda/lib64/libnvrtc.so.* >/dev/null
ENV CUDA_PATH=/usr/local/cuda

FROM gpu-base AS gpu-builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=source /src /src
WORKDIR /src
# The gpu extra: onnxruntime-gpu (CUDA + TensorRT execution providers), tensorrt-cu12 (NVIDIA's CUDA 12 wheels;
# tensorrt-cu12-libs is a stub that fetches libnvinfer from pypi.nvidia.com at build time), cupy-cuda12x (GPU
# soft-NMS), nvidia-ml-py (GPU gauges on /metrics), onnx (graph-side pre-processing, on by default).
# The smoke check only finds tensorrt: importing it may need the driver's libcuda, absent at build time. It also
# fails the build if anything built for another CUDA major got in (ONNX Runtime's CUDA provider or a -cu11/-cu13).
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/venv \
 && /opt/venv/bin/pip wheel --wheel-dir /wheels ".[gpu]" \
 && /opt/venv/bin/pip install --no-index --find-links /wheels "snipserve[gpu]" \
 && /opt/venv/bin/python -c "import importlib.util as u, service.http.app, onnxruntime, pynvml, onnx; \
assert u.find_spec('tensorrt') and 'CUDAExecutionProvider' in onnxruntime.get_available_providers()" \
 && /opt/venv/bin/python -c "import importlib.metadata as md, mmap, pathlib, re, onnxruntime; \
so = pathlib.Path(onnxruntime.__file__).parent / 'capi' / 'libonnxruntime_providers_cuda.so'; \
f = open(so, 'rb'); m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ); \
assert [m.find(b'libcublas.so.%d' % v) >= 0 for v in (11, 12, 13)] == [False, True, False], f'{so}: not CUDA 12'; \
other = [d.metadata['Name'] for d in md.distributions() if re.search(r'cu(da)?(11|13)', d.metadata['Name'])]; \
assert not other, f'built for another CUDA major: {other}'" \
 && mkdir -p /models \
 && /opt/venv/bin/python -c "import pathlib, shutil, models; \
m = pathlib.Path(models.__file__).parent / 'snipserve_default.onnx'; \
m.is_file() and shutil.copy(m, '/models/')"

FROM gpu-base AS gpu
RUN groupadd --system --gid 10001 snipserve \
 && useradd --system --uid 10001 --gid snipserve --home-dir /home/snipserve --create-home snipserve \
 && mkdir -p /home/snipserve/.cache /cache/trt /cache/cupy \
 && chown snipserve:snipserve /home/snipserve/.cache /cache /cache/trt /cache/cupy
COPY --from=gpu-builder /opt/venv /opt/venv
COPY --from=gpu-builder --chown=snipserve:snipserve /models /models
# ONNX Runtime's TensorRT provider dlopens libnvinfer*.so.10: put the tensorrt wheel's libraries on the path.
ENV PATH=/opt/venv/bin:$PATH \
    LD_LIBRARY_PATH=/opt/venv/lib/python3.12/site-packages/tensorrt_libs:${LD_LIBRARY_PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    SNIPSERVE_HOST=0.0.0.0 \
    SNIPSERVE_PORT=8000 \
    SNIPSERVE_MODELS_DIR=/models \
    SNIPSERVE_MODEL_PATH=/models/snipserve_default.onnx \
    SNIPSERVE_LOG_JSON=true \
    SNIPSERVE_PROVIDERS=tensorrt,cuda \
    SNIPSERVE_FP16=true \
    SNIPSERVE_TRT_CACHE_DIR=/cache/trt \
    CUPY_CACHE_DIR=/cache/cupy
WORKDIR /home/snipserve
VOLUME ["/models"]
# TensorRT EP engines and CuPy's compiled kernels: a volume, so a restart on the same GPU rebuilds neither.
VOLUME ["/cache"]
EXPOSE 8000
USER 10001:10001
# start-period covers TensorRT engine builds on first start (minutes for large models).
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"]
ENTRYPOINT ["snipserve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]

"""docker-compose.yml through the real Compose (``config`` needs only the CLI, no engine), and a static
reading of the Dockerfile. Image builds cannot run here: these checks keep the files consistent."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import DEPLOY, ROOT, _ensure_tools

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def compose_command() -> list[str]:
    """``docker compose`` (v2 plugin) or ``docker-compose`` (v1, Debian's package), else skip."""

    def find() -> list[str] | None:
        if shutil.which("docker"):
            done = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30, check=False)
            if done.returncode == 0:
                return ["docker", "compose"]
        return ["docker-compose"] if shutil.which("docker-compose") else None

    found = find()
    if found is None and shutil.which("docker"):
        _ensure_tools()  # installs Debian's docker-compose next to a docker CLI without the plugin
        found = find()
    if found is None:
        pytest.skip("no Compose: neither the docker CLI's compose plugin nor docker-compose is installed")
    return found


def compose(*args: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SNIPSERVE_", "GRAFANA_", "PROMETHEUS_"))}
    done = subprocess.run(
        [*compose_command(), "-f", str(ROOT / "docker-compose.yml"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env={**clean, **env},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    parsed: dict[str, Any] = yaml.safe_load(compose("--profile", "loadtest", "config"))
    return parsed


def test_compose_config_services(config: dict[str, Any]) -> None:
    assert set(config["services"]) == {"snipserve", "prometheus", "grafana", "loadtest"}
    assert config["services"]["loadtest"]["profiles"] == ["loadtest"]


def test_service_has_gpu_healthcheck_and_model_volume(config: dict[str, Any]) -> None:
    svc = config["services"]["snipserve"]
    assert svc["build"]["target"] == "gpu"
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "/readyz" in " ".join(svc["healthcheck"]["test"])
    assert any(
        str(v).split(":")[1] == "/models" if isinstance(v, str) else v["target"] == "/models" for v in svc["volumes"]
    )
    assert svc["environment"]["SNIPSERVE_MODEL_PATH"] == "/models/snipserve_default.onnx"
    assert str(svc["environment"]["WEB_CONCURRENCY"]) == "1"


def test_models_volume_can_be_a_bind_mount() -> None:
    parsed = yaml.safe_load(compose("config", SNIPSERVE_MODELS="./my-models"))
    volume = parsed["services"]["snipserve"]["volumes"][0]
    source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
    assert source == str(ROOT / "my-models")


def test_prometheus_and_grafana_mount_the_repo_config(config: dict[str, Any]) -> None:
    def mounts(service: str) -> dict[str, str]:
        out = {}
        for v in config["services"][service]["volumes"]:
            source, target = (v.split(":")[:2]) if isinstance(v, str) else (v["source"], v["target"])
            out[target] = source
        return out

    prom = mounts("prometheus")
    assert prom["/etc/prometheus"] == str(DEPLOY / "prometheus")
    assert "--config.file=/etc/prometheus/prometheus.yml" in config["services"]["prometheus"]["command"]
    grafana = mounts("grafana")
    assert grafana["/etc/grafana/provisioning"] == str(DEPLOY / "grafana" / "provisioning")
    assert grafana["/var/lib/grafana/dashboards"] == str(DEPLOY / "grafana" / "dashboards")
    prom_cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in prom_cfg["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert "snipserve:8000" in targets  # the compose service name and port
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


# -- Dockerfile (static) -------------------------------------------------------------------------------


def stages() -> dict[str, str]:
    """Stage name -> its instructions (text up to the next FROM)."""
    parts = re.split(r"^FROM\s+", DOCKERFILE, flags=re.M)[1:]
    out = {}
    for part in parts:
        header, _, body = part.partition("\n")
        match = re.search(r"\bAS\s+(\S+)", header, flags=re.I)
        assert match, f"unnamed stage: FROM {header}"
        out[match.group(1)] = header + "\n" + body
    return out


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_runtime_stage(target: str) -> None:
    stage = stages()[target]
    user = re.findall(r"^USER\s+(\S+)", stage, flags=re.M)
    assert user and not user[-1].startswith(("root", "0")), user
    assert re.search(r"^HEALTHCHECK .*\n?.*/readyz", stage, flags=re.M)
    assert re.search(r"^EXPOSE 8000$", stage, flags=re.M)
    assert 'VOLUME ["/models"]' in stage and "SNIPSERVE_MODEL_PATH=/models/" in stage
    assert 'CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]' in stage
    assert 'ENTRYPOINT ["snipserve"]' in stage
    assert f"COPY --from={target}-builder /opt/venv /opt/venv" in stage
    assert "pip install" not in stage  # everything is built in the builder stage


def test_bases_and_extras() -> None:
    all_stages = stages()
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.11-slim", DOCKERFILE)
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:12\.\S+-cudnn-runtime-", DOCKERFILE)
    assert '".[cpu]"' in all_stages["cpu-builder"] and '".[gpu]"' in all_stages["gpu-builder"]
    assert "import importlib.util as u, service.http.app, onnxruntime, pynvml" in all_stages["gpu-builder"]
    assert "find_spec('tensorrt')" in all_stages["gpu-builder"]
    assert "tensorrt_libs" in all_stages["gpu"]  # ONNX Runtime's TensorRT EP must find libnvinfer


def test_gpu_extra_and_gpu_image_share_one_cuda_major() -> None:
    """The gpu extra and the gpu image's base agree on one CUDA major: a mix installs fine and fails at load time.

    PyPI facts the pins rest on (read from the wheels' DT_NEEDED, see pyproject.toml): onnxruntime-gpu 1.18 is
    CUDA 11.8, 1.19-1.26 CUDA 12 + cuDNN 9, 1.27+ CUDA 13, and every one links its TensorRT EP to libnvinfer.so.10;
    the ``tensorrt`` meta-package pulls tensorrt_cu13 on Linux from 10.13.2.6 on, so a CUDA-suffixed one is named.
    """
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    gpu = {Requirement(r).name: Requirement(r).specifier for r in project["optional-dependencies"]["gpu"]}
    base = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.\S+-cudnn-runtime-", DOCKERFILE, flags=re.M)
    assert base, "the gpu base image is not an nvidia/cuda cudnn-runtime image"
    major = base.group(1)
    assert major == "12", "the onnxruntime-gpu ranges below are for CUDA 12; update them with the base image"
    assert "tensorrt" not in gpu, "the tensorrt meta-package picks its own CUDA major; name tensorrt-cu<major>"
    assert {f"tensorrt-cu{major}", f"cupy-cuda{major}x", "onnxruntime-gpu", "nvidia-ml-py", "onnx"} <= set(gpu)
    trt = gpu[f"tensorrt-cu{major}"]
    assert trt.contains("10.16.1.11") and not trt.contains("11.0.0.114"), trt  # libnvinfer.so.10 for ORT's EP
    ort = gpu["onnxruntime-gpu"]
    assert ort.contains("1.19.0") and ort.contains("1.26.0"), ort
    assert not ort.contains("1.18.1") and not ort.contains("1.27.0"), ort  # CUDA 11.8 and CUDA 13 builds
    cpu_side = [*project["dependencies"], *project["optional-dependencies"]["cpu"]]
    gpu_like = re.compile(r"gpu|cuda|cupy|tensorrt|nvidia|cudnn", flags=re.I)
    assert not [r for r in cpu_side if gpu_like.search(Requirement(r).name)]


def test_copied_sources_exist() -> None:
    copied = re.search(r"^FROM scratch AS source\n((?:COPY .*\n)+)", DOCKERFILE, flags=re.M)
    assert copied
    paths = [p for line in copied.group(1).splitlines() for p in line.split()[1:-1]]
    assert {"pyproject.toml", "service", "snipserve_client", "models"} <= set(paths)
    missing = [p for p in paths if not (ROOT / p).exists()]
    if missing == ["README.md"]:
        pytest.skip("README.md (pyproject's readme, copied into the image) does not exist yet")
    assert not missing, missing
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert not set(paths) & ignored, "a COPY source is excluded by .dockerignore"


def test_loadtest_profile_runs_the_load_generator(config: dict[str, Any]) -> None:
    svc = config["services"]["loadtest"]
    assert svc["entrypoint"] == ["python", "-m", "loadtest"]
    command = svc["command"] if isinstance(svc["command"], str) else " ".join(svc["command"])
    assert command.startswith("run --url http://snipserve:8000 ")
    assert svc["depends_on"]["snipserve"]["condition"] == "service_healthy"
    from loadtest.__main__ import build_parser  # the flags must parse with the real CLI

    build_parser().parse_args(command.split())


def stage_env(stage: str) -> dict[str, str]:
    """The ``ENV`` keys and values of one Dockerfile stage (``KEY=VALUE`` form, continuation lines joined)."""
    text = stages()[stage].replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV\s+(.*)$", text, flags=re.M):
        env.update(pair.split("=", 1) for pair in line.split() if "=" in pair)
    return env


@pytest.mark.parametrize("source", ["cpu", "gpu", "compose"])
def test_service_environment_is_valid_settings(
    source: str, config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SNIPSERVE_* values the image and compose set are accepted by the real Settings model."""
    from service.settings import Settings

    if source == "compose":
        env = {k: str(v) for k, v in config["services"]["snipserve"]["environment"].items()}
        env = {**stage_env("gpu"), **env}  # compose overrides the image's ENV
    else:
        env = stage_env(source)
    for key in [k for k in os.environ if k.startswith("SNIPSERVE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("SNIPSERVE_"):
            monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.models_dir == settings.model_path.parent == Path("/models")
    assert (settings.host, settings.port, settings.log_json) == ("0.0.0.0", 8000, True)
    assert settings.providers == (("cpu",) if source == "cpu" else ("tensorrt", "cuda"))


def test_gpu_image_ships_the_cuda_headers_nvrtc_needs() -> None:
    """CuPy compiles its kernels and ours with NVRTC at run time; the cudnn-runtime base has no CUDA headers, so
    the gpu base stage installs them, for the base image's own CUDA major-minor, and checks they are there."""
    base = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\S+-cudnn-runtime-", DOCKERFILE, flags=re.M)
    apt = re.search(r"^ARG CUDA_APT_VERSION=(\S+)$", DOCKERFILE, flags=re.M)
    assert base and apt and apt.group(1) == f"{base.group(1)}-{base.group(2)}", (base, apt)
    gpu_base = stages()["gpu-base"].replace("\\\n", " ")
    assert "ARG CUDA_APT_VERSION" in gpu_base
    for package in ("cuda-cudart-dev", "cuda-cccl", "cuda-nvrtc"):
        assert f"{package}-${{CUDA_APT_VERSION}}" in gpu_base, package
    for header in ("cuda_runtime.h", "cuda_fp16.h", "nv/target"):
        assert f"/usr/local/cuda/include/{header}" in gpu_base, header
    assert "CUDA_PATH=/usr/local/cuda" in gpu_base


def test_engine_caches_live_on_a_volume(config: dict[str, Any]) -> None:
    gpu = stages()["gpu"]
    env = stage_env("gpu")
    assert env["SNIPSERVE_TRT_CACHE_DIR"] == "/cache/trt" and env["CUPY_CACHE_DIR"] == "/cache/cupy"
    assert 'VOLUME ["/cache"]' in gpu and "chown snipserve:snipserve" in gpu and "/cache/trt" in gpu
    svc = config["services"]["snipserve"]
    assert svc["environment"]["SNIPSERVE_TRT_CACHE_DIR"] == "/cache/trt"
    mounts = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in svc["volumes"]]
    assert any(m.startswith("snipserve-cache:/cache") for m in mounts), mounts  # a named volume
    assert "snipserve-cache" in config["volumes"]

"""service.metrics: naming conventions, label cardinality, helpers, the NVML collector, one-worker rule."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service import metrics

# Every label any snipserve_ family may carry; anything else risks unbounded series.
ALLOWED_LABELS = {
    "route",
    "level",  # pyramid level index of the focus metrics: a handful of values
    "status",
    "stage",
    "reason",
    "gpu",
    "model",
    "engine",
    "providers",
    "precision",
    "version",
}


# The documented set (README, "Operating snipserve"): a new metric goes here, into the README and, if useful,
# the dashboard.
EXPECTED_FAMILIES = {
    "snipserve_requests",
    "snipserve_request_duration_seconds",
    "snipserve_stage_duration_seconds",
    "snipserve_batch_size_chips",
    "snipserve_batch_fill_ratio",
    "snipserve_chips_per_request",
    "snipserve_queue_depth_chips",
    "snipserve_queue_capacity_chips",
    "snipserve_queue_drain_rate_chips_per_second",
    "snipserve_queue_estimated_wait_seconds",
    "snipserve_in_flight_requests",
    "snipserve_rejections",
    "snipserve_engine_errors",
    "snipserve_detections_per_image",
    "snipserve_input_megapixels",
    "snipserve_chips",
    "snipserve_queue_wait_seconds",
    "snipserve_inference_seconds",
    "snipserve_focus_chips",
    "snipserve_brownouts",
    "snipserve_admission_lateness_seconds",
    "snipserve_focus_area_ratio",
    "snipserve_ready",
    "snipserve_model_info",
    "snipserve_build_info",
    "snipserve_gpu_devices",
    "snipserve_gpu_memory_used_bytes",
    "snipserve_gpu_memory_total_bytes",
    "snipserve_gpu_utilization_ratio",
}


def families() -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.REGISTRY).decode())}


def test_names_prefix_units_and_labels() -> None:
    fams = families()
    ours = {name: f for name, f in fams.items() if name.startswith("snipserve_")}
    assert set(fams) - set(ours) <= {n for n in fams if n.startswith(("process_", "python_"))}
    assert set(ours) == EXPECTED_FAMILIES
    for name, fam in ours.items():
        assert name == name.lower() and "__" not in name, name
        if "duration" in name or "latency" in name:
            assert name.endswith("_seconds"), name
        if "memory" in name:
            assert name.endswith("_bytes"), name
        for s in fam.samples:
            assert set(s.labels) - {"le"} <= ALLOWED_LABELS, (name, s.labels)
        if fam.type == "counter":
            assert all(s.name.endswith("_total") for s in fam.samples), name


def test_latency_buckets_have_slo_edges() -> None:
    assert {0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0} <= set(metrics.LATENCY_BUCKETS)


def test_stage_and_reason_series_exist_before_first_event() -> None:
    # Pre-created children let rate() and dashboards show 0 instead of "no data" on a fresh process.
    for stage in metrics.STAGES:
        assert metrics.REGISTRY.get_sample_value("snipserve_stage_duration_seconds_count", {"stage": stage}) is not None
    for reason in ("queue_full", "deadline", "too_large", "bad_image", "unauthorized"):
        assert metrics.REGISTRY.get_sample_value("snipserve_rejections_total", {"reason": reason}) is not None


def test_observe_stages_ignores_unknown_keys() -> None:
    def count(stage: str) -> float:
        return metrics.REGISTRY.get_sample_value("snipserve_stage_duration_seconds_count", {"stage": stage}) or 0.0

    before = count("merge")
    metrics.observe_stages({"merge": 0.002, "total": 1.0, "bogus": 3.0})
    assert count("merge") == before + 1
    assert count("total") == 0.0 and count("bogus") == 0.0


def test_model_info_is_replaced_not_accumulated() -> None:
    metrics.set_model_info(model="a", engine="fake", providers="cpu", precision="fp32")
    metrics.set_model_info(model="b", engine="onnxruntime", providers="tensorrt,cuda", precision="fp16")
    samples = families()["snipserve_model_info"].samples
    assert len(samples) == 1
    assert samples[0].labels == {
        "model": "b",
        "engine": "onnxruntime",
        "providers": "tensorrt,cuda",
        "precision": "fp16",
    }
    assert samples[0].value == 1.0


def test_no_created_series() -> None:
    text = generate_latest(metrics.REGISTRY).decode()
    assert "_created" not in text


# -- NVML ----------------------------------------------------------------------------------------------


class FakeNvml:
    """The slice of pynvml the collector uses: two GPUs; the second does not report utilisation."""

    class NVMLError(Exception):
        pass

    def __init__(self, *, fail_init: bool = False) -> None:
        self.fail_init = fail_init
        self.inits = 0

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        self.inits += 1
        if self.fail_init:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(used=(handle + 1) * 1024**3, total=80 * 1024**3, free=0)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:  # noqa: N802
        if handle == 1:
            raise self.NVMLError("Not Supported")
        return SimpleNamespace(gpu=73, memory=10)


def collect(collector: metrics.GpuCollector) -> dict[str, list[tuple[dict[str, str], float]]]:
    registry = CollectorRegistry()
    registry.register(collector)
    fams = text_string_to_metric_families(generate_latest(registry).decode())
    return {f.name: [(s.labels, s.value) for s in f.samples] for f in fams}


def test_gpu_collector_reports_memory_and_utilisation() -> None:
    nvml = FakeNvml()
    collector = metrics.GpuCollector(nvml_loader=lambda: nvml)
    got = collect(collector)
    assert got["snipserve_gpu_devices"] == [({}, 2.0)]
    assert got["snipserve_gpu_memory_used_bytes"] == [
        ({"gpu": "0"}, 1024.0**3),
        ({"gpu": "1"}, 2 * 1024.0**3),
    ]
    assert got["snipserve_gpu_memory_total_bytes"] == [
        ({"gpu": "0"}, 80 * 1024.0**3),
        ({"gpu": "1"}, 80 * 1024.0**3),
    ]
    assert got["snipserve_gpu_utilization_ratio"] == [({"gpu": "0"}, 0.73)]  # gpu 1: not supported, left out
    collect(collector)
    assert nvml.inits == 1  # initialised once, on the first scrape, not at registration


@pytest.mark.parametrize("loader", [lambda: None, lambda: FakeNvml(fail_init=True)], ids=["no-pynvml", "no-driver"])
def test_gpu_collector_without_gpu_describes_families_and_reports_zero(loader: Any) -> None:
    collector = metrics.GpuCollector(nvml_loader=loader)
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    for name in (
        "snipserve_gpu_memory_used_bytes",
        "snipserve_gpu_memory_total_bytes",
        "snipserve_gpu_utilization_ratio",
    ):
        assert f"# TYPE {name} gauge" in text  # dashboards and rules may name them
    assert "snipserve_gpu_devices 0.0" in text


def test_gpu_collector_registration_does_not_touch_nvml() -> None:
    def loader() -> Any:
        raise AssertionError("NVML loaded at registration")

    CollectorRegistry(auto_describe=True).register(metrics.GpuCollector(nvml_loader=loader))


@pytest.mark.gpu
@pytest.mark.skipif(
    importlib.util.find_spec("pynvml") is None or shutil.which("nvidia-smi") is None,
    reason="needs an NVIDIA driver and nvidia-ml-py (the gpu extra)",
)
def test_gpu_collector_with_real_nvml() -> None:
    got = collect(metrics.GpuCollector())
    count = int(got["snipserve_gpu_devices"][0][1])
    assert count >= 1
    for labels, used in got["snipserve_gpu_memory_used_bytes"]:
        total = dict((tuple(lbl.items()), v) for lbl, v in got["snipserve_gpu_memory_total_bytes"])
        assert 0 <= used <= total[tuple(labels.items())]
    assert all(0.0 <= v <= 1.0 for _, v in got.get("snipserve_gpu_utilization_ratio", []))


# -- process model -------------------------------------------------------------------------------------


def test_check_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics.check_single_process(1)
    with pytest.raises(ValueError, match="workers=4"):
        metrics.check_single_process(4)
    monkeypatch.setenv("WEB_CONCURRENCY", "1")
    metrics.check_single_process(1)
    monkeypatch.setenv("WEB_CONCURRENCY", "two")
    with pytest.raises(ValueError, match="not an integer"):
        metrics.check_single_process(1)
    monkeypatch.delenv("WEB_CONCURRENCY")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/tmp/x")
    with pytest.raises(ValueError, match="PROMETHEUS_MULTIPROC_DIR"):
        metrics.check_single_process(1)


def test_operator_docs_table_matches_the_registry() -> None:
    docs = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    documented = set(re.findall(r"^\| `(snipserve_\w+)` \|", docs, flags=re.M))
    exposed = {name + ("_total" if fam.type == "counter" else "") for name, fam in families().items()}
    assert documented == {n for n in exposed if n.startswith("snipserve_")}


@pytest.mark.parametrize(
    ("argv", "refused"),
    [
        (["/venv/bin/uvicorn", "service.http.app:create_app", "--factory", "--workers", "4"], "--workers=4"),
        (["/venv/bin/uvicorn", "service.http.app:create_app", "--factory", "--workers=2"], "--workers=2"),
        (["/venv/lib/python3.11/site-packages/uvicorn/__main__.py", "app", "--workers", "3"], "--workers=3"),
        (["gunicorn", "-k", "uvicorn.workers.UvicornWorker", "-w", "8", "app"], "-w=8"),
        (["/venv/bin/uvicorn", "app", "--workers", "1"], None),
        (["/venv/bin/snipserve", "bench", "--workers", "4"], None),  # not a server command line
        (["pytest", "-w", "2"], None),
    ],
)
def test_check_single_process_reads_server_command_lines(
    argv: list[str], refused: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    if refused is None:
        metrics.check_single_process(1, argv)
    else:
        with pytest.raises(ValueError, match=refused):
            metrics.check_single_process(1, argv)

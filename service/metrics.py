"""Prometheus metrics. Names carry the ``snipserve_`` prefix, base units (seconds, bytes, ratios 0-1),
and only low-cardinality labels (route templates, status codes, stage names, reasons, GPU index; never
request ids, raw paths or client addresses).

All metric objects live in one registry, ``REGISTRY``, so tests can read them and ``/metrics`` serves
exactly this set (``service.observability`` mounts the route and drives ``REQUESTS``/``REQUEST_LATENCY``).

Process model: **one uvicorn worker per process, one process per GPU.** The dynamic batcher only fills
batches if every request of a GPU shares one queue, so several workers on one GPU would split batches and
load the engine several times. Scale out with more containers/processes (one per GPU) behind a load
balancer; Prometheus scrapes each as its own target and dashboards ``sum`` across instances. Because
each process owns all its metrics, plain in-process collection is exact and prometheus-client's
multiprocess mode is not used; ``check_single_process`` refuses configurations that would need it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from importlib import metadata
from typing import Any

from prometheus_client import (
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Without this every counter and histogram also exports a `<name>_created` gauge series (the 0.0.4 text
# format has no metadata slot for it), doubling series for a value no panel or alert uses.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream

REGISTRY = CollectorRegistry(auto_describe=True)

# SLO-shaped latency buckets: 50/100/250/500 ms, 1/2.5/5 s, with finer steps below and a tail above.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
STAGES = ("decode", "plan", "crop", "queue_wait", "infer", "postprocess", "merge")
REJECT_REASONS = ("queue_full", "deadline", "too_large", "bad_image", "unauthorized", "invalid_options")

REQUESTS = Counter(
    "snipserve_requests",
    "HTTP requests by route template and status code.",
    ["route", "status"],
    registry=REGISTRY,
)
REQUEST_LATENCY = Histogram(
    "snipserve_request_duration_seconds",
    "End-to-end HTTP request latency by route template.",
    ["route"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
STAGE_DURATION = Histogram(
    "snipserve_stage_duration_seconds",
    "Time spent per pipeline stage per request (queue_wait and infer: per chip batch as the request saw it).",
    ["stage"],
    buckets=STAGE_BUCKETS,
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "snipserve_batch_size_chips",
    "Chips per engine call.",
    buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128),
    registry=REGISTRY,
)
BATCH_FILL = Histogram(
    "snipserve_batch_fill_ratio",
    "Chips per engine call divided by max_batch.",
    buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
    registry=REGISTRY,
)
CHIPS_PER_REQUEST = Histogram(
    "snipserve_chips_per_request",
    "Chips planned for one image.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge("snipserve_queue_depth_chips", "Chips waiting for an engine call.", registry=REGISTRY)
QUEUE_DRAIN_RATE = Gauge(
    "snipserve_queue_drain_rate_chips_per_second",
    "Measured chips completed per second of wall clock while busy (moving average; Retry-After uses it).",
    registry=REGISTRY,
)
QUEUE_ESTIMATED_WAIT = Gauge(
    "snipserve_queue_estimated_wait_seconds",
    "Estimated completion time of the latest request at admission (chips ahead + its own, at the drain rate).",
    registry=REGISTRY,
)
ADMISSION_LATENESS = Histogram(
    "snipserve_admission_lateness_seconds",
    "A request's chips completed minus the hard deadline admission by time held them to (the queueing bound or the "
    "client's deadline, less the reply's measured time); negative: early. Above 0: a broken promise.",
    buckets=(-30, -10, -5, -2, -1, -0.5, -0.25, -0.1, 0, 0.1, 0.25, 0.5, 1, 2, 5),
    registry=REGISTRY,
)
QUEUE_CAPACITY = Gauge("snipserve_queue_capacity_chips", "Chips the queue admits before rejecting.", registry=REGISTRY)
IN_FLIGHT = Gauge("snipserve_in_flight_requests", "Detection requests being processed.", registry=REGISTRY)
REJECTIONS = Counter("snipserve_rejections", "Requests refused, by reason.", ["reason"], registry=REGISTRY)
BROWNOUTS = Counter(
    "snipserve_brownouts",
    "Requests for the default pyramid run as 'focus' under load (SNIPSERVE_BROWNOUT_WAIT_S).",
    registry=REGISTRY,
)
ENGINE_ERRORS = Counter("snipserve_engine_errors", "Engine calls that raised or timed out.", registry=REGISTRY)
DETECTIONS_PER_IMAGE = Histogram(
    "snipserve_detections_per_image",
    "Detections returned per image.",
    buckets=(0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
    registry=REGISTRY,
)
INPUT_MEGAPIXELS = Histogram(
    "snipserve_input_megapixels",
    "Decoded image size in megapixels.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
    registry=REGISTRY,
)
CHIPS = Counter("snipserve_chips", "Chips run through the engine.", registry=REGISTRY)
# Time counters for autoscaling on queue time (README, "Deployment on Kubernetes"). Both are chip-seconds, counted
# in the batcher when a chip leaves the queue / its engine call returns, so a saturated queue shows at once, unlike
# snipserve_stage_duration_seconds{stage="queue_wait"}, observed per request at its end and only to its first chip.
# rate(QUEUE_WAIT) is the time-averaged number of queued chips (Little's law); rate(QUEUE_WAIT) / rate(INFER_SECONDS)
# is the queue/compute ratio (mean wait of a chip / mean engine call a chip ran in).
QUEUE_WAIT = Counter(
    "snipserve_queue_wait_seconds",
    "Chip-seconds queued: each chip handed to an engine batch adds the seconds it waited in the queue.",
    registry=REGISTRY,
)
INFER_SECONDS = Counter(
    "snipserve_inference_seconds",
    "Chip-seconds of inference: each chip adds the seconds of the engine call it ran in.",
    registry=REGISTRY,
)
FOCUS_CHIPS = Histogram(
    "snipserve_focus_chips",
    "Preset 'focus': chips run per request at each pyramid level (0 = finest).",
    ["level"],
    buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    registry=REGISTRY,
)
FOCUS_AREA = Histogram(
    "snipserve_focus_area_ratio",
    "Preset 'focus': share of each level's image inside FocusChips regions (the coarsest level runs whole: 1).",
    ["level"],
    buckets=(0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
    registry=REGISTRY,
)
READY = Gauge("snipserve_ready", "1 when the service is warmed up and accepting work.", registry=REGISTRY)
MODEL_INFO = Info("snipserve_model", "Loaded model and engine.", registry=REGISTRY)
BUILD_INFO = Info("snipserve_build", "snipserve package version of this process.", registry=REGISTRY)

for _stage in STAGES:
    STAGE_DURATION.labels(stage=_stage)
for _reason in REJECT_REASONS:
    REJECTIONS.labels(reason=_reason)


def _package_version() -> str:
    try:
        return metadata.version("snipserve")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


BUILD_INFO.info({"version": _package_version()})


def observe_stages(timings: dict[str, float]) -> None:
    """Record a request's per-stage seconds (keys from ``STAGES``; others ignored)."""
    for stage, seconds in timings.items():
        if stage in STAGES:
            STAGE_DURATION.labels(stage=stage).observe(seconds)


def set_model_info(*, model: str, engine: str, providers: str, precision: str) -> None:
    """Publish ``snipserve_model_info{model, engine, providers, precision} 1`` (replaces the previous set)."""
    MODEL_INFO.info({"model": model, "engine": engine, "providers": providers, "precision": precision})


class GpuCollector(Collector):
    """GPU memory and utilisation from NVML, read at scrape time.

    ``pynvml`` (package ``nvidia-ml-py``, in the ``gpu`` extra) is imported on the first scrape and only
    there, so CPU installs never need it. Without it, or without a driver/GPU, the families are still
    described (so dashboards and rules name metrics that exist) and ``snipserve_gpu_devices`` reads 0.
    NVML sees every GPU the container was given, regardless of ``CUDA_VISIBLE_DEVICES``; the ``gpu``
    label is NVML's device index.
    """

    def __init__(self, nvml_loader: Any = None) -> None:
        self._load = nvml_loader if nvml_loader is not None else _import_nvml
        self._lock = threading.Lock()
        self._initialised = False
        self._nvml: Any = None
        self._handles: list[Any] = []

    def _devices(self) -> tuple[Any, list[Any]]:
        with self._lock:
            if not self._initialised:
                self._initialised = True  # one attempt per process: a missing driver stays missing
                try:
                    nvml = self._load()
                    if nvml is not None:
                        nvml.nvmlInit()
                        count = int(nvml.nvmlDeviceGetCount())
                        self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
                        self._nvml = nvml
                except Exception:  # NVMLError (no driver, no device) or a broken install: report 0 GPUs
                    self._nvml, self._handles = None, []
            return self._nvml, self._handles

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "snipserve_gpu_devices", "NVIDIA GPUs visible through NVML (0 without a GPU or nvidia-ml-py)."
            ),
            GaugeMetricFamily("snipserve_gpu_memory_used_bytes", "GPU memory in use (all processes).", labels=["gpu"]),
            GaugeMetricFamily("snipserve_gpu_memory_total_bytes", "GPU memory installed.", labels=["gpu"]),
            GaugeMetricFamily(
                "snipserve_gpu_utilization_ratio",
                "Fraction of the driver's last sample period (1/6 s to 1 s) in which a kernel ran, 0-1.",
                labels=["gpu"],
            ),
        )

    def describe(self) -> Iterable[GaugeMetricFamily]:
        # Names only: keeps registration from touching NVML.
        return self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        devices, used, total, util = self._families()
        nvml, handles = self._devices()
        devices.add_metric([], float(len(handles)))
        for index, handle in enumerate(handles):
            label = [str(index)]
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                used.add_metric(label, float(memory.used))
                total.add_metric(label, float(memory.total))
            except Exception:  # NVML_ERROR_NOT_SUPPORTED / GPU_IS_LOST: leave the series out this scrape
                pass
            with contextlib.suppress(Exception):  # e.g. MIG instances do not report utilisation
                util.add_metric(label, float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu) / 100.0)
        yield from (devices, used, total, util)


def _import_nvml() -> Any:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


GPU_COLLECTOR = GpuCollector()
REGISTRY.register(GPU_COLLECTOR)
# process_* (CPU seconds, resident memory, open fds, start time) and python_info, for this process.
REGISTRY.register(PROCESS_COLLECTOR)
REGISTRY.register(PLATFORM_COLLECTOR)


def check_single_process(workers: int = 1, argv: Sequence[str] | None = None) -> None:
    """Refuse configurations whose metrics (and batching) would be silently wrong.

    Raises ``ValueError`` when more than one worker is requested — by ``workers``, by ``WEB_CONCURRENCY``
    (read by uvicorn and gunicorn), or by ``--workers N`` / ``-w N`` on the command line of a uvicorn,
    gunicorn or hypercorn server (``argv``, default ``sys.argv``; spawned workers inherit it) — or when
    ``PROMETHEUS_MULTIPROC_DIR`` is set: this service runs one worker per GPU (see the module docstring)
    and does not aggregate metrics across processes.
    """
    requested = [("workers", workers)]
    env_workers = os.environ.get("WEB_CONCURRENCY", "").strip()
    if env_workers:
        requested.append(("WEB_CONCURRENCY", _as_int("WEB_CONCURRENCY", env_workers)))
    requested += _server_argv_workers(sys.argv if argv is None else argv)
    for source, count in requested:
        if count != 1:
            raise ValueError(
                f"{source}={count}: snipserve runs exactly one worker per process (one process per GPU) "
                "so that one batcher fills each GPU's batches and /metrics is exact; "
                "run more containers instead"
            )
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        raise ValueError(
            "PROMETHEUS_MULTIPROC_DIR is set, but snipserve does not use prometheus-client multiprocess mode "
            "(one worker per process); unset it"
        )


_SERVERS = ("uvicorn", "gunicorn", "hypercorn")


def _server_argv_workers(argv: Sequence[str]) -> list[tuple[str, int]]:
    """``[("--workers", N)]`` when ``argv`` is an ASGI server's command line asking for N workers."""
    program = argv[0].replace(os.sep, "/") if argv else ""
    # `uvicorn ...` has the script path in argv[0]; `python -m uvicorn ...` has .../uvicorn/__main__.py.
    if not any(s in program.rsplit("/", 1)[-1] or program.endswith(f"/{s}/__main__.py") for s in _SERVERS):
        return []
    found = []
    for i, arg in enumerate(argv):
        flag, _, value = arg.partition("=")
        if flag in ("--workers", "-w"):
            if not value and i + 1 < len(argv):
                value = argv[i + 1]
            found.append((flag, _as_int(flag, value)))
    return found


def _as_int(source: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{source}={value!r} is not an integer") from None


def observe_focus(levels: Sequence[Any]) -> None:
    """Chips and focus area per level of one 'focus' request (``service.focus.LevelFocus`` records)."""
    for lv in levels:
        FOCUS_CHIPS.labels(level=str(lv.index)).observe(lv.chips)
        FOCUS_AREA.labels(level=str(lv.index)).observe(lv.area)

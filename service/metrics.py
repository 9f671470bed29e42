"""Prometheus metrics. Names carry the ``snipserve_`` prefix, base units (seconds, bytes), and only
low-cardinality labels (route templates, stage names, reasons; never ids or paths).

All metric objects live in one registry, ``REGISTRY``, so tests can read them and ``/metrics`` serves
exactly this set.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

REGISTRY = CollectorRegistry(auto_describe=True)

# SLO-shaped latency buckets: 50/100/250/500 ms, 1/2.5/5 s, with finer steps below and a tail above.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
STAGES = ("decode", "plan", "crop", "queue_wait", "infer", "postprocess", "merge")
REJECT_REASONS = ("queue_full", "deadline", "too_large", "bad_image", "unauthorized", "invalid_options")

REQUESTS = Counter(
    "snipserve_requests", "HTTP requests by route template and status code.", ["route", "status"], registry=REGISTRY
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
    "Time spent per pipeline stage (per request; infer and queue_wait per chip batch as seen by the request).",
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
QUEUE_CAPACITY = Gauge("snipserve_queue_capacity_chips", "Chips the queue admits before rejecting.", registry=REGISTRY)
IN_FLIGHT = Gauge("snipserve_in_flight_requests", "Detection requests being processed.", registry=REGISTRY)
REJECTIONS = Counter(
    "snipserve_rejections", "Requests refused, by reason.", ["reason"], registry=REGISTRY
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
READY = Gauge("snipserve_ready", "1 when the service is warmed up and accepting work.", registry=REGISTRY)
MODEL_INFO = Info("snipserve_model", "Loaded model and engine.", registry=REGISTRY)

for _stage in STAGES:
    STAGE_DURATION.labels(stage=_stage)
for _reason in REJECT_REASONS:
    REJECTIONS.labels(reason=_reason)


def observe_stages(timings: dict[str, float]) -> None:
    """Record a request's per-stage seconds (keys from ``STAGES``; others ignored)."""
    for stage, seconds in timings.items():
        if stage in STAGES:
            STAGE_DURATION.labels(stage=stage).observe(seconds)


def set_model_info(*, model: str, engine: str, providers: str, precision: str) -> None:
    MODEL_INFO.info({"model": model, "engine": engine, "providers": providers, "precision": precision})

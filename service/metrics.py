"""The service's Prometheus metrics, labelled by ``method`` and ``model``.

They appear under the service's ``/metrics`` next to BentoML's own. BentoML 1.4 deprecates the
``bentoml.metrics`` alias in favour of ``prometheus_client`` itself (``bentoml.metrics`` is now a
lazy re-export of it), so we use ``prometheus_client`` directly, and create the metrics on first
use, never at import: BentoML sets ``PROMETHEUS_MULTIPROC_DIR`` in each worker after importing the
service module, and a metric created before that would be invisible to ``/metrics``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

#: Latency buckets (seconds): the small CPU models answer in well under a millisecond.
LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5)
#: Radius buckets ([0, 1]-pixel L2 units); 36/255, 72/255 and 108/255 are the paper's ε.
RADIUS_BUCKETS = (0.0, 0.01, 0.02, 0.05, 0.1, 36 / 255, 0.2, 72 / 255, 108 / 255, 0.5, 1.0, 2.0)


@dataclass(frozen=True)
class ServiceMetrics:
    """The four metric families.

    Attributes:
        latency: ``lipcert_inference_seconds{method, model, endpoint}``, ONNX Runtime time per
            batch (histogram).
        requests: ``lipcert_requests_total{method, model, endpoint, outcome}``; ``outcome`` is
            ``ok``, ``rejected`` (4xx) or ``error`` (5xx).
        radius: ``lipcert_certified_radius{method, model}``, one observation per image
            (histogram; uncertified predictions count as 0).
        memory: ``lipcert_model_memory_bytes{method, model}``, resident memory added by loading
            the model's ONNX Runtime session (gauge, summed over live workers).
    """

    latency: Any
    requests: Any
    radius: Any
    memory: Any


@functools.cache
def get_metrics() -> ServiceMetrics:
    """The process's metric objects, created on the first call (Prometheus names are global)."""
    from prometheus_client import Counter, Gauge, Histogram

    return ServiceMetrics(
        latency=Histogram(
            "lipcert_inference_seconds", "ONNX Runtime inference time per batch",
            ["method", "model", "endpoint"], buckets=LATENCY_BUCKETS,
        ),
        requests=Counter(
            "lipcert_requests", "Requests by outcome",
            ["method", "model", "endpoint", "outcome"],
        ),
        radius=Histogram(
            "lipcert_certified_radius", "Certified L2 radius per image ([0,1] model-input pixels)",
            ["method", "model"], buckets=RADIUS_BUCKETS,
        ),
        memory=Gauge(
            "lipcert_model_memory_bytes", "Resident memory added by the model's session",
            ["method", "model"], multiprocess_mode="livesum",
        ),
    )

"""A description of the machine a benchmark ran on, stored beside every result."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any


def _cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except ImportError:
        return None
    return str(getattr(mod, "__version__", "unknown"))


def describe_machine(device: str = "cpu") -> dict[str, Any]:
    """CPU model, core counts, threads in use, GPU name (if CUDA is used), library versions.

    Args:
        device: the device the benchmark ran on (``"cpu"`` or ``"cuda"``).

    Returns:
        A JSON-serializable dict.
    """
    import torch

    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime"),
        "device": device,
        "gpu": None,
    }
    try:
        import psutil

        info["memory_total_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # psutil is a dependency, but the description must never fail
        info["memory_total_gb"] = None
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info

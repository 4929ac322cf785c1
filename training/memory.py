"""Peak resident memory of this process that can be reset, so runs in one process stay apart.

``getrusage``'s ``ru_maxrss`` only ever grows (and Linux carries it across ``execve``): in a
sweep every run after the largest would report that run's peak. The kernel's per-address-space
high-water mark (``VmHWM`` in ``/proc/self/status``) can be reset to the current RSS through
``/proc/self/clear_refs`` (Linux >= 4.0); elsewhere ``ru_maxrss`` is the fallback. The reset
sets the mark to the *current* RSS, so memory an allocator kept from an earlier run still counts:
per-method figures free of that need a process per method.
"""

from __future__ import annotations

import resource
import sys

import torch


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The peak RSS since the last reset: VmHWM where /proc exists, else ``ru_maxrss``."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss * (1 if sys.platform == "darwin" else 1024))


def reset_peak_memory(device: torch.device) -> None:
    """Forget earlier peaks on ``device`` (a sweep runs one model after another in a process)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def peak_memory(device: torch.device) -> tuple[int, str]:
    """``(bytes, kind)``: CUDA's peak allocation on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return peak_rss_bytes(), "cpu_peak_rss"

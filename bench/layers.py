"""``python -m bench layers``: speed, memory, parameters and FLOPs of every method × size.

For each method and size the LipNet of :func:`models.create_model` is measured with random data:

- training step (forward + backward + SGD-momentum step) at ``batch``: median seconds, images/s;
- inference in eager torch (eval mode, ``no_grad``, so the layers' weight caches are on) and of the
  exported ONNX model in ONNX Runtime, at every ``infer_batches`` size;
- peak memory of training and inference: CUDA max-allocated on a GPU; on the CPU the peak
  resident set above an idle interpreter with the libraries loaded, one subprocess per
  measurement (``bench.memprobe``) so one measurement never inherits another's high-water mark;
- parameters, FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode``, and the per-layer
  asymptotic formulas of :mod:`bench.complexity` summed over the same network.

``standard`` is always measured as well: every figure is also given as a ratio to it
(``<key>_vs_standard``), measured in the same run on the same machine.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.complexity import (
    count_flops,
    formula_costs,
    formula_table,
    layer_shapes,
)
from bench.machine import describe_machine
from bench.onnx_io import export_onnx, ort_session
from bench.tables import markdown_table, result_doc, write_result
from bench.targets import BASELINE, targets_markdown
from bench.timing import median, synchronize, time_batched_round_robin, time_call

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class LayersConfig:
    """What ``bench layers`` measures.

    Args:
        methods: registry names (``standard`` is added if missing).
        sizes: LipNet sizes (``xxs``, ``xs``, ``s``, ``m``, ``l``).
        batch: training batch size.
        infer_batches: inference batch sizes (e.g. 1 for latency, 256 for throughput).
        input_shape: ``(C, H, W)`` of one image.
        num_classes: logits of the head.
        repeats: timed repetitions per figure (the median is reported), after ``warmup``.
        warmup: untimed calls before each timing.
        device: ``"cpu"`` or ``"cuda"``.
        memory: measure peak memory (CPU: 3 subprocesses per method × size).
        onnx: export and time ONNX Runtime.
        seed: seed of the models' weights and the measured inputs (and of every memory probe).
        out: output folder.
    """

    methods: tuple[str, ...]
    sizes: tuple[str, ...] = ("xs",)
    batch: int = 64
    infer_batches: tuple[int, ...] = (1, 256)
    input_shape: tuple[int, int, int] = (3, 32, 32)
    num_classes: int = 10
    repeats: int = 5
    warmup: int = 1
    device: str = "cpu"
    memory: bool = True
    onnx: bool = True
    seed: int = 0
    out: Path = field(default=Path("bench_results/layers"))

    def validate(self) -> None:
        """Raises ValueError naming the bad value and the allowed ones."""
        from models import list_methods, list_sizes
        from models.registry import check_name

        for m in self.methods:
            check_name("method", m, list_methods())
        for s in self.sizes:
            check_name("size", s, list_sizes())
        check_name("device", self.device, ("cpu", "cuda"))
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
        if self.batch < 1 or not self.infer_batches or min(self.infer_batches) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch}, {self.infer_batches}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if len(self.input_shape) != 3 or self.input_shape[1] != self.input_shape[2]:
            raise ValueError(f"input must be CxHxW with H == W, got {self.input_shape}")


def time_inference(
    cfg: LayersConfig, rows: list[dict[str, Any]], calls: dict[tuple[int, str], Any]
) -> None:
    """Time every inference call in turns (:func:`bench.timing.time_batched_round_robin`).

    ``calls`` maps ``(row index, "eager_s_b1" | "onnx_s_b1" | ...)`` to a call; fills the rows.
    """
    times = time_batched_round_robin(
        calls, {key: int(key[1].rsplit("_b", 1)[1]) for key in calls},
        repeats=cfg.repeats, warmup=max(cfg.warmup, 2), device=cfg.device,
    )
    for (i, key), samples in times.items():
        row = rows[i]
        row["raw"][key] = samples
        row[key.replace("_s_b", "_ms_b")] = 1e3 * median(row["raw"][key])
    for row in rows:
        for b in cfg.infer_batches:
            if f"onnx_ms_b{b}" in row:
                row[f"onnx_speedup_b{b}"] = row[f"eager_ms_b{b}"] / row[f"onnx_ms_b{b}"]


# Figures that get a ``_vs_standard`` ratio column (lower is better for all but images/s).
def _ratio_keys(row: dict[str, Any]) -> list[str]:
    prefixes = (
        "params", "train_ms", "train_images_per_s", "eager_ms_b", "onnx_ms_b", "train_peak_mb",
        "infer_peak_mb", "onnx_peak_mb", "flops_", "formula_",
    )
    return [k for k, v in row.items() if k.startswith(prefixes) and isinstance(v, (int, float))]


def _train_step(model, opt, x, y):
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _fwd_bwd(model, x, y):
    def run() -> None:
        F.cross_entropy(model(x), y).backward()

    return run


def memory_spec(cfg: LayersConfig, method: str, size: str, mode: str, onnx_path: Path | None):
    """The JSON spec of one :mod:`bench.memprobe` run."""
    batch = cfg.batch if mode == "train" else max(cfg.infer_batches)
    return dict(
        mode=mode, method=method, size=size, batch=batch, input_shape=list(cfg.input_shape),
        num_classes=cfg.num_classes, onnx_path=str(onnx_path) if onnx_path else None,
        seed=cfg.seed,
    )


def _probe_cpu_memory(spec: dict[str, Any]) -> float | None:
    """Peak RSS delta (MiB) measured in a fresh interpreter; None (logged) if the probe fails."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.memprobe", json.dumps(spec)],
        capture_output=True, text=True, env=env, cwd=repo, timeout=1800,
    )
    if proc.returncode != 0:
        log.warning("memory probe %s failed: %s", spec["mode"], proc.stderr.strip()[-500:])
        return None
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["delta_mb"])


def _cuda_peak_mb(fn, device: str) -> float:
    torch.cuda.empty_cache()
    synchronize(device)
    torch.cuda.reset_peak_memory_stats()
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated() / 2**20


def bench_one(
    cfg: LayersConfig, method: str, size: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Measure one method × size: a flat row (raw timings under ``"raw"``) and its inference calls.

    The inference calls (``{"eager_s_b1": fn, "onnx_s_b1": fn, ...}``) are not timed here:
    :func:`time_inference` times them in turns with the other methods' (ratios need that).
    """
    from models import create_model

    dev = cfg.device
    c, h, _ = cfg.input_shape
    torch.manual_seed(cfg.seed)
    model = create_model(method, size, c, cfg.num_classes, h).to(dev)
    row: dict[str, Any] = dict(method=method, size=size)
    raw: dict[str, list[float]] = {}
    row["params"] = sum(p.numel() for p in model.parameters())
    shapes = layer_shapes(model, cfg.input_shape)
    row["layers"] = len(shapes)

    # FLOPs: a training pass is affine in the batch (the parametrization does not depend on it),
    # so two cheap counts give both the per-step total and the batch-independent part.
    model.train()
    f1, f2 = (
        count_flops(_fwd_bwd(model, torch.rand(b, *cfg.input_shape, device=dev),
                             torch.zeros(b, dtype=torch.long, device=dev)))
        for b in (1, 2)
    )
    model.zero_grad(set_to_none=True)
    per_image = f2 - f1
    row["flops_train_gflop"] = (f1 + (cfg.batch - 1) * per_image) / 1e9
    row["flops_param_gflop"] = max(f1 - per_image, 0) / 1e9
    plain = model.export().to(dev).eval()  # plain buffers are built on the CPU
    with torch.no_grad():
        row["flops_infer_gflop"] = count_flops(
            lambda: plain(torch.rand(1, *cfg.input_shape, device=dev))
        ) / 1e9
    formulas = formula_costs(method, shapes, cfg.batch) or {}
    row.update({f"formula_{k}": v for k, v in formulas.items()})

    # Training step.
    x = torch.rand(cfg.batch, *cfg.input_shape, device=dev)
    y = torch.randint(0, cfg.num_classes, (cfg.batch,), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    step = _train_step(model, opt, x, y)
    raw["train_s"] = time_call(step, repeats=cfg.repeats, warmup=cfg.warmup, device=dev)
    row["train_ms"] = 1e3 * median(raw["train_s"])
    row["train_images_per_s"] = cfg.batch / median(raw["train_s"])
    if dev == "cuda":
        row["train_peak_mb"] = _cuda_peak_mb(step, dev)

    # Inference callables; run_layers times them in turns with the other methods of this size.
    model.eval()
    infer: dict[str, Any] = {}
    for b in cfg.infer_batches:
        xb = torch.rand(b, *cfg.input_shape, device=dev)

        def eager(xb=xb) -> None:
            with torch.no_grad():
                model(xb)

        infer[f"eager_s_b{b}"] = eager
        if dev == "cuda" and b == max(cfg.infer_batches):
            row["infer_peak_mb"] = _cuda_peak_mb(eager, dev)

    # ONNX Runtime on the exported model.
    onnx_path = None
    if cfg.onnx:
        # Export from a CPU copy: the exporter's tracing and audit run on the CPU.
        onnx_path, row["exporter"] = export_onnx(
            copy.deepcopy(model).cpu(), cfg.out / "onnx" / f"{method}-{size}.onnx",
            input_shape=cfg.input_shape,
            metadata={"dataset": "bench"},
        )
        session = ort_session(onnx_path, device=dev)
        rng = np.random.default_rng(cfg.seed)
        check = rng.random((2, *cfg.input_shape), dtype=np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(check).to(dev)).cpu().numpy()
        row["onnx_max_abs_diff"] = float(np.abs(session.run(None, {"image": check})[0] - ref).max())
        for b in cfg.infer_batches:
            xb = rng.random((b, *cfg.input_shape), dtype=np.float32)
            infer[f"onnx_s_b{b}"] = lambda xb=xb: session.run(None, {"image": xb})

    if cfg.memory and dev == "cpu":
        row["train_peak_mb"] = _probe_cpu_memory(memory_spec(cfg, method, size, "train", None))
        row["infer_peak_mb"] = _probe_cpu_memory(memory_spec(cfg, method, size, "infer", None))
        if onnx_path is not None:
            row["onnx_peak_mb"] = _probe_cpu_memory(
                memory_spec(cfg, method, size, "onnx", onnx_path)
            )
    row["raw"] = raw
    return row, infer


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Add ``<key>_vs_standard`` to every row, against the ``standard`` row of the same size."""
    base = {r["size"]: r for r in rows if r["method"] == BASELINE}
    for row in rows:
        ref = base.get(row["size"])
        if ref is None:
            continue
        for key in _ratio_keys(row):
            if isinstance(ref.get(key), (int, float)) and ref[key]:
                row[f"{key}_vs_standard"] = row[key] / ref[key]


def run_layers(cfg: LayersConfig) -> dict[str, Any]:
    """Measure every method × size of ``cfg`` and write ``layers.json``, ``.csv`` and ``.md``.

    Returns:
        The result document (also written to ``cfg.out / "layers.json"``).

    Raises:
        ValueError: a bad configuration (see :meth:`LayersConfig.validate`).
    """
    cfg.validate()
    methods = list(dict.fromkeys([BASELINE, *cfg.methods]))
    cfg.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in cfg.sizes:
        calls: dict[tuple[int, str], Any] = {}
        for method in methods:
            log.info("bench layers: %s-%s", method, size)
            row, infer = bench_one(cfg, method, size)
            calls.update({(len(rows), key): fn for key, fn in infer.items()})
            rows.append(row)
        log.info("bench layers: inference at %s, every method in turn", size)
        time_inference(cfg, rows, calls)
        del calls
    add_ratios(rows)
    doc = result_doc(
        "layers",
        cfg,
        describe_machine(cfg.device),
        command=" ".join(["python -m bench", *sys.argv[1:]]) if sys.argv else None,
        formulas=formula_table(),
        results=rows,
    )
    write_result(cfg.out, "layers", doc, rows, layers_markdown(doc))
    return doc


def layers_markdown(doc: dict[str, Any]) -> str:
    """The tables of a ``layers`` result: absolute figures, ratios to standard, formulas."""
    cfg, rows = doc["config"], doc["results"]
    bs = list(cfg["infer_batches"])
    m = doc["machine"]
    out = [
        f"Machine: {m['cpu_model']}, {m['usable_cores']} usable cores, torch threads "
        f"{m['torch_threads']}, GPU {m['gpu'] or 'none'}; torch {m['torch']}, onnxruntime "
        f"{m['onnxruntime']}. Device `{cfg['device']}`, input {cfg['input_shape']}, training batch "
        f"{cfg['batch']}, median of {cfg['repeats']} runs.\n",
        "\n**Time and memory** (ms per call; memory in MiB, "
        + ("CUDA max allocated" if cfg["device"] == "cuda" else "peak RSS above an idle process")
        + ")\n\n",
    ]
    cols = ["method", "size", "params", "train_ms", "train_images_per_s"]
    cols += [f"eager_ms_b{b}" for b in bs] + [f"onnx_ms_b{b}" for b in bs]
    cols += [f"onnx_speedup_b{b}" for b in bs]
    cols += ["train_peak_mb", "infer_peak_mb", "onnx_peak_mb"]
    heads = ["method", "size", "params", "train ms", "train img/s"]
    heads += [f"eager ms b{b}" for b in bs] + [f"ONNX ms b{b}" for b in bs]
    heads += [f"eager÷ONNX b{b}" for b in bs] + ["train MiB", "infer MiB", "ONNX MiB"]
    out.append(markdown_table(rows, cols, heads))
    out.append("\n**Ratios to standard** (same run; > 1 means slower / bigger)\n\n")
    rcols = ["train_ms", *[f"eager_ms_b{b}" for b in bs], *[f"onnx_ms_b{b}" for b in bs],
             "train_peak_mb", "infer_peak_mb", "onnx_peak_mb"]
    out.append(markdown_table(
        rows, ["method", "size", *[f"{c}_vs_standard" for c in rcols]],
        ["method", "size", "train", *[f"eager b{b}" for b in bs], *[f"ONNX b{b}" for b in bs],
         "train mem", "infer mem", "ONNX mem"],
    ))
    if any("onnx_speedup_b1" in r for r in rows):
        out.append("\n**Issue 17's export targets** (✓ met, ✗ not; same run)\n\n")
        out.append(targets_markdown(rows, bs))
    out.append("\n**FLOPs** (FlopCounterMode; FFTs not counted) **beside the asymptotic "
               "formulas** (GMAC, MiB; see `bench/complexity.py`)\n\n")
    fcols = ["flops_train_gflop", "flops_param_gflop", "flops_infer_gflop",
             "formula_train_gmacs", "formula_train_memory_mb", "formula_infer_gmacs",
             "formula_infer_memory_mb", "flops_train_gflop_vs_standard",
             "formula_train_gmacs_vs_standard", "flops_infer_gflop_vs_standard",
             "formula_infer_gmacs_vs_standard"]
    out.append(markdown_table(
        rows, ["method", "size", *fcols],
        ["method", "size", "train GFLOP/step", "param GFLOP", "infer GFLOP/img",
         "formula train GMAC", "formula train MiB", "formula infer GMAC/img", "formula infer MiB",
         "train FLOP ×std", "formula train ×std", "infer FLOP ×std", "formula infer ×std"],
    ))
    out.append("\n**Per-layer formulas** (C = b·s²·c²·k², M = b·s²·c + c²·k²)\n\n")
    out.append(markdown_table(
        doc["formulas"], ["method", "train_macs", "train_memory", "infer_macs", "infer_memory"],
        ["method", "train MACs", "train memory", "inference MACs", "inference memory"],
    ))
    return "".join(out)


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"3x32x32"`` → ``(3, 32, 32)``; ValueError otherwise."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"input shape must look like 3x32x32, got {text!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def parse_list(text: str, kind: type = str) -> tuple:
    """Comma-separated list; ``kind`` converts each item."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"empty list {text!r}")
    return tuple(kind(t) for t in items)


def config_from_args(
    methods: Sequence[str] | None, sizes: Sequence[str], **kwargs: Any
) -> LayersConfig:
    """A :class:`LayersConfig` with ``methods=None`` meaning every registered method."""
    from models import list_methods

    return LayersConfig(methods=tuple(methods or list_methods()), sizes=tuple(sizes), **kwargs)

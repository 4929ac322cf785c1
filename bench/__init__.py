"""lipcert benchmarks: ``python -m bench layers | report | service``.

- :mod:`bench.layers`: speed, memory, parameters and FLOPs per method × size (eager and ONNX).
- :mod:`bench.report`: joins training reports with bench results; tables, radar and CRA plots.
- :mod:`bench.service_load`: a bounded load generator against a running lipcert service.
- :mod:`bench.complexity`: the per-layer asymptotic cost formulas.

Nothing is imported eagerly: ``import bench`` stays cheap and free of side effects.
"""

__all__ = ["complexity", "layers", "machine", "report", "service_load"]

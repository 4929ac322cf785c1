"""lipcert certification: certified radii, the Lipschitz audit and the attack check.

- :mod:`certify.radius`: pure functions from logits to certified radii and accuracies.
- :mod:`certify.audit`: proven per-layer Lipschitz upper bounds of an exported network.
- :mod:`certify.attack`: PGD inside the certified balls, re-evaluated in ONNX Runtime.
- ``python -m certify evaluate|audit MODEL.onnx``: the command line.
"""

from certify.audit import AuditError, AuditResult, LayerBound, audit, power_iteration_lower
from certify.radius import (
    STANDARD_EPS,
    certified_accuracy,
    certified_radius,
    eps_key,
    float_slack,
    head_row_distances,
)

__all__ = [
    "STANDARD_EPS", "AuditError", "AuditResult", "LayerBound", "audit", "certified_accuracy",
    "certified_radius", "eps_key", "float_slack", "head_row_distances", "power_iteration_lower",
]

"""Which ONNX graph the plain modules trace to: the export's *graph form*.

Every form computes the same function (``tests/test_graph_form.py`` checks the logits in ONNX
Runtime: bit for bit between forms 1 and 2, to float32 rounding for form 3); they differ only in
the operators that the TorchScript tracer records, so in what ONNX Runtime executes:

- **Form 1** (files exported before 2026-12-03): circular padding as Slice and Concat nodes,
  MaxMin's channel halves as Slices whose bounds are computed from the traced shape, and
  :class:`~models.plain.FourierConv2d`'s reshapes from the traced batch size.
- **Form 2** (files exported on 2026-12-03 until the next form): circular padding as one
  ``Pad(mode="wrap")`` (ONNX opset 19), MaxMin's halves as one ``Split`` with constant sizes,
  and the Fourier reshapes with ``-1`` on the batch axis, so their shapes are constants.
  Measured by ``python -m bench forms`` (size S, ONNX Runtime on this CPU, one thread;
  ``docs/bench.md``): 9–14 % less time at batch 256 for the networks of circular convolutions
  (standard, AOL, BCOP), within ±7 % of form 1 elsewhere.
- **Form 3** (the current one): form 2, and :class:`~models.plain.ResidualConv2d` (CPL, SLL)
  writes ``x − Kᵀh`` as ``x + Conv(h, −flip(K)ᵀ)`` instead of ``ConvTranspose`` and ``Sub``; the
  kernel is computed in the graph from K's initializer. Same function, other summation order:
  the logits agree with form 2 to float32 rounding, not bit for bit (the tests check 1e-6).

``certify.artifact.to_onnx(..., graph_form=1)`` still writes form 1, for a runtime that lacks the
opset-19 wrap pad (or, on a GPU, a CUDA kernel for it: not measured here, no GPU was lent; run
``python -m bench forms --device cuda`` there). The loader's structure check
(:mod:`certify.artifact.structure`) rebuilds the graph of every form it knows and accepts a file
whose graph equals one of them exactly, so files of any form load.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

#: the form :func:`certify.artifact.to_onnx` writes.
CURRENT = 3
#: every form the loader accepts, newest first.
FORMS = (3, 2, 1)

_FORM: contextvars.ContextVar[int] = contextvars.ContextVar("lipcert_graph_form", default=CURRENT)


def check_form(form: int) -> int:
    """``form`` if it is one of :data:`FORMS`.

    Raises:
        ValueError: an unknown form, naming the known ones.
    """
    if form not in FORMS:
        raise ValueError(f"unknown graph form {form!r}; choose from {', '.join(map(str, FORMS))}")
    return form


def graph_form() -> int:
    """The form the plain modules trace to in this context (default :data:`CURRENT`)."""
    return _FORM.get()


@contextlib.contextmanager
def traced_as(form: int) -> Iterator[None]:
    """Trace the plain modules to graph form ``form`` inside the block.

    Raises:
        ValueError: a form not in :data:`FORMS`.
    """
    token = _FORM.set(check_form(form))
    try:
        yield
    finally:
        _FORM.reset(token)

"""The radius' floating-point slack covers ONNX Runtime's real error, for every method and provider.

A radius divides a float32 margin by an exact-arithmetic bound, so it subtracts a slack first
(:func:`certify.radius.float_slack`, per provider :data:`certify.radius.PROVIDER_SLACK_REL`).
Here the error the slack must cover is measured: logit differences ``z_y − z_j`` from ONNX
Runtime against the same exported network evaluated in float64 (the stored float32 weights,
exactly), relative to ``1 + |z_y| + |z_j|``, on random inputs of a network pushed off its
initialization. It must stay below the provider's slack with room (``ROOM``x), so a sound
radius never rests on luck. CUDA runs where a GPU is present (``gpu`` marker), with TF32 off as
the loader sets it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from certify.artifact import export_proto, open_session
from certify.radius import slack_for_provider
from models.export import to_plain
from models.registry import create_model, list_methods

#: The measured error must be this many times below the slack (measured: >= 98x on CPU).
ROOM = 20.0


def _providers() -> list:
    import onnxruntime as ort

    params = ["CPUExecutionProvider"]
    has_gpu = Path("/dev/nvidiactl").exists()
    if "CUDAExecutionProvider" in ort.get_available_providers():
        params.append(pytest.param("CUDAExecutionProvider", marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not has_gpu, reason="no GPU on this machine"),
        ]))
    return params


def _relative_error(method: str, provider: str, shape: tuple[int, int, int]) -> float:
    torch.manual_seed(0)
    model = create_model(method, "xxs", shape[0], 10, shape[1])
    with torch.no_grad():  # off the (often Dirac / identity) initialization
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    plain = to_plain(model)
    session = open_session(export_proto(plain, shape).SerializeToString(), [provider], threads=1)
    x = torch.rand((64, *shape), generator=torch.Generator().manual_seed(1))
    z32 = session.run(None, {"image": x.numpy()})[0].astype(np.float64)
    with torch.no_grad():
        z64 = plain.double()(x.double()).numpy()
    rows = np.arange(len(x))
    y = z32.argmax(axis=1)
    diff32 = z32[rows, y][:, None] - z32
    diff64 = z64[rows, y][:, None] - z64
    scale = 1 + np.abs(z32[rows, y])[:, None] + np.abs(z32)
    return float((np.abs(diff32 - diff64) / scale).max())


@pytest.mark.parametrize("provider", _providers())
@pytest.mark.parametrize("method", list_methods())
def test_logit_difference_error_is_far_below_the_slack(method: str, provider: str) -> None:
    error = _relative_error(method, provider, (1, 8, 8))
    assert 0 < error * ROOM <= slack_for_provider(provider), (method, provider, error)

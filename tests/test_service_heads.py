"""The service's loader with head certificates: LLN and CRC-Lip models are served on their body
bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from certify import certified_radius
from certify.artifact import certificate_kwargs, to_onnx, verify
from models.registry import create_model
from service.loader import LoadOptions, ModelRefused, ModelSource, load_model

OPTIONS = LoadOptions(providers=("CPUExecutionProvider",), intra_op_threads=1, profile_runs=0)


@pytest.mark.parametrize("head, certificate", [("lln", "linear_head"), ("crc", "pairwise")])
def test_head_models_are_served_with_their_certificate(head, certificate, tmp_path):
    torch.manual_seed(0)
    model = create_model("aol", "xxs", 1, 10, 8, head=head)
    with torch.no_grad():  # rows far apart: the head alone is clearly not 1-Lipschitz
        layer = model.head.head
        weight = layer.weight if head == "lln" else layer.linear2.weight
        weight.copy_(torch.randn_like(weight))
    path = to_onnx(model, tmp_path / "m.onnx")
    meta = verify(path)
    assert meta["certificate"] == certificate
    assert meta["lipschitz_bound"] > 1.05 >= 1 + 1e-4 >= meta["lipschitz_bound_body"]
    served = load_model(ModelSource("m", path), OPTIONS)
    assert served.certificate == certificate
    assert served.lipschitz_bound == meta["lipschitz_bound_body"]
    x = np.random.default_rng(0).random((6, 1, 8, 8), dtype=np.float32)
    logits = served.run(x)
    np.testing.assert_array_equal(served.radii(logits),
                                  certified_radius(logits, **certificate_kwargs(meta)))


def test_generic_model_above_one_is_still_refused(tmp_path):
    torch.manual_seed(0)
    path = to_onnx(create_model("standard", "xxs", 1, 10, 8), tmp_path / "s.onnx")
    with pytest.raises(ModelRefused, match="exceeds 1 \\+ tolerance"):
        load_model(ModelSource("s", path), OPTIONS)

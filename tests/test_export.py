"""Export: every method's xxs digits model gives a checked, ORT-faithful, self-verifying file."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from certify.artifact import (
    METADATA_KEYS,
    ModelVerificationError,
    load_onnx,
    load_twin,
    read_metadata,
    to_onnx,
    verify,
)
from models.registry import create_model, list_methods

CLASSES = [str(i) for i in range(10)]


@pytest.mark.parametrize("method", list_methods())
def test_export_roundtrip(method, tmp_path):
    torch.manual_seed(0)
    model = create_model(method, "xxs", 1, 10, 8).eval()
    meta_in = dict(dataset="digits", classes=CLASSES)
    path = to_onnx(model, tmp_path / f"{method}.onnx", metadata=meta_in)
    onnx.checker.check_model(str(path), full_check=True)
    meta = read_metadata(path)
    for key in ("method", "dataset", "classes", "lipschitz_bound", "weights_sha256", "certificate",
                "input_shape", "config"):
        assert key in meta
    assert set(METADATA_KEYS) - {"head_distances"} <= set(meta)
    assert meta["method"] == method and meta["dataset"] == "digits" and meta["classes"] == CLASSES
    assert meta["input_shape"] == [1, 8, 8]
    assert verify(path)["weights_sha256"] == meta["weights_sha256"]

    session, _ = load_onnx(path, threads=1)
    x = torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).numpy()
    (out,) = session.run(["logits"], {"image": x.numpy()})
    assert np.abs(out - ref).max() <= 1e-4
    twin = load_twin(path)
    with torch.no_grad():
        assert np.abs(twin(x).numpy() - out).max() <= 1e-4

    proto = onnx.load(str(path))
    t = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.001, t.name))
    bad = tmp_path / "tampered.onnx"
    onnx.save_model(proto, str(bad))
    with pytest.raises(ModelVerificationError, match="weights_sha256"):
        verify(bad)


def test_verify_refuses_non_lipcert(tmp_path):
    with pytest.raises(ModelVerificationError, match="no such file"):
        verify(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not an onnx file at all\xff" * 10)
    with pytest.raises(ModelVerificationError):
        verify(junk)
    plain = tmp_path / "plain.onnx"
    node = onnx.helper.make_node("Identity", ["image"], ["logits"])
    vi = onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1, 2])
    vo = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 2])
    graph = onnx.helper.make_graph([node], "g", [vi], [vo])
    onnx.save_model(onnx.helper.make_model(graph), str(plain))
    with pytest.raises(ModelVerificationError, match="no lipcert metadata"):
        verify(plain)

"""certify.artifact.load: a certificate follows from the graph that runs; tampering is refused.

Each case edits an honest export the way an attacker (or a bug) could, *recomputing the weights
hash* where the edit touches weights (anyone can), and asserts that :func:`load` refuses it with
a reason — and that the CLI exits non-zero with a one-line message, and the service lists it as
refused. The honest file loads with the exact metadata values.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from certify.artifact import (
    ModelVerificationError,
    decode_metadata,
    encode_value,
    load,
    read_metadata,
    to_onnx,
    weights_sha256,
)
from models.registry import create_model

CLASSES = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = create_model("aol", "xxs", 1, 10, 8)
    with torch.no_grad():  # off the Dirac init, so no two kernels are equal
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    path = tmp_path_factory.mktemp("honest") / "aol.onnx"
    return to_onnx(model, path, metadata=dict(dataset="digits", classes=CLASSES))


def _rehash(proto: onnx.ModelProto) -> None:
    _set_meta(proto, "weights_sha256", weights_sha256(proto))


def _set_meta(proto: onnx.ModelProto, key: str, value: object) -> None:
    for entry in proto.metadata_props:
        if entry.key == key:
            entry.value = encode_value(value)
            return
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, encode_value(value)


def _scale_inits(proto: onnx.ModelProto, prefix: str, factor: float) -> None:
    hit = False
    for t in proto.graph.initializer:
        if t.name.startswith(prefix) and t.name.endswith("weight"):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * factor, t.name))
            hit = True
    assert hit, prefix


def _scale_all_weights(p: onnx.ModelProto) -> None:
    _scale_inits(p, "body", 1.5)
    _rehash(p)


def _scale_head(p: onnx.ModelProto) -> None:
    _scale_inits(p, "head", 1.5)
    _rehash(p)


def _bound_divided(p: onnx.ModelProto) -> None:
    meta = decode_metadata(p)
    for key in ("lipschitz_bound", "lipschitz_bound_body"):
        _set_meta(p, key, meta[key] / 10)


def _head_distances_halved(p: onnx.ModelProto) -> None:
    meta = decode_metadata(p)
    _set_meta(p, "head_distances", (np.asarray(meta["head_distances"]) * 0.5).tolist())


def _certificate_generic(p: onnx.ModelProto) -> None:
    _set_meta(p, "certificate", "generic")


def _prepend(p: onnx.ModelProto, make: Callable[[str, str], list]) -> None:
    """Route the input through new nodes: ``image -> make(...) -> x`` feeds the old graph."""
    g = p.graph
    for node in g.node:
        for i, name in enumerate(node.input):
            if name == "image":
                node.input[i] = "tampered_in"
    nodes = make("image", "tampered_in")
    for node in reversed(nodes):
        g.node.insert(0, node)
    _rehash(p)


def _append(p: onnx.ModelProto, make: Callable[[str, str], list]) -> None:
    """Route the output through new nodes: old ``logits`` -> make(...) -> ``logits``."""
    g = p.graph
    for node in g.node:
        for i, name in enumerate(node.output):
            if name == "logits":
                node.output[i] = "tampered_out"
        for i, name in enumerate(node.input):
            if name == "logits":
                node.input[i] = "tampered_out"
    g.node.extend(make("tampered_out", "logits"))
    _rehash(p)


def _add_image_to_itself(p: onnx.ModelProto) -> None:
    _prepend(p, lambda a, b: [helper.make_node("Add", [a, a], [b])])


def _scale_logits(p: onnx.ModelProto) -> None:
    _append(p, lambda a, b: [
        helper.make_node("Constant", [], ["k15"], value_float=1.5),
        helper.make_node("Mul", [a, "k15"], [b]),
    ])


def _backdoor(p: onnx.ModelProto) -> None:
    """Triple the logits whenever the first pixel is exactly 0 (random test inputs never are)."""
    def make(a: str, b: str) -> list:
        return [
            helper.make_node("Constant", [], ["bd_zero"], value_float=0.0),
            helper.make_node("Constant", [], ["bd_three"], value_float=3.0),
            helper.make_node("ReduceMin", ["image"], ["bd_min"], keepdims=0),
            helper.make_node("Equal", ["bd_min", "bd_zero"], ["bd_hit"]),
            helper.make_node("Mul", [a, "bd_three"], ["bd_big"]),
            helper.make_node("Where", ["bd_hit", "bd_big", a], [b]),
        ]
    _append(p, make)


def _first(p: onnx.ModelProto, op: str) -> onnx.NodeProto:
    return next(n for n in p.graph.node if n.op_type == op)


def _conv_pads(p: onnx.ModelProto) -> None:
    conv = _first(p, "Conv")
    kept = [a for a in conv.attribute if a.name != "pads"]
    del conv.attribute[:]
    conv.attribute.extend([*kept, helper.make_attribute("pads", [1, 1, 1, 1])])


def _conv_group(p: onnx.ModelProto) -> None:
    conv = _first(p, "Conv")
    conv.attribute.append(helper.make_attribute("group", 2))


def _swap_inits_keep_hash(p: onnx.ModelProto) -> None:
    inits = [t for t in p.graph.initializer if t.name.endswith("weight") and len(t.dims) == 4]
    a, b = next((x, y) for x in inits for y in inits
                if x.name < y.name and list(x.dims) == list(y.dims)
                and not np.array_equal(numpy_helper.to_array(x), numpy_helper.to_array(y)))
    a_arr, b_arr = numpy_helper.to_array(a), numpy_helper.to_array(b)
    a.CopyFrom(numpy_helper.from_array(b_arr, a.name))
    b.CopyFrom(numpy_helper.from_array(a_arr, b.name))


def _remove_node(p: onnx.ModelProto) -> None:
    g = p.graph
    idx = next(i for i, n in enumerate(g.node) if n.op_type == "Relu" or n.op_type == "Max")
    node = g.node[idx]
    for other in g.node:
        for i, name in enumerate(other.input):
            if name == node.output[0]:
                other.input[i] = node.input[0]
    del g.node[idx]


def _extra_output(p: onnx.ModelProto) -> None:
    first = p.graph.node[0].output[0]
    p.graph.output.append(helper.make_tensor_value_info(first, onnx.TensorProto.FLOAT, None))


def _fewer_classes(p: onnx.ModelProto) -> None:
    _set_meta(p, "classes", CLASSES[:9])
    _set_meta(p, "num_classes", 9)


def _input_shape(p: onnx.ModelProto) -> None:
    _set_meta(p, "input_shape", [1, 16, 16])


def _external_data(p: onnx.ModelProto) -> None:
    t = max(p.graph.initializer, key=lambda t: len(t.raw_data))
    t.data_location = onnx.TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", "/etc/passwd"


TAMPERINGS: dict[str, tuple[Callable[[onnx.ModelProto], None], str]] = {
    "weights x1.5, hash recomputed": (_scale_all_weights, "re-audit"),
    "head weights x1.5, hash recomputed": (_scale_head, "re-audit"),
    "metadata bounds / 10": (_bound_divided, "re-audit"),
    "head_distances x 0.5": (_head_distances_halved, "head_distances"),
    "certificate kind changed": (_certificate_generic, "certificate"),
    "Add(image, image) in front": (_add_image_to_itself, "not the export"),
    "logits x Constant(1.5)": (_scale_logits, "not the export"),
    "backdoor on a zero pixel": (_backdoor, "not the export"),
    "Conv pads changed": (_conv_pads, "not the export"),
    "Conv group added": (_conv_group, "not the export"),
    "initializers swapped": (_swap_inits_keep_hash, "weights_sha256"),
    "node removed": (_remove_node, "not the export"),
    "extra output": (_extra_output, "output"),
    "classes metadata": (_fewer_classes, "classes"),
    "input_shape metadata": (_input_shape, "input"),
    "external data": (_external_data, "external data"),
}


def _tampered(honest: Path, tmp_path: Path, name: str) -> Path:
    proto = onnx.load(str(honest))
    TAMPERINGS[name][0](proto)
    out = tmp_path / "tampered.onnx"
    out.write_bytes(proto.SerializeToString())
    return out


def test_honest_file_loads_with_its_metadata(honest: Path) -> None:
    artifact = load(honest)
    stated = read_metadata(honest)
    assert artifact.audit.bound == pytest.approx(stated["lipschitz_bound"], rel=1e-9)
    assert artifact.audit.certificate == stated["certificate"] == "linear_head"
    np.testing.assert_allclose(artifact.audit.head_pairs, stated["head_distances"], rtol=1e-9)
    x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():
        ref = artifact.twin(torch.from_numpy(x)).numpy()
    assert np.abs(artifact.logits(x) - ref).max() <= 1e-5
    # the radii the re-audit serves are the ones the metadata stated, bit for bit
    from certify.artifact import certificate_kwargs
    from certify.radius import certified_radius

    logits = artifact.logits(x)
    stated_radii = certified_radius(logits, **certificate_kwargs(stated))
    assert np.array_equal(artifact.radii(logits), stated_radii) and stated_radii.max() > 0


@pytest.mark.parametrize("name", list(TAMPERINGS))
def test_tampering_is_refused(honest: Path, tmp_path: Path, name: str) -> None:
    bad = _tampered(honest, tmp_path, name)
    with pytest.raises(ModelVerificationError, match=TAMPERINGS[name][1]) as info:
        load(bad)
    assert "\n" not in str(info.value)


def test_cosmetic_edits_are_not_refused(honest: Path, tmp_path: Path) -> None:
    """Node names, doc strings and the exporter's debug annotations do not change the maths."""
    proto = onnx.load(str(honest))
    for i, node in enumerate(proto.graph.node):
        node.name = f"renamed_{i}"
        node.doc_string = "edited"
        del node.metadata_props[:]
    out = tmp_path / "cosmetic.onnx"
    out.write_bytes(proto.SerializeToString())
    assert load(out).audit.bound == load(honest).audit.bound


def test_consistent_lie_is_an_honest_large_bound(honest: Path, tmp_path: Path) -> None:
    """Weights x1.5 with hash *and* bounds rewritten: the re-audit finds the real bound."""
    proto = onnx.load(str(honest))
    _scale_inits(proto, "body", 1.5)
    _rehash(proto)
    out = tmp_path / "scaled.onnx"
    out.write_bytes(proto.SerializeToString())
    with pytest.raises(ModelVerificationError, match=r"re-audit of the graph gives (\S+)") as info:
        load(out)
    real = float(info.value.args[0].rsplit("gives ", 1)[1])
    # every rescaled layer grew: the bound a radius would divide by grew with them
    assert real > 1.5**2 * read_metadata(honest)["lipschitz_bound"]


def test_signing_key(honest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from certify.artifact import update_metadata

    signed = tmp_path / "signed.onnx"
    signed.write_bytes(honest.read_bytes())
    monkeypatch.setenv("LIPCERT_SIGNING_KEY", "k3y")
    with pytest.raises(ModelVerificationError, match="signature"):
        load(signed)  # unsigned
    update_metadata(signed, {"note": "signed now"})  # re-signs with the configured key
    assert load(signed).metadata["note"] == "signed now"
    proto = onnx.load(str(signed))
    _set_meta(proto, "dataset", "cifar10")
    signed.write_bytes(proto.SerializeToString())
    with pytest.raises(ModelVerificationError, match="signature"):
        load(signed)
    monkeypatch.setenv("LIPCERT_SIGNING_KEY", "other")
    update_metadata(signed, {"note": "x"})
    monkeypatch.setenv("LIPCERT_SIGNING_KEY", "k3y")
    with pytest.raises(ModelVerificationError, match="signature"):
        load(signed)


@pytest.mark.parametrize("command", ["audit", "evaluate"])
def test_cli_refuses_with_one_line(honest: Path, tmp_path: Path, command: str) -> None:
    bad = _tampered(honest, tmp_path, "backdoor on a zero pixel")
    extra = ["--dataset", "digits", "--limit", "8"] if command == "evaluate" else []
    res = subprocess.run([sys.executable, "-m", "certify", command, str(bad), *extra],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not the export" in lines[0]


@pytest.mark.e2e
def test_service_lists_tampered_files_as_refused(honest: Path, tmp_path: Path) -> None:
    """A real ``bentoml serve``: the honest file is served, the tampered ones refused."""
    import httpx
    from service_harness import Server

    folder = tmp_path / "served"
    folder.mkdir()
    (folder / "honest.onnx").write_bytes(honest.read_bytes())
    cases = ["weights x1.5, hash recomputed", "backdoor on a zero pixel", "Conv pads changed"]
    for i, name in enumerate(cases):
        bad = _tampered(honest, tmp_path, name)
        (folder / f"bad{i}.onnx").write_bytes(bad.read_bytes())
    with Server(folder, tmp_path / "home") as server:
        body = httpx.post(f"{server.url}/models", json={}, timeout=30).json()
    assert [m["name"] for m in body["models"]] == ["honest"]
    refused = {Path(r["source"]).name: r["reason"] for r in body["refused"]}
    assert set(refused) == {f"bad{i}.onnx" for i in range(len(cases))}
    assert "re-audit" in refused["bad0.onnx"]
    assert "not the export" in refused["bad1.onnx"] and "not the export" in refused["bad2.onnx"]

"""Graph forms (:mod:`models.graph_form`): the same values, other ONNX operators, old files load.

``tests/data/form1-*.onnx`` were written by ``certify.artifact.to_onnx`` at commit bc628f2 (the
last export of form 1): Standard and LOT at size xxs on 1×8×8 inputs, ``torch.manual_seed(0)``.
``tests/data/form2-sll-xxs-1x8x8.onnx`` was written the same way at commit 406dc96 (the last
export of form 2; SLL, whose residual layers form 3 changes).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from certify.artifact import ModelVerificationError, decode_metadata, load
from certify.artifact.runtime import open_session
from certify.artifact.structure import export_proto
from models import create_model
from models.blocks import MaxMin
from models.export import to_plain
from models.graph_form import CURRENT, FORMS, graph_form, traced_as
from models.plain import CircularConv2d, ResidualConv2d

DATA = Path(__file__).parent / "data"
OLD_FILES = sorted(DATA.glob("form[0-9]-*.onnx"))


def _plain(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return to_plain(create_model(method, "xxs", 1, 10, 8).eval())


def _ops(proto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


def test_the_old_form_fixtures_exist():
    assert [p.name for p in OLD_FILES] == [
        "form1-lot-xxs-1x8x8.onnx", "form1-standard-xxs-1x8x8.onnx", "form2-sll-xxs-1x8x8.onnx",
    ]


@pytest.mark.parametrize("path", OLD_FILES, ids=lambda p: p.name)
def test_files_of_old_forms_still_load_and_only_because_their_form_is_accepted(path, monkeypatch):
    form = int(path.name[len("form")])
    proto = onnx.load(str(path))
    if form == 1:  # it really is form 1
        assert "Split" not in _ops(proto) and "Slice" in _ops(proto)
    else:  # it really is form 2
        assert "Split" in _ops(proto) and "ConvTranspose" in _ops(proto)
    artifact = load(path)  # the structure check, the audit and the parity check all pass
    stated = decode_metadata(proto)["lipschitz_bound"]  # what the exporter proved back then
    assert artifact.audit.bound == pytest.approx(stated, rel=1e-9)
    # Without its form among the accepted forms the same file is refused, and says why.
    loader = importlib.import_module("certify.artifact.load")  # the module, not the function
    monkeypatch.setattr(loader, "FORMS", tuple(f for f in FORMS if f != form))
    with pytest.raises(ModelVerificationError, match="graph is not the export of its config"):
        load(path)


@pytest.mark.parametrize("method", ["standard", "lot", "sll"])
def test_every_form_computes_the_same_logits(method):
    # Forms 1 and 2 differ in data movement only: bit for bit. Form 3 sums CPL's and SLL's
    # adjoint convolution in another order: equal to float32 rounding (and bit for bit where a
    # network has no residual layer).
    plain = _plain(method)
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    logits = {}
    for form in FORMS:
        session = open_session(export_proto(plain, (1, 8, 8), form).SerializeToString(), None, 1)
        (logits[form],) = session.run(None, {"image": x})
    with torch.no_grad():
        eager = plain(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits[CURRENT], eager, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(logits[1], logits[2])
    if any(isinstance(m, ResidualConv2d) for m in plain.modules()):
        np.testing.assert_allclose(logits[3], logits[2], atol=1e-6, rtol=0)
        assert not np.array_equal(logits[3], logits[2])  # really another graph
    else:
        np.testing.assert_array_equal(logits[3], logits[2])


def test_form_3_writes_the_residual_adjoint_as_a_conv_of_the_same_initializer():
    plain = _plain("sll")
    residual = sum(isinstance(m, ResidualConv2d) for m in plain.modules())
    form3, form2 = (export_proto(plain, (1, 8, 8), f) for f in (3, 2))
    ops3, ops2 = _ops(form3), _ops(form2)
    assert residual and ops2.count("ConvTranspose") == residual and "ConvTranspose" not in ops3
    assert ops3.count("Conv") == ops2.count("Conv") + residual
    assert ops3.count("Neg") == residual and ops3.count("Add") == ops2.count("Add") + residual
    # No new initializer: the adjoint kernel is computed from K's own initializer in the graph.
    assert sorted(i.name for i in form3.graph.initializer) == sorted(
        i.name for i in form2.graph.initializer)


def test_form_2_pads_by_wrap_and_splits_maxmin_with_constant_sizes():
    plain = _plain("standard")
    nodes = export_proto(plain, (1, 8, 8), 2).graph.node
    pads = [n for n in nodes if n.op_type == "Pad"]
    wraps = [n for n in pads if onnx.helper.get_attribute_value(n.attribute[0]) == b"wrap"]
    circular = [m for m in plain.modules() if isinstance(m, CircularConv2d)
                and m.weight.shape[-1] > 1]
    assert circular and len(wraps) == len(circular)
    splits = [n for n in nodes if n.op_type == "Split"]
    assert len(splits) == sum(isinstance(m, MaxMin) for m in plain.modules())
    constants = {o for n in nodes if n.op_type == "Constant" for o in n.output}
    assert all(n.input[1] in constants for n in splits)  # the sizes are constants
    form1 = export_proto(plain, (1, 8, 8), 1).graph.node
    assert not any(n.op_type == "Split" for n in form1)
    assert not any(n.op_type == "Pad" and n.attribute[0].s == b"wrap" for n in form1)


def test_form_2_fourier_reshapes_have_constant_shapes():
    plain = _plain("lot")

    def shapes_from_constants(form: int) -> bool:
        nodes = export_proto(plain, (1, 8, 8), form).graph.node
        constants = {o for n in nodes if n.op_type == "Constant" for o in n.output}
        matmul_fed = {i for n in nodes if n.op_type == "MatMul" for i in n.input}
        reshapes = [n for n in nodes if n.op_type == "Reshape"
                    and (n.output[0] in matmul_fed or n.input[0] in
                         {o for m in nodes if m.op_type == "MatMul" for o in m.output})]
        assert reshapes
        return all(n.input[1] in constants for n in reshapes)

    assert shapes_from_constants(2)
    assert not shapes_from_constants(1)  # form 1 computes them from the traced batch size


def test_traced_as_sets_the_form_for_its_block_only_and_refuses_unknown_forms():
    assert graph_form() == CURRENT
    with traced_as(1):
        assert graph_form() == 1
    assert graph_form() == CURRENT
    with pytest.raises(ValueError, match="unknown graph form 4; choose from 3, 2, 1"):
        with traced_as(4):
            pass


def test_to_onnx_writes_the_form_asked_for_and_refuses_unknown_ones(tmp_path):
    from certify.artifact import to_onnx

    torch.manual_seed(0)
    model = create_model("aol", "xxs", 1, 10, 8)
    ops = {}
    for form in FORMS:
        path = to_onnx(model, tmp_path / f"f{form}.onnx", metadata=dict(dataset="digits"),
                       graph_form=form)
        ops[form] = _ops(onnx.load(str(path)))  # to_onnx has loaded it back: it verifies
    assert "Split" in ops[2] and "Split" not in ops[1]
    with pytest.raises(ValueError, match="unknown graph form 0; choose from 3, 2, 1"):
        to_onnx(model, tmp_path / "f0.onnx", graph_form=0)

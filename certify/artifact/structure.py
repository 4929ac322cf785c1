"""Is an ONNX graph exactly the export of a given plain network? (The re-audit's structure check.)

A served radius must follow from the graph that runs. The audit proves a bound for a *torch*
network; this module proves that the ONNX graph computes that network, without trusting anything
the file says about itself:

1. The twin. The file's metadata names a LipNet configuration. ``create_model(config).export()``
   gives a plain network of that configuration (random weights: the *skeleton*), and every
   ``state_dict`` entry of the skeleton is loaded from the file's initializer of the same name
   (the exporter keeps those names; see :func:`export_proto`). That is the twin.
2. The structure. The skeleton is exported with the same exporter and options. Tracing is
   data-independent (the tracer records operations, and plain modules have no data-dependent
   control flow), so exporting the twin would give the skeleton's graph with the twin's weights
   in the initializers, which *are* the file's. Hence if
   the file's graph equals the skeleton's export in everything except the values of the
   initializers that were loaded into the twin, the file computes exactly what the twin computes.

"Equals" is strict (:func:`structure_mismatch`): the IR version, the opsets, every node in order
(op type, domain, inputs, outputs, every attribute including constant tensors, bit for bit), the
graph inputs and outputs with their types, the value annotations, every initializer's name,
type and shape, and the bytes of every initializer that is not a twin weight. Local functions,
sparse initializers, subgraphs, training info and external data are refused. Node names, doc
strings and the exporter's per-node debug annotations (stack traces, counters) do not affect
what ONNX Runtime computes and are ignored. Anything else that differs is a refusal; a weight
that only *looks* like a constant (a value folded into the graph) fails to compare and is refused
too, so the check can only err on the side of refusing.

The skeleton export depends only on the configuration, the input shape, the graph form
(:mod:`models.graph_form`) and the library versions, so it is cached per process
(:func:`skeleton_proto`). The loader tries every form it knows, newest first: each form's export
of the twin computes the twin's function, so accepting any exact match is as sound as one form.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from models.graph_form import CURRENT, traced_as

#: ONNX opset of exported models.
OPSET = 19
INPUT_NAME, OUTPUT_NAME = "image", "logits"

_CACHE: dict[str, Any] = {}
_CACHE_LOCK = threading.Lock()


def export_proto(plain: nn.Module, input_shape: Sequence[int], form: int = CURRENT) -> Any:
    """Export a plain network to an in-memory ``onnx.ModelProto`` (the one exporter lipcert uses).

    ``form``: the graph form to trace (:mod:`models.graph_form`; the values are the same in all).

    ``torch.onnx.export`` (the TorchScript tracer, ``dynamo=False``: 10–20x faster here than the
    ``torch.export`` path, which matters because every load exports a skeleton), opset
    :data:`OPSET`, input ``image`` ``(N, C, H, W)`` with a dynamic batch axis, output ``logits``,
    no constant folding, so every ``state_dict`` entry is an initializer of the same name. The
    tracer merges initializers whose *values* are equal (Dirac kernels, the DFT matrices every
    Fourier layer shares), which would make the graph depend on the weights; so a copy whose
    weights are all distinct is traced, and the real weights are grafted into the result.

    Raises:
        ValueError: the exporter renamed a ``state_dict`` entry.
    """
    import onnx

    traced = copy.deepcopy(plain)
    _distinct_weights(traced)
    example = torch.zeros((2, *input_shape))
    buffer = io.BytesIO()
    # The exporter warns about its own deprecation and prints progress; library code is quiet.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), traced_as(form):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            traced, (example,), buffer, dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=False, export_params=True, keep_initializers_as_inputs=False,
        )
    return graft(onnx.load_from_string(buffer.getvalue()), plain)


def _distinct_weights(module: nn.Module) -> None:
    """Make every floating ``state_dict`` entry distinct (seeded, in place)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for value in module.state_dict().values():
            if value.is_floating_point() and value.numel():
                value.add_(torch.rand(value.shape, generator=gen, dtype=value.dtype) * 1e-3)


def graft(reference: Any, plain: nn.Module) -> Any:
    """A copy of ``reference`` with ``plain``'s ``state_dict`` in the initializers of the same
    names (types and shapes must match).

    Raises:
        ValueError: a weight the reference lacks, or of another type or shape.
    """
    import onnx
    from onnx import numpy_helper

    proto = onnx.ModelProto()
    proto.CopyFrom(reference)
    inits = {t.name: t for t in proto.graph.initializer}
    for key, value in plain.state_dict().items():
        if key not in inits:
            raise ValueError(f"the exported graph has no weight {key!r}")
        array = value.detach().cpu().numpy()
        old = numpy_helper.to_array(inits[key])
        if array.dtype != old.dtype or array.shape != old.shape:
            raise ValueError(
                f"weight {key!r} is {array.dtype}{list(array.shape)}, the graph expects "
                f"{old.dtype}{list(old.shape)}"
            )
        inits[key].CopyFrom(numpy_helper.from_array(array, key))
    return proto


def build_skeleton(config: Mapping[str, Any]) -> nn.Module:
    """The plain network of a LipNet configuration (random weights), eval mode, no gradients.

    Raises:
        ValueError: the configuration does not name a buildable model.
    """
    from models.export import to_plain
    from models.registry import create_model

    cfg = dict(config)
    try:
        with torch.random.fork_rng():  # the skeleton's random weights leave no trace
            model = create_model(
                cfg.pop("method"), cfg.pop("size"), cfg.pop("in_channels"),
                cfg.pop("num_classes"), cfg.pop("image_size"), **cfg,
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"the stored config does not build a model: {exc}") from None
    return to_plain(model)


#: Layer options whose *default* changed, per method: the value the earlier default meant. A file
#: exported before the change stores a config without the option; :func:`legacy_configs` gives
#: the config with the old value spelled out, which the loader tries when the config as stored
#: does not rebuild the file's graph. Sound: the structure check is as strict either way.
LEGACY_DEFAULTS: dict[str, tuple[dict[str, Any], ...]] = {
    "soc": ({"series": "taylor"},),  # SOC exported the Taylor series before 2026-12-02
}


def legacy_configs(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Configs an earlier lipcert default built from ``config`` (see :data:`LEGACY_DEFAULTS`)."""
    out = []
    for defaults in LEGACY_DEFAULTS.get(str(config.get("method")), ()):
        options = dict(config.get("layer_options") or {})
        if any(k in options for k in defaults):
            continue  # the option was given explicitly: no earlier default applied
        out.append({**config, "layer_options": {**options, **defaults}})
    return out


def skeleton_proto(
    config: Mapping[str, Any],
    input_shape: Sequence[int],
    skeleton: nn.Module | None = None,
    form: int = CURRENT,
) -> Any:
    """:func:`export_proto` of :func:`build_skeleton`, cached per (config, shape, form, versions).

    ``skeleton``: an already built plain network of exactly this config, to save building
    another one (the export depends on the shapes of its weights only).
    """
    key = json.dumps(
        [dict(config), list(input_shape), form, torch.__version__], sort_keys=True, default=str
    )
    with _CACHE_LOCK:
        if key not in _CACHE:
            module = skeleton if skeleton is not None else build_skeleton(config)
            _CACHE[key] = export_proto(module, tuple(input_shape), form)
        return _CACHE[key]


def _clean_node(node: Any) -> bytes:
    import onnx

    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = ""
    copy.doc_string = ""
    del copy.metadata_props[:]
    for attr in copy.attribute:
        attr.doc_string = ""
    return copy.SerializeToString(deterministic=True)


def _value_info(values: Sequence[Any]) -> list[bytes]:
    import onnx

    out = []
    for value in values:
        copy = onnx.ValueInfoProto()
        copy.CopyFrom(value)
        copy.doc_string = ""
        del copy.metadata_props[:]
        out.append(copy.SerializeToString(deterministic=True))
    return out


def _subgraphs(node: Any) -> bool:
    import onnx

    kinds = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    return any(a.type in kinds or a.HasField("g") or len(a.graphs) for a in node.attribute)


def _external(tensor: Any) -> bool:
    import onnx

    return tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data) > 0


def structure_mismatch(
    served: Any, reference: Any, twin_weights: Sequence[str]
) -> str | None:
    """Why ``served`` is not ``reference`` with other values for ``twin_weights``, or None.

    Args:
        served: the ``onnx.ModelProto`` that will run.
        reference: the skeleton's export (:func:`skeleton_proto`).
        twin_weights: initializer names whose values were loaded into the twin (their values
            may differ; names, types and shapes may not).

    Returns:
        A one-line reason for the first difference found, or ``None`` when identical.
    """
    from onnx import numpy_helper

    if served.ir_version != reference.ir_version:
        return f"IR version {served.ir_version}, expected {reference.ir_version}"
    opsets = sorted((o.domain, o.version) for o in served.opset_import)
    expected = sorted((o.domain, o.version) for o in reference.opset_import)
    if opsets != expected:
        return f"opset imports {opsets}, expected {expected}"
    if len(served.functions) or len(reference.functions):
        return "local functions are not audited"
    if len(served.training_info):
        return "training info is not allowed"
    g, r = served.graph, reference.graph
    if len(g.sparse_initializer):
        return "sparse initializers are not audited"
    if _value_info(g.input) != _value_info(r.input):
        return f"graph inputs {[i.name for i in g.input]} differ from the export's"
    if _value_info(g.output) != _value_info(r.output):
        return f"graph outputs {[o.name for o in g.output]} differ from the export's"
    if len(g.node) != len(r.node):
        return f"{len(g.node)} nodes, the export of the stored config has {len(r.node)}"
    for i, (a, b) in enumerate(zip(g.node, r.node, strict=True)):
        if _subgraphs(a):
            return f"node {i} ({a.op_type}) has a subgraph; subgraphs are not audited"
        if _clean_node(a) != _clean_node(b):
            return (
                f"node {i} ({a.op_type} {list(a.input)} -> {list(a.output)}) differs from the "
                f"export's ({b.op_type} {list(b.input)} -> {list(b.output)})"
            )
    if sorted(_value_info(g.value_info)) != sorted(_value_info(r.value_info)):
        return "value annotations differ from the export's"
    weights = set(twin_weights)
    served_inits = {t.name: t for t in g.initializer}
    ref_inits = {t.name: t for t in r.initializer}
    if len(served_inits) != len(g.initializer):
        return "duplicate initializer names"
    if set(served_inits) != set(ref_inits):
        extra = sorted(set(served_inits) - set(ref_inits))[:3]
        missing = sorted(set(ref_inits) - set(served_inits))[:3]
        return f"initializers differ from the export's (extra {extra}, missing {missing})"
    for name, tensor in served_inits.items():
        ref = ref_inits[name]
        if _external(tensor):
            return f"initializer {name!r} has external data; the file must be self-contained"
        if tensor.data_type != ref.data_type or list(tensor.dims) != list(ref.dims):
            return (
                f"initializer {name!r} is type {tensor.data_type} {list(tensor.dims)}, "
                f"expected {ref.data_type} {list(ref.dims)}"
            )
        if name not in weights:
            a, b = numpy_helper.to_array(tensor), numpy_helper.to_array(ref)
            if a.tobytes() != b.tobytes():
                return f"constant initializer {name!r} differs from the export's"
    return None


__all__ = [
    "INPUT_NAME", "LEGACY_DEFAULTS", "OPSET", "OUTPUT_NAME", "build_skeleton", "export_proto",
    "graft", "legacy_configs", "skeleton_proto",
    "structure_mismatch",
]

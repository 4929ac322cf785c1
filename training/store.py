"""The BentoML model store: save a trained model's ONNX file, list lipcert models.

Each saved model is named ``lipcert-<dataset>-<method>-<size>`` (BentoML adds a version), is
labelled ``method``, ``size``, ``dataset`` and ``lipcert=1`` (what the service looks for), holds
the run's report as metadata and the ONNX file as ``model.onnx`` in its folder.

The store location is read at call time: the ``home`` argument, else ``$BENTOML_HOME``, else
BentoML's default (``~/bentoml``). Reading the environment per call (rather than once per
process, as BentoML's container does) lets tests and tools point one process at several stores.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Label that marks a lipcert model in a shared store.
LIPCERT_LABEL = ("lipcert", "1")


def model_name(dataset: str, method: str, size: str) -> str:
    """The store name of a model: ``lipcert-<dataset>-<method>-<size>``."""
    return f"lipcert-{dataset}-{method}-{size}"


def _store(home: str | Path | None) -> dict[str, Any]:
    """``_model_store=`` keyword for bentoml calls, or none to use BentoML's own default."""
    home = home if home is not None else os.environ.get("BENTOML_HOME")
    if home is None:
        return {}
    # bentoml is pinned (==1.4.39); its public functions take the store as ``_model_store``.
    from bentoml._internal.models.model import ModelStore

    models = Path(home).expanduser() / "models"
    models.mkdir(parents=True, exist_ok=True)
    return {"_model_store": ModelStore(str(models))}


def _plain(value: Any) -> Any:
    """Metadata BentoML accepts: basic types only; ``None`` and non-finite floats dropped."""
    if isinstance(value, Mapping):
        out = {str(k): _plain(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [v for v in (_plain(x) for x in value) if v is not None]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    # Exact builtin types: yaml refuses subclasses such as torch's TorchVersion (a str).
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return None if value is None else str(value)


def save_to_store(
    onnx_path: str | Path, report: Mapping[str, Any], *, home: str | Path | None = None
) -> str:
    """Save an exported model to the BentoML model store.

    Args:
        onnx_path: the ``model.onnx`` written by ``models.export.to_onnx``.
        report: the run report; needs ``dataset``, ``method`` and ``size``; stored as metadata.
        home: BentoML home (default: ``$BENTOML_HOME``, else BentoML's default).

    Returns:
        The new model's tag, ``name:version``.

    Raises:
        FileNotFoundError: no ONNX file at ``onnx_path``.
        ValueError: the report lacks dataset, method or size.
    """
    import bentoml

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX file at {onnx_path}")
    missing = [k for k in ("dataset", "method", "size") if not report.get(k)]
    if missing:
        raise ValueError(f"report lacks {', '.join(missing)}")
    dataset, method, size = (str(report[k]) for k in ("dataset", "method", "size"))
    labels = {
        "method": method,
        "size": size,
        "dataset": dataset,
        LIPCERT_LABEL[0]: LIPCERT_LABEL[1],
    }
    with bentoml.models.create(
        model_name(dataset, method, size),
        labels=labels,
        metadata=_plain(dict(report)),
        **_store(home),
    ) as model:
        shutil.copyfile(onnx_path, model.path_of("model.onnx"))
    logger.info("saved %s to the BentoML model store", model.tag)
    return str(model.tag)


@dataclass(frozen=True)
class StoredModel:
    """A lipcert model in the store: tag, the path of its ``model.onnx``, labels and metadata."""

    tag: str
    path: Path
    labels: dict[str, str]
    metadata: dict[str, Any]


def list_store_models(*, home: str | Path | None = None) -> list[StoredModel]:
    """Every model labelled ``lipcert=1`` in the store, sorted by tag.

    Args:
        home: BentoML home (default: ``$BENTOML_HOME``, else BentoML's default).
    """
    import bentoml

    found = []
    for model in bentoml.models.list(**_store(home)):
        labels = dict(model.info.labels)
        if labels.get(LIPCERT_LABEL[0]) != LIPCERT_LABEL[1]:
            continue
        found.append(
            StoredModel(
                str(model.tag), Path(model.path_of("model.onnx")), labels, dict(model.info.metadata)
            )
        )
    return sorted(found, key=lambda m: m.tag)

"""The artifact in the BentoML model store: save a model's ONNX file, list lipcert models.

Each saved model is named ``lipcert-<dataset>-<method>-<size>`` (BentoML adds a version), is
labelled ``method``, ``size``, ``dataset`` and ``lipcert=1`` (what the service looks for), holds
the run's report as metadata and the ONNX file as ``model.onnx`` in its folder. Only BentoML's
public API is used.

Which store. BentoML fixes its home (``$BENTOML_HOME``, else ``~/bentoml``) once per process, the
first time it needs it. So that a caller can name the store per call (``home=``, or
``$BENTOML_HOME`` as it is *now*), :func:`save_to_store` and :func:`list_store_models` run in a
short child process (this file run as a script, about 1.5 s) with that home;
:func:`list_models_here` lists the store of the current process (what a server serves).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Label that marks a lipcert model in a shared store.
LIPCERT_LABEL = ("lipcert", "1")


def model_name(dataset: str, method: str, size: str) -> str:
    """The store name of a model: ``lipcert-<dataset>-<method>-<size>``."""
    return f"lipcert-{dataset}-{method}-{size}"


def plain_metadata(value: Any) -> Any:
    """Metadata BentoML accepts: basic types only; ``None`` and non-finite floats dropped."""
    if isinstance(value, Mapping):
        out = {str(k): plain_metadata(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [v for v in (plain_metadata(x) for x in value) if v is not None]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    # Exact builtin types: yaml refuses subclasses such as torch's TorchVersion (a str).
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return None if value is None else str(value)


@dataclass(frozen=True)
class StoredModel:
    """A lipcert model in the store: tag, the path of its ``model.onnx``, labels and metadata."""

    tag: str
    path: Path
    labels: dict[str, str]
    metadata: dict[str, Any]


def _child(args: list[str], home: str | Path | None, stdin: str = "") -> str:
    """Run this module's command line with the store at ``home``; its stdout."""
    env = dict(os.environ)
    if home is not None:
        env["BENTOML_HOME"] = str(Path(home).expanduser().resolve())
    env.setdefault("BENTOML_DO_NOT_TRACK", "True")
    # The file, not ``-m certify.artifact.store``: ``-m`` would first import the ``certify``
    # package, whose audit imports torch (about 3 of the child's 4.5 s). This module imports
    # only the standard library and, in the child, BentoML. ``-P``: this file's folder is not put
    # on ``sys.path``, so its siblings (``format.py``, ``runtime.py``, ...) shadow nothing.
    res = subprocess.run([sys.executable, "-P", str(Path(__file__).resolve()), *args], env=env,
                         input=stdin, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the BentoML store command {args[0]!r} failed: {tail}")
    return res.stdout


def save_to_store(
    onnx_path: str | Path, report: Mapping[str, Any], *, home: str | Path | None = None
) -> str:
    """Save an exported model to the BentoML model store.

    Args:
        onnx_path: the ``model.onnx`` written by :func:`certify.artifact.to_onnx`.
        report: the run report; needs ``dataset``, ``method`` and ``size``; stored as metadata.
        home: BentoML home (default: ``$BENTOML_HOME``, else BentoML's default).

    Returns:
        The new model's tag, ``name:version``.

    Raises:
        FileNotFoundError: no ONNX file at ``onnx_path``.
        ValueError: the report lacks dataset, method or size.
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX file at {onnx_path}")
    missing = [k for k in ("dataset", "method", "size") if not report.get(k)]
    if missing:
        raise ValueError(f"report lacks {', '.join(missing)}")
    payload = json.dumps(plain_metadata(dict(report)))
    out = _child(["save", str(onnx_path.resolve())], home, stdin=payload)
    tag = out.strip().splitlines()[-1]
    logger.info("saved %s to the BentoML model store", tag)
    return tag


def list_store_models(*, home: str | Path | None = None) -> list[StoredModel]:
    """Every model labelled ``lipcert=1`` in the store at ``home``, sorted by tag."""
    rows = json.loads(_child(["list"], home))
    return [StoredModel(r["tag"], Path(r["path"]), r["labels"], r["metadata"]) for r in rows]


def list_models_here() -> list[StoredModel]:
    """Every lipcert model in this process's BentoML store (its home as BentoML fixed it)."""
    import bentoml

    found = []
    for model in bentoml.models.list():
        labels = dict(model.info.labels)
        if labels.get(LIPCERT_LABEL[0]) != LIPCERT_LABEL[1]:
            continue
        found.append(StoredModel(str(model.tag), Path(model.path_of("model.onnx")), labels,
                                 dict(model.info.metadata)))
    return sorted(found, key=lambda m: m.tag)


def _save_here(onnx_path: Path, report: dict[str, Any]) -> str:
    import bentoml

    dataset, method, size = (str(report[k]) for k in ("dataset", "method", "size"))
    labels = {"method": method, "size": size, "dataset": dataset,
              LIPCERT_LABEL[0]: LIPCERT_LABEL[1]}
    with bentoml.models.create(model_name(dataset, method, size), labels=labels,
                               metadata=report) as model:
        shutil.copyfile(onnx_path, model.path_of("model.onnx"))
    return str(model.tag)


def main(argv: list[str] | None = None) -> int:
    """``python -m certify.artifact.store save FILE < REPORT_JSON | list`` (used by the above)."""
    parser = argparse.ArgumentParser(prog="python -m certify.artifact.store")
    sub = parser.add_subparsers(dest="command", required=True)
    save = sub.add_parser("save")
    save.add_argument("onnx")
    sub.add_parser("list")
    args = parser.parse_args(argv)
    if args.command == "save":
        print(_save_here(Path(args.onnx), json.loads(sys.stdin.read())))
    else:
        rows = []
        for m in list_models_here():
            row = asdict(m)
            row["path"] = str(m.path)
            rows.append(row)
        print(json.dumps(rows))
    return 0


__all__ = [
    "LIPCERT_LABEL", "StoredModel", "list_models_here", "list_store_models", "model_name",
    "plain_metadata", "save_to_store",
]

if __name__ == "__main__":
    sys.exit(main())

"""Which lipcert models a bento carries, and the sources a bento serves.

``bentoml build`` packages the models a service *references* (``bentoml.models.BentoModel``
class attributes). :func:`model_references` builds those references when ``service.py`` is
imported, from the BentoML model store in effect:

- ``LIPCERT_BENTO_MODELS`` unset: every model labelled ``lipcert=1`` (the default);
- ``LIPCERT_BENTO_MODELS=tag1,tag2``: exactly these tags (``name`` alone means its latest);
- ``LIPCERT_BENTO_MODELS=label:key=value[,key=value]``: the lipcert models carrying these labels
  (e.g. ``label:dataset=fashion-mnist``);
- ``LIPCERT_MODELS`` set (a folder of ONNX files): no references.

When the service runs from a bento (``bentoml serve lipcert:latest`` anywhere, or the container
``bentoml containerize`` builds), :func:`bento_sources` lists exactly the models the bento was
built with, resolved from the bento's own model store (in a container) or the local one; each is
still re-audited when it is loaded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from service.loader import ModelRefused, ModelSource

logger = logging.getLogger(__name__)

SELECT_ENV = "LIPCERT_BENTO_MODELS"


def _selected(env: Mapping[str, str]) -> list[str]:
    """Tags of the store's lipcert models that ``env`` selects (see the module docstring)."""
    import bentoml

    from certify.artifact.store import LIPCERT_LABEL, list_models_here

    spec = env.get(SELECT_ENV, "").strip()
    if spec and not spec.startswith("label:"):
        tags = []
        for item in (s.strip() for s in spec.split(",") if s.strip()):
            model = bentoml.models.get(item)  # raises NotFound naming the tag
            if model.info.labels.get(LIPCERT_LABEL[0]) != LIPCERT_LABEL[1]:
                raise ValueError(f"{SELECT_ENV}: {item} is not a lipcert model")
            tags.append(str(model.tag))
        return tags
    wanted: dict[str, str] = {}
    for pair in (p.strip() for p in spec[len("label:"):].split(",") if p.strip()):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{SELECT_ENV}: bad label selector {pair!r}; use key=value")
        wanted[key.strip()] = value.strip()
    return [m.tag for m in list_models_here()
            if all(m.labels.get(k) == v for k, v in wanted.items())]


def model_references(env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """``{attribute name: bentoml.models.BentoModel}`` for the selected models (may be empty)."""
    import bentoml

    if env.get("LIPCERT_MODELS"):
        return {}
    try:
        tags = _selected(env)
    except Exception as exc:  # a broken selection must not stop `bentoml serve`
        logger.error("lipcert: no bento model references: %s", exc)
        return {}
    return {f"lipcert_model_{i}": bentoml.models.BentoModel(tag) for i, tag in enumerate(tags)}


def bento_sources(bento: Any) -> list[ModelSource]:
    """The lipcert models a bento was built with, as load sources (named by their tags).

    Raises:
        ModelRefused: a model the bento names cannot be found.
    """
    import bentoml

    sources = []
    for info in bento.info.all_models:
        try:
            stored = bentoml.models.BentoModel(info.tag).resolve()
        except Exception as exc:  # NotFound and friends
            raise ModelRefused(f"the bento's model {info.tag} is missing: {exc}") from None
        if stored.info.labels.get("lipcert") != "1":
            continue
        sources.append(ModelSource(str(stored.tag), Path(stored.path_of("model.onnx")),
                                   tag=str(stored.tag), report=dict(stored.info.metadata)))
    return sorted(sources, key=lambda s: s.name)


__all__ = ["SELECT_ENV", "bento_sources", "model_references"]

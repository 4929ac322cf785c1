"""The service's web page, mounted on the BentoML service at ``/``.

Routes (all GET):

- ``/``: the page (``service/static/index.html``): upload or pick an example, one model or all,
  the certified radius, certified-at-ε, and the served models' table and CRA-vs-ε plot. It only
  calls the service's own JSON APIs (``/predict``, ``/models``) from the browser.
- ``/static/…``: the page's CSS and JavaScript (plain files shipped in the package, no CDN).
- ``/docs``: BentoML's own API page (Swagger UI over ``/docs.json``), which this page replaces
  at ``/``.
- ``/examples``: the shipped example images listed in ``examples/index.json`` (JSON, each with a
  ``url``); ``/examples/<file>``: one of them. The folder is ``LIPCERT_EXAMPLES`` if set, else
  ``examples/`` beside the ``service`` package (the repository root, or a bento's ``src``).

BentoML mounts apps in front of its own index route, and its ``PassiveMount`` only claims the
paths this app has a route for, so every API route, ``/docs.json``, ``/metrics`` and the health
probes keep working unchanged.
"""

from __future__ import annotations

import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
#: The repository's (or bento's) ``examples/`` folder, beside the ``service`` package.
DEFAULT_EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

_NO_CACHE = {"cache-control": "no-cache"}


def examples_folder(env: dict[str, str] | None = None) -> Path:
    """``LIPCERT_EXAMPLES`` if set, else :data:`DEFAULT_EXAMPLES`."""
    env = os.environ if env is None else env
    folder = env.get("LIPCERT_EXAMPLES")
    return Path(folder) if folder else DEFAULT_EXAMPLES


def read_examples(folder: Path) -> list[dict[str, Any]]:
    """The entries of ``folder/index.json`` whose file exists; ``[]`` without a readable index."""
    try:
        items = json.loads((folder / "index.json").read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(items, list):
        return []
    return [item for item in items
            if isinstance(item, dict) and isinstance(item.get("file"), str)
            and "/" not in item["file"] and (folder / item["file"]).is_file()]


async def _index(_: Request) -> Response:
    page = STATIC / "index.html"
    if not page.is_file():  # e.g. a bento built without service/static/: say so, don't fail
        return HTMLResponse(
            "<!doctype html><title>lipcert</title><p>The web page's files "
            f"(<code>{page.parent}</code>) are not installed with this service; the JSON API "
            'works: see <a href="docs">/docs</a>.', status_code=404)
    return FileResponse(page, headers=_NO_CACHE)


async def _bentoml_docs(_: Request) -> Response:
    """BentoML's index page, chosen as BentoML 1.4 chooses it (its ``new_index`` feature)."""
    new_index = "new_index" in os.environ.get("BENTOML_ENABLE_FEATURES", "").split(",")
    name = "main-ui.html" if new_index else "main-openapi.html"
    try:
        page = resources.files("_bentoml_impl.server").joinpath(name)
        return HTMLResponse(page.read_text(encoding="utf-8"))
    except (ModuleNotFoundError, OSError):  # another BentoML layout: link the spec instead
        return HTMLResponse('<!doctype html><title>lipcert API</title>'
                            '<p>The OpenAPI description is at <a href="docs.json">/docs.json</a>.')


def create_web_app(examples: Path | None = None) -> Starlette:
    """The Starlette app of the page, its static files, ``/docs`` and the examples.

    Args:
        examples: the examples folder; default :func:`examples_folder`, read at each request
            (so ``LIPCERT_EXAMPLES`` set after import counts).

    Returns:
        The app, to mount at ``/`` with ``bentoml.mount_asgi_app`` (or ``Service.mount_asgi_app``).
    """
    def folder() -> Path:
        return examples_folder() if examples is None else examples

    async def list_examples(_: Request) -> Response:
        items = [{**item, "url": f"examples/{item['file']}"} for item in read_examples(folder())]
        return JSONResponse({"examples": items}, headers=_NO_CACHE)

    async def one_example(request: Request) -> Response:
        name = request.path_params["name"]
        where = folder()
        if name not in {item["file"] for item in read_examples(where)}:
            return JSONResponse({"error": f"no example named {name!r}"}, status_code=404)
        return FileResponse(where / name)

    return Starlette(routes=[
        Route("/", _index, methods=["GET", "HEAD"]),
        Route("/docs", _bentoml_docs, methods=["GET", "HEAD"]),
        Route("/examples", list_examples, methods=["GET", "HEAD"]),
        Route("/examples/{name}", one_example, methods=["GET", "HEAD"]),
        Mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static"),
    ])

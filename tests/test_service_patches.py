"""The two changes to BentoML's serving in ``service.bentoml_patches``.

The request timeout: ``TimeoutMiddleware`` driven directly with a minimal ASGI app on its own
event loop; a finished request must leave nothing of its ``contextvars`` context alive (BentoML
1.4.39's timer kept it for the whole timeout), and a request that sends nothing within the
timeout still gets BentoML's 504. The batcher: the same recorded batches give BentoML's latency
fit, and no learned wait.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import weakref
from typing import Any

import pytest

from service.bentoml_patches import dispatch_without_learned_wait, release_timeout_timers

REQUEST_VALUE: contextvars.ContextVar[Any] = contextvars.ContextVar("request_value")


class _RequestObject:
    """Something a request keeps in its context (as OpenTelemetry keeps its span)."""


def _scope() -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": "/predict_tensor", "headers": []}


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


def _app(delay_s: float = 0.0):
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await asyncio.sleep(delay_s)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def _context_left_alive(call: Any) -> bool:
    """Whether an object put in the request's context outlives the request (loop still open)."""
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    middleware = TimeoutMiddleware(_app(), timeout=60.0)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def one_request() -> weakref.ref:
        obj = _RequestObject()
        REQUEST_VALUE.set(obj)
        await call(middleware, _scope(), _receive, send)
        REQUEST_VALUE.set(None)
        return weakref.ref(obj)

    async def scenario() -> bool:
        ref = await asyncio.create_task(one_request())
        await asyncio.sleep(0)  # let the finished request's callbacks run
        gc.collect()
        return ref() is not None

    left = asyncio.run(scenario())
    assert sent[0]["status"] == 200
    return left


def test_finished_request_leaves_its_context_behind_in_bentoml_only() -> None:
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    import service.bentoml_patches as patches

    assert release_timeout_timers()
    assert release_timeout_timers()  # idempotent
    assert TimeoutMiddleware.__call__ is patches._timeout_call
    assert patches._bentoml_call is not None
    # BentoML's timer holds the request's context for the whole 60 s; the replacement's not
    assert _context_left_alive(patches._bentoml_call)
    assert not _context_left_alive(TimeoutMiddleware.__call__)


@pytest.mark.parametrize("delay_s", [0.0, 0.02])
def test_answer_passes_through(delay_s: float) -> None:
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    release_timeout_timers()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(TimeoutMiddleware(_app(delay_s), timeout=60.0)(_scope(), _receive, send))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"ok"


def test_nothing_sent_within_the_timeout_is_a_504() -> None:
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    release_timeout_timers()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    # the app would answer after 30 s; the timeout is 0.05 s
    middleware = TimeoutMiddleware(_app(30.0), timeout=0.05)
    asyncio.run(middleware(_scope(), _receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 504
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert "0.05 seconds" in body["error"]


def test_batcher_keeps_its_latency_fit_without_the_learned_wait() -> None:
    from bentoml._internal.marshal.dispatcher import Optimizer

    import service.bentoml_patches as patches

    assert dispatch_without_learned_wait()
    assert dispatch_without_learned_wait()  # idempotent
    assert Optimizer.trigger_refresh is patches._refresh_without_wait
    mine, bentoml_own = Optimizer(1.0), Optimizer(1.0)
    for n in range(1, 11):  # (batch size, duration s, wait s): 2 ms + 0.5 ms per image
        for opt in (mine, bentoml_own):
            opt.o_stat.append((n, 0.002 + 0.0005 * n, 0.03))
    mine.trigger_refresh()
    patches._bentoml_refresh(bentoml_own)
    assert bentoml_own.wait == pytest.approx(0.03)
    assert mine.wait == 0
    assert (mine.o_a, mine.o_b) == (bentoml_own.o_a, bentoml_own.o_b)
    assert mine.o_a == pytest.approx(0.0005) and mine.o_b == pytest.approx(0.002)

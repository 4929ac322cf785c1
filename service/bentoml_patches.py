"""Two changes to BentoML 1.4.39's serving that the service's tail latency needed (issue 17).

Both replace one method of a BentoML class, keep its contract, and apply only where the class has
the shape replaced (another BentoML version is left as it is, with a warning). They are installed
once per worker by ``LipCert.prepare_worker`` (docs/service.md, "Scaling with clients").

**The request timeout's timer.** ``TimeoutMiddleware`` (``traffic.timeout``, 60 s here) schedules
``loop.call_later(timeout, ...)`` for every request and never cancels it. Each such timer keeps a
copy of the request's ``contextvars`` context (its OpenTelemetry span with its attribute lists and
locks, the future it would fail) alive for the whole timeout: at ~1,000 requests/s a worker
carried ~60,000 requests' worth of objects, and each full garbage collection walked them all, a
pause of the worker's event loop (so of every request it held) that grew to 0.1–0.5 s every few
seconds under load. :func:`release_timeout_timers`: the same 504 when nothing was sent within the
timeout, with the timer cancelled as soon as the answer starts and given an empty context.

**The adaptive batcher's learned wait.** ``CorkDispatcher`` holds a request back while
``n × (its wait + 1 ms) ≤ 0.95 × wait``, where ``wait`` is the average time the first request of
its last 50 batches waited, refreshed at most every 5 s. That wait is mostly the one the
dispatcher itself imposed, so it feeds itself under load, and decays by ~5 % per 5 s after it: a
lone client after a burst waited 17–68 ms per request for minutes. Batches form without it: one
batch runs at a time per worker, and the requests that arrive meanwhile are the next batch.
:func:`dispatch_without_learned_wait` keeps the dispatcher's latency fit (with which it sheds
requests that would miss ``max_latency_ms``) and sets the wait to 0, so a request is dispatched
as soon as no batch is running.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
from typing import Any

logger = logging.getLogger(__name__)

#: BentoML's own methods, kept when replaced (the tests compare them).
_bentoml_call: Any = None
_bentoml_refresh: Any = None


async def _timeout_call(self: Any, scope: Any, receive: Any, send: Any) -> None:
    """``TimeoutMiddleware.__call__`` of BentoML 1.4.39, its timer cancelled once unneeded."""
    from starlette.responses import JSONResponse

    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    # an empty context: the timer must not keep the request's (its span, its objects) alive
    timer = loop.call_later(self.timeout, self._set_timer_out, waiter,
                            context=contextvars.Context())

    async def _send(message: Any) -> None:
        if not waiter.done():
            waiter.set_result(None)
            timer.cancel()
        await send(message)

    fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
    try:
        await waiter
    except TimeoutError:  # what _set_timer_out sets (asyncio.TimeoutError)
        if fut.cancel():
            resp = JSONResponse(
                {"error": f"Not able to process the request in {self.timeout} seconds"},
                status_code=504,
            )
            await resp(scope, receive, send)
    else:
        await fut
    finally:
        timer.cancel()


def _refresh_without_wait(self: Any) -> None:
    """``Optimizer.trigger_refresh``: BentoML's latency fit, and no learned wait."""
    _bentoml_refresh(self)
    self.wait = 0


def release_timeout_timers() -> bool:
    """Install :func:`_timeout_call` on BentoML's ``TimeoutMiddleware`` (idempotent).

    Returns:
        Whether the replacement is in place.
    """
    global _bentoml_call
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    if TimeoutMiddleware.__call__ is _timeout_call:
        return True
    if not callable(getattr(TimeoutMiddleware, "_set_timer_out", None)):
        logger.warning("lipcert: BentoML's TimeoutMiddleware has changed; its timers are "
                       "left as they are")
        return False
    _bentoml_call = TimeoutMiddleware.__call__
    TimeoutMiddleware.__call__ = _timeout_call  # type: ignore[method-assign]
    return True


def dispatch_without_learned_wait() -> bool:
    """Install :func:`_refresh_without_wait` on BentoML's batching ``Optimizer`` (idempotent).

    Returns:
        Whether the replacement is in place.
    """
    global _bentoml_refresh
    from bentoml._internal.marshal.dispatcher import Optimizer

    if Optimizer.trigger_refresh is _refresh_without_wait:
        return True
    if not callable(getattr(Optimizer, "trigger_refresh", None)) or not hasattr(
            Optimizer(1.0), "wait"):
        logger.warning("lipcert: BentoML's batching Optimizer has changed; its wait is left "
                       "as it is")
        return False
    _bentoml_refresh = Optimizer.trigger_refresh
    Optimizer.trigger_refresh = _refresh_without_wait  # type: ignore[method-assign]
    return True


def prepare_serving_worker(worker_index: int | None) -> None:
    """Keep pauses off a serving worker's event loop (once per worker, at startup).

    The 1 % tail at 32 clients (docs/service.md, "Scaling with clients") was the worker's event
    loop stopping, so every request it held, for full (generation-2) garbage collections of
    0.1–0.5 s every few seconds under load. Their heap was BentoML's request-timeout timers, each
    keeping its request's objects for 60 s (:func:`release_timeout_timers`), and the ~0.4 M
    objects a worker loads (torch, ONNX, the re-audit) and keeps for life, collected once here
    and then frozen out of the collector's sight (``gc.freeze``; only in a ``bentoml serve``
    worker, ``worker_index`` not None, whose process this is: in process, ``to_asgi()`` in a
    test, the objects are someone else's). The batcher dispatches without its learned wait
    (:func:`dispatch_without_learned_wait`).
    """
    release_timeout_timers()
    dispatch_without_learned_wait()
    if worker_index is not None:
        gc.collect()
        gc.freeze()
        logger.debug("lipcert: worker %d: %d objects frozen out of the garbage collector",
                     worker_index, gc.get_freeze_count())

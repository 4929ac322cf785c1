"""BentoML's per-request timeout, without the timer it leaves behind.

BentoML 1.4.39's ``TimeoutMiddleware`` (``traffic.timeout``, 60 s here) schedules, for every
request, ``loop.call_later(timeout, ...)`` and never cancels it. Each such timer keeps a copy of
the request's ``contextvars`` context (its OpenTelemetry span with its attribute lists and locks,
the future it would fail) alive for the whole timeout: at ~1,000 requests/s a worker carried
~60,000 requests' worth of objects, so each full garbage collection walked them, a pause of
the worker's event loop (and of every request it held) that grew to 0.2–0.5 s under load and
made the 1 % tail at 32 clients (docs/service.md, "Scaling with clients").

:func:`release_timeout_timers` gives the middleware a ``__call__`` with the same contract (504
when nothing was sent within the timeout, else wait for the app) whose timer is cancelled as
soon as the answer starts and carries an empty context.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any

logger = logging.getLogger(__name__)

#: BentoML's own ``TimeoutMiddleware.__call__``, kept when replaced (the tests compare them).
_bentoml_call: Any = None


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


def release_timeout_timers() -> bool:
    """Install :func:`_timeout_call` on BentoML's ``TimeoutMiddleware`` (idempotent).

    Only where the middleware has the shape this replaces (a ``_set_timer_out`` callback);
    another BentoML version is left as it is.

    Returns:
        Whether the replacement is in place.
    """
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    if TimeoutMiddleware.__call__ is _timeout_call:
        return True
    if not callable(getattr(TimeoutMiddleware, "_set_timer_out", None)):
        logger.warning("lipcert: BentoML's TimeoutMiddleware has changed; its timers are "
                       "left as they are")
        return False
    global _bentoml_call
    _bentoml_call = TimeoutMiddleware.__call__
    TimeoutMiddleware.__call__ = _timeout_call  # type: ignore[method-assign]
    return True

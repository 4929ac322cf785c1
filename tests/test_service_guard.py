"""Malformed request bodies get a one-line 4xx JSON error on every API route, never a 5xx.

In process, through ``LipCert.to_asgi()`` (BentoML's own parsing layer included) with an empty
``LIPCERT_MODELS`` folder: every case here must be rejected before a handler runs, so no model is
needed (a request that reached a handler would get 503, and fail the test). The first five cases
are the 500s that fuzzing found (issue 18); the rest cover each check of
``service.middleware.FormGuardMiddleware``. The body budget and the parsers' streaming are tested
on their own below; slow clients and large uploads against a real server in
``tests/test_service_faults.py``.
"""

from __future__ import annotations

import asyncio
import json

import pytest

ROUTES = ["/predict", "/predict_tensor", "/certify", "/models"]
FILE_ROUTES = ["/predict", "/certify"]
MB = 2**20


def _multipart(*parts: bytes, boundary: bytes = b"X", close: bool = True) -> bytes:
    body = b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts)
    return body + (b"--" + boundary + b"--\r\n" if close else b"")


def _field(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'Content-Disposition: form-data; name="{name}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    return disposition.encode() + b"\r\n\r\n" + value


MP = "multipart/form-data; boundary=X"

# (id, content type, body, status; None: any 4xx; a dict: route → status, else 415)
MALFORMED = [
    # four of the five 500s of the issue (the fifth, a text 'image', is below)
    ("no-boundary-json-body", "multipart/form-data", b"{}", 400),
    ("no-boundary-no-body", "multipart/form-data", b"", 400),
    ("part-without-headers", MP, _multipart(b"\r\n[]"), 400),
    ("no-boundary-tensor-body", "multipart/form-data", b'{"images": [], "model": ""}', 400),
    # content type and charset
    ("empty-boundary", "multipart/form-data; boundary=", b"--\r\n", 400),
    ("boundary-over-70", "multipart/form-data; boundary=" + "b" * 71, b"", 400),
    ("text-plain", "text/plain", b"{}", 415),
    # binary tensor types: 415 except on /predict_tensor, which reads them (two bytes are no
    # whole float32: 422; a body that is no .npy file: 400)
    ("octet-stream", "application/octet-stream", b"\x00\x01", {"/predict_tensor": 422}),
    ("npy-garbage", "application/x-npy", b"\x93NUMPY", {"/predict_tensor": 400}),
    ("pickle", "application/vnd.bentoml+pickle", b"\x80\x05N.", 415),
    ("garbage-content-type", "foo/bar;;;=", b"{}", 415),
    ("utf7-form", MP + "; charset=utf-7", _multipart(_field("model", b"+AFs-")), 415),
    ("unknown-charset", MP + "; charset=klingon", _multipart(_field("model", b"a")), 415),
    # multipart framing
    ("json-body-under-boundary", MP, b'{"images": []}', 400),
    ("preamble-only", MP, b"hello", 400),
    ("unterminated", MP, _multipart(_field("model", b"aol"), close=False), 400),
    ("truncated-in-headers", MP, b"--X\r\nContent-Disposition: form-da", 400),
    ("bad-header-line", MP, _multipart(b"no colon here\r\n\r\nx"), 400),
    ("part-without-name", MP, _multipart(b"Content-Disposition: form-data\r\n\r\nx"), 400),
    ("name-only-in-extended-syntax", MP,
     _multipart(b"Content-Disposition: form-data; name*=utf-8''model\r\n\r\nx"), 400),
    ("part-headers-too-long", MP,
     _multipart(b"X-Pad: " + b"a" * 20000 + b"\r\n" + _field("model", b"a")), 400),
    ("too-many-fields", MP, _multipart(*[_field(f"f{i}", b"1") for i in range(1001)]), 400),
    # fields
    ("file-part-for-text-field", MP, _multipart(_field("model", b"\xff\x00", "m.bin")), 400),
    ("deep-json-field", MP, _multipart(_field("images", b"[" * 5000)), 400),
    ("deep-json-field-33", MP, _multipart(_field("models", b"[" * 33 + b"]" * 33)), 400),
    ("text-field-over-1mib", MP, _multipart(_field("model", b"a" * (MB + 1))), 413),
    ("urlencoded-deep-json", "application/x-www-form-urlencoded", b"model=" + b"%5B" * 100,
     400),
    ("urlencoded-field-over-1mib", "application/x-www-form-urlencoded", b"model=" + b"a" * MB,
     413),
    # JSON bodies (pydantic answers these; kept here so no route regresses)
    ("json-invalid-utf8", "application/json", b'{"images": "\xff\xfe"}', None),
    ("json-deep", "application/json", b"[" * 5000, 400),
    ("json-truncated", "application/json", b'{"images": [[', 400),
    ("json-array", "application/json", b"[1, 2]", 400),
]

FILE_ROUTE_MALFORMED = [
    ("issue-text-in-file-field", MP, _multipart(_field("eps", b"0"), _field("image", b"{}")),
     400),
    ("text-in-file-field", MP, _multipart(_field("image", b"http://127.0.0.1:1/x.png")), 400),
    ("urlencoded-file-field", "application/x-www-form-urlencoded",
     b"image=http%3A%2F%2F127.0.0.1%3A1%2Fx.png", 400),
    ("json-path-in-file-field", "application/json", b'{"image": "/etc/passwd"}', 400),
]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    from starlette.testclient import TestClient

    from service.service import LipCert

    empty = tmp_path_factory.mktemp("no-models")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIPCERT_MODELS", str(empty))
        with TestClient(LipCert.to_asgi(), raise_server_exceptions=False) as c:
            yield c


def _assert_one_line_4xx(r, status: int | None) -> None:
    if status is None:
        assert 400 <= r.status_code < 500, r.text
    else:
        assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and body["error"] and "\n" not in body["error"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("content_type", "body", "status"), [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed_body_is_a_one_line_4xx(client, route: str, content_type: str, body: bytes,
                                          status: int | dict[str, int] | None) -> None:
    if isinstance(status, dict):
        status = status.get(route, 415)
    r = client.post(route, content=body, headers={"content-type": content_type})
    _assert_one_line_4xx(r, status)


@pytest.mark.parametrize("route", FILE_ROUTES)
@pytest.mark.parametrize(("content_type", "body", "status"),
                         [m[1:] for m in FILE_ROUTE_MALFORMED],
                         ids=[m[0] for m in FILE_ROUTE_MALFORMED])
def test_file_fields_take_only_uploads(client, route: str, content_type: str, body: bytes,
                                       status: int) -> None:
    """A text value in a file field would be fetched as a URL by BentoML: refused instead."""
    r = client.post(route, content=body, headers={"content-type": content_type})
    _assert_one_line_4xx(r, status)



@pytest.mark.parametrize("route", ROUTES)
def test_compressed_bodies_are_refused(client, route: str) -> None:
    import gzip

    r = client.post(route, content=gzip.compress(b'{"images": [[[[0.5]]]]}'),
                    headers={"content-type": "application/json", "content-encoding": "gzip"})
    _assert_one_line_4xx(r, 415)
    assert "content encoding 'gzip'" in r.json()["error"]

def test_streamed_chunks_are_checked_as_one_body(client) -> None:
    """A malformed part split over many small chunks is still found (chunked upload)."""
    body = _multipart(_field("eps", b"0"), _field("image", b"{}"))

    def chunks():
        for i in range(0, len(body), 7):
            yield body[i:i + 7]

    r = client.post("/certify", content=chunks(), headers={"content-type": MP})
    _assert_one_line_4xx(r, 400)
    assert "'image' must be a file part" in r.json()["error"]


def test_well_formed_requests_pass_the_guard(client) -> None:
    """What the guard lets through reaches the handler (here: 503, no model is served)."""
    png = b"\x89PNG\r\n\x1a\n" + bytes(64)
    good = [
        ("/predict", {"files": {"image": ("d.png", png, "image/png")}}),
        ("/predict", {"files": {"image": ("d.png", png, "image/png")}, "data": {"model": "aol"}}),
        ("/certify", {"files": [("image", ("a.png", png, "image/png")),
                                ("image", ("b.png", png, "image/png"))],
                      "data": {"eps": "0.1", "models": json.dumps(["aol"])}}),
        ("/certify", {"data": {"eps": "0.1", "images": json.dumps([[[[0.5]]]])}}),
        ("/predict_tensor", {"json": {"images": [[[[0.5]]]]}}),
        ("/certify", {"json": {"eps": 0.1, "images": [[[[0.5]]]]}}),
    ]
    for route, kwargs in good:
        r = client.post(route, **kwargs)
        assert r.status_code == 503, (route, r.text)
    assert client.post("/models").status_code == 200  # lists no model, and no refusal



def test_openapi_document_lists_every_error_status(client) -> None:
    spec = client.get("/docs.json").json()
    error = spec["components"]["schemas"]["LipcertError"]
    assert error["required"] == ["error"]
    for route in ROUTES:
        responses = spec["paths"][route]["post"]["responses"]
        assert {"200", "400", "404", "408", "413", "415", "422", "429", "500", "503"} <= set(
            responses), route
        assert responses["413"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/LipcertError"}
    assert set(spec["paths"]["/readyz"]["get"]["responses"]) == {"200"}  # not an API route

# ----------------------------------------------------------------------------- the parts


@pytest.mark.parametrize("step", [1, 2, 3, 5, 64])
def test_multipart_check_accepts_any_chunking(step: int) -> None:
    from service.middleware import FormGuardMiddleware

    body = _multipart(_field("eps", b"0.25"), _field("images", b"[[[[0.5, 0.25]]]]"),
                      _field("image", b"\x89PNG\r\n--X-not-a-boundary", "d.png"),
                      boundary=b"----lipcert")
    guard = FormGuardMiddleware(None, {"/certify": ["image"]})  # type: ignore[arg-type]
    check = guard._checker("multipart/form-data; boundary=----lipcert", ["image"])
    for i in range(0, len(body), step):
        check.feed(body[i:i + step])
    check.finish()
    assert (check.files, check.fields) == (1, 2)


@pytest.mark.parametrize(("text", "deepest"), [
    ("[[[[0.5]]]]", 4), ('{"a": "[[[[[[", "b": [1]}', 2), ('"\\"[[["', 0), ("]]]][", 1),
    ('["\\\\", [[]]]', 3),
])
def test_json_depth_skips_strings(text: str, deepest: int) -> None:
    from service.middleware import JSONDepth

    whole = JSONDepth().feed(text)
    pieces = JSONDepth()
    for ch in text:  # one character at a time: string and escape state carry over
        pieces.feed(ch)
    assert whole == pieces.deepest == deepest



def _reference_depth(text: str) -> int:
    """JSON nesting depth, one character at a time, clamped at 0 (the obvious way)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(0, depth - 1)
    return deepest


def test_json_depth_equals_the_reference_under_any_chunking() -> None:
    """The numpy fast path and the character loop agree with the reference, chunk by chunk."""
    import random

    from service.middleware import JSONDepth

    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice('[]{}"\\ab') for _ in range(rng.randint(0, 40)))
        chunked, start = JSONDepth(), 0
        while start < len(text):
            step = rng.randint(1, 6)
            chunked.feed(text[start:start + step])
            start += step
        assert JSONDepth().feed(text) == chunked.deepest == _reference_depth(text), text

def _asgi_request(app, body: bytes, chunk_delay_s: float = 0.0, chunks: int = 1,
                  length: bool = True):
    """Run one request through ``app``; returns (status, body). The body arrives in ``chunks``
    (with a Content-Length header unless ``length`` is False)."""
    sent: list[dict] = []
    size = len(body)
    pieces = [body[i * size // chunks:(i + 1) * size // chunks] for i in range(chunks)]

    async def receive():
        if pieces:
            await asyncio.sleep(chunk_delay_s)
            piece = pieces.pop(0)
            return {"type": "http.request", "body": piece, "more_body": bool(pieces)}
        await asyncio.Event().wait()  # a client that stays connected

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": "/predict", "method": "POST",
             "headers": [(b"content-length", str(size).encode())] if length else []}

    async def run():
        await app(scope, receive, send)
        status = sent[0]["status"]
        return status, b"".join(m.get("body", b"") for m in sent[1:])

    return run()


def test_body_budget_waits_then_answers_429() -> None:
    """A request that does not fit the worker's byte budget waits for room, else 429."""
    from service.middleware import BodyBudgetMiddleware

    release = asyncio.Event()

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await release.wait()  # hold the budget like a long request
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def scenario():
        budget = BodyBudgetMiddleware(app, routes=["/predict"], budget_bytes=1000,
                                      body_timeout_s=0.3, small_bytes=100)
        first = asyncio.create_task(_asgi_request(budget, b"a" * 700))
        await asyncio.sleep(0.05)
        assert budget.in_use == 700
        status, body = await _asgi_request(budget, b"b" * 700)  # waits 0.3 s, then 429
        assert status == 429 and b"busy" in body
        small = asyncio.create_task(_asgi_request(budget, b"c" * 200))  # fits: not blocked
        await asyncio.sleep(0.05)
        assert budget.in_use == 900
        waiting = asyncio.create_task(_asgi_request(budget, b"d" * 700))
        tiny = asyncio.create_task(_asgi_request(budget, b"e" * 100))  # not counted at all
        chunked = asyncio.create_task(_asgi_request(budget, b"f" * 700, chunks=7, length=False))
        await asyncio.sleep(0.05)
        # tiny took nothing; chunked: its first 100 bytes free, 100 more fitted, it waits
        assert budget.in_use == 1000
        release.set()  # the first ones finish, the waiting ones get their room
        assert [await first, await small, await waiting, await tiny, await chunked] == [
            (200, b"ok")] * 5
        assert budget.in_use == 0

    asyncio.run(scenario())



def test_a_cancelled_request_gives_its_budget_back() -> None:
    """BentoML cancels a request at its 60 s timeout, and a client may go away."""
    from service.middleware import BodyBudgetMiddleware

    async def app(scope, receive, send):
        await receive()
        await asyncio.Event().wait()  # never answers

    async def scenario():
        budget = BodyBudgetMiddleware(app, routes=["/predict"], budget_bytes=1000,
                                      body_timeout_s=5, small_bytes=0)
        held = asyncio.create_task(_asgi_request(budget, b"a" * 800))
        waiting = asyncio.create_task(_asgi_request(budget, b"b" * 800))
        await asyncio.sleep(0.05)
        assert budget.in_use == 800
        held.cancel()
        await asyncio.sleep(0.05)
        assert budget.in_use == 800  # the waiting request got the room
        waiting.cancel()
        await asyncio.sleep(0.05)
        assert budget.in_use == 0

    asyncio.run(scenario())

def test_body_deadline_raises_request_timeout() -> None:
    from service.errors import RequestTimeout
    from service.middleware import BodyBudgetMiddleware

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass

    async def scenario():
        budget = BodyBudgetMiddleware(app, routes=["/predict"], budget_bytes=10**6,
                                      body_timeout_s=0.2)
        with pytest.raises(RequestTimeout, match="did not arrive within 0.2 s"):
            await _asgi_request(budget, b"x" * 100, chunk_delay_s=0.1, chunks=5)
        assert budget.in_use == 0

    asyncio.run(scenario())


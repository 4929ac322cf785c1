"""service.loadtest: the load generator's requests are well formed and its counts add up."""

from __future__ import annotations

import io
import json
from email.parser import BytesParser
from email.policy import default

import numpy as np
import pytest
from PIL import Image

from service.loadtest import (
    KeepAliveClient,
    LoadRequest,
    _check_answer,
    percentiles,
    raw_request,
    run,
)
from tests.http_stand_in import JSONHandler, serving


class _StandIn(JSONHandler):
    """Answers /models, /predict (checks the multipart PNG upload) and /predict_tensor; with
    ``npy`` its OpenAPI document offers .npy bodies, and it reads them."""

    npy = False

    def do_GET(self):
        if self.path == "/docs.json" and self.npy:
            content = {"application/json": {}, "application/x-npy": {}}
            self.send_json(200, {"paths": {"/predict_tensor": {"post": {
                "requestBody": {"content": content}}}}})
        else:
            self.send_json(404, dict(error="no route"))

    def do_POST(self):
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/models":
            models = [dict(name="m", input_shape=[1, 8, 8])]
            self.send_json(200, dict(default_model="m", models=models))
        elif self.path == "/predict_tensor":
            body = json.loads(raw)
            ok = body.get("model") == "m" and len(body["images"][0][0]) == 8
            answer = [dict(label=0, inference_ms=0.2)] * len(body["images"])
            self.send_json(200 if ok else 400, answer)
        elif self.path == "/predict_tensor?model=m" and self.npy:
            images = np.load(io.BytesIO(raw))
            ok = (self.headers["Content-Type"] == "application/x-npy"
                  and images.dtype == np.float32 and images.shape[1:] == (1, 8, 8))
            self.send_json(200 if ok else 400,
                           [dict(label=0, inference_ms=0.1)] * len(images))
        elif self.path == "/predict":
            head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
            msg = BytesParser(policy=default).parsebytes(head + raw)
            parts = {p.get_param("name", header="content-disposition"): p
                     for p in msg.iter_parts()}
            image = Image.open(io.BytesIO(parts["image"].get_content()))
            ok = image.size == (8, 8) and parts["model"].get_content().strip() == "m"
            self.send_json(200 if ok else 400, dict(label=1, inference_ms=0.3))
        else:
            self.send_json(404, dict(error="no route"))


@pytest.fixture()
def stand_in():
    with serving(_StandIn) as url:
        yield url


def test_command_line_measurements_count_every_request(stand_in):
    result = run(stand_in, requests=12, clients=3, seconds=20, model=None)
    assert result["model"] == "m" and result["input_shape"] == [1, 8, 8]
    png = result["predict_batch1"]
    assert png["ok"] == png["requests"] == 12 and png["errors"] == 0
    assert png["server_inference_p50_ms"] == 0.3
    assert [lev["concurrency"] for lev in result["predict_tensor"]] == [1, 3]
    for lev in result["predict_tensor"]:
        assert lev["ok"] == 12 and lev["errors"] == 0
        assert 0 < lev["p50_ms"] <= lev["p95_ms"] <= lev["p99_ms"]


def test_percentiles_name_each_quantile_and_are_none_when_empty():
    assert percentiles([1.0, 2.0, 3.0], (50,)) == {"p50_ms": 2.0}
    assert percentiles([], (50, 95)) == {"p50_ms": None, "p95_ms": None}


def test_npy_bodies_where_the_service_offers_them():
    handler = type("NpyStandIn", (_StandIn,), {"npy": True})
    with serving(handler) as url:
        result = run(url, requests=6, clients=2, seconds=20, model=None)
    assert result["form"] == "npy"
    for lev in result["predict_tensor"]:
        assert lev["ok"] == 6 and lev["errors"] == 0 and lev["server_inference_p50_ms"] == 0.1


def test_light_answer_check_agrees_with_the_full_parse():
    request = LoadRequest("/predict_tensor", b"", images=2)
    good = json.dumps([dict(label=1, inference_ms=0.25), dict(label=2, inference_ms=0.25)])
    compact = good.replace(" ", "").encode()
    for body in (good.encode(), compact):
        assert _check_answer(body, request) == {"inference_ms": 0.25}
    for bad in (compact[:-1], compact.replace(b'"label":2,', b""), b'{"error": "x"}'):
        assert _check_answer(bad, request) is None


class _Chunked(JSONHandler):
    """HTTP/1.1 keep-alive answers: chunked for /chunked, Content-Length otherwise."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in (raw[:3], raw[3:], b""):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        else:
            self.send_json(201, {"echo": raw.decode()})


def test_keep_alive_client_reads_chunked_and_sized_answers_on_one_connection():
    with serving(_Chunked) as url:
        host, port = url.removeprefix("http://").split(":")
        client = KeepAliveClient(host, int(port), timeout=10)
        try:
            for _ in range(3):
                chunked = raw_request(host, int(port), LoadRequest("/chunked", b"hello world"))
                assert client.send(chunked) == (200, b"hello world")
                sized = raw_request(host, int(port), LoadRequest("/sized", b"abc"))
                assert client.send(sized) == (201, b'{"echo": "abc"}')
            first = client.sock
            assert first is not None and client.send(sized)[0] == 201 and client.sock is first
        finally:
            client.close()

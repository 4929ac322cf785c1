"""Binary tensor bodies on ``/predict_tensor``: ``.npy`` files and raw float32/uint8 bytes.

The parsing functions in process (``service.tensors``), then a real ``bentoml serve`` of the
harness' digits model: every binary form answers what the JSON form answers for the same values
(labels and radii bit for bit, and the radii of ``certify.certified_radius`` on ONNX Runtime's
logits), requests of both forms batched together keep their own answers, and each malformed
binary body is a one-line 4xx naming the value and what is allowed, with the server answering
on afterwards. Nothing here is timed.
"""

from __future__ import annotations

import concurrent.futures
import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from service_harness import Server, digits, digits_model

from service.errors import InvalidArgument, UnprocessableEntity
from service.tensors import DTYPES, RawBody, npy_array, tensor_batch

NPY = {"content-type": "application/x-npy"}
RAW = {"content-type": "application/octet-stream"}
SHAPE = (1, 8, 8)


def _npy(array: np.ndarray, **save: object) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, **save)
    return buf.getvalue()


def _npy_v2(array: np.ndarray) -> bytes:
    from numpy.lib import format as npy

    buf = io.BytesIO()
    npy.write_array(buf, array, version=(2, 0))
    return buf.getvalue()


# ----------------------------------------------------------------------------- in process


@pytest.mark.parametrize("encode", [_npy, _npy_v2, lambda a: _npy(np.asfortranarray(a))],
                         ids=["v1", "v2", "fortran"])
def test_npy_array_reads_what_numpy_wrote(encode) -> None:
    x = np.random.default_rng(0).random((3, *SHAPE), dtype=np.float32)
    got = npy_array(encode(x))
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, x)


def test_float32_bodies_are_views_of_the_request() -> None:
    """No copy: the batch is the body's own memory (read-only), as ONNX Runtime reads it."""
    x = np.random.default_rng(1).random((2, *SHAPE), dtype=np.float32)
    body = x.tobytes()
    for images in (npy_array(_npy(x)), RawBody(body, DTYPES["float32"])):
        batch = tensor_batch(images, SHAPE, 64)
        assert not batch.flags.writeable and batch.base is not None
        np.testing.assert_array_equal(batch, x)


def test_uint8_is_divided_by_255() -> None:
    u = np.arange(64, dtype=np.uint8).reshape(1, *SHAPE) * 4
    want = u.astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(tensor_batch(npy_array(_npy(u)), SHAPE, 64), want)
    np.testing.assert_array_equal(
        tensor_batch(RawBody(u.tobytes(), DTYPES["uint8"]), SHAPE, 64), want)


@pytest.mark.parametrize(("body", "error", "words"), [
    (b"", InvalidArgument, ["not a valid .npy"]),
    (b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'", InvalidArgument, ["not a valid .npy"]),
    (_npy(np.zeros((1, *SHAPE), np.float32))[:-1], InvalidArgument, ["header declares", "255"]),
    (_npy(np.zeros((1, *SHAPE), np.float64)), UnprocessableEntity, ["'<f8'", "float32", "uint8"]),
    (_npy(np.zeros((1, *SHAPE), ">f4")), UnprocessableEntity, ["'>f4'", "little-endian"]),
    (_npy(np.array([{"a": 1}], dtype=object), allow_pickle=True), UnprocessableEntity, ["'|O'"]),
], ids=["empty", "cut-header", "short-data", "float64", "big-endian", "pickled-object"])
def test_npy_errors_name_the_value_and_what_is_allowed(body, error, words) -> None:
    with pytest.raises(error) as info:
        npy_array(body)
    assert all(w in str(info.value) for w in words), str(info.value)


@pytest.mark.parametrize(("images", "words"), [
    (np.zeros(SHAPE, np.float32), ["4 dimensions", "[1, 8, 8]"]),
    (np.zeros((1, 1, 8, 9), np.float32), ["[1, 8, 8]", "[1, 8, 9]"]),
    (np.zeros((65, *SHAPE), np.float32), ["at most 64", "65"]),
    (np.full((1, *SHAPE), 1.5, np.float32), ["[0, 1]", "1.5"]),
    (np.full((1, *SHAPE), np.nan, np.float32), ["NaN"]),
    (RawBody(bytes(100), DTYPES["float32"]), ["100 bytes", "256 bytes each"]),
], ids=["rank", "shape", "too-many", "range", "nan", "raw-length"])
def test_batch_errors_name_the_value_and_what_is_allowed(images, words) -> None:
    with pytest.raises(UnprocessableEntity) as info:
        tensor_batch(images, SHAPE, 64)
    assert all(w in str(info.value) for w in words), str(info.value)


# ----------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("binary")
    (root / "models").mkdir()
    shutil.copyfile(digits_model(), root / "models" / "aol-digits.onnx")
    with Server(root / "models", root / "home") as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[object]:
    import httpx

    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def _expected(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and radii computed here, independently of the service."""
    from certify import certified_radius
    from certify.artifact import certificate_kwargs, open_session, read_metadata

    path = digits_model()
    logits = open_session(path, ["CPUExecutionProvider"], 1).run(None, {"image": x})[0]
    return logits.argmax(1), certified_radius(logits, **certificate_kwargs(read_metadata(path)))


def _answers(r) -> tuple[list[int], list[float]]:
    assert r.status_code == 200, r.text
    items = r.json()
    return [p["label"] for p in items], [p["certified_radius"] for p in items]


@pytest.mark.e2e
def test_binary_forms_answer_as_json_does(http) -> None:
    x = digits()[0][1500:1564]  # 64 images: one request is a whole batch (run without a copy)
    labels, radii = _expected(x)
    json_answer = _answers(http.post("/predict_tensor", json={"images": x.tolist()}))
    assert json_answer[0] == labels.tolist()
    np.testing.assert_allclose(json_answer[1], radii, rtol=1e-12)
    for kwargs in (
        dict(content=_npy(x), headers=NPY),
        dict(content=_npy(np.asfortranarray(x)), headers=NPY),
        dict(content=x.tobytes(), headers=RAW),
        dict(content=x.tobytes(), headers=RAW, params={"dtype": "float32", "model": "aol"}),
    ):
        assert _answers(http.post("/predict_tensor", **kwargs)) == json_answer


@pytest.mark.e2e
def test_uint8_bodies_answer_as_json_of_the_scaled_values(http) -> None:
    u = np.round(digits()[0][1600:1605] * 255).astype(np.uint8)
    scaled = u.astype(np.float32) / np.float32(255)
    want = _answers(http.post("/predict_tensor", json={"images": scaled.tolist()}))
    np.testing.assert_allclose(want[1], _expected(scaled)[1], rtol=1e-12)
    assert _answers(http.post("/predict_tensor", content=_npy(u), headers=NPY)) == want
    assert _answers(http.post("/predict_tensor", content=u.tobytes(), headers=RAW,
                              params={"dtype": "uint8"})) == want


@pytest.mark.e2e
def test_concurrent_binary_and_json_requests_keep_their_own_answers(http) -> None:
    x = digits()[0]
    requests = [(x[1500 + 3 * i: 1503 + 3 * i], i % 3) for i in range(24)]

    def call(req):
        images, form = req
        if form == 0:
            return http.post("/predict_tensor", json={"images": images.tolist()})
        if form == 1:
            return http.post("/predict_tensor", content=_npy(images), headers=NPY)
        return http.post("/predict_tensor", content=images.tobytes(), headers=RAW)

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(call, requests))
    for (images, _), r in zip(requests, answers, strict=True):
        labels, radii = _answers(r)
        want_labels, want_radii = _expected(images)
        assert labels == want_labels.tolist()
        np.testing.assert_allclose(radii, want_radii, rtol=1e-12)


BAD_BINARY = [
    # (id, query params, content type, body, status, words in the message)
    ("npy-float64", {}, NPY, _npy(np.zeros((1, *SHAPE))), 422, ["'<f8'", "float32", "uint8"]),
    ("npy-object", {}, NPY, _npy(np.array([None], dtype=object), allow_pickle=True), 422,
     ["'|O'"]),
    ("npy-garbage", {}, NPY, b"PK\x03\x04 not a numpy file", 400, ["not a valid .npy"]),
    ("npy-truncated", {}, NPY, _npy(np.zeros((2, *SHAPE), np.float32))[:-3], 400,
     ["header declares", "[2, 1, 8, 8]"]),
    ("npy-rank", {}, NPY, _npy(np.zeros(SHAPE, np.float32)), 422, ["4 dimensions"]),
    ("npy-shape", {}, NPY, _npy(np.zeros((1, 3, 8, 8), np.float32)), 422, ["[1, 8, 8]"]),
    ("npy-too-many", {}, NPY, _npy(np.zeros((65, *SHAPE), np.float32)), 422, ["at most 64"]),
    ("npy-range", {}, NPY, _npy(np.full((1, *SHAPE), -0.5, np.float32)), 422, ["[0, 1]"]),
    ("npy-inf", {}, NPY, _npy(np.full((1, *SHAPE), np.inf, np.float32)), 422, ["NaN or Inf"]),
    ("npy-dtype-param", {"dtype": "uint8"}, NPY, _npy(np.zeros((1, *SHAPE), np.float32)), 400,
     ["'dtype'", "allowed", "model"]),
    ("raw-empty", {}, RAW, b"", 400, ["empty"]),
    ("raw-odd-bytes", {}, RAW, b"\x00" * 6, 422, ["6 bytes", "float32"]),
    ("raw-partial-image", {}, RAW, bytes(4 * 65), 422, ["260 bytes", "256 bytes each"]),
    ("raw-too-many", {"dtype": "uint8"}, RAW, bytes(64 * 65), 422, ["at most 64", "65"]),
    ("raw-nan", {}, RAW, np.full((1, *SHAPE), np.nan, np.float32).tobytes(), 422, ["NaN"]),
    ("raw-bad-dtype", {"dtype": "float16"}, RAW, bytes(128), 400, ["'float16'", "uint8"]),
    ("raw-unknown-param", {"batch": "1"}, RAW, bytes(256), 400, ["'batch'", "dtype, model"]),
    ("raw-unknown-model", {"model": "soc"}, RAW, bytes(256), 404, ["'soc'", "aol-digits"]),
    ("json-model-twice", {"model": "aol"}, {"content-type": "application/json"},
     b'{"images": [[[[0.5]]]], "model": "aol-digits"}', 400, ["'aol-digits'", "'aol'"]),
]


@pytest.mark.e2e
def test_bad_binary_bodies_are_one_line_4xx_naming_the_value(http) -> None:
    for name, params, headers, body, status, words in BAD_BINARY:
        r = http.post("/predict_tensor", content=body, headers=headers, params=params)
        assert r.status_code == status, (name, r.text)
        message = r.json()["error"]
        assert "\n" not in message and all(w in message for w in words), (name, message)
    x = digits()[0][1600:1601]
    assert _answers(http.post("/predict_tensor", content=_npy(x), headers=NPY))[0] == \
        _expected(x)[0].tolist()  # still serving


@pytest.mark.e2e
def test_binary_bodies_only_on_predict_tensor_and_documented(http) -> None:
    for route in ("/predict", "/certify", "/models"):
        r = http.post(route, content=_npy(np.zeros((1, *SHAPE), np.float32)), headers=NPY)
        assert r.status_code == 415, (route, r.text)
    spec = http.get("/docs.json").json()
    operation = spec["paths"]["/predict_tensor"]["post"]
    assert {"application/json", "application/x-npy", "application/octet-stream"} <= set(
        operation["requestBody"]["content"])
    params = {p["name"]: p for p in operation["parameters"]}
    assert params["dtype"]["schema"]["enum"] == ["float32", "uint8"]
    assert params["model"]["in"] == "query"


def test_no_binary_path_bypasses_the_audit(tmp_path: Path) -> None:
    """A binary request reaches only models that passed the load (re-audit): with none served,
    a well-formed body is answered 503, never with a prediction."""
    from starlette.testclient import TestClient

    from service.service import LipCert

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIPCERT_MODELS", str(tmp_path))
        with TestClient(LipCert.to_asgi(), raise_server_exceptions=False) as client:
            for headers, body in ((NPY, _npy(np.zeros((1, *SHAPE), np.float32))),
                                  (RAW, bytes(256))):
                r = client.post("/predict_tensor", content=body, headers=headers)
                assert r.status_code == 503 and set(r.json()) == {"error"}, r.text

"""The BentoML service: in-process through ``to_asgi()`` and end to end against ``bentoml serve``.

One small AOL model is trained for a moment on scikit-learn's digits (so predictions and radii
are meaningful), exported with ``models.export.to_onnx`` and served from a temporary
``LIPCERT_MODELS`` folder, next to a Standard model (audited bound far above 1: refused) and a
copy of the AOL file with one weight changed (hash mismatch: refused).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from service_harness import train_digits

REPO = Path(__file__).resolve().parents[1]
AOL = "aol-digits"
TWIN = "aol-copy"
LIMITS = {
    "LIPCERT_MAX_UPLOAD_BYTES": "200000",
    "LIPCERT_MAX_REQUEST_BYTES": "1000000",
    "LIPCERT_MAX_PIXELS": str(2**20),
    "LIPCERT_ORT_THREADS": "1",
    "LIPCERT_PROFILE_RUNS": "3",
    "LIPCERT_PROVIDERS": "CPUExecutionProvider",
}


# ----------------------------------------------------------------------------- fixtures


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import models
    from certify import certified_accuracy
    from certify.artifact import certificate_kwargs, to_onnx, verify

    root = tmp_path_factory.mktemp("lipcert-models")
    x, y = _digits()
    torch.manual_seed(0)
    aol = models.create_model("aol", "xxs", 1, 10, 8)
    train_digits(aol, x[:1500], y[:1500])
    run = root / AOL
    path = to_onnx(aol, run / "model.onnx", input_shape=(1, 8, 8),
                   metadata={"dataset": "digits", "classes": [f"digit {i}" for i in range(10)]})
    meta = verify(path)
    logits = _ort_logits(path, x[1500:])
    acc = certified_accuracy(logits, y[1500:], (36 / 255,), **certificate_kwargs(meta))
    report = {"clean_accuracy": acc["clean"], "certified_accuracy": acc, "parameters": 123}
    (run / "report.json").write_text(json.dumps(report))
    shutil.copyfile(path, root / f"{TWIN}.onnx")  # served too, without a report

    torch.manual_seed(0)
    to_onnx(models.create_model("standard", "xxs", 1, 10, 8), root / "standard.onnx",
            input_shape=(1, 8, 8), metadata={"dataset": "digits"})

    tampered = onnx.load(str(path))
    init = max(tampered.graph.initializer, key=lambda t: len(t.raw_data))
    raw = bytearray(init.raw_data)
    raw[0] ^= 0x40
    init.raw_data = bytes(raw)
    onnx.save(tampered, str(root / "tampered.onnx"))
    return root


@pytest.fixture(scope="module")
def client(model_dir: Path):
    from starlette.testclient import TestClient

    from service.service import LipCert

    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**LIMITS, "LIPCERT_MODELS": str(model_dir)}.items():
            mp.setenv(key, value)
        with TestClient(LipCert.to_asgi()) as c:
            yield c


def _ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x.astype(np.float32)})[0]


def _expected(model_dir: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits and radii computed here, independently of the service."""
    from certify import certified_radius
    from certify.artifact import certificate_kwargs, read_metadata

    path = model_dir / AOL / "model.onnx"
    logits = _ort_logits(path, x)
    return logits, certified_radius(logits, **certificate_kwargs(read_metadata(path)))


def _png(pixels: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _digit_uint8(index: int = 1600) -> np.ndarray:
    x, _ = _digits()
    # digits are k/16: x*255 is not an integer, so quantize once and treat that as the image
    return np.round(x[index, 0] * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- in-process


def test_models_lists_served_and_refused(client) -> None:
    r = client.post("/models")
    assert r.status_code == 200
    body = r.json()
    served = {m["name"]: m for m in body["models"]}
    assert set(served) == {AOL, TWIN}
    assert body["default_model"] == AOL  # the one with a recorded certified accuracy
    aol = served[AOL]
    assert aol["method"] == "aol" and aol["size"] == "xxs" and aol["dataset"] == "digits"
    assert aol["classes"][3] == "digit 3" and aol["input_shape"] == [1, 8, 8]
    assert aol["parameters"] == 123 and 0.4 < aol["clean_accuracy"] <= 1
    assert 0 < aol["lipschitz_bound"] <= 1.01 and aol["certificate"] == "linear_head"
    assert set(aol["latency"]) == {"batch_1", "batch_64"}
    assert 0 < aol["latency"]["batch_1"]["p50_ms"] <= aol["latency"]["batch_1"]["p95_ms"]
    assert aol["onnx_bytes"] > 0 and body["process_rss_bytes"] > aol["session_memory_bytes"]
    reasons = {Path(r["source"]).name: r["reason"] for r in body["refused"]}
    assert "exceeds 1 + tolerance" in reasons["standard.onnx"]
    assert "sha256" in reasons["tampered.onnx"]


def test_predict_radius_equals_certify_on_ort_logits(client, model_dir: Path) -> None:
    pixels = _digit_uint8()
    r = client.post("/predict", files={"image": ("d.png", _png(pixels), "image/png")})
    assert r.status_code == 200, r.text
    p = r.json()
    logits, radii = _expected(model_dir, pixels[None, None] / 255.0)
    assert p["model"] == AOL and p["method"] == "aol"
    assert p["label"] == int(np.argmax(logits[0])) and p["class_name"] == f"digit {p['label']}"
    np.testing.assert_allclose(p["scores"], logits[0], rtol=1e-6, atol=1e-7)
    assert p["certified_radius"] == pytest.approx(float(radii[0]), rel=1e-9, abs=1e-12)
    assert p["certified_radius"] > 0
    assert p["certified_radius_uploaded"] == pytest.approx(p["certified_radius"])
    top2 = np.sort(logits[0])[-2:]
    assert p["margin"] == pytest.approx(float(top2[1] - top2[0]), rel=1e-5)


@pytest.mark.parametrize(
    ("make", "factor", "step"),
    [
        (lambda d: np.kron(d, np.ones((4, 4), np.uint8)), 4.0, "area/4"),
        (lambda d: np.stack([d] * 3, axis=-1), math.sqrt(3.0), "rgb->gray(mean)"),
        (lambda d: np.stack([np.kron(d, np.ones((2, 2), np.uint8))] * 3, axis=-1),
         2 * math.sqrt(3.0), "area/2"),
        (lambda d: np.array(Image.fromarray(d).resize((10, 10))), None, "bilinear 10x10->8x8"),
    ],
    ids=["area4", "rgb", "rgb-area2", "resize"],
)
def test_uploaded_radius_follows_the_preprocessing_norm(client, make, factor, step) -> None:
    """Area downsampling by k divides the map's norm by k, gray averaging by √3."""
    digit = _digit_uint8()
    base = client.post("/predict", files={"image": ("d.png", _png(digit), "image/png")}).json()
    r = client.post("/predict", files={"image": ("u.png", _png(make(digit)), "image/png")})
    assert r.status_code == 200, r.text
    p = r.json()
    assert step in p["preprocessing"]
    if factor is None:  # a real resize: the norm of PIL's linear map, from its full matrix
        from service.images import _resize

        basis = np.eye(100).reshape(100, 1, 10, 10)
        full = np.stack([_resize(e, 8, 8).ravel() for e in basis], axis=1)  # (64, 100)
        factor = 1 / np.linalg.norm(full, ord=2)
        assert p["certified_radius_uploaded"] == pytest.approx(factor * p["certified_radius"],
                                                               rel=1e-6)
        return
    # the upload maps exactly onto the 8x8 digit: same prediction, radius scaled by the norm
    assert p["certified_radius"] == pytest.approx(base["certified_radius"], rel=1e-6)
    assert p["certified_radius_uploaded"] == pytest.approx(factor * p["certified_radius"])


@pytest.mark.parametrize("mode", ["P", "CMYK"])
def test_uploaded_radius_of_palette_and_cmyk_images(client, mode: str) -> None:
    """Palette pixels are their colours (norm 1); CMYK goes through PIL's formula in float (2)."""
    rgb = Image.fromarray(np.stack([_digit_uint8()] * 3, axis=-1))
    upload = rgb.convert(mode)
    buf = io.BytesIO()
    upload.save(buf, format="TIFF" if mode == "CMYK" else "PNG")
    p = client.post("/predict", files={"image": ("u", buf.getvalue(), "image/png")}).json()
    factor = math.sqrt(3.0) / (2.0 if mode == "CMYK" else 1.0)  # then rgb->gray(mean)
    assert p["certified_radius_uploaded"] == pytest.approx(factor * p["certified_radius"])


def test_predict_tensor_and_model_choice(client, model_dir: Path) -> None:
    x, _ = _digits()
    batch = x[1600:1603]
    r = client.post("/predict_tensor", json={"images": batch.tolist(), "model": TWIN})
    assert r.status_code == 200, r.text
    items = r.json()
    logits, radii = _expected(model_dir, batch)
    assert [p["model"] for p in items] == [TWIN] * 3
    assert [p["label"] for p in items] == logits.argmax(1).tolist()
    np.testing.assert_allclose([p["certified_radius"] for p in items], radii, rtol=1e-9)
    by_method = client.post("/predict_tensor", json={"images": batch[:1].tolist(), "model": "aol"})
    assert by_method.json()[0]["model"] == AOL  # a method name picks its best model


def test_certify_each_model(client, model_dir: Path) -> None:
    x, _ = _digits()
    batch = x[1600:1604]
    _, radii = _expected(model_dir, batch)
    eps = float(np.median(radii))
    r = client.post("/certify", json={"images": batch.tolist(), "eps": eps,
                                      "models": [AOL, TWIN]})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 8 and {c["model"] for c in results} == {AOL, TWIN}
    for c in results:
        assert c["certified"] == bool(radii[c["index"]] > eps)
    upload = client.post("/certify", files={"image": ("d.png", _png(_digit_uint8()), "image/png")},
                         data={"eps": "0.0", "models": AOL})
    assert upload.status_code == 200, upload.text
    (only,) = upload.json()["results"]
    assert only["model"] == AOL and only["certified"] is True


def _tensor(value: float = 0.5, shape=(1, 1, 8, 8)) -> list:
    return np.full(shape, value).tolist()


BAD_REQUESTS = [
    # (id, endpoint, request kwargs, status)
    ("non-image", "/predict", {"files": {"image": ("a.png", b"not an image at all", "image/png")}},
     415),
    ("truncated-png", "/predict",
     {"files": {"image": ("t.png", _png(np.full((64, 64), 7, np.uint8))[:80], "image/png")}}, 400),
    ("bomb", "/predict",
     {"files": {"image": ("b.png", _png(np.zeros((1100, 1100), np.uint8)), "image/png")}}, 413),
    ("upload-too-large", "/predict",
     {"files": {"image": ("big.png", b"\x89PNG" + bytes(300_000), "image/png")}}, 413),
    ("body-too-large", "/predict_tensor",
     {"content": b'{"images": [' + b"0," * 600_000 + b"0]}",
      "headers": {"content-type": "application/json"}}, 413),
    ("unknown-model", "/predict",
     {"files": {"image": ("d.png", _png(np.zeros((8, 8), np.uint8)), "image/png")},
      "data": {"model": "soc-xl"}}, 404),
    ("empty-predict", "/predict", {"content": b""}, 400),
    ("empty-tensor", "/predict_tensor", {"content": b""}, 400),
    ("invalid-json", "/predict_tensor",
     {"content": b"{images: ", "headers": {"content-type": "application/json"}}, 400),
    ("wrong-channels", "/predict_tensor", {"json": {"images": _tensor(shape=(1, 3, 8, 8))}}, 422),
    ("wrong-shape", "/predict_tensor", {"json": {"images": _tensor(shape=(1, 1, 8, 9))}}, 422),
    ("wrong-rank", "/predict_tensor", {"json": {"images": _tensor(shape=(1, 8, 8))}}, 422),
    ("ragged", "/predict_tensor", {"json": {"images": [_tensor()[0], [[[0.5]]]]}}, 422),
    ("nan", "/predict_tensor",
     {"content": json.dumps({"images": _tensor()}).replace("0.5", "NaN", 1).encode(),
      "headers": {"content-type": "application/json"}}, 422),
    ("inf", "/predict_tensor",
     {"content": json.dumps({"images": _tensor()}).replace("0.5", "Infinity", 1).encode(),
      "headers": {"content-type": "application/json"}}, 422),
    ("out-of-range", "/predict_tensor", {"json": {"images": _tensor(1.5)}}, 422),
    ("too-many", "/predict_tensor", {"json": {"images": _tensor(shape=(65, 1, 8, 8))}}, 422),
    ("strings", "/predict_tensor", {"json": {"images": [[[["0.5"] * 8] * 8]]}}, 400),
    ("not-a-list", "/predict_tensor", {"json": {"images": "abc"}}, 400),
    ("model-type", "/predict_tensor", {"json": {"images": _tensor(), "model": 3}}, 400),
    ("unknown-field", "/predict_tensor", {"json": {"images": _tensor(), "batch": 1}}, 400),
    ("tensor-unknown-model", "/predict_tensor",
     {"json": {"images": _tensor(), "model": "nope"}}, 404),
    ("eps-type", "/certify", {"json": {"images": _tensor(), "eps": "big"}}, 400),
    ("eps-negative", "/certify", {"json": {"images": _tensor(), "eps": -1}}, 422),
    ("certify-nothing", "/certify", {"json": {"eps": 0.1}}, 400),
]


@pytest.mark.parametrize(("endpoint", "kwargs", "status"), [b[1:] for b in BAD_REQUESTS],
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_a_one_line_4xx(client, endpoint, kwargs, status) -> None:
    r = client.post(endpoint, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and body["error"] and "\n" not in body["error"]


def test_request_counter_and_radius_histogram(client) -> None:
    from prometheus_client import REGISTRY

    def count(outcome: str) -> float:
        labels = dict(method="aol", model=AOL, endpoint="predict", outcome=outcome)
        return REGISTRY.get_sample_value("lipcert_requests_total", labels) or 0.0

    ok, rejected = count("ok"), count("rejected")
    radius_n = REGISTRY.get_sample_value("lipcert_certified_radius_count",
                                         dict(method="aol", model=AOL)) or 0.0
    png = _png(_digit_uint8())
    assert client.post("/predict", files={"image": ("d.png", png, "image/png")}).status_code == 200
    bad = client.post("/predict", files={"image": ("d.png", b"junk", "image/png")})
    assert bad.status_code == 415
    assert count("ok") == ok + 1 and count("rejected") == rejected + 1
    assert REGISTRY.get_sample_value("lipcert_certified_radius_count",
                                     dict(method="aol", model=AOL)) == radius_n + 1


def test_no_servable_model_means_not_ready(model_dir: Path, tmp_path: Path) -> None:
    from bentoml.exceptions import ServiceUnavailable

    from service.service import LipCert

    shutil.copyfile(model_dir / "standard.onnx", tmp_path / "standard.onnx")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**LIMITS, "LIPCERT_MODELS": str(tmp_path)}.items():
            mp.setenv(key, value)
        service = LipCert()
    assert service.__is_ready__() is False
    assert [Path(r.source).name for r in service.refused] == ["standard.onnx"]
    with pytest.raises(ServiceUnavailable, match="no model"):
        service.resolve(None)


# ----------------------------------------------------------------------------- end to end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve(models_folder: Path, home: Path) -> Iterator[str]:
    """``bentoml serve`` (the bentofile's service) on a free loopback port; always stopped."""
    import httpx

    port = _free_port()
    env = {**os.environ, **LIMITS, "LIPCERT_MODELS": str(models_folder),
           "BENTOML_HOME": str(home), "OMP_NUM_THREADS": "1", "BENTOML_DO_NOT_TRACK": "True"}
    with open(home / "serve.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"bentoml serve exited: {(home / 'serve.log').read_text()}")
                try:  # any answer of /readyz (200, or 503 without models) means it is up
                    httpx.get(f"{url}/readyz", timeout=2)
                    break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("bentoml serve did not start in 90 s")
                time.sleep(0.25)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with _serve(model_dir, tmp_path_factory.mktemp("bentoml-home")) as url:
        yield url


@pytest.mark.e2e
def test_e2e_readyz(server: str, model_dir: Path, tmp_path: Path) -> None:
    """Ready with a servable model; a server whose only model is refused stays unready."""
    import httpx

    assert httpx.get(f"{server}/readyz").status_code == 200
    only_refused = tmp_path / "models"
    only_refused.mkdir()
    shutil.copyfile(model_dir / "tampered.onnx", only_refused / "tampered.onnx")
    home = tmp_path / "home"
    home.mkdir()
    with _serve(only_refused, home) as url:
        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 503 and "\n" not in r.json()["error"]
        r = httpx.post(f"{url}/predict_tensor", json={"images": _tensor()})
        assert r.status_code == 503 and r.json()["error"]  # BentoML hides 5xx details
    assert "sha256" in (home / "serve.log").read_text()  # the log says why


@pytest.mark.e2e
def test_e2e_python_client(server: str, model_dir: Path, tmp_path: Path) -> None:
    import bentoml

    x, _ = _digits()
    image = tmp_path / "digit.png"
    image.write_bytes(_png(_digit_uint8()))
    with bentoml.SyncHTTPClient(server) as c:
        p = c.predict(image=image)
        items = c.predict_tensor(images=x[1600:1602].tolist(), model=AOL)
        listed = c.models()
    logits, radii = _expected(model_dir, _digit_uint8()[None, None] / 255.0)
    assert p["label"] == int(logits.argmax()) and p["certified_radius"] == pytest.approx(radii[0])
    _, radii2 = _expected(model_dir, x[1600:1602])
    np.testing.assert_allclose([i["certified_radius"] for i in items], radii2, rtol=1e-9)
    assert listed["default_model"] == AOL and len(listed["refused"]) == 2


@pytest.mark.e2e
def test_e2e_bad_inputs_then_valid_and_metrics(server: str) -> None:
    import httpx

    with httpx.Client(base_url=server, timeout=30) as c:
        for name, endpoint, kwargs, status in BAD_REQUESTS:
            r = c.post(endpoint, **kwargs)
            assert r.status_code == status, (name, r.text)
            assert "\n" not in r.json()["error"], name
        r = c.post("/predict", files={"image": ("d.png", _png(_digit_uint8()), "image/png")})
        assert r.status_code == 200
        metrics = c.get("/metrics").text
    assert 'lipcert_requests_total{endpoint="predict",method="aol",model="aol-digits",' \
           'outcome="ok"}' in metrics
    assert 'outcome="rejected"' in metrics
    assert 'lipcert_inference_seconds_count{endpoint="predict",method="aol",model="aol-digits"}' \
        in metrics
    assert 'lipcert_certified_radius_bucket{le="0.01",method="aol",model="aol-digits"}' in metrics
    assert 'lipcert_model_memory_bytes{method="aol",model="aol-digits"}' in metrics


@pytest.mark.e2e
def test_e2e_concurrent_batches_keep_each_request_apart(server: str, model_dir: Path) -> None:
    """Concurrent requests are merged into batches; each must get its own images' answers."""
    import httpx

    x, _ = _digits()
    requests = [(x[1500 + 3 * i: 1503 + 3 * i], AOL if i % 2 else TWIN) for i in range(24)]
    with httpx.Client(base_url=server, timeout=60) as c:
        def call(req):
            images, model = req
            return c.post("/predict_tensor", json={"images": images.tolist(), "model": model})

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(call, requests))
    for (images, model), r in zip(requests, answers, strict=True):
        assert r.status_code == 200, r.text
        _, radii = _expected(model_dir, images)
        assert [p["model"] for p in r.json()] == [model] * 3
        np.testing.assert_allclose([p["certified_radius"] for p in r.json()], radii, rtol=1e-9)

"""The web page at ``/`` and the shipped examples: in-process routes, then a real browser.

A small AOL model is trained for a moment on scikit-learn's digits (the shipped digit examples
are held out), exported and served from a temporary ``LIPCERT_MODELS`` folder with a copy of
itself (so "all models" shows two) and a tampered copy (refused). The browser test starts
``bentoml serve``, opens the page in headless Chromium (Debian's ``chromium``, driven by
Playwright's Python API; Playwright never downloads a browser here), uploads shipped examples
and checks that what the page shows equals the ``/predict`` JSON for the same file.

``LIPCERT_SCREENSHOTS=<folder>`` makes the browser test save ``page.png`` and
``page-models.png`` there.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from service_harness import train_digits

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CHROMIUM = Path(os.environ.get("LIPCERT_CHROMIUM", "/usr/bin/chromium"))
AOL = "aol-digits"
TWIN = "aol-copy"
ENV = {
    "LIPCERT_ORT_THREADS": "1",
    "LIPCERT_PROFILE_RUNS": "3",
    "LIPCERT_PROVIDERS": "CPUExecutionProvider",
}
#: Ports for servers started by this module (the project's convention for this test).
PORTS = range(3200, 3300)


def _example_files() -> list[str]:
    return [item["file"] for item in json.loads((EXAMPLES / "index.json").read_text())]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An AOL digits model (with its report), a copy of it, and a tampered (refused) copy."""
    import onnx
    import onnxruntime as ort
    from sklearn.datasets import load_digits

    import models
    from certify import certified_accuracy
    from certify.artifact import certificate_kwargs, to_onnx, verify

    root = tmp_path_factory.mktemp("web-models")
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    train = np.arange(1500)  # the shipped digit examples are images >= 1500
    torch.manual_seed(0)
    aol = models.create_model("aol", "xxs", 1, 10, 8)
    train_digits(aol, x[train], y[train], steps=150)
    path = to_onnx(aol, root / AOL / "model.onnx", input_shape=(1, 8, 8),
                   metadata={"dataset": "digits", "classes": [str(i) for i in range(10)]})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"image": x[1500:]})[0]
    acc = certified_accuracy(logits, y[1500:], (36 / 255, 72 / 255, 108 / 255, 1.0),
                             **certificate_kwargs(verify(path)))
    report = {"clean_accuracy": acc["clean"], "certified_accuracy": acc}
    (root / AOL / "report.json").write_text(json.dumps(report))
    shutil.copyfile(path, root / f"{TWIN}.onnx")
    # a copy with one weight changed: refused at load (hash mismatch), and cheap to make
    tampered = onnx.load(str(path))
    init = max(tampered.graph.initializer, key=lambda t: len(t.raw_data))
    init.raw_data = bytes([init.raw_data[0] ^ 0x40]) + init.raw_data[1:]
    onnx.save(tampered, str(root / "tampered.onnx"))
    return root


@pytest.fixture(scope="module")
def client(model_dir: Path):
    from starlette.testclient import TestClient

    from service.service import LipCert

    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**ENV, "LIPCERT_MODELS": str(model_dir)}.items():
            mp.setenv(key, value)
        mp.delenv("LIPCERT_EXAMPLES", raising=False)
        with TestClient(LipCert.to_asgi()) as c:
            yield c


# ----------------------------------------------------------------------------- in-process


def test_page_static_files_and_bentoml_docs_are_served(client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="static/app.js"' in page.text and 'href="static/style.css"' in page.text
    assert "//" not in page.text.split("<body>")[0].replace("http://www.w3.org", "")  # no CDN
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
    docs = client.get("/docs")  # BentoML's own API page, moved from /
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = client.get("/docs.json").json()
    assert {"/predict", "/models", "/certify"} <= set(spec["paths"])
    assert client.get("/static/nope.js").status_code == 404
    # the mount claims only its own routes: the APIs and probes answer as before
    assert client.post("/models").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_examples_are_listed_served_and_predicted(client) -> None:
    listed = client.get("/examples").json()["examples"]
    files = [item["file"] for item in listed]
    assert files == _example_files() and "shirt.png" in files and "digit-3.png" in files
    assert all(item["url"] == f"examples/{item['file']}" and item["source"] for item in listed)
    for item in listed:
        r = client.get(f"/{item['url']}")
        assert r.status_code == 200 and r.content == (EXAMPLES / item["file"]).read_bytes()
        p = client.post("/predict", files={"image": (item["file"], r.content, "image/png")})
        assert p.status_code == 200, (item["file"], p.text)
        assert p.json()["certified_radius"] >= 0
    photo = client.post("/predict", files={
        "image": ("p.png", (EXAMPLES / "photo-flower.png").read_bytes(), "image/png")}).json()
    # 112×112 RGB → 8×8 gray: channel mean and area/14, both linear with a known norm
    assert photo["preprocessing"] == ["rgb->gray(mean)", "area/14"]
    assert photo["certified_radius_uploaded"] == pytest.approx(
        photo["certified_radius"] * 14 * np.sqrt(3))
    # only listed files: not the script beside them, nor anything outside the folder
    for bad in ("make_examples.py", "index.json", "..%2Fpyproject.toml", "nope.png"):
        r = client.get(f"/examples/{bad}")
        assert r.status_code == 404 and r.json()["error"], bad


def _idx(path: Path) -> np.ndarray:
    """An IDX file (gz) as an array: the MNIST format, read without torchvision."""
    import gzip

    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def test_examples_are_what_index_json_says() -> None:
    """Each shipped image is the data-set image and label its provenance names."""
    from PIL import Image
    from sklearn.datasets import load_digits

    items = json.loads((EXAMPLES / "index.json").read_text())
    digits = load_digits()
    fmnist = Path("/usr/share/datasets/fashion-mnist")
    checked = 0
    for item in items:
        pixels = np.asarray(Image.open(EXAMPLES / item["file"]))
        index = item["index"]
        if item["dataset"] == "digits":
            want = np.rint(digits.images[index] * 255 / 16).astype(np.uint8)
            assert np.array_equal(pixels, want) and item["label"] == str(digits.target[index])
            assert index >= 1500  # held out by the tests that train on digits
            checked += 1
        elif item["dataset"] == "fashion-mnist" and fmnist.is_dir():
            from data import FASHION_MNIST_CLASSES

            images = _idx(fmnist / "t10k-images-idx3-ubyte.gz")
            labels = _idx(fmnist / "t10k-labels-idx1-ubyte.gz")
            assert np.array_equal(pixels, images[index])
            assert item["label"] == FASHION_MNIST_CLASSES[labels[index]]
            checked += 1
        elif item["dataset"] == "photo":
            assert pixels.shape == (112, 112, 3) and item["label"] is None
    assert checked >= 2


def test_examples_folder_missing_lists_none(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from service.web import create_web_app

    with TestClient(create_web_app(tmp_path / "absent")) as c:
        assert c.get("/examples").json() == {"examples": []}
        assert c.get("/examples/shirt.png").status_code == 404


def test_static_files_are_package_data() -> None:
    """``pip install .`` (not only the checkout) must carry the page."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["service"]
    static = sorted(p.relative_to(REPO / "service") for p in (REPO / "service/static").rglob("*")
                    if p.is_file())
    assert static and all(any(s.match(pat) for pat in patterns) for s in static)


# ----------------------------------------------------------------------------- browser


def _free_port() -> int:
    for port in PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORTS}")


@contextlib.contextmanager
def _serve(models_folder: Path, home: Path, ready: bool = True) -> Iterator[str]:
    """``bentoml serve`` (the bentofile's service) on a loopback port; always stopped.

    Waits for ``/readyz`` to answer 200, or with ``ready=False`` to answer at all (a service
    without a servable model stays unready).
    """
    import httpx

    port = _free_port()
    env = {**os.environ, **ENV, "LIPCERT_MODELS": str(models_folder), "BENTOML_HOME": str(home),
           "OMP_NUM_THREADS": "1", "BENTOML_DO_NOT_TRACK": "True"}
    env.pop("LIPCERT_EXAMPLES", None)
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
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200 or not ready:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("bentoml serve was not ready in 90 s")
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
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (`make browser` installs Debian's chromium "
                    "where apt works; LIPCERT_CHROMIUM names another)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is a dev dependency: pip install -e .[dev]")
    with sync_api.sync_playwright() as pw:
        # --no-sandbox: Chromium's sandbox refuses to run as root (CI runs as root)
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                               args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def _slide(page, value: int) -> None:
    """Move the ε slider (a range input: Playwright cannot ``fill`` it) as a user would."""
    page.eval_on_selector("#eps", "(el, v) => { el.value = v; "
                          "el.dispatchEvent(new Event('input', {bubbles: true})); }", value)


def _predict_json(url: str, file: Path, model: str | None = None) -> dict:
    import httpx

    data = {"model": model} if model else {}
    r = httpx.post(f"{url}/predict", files={"image": (file.name, file.read_bytes(), "image/png")},
                   data=data, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.e2e
def test_e2e_page_in_chromium_shows_the_predict_answer(
        browser, model_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    shots = os.environ.get("LIPCERT_SCREENSHOTS")
    errors: list[str] = []
    with _serve(model_dir, home) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        assert page.locator("#model").input_value() == AOL  # the default model

        # 1. upload a shipped example: label and radius shown = /predict's JSON
        digit = EXAMPLES / "digit-3.png"
        page.set_input_files("#file", str(digit))
        card = page.locator(f".result[data-model='{AOL}']")
        card.wait_for(timeout=30_000)
        expected = _predict_json(url, digit)
        assert card.locator(".label").inner_text() == expected["class_name"]
        assert card.locator(".radius").inner_text() == f"{expected['certified_radius']:.4f}"
        assert float(card.get_attribute("data-radius")) == expected["certified_radius"]
        assert card.locator(".radius-uploaded").inner_text() == \
            f"{expected['certified_radius_uploaded']:.4f}"
        assert card.locator(".bound").inner_text().startswith(
            f"{expected['lipschitz_bound']:.4f}")

        # a file dropped on the page, as a user drags one there
        seven = EXAMPLES / "digit-7.png"
        dropped = page.evaluate_handle(
            "([b64, name]) => { const dt = new DataTransfer(); dt.items.add(new File("
            "[Uint8Array.from(atob(b64), c => c.charCodeAt(0))], name, {type: 'image/png'}));"
            " return dt; }", [base64.b64encode(seven.read_bytes()).decode(), seven.name])
        page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
        page.wait_for_function(
            "document.querySelector('#preview-caption').textContent.startsWith('digit-7.png')"
            f" && document.querySelector(\".result[data-model='{AOL}'] .radius\")")
        want = _predict_json(url, seven)
        assert card.locator(".label").inner_text() == want["class_name"]
        assert card.locator(".radius").inner_text() == f"{want['certified_radius']:.4f}"

        # a 28×28 example on this 8×8 model: a bilinear resize, whose exact norm carries the
        # radius back to the example's own pixels
        want = _predict_json(url, EXAMPLES / "shirt.png")
        assert any(step.startswith("bilinear") for step in want["preprocessing"])
        shown = f"{want['certified_radius_uploaded']:.4f}"
        page.locator(".example[data-file='shirt.png']").click()
        page.wait_for_function(
            "document.querySelector('#preview-caption').textContent.startsWith('shirt.png')"
            f" && document.querySelector(\".result[data-model='{AOL}'] .radius-uploaded\")"
            f"?.textContent === '{shown}'")
        assert card.locator(".radius").inner_text() == f"{want['certified_radius']:.4f}"
        page.set_input_files("#file", str(digit))
        page.wait_for_function(
            "document.querySelector('#preview-caption').textContent.startsWith('digit-3.png')"
            f" && document.querySelector(\".result[data-model='{AOL}'] .radius-uploaded\")")

        # 2. the ε slider: certified iff radius > ε, on both sides of this radius
        k = int(expected["certified_radius"] * 255)
        for value, word in ((k, "✔ certified"), (k + 1, "✘ not certified")):
            _slide(page, value)
            assert card.locator(".certified").inner_text().startswith(word)

        if shots:
            _slide(page, 36)
            page.screenshot(path=str(Path(shots) / "page.png"), full_page=True)

        # 3. all models, a shipped example picked on the page: one card per served model
        page.select_option("#model", "__all__")
        page.locator(".example[data-file='photo-flower.png']").click()
        page.wait_for_function(
            "document.querySelectorAll('.result[data-model]').length === 2 && "
            "[...document.querySelectorAll('.result')].every(c => c.querySelector('.radius'))"
            " && document.querySelector('#preview-caption').textContent.includes('flower')",
            timeout=30_000)
        photo = EXAMPLES / "photo-flower.png"
        for name in (AOL, TWIN):
            want = _predict_json(url, photo, name)
            got = page.locator(f".result[data-model='{name}']")
            assert got.locator(".label").inner_text() == want["class_name"]
            assert got.locator(".radius").inner_text() == f"{want['certified_radius']:.4f}"
            assert got.locator(".radius-uploaded").inner_text() == \
                f"{want['certified_radius_uploaded']:.4f}"

        # 4. the models view: a table row per served model, a line per model in the plot
        page.click("#nav-models")
        page.locator("#models-view").wait_for(state="visible", timeout=30_000)  # hash routing
        page.locator("#models-table tbody tr").nth(1).wait_for(timeout=30_000)
        assert page.locator("#models-table tbody tr").count() == 2
        # only the model whose report recorded accuracies has a line
        lines = page.locator("#cra-plot svg polyline")
        assert lines.count() == 1 and lines.get_attribute("data-model") == AOL
        assert page.locator("#cra-plot svg circle").count() == 5  # clean + 4 ε
        refused = page.locator("#refused").inner_text()
        assert "tampered.onnx" in refused and "sha256" in refused
        row = page.locator(f"#models-table tr[data-model='{AOL}']").inner_text()
        assert "aol" in row and "digits" in row
        if shots:
            page.screenshot(path=str(Path(shots) / "page-models.png"), full_page=True)

        # 5. errors are messages, never a blank page
        page.click("#nav-predict")
        page.evaluate("window.lipcert.clearMessages()")
        bad = tmp_path / "notes.txt"
        bad.write_text("not an image")
        page.select_option("#model", AOL)
        page.set_input_files("#file", str(bad))
        message = page.locator("#messages .message.error").first
        message.wait_for(timeout=30_000)
        assert "415" in message.inner_text() and "not an image" in message.inner_text()
        page.close()
    assert not errors, errors


@pytest.mark.e2e
def test_e2e_page_without_a_servable_model_says_so(
        browser, model_dir: Path, tmp_path: Path) -> None:
    """Only a refused model: the page says why in words, never a blank page or a stack trace."""
    only_refused = tmp_path / "models"
    only_refused.mkdir()
    shutil.copyfile(model_dir / "tampered.onnx", only_refused / "tampered.onnx")
    home = tmp_path / "home"
    home.mkdir()
    with _serve(only_refused, home, ready=False) as url:
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        assert "serves no model" in page.locator("#messages").inner_text()
        page.locator(".example[data-file='shirt.png']").click()
        page.wait_for_function(  # the click answers asynchronously: wait, then read
            "document.querySelector('#results').innerText.includes('No model is being served')",
            timeout=30_000)
        assert "No model is being served" in page.locator("#results").inner_text()
        page.click("#nav-models")
        page.wait_for_function(
            "document.querySelector('#refused').innerText.includes('sha256')", timeout=30_000)
        page.close()

"""A bento carries its models: build with a model in a fresh store, serve it from elsewhere.

``bentoml build`` (repository root, a temporary ``BENTOML_HOME``) packages the service with the
store's lipcert model; a second model saved *after* the build must not be served by that bento;
``bentoml serve lipcert:latest`` from another working directory, without ``LIPCERT_MODELS``,
serves the first one, re-audited at load, and ``/predict`` answers with a radius.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, data: bytes, content_type: str) -> dict:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _multipart(path: Path) -> tuple[bytes, str]:
    boundary = "lipcertboundary"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
        f"filename=\"{path.name}\"\r\nContent-Type: image/png\r\n\r\n"
    ).encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_bento_serves_the_models_it_was_built_with(tmp_path: Path) -> None:
    from certify.artifact import to_onnx
    from certify.artifact.store import save_to_store
    from models.registry import create_model

    home = tmp_path / "bentoml"
    # one worker: this test is about what the bento serves, not scaling (each worker re-audits)
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True",
           "OMP_NUM_THREADS": "1", "LIPCERT_PROFILE_RUNS": "0", "LIPCERT_WORKERS": "1"}
    env.pop("LIPCERT_MODELS", None)
    env.pop("LIPCERT_BENTO_MODELS", None)
    torch.manual_seed(0)
    first = to_onnx(create_model("aol", "xxs", 1, 10, 8), tmp_path / "aol.onnx",
                    metadata={"dataset": "digits"})
    tag = save_to_store(first, {"dataset": "digits", "method": "aol", "size": "xxs"}, home=home)

    build = subprocess.run([sys.executable, "-m", "bentoml", "build"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    later = save_to_store(first, {"dataset": "digits", "method": "aol", "size": "xxs"},
                          home=home)  # in the store, but not in the bento
    assert later != tag

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "lipcert:latest", "--port", str(port)],
        cwd=elsewhere, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, server.stderr.read()[-2000:]
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the bento never became ready"
            time.sleep(1)
        listing = _post(f"{url}/models", b"{}", "application/json")
        assert [m["name"] for m in listing["models"]] == [tag]
        assert listing["refused"] == []
        body, content_type = _multipart(ROOT / "examples" / "digit-3.png")
        answer = _post(f"{url}/predict", body, content_type)
        assert answer["model"] == tag and answer["certificate"] == "linear_head"
        assert answer["certified_radius"] >= 0 and answer["lipschitz_bound"] <= 1.01
    finally:
        server.terminate()
        server.wait(timeout=60)

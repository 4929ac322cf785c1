"""The README's curl and Python client examples run as written against a live server.

Every ``curl`` line of the README's fenced ``bash`` blocks and every ``python`` block that talks
to the service (``SyncHTTPClient``) is executed from the repository root against a real
``bentoml serve`` (only the port differs: ``127.0.0.1:3000`` becomes the test server's). Each
must exit 0; each curl answer must be JSON without an ``error``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from service_harness import REPO, Server, digits_model

pytestmark = pytest.mark.e2e

README = REPO / "README.md"
DEFAULT_URL = "127.0.0.1:3000"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def _curl_lines() -> list[str]:
    lines = [line.strip() for block in _blocks("bash") for line in block.splitlines()]
    return [line for line in lines if line.startswith("curl ") and DEFAULT_URL in line]


def _client_blocks() -> list[str]:
    return [block for block in _blocks("python") if "SyncHTTPClient" in block]


def test_the_readme_has_examples_to_run() -> None:
    assert len(_curl_lines()) >= 3 and len(_client_blocks()) >= 1


def test_readme_examples_run_as_written(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copyfile(digits_model(), folder / "aol-digits.onnx")
    with Server(folder, tmp_path / "home") as server:
        url = f"127.0.0.1:{server.port}"
        for line in _curl_lines():
            res = subprocess.run(line.replace(DEFAULT_URL, url), shell=True, cwd=REPO,
                                 capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, (line, res.stderr)
            answer = json.loads(res.stdout)
            assert "error" not in answer, (line, answer)
        for block in _client_blocks():
            res = subprocess.run([sys.executable, "-c", block.replace(DEFAULT_URL, url)],
                                 cwd=REPO, capture_output=True, text=True, timeout=120)
            assert res.returncode == 0, (block, res.stderr[-2000:])
            assert res.stdout.strip(), block

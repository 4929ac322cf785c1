"""Property-based fuzzing of the real service from its own OpenAPI document (schemathesis).

``bentoml serve`` runs with one small AOL digits model and a truncated copy (refused, so
``/models`` lists a refusal); schemathesis reads ``/docs.json`` and sends generated requests,
valid and invalid (wrong types, missing fields, undeclared content types, broken multipart), to
every operation, checking that no answer is a server error and that every answer has a
documented status, content type, headers and schema. Bounded in time:
``LIPCERT_FUZZ_SECONDS`` (default 30 s) of generation after the server is up. The release
check runs it longer, e.g.::

    LIPCERT_FUZZ_SECONDS=600 .venv/bin/python -m pytest -q tests/test_service_fuzz.py

or by hand against a running server (docs/service.md, "Bad input and faults").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from service_harness import Server, digits_model

#: The checks the suite enforces (schemathesis names).
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_headers_conformance,response_schema_conformance")
LIMITS = {"LIPCERT_MAX_UPLOAD_BYTES": "200000", "LIPCERT_MAX_REQUEST_BYTES": "1000000"}


def schemathesis_command(url: str, seconds: int, seed: int = 0) -> list[str]:
    """The schemathesis CLI run of the suite (and, with more seconds, of the release check)."""
    return [
        sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()",
        "run", f"{url}/docs.json", "--checks", CHECKS, "--max-time", str(seconds),
        "--seed", str(seed), "--workers", "1", "--no-color", "--request-timeout", "30",
    ]


@pytest.mark.e2e
def test_fuzz_openapi_no_server_error_and_schema_conformance(tmp_path: Path) -> None:
    seconds = int(os.environ.get("LIPCERT_FUZZ_SECONDS", "30"))
    models = tmp_path / "models"
    models.mkdir()
    good = digits_model()
    shutil.copyfile(good, models / "aol-digits.onnx")
    (models / "truncated.onnx").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with Server(models, tmp_path / "home", env=LIMITS) as server:
        run = subprocess.run(
            schemathesis_command(server.url, seconds), cwd=tmp_path, capture_output=True,
            text=True, timeout=seconds + 120,
        )
        log = server.log()
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    summary = [line for line in out.splitlines() if " generated, " in line]
    assert summary and "failure" not in summary[-1], out[-3000:]
    assert "(status=500" not in log and "(status=503" not in log

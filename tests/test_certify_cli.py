"""``python -m certify``: evaluate writes JSON + PNG consistent with ORT; bad inputs exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_attack import train_digits_model

from certify.__main__ import main
from certify.artifact import certificate_kwargs, load_onnx, to_onnx
from certify.radius import certified_accuracy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    model, data = train_digits_model()
    path = to_onnx(model, tmp_path_factory.mktemp("cli") / "aol.onnx",
                   metadata=dict(dataset="digits", classes=[str(i) for i in range(10)]))
    return path, data


def test_evaluate_writes_consistent_report(model_path, capsys):
    path, data = model_path
    rc = main(["evaluate", str(path), "--dataset", "digits", "--limit", "60",
               "--attack-points", "16", "--attack-steps", "10", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    report = json.loads(path.with_suffix(".certify.json").read_text())
    png = path.with_suffix(".cra.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    session, meta = load_onnx(path)
    x = data.test_images[:60].numpy().astype(np.float32) / 255.0
    (logits,) = session.run(["logits"], {"image": x})
    expected = certified_accuracy(logits, data.test_labels[:60].numpy(), **certificate_kwargs(meta))
    assert report["accuracy"] == expected
    assert report["points"] == 60 and report["attack"]["flipped"] == 0
    assert report["audit"]["bound"] == pytest.approx(meta["lipschitz_bound"], rel=1e-9)
    assert "whole bound" in out and "attack check" in out


def test_audit_command(model_path, capsys):
    path, _ = model_path
    assert main(["audit", str(path)]) == 0
    out = capsys.readouterr().out
    assert "body.stem" in out and "certificate" in out


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "certify", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


def test_bad_path_exits_2(tmp_path):
    res = run_cli("evaluate", str(tmp_path / "nope.onnx"), "--dataset", "digits")
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "no such file" in res.stderr


def test_not_onnx_and_not_lipcert_exit_2(tmp_path, capsys):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xffgarbage" * 20)
    assert main(["audit", str(junk)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:")

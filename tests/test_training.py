"""python -m training: one short real run per method (digits, xxs), its outputs, store and CRA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import models
from certify import certified_accuracy
from certify.artifact import INPUT_NAME, OUTPUT_NAME, certificate_kwargs, verify
from certify.artifact.store import model_name
from training import TrainConfig, list_store_models, load_dataset, train
from training.cli import main
from training.config import EVAL_EPS, method_defaults

BUDGET_S = 1.0
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("bentoml")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENTOML_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _ort_logits(path: Path, images) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images.float().div(255).numpy()
    return session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


@pytest.mark.parametrize("method", models.list_methods())
def test_short_run_produces_every_output(method, tmp_path, store_home, digits):
    cfg = TrainConfig(
        method=method, size="xxs", dataset="digits", budget_s=BUDGET_S, out=str(tmp_path), seed=1
    )
    result = train(cfg, data=digits)
    run, report = result.run_dir, result.report

    assert run.parent == tmp_path / "digits" and run.name.startswith(f"{method}-xxs-")
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "model.onnx", "report.json"):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    expected_lr = method_defaults(method).peak_lr("xxs")
    assert config["lr"] == expected_lr and config["method"] == method
    assert config["batch_size"] == (256 if method in ("bcop", "lot") else 64)  # CPU defaults
    assert json.loads((run / "report.json").read_text()) == json.loads(json.dumps(report))
    events = [
        json.loads(line)["event"] for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    assert "train" in events and events[-1] == "final"

    # Budget honoured within 10 % or two average steps (the loop stops half a step early at best:
    # a 1 s budget is only a few steps of the slow methods on a busy CI machine, and the step that
    # crosses the budget can be slower than the average: seen 1.107 s at 0.101 s per step).
    step_s = report["train_time_s"] / max(1, report["steps"])
    assert abs(report["train_time_s"] - BUDGET_S) <= max(0.1 * BUDGET_S, 2 * step_s)
    assert report["steps"] > 0 and report["images_per_s"] > 0 and report["time_per_epoch_s"] > 0
    assert report["peak_memory_bytes"] > 0 and report["parameters"] > 1000
    assert report["nan_restarts"] == 0

    # The ONNX file is a verified lipcert model carrying the accuracies and the audited bound.
    meta = verify(run / "model.onnx")
    assert meta["dataset"] == "digits" and meta["classes"] == [str(i) for i in range(10)]
    assert meta["clean_accuracy"] == pytest.approx(report["clean_accuracy"])
    assert meta["certified_accuracy"] == pytest.approx(report["certified_accuracy"])
    assert report["lipschitz_bound"] == meta["lipschitz_bound"]
    if method != "standard":
        # SOC: each layer's polynomial peaks about 1e-5 above 1 (Chebyshev, 4 terms; audited),
        # about 3e-4 over the ~25 layers of xxs; every other method stays within 1e-4.
        assert report["lipschitz_bound"] <= 1 + (5e-4 if method == "soc" else 1e-4)

    # The reported CRA is what certify computes from ORT logits with the file's audited bound.
    logits = _ort_logits(run / "model.onnx", digits.test_images)
    expected = certified_accuracy(
        logits, digits.test_labels.numpy(), EVAL_EPS, **certificate_kwargs(meta)
    )
    assert report["clean_accuracy"] == expected.pop("clean")
    assert report["certified_accuracy"] == expected
    assert set(expected) == {"0.1412", "0.2824", "0.4235", "1.0000"}

    # The model is in the (temporary) BentoML store, labelled for the service.
    stored = {m.tag: m for m in list_store_models()}
    entry = stored[report["store_tag"]]
    assert entry.tag.startswith(model_name("digits", method, "xxs") + ":")
    assert entry.labels == {"method": method, "size": "xxs", "dataset": "digits", "lipcert": "1"}
    assert entry.path.read_bytes() == (run / "model.onnx").read_bytes()
    assert entry.metadata["certified_accuracy"] == report["certified_accuracy"]
    assert str(entry.path).startswith(str(store_home))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "aoll"], "unknown method 'aoll'; choose from all, aoc, aol, bcop"),
        (["--method", "aol,nope"], "unknown method 'nope'"),
        (["--method", "aol", "--size", "xxl"], "unknown size 'xxl'; choose from xxs, xs, s, m, l"),
        (["--method", "aol", "--dataset", "mnist"], "unknown dataset 'mnist'; choose from digits"),
        (
            ["--method", "aol", "--budget", "5 minutes"],
            "bad budget '5 minutes'; use a positive number",
        ),
        (["--method", "aol", "--budget", "0s"], "bad budget '0s'"),
        (
            ["--method", "aol", "--device", "tpu"],
            "unknown device 'tpu'; choose from auto, cpu, cuda",
        ),
        (["--size", "xs"], "--method is required"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_module_entry_point_rejects_bad_budget():
    out = subprocess.run(
        [sys.executable, "-m", "training", "--method", "aol", "--budget", "3x"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "python -m training: error: bad budget '3x'; use a positive number with unit s, m or h "
        "(e.g. 90s, 5m, 1h)"
    ]

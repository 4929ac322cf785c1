"""python -m training with Singla & Feizi's options: heads, HH, distance pool, layer options."""

from __future__ import annotations

import json

import numpy as np
import pytest

from certify.artifact import INPUT_NAME, OUTPUT_NAME, certificate_kwargs, verify
from certify.attack import attack_check
from certify.radius import certified_accuracy
from training import TrainConfig, load_dataset, train
from training.cli import main
from training.config import EVAL_EPS


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _ort_logits(path, images) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: images.float().div(255).numpy()})[0]


@pytest.mark.parametrize(
    "options, certificate",
    [
        (dict(head="lln", activation="hh", pool="distance"), "linear_head"),
        (dict(head="crc", curvature_weight=0.1), "pairwise"),
    ],
)
def test_option_run_exports_the_right_certificate(options, certificate, tmp_path, digits):
    cfg = TrainConfig(method="aol", size="xxs", dataset="digits", epochs=6, out=str(tmp_path),
                      store=False, **options)
    result = train(cfg, data=digits)
    run, report = result.run_dir, result.report
    assert run.name.startswith("aol-" + cfg.variant.replace("+", "-") + "-xxs-")
    assert report["variant"] == cfg.variant and report["head"] == options["head"]
    meta = verify(run / "model.onnx")
    assert meta["certificate"] == report["certificate"] == certificate
    assert meta["config"]["head"] == options["head"]
    assert meta["lipschitz_bound_body"] <= 1 + 1e-4
    # The reported CRA is the one the exported file's certificate gives.
    logits = _ort_logits(run / "model.onnx", digits.test_images)
    expected = certified_accuracy(logits, digits.test_labels.numpy(), EVAL_EPS,
                                  **certificate_kwargs(meta))
    assert report["clean_accuracy"] == expected.pop("clean")
    assert report["certified_accuracy"] == expected
    assert report["clean_accuracy"] > 0.3  # well above chance (0.1) after six short epochs
    res = attack_check(run / "model.onnx", digits.test_images[:48], digits.test_labels[:48],
                       steps=15, restarts=1)
    assert res["certified"] > 0 and res["flipped"] == 0
    if options["head"] == "crc":
        curv = report["certified_accuracy_curvature"]
        # The curvature certificate is never weaker than the served pairwise one.
        assert all(curv[k] >= report["certified_accuracy"][k] for k in curv)
    else:
        assert "certified_accuracy_curvature" not in report


def test_cli_options_reach_the_config(tmp_path, digits, capsys):
    rc = main(["--method", "soc", "--size", "xxs", "--dataset", "digits", "--epochs", "1",
               "--no-store", "--no-export", "--no-progress", "--out", str(tmp_path),
               "--activation", "HH", "--pool", "none", "--layer-option", "train_terms=3"])
    assert rc == 0
    (config_path,) = tmp_path.glob("digits/*/config.json")
    config = json.loads(config_path.read_text())
    assert config["activation"] == "hh" and config["pool"] is None
    assert config["layer_options"] == {"train_terms": 3}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--head", "mlp"], "unknown head 'mlp'; choose from linear, lln, crc"),
        (["--activation", "relu"], "unknown activation 'relu'; choose from maxmin, hh"),
        (["--pool", "max"], "unknown pool 'max'; choose from none, distance"),
        (["--curvature-weight", "0.5"], "curvature_weight applies to head 'crc' only"),
        (["--layer-option", "fast"], "bad --layer-option 'fast'; use KEY=VALUE"),
        (["--layer-option", "nope=1"], "unknown layer option(s) nope for aol; choose from"),
    ],
)
def test_bad_options_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--method", "aol", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1

"""The training loop's machinery: resume, NaN guard, sweeps, DistributedDataParallel."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training import TrainConfig, load_dataset, train
from training.cli import main
from training.loop import DivergenceError, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
QUICK = [
    "--size",
    "xxs",
    "--dataset",
    "digits",
    "--no-export",
    "--no-progress",
    "--log-level",
    "WARNING",
]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _only_run(folder: Path) -> Path:
    runs = [p for p in (folder / "digits").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def test_resume_continues_the_step_count(tmp_path, capsys):
    assert main(["--method", "aol", "--epochs", "2", "--out", str(tmp_path), *QUICK]) == 0
    run = _only_run(tmp_path)
    first = json.loads((run / "report.json").read_text())
    batch = json.loads((run / "config.json").read_text())["batch_size"]
    assert batch == 64  # the CPU default, resolved and recorded
    assert (
        first["steps_per_epoch"] == 1437 // batch
        and first["steps"] == 2 * first["steps_per_epoch"]
    )
    weights_before = load_checkpoint(run)["model"]

    assert main(["--resume", str(run), "--epochs", "4", *QUICK[4:]]) == 0
    second = json.loads((run / "report.json").read_text())
    assert _only_run(tmp_path) == run  # same folder
    assert second["steps"] == 4 * first["steps_per_epoch"]
    assert second["train_time_s"] > first["train_time_s"]  # the clock continues too
    config = json.loads((run / "config.json").read_text())
    assert config["resumed_from_step"] == first["steps"] and config["epochs"] == 4
    steps = [
        json.loads(line)["step"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["event"] == "train"
    ]
    assert steps == sorted(steps) and steps[-1] == second["steps"]
    assert any(first["steps"] < s for s in steps)
    weights_after = load_checkpoint(run)["model"]
    assert not torch.equal(weights_before["head.conv.weight"], weights_after["head.conv.weight"])
    assert "aol xxs digits" in capsys.readouterr().out


def test_nan_guard_restores_lowers_lr_and_continues(tmp_path, digits):
    # A learning rate of 1000 makes a plain network overflow within a few steps.
    cfg = TrainConfig(
        method="standard",
        size="xxs",
        dataset="digits",
        epochs=8,
        lr=1e3,
        guard_every=1,
        max_nan_restarts=40,
        out=str(tmp_path),
        export=False,
        store=False,
    )
    report = train(cfg, data=digits).report
    assert report["nan_restarts"] >= 1 and report["final_lr_scale"] == 0.5 ** report["nan_restarts"]
    assert report["steps"] == 8 * report["steps_per_epoch"]
    weights = load_checkpoint(report["run_dir"])["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())
    events = [
        json.loads(line)
        for line in (Path(report["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    ]
    assert sum(e["event"] == "nan" for e in events) == report["nan_restarts"]

    with pytest.raises(DivergenceError, match="diverged 3 times"):
        train(
            TrainConfig(**{**cfg.to_dict(), "max_nan_restarts": 2, "eval_eps": cfg.eval_eps}),
            data=digits,
        )


def test_sweep_writes_markdown_and_csv(tmp_path, capsys):
    assert main(["--method", "aol,standard", "--budget", "1s", "--out", str(tmp_path), *QUICK]) == 0
    out = capsys.readouterr().out
    (md,) = (tmp_path / "digits").glob("comparison-xxs-*.md")
    (csv_path,) = (tmp_path / "digits").glob("comparison-xxs-*.csv")
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["method"] for r in rows] == ["aol", "standard"]
    reports = {
        p.parent.name.split("-")[0]: json.loads(p.read_text())
        for p in (tmp_path / "digits").glob("*/report.json")
    }
    for row in rows:
        report = reports[row["method"]]
        assert float(row["clean %"]) == pytest.approx(100 * report["clean_accuracy"], abs=0.05)
        assert float(row["CRA 36/255 %"]) == pytest.approx(
            100 * report["certified_accuracy"]["0.1412"], abs=0.05
        )
    assert md.read_text().startswith("| method | size | dataset | clean % | CRA 36/255 %")
    assert "| aol | xxs | digits |" in out


def test_torchrun_two_cpu_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BENTOML_HOME": str(tmp_path / "bento")}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "training",
        "--method",
        "aol",
        "--budget",
        "2s",
        "--device",
        "cpu",
        "--no-store",
        "--out",
        str(tmp_path),
        *QUICK,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = _only_run(tmp_path)
    report = json.loads((run / "report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] > 0
    assert abs(report["train_time_s"] - 2.0) <= 0.2
    # Each step trained 2 x batch/2 images: the global batch was split between the processes.
    batch = json.loads((run / "config.json").read_text())["batch_size"]
    assert batch == 64
    assert report["images_per_s"] * report["train_time_s"] == pytest.approx(batch * report["steps"])
    assert done.stdout.count("aol xxs digits:") == 1  # only rank 0 reports


def test_one_cycle_schedule_shape():
    from training.loss import one_cycle_lr

    assert one_cycle_lr(0.0, 0.1) == pytest.approx(0.1 / 25)
    assert one_cycle_lr(0.3, 0.1) == pytest.approx(0.1)
    assert one_cycle_lr(1.0, 0.1) == pytest.approx(0.1 / 25 / 1e4)
    rise = [one_cycle_lr(f, 0.1) for f in (0.0, 0.1, 0.2, 0.3)]
    fall = [one_cycle_lr(f, 0.1) for f in (0.3, 0.5, 0.8, 1.0, 1.5)]
    assert rise == sorted(rise) and fall == sorted(fall, reverse=True)


def test_offset_cross_entropy_matches_its_formula():
    from training.loss import offset_cross_entropy

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, generator=gen)
    y = torch.tensor([0, 3, 1, 1, 2])
    m, t = 0.4, 0.25
    shifted = z - m * torch.nn.functional.one_hot(y, 4)
    manual = -(shifted / t).log_softmax(1)[torch.arange(5), y].mean() * t
    assert offset_cross_entropy(z, y, m, t) == pytest.approx(float(manual), rel=1e-6)
    assert offset_cross_entropy(z, y, 0.0, 1.0) == pytest.approx(
        float(torch.nn.functional.cross_entropy(z, y)), rel=1e-6
    )


def test_durations_and_store_metadata(tmp_path):
    from certify.artifact.store import plain_metadata as _plain
    from certify.artifact.store import save_to_store
    from training.config import parse_duration

    assert parse_duration("1.5h") == 5400 and parse_duration("90s") == 90
    assert parse_duration(" 2m ") == 120
    for bad in ("90", "5x", "-1m", "m"):
        with pytest.raises(ValueError, match="use a positive number with unit s, m or h"):
            parse_duration(bad)
    assert _plain({"a": None, "b": [1.0, float("nan")], "c": {"d": (1, "x")}}) == {
        "b": [1.0],
        "c": {"d": [1, "x"]},
    }
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(ValueError, match="report lacks method"):
        save_to_store(tmp_path / "m.onnx", {"dataset": "digits", "size": "xxs"}, home=tmp_path)

"""Weight averaging (``--ema``): the bias-corrected EMA's arithmetic, and a run that evaluates,
exports and audits the average while the checkpoint keeps both for a resume."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from training import TrainConfig, load_dataset, train
from training.averaging import WeightAverage
from training.cli import build_parser, configs_from_args
from training.loop import load_checkpoint


def test_the_average_is_the_bias_corrected_ema_of_the_accepted_states() -> None:
    layer = nn.Linear(2, 1, bias=False)
    avg = WeightAverage(layer, decay=0.5)
    avg.copy_to_model()  # nothing folded in yet: the weights stay
    states = {3: torch.tensor([[1.0, 2.0]]), 4: torch.tensor([[3.0, -1.0]])}
    for step, w in states.items():
        with torch.no_grad():
            layer.weight.copy_(w)
        avg.update(step)
    avg.update(4)  # no new steps: no change
    # weights: the first state stands for steps 1-3, the second for step 4; d = 0.5
    w1, w2 = (1 - 0.5**3) * 0.5, 0.5
    expected = (w1 * states[3] + w2 * states[4]) / (w1 + w2)
    avg.copy_to_model()
    torch.testing.assert_close(layer.weight.detach(), expected)

    fresh = WeightAverage(layer, decay=0.5)
    fresh.load_state_dict(avg.state_dict())
    assert fresh.steps == 4 and fresh.weight == pytest.approx(avg.weight)
    with pytest.raises(ValueError, match="lacks"):
        WeightAverage(nn.Linear(3, 3), 0.5).load_state_dict(avg.state_dict())


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1, 1.5])
def test_a_decay_outside_zero_one_is_refused(decay: float) -> None:
    with pytest.raises(ValueError, match="ema_decay must be in"):
        TrainConfig(method="aol", size="xxs", dataset="digits", epochs=1, ema_decay=decay)


def test_cli_flag_reaches_the_config() -> None:
    (cfg,) = configs_from_args(
        build_parser().parse_args(
            ["--method", "aol", "--dataset", "digits", "--epochs", "1", "--ema", "0.99"]
        )
    )
    assert cfg.ema_decay == 0.99


def test_a_run_exports_the_average_and_resumes_it(tmp_path) -> None:
    digits = load_dataset("digits")
    cfg = TrainConfig(
        method="aol", size="xxs", dataset="digits", epochs=6, out=str(tmp_path), store=False,
        ema_decay=0.9, guard_every=5,
    )
    result = train(cfg, data=digits)
    ckpt = load_checkpoint(result.run_dir)
    average = ckpt["average"]
    assert average["steps"] == result.report["steps"] and 0 < average["weight"] <= 1
    # The checkpoint keeps the last weights; the exported model is the average of the states.
    name = next(iter(average["average"]))
    last = ckpt["model"][name]
    mean = average["average"][name] / average["weight"]
    assert not torch.allclose(last, mean)
    report = json.loads((result.run_dir / "report.json").read_text())
    assert report["ema_decay"] == 0.9
    assert report["clean_accuracy"] > 0.5 and report["lipschitz_bound"] <= 1.0 + 1e-4

    more = TrainConfig(**{**cfg.to_dict(), "epochs": 7, "eval_eps": cfg.eval_eps})
    again = train(more, resume=result.run_dir, data=digits)
    resumed = load_checkpoint(again.run_dir)["average"]
    assert resumed["steps"] == again.report["steps"] > average["steps"]

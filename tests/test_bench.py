"""bench: each subcommand on tiny settings, through the real CLI; the formulas against
FlopCounter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.__main__ import main
from bench.complexity import formula_costs, layer_shapes
from bench.layers import LayersConfig
from bench.service_load import check_loopback
from models import create_model
from tests.http_stand_in import JSONHandler, serving

TINY = ["--methods", "aol,standard", "--sizes", "xxs", "--input", "1x8x8", "--repeats", "2",
        "--batch", "4", "--infer-batches", "1,4"]


@pytest.fixture(scope="module")
def layers_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("layers")
    assert main(["layers", *TINY, "--out", str(out)]) == 0
    return out


def test_layers_writes_every_figure_with_ratios(layers_out):
    doc = json.loads((layers_out / "layers.json").read_text())
    assert doc["benchmark"] == "layers"
    for key in ("cpu_model", "logical_cores", "torch", "onnxruntime", "gpu"):
        assert key in doc["machine"]
    rows = {r["method"]: r for r in doc["results"]}
    assert set(rows) == {"aol", "standard"}
    for r in rows.values():
        for key in ("train_ms", "train_images_per_s", "eager_ms_b1", "eager_ms_b4", "onnx_ms_b1",
                    "onnx_ms_b4", "train_peak_mb", "infer_peak_mb", "onnx_peak_mb",
                    "flops_train_gflop", "flops_infer_gflop", "formula_train_gmacs"):
            assert r[key] > 0, key
        assert len(r["raw"]["train_s"]) == 2
        assert r["onnx_max_abs_diff"] < 1e-4
        assert r["params"] == rows["standard"]["params"]
    assert rows["standard"]["train_ms_vs_standard"] == 1.0
    assert rows["aol"]["onnx_ms_b4_vs_standard"] == pytest.approx(
        rows["aol"]["onnx_ms_b4"] / rows["standard"]["onnx_ms_b4"])
    # AOL's Gram computation is batch-independent work that Standard does not have.
    assert rows["aol"]["flops_param_gflop"] > 0 == rows["standard"]["flops_param_gflop"]
    assert rows["aol"]["flops_infer_gflop"] == rows["standard"]["flops_infer_gflop"]
    assert (layers_out / "onnx" / "aol-xxs.onnx").stat().st_size > 0
    md = (layers_out / "layers.md").read_text()
    assert "| aol | xxs |" in md and "Ratios to standard" in md
    header = (layers_out / "layers.csv").read_text().splitlines()[0].split(",")
    assert "onnx_ms_b1_vs_standard" in header and "raw" not in header


def test_inference_formula_matches_flop_counter_for_plain_convs():
    # Standard is nothing but plain convolutions: FlopCounter's FLOPs are exactly 2 × the MACs.
    from bench.complexity import count_flops

    model = create_model("standard", "xxs", 1, 10, 8).eval()
    plain = model.export()
    import torch

    with torch.no_grad():
        flops = count_flops(lambda: plain(torch.rand(1, 1, 8, 8)))
    costs = formula_costs("standard", layer_shapes(model, (1, 8, 8)), batch=1)
    assert 2 * costs["infer_gmacs"] * 1e9 == pytest.approx(flops, rel=1e-9)
    assert len(layer_shapes(model, (1, 8, 8))) == 1 + 3 * 3 + 1  # stem, 3 blocks × depth 3, head


def test_bad_layers_settings_name_the_allowed_values():
    with pytest.raises(ValueError, match="unknown method 'aoll'; choose from .*aol"):
        LayersConfig(methods=("aoll",)).validate()
    with pytest.raises(ValueError, match="unknown size 'xl'"):
        LayersConfig(methods=("aol",), sizes=("xl",)).validate()
    assert main(["layers", "--methods", "aol", "--input", "3x32"]) == 2


def _write_report(root: Path, method: str, acc: float, cra: dict[str, float]) -> None:
    run = root / "digits" / f"{method}-xxs-20260101-000000"
    run.mkdir(parents=True)
    (run / "report.json").write_text(json.dumps(dict(
        method=method, size="xxs", dataset="digits", clean_accuracy=acc,
        certified_accuracy=cra, train_seconds=60.0, images_per_s=1000.0,
    )))


def test_report_joins_runs_with_bench_and_plots(layers_out, tmp_path):
    runs = tmp_path / "runs"
    _write_report(runs, "aol", 0.9, {"0.1412": 0.7, "0.2824": 0.5, "1.0000": 0.1})
    _write_report(runs, "standard", 0.95, {"0.1412": 0.0, "0.2824": 0.0, "1.0000": 0.0})
    out = tmp_path / "report"
    assert main(["report", str(runs), "--bench", str(layers_out / "layers.json"),
                 "--out", str(out)]) == 0
    doc = json.loads((out / "report.json").read_text())
    rows = {r["method"]: r for r in doc["rows"]}
    assert doc["epsilon"] == "0.1412"
    bench = {
        r["method"]: r for r in json.loads((layers_out / "layers.json").read_text())["results"]
    }
    assert rows["aol"]["bench_train_ms"] == bench["aol"]["train_ms"]
    assert rows["aol"]["radar_RA"] == 1.0 and rows["standard"]["radar_RA"] == 0.0
    assert rows["standard"]["radar_A"] == 1.0
    assert rows["aol"]["radar_A"] == pytest.approx(0.9 / 0.95)
    for axis in ("TT", "IT", "TM", "IM"):  # costs inverted: the cheaper method is on the rim
        vals = [rows[m][f"radar_{axis}"] for m in rows]
        assert max(vals) == 1.0 and 0 < min(vals) <= 1.0
    for name in ("radar-digits-xxs.png", "cra-digits.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_lines = (out / "report.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and "cra_0.1412" in csv_lines[0]
    assert "![radar-digits-xxs](radar-digits-xxs.png)" in (out / "report.md").read_text()


def test_report_without_training_reports_is_an_error(layers_out, tmp_path):
    assert main(["report", str(layers_out), "--out", str(tmp_path / "r")]) == 2


class _StandIn(JSONHandler):
    """Mimics the service's POST /models and /predict_tensor; model 'broken' answers 500."""

    session = None

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/models":
            self.send_json(200, dict(default_model="tiny", models=[
                dict(name="tiny", input_shape=[1, 8, 8]),
                dict(name="broken", input_shape=[1, 8, 8]),
            ]))
        elif self.path == "/predict_tensor" and body.get("model") == "tiny":
            x = np.asarray(body["images"], dtype=np.float32)
            logits = self.session.run(None, {"image": x})[0]
            self.send_json(200, [dict(label=int(z.argmax()), scores=z.tolist(), inference_ms=0.1)
                                 for z in logits])
        else:
            self.send_json(500, dict(error="broken"))


@pytest.fixture()
def stand_in(layers_out):
    from bench.onnx_io import ort_session

    handler = type(
        "Handler", (_StandIn,), {"session": ort_session(layers_out / "onnx" / "aol-xxs.onnx")}
    )
    with serving(handler) as url:
        yield url


def test_service_load_levels_and_http_overhead(stand_in, layers_out, tmp_path):
    out = tmp_path / "svc"
    assert main(["service", "--url", stand_in, "--requests", "6", "--seconds", "20",
                 "--concurrency", "1,3", "--batch", "2",
                 "--onnx", str(layers_out / "onnx" / "aol-xxs.onnx"), "--out", str(out)]) == 0
    doc = json.loads((out / "service.json").read_text())
    assert doc["model"] == "tiny" and doc["input_shape"] == [1, 8, 8]
    assert [lev["concurrency"] for lev in doc["levels"]] == [1, 3]
    for lev in doc["levels"]:
        assert lev["ok"] == lev["requests"] == 6 and lev["errors"] == 0
        assert 0 < lev["p50_ms"] <= lev["p95_ms"] <= lev["p99_ms"]
        assert lev["images_per_s"] == pytest.approx(2 * lev["requests_per_s"])
        assert lev["server_inference_p50_ms"] == 0.1
        assert lev["http_over_ort_p50"] == pytest.approx(lev["p50_ms"] / doc["ort"]["p50_ms"])
    assert doc["ort"]["runs"] == 6
    assert "p50 ÷ raw ORT" in (out / "service.md").read_text()


def test_service_load_counts_errors(stand_in, tmp_path):
    assert main(["service", "--url", stand_in, "--model", "broken", "--requests", "4",
                 "--concurrency", "2", "--out", str(tmp_path)]) == 0
    (lev,) = json.loads((tmp_path / "service.json").read_text())["levels"]
    assert lev["ok"] == 0 and lev["errors"] == 4 and lev["error_kinds"] == {"HTTP 500": 4}
    assert lev["p50_ms"] is None and lev["requests_per_s"] == 0.0


def test_service_refuses_non_loopback_and_unknown_models(stand_in, tmp_path):
    for url in ("http://10.0.0.1:3000", "http://example.com:80", "https://127.0.0.1:1"):
        with pytest.raises(ValueError):
            check_loopback(url)
    assert check_loopback("http://[::1]:8080") == ("::1", 8080)
    assert check_loopback("http://127.0.0.2:9") == ("127.0.0.2", 9)
    assert main(["service", "--url", "http://192.168.1.1:3000", "--out", str(tmp_path)]) == 2
    assert main(["service", "--url", stand_in, "--model", "nope", "--out", str(tmp_path)]) == 2


def test_issue_17_targets_table_marks_met_and_missed():
    from bench.targets import export_target, targets_markdown

    rows = [
        dict(method="standard", size="s"),
        dict(method="soc", size="s", onnx_ms_b1_vs_standard=4.2, onnx_ms_b256_vs_standard=5.5,
             onnx_speedup_b1=2.3, onnx_speedup_b256=0.8),
        dict(method="aol", size="s", onnx_ms_b1_vs_standard=1.01, onnx_speedup_b1=1.5),
    ]
    assert export_target("soc") == 5.0  # 4 Chebyshev terms at k = 3, plus one
    assert export_target("bro") is None
    lines = targets_markdown(rows, [1, 256]).splitlines()
    assert len(lines) == 4 and "standard" not in "".join(lines)
    assert "| soc | s | ≤ 5 | 4.2 ✓ | 5.5 ✗ | 2.3 ✓ | 0.8 ✗ |" in lines
    assert "| aol | s | ≤ 1.05 | 1.01 ✓ | – | 1.5 ✗ | – |" in lines


def test_round_robin_takes_turns_and_returns_every_sample():
    from bench.timing import time_round_robin

    calls: list[str] = []
    times = time_round_robin(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=2
    )
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3  # warm-up each, then turns
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        time_round_robin({"a": lambda: None}, repeats=0)


def test_batched_round_robin_loops_small_batches_and_divides_back():
    from bench.timing import calls_per_sample, time_batched_round_robin

    calls: list[str] = []
    times = time_batched_round_robin(
        {"one": lambda: calls.append("one"), "big": lambda: calls.append("big")},
        {"one": 1, "big": 256}, repeats=2, warmup=1,
    )
    assert (calls_per_sample(1), calls_per_sample(64), calls_per_sample(1024)) == (16, 4, 1)
    assert calls == ["one"] * 16 + ["big"] + (["one"] * 16 + ["big"]) * 2
    assert {k: len(v) for k, v in times.items()} == {"one": 2, "big": 2}


def test_forms_times_every_graph_form_and_checks_they_agree(tmp_path, capsys):
    out = tmp_path / "forms"
    assert main(["forms", "--methods", "standard", "--size", "xxs", "--input", "1x8x8",
                 "--batches", "1,2", "--repeats", "1", "--out", str(out)]) == 0
    doc = json.loads((out / "forms.json").read_text())
    (row,) = doc["rows"]
    assert row["method"] == "standard" and row["max_abs_diff"] == 0.0
    assert row["nodes"]["2"] < row["nodes"]["1"]  # form 2 has fewer nodes
    from models.graph_form import FORMS

    assert set(row["raw_s"]) == {f"f{f}_b{b}" for f in FORMS for b in (1, 2)}
    assert row["ratio_b1"]["1"] == 1.0 and row["ratio_b2"]["2"] > 0
    assert "| standard |" in capsys.readouterr().out
    assert main(["forms", "--methods", "standard", "--repeats", "0", "--out", str(out)]) == 2


def test_forms_leaves_torch_threads_alone(tmp_path):
    import torch

    before = torch.get_num_threads()
    assert main(["forms", "--methods", "aol", "--size", "xxs", "--input", "1x8x8", "--batches",
                 "1", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == before

"""``python -m bench forms``: every graph form of the same exported network, timed in turns.

The graph forms (:mod:`models.graph_form`) compute the same values with other ONNX operators.
For each method this builds one seeded network, exports its plain network in every form, opens
one ONNX Runtime session per form (as the service does), checks the forms' logits agree, and
times every (method, form, batch) in turns, so a change of load lands on every row alike. The
ratio ``form N ÷ form 1`` is what a change of form is worth on this machine.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.machine import describe_machine
from bench.timing import median, time_batched_round_robin


@dataclass(frozen=True)
class FormsConfig:
    """What ``bench forms`` measures (see the command's ``--help``)."""

    methods: tuple[str, ...]
    size: str = "s"
    input_shape: tuple[int, int, int] = (3, 32, 32)
    num_classes: int = 10
    batches: tuple[int, ...] = (1, 256)
    repeats: int = 5
    threads: int = 1
    device: str = "cpu"
    seed: int = 0
    out: Path = Path("bench_results/forms")

    def validate(self) -> None:
        if not self.methods:
            raise ValueError("no methods to measure")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batches must be >= 1, got {self.batches}")


def _sessions(cfg: FormsConfig, method: str) -> tuple[dict[int, Any], dict[str, Any]]:
    """One ORT session per graph form of ``method``'s seeded network, and its row."""
    from certify.artifact import default_providers, open_session
    from certify.artifact.structure import export_proto
    from models.export import to_plain
    from models.graph_form import FORMS
    from models.registry import create_model

    c, h, _ = cfg.input_shape
    torch.manual_seed(cfg.seed)
    model = create_model(method, cfg.size, c, cfg.num_classes, h).eval()
    plain = to_plain(model)
    sessions, row = {}, {"method": method, "size": cfg.size, "nodes": {}, "providers": {}}
    for form in FORMS:
        proto = export_proto(plain, cfg.input_shape, form)
        row["nodes"][form] = len(proto.graph.node)
        sessions[form] = open_session(
            proto.SerializeToString(), default_providers(cfg.device == "cuda"), cfg.threads
        )
        row["providers"][form] = sessions[form].get_providers()
    check = np.random.default_rng(cfg.seed).random((2, *cfg.input_shape), dtype=np.float32)
    logits = {f: s.run(None, {"image": check})[0] for f, s in sessions.items()}
    first = logits[min(logits)]
    row["max_abs_diff"] = max(float(np.abs(v - first).max()) for v in logits.values())
    return sessions, row


def run_forms(cfg: FormsConfig) -> dict[str, Any]:
    """Measure; write ``forms.json`` and ``forms.md`` under ``cfg.out``; return the document."""
    cfg.validate()
    rows, calls, batches = [], {}, {}
    rng = np.random.default_rng(cfg.seed)
    inputs = {b: rng.random((b, *cfg.input_shape), dtype=np.float32) for b in cfg.batches}
    for method in cfg.methods:
        sessions, row = _sessions(cfg, method)
        rows.append(row)
        for form, session in sessions.items():
            for b in cfg.batches:
                key = (method, form, b)
                calls[key] = lambda s=session, x=inputs[b]: s.run(None, {"image": x})
                batches[key] = b
    times = time_batched_round_robin(calls, batches, repeats=cfg.repeats)
    for row in rows:
        row["raw_s"] = {f"f{f}_b{b}": times[m, f, b] for (m, f, b) in times if m == row["method"]}
        for b in cfg.batches:
            ms = {f: 1e3 * median(row["raw_s"][f"f{f}_b{b}"]) for f in row["nodes"]}
            row[f"ms_b{b}"] = ms
            row[f"ratio_b{b}"] = {f: ms[f] / ms[min(ms)] for f in ms}
    doc = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "machine": describe_machine(cfg.device),
        "rows": rows,
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "forms.json").write_text(json.dumps(doc, indent=1, default=str), encoding="utf-8")
    (cfg.out / "forms.md").write_text(forms_markdown(doc), encoding="utf-8")
    return doc


def forms_markdown(doc: dict[str, Any]) -> str:
    """The table: per method, nodes and median ms per form and batch, each form ÷ form 1."""
    cfg = doc["config"]
    batches = cfg["batches"]
    head = "| method | nodes | " + " | ".join(f"ms b{b}" for b in batches)
    head += " | " + " | ".join(f"÷ form 1, b{b}" for b in batches) + " | max abs Δ |"
    lines = [
        f"Graph forms, size {cfg['size']}, input {cfg['input_shape']}, ONNX Runtime "
        f"{cfg['device'].upper()}, "
        f"{cfg['threads']} thread(s), median of {cfg['repeats']} samples taken in turns.",
        "",
        head,
        "|" + "---|" * (3 + 2 * len(batches)),
    ]
    for row in doc["rows"]:
        forms = sorted(row["nodes"], key=int)
        nodes = " → ".join(str(row["nodes"][f]) for f in forms)
        ms = [" → ".join(f"{row[f'ms_b{b}'][f]:.2f}" for f in forms) for b in batches]
        ratios = [" / ".join(f"{row[f'ratio_b{b}'][f]:.2f}" for f in forms[1:]) for b in batches]
        lines.append(
            f"| {row['method']} | {nodes} | " + " | ".join(ms) + " | " + " | ".join(ratios)
            + f" | {row['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"

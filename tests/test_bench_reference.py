"""bench reference: lipcert's layers timed against a checkout of the comparison paper's code.

The paper's code is not part of lipcert, so the test writes a stand-in checkout with the same
layout (``lipnn/layers/lipschitz/<module>.py``, relative imports inside the package) whose layers
are plain convolutions; the real comparison is ``python -m bench reference --reference-dir DIR``
(docs/bench.md)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.__main__ import main

_HELPER = (
    "from torch import nn\n\n\n"
    "def make(cin, cout, k):\n    return nn.Conv2d(cin, cout, k, padding=k // 2)\n"
)
_AOL = (
    "from torch import nn\n\nfrom .helper import make\n\n\n"
    "class AOLConv2d(nn.Module):\n"
    "    def __init__(self, cin, cout, k, **kwargs):\n"
    "        super().__init__()\n        self.conv = make(cin, cout, k)\n\n"
    "    def forward(self, x):\n        return self.conv(x)\n"
)
_BROKEN = "import a_module_that_does_not_exist\n"


def _checkout(root: Path) -> Path:
    pkg = root / "lipnn" / "layers" / "lipschitz"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text(_HELPER)
    (pkg / "aol.py").write_text(_AOL)
    (pkg / "sll.py").write_text(_BROKEN)
    # lipcert has a package called ``models``; so does the paper: it must never shadow ours.
    (root / "models").mkdir()
    (root / "models" / "__init__.py").write_text("raise ImportError('the wrong models package')\n")
    return root


def test_reference_rows_ratios_and_a_method_that_cannot_run(tmp_path: Path, capsys) -> None:
    ref = _checkout(tmp_path / "ref")
    out = tmp_path / "out"
    argv = ["reference", "--reference-dir", str(ref), "--methods", "aol,sll", "--batch", "2",
            "--channels", "4", "--size", "8", "--repeats", "3", "--warmup", "1", "--out", str(out)]
    assert main(argv) == 0
    doc = json.loads((out / "reference.json").read_text())
    rows = {r["method"]: r for r in doc["rows"]}
    aol = rows["aol"]
    assert aol["lipcert_ms"] > 0 and aol["reference_ms"] > 0
    assert abs(aol["ratio"] - aol["lipcert_ms"] / aol["reference_ms"]) < 1e-9
    assert rows["sll"]["ratio"] is None and "ModuleNotFoundError" in rows["sll"]["error"]
    table = (out / "reference.md").read_text()
    assert "| aol |" in table and "lipcert ÷ ref" in table
    assert "batch 2, 4 channels, 8×8" in capsys.readouterr().out


def test_reference_bad_arguments_exit_2_naming_the_value(tmp_path: Path, capsys) -> None:
    assert main(["reference", "--reference-dir", str(tmp_path)]) == 2
    assert "no lipnn/layers/lipschitz/aol.py" in capsys.readouterr().err
    ref = _checkout(tmp_path / "ref")
    assert main(["reference", "--reference-dir", str(ref), "--methods", "aol,nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'nope'" in err and "aol, bcop" in err

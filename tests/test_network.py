"""LipNet: parameter counts, shapes for every dataset geometry, export of the whole network."""

from __future__ import annotations

import pytest
import torch

from models import create_model, list_methods
from models.network import SIZES

PAPER_PARAMS = {"xs": 1.57e6, "s": 6.28e6, "m": 25.12e6, "l": 100.46e6}


@pytest.mark.parametrize("size", ["xs", "s", "m", "l"])
def test_aol_parameter_counts_match_the_paper(size):
    model = create_model("aol", size)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - PAPER_PARAMS[size]) / PAPER_PARAMS[size] < 0.01, n


def test_standard_xs_count_is_exact():
    assert sum(p.numel() for p in create_model("standard", "xs").parameters()) == 1_572_288


@pytest.mark.parametrize(
    "in_channels,classes,image_size", [(1, 10, 28), (1, 10, 8), (3, 100, 32), (3, 200, 64)]
)
def test_shapes_for_every_dataset_geometry(in_channels, classes, image_size):
    model = create_model("aol", "xxs", in_channels, classes, image_size)
    out = model(torch.rand(2, in_channels, image_size, image_size))
    assert out.shape == (2, classes)


@pytest.mark.parametrize("method", list_methods())
def test_whole_network_export_equals_eval_forward(method):
    model = create_model(method, "xxs", 1, 10, 28).eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model.export()(x), model(x), atol=1e-5, rtol=0)


def test_bad_names_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown size 'xl'; choose from xxs, xs, s, m, l"):
        create_model("aol", "xl")
    with pytest.raises(ValueError, match="unknown method"):
        create_model("nope")
    assert list(SIZES) == ["xxs", "xs", "s", "m", "l"]

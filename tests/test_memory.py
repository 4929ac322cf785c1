"""The resettable peak-RSS probe that keeps the runs of one sweep from sharing a peak."""

from __future__ import annotations

import sys

import pytest

from training.memory import peak_rss_bytes, reset_peak_rss


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_reset_forgets_an_earlier_peak():
    # Start from the current RSS: an earlier test of this process may have left a peak above it.
    assert reset_peak_rss()
    before = peak_rss_bytes()
    block = bytearray(256 * 2**20)
    block[:: 4096] = b"\1" * len(block[:: 4096])  # touch every page so it is resident
    high = peak_rss_bytes()
    assert high >= before + 200 * 2**20
    del block
    assert reset_peak_rss()
    assert peak_rss_bytes() <= high - 200 * 2**20  # a later run would not inherit the peak

"""Shared benchmark helpers."""

import pytest

from benchmarks._lib import wilson_interval


def test_wilson_interval_against_hand_computed_values():
    # 45 of 60: centre (0.75 + 3.8416/120) / (1 + 3.8416/60) = 0.73496,
    # half-width 1.96 sqrt(0.1875/60 + 3.8416/14400) / 1.06403 = 0.10728 (by hand)
    low, high = wilson_interval(0.75, 60)
    assert low == pytest.approx(0.62768, abs=1e-4) and high == pytest.approx(0.84224, abs=1e-4)
    low, high = wilson_interval(1.0, 60)  # all successes: the low end is n / (n + z^2)
    assert high == pytest.approx(1.0) and low == pytest.approx(60 / (60 + 1.96**2), abs=1e-9)
    assert wilson_interval(0.0, 0) == (0.0, 1.0)


def test_claim_refuses_a_live_holder_and_takes_over_a_dead_ones(tmp_path):
    import subprocess
    import sys

    from benchmarks._lib import claim

    assert claim(tmp_path) is True
    assert (tmp_path / ".claim").read_text() == str(__import__("os").getpid())
    assert claim(tmp_path) is False  # held by a live process (this one)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".claim").write_text(str(dead.pid))  # its process is gone: stale
    assert claim(tmp_path) is True
    (tmp_path / ".claim").write_text("")  # a writer that died before writing its pid
    assert claim(tmp_path) is True

"""The node's input bookkeeping without ROS: images lost on the way, told by gaps in the input stamps."""

from __future__ import annotations

import numpy as np
import pytest

from tscm_ros.node.inputs import StampGaps

PERIOD_NS = 1e9 / 30  # a 30 Hz camera


def _gaps(stamps) -> StampGaps:
    gaps = StampGaps()
    for stamp in stamps:
        gaps.add(int(stamp))
    return gaps


def _jittered(count: int, jitter: float, seed: int = 0) -> np.ndarray:
    """Stamps at exactly the period, each off by up to ``jitter`` periods either way (a busy publisher's clock)."""
    offsets = np.random.default_rng(seed).uniform(-jitter, jitter, count)
    return (10**12 + (np.arange(count) + offsets) * PERIOD_NS).astype(np.int64)


@pytest.mark.parametrize("jitter", [0.0, 0.1, 0.2, 0.25])
def test_an_evenly_stamped_stream_with_jitter_loses_nothing(jitter):
    """A minute at 30 Hz, every image arrives: none counted lost (the low-percentile period counted some)."""
    gaps = _gaps(_jittered(1800, jitter))
    assert gaps.lost == 0 and gaps.recent_loss == 0.0
    assert gaps.rate_hz == pytest.approx(30.0, rel=0.05)


def test_a_late_stamp_then_an_early_one_is_jitter_not_a_loss():
    stamps = 10**12 + np.arange(40) * PERIOD_NS
    stamps[20] += 0.6 * PERIOD_NS  # a step of 1.6 periods, then one of 0.4
    assert _gaps(stamps).lost == 0


@pytest.mark.parametrize("jitter", [0.0, 0.2])
def test_lost_images_are_counted_through_jitter(jitter):
    stamps = _jittered(1800, jitter)
    arrived = np.ones(len(stamps), bool)
    arrived[25::50] = False  # one image in 50 never arrives
    assert _gaps(stamps[arrived]).lost == 36


def test_the_period_holds_while_most_images_are_lost():
    stamps = _jittered(2000, 0.0)
    arrived = np.random.default_rng(1).random(len(stamps)) >= 0.8  # 80 % lost
    arrived[0] = True
    gaps = _gaps(stamps[arrived])
    assert gaps.lost == pytest.approx((~arrived).sum(), rel=0.02)  # the first five steps only estimate the period
    assert gaps.rate_hz == pytest.approx(30.0, rel=0.01)

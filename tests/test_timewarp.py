"""The learned time warp (dimba/objectives/gaussian/timewarp.py): its fit, its draws and its state."""
import math
import random

import pytest
import torch

from dimba.config.schema import DiffusionConfig
from dimba.objectives.gaussian.loss import draw_noise
from dimba.objectives.gaussian.timewarp import LearnedTimeWarp, isotonic


def test_isotonic_is_the_least_squares_non_decreasing_fit():
    assert isotonic([1.0, 3.0, 2.0, 4.0], [1.0, 1.0, 1.0, 1.0]) == [1.0, 2.5, 2.5, 4.0]
    assert isotonic([5.0, 1.0], [3.0, 1.0]) == [4.0, 4.0]          # weighted mean of the pooled block
    rng = random.Random(0)
    values = [rng.gauss(0, 1) for _ in range(50)]
    fit = isotonic(values, [rng.random() + 0.1 for _ in range(50)])
    assert all(a <= b for a, b in zip(fit, fit[1:]))


def ce_of(t: torch.Tensor) -> torch.Tensor:
    """A loss curve shaped like text diffusion's: flat near 0, a steep rise around t = 0.8, flat at 7 nats."""
    return 7.0 * torch.sigmoid((t - 0.8) * 30.0)


def trained_warp(steps: int = 30, start_step: int = 5) -> LearnedTimeWarp:
    warp = LearnedTimeWarp(t_min=1e-3, t_power=0.33, start_step=start_step)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        u = torch.rand(256, generator=g, dtype=torch.float64)
        t = torch.tensor([warp.t_of_u(x) for x in u.tolist()])
        tokens = torch.full((256,), 100.0)
        warp.observe(t, (ce_of(t) + 0.3 * torch.randn(256, generator=g)) * tokens, tokens)
        warp.update()
    return warp


def test_the_power_warp_with_the_floor_stands_in_until_the_start_step():
    warp = LearnedTimeWarp(t_min=1e-3, t_power=0.33, start_step=5)
    assert not warp.active
    assert warp.t_of_u(0.05) == pytest.approx(1e-3 + 0.999 * 0.5)                # floor: uniform t
    assert warp.t_of_u(0.55) == pytest.approx(1e-3 + 0.999 * 0.5 ** 0.33)        # then the power warp
    assert not trained_warp(steps=4).active and trained_warp(steps=5).active


def test_learned_draws_follow_the_slope_of_the_loss():
    warp = trained_warp()
    ts = torch.tensor([warp.t_of_u((i + 0.5) / 20000) for i in range(20000)])
    # (1 - floor) of the draws follow dCE/dt, whose mass lies within 0.8 +- 0.1 (98% of the rise)
    inside = ((ts > 0.7) & (ts < 0.9)).float().mean().item()
    assert inside > 0.9 * 0.98 * 0.9
    assert ts.median().item() == pytest.approx(0.8, abs=0.02)
    # the inverse CDF and the stated density agree bin by bin
    hist = torch.bincount(warp.bin_of(ts), minlength=warp.bins).double() / len(ts)
    assert torch.allclose(hist, torch.tensor(warp.density(), dtype=torch.float64), atol=2e-3)
    assert math.isclose(sum(warp.density()), 1.0, rel_tol=1e-9)


def test_state_round_trip_draws_the_same_times():
    warp = trained_warp()
    other = LearnedTimeWarp(t_min=1e-3, t_power=0.33, start_step=5)
    other.load_state_dict(warp.state_dict())
    us = [i / 997 for i in range(997)]
    assert [warp.t_of_u(u) for u in us] == [other.t_of_u(u) for u in us]
    with pytest.raises(ValueError, match="bins"):
        LearnedTimeWarp(1e-3, 0.33, 5, bins=32).load_state_dict(warp.state_dict())


def test_draw_noise_takes_its_times_from_the_warp():
    cfg = DiffusionConfig(time_warp="learned", t_power=0.33)
    warp = trained_warp()
    seeds = list(range(64))
    with_warp = draw_noise(cfg, seeds, 4, 2, warp=warp)
    plain = draw_noise(cfg, seeds, 4, 2)
    assert torch.equal(with_warp.noise, plain.noise)       # only t changes
    u = [torch.rand(3, generator=torch.Generator().manual_seed(s), dtype=torch.float64)[0].item() for s in seeds]
    assert with_warp.t.tolist() == pytest.approx([warp.t_of_u(x) for x in u])

"""draw_clean_mask: the mixture of modes and the shape of each mode, counted over many draws."""
from __future__ import annotations

import math

import pytest
import torch

from dimba.config.schema import CleanMaskConfig
from dimba.data.masks import draw_clean_mask


def runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of every run of True."""
    out, start = [], None
    for i, v in enumerate(mask.tolist() + [False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i - start))
            start = None
    return out


def classify(mask: torch.Tensor) -> str:
    r = runs(mask)
    if not r:
        return "none"
    if len(r) == 1 and r[0][0] == 0:
        return "prefix"
    if len(r) == 2 and r[0][0] == 0 and sum(r[1]) == len(mask):
        return "infill"
    return "spans"


def test_mixture_frequencies_and_shapes():
    L = 200
    cfg = CleanMaskConfig(none=0.1, prefix=0.2, infill=0.3, spans=0.4, prefix_frac=(0.1, 0.5),
                          suffix_frac=(0.1, 0.3), span_frac=(0.2, 0.4), span_count=(2, 4))
    g = torch.Generator().manual_seed(0)
    n = 4000
    counts = {m: 0 for m in ("none", "prefix", "infill", "spans")}
    for _ in range(n):
        mask = draw_clean_mask(cfg, L, g)
        assert mask.dtype == torch.bool and mask.shape == (L,)
        mode = classify(mask)
        counts[mode] += 1
        r = runs(mask)
        if mode == "prefix":
            assert int(0.1 * L) <= r[0][1] <= int(0.5 * L)
        elif mode == "infill":
            assert int(0.1 * L) <= r[0][1] <= int(0.5 * L) and int(0.1 * L) <= r[1][1] <= int(0.3 * L)
        elif mode == "spans":
            assert 2 <= len(r) <= 4 and int(0.2 * L) <= int(mask.sum()) <= int(0.4 * L)
            assert not (r[0][0] == 0 and len(r) == 1)
    for mode, p in (("none", 0.1), ("prefix", 0.2), ("infill", 0.3), ("spans", 0.4)):
        # spans that happen to touch both ends look like infill: a small, bounded leak
        assert abs(counts[mode] / n - p) < 5 * math.sqrt(p * (1 - p) / n) + (0.02 if mode in ("infill", "spans") else 0)


def test_each_mode_alone_and_a_noisy_position_always_remains():
    g = torch.Generator().manual_seed(1)
    for L in (2, 3, 5, 16, 64):
        for mode in ("prefix", "infill", "spans"):
            cfg = CleanMaskConfig(none=0.0, **{mode: 1.0}, prefix_frac=(0.0, 0.99), suffix_frac=(0.0, 0.99),
                                  span_frac=(0.0, 0.99), span_count=(1, 8))
            for _ in range(200):
                mask = draw_clean_mask(cfg, L, g)
                assert not mask.all(), (L, mode)
                if mode == "prefix":
                    assert len(runs(mask)) <= 1 and (not mask.any() or mask[0])
    none = CleanMaskConfig()
    assert not draw_clean_mask(none, 32, g).any()


def test_span_count_and_fraction_ranges_are_reached():
    cfg = CleanMaskConfig(none=0.0, spans=1.0, span_frac=(0.1, 0.5), span_count=(1, 4))
    g = torch.Generator().manual_seed(2)
    L = 256
    seen_counts, fractions = set(), []
    for _ in range(1500):
        mask = draw_clean_mask(cfg, L, g)
        seen_counts.add(len(runs(mask)))
        fractions.append(mask.float().mean().item())
    assert seen_counts == {1, 2, 3, 4}
    assert min(fractions) < 0.12 and max(fractions) > 0.48
    assert abs(sum(fractions) / len(fractions) - 0.3) < 0.02


def test_same_generator_state_gives_same_mask():
    cfg = CleanMaskConfig(none=0.25, prefix=0.25, infill=0.25, spans=0.25)
    a = [draw_clean_mask(cfg, 100, torch.Generator().manual_seed(s)) for s in range(50)]
    b = [draw_clean_mask(cfg, 100, torch.Generator().manual_seed(s)) for s in range(50)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len({tuple(x.tolist()) for x in a}) > 30


@pytest.mark.parametrize("bad", [dict(none=0.5, prefix=0.6), dict(none=1.0, prefix_frac=(0.5, 1.0)),
                                 dict(none=1.0, span_count=(0, 2))])
def test_invalid_config_is_rejected(bad):
    from dimba.config.core import ConfigError
    with pytest.raises(ConfigError):
        CleanMaskConfig(**bad).validate()

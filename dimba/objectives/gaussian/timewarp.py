"""A time warp learned from the loss (CDCD: Dieleman et al. 2022, "Continuous diffusion for categorical data").

The denoiser's token cross-entropy CE(t) rises from ~0 (every token readable from its own noisy vector) to about
the unigram entropy (pure noise). Where it is flat, a training sample teaches little: the answer is either already
visible or not yet knowable. The learned warp draws training times with density proportional to dCE/dt, so the
model trains where its prediction changes; CDCD's F(t) is our CE curve, normalised to a CDF.

How the curve is estimated online:
    K equal bins of t over [t_min, 1]; each keeps a decayed sum of the token CE and of the token count of the
    training samples whose t fell in it (summed over ranks after every optimizer step: every rank holds the same
    warp); bin means, made non-decreasing in t by isotonic regression weighted by counts (pool adjacent violators),
    are interpolated linearly between bin centres to F at the bin edges (flat beyond the outer centres).
    Bin k then holds mass F(e_k+1) - F(e_k), uniform inside the bin.
Every draw mixes in `floor` of uniform t, so each bin keeps being measured (else a bin the warp neglects could
never show that it deserves more), and the fixed power warp (diffusion.t_power) stands in for the learned one
until `start_step` optimizer steps are done (the first curve is noise).

The warp is a pure function of its state (two K-vectors and a step count) and u, so a resumed run that restores
the state draws exactly what an uninterrupted one would; the trainer keeps it in the checkpoint's client state.
"""
from __future__ import annotations

import bisect

import torch
import torch.distributed as dist

BINS = 64           # resolution of the CE curve in t
DECAY = 0.99        # per optimizer step: the curve follows the last ~100 steps as the model learns
FLOOR = 0.1         # share of uniform t in every draw


def isotonic(values: list[float], weights: list[float]) -> list[float]:
    """Least-squares non-decreasing fit (pool adjacent violators); zero-weight entries take their block's value."""
    blocks: list[list[float]] = []          # [value, weight, length]
    for v, w in zip(values, weights):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks[-1]
            w = w1 + w2
            blocks[-1] = [(v1 * w1 + v2 * w2) / w if w > 0 else max(v1, v2), w, n1 + n2]
    out: list[float] = []
    for v, _, n in blocks:
        out += [v] * n
    return out


class LearnedTimeWarp:
    def __init__(self, t_min: float, t_power: float, start_step: int, bins: int = BINS, decay: float = DECAY,
                 floor: float = FLOOR):
        self.t_min, self.t_power, self.start_step = t_min, t_power, start_step
        self.bins, self.decay, self.floor = bins, decay, floor
        self.ce_sum = torch.zeros(bins, dtype=torch.float64)
        self.count = torch.zeros(bins, dtype=torch.float64)
        self._new = torch.zeros(2, bins, dtype=torch.float64)   # this step's observations on this rank
        self.steps = 0
        self._cdf: list[float] | None = None                   # cumulative bin masses of the learned part

    # ---- drawing ------------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether draws use the learned curve (else the power warp), beside the uniform floor."""
        return self.steps >= self.start_step and self._cdf is not None

    def t_of_u(self, u: float) -> float:
        """The training time for a uniform u in [0, 1): one uniform serves the whole mixture."""
        span = 1.0 - self.t_min
        if u < self.floor:
            return self.t_min + span * u / self.floor
        v = (u - self.floor) / (1.0 - self.floor)
        if not self.active:
            return self.t_min + span * v ** self.t_power
        cdf = self._cdf
        k = min(bisect.bisect_right(cdf, v * cdf[-1]) - 1, self.bins - 1)
        k = max(k, 0)
        mass = cdf[k + 1] - cdf[k]
        within = (v * cdf[-1] - cdf[k]) / mass if mass > 0 else 0.5
        return self.t_min + span * (k + min(max(within, 0.0), 1.0)) / self.bins

    def density(self) -> list[float]:
        """Probability of each bin under the current draw (floor included)."""
        if self.active:
            cdf = self._cdf
            learned = [(cdf[k + 1] - cdf[k]) / cdf[-1] for k in range(self.bins)]
        else:
            edges = [(k / self.bins) ** (1.0 / self.t_power) for k in range(self.bins + 1)]
            learned = [edges[k + 1] - edges[k] for k in range(self.bins)]
        return [self.floor / self.bins + (1.0 - self.floor) * p for p in learned]

    # ---- learning the curve ------------------------------------------------------------------------------
    def bin_of(self, t: torch.Tensor) -> torch.Tensor:
        pos = (t.double().cpu() - self.t_min) / (1.0 - self.t_min) * self.bins
        return pos.floor().long().clamp(0, self.bins - 1)

    def observe(self, t: torch.Tensor, ce_sum: torch.Tensor, tokens: torch.Tensor) -> None:
        """Record a micro-batch: per-sample time t (B,), summed token CE (B,) and scored token count (B,)."""
        k = self.bin_of(t)
        self._new[0].index_add_(0, k, ce_sum.detach().double().cpu())
        self._new[1].index_add_(0, k, tokens.detach().double().cpu())

    def update(self, device: torch.device | str = "cpu") -> None:
        """After an optimizer step: sum the step's observations over ranks (collective) and refit the curve."""
        new = self._new.to(device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(new, op=dist.ReduceOp.SUM)
        new = new.cpu()
        self.ce_sum.mul_(self.decay).add_(new[0])
        self.count.mul_(self.decay).add_(new[1])
        self._new.zero_()
        self.steps += 1
        self._refit()

    def curve(self) -> list[float] | None:
        """Non-decreasing mean CE per bin (None before any observation); empty bins take their neighbours'."""
        seen = [k for k in range(self.bins) if self.count[k] > 0]
        if len(seen) < 2:
            return None
        means = [float(self.ce_sum[k] / self.count[k]) for k in seen]
        fit = isotonic(means, [float(self.count[k]) for k in seen])
        centres = [k + 0.5 for k in seen]
        out = []
        for k in range(self.bins):     # piecewise-linear through the seen bins' centres, flat beyond them
            x = k + 0.5
            j = bisect.bisect_right(centres, x)
            if j == 0:
                out.append(fit[0])
            elif j == len(centres):
                out.append(fit[-1])
            else:
                a, b = centres[j - 1], centres[j]
                out.append(fit[j - 1] + (fit[j] - fit[j - 1]) * (x - a) / (b - a))
        return out

    def _refit(self) -> None:
        curve = self.curve()
        if curve is None:
            self._cdf = None
            return
        # F at the bin edges: centres interpolated, flat outside the outer centres
        edges = [curve[0]] + [(curve[k] + curve[k + 1]) / 2 for k in range(self.bins - 1)] + [curve[-1]]
        cdf = [0.0]
        for k in range(self.bins):
            cdf.append(cdf[-1] + max(edges[k + 1] - edges[k], 0.0))
        self._cdf = cdf if cdf[-1] > 0 else None

    # ---- checkpoint -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"ce_sum": self.ce_sum.tolist(), "count": self.count.tolist(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        if len(state["ce_sum"]) != self.bins:
            raise ValueError(f"time warp state has {len(state['ce_sum'])} bins, this run uses {self.bins}")
        self.ce_sum = torch.tensor(state["ce_sum"], dtype=torch.float64)
        self.count = torch.tensor(state["count"], dtype=torch.float64)
        self.steps = int(state["steps"])
        self._new.zero_()
        self._refit()

    def summary(self) -> dict:
        """For the run directory: bin edges in t, the fitted CE curve and the draw density."""
        span = 1.0 - self.t_min
        return {"steps": self.steps, "active": self.active,
                "t_edges": [self.t_min + span * k / self.bins for k in range(self.bins + 1)],
                "ce_curve": self.curve(), "density": self.density(),
                "t_quantiles": {str(q): self.t_of_u(q) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}}

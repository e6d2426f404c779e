"""Samplers of the masked objective. Every frame starts with its free positions at [MASK] and its clean ones
(a prompt, an infilling frame's prefix and suffix) at their tokens, which no step changes.

ancestral   MDLM's reverse process on the grid t_i = 1 - i / T: from t to s each masked position is revealed
            with probability (t - s) / t (all of them at s = 0), its token drawn from p_theta(x0 | x_t). A step
            that reveals nothing leaves x_t unchanged, so without time conditioning the next model call would
            repeat the last one: it is skipped (MDLM's caching).
confidence  LLaDA's low-confidence remasking / MaskGIT: each step draws a token for every masked position and
            commits the k most confident ones (their drawn probability; the argmax's with `greedy`), k chosen so
            that T steps reveal everything.
With sampling.block_length > 0 either sampler reveals the free positions block by block, left to right
(semi-autoregressive, as LLaDA samples and BD3-LM's blocks), T / blocks steps each: a block is filled by the same
process, with the blocks after it still masked, before the next one starts.

Token picks use the shared float64 filter and inverse-CDF draw (dimba/objectives/sampling.py): temperature,
top-k, top-p. Classifier-free guidance (sampling.guidance = s != 1): log-probabilities lu + s (lc - lu), with the
unconditional branch seeing the clean positions masked too. All randomness comes from one CPU generator.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import torch

from dimba.config.schema import SamplingConfig
from dimba.objectives.masked.loss import subs_log_probs
from dimba.objectives.sampling import filter_logits, pick_tokens


def guided_log_probs(model, x: torch.Tensor, clean: torch.Tensor, t: float, mask_id: int, guidance: float,
                     time_conditioning: bool) -> torch.Tensor:
    """log p_theta(x0 | x) (B, L, V) float64, guided when guidance != 1 (one batched call for both branches)."""
    b = x.shape[0]
    tb = torch.full((b,), float(t), device=x.device)
    if guidance == 1.0:
        return subs_log_probs(model(x, tb if time_conditioning else None), mask_id).double()
    x_u = torch.where(clean, torch.full_like(x, mask_id), x)
    both = subs_log_probs(model(torch.cat([x, x_u]), torch.cat([tb, tb]) if time_conditioning else None), mask_id)
    lc, lu = both[:b].double(), both[b:].double()
    diff = torch.where(torch.isinf(lu), torch.zeros_like(lu), lc - lu)     # the mask: -inf in both, stays -inf
    return (lu + guidance * diff).log_softmax(-1)


@torch.no_grad()
def sample_masked(model, tokens: torch.Tensor, clean: torch.Tensor, cfg: SamplingConfig, mask_id: int,
                  time_conditioning: bool, generator: torch.Generator,
                  on_step: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Fill the free positions of (B, L) `tokens` (clean ones kept) with `cfg.sampler`; returns (B, L) ids."""
    x = torch.where(clean, tokens, torch.full_like(tokens, mask_id))
    if cfg.sampler in ("", "ancestral"):                    # "": the objective's default
        return _ancestral(model, x, clean, cfg, mask_id, time_conditioning, generator, on_step)
    if cfg.sampler == "confidence":
        return _confidence(model, x, clean, cfg, mask_id, time_conditioning, generator, on_step)
    raise ValueError(f"unknown masked sampler {cfg.sampler!r}; use ancestral or confidence")


def _blocks(clean: torch.Tensor, block_length: int, steps: int) -> tuple[list[torch.Tensor], int]:
    """The free positions of each row, in order, cut into blocks of block_length (0: one block): (a (B, L) mask per
    block, left to right; the steps each block gets, T / blocks and at least 1)."""
    free = ~clean
    n_free = int(free.sum(1).max())
    bl = block_length if block_length > 0 else max(n_free, 1)
    n_blocks = max(-(-n_free // bl), 1)
    rank = free.long().cumsum(1) - 1                       # index of each free position among its row's free ones
    blocks = [free & (rank >= k * bl) & (rank < (k + 1) * bl) for k in range(n_blocks)]
    return blocks, max(steps // n_blocks, 1)


def _ancestral(model, x, clean, cfg, mask_id, time_conditioning, generator, on_step):
    blocks, steps = _blocks(clean, cfg.block_length, cfg.steps)
    log_p = None
    changed = True
    done, total = 0, len(blocks) * steps
    for in_block in blocks:
        for i in range(steps):           # t: the block's own time, from 1 (all of it masked) to 0
            t, s = 1.0 - i / steps, 1.0 - (i + 1) / steps
            if changed or time_conditioning or log_p is None:
                log_p = guided_log_probs(model, x, clean, t, mask_id, cfg.guidance, time_conditioning)
            masked = (x == mask_id) & in_block
            reveal_u = torch.rand(x.shape, generator=generator, dtype=torch.float64).to(x.device)
            pick_u = torch.rand(x.shape, generator=generator, dtype=torch.float64)
            reveal = masked & (reveal_u < (t - s) / t) if s > 0 else masked
            changed = bool(reveal.any())
            if changed:      # draw only where a token is revealed (each position's draw uses its own uniform)
                x = x.clone()
                x[reveal] = pick_tokens(log_p[reveal], cfg, uniforms=pick_u[reveal.cpu()])
            done += 1
            if on_step is not None:
                on_step(done, total)
    return x


def _schedule_counts(n: int, steps: int) -> list[int]:
    """How many of n tokens each of `steps` steps reveals: as equal as possible, the remainder first (LLaDA)."""
    base, extra = divmod(n, steps)
    return [base + (1 if j < extra else 0) for j in range(steps)]


def _confidence(model, x, clean, cfg, mask_id, time_conditioning, generator, on_step):
    b = x.shape[0]
    free = ~clean
    blocks, steps_per_block = _blocks(clean, cfg.block_length, cfg.steps)
    total = len(blocks) * steps_per_block
    done = 0
    pick_cfg = replace(cfg, greedy=False)
    for in_block in blocks:
        counts = [_schedule_counts(int(in_block[r].sum()), steps_per_block) for r in range(b)]
        for j in range(steps_per_block):
            masked = (x == mask_id) & in_block
            t = float(masked.sum()) / max(float(free.sum()), 1.0)
            log_p = guided_log_probs(model, x, clean, max(t, 1e-3), mask_id, cfg.guidance, time_conditioning)
            if cfg.greedy:
                new = log_p.argmax(-1)
                conf = log_p.max(-1).values
            else:            # draws and confidences at the masked positions only
                u = torch.rand(x.shape, generator=generator, dtype=torch.float64)
                candidates = log_p[masked]
                picked = pick_tokens(candidates, pick_cfg, uniforms=u[masked.cpu()])
                filtered = filter_logits(candidates, cfg.temperature, cfg.top_k, cfg.top_p).log_softmax(-1)
                new = x.clone()
                new[masked] = picked
                conf = torch.full(x.shape, float("-inf"), dtype=log_p.dtype, device=log_p.device)
                conf[masked] = filtered.gather(-1, picked.unsqueeze(-1)).squeeze(-1)
            conf = torch.where(masked, conf, torch.full_like(conf, float("-inf")))
            reveal = torch.zeros_like(masked)
            for r in range(b):
                k = min(counts[r][j], int(masked[r].sum()))
                if k > 0:
                    reveal[r, torch.topk(conf[r], k).indices] = True
            x = torch.where(reveal, new, x)
            done += 1
            if on_step is not None:
                on_step(done, total)
    return x

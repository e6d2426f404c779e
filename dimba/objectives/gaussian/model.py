"""The DIMBA denoiser: noisy token embeddings in, estimate of the clean embeddings (x0) out.

    tokens --TokenEmbedding--> x0 (L2-normalised, norm sqrt(d_embed): unit variance per coordinate)
    x_t = noised x0 (clean positions keep x0), self_cond = previous x0 estimate (or 0)
    h = in_proj([x_t, self_cond]) + clean_embedding * clean
    c = TimestepEmbedding(t) + PromptEncoder(x0 at clean positions)
    h = DimbaBlock(h, c) x n_layers  (bidirectional Mamba-2, FiLM/additive modulation)
    x0_head "linear":   x0_hat = out_proj(norm(h));  logits = x0_hat . table^T (tied) or lm_head(x0_hat)
    x0_head "softmax":  logits = out_proj(norm(h)) . table^T;  x0_hat = softmax(logits) @ table
    x0_head "posterior": logits = out_proj(norm(h)) . table^T + prior + exp(s(t)) x_t . table^T;  x0_hat as softmax

The softmax head (CDCD's "score interpolation", Plaid) states x0_hat as the posterior mean of the token
embeddings under the model's own token distribution: it lies in the convex hull of the table, and once the model
is sure of a token it is that token's embedding exactly. A linear head is never exact, and the likelihood bound
weights its error by SNR, which grows without bound as t -> 0.

The posterior head adds the two terms of the exact posterior of one token given only its own noisy vector,
log p(w | x_t) = log p(w) + sqrt(ab) / (1 - ab) x_t . e_w + const (the table's rows all have norm sqrt(d_embed)):
a learned per-token bias `prior` (V,) (training starts it at the train split's unigram log-probabilities,
`init_prior`) and a learned positive scale exp(s(t)) of the time embedding (s starts at -4, nearly off). A tied
head on normalised embeddings cannot state a unigram prior by itself, and without the skip the network must
rebuild a token from its own noisy vector at every noise level; with both, the network's logits are a correction
for what the context adds (dimba/objectives/gaussian/context.py measures exactly that).

The table's rows are L2-normalised, which rules out the collapse free embeddings risk under the x0-MSE objective
(rows shrinking towards each other make the MSE trivially small: Diffusion-LM / DiffuSeq). Options measured and not
shipped (free rows, a logit prior, a posterior-mean input) are in benchmarks/levers.md.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dimba.config.schema import ModelConfig
from dimba.model.block import DimbaBlock
from dimba.model.conditioning import PromptEncoder, RMSNorm, TimestepEmbedding


class TokenEmbedding(nn.Module):
    """Token table used both ways. Everything that reads the table goes through `forward`, so that ZeRO-3 (which
    gathers a module's partitioned parameters only around its forward) sees every use."""

    def __init__(self, vocab_size: int, d_embed: int, pad_id: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab_size, d_embed))     # rows start near norm sqrt(d_embed)
        self.pad_id = pad_id
        self.scale = math.sqrt(d_embed)

    def table(self) -> torch.Tensor:
        """Every row L2-normalised to norm sqrt(d_embed) (unit variance per coordinate, the noise's scale)."""
        return F.normalize(self.weight, dim=-1) * self.scale

    def forward(self, tokens: torch.Tensor | None = None, x: torch.Tensor | None = None,
                probs: torch.Tensor | None = None) -> torch.Tensor:
        """`tokens` (B, L) -> embeddings (B, L, d); `x` (B, L, d) -> logits x . table^T (B, L, V);
        `probs` (B, L, V) -> expected embedding probs @ table (B, L, d)."""
        table = self.table()
        if tokens is not None:
            emb = F.embedding(tokens, table)
            return emb.masked_fill((tokens == self.pad_id).unsqueeze(-1), 0.0)
        if probs is not None:
            return probs @ table.to(probs.dtype)
        return x @ table.to(x.dtype).t()


class DimbaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, de, dc = cfg.d_model, cfg.d_embed, cfg.cond_dim
        self.token_embedding = TokenEmbedding(cfg.vocab_size, de, cfg.pad_id)
        self.in_proj = nn.Linear(de * (1 + int(cfg.self_condition)), d)
        self.clean_embedding = nn.Parameter(torch.zeros(d))
        self.time_embedding = TimestepEmbedding(dc)
        self.prompt_encoder = PromptEncoder(de, dc)
        self.blocks = nn.ModuleList(DimbaBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm_f = RMSNorm(d, cfg.norm_eps)
        self.out_proj = nn.Linear(d, de)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(de, cfg.vocab_size, bias=False)
        if self.has_prior:
            self.prior = nn.Parameter(torch.zeros(cfg.vocab_size))
        if cfg.x0_head == "posterior":
            self.skip_scale = nn.Linear(dc, 1)
            nn.init.zeros_(self.skip_scale.weight)
            nn.init.constant_(self.skip_scale.bias, -4.0)

    @property
    def has_prior(self) -> bool:
        """Whether the model holds a learned per-token prior (the posterior head)."""
        return self.cfg.x0_head == "posterior"

    @torch.no_grad()
    def init_prior(self, log_probs) -> None:
        """Start the learned prior (see has_prior) at the data's unigram log-probabilities (V,) (-inf entries, such
        as padding, become -30): Adam moves a bias by about lr per step, far too slowly to learn a prior spanning
        ~15 nats from zero, and a wrong prior costs every noise level (the context diagnostic shows it)."""
        if not self.has_prior:
            raise ValueError("init_prior needs a learned prior: model.x0_head 'posterior'")
        log_p = torch.as_tensor(log_probs, dtype=torch.float64).clamp_min(-30.0)
        if log_p.shape != self.prior.shape:
            raise ValueError(f"init_prior: {tuple(log_p.shape)} log-probabilities for a vocabulary of "
                             f"{self.prior.numel()}")
        self.prior.copy_(log_p.to(self.prior))

    @property
    def self_condition(self) -> bool:
        return self.cfg.self_condition

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Clean embeddings x0 (B, L, d_embed) in float32; padding embeds to 0."""
        return self.token_embedding(tokens=tokens).float()

    def logits(self, x0_hat: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, V) of an x0 estimate, in float32."""
        if self.lm_head is not None:
            return self.lm_head(x0_hat.to(self.lm_head.weight.dtype)).float()
        return self.token_embedding(x=x0_hat).float()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, clean: torch.Tensor,
                self_cond: torch.Tensor | None = None, with_logits: bool = False, x0_temperature: float = 1.0):
        """x_t (B, L, d_embed) with clean positions holding x0; t (B,) in [0, 1]; clean (B, L) bool;
        self_cond (B, L, d_embed) or None (= zeros). Returns x0_hat (B, L, d_embed) in float32, or
        (x0_hat, logits (B, L, V) float32) with `with_logits`: the logits the model's token choice is read from.
        `x0_temperature` (softmax/posterior heads, sampling): x0_hat = softmax(logits / x0_temperature) @ table."""
        dtype = self.in_proj.weight.dtype
        parts = [x_t]
        if self.cfg.self_condition:
            parts.append(torch.zeros_like(x_t) if self_cond is None else self_cond)
        h = self.in_proj(torch.cat(parts, dim=-1).to(dtype))
        h = h + clean.unsqueeze(-1).to(dtype) * self.clean_embedding
        c_time = self.time_embedding(t)
        c = c_time + self.prompt_encoder(x_t.to(dtype), clean)
        for block in self.blocks:
            h = block(h, c)
        out = self.out_proj(self.norm_f(h)).float()
        if self.cfg.x0_head == "linear":
            if x0_temperature != 1.0:
                raise ValueError("sampling.x0_temperature needs model.x0_head 'softmax' or 'posterior' (a linear head "
                                 "states x0_hat directly); leave it at 1")
            return (out, self.logits(out)) if with_logits else out
        logits = self.token_embedding(x=out)
        if self.cfg.x0_head == "posterior":
            scale = self.skip_scale(c_time).float().clamp_max(30.0).exp().view(-1, 1, 1)
            logits = logits + self.token_embedding(x=scale * x_t.float()) + self.prior.float()
        x0_hat = self.token_embedding(probs=(logits / x0_temperature).softmax(-1))
        return (x0_hat, logits) if with_logits else x0_hat

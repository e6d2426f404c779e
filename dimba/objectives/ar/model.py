"""The autoregressive twin: the same Mamba-2 backbone run causally, trained with next-token cross-entropy.

    tokens -> Embedding -> DimbaBlock (causal, unconditioned) x n_layers -> RMSNorm -> tied lm head -> logits

Same `DimbaBlock`, same mixer and the same config fields as DIMBA (`objective: "ar"`, `bidirectional: false`),
so at equal d_model and n_layers the backbone is identical; the AR twin has no diffusion input/output projections,
no conditioning and, being causal, one mixer per block. `generate` decodes recurrently with constant memory
(`Mamba2.step`), after reading the prompt with one parallel forward pass per layer.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from dimba.config.schema import ModelConfig, SamplingConfig
from dimba.model.block import DimbaBlock
from dimba.model.conditioning import RMSNorm
from dimba.model.embedding import TiedEmbedding
from dimba.objectives.sampling import pick_tokens


class ARModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.bidirectional:
            raise ValueError("ARModel needs model.bidirectional false (it predicts the next token)")
        self.cfg = cfg
        self.embedding = TiedEmbedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.blocks = nn.ModuleList(DimbaBlock(cfg, i, conditioned=False) for i in range(cfg.n_layers))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm_f(h)
        if self.lm_head is not None:
            return self.lm_head(h).float()
        return self.embedding(hidden=h).float()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) -> logits (B, L, V) in float32; position i predicts token i + 1."""
        h = self.embedding(tokens)
        for block in self.blocks:
            h = block(h)
        return self._head(h)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, length: int, cfg: SamplingConfig,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Continue `prompt` (B, P >= 1) by `length` tokens, token by token with recurrent state: (B, P + length).
        Uses cfg.temperature / top_k / top_p / greedy exactly like the diffusion sampler's final step."""
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        if prompt.dim() != 2 or prompt.size(1) < 1:
            raise ValueError("prompt must be (batch, length >= 1); use the BOS id for an empty prompt")
        b = prompt.size(0)
        # every step's uniforms in one host draw and one copy: no per-token host round trip besides the launches
        uniforms = torch.rand(length, b, 1, generator=generator, dtype=torch.float64).to(prompt.device)
        caches = [block.mixer.allocate_inference_cache(b) for block in self.blocks]
        out = [prompt]
        logits = None
        for i in range(prompt.size(1)):                    # read the prompt through the recurrent state
            logits = self._step(prompt[:, i], caches)
        for i in range(length):
            nxt = pick_tokens(logits.unsqueeze(1), cfg, uniforms=uniforms[i])[:, 0]
            out.append(nxt[:, None])
            logits = self._step(nxt, caches)
        return torch.cat(out, dim=1)

    def _step(self, token: torch.Tensor, caches: list) -> torch.Tensor:
        h = self.embedding(token)
        for j, block in enumerate(self.blocks):
            conv, ssm = caches[j]
            y, conv, ssm = block.mixer.step(block.norm(h), conv, ssm)
            caches[j] = (conv, ssm)
            h = h + y
        return self._head(h)

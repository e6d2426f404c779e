"""Multi-head self-attention: the optional mixer of the blocks listed in `model.attn_layer_idx` (a hybrid denoiser,
as DiffuMamba-H and Jamba mix a few attention layers into a Mamba stack).

In a bidirectional backbone it attends over the whole sequence (it needs no reversed twin); the names follow
mamba_ssm's `MHA` (in_proj packs q, k and v; out_proj), as mamba_ssm's hybrid models (`MambaConfig.attn_layer_idx`)
lay them out, without biases. No positional encoding: the Mamba-2 blocks around it carry position, as in Jamba.
`F.scaled_dot_product_attention` picks a fused kernel (flash or memory-efficient) on a GPU and runs in plain
PyTorch on the CPU.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, causal: bool = False, layer_idx: int | None = None):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of num_heads ({num_heads})")
        self.num_heads, self.head_dim, self.causal, self.layer_idx = num_heads, d_model // num_heads, causal, layer_idx
        self.in_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, d_model) -> (B, L, d_model)."""
        b, l, d = x.shape
        q, k, v = self.in_proj(x).view(b, l, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(y.transpose(1, 2).reshape(b, l, d))

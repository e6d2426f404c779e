"""A token embedding that is also the tied output head, read through its own forward both ways.

Under ZeRO-3 a module's partitioned parameters are gathered around that module's forward only: a head that reads
`embedding.weight` directly (`F.linear(h, embedding.weight)`) uses a parameter DeepSpeed may already have released,
or not yet gathered ("Cannot free a ZeRO-3 parameter while it is still active in submodules"). So both uses go
through `forward`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class TiedEmbedding(nn.Embedding):
    """`forward(tokens)` -> embeddings (B, L, d); `forward(hidden=h)` -> logits h . weight^T (B, L, V)."""

    def forward(self, tokens: Optional[torch.Tensor] = None, hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        if hidden is not None:
            return F.linear(hidden, self.weight)
        return super().forward(tokens)

"""Exponential moving average of the weights, in fp32, correct under every ZeRO stage.

DeepSpeed has no EMA (deepspeedai/DeepSpeed#2056). How ours works:
- ZeRO 0/1/2: every rank holds the full module parameters; the EMA is a full fp32 copy, updated from them
  after each optimizer step (identical on every rank, so no communication).
- ZeRO-3: module parameters are partitioned placeholders. Each rank keeps the EMA of *its own partition* of the
  optimizer's fp32 master weights (`deepspeed.utils.safe_get_local_fp32_param`: local, no collective), so the
  update costs no communication and 1/world of the memory. Saving gathers the partitions (a collective: every
  rank calls `full_state_dict`), so the file always holds the full, unpartitioned EMA and can be loaded on any
  world size or stage; loading slices this rank's partition back out.
- Using the EMA (validation, text samples): `swap_in` writes the EMA into the live parameters and `swap_out`
  puts the training weights back. Under ZeRO-3 this goes through `GatheredParameters(modifier_rank=0)`, which
  re-partitions rank 0's write to all ranks; the training weights come back from the fp32 master partitions,
  which the swap never touches.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


def ema_update(ema: torch.Tensor, value: torch.Tensor, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * value, in fp32."""
    ema.mul_(decay).add_(value.float(), alpha=1 - decay)


def ema_decay_at(decay: float, num_updates: int) -> float:
    """Decay for update number `num_updates` (1-based): min(decay, (1 + n) / (10 + n)), the usual warm-up
    (TensorFlow's ExponentialMovingAverage with num_updates), so early EMAs are not dominated by the init."""
    return min(decay, (1 + num_updates) / (10 + num_updates))


class EMA:
    def __init__(self, module: nn.Module, decay: float, zero_stage: int):
        self.decay = decay
        self.num_updates = 0
        self.zero3 = zero_stage == 3
        self.names = [n for n, _ in module.named_parameters()]
        self.params = [p for _, p in module.named_parameters()]
        self.shadow = [self._source(p).detach().float().clone() for p in self.params]
        self._backup: list[torch.Tensor] | None = None

    def _source(self, p: nn.Parameter) -> torch.Tensor:
        if self.zero3:
            from deepspeed.utils import safe_get_local_fp32_param
            return safe_get_local_fp32_param(p)
        return p.data

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        decay = ema_decay_at(self.decay, self.num_updates)
        for s, p in zip(self.shadow, self.params):
            ema_update(s, self._source(p), decay)

    # ---- full tensors (collective under ZeRO-3) ---------------------------------------------------------
    def _gather(self, part: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
        world = dist.get_world_size()
        parts = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(parts, part.contiguous())
        return torch.cat(parts)[: p.ds_numel].view(p.ds_shape)

    def _partition(self, full: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
        n = p.ds_tensor.numel()
        flat = torch.zeros(n * dist.get_world_size(), dtype=torch.float32, device=full.device)
        flat[: full.numel()] = full.reshape(-1).float()
        r = dist.get_rank()
        return flat[r * n:(r + 1) * n].clone()

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Name -> full fp32 EMA tensor (on CPU). Under ZeRO-3 every rank must call this."""
        if not self.zero3:
            return {n: s.detach().cpu().clone() for n, s in zip(self.names, self.shadow)}
        return {n: self._gather(s, p).cpu() for n, s, p in zip(self.names, self.shadow, self.params)}

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters (e.g. {missing[0]}); it belongs to another model")
        for i, (n, p) in enumerate(zip(self.names, self.params)):
            full = state[n].to(self.shadow[i].device)
            shape = tuple(p.ds_shape) if self.zero3 else tuple(p.shape)
            if tuple(full.shape) != shape:
                raise ValueError(f"EMA tensor {n} has shape {tuple(full.shape)}, the model has {shape}")
            self.shadow[i] = self._partition(full, p) if self.zero3 else full.float().clone()

    # ---- evaluate with the EMA weights ------------------------------------------------------------------
    @torch.no_grad()
    def _write(self, tensors: list[torch.Tensor], full: bool) -> None:
        """Write per-parameter tensors into the live parameters; `full` says whether they are full tensors
        (ZeRO 0-2 or already gathered) or ZeRO-3 partitions to gather first."""
        if not self.zero3:
            for p, v in zip(self.params, tensors):
                p.data.copy_(v.to(p.dtype))
            return
        import deepspeed
        for p, v in zip(self.params, tensors):
            value = v if full else self._gather(v, p)
            if getattr(p, "ds_persist", False) and p.data.numel() == p.ds_numel:
                # ZeRO-3 keeps small parameters whole on every rank once gathered (param_persistence_threshold):
                # write such a one in place on each rank. Re-partitioning it on the way out of GatheredParameters
                # fails while a module still holds it ("Cannot free a ZeRO-3 parameter while it is still active"),
                # as on a resumed run's first validation.
                p.data.copy_(value.to(p.device, p.dtype))
                continue
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if dist.get_rank() == 0:
                    p.data.copy_(value.to(p.dtype))

    def swap_in(self) -> None:
        if self._backup is not None:
            raise RuntimeError("EMA weights are already swapped in")
        if self.zero3:
            from deepspeed.utils import safe_get_local_fp32_param
            self._backup = [safe_get_local_fp32_param(p).detach().clone() for p in self.params]
        else:
            self._backup = [p.data.detach().clone() for p in self.params]
        self._write(self.shadow, full=not self.zero3)

    def swap_out(self) -> None:
        if self._backup is None:
            raise RuntimeError("EMA weights are not swapped in")
        self._write(self._backup, full=not self.zero3)
        self._backup = None

"""The arithmetic of an epoch: who reads which tokens, in which order. No I/O here.

The loader has S = world_size x W "slots" (W = dataloader workers per rank, at
least 1); slot = rank * W + worker. For epoch e:
  1. the shards are ordered by a permutation seeded by (seed, e) (val: file order),
     and their tokens, as stored (documents EOS-separated), form one virtual stream
     of T tokens;
  2. slot k owns the range [k * T//S, (k+1) * T//S) of that stream, cut into
     seq_len windows: the packed sequences. Ranges may start or end inside a shard:
     no rank or worker ever lacks data because shards are uneven or few;
  3. every slot yields the same number Q of batches per epoch:
     Q = (T // S // seq_len) // batch_size; the last few windows of a slot are dropped;
  4. a slot's sequences are shuffled in blocks of `shuffle_buffer` consecutive windows
     (a permutation seeded by (seed, e, slot, block)): a shuffle buffer whose state is
     one integer, so resuming re-reads at most one block, never the epoch.
So the position of a rank is one number, the batches it has yielded (k): its
logical worker for batch i is i % W, and each slot's position follows from k.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from dimba.data.errors import DataError
from dimba.data.masks import position_seed
from dimba.data.shards import ShardInfo


@dataclass(frozen=True)
class EpochPlan:
    shards: tuple[ShardInfo, ...]
    split: str
    seq_len: int
    batch_size: int
    world_size: int
    workers: int                 # W >= 1 slots per rank
    seed: int
    shuffle_buffer: int          # 1 (or val): no shuffling within a slot
    shuffle: bool                # train: shuffle shard order and blocks; val: file order

    def __post_init__(self):
        if self.batches_per_slot < 1:
            per_round = self.slots * self.batch_size * self.seq_len
            raise DataError(
                f"the {self.split} split holds {self.total_tokens:,} tokens, fewer than one batch per slot: "
                f"world_size {self.world_size} x workers {self.workers} x batch_size {self.batch_size} x "
                f"seq_len {self.seq_len} = {per_round:,} tokens; use more data (or a larger --val-fraction), "
                "or a smaller batch, seq_len or data.num_workers")

    @property
    def slots(self) -> int:
        return self.world_size * self.workers

    @cached_property                 # asked for per sample: do not re-add thousands of shards each time
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def slot_tokens(self) -> int:
        return self.total_tokens // self.slots

    @property
    def batches_per_slot(self) -> int:
        return self.slot_tokens // self.seq_len // self.batch_size

    @property
    def sequences_per_slot(self) -> int:
        return self.batches_per_slot * self.batch_size

    @property
    def block_size(self) -> int:
        return self.shuffle_buffer if self.shuffle else 1

    def shard_order(self, epoch: int) -> list[int]:
        n = len(self.shards)
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(position_seed(self.seed, self.split, "shards", epoch))
        return torch.randperm(n, generator=g).tolist()

    def block_permutation(self, epoch: int, slot: int, block: int) -> list[int]:
        """Order of the windows of one shuffle block (indices relative to the block's first window)."""
        size = min(self.block_size, self.sequences_per_slot - block * self.block_size)
        if self.block_size == 1:
            return list(range(size))
        g = torch.Generator().manual_seed(position_seed(self.seed, self.split, "block", epoch, slot, block))
        return torch.randperm(size, generator=g).tolist()

    def slot_start(self, slot: int) -> int:
        """Offset of the slot's first token in the epoch's virtual token stream."""
        return slot * self.slot_tokens

    def sample_position(self, epoch: int, slot: int, index: int) -> int:
        """Global position of the index-th sequence a slot yields in an epoch (seeds its clean mask)."""
        return (epoch * self.slots + slot) * self.sequences_per_slot + index


def slot_start_batches(batches_yielded: int, workers: int, worker: int) -> int:
    """How many of a rank's first `batches_yielded` batches came from logical worker `worker` (round robin)."""
    return max(0, -(-(batches_yielded - worker) // workers))

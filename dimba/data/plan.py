"""The arithmetic of an epoch: who reads which tokens, in which order. No I/O here.

The stream is cut into L "lanes", one per micro-batch of a global step: L = world_size x gradient accumulation
steps = global batch / micro-batch. The lanes, and so the global order of the data, depend only on the global
batch and the micro-batch, never on how many ranks share them: 2 ranks resume on 1 with 2 accumulation steps, or
on 4 with half the micro-batches, and read the same sequences. For epoch e:
  1. the shards are ordered by a permutation seeded by (seed, e) (val: file order),
     and their tokens, as stored (documents EOS-separated), form one virtual stream
     of T tokens;
  2. lane l owns the range [l * T//L, (l+1) * T//L) of that stream, cut into
     seq_len windows: the packed sequences. Ranges may start or end inside a shard:
     no rank ever lacks data because shards are uneven or few;
  3. every lane yields the same number Q of batches per epoch:
     Q = (T // L // seq_len) // batch_size; the last few windows of a lane are dropped;
  4. a lane's sequences are shuffled in blocks of `shuffle_buffer` consecutive windows
     (a permutation seeded by (seed, e, lane, block)): a shuffle buffer whose state is
     one integer, so resuming re-reads at most one block, never the epoch.
Global micro-batch g (g = micro-step x world_size + rank, the index the trainer's noise seeds use too) is batch
g // L of lane g % L. A rank's k-th batch of an epoch is therefore global micro-batch k x world_size + rank
(`locate`), and the position of every rank is one number, the batches it has yielded.
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
    lanes: int                   # L = world_size x gradient accumulation steps
    seed: int
    shuffle_buffer: int          # 1 (or val): no shuffling within a lane
    shuffle: bool                # train: shuffle shard order and blocks; val: file order

    def __post_init__(self):
        if self.batches_per_lane < 1:
            per_round = self.lanes * self.batch_size * self.seq_len
            raise DataError(
                f"the {self.split} split holds {self.total_tokens:,} tokens, fewer than one batch per lane: "
                f"{self.lanes} lanes (world size x gradient accumulation steps) x batch_size {self.batch_size} x "
                f"seq_len {self.seq_len} = {per_round:,} tokens; use more data (or a larger --val-fraction), "
                "or a smaller batch or seq_len")

    @cached_property                 # asked for per sample: do not re-add thousands of shards each time
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def lane_tokens(self) -> int:
        return self.total_tokens // self.lanes

    @property
    def batches_per_lane(self) -> int:
        return self.lane_tokens // self.seq_len // self.batch_size

    @property
    def sequences_per_lane(self) -> int:
        return self.batches_per_lane * self.batch_size

    @property
    def block_size(self) -> int:
        return self.shuffle_buffer if self.shuffle else 1

    def shard_order(self, epoch: int) -> list[int]:
        n = len(self.shards)
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(position_seed(self.seed, self.split, "shards", epoch))
        return torch.randperm(n, generator=g).tolist()

    def block_permutation(self, epoch: int, lane: int, block: int) -> list[int]:
        """Order of the windows of one shuffle block (indices relative to the block's first window)."""
        size = min(self.block_size, self.sequences_per_lane - block * self.block_size)
        if self.block_size == 1:
            return list(range(size))
        g = torch.Generator().manual_seed(position_seed(self.seed, self.split, "block", epoch, lane, block))
        return torch.randperm(size, generator=g).tolist()

    def lane_start(self, lane: int) -> int:
        """Offset of the lane's first token in the epoch's virtual token stream."""
        return lane * self.lane_tokens

    def rank_batches_per_epoch(self, world_size: int) -> int:
        """Batches each of `world_size` ranks yields per epoch (L is a multiple of the world size)."""
        return self.batches_per_lane * self.lanes // world_size

    def locate(self, k: int, rank: int, world_size: int) -> tuple[int, int, int]:
        """(epoch, lane, batch within the lane's epoch) of a rank's k-th batch, k counted over all epochs: global
        micro-batch g = k x world_size + rank of the epoch."""
        epoch, i = divmod(k, self.rank_batches_per_epoch(world_size))
        g = i * world_size + rank
        return epoch, g % self.lanes, g // self.lanes

    def sample_position(self, epoch: int, lane: int, index: int) -> int:
        """Global position of the index-th sequence a lane yields in an epoch (seeds its clean mask)."""
        return (epoch * self.lanes + lane) * self.sequences_per_lane + index


def rescale_position(count: int, saved_world: int, world: int, what: str) -> int:
    """A per-rank count of micro-batches (each rank's the same) written on `saved_world` ranks, as a count on
    `world` ranks at the same global micro-batch."""
    total = count * saved_world
    if total % world:
        raise DataError(f"cannot move {what} from {saved_world} to {world} ranks exactly: its {total} global "
                        f"micro-batches are not a multiple of {world} (a micro-batch was dropped as non-finite); "
                        f"resume on {saved_world} ranks")
    return total // world

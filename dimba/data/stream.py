"""A rank's batches, following plan.py: every `stride`-th from its `start`-th on (one DataLoader worker of W
takes every W-th batch; the DataLoader interleaves them back in order).

Runs inside a DataLoader worker (or in the main process when num_workers is 0).
Shards are read whole through webdataset's tar reader and checked against the
manifest (size, sha256, token count) before any of their tokens are used.

A corrupt shard (missing, truncated, wrong checksum) is never waited on and never
shifts other data: its part of the virtual stream is filled from the next readable
shard of the epoch's order (same offsets, wrapping around that shard). So every
lane still yields exactly the planned number of batches, and the position
arithmetic of plan.py stays exact for resumption. With on_corrupt="raise" it raises.
"""
from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from dimba.config.schema import CleanMaskConfig
from dimba.data.errors import CorruptShardError, DataError
from dimba.data.masks import draw_clean_mask, position_seed
from dimba.data.plan import EpochPlan
from dimba.data.shards import read_shard

CACHED_SHARDS = 2


class ShardCache:
    """Token arrays of recently read shards, plus the names found corrupt (reported once)."""

    def __init__(self, directory: Path, plan: EpochPlan, on_corrupt: str, size: int = CACHED_SHARDS):
        self.directory, self.plan, self.on_corrupt, self.size = Path(directory), plan, on_corrupt, size
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.corrupt: dict[int, str] = {}
        self.new_corrupt: list[str] = []
        self._orders: dict[int, tuple[list[int], list[int]]] = {}

    def tokens(self, index: int) -> Optional[np.ndarray]:
        """A shard's tokens, or None when it is corrupt (and on_corrupt is 'skip')."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        if index in self.corrupt:
            return None
        try:
            data = read_shard(self.directory, self.plan.shards[index])
        except CorruptShardError as e:
            if self.on_corrupt == "raise":
                raise CorruptShardError(f"{e}; set data.on_corrupt='skip' to skip corrupt shards") from None
            self.corrupt[index] = str(e)
            self.new_corrupt.append(f"{self.plan.shards[index].name}: {e}")
            return None
        self._cache[index] = data
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return data

    def _epoch(self, epoch: int) -> tuple[list[int], list[int]]:
        if epoch not in self._orders:
            order = self.plan.shard_order(epoch)
            starts = [0] + list(itertools.accumulate(self.plan.shards[i].tokens for i in order))
            self._orders = {epoch: (order, starts)}          # one epoch at a time
        return self._orders[epoch]

    def read(self, epoch: int, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the epoch's virtual stream."""
        order, starts = self._epoch(epoch)
        out = np.empty(length, dtype=np.int32)
        pos = bisect.bisect_right(starts, start) - 1
        done = 0
        while done < length:
            offset = start + done - starts[pos]
            take = min(starts[pos + 1] - starts[pos] - offset, length - done)
            data = self.tokens(order[pos])
            if data is not None:
                out[done:done + take] = data[offset:offset + take]
            else:
                spare = self._replacement(order, pos)
                out[done:done + take] = spare[np.arange(offset, offset + take) % len(spare)]
            done += take
            pos += 1
        return out

    def _replacement(self, order: list[int], pos: int) -> np.ndarray:
        n = len(order)
        for step in range(1, n):
            data = self.tokens(order[(pos + step) % n])
            if data is not None and len(data) > 0:
                return data
        raise DataError(f"all {n} {self.plan.split} shards in {self.directory} are unreadable: "
                        + "; ".join(list(self.corrupt.values())[:3]))


def rank_batches(directory: Path, plan: EpochPlan, clean: CleanMaskConfig, on_corrupt: str, rank: int,
                 world_size: int, start: int, stride: int, finite: bool) -> Iterator[dict]:
    """The rank's batches start, start + stride, start + 2 stride, ... (counted over all epochs; one epoch only
    when finite).

    Each batch: tokens (B, L) int64, clean (B, L) bool, corrupt_shards (list of new
    "name: reason" strings, for the rank to count and report).
    """
    lanes_here = max(1, plan.lanes // world_size)             # the lanes this rank reads, one block each
    cache = ShardCache(directory, plan, on_corrupt, size=max(CACHED_SHARDS, lanes_here + 1))
    per_epoch, bs, seq_len, block = plan.rank_batches_per_epoch(world_size), plan.batch_size, plan.seq_len, \
        plan.block_size
    unconditional = clean.none >= 1.0
    loaded: dict[int, tuple] = {}          # lane -> ((epoch, block index), permutation, tokens)
    for k in itertools.count(start, stride):
        if finite and k >= per_epoch:
            return
        epoch, lane, b = plan.locate(k, rank, world_size)
        tokens = torch.empty(bs, seq_len, dtype=torch.long)
        mask = torch.zeros(bs, seq_len, dtype=torch.bool)
        for r in range(bs):
            j = b * bs + r
            blk, within = divmod(j, block)
            if loaded.get(lane, (None,))[0] != (epoch, blk):
                perm = plan.block_permutation(epoch, lane, blk)
                first = plan.lane_start(lane) + blk * block * seq_len
                loaded[lane] = ((epoch, blk), perm, cache.read(epoch, first, len(perm) * seq_len))
            _, perm, window_tokens = loaded[lane]
            w = perm[within]
            tokens[r] = torch.from_numpy(window_tokens[w * seq_len:(w + 1) * seq_len])
            if not unconditional:
                g = torch.Generator().manual_seed(
                    position_seed(plan.seed, plan.split, "clean", plan.sample_position(epoch, lane, j)))
                mask[r] = draw_clean_mask(clean, seq_len, g)
        new, cache.new_corrupt = cache.new_corrupt, []
        yield {"tokens": tokens, "clean": mask, "corrupt_shards": new}

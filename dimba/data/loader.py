"""TokenLoader: packed, shuffled token batches for one rank, resumable exactly.

    loader = TokenLoader(cfg.data, split="train", batch_size=8, rank=rank, world_size=world)
    loader.load_state_dict(checkpoint["data"])        # optional: continue after the saved batch
    for batch in loader:                               # train: endless (epochs roll over inside)
        batch["tokens"]   # LongTensor (batch_size, seq_len)
        batch["clean"]    # BoolTensor (batch_size, seq_len), True = clean (given) position
        checkpoint["data"] = loader.state_dict()       # position after this batch

How (details in plan.py and stream.py): the stream is cut into L lanes, one per micro-batch of a global step
(L = world_size x accumulation steps), so the global order of the data depends on the global batch and the
micro-batch only, not on the number of ranks. A rank's k-th batch is global micro-batch k x world_size + rank: the
rank's position is ONE number, the batches it has yielded. Its W = max(1, data.num_workers) DataLoader workers
take every W-th batch and the DataLoader interleaves them round robin (worker 0, 1, ..., W-1, 0, ...), so the
order does not depend on W either. Every lane yields the same number of batches per epoch, so all ranks yield the
same number (no rank waits on another: webdataset#188/#225), whatever the shard sizes.

Resuming is exact when the lanes, batch size, seq_len, seed, shuffle_buffer and the shards are unchanged
(load_state_dict refuses otherwise); the world size and data.num_workers may change, with the accumulation steps
keeping the lanes (2 ranks x 1 = 1 rank x 2): the position moves to the same global batch. It does not re-read
the epoch: each worker re-reads the one shuffle block (data.shuffle_buffer sequences) of each of its lanes, and
the shards under it; benchmarks/bench_data.py measures the time to the first batch.

split="val" is a finite pass (one epoch, file order, no shuffling) that yields the
same batches every time it is iterated.
"""
from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
from pathlib import Path
from typing import Iterator

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dimba.config.schema import DataConfig
from dimba.data.errors import DataError
from dimba.data.plan import EpochPlan, rescale_position
from dimba.data.shards import read_manifest
from dimba.data.stream import rank_batches
from dimba.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)
STATE_VERSION = 2                  # 1: per-rank slots (world-size bound), before lanes
PREFETCH_BATCHES = 4               # per worker
PR_SET_PDEATHSIG = 1               # linux/prctl.h


def load_tokenizer(cfg: DataConfig) -> Tokenizer:
    """data.tokenizer, or the copy saved beside the shards; checked against the shards' vocabulary and against
    the sha256 of the tokenizer their manifest records (two tokenizers of the same size are different ids)."""
    manifest = read_manifest(cfg.shards)
    tok = Tokenizer(cfg.tokenizer or manifest.tokenizer_path)
    if tok.vocab_size != manifest.vocab_size:
        raise DataError(f"data.tokenizer {tok.path} has {tok.vocab_size} pieces but the shards in {cfg.shards} were "
                        f"made with a {manifest.vocab_size}-piece tokenizer; use {manifest.tokenizer_path}")
    made_with = manifest.data["tokenizer"].get("sha256")
    if made_with and made_with != tok.sha256:
        raise DataError(f"tokenizer {tok.path} (sha256 {tok.sha256[:12]}) is not the one the shards in {cfg.shards} "
                        f"were made with ({manifest.tokenizer_path}, sha256 {made_with[:12]}); use that one "
                        "(data.tokenizer) or re-shard the text with this tokenizer")
    return tok


def _worker_init(worker_id: int) -> None:
    """Workers leave stop signals to the trainer and die with it.

    Slurm, a launcher or Ctrl-C signal every process of a job or process group: a worker killed by that would crash
    its trainer before it could save, so workers ignore SIGTERM/SIGUSR1/SIGUSR2/SIGINT. They must still never
    outlive their trainer, however it ends (an error, os._exit, SIGKILL): the kernel kills them when it exits
    (PR_SET_PDEATHSIG). A trainer that exits normally stops them first (`TokenLoader.close`): one left running
    at interpreter exit (they ignore SIGTERM) would make multiprocessing's exit handler wait for it forever.
    """
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent()


def _die_with_parent() -> None:
    parent = multiprocessing.parent_process()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):   # not Linux: PyTorch's own watchdog ends the worker within seconds
        return
    if parent is not None and os.getppid() != parent.pid:   # the trainer died before prctl took hold
        os._exit(1)


class _RankStream(IterableDataset):
    """The batches of one rank from its `start`-th on; in a DataLoader, worker p of W yields every W-th."""

    def __init__(self, directory: Path, plan: EpochPlan, cfg: DataConfig, rank: int, world_size: int, start: int,
                 finite: bool):
        self.directory, self.plan, self.cfg, self.rank, self.world_size, self.start, self.finite = \
            directory, plan, cfg, rank, world_size, start, finite

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        yield from rank_batches(self.directory, self.plan, self.cfg.clean, self.cfg.on_corrupt, self.rank,
                                self.world_size, start=self.start + worker, stride=workers, finite=self.finite)


def epoch_plan(cfg: DataConfig, split: str, batch_size: int, lanes: int, manifest=None) -> EpochPlan:
    """The data plan of one split for `lanes` = world size x accumulation steps; a DataError when the split cannot
    fill one batch per lane (checked before any rank starts: dimba.training.run.check_data)."""
    manifest = manifest or read_manifest(cfg.shards)
    shards = manifest.split(split)
    if not shards:
        raise DataError(f"no {split} shards in {cfg.shards} (the manifest lists none); "
                        + ("re-shard with a --val-fraction above 0" if split == "val" else "re-shard"))
    return EpochPlan(tuple(shards), split, cfg.seq_len, batch_size, lanes, cfg.seed, cfg.shuffle_buffer,
                     shuffle=(split == "train"))


class TokenLoader:
    def __init__(self, cfg: DataConfig, split: str = "train", batch_size: int = 8, rank: int = 0,
                 world_size: int = 1, accumulation: int = 1):
        if split not in ("train", "val"):
            raise DataError(f"split must be 'train' or 'val', got {split!r}")
        if batch_size < 1 or world_size < 1 or accumulation < 1 or not 0 <= rank < world_size:
            raise DataError(f"need batch_size >= 1, accumulation >= 1 and 0 <= rank < world_size, got batch_size "
                            f"{batch_size}, accumulation {accumulation}, rank {rank}, world_size {world_size}")
        cfg.validate()
        cfg.clean.validate()
        self.cfg, self.split, self.batch_size, self.rank, self.world_size = cfg, split, batch_size, rank, world_size
        self.manifest = read_manifest(cfg.shards)
        self.plan = epoch_plan(cfg, split, batch_size, world_size * accumulation, self.manifest)
        self._batches = 0
        self._corrupt: set[str] = set()
        self._open = None                  # the DataLoader iterator of a pass in progress (its workers)

    # -- sizes ------------------------------------------------------------------------------------------------
    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank yields per epoch (the same on every rank)."""
        return self.plan.rank_batches_per_epoch(self.world_size)

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def eos_id(self) -> int:
        return self.manifest.eos_id

    # -- iteration --------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        finite = self.split == "val"
        if finite:
            self._batches = 0
        stream = _RankStream(Path(self.cfg.shards), self.plan, self.cfg, self.rank, self.world_size, self._batches,
                             finite)
        if self.cfg.num_workers > 0:
            stream = DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers,
                                prefetch_factor=PREFETCH_BATCHES, persistent_workers=False,
                                worker_init_fn=_worker_init)
        it = self._open = iter(stream)
        try:
            for batch in it:
                for message in batch.pop("corrupt_shards"):
                    name = message.split(":", 1)[0]
                    if name not in self._corrupt:
                        self._corrupt.add(name)
                        log.warning("skipping corrupt %s shard %s (its part of the epoch is read from the next "
                                    "readable shard)", self.split, message)
                self._batches += 1
                yield batch
        finally:
            # Stop the workers now: left to the garbage collector (after an error or a `break`), torch's
            # iterator shuts them down late and then waits 5 s per worker.
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            if self._open is it:
                self._open = None

    def close(self) -> None:
        """Stop the workers of a pass still in progress (the endless train pass), now rather than at garbage
        collection; call it before the process exits."""
        shutdown = getattr(self._open, "_shutdown_workers", None)
        self._open = None
        if shutdown is not None:
            shutdown()

    # -- position ---------------------------------------------------------------------------------------------
    @property
    def counters(self) -> dict:
        k = self._batches
        return {"batches": k, "samples": k * self.batch_size, "tokens": k * self.batch_size * self.cfg.seq_len,
                "epoch": k // self.batches_per_epoch, "batch_in_epoch": k % self.batches_per_epoch,
                "corrupt_shards_skipped": len(self._corrupt)}

    def _layout(self) -> dict:
        return {"split": self.split, "lanes": self.plan.lanes,
                "batch_size": self.batch_size, "seq_len": self.cfg.seq_len, "seed": self.cfg.seed,
                "shuffle_buffer": self.cfg.shuffle_buffer, "shards": self.manifest.digest(self.split)}

    def state_dict(self) -> dict:
        """Small and JSON-serialisable: the position after the last batch yielded (same on every rank)."""
        k = self._batches
        return {"version": STATE_VERSION, "batches": k, "epoch": k // self.batches_per_epoch,
                "batch_in_epoch": k % self.batches_per_epoch, "rank": self.rank, "world_size": self.world_size,
                **self._layout(),
                "corrupt_shards": sorted(self._corrupt)}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the batch the state was taken at (call before iterating). The state may come from
        any rank of a run with another world size and the same lanes: every rank then continues at the same global
        batch (the saved ranks' batches together, shared out anew)."""
        if isinstance(state, dict) and state.get("version") == 1 and state.get("workers") == 1 \
                and state.get("world_size") == self.plan.lanes:    # one slot per rank was one lane per rank
            state = {**state, "version": STATE_VERSION, "lanes": state["world_size"]}
        if isinstance(state, dict) and state.get("version") == 1:
            raise DataError(f"the {self.split} loader state was written by an earlier DIMBA version with "
                            f"{state.get('workers')} workers per rank, whose data order this version reproduces only "
                            "for 1 worker and no gradient accumulation; finish that run with that version, or start "
                            "a new --run-dir")
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION or "batches" not in state:
            raise DataError(f"not a TokenLoader state (version {STATE_VERSION}): {str(state)[:120]}")
        for key, now in self._layout().items():
            if state.get(key) != now:
                raise DataError(f"cannot resume the {self.split} loader exactly: {key} was {state.get(key)!r} when "
                                f"the state was saved and is {now!r} now; resume with the same global batch (world "
                                "size x gradient accumulation steps), batch size, data.seq_len, data.seed, "
                                "data.shuffle_buffer and shards")
        self._batches = rescale_position(int(state["batches"]), int(state["world_size"]), self.world_size,
                                         f"the {self.split} loader")
        self._corrupt = set(state.get("corrupt_shards", []))


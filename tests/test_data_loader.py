"""TokenLoader on real shards: packing, exact resume (0 and 2 workers), equal batches per rank, corrupt tars, val."""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from dimba.config.schema import CleanMaskConfig, DataConfig
from dimba.data.errors import CorruptShardError, DataError
from dimba.data.loader import TokenLoader, load_tokenizer
from dimba.data.shards import read_manifest, read_shard
from dimba.data.sharding import ShardJob, run_shard_job
from dimba.training.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data_prep" / "tokenizer" / "tokenizer.model"
CORPUS = REPO / "data_prep" / "corpus"
MIXTURE = CleanMaskConfig(none=0.25, prefix=0.25, infill=0.25, spans=0.25)


def make_shards(inputs, out, **kw) -> Path:
    run_shard_job(ShardJob(inputs=[str(p) for p in inputs], tokenizer=str(TOKENIZER), output=str(out),
                           progress=False, log=lambda m: None, **kw))
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """About 80k train tokens in 12 shards (the last one small), 9k val tokens in 2 shards."""
    inputs = [CORPUS / n for n in ("carroll-alice.txt", "blake-poems.txt", "shakespeare-hamlet.txt")]
    return make_shards(inputs, tmp_path_factory.mktemp("shards"), val_fraction=0.1, shard_tokens=7000, workers=2)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    """Very uneven shards: one whole book as a single 40k-token document among 5k-token shards."""
    d = tmp_path_factory.mktemp("uneven")
    (d / "book.jsonl").write_text(json.dumps({"text": (CORPUS / "carroll-alice.txt").read_text()}) + "\n")
    return make_shards([CORPUS / "blake-poems.txt", d / "book.jsonl", CORPUS / "burgess-busterbrown.txt"], d / "out",
                       val_fraction=0.0, shard_tokens=5000, workers=1)


def cfg_for(directory: Path, **kw) -> DataConfig:
    base = dict(shards=str(directory), seq_len=128, num_workers=0, shuffle_buffer=16, seed=7, clean=MIXTURE)
    base.update(kw)
    return DataConfig(**base)


def take(loader: TokenLoader, n: int, states: list | None = None) -> list[dict]:
    out = []
    for batch in itertools.islice(loader, n):
        out.append(batch)
        if states is not None:
            states.append(json.loads(json.dumps(loader.state_dict())))
    return out


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["clean"], y["clean"])
                                    for x, y in zip(a, b))


def virtual_stream(directory: Path, loader: TokenLoader, epoch: int) -> np.ndarray:
    m = read_manifest(directory)
    shards = m.split(loader.split)
    return np.concatenate([read_shard(directory, shards[i]) for i in loader.plan.shard_order(epoch)])


def test_batches_are_the_stored_stream_cut_into_windows(shards):
    loader = TokenLoader(cfg_for(shards, shuffle_buffer=1, clean=CleanMaskConfig()), "train", batch_size=4)
    batches = take(loader, loader.batches_per_epoch)
    flat = torch.cat([b["tokens"] for b in batches]).flatten().numpy()
    assert batches[0]["tokens"].dtype == torch.long and batches[0]["clean"].dtype == torch.bool
    assert np.array_equal(flat, virtual_stream(shards, loader, 0)[:len(flat)])
    assert len(flat) > virtual_stream(shards, loader, 0).size - 4 * 128      # only a partial batch is dropped
    assert not any(b["clean"].any() for b in batches)                           # unconditional: nothing clean
    assert loader.plan.shard_order(0) != loader.plan.shard_order(1)             # shards reshuffled each epoch


def test_shuffle_permutes_windows_within_blocks(shards):
    plain = take(TokenLoader(cfg_for(shards, shuffle_buffer=1), "train", batch_size=4), 8)
    mixed = take(TokenLoader(cfg_for(shards, shuffle_buffer=32), "train", batch_size=4), 8)
    rows = lambda bs: sorted(tuple(r) for b in bs for r in b["tokens"].tolist())   # noqa: E731
    assert rows(plain) == rows(mixed) and not same(plain, mixed)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_same_batches(shards, workers):
    cfg = cfg_for(shards, num_workers=workers)
    ref_loader = TokenLoader(cfg, "train", batch_size=8)
    per_epoch = ref_loader.batches_per_epoch
    states: list = []
    ref = take(ref_loader, per_epoch + 12, states)
    assert ref_loader.counters["epoch"] == 1
    for k in (1, 5, 6, per_epoch - 1, per_epoch, per_epoch + 3):
        resumed = TokenLoader(cfg, "train", batch_size=8)
        resumed.load_state_dict(states[k - 1])                       # the state after batch k
        assert same(take(resumed, 6), ref[k:k + 6]), f"resume after batch {k}"
        assert resumed.counters["batches"] == k + 6
    assert len(json.dumps(states[-1])) < 1000


def global_order(cfg: DataConfig, world: int, accumulation: int, batches_per_rank: int) -> list[dict]:
    """The micro-batches of `world` ranks in global order (micro-batch g = k x world + rank)."""
    per_rank = [take(TokenLoader(cfg, "train", batch_size=4, rank=r, world_size=world, accumulation=accumulation),
                     batches_per_rank) for r in range(world)]
    return [per_rank[g % world][g // world] for g in range(world * batches_per_rank)]


def test_the_global_order_depends_on_the_global_batch_only(shards):
    """1 rank x 4 accumulation steps, 2 x 2 and 4 x 1, with 0, 1 or 2 workers: the same micro-batches in the same
    order, into the second epoch; a state saved on one layout resumes on another at the same global batch."""
    cfg = cfg_for(shards, shuffle_buffer=8)
    one = TokenLoader(cfg, "train", batch_size=4, world_size=1, accumulation=4)
    n = one.batches_per_epoch + 8
    ref = take(one, n)
    assert one.counters["epoch"] == 1
    for world, accumulation, workers in ((2, 2, 1), (4, 1, 2)):
        got = global_order(dataclasses.replace(cfg, num_workers=workers), world, accumulation, n // world)
        assert same(got, ref), (world, accumulation, workers)
    single = TokenLoader(cfg, "train", batch_size=4, world_size=1, accumulation=4)
    take(single, 12)
    state = single.state_dict()
    for rank in range(2):                          # 12 global micro-batches done: each of 2 ranks is at its 6th
        two = TokenLoader(dataclasses.replace(cfg, num_workers=2), "train", batch_size=4, rank=rank, world_size=2,
                          accumulation=2)
        two.load_state_dict(state)
        assert two.counters["batches"] == 6
        assert same(take(two, 5), ref[12 + rank:22 + rank:2]), rank


def test_resume_refuses_a_different_layout(shards):
    loader = TokenLoader(cfg_for(shards), "train", batch_size=8, world_size=1, accumulation=2)
    take(loader, 3)
    state = loader.state_dict()
    for other in (TokenLoader(cfg_for(shards), "train", batch_size=8),                    # another global batch
                  TokenLoader(cfg_for(shards), "train", batch_size=4, world_size=1, accumulation=4)):   # micro
        with pytest.raises(DataError, match="lanes was 2 when the state was saved and is (1|4) now"):
            other.load_state_dict(state)
    two = TokenLoader(cfg_for(shards), "train", batch_size=8, rank=1, world_size=2)
    with pytest.raises(DataError, match="cannot move the train loader from 1 to 2 ranks exactly: its 3 global"):
        two.load_state_dict(state)                     # 3 micro-batches cannot be shared by 2 ranks
    with pytest.raises(DataError, match="written by an earlier DIMBA version with 2 workers"):
        two.load_state_dict({**state, "version": 1, "workers": 2, "world_size": 2})
    earlier = {**state, "version": 1, "workers": 1, "world_size": 2, "batches": 5}    # one slot per rank = a lane
    del earlier["lanes"]
    two.load_state_dict(earlier)
    assert two.counters["batches"] == 5
    with pytest.raises(DataError, match="not a TokenLoader state"):
        two.load_state_dict({"epoch": 3})


@pytest.mark.parametrize("world_size, workers", [(2, 0), (3, 2)])
def test_ranks_yield_equal_batches_with_uneven_shards(uneven, world_size, workers):
    sizes = [s.tokens for s in read_manifest(uneven).split("train")]
    assert max(sizes) > 5 * min(sizes)
    cfg = cfg_for(uneven, num_workers=workers, shuffle_buffer=4)
    loaders = [TokenLoader(cfg, "train", batch_size=2, rank=r, world_size=world_size) for r in range(world_size)]
    per_epoch = {ld.batches_per_epoch for ld in loaders}
    assert len(per_epoch) == 1
    windows = []
    for ld in loaders:
        batches = take(ld, ld.batches_per_epoch)
        assert len(batches) == ld.batches_per_epoch and ld.counters["epoch"] == 1
        windows += [tuple(r) for b in batches for r in b["tokens"].tolist()]
    assert len(set(windows)) == len(windows)                 # every window of the epoch is read once
    total = sum(sizes)
    assert len(windows) * 128 > total - world_size * max(1, workers) * (2 + 1) * 128


def test_two_real_ranks_never_wait_for_each_other(uneven, shards, tmp_path):
    """Two processes under torch.distributed (gloo) all-reduce once per batch: a train epoch, then a val pass."""
    port = free_port()
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(f"""
        import datetime, itertools, json, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
        sys.path.insert(0, {str(REPO)!r})
        from dimba.config.schema import DataConfig
        from dimba.data.loader import TokenLoader

        def run(rank):
            dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                    timeout=datetime.timedelta(seconds=60))
            train = TokenLoader(DataConfig(shards={str(uneven)!r}, seq_len=64, num_workers=1, shuffle_buffer=4),
                                "train", batch_size=4, rank=rank, world_size=2)
            val = TokenLoader(DataConfig(shards={str(shards)!r}, seq_len=64, num_workers=0),
                              "val", batch_size=4, rank=rank, world_size=2)
            counts = []
            for stream in (itertools.islice(train, train.batches_per_epoch), val):
                n = 0
                for batch in stream:
                    total = batch["tokens"].sum().double()
                    dist.all_reduce(total)
                    n += 1
                counts.append(n)
            with open(f"{tmp_path}/rank{{rank}}.json", "w") as f:
                json.dump({{"counts": counts, "epoch": train.counters["epoch"]}}, f)
            dist.destroy_process_group()

        if __name__ == "__main__":
            mp.spawn(run, nprocs=2)
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1 and rank0["epoch"] == 1 and min(rank0["counts"]) > 0   # a whole epoch on both ranks


def corrupt_copy(src: Path, dst: Path, name: str, how: str) -> Path:
    shutil.copytree(src, dst)
    path = dst / name
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[:len(data) // 2])
    else:                                                       # same size, one flipped byte in the data
        path.write_bytes(data[:2000] + bytes([data[2000] ^ 0xFF]) + data[2001:])
    return dst


@pytest.mark.parametrize("workers, how", [(0, "truncate"), (2, "flip")])
def test_corrupt_shard_is_skipped_counted_and_resume_stays_exact(shards, tmp_path, caplog, workers, how):
    bad = corrupt_copy(shards, tmp_path / "bad", "train-000004.tar", how)
    cfg = cfg_for(bad, num_workers=workers)
    loader = TokenLoader(cfg, "train", batch_size=8)
    states: list = []
    with caplog.at_level(logging.WARNING, logger="dimba.data.loader"):
        batches = take(loader, loader.batches_per_epoch, states)
    intact = TokenLoader(cfg_for(shards, num_workers=workers), "train", batch_size=8)
    assert len(batches) == loader.batches_per_epoch == intact.batches_per_epoch
    assert loader.counters["corrupt_shards_skipped"] == 1
    assert "train-000004.tar" in caplog.text and ("bytes" in caplog.text or "sha256" in caplog.text)
    k = loader.batches_per_epoch // 2
    resumed = TokenLoader(cfg, "train", batch_size=8)
    resumed.load_state_dict(states[k - 1])
    assert same(take(resumed, 10), batches[k:k + 10])
    assert resumed.counters["corrupt_shards_skipped"] == 1             # restored from the state, found again
    assert resumed.state_dict()["corrupt_shards"] == ["train-000004.tar"]


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_shard_raises_when_configured(shards, tmp_path, workers):
    bad = corrupt_copy(shards, tmp_path / "bad", "val-000000.tar", "truncate")
    loader = TokenLoader(cfg_for(bad, num_workers=workers, on_corrupt="raise"), "val", batch_size=4)
    with pytest.raises(CorruptShardError, match=r"val-000000.tar has \d+ bytes, the manifest says"):
        list(loader)


def test_damaged_tar_with_matching_manifest_entry_is_reported(shards, tmp_path):
    info = read_manifest(shards).split("train")[0]
    cut = (shards / info.name).read_bytes()[:3000]
    (tmp_path / info.name).write_bytes(cut)
    fake = dataclasses.replace(info, bytes=len(cut), sha256=hashlib.sha256(cut).hexdigest())
    with pytest.raises(CorruptShardError, match="is not a readable tar|holds .* tokens, the manifest says"):
        read_shard(tmp_path, fake)


@pytest.mark.parametrize("workers", [0, 2])
def test_val_is_a_finite_repeatable_pass_in_file_order(shards, workers):
    loader = TokenLoader(cfg_for(shards, num_workers=workers), "val", batch_size=4)
    first, second = list(loader), list(loader)
    assert len(first) == loader.batches_per_epoch > 0 and same(first, second)
    if workers == 0:
        flat = torch.cat([b["tokens"] for b in first]).flatten().numpy()
        assert np.array_equal(flat, virtual_stream(shards, loader, 0)[:len(flat)])


def test_clean_masks_follow_the_mixture_and_are_reproducible(shards):
    a = take(TokenLoader(cfg_for(shards), "train", batch_size=8), 40)
    b = take(TokenLoader(cfg_for(shards), "train", batch_size=8), 40)
    assert same(a, b)
    masks = torch.cat([x["clean"] for x in a])
    none_share = (~masks.any(dim=1)).float().mean().item()
    assert 0.15 < none_share < 0.35                                     # mixture: none = 0.25
    assert masks[:, 0].float().mean().item() > 0.4                      # prefix and infill start clean


def test_missing_or_small_data_gives_clear_errors(shards, tmp_path):
    with pytest.raises(DataError, match="no manifest.json in .*make shards with data_prep/shard.py"):
        TokenLoader(cfg_for(tmp_path), "train", batch_size=8)
    with pytest.raises(DataError, match="the val split holds .* fewer than one batch per lane"):
        TokenLoader(cfg_for(shards, seq_len=4096), "val", batch_size=8)
    tok = load_tokenizer(cfg_for(shards))
    assert tok.vocab_size == 4096 and tok.path == shards / "tokenizer.model"

"""Data-layer speed: shard.py against raw sentencepiece, loader tokens/s per rank, resume cost.

    python benchmarks/bench_data.py                                   # the bundled corpus (1.5 MB)
    python benchmarks/bench_data.py --corpus '../shared/data/gutenberg/*.txt' '../shared/data/more/*.gz'

1. Sharding: tokens/s of data_prep/shard.py run as a real subprocess (reading, encoding,
   tar writing with fsync, manifest, Python start-up included) against the raw
   sentencepiece encode rate on all cores, measured on the same documents already in
   memory: the better of sentencepiece's own thread pool and a process pool. Goal >= 0.9x.
2. Loader: steady tokens/s of one rank's TokenLoader (after the first batch) for a few
   seq_len / worker settings, next to what one GPU consumes (a 1B model on an H100
   trains at roughly 30-50k tokens/s).
3. Resume: time to the first batch from a fresh loader and from one resumed deep in a
   later epoch (the loader re-reads one shuffle block and its shards, never the epoch).
"""
from __future__ import annotations

import argparse
import itertools
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import sentencepiece as spm

from dimba.config.schema import CleanMaskConfig, DataConfig
from dimba.data.documents import InputStats, expand_inputs, iter_documents
from dimba.data.loader import TokenLoader
from dimba.data.sharding import cpu_count

GPU_TOKENS_PER_S = (30_000, 50_000)
_SP = None


def _init(path: str) -> None:
    global _SP
    _SP = spm.SentencePieceProcessor(model_file=path)


def _count(texts: list[str]) -> int:
    return sum(map(len, _SP.encode(texts, num_threads=1)))


def raw_cpu_seconds(docs: list[str], tokenizer: str) -> float:
    """CPU seconds to encode every document once (the work shard.py cannot avoid), best of two."""
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    best = float("inf")
    for _ in range(2):
        t = time.process_time()
        for i in range(0, len(docs), 2000):
            sp.encode(docs[i:i + 2000], num_threads=1)
        best = min(best, time.process_time() - t)
    return best


def raw_rates(docs: list[str], tokenizer: str, workers: int) -> tuple[int, float, float]:
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    t = time.perf_counter()
    tokens = sum(map(len, sp.encode(docs, num_threads=workers)))
    threads = tokens / (time.perf_counter() - t)
    batches, cur, chars = [], [], 0
    for d in docs:
        cur.append(d)
        chars += len(d)
        if chars >= 1 << 18:
            batches.append(cur)
            cur, chars = [], 0
    batches.append(cur)
    with ProcessPoolExecutor(workers, initializer=_init, initargs=(tokenizer,)) as pool:
        list(pool.map(_count, batches[:workers]))                      # warm the workers
        t = time.perf_counter()
        assert sum(pool.map(_count, batches)) == tokens
        procs = tokens / (time.perf_counter() - t)
    return tokens, threads, procs


def bench_sharding(args, out: Path) -> None:
    """Best of `repeats` for each, interleaved, because other jobs on the machine make single runs noisy."""
    docs = list(iter_documents(expand_inputs(args.corpus), stats=InputStats(warn=lambda m: None)))
    cmd = [sys.executable, str(REPO / "data_prep" / "shard.py"), "--input", *args.corpus, "--tokenizer",
           args.tokenizer, "--val-fraction", "0.01", "--shard-tokens", str(args.shard_tokens),
           "--workers", str(args.workers), "--no-progress", "--overwrite", "--output"]
    threads, procs, walls, cpus, said = [], [], [], [], ""
    raw_cpu = raw_cpu_seconds(docs, args.tokenizer)
    for i in range(args.repeats):
        tokens, t_rate, p_rate = raw_rates(docs, args.tokenizer, args.workers)
        threads.append(t_rate)
        procs.append(p_rate)
        t, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        r = subprocess.run(cmd + [str(out)], capture_output=True, text=True)
        walls.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        if r.returncode != 0:
            sys.exit(f"shard.py failed: {r.stderr}")
        said = r.stderr.strip().splitlines()[-1]
    raw = max(max(threads), max(procs))
    ours = tokens / min(walls)
    ratios = sorted(tokens / w / max(t, p) for w, t, p in zip(walls, threads, procs))   # within one repeat
    print(f"\n## Sharding ({len(docs):,} documents, {tokens:,} tokens, {args.workers} worker(s) on {cpu_count()} "
          f"cores, best of {args.repeats})")
    print("| what | seconds | tokens/s | vs raw |")
    print("|---|---:|---:|---:|")
    print(f"| raw sentencepiece, its thread pool ({args.workers} threads) | {tokens / max(threads):.2f} | "
          f"{max(threads):,.0f} | {max(threads) / raw:.2f} |")
    print(f"| raw sentencepiece, process pool ({args.workers} processes) | {tokens / max(procs):.2f} | "
          f"{max(procs):,.0f} | {max(procs) / raw:.2f} |")
    print(f"| shard.py end to end (subprocess: start-up, reading, tars, manifest) | {min(walls):.2f} | {ours:,.0f} | "
          f"**{ours / raw:.2f}** |")
    print(f"| shard.py / raw measured back to back, median of {args.repeats} | | | "
          f"**{ratios[len(ratios) // 2]:.2f}** |")
    print(f"| CPU seconds: raw encode in one process vs shard.py and its workers | {raw_cpu:.2f} vs "
          f"{min(cpus):.2f} | | **{raw_cpu / min(cpus):.2f}** |")
    print(f"\nshard.py's own summary (last run): {said}")
    print("Wall-clock ratios swing with other load on a shared machine; the CPU-seconds ratio is what a "
          "dedicated machine with every core busy would show.")


def loader_rate(cfg: DataConfig, batches: int) -> tuple[float, float]:
    loader = TokenLoader(cfg, "train", batch_size=8)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - t0
    t = time.perf_counter()
    n = sum(b["tokens"].numel() for b in itertools.islice(it, batches))
    return first, n / (time.perf_counter() - t)


def bench_loader(args, shards: Path) -> None:
    mix = CleanMaskConfig(none=0.25, prefix=0.25, infill=0.25, spans=0.25)
    print("\n## Loader, one rank, batch 8 (steady state after the first batch)")
    print("| seq_len | workers | clean masks | first batch s | tokens/s | x a GPU's 50k tokens/s |")
    print("|---:|---:|---|---:|---:|---:|")
    for seq_len, workers, clean in ((256, 0, "none"), (1024, 0, "none"), (1024, 0, "mixture"),
                                    (1024, 2, "mixture"), (2048, 2, "mixture")):
        cfg = DataConfig(shards=str(shards), seq_len=seq_len, num_workers=workers, shuffle_buffer=256,
                         clean=mix if clean == "mixture" else CleanMaskConfig())
        first, rate = loader_rate(cfg, args.loader_batches)
        print(f"| {seq_len} | {workers} | {clean} | {first:.3f} | {rate:,.0f} | {rate / GPU_TOKENS_PER_S[1]:.0f}x |")


def bench_resume(args, shards: Path) -> None:
    print("\n## Resume: time to the first batch (seq_len 1024, batch 8, shuffle_buffer 256)")
    print("| workers | start | first batch s | replaying the batches before it instead, s |")
    print("|---:|---|---:|---:|")
    for workers in (0, 2):
        cfg = DataConfig(shards=str(shards), seq_len=1024, num_workers=workers, shuffle_buffer=256)
        fresh = TokenLoader(cfg, "train", batch_size=8)
        t = time.perf_counter()
        next(iter(fresh))
        t_fresh = time.perf_counter() - t
        deep = 3 * fresh.batches_per_epoch + fresh.batches_per_epoch // 2 + 1
        resumed = TokenLoader(cfg, "train", batch_size=8)
        resumed.load_state_dict(dict(fresh.state_dict(), batches=deep))
        t = time.perf_counter()
        next(iter(resumed))
        t_resumed = time.perf_counter() - t
        replay = TokenLoader(cfg, "train", batch_size=8)
        t = time.perf_counter()
        for _ in itertools.islice(replay, deep + 1):
            pass
        t_replay = time.perf_counter() - t
        print(f"| {workers} | fresh | {t_fresh:.3f} | - |")
        print(f"| {workers} | after batch {deep:,} (epoch 3) | {t_resumed:.3f} | {t_replay:.2f} |")
    shard = max(s.tokens for s in fresh.plan.shards)
    print(f"\nA resumed worker re-reads one shuffle block ({256 * 1024:,} tokens) and the shards under it "
          f"(here up to {shard:,} tokens each, read whole and checksummed), never the epoch.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", nargs="+", default=[str(REPO / "data_prep" / "corpus" / "*.txt")])
    p.add_argument("--tokenizer", default=str(REPO / "data_prep" / "tokenizer" / "tokenizer.model"))
    p.add_argument("--workers", type=int, default=cpu_count())
    p.add_argument("--shard-tokens", type=int, default=100_000)
    p.add_argument("--loader-batches", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3, help="sharding runs (best of)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        bench_sharding(args, shards)
        bench_loader(args, shards)
        bench_resume(args, shards)


if __name__ == "__main__":
    main()

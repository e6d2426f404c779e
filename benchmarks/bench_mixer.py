"""Speed of the Mamba-2 mixer (dimba.model.mamba2.Mamba2), forward + backward.

CPU mode (default): tokens/s of the pure-PyTorch chunked path vs the step-by-step sequential reference,
achieved GFLOP/s, and that as a fraction of this machine's fp32 matmul GFLOP/s measured in the same run.
CUDA mode (--device cuda): fused (mamba-ssm / causal-conv1d kernels) vs chunked (eager and torch.compile)
in bf16: agreement of outputs and gradients, then tokens/s, TFLOP/s and MFU.

FLOPs per mixer, Megatron-LM's count for a Mamba-2 layer (T tokens, h = d_model, d_in = expand * d_model,
G = ngroups, N = d_state):
    forward  = 2*T*h*(2*d_in + 2*G*N + nheads)   in_proj
             + 7*T*d_in*N                        SSD scan
             + 2*T*d_in*h                        out_proj
    forward + backward = 3 * forward
The count ignores the conv, norm and the chunked form's quadratic intra-chunk work, so it measures useful
work: the same number for every implementation.

Usage:
    python benchmarks/bench_mixer.py                       # CPU, d_model 256, L 256 and 1024
    python benchmarks/bench_mixer.py --seq-len 512 2048 --batch 2
    python benchmarks/bench_mixer.py --device cuda --d-model 2048 --seq-len 2048 8192 --batch 4

Measured on the development machine (2 shared CPU cores, torch 2.13.0+cpu, fp32; d_model 256, d_state 128,
headdim 64, expand 2, ngroups 1, chunk 256, batch 1; forward+backward; best of 10). Other jobs shared the
cores; these are runs taken while the load was low, and a loaded machine gives up to 10x less.
    fp32 matmul 2048^3: 388-410 GFLOP/s (410 in the run below)
    impl             seq_len   ms/iter   tokens/s  GFLOP/s  of matmul
    chunked              256       9.4      27356   113.3      27.6%   (29.2k tokens/s with --chunk-size 128)
    sequential           256     105.0       2438    10.1       2.5%
    chunked             1024      40.8      25115   104.0      25.3%   (27.2k tokens/s with --chunk-size 128)
    sequential          1024    1000.0       1024     4.2       1.0%
    With one thread (torch.set_num_threads(1), machine loaded): chunked 19.7 / 90.1 ms (L 256 / 1024),
    torch.compile of it 12.8 / 65.6 ms (1.4-1.5x).
    With 2 threads on a loaded machine the compiled path collapsed (~500 ms): its OpenMP loops wait on a
    descheduled thread; compare compile numbers only on an idle machine.
The CUDA mode has not been run yet (no GPU here).
"""

import argparse
import copy
import sys
import time

import torch

from dimba.model.mamba2 import Mamba2, fused_available

H100_PEAK_BF16 = 989e12     # dense bf16 peak, as torchtitan / llm-foundry use
MEASURED_MATMUL_BF16 = 790e12  # a large bf16 matmul measured on one H100 or H200


def mixer_flops(m: Mamba2, tokens: int) -> float:
    """Forward + backward FLOPs, Megatron-LM formula (see module docstring)."""
    h, d_in, G, N = m.d_model, m.d_inner, m.ngroups, m.d_state
    fwd = 2 * tokens * h * (2 * d_in + 2 * G * N + m.nheads) + 7 * tokens * d_in * N + 2 * tokens * d_in * h
    return 3.0 * fwd


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_it(fn, device: str, warmup: int, iters: int, budget_s: float = 20.0) -> float:
    """Fastest seconds per call over `iters` calls (stops early once `budget_s` is spent: the sequential
    path is slow). The minimum, not the median: on a machine shared with other jobs it is the number that
    reproduces; the same estimator is used for the matmul reference, so ratios stay fair."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start = time.perf_counter()
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return min(times)


def matmul_flops_per_s(device: str, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / time_it(lambda: a @ b, device, warmup=2, iters=10)


def fwd_bwd(m: Mamba2, u: torch.Tensor):
    def run():
        m.zero_grad(set_to_none=True)
        m(u).float().square().mean().backward()
    return run


def build(args, device: str, dtype: torch.dtype, impl: str) -> Mamba2:
    torch.manual_seed(0)
    return Mamba2(d_model=args.d_model, d_state=args.d_state, headdim=args.headdim, expand=args.expand,
                  ngroups=args.ngroups, chunk_size=args.chunk_size, impl=impl, device=device, dtype=dtype)


def bench_cpu(args) -> None:
    peak = matmul_flops_per_s("cpu", torch.float32, 2048)
    print(f"# CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# fp32 matmul 2048^3: {peak / 1e9:.1f} GFLOP/s")
    print(f"# d_model {args.d_model}, d_state {args.d_state}, headdim {args.headdim}, expand {args.expand}, "
          f"ngroups {args.ngroups}, chunk {args.chunk_size}, batch {args.batch}, fp32, forward+backward")
    print(f"{'impl':<16} {'seq_len':>7} {'ms/iter':>9} {'tokens/s':>10} {'GFLOP/s':>8} {'of matmul':>9}")
    m = build(args, "cpu", torch.float32, "chunked")
    seq_m = copy.deepcopy(m)
    seq_m.impl = "sequential"
    runs = [("chunked", m), ("sequential", seq_m)]
    if args.compile:  # compiling forward + backward takes about a minute per shape on 2 cores
        runs.insert(1, ("chunked+compile", torch.compile(m)))
    for seq_len in args.seq_len:
        u = torch.randn(args.batch, seq_len, args.d_model)
        for name, mod in runs:
            s = time_it(fwd_bwd(mod, u), "cpu", warmup=2 if "compile" in name else 1, iters=args.iters)
            tokens = args.batch * seq_len
            fl = mixer_flops(m, tokens) / s
            print(f"{name:<16} {seq_len:>7} {s * 1e3:>9.1f} {tokens / s:>10.0f} {fl / 1e9:>8.2f} {fl / peak:>9.1%}")


def grads_of(m: Mamba2, u: torch.Tensor) -> tuple[torch.Tensor, dict]:
    m.zero_grad(set_to_none=True)
    ui = u.clone().requires_grad_()
    y = m(ui)
    y.float().square().mean().backward()
    return y.detach().float(), {"u": ui.grad.float(), **{k: p.grad.float() for k, p in m.named_parameters()}}


def bench_cuda(args) -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_mixer: --device cuda needs a CUDA GPU")
    if not fused_available():
        sys.exit("bench_mixer: --device cuda compares against the fused kernels; install the gpu extra: "
                 "pip install 'dimba[gpu]'")
    dtype = torch.bfloat16
    peak = matmul_flops_per_s("cuda", dtype, 8192)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 params and activations")
    print(f"# bf16 matmul 8192^3: {peak / 1e12:.0f} TFLOP/s")
    print(f"# d_model {args.d_model}, d_state {args.d_state}, headdim {args.headdim}, expand {args.expand}, "
          f"ngroups {args.ngroups}, chunk {args.chunk_size}, batch {args.batch}, forward+backward")

    fused = build(args, "cuda", dtype, "fused")
    chunked = copy.deepcopy(fused)
    chunked.impl = "chunked"
    compiled = torch.compile(chunked)

    # Agreement on a short sequence: chunked computes the scan in float32 like the kernel; both see the
    # same bf16 weights, so differences are bf16 rounding of intermediate activations.
    u = torch.randn(args.batch, min(args.seq_len), args.d_model, device="cuda", dtype=dtype)
    y_f, g_f = grads_of(fused, u)
    y_c, g_c = grads_of(chunked, u)
    print("agreement fused vs chunked (relative L2 error):")
    print(f"  output {((y_f - y_c).norm() / y_c.norm()).item():.2e}")
    for k in g_f:
        print(f"  grad {k:<16} {((g_f[k] - g_c[k]).norm() / g_c[k].norm().clamp_min(1e-30)).item():.2e}")

    print(f"{'impl':<16} {'seq_len':>7} {'ms/iter':>9} {'tokens/s':>11} {'TFLOP/s':>8} "
          f"{'MFU@989':>8} {'MFU@790':>8} {'of matmul':>9}")
    for seq_len in args.seq_len:
        u = torch.randn(args.batch, seq_len, args.d_model, device="cuda", dtype=dtype)
        for name, mod in (("fused", fused), ("chunked", chunked), ("chunked+compile", compiled)):
            try:
                s = time_it(fwd_bwd(mod, u), "cuda", warmup=3, iters=args.iters)
            except torch.OutOfMemoryError:
                print(f"{name:<16} {seq_len:>7}  out of memory")
                torch.cuda.empty_cache()
                continue
            tokens = args.batch * seq_len
            fl = mixer_flops(fused, tokens) / s
            print(f"{name:<16} {seq_len:>7} {s * 1e3:>9.2f} {tokens / s:>11.0f} {fl / 1e12:>8.1f} "
                  f"{fl / H100_PEAK_BF16:>8.1%} {fl / MEASURED_MATMUL_BF16:>8.1%} {fl / peak:>9.1%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seq-len", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-state", type=int, default=128)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--expand", type=int, default=2)
    p.add_argument("--ngroups", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="CPU: also time torch.compile of the chunked path")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    (bench_cuda if args.device == "cuda" else bench_cpu)(args)


if __name__ == "__main__":
    main()

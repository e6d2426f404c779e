"""The SSD (state-space duality) scan of Mamba-2, in plain PyTorch.

Two implementations with the semantics of mamba_ssm's Triton kernel
`mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D, z, dt_bias, ...)`:

- `ssd_sequential`: the recurrence, one time step at a time. Slow and obviously correct; the reference.
- `ssd_chunked`: the chunked SSD algorithm (Mamba-2 paper, Listing 1), fully vectorized: quadratic
  attention-like form inside each chunk, a low-rank state hand-off between chunks. The CPU path,
  and torch.compile-friendly (no Python loop over time or chunks).

Shapes: x (b, l, h, p), dt (b, l, h), A (h,), B and C (b, l, g, n) with h % g == 0 (head i uses
group i // (h // g)), D (h,) or (h, p), z (b, l, h, p), initial_states (b, h, p, n).

Per head, with dt already biased/softplus-ed/clamped (`process_dt`):
    h_t = exp(dt_t * A) h_{t-1} + dt_t * x_t B_t^T        (state: p x n)
    y_t = h_t C_t + D x_t,      then y_t *= silu(z_t) when z is given.

Both compute in float32 (or float64 for float64 inputs), return y in x.dtype and the final state in the
compute dtype, as the Triton kernel does (it keeps states in float32).
"""

import math

import torch
import torch.nn.functional as F

_NO_LIMIT = (0.0, float("inf"))


def _check_shapes(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  D: torch.Tensor | None, z: torch.Tensor | None, initial_states: torch.Tensor | None) -> None:
    if x.dim() != 4:
        raise ValueError(f"ssd: x must be (batch, seqlen, nheads, headdim), got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if dt.shape != (b, l, h):
        raise ValueError(f"ssd: dt must be {(b, l, h)} to match x, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"ssd: A must be ({h},) (one per head), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, l) or B.shape != C.shape:
        raise ValueError(f"ssd: B and C must both be (batch={b}, seqlen={l}, ngroups, d_state), "
                         f"got {tuple(B.shape)} and {tuple(C.shape)}")
    if h % B.shape[2] != 0:
        raise ValueError(f"ssd: nheads ({h}) must be a multiple of ngroups ({B.shape[2]})")
    if D is not None and D.shape not in ((h,), (h, p)):
        raise ValueError(f"ssd: D must be ({h},) or ({h}, {p}), got {tuple(D.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"ssd: z must have the shape of x {tuple(x.shape)}, got {tuple(z.shape)}")
    if initial_states is not None and initial_states.shape != (b, h, p, B.shape[3]):
        raise ValueError(f"ssd: initial_states must be {(b, h, p, B.shape[3])}, got {tuple(initial_states.shape)}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 (tests compare in float64)."""
    return torch.promote_types(x.dtype, torch.float32)


def process_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None = None, dt_softplus: bool = False,
               dt_limit: tuple[float, float] = _NO_LIMIT) -> torch.Tensor:
    """dt -> clamp(softplus(dt + dt_bias), *dt_limit), as the kernel's `_chunk_cumsum_fwd` does.

    F.softplus has threshold 20 (identity above), the same guard as the kernel. The kernel always clamps
    (default limit (0, inf)), so a raw negative dt without softplus becomes 0 in both.
    """
    dt = dt.to(torch.promote_types(dt.dtype, torch.float32))
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    return dt.clamp(min=dt_limit[0], max=dt_limit[1])


def _finish(y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    """y + D x, then the optional silu(z) gate; y and x are (b, l, h, p) in the compute dtype."""
    if D is not None:
        Dc = D.to(y.dtype)
        y = y + x * (Dc[:, None] if Dc.dim() == 1 else Dc)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def ssd_sequential(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    chunk_size: int | None = None, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None, *, dt_softplus: bool = False, dt_limit: tuple[float, float] = _NO_LIMIT,
    initial_states: torch.Tensor | None = None, return_final_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference SSD scan: the recurrence step by step. `chunk_size` is accepted and ignored so the two
    implementations are interchangeable. Returns y (b, l, h, p), plus the final state (b, h, p, n) if asked."""
    _check_shapes(x, dt, A, B, C, D, z, initial_states)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    cdt = _compute_dtype(x)
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit).to(cdt)
    xc, Ac = x.to(cdt), A.to(cdt)
    # Expand groups to heads: head i reads group i // (h // g).
    Bh = B.to(cdt).repeat_interleave(h // g, dim=2)  # (b, l, h, n)
    Ch = C.to(cdt).repeat_interleave(h // g, dim=2)
    state = xc.new_zeros(b, h, p, n) if initial_states is None else initial_states.to(cdt)
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * Ac)  # (b, h)
        inject = (dt[:, t, :, None] * xc[:, t])[..., None] * Bh[:, t, :, None, :]  # (b, h, p, n)
        state = decay[..., None, None] * state + inject
        ys.append((state * Ch[:, t, :, None, :]).sum(-1))  # (b, h, p)
    y = torch.stack(ys, dim=1) if l > 0 else xc.new_zeros(b, 0, h, p)
    y = _finish(y, xc, D, z).to(x.dtype)
    return (y, state) if return_final_states else y


class _ExpDecay(torch.autograd.Function):
    """exp of log-decays (<= 0), with entries outside `keep` and decays below ~1e-29 (float32) set to 0.

    Why the floor: once exp underflows into denormals, CPU exp, mul and matmul run 5-50x slower (measured
    here: exp over 2M values in [-1000, 0] 16 ms vs 0.3 ms in [-80, 0]; exp(-inf) is slow too). A term
    decayed by e^-67 (float32; e^-688 for float64) is far below rounding, so it is dropped exactly.
    The argument is clamped into [floor, 0] before exp, so exp never sees a positive number (masked
    entries would overflow to inf, and their zero gradient become inf * 0 = nan).
    Backward is grad * out: exact, since every clamped entry is also zeroed. Written as a Function
    because autograd through clamp + masked_fill costs five more passes over the (Q, Q) tensors.
    """

    @staticmethod
    def forward(ctx, log_decay: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        floor = math.log(torch.finfo(log_decay.dtype).tiny) + 20.0
        drop = log_decay < floor
        if keep is not None:
            drop = drop | ~keep
        out = torch.exp(log_decay.clamp(min=floor, max=0.0)).masked_fill_(drop, 0.0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (out,) = ctx.saved_tensors
        return grad * out, None


def _exp_decay(log_decay: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    return _ExpDecay.apply(log_decay, keep)


def _segsum_exp(cs: torch.Tensor) -> torch.Tensor:
    """exp(cs[..., i] - cs[..., j]) for i >= j, 0 above the diagonal: (..., T) -> (..., T, T).

    cs is a cumulative sum of non-positive numbers, so it never increases (rounding is monotone) and
    every kept difference is <= 0.
    """
    T = cs.shape[-1]
    keep = torch.ones(T, T, dtype=torch.bool, device=cs.device).tril()
    return _exp_decay(cs[..., :, None] - cs[..., None, :], keep)


def ssd_chunked(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    chunk_size: int = 256, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None, *, dt_softplus: bool = False, dt_limit: tuple[float, float] = _NO_LIMIT,
    initial_states: torch.Tensor | None = None, return_final_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan, same results as `ssd_sequential` up to rounding.

    Any length works: the sequence is padded to a multiple of the chunk length with dt = 0 (no decay, no
    input) and B = C = x = 0, so padding changes neither outputs nor the final state. A sequence shorter
    than `chunk_size` is processed as one chunk of its own length (same result, less padded work).
    """
    _check_shapes(x, dt, A, B, C, D, z, initial_states)
    if chunk_size <= 0:
        raise ValueError(f"ssd_chunked: chunk_size must be positive, got {chunk_size}")
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g  # heads per group
    cdt = _compute_dtype(x)
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit).to(cdt)
    xc, Bc, Cc = x.to(cdt), B.to(cdt), C.to(cdt)

    Q = max(1, min(chunk_size, l))  # chunk length
    pad = (-l) % Q
    if pad:  # zeros at the end of the time axis (dim 1)
        xp = F.pad(xc, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        Bc, Cc = F.pad(Bc, (0, 0, 0, 0, 0, pad)), F.pad(Cc, (0, 0, 0, 0, 0, pad))
    else:
        xp = xc
    c = (l + pad) // Q  # number of chunks

    # Layouts: groups split from heads so B/C are shared without copying them per head.
    X = xp.reshape(b, c, Q, g, r, p).permute(0, 1, 3, 4, 2, 5)          # (b, c, g, r, Q, p)
    Bk = Bc.reshape(b, c, Q, g, n).permute(0, 1, 3, 2, 4)                # (b, c, g, Q, n)
    Ck = Cc.reshape(b, c, Q, g, n).permute(0, 1, 3, 2, 4)                # (b, c, g, Q, n)
    dtk = dt.reshape(b, c, Q, g, r).permute(0, 1, 3, 4, 2)               # (b, c, g, r, Q)
    cs = torch.cumsum(dtk * A.to(cdt).reshape(g, r, 1), dim=-1)          # (b, c, g, r, Q) log-decay so far

    Xdt = X * dtk[..., None]  # dt scales the input; applied here, on (Q, p), not on the (Q, Q) scores

    # 1. Inside each chunk: y_i = sum_{j<=i} (C_i . B_j) exp(cs_i - cs_j) dt_j x_j.
    CB = Ck @ Bk.transpose(-1, -2)                                       # (b, c, g, Q, Q)
    y = (CB[:, :, :, None] * _segsum_exp(cs)) @ Xdt                      # (b, c, g, r, Q, p)

    # 2. Each chunk's own contribution to the state at its end: sum_j exp(cs_end - cs_j) dt_j x_j B_j^T.
    Xw = (Xdt * _exp_decay(cs[..., -1:] - cs)[..., None]).transpose(-1, -2).reshape(b, c, g, r * p, Q)
    chunk_states = (Xw @ Bk).reshape(b, c, h, p, n)                      # (b, c, h, p, n)

    # 3. Hand states across chunks: the state entering chunk k is sum_{j<k} exp(decay j+1..k-1) s_j, with
    #    the initial state as s_{-1}. A (c+1) x (c+1) lower-triangular mix, vectorized like step 1.
    s0 = xc.new_zeros(b, 1, h, p, n) if initial_states is None else initial_states.to(cdt)[:, None]
    states = torch.cat([s0, chunk_states], dim=1).reshape(b, c + 1, h, p * n)
    chunk_decay = cs[..., -1].reshape(b, c, h).transpose(1, 2)           # (b, h, c)
    mix = _segsum_exp(F.pad(torch.cumsum(chunk_decay, dim=-1), (1, 0)))  # (b, h, c+1, c+1)
    states = (mix @ states.transpose(1, 2)).reshape(b, h, c + 1, p, n)
    final_state = states[:, :, -1]                                       # (b, h, p, n)
    entering = states[:, :, :-1].reshape(b, g, r, c, p, n).permute(0, 3, 1, 2, 5, 4)  # (b, c, g, r, n, p)

    # 4. Contribution of the entering state: y_i += exp(cs_i) C_i . state.
    y = y + (Ck[:, :, :, None] @ entering) * _exp_decay(cs)[..., None]   # (b, c, g, r, Q, p)

    y = y.permute(0, 1, 4, 2, 3, 5).reshape(b, c * Q, h, p)[:, :l]
    y = _finish(y, xc, D, z).to(x.dtype)
    return (y, final_state) if return_final_states else y

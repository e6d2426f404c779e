"""The Mamba-2 mixer: mamba_ssm's `Mamba2` module, with a pure PyTorch path beside the fused CUDA one.

Parameter names, shapes and initialization are those of `mamba_ssm.modules.mamba2.Mamba2` (mamba-ssm 2.3),
constructed in the same order so the same seed gives the same weights; state dicts load into either
module with strict=True. Tensor-parallel options (process_group, sequence_parallel) and the
single-kernel `use_mem_eff_path` are not supported; `impl` picks how the scan runs:

- "sequential": depthwise causal conv + `ssd_sequential` (step-by-step reference, for tests);
- "chunked":    depthwise causal conv + `ssd_chunked` (pure PyTorch; the CPU path);
- "fused":      `mamba_chunk_scan_combined` + Triton gated RMSNorm from mamba-ssm and `causal_conv1d_fn` from
                causal-conv1d (the `gpu` extra), CUDA tensors only. The Triton kernels also load from a
                mamba-ssm built without its CUDA extensions, and without causal-conv1d the conv runs in PyTorch;
- "auto":       "fused" for CUDA inputs when those kernels import, otherwise "chunked".
"""

import functools
import importlib.util
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from dimba.model.ssd import process_dt, ssd_chunked, ssd_sequential

IMPLS = ("auto", "fused", "chunked", "sequential")


def _import_mamba_triton():
    """mamba-ssm's Mamba-2 Triton kernels (mamba_chunk_scan_combined, gated rmsnorm_fn, the decoding step's
    selective_state_update).

    A mamba-ssm installed without its CUDA extensions (MAMBA_SKIP_CUDA_BUILD=TRUE: no long nvcc build) holds
    them too, but its package __init__ imports the Mamba-1 CUDA module `selective_scan_cuda` and fails. Then the
    package is registered without running its __init__: the Triton modules need nothing from it.
    """
    try:
        import mamba_ssm  # noqa: F401
    except ImportError:
        spec = importlib.util.find_spec("mamba_ssm")
        if spec is None or not spec.submodule_search_locations:
            raise
        sys.modules["mamba_ssm"] = importlib.util.module_from_spec(spec)
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    return mamba_chunk_scan_combined, rmsnorm_fn, selective_state_update


@functools.cache
def _load_fused() -> tuple[tuple | None, str]:
    """((causal_conv1d_fn or None, mamba_chunk_scan_combined, rmsnorm_fn, selective_state_update), what was
    loaded) or (None, why not).

    Imported lazily: mamba-ssm needs Triton, and its kernels CUDA. causal-conv1d is optional, as in mamba_ssm's
    own Mamba2: without it the conv runs in PyTorch (a small part of a layer's time).
    """
    try:
        scan, rmsnorm_fn, state_update = _import_mamba_triton()
    except Exception as e:  # ImportError, or a CUDA/Triton error raised while importing
        return None, f"{type(e).__name__}: {e}"
    try:
        from causal_conv1d import causal_conv1d_fn
        conv = "causal-conv1d"
    except Exception as e:
        causal_conv1d_fn, conv = None, f"PyTorch conv (causal-conv1d: {type(e).__name__}: {e})"
    return ((causal_conv1d_fn, scan, rmsnorm_fn, state_update),
            f"mamba-ssm Triton SSD scan, gated RMSNorm and decoding step, {conv}")


def _fused_kernels() -> tuple | None:
    return _load_fused()[0]


def fused_available() -> bool:
    """True when CUDA is present and mamba-ssm's Triton kernels import."""
    return torch.cuda.is_available() and _fused_kernels() is not None


def fused_description() -> str:
    """What the fused path runs on this machine, or why it cannot run (for logs and benchmark reports)."""
    if not torch.cuda.is_available():
        return "no CUDA: the chunked PyTorch scan"
    return _load_fused()[1]


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal conv in (batch, seqlen, channels) layout: y_t = bias + sum_k weight[:, 0, k] x_{t-K+1+k}.

    Equals nn.Conv1d(groups=channels, padding=K-1) truncated to the first seqlen outputs, without the
    transposes: the output stays contiguous, which makes the following silu and its backward ~2x faster.
    """
    K, L = weight.shape[-1], x.shape[1]
    xp = F.pad(x, (0, 0, K - 1, 0))
    w = weight.squeeze(1)  # (channels, K)
    y = xp[:, K - 1:] * w[:, K - 1]
    if bias is not None:
        y = y + bias
    for k in range(K - 1):
        y = torch.addcmul(y, xp[:, k:k + L], w[:, k])
    return y


class RMSNormGated(nn.Module):
    """RMSNorm with a silu(z) gate, per group of `group_size` channels (mamba_ssm's layernorm_gated.RMSNorm).

    norm_before_gate=True: rmsnorm(x) * silu(z); False (Mamba2's default): rmsnorm(x * silu(z)).
    Computes in float32 (float64 for float64 inputs) and returns x's dtype, like the Triton kernel.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.group_size = hidden_size if group_size is None else group_size
        if hidden_size % self.group_size != 0:
            raise ValueError(f"RMSNormGated: hidden_size {hidden_size} must be a multiple of group_size {group_size}")
        self.norm_before_gate = norm_before_gate

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        cdt = torch.promote_types(x.dtype, torch.float32)
        h = x.to(cdt)
        gate = F.silu(z.to(cdt)) if z is not None else None
        if gate is not None and not self.norm_before_gate:
            h = h * gate
        hg = h.unflatten(-1, (-1, self.group_size))
        h = (hg * torch.rsqrt(hg.square().mean(-1, keepdim=True) + self.eps)).flatten(-2)
        h = h * self.weight.to(cdt)
        if gate is not None and self.norm_before_gate:
            h = h * gate
        return h.to(x.dtype)


class Mamba2(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        conv_init: float | None = None,
        expand: int = 2,
        headdim: int = 64,
        d_ssm: int | None = None,  # if set, the SSM runs on this many channels, the rest is a gated MLP
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1, 16),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
        impl: str = "auto",
    ):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"Mamba2: impl must be one of {IMPLS}, got {impl!r}")
        self.d_model, self.d_state, self.d_conv, self.conv_init, self.expand = d_model, d_state, d_conv, conv_init, expand
        self.d_inner = expand * d_model
        self.headdim = headdim
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        if self.d_ssm > self.d_inner or self.d_ssm % headdim != 0:
            raise ValueError(f"Mamba2: d_ssm ({self.d_ssm}) must be a multiple of headdim ({headdim}) "
                             f"and at most expand * d_model ({self.d_inner})")
        self.ngroups = ngroups
        self.nheads = self.d_ssm // headdim
        if self.nheads % ngroups != 0:
            raise ValueError(f"Mamba2: nheads ({self.nheads} = d_ssm / headdim) must be a multiple of ngroups ({ngroups})")
        if not (A_init_range[0] > 0 and A_init_range[1] >= A_init_range[0]):
            raise ValueError(f"Mamba2: A_init_range must be 0 < lo <= hi, got {A_init_range}")
        self.D_has_hdim, self.rmsnorm, self.norm_before_gate = D_has_hdim, rmsnorm, norm_before_gate
        self.dt_limit = dt_limit
        self.chunk_size = chunk_size
        self.layer_idx = layer_idx
        self.impl = impl

        # Order: [z, x, B, C, dt]
        d_in_proj = 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads
        self.in_proj = nn.Linear(self.d_model, d_in_proj, bias=bias, **factory_kwargs)

        self.conv_dim = self.d_ssm + 2 * self.ngroups * self.d_state
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=conv_bias, **factory_kwargs)
        if self.conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -self.conv_init, self.conv_init)

        # dt_bias = softplus^-1(dt) for dt log-uniform in [dt_min, dt_max].
        dt = torch.exp(torch.rand(self.nheads, **factory_kwargs) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min))
        dt = torch.clamp(dt, min=dt_init_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))
        self.dt_bias = nn.Parameter(inv_dt)
        self.dt_bias._no_weight_decay = True

        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(dtype=dtype))
        self.A_log._no_weight_decay = True

        # D "skip" parameter; float32 whatever `dtype` is, as in mamba_ssm.
        self.D = nn.Parameter(torch.ones(self.d_ssm if D_has_hdim else self.nheads, device=device))
        self.D._no_weight_decay = True

        if self.rmsnorm:
            self.norm = RMSNormGated(self.d_ssm, eps=1e-5, norm_before_gate=norm_before_gate,
                                     group_size=self.d_ssm // ngroups, **factory_kwargs)

        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=bias, **factory_kwargs)

    # ---- helpers shared by forward and step ----

    def _split_in_proj(self, zxbcdt: torch.Tensor) -> tuple[torch.Tensor, ...]:
        d_mlp = self.d_inner - self.d_ssm
        return torch.split(zxbcdt, [d_mlp, d_mlp, self.d_ssm, self.conv_dim, self.nheads], dim=-1)

    def _D(self) -> torch.Tensor:
        return self.D.view(self.nheads, self.headdim) if self.D_has_hdim else self.D

    def _finish(self, y: torch.Tensor, z: torch.Tensor, z0: torch.Tensor, x0: torch.Tensor,
                rmsnorm_fn=None) -> torch.Tensor:
        """Gated norm (when the scan did not gate), the gated-MLP channels, out_proj.

        rmsnorm_fn: mamba_ssm's Triton gated RMSNorm (fused path), same math as self.norm in one kernel.
        """
        if self.rmsnorm and rmsnorm_fn is not None:
            y = rmsnorm_fn(y, self.norm.weight, None, z=z, eps=self.norm.eps, group_size=self.norm.group_size,
                           norm_before_gate=self.norm_before_gate)
        elif self.rmsnorm:
            y = self.norm(y, z)
        if z0.shape[-1] > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)

    def _resolve_impl(self, u: torch.Tensor) -> str:
        if self.impl == "auto":
            return "fused" if u.is_cuda and _fused_kernels() is not None else "chunked"
        if self.impl == "fused":
            if not u.is_cuda:
                raise RuntimeError("Mamba2: impl='fused' needs CUDA tensors; use impl='chunked' or 'auto' on CPU")
            if _fused_kernels() is None:
                raise RuntimeError("Mamba2: impl='fused' needs mamba-ssm's Triton kernels; install the gpu "
                                   f"extra: pip install 'dimba[gpu]' (import failed with {_load_fused()[1]})")
        return self.impl

    # ---- full-sequence forward ----

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u: (batch, seqlen, d_model) -> (batch, seqlen, d_model)."""
        if u.dim() != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"Mamba2: input must be (batch, seqlen, d_model={self.d_model}), got {tuple(u.shape)}")
        impl = self._resolve_impl(u)
        z0, x0, z, xBC, dt = self._split_in_proj(self.in_proj(u))
        # At least float32: exp of an fp16 A_log could overflow to -inf.
        A = -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))
        gated_scan = not self.rmsnorm  # without the norm, the scan itself applies silu(z)
        scan_kwargs = dict(D=self._D(), dt_bias=self.dt_bias, dt_softplus=True)

        if impl == "fused":
            causal_conv1d_fn, mamba_chunk_scan_combined, rmsnorm_fn, _ = _fused_kernels()
            if causal_conv1d_fn is not None:
                xBC = causal_conv1d_fn(xBC.transpose(1, 2), self.conv1d.weight.squeeze(1), bias=self.conv1d.bias,
                                       activation="silu").transpose(1, 2)
            else:
                xBC = F.silu(causal_conv1d(xBC, self.conv1d.weight, self.conv1d.bias))
            if self.dt_limit != (0.0, float("inf")):
                scan_kwargs["dt_limit"] = self.dt_limit
            scan = mamba_chunk_scan_combined
        else:
            xBC = F.silu(causal_conv1d(xBC, self.conv1d.weight, self.conv1d.bias))
            scan_kwargs["dt_limit"] = self.dt_limit
            scan = ssd_chunked if impl == "chunked" else ssd_sequential
            rmsnorm_fn = None  # self.norm, in PyTorch

        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        y = scan(
            x.unflatten(-1, (self.nheads, self.headdim)), dt, A,
            B.unflatten(-1, (self.ngroups, self.d_state)), C.unflatten(-1, (self.ngroups, self.d_state)),
            self.chunk_size, z=z.unflatten(-1, (self.nheads, self.headdim)) if gated_scan else None, **scan_kwargs,
        ).flatten(-2)

        return self._finish(y, z, z0, x0, rmsnorm_fn)

    # ---- recurrent decoding ----

    def allocate_inference_cache(self, batch_size: int, dtype: torch.dtype | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero states for `step`: conv_state (batch, conv_dim, d_conv), ssm_state (batch, nheads, headdim, d_state).

        By default the conv state takes the conv weight's dtype and the SSM state at least float32 (the
        full-sequence scan keeps its state in float32; a bf16 state would drift from it over long decodes).
        """
        device = self.out_proj.weight.device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        ssm_dtype = torch.promote_types(self.in_proj.weight.dtype, torch.float32) if dtype is None else dtype
        conv_state = torch.zeros(batch_size, self.conv_dim, self.d_conv, device=device, dtype=conv_dtype)
        ssm_state = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=ssm_dtype)
        return conv_state, ssm_state

    def step(self, u_t: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token: u_t (batch, d_model) -> (y_t (batch, d_model), new conv_state, new ssm_state).

        Constant memory. Returns new state tensors and leaves the given ones untouched (use the returned ones), so
        it works under autograd and torch.compile. On the fused path (CUDA, mamba-ssm importable) the SSM update
        is mamba-ssm's one-kernel `selective_state_update` (on a copy of the state), as in mamba_ssm's Mamba2.step;
        otherwise, and with a dt_limit (which that kernel lacks), PyTorch.
        """
        if u_t.dim() != 2 or u_t.shape[-1] != self.d_model:
            raise ValueError(f"Mamba2.step: input must be (batch, d_model={self.d_model}), got {tuple(u_t.shape)}")
        fused = self._resolve_impl(u_t) == "fused" and self.dt_limit == (0.0, float("inf"))
        z0, x0, z, xBC, dt = self._split_in_proj(self.in_proj(u_t))

        # Depthwise causal conv over the last d_conv inputs.
        conv_state = torch.cat([conv_state[:, :, 1:], xBC.to(conv_state.dtype)[:, :, None]], dim=-1)
        xBC = (conv_state * self.conv1d.weight.squeeze(1)).sum(-1)
        if self.conv1d.bias is not None:
            xBC = xBC + self.conv1d.bias
        xBC = F.silu(xBC)
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        if fused:
            return self._fused_step(x, B, C, dt, z, z0, x0, conv_state, ssm_state)

        # SSM recurrence in the state's dtype (float32 or wider).
        sdt = torch.promote_types(ssm_state.dtype, torch.float32)
        A = -torch.exp(self.A_log.to(sdt))
        dt = process_dt(dt, self.dt_bias, dt_softplus=True, dt_limit=self.dt_limit).to(sdt)  # (b, h)
        xh = x.to(sdt).unflatten(-1, (self.nheads, self.headdim))                             # (b, h, p)
        r = self.nheads // self.ngroups
        Bh = B.to(sdt).unflatten(-1, (self.ngroups, self.d_state)).repeat_interleave(r, dim=1)  # (b, h, n)
        Ch = C.to(sdt).unflatten(-1, (self.ngroups, self.d_state)).repeat_interleave(r, dim=1)
        state = (torch.exp(dt * A)[..., None, None] * ssm_state.to(sdt)
                 + (dt[..., None] * xh)[..., None] * Bh[:, :, None, :])
        y = (state * Ch[:, :, None, :]).sum(-1)                                                # (b, h, p)
        D = self._D().to(sdt)
        y = y + xh * (D[:, None] if D.dim() == 1 else D)
        if not self.rmsnorm:
            y = y * F.silu(z.to(sdt).unflatten(-1, (self.nheads, self.headdim)))
        y = y.flatten(-2).to(u_t.dtype)
        return self._finish(y, z, z0, x0), conv_state, state.to(ssm_state.dtype)

    def _fused_step(self, x, B, C, dt, z, z0, x0, conv_state, ssm_state):
        """The SSM update of `step` in one Triton kernel. Per-head A, dt, dt_bias and D enter as stride-0 views
        over headdim (and A over d_state), the layout the kernel's tied-head fast path reads."""
        state_update = _fused_kernels()[3]
        p, n = self.headdim, self.d_state
        A = -torch.exp(self.A_log.float())[:, None, None].expand(self.nheads, p, n)
        D = self._D()
        D = D[:, None].expand(self.nheads, p) if D.dim() == 1 else D
        state = ssm_state.clone()
        y = state_update(state, x.unflatten(-1, (self.nheads, p)), dt[..., None].expand(-1, -1, p), A,
                         B.unflatten(-1, (self.ngroups, n)), C.unflatten(-1, (self.ngroups, n)), D,
                         z=None if self.rmsnorm else z.unflatten(-1, (self.nheads, p)),
                         dt_bias=self.dt_bias[:, None].expand(self.nheads, p), dt_softplus=True)
        return self._finish(y.flatten(-2), z, z0, x0), conv_state, state

"""ssd_chunked (the fast path) against ssd_sequential (the step-by-step reference), on CPU."""

import pytest
import torch

from dimba.model.ssd import process_dt, ssd_chunked, ssd_sequential

F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_inputs(b=2, l=37, h=4, p=3, n=5, g=2, dtype=F64, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    t = dict(
        x=torch.randn(b, l, h, p, generator=gen, dtype=dtype),
        dt=torch.randn(b, l, h, generator=gen, dtype=dtype),  # raw: goes through bias + softplus
        A=-torch.empty(h, dtype=dtype).uniform_(0.5, 8.0, generator=gen),
        B=torch.randn(b, l, g, n, generator=gen, dtype=dtype),
        C=torch.randn(b, l, g, n, generator=gen, dtype=dtype),
        D=torch.randn(h, generator=gen, dtype=dtype),
        dt_bias=torch.randn(h, generator=gen, dtype=dtype) - 2.0,
        z=torch.randn(b, l, h, p, generator=gen, dtype=dtype),
        s0=torch.randn(b, h, p, n, generator=gen, dtype=dtype),
    )
    if requires_grad:
        for v in t.values():
            v.requires_grad_(True)
    return t


def run(fn, t, chunk, *, use_D=True, use_z=False, use_s0=False, final=True, **kw):
    return fn(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=t["D"] if use_D else None,
              z=t["z"] if use_z else None, dt_bias=t["dt_bias"], dt_softplus=True,
              initial_states=t["s0"] if use_s0 else None, return_final_states=final, **kw)


# (l, chunk): shorter than a chunk, one exact chunk, non-multiples, several chunks, a single step.
LENGTHS = [(5, 16), (16, 16), (37, 16), (64, 16), (1, 8), (50, 7)]
SHAPES = [(4, 3, 5, 2), (2, 4, 8, 1), (6, 2, 3, 3), (4, 1, 2, 4)]  # (nheads, headdim, d_state, ngroups)


@pytest.mark.parametrize("l,chunk", LENGTHS)
@pytest.mark.parametrize("h,p,n,g", SHAPES)
def test_chunked_matches_sequential(l, chunk, h, p, n, g):
    t = make_inputs(l=l, h=h, p=p, n=n, g=g)
    for use_D, use_s0 in [(True, False), (False, True), (True, True)]:
        y1, s1 = run(ssd_chunked, t, chunk, use_D=use_D, use_s0=use_s0)
        y2, s2 = run(ssd_sequential, t, chunk, use_D=use_D, use_s0=use_s0)
        assert y1.shape == (2, l, h, p) and s1.shape == (2, h, p, n)
        assert rel_err(y1, y2) < 1e-10, (use_D, use_s0)
        assert rel_err(s1, s2) < 1e-10, (use_D, use_s0)


def test_z_gate_headdim_D_and_dt_limit():
    t = make_inputs(l=29)
    D2 = torch.randn(4, 3, dtype=F64)
    kw = dict(D=D2, z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True, dt_limit=(0.05, 0.3),
              return_final_states=True)
    y1, s1 = ssd_chunked(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, **kw)
    y2, s2 = ssd_sequential(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, **kw)
    assert rel_err(y1, y2) < 1e-10 and rel_err(s1, s2) < 1e-10
    # The limit is active: without it the result differs.
    kw.pop("dt_limit")
    assert rel_err(ssd_chunked(t["x"], t["dt"], t["A"], t["B"], t["C"], 8, **kw)[0], y1) > 1e-3


def test_padding_and_chunk_size_do_not_change_results():
    t = make_inputs(l=45)
    ref_y, ref_s = run(ssd_chunked, t, 45, use_s0=True)  # a single chunk, no padding
    for chunk in (4, 8, 16, 44, 64, 256):
        y, s = run(ssd_chunked, t, chunk, use_s0=True)
        assert rel_err(y, ref_y) < 1e-12 and rel_err(s, ref_s) < 1e-12, chunk


def test_final_state_carries_over():
    """Scanning [0, k) then [k, l) from the first half's final state equals one scan over [0, l)."""
    t = make_inputs(l=40)
    y, s = run(ssd_chunked, t, 16)
    k = 23
    first = {**t, **{key: t[key][:, :k] for key in ("x", "dt", "B", "C")}}
    second = {**t, **{key: t[key][:, k:] for key in ("x", "dt", "B", "C")}}
    y1, s1 = run(ssd_chunked, first, 16)
    y2, s2 = run(ssd_chunked, {**second, "s0": s1}, 16, use_s0=True)
    assert rel_err(torch.cat([y1, y2], dim=1), y) < 1e-12
    assert rel_err(s2, s) < 1e-12


def test_recurrence_by_hand():
    """One head, one state dimension, two steps: the formula written out."""
    x = torch.tensor([[[[1.0]], [[2.0]]]], dtype=F64)       # (1, 2, 1, 1)
    dt = torch.tensor([[[0.5], [0.25]]], dtype=F64)         # (1, 2, 1)
    A = torch.tensor([-2.0], dtype=F64)
    B = torch.tensor([[[[3.0]], [[-1.0]]]], dtype=F64)      # (1, 2, 1, 1)
    C = torch.tensor([[[[2.0]], [[4.0]]]], dtype=F64)
    D = torch.tensor([0.5], dtype=F64)
    h1 = 0.5 * 1.0 * 3.0
    h2 = torch.exp(torch.tensor(-0.5)).item() * h1 + 0.25 * 2.0 * -1.0
    expected = torch.tensor([2.0 * h1 + 0.5 * 1.0, 4.0 * h2 + 0.5 * 2.0], dtype=F64)
    for fn in (ssd_sequential, ssd_chunked):
        y, s = fn(x, dt, A, B, C, 4, D=D, return_final_states=True)
        torch.testing.assert_close(y.flatten(), expected)
        torch.testing.assert_close(s.flatten(), torch.tensor([h2], dtype=F64))


@pytest.mark.parametrize("l,chunk", [(13, 4), (8, 8), (3, 16)])
def test_gradients_match_sequential(l, chunk):
    grads = []
    for fn in (ssd_chunked, ssd_sequential):
        t = make_inputs(l=l, h=4, p=2, n=3, g=2, requires_grad=True)
        y, s = run(fn, t, chunk, use_z=True, use_s0=True)
        gen = torch.Generator().manual_seed(1)
        loss = (y * torch.randn(y.shape, generator=gen, dtype=F64)).sum() \
            + (s * torch.randn(s.shape, generator=gen, dtype=F64)).sum()
        loss.backward()
        grads.append({k: v.grad for k, v in t.items()})
    for k in ("x", "dt", "A", "B", "C", "D", "dt_bias", "z", "s0"):
        g1, g2 = grads[0][k], grads[1][k]
        assert g1 is not None and torch.isfinite(g1).all(), k
        assert rel_err(g1, g2) < 1e-10, k


def test_gradcheck_chunked():
    t = make_inputs(b=1, l=7, h=2, p=2, n=2, g=1, requires_grad=True)

    def f(x, dt, A, B, C, s0):
        y, s = ssd_chunked(x, dt, A, B, C, 3, D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True,
                           initial_states=s0, return_final_states=True)
        return y, s

    assert torch.autograd.gradcheck(f, (t["x"], t["dt"], t["A"], t["B"], t["C"], t["s0"]))


def test_stable_with_strong_decay_in_float32():
    """Large dt * |A| (decays of e^-100 per step, e^-1e4 per chunk) must not give inf/nan, values or grads."""
    t = make_inputs(l=300, h=2, p=4, n=4, g=1, dtype=torch.float32, requires_grad=True)
    kw = dict(D=t["D"], dt_bias=None, dt_softplus=False, return_final_states=True)
    big_dt = (t["dt"].abs() * 20 + 5).detach().requires_grad_()
    A = (t["A"] * 4).detach().requires_grad_()
    y, s = ssd_chunked(t["x"], big_dt, A, t["B"], t["C"], 64, **kw)
    (y.sum() + s.sum()).backward()
    for v in (y, s, big_dt.grad, A.grad, t["x"].grad, t["B"].grad, t["C"].grad):
        assert torch.isfinite(v).all()
    ref_y, ref_s = ssd_sequential(*(v.detach().double() for v in (t["x"], big_dt, A, t["B"], t["C"])),
                                  D=t["D"].detach().double(), return_final_states=True)
    assert rel_err(y.double(), ref_y) < 1e-5 and rel_err(s.double(), ref_s) < 1e-5


def test_float32_accuracy_long_sequence():
    t = make_inputs(b=1, l=1000, h=4, p=8, n=16, g=1, dtype=torch.float32)
    y, s = run(ssd_chunked, t, 256, use_s0=True)
    ref = {k: v.double() for k, v in t.items()}
    y2, s2 = run(ssd_sequential, ref, 256, use_s0=True)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    # Log-decays summed over a 256-step chunk reach ~-300 here; their float32 differences carry ~1e-5
    # absolute error (the Triton kernel has the same), hence a few e-5 relative, not 1e-7.
    assert rel_err(y.double(), y2) < 5e-5 and rel_err(s.double(), s2) < 5e-5


def test_bf16_smoke():
    """bf16 inputs: computed in float32 inside, y returned in bf16, the final state in float32."""
    t = make_inputs(b=1, l=20, h=2, p=4, n=4, g=1, dtype=torch.bfloat16)
    y, s = run(ssd_chunked, t, 8, use_s0=True)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    y2, s2 = run(ssd_sequential, {k: v.double() for k, v in t.items()}, 8, use_s0=True)
    assert rel_err(y.double(), y2) < 2e-2 and rel_err(s.double(), s2) < 1e-5


def test_process_dt_matches_kernel_definition():
    dt = torch.tensor([-30.0, -1.0, 0.0, 3.0, 25.0], dtype=F64)
    out = process_dt(dt, dt_bias=torch.tensor(1.0, dtype=F64), dt_softplus=True, dt_limit=(0.0, 10.0))
    expected = torch.log1p(torch.exp(dt + 1)).clamp(0.0, 10.0)
    torch.testing.assert_close(out, expected)
    assert process_dt(torch.tensor([-0.5]), dt_softplus=False).item() == 0.0  # kernel clamps at 0


def test_bad_shapes_give_clear_errors():
    t = make_inputs(l=10)
    with pytest.raises(ValueError, match="dt must be"):
        ssd_chunked(t["x"], t["dt"][:, :5], t["A"], t["B"], t["C"], 8)
    with pytest.raises(ValueError, match="multiple of ngroups"):
        ssd_chunked(t["x"], t["dt"], t["A"], t["B"].repeat(1, 1, 2, 1)[:, :, :3], t["C"].repeat(1, 1, 2, 1)[:, :, :3], 8)
    with pytest.raises(ValueError, match="initial_states must be"):
        ssd_sequential(t["x"], t["dt"], t["A"], t["B"], t["C"], initial_states=t["s0"][:, :1])
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        ssd_chunked(t["x"], t["dt"], t["A"], t["B"], t["C"], 0)

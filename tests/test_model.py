"""The DIMBA denoiser: receptive field, conditioning init, gradients, weight layout."""
import math
import re
from pathlib import Path

import pytest
import torch

from dimba.config import config_from_dict
from dimba.model.build import count_parameters
from dimba.objectives import build_model
from dimba.model.mamba2 import Mamba2, fused_available

ROOT = Path(__file__).resolve().parents[1]


def make(objective="gaussian", **model):
    m = {"vocab_size": 50, "d_model": 32, "n_layers": 2, "d_embed": 8, "d_state": 8, "headdim": 16,
         "chunk_size": 8, "mixer_impl": "chunked"}
    m.update(model)
    return config_from_dict({"objective": objective, "model": m})


def randomize_zero_init(model):
    """Fresh blocks are the identity (zero-initialised modulation); give them weights so signals flow."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modulation" in name or name.endswith("clean_embedding"):
                p.normal_(0, 0.2)


def inputs(b=2, length=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, d, generator=g)
    t = torch.rand(b, generator=g)
    clean = torch.zeros(b, length, dtype=torch.bool)
    return x, t, clean


@pytest.mark.parametrize("bidirectional", [True, False])
def test_receptive_field(bidirectional):
    torch.manual_seed(0)
    model = build_model(make(bidirectional=bidirectional))
    randomize_zero_init(model)
    x, t, clean = inputs()
    y = model(x, t, clean)
    x2 = x.clone()
    x2[:, -1] += 1.0                       # change only the last position
    y2 = model(x2, t, clean)
    first_changed = not torch.allclose(y[:, 0], y2[:, 0])
    assert first_changed == bidirectional
    assert not torch.allclose(y[:, -1], y2[:, -1])


def test_fresh_blocks_are_the_identity():
    torch.manual_seed(0)
    cfg = make()
    model = build_model(cfg)
    h = torch.randn(2, 12, cfg.model.d_model)
    c = torch.randn(2, cfg.model.cond_dim)
    for block in model.blocks:
        assert torch.equal(block(h, c), h)


@pytest.mark.parametrize("conditioning", ["film", "additive"])
@pytest.mark.parametrize("tie", [True, False])
def test_every_parameter_gets_a_gradient(conditioning, tie):
    torch.manual_seed(0)
    model = build_model(make(conditioning=conditioning, tie_embeddings=tie))
    randomize_zero_init(model)
    x, t, clean = inputs()
    clean[0, :3] = True                    # exercise the prompt encoder and the clean embedding
    clean[1, :] = False                    # and the "no prompt" vector
    tokens = torch.randint(4, 50, (2, 12))
    x = torch.where(clean.unsqueeze(-1), model.embed(tokens), x)
    out = model(x, t, clean, self_cond=torch.randn_like(x))
    loss = out.pow(2).mean() + model.logits(out).logsumexp(-1).mean() + model.embed(tokens).sum() * 1e-3
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("head", ["linear", "softmax", "posterior"])
def test_x0_heads(head):
    """linear: logits read x0_hat through the table; softmax: x0_hat is the expected embedding under the logits,
    so it lies in the table's convex hull and becomes a token's embedding exactly when the model is sure."""
    torch.manual_seed(0)
    model = build_model(make(x0_head=head))
    randomize_zero_init(model)
    x, t, clean = inputs()
    x0_hat, logits = model(x, t, clean, with_logits=True)
    assert torch.equal(x0_hat, model(x, t, clean)) and logits.shape == (2, 12, 50)
    table = model.token_embedding.table()
    if head == "linear":
        torch.testing.assert_close(logits, model.logits(x0_hat))
    else:
        torch.testing.assert_close(x0_hat, logits.softmax(-1) @ table)
        torch.testing.assert_close(model(x, t, clean, x0_temperature=0.5), (logits / 0.5).softmax(-1) @ table)
        assert x0_hat.norm(dim=-1).max() <= table.norm(dim=-1).max() + 1e-4      # inside the hull's ball
        with torch.no_grad():                                                     # a sure model: exact x0
            model.out_proj.weight.zero_()
            model.out_proj.bias.copy_(100 * table[7])
        x0_hat, logits = model(x, t, clean, with_logits=True)
        torch.testing.assert_close(x0_hat, table[7].expand_as(x0_hat))
    if head == "posterior":
        # network silent: the logits are exactly the context-free posterior's, log prior + c(t) x_t . table^T
        with torch.no_grad():
            model.out_proj.bias.zero_()
            model.prior.copy_(torch.randn(50))
            model.skip_scale.bias.fill_(1.5)
        _, logits = model(x, t, clean, with_logits=True)
        torch.testing.assert_close(logits, model.prior + torch.e ** 1.5 * x @ table.t())
        log_p = torch.full((50,), -math.log(49.0))
        log_p[0] = -math.inf
        model.init_prior(log_p.numpy())
        assert model.prior[0] == -30.0 and torch.allclose(model.prior[1:], log_p[1:])
        with pytest.raises(ValueError, match="vocabulary of 50"):
            model.init_prior(torch.zeros(49))
    with pytest.raises(ValueError, match="x0_head"):
        make(x0_head="softmax", tie_embeddings=False)


def test_time_and_prompt_change_the_output():
    torch.manual_seed(0)
    model = build_model(make())
    randomize_zero_init(model)
    x, t, clean = inputs()
    base = model(x, t, clean)
    assert not torch.allclose(base, model(x, t * 0.5, clean))
    clean2 = clean.clone()
    clean2[:, :2] = True
    assert not torch.allclose(base[:, 5:], model(x, t, clean2)[:, 5:])


def test_embeddings_are_normalised_and_padding_is_zero():
    torch.manual_seed(0)
    model = build_model(make())
    tokens = torch.tensor([[5, 6, 0, 7]])
    e = model.embed(tokens)
    norms = e.norm(dim=-1)[0]
    assert torch.allclose(norms[[0, 1, 3]], torch.full((3,), 8 ** 0.5))
    assert norms[2].item() == 0.0


def test_each_direction_is_a_standard_mamba2():
    """The state dict of every mixer has exactly mamba_ssm.Mamba2's keys, so each direction loads there."""
    model = build_model(make())
    keys = {k.split("mixer.")[-1] for k in model.state_dict() if ".mixer." in k}
    assert keys == {"in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
                    "out_proj.weight"}
    assert any(".mixer_rev." in k for k in model.state_dict())


def test_ar_twin_has_equal_parameters_and_the_same_backbone():
    from dimba.config import load_config
    from dimba.objectives import ar_twin
    for name in ("tiny", "125m"):
        full = load_config(ROOT / "configs" / f"{name}.json")
        cfg = full.model
        twin_cfg, p_dimba, p_twin = ar_twin(full)
        twin = twin_cfg.model
        assert twin_cfg.objective == "ar" and not twin.bidirectional
        assert (twin.d_model, twin.d_state, twin.headdim, twin.vocab_size) == (cfg.d_model, cfg.d_state, cfg.headdim,
                                                                                cfg.vocab_size)
        assert abs(p_twin / p_dimba - 1) < 0.05
        with torch.device("meta"):
            assert count_parameters(build_model(twin_cfg)) == p_twin


@pytest.mark.skipif(not fused_available(), reason="needs CUDA and mamba-ssm's Triton kernels (gpu extra)")
@pytest.mark.parametrize("kind", ["gaussian", "masked", "ar", "hybrid"])
def test_models_on_the_fused_path_match_chunked(kind):
    """Whole models on a GPU: the fused kernels give the chunked path's outputs and gradients (hybrid: a masked
    denoiser whose second block is attention)."""
    hybrid = {"attn_layer_idx": [1]} if kind == "hybrid" else {}
    kind = "masked" if kind == "hybrid" else kind
    full = make(kind, bidirectional=kind != "ar", d_model=64, chunk_size=16, mixer_impl="fused", mask_id=4, **hybrid)
    cfg = full.model
    torch.manual_seed(0)
    model = build_model(full).cuda()
    randomize_zero_init(model)
    if kind == "gaussian":
        x, t, clean = (a.cuda() for a in inputs(length=40))
        clean[0, :5] = True
        run = lambda: model(x, t, clean)            # noqa: E731
    else:
        tokens = torch.randint(1, cfg.vocab_size, (2, 40), device="cuda")
        run = lambda: model(tokens)                  # noqa: E731
    out = {}
    for impl in ("fused", "chunked"):
        for m in model.modules():
            if isinstance(m, Mamba2):
                m.impl = impl
        model.zero_grad()
        y = run()
        y.float().square().mean().backward()
        out[impl] = (y.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    for a, b in zip(out["fused"], out["chunked"]):
        assert ((a - b).norm() / b.norm()).item() < 1e-3


def test_a_hybrid_denoiser_attends_both_ways_in_mamba_ssm_names():
    """model.attn_layer_idx: those blocks mix with one bidirectional self-attention (mamba_ssm MHA's names, no
    reversed twin), the others stay bidirectional Mamba-2; every parameter learns; FLOPs count the attention."""
    from dimba.model.attention import Attention
    from dimba.model.build import backbone_flops_per_token
    torch.manual_seed(0)
    full = make("masked", n_layers=3, attn_layer_idx=[1], attn_num_heads=2, mask_id=4)
    model = build_model(full)
    block = model.blocks[1]
    assert isinstance(block.mixer, Attention) and block.mixer_rev is None
    assert {k for k in model.state_dict() if k.startswith("blocks.1.")} == {
        "blocks.1.norm.weight", "blocks.1.mixer.in_proj.weight", "blocks.1.mixer.out_proj.weight"}
    assert all(isinstance(model.blocks[i].mixer, Mamba2) and model.blocks[i].mixer_rev is not None for i in (0, 2))
    tokens = torch.randint(5, 50, (2, 12))
    y = model(tokens)
    changed = tokens.clone()
    changed[:, -1] = 4                               # mask only the last position
    assert not torch.allclose(model(changed)[:, 0], y[:, 0])
    y.logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.any(p.grad != 0) for p in model.parameters())

    # the attention itself: softmax(q k^T / sqrt(d)) v per head, over the whole sequence, equivariant to order
    att, x = Attention(32, 2), torch.randn(2, 7, 32)
    q, k, v = att.in_proj(x).view(2, 7, 3, 2, 16).permute(2, 0, 3, 1, 4)
    ref = (torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v).transpose(1, 2).reshape(2, 7, 32)
    assert torch.allclose(att(x), att.out_proj(ref), atol=1e-5)
    perm = torch.randperm(7)
    assert torch.allclose(att(x[:, perm]), att(x)[:, perm], atol=1e-5)

    pure = make("masked", n_layers=3, mask_id=4).model
    assert backbone_flops_per_token(full.model, 128) < backbone_flops_per_token(pure, 128)
    assert backbone_flops_per_token(full.model, 256) > backbone_flops_per_token(full.model, 128)


@pytest.mark.parametrize("model, message", [
    ({"attn_layer_idx": [2]}, "distinct block indices in [0, n_layers = 2)"),
    ({"attn_layer_idx": [0, 0]}, "distinct block indices"),
    ({"attn_layer_idx": [0], "bidirectional": False}, "needs model.bidirectional true"),
    ({"attn_layer_idx": [0], "attn_num_heads": 3}, "must divide model.d_model (32)"),
])
def test_a_wrong_hybrid_is_refused_naming_the_field(model, message):
    from dimba.config import ConfigError
    with pytest.raises(ConfigError, match=re.escape(message)):
        make("masked", mask_id=4, **model)


def test_the_twin_of_a_hybrid_is_all_mamba():
    from dimba.objectives import ar_twin
    twin, p_hybrid, p_twin = ar_twin(make("masked", n_layers=4, attn_layer_idx=[2], mask_id=4))
    assert twin.model.attn_layer_idx == () and not twin.model.bidirectional and abs(p_twin / p_hybrid - 1) < 0.2

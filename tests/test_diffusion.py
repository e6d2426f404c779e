"""Schedules, logits filtering and the samplers' guarantees (reproducible, clean positions exact)."""
import pytest
import torch

from dimba.config import config_from_dict
from dimba.config.core import ConfigError
from dimba.objectives.base import sample_seed
from dimba.objectives.gaussian.loss import diffusion_loss, draw_noise
from dimba.objectives.gaussian.sampling import sample
from dimba.objectives.sampling import filter_logits, pick_tokens
from dimba.objectives.gaussian.schedule import ALPHA_BAR_MIN, NoiseSchedule, timestep_grid
from dimba.objectives import build_model


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("zero_snr", [True, False])
def test_schedule_properties(kind, zero_snr):
    s = NoiseSchedule(kind, zero_snr, num_steps=1000)
    t = s.step_to_t(torch.arange(0, 1001))
    ab = s.alpha_bar(t)
    assert ab.dtype == torch.float64
    assert torch.all(ab[1:] <= ab[:-1])
    above = ab > ALPHA_BAR_MIN                     # strictly decreasing until the floor (zero-SNR off only)
    assert torch.all(ab[1:][above[1:]] < ab[:-1][above[1:]])
    assert abs(ab[0].item() - 1.0) < 1e-12
    if zero_snr:
        assert ab[-1].item() == 0.0 and s.snr(torch.tensor(1.0, dtype=torch.float64)).item() == 0.0
    else:
        assert ab[-1].item() > 0
    snr = s.snr(t[1:-1][above[1:-1]])
    assert torch.all(snr[1:] < snr[:-1])
    # continuous and discrete agree
    assert torch.allclose(s.alpha_bar(torch.tensor([0.25], dtype=torch.float64)), ab[250:251])


def test_add_noise_matches_formula():
    s = NoiseSchedule()
    x0, eps, t = torch.randn(3, 5, 4), torch.randn(3, 5, 4), torch.tensor([0.0, 0.5, 1.0])
    xt = s.add_noise(x0, t, eps)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[2], eps[2], atol=1e-6)
    ab = s.alpha_bar(torch.tensor(0.5)).item()
    assert torch.allclose(xt[1], ab ** 0.5 * x0[1] + (1 - ab) ** 0.5 * eps[1], atol=1e-6)


@pytest.mark.parametrize("spacing", ["uniform", "quadratic", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 7, 64, 999, 1000])
def test_timestep_grid(spacing, steps):
    g = timestep_grid(1000, steps, spacing)
    assert len(g) == steps + 1 and g[0] == 1000 and g[-1] == 0
    assert all(a > b for a, b in zip(g, g[1:]))
    with pytest.raises(ValueError, match="sampling steps must be in"):
        timestep_grid(1000, 1001, spacing)


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5, 2.5]])
    kept = torch.isfinite(filter_logits(logits, top_k=3))
    assert kept.tolist() == [[False, True, False, True, False, True]]


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.05, 0.25, 0.15, 0.05]])
    logits = probs.log()
    # 0.5 + 0.25 = 0.75 < 0.8, so 0.15 is needed too; 0.5+0.25+0.15 = 0.9 >= 0.8: the 0.05 ones go
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, False, True, True, False]]
    # exactly reaching p with the first two: only those two stay
    assert torch.isfinite(filter_logits(logits, top_p=0.75)).tolist() == [[True, False, True, False, False]]
    # the top token always stays, however small p is
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).tolist() == [[True, False, False, False, False]]
    # temperature does not change which tokens are in top-k
    assert torch.equal(torch.isfinite(filter_logits(logits, temperature=0.3, top_k=2)),
                       torch.isfinite(filter_logits(logits, top_k=2)))


def test_pick_tokens_draws_from_the_filtered_softmax():
    """The device-side inverse-CDF draw: frequencies match the filtered distribution, filtered tokens never come
    out, the same uniforms give the same tokens, and greedy is the argmax."""
    logits = torch.tensor([0.5, 0.05, 0.25, 0.15, 0.05]).log()
    scfg = config_from_dict({"sampling": {"top_p": 0.8, "temperature": 1.0}}).sampling
    n = 40000
    tokens = pick_tokens(logits.expand(1, n, 5), scfg, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens.flatten(), minlength=5).double() / n
    want = torch.tensor([0.5, 0.0, 0.25, 0.15, 0.0]) / 0.9
    assert (freq - want).abs().max() < 0.01                       # ~4 standard errors
    assert freq[1] == 0 and freq[4] == 0
    u = torch.rand(3, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    batch = torch.randn(3, 7, 11)
    assert torch.equal(pick_tokens(batch, scfg, uniforms=u), pick_tokens(batch, scfg, uniforms=u))
    assert torch.equal(pick_tokens(batch, scfg, torch.Generator().manual_seed(1)), pick_tokens(batch, scfg, uniforms=u))
    edge = pick_tokens(logits.expand(1, 2, 5), scfg, uniforms=torch.tensor([[0.0, 1.0 - 1e-12]]))
    assert edge.tolist() == [[0, 3]]                                # both ends of the CDF land on kept tokens
    greedy = config_from_dict({"sampling": {"greedy": True}}).sampling
    assert torch.equal(pick_tokens(batch, greedy), batch.argmax(-1))


def tiny_config(**model):
    m = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "d_embed": 8, "d_state": 8, "headdim": 16,
         "chunk_size": 8, "mixer_impl": "chunked"}
    m.update(model)
    return config_from_dict({"model": m, "diffusion": {"num_steps": 50}, "sampling": {"steps": 10}})


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_sampling_is_reproducible_and_keeps_clean_tokens(sampler, precision):
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    sched = NoiseSchedule(num_steps=50)
    scfg = config_from_dict({"diffusion": {"num_steps": 50},
                             "sampling": {"steps": 10, "sampler": sampler, "eta": 0.5, "precision": precision,
                                          "top_k": 20, "top_p": 0.9}}).sampling
    tokens = torch.randint(4, 64, (3, 12))
    clean = torch.zeros(3, 12, dtype=torch.bool)
    clean[0, :4] = True            # prompt
    clean[1, :3] = True
    clean[1, 9:] = True            # infilling frame
    clean[2, ::3] = True           # scattered
    a = sample(model, sched, scfg, 3, 12, tokens, clean, torch.Generator().manual_seed(5))
    b = sample(model, sched, scfg, 3, 12, tokens, clean, torch.Generator().manual_seed(5))
    c = sample(model, sched, scfg, 3, 12, tokens, clean, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(a[clean], tokens[clean])


def test_x0_temperature_reaches_the_model_and_needs_a_softmax_head():
    sched = NoiseSchedule(num_steps=50)
    tokens, clean = torch.zeros(2, 12, dtype=torch.long), torch.zeros(2, 12, dtype=torch.bool)

    def run(head, temp):
        torch.manual_seed(0)
        model = build_model(tiny_config(x0_head=head)).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "modulation" in name:
                    p.normal_(0, 0.2)
        scfg = config_from_dict({"diffusion": {"num_steps": 50},
                                 "sampling": {"steps": 10, "x0_temperature": temp}}).sampling
        return sample(model, sched, scfg, 2, 12, tokens, clean, torch.Generator().manual_seed(5))

    assert torch.equal(run("posterior", 1.0), run("posterior", 1.0))
    assert not torch.equal(run("posterior", 1.0), run("posterior", 0.2))
    with pytest.raises(ValueError, match="x0_temperature needs model.x0_head"):
        run("linear", 0.5)
    with pytest.raises(ConfigError, match="x0_temperature must be > 0"):
        config_from_dict({"sampling": {"x0_temperature": 0.0}})


def test_noise_draws_depend_only_on_the_sample_seed():
    cfg = tiny_config()
    seeds = [sample_seed(1, 0, i) for i in range(4)]
    full = draw_noise(cfg.diffusion, seeds, 6, 8)
    half = draw_noise(cfg.diffusion, seeds[2:], 6, 8)
    assert torch.equal(full.noise[2:], half.noise) and torch.equal(full.t[2:], half.t)
    assert len(set(seeds)) == 4


def test_loss_ignores_clean_and_padding_positions():
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_model(cfg)
    sched = NoiseSchedule(num_steps=50)
    tokens = torch.randint(4, 64, (2, 10))
    tokens[:, 8:] = 0                                    # padding
    clean = torch.zeros(2, 10, dtype=torch.bool)
    clean[:, :3] = True
    draw = draw_noise(cfg.diffusion, [1, 2], 10, 8)
    draw.self_cond[:] = False
    _, terms = diffusion_loss(model, sched, cfg.diffusion, tokens, clean, draw, pad_id=0)
    assert terms["tokens"].item() == 2 * 5
    # changing a clean token's identity changes the input but a scored position's loss only through the model:
    # changing a padded token's target cannot change the loss at all
    tokens2 = tokens.clone()
    tokens2[:, 9] = 0
    _, terms2 = diffusion_loss(model, sched, cfg.diffusion, tokens2, clean, draw, pad_id=0)
    assert terms2["loss"].item() == terms["loss"].item()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_guidance_zero_is_the_unconditional_sampler_and_keeps_clean_tokens(sampler):
    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()
    with torch.no_grad():            # make the prompt matter: random conditioning weights
        for name, p in model.named_parameters():
            if "modulation" in name or "clean_embedding" in name or "prompt_encoder" in name:
                p.normal_(0, 0.3)
    sched = NoiseSchedule(num_steps=50)
    tokens = torch.randint(4, 64, (3, 12))
    clean = torch.zeros(3, 12, dtype=torch.bool)
    clean[:, :4] = True
    clean[1, 10:] = True

    def run(guidance, with_clean=True):
        scfg = config_from_dict({"diffusion": {"num_steps": 50}, "sampling": {
            "steps": 8, "sampler": sampler, "eta": 0.3, "guidance": guidance, "precision": "float64"}}).sampling
        if with_clean:
            return sample(model, sched, scfg, 3, 12, tokens, clean, torch.Generator().manual_seed(3))
        return sample(model, sched, scfg, 3, 12, generator=torch.Generator().manual_seed(3))

    uncond, cond, s0, s2 = run(1.0, False), run(1.0), run(0.0), run(2.0)
    assert torch.equal(s0[~clean], uncond[~clean])          # s = 0: the unconditional sample
    assert not torch.equal(cond[~clean], uncond[~clean])    # the prompt matters
    for out in (cond, s0, s2):
        assert torch.equal(out[clean], tokens[clean])       # clean tokens come back exactly
    assert not torch.equal(s2, cond)

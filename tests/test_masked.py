"""The masked objective (dimba/objectives/masked/) and the objective interface, without the engine: the forward
process, SUBS, the NELBO and its bound, the samplers, the low-discrepancy draws, and the refusals."""
import math

import pytest
import torch
import torch.nn as nn

from dimba.config import config_from_dict
from dimba.config.core import ConfigError
from dimba.config.schema import SamplingConfig
from dimba.objectives import OBJECTIVES, Request, build_model, get_objective, make_draw
from dimba.objectives.masked.loss import draw_masks, subs_log_probs, times
from dimba.objectives.masked.sampling import guided_log_probs, sample_masked

V, MASK = 40, 4


def make(**extra):
    model = {"vocab_size": V, "d_model": 32, "n_layers": 1, "d_embed": 8, "d_state": 8, "headdim": 16,
             "chunk_size": 8, "mixer_impl": "chunked", "mask_id": MASK, **extra.pop("model", {})}
    return config_from_dict({"objective": "masked", "model": model, **extra})


class Flat(nn.Module):
    """A denoiser whose logits are all zero: p(x0 | x_t) uniform over the V - 1 tokens other than [MASK]; counts
    its calls."""
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.calls = 0

    def forward(self, x_t, t=None):
        self.calls += 1
        return torch.zeros(*x_t.shape, V) + self.w


class Copy(nn.Module):
    """Puts all its mass on one fixed token sequence (`target`), whatever it reads."""
    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.target = target

    def forward(self, x_t, t=None):
        logits = torch.full((*x_t.shape, V), -30.0)
        return logits.scatter(-1, self.target.expand(x_t.shape[0], -1).unsqueeze(-1), 30.0) + self.w


def test_the_table_names_every_objective_and_each_builds():
    assert set(OBJECTIVES) == {"gaussian", "masked", "ar"}
    for name in OBJECTIVES:
        cfg = config_from_dict({"objective": name, "model": {"vocab_size": V, "d_model": 32, "n_layers": 1,
                                                              "d_state": 8, "headdim": 16, "mask_id": MASK,
                                                              "bidirectional": name != "ar"}})
        obj = get_objective(cfg)
        assert obj.name == name and obj.samplers and obj.flops_per_token() > 0
        build_model(cfg)


def test_draws_are_low_discrepancy_over_the_global_batch_and_split_invariant():
    whole = make_draw(7, 0, 8, 8)
    halves = [make_draw(7, 0, 4, 8), make_draw(7, 4, 4, 8)]
    assert whole.seeds == halves[0].seeds + halves[1].seeds
    assert torch.equal(whole.u, torch.cat([h.u for h in halves]))
    gaps = whole.u.sort().values.diff()
    torch.testing.assert_close(gaps, torch.full((7,), 1 / 8, dtype=torch.float64))
    assert not torch.equal(make_draw(7, 8, 8, 8).u, whole.u)         # the next step has its own offset


def test_masks_never_touch_clean_or_padding_and_follow_t():
    tokens = torch.randint(5, V, (64, 50))
    tokens[:, -5:] = 0                                               # padding
    clean = torch.zeros_like(tokens, dtype=torch.bool)
    clean[:, :10] = True
    scorable = ~clean & (tokens != 0)
    draw = make_draw(0, 0, 64, 64)
    m = draw_masks(draw.seeds, draw.u, scorable, clean, t_eps=1e-3, cond_dropout=0.0)
    assert not (m.masked & ~scorable).any()
    frac = m.masked.float().sum(1) / scorable.float().sum(1)
    assert (frac - m.t).abs().mean() < 0.06                          # each token masked with probability t
    again = draw_masks(draw.seeds, draw.u, scorable, clean, t_eps=1e-3, cond_dropout=0.0)
    assert torch.equal(m.masked, again.masked)
    dropped = draw_masks(draw.seeds, draw.u, scorable, clean, t_eps=1e-3, cond_dropout=0.999)
    assert dropped.drop_cond.all() and dropped.masked[:, :10].any()   # dropped conditioning: prompts are noised


def test_logit_normal_times_bell_around_one_half_and_validation_keeps_the_nelbo():
    u = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    bell, flat = times(u, 1e-3, "logit_normal", 1.0), times(u, 1e-3)
    assert (bell.diff() >= 0).all() and bell.min() >= 1e-3 and bell.max() <= 1.0      # monotone: spread stays
    assert bell.median().item() == pytest.approx(0.5, abs=2e-3)
    middle = lambda t: ((t > 0.25) & (t < 0.75)).double().mean().item()               # noqa: E731
    assert middle(bell) == pytest.approx(0.728, abs=0.01) and middle(flat) == pytest.approx(0.5, abs=0.01)
    assert middle(times(u, 1e-3, "logit_normal", 0.5)) > middle(bell)                  # narrower bell
    tokens = torch.randint(5, V, (64, 32))
    batch = {"tokens": tokens, "clean": torch.zeros_like(tokens, dtype=torch.bool)}
    draw = make_draw(0, 0, 64, 64)
    uniform, lognorm = (get_objective(make(masked={"t_sampling": s})) for s in ("uniform", "logit_normal"))
    model = Copy(tokens[0])
    assert torch.equal(uniform.loss(model, batch, draw, training=False).loss,
                       lognorm.loss(model, batch, draw, training=False).loss)       # val loss: the NELBO
    assert not torch.equal(uniform.loss(model, batch, draw).loss, lognorm.loss(model, batch, draw).loss)
    with pytest.raises(ConfigError, match="t_sampling"):
        make(masked={"t_sampling": "bell"})
    with pytest.raises(ConfigError, match="t_logit_std"):
        make(masked={"t_logit_std": 0.0})


def test_subs_never_predicts_the_mask():
    lp = subs_log_probs(torch.randn(2, 3, V), MASK)
    assert torch.isinf(lp[..., MASK]).all() and torch.allclose(lp.exp().sum(-1), torch.ones(2, 3))


def test_loss_of_a_flat_model_is_log_v_minus_one_on_average():
    """E_t[(1/t) * #masked * log(V - 1)] / L = log(V - 1): the NELBO of a model that knows nothing, exactly."""
    obj = get_objective(make())
    model = Flat()
    tokens = torch.randint(5, V, (256, 64))
    batch = {"tokens": tokens, "clean": torch.zeros_like(tokens, dtype=torch.bool)}
    r = obj.loss(model, batch, make_draw(0, 0, 256, 256))
    assert r.loss.item() == pytest.approx(math.log(V - 1), rel=0.05)
    assert r.metrics["ce"].item() == pytest.approx(math.log(V - 1), rel=1e-5)
    assert set(r.metrics) == {"loss", "ce", "acc", "mask_frac"} and r.per_sample == {}    # no learned state
    r.loss.backward()                                                 # differentiable through the model


def test_held_out_bound_is_unbiased_with_its_standard_error():
    obj = get_objective(make())
    tokens = torch.randint(5, V, (32, 64))
    batches = [{"tokens": tokens[i:i + 8], "clean": torch.zeros(8, 64, dtype=torch.bool)} for i in range(0, 32, 8)]
    r = obj.likelihood(Flat(), batches, t_samples=16, seed=0)
    assert r["kind"] == "nelbo_upper_bound" and r["tokens"] == 32 * 64 and r["sequences"] == 32
    assert abs(r["nll_nats_per_token"] - math.log(V - 1)) < 4 * r["stderr_nats"] + 0.02
    exact = obj.likelihood(Copy(tokens[0]), batches[:1], t_samples=4, seed=0)    # certain of sequence 0 only
    assert exact["nll_nats_per_token"] > 0


@pytest.mark.parametrize("sampler", ["ancestral", "confidence"])
def test_samplers_keep_clean_tokens_and_never_emit_the_mask(sampler):
    obj = get_objective(make())
    model = Flat()
    tokens = torch.randint(5, V, (3, 20))
    clean = torch.zeros_like(tokens, dtype=torch.bool)
    clean[:, :4] = True
    clean[:, -3:] = True
    cfg = SamplingConfig(sampler=sampler, steps=8, top_p=1.0)
    out = obj.sample_frame(model, tokens, clean, cfg, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(out[clean], tokens[clean]) and not (out == MASK).any()
    again = obj.sample_frame(model, tokens, clean, cfg, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(out, again)                                    # one seed, one text
    copy = obj.sample_frame(Copy(tokens[0]), tokens[:1], clean[:1], cfg, torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(copy, tokens[:1])                              # a certain model writes its tokens


def test_ancestral_sampler_skips_the_model_when_nothing_changed():
    """Without time conditioning a step that reveals nothing repeats the last call: MDLM's caching. With many more
    steps than tokens most steps reveal nothing."""
    model = Flat()
    x = torch.zeros(1, 6, dtype=torch.long)
    sample_masked(model, x, torch.zeros_like(x, dtype=torch.bool), SamplingConfig(sampler="ancestral", steps=200),
                  MASK, False, torch.Generator().manual_seed(0))
    assert model.calls <= 7
    timed = Flat()
    sample_masked(timed, x, torch.zeros_like(x, dtype=torch.bool), SamplingConfig(sampler="ancestral", steps=50),
                  MASK, True, torch.Generator().manual_seed(0))
    assert timed.calls == 50                                          # t changes every step: no cache


@pytest.mark.parametrize("sampler", ["confidence", "ancestral"])
def test_samplers_reveal_block_by_block(sampler):
    """Semi-autoregressive: with blocks of 4 and 2 steps per block, no position of a block is revealed before the
    whole block before it, and some model call sees exactly the first block filled. The ancestral sampler may skip
    calls (caching); the confidence sampler makes one per step."""
    seen = []

    class Spy(Flat):
        def forward(self, x_t, t=None):
            seen.append(x_t.clone())
            return super().forward(x_t, t)

    x = torch.zeros(2, 12, dtype=torch.long)
    out = sample_masked(Spy(), x, torch.zeros_like(x, dtype=torch.bool),
                        SamplingConfig(sampler=sampler, steps=6, block_length=4), MASK, False,
                        torch.Generator().manual_seed(0))
    assert not (out == MASK).any() and (len(seen) == 6 if sampler == "confidence" else len(seen) <= 6)
    for inp in seen:
        for row in inp:
            revealed = row != MASK
            for k in (1, 2):                                          # block k started: all before it is done
                if revealed[4 * k:4 * (k + 1)].any():
                    assert revealed[:4 * k].all()
    first_block_done = torch.tensor([True] * 4 + [False] * 8)
    assert any(((inp != MASK) == first_block_done).all() for inp in seen)


def test_guidance_zero_is_the_unconditional_model():
    torch.manual_seed(0)
    cfg = make()
    model = build_model(cfg).eval()
    x = torch.randint(5, V, (2, 10))
    clean = torch.zeros_like(x, dtype=torch.bool)
    clean[:, :3] = True
    x = torch.where(clean, x, torch.full_like(x, MASK))
    u = guided_log_probs(model, x, clean, 1.0, MASK, 0.0, False)
    x_u = torch.where(clean, torch.full_like(x, MASK), x)
    torch.testing.assert_close(u, subs_log_probs(model(x_u), MASK).double().log_softmax(-1), rtol=1e-5, atol=1e-5)


def test_generate_fills_requests_of_prompts_and_frames():
    torch.manual_seed(0)
    cfg = make()
    obj = get_objective(cfg)
    model = build_model(cfg).eval()
    reqs = [Request([7, 8, 9], 5), Request([7], 3, [10, 11])]
    for r in reqs:
        out = obj.generate(model, [r], cfg.sampling, torch.Generator().manual_seed(0), "cpu")
        assert len(out[0]) == r.middle_length and MASK not in out[0]


def test_refusals_name_what_to_do():
    with pytest.raises(ConfigError, match="needs a \\[MASK\\] id"):
        build_model(make(model={"mask_id": -1}))
    with pytest.raises(ConfigError, match="does not belong to the masked objective"):
        get_objective(make()).sampling(SamplingConfig(sampler="ddim"))
    with pytest.raises(ConfigError, match="does not belong to objective 'masked'"):
        make(sampling={"sampler": "ddpm"})


def test_padding_and_mask_ids_in_the_data_are_never_scored():
    """Real text never holds the mask id, random or foreign data may: such positions are skipped like padding, so
    the loss stays finite (a masked position whose true token is [MASK] would cost -log 0)."""
    obj = get_objective(make(masked={"cond_dropout": 0.5}))
    tokens = torch.randint(5, V, (16, 32))
    tokens[:, ::5] = MASK
    tokens[:, -3:] = 0
    clean = torch.zeros_like(tokens, dtype=torch.bool)
    clean[:, :8] = True
    r = obj.loss(Flat(), {"tokens": tokens, "clean": clean}, make_draw(0, 0, 16, 16))
    assert torch.isfinite(r.loss) and all(torch.isfinite(v) for v in r.metrics.values())


def test_best_guess_is_the_argmax_decoding_of_each_objective():
    """What infilling's accuracy is read at: argmax picks, deterministic whatever the seed; the masked objective's
    is the confidence sampler, which writes a confident model's tokens exactly."""
    for name in OBJECTIVES:
        cfg = config_from_dict({"objective": name, "model": {"vocab_size": V, "d_model": 32, "n_layers": 1,
                                                              "d_state": 8, "headdim": 16, "mask_id": MASK,
                                                              "bidirectional": name != "ar"}})
        obj = get_objective(cfg)
        guess = obj.best_guess(cfg.sampling)
        assert guess.greedy and guess.sampler in obj.samplers
    obj = get_objective(make())
    guess = obj.best_guess(SamplingConfig(steps=4, temperature=2.0))
    assert guess.sampler == "confidence"
    target = torch.randint(5, V, (1, 10))
    model = Copy(target)
    req = Request(target[0, :3].tolist(), 5, target[0, 8:].tolist())
    outs = [obj.generate(model, [req], guess, torch.Generator().manual_seed(s), "cpu")[0] for s in (0, 1)]
    assert outs[0] == outs[1] == target[0, 3:8].tolist()

"""The evaluation pieces on their own: text statistics, BLEU/ROUGE, the ELBO estimator against a case with a known
answer, per-t losses, the AR exact NLL, the judge, and the report writers (no trained model needed)."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dimba.config.schema import Config, DiffusionConfig, ModelConfig
from dimba.data.errors import DataError
from dimba.data.shards import unigram_log_probs
from dimba.data.tokenizer import PAD_ID, Tokenizer, train_tokenizer
from dimba.objectives.gaussian.schedule import NoiseSchedule
from dimba.objectives.gaussian.context import context_use
from dimba.objectives.gaussian.denoising import loss_by_t
from dimba.evaluation.errors import EvalError
from dimba.evaluation.judge import StackJudge, generative_perplexity, judge_tokens
from dimba.objectives.gaussian.likelihood import elbo_bound, log_snr, t_of_log_snr
from dimba.objectives.nll import unigram_nll
from dimba.evaluation.prompted import bleu, rouge
from dimba.evaluation.report import plot, scalars, write_json, write_tensorboard
from dimba.evaluation.textstats import text_stats
from dimba.objectives import build_model
from dimba.objectives.gaussian.model import TokenEmbedding
from dimba.training.export import LoadedModel

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data_prep" / "tokenizer" / "tokenizer.model"
SMALL = dict(d_model=32, n_layers=1, d_embed=8, d_state=16, headdim=16, chunk_size=16, vocab_size=4096)


# ---- text statistics ---------------------------------------------------------------------------------------
def test_text_stats_on_hand_counted_sequences():
    s = text_stats([[5, 5, 5, 5]])
    assert s["unigram_entropy_bits"] == 0.0 and s["distinct_1"] == 0.25 and s["rep_adjacent"] == 1.0
    assert s["distinct_2"] == pytest.approx(1 / 3) and s["repetition_rate"] == 0.0   # one 4-gram: nothing repeats
    s = text_stats([[1, 2, 3, 4], [1, 2, 3, 4]])
    assert s["unigram_entropy_bits"] == pytest.approx(2.0)
    assert s["distinct_4"] == 0.5 and s["repetition_rate"] == 0.0 and s["rep_adjacent"] == 0.0
    s = text_stats([[1, 2, 3, 4, 1, 2, 3, 4]])        # 5 four-grams, 4 distinct: seq-rep-4 = 1 - 4/5
    assert s["repetition_rate"] == pytest.approx(0.2)
    assert text_stats([[]])["distinct_1"] == 0.0


def test_bleu_and_rouge_wrappers():
    assert bleu(["the cat sat on the mat today"], ["the cat sat on the mat today"]) == pytest.approx(100.0)
    assert bleu(["alpha beta gamma delta"], ["one two three four"]) == 0.0
    r = rouge(["the cat sat"], ["the cat"])
    assert r["rouge1_f"] == pytest.approx(0.8) and r["rouge2_f"] == pytest.approx(2 / 3)
    assert rouge(["x y"], ["x y"])["rougeL_f"] == pytest.approx(1.0)


# ---- the ELBO ----------------------------------------------------------------------------------------------
class BayesDenoiser(torch.nn.Module):
    """The exact posterior mean E[x0 | z_t] for i.i.d. tokens uniform over 1..V-1 (the MMSE denoiser), so the
    continuous-time bound's expectation equals the true entropy log(V - 1) per token (I-MMSE relation).
    `prior_temp` != 1 makes it a wrong (too sharp or too flat) posterior: the bound must then be looser."""

    def __init__(self, schedule: NoiseSchedule, vocab: int, d: int, prior_temp: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.schedule, self.temp = schedule, prior_temp
        self.cfg = SimpleNamespace(d_embed=d)
        self.self_condition = False
        self.te = TokenEmbedding(vocab, d, PAD_ID)

    @property
    def token_embedding(self):
        return self.te

    def embed(self, tokens):
        return self.te(tokens=tokens).float()

    def forward(self, x_t, t, clean, self_cond=None, with_logits=False):
        ab = self.schedule.alpha_bar(t.double()).view(-1, 1, 1)
        table = self.te.table()[1:].double()
        post = (ab.sqrt() * x_t.double() @ table.t()) / (1 - ab) * self.temp
        x0_hat = (post.softmax(-1) @ table).float()
        if not with_logits:
            return x0_hat
        return x0_hat, torch.cat([torch.full_like(post[..., :1], -1e9), post], -1).float()   # PAD_ID = 0: never


def uniform_batches(vocab: int, n: int = 2, b: int = 16, length: int = 64) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"tokens": torch.randint(1, vocab, (b, length), generator=g), "clean": torch.zeros(b, length, dtype=torch.bool)}
            for _ in range(n)]


@pytest.mark.parametrize("kind,zero_terminal", [("cosine", True), ("linear", False)])
def test_elbo_of_the_exact_denoiser_equals_the_true_entropy(kind, zero_terminal):
    vocab, d = 9, 16
    schedule = NoiseSchedule(kind, zero_terminal, 1000)
    r = elbo_bound(BayesDenoiser(schedule, vocab, d), schedule, uniform_batches(vocab), PAD_ID, t_min=1e-3, t_samples=32)
    truth = math.log(vocab - 1)
    top = r["at_train_t_min"]
    assert top["reconstruction"] < 1e-3                       # at SNR ~ 1e4 the token is certain
    assert abs(top["nll_nats_per_token"] - truth) < 4 * top["stderr_nats"] + 0.02, (top, truth)
    assert abs(r["nll_nats_per_token"] - truth) < 4 * r["stderr_nats"] + 0.02
    if zero_terminal:
        assert r["prior"] == 0.0 and r["tail_samples"] == 1
    else:                                                     # exact KL of N(sqrt(ab1) x0, 1 - ab1) to N(0, I)
        ab1 = float(schedule.alpha_bar(torch.tensor(1.0, dtype=torch.float64)))
        assert r["prior"] == pytest.approx(-0.5 * d * math.log1p(-ab1), rel=1e-4)
    assert r["t_samples"] == 32 and r["self_conditioning"] is False
    assert r["ppl_bound"] == pytest.approx(math.exp(r["nll_nats_per_token"]))


def test_elbo_of_a_wrong_denoiser_is_a_looser_bound():
    vocab, d = 9, 16
    schedule = NoiseSchedule("cosine", True, 1000)
    wrong = elbo_bound(BayesDenoiser(schedule, vocab, d, prior_temp=0.3), schedule, uniform_batches(vocab), PAD_ID,
                       t_min=1e-3, t_samples=32)
    assert wrong["at_train_t_min"]["nll_nats_per_token"] > math.log(vocab - 1) + 0.3


class BlurredHead(BayesDenoiser):
    """Exact token posteriors (logits), but an x0_hat shrunk towards 0, like a linear head that never lands on the
    embedding table however certain the token is."""

    def forward(self, x_t, t, clean, self_cond=None, with_logits=False):
        x0_hat, logits = super().forward(x_t, t, clean, self_cond, with_logits=True)
        return (0.8 * x0_hat, logits) if with_logits else 0.8 * x0_hat


def test_the_bound_scores_the_posterior_mean_beside_a_blurred_head():
    """The head's squared error stays ~0.04 |x0|^2 at any noise level, so SNR times it blows up from t_min; the
    posterior mean under the same (exact) logits is the Bayes denoiser's, whose bound is the true entropy."""
    vocab, d = 9, 16
    schedule = NoiseSchedule("cosine", True, 1000)
    r = elbo_bound(BlurredHead(schedule, vocab, d), schedule, uniform_batches(vocab), PAD_ID, t_min=1e-3, t_samples=32)
    truth = math.log(vocab - 1)
    head, mean = r["by_estimator"]["head"], r["by_estimator"]["posterior_mean"]
    assert head["at_train_t_min"] > truth + 10
    assert abs(mean["at_train_t_min"] - truth) < 0.1
    assert abs(mean["nll_nats_per_token"] - truth) < 4 * mean["stderr_nats"] + 0.02
    assert r["x0_estimate"] in ("head", "posterior_mean")
    assert r["nll_nats_per_token"] == r["by_estimator"][r["x0_estimate"]]["nll_nats_per_token"]
    exact = elbo_bound(BayesDenoiser(schedule, vocab, d), schedule, uniform_batches(vocab), PAD_ID, t_min=1e-3,
                       t_samples=32)                      # the exact denoiser's two estimates are the same vector
    assert exact["by_estimator"]["head"] == pytest.approx(exact["by_estimator"]["posterior_mean"], rel=1e-5)


def test_log_snr_inverse():
    for schedule in (NoiseSchedule("cosine", True), NoiseSchedule("linear", False)):
        lam = torch.linspace(-9, 9, 37, dtype=torch.float64)
        t = t_of_log_snr(schedule, lam)
        assert torch.allclose(schedule.snr(t).log(), lam, atol=1e-9)
    assert float(t_of_log_snr(NoiseSchedule("cosine", True), torch.tensor(-math.inf))) == pytest.approx(1.0)


def test_elbo_on_a_fresh_dimba_model_is_finite_and_seeded():
    cfg = Config(model=ModelConfig(**SMALL))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    schedule = NoiseSchedule("cosine", True, 1000)
    g = torch.Generator().manual_seed(3)
    batches = [{"tokens": torch.randint(4, 4096, (4, 32), generator=g), "clean": torch.zeros(4, 32, dtype=torch.bool)}]
    batches[0]["clean"][:, :8] = True                         # clean positions are not scored
    a = elbo_bound(model, schedule, batches, PAD_ID, 1e-3, t_samples=3, seed=0)
    b = elbo_bound(model, schedule, batches, PAD_ID, 1e-3, t_samples=3, seed=0)
    c = elbo_bound(model, schedule, batches, PAD_ID, 1e-3, t_samples=3, seed=1)
    assert a == b and a["nll_nats_per_token"] != c["nll_nats_per_token"]
    assert a["self_conditioning"] is True and a["tokens"] == 2 * 24
    diffs = [row["diffusion"] for row in a["by_t0"]]          # the integral over a longer range is never smaller
    assert diffs == sorted(diffs, reverse=True)
    assert all(math.isfinite(row["nll_nats_per_token"]) for row in a["by_t0"])
    lams = [row["log_snr_t0"] for row in a["by_t0"]]
    assert lams[0] == pytest.approx(log_snr(schedule, 1e-3)) and lams[-1] == -6.0
    bands = a["diffusion_by_log_snr"]                          # the same integral, cut between neighbouring t0s
    assert [b_["log_snr_to"] for b_ in bands] == lams and [b_.get("log_snr_from") for b_ in bands] == lams[1:] + [None]
    assert all(b_["nats_per_token"] >= 0 for b_ in bands)
    assert sum(b_["nats_per_token"] for b_ in bands) == pytest.approx(diffs[0])


def test_loss_by_t_follows_the_noise_level():
    vocab, d = 9, 16
    schedule = NoiseSchedule("cosine", True, 1000)
    model = BayesDenoiser(schedule, vocab, d)
    rows = loss_by_t(model, schedule, DiffusionConfig(), uniform_batches(vocab, n=1), PAD_ID, buckets=5)
    assert [r["t_lo"] for r in rows][0] == pytest.approx(1e-3) and rows[-1]["t_hi"] == pytest.approx(1.0)
    assert rows[0]["acc"] == 1.0 and rows[0]["mse"] < 1e-3    # t in [0.001, 0.2]: the token is certain
    assert rows[-1]["acc"] < 0.4                              # t in [0.8, 1]: the Bayes accuracy, 0.30 (chance 1/8)
    mses = [r["mse"] for r in rows]
    assert mses == sorted(mses)


# ---- context use -------------------------------------------------------------------------------------------
class PoolingDenoiser(BayesDenoiser):
    """For rows that repeat one token: the exact posterior pools every position's evidence (order-blind)."""

    def forward(self, x_t, t, clean, self_cond=None, with_logits=False):
        ab = self.schedule.alpha_bar(t.double()).view(-1, 1, 1)
        table = self.te.table()[1:].double()
        post = (ab.sqrt() * x_t.double() @ table.t()) / (1 - ab)
        post = post.sum(1, keepdim=True).expand_as(post)
        logits = torch.cat([torch.full_like(post[..., :1], -1e9), post], -1).float()
        return (logits.softmax(-1) @ self.te.table(), logits) if with_logits else logits.softmax(-1) @ self.te.table()


def test_context_use_of_exact_denoisers():
    vocab, d = 9, 16
    schedule = NoiseSchedule("cosine", True, 1000)
    prior = torch.full((vocab,), -math.log(vocab - 1))
    prior[PAD_ID] = -math.inf
    lams = (-4.0, -2.0, 0.0)
    # i.i.d. tokens and the position-wise Bayes denoiser: nothing to gain from context, nothing lost
    rows = context_use(BayesDenoiser(schedule, vocab, d), schedule, uniform_batches(vocab), PAD_ID, prior, lams)
    assert [r["log_snr"] for r in rows] == list(lams)
    for r in rows:
        assert abs(r["context_gain"]) < 1e-3 and abs(r["order_gain"]) < 1e-3, r
    assert rows[0]["model_ce"] > rows[1]["model_ce"] > rows[2]["model_ce"]
    # rows of one repeated token, denoised by pooling the whole row: context earns a lot, order nothing
    g = torch.Generator().manual_seed(2)
    const = [{"tokens": torch.randint(1, vocab, (8, 1), generator=g).expand(8, 32).clone(),
              "clean": torch.zeros(8, 32, dtype=torch.bool)}]
    rows = context_use(PoolingDenoiser(schedule, vocab, d), schedule, const, PAD_ID, prior, lams)
    assert rows[0]["context_gain"] > 1.0 and rows[1]["context_gain"] > 0.5, rows
    assert all(abs(r["order_gain"]) < 1e-3 for r in rows)
    assert context_use(BayesDenoiser(schedule, vocab, d), schedule, const, PAD_ID, None, lams)[0]["bayes_ce"] is None


def test_unigram_log_probs_from_shards(bundled_shards):
    log_p = unigram_log_probs(bundled_shards, 4096, PAD_ID)
    assert log_p.shape == (4096,) and log_p[PAD_ID] == -math.inf
    assert float(np.exp(log_p).sum()) == pytest.approx(1.0, abs=1e-9)
    tok = Tokenizer(TOKENIZER)
    assert log_p[tok.encode(" the")[-1]] > log_p[tok.encode(" Tyger")[-1]]
    assert unigram_log_probs(bundled_shards, 4096, PAD_ID, split="nosuchsplit") is None
    with pytest.raises(DataError, match="outside the model's vocabulary of 100"):
        unigram_log_probs(bundled_shards, 100, PAD_ID)


# ---- AR exact NLL and the judge ----------------------------------------------------------------------------
def flat_ar(vocab: int = 4096) -> torch.nn.Module:
    """An AR model whose logits are all zero (final norm weight 0): every next token has probability 1/V."""
    cfg = Config(objective="ar", model=ModelConfig(bidirectional=False, **{**SMALL, "vocab_size": vocab}))
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.norm_f.weight.zero_()
    return model


def test_val_sequences_are_spread_over_the_whole_val_split(bundled_shards):
    """Every k-th window of the val loader, not its first ones (the split is in file order)."""
    from dimba.config.schema import CleanMaskConfig, DataConfig
    from dimba.data.loader import TokenLoader
    from dimba.evaluation.valdata import val_sequences
    tok = Tokenizer(Path(__file__).resolve().parents[1] / "data_prep" / "tokenizer" / "tokenizer.model")
    cfg = DataConfig(shards=str(bundled_shards), seq_len=64, num_workers=0, clean=CleanMaskConfig(none=1.0))
    every = torch.stack([b["tokens"][0] for b in TokenLoader(cfg, split="val", batch_size=1)])
    assert len(every) > 40
    picked = val_sequences(bundled_shards, tok, 64, 5)
    k = len(every) // 5
    assert torch.equal(picked, every[::k][:5]) and k > 1
    assert torch.equal(val_sequences(bundled_shards, tok, 64, 10_000), every)      # more asked than there are


def test_ar_exact_nll_of_a_uniform_model_is_log_v():
    batches = [{"tokens": torch.randint(4, 4096, (3, 20)), "clean": torch.zeros(3, 20, dtype=torch.bool)}]
    from dimba.objectives import get_objective
    model = flat_ar()
    r = get_objective(Config(objective="ar", model=model.cfg)).likelihood(model, batches)
    assert r["kind"] == "exact" and r["tokens"] == 3 * 19
    assert r["nll_nats_per_token"] == pytest.approx(math.log(4096), rel=1e-6)
    assert r["ppl"] == pytest.approx(4096, rel=1e-5)


def test_unigram_nll_scores_each_token_by_its_log_probability():
    log_p = torch.log(torch.tensor([0.0, 0.5, 0.25, 0.25], dtype=torch.float64))   # id 0: padding
    batches = [{"tokens": torch.tensor([[1, 1, 2, 0], [3, 0, 0, 0]])}, {"tokens": torch.tensor([[0, 0, 0, 0]])}]
    r = unigram_nll(log_p.numpy(), batches, pad_id=0)
    want = (2 * math.log(2) + 2 * math.log(4)) / 4                    # padding and an all-padding row unscored
    assert r["kind"] == "exact, no context" and r["tokens"] == 4 and r["sequences"] == 2
    assert r["nll_nats_per_token"] == pytest.approx(want) and r["ppl"] == pytest.approx(math.exp(want))
    per_seq = [(2 * math.log(2) + math.log(4)) / 3, math.log(4)]
    assert r["stderr_nats"] == pytest.approx(abs(per_seq[0] - per_seq[1]) / 2)


def loaded(model, tokenizer, objective="ar", shards="data/a") -> LoadedModel:
    cfg = Config(objective=objective, model=model.cfg)
    cfg.data.shards = shards
    return LoadedModel(cfg=cfg, model=model, tokenizer=tokenizer, step=0, run_dir=None)


def test_gen_ppl_of_a_uniform_judge_is_the_vocabulary_size():
    tok = Tokenizer(TOKENIZER)
    judge = StackJudge(loaded(flat_ar(), tok))
    seqs = [tok.encode("It was a dark night."), [PAD_ID] + tok.encode("and a quiet one") + [PAD_ID]]
    assert judge_tokens(tok, tok, seqs)[1] == tok.encode("and a quiet one")      # padding has no text: dropped
    r = generative_perplexity(judge, tok, seqs)
    assert r["gen_ppl"] == pytest.approx(4096, rel=1e-5)
    assert r["judge_tokens"] == len(seqs[0]) + len(seqs[1]) - 2
    assert generative_perplexity(judge, tok, [[PAD_ID]]) is None


def test_judge_with_another_tokenizer_scores_re_encoded_text(tmp_path):
    train_tokenizer([ROOT / "data_prep" / "corpus" / "blake-poems.txt"], 512, tmp_path / "tok")
    other = Tokenizer(tmp_path / "tok" / "tokenizer.model")
    tok = Tokenizer(TOKENIZER)
    text = "Tyger Tyger, burning bright"
    assert judge_tokens(other, tok, [tok.encode(text)]) == [other.encode(text)]
    r = generative_perplexity(StackJudge(loaded(flat_ar(512), other)), tok, [tok.encode(text)])
    assert r["judge_tokens"] == len(other.encode(text)) and r["gen_ppl"] == pytest.approx(512, rel=1e-5)


def test_check_judge_refuses_a_diffusion_model_and_the_model_itself():
    tok = Tokenizer(TOKENIZER)
    ar = loaded(flat_ar(), tok)
    dimba = loaded(build_model(Config(model=ModelConfig(**SMALL))).eval(), tok, objective="gaussian")
    with pytest.raises(EvalError, match="must be an autoregressive model"):
        StackJudge(dimba).check(ar)
    twin = loaded(flat_ar(), tok)
    twin.model.load_state_dict(ar.model.state_dict())
    with pytest.raises(EvalError, match="evaluated model itself"):
        StackJudge(twin).check(ar)
    other = loaded(flat_ar(), tok, shards="data/b")                    # fresh random weights: another model
    assert StackJudge(other).check(ar) == []
    assert "same shards" in StackJudge(loaded(flat_ar(), tok)).check(ar)[0]


# ---- report writers ----------------------------------------------------------------------------------------
def small_report() -> dict:
    gen = [{"steps": s, "gen_ppl": 100.0 / s, "unigram_entropy_bits": 7.0 + s / 10, "distinct_2": 0.9,
            "repetition_rate": 0.01, "examples": ["a text"]} for s in (2, 8)]
    return {"model": {"objective": "gaussian", "step": 30},
            "likelihood": {"kind": "elbo_upper_bound", "nll_nats_per_token": 5.0, "bits_per_token": 7.2,
                           "ppl_bound": math.exp(5.0)},
            "denoising_by_t": [{"t_lo": 0.001, "t_hi": 0.5, "loss": 1.5}, {"t_lo": 0.5, "t_hi": 1.0, "loss": 6.0}],
            "reference": {"gen_ppl": 40.0, "unigram_entropy_bits": 8.0},
            "generation": gen,
            "prompted": [{"steps": s, "bleu": 1.0 * s, "rougeL_f": 0.05 * s} for s in (2, 8)],
            "speed": [{"steps": s, "tokens_per_s": 1000.0 / s, "latency_s": 0.01 * s, "device": "cpu"} for s in (2, 8)]}


def test_write_json_replaces_non_finite_numbers(tmp_path):
    report = small_report()
    report["likelihood"]["ppl_bound"] = float("inf")
    report["speed"][0]["latency_s"] = float("nan")
    data = json.loads(write_json(report, tmp_path / "r.json").read_text())
    assert data["likelihood"]["ppl_bound"] is None
    assert data["non_finite"] == ["likelihood.ppl_bound", "speed[0].latency_s"]


def test_plot_and_tensorboard_scalars(tmp_path):
    report = small_report()
    png = plot(report, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    flat = scalars(report)
    assert flat["eval/steps8/gen_ppl"] == 12.5 and flat["eval/denoise/loss_t0.50-1.00"] == 6.0
    assert flat["eval/ppl"] == pytest.approx(math.exp(5.0))
    write_tensorboard(report, tmp_path, step=30)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert set(flat) <= set(tags)
    ev = acc.Scalars("eval/steps2/bleu")
    assert [(e.step, e.value) for e in ev] == [(30, 2.0)]


def test_smollm2_judge_prefers_real_text_to_shuffled_text():
    """The offline SmolLM2 judge (installed by tools/setup.sh) tells prose from the same words shuffled, and
    batching with padding changes no score."""
    pytest.importorskip("transformers")
    from dimba.evaluation.judge import SmolLM2Judge
    judge = SmolLM2Judge()
    tok = Tokenizer(TOKENIZER)
    text = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing "
            "to do: once or twice she had peeped into the book her sister was reading.")
    words = text.split()
    shuffled = " ".join(words[i] for i in torch.randperm(len(words), generator=torch.Generator().manual_seed(0)))
    real = generative_perplexity(judge, tok, [tok.encode(text)])
    mixed = generative_perplexity(judge, tok, [tok.encode(shuffled)])
    assert real["gen_ppl"] < 60 and mixed["gen_ppl"] > 5 * real["gen_ppl"]
    both = generative_perplexity(judge, tok, [tok.encode(text), tok.encode("Alice said")], batch_size=2)
    alone = judge.text_nll(["Alice said"])
    assert both["judge_nll_nats"] * both["judge_tokens"] == pytest.approx(
        real["judge_nll_nats"] * real["judge_tokens"] + alone[0], rel=1e-4)


def test_prompt_gain_with_its_standard_error_under_the_smollm2_judge():
    """True continuations follow from their own prompts (a gain above 2 standard errors); one continuation after
    every prompt gains nothing, exactly; per-sequence scores do not depend on the batching."""
    pytest.importorskip("transformers")
    from dimba.evaluation.judge import SmolLM2Judge, summed
    from dimba.evaluation.prompted import prompt_gain
    judge = SmolLM2Judge()
    tok = Tokenizer(TOKENIZER)
    pairs = [("Alice was beginning to get very tired of sitting by her sister", " on the bank, and of having nothing to do."),
             ("The King and Queen of Hearts were seated on their throne", " when they arrived, with a great crowd."),
             ("Mr. Sherlock Holmes, who was usually very late in the mornings,", " was seated at the breakfast table."),
             ("It was the best of times, it was the worst of times,", " it was the age of wisdom, it was the age of foolishness."),
             ("Call me Ishmael. Some years ago, never mind how long precisely,", " having little or no money in my purse.")]
    prompts = [tok.encode(p) for p, _ in pairs]
    conts = [tok.encode(c) for _, c in pairs]
    g = prompt_gain(judge, tok, prompts, conts, batch_size=2)
    assert g["prompt_gain_nats"] > 2 * g["prompt_gain_se"] > 0 and g["continuation_tokens"] > 20
    ignored = prompt_gain(judge, tok, prompts, [conts[0]] * len(prompts), batch_size=2)   # one text after any prompt
    assert ignored["prompt_gain_nats"] == pytest.approx(0.0, abs=1e-6) and ignored["prompt_gain_se"] > 0
    per = judge.nlls(tok, conts + [[]], batch_size=3)
    assert per[-1] == (0.0, 0)
    total, count = summed(per)
    again = summed(judge.nlls(tok, conts, batch_size=5))        # batching and padding change no score
    assert count == again[1] and total == pytest.approx(again[0], rel=1e-4)


def test_infill_reports_the_most_frequent_token_baseline():
    """Windows of 8: prefix 2, hidden middle 4, suffix 2. Token 7 is the most frequent overall and fills 3 of the
    8 hidden positions, so writing 7 everywhere scores 3/8; the flat AR model's samples are scored beside it."""
    tok = Tokenizer(TOKENIZER)
    seqs = torch.tensor([[7, 7, 7, 9, 10, 7, 7, 7],
                         [11, 12, 13, 7, 14, 15, 16, 17]])
    model = flat_ar()
    from dimba.config.schema import SamplingConfig
    from dimba.evaluation.infill import infill
    from dimba.evaluation.textgen import Request, generate
    out = infill(model, Config(objective="ar", model=model.cfg), tok, seqs, SamplingConfig(top_p=1.0), seed=0, batch_size=2)
    assert (out["prefix_len"], out["middle_len"], out["suffix_len"]) == (2, 4, 2)
    assert out["mode_baseline"] == pytest.approx(3 / 8)
    assert 0 <= out["prefix_only"]["token_accuracy"] <= 1 and "with_suffix" not in out
    # the same floor window by window (2/4 and 1/4 of the hidden positions are 7), paired with the model's hits
    got = torch.tensor([r.middle for r in generate(model, Config(objective="ar", model=model.cfg),
                                                   [Request(s[:2].tolist(), 4) for s in seqs],
                                                   SamplingConfig(top_p=1.0), 0, 2)[0]])
    hits = (got == seqs[:, 2:6]).double().mean(1)
    over = hits - torch.tensor([0.5, 0.25], dtype=torch.double)
    score = out["prefix_only"]
    assert score["token_accuracy"] == pytest.approx(hits.mean().item())
    assert score["token_accuracy_se"] == pytest.approx((hits.std() / 2 ** 0.5).item())
    assert score["over_mode"] == pytest.approx(over.mean().item())
    assert score["over_mode_se"] == pytest.approx((over.std() / 2 ** 0.5).item())

"""Runs the real Trainer under the deepspeed launcher on fixed batches of real text, and reports what the tests
compare (losses per step, EMA against a hand-computed EMA, weights around EMA swaps). Not a test by itself.

    deepspeed --num_gpus 2 tests/dist/trainer_probe.py --stage 2 --micro-batch 4 --grad-accum 1 --out r.json

The batches stand in for the loader only (the loader has its own tests); DeepSpeed, the model, the objective and
the EMA are the real ones. Global batch g is split the way DeepSpeed splits it: micro-batch m of rank r takes rows
(m * world + r) * mb ... + mb, so 2 ranks x 1 micro-batch and 1 rank x 2 micro-batches see the same rows.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dimba.config import config_from_dict  # noqa: E402
from dimba.data.tokenizer import Tokenizer  # noqa: E402
from dimba.training.distributed import init_distributed  # noqa: E402
from dimba.training.ema import ema_decay_at  # noqa: E402
from dimba.training.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SEQ = 32


def real_text_rows(n: int) -> torch.Tensor:
    tok = Tokenizer(ROOT / "data_prep" / "tokenizer" / "tokenizer.model")
    ids = tok.encode((ROOT / "data_prep" / "corpus" / "carroll-alice.txt").read_text()[:200_000])
    return torch.tensor(ids[: n * SEQ]).view(n, SEQ)


class FixedBatches:
    def __init__(self, rows: torch.Tensor, rank: int, world: int, mb: int, ga: int, finite: bool = False):
        self.rows, self.rank, self.world, self.mb, self.ga, self.finite = rows, rank, world, mb, ga, finite
        self.pos = 0
        self.counters = {}

    def __iter__(self):
        pos = 0 if self.finite else self.pos
        gb = self.world * self.mb * self.ga
        while (pos // self.ga + 1) * gb <= len(self.rows):
            step, m = divmod(pos, self.ga)
            start = step * gb + (m * self.world + self.rank) * self.mb
            tokens = self.rows[start:start + self.mb]
            clean = torch.zeros_like(tokens, dtype=torch.bool)
            clean[::2, :4] = True                         # half the samples carry a 4-token prompt
            pos += 1
            if not self.finite:
                self.pos = pos
            yield {"tokens": tokens, "clean": clean}

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def gathered_params(trainer) -> dict:
    import deepspeed
    out = {}
    for name, p in trainer.model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=trainer.cfg.zero_stage == 3):
            out[name] = p.data.detach().float().clone()
    return out


def probe_inputs(cfg):
    """A fixed input on which the tests compare the engine's model with the converted one."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2, SEQ, cfg.model.d_embed, generator=g)
    t = torch.tensor([0.3, 0.8])
    clean = torch.zeros(2, SEQ, dtype=torch.bool)
    clean[0, :5] = True
    return x, t, clean


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--objective", default="gaussian", choices=["gaussian", "masked", "ar"])
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--ema-check", action="store_true")
    ap.add_argument("--save", action="store_true", help="save a checkpoint at the end and dump the engine's logits")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=None)
    args = ap.parse_args()
    cfg = config_from_dict({
        "objective": args.objective,
        "model": {"vocab_size": 4096, "d_model": 64, "n_layers": 2, "d_embed": 16, "d_state": 16, "headdim": 16,
                  "chunk_size": 16, "mixer_impl": "chunked", "mask_id": 4, "bidirectional": args.objective != "ar"},
        "masked": {"cond_dropout": 0.25, "t_sampling": "logit_normal"},     # the shipped configs' times
        "diffusion": {"num_steps": 100},
        "sampling": {"steps": 4},
        "data": {"seq_len": SEQ},
        "training": {"max_steps": args.steps, "lr": 3e-3, "warmup_steps": 2, "ema_decay": 0.9, "precision": "fp32"},
        "evaluation": {"val_batches": 2, "num_samples": 2, "sample_length": 16},
        "deepspeed": {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": args.grad_accum,
                      "gradient_clipping": 1.0, "zero_optimization": {"stage": args.stage}},
    })
    info = init_distributed()
    rows = real_text_rows(256)
    loader = FixedBatches(rows, info.rank, info.world_size, args.micro_batch, args.grad_accum)
    val = FixedBatches(rows[-32:], info.rank, info.world_size, args.micro_batch, 1, finite=True)
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, Path(args.run_dir), info, loader, val, None)
    report = {"losses": [], "world_size": info.world_size}
    hand = gathered_params(trainer) if args.ema_check else None
    for step in range(args.steps):
        terms = trainer.train_step()
        loss = torch.tensor([terms["loss"]], dtype=torch.float64)
        dist.all_reduce(loss)
        report["losses"].append(loss.item() / info.world_size)
        if args.ema_check:
            decay = ema_decay_at(cfg.training.ema_decay, step + 1)
            for name, value in gathered_params(trainer).items():
                hand[name].mul_(decay).add_(value, alpha=1 - decay)
    if args.ema_check:
        ema = trainer.ema.full_state_dict()
        report["ema_max_abs_diff"] = max((ema[n] - hand[n]).abs().max().item() for n in hand)
        before = gathered_params(trainer)
        val_terms = trainer.validate()
        texts = trainer.text_samples()
        after = gathered_params(trainer)
        report["swap_max_abs_diff"] = max((before[n] - after[n]).abs().max().item() for n in before)
        report["val_loss"] = val_terms["loss"]
        report["samples"] = texts
        # the EMA really is what validation used: swap in, compare with the EMA tensors
        trainer.ema.swap_in()
        inside = gathered_params(trainer)
        trainer.ema.swap_out()
        report["swap_in_max_abs_diff"] = max((inside[n] - ema[n]).abs().max().item() for n in ema)
    if args.save:
        import shutil
        trainer.save()
        if info.rank == 0:
            shutil.copyfile(ROOT / "data_prep" / "tokenizer" / "tokenizer.model", Path(args.run_dir) / "tokenizer.model")
        with torch.no_grad():
            if args.objective == "gaussian":
                x, t, clean = probe_inputs(cfg)
                x0_hat = trainer.model(x, t, clean)
                outputs = {"x0_hat": x0_hat, "logits": trainer.model.logits(x0_hat)}
            else:
                outputs = {"logits": trainer.model(rows[:2])}
        if info.rank == 0:
            from safetensors.torch import save_file
            save_file(outputs, str(Path(args.run_dir) / "engine_outputs.safetensors"))
    if info.rank == 0:
        Path(args.out).write_text(json.dumps(report))
    from dimba.training.distributed import shutdown
    shutdown()


if __name__ == "__main__":
    main()

"""The training loop: loader -> objective -> DeepSpeed step -> EMA -> metrics -> checkpoint.

One call of `Trainer.train_step` is one optimizer step of `gradient_accumulation_steps` micro-batches. A
micro-batch whose loss is non-finite on any rank is dropped on every rank before its backward (so DeepSpeed's
accumulation count stays consistent) and counted; `training.max_nonfinite` of them in a row stop the run after a
save. SIGUSR1/SIGTERM/SIGINT set a flag; after each step the ranks agree on it in one collective and, if any rank
was signalled, all of them save that step and exit (0; 130 for Ctrl-C) (a rank never saves or stops on its own
flag: that would be a collective the others never join).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from dimba.config.core import ConfigError
from dimba.config.schema import Config
from dimba.data.plan import rescale_position
from dimba.objectives import Request, get_objective, make_draw
from dimba.training import checkpoint as ckpt
from dimba.training import status as run_status
from dimba.training.distributed import DistInfo, all_reduce_max, all_reduce_mean
from dimba.training.ema import EMA
from dimba.training.engine import build_engine, peak_flops
from dimba.training.metrics import MetricsWriter
from dimba.training.stopflag import StopFlag
from dimba.model.build import count_parameters

VAL_SEED_OFFSET = 7_777_777   # validation noise seeds are fixed per val sample, independent of the step


def _duration(seconds: float) -> str:
    """12s, 3m05s, 2h14m."""
    s = int(seconds)
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s // 60 % 60:02d}m"


class TrainingStopped(RuntimeError):
    """The run stopped for a reason a person must look at (the message says which)."""


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, info: DistInfo, loader, val_loader=None, tokenizer=None,
                 stop: Optional[StopFlag] = None):
        self.cfg, self.run_dir, self.info = cfg, Path(run_dir), info
        self.loader, self.val_loader, self.tokenizer = loader, val_loader, tokenizer
        self.objective = get_objective(cfg)          # the loss, samplers and learned state; the trainer never asks which
        self.engine, self.model = build_engine(cfg, info, self.objective)
        self.ema = EMA(self.model, cfg.training.ema_decay, cfg.zero_stage) if cfg.training.ema_decay > 0 else None
        self.writer = MetricsWriter(self.run_dir, info.is_main, cfg.logging.tensorboard)
        self.stop = stop if stop is not None else StopFlag()   # set by the signal handler; read, never written
        self.stopping = False                                   # the ranks' agreed stop decision, once per step
        self.step = 0                 # optimizer steps done
        self.micro_index = 0          # micro-batches consumed (all ranks together count one per micro-step)
        self.tokens_seen = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.n_params = count_parameters(self.model)
        self.flops_per_token = self.objective.flops_per_token()
        self.peak = peak_flops(info.device)
        self.peak_name = (f"{self.peak / 1e12:.0f} TFLOP/s bf16 dense" if info.device.type == "cuda"
                          else f"{self.peak / 1e9:.0f} GFLOP/s measured fp32 matmul")
        self._it: Optional[Iterator] = None

    # ---- state ------------------------------------------------------------------------------------------
    def client_state(self) -> dict:
        loader_states = [None] * self.info.world_size
        dist.all_gather_object(loader_states, self.loader.state_dict())
        return {"step": self.step, "micro_index": self.micro_index, "tokens_seen": self.tokens_seen,
                "nonfinite_total": self.nonfinite_total, "nonfinite_run": self.nonfinite_run,
                "world_size": self.info.world_size, "loader": loader_states, "config": self.cfg.to_dict(),
                "ema_updates": self.ema.num_updates if self.ema is not None else 0,
                "objective": self.cfg.objective, "objective_state": self.objective.state_dict()}

    def save(self) -> Path:
        state = self.client_state()
        if self.tokenizer is not None:      # a restart, convert and eval check the tokenizer they use against it
            state["tokenizer_sha256"] = self.tokenizer.sha256
        ema = self.ema.full_state_dict() if self.ema is not None else None
        path = ckpt.save_checkpoint(self.engine, self.run_dir, self.step, state, ema, self.cfg.training.keep_last,
                                    self.info.rank)
        summary = self.objective.summary()
        if summary is not None and self.info.is_main:
            ckpt._atomic_write(self.run_dir / self.objective.summary_file, json.dumps(summary) + "\n")
        self.log(f"saved checkpoint {path}")
        return path

    def resume(self) -> bool:
        """Resume from the newest complete checkpoint of the run directory, if any (refused before anything in
        the run directory changes: another model, global batch or tokenizer). A checkpoint of another number of
        ranks is resharded (DeepSpeed's universal checkpoint) and continues at the same global batch."""
        ckpt_dir = self.run_dir / "checkpoints"
        refusal = ckpt.resume_refusal(self.run_dir, self.cfg.to_dict(), self.info.world_size,
                                      self.tokenizer.path if self.tokenizer is not None else None)
        if refusal:
            raise TrainingStopped(refusal)
        if self.info.is_main:
            for name in ckpt.remove_incomplete(ckpt_dir):
                self.log(f"removed incomplete checkpoint {name} (the process writing it died)")
        dist.barrier()
        path = ckpt.latest_checkpoint(ckpt_dir)
        if path is None:
            return False
        saved_world = json.loads((path / "state.json").read_text())["world_size"]
        if saved_world != self.info.world_size:
            self.log(f"checkpoint {path.name} was written by {saved_world} ranks: resharding it for "
                     f"{self.info.world_size} (DeepSpeed's universal checkpoint, in {path.name}/{ckpt.UNIVERSAL})")
        try:
            state, ema = ckpt.load_checkpoint(self.engine, path, self.info.rank,
                                              reshard=saved_world != self.info.world_size)
        except ckpt.CheckpointError as e:           # decided on every rank together
            raise TrainingStopped(str(e)) from None
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.micro_index = rescale_position(state["micro_index"], saved_world, self.info.world_size, "the run")
        self.nonfinite_total, self.nonfinite_run = state["nonfinite_total"], state["nonfinite_run"]
        self.loader.load_state_dict(state["loader"][min(self.info.rank, saved_world - 1)])
        if self.ema is not None and ema is not None:
            self.ema.load_full_state_dict(ema)
            self.ema.num_updates = state["ema_updates"]
        try:
            self.objective.load_state_dict(state.get("objective_state", state.get("time_warp")))
        except ConfigError as e:
            raise TrainingStopped(f"checkpoint {path}: {e}") from None
        self.log(f"resumed from {path} at step {self.step}")
        return True

    def log(self, msg: str) -> None:
        if self.info.is_main:
            print(f"[dimba] {msg}", flush=True)

    # ---- one optimizer step -----------------------------------------------------------------------------
    def _batches(self) -> Iterator:
        if self._it is None:
            self._it = iter(self.loader)
        return self._it

    @property
    def global_batch(self) -> int:
        return self.cfg.grad_accum * self.cfg.micro_batch_size * self.info.world_size

    def loss(self, batch: dict, seed: int, first_index: int, training: bool = True):
        """The objective's LossResult for one micro-batch; sample i's randomness comes from (seed, first_index + i)
        only (and, when training, the objective's learned state)."""
        draw = make_draw(seed, first_index, batch["tokens"].shape[0], self.global_batch)
        return self.objective.loss(self.model, batch, draw, training)

    def micro_loss(self, batch: dict):
        b = batch["tokens"].shape[0]
        return self.loss(batch, self.cfg.training.seed, (self.micro_index * self.info.world_size + self.info.rank) * b)

    def train_step(self) -> Optional[dict]:
        """Run micro-batches until one optimizer step is done; returns averaged terms (None if stopped early)."""
        done, sums = 0, {}
        while done < self.cfg.grad_accum:
            batch = next(self._batches())
            result = self.micro_loss(batch)
            self.micro_index += 1
            bad = all_reduce_max([0.0 if torch.isfinite(result.loss).item() else 1.0], self.info.device)[0]
            if bad:
                self.nonfinite_total += 1
                self.nonfinite_run += 1
                self.log(f"non-finite loss at step {self.step} (micro-batch dropped; {self.nonfinite_run} in a row)")
                if self.nonfinite_run >= self.cfg.training.max_nonfinite:
                    return None
                continue
            self.nonfinite_run = 0
            self.objective.observe(result)
            self.engine.backward(result.loss)
            self.engine.step()
            done += 1
            for k, v in result.metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        self.step += 1
        self.tokens_seen += self.cfg.grad_accum * self.cfg.micro_batch_size * self.cfg.data.seq_len * self.info.world_size
        if self.ema is not None:
            self.ema.update()
        self.objective.after_step(self.info.device)     # may be collective (the Gaussian time warp's refit)
        # The one place the ranks agree whether to stop; every save/stop decision below uses this agreed value.
        # The signal flag itself is only read: a signal landing during or after this collective (on any rank, at
        # any moment) is taken up at the next step's agreement, never overwritten and never acted on alone.
        self.stopping = bool(all_reduce_max([float(self.stop.requested)], self.info.device)[0])
        return {k: v / self.cfg.grad_accum for k, v in sums.items()}

    # ---- evaluation during training ---------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        """Denoising loss on the val shards with the EMA weights; fixed noise per val sample. Collective."""
        if self.ema is not None:
            self.ema.swap_in()
        self.model.eval()
        sums, n = {}, 0
        # every rank must run the same number of forwards (ZeRO-3 gathers are collective): the fewest any rank has
        limit = min(self.cfg.evaluation.val_batches, getattr(self.val_loader, "batches_per_epoch", 10 ** 9))
        limit = int(-all_reduce_max([-float(limit)], self.info.device)[0])
        try:
            for i, batch in enumerate(self.val_loader):
                if i >= limit:
                    break
                b = batch["tokens"].shape[0]
                result = self.loss(batch, self.cfg.training.seed + VAL_SEED_OFFSET,
                                   (i * self.info.world_size + self.info.rank) * b, training=False)
                for k, v in result.metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n += 1
        finally:
            self.model.train()
            if self.ema is not None:
                self.ema.swap_out()
        keys = list(sums) or ["loss"]     # the objective's metric names, in its order: the same on every rank
        count = all_reduce_mean([float(n)], self.info.device)[0]
        vals = all_reduce_mean([sums.get(k, 0.0) for k in keys], self.info.device)
        return {k: v / max(count, 1e-9) for k, v in zip(keys, vals)}

    @torch.no_grad()
    def text_samples(self) -> list[str]:
        """A few unconditional samples with the EMA weights (every rank runs them: ZeRO-3 gathers are
        collective; rank 0 decodes)."""
        import deepspeed
        if self.ema is not None:
            self.ema.swap_in()
        self.model.eval()
        try:
            g = torch.Generator().manual_seed(self.cfg.training.seed + self.step)
            n, length = self.cfg.evaluation.num_samples, self.cfg.evaluation.sample_length
            requests = [Request(prefix=[], middle_length=length) for _ in range(n)]
            gather = self.cfg.zero_stage == 3 and self.objective.gather_for_sampling
            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), enabled=gather):
                tokens = self.objective.generate(self.model, requests, self.cfg.sampling, g, self.info.device)
        finally:
            self.model.train()
            if self.ema is not None:
                self.ema.swap_out()
        if self.tokenizer is None:
            return [" ".join(map(str, t)) for t in tokens]
        return [self.tokenizer.decode(t) for t in tokens]

    # ---- the loop ---------------------------------------------------------------------------------------
    def write_status(self, state: str, message: str = "", **fields) -> None:
        if self.info.is_main:
            run_status.write_status(self.run_dir, state, step=self.step, max_steps=self.cfg.training.max_steps,
                                    message=message, **fields)

    def fit(self) -> int:
        """Train to training.max_steps (or until stopped); returns the process exit code."""
        cfg = self.cfg
        self.stop.install()          # no-op when launch installed it already
        self.resume()
        if self.info.is_main:        # only now, every check passed: a refused restart leaves the run as it was
            ckpt.write_run_files(self.run_dir, cfg.to_json(), self.tokenizer.path if self.tokenizer else None)
        self.log(f"model: {self.n_params / 1e6:.2f}M parameters; world size {self.info.world_size}; "
                 f"ZeRO stage {cfg.zero_stage}; step {self.step}/{cfg.training.max_steps}")
        self.write_status("running")
        t_last, tok_last, step_last = time.time(), self.tokens_seen, self.step
        t_start = t_last
        last_saved = self.step if self.step > 0 else -1
        while self.step < cfg.training.max_steps:
            terms = self.train_step()
            if terms is None:
                self.save()
                msg = (f"training stopped: {self.nonfinite_run} consecutive non-finite losses at step {self.step} "
                       "(training.max_nonfinite); lower training.lr or check the data; saved the last state")
                self.write_status("failed", msg)
                raise TrainingStopped(msg)
            step = self.step
            if step % cfg.logging.log_every == 0 or step == cfg.training.max_steps:
                terms = dict(zip(terms, all_reduce_mean(list(terms.values()), self.info.device)))
                now = time.time()
                tok_s = (self.tokens_seen - tok_last) / max(now - t_last, 1e-9)
                per_rank = tok_s / self.info.world_size
                extra = {"lr": self.engine.get_lr()[0], "tokens_per_s": tok_s, "tokens_per_s_per_rank": per_rank,
                         "tokens_seen": self.tokens_seen, "nonfinite_total": self.nonfinite_total,
                         "step_time_s": (now - t_last) / max(step - step_last, 1)}
                gn = self.engine.get_global_grad_norm()
                if gn is not None:
                    extra["grad_norm"] = float(gn)
                extra.update(self.objective.log_extra())
                if self.peak:
                    extra["mfu"] = self.flops_per_token * per_rank / self.peak
                if torch.cuda.is_available():
                    extra["mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                else:
                    import resource
                    extra["mem_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                for k, v in getattr(self.loader, "counters", {}).items():
                    if isinstance(v, (int, float)):
                        extra[f"data/{k}"] = v
                self.writer.scalars(step, {f"train/{k}": v for k, v in terms.items() if k != "tokens"})
                self.writer.scalars(step, extra)
                eta = (cfg.training.max_steps - step) * extra["step_time_s"]
                self.log(f"step {step} " + " ".join(f"{k} {v:.4f}" for k, v in terms.items())
                         + f" lr {extra['lr']:.2e} tok/s {tok_s:.0f} {extra['step_time_s']:.2f} s/step"
                         + f" elapsed {_duration(now - t_start)} ETA {_duration(eta)}"
                         + (f" mfu {extra['mfu']:.3f} of {self.peak_name}" if "mfu" in extra else ""))
                self.write_status("running", loss=terms["loss"], log_interval_s=now - t_last,
                                  eta_s=(cfg.training.max_steps - step) * extra["step_time_s"],
                                  last_checkpoint=last_saved if last_saved >= 0 else None)
                t_last, tok_last, step_last = now, self.tokens_seen, step
            if self.val_loader is not None and cfg.evaluation.val_every and step % cfg.evaluation.val_every == 0:
                val = self.validate()
                self.writer.scalars(step, val, prefix="val/")
                self.log(f"step {step} val " + " ".join(f"{k} {v:.4f}" for k, v in val.items()))
            if cfg.evaluation.sample_every and step % cfg.evaluation.sample_every == 0:
                texts = self.text_samples()
                for i, text in enumerate(texts):
                    self.writer.text(step, f"samples/{i}", text)
                self.log(f"step {step} sample: {texts[0][:200]!r}")
            if step % cfg.training.checkpoint_every == 0 or step == cfg.training.max_steps or self.stopping:
                self.save()
                last_saved = step
            self.writer.flush()
            if self.stopping and step < cfg.training.max_steps:   # on the last step: just finish
                self.log(f"stopping at step {step} on {self.stop.signal_name or 'a signal on another rank'} "
                         "(checkpoint saved; a restart on this run directory resumes)")
                self.write_status("interrupted", f"stopped by {self.stop.signal_name or 'signal'}",
                                  last_checkpoint=step)
                self.writer.close()
                return self.stop.exit_code
        if last_saved != self.step:
            self.save()
        self.write_status("finished", last_checkpoint=self.step)
        self.writer.close()
        self.log(f"finished: {self.step} steps, {self.tokens_seen} tokens")
        return 0

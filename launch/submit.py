#!/usr/bin/env python
"""Submit DIMBA training with periodic checkpoint evaluation through submitit (Slurm, or this machine).

    python launch/submit.py --config configs/1b.json --nodes 4 --gpus-per-node 8 --partition gpu --time 1440
    python launch/submit.py --config configs/tiny.json --cluster local --gpus-per-node 0 --tasks-per-node 2 \\
        --eval-gpus 0 --set training.max_steps=200

Training runs as a checkpointable job: before its time limit, or when pre-empted, every rank saves and the job
is requeued; it resumes from the run directory's newest checkpoint. A small watcher job submits one
evaluation job per new checkpoint; each writes RUN_DIR/eval/<checkpoint>.json and adds its metrics to the
run's tensorboard. Cluster settings come from the command line, else from an optional "cluster" section of the
config (keys as in dimba/cluster/spec.py), else defaults. On Slurm this returns after submitting unless
--wait; with --cluster local it always waits (the jobs are its children). `--follow RUN_DIR` waits for a run
submitted earlier. Exit code 1 and the failing job's error when a job fails.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from dimba.cli import ArgumentParser
from dimba.cluster.jobs import EvaluationJob, eval_options
from dimba.cluster.run import RunFailed, load_run, submit_run, wait_run
from dimba.cluster.spec import ClusterSpec
from dimba.console import quiet
from dimba.config.schema import config_from_dict
from dimba.training.run import check_data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--config", help="training config (JSON); may hold a \"cluster\" section")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training config value (repeatable), as for launch/train.py")
    p.add_argument("--run-dir", help="run directory (default runs/<config>-<date>); an existing one resumes")
    p.add_argument("--follow", metavar="RUN_DIR", help="wait for a run submitted earlier (Slurm) and report")
    c = p.add_argument_group("cluster (None = from the config's cluster section or the default)")
    c.add_argument("--cluster", choices=["slurm", "local"])
    c.add_argument("--nodes", type=int)
    c.add_argument("--gpus-per-node", type=int, help="0 trains on CPU ranks")
    c.add_argument("--tasks-per-node", type=int, help="ranks per node (default: one per GPU)")
    c.add_argument("--cpus-per-task", type=int)
    c.add_argument("--mem-gb", type=float)
    c.add_argument("--partition")
    c.add_argument("--account")
    c.add_argument("--qos")
    c.add_argument("--time", dest="time_min", type=int, help="time limit per job incarnation, minutes")
    c.add_argument("--signal-delay", dest="signal_delay_s", type=int, help="seconds before the limit to save")
    c.add_argument("--max-timeouts", dest="max_num_timeout", type=int, help="requeues after time-outs")
    e = p.add_argument_group("evaluation of each checkpoint")
    e.add_argument("--no-eval", action="store_true", help="no watcher, no evaluation jobs")
    e.add_argument("--eval-data", help="shards to evaluate on (default: the config's data.shards)")
    e.add_argument("--eval-set", dest="eval_options", action="append", default=[], metavar="KEY=VALUE",
                   help="tools/eval.py measuring option, e.g. --eval-set batches=2 --eval-set steps=16,64 "
                        "(names as in dimba/evaluation/evaluate.py EvalOptions; repeatable)")
    e.add_argument("--eval-gpus", type=int)
    e.add_argument("--eval-cpus", type=int)
    e.add_argument("--eval-time", dest="eval_time_min", type=int, help="minutes per evaluation job")
    e.add_argument("--eval-partition")
    e.add_argument("--poll", type=float, default=30.0, help="seconds between the watcher's checkpoint scans")
    w = p.add_argument_group("waiting")
    w.add_argument("--wait", action="store_true", help="(Slurm) wait for the run and print its outcome")
    w.add_argument("--timeout", type=float, help="with --wait: cancel the jobs after this many seconds")
    w.add_argument("--verbose", action="store_true", help="also show third-party warnings and DeepSpeed logs")
    w.add_argument("--folder", help="submitit folder for job files and logs (default RUN_DIR/submitit)")
    args = p.parse_args(argv)
    if not args.config and not args.follow:
        p.error("--config is required (or --follow RUN_DIR)")
    return args


SPEC_ARGS = ("cluster", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "partition",
             "account", "qos", "time_min", "signal_delay_s", "max_num_timeout", "eval_gpus", "eval_cpus",
             "eval_time_min", "eval_partition")


def report(outcome: dict, run_dir: Path) -> None:
    status = outcome["status"]
    print(f"training {status.get('state')}: step {status.get('step')}/{status.get('max_steps')} in {run_dir}")
    for tag, rep in sorted(outcome["evaluations"].items()):
        print(f"  {tag}: {json.dumps(rep, sort_keys=True)[:300]}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet(args.verbose)
    if args.follow:
        try:
            jobs = load_run(Path(args.follow))
            report(wait_run(jobs, timeout_s=args.timeout), jobs.run_dir)
        except (FileNotFoundError, ValueError, RunFailed, TimeoutError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        return 0
    config_path = Path(args.config).resolve()
    try:
        raw = json.loads(config_path.read_text())
        section = raw.get("cluster", {}) if isinstance(raw, dict) else {}
        spec = ClusterSpec.from_dict(section, **{k: getattr(args, k) for k in SPEC_ARGS})
        cfg = config_from_dict(raw, args.overrides)   # fail here, not minutes later in a queued job
        check_data(cfg)
        options = eval_options(args.eval_options)
        eval_data = Path(args.eval_data or cfg.data.shards).resolve()
        if not args.no_eval and not (eval_data / "manifest.json").is_file():
            raise ValueError(f"--eval-data {eval_data} has no manifest.json; pass a shard directory")
    except (OSError, json.JSONDecodeError) as err:
        print(f"error: cannot read config {config_path}: {err}", file=sys.stderr)
        return 2
    except ValueError as err:   # ConfigError, ClusterSpecError, a bad --eval-set
        print(f"error: {config_path}: {err}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir or f"runs/{config_path.stem}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(config_path),
               "--run-dir", str(run_dir)]
    for kv in args.overrides:
        command += ["--set", kv]
    evaluation = None
    if not args.no_eval:
        evaluation = EvaluationJob(data=str(eval_data), run_dir=str(run_dir), options=options)
    jobs = submit_run(command, run_dir, spec, evaluation, folder=Path(args.folder) if args.folder else None,
                      poll_s=args.poll, name=config_path.stem)
    watch = f", watcher job {jobs.watch.job_id}" if jobs.watch else ""
    print(f"submitted training job {jobs.train.job_id}{watch} ({spec.cluster}); run dir {run_dir}; "
          f"logs {jobs.folder}", flush=True)
    if spec.cluster == "slurm" and not args.wait:
        print(f"follow with: python launch/submit.py --follow {run_dir}")
        return 0
    try:
        report(wait_run(jobs, timeout_s=args.timeout), run_dir)
    except (RunFailed, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

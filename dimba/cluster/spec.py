"""What a run asks of the cluster (nodes, GPUs, partition, time) and the submitit executors built from it.

The same `ClusterSpec` drives Slurm (`cluster="slurm"`) and a plain machine (`cluster="local"`: submitit's local
executor runs the same jobs as subprocesses, one node). Values come from the command line of
launch/submit.py or from the optional "cluster" section of a config file (keys = the field names below).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import submitit

import dimba

CLUSTERS = ("slurm", "local")
ROLES = ("train", "eval", "watch")


class ClusterSpecError(ValueError):
    """A cluster setting that cannot work; the message names the setting and what to do."""


@dataclass
class ClusterSpec:
    cluster: str = "slurm"
    nodes: int = 1
    gpus_per_node: int = 8          # 0: CPU ranks (tests, laptops)
    tasks_per_node: int = 0         # 0: one task per GPU, or 1 task without GPUs
    cpus_per_task: int = 8
    mem_gb: Optional[float] = None  # None: the partition's default
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time_min: int = 24 * 60         # per job incarnation; a timed-out job saves and is requeued
    signal_delay_s: int = 180       # the pre-timeout signal comes this long before the limit: time to save
    max_num_timeout: int = 20       # requeues after time-outs before giving up (pre-emptions are unlimited)
    eval_gpus: int = 1
    eval_cpus: int = 8
    eval_time_min: int = 60
    eval_partition: Optional[str] = None  # None: same as partition
    watch_cpus: int = 1

    def __post_init__(self) -> None:
        self.validate()

    @property
    def ranks_per_node(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    def validate(self) -> None:
        if self.cluster not in CLUSTERS:
            raise ClusterSpecError(f"cluster must be one of {', '.join(CLUSTERS)}, got {self.cluster!r}")
        positive = ("nodes", "cpus_per_task", "time_min", "eval_cpus", "eval_time_min", "watch_cpus")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ClusterSpecError(f"cluster.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("gpus_per_node", "tasks_per_node", "eval_gpus", "signal_delay_s", "max_num_timeout"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ClusterSpecError(f"cluster.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.gpus_per_node and self.tasks_per_node and self.tasks_per_node != self.gpus_per_node:
            raise ClusterSpecError(f"cluster.tasks_per_node ({self.tasks_per_node}) must equal cluster.gpus_per_node "
                                   f"({self.gpus_per_node}): training runs one task per GPU")
        if self.cluster == "local" and self.nodes != 1:
            raise ClusterSpecError(f"cluster.nodes must be 1 with cluster 'local', got {self.nodes}")
        if self.signal_delay_s >= self.time_min * 60:
            raise ClusterSpecError(f"cluster.signal_delay_s ({self.signal_delay_s}) must be shorter than the time "
                                   f"limit ({self.time_min} min)")

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> "ClusterSpec":
        """From a config's "cluster" section; `overrides` (e.g. command-line values, None = unset) win."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ClusterSpecError(f"unknown cluster setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        values = dict(data)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _package_root() -> str:
    """The folder holding `dimba`: on the job's PYTHONPATH it makes dimba importable without installing it
    (a plain checkout); the job unpickles dimba.cluster objects before anything else runs."""
    return str(Path(dimba.__file__).resolve().parents[1])


def _export_package_root() -> None:
    """Local jobs inherit this process's environment. (submitit's `setup` lines would also do it, but they
    put a shell between the job id and the job, and cancelling the job then only ends the shell.)"""
    parts = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if _package_root() not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([_package_root()] + [p for p in parts if p])


def make_executor(spec: ClusterSpec, folder: Path, role: str, name: str = "dimba") -> submitit.Executor:
    """A submitit executor for one kind of job of a run: `train` (all ranks), `eval` (one checkpoint) or
    `watch` (the small job that submits evaluations as checkpoints appear)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    executor = submitit.AutoExecutor(folder=folder, cluster=spec.cluster, slurm_max_num_timeout=spec.max_num_timeout)
    if role == "train":
        params: dict[str, Any] = dict(nodes=spec.nodes, tasks_per_node=spec.ranks_per_node,
                                      gpus_per_node=spec.gpus_per_node, cpus_per_task=spec.cpus_per_task,
                                      timeout_min=spec.time_min, mem_gb=spec.mem_gb)
        partition = spec.partition
    elif role == "eval":
        params = dict(nodes=1, tasks_per_node=1, gpus_per_node=spec.eval_gpus, cpus_per_task=spec.eval_cpus,
                      timeout_min=spec.eval_time_min)
        partition = spec.eval_partition or spec.partition
    else:
        params = dict(nodes=1, tasks_per_node=1, gpus_per_node=0, cpus_per_task=spec.watch_cpus,
                      timeout_min=spec.time_min)
        partition = spec.eval_partition or spec.partition
    params["name"] = f"{name}-{role}"
    if spec.cluster == "slurm":
        params.update(slurm_partition=partition, slurm_account=spec.account, slurm_qos=spec.qos,
                      slurm_signal_delay_s=min(spec.signal_delay_s, params["timeout_min"] * 60 // 2),
                      # one rank failing ends the step at once instead of leaving the others in a collective
                      slurm_srun_args=["--kill-on-bad-exit=1"],
                      slurm_additional_parameters={"requeue": True},
                      slurm_setup=[f'export PYTHONPATH="{_package_root()}${{PYTHONPATH:+:$PYTHONPATH}}"'])
    else:
        _export_package_root()
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor

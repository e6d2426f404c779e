"""Running DIMBA on a cluster with submitit: the training job, the checkpoint watcher and evaluation jobs.

    spec.py   what a run asks of the cluster (ClusterSpec) and the submitit executors built from it
    jobs.py   TrainingJob (one supervising task per rank, checkpoint + requeue) and EvaluationJob
    watch.py  CheckpointWatcher: one evaluation job per new complete checkpoint
    run.py    submit_run / wait_run / load_run, used by launch/submit.py

The sbatch scripts in slurm/ do the same without submitit.
"""

#!/usr/bin/env bash
# Stop what slurm/local/start.sh started: cancel and drain jobs first (submitit's job processes ignore
# SIGTERM, so a job still running would hold slurmd for KillWait), then stop the daemons by PID file.
[ "$(id -u)" = 0 ] || { echo "slurm/local/stop.sh: must run as root" >&2; exit 1; }
if command -v squeue >/dev/null && squeue -h >/dev/null 2>&1; then
  scancel --full --user=root >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 1; done
fi
stop_pid() {  # $1 = pid file; SIGTERM, wait up to 20 s, then SIGKILL
  [ -s "$1" ] || return 0
  local p; p=$(cat "$1"); kill "$p" 2>/dev/null || return 0
  for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.2; done
  kill -9 "$p" 2>/dev/null || true
}
stop_pid /run/slurmd.pid
stop_pid /run/slurmctld.pid
stop_pid /run/slurmdbd.pid
if command -v mysqladmin >/dev/null; then mysqladmin shutdown >/dev/null 2>&1 || true; fi
stop_pid /run/munge/munged.pid
echo "slurm stopped"

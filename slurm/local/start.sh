#!/usr/bin/env bash
# Start a one-node Slurm on loopback for DIMBA's tests (Debian/Ubuntu, run as root; no systemd needed).
#
#   sudo slurm/local/start.sh            # install what is missing, start, wait until the node is idle
#   sudo slurm/local/stop.sh             # drain jobs, stop the daemons
#
# Idempotent: with the daemons already up it only re-checks them (under a second).
# Environment knobs:
#   SLURM_ACCOUNTING=1  (default) also runs MariaDB + slurmdbd so that `sacct` works; submitit needs it to
#                       see jobs that were cancelled, timed out or killed (without it job.result() can wait
#                       forever on such jobs). 0 = minimal variant without sacct.
#   SLURM_CPUS=N        CPUs the node advertises (default: max(nproc, 8)). More than the machine has is allowed
#                       (SlurmdParameters=config_overrides) so that a 2-task training job, a checkpoint watcher
#                       and evaluation jobs can run side by side on a small CI box. They then share cores.
#   SLURM_KILL_WAIT=S   seconds between SIGTERM and SIGKILL when a job is cancelled or requeued (default 20).
#   SLURM_CRED_EXPIRE=S job credential lifetime (default 10; Slurm's default is 120). A requeued job may not
#                       start again before it expires, so this is how long a preempted test job stays pending.
# It writes /etc/slurm/slurm.conf and refuses to overwrite one it did not write (a real cluster's).
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "slurm/local/start.sh: must run as root (it installs packages and starts daemons)" >&2; exit 1; }

ACCT=${SLURM_ACCOUNTING:-1}
NODE=$(hostname -s)
NPROC=$(nproc)
CPUS=${SLURM_CPUS:-$(( NPROC > 8 ? NPROC : 8 ))}
KILL_WAIT=${SLURM_KILL_WAIT:-20}
CRED_EXPIRE=${SLURM_CRED_EXPIRE:-10}
MEM=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) - 512 ))  # MB
SPOOL=/var/spool/slurm-dimba
LOGDIR=/var/log/slurm-dimba
MARKER="# written by dimba slurm/local/start.sh"
CONF=/etc/slurm/slurm.conf

if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
  echo "slurm/local/start.sh: $CONF exists and was not written by this script; refusing to replace a real" \
       "cluster's config (remove it yourself if this machine is a throw-away test box)" >&2
  exit 1
fi

# ---- 1) install what is missing; package scripts must not start services ----
PKGS="slurmctld slurmd slurm-client munge"
[ "$ACCT" = 1 ] && PKGS="$PKGS slurmdbd mariadb-server"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then   # invoke-rc.d consults this; exit 101 = "do not start"
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d; made_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  echo "installing:$missing"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
fi

# ---- 2) munge (authentication between the daemons and the client tools) ----
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
  su -s /bin/sh munge -c /usr/sbin/munged          # daemonizes itself
  for _ in $(seq 1 50); do munge_ok && break; sleep 0.2; done
  munge_ok || { echo "munged failed to start (see /var/log/munge/munged.log)" >&2; exit 1; }
fi

# ---- 3) slurm.conf ----
install -d -m 0755 /etc/slurm "$SPOOL/ctld" "$SPOOL/d" "$LOGDIR"
if [ "$ACCT" = 1 ]; then
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost"
else
  ACCT_LINES="AccountingStorageType=accounting_storage/none"
fi
cat > "$CONF.new" <<CONF_EOF
$MARKER
ClusterName=dimba
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=${CRED_EXPIRE}
CredType=cred/munge
StateSaveLocation=${SPOOL}/ctld
SlurmdSpoolDir=${SPOOL}/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=${LOGDIR}/slurmctld.log
SlurmdLogFile=${LOGDIR}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
${ACCT_LINES}
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
MinJobAge=300
KillWait=${KILL_WAIT}
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
CONF_EOF
conf_changed=1
if [ -e "$CONF" ] && cmp -s "$CONF" "$CONF.new"; then conf_changed=0; fi
mv "$CONF.new" "$CONF"

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# ---- 4) accounting: MariaDB + slurmdbd (optional) ----
if [ "$ACCT" = 1 ]; then
  install -d -o mysql -g mysql /run/mysqld
  if ! mysqladmin ping >/dev/null 2>&1; then
    (setsid mysqld_safe --user=mysql >"$LOGDIR/mysqld_safe.log" 2>&1 </dev/null &)
    for _ in $(seq 1 150); do mysqladmin ping >/dev/null 2>&1 && break; sleep 0.2; done
    mysqladmin ping >/dev/null 2>&1 || { echo "MariaDB failed to start (see $LOGDIR/mysqld_safe.log)" >&2; exit 1; }
  fi
  mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
            CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmdimba';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  cat > /etc/slurm/slurmdbd.conf <<DBD_EOF
$MARKER
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmdimba
StorageLoc=slurm_acct_db
LogFile=${LOGDIR}/slurmdbd.log
PidFile=/run/slurmdbd.pid
DBD_EOF
  chmod 0600 /etc/slurm/slurmdbd.conf                 # slurmdbd refuses a readable file (it holds a password)
  pid_alive /run/slurmdbd.pid || slurmdbd
  for _ in $(seq 1 100); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done
fi

# ---- 5) slurmctld + slurmd (both daemonize themselves) ----
stop_pid() {  # $1 = pid file
  [ -s "$1" ] || return 0
  local p; p=$(cat "$1"); kill "$p" 2>/dev/null || return 0
  for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.2; done
  kill -9 "$p" 2>/dev/null || true
}
if [ "$conf_changed" = 1 ]; then    # `scontrol reconfigure` does not apply everything (cred_expire): restart
  stop_pid /run/slurmd.pid; stop_pid /run/slurmctld.pid
fi
pid_alive /run/slurmctld.pid || slurmctld
pid_alive /run/slurmd.pid    || slurmd

# ---- 6) wait until the node accepts jobs ----
state=""
for _ in $(seq 1 60); do
  state=$(sinfo -h -n "$NODE" -o '%t' 2>/dev/null || true)
  case "$state" in
    idle*|mix*|alloc*) echo "slurm ready: node $NODE is $state ($CPUS CPUs, accounting=$ACCT)"; exit 0 ;;
    down*|drain*|inval*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 1
done
echo "slurm not ready (node state '$state'); last log lines:" >&2
tail -n 30 "$LOGDIR"/*.log >&2 || true
exit 1

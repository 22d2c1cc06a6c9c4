#!/usr/bin/env bash
# A single-node SLURM cluster on loopback for tests (Debian, run as root, no systemd, no cgroups).
#
#   tests/slurm/start-slurm.sh          install slurm-wlm + munge if missing, then start munged,
#                                       slurmctld and slurmd and wait until the node is idle
#   tests/slurm/start-slurm.sh stop     stop the daemons started here, by the PIDs in their pid files
#
# Everything lives in one private state folder ($LMFORGE_SLURM_DIR, default /tmp/lmforge-slurm):
# slurm.conf, its own munge key and socket, spool folders, pid files and logs. The one thing outside
# it is a symlink /etc/slurm/slurm.conf -> that slurm.conf, made only where no slurm.conf exists
# (exit 3 otherwise) and removed by `stop`: the executor plugin's job step drops SLURM_* variables,
# SLURM_CONF included, before its inner srun, so the config must be at the default path.
#
# No accounting database: `sacct` cannot see jobs, so Snakemake's SLURM executor must poll with
# `--slurm-status-command squeue`, which sees finished jobs for MinJobAge (300 s here).
set -euo pipefail
STATE=${LMFORGE_SLURM_DIR:-/tmp/lmforge-slurm}
CTLD_PORT=${LMFORGE_SLURM_PORT:-7817}
SLURMD_PORT=$((CTLD_PORT + 1))
HOST=$(hostname -s)
CONF=$STATE/slurm.conf
DEFAULT_CONF=/etc/slurm/slurm.conf
export DEBIAN_FRONTEND=noninteractive

stop_pidfile() {  # stop one daemon by the PID in its pid file; wait up to 10 s for it to exit
  local f=$1 pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  fi
  rm -f "$f"
}
stop_all() {
  stop_pidfile "$STATE/slurmd.pid"
  stop_pidfile "$STATE/slurmctld.pid"
  stop_pidfile "$STATE/munge/munged.pid"
  if [ "$(readlink "$DEFAULT_CONF" 2>/dev/null)" = "$CONF" ]; then rm -f "$DEFAULT_CONF"; fi
}
if [ "${1:-}" = stop ]; then stop_all; exit 0; fi

# ---- 1. install (~15 s on a Debian machine with a package mirror) ----
if ! { command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged; } >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
if [ -e "$DEFAULT_CONF" ] && [ "$(readlink "$DEFAULT_CONF")" != "$CONF" ]; then
  echo "start-slurm.sh: $DEFAULT_CONF exists (a real SLURM setup?); not touching it" >&2
  exit 3
fi

# a second start restarts everything cleanly
stop_all
mkdir -p "$STATE/spool/ctld" "$STATE/spool/d" "$STATE/log" "$STATE/munge"

# ---- 2. munge: a private daemon with its own key and socket ----
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >> /etc/hosts
MUNGE_SOCKET=$STATE/munge/munge.socket
chown munge:munge "$STATE/munge"; chmod 755 "$STATE/munge"   # munged: the socket folder must be searchable by all
if [ ! -s "$STATE/munge/munge.key" ]; then
  runuser -u munge -- mungekey --create --keyfile="$STATE/munge/munge.key"
  chmod 400 "$STATE/munge/munge.key"
fi
runuser -u munge -- munged --key-file="$STATE/munge/munge.key" --socket="$MUNGE_SOCKET" \
  --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/munged.seed"
munge -S "$MUNGE_SOCKET" -n | unmunge -S "$MUNGE_SOCKET" >/dev/null

# ---- 3. slurm.conf (no cgroup plugins; accounting off) ----
CPUS=$(nproc)
MEM=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
MEM=$(( MEM * 85 / 100 ))
cat > "$CONF" <<EOF
ClusterName=lmforge
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${MUNGE_SOCKET}
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=${STATE}/log/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=${STATE}/spool/ctld
SlurmdSpoolDir=${STATE}/spool/d
SlurmctldPidFile=${STATE}/slurmctld.pid
SlurmdPidFile=${STATE}/slurmd.pid
SlurmctldLogFile=${STATE}/log/slurmctld.log
SlurmdLogFile=${STATE}/log/slurmd.log
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
EOF

# ---- 4. slurmctld + slurmd (daemonized; -c: start with no old jobs) ----
mkdir -p "$(dirname "$DEFAULT_CONF")"
ln -sfn "$CONF" "$DEFAULT_CONF"
slurmctld -c
slurmd
for _ in $(seq 1 120); do
  [ "$(sinfo -h -n "$HOST" -o %T 2>/dev/null)" = idle ] && break
  sleep 0.5
done
if [ "$(sinfo -h -n "$HOST" -o %T)" != idle ]; then
  scontrol update nodename="$HOST" state=resume || true
  sleep 2
fi
sinfo
[ "$(sinfo -h -n "$HOST" -o %T)" = idle ]

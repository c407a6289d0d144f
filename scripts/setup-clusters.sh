#!/usr/bin/env bash
# A real single-node SLURM (munge, slurmctld, slurmd) and Open MPI on this host, for the
# tests in tests/reliability/test_slurm.py and test_mpi.py. Run as root (CI and containers).
#
# Installs Debian's slurm-wlm, munge, openmpi-bin and libopenmpi-dev when missing, writes
# /etc/slurm/slurm.conf for this host (its short name, `nproc` CPUs; no cgroups: proctrack
# linuxproc, task/none), starts munged, slurmctld and slurmd, and waits until `sinfo` shows
# the node idle. Idempotent: a second run, with everything up, only checks and returns.
# Cost: about 1 minute when it installs (mostly apt), a few seconds otherwise.
# Exit code 0 when SLURM is up; non-zero, with the reason, otherwise (the tests then skip).
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "setup-clusters.sh: must run as root (it installs packages and starts daemons)" >&2
    exit 1
fi

if ! command -v srun >/dev/null || ! command -v munged >/dev/null || ! command -v mpirun >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends slurm-wlm munge openmpi-bin libopenmpi-dev >/dev/null
fi

host=$(hostname -s)
cpus=$(nproc)
conf=/etc/slurm/slurm.conf
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/lib/munge /var/log/munge
new=$(cat <<EOF
# Written by ltransform's scripts/setup-clusters.sh: one node, no cgroups (containers).
ClusterName=ltransform
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
# a requeued job waits this long to start (default 120 s), while its old credential is revoked
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
MpiDefault=none
JobRequeue=1
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=60
KillWait=10
MinJobAge=60
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
)

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop() { if alive "$1"; then kill "$(cat "$1")"; sleep 1; fi; rm -f "$1"; }

if [ ! -f "$conf" ] || [ "$(cat "$conf")" != "$new" ]; then
    echo "$new" > "$conf"
    stop /run/slurmd.pid
    stop /run/slurmctld.pid
fi

if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
fi
munge -n | unmunge >/dev/null || { echo "setup-clusters.sh: munged does not answer" >&2; exit 1; }

alive /run/slurmctld.pid || slurmctld
alive /run/slurmd.pid || slurmd

for _ in $(seq 120); do
    state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
    case "$state" in
        idle|mix|alloc) break ;;
        drain*|down*|inval*) scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.5
done
state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
case "$state" in
    idle|mix|alloc) echo "setup-clusters.sh: SLURM up, node $host ($cpus CPUs) $state; $(mpirun --version | head -1)" ;;
    *) echo "setup-clusters.sh: node $host is '$state' after 60 s; see /var/log/slurm/" >&2
       tail -5 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
       exit 1 ;;
esac

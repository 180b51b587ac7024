#!/usr/bin/env bash
# A single-node SLURM on this machine for the slow executor test (tests/integration/test_slurm.py).
#   bash .ci/slurm_localhost.sh install   # Debian/Ubuntu: slurm-wlm + munge (root or sudo)
#   bash .ci/slurm_localhost.sh start DIR # munged + slurmctld + slurmd configured for localhost, state in DIR
#   bash .ci/slurm_localhost.sh stop DIR
# No cgroups (containers): proctrack/linuxproc, task/none. One partition `debug` holding this node.
set -euo pipefail
cmd=${1:?install|start|stop}
SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
case "$cmd" in
install)
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm munge ;;
start)
  dir=$(realpath -m "${2:?state dir}"); mkdir -p "$dir"/{state,spool,log}
  host=$(hostname -s); cpus=$(nproc); mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  user=$(id -un)
  if ! pgrep -x munged >/dev/null; then
    $SUDO mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    [ -s /etc/munge/munge.key ] || $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    $SUDO chmod 400 /etc/munge/munge.key
    if [ "$user" = root ]; then $SUDO munged --force; else $SUDO -u munge munged; fi
  fi
  cat > "$dir/slurm.conf" <<CONF
ClusterName=g2dtest
SlurmctldHost=$host
SlurmUser=$user
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
KillWait=5
MinJobAge=30
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF=$dir/slurm.conf
  $SUDO env SLURM_CONF="$SLURM_CONF" slurmctld -f "$SLURM_CONF"
  $SUDO env SLURM_CONF="$SLURM_CONF" slurmd -f "$SLURM_CONF"
  for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then echo "SLURM_CONF=$SLURM_CONF"; exit 0; fi
    sleep 1
  done
  echo "slurm did not come up; see $dir/log" >&2; exit 1 ;;
stop)
  dir=$(realpath -m "${2:?state dir}")
  for f in slurmd slurmctld; do
    [ -f "$dir/$f.pid" ] && $SUDO kill "$(cat "$dir/$f.pid")" 2>/dev/null || true
  done ;;
esac

#!/usr/bin/env bash
# A one-node Slurm on localhost for tests/test_slurm_real.py (make test-slurm).
#   tests/slurm/setup.sh start   install slurm-wlm + munge (apt, as root) if absent, write slurm.conf,
#                                start munged, slurmctld, slurmd; wait until sinfo shows the node idle
#   tests/slurm/setup.sh stop    stop the daemons this script started (by the PIDs it recorded)
# Exit 0: up. Exit 3: cannot be done here (the message says why; the tests skip loudly). Other: error.
set -euo pipefail
STATE=${IDLAB_SLURM_STATE:-/tmp/idlab-slurm}
CONF_DIR=/etc/slurm
log() { echo "slurm-setup: $*" >&2; }
skip() { log "SKIP: $*"; exit 3; }

stop() {
  # only the daemons `start` started (listed in $STATE/started), by the PIDs they wrote
  [ -f "$STATE/started" ] || { log "nothing started by this script"; return 0; }
  for name in $(tac "$STATE/started"); do
    f="$STATE/$name.pid"
    if [ -f "$f" ]; then
      pid=$(cat "$f")
      if kill -0 "$pid" 2>/dev/null; then kill "$pid" && log "stopped $name (pid $pid)"; fi
      rm -f "$f"
    fi
  done
  rm -f "$STATE/started"
}

start() {
  [ "$(id -u)" = 0 ] || skip "not root (installing and starting Slurm needs root)"
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || skip "slurm-wlm/munge absent and no apt-get to install them"
    log "installing slurm-wlm and munge (apt-get)"
    apt-get update -qq >/dev/null || skip "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null \
      || skip "apt-get install slurm-wlm munge failed"
  fi
  mkdir -p "$STATE" "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /etc/munge
  : > "$STATE/started"
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(free -m | awk '/^Mem:/ {print $2}')
  real=$(( mem * 85 / 100 ))  # headroom for the OS and the daemons
  cat > "$CONF_DIR/slurm.conf" <<CONF
ClusterName=idlabtest
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
MinJobAge=300
SchedulerParameters=sched_interval=2
MessageTimeout=20
NodeName=$host CPUs=$cpus RealMemory=$real State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 0400 /etc/munge/munge.key; chmod 0700 /etc/munge
  if ! munge -n >/dev/null 2>&1; then
    # munged forks; its pid file names the daemon
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid 2>/dev/null \
      || /usr/sbin/munged --force --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$STATE/munged.pid"; echo munged >> "$STATE/started"
  fi
  if ! scontrol ping >/dev/null 2>&1 || ! scontrol ping | grep -q UP; then
    /usr/sbin/slurmctld -i   # forks; writes $STATE/slurmctld.pid
    echo slurmctld >> "$STATE/started"
  fi
  sleep 1
  if ! pgrep -x slurmd >/dev/null; then /usr/sbin/slurmd; echo slurmd >> "$STATE/started"; fi  # writes $STATE/slurmd.pid
  for _ in $(seq 1 60); do
    if sinfo -h -o '%t' 2>/dev/null | grep -q -E '^idle'; then log "up: $(sinfo -h -o '%N %c CPUs %m MB %t')"; return 0; fi
    scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
    sleep 1
  done
  log "the node never became idle: $(sinfo 2>&1 | tail -2)"; tail -5 /var/log/slurm/slurmctld.log >&2 || true
  exit 1
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# A single-node SLURM on this machine, for the tests and for trying `sbatch slurm/prune.sh` and
# `hpcprune submit` without a cluster.
#
#   bash slurm/local.sh start     # install (Debian, as root) and start; prints the node once it is idle
#   bash slurm/local.sh status    # which daemons run, and sinfo
#   bash slurm/local.sh stop      # stop the daemons this script starts
#
# Debian's slurm-wlm (slurmctld + slurmd) with munge authentication, and accounting through
# slurmdbd + MariaDB so that `sacct` (which submitit polls) answers. No systemd: the daemons are
# started by hand, in the order that works (munge, MariaDB, slurmdbd answering, slurmctld, slurmd).
# Idempotent: `start` installs and starts only what is missing, and restarts the SLURM daemons only
# when the configuration it writes has changed.
#
# Environment:
#   HPCPRUNE_SLURM_STATE  state, spool and logs (default /var/tmp/hpcprune-slurm; logs in log/)
#   HPCPRUNE_SLURM_CPUS   CPUs the node declares (default: the real count, at least 8, so that a
#                         few small test jobs run side by side on a 2-core machine)
#
# The node is "<short hostname>" at 127.0.0.1 in partition "debug" (default, no time limit).
set -euo pipefail

STATE=${HPCPRUNE_SLURM_STATE:-/var/tmp/hpcprune-slurm}
NODE=$(hostname -s)
SLURM_CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)
DB_PASSWORD=hpcprune-local

say() { echo "[slurm/local.sh $(date +%T)] $*"; }
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
die() {  # die MESSAGE [LOG...]: the message and the end of each log, then exit 1
  say "error: $1" >&2; shift
  local file
  for file in "$@"; do [ -f "$file" ] && { echo "--- $file" >&2; tail -n 20 "$file" >&2; }; done
  exit 1
}
wait_until() {  # wait_until SECONDS COMMAND...: poll COMMAND until it succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do [ $SECONDS -ge "$deadline" ] && return 1; sleep 0.3; done
}

# Each daemon: name, pid file. Stopped in reverse order.
daemons() {
  echo "munged /run/munge/munged.pid"
  echo "mariadbd /run/mysqld/mysqld.pid"
  echo "slurmdbd $STATE/slurmdbd.pid"
  echo "slurmctld $STATE/slurmctld.pid"
  echo "slurmd $STATE/slurmd.pid"
}

stop_daemon() {  # stop_daemon NAME PIDFILE: SIGTERM, up to 20 s, then SIGKILL
  local name=$1 pidfile=$2 pid
  running "$pidfile" || { rm -f "$pidfile"; return 0; }
  pid=$(cat "$pidfile"); say "stopping $name (pid $pid)"
  kill "$pid" 2>/dev/null || true
  wait_until 20 sh -c "! kill -0 $pid" || { say "$name did not stop: SIGKILL"; kill -9 "$pid" 2>/dev/null || true; }
  rm -f "$pidfile"
}

install_packages() {
  local missing=() package
  for package in "${PACKAGES[@]}"; do dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

node_line() {
  # slurmd -C describes the hardware; declare more CPUs (one socket of single-thread cores) when
  # asked, which config_overrides lets slurmd accept.
  local hardware cpus memory
  hardware=$(slurmd -C | head -1)
  cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hardware")
  memory=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hardware")
  cpus=${HPCPRUNE_SLURM_CPUS:-$((cpus > 8 ? cpus : 8))}
  echo "NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$memory State=UNKNOWN"
}

install_if_changed() {  # install_if_changed FILE MODE < content; returns 0 when FILE changed
  local file=$1 mode=$2 new
  new=$(mktemp)
  cat >"$new"
  if cmp -s "$new" "$file"; then rm -f "$new"; return 1; fi
  mkdir -p "$(dirname "$file")"; mv "$new" "$file"; chmod "$mode" "$file"
}

write_config() {  # returns 0 when slurm.conf or slurmdbd.conf changed
  local changed=1
  install_if_changed "$SLURM_CONF" 644 <<EOF && changed=0
# Written by hpcprune's slurm/local.sh: a single-node cluster for tests and trials.
ClusterName=local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
MailProg=/bin/true
# No cgroup plugins: processes are tracked through /proc, which works in containers too.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
# Plain srun starts plain processes (torch.distributed reads SLURM_*); MPI programs use mpirun.
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
$(node_line)
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  install_if_changed "$DBD_CONF" 600 <<EOF && changed=0
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASSWORD
StorageLoc=slurm_acct_db
EOF
  return $changed
}

start_munge() {
  [ -s /etc/munge/munge.key ] || { say "creating the munge key"; mungekey --create --keyfile=/etc/munge/munge.key; }
  chown munge:munge /etc/munge/munge.key; chmod 0600 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  running /run/munge/munged.pid || { say "starting munged"; runuser -u munge -- /usr/sbin/munged; }
  wait_until 20 sh -c 'munge -n | unmunge' || die "munge does not work" /var/log/munge/munged.log
}

start_mariadb() {
  install -d -o mysql -g mysql /run/mysqld
  if ! running /run/mysqld/mysqld.pid; then
    say "starting mariadbd (unix socket only)"
    setsid -f /usr/sbin/mariadbd --user=mysql --skip-networking >"$STATE/log/mariadb.log" 2>&1 </dev/null
  fi
  wait_until 60 mariadb -e 'select 1' || die "MariaDB did not start" "$STATE/log/mariadb.log"
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
              CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASSWORD';
              ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASSWORD';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
}

start_slurm_daemon() {  # start_slurm_daemon NAME: start it unless running, wait for its pid file
  local name=$1 pidfile=$STATE/$1.pid
  running "$pidfile" && return 0
  say "starting $name"
  "$name" || die "$name failed to start" "$STATE/log/$name.log"
  wait_until 15 running "$pidfile" || die "$name did not start" "$STATE/log/$name.log"
}

wait_for_idle_node() {
  local deadline=$((SECONDS + 90)) state=""
  while :; do
    running "$STATE/slurmctld.pid" || die "slurmctld died" "$STATE/log/slurmctld.log"
    running "$STATE/slurmd.pid" || die "slurmd died (it needs a cgroup filesystem on /sys/fs/cgroup)" "$STATE/log/slurmd.log"
    state=$(timeout 5 sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null || true)
    case "$state" in
      idle*|mixed*|allocated*) break ;;
      down*|drain*|fail*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
    esac
    [ $SECONDS -ge $deadline ] && die "node $NODE is '$state' after 90 s" "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log"
    sleep 0.3
  done
  say "node $NODE is $state"
}

do_start() {
  [ "$(id -u)" = 0 ] || die "start needs root (it installs packages and starts daemons)"
  install_packages
  mkdir -p "$STATE"/state "$STATE"/spool "$STATE"/log
  if write_config; then
    say "configuration written: restarting the SLURM daemons that run with an older one"
    stop_daemon slurmd "$STATE/slurmd.pid"; stop_daemon slurmctld "$STATE/slurmctld.pid"
    stop_daemon slurmdbd "$STATE/slurmdbd.pid"
  fi
  start_munge
  start_mariadb
  start_slurm_daemon slurmdbd
  # slurmctld exits ("no TRES") when it starts before slurmdbd answers.
  wait_until 60 timeout 5 sacctmgr -n -P show cluster || die "slurmdbd does not answer" "$STATE/log/slurmdbd.log"
  start_slurm_daemon slurmctld
  start_slurm_daemon slurmd
  wait_for_idle_node
  sinfo
}

do_stop() {
  local name pidfile
  while read -r name pidfile; do stop_daemon "$name" "$pidfile"; done < <(daemons | tac)
}

do_status() {
  local name pidfile
  while read -r name pidfile; do
    if running "$pidfile"; then echo "$name running (pid $(cat "$pidfile"))"; else echo "$name not running"; fi
  done < <(daemons)
  timeout 5 sinfo 2>/dev/null || true
}

case "${1:-}" in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  *) echo "usage: bash slurm/local.sh start|stop|status" >&2; exit 2 ;;
esac

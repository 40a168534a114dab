#!/usr/bin/env bash
# A local Slurm cluster for the tests, on one Debian machine, as root:
#
#   tests/slurm/cluster.sh up      install (if needed) and start it; prints SLURM_CONF
#   tests/slurm/cluster.sh down    stop its daemons and remove its state
#   tests/slurm/cluster.sh status  sinfo of it
#
# One controller and three slurmd "nodes" of this host, in two partitions:
#   one   node n1 with 4 CPUs                 (a one-node cluster)
#   two   nodes n2a and n2b with 2 CPUs each  (a two-node cluster on one host)
# More CPUs are declared than the machine may have, so that 4 tasks can run on 2 cores.
# MpiDefault is Slurm's own default, none: a plain `srun -n 4` of an MPI program then
# starts 4 one-rank worlds, which the engine must refuse.
#
# Variables: STAR_SLURM_DIR (default /tmp/star_engine-slurm) holds the configuration,
# state, logs and the nodes' spools; STAR_SLURM_PORT (default 17817) is the controller's
# port, the nodes take the next three.
set -euo pipefail

DIR=${STAR_SLURM_DIR:-/tmp/star_engine-slurm}
PORT=${STAR_SLURM_PORT:-17817}
CONF=$DIR/slurm.conf
NODES=(n1 n2a n2b)
# Debian's pmix plugin loads the unversioned libpmix.so, which only libpmix-dev ships.
PACKAGES=(slurmctld slurmd slurm-client munge libpmix-dev)

say() { echo "cluster.sh: $*" >&2; }

install_packages() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_config() {
    local host
    host=$(hostname -s)
    mkdir -p "$DIR"/{state,log,spool,tmp}
    cat > "$CONF" <<EOF
ClusterName=star_engine_test
SlurmctldHost=$host
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits this long (plus one second) before it starts again; 120 by default.
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdPidFile=$DIR/slurmd.%n.pid
SlurmdLogFile=$DIR/log/slurmd.%n.log
SlurmdSpoolDir=$DIR/spool/%n
# Each slurmd of this host has its own PMIx directory under it.
TmpFS=$DIR/tmp/%n
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
KillWait=10
MinJobAge=600
NodeName=n1 NodeHostname=$host Port=$((PORT + 1)) CPUs=4 State=UNKNOWN
NodeName=n2a NodeHostname=$host Port=$((PORT + 2)) CPUs=2 State=UNKNOWN
NodeName=n2b NodeHostname=$host Port=$((PORT + 3)) CPUs=2 State=UNKNOWN
PartitionName=one Nodes=n1 Default=YES MaxTime=INFINITE State=UP
PartitionName=two Nodes=n2a,n2b MaxTime=INFINITE State=UP
EOF
    for n in "${NODES[@]}"; do mkdir -p "$DIR/spool/$n" "$DIR/tmp/$n"; done
}

start_munge() {
    if pgrep -x munged >/dev/null; then return; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
    chmod 0700 /etc/munge /var/log/munge /var/lib/munge
    chmod 0600 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged
}

up() {
    [ "$(id -u)" -eq 0 ] || { say "must run as root (it starts munged, slurmctld and slurmd)"; exit 1; }
    install_packages
    down quiet
    write_config
    start_munge
    export SLURM_CONF=$CONF
    slurmctld -f "$CONF"
    for n in "${NODES[@]}"; do slurmd -f "$CONF" -N "$n"; done
    for _ in $(seq 60); do
        if [ "$(sinfo -h -N -o '%t' 2>/dev/null | grep -c '^idle$')" -eq ${#NODES[@]} ]; then
            say "up: partitions one (n1, 4 CPUs) and two (n2a + n2b, 2 CPUs each)"
            echo "export SLURM_CONF=$CONF"
            return
        fi
        sleep 0.5
    done
    say "the nodes did not become idle in 30 s:"
    sinfo -N -l >&2 || true
    tail -n 20 "$DIR"/log/*.log >&2 || true
    exit 1
}

down() {
    local quiet=${1:-}
    for pidfile in "$DIR"/slurmd.*.pid "$DIR"/slurmctld.pid; do
        [ -f "$pidfile" ] || continue
        kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    for _ in $(seq 40); do
        pgrep -f "slurm(ctld|d) -f $CONF" >/dev/null || break
        sleep 0.25
    done
    pkill -9 -f "slurm(ctld|d) -f $CONF" 2>/dev/null || true
    rm -rf "$DIR"
    [ -n "$quiet" ] || say "down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) SLURM_CONF=$CONF sinfo -N -l ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac

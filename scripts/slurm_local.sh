#!/usr/bin/env bash
# A real one-node SLURM cluster on loopback, for the SLURM tests and for trying the sbatch scripts.
#
#   scripts/slurm_local.sh up       install (apt) and start munged, slurmctld, slurmd; idempotent
#   scripts/slurm_local.sh status   exit 0 when the cluster answers and its node is usable
#   scripts/slurm_local.sh down     cancel all jobs, stop the daemons this script started
#
# Needs root and apt (Debian's slurmctld, slurmd, slurm-client, munge). No systemd: the daemons are
# started directly; their state, spool, logs and PID files live in $MMVAE_SLURM_STATE
# (/tmp/mmvae-slurm). The config is /etc/slurm/slurm.conf, where the SLURM commands look; one
# that this script did not write is never replaced. Exits non-zero with the reason on stderr.
set -euo pipefail

STATE=${MMVAE_SLURM_STATE:-/tmp/mmvae-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by mmvae scripts/slurm_local.sh"
PARTITION=debug

die() { echo "slurm_local: $*" >&2; exit 1; }
log() { echo "slurm_local: $*" >&2; }

# Poll `$@` until it succeeds, at most $1 seconds.
wait_for() {
    local seconds=$1; shift
    for _ in $(seq $((seconds * 5))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    return 1
}

node_ready() {  # the node takes jobs: idle, mixed or allocated (not down/drained/unknown)
    [[ $(sinfo -h -N -o %t 2>/dev/null | head -n1) =~ ^(idle|mix|alloc) ]]
}

is_up() { scontrol ping 2>/dev/null | grep -q UP && node_ready; }

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null && return 0
    command -v apt-get >/dev/null || die "no slurmctld/slurmd/munge and no apt-get to install them"
    local pkgs=(slurmctld slurmd slurm-client munge)
    log "installing ${pkgs[*]} (apt)"
    export DEBIAN_FRONTEND=noninteractive
    local install=(apt-get install -y -q --no-install-recommends "${pkgs[@]}")
    "${install[@]}" >"$STATE/apt.log" 2>&1 \
        || { apt-get update -q >>"$STATE/apt.log" 2>&1 && "${install[@]}" >>"$STATE/apt.log" 2>&1; } \
        || die "apt-get install ${pkgs[*]} failed (see $STATE/apt.log)"
}

start_munge() {
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    [[ -s /etc/munge/munge.key ]] || { mungekey --create --force >/dev/null 2>&1 \
        || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    install -d -o munge -g munge -m 755 /run/munge /var/lib/munge /var/log/munge
    # munged refuses to run as root ("Logfile is insecure"): run it as its own user.
    runuser -u munge -- /usr/sbin/munged --pid-file="/run/munge/munged.pid" \
        || die "munged did not start (see /var/log/munge/munged.log)"
    touch "$STATE/started-munged"
    wait_for 10 bash -c 'munge -n | unmunge' || die "munge does not work (munge -n | unmunge)"
}

write_conf() {
    if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; not touching a real cluster's config"
    fi
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)  # MB, leave 20%
    mkdir -p /etc/slurm "$STATE"/{ctld,spool,log}
    cat >"$CONF.tmp" <<EOF
$MARK
ClusterName=mmvae-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
EnforcePartLimits=ALL
ReturnToService=2
JobRequeue=1
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=300
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

up() {
    if is_up; then echo "slurm_local: up"; return 0; fi
    [[ $(id -u) -eq 0 ]] || die "needs root (installs packages, starts slurmctld/slurmd as root)"
    mkdir -p "$STATE"
    install_packages
    write_conf
    start_munge
    if ! alive "$STATE/slurmctld.pid"; then
        slurmctld || die "slurmctld did not start (see $STATE/log/slurmctld.log)"
        touch "$STATE/started-slurmctld"
    fi
    wait_for 30 bash -c 'scontrol ping | grep -q UP' \
        || die "slurmctld does not answer (see $STATE/log/slurmctld.log)"
    if ! alive "$STATE/slurmd.pid"; then
        slurmd || die "slurmd did not start (see $STATE/log/slurmd.log)"
        touch "$STATE/started-slurmd"
    fi
    if ! wait_for 30 node_ready; then
        scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true
        wait_for 10 node_ready || die "node not idle: $(sinfo -h -N -o '%t %E' | head -n1)" \
            "(see $STATE/log/slurmd.log)"
    fi
    echo "slurm_local: up"
}

stop_pidfile() {  # TERM the daemon named by a PID file; wait for it to exit
    local pidfile=$1 pid
    alive "$pidfile" || return 0
    pid=$(cat "$pidfile")
    kill -TERM "$pid"
    wait_for 15 bash -c "! kill -0 $pid" || kill -KILL "$pid" 2>/dev/null || true
}

down() {
    if scontrol ping 2>/dev/null | grep -q UP; then
        scancel --full --quiet $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true
        wait_for 20 bash -c '[[ -z $(squeue -h -o %i) ]]' \
            || log "jobs still listed; stopping anyway"
    fi
    stop_pidfile "$STATE/slurmd.pid"
    stop_pidfile "$STATE/slurmctld.pid"
    if [[ -f $STATE/started-munged ]]; then
        stop_pidfile /run/munge/munged.pid
    fi
    rm -f "$STATE"/started-*
    echo "slurm_local: down"
}

status() {
    if is_up; then
        sinfo -N -o "%N %t %c %m"
        squeue
        return 0
    fi
    echo "slurm_local: not up" >&2
    return 1
}

case ${1:-} in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Stand up (or tear down) a real single-node SLURM cluster on this Debian/Ubuntu machine,
# for trying `hydra/launcher=submitit_slurm` and for the SLURM integration test in CI.
#
#   bash scripts/slurm_local.sh up      # install slurm-wlm + munge if needed, start munged,
#                                       # slurmctld and slurmd, wait for the node to be idle
#   bash scripts/slurm_local.sh status  # daemons + sinfo; exit 0 only when the node is usable
#   bash scripts/slurm_local.sh down    # stop the daemons, remove the config and state
#
# No systemd and no cgroups are needed (fits a fresh CI container): the daemons are started
# directly, processes are tracked with proctrack/linuxproc, there is no accounting.
# One node = this machine (CPUs and memory from `slurmd -C`), one partition `debug` (default).
# Needs root (re-executes itself through passwordless sudo when available).
#
# Environment:
#   SLURM_LOCAL_STATE    state, spool, logs and pid files   (default /var/spool/slurm-local)
#   SLURM_LOCAL_TIMEOUT  seconds to wait for the node        (default 90)
#   SLURM_CONF           slurm.conf to write                 (default /etc/slurm/slurm.conf,
#                        where sinfo/sbatch look by default; an existing file that this script
#                        did not write is never overwritten)
set -euo pipefail

STATE=${SLURM_LOCAL_STATE:-/var/spool/slurm-local}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-90}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
MARK="# written by lsn_exp scripts/slurm_local.sh"
export SLURM_CONF=$CONF

log() { echo "slurm_local: $*"; }
die() { echo "slurm_local: error: $*" >&2; exit 1; }

tail_logs() {  # show what the daemons said, on stderr
    local f
    for f in "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" /var/log/munge/munged.log; do
        [ -s "$f" ] || continue
        echo "---- last lines of $f" >&2
        tail -n 15 "$f" >&2
    done
}

pid_alive() {  # pid_alive PIDFILE
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

need_root() {  # need_root ORIGINAL_ARGS...
    [ "$(id -u)" = 0 ] && return 0
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        exec sudo -E bash "$0" "$@"
    fi
    die "must run as root (or with passwordless sudo) to install packages and start daemons"
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sinfo >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    command -v apt-get >/dev/null || die "slurmctld/slurmd/munged are missing and apt-get is not available; install slurm-wlm and munge"
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q slurm-wlm munge >"$STATE/log/apt.log" 2>&1; then
        apt-get update -q >>"$STATE/log/apt.log" 2>&1 || true
        if ! apt-get install -y -q slurm-wlm munge >>"$STATE/log/apt.log" 2>&1; then
            tail -n 15 "$STATE/log/apt.log" >&2
            die "apt-get install slurm-wlm munge failed (log: $STATE/log/apt.log)"
        fi
    fi
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_ok; then return 0; fi
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key --force
        else
            dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
        fi
    fi
    local user=root
    id munge >/dev/null 2>&1 && user=munge
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown "$user:" /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
    chmod 700 /etc/munge /var/log/munge
    chmod 400 /etc/munge/munge.key
    chmod 755 /run/munge
    log "starting munged"
    local out=0
    if [ "$user" = munge ]; then
        if command -v runuser >/dev/null; then
            runuser -u munge -- munged 2>"$STATE/log/munged.err" || out=$?
        else
            su -s /bin/sh munge -c "munged" 2>"$STATE/log/munged.err" || out=$?
        fi
    else
        munged --force 2>"$STATE/log/munged.err" || out=$?
    fi
    local i
    for i in $(seq 1 20); do
        if munge_ok; then touch "$STATE/munged.ours"; return 0; fi
        sleep 0.5
    done
    cat "$STATE/log/munged.err" >&2 || true
    die "munged did not start (exit $out); see /var/log/munge/munged.log"
}

write_conf() {
    local host node_line
    host=$(hostname -s)
    # `slurmd -C` prints this machine's real layout: NodeName=... CPUs=.. ... RealMemory=..
    node_line=$(slurmd -C | head -n 1) || die "slurmd -C failed"
    node_line=$(echo "$node_line" | sed -E "s/^NodeName=[^ ]+/NodeName=$host/")
    if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to overwrite it (set SLURM_CONF to another path)"
    fi
    mkdir -p "$(dirname "$CONF")"
    local tmp="$CONF.tmp.$$"
    cat >"$tmp" <<EOF
$MARK: a single-node cluster, no accounting, no cgroups.
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldTimeout=60
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=300
KillWait=10
Waittime=0
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    if [ -e "$CONF" ] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 1  # unchanged
    fi
    mv "$tmp" "$CONF"
    return 0  # changed
}

node_state() { sinfo -h -N -n "$(hostname -s)" -o '%t' 2>/dev/null | head -n 1; }

stop_daemons() {
    local name pidfile pid i
    for name in slurmd slurmctld; do
        pidfile="$STATE/$name.pid"
        pid_alive "$pidfile" || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for i in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
        log "stopped $name (pid $pid)"
    done
}

cmd_up() {
    if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to overwrite it (set SLURM_CONF to another path)"
    fi
    mkdir -p "$STATE/log" "$STATE/slurmctld" "$STATE/slurmd" 2>/dev/null \
        || die "cannot create the state directory $STATE (set SLURM_LOCAL_STATE)"
    install_packages
    start_munge
    local changed=0
    write_conf && changed=1
    if [ "$changed" = 1 ]; then
        stop_daemons  # config changed (or first start): restart whatever is running
    fi
    local host
    host=$(hostname -s)
    if ! pid_alive "$STATE/slurmctld.pid"; then
        log "starting slurmctld"
        slurmctld -i || { tail_logs; die "slurmctld failed to start"; }
    fi
    if ! pid_alive "$STATE/slurmd.pid"; then
        log "starting slurmd"
        slurmd -N "$host" || { tail_logs; die "slurmd failed to start"; }
    fi
    local waited=0 state=""
    while [ "$waited" -lt "$TIMEOUT" ]; do
        state=$(node_state || true)
        case "$state" in
            idle|mix|mixed|alloc|allocated) break ;;
            down*|drain*|drng*|fail*)
                # e.g. left DOWN by an earlier run: ReturnToService=2 usually clears it
                scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        pid_alive "$STATE/slurmctld.pid" || { tail_logs; die "slurmctld exited"; }
        pid_alive "$STATE/slurmd.pid" || { tail_logs; die "slurmd exited"; }
        sleep 1
        waited=$((waited + 1))
    done
    case "$state" in
        idle|mix|mixed|alloc|allocated) ;;
        *)
            sinfo -R >&2 2>/dev/null || true
            tail_logs
            die "node $host not idle after ${TIMEOUT}s (state: '${state:-no answer from slurmctld}')" ;;
    esac
    cmd_status_line
}

cmd_status_line() {
    local host
    host=$(hostname -s)
    log "up: cluster local, node $host ($(sinfo -h -N -n "$host" -o '%c CPUs, %m MB' | head -n 1)), state $(node_state), partition $(sinfo -h -o '%P' | head -n 1); config $CONF, state $STATE"
}

cmd_status() {
    local ok=0 name
    for name in slurmctld slurmd; do
        if pid_alive "$STATE/$name.pid"; then
            log "$name running (pid $(cat "$STATE/$name.pid"))"
        else
            log "$name not running"; ok=1
        fi
    done
    if munge_ok; then log "munged running"; else log "munged not running"; ok=1; fi
    if [ "$ok" = 0 ] && command -v sinfo >/dev/null && sinfo >/dev/null 2>&1; then
        sinfo
        case "$(node_state)" in
            idle|mix|mixed|alloc|allocated) cmd_status_line; return 0 ;;
        esac
    fi
    log "not usable"
    return 1
}

cmd_down() {
    if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF was not written by this script; not touching it"
    fi
    if command -v scancel >/dev/null && pid_alive "$STATE/slurmctld.pid"; then
        scancel --full --quiet --partition=debug 2>/dev/null || true
    fi
    stop_daemons
    # stop munged only when `up` started it (it may serve other software)
    if [ -e "$STATE/munged.ours" ] && [ -s /run/munge/munged.pid ]; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null && log "stopped munged" || true
    fi
    rm -f "$CONF"
    rm -rf "$STATE"
    log "down: daemons stopped, $CONF and $STATE removed"
}

case "${1:-}" in
    up) need_root "$@"; cmd_up ;;
    down) need_root "$@"; cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac

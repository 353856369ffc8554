#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for tests/scenarios/test_slurm.py.
#
#   bash scripts/slurm-cluster.sh up       install slurm-wlm and munge if missing, start munged,
#                                          slurmctld and slurmd as root, wait for the node to be idle
#   bash scripts/slurm-cluster.sh status   one line: up or down (exit status 0 when up)
#   bash scripts/slurm-cluster.sh down     cancel every job, stop the daemons, remove the state
#
# Run it as root (it installs packages and starts daemons).  Everything it writes lives in
# $SIMVUE_SLURM_DIR (default /tmp/simvue-slurm), except a link /etc/slurm/slurm.conf to the
# configuration there, so that sinfo/srun/sbatch find it without SLURM_CONF (it never
# replaces a slurm.conf of anyone else's), and a line in /etc/hosts if this host's name does
# not resolve; `down` removes both.  Made for CI machines and containers: no systemd, no
# cgroups (proctrack/linuxproc, task/none), no accounting, KillWait=3, OverTimeLimit=0.
set -euo pipefail

STATE=${SIMVUE_SLURM_DIR:-/tmp/simvue-slurm}
CONF=$STATE/etc/slurm.conf
SYSTEM_CONF=/etc/slurm/slurm.conf
MUNGE_SOCKET=$STATE/munge/munge.socket.2
MARKER="# simvue-slurm-cluster: written by scripts/slurm-cluster.sh"
HOSTS_MARKER="# simvue-slurm-cluster"
WAIT_S=${SIMVUE_SLURM_WAIT_S:-60}
started_at=$(date +%s.%N)

say() { printf 'slurm-cluster: %s\n' "$*"; }
die() { printf 'slurm-cluster: %s\n' "$*" >&2; exit 1; }
elapsed() { awk -v a="$started_at" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

alive() {  # alive PIDFILE NAME: the file holds the pid of a running NAME (not a reused pid)
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1")
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

node_state() {  # the node's state as sinfo prints it (idle, mix, alloc, down*, ...), or nothing
    timeout 10 sinfo -h -N -o '%t' 2>/dev/null | head -n 1 || true
}

is_up() {
    alive "$STATE/munged.pid" munged && alive "$STATE/slurmctld.pid" slurmctld && alive "$STATE/slurmd.pid" slurmd \
        && [ -L "$SYSTEM_CONF" ] && [ "$(readlink "$SYSTEM_CONF")" = "$CONF" ] \
        && case "$(node_state)" in idle|mix|mixed|alloc|allocated|comp|completing) true ;; *) false ;; esac
}

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    for tool in slurmctld slurmd srun; do
        command -v "$tool" >/dev/null || { missing+=(slurm-wlm); break; }
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "slurm-wlm and munge are not installed, and installing them needs root"
    say "installing ${missing[*]} (apt-get)"
    # Package scripts must not start the distribution's own munge or slurm services.
    local own_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    local rc=0 log="$STATE/log/apt-get.log"
    mkdir -p "$STATE/log"
    if ! apt-cache show slurmd >/dev/null 2>&1; then  # no package lists yet (a fresh machine)
        apt-get update -qq >>"$log" 2>&1 || rc=$?
    fi
    if [ "$rc" -eq 0 ]; then
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$log" 2>&1 || {
            apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"
        } >>"$log" 2>&1 || rc=$?
    fi
    if [ -n "$own_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
    [ "$rc" -eq 0 ] || die "apt-get could not install ${missing[*]} (exit status $rc): $(tail -n 5 "$log")"
}

ensure_resolvable() {
    # srun and slurmd find each other by this host's name: give it an address if it has none.
    local host
    host=$(hostname -s)
    if ! getent hosts "$host" >/dev/null; then
        echo "127.0.0.1 $host $HOSTS_MARKER" >>/etc/hosts
    fi
}

write_config() {
    local host cpus
    host=$(hostname -s)
    cpus=$(nproc)
    mkdir -p "$STATE"/{etc,log,ctld,slurmd,munge}
    chmod 755 "$STATE" "$STATE/etc" "$STATE/munge"
    cat >"$CONF.tmp" <<EOF
$MARKER
# A one-node cluster for tests: this host, $cpus CPUs, jobs as any user including root.
ClusterName=simvue
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in a container: plain process tracking, no task binding, no accounting.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
# Quick signals and limits for tests: SIGKILL 3 s after SIGTERM, no grace past a time limit.
KillWait=3
OverTimeLimit=0
InactiveLimit=0
MinJobAge=300
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
# The node is what this file says (CPUs = nproc), whatever slurmd detects: never drained for it.
SlurmdParameters=config_overrides
MessageTimeout=10
SchedulerType=sched/backfill
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    mv "$CONF.tmp" "$CONF"
    # sinfo/srun/sbatch read /etc/slurm/slurm.conf: point it at ours, never over someone else's.
    if [ -e "$SYSTEM_CONF" ] || [ -L "$SYSTEM_CONF" ]; then
        if [ "$(readlink "$SYSTEM_CONF" || true)" != "$CONF" ] && ! head -n 1 "$SYSTEM_CONF" 2>/dev/null | grep -qF "$MARKER"; then
            die "$SYSTEM_CONF exists and is not ours: this machine has a Slurm configuration of its own; not touching it"
        fi
    fi
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    ln -sfn "$CONF" "$SYSTEM_CONF"
}

start_munged() {
    if alive "$STATE/munged.pid" munged && [ -S "$MUNGE_SOCKET" ]; then
        return 0
    fi
    if [ ! -s "$STATE/munge/munge.key" ]; then
        (umask 077 && dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none)
    fi
    chmod 600 "$STATE/munge/munge.key"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    munged --force --key-file="$STATE/munge/munge.key" --socket="$MUNGE_SOCKET" \
        --pid-file="$STATE/munged.pid" --log-file="$STATE/log/munged.log" \
        --seed-file="$STATE/munge/munged.seed" </dev/null >>"$STATE/log/munged.out" 2>&1 \
        || die "munged did not start: $(tail -n 3 "$STATE/log/munged.log" "$STATE/log/munged.out" 2>/dev/null)"
}

start_slurm() {
    # Each daemon forks into the background; stdio goes to the state directory, so a caller
    # capturing this script's output is not held open.
    if ! alive "$STATE/slurmctld.pid" slurmctld; then
        slurmctld -f "$CONF" </dev/null >>"$STATE/log/slurmctld.out" 2>&1 \
            || die "slurmctld did not start: $(tail -n 5 "$STATE/log/slurmctld.log" 2>/dev/null)"
    fi
    if ! alive "$STATE/slurmd.pid" slurmd; then
        slurmd -f "$CONF" </dev/null >>"$STATE/log/slurmd.out" 2>&1 \
            || die "slurmd did not start: $(tail -n 5 "$STATE/log/slurmd.log" 2>/dev/null)"
    fi
}

wait_idle() {
    local deadline=$(( $(date +%s) + WAIT_S )) settled=$(( $(date +%s) + 5 )) state=""
    while :; do
        state=$(node_state)
        case "$state" in
            idle) return 0 ;;
            down*|drain*|fail*)
                scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true ;;
        esac
        if [ "$(date +%s)" -ge "$settled" ] && { ! alive "$STATE/slurmctld.pid" slurmctld || ! alive "$STATE/slurmd.pid" slurmd; }; then
            state="a daemon exited"
            deadline=0
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "--- slurmctld.log" >&2; tail -n 15 "$STATE/log/slurmctld.log" >&2 2>/dev/null || true
            echo "--- slurmd.log" >&2; tail -n 15 "$STATE/log/slurmd.log" >&2 2>/dev/null || true
            die "the node did not become idle within ${WAIT_S} s (${state:-sinfo says nothing})"
        fi
        sleep 0.2
    done
}

summary() {
    echo "slurm-cluster: up: node $(hostname -s) $(node_state), $(nproc) CPUs, partition debug," \
         "config $SYSTEM_CONF -> $CONF, logs $STATE/log ($1)"
}

stop_daemons() {  # stop_daemons NAME... : SIGTERM to each at once, SIGKILL to any left after 10 s
    local name pid p pids=()
    for name in "$@"; do
        if alive "$STATE/$name.pid" "$name"; then
            pid=$(cat "$STATE/$name.pid")
            kill "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    for _ in $(seq 100); do
        pid=""
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && pid=$p; done
        [ -z "$pid" ] && break
        sleep 0.1
    done
    for p in "${pids[@]}"; do
        if kill -0 "$p" 2>/dev/null; then
            say "pid $p ignored SIGTERM for 10 s: SIGKILL"
            kill -9 "$p" 2>/dev/null || true
        fi
    done
    for name in "$@"; do rm -f "$STATE/$name.pid"; done
}

case "${1:-}" in
    up)
        if is_up; then
            summary "already up, $(elapsed) s"
            exit 0
        fi
        [ "$(id -u)" -eq 0 ] || die "starting the cluster needs root (slurmd runs as root)"
        install_packages
        ensure_resolvable
        write_config
        start_munged
        start_slurm
        wait_idle
        summary "started in $(elapsed) s"
        ;;
    status)
        if is_up; then
            summary "status"
        else
            echo "slurm-cluster: down (node: $(node_state | grep . || echo 'no answer'))"
            exit 1
        fi
        ;;
    down)
        if alive "$STATE/slurmctld.pid" slurmctld; then
            # Cancel every job (SIGTERM, SIGKILL after KillWait) and wait for them to end.
            jobs=$(timeout 10 squeue -h -o '%i' 2>/dev/null || true)
            if [ -n "$jobs" ]; then
                # shellcheck disable=SC2086
                timeout 10 scancel $jobs 2>/dev/null || true
                for _ in $(seq 150); do
                    [ -z "$(timeout 10 squeue -h -o '%i' 2>/dev/null || true)" ] && break
                    sleep 0.1
                done
            fi
        fi
        stop_daemons slurmd slurmctld munged
        if [ -L "$SYSTEM_CONF" ] && [ "$(readlink "$SYSTEM_CONF")" = "$CONF" ]; then
            rm -f "$SYSTEM_CONF"
        fi
        if grep -qF "$HOSTS_MARKER" /etc/hosts 2>/dev/null; then
            grep -vF "$HOSTS_MARKER" /etc/hosts >/etc/hosts.simvue-slurm && cat /etc/hosts.simvue-slurm >/etc/hosts
            rm -f /etc/hosts.simvue-slurm
        fi
        if [ "$STATE" = /tmp/simvue-slurm ] || head -n 1 "$CONF" 2>/dev/null | grep -qF "$MARKER"; then
            rm -rf "$STATE"
        fi
        echo "slurm-cluster: down ($(elapsed) s)"
        ;;
    *)
        echo "usage: $0 up|down|status" >&2
        exit 2
        ;;
esac

#!/usr/bin/env bash
# slurm/local_cluster.sh -- a real, two-node Slurm cluster on this one machine.
#
# Starts munged, slurmctld and two emulated compute nodes (`slurmd -N n1`, `slurmd -N n2`) on the local host, so
# that sbatch/srun/squeue/scontrol/scancel/sinfo work exactly as on a real cluster.  The test suite uses it
# (tests/slurm/conftest.py starts and stops it around the session), and it is meant just as much for users who
# want to dry-run their job scripts on a laptop or workstation before queueing them on the real cluster:
#
#   sudo slurm/local_cluster.sh start          # installs Slurm with apt-get if missing, then starts the cluster
#   sbatch --nodes 2 --ntasks-per-node 1 my_job.sbatch
#   sudo slurm/local_cluster.sh status         # sinfo + squeue
#   sudo slurm/local_cluster.sh stop           # stops what `start` started, undoes its /etc edits
#
# Usage: local_cluster.sh start|stop|status|restart [STATE_DIR]      (default STATE_DIR: /tmp/launcher-slurm)
#
# What it touches outside STATE_DIR (all undone by `stop`):
#   * /etc/slurm/slurm.conf -- the generated config is copied there, because that is where every Slurm command
#     (and every job step, in any process) looks by default; an existing slurm.conf that this script did not write
#     is moved to /etc/slurm/slurm.conf.local-cluster-backup and put back by `stop`.  (STATE_DIR/slurm.conf is the
#     same file; exporting SLURM_CONF=STATE_DIR/slurm.conf works too.)
#   * /etc/hosts -- one line `127.0.0.1 n1 n2  # launcher-local-slurm`, so that the emulated node names resolve,
#     as real node names do (jobs use the first node name as their rendezvous address).
#   * munged -- started (as the munge user) only if no munged answers yet, and then stopped again by `stop`;
#     /etc/munge/munge.key is created if missing and left in place.
#
# The cluster: partition `local` (default) with nodes n1 and n2, both on 127.0.0.1 (slurmctld port 16817, slurmd
# ports 17001/17002, not the standard ones, so a real Slurm installation's daemons are not disturbed).  Each node
# offers SLURM_LOCAL_CPUS CPUs (default 2) -- the two nodes share the host's cores, so they are oversubscribed,
# which is fine for an emulation.  Jobs run as the submitting user; sbatch's default --export=ALL applies.  There is
# no slurmdbd, so `sacct` does not work: read job state with `scontrol show job` (finished jobs stay visible for
# MinJobAge=3600 s); STATE_DIR/log/jobcomp.txt records every finished job.  A requeued job may start again after
# cred_expire=10 s (Slurm's default is 120 s).  Daemon logs: STATE_DIR/log/.
#
# Needs root (daemons, /etc edits, apt-get).  Timeouts: SLURM_LOCAL_START_TIMEOUT (default 60 s) for the nodes to
# come up idle.
set -euo pipefail

MARK="launcher-local-slurm"
ETC_CONF=/etc/slurm/slurm.conf
BACKUP_CONF=/etc/slurm/slurm.conf.local-cluster-backup
NODES=(n1 n2)
CTLD_PORT=16817
NODE_PORT0=17001
CPUS=${SLURM_LOCAL_CPUS:-2}
START_TIMEOUT=${SLURM_LOCAL_START_TIMEOUT:-60}

cmd=${1:-}
STATE=${2:-/tmp/launcher-slurm}
if [[ -z $cmd || $cmd == -h || $cmd == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
fi
mkdir -p "$STATE" 2>/dev/null || true
STATE=$(cd "$STATE" && pwd)   # absolute: it goes into slurm.conf
CONF="$STATE/slurm.conf"
RUN="$STATE/run"
LOG="$STATE/log"
export SLURM_CONF=$ETC_CONF   # whatever the caller's environment says, talk to this cluster

say() { echo "local_cluster: $*"; }
die() { echo "local_cluster: error: $*" >&2; exit 1; }

need_root() { [[ $(id -u) == 0 ]] || die "must run as root (try: sudo $0 $cmd $STATE)"; }

# --- pid files ------------------------------------------------------------------------------------------------------
# Only processes recorded in STATE_DIR/run are ever signalled, and only if their command name still matches.
pid_of() {   # pid_of FILE COMM -> prints the pid if FILE names a live process called COMM
    local file=$1 comm=$2 pid
    [[ -f $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
    echo "$pid"
}

stop_pids() {   # stop_pids COMM:FILE...: SIGTERM them all, wait up to 10 s for all to exit, then SIGKILL the rest
    local spec pid i pids=()
    for spec in "$@"; do
        if pid=$(pid_of "${spec#*:}" "${spec%%:*}"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    for ((i = 0; i < 100 && ${#pids[@]}; i++)); do
        for pid in "${!pids[@]}"; do kill -0 "${pids[$pid]}" 2>/dev/null || unset "pids[$pid]"; done
        ((${#pids[@]})) && sleep 0.1
    done
    for pid in "${pids[@]}"; do
        say "$(cat "/proc/$pid/comm" 2>/dev/null) ($pid) ignored SIGTERM for 10 s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    done
    for spec in "$@"; do rm -f "${spec#*:}"; done
}

slurm_running() {   # all of slurmctld + slurmd x2 alive
    pid_of "$RUN/slurmctld.pid" slurmctld >/dev/null || return 1
    local n
    for n in "${NODES[@]}"; do pid_of "$RUN/slurmd-$n.pid" slurmd >/dev/null || return 1; done
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

# --- install --------------------------------------------------------------------------------------------------------
install_slurm() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && return 0
    command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get: install slurmctld, slurmd, slurm-client and munge by hand"
    say "installing slurmctld slurmd slurm-client munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >"$STATE/apt.log" 2>&1 \
        || { tail -n 30 "$STATE/apt.log" >&2; die "apt-get install failed (full log: $STATE/apt.log)"; }
}

# --- config ---------------------------------------------------------------------------------------------------------
render_conf() {
    local host mem_mb i
    host=$(hostname -s)
    # Each slurmd reports the whole host's memory; split it between the emulated nodes.
    mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 / ${#NODES[@]} ))
    cat <<EOF
# $MARK: generated by slurm/local_cluster.sh -- do not edit, rerun \`local_cluster.sh start\` instead.
# State and logs: $STATE
ClusterName=localcluster
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again after cred_expire seconds (default 120).
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmctldDebug=info
SlurmdSpoolDir=$STATE/spool/%n
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmdDebug=info
# Configured CPUs/memory win over what each slurmd detects (both emulated nodes share one host).
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Tiny cluster: schedule often, so that requeued jobs restart as soon as they may.
SchedulerParameters=bf_interval=1,sched_interval=2
MpiDefault=none
ReturnToService=2
# Finished jobs stay visible to \`scontrol show job\` for an hour (there is no slurmdbd, so no sacct).
MinJobAge=3600
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.txt
KillWait=5
MailProg=/bin/true
InactiveLimit=0
EOF
    for i in "${!NODES[@]}"; do
        echo "NodeName=${NODES[$i]} NodeHostname=$host NodeAddr=127.0.0.1 Port=$((NODE_PORT0 + i)) CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN"
    done
    echo "PartitionName=local Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
}

install_conf() {
    mkdir -p /etc/slurm
    if [[ -f $ETC_CONF ]] && ! grep -q "$MARK" "$ETC_CONF"; then
        [[ -e $BACKUP_CONF ]] || { mv "$ETC_CONF" "$BACKUP_CONF"; say "moved the existing $ETC_CONF to $BACKUP_CONF"; }
    fi
    cp "$CONF" "$ETC_CONF.tmp.$$"
    mv "$ETC_CONF.tmp.$$" "$ETC_CONF"
}

uninstall_conf() {
    if [[ -f $ETC_CONF ]] && grep -q "$MARK" "$ETC_CONF"; then rm -f "$ETC_CONF"; fi
    if [[ -e $BACKUP_CONF && ! -e $ETC_CONF ]]; then mv "$BACKUP_CONF" "$ETC_CONF"; say "restored $ETC_CONF"; fi
}

hosts_add() {
    grep -q "# $MARK\$" /etc/hosts && return 0
    # Append in place (no rename: /etc/hosts is often a bind mount in containers).
    [[ ! -s /etc/hosts || $(tail -c 1 /etc/hosts | od -An -c) == *'\n'* ]] || echo >>/etc/hosts
    echo "127.0.0.1 ${NODES[*]}  # $MARK" >>/etc/hosts
}

hosts_remove() {
    grep -q "# $MARK\$" /etc/hosts || return 0
    local kept
    kept=$(grep -v "# $MARK\$" /etc/hosts || true)
    printf '%s\n' "$kept" >/etc/hosts
}

# --- daemons --------------------------------------------------------------------------------------------------------
start_munge() {
    if munge_works; then
        return 0   # someone else's munged (a system service, say): use it, and leave it alone on stop
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then mungekey --create --force --keyfile=/etc/munge/munge.key
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    chmod 0700 /var/lib/munge /var/log/munge
    rm -f /run/munge/munged.pid
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid \
        || die "munged did not start; /var/log/munge/munged.log:
$(tail -n 20 /var/log/munge/munged.log 2>/dev/null)"
    local i
    for ((i = 0; i < 50; i++)); do
        if munge_works; then
            cp /run/munge/munged.pid "$RUN/munged.pid"   # recorded: this script started it, so `stop` stops it
            return 0
        fi
        sleep 0.1
    done
    die "munged started but does not answer; /var/log/munge/munged.log:
$(tail -n 20 /var/log/munge/munged.log 2>/dev/null)"
}

stop_daemons() {
    local n specs=("slurmctld:$RUN/slurmctld.pid")
    for n in "${NODES[@]}"; do specs+=("slurmd:$RUN/slurmd-$n.pid"); done
    stop_pids "${specs[@]}"
    stop_pids "munged:$RUN/munged.pid"
}

cancel_jobs() {   # cancel whatever still runs, so that no slurmstepd outlives its slurmd
    pid_of "$RUN/slurmctld.pid" slurmctld >/dev/null || return 0
    local jobs i
    jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
    [[ -n $jobs ]] || return 0
    # shellcheck disable=SC2086
    timeout 10 scancel $jobs 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do
        [[ -z $(timeout 10 squeue -h -t RUNNING,COMPLETING,SUSPENDED -o %i 2>/dev/null || true) ]] && return 0
        sleep 0.5
    done
}

diagnostics() {
    local f
    echo "---- sinfo ----"
    timeout 5 sinfo -N -l 2>&1 || true
    timeout 5 scontrol show node 2>&1 | grep -E 'NodeName|State=|Reason' || true
    for f in "$LOG/slurmctld.log" "$LOG"/slurmd-*.log /var/log/munge/munged.log; do
        [[ -f $f ]] || continue
        echo "---- tail $f ----"
        tail -n 25 "$f"
    done
}

fail_start() {   # fail_start MESSAGE: report with log tails, stop what was started (logs stay in STATE_DIR/log)
    {
        echo "local_cluster: error: $1"
        diagnostics
    } >&2
    stop_daemons
    uninstall_conf
    hosts_remove
    exit 1
}

wait_idle() {
    local deadline=$((SECONDS + START_TIMEOUT)) states n bad
    while ((SECONDS < deadline)); do
        states=$(timeout 5 sinfo -h -N -o '%N %T' 2>/dev/null | sort -u || true)
        bad=0
        for n in "${NODES[@]}"; do grep -qx "$n idle" <<<"$states" || bad=1; done
        ((bad)) || return 0
        if grep -qiE 'drain|inval|fail' <<<"$states"; then fail_start "a node is unusable: ${states//$'\n'/, }"; fi
        for n in "${NODES[@]}"; do
            pid_of "$RUN/slurmd-$n.pid" slurmd >/dev/null || fail_start "slurmd for $n died"
        done
        pid_of "$RUN/slurmctld.pid" slurmctld >/dev/null || fail_start "slurmctld died"
        sleep 0.5
    done
    states=${states:-no answer from slurmctld}
    fail_start "nodes not idle after ${START_TIMEOUT}s: ${states//$'\n'/, }"
}

wait_pidfile() {   # wait_pidfile FILE COMM WHAT
    local i
    for ((i = 0; i < 100; i++)); do
        pid_of "$1" "$2" >/dev/null && return 0
        sleep 0.1
    done
    fail_start "$3 did not start"
}

start() {
    need_root
    install_slurm
    mkdir -p "$RUN" "$LOG"
    render_conf >"$CONF.new"
    if slurm_running && cmp -s "$CONF.new" "$CONF" && cmp -s "$CONF" "$ETC_CONF" && munge_works; then
        rm -f "$CONF.new"
        hosts_add
        wait_idle
        say "reusing the running cluster: nodes ${NODES[*]} idle (state: $STATE)"
        return 0
    fi
    # Fresh start: stop anything of ours that is left over, clear the old state, keep nothing but the logs' names.
    cancel_jobs
    stop_daemons
    rm -rf "$STATE/ctld" "$STATE/spool"
    mkdir -p "$STATE/ctld" "$RUN" "$LOG"
    local f n
    for f in "$LOG"/*.log "$LOG/jobcomp.txt"; do [[ -f $f ]] && : >"$f"; done
    for n in "${NODES[@]}"; do mkdir -p "$STATE/spool/$n"; done
    mv "$CONF.new" "$CONF"
    install_conf
    hosts_add
    start_munge
    slurmctld -c -f "$ETC_CONF" || fail_start "slurmctld failed to start"
    wait_pidfile "$RUN/slurmctld.pid" slurmctld slurmctld
    for n in "${NODES[@]}"; do
        slurmd -c -N "$n" -f "$ETC_CONF" || fail_start "slurmd -N $n failed to start"
        wait_pidfile "$RUN/slurmd-$n.pid" slurmd "slurmd -N $n"
    done
    wait_idle
    say "started: nodes ${NODES[*]} idle, partition local (config $ETC_CONF, state $STATE)"
}

stop() {
    need_root
    cancel_jobs
    stop_daemons
    uninstall_conf
    hosts_remove
    say "stopped (logs kept in $LOG)"
}

status() {
    if ! grep -qs "$MARK" "$ETC_CONF" || ! timeout 10 scontrol ping >/dev/null 2>&1; then
        say "not running"
        return 1
    fi
    sinfo -N -l
    echo
    squeue -l
}

case $cmd in
    start) start ;;
    stop) stop ;;
    restart) stop; start ;;
    status) status ;;
    *) die "unknown command '$cmd' (expected start, stop, restart or status)" ;;
esac

#!/usr/bin/env bash
# A one-node SLURM cluster with job accounting on this host, for tests/workflow/test_slurm.py.
#
#   cluster.sh install   the Debian packages (apt-get, skipped when installed); needs root
#   cluster.sh start     install, write the configuration and start munged, mariadbd, slurmdbd,
#                        slurmctld and slurmd (no systemd: each is tracked by its pid file); a daemon
#                        already running is left alone, so starting twice is fine
#   cluster.sh stop      cancel the cluster's jobs and stop exactly the daemons started here
#   cluster.sh status    exit 0 when all five run, 3 otherwise
#   cluster.sh env       the line to source for the SLURM commands: eval "$(cluster.sh env)"
#
# Everything (configuration, munge key, database, spool, logs, pid files) lives in the state directory
# $GSVR_SLURM_STATE (default /tmp/gsvr-slurm), and the daemons listen on ports of their own (16817-16820, or
# from $GSVR_SLURM_PORT_BASE), so the system's munge or MariaDB, if any, is not used. Commands reach the
# cluster with SLURM_CONF=$GSVR_SLURM_STATE/slurm.conf; while it runs /etc/slurm/slurm.conf links to that
# file too (see link_etc_conf), and the script refuses to start where that path is another cluster's.
#
# Why each setting (Debian 12, slurm 22.05):
# - slurmdbd with MariaDB: the SLURM executor plugin of Snakemake asks sacct for job states; without
#   accounting sacct never reports them and Snakemake waits forever.
# - ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, JobAcctGatherType=jobacct_gather/none:
#   no cgroups (containers and CI machines often cannot delegate them).
# - The node line is `slurmd -C`'s (RealMemory above what slurmd measures drains the node).
# - Gres=gpu:1 from /dev/null: a fake GPU, so jobs asking for one are accepted (they find no CUDA and
#   run on the CPU).
# - SlurmUser=root: the daemons and the jobs run as the user who started them (root).
# - AccountingStoreFlags=job_comment: sacct shows the comment the plugin gives each job (rule_<rule>_...).
set -euo pipefail

STATE=${GSVR_SLURM_STATE:-/tmp/gsvr-slurm}
CLUSTER=gsvrtest
ACCOUNT=gsvr
PARTITION=gsvr
CTLD_PORT=${GSVR_SLURM_PORT_BASE:-16817}
SLURMD_PORT=$((CTLD_PORT + 1))
DBD_PORT=$((CTLD_PORT + 2))
DB_PORT=$((CTLD_PORT + 3))
PACKAGES=(munge slurm-client slurmctld slurmd slurmdbd mariadb-server)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)  # start order; stop runs backwards
export SLURM_CONF=$STATE/slurm.conf

log() { echo "cluster.sh: $*" >&2; }
die() { log "$*"; exit 1; }

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }

install() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "needs root to install ${missing[*]} (apt-get)"
    log "installing ${missing[*]}"
    # The packages' scripts must not start the system's own munge, mariadb or slurm services.
    local policy=/usr/sbin/policy-rc.d made_policy=
    if [ ! -e $policy ]; then
        printf '#!/bin/sh\nexit 101\n' >$policy && chmod 755 $policy && made_policy=1
    fi
    local rc=0 aptlog=${TMPDIR:-/tmp}/gsvr-slurm-apt.log
    export DEBIAN_FRONTEND=noninteractive
    # A fresh machine may have no package lists yet: update and try again.
    { apt-get install -y -q --no-install-recommends "${missing[@]}" >"$aptlog" 2>&1 ||
        { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "${missing[@]}" >"$aptlog" 2>&1; }; } ||
        rc=$?
    if [ -n "$made_policy" ]; then rm -f $policy; fi
    [ $rc -eq 0 ] || { tail -20 "$aptlog" >&2; die "apt-get install failed (log: $aptlog)"; }
}

pidfile() { echo "$STATE/run/$1.pid"; }

# The pid of a daemon started here, if it is still that daemon.
running_pid() {
    local f pid
    f=$(pidfile "$1")
    [ -s "$f" ] || return 1
    pid=$(tr -dc 0-9 <"$f")
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
    [ "$(cat "/proc/$pid/comm")" = "${1:0:15}" ] || return 1
    echo "$pid"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local t=$1 end=$((SECONDS + $1)) what=$2
    shift 2
    while ((SECONDS < end)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "timed out after ${t}s waiting for $what (logs: $STATE/log)"
}

write_if_changed() {  # write_if_changed FILE MODE  (content on stdin)
    local tmp
    tmp=$(mktemp "$1.XXXX")
    cat >"$tmp"
    chmod "$2" "$tmp"
    if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv -f "$tmp" "$1"; fi
}

configure() {
    mkdir -p "$STATE"/{run,log,munge,ctld,slurmd,mysql}
    # munged wants its socket's directories searchable by all and its key private.
    chmod 755 "$STATE" "$STATE/run"
    chmod 700 "$STATE/munge"
    [ -s "$STATE/munge/munge.key" ] || {
        dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$STATE/munge/munge.key"
    }
    local host node
    host=$(hostname -s)
    # slurmd -C prints this host's node line (CPUs, sockets, cores, RealMemory) as slurmd measures it.
    node=$(slurmd -C 2>/dev/null | grep '^NodeName=') || die "slurmd -C failed"
    node=$(sed -E 's/^NodeName=[^ ]+ //' <<<"$node")
    write_if_changed "$STATE/slurm.conf" 644 <<EOF
# Written by tests/workflow/slurm/cluster.sh: a one-node cluster for the workflow's SLURM test.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/run/munge.socket
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile slurmd)
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=300
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# With munge, the socket of the daemon that authenticates to slurmdbd (AuthInfo is not used for it).
AccountingStoragePass=$STATE/run/munge.socket
AccountingStorageEnforce=associations
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
NodeName=$host NodeAddr=127.0.0.1 $node Gres=gpu:1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    write_if_changed "$STATE/gres.conf" 644 <<EOF
NodeName=$host Name=gpu File=/dev/null
EOF
    # slurmdbd reads slurmdbd.conf next to SLURM_CONF; it must be private to SlurmUser.
    write_if_changed "$STATE/slurmdbd.conf" 600 <<EOF
AuthType=auth/munge
AuthInfo=socket=$STATE/run/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$(pidfile slurmdbd)
LogFile=$STATE/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
}

# The jobs' own srun calls (the SLURM executor's job step) run without SLURM_CONF: the plugin removes every
# SLURM_* variable but the job's identity (snakemake-executor-plugin-slurm issue #164). So while it runs, this
# cluster is also the host's default one, /etc/slurm/slurm.conf, as a link; one that is not ours is refused.
ETC_CONF=/etc/slurm/slurm.conf
our_etc_link() { [ -L $ETC_CONF ] && [ "$(readlink $ETC_CONF)" = "$STATE/slurm.conf" ]; }
link_etc_conf() {
    our_etc_link && return 0
    if [ -e $ETC_CONF ] || [ -L $ETC_CONF ]; then
        die "$ETC_CONF exists and is not this cluster's: the jobs' srun would read it (remove it, or use another host)"
    fi
    mkdir -p "$(dirname $ETC_CONF)"
    ln -s "$STATE/slurm.conf" $ETC_CONF
}

mariadb_sql() { mariadb --no-defaults --socket="$STATE/run/mysqld.sock" -u root -e "$1"; }

start_daemon() {
    local name=$1
    if running_pid "$name" >/dev/null; then return 0; fi
    rm -f "$(pidfile "$name")"
    case $name in
    munged)
        munged --socket="$STATE/run/munge.socket" --key-file="$STATE/munge/munge.key" \
            --pid-file="$(pidfile munged)" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munge.seed" --num-threads=10 \
            || die "munged did not start (log: $STATE/log/munged.log)"
        wait_for 10 munged test -S "$STATE/run/munge.socket"
        ;;
    mariadbd)
        if [ ! -d "$STATE/mysql/mysql" ]; then
            mariadb-install-db --no-defaults --datadir="$STATE/mysql" --user=root --skip-test-db \
                --auth-root-authentication-method=socket >"$STATE/log/mariadb-install.log" 2>&1 ||
                die "mariadb-install-db failed (log: $STATE/log/mariadb-install.log)"
        fi
        # mariadbd does not fork: run it detached, its own pid file tracks it.
        setsid mariadbd --no-defaults --datadir="$STATE/mysql" --socket="$STATE/run/mysqld.sock" \
            --pid-file="$(pidfile mariadbd)" --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
            --user=root --log-error="$STATE/log/mariadbd.log" --innodb-lock-wait-timeout=900 \
            </dev/null >/dev/null 2>&1 &
        wait_for 60 mariadbd mariadb-admin --no-defaults --socket="$STATE/run/mysqld.sock" -u root ping
        wait_for 10 "mariadbd's pid file" test -s "$(pidfile mariadbd)"
        mariadb_sql "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
                     GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
        ;;
    slurmdbd)
        slurmdbd || die "slurmdbd did not start (log: $STATE/log/slurmdbd.log)"
        wait_for 30 slurmdbd sacctmgr -n list cluster
        ;;
    slurmctld)
        slurmctld || die "slurmctld did not start (log: $STATE/log/slurmctld.log)"
        wait_for 30 slurmctld scontrol ping
        ;;
    slurmd)
        slurmd || die "slurmd did not start (log: $STATE/log/slurmd.log)"
        ;;
    esac
    wait_for 10 "$name's pid file" running_pid "$name"
}

node_ready() { sinfo -h -o %T -p "$PARTITION" | grep -qx 'idle\|mixed\|allocated'; }

start() {
    install
    [ "$(id -u)" -eq 0 ] || die "needs root to start the daemons"
    configure
    link_etc_conf
    local t0=$SECONDS
    start_daemon munged
    start_daemon mariadbd
    start_daemon slurmdbd
    # The cluster, an account and root's association must exist before slurmctld registers and jobs are
    # submitted (AccountingStorageEnforce=associations).
    sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    sacctmgr -n list account format=account | grep -qw "$ACCOUNT" || sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" >/dev/null
    sacctmgr -n list user root format=defaultaccount | grep -qw "$ACCOUNT" ||
        sacctmgr -i add user root Account="$ACCOUNT" DefaultAccount="$ACCOUNT" Cluster="$CLUSTER" >/dev/null
    start_daemon slurmctld
    start_daemon slurmd
    if ! node_ready; then
        sleep 1
        # A node left down or drained by an earlier run comes back (ReturnToService does not undo a drain).
        sinfo -h -o %T -p "$PARTITION" | grep -q 'down\|drain' && scontrol update NodeName="$(hostname -s)" State=RESUME 2>/dev/null || true
        wait_for 30 "the node to be idle" node_ready
    fi
    log "running ($((SECONDS - t0)) s to start); use it with: export SLURM_CONF=$SLURM_CONF"
}

stop_daemons() {  # TERM to each, then wait for all of them (10 s, then KILL)
    local name pid pids=() end=$((SECONDS + 10))
    for name in "$@"; do
        if pid=$(running_pid "$name"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$name:$pid")
        fi
    done
    for name in "${pids[@]}"; do
        pid=${name#*:}
        while [ -d "/proc/$pid" ] && ((SECONDS < end)); do sleep 0.1; done
        if [ -d "/proc/$pid" ]; then
            log "${name%%:*} ($pid) did not stop in 10 s: killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    for name in "$@"; do rm -f "$(pidfile "$name")"; done
}

stop() {
    local i
    if running_pid slurmctld >/dev/null; then
        squeue -h -o %i 2>/dev/null | xargs -r scancel --full 2>/dev/null || true
        # Let the job steps (slurmstepd) of cancelled jobs end before slurmd goes.
        for ((i = 0; i < 50; i++)); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    # Reverse start order; a daemon waits only for those it reports to (slurmctld sends its last records to
    # slurmdbd, slurmdbd writes them to MariaDB; munged authenticates them).
    stop_daemons slurmd slurmctld
    stop_daemons slurmdbd
    stop_daemons mariadbd munged
    if our_etc_link; then rm -f $ETC_CONF; fi
}

status() {
    local name pid down=0
    for name in "${DAEMONS[@]}"; do
        if pid=$(running_pid "$name"); then echo "$name running ($pid)"; else echo "$name stopped"; down=1; fi
    done
    echo "SLURM_CONF=$SLURM_CONF"
    return $((down * 3))
}

case ${1:-} in
install) install ;;
start) start ;;
stop) stop ;;
status) status ;;
env) echo "export SLURM_CONF=$SLURM_CONF" ;;
*) echo "usage: $0 install|start|stop|status|env" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# A real SLURM cluster on the two "nodes" of launch_scripts/two_nodes.sh: slurmctld on node 0, a
# slurmd on each node, and a munge daemon of its own, for running launch_scripts/slurm.sbatch as a
# cluster runs it (sbatch, srun, one job step per node) without a cluster. Needs root, the nodes
# (`two_nodes.sh up` first) and the Debian packages slurmctld slurmd slurm-client munge.
#
#   launch_scripts/two_nodes.sh up
#   launch_scripts/two_nodes_slurm.sh up            # start munged, slurmctld and both slurmd; wait for both nodes idle
#   launch_scripts/two_nodes_slurm.sh run sinfo     # run a SLURM client on node 0 (the cluster's "login node")
#   NPROC_PER_NODE=1 launch_scripts/two_nodes_slurm.sh run sbatch --wait --nodes 2 launch_scripts/slurm.sbatch configs/tiny-cpu.yaml
#   launch_scripts/two_nodes_slurm.sh env           # print the SLURM_CONF export line (for commands run on a node)
#   launch_scripts/two_nodes_slurm.sh down          # stop the daemons, remove the state directory
#   launch_scripts/two_nodes.sh down
#
# Everything lives in a state directory of its own (TWO_NODES_SLURM_STATE, default
# /run/megatron-memorizing/slurm-PREFIX): munge key, socket and logs, slurm.conf, the controller's
# state, each slurmd's spool, logs and pid files. /etc/slurm, /etc/munge and a system munged are
# not touched. The nodes' network is reachable only from inside the nodes, so SLURM clients run
# there (`run`, or `two_nodes.sh run 0 env SLURM_CONF=... sbatch ...`); the job's environment is
# the submitter's, as sbatch's default --export=ALL gives it.
#
# Each daemon starts with `two_nodes.sh run N`, so it has the node's network and host name, and so
# do the job steps it spawns: the torchrun of each node binds that node's address. The interface
# for the collectives differs per node; a job's environment comes from the submitter, not from
# slurmd, so a TaskProlog (state directory) sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME to
# the node's own interface in every task. `two_nodes.sh down` stops the daemons too (it kills
# every process of the namespaces); `down` here then only removes the state directory.
#
# Verified with Debian 12's slurm-wlm 22.05.8 and munge 0.5.15: both nodes come up idle in a few
# seconds, and slurm.sbatch on 2 nodes (NPROC_PER_NODE=1, CPU ranks over gloo) trains with exactly
# the losses of the same run on one node (tests/test_slurm_cluster.py).
#
# TWO_NODES_PREFIX and TWO_NODES_SUBNET pick the nodes as in two_nodes.sh; TWO_NODES_SLURM_WAIT
# (default 60) bounds the wait, in seconds, for both nodes to be idle.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
two_nodes=$here/two_nodes.sh
prefix=$("$two_nodes" name 0); prefix=${prefix%0}  # the nodes' names, as two_nodes.sh gives them
state=${TWO_NODES_SLURM_STATE:-/run/megatron-memorizing/slurm-$prefix}
mark=$state/made-by-two_nodes_slurm  # `down` removes only a directory that carries it
conf=$state/slurm.conf
socket=$state/munge/munge.socket
wait_s=${TWO_NODES_SLURM_WAIT:-60}

name() { "$two_nodes" name "$1"; }
address() { "$two_nodes" address "$1"; }

on_node0() { "$two_nodes" run 0 env SLURM_CONF="$conf" "$@"; }

logs_tail() {
    local log
    for log in "$state"/log/*.log; do
        [[ -f $log ]] || continue
        echo "--- $log (last lines)" >&2
        tail -n 15 "$log" >&2
    done
}

# Stops the daemon whose pid file is $1 if that process is still the program $2.
stop() {
    local pid_file=$1 program=$2 pid comm i
    [[ -f $pid_file ]] || return 0
    pid=$(<"$pid_file")
    [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/comm ]] || return 0
    comm=$(<"/proc/$pid/comm")
    [[ $comm == "$program" ]] || return 0
    kill "$pid" 2>/dev/null || return 0
    for (( i = 0; i < 50; i++ )); do
        [[ -e /proc/$pid ]] || return 0
        sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
}

write_conf() {
    local hardware=() field n
    # The node's layout as slurmd finds it (CPUs, boards, sockets, cores, threads): a node that
    # declares another one is still accepted, but logged as differing from its hardware.
    for field in $(slurmd -C); do
        [[ $field == @(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=* ]] && hardware+=("$field")
    done
    cat > "$conf" <<EOF
# Written by $0 up: a two-node SLURM cluster on $(name 0) and $(name 1).
ClusterName=${prefix,,}
SlurmctldHost=$(name 0)($(address 0))
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket
StateSaveLocation=$state/slurmctld
SlurmdSpoolDir=$state/slurmd-%n
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd-%n.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
TaskProlog=$state/task_prolog.sh
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/linear
SchedulerType=sched/backfill
ReturnToService=2
MailProg=/bin/true
EOF
    for n in 0 1; do
        echo "NodeName=$(name $n) NodeAddr=$(address $n) ${hardware[*]} State=UNKNOWN" >> "$conf"
    done
    echo "PartitionName=nodes Nodes=$(name 0),$(name 1) Default=YES MaxTime=INFINITE State=UP" >> "$conf"

    # slurmd 22.05 loads a cgroup plugin even when no plugin uses cgroups, and its autodetection
    # fails inside a node (ip netns exec mounts a fresh /sys, without /sys/fs/cgroup): name one.
    # Nothing here makes cgroups (proctrack/linuxproc, task/none, jobacct_gather/none).
    echo "CgroupPlugin=cgroup/v1" > "$state/cgroup.conf"

    cat > "$state/task_prolog.sh" <<EOF
#!/bin/sh
# SLURM TaskProlog: each task gets its node's own interface for the collectives (printed
# "export NAME=value" lines set the task's environment).
case "\${SLURMD_NODENAME:-\$(hostname)}" in
    $(name 0)) interface=$("$two_nodes" interface 0) ;;
    $(name 1)) interface=$("$two_nodes" interface 1) ;;
    *) exit 0 ;;
esac
echo "export GLOO_SOCKET_IFNAME=\$interface"
echo "export NCCL_SOCKET_IFNAME=\$interface"
EOF
    chmod 755 "$state/task_prolog.sh"
}

case ${1:-} in
    up)
        missing=()
        for program in munged mungekey slurmctld slurmd sinfo sbatch srun scontrol; do
            command -v "$program" > /dev/null || missing+=("$program")
        done
        if (( ${#missing[@]} )); then
            echo "error: not installed: ${missing[*]} (apt-get install slurmctld slurmd slurm-client munge)" >&2
            exit 2
        fi
        for n in 0 1; do
            if [[ ! -e /run/netns/$(name $n) ]]; then
                echo "error: node $n ($(name $n)) does not exist: run '$two_nodes up' first" >&2
                exit 1
            fi
        done
        if [[ -e $state ]]; then
            echo "error: $state exists already: '$0 down' removes it if this script made it, or set TWO_NODES_SLURM_STATE" >&2
            exit 1
        fi
        mkdir -p "$state"
        chmod 755 "$state"
        touch "$mark"
        mkdir -m 755 "$state/munge"  # munged: the socket's folder must be searchable by all
        mkdir -m 755 "$state/log" "$state/slurmctld" "$state/slurmd-$(name 0)" "$state/slurmd-$(name 1)"
        mungekey --create --keyfile="$state/munge/munge.key"
        # munged is started in node 0's namespace so that `two_nodes.sh down` stops it too; its
        # socket is a file, which both nodes reach (only the network is split).
        "$two_nodes" run 0 munged --socket="$socket" --key-file="$state/munge/munge.key" \
            --pid-file="$state/munge/munged.pid" --log-file="$state/log/munged.log" --seed-file="$state/munge/munged.seed"
        write_conf
        "$two_nodes" run 0 slurmctld -f "$conf"
        for n in 0 1; do
            "$two_nodes" run $n slurmd -f "$conf" -N "$(name $n)"
        done
        deadline=$(( SECONDS + wait_s ))
        while true; do
            shown=$(on_node0 sinfo --noheader --Node --format='%N %t' 2>&1) || true
            idle=0
            while read -r node node_state; do
                [[ $node_state == idle ]] && idle=$(( idle + 1 ))
            done <<< "$shown"
            (( idle == 2 )) && break
            if (( SECONDS >= deadline )); then
                echo "error: both nodes were not idle after ${wait_s} s; sinfo shows:" >&2
                echo "$shown" >&2
                logs_tail
                echo "(the daemons are left running for inspection: '$0 down' stops them)" >&2
                exit 1
            fi
            sleep 1
        done
        echo "SLURM up: $(name 0) $(address 0), $(name 1) $(address 1) idle; export SLURM_CONF=$conf (inside a node: '$0 run COMMAND...')"
        ;;
    run)
        shift
        [[ -f $conf ]] || { echo "error: no cluster at $state: run '$0 up' first" >&2; exit 1; }
        exec "$two_nodes" run 0 env SLURM_CONF="$conf" "$@"
        ;;
    env) echo "export SLURM_CONF=$conf" ;;
    down)
        if [[ ! -e $state ]]; then
            exit 0
        elif [[ ! -f $mark ]]; then
            echo "warning: $state was not made by $0: left alone" >&2
            exit 0
        fi
        # Jobs still running are cancelled first, so that no job step outlives the daemons.
        if [[ -e /run/netns/$(name 0) && -f $state/slurmctld.pid ]]; then
            jobs=$(timeout 10 "$two_nodes" run 0 env SLURM_CONF="$conf" squeue --noheader --format=%i 2>/dev/null) || true
            if [[ -n ${jobs//[[:space:]]/} ]]; then
                # shellcheck disable=SC2086  # one job id per word
                timeout 10 "$two_nodes" run 0 env SLURM_CONF="$conf" scancel $jobs || true
            fi
        fi
        for n in 0 1; do stop "$state/slurmd-$(name $n).pid" slurmd; done
        stop "$state/slurmctld.pid" slurmctld
        stop "$state/munge/munged.pid" munged
        rm -rf "$state"
        ;;
    *) echo "usage: $0 up | run COMMAND... | env | down" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Two "nodes" on this machine: Linux network namespaces joined by a veth pair, each with its own
# link-local address, for reproducing a multi-node job (hostfiles, rendezvous, per-node ranks,
# a node failing) without a cluster. Needs root and iproute2. The file system stays shared, as a
# cluster's shared checkpoint folder is; only the network is split, and traffic goes only between
# the two namespaces.
#
#   launch_scripts/two_nodes.sh up                 # create them (refuses if the names are taken)
#   launch_scripts/two_nodes.sh run 0 COMMAND...   # run COMMAND on node 0 (node 1: run 1 ...)
#   launch_scripts/two_nodes.sh name 1             # print node 1's host name (also its namespace's)
#   launch_scripts/two_nodes.sh address 1          # print node 1's address
#   launch_scripts/two_nodes.sh pids 1             # the processes running on node 1 (to kill a node)
#   launch_scripts/two_nodes.sh down               # remove them (only namespaces this script made)
#
# Inside, as on a cluster, each node has its own host name (PREFIX0, PREFIX1) and both names
# resolve to the nodes' addresses (ip netns exec reads /etc/netns/NAME/hosts as /etc/hosts). Set the collective library's interface so that it does not pick another one:
# GLOO_SOCKET_IFNAME (CPU) or NCCL_SOCKET_IFNAME (GPU) = `interface N`.
# TWO_NODES_PREFIX (default mm-node) names the namespaces PREFIX0 and PREFIX1;
# TWO_NODES_SUBNET (default 169.254.77) their addresses SUBNET.1 and SUBNET.2.
set -euo pipefail
prefix=${TWO_NODES_PREFIX:-mm-node}
subnet=${TWO_NODES_SUBNET:-169.254.77}
marks=/run/megatron-memorizing/netns  # one file per namespace this script created

namespace() { echo "$prefix$1"; }
address() { echo "$subnet.$(( $1 + 1 ))"; }
interface() { echo "${prefix}v$1"; }
node_index() {
    [[ ${1:-} == 0 || ${1:-} == 1 ]] || { echo "error: node must be 0 or 1, not '${1:-}'" >&2; exit 2; }
}

case ${1:-} in
    up)
        for n in 0 1; do
            if [[ -e /run/netns/$(namespace $n) ]]; then
                echo "error: network namespace $(namespace $n) exists already: '$0 down' removes it if this script made it, or set TWO_NODES_PREFIX" >&2
                exit 1
            fi
        done
        mkdir -p "$marks"
        for n in 0 1; do
            ip netns add "$(namespace $n)"
            touch "$marks/$(namespace $n)"
            mkdir -p "/etc/netns/$(namespace $n)"
            printf '127.0.0.1 localhost\n%s %s\n%s %s\n' "$(address 0)" "$(namespace 0)" "$(address 1)" "$(namespace 1)" \
                > "/etc/netns/$(namespace $n)/hosts"
        done
        ip link add "$(interface 0)" type veth peer name "$(interface 1)"
        for n in 0 1; do
            ip link set "$(interface $n)" netns "$(namespace $n)"
            ip -n "$(namespace $n)" addr add "$(address $n)/24" dev "$(interface $n)"
            ip -n "$(namespace $n)" link set "$(interface $n)" up
            ip -n "$(namespace $n)" link set lo up
        done
        echo "node 0: $(namespace 0) $(address 0) ($(interface 0)); node 1: $(namespace 1) $(address 1) ($(interface 1))"
        ;;
    run)
        node_index "${2:-}"; n=$2; shift 2
        # A host name of its own (a UTS namespace), as a real node has.
        exec ip netns exec "$(namespace $n)" unshare --uts sh -c 'hostname "$0" && exec "$@"' "$(namespace $n)" "$@"
        ;;
    name)      node_index "${2:-}"; namespace "$2" ;;
    address)   node_index "${2:-}"; address "$2" ;;
    pids)      node_index "${2:-}"; ip netns pids "$(namespace "$2")" ;;
    interface) node_index "${2:-}"; interface "$2" ;;
    down)
        for n in 0 1; do
            if [[ -f $marks/$(namespace $n) ]]; then
                ip netns pids "$(namespace $n)" 2>/dev/null | xargs -r kill -9
                ip netns del "$(namespace $n)" 2>/dev/null || true  # its veth end goes with it
                rm -rf "/etc/netns/$(namespace $n)"
                rm -f "$marks/$(namespace $n)"
            elif [[ -e /run/netns/$(namespace $n) ]]; then
                echo "warning: $(namespace $n) was not made by $0: left alone" >&2
            fi
        done
        ;;
    *) echo "usage: $0 up | run NODE COMMAND... | name NODE | address NODE | interface NODE | pids NODE | down" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Passwordless ssh between the two nodes of two_nodes.sh, so that a launcher which logs into every
# node itself (the deepspeed launcher, through pdsh) runs across them as on a cluster. Each node
# runs its own sshd on its own address. Keys, host keys, known_hosts and both configurations are
# made here, under /etc/netns/NODE/ssh, which `ip netns exec` shows inside the node as /etc/ssh:
# this machine's own ssh setup (/etc/ssh, ~/.ssh) is neither read nor changed.
#
#   launch_scripts/two_nodes.sh up && launch_scripts/two_nodes_ssh.sh up
#   launch_scripts/two_nodes.sh run 0 ssh mm-node1 hostname             # prints mm-node1
#   launch_scripts/two_nodes.sh run 0 env HOSTFILE=hostfile launch_scripts/multi_node.sh CONFIG.yaml
#   launch_scripts/two_nodes.sh down      # stops the sshds and removes all of it with the nodes
#
# Needs openssh-server and openssh-client (and pdsh for the deepspeed launcher). A login on node
# N gets GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME) set to node N's interface by its sshd, so the
# ranks it starts talk over the link between the nodes. TWO_NODES_PREFIX and TWO_NODES_SUBNET
# pick the nodes, as for two_nodes.sh.
set -euo pipefail
nodes=$(dirname "${BASH_SOURCE[0]}")/two_nodes.sh

case ${1:-} in
    up)
        [[ -x /usr/sbin/sshd ]] && command -v ssh >/dev/null || {
            echo "error: sshd or ssh is not installed: apt-get install openssh-server openssh-client" >&2; exit 2; }
        for n in 0 1; do
            [[ -e /run/netns/$(bash "$nodes" name $n) ]] || {
                echo "error: node $n does not exist: run '$nodes up' first" >&2; exit 2; }
            [[ ! -e /etc/netns/$(bash "$nodes" name $n)/ssh ]] || {
                echo "error: ssh is set up on node $n already ('$nodes down' removes the nodes with it)" >&2; exit 1; }
        done
        mkdir -p /run/sshd  # sshd's privilege separation directory
        client=$(mktemp -d)
        trap 'rm -rf "$client"' EXIT
        ssh-keygen -q -t ed25519 -N "" -C "two_nodes_ssh" -f "$client/id_ed25519"
        for n in 0 1; do
            etc=/etc/netns/$(bash "$nodes" name $n)/ssh
            mkdir -p "$etc"
            ssh-keygen -q -t ed25519 -N "" -C "$(bash "$nodes" name $n)" -f "$etc/ssh_host_ed25519_key"
            install -m 600 "$client/id_ed25519" "$etc/id_ed25519"
            install -m 600 "$client/id_ed25519.pub" "$etc/authorized_keys"
        done
        for n in 0 1; do
            etc=/etc/netns/$(bash "$nodes" name $n)/ssh
            for m in 0 1; do
                echo "$(bash "$nodes" name $m),$(bash "$nodes" address $m) $(cut -d' ' -f1,2 "/etc/netns/$(bash "$nodes" name $m)/ssh/ssh_host_ed25519_key.pub")"
            done > "$etc/known_hosts"
            cat > "$etc/ssh_config" <<EOF
Host *
    IdentityFile /etc/ssh/id_ed25519
    GlobalKnownHostsFile /etc/ssh/known_hosts
    UserKnownHostsFile /etc/ssh/known_hosts
    StrictHostKeyChecking yes
    BatchMode yes
EOF
            cat > "$etc/sshd_config" <<EOF
ListenAddress $(bash "$nodes" address $n)
HostKey /etc/ssh/ssh_host_ed25519_key
AuthorizedKeysFile /etc/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PidFile /etc/ssh/sshd.pid
SetEnv GLOO_SOCKET_IFNAME=$(bash "$nodes" interface $n) NCCL_SOCKET_IFNAME=$(bash "$nodes" interface $n)
EOF
            setsid bash "$nodes" run $n /usr/sbin/sshd -D -e -f /etc/ssh/sshd_config > "$etc/sshd.log" 2>&1 < /dev/null &
        done
        for n in 0 1; do  # each node logs into the other, by name, within 10 s
            other=$(bash "$nodes" name $(( 1 - n )))
            for _ in $(seq 50); do
                bash "$nodes" run $n ssh "$other" true 2>/dev/null && continue 2
                sleep 0.2
            done
            echo "error: node $n cannot log into $other over ssh; sshd's log:" >&2
            cat "/etc/netns/$other/ssh/sshd.log" >&2
            exit 1
        done
        echo "ssh: $(bash "$nodes" name 0) <-> $(bash "$nodes" name 1)"
        ;;
    *) echo "usage: $0 up   (after '$nodes up'; '$nodes down' removes both)" >&2; exit 2 ;;
esac

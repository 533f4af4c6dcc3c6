#!/usr/bin/env bash
# CI: the Debian packages the two-node tests use, installed when missing (CI runs as root on a
# fresh Debian 12). Without them those tests are skipped, saying why; with them they run for real:
#   slurmctld slurmd slurm-client munge   a SLURM cluster on the two nodes (tests/test_slurm_cluster.py)
#   openssh-server openssh-client pdsh    the deepspeed launcher logging into both nodes (tests/test_multi_node.py)
# One list: add a package to PACKAGES, with its reason above.
set -euo pipefail
PACKAGES=(slurmctld slurmd slurm-client munge openssh-server openssh-client pdsh)

missing=()
for package in "${PACKAGES[@]}"; do
  [[ $(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null || true) == installed ]] || missing+=("$package")
done
(( ${#missing[@]} )) || exit 0
if [[ $(id -u) != 0 ]] || ! command -v apt-get > /dev/null; then
  echo "warning: cannot install ${missing[*]} (needs root and apt-get): the tests that use them are skipped" >&2
  exit 0
fi
echo "=== installing ${missing[*]} ==="
install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; }
install || { apt-get update -q && install; }

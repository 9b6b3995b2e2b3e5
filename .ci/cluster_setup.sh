#!/usr/bin/env bash
# Install what tests/cluster needs: a real SLURM controller + node daemons, munge, and the
# iproute2/util-linux tools used to build two "hosts" in network namespaces.
# Idempotent and quiet; needs root (the cluster tests skip without it). Usage: bash .ci/cluster_setup.sh
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "cluster_setup: not root, skipping (tests marked 'cluster' will skip)" >&2
    exit 0
fi

need=()
command -v slurmctld >/dev/null || need+=(slurmctld)
command -v slurmd    >/dev/null || need+=(slurmd)
command -v sbatch    >/dev/null || need+=(slurm-client)
command -v munged    >/dev/null || need+=(munge)
command -v ip        >/dev/null || need+=(iproute2)
command -v nsenter   >/dev/null || need+=(util-linux)
command -v pdsh      >/dev/null || true   # not needed: templates launch with --no_ssh

if ((${#need[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    # Debian's postinst scripts try to start the daemons; tests start their own, with their own config.
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The packaged services (if the postinst started any) use the default config and ports:
# the tests run their own daemons, so stop the packaged ones only if systemd is absent is a no-op.
echo "cluster_setup: $(slurmctld -V 2>/dev/null || echo 'slurm missing'), munge $(munged --version 2>&1 | head -1 | awk '{print $2}')"

#!/usr/bin/env bash
# Install what tests/cluster needs: SLURM's controller, node daemon and clients, munge, and the
# tools that build two "hosts" from network namespaces (ip, nsenter, unshare, setpriv).
# Idempotent (installs only what is missing) and quiet; needs root. Without root it does nothing
# and the tests marked `cluster` skip with that reason.  Usage: bash .ci/cluster_setup.sh
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "cluster_setup: not root, nothing installed (tests marked 'cluster' will skip)" >&2
    exit 0
fi

need=()
command -v slurmctld >/dev/null || need+=(slurmctld)
command -v slurmd    >/dev/null || need+=(slurmd)
command -v sbatch    >/dev/null || need+=(slurm-client)
command -v munged    >/dev/null || need+=(munge)
command -v ip        >/dev/null || need+=(iproute2)
command -v nsenter   >/dev/null || need+=(util-linux)
command -v setpriv   >/dev/null || need+=(util-linux)

if ((${#need[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    log=$(mktemp)
    # The tests start their own daemons with their own config, key and sockets under /tmp;
    # the packaged services are not used (and without systemd they are not started).
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"; } >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        exit 1
    fi
    rm -f "$log"
fi

echo "cluster_setup: $(slurmctld -V), $(munged --version 2>&1 | head -1)"

#!/usr/bin/env bash
# Prepares a real Docker engine for tests/test_docker_stack.py, on a machine that may have nothing:
#   1. Debian's docker.io, docker-compose (v1) and debootstrap, when missing;
#   2. dockerd in the background, unless an engine already answers (left running for later runs);
#   3. the local base image local/debian:bookworm (debootstrap minbase + docker import), unless it
#      exists: no registry can be reached here, so nothing can be pulled.
# Each step is skipped when its result is already there (/var/lib/docker may survive between runs).
# Usage: bash docker/ci-engine.sh        (as root; called by .ci/run)
set -euo pipefail

BASE_IMAGE=${BASE_IMAGE:-local/debian:bookworm}
SUITE=bookworm
DOCKERD_LOG=${DOCKERD_LOG:-/var/log/dockerd-curvature-sweep.log}
t0=$(date +%s)
say() { echo "[ci-engine +$(( $(date +%s) - t0 ))s] $*"; }

need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v debootstrap >/dev/null || need+=(debootstrap)
if ((${#need[@]})); then
    say "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
    # A dockerd killed with its machine's last session leaves a pid file that stops a new one starting.
    if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
        rm -f /var/run/docker.pid
    fi
    say "starting dockerd (log: $DOCKERD_LOG)"
    nohup dockerd >"$DOCKERD_LOG" 2>&1 </dev/null &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { tail -20 "$DOCKERD_LOG"; echo "dockerd did not start" >&2; exit 1; }
fi
say "engine: $(docker version --format 'server {{.Server.Version}}')"

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    # The Debian mirror this machine's apt uses (deb822 or one-line sources), else the default one.
    mirror=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1 || true)
    [ -n "$mirror" ] || mirror=$(grep -hsE '^deb ' /etc/apt/sources.list | awk '{print $2}' | head -1 || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    root=$(mktemp -d /tmp/ci-engine-rootfs-XXXXXX)
    trap 'rm -rf "$root"' EXIT
    say "building $BASE_IMAGE: debootstrap --variant=minbase $SUITE from $mirror"
    debootstrap --variant=minbase "$SUITE" "$root" "$mirror" >"$root.log" 2>&1 || { tail -20 "$root.log"; exit 1; }
    rm -f "$root.log"
    # Trim what an image never needs: package caches, lists, docs, man pages, locales.
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
           "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* "$root"/tmp/*
    tar -C "$root" -c . | docker import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
fi
say "base image $BASE_IMAGE: $(docker image inspect --format '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"

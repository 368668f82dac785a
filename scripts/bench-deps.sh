#!/usr/bin/env bash
# What `make bench` needs besides PostgreSQL and RabbitMQ (scripts/deps.sh): pgbench for
# the database's own rate, nginx for the static server's and wrk to load both and the
# service alike. Missing ones are installed from the system packages (Debian/Ubuntu, as
# root), else the script says what to install and fails.
set -euo pipefail

log() { echo "bench-deps: $*" >&2; }

# command → Debian package
declare -A package=([pgbench]=postgresql-client [nginx]=nginx-light [wrk]=wrk)
missing=()
for cmd in pgbench nginx wrk; do
    command -v "$cmd" >/dev/null || [[ -x /usr/sbin/$cmd ]] || missing+=("${package[$cmd]}")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d keeps the package from starting a system nginx on port 80.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    log "missing: ${missing[*]}; install them (Debian/Ubuntu: apt-get install ${missing[*]}) and run again"
    exit 1
fi

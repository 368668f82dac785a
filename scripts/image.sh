#!/usr/bin/env bash
# Builds the container image from the Dockerfile and, with --smoke, runs it and checks it.
#
#   scripts/image.sh            build resource:latest (docker when an engine runs, else podman)
#   scripts/image.sh --smoke    build, then run the image against the local PostgreSQL and
#                               RabbitMQ and check what an operator relies on (see smoke())
#
# Where no registry is reachable (as on our CI machines), the Dockerfile's base images are
# made locally under the names it asks for, so the Dockerfile itself stays the standard one:
#   debian:bookworm-slim  a minimal Debian bookworm made by debootstrap and `podman import`,
#                         carrying the host's extra CAs from /usr/local/share/ca-certificates;
#   rust:1.95-bookworm    that image plus gcc and libc6-dev (crates that build C) and the
#                         host's own Rust toolchain (`rustc --print sysroot`), which must be
#                         1.95: the same compiler `make build` uses.
# As root on Debian, podman, runc and debootstrap are installed from the system packages.
#
# Environment: IMAGE (resource:latest), DEBIAN_MIRROR (http://deb.debian.org/debian),
# PGHOST/PGPORT, AMQP_HOST/AMQP_PORT for the smoke run (127.0.0.1:5432, 127.0.0.1:5672).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=${IMAGE:-resource:latest}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
RUST_VERSION=1.95
DEBIAN_BASE=docker.io/library/debian:bookworm-slim
RUST_BASE=docker.io/library/rust:$RUST_VERSION-bookworm

# Whatever must go when the script ends, however it ends.
CLEANUP=()
trap 'for c in "${CLEANUP[@]}"; do eval "$c"; done' EXIT

log() { echo "image: $*" >&2; }
die() { log "$*"; exit 1; }

docker_ok() { command -v docker >/dev/null && docker info >/dev/null 2>&1; }

# The run flags these machines need: no systemd (cgroupfs), runc, and the container's
# limits within the sandbox's own.
podman_() { podman --runtime runc --cgroup-manager=cgroupfs "$@"; }
RUN_LIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)

install_podman() {
    command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null \
        && return 0
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
        || die "install podman, runc and debootstrap (or run a Docker engine)"
    log "installing podman, runc and debootstrap from the system packages"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc debootstrap >/dev/null
}

make_debian_base() {
    podman image exists "$DEBIAN_BASE" && return 0
    podman_ pull -q "$DEBIAN_BASE" >/dev/null 2>&1 && return 0
    log "no registry: making $DEBIAN_BASE with debootstrap from $DEBIAN_MIRROR"
    local root
    root=$(mktemp -d)
    CLEANUP+=("rm -rf '$root'")
    debootstrap --variant=minbase bookworm "$root" "$DEBIAN_MIRROR" >/dev/null
    # What the official slim image leaves out.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* \
        "$root"/usr/share/man/*
    # The host's own certificate authorities (a TLS-intercepting egress proxy, a company CA):
    # images built here need them to reach crates.io and Debian the way the host does. The
    # `ca-certificates` package picks them up when the Dockerfile installs it.
    if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
        mkdir -p "$root/usr/local/share/ca-certificates"
        cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    fi
    tar -C "$root" -c . | podman import --change 'CMD ["bash"]' - "$DEBIAN_BASE" >/dev/null
}

make_rust_base() {
    podman image exists "$RUST_BASE" && return 0
    podman_ pull -q "$RUST_BASE" >/dev/null 2>&1 && return 0
    local sysroot version
    sysroot=$(rustc --print sysroot)
    version=$(rustc --version | awk '{print $2}')
    [[ $version == $RUST_VERSION.* ]] \
        || die "the host's rustc is $version; $RUST_BASE needs $RUST_VERSION.x"
    log "no registry: making $RUST_BASE from $DEBIAN_BASE and the host's rustc $version"
    local ctx
    ctx=$(mktemp -d)
    CLEANUP+=("rm -rf '$ctx'")
    # The compiler, cargo and the standard library; not the documentation.
    mkdir -p "$ctx/rust"
    cp -a "$sysroot/bin" "$sysroot/lib" "$sysroot/libexec" "$ctx/rust/"
    cat >"$ctx/Containerfile" <<EOF
FROM $DEBIAN_BASE
RUN apt-get update \\
    && apt-get install -y --no-install-recommends gcc libc6-dev ca-certificates pkg-config git \\
    && rm -rf /var/lib/apt/lists/*
COPY rust /usr/local/rust
ENV CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:/usr/local/rust/bin:\$PATH
RUN cargo --version && rustc --version
EOF
    podman_ build -q -t "$RUST_BASE" "$ctx" >/dev/null
}

build() {
    if docker_ok; then
        docker build -t "$IMAGE" "$here"
        ENGINE=docker
        return
    fi
    install_podman
    make_debian_base
    make_rust_base
    log "building $IMAGE with podman"
    # Docker's image format: OCI images have no HEALTHCHECK.
    podman_ build --pull=never --format docker -t "$IMAGE" "$here"
    ENGINE=podman
}

# Runs the image as an operator would (its own CMD, so its own /data/conf), with only the
# database and broker addresses overridden, and checks:
#   - it runs as the non-root user 10001;
#   - /healthz and /readyz answer 200 (database and broker reached from the container);
#   - the image's HEALTHCHECK passes (the run keeps the image's ports 8000 and 9000);
#   - a REST create and a read of it work (migrations ran from inside the image);
#   - SIGTERM (podman stop) ends it with exit code 0, well within the stop timeout.
smoke() {
    [ "$ENGINE" = podman ] || die "--smoke runs with podman"
    local pghost=${PGHOST:-127.0.0.1} pgport=${PGPORT:-5432}
    local mqhost=${AMQP_HOST:-127.0.0.1} mqport=${AMQP_PORT:-5672}
    local db="resource_image_smoke_$$" name="resource-smoke-$$"
    # The image's own ports, so that its HEALTHCHECK (curl on 8000) checks this run.
    local port
    for port in 8000 9000; do
        ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null \
            || die "port $port is taken: the smoke run needs the image's own ports 8000 and 9000"
    done
    psql -h "$pghost" -p "$pgport" -U postgres -qc "CREATE DATABASE $db" >/dev/null
    CLEANUP+=("podman_ rm -f '$name' >/dev/null 2>&1 || true"
        "psql -h '$pghost' -p '$pgport' -U postgres -qc 'DROP DATABASE IF EXISTS $db WITH (FORCE)' >/dev/null 2>&1 || true"
        "rabbitmqctl delete_vhost '$db' >/dev/null 2>&1 || true")
    rabbitmqctl add_vhost "$db" >/dev/null
    rabbitmqctl set_permissions -p "$db" guest '.*' '.*' '.*' >/dev/null

    # The host network: the local PostgreSQL and RabbitMQ listen on loopback only.
    log "running $IMAGE as $name"
    podman_ run -d --name "$name" "${RUN_LIMITS[@]}" --network host \
        -e RESOURCE_DATA__DATABASE__SOURCE="postgres://postgres@$pghost:$pgport/$db" \
        -e RESOURCE_DATA__RABBITMQ__URL="amqp://guest:guest@$mqhost:$mqport/$db" \
        "$IMAGE" >/dev/null

    local base="http://127.0.0.1:8000" i
    for ((i = 0; i < 60; i++)); do
        curl -fsS "$base/readyz" >/dev/null 2>&1 && break
        sleep 0.5
    done
    curl -fsS "$base/readyz" >/dev/null || { podman_ logs "$name" >&2; die "/readyz is not 200"; }
    curl -fsS "$base/healthz" >/dev/null || die "/healthz is not 200"
    log "ready: /healthz and /readyz answer 200"

    local uid
    uid=$(podman_ exec "$name" id -u)
    [ "$uid" = 10001 ] || die "the service runs as uid $uid, not 10001"
    log "runs as uid $uid"

    # `podman healthcheck run` needs the Docker image format (`--format docker` above).
    podman_ healthcheck run "$name" || die "the image's HEALTHCHECK fails"
    log "the image's HEALTHCHECK passes"

    local created id
    created=$(curl -fsS -X POST "$base/v1/resources" -H 'content-type: application/json' \
        -d '{"name":"smoke","user_id":"u1","request_id":"smoke-1","spec":{"cpu":2,"memory":1024,"image":"nginx:1.27"}}')
    id=$(sed -E 's/.*"instance_id":"([0-9]+)".*/\1/' <<<"$created")
    [[ $id =~ ^[0-9]+$ ]] || die "create answered $created"
    curl -fsS "$base/v1/resources/$id" | grep -q '"name":"smoke"' || die "GET /v1/resources/$id"
    log "REST create and get of instance $id"

    local started stopped code
    started=$(date +%s%N)
    podman_ stop -t 30 "$name" >/dev/null
    stopped=$(date +%s%N)
    code=$(podman inspect --format '{{.State.ExitCode}}' "$name")
    [ "$code" = 0 ] || { podman_ logs "$name" | tail -20 >&2; die "exit code $code after SIGTERM"; }
    log "SIGTERM: exit code 0 after $(((stopped - started) / 1000000)) ms"

    podman image inspect --format '{{.Size}}' "$IMAGE" \
        | awk '{printf "image: size %.1f MB\n", $1 / 1e6}' >&2
    log "smoke PASS"
}

ENGINE=
build
[ "${1:-}" = --smoke ] && smoke
exit 0

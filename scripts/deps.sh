#!/usr/bin/env bash
# Makes sure PostgreSQL and RabbitMQ answer, preparing whatever is missing:
#   1. reuse them when they already answer on the configured addresses;
#   2. else start them with `docker compose` when a Docker engine runs;
#   3. else, as root on Debian/Ubuntu, install them from the system packages and start them;
#   4. else say exactly what to install, and fail.
# Then creates the database named in RESOURCE_DATA__DATABASE__SOURCE (default "resource")
# when --create-db is given.
#
# Environment: PGHOST (127.0.0.1), PGPORT (5432), AMQP_HOST (127.0.0.1), AMQP_PORT (5672).
set -euo pipefail

PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
AMQP_HOST=${AMQP_HOST:-127.0.0.1}
AMQP_PORT=${AMQP_PORT:-5672}
here=$(cd "$(dirname "$0")/.." && pwd)

log() { echo "deps: $*" >&2; }

answers() { # host port
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

wait_for() { # name host port seconds
    local i
    for ((i = 0; i < $4 * 2; i++)); do
        answers "$2" "$3" && { log "$1 answers on $2:$3"; return 0; }
        sleep 0.5
    done
    log "$1 did not answer on $2:$3 within $4 s"
    return 1
}

pg_ok() { answers "$PGHOST" "$PGPORT"; }
mq_ok() { answers "$AMQP_HOST" "$AMQP_PORT"; }

docker_ok() { command -v docker >/dev/null && docker info >/dev/null 2>&1; }

apt_ok() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }

start_with_docker() {
    log "starting PostgreSQL and RabbitMQ with docker compose"
    docker compose -f "$here/docker-compose.yml" up -d postgres rabbitmq
}

install_postgres() {
    if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
        log "installing PostgreSQL from the system packages"
        apt_update_once
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql postgresql-client >/dev/null
    fi
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n1)
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    # A local development and CI database: trust loopback connections, as the default
    # configuration (postgres://postgres@127.0.0.1/resource) expects.
    if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
        sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    fi
    pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null ||
        pg_ctlcluster --skip-systemctl-redirect "$version" main reload
}

install_rabbitmq() {
    if ! command -v rabbitmq-server >/dev/null; then
        log "installing RabbitMQ from the system packages"
        apt_update_once
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q rabbitmq-server >/dev/null
    fi
    rabbitmq-server -detached 2>/dev/null || true
}

apt_updated=
apt_update_once() {
    [ -n "$apt_updated" ] && return
    apt-get update -q >/dev/null
    apt_updated=1
}

explain() {
    cat >&2 <<MSG
deps: PostgreSQL ($PGHOST:$PGPORT) or RabbitMQ ($AMQP_HOST:$AMQP_PORT) does not answer,
and neither Docker nor root with apt-get is available to start them. Install and start:
  - PostgreSQL 13 or newer, allowing user "postgres" from 127.0.0.1 without a password
    (pg_hba.conf: "host all all 127.0.0.1/32 trust"), or set RESOURCE_DATA__DATABASE__SOURCE;
  - RabbitMQ 3.x with the default guest/guest user;
e.g. on Debian/Ubuntu: sudo apt-get install postgresql rabbitmq-server
     on macOS: brew install postgresql@16 rabbitmq && brew services start postgresql@16 rabbitmq
or run Docker and: docker compose up -d postgres rabbitmq
MSG
    exit 1
}

if ! pg_ok || ! mq_ok; then
    if docker_ok; then
        start_with_docker
    elif apt_ok; then
        pg_ok || install_postgres
        mq_ok || install_rabbitmq
    else
        explain
    fi
    wait_for PostgreSQL "$PGHOST" "$PGPORT" 60
    wait_for RabbitMQ "$AMQP_HOST" "$AMQP_PORT" 120
fi

if [ "${1:-}" = "--create-db" ]; then
    url=${RESOURCE_DATA__DATABASE__SOURCE:-postgres://postgres@$PGHOST:$PGPORT/resource}
    db=${url##*/}
    db=${db%%\?*}
    admin=${url%/*}/postgres
    if command -v psql >/dev/null; then
        psql_run() { psql "$admin" -Atq -v ON_ERROR_STOP=1 -c "$1"; }
    elif docker_ok; then
        psql_run() { docker compose -f "$here/docker-compose.yml" exec -T postgres psql -U postgres -Atq -c "$1"; }
    else
        log "psql not found: create the database \"$db\" yourself"
        exit 1
    fi
    if [ "$(psql_run "SELECT 1 FROM pg_database WHERE datname = '$db'")" != 1 ]; then
        log "creating database $db"
        psql_run "CREATE DATABASE \"$db\""
    fi
fi

#!/usr/bin/env bash
# Makes sure PostgreSQL and RabbitMQ are up and healthy, preparing whatever is missing:
#   1. reuse them when they already answer (PostgreSQL accepts connections, RabbitMQ
#      speaks AMQP) on the configured addresses;
#   2. else start them with `docker compose` when a Docker engine runs;
#   3. else, as root on Debian/Ubuntu, install them from the system packages and start
#      them (a PostgreSQL installed here is opened to loopback without a password, for
#      local development, and the change is printed);
#   4. else say exactly which one is missing and what to run, and fail.
# With --create-db it then creates the database named in RESOURCE_DATA__DATABASE__SOURCE
# (default postgres://postgres@127.0.0.1:5432/resource), connecting as that URL says and
# never prompting for a password: when PostgreSQL refuses the credentials (a cluster with
# its own authentication, as Debian installs it), it says how to pass them.
#
# --trust-local: as root, allow loopback connections without a password on an existing
# cluster (two lines at the top of its pg_hba.conf; printed). Never done without it.
#
# Environment: RESOURCE_DATA__DATABASE__SOURCE, RESOURCE_DATA__RABBITMQ__URL (their hosts
# and ports are the ones checked), or PGHOST/PGPORT and AMQP_HOST/AMQP_PORT.
set -euo pipefail

create_db=
trust_local=
for arg in "$@"; do
    case "$arg" in
        --create-db) create_db=1 ;;
        --trust-local) trust_local=1 ;;
        *) echo "usage: $0 [--create-db] [--trust-local]" >&2; exit 64 ;;
    esac
done

here=$(cd "$(dirname "$0")/.." && pwd)
log() { echo "deps: $*" >&2; }
fail() { log "$*"; exit 1; }

# host and port of a URL: scheme://[user[:password]@]host[:port][/...]
url_host() { local a=${1#*://}; a=${a%%/*}; a=${a##*@}; a=${a%%:*}; echo "${a:-127.0.0.1}"; }
url_port() { local a=${1#*://}; a=${a%%/*}; a=${a##*@}; [[ $a == *:* ]] && echo "${a##*:}" || echo "$2"; }

db_url=${RESOURCE_DATA__DATABASE__SOURCE:-postgres://postgres@${PGHOST:-127.0.0.1}:${PGPORT:-5432}/resource}
mq_url=${RESOURCE_DATA__RABBITMQ__URL:-amqp://guest:guest@${AMQP_HOST:-127.0.0.1}:${AMQP_PORT:-5672}/%2f}
PGHOST=$(url_host "$db_url"); PGHOST=${PGHOST/localhost/127.0.0.1}
PGPORT=$(url_port "$db_url" 5432)
AMQP_HOST=$(url_host "$mq_url"); AMQP_HOST=${AMQP_HOST/localhost/127.0.0.1}
AMQP_PORT=$(url_port "$mq_url" 5672)
# Never wait at a password prompt, nor for a server that does not answer.
export PGCONNECT_TIMEOUT=5

# PostgreSQL is up when it accepts connections (whatever it then says of credentials).
pg_ok() {
    if command -v pg_isready >/dev/null; then
        pg_isready -q -h "$PGHOST" -p "$PGPORT" -t 3
    else
        (exec 3<>"/dev/tcp/$PGHOST/$PGPORT") 2>/dev/null
    fi
}

# RabbitMQ is up when its listener answers the AMQP 0-9-1 header with a frame: an open
# port alone is not a broker that has finished booting.
mq_ok() {
    local byte
    {
        exec 3<>"/dev/tcp/$AMQP_HOST/$AMQP_PORT" &&
            printf 'AMQP\x00\x00\x09\x01' >&3 &&
            IFS= read -r -t 3 -N 1 byte <&3 &&
            [ "$byte" = $'\x01' ]
    } 2>/dev/null
    local ok=$?
    exec 3>&-
    return $ok
}

wait_for() { # name check seconds
    local i
    for ((i = 0; i < $3 * 2; i++)); do
        "$2" && { log "$1 is up"; return 0; }
        sleep 0.5
    done
    return 1
}

docker_ok() { command -v docker >/dev/null && docker info >/dev/null 2>&1; }
root_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }

apt_updated=
apt_update_once() {
    [ -n "$apt_updated" ] && return
    apt-get update -q >/dev/null
    apt_updated=1
}

pg_version() { ls /etc/postgresql 2>/dev/null | sort -V | tail -n1; }

# Lets loopback connections in without a password: local development and CI only.
trust_loopback() { # version
    local hba="/etc/postgresql/$1/main/pg_hba.conf"
    if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
        sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
        log "changed $hba: added, at the top, 'host all all 127.0.0.1/32 trust' and 'host all all ::1/128 trust'"
        log "  (loopback connections need no password now; remove those two lines to undo)"
    fi
}

install_postgres() {
    local installed_here=
    if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
        log "installing PostgreSQL from the system packages"
        apt_update_once
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql postgresql-client >/dev/null
        installed_here=1
    fi
    local version
    version=$(pg_version)
    [ -n "$version" ] || fail "PostgreSQL is installed but has no cluster in /etc/postgresql: create one (pg_createcluster)"
    # A cluster installed by someone else keeps its authentication unless asked.
    if [ -n "$installed_here" ] || [ -n "$trust_local" ]; then
        trust_loopback "$version"
    fi
    log "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null ||
        pg_ctlcluster --skip-systemctl-redirect "$version" main reload
}

install_rabbitmq() {
    if ! command -v rabbitmq-server >/dev/null; then
        log "installing RabbitMQ from the system packages"
        apt_update_once
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q rabbitmq-server >/dev/null
    fi
    log "starting RabbitMQ"
    rabbitmq-server -detached 2>/dev/null || true
}

explain_missing() {
    local missing=()
    pg_ok || missing+=("PostgreSQL on $PGHOST:$PGPORT")
    mq_ok || missing+=("RabbitMQ on $AMQP_HOST:$AMQP_PORT")
    {
        echo "deps: not running: $(IFS=,; echo "${missing[*]}" | sed 's/,/, /g')."
        echo "deps: no Docker engine, and not root with apt-get, so this script cannot start them. Either:"
        echo "  - let it install and start them:   sudo scripts/deps.sh --create-db"
        echo "  - or start them yourself, e.g. on Debian/Ubuntu: sudo apt-get install postgresql rabbitmq-server"
        echo "    on macOS: brew install postgresql@16 rabbitmq && brew services start postgresql@16 rabbitmq"
        echo "  - or run Docker, and: docker compose up -d postgres rabbitmq"
        echo "  - or point the service at servers of yours:"
        echo "    RESOURCE_DATA__DATABASE__SOURCE=postgres://USER:PASSWORD@HOST:5432/resource"
        echo "    RESOURCE_DATA__RABBITMQ__URL=amqp://USER:PASSWORD@HOST:5672/%2f"
    } >&2
    exit 1
}

if pg_ok && mq_ok; then
    log "PostgreSQL ($PGHOST:$PGPORT) and RabbitMQ ($AMQP_HOST:$AMQP_PORT) are up"
else
    if docker_ok; then
        log "starting PostgreSQL and RabbitMQ with docker compose"
        docker compose -f "$here/docker-compose.yml" up -d --wait postgres rabbitmq
    elif root_apt; then
        pg_ok || install_postgres
        mq_ok || install_rabbitmq
    else
        explain_missing
    fi
    wait_for PostgreSQL pg_ok 60 || fail "PostgreSQL did not come up on $PGHOST:$PGPORT within 60 s"
    wait_for RabbitMQ mq_ok 120 || fail "RabbitMQ did not come up on $AMQP_HOST:$AMQP_PORT within 120 s"
fi

[ -n "$create_db" ] || exit 0

db=${db_url##*/}
db=${db%%\?*}
query=
[[ $db_url == *\?* ]] && query="?${db_url#*\?}"
admin="${db_url%/*}/postgres$query"

explain_credentials() { # psql's error
    {
        echo "deps: PostgreSQL on $PGHOST:$PGPORT is up but refused to connect as $(url_user):"
        echo "  $1"
        echo "deps: it has its own authentication (a password, or peer for local users, as"
        echo "deps: Debian installs it). Either:"
        echo "  - give the service and this script credentials it accepts:"
        echo "    RESOURCE_DATA__DATABASE__SOURCE=postgres://USER:PASSWORD@$PGHOST:$PGPORT/$db make run"
        echo "  - or, on a development machine, let loopback connections in without a password:"
        echo "    sudo scripts/deps.sh --create-db --trust-local   (it says what it changes in pg_hba.conf)"
    } >&2
    exit 1
}
url_user() { local a=${db_url#*://}; a=${a%%/*}; [[ $a == *@* ]] && { a=${a%%@*}; echo "${a%%:*}"; } || echo "${USER:-postgres}"; }

if [ -n "$trust_local" ] && root_apt && [ -n "$(pg_version)" ]; then
    trust_loopback "$(pg_version)"
    pg_ctlcluster --skip-systemctl-redirect "$(pg_version)" main reload || true
fi

if command -v psql >/dev/null; then
    psql_run() { psql -w "$admin" -Atq -v ON_ERROR_STOP=1 -c "$1"; }
elif docker_ok; then
    psql_run() { docker compose -f "$here/docker-compose.yml" exec -T postgres psql -U postgres -Atq -c "$1"; }
else
    fail "psql is not installed: install postgresql-client, or create the database \"$db\" yourself"
fi

if ! exists=$(psql_run "SELECT 1 FROM pg_database WHERE datname = '$db'" 2>&1); then
    explain_credentials "$(echo "$exists" | head -n 3)"
fi
if [ "$exists" = 1 ]; then
    log "database $db exists"
else
    out=$(psql_run "CREATE DATABASE \"$db\"" 2>&1) || fail "could not create database $db: $out"
    log "created database $db"
fi

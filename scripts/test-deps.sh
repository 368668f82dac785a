#!/usr/bin/env bash
# Checks scripts/deps.sh on a newcomer's machine (run by .ci/run): PostgreSQL already
# installed with its own password authentication. Against a second cluster on another
# port, deps.sh must fail within 10 s — on a terminal, never waiting at a password
# prompt — say what to do, leave the cluster's authentication alone, and succeed once
# RESOURCE_DATA__DATABASE__SOURCE carries the credentials.
# Needs root and Debian's postgresql-common (pg_createcluster), as on CI machines.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ] || ! command -v pg_createcluster >/dev/null; then
    echo "test-deps: needs root and pg_createcluster (Debian's postgresql-common)" >&2
    exit 1
fi
version=$(ls /etc/postgresql | sort -V | tail -n1)
name=deps_test
port=${TEST_DEPS_PORT:-5499}
pass=deps-test-secret
log=$(mktemp)

pg_dropcluster --stop "$version" "$name" 2>/dev/null || true
pg_createcluster "$version" "$name" -p "$port" -- --auth-host=scram-sha-256 --auth-local=peer >/dev/null
trap 'pg_dropcluster --stop "$version" "$name" 2>/dev/null || true; rm -f "$log"' EXIT
pg_ctlcluster --skip-systemctl-redirect "$version" "$name" start
su postgres -c "psql -q -p $port -c \"ALTER USER postgres PASSWORD '$pass'\""
hba="/etc/postgresql/$version/$name/pg_hba.conf"
before=$(sha256sum "$hba")

# 1. Without credentials, on a terminal (script(1) gives it one): a clear failure, fast.
started=$(date +%s)
set +e
RESOURCE_DATA__DATABASE__SOURCE="postgres://postgres@127.0.0.1:$port/resource" \
    timeout 10 script -qec "scripts/deps.sh --create-db" /dev/null </dev/null >"$log" 2>&1
status=$?
set -e
took=$(( $(date +%s) - started ))
cat "$log"
[ "$status" != 124 ] || { echo "test-deps: FAIL: deps.sh still waiting after 10 s (a password prompt?)"; exit 1; }
[ "$status" != 0 ] || { echo "test-deps: FAIL: deps.sh succeeded without credentials"; exit 1; }
grep -q "RESOURCE_DATA__DATABASE__SOURCE=postgres://USER:PASSWORD@" "$log" ||
    { echo "test-deps: FAIL: no instruction to pass credentials"; exit 1; }
if grep -qi "created database\|creating database" "$log"; then
    echo "test-deps: FAIL: a failed step was reported as done"; exit 1
fi
[ "$before" = "$(sha256sum "$hba")" ] ||
    { echo "test-deps: FAIL: deps.sh changed the cluster's authentication unasked"; exit 1; }
echo "test-deps: without credentials: exit $status after ${took} s, with instructions"

# 2. With the credentials in the service's own variable: the database is created.
RESOURCE_DATA__DATABASE__SOURCE="postgres://postgres:$pass@127.0.0.1:$port/resource" \
    scripts/deps.sh --create-db
[ "$(su postgres -c "psql -Atq -p $port -c \"SELECT 1 FROM pg_database WHERE datname = 'resource'\"")" = 1 ] ||
    { echo "test-deps: FAIL: the database was not created"; exit 1; }
echo "test-deps: with credentials: database created"
echo "test-deps: ok"

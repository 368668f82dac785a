#!/usr/bin/env bash
# Installs the pinned Schemathesis (PyPI) into a virtualenv under target/ and prints the
# path of its `st` command. Idempotent and quiet when already installed. `make test` runs
# it before the tests; the API fuzz test (tests/it/openapi.rs) runs that `st`.
set -euo pipefail

SCHEMATHESIS_VERSION=4.32.5
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV="$ROOT/target/schemathesis-$SCHEMATHESIS_VERSION"

if [[ ! -x "$VENV/bin/st" ]]; then
	if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
		echo "schemathesis.sh: python3 with the venv module is needed (Debian: apt-get install python3-venv)" >&2
		rm -rf "$VENV"
		exit 1
	fi
	"$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION" >&2
fi
echo "$VENV/bin/st"

# `make help` lists the targets. `make run` and `make test` work on a fresh machine:
# both prepare PostgreSQL and RabbitMQ first (scripts/deps.sh).

CONF ?= ./configs
CARGO ?= cargo

.PHONY: help build test test-it lint fmt proto migrate run bench image image-smoke deps toolchain

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

deps: ## make sure PostgreSQL and RabbitMQ answer (install or start them if not)
	@scripts/deps.sh

toolchain: ## make the Rust toolchain of rust-toolchain.toml available
	@scripts/toolchain.sh

build: toolchain ## release build (the Dockerfile runs exactly this)
	$(CARGO) build --release --locked

test: toolchain deps ## every test: unit and integration, against the local PostgreSQL and RabbitMQ
	@if command -v cargo-nextest >/dev/null; then \
		$(CARGO) nextest run --workspace --locked --no-fail-fast; \
	else \
		$(CARGO) test --workspace --locked --no-fail-fast; \
	fi

test-it: toolchain deps ## integration tests only
	$(CARGO) test --locked --test it

lint: toolchain ## formatting and clippy, as CI checks them
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --locked --all-targets -- -D warnings

fmt: ## format the code
	$(CARGO) fmt --all

proto: ## regenerate the protobuf code (build.rs does it on every build)
	$(CARGO) build --locked

migrate: ## apply database migrations to the configured database
	@scripts/deps.sh --create-db
	$(CARGO) run --release --locked -- -conf $(CONF) migrate

run: toolchain ## start the service (PostgreSQL and RabbitMQ prepared, database created and migrated)
	@scripts/deps.sh --create-db
	$(CARGO) run --release --locked -- -conf $(CONF) migrate
	$(CARGO) run --release --locked -- -conf $(CONF) serve

bench: toolchain deps ## benchmarks with printed figures, each beside the reference that bounds it
	@scripts/bench-deps.sh
	$(CARGO) bench --locked

image: ## build the container image resource:latest (docker, else podman with local base images)
	@scripts/image.sh

image-smoke: deps ## build the image, run it against the local PostgreSQL and RabbitMQ, check it
	@scripts/image.sh --smoke

# Build: the same command as `make build` (protoc is vendored through a crate, so the
# Rust toolchain is all the builder needs).
FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked && cp target/release/resource /usr/local/bin/resource
# The release profile keeps line tables for profiling (200 MB); the image keeps the symbols,
# so a panic's backtrace still names functions, and drops the rest (34 MB).
RUN strip --strip-debug /usr/local/bin/resource

# Run: slim base, non-root, config directory at /data/conf as in the Go image.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 resource \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin resource
COPY --from=builder /usr/local/bin/resource /app/resource
COPY configs /data/conf
USER 10001
EXPOSE 8000 9000
HEALTHCHECK --interval=10s --timeout=2s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1
ENTRYPOINT ["/app/resource"]
CMD ["-conf", "/data/conf"]

#!/usr/bin/env bash
# Makes the toolchain pinned in rust-toolchain.toml available without a network where
# it can: rustup installs it on first use when it can download it; on a machine that
# cannot (an offline CI runner) but whose stable toolchain is that very release, the
# stable one is linked under the pinned name.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v rustup >/dev/null || exit 0 # no rustup: cargo is whatever is installed
pinned=$(sed -n 's/^channel = "\(.*\)"/\1/p' rust-toolchain.toml)
if rustup run "$pinned" rustc --version >/dev/null 2>&1; then
    exit 0
fi
stable=$(rustup run stable rustc --version 2>/dev/null | awk '{print $2}' || true)
if [ "$stable" = "$pinned" ]; then
    rustup toolchain link "$pinned" "$(rustup run stable rustc --print sysroot)"
    echo "toolchain: linked the installed stable $stable as $pinned" >&2
    exit 0
fi
echo "toolchain: installing Rust $pinned (rust-toolchain.toml)" >&2
rustup toolchain install "$pinned" --profile minimal --component rustfmt,clippy

#!/usr/bin/env bash
# Builds target/debian/ringlb_*.deb: the release binary, its man page and
# shell completions (generated from the binary's own command line), the
# systemd unit, the default config. Installs cargo-deb if missing (a pinned
# version; compiling it takes about 3.5 CPU-minutes).
# Usage: packaging/build-deb.sh    (prints the .deb's path last)
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked
fi

cargo build --release
out=target/packaging
rm -rf "$out"
mkdir -p "$out"
./target/release/ringlb generate man "$out" >/dev/null
# -n: no name or time stamp inside, so the same input gives the same bytes.
gzip -9n "$out/ringlb.1"
for shell in bash zsh fish; do
    ./target/release/ringlb generate completions "$shell" "$out" >/dev/null
done

# --no-build: the binary just built is the one the man page describes.
cargo deb --no-build 2>&1 | tail -n 1

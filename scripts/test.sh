#!/usr/bin/env bash
# The project's test command (what .ci/run calls): installs what is missing,
# checks formatting and lints, builds the kernel and its images, then runs
# the host unit tests and the emulator integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
# rustup's environment first: setup.sh needs rustup on the PATH.
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
scripts/setup.sh

echo "== format"
cargo fmt --all -- --check
echo "== clippy (host crates, then the kernel for x86_64-unknown-none)"
cargo clippy -q --workspace --all-targets -- -D warnings
cargo clippy -q -p hypervisor --target x86_64-unknown-none -- -D warnings
echo "== kernel and boot images"
scripts/build.sh
echo "== unit and integration tests"
# Two emulated hosts at a time: one per core.
cargo test --workspace --no-fail-fast -- --test-threads=2
echo "== all tests passed in $((SECONDS - start)) s"

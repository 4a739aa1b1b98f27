#!/usr/bin/env bash
# The project's test command (what .ci/run calls): installs what is missing,
# checks formatting and lints, builds the kernel and its images, then runs
# the host unit tests and the emulator integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
scripts/setup.sh
# rustup's environment (setup.sh may just have installed it).
. "$HOME/.cargo/env"

echo "== format"
cargo fmt --all -- --check
echo "== clippy (host crates, then the kernel for x86_64-unknown-none)"
cargo clippy -q --locked --workspace --all-targets -- -D warnings
cargo clippy -q --locked -p hypervisor --target x86_64-unknown-none -- -D warnings
echo "== kernel and boot images"
scripts/build.sh
echo "== unit and integration tests"
# Two tests at a time (a lab test boots two emulated hosts, so up to four
# share the two cores; the tests' time limits allow for it). --locked: the
# committed Cargo.lock is what is tested, never a silent re-resolution.
cargo test --locked --workspace --no-fail-fast -- --test-threads=2
echo "== all tests passed in $((SECONDS - start)) s"

#!/usr/bin/env bash
# The demo: two hosts in a lab namespace, a busy guest live-migrated from A to
# B with a progress bar, its heartbeat continuing on B, the report printed and
# written to target/demo/report.json. Needs root. Optional argument: guest MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
. "$HOME/.cargo/env"
scripts/build.sh >/dev/null
cargo build -q -p tests --bin demo
exec ./target/debug/demo "$@"

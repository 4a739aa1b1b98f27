#!/usr/bin/env bash
# Builds and boots one hypervisor host with its console on this terminal.
#   printf 'cpuinfo\nshutdown\n' | scripts/run.sh
#   scripts/run.sh --uefi | --grub | --emulator bochs | --cpus N | --mem MiB
# Exits 0 when the kernel powers off (the `shutdown` command).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >&2
. "$HOME/.cargo/env"
scripts/build.sh >&2
exec ./target/debug/boot run --images target/images "$@"

#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian machine: the emulators,
# firmware, GRUB tools, and the pinned Rust toolchain. Idempotent; quick when
# everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(qemu-system-x86 ovmf bochs bochsbios vgabios grub-pc-bin grub-common xorriso mtools iproute2 iputils-ping python3
    gcc curl ca-certificates)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "installing: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# rustup itself: Debian 12 does not package it, so from rustup.rs (no
# toolchain yet; the pinned one follows). Callers source ~/.cargo/env after.
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
if ! command -v rustup >/dev/null; then
    echo "installing rustup"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
        | sh -s -- -y -q --profile minimal --default-toolchain none
    . "$HOME/.cargo/env"
fi
toolchain=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
# Every component and the target the build needs; read into variables first
# (grep -q closing the pipe early fails it under pipefail).
components=$(rustup component list --toolchain "$toolchain" --installed 2>/dev/null || true)
targets=$(rustup target list --toolchain "$toolchain" --installed 2>/dev/null || true)
complete=yes
for c in rust-src llvm-tools rustfmt clippy; do
    grep -q "^$c" <<<"$components" || complete=no
done
grep -qx x86_64-unknown-none <<<"$targets" || complete=no
if [ "$complete" = no ] || ! rustup run "$toolchain" rustc --print sysroot >/dev/null 2>&1; then
    rustup toolchain install "$toolchain" --profile minimal \
        -c rust-src,llvm-tools,rustfmt,clippy -t x86_64-unknown-none
fi
echo "setup ok: $(rustup run "$toolchain" rustc --version)"

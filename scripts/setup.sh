#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian machine: the emulators,
# firmware, GRUB tools, and the pinned Rust toolchain. Idempotent; quick when
# everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(qemu-system-x86 ovmf bochs bochsbios vgabios grub-pc-bin grub-common xorriso mtools iproute2 iputils-ping python3)
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

if ! command -v rustup >/dev/null; then
    echo "rustup is required (https://rustup.rs)" >&2
    exit 1
fi
toolchain=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
if ! rustup run "$toolchain" rustc --print sysroot >/dev/null 2>&1 \
    || ! rustup component list --toolchain "$toolchain" --installed 2>/dev/null | grep -q rust-src \
    || ! rustup target list --toolchain "$toolchain" --installed 2>/dev/null | grep -q x86_64-unknown-none; then
    rustup toolchain install "$toolchain" --profile minimal \
        -c rust-src,llvm-tools,rustfmt,clippy -t x86_64-unknown-none
fi
echo "setup ok: $(rustup run "$toolchain" rustc --version)"
